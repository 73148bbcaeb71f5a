//! Bulk transfer: a gigabyte each way at once through one relayed connection, byte-exact, for
//! every engine; each direction ends with a FIN that must arrive after its last byte.

use std::time::Duration;

use sluice_tests::servers::{Mode, StreamServer, StreamSpec};
use sluice_tests::{HUNG, Host, Sluice, client};

use super::{assert_engine, engine_ok, seed};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// `len` bytes each way, both directions concurrently, through a relay running `engine`.
pub fn each_way(engine: &str, len: u64) {
    let host = Host::new();
    let server = StreamServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), server.addr())
        .engine(engine)
        .workers(2)
        .start();
    if engine != "auto" {
        assert_engine(&relay, engine);
    }
    let spec = StreamSpec::new(seed(), len, len, Mode::Concurrent);
    let client = client::run_stream(relay.addr(), spec);
    let server = server.result(spec.seed, HUNG);
    if engine == "sockmap" && (client.is_err() || server.is_err()) {
        // The one way the kernel garbles a fast-path stream: a retransmitted segment that
        // overlaps bytes already received goes on whole (see
        // `sockmap::retransmission_overlapping_received_bytes`). The relay must have seen it,
        // counted it and reset the connection; any other failure is the relay's own.
        let dup = relay.wait_counter("fast_path_duplicated_bytes", 1, Duration::from_secs(5));
        if dup > 0 {
            eprintln!(
                "{engine}: the kernel sent {dup} bytes twice (a retransmission overlapped bytes \
                 already received); the relay counted it and reset the connection: client \
                 {client:?}, server {server:?}"
            );
            return;
        }
    }
    assert!(
        client.is_ok() && server.is_ok(),
        "{engine}, {len} bytes each way: client {client:?}, server {server:?}"
    );
}

/// A GiB; `SLUICE_TEST_BULK_MIB` makes it smaller where the kernel is emulated (the VM suite
/// runs this test inside QEMU's TCG, 10–50× slower).
fn one_gib_each_way(engine: &str) {
    if engine_ok(engine) {
        let len = std::env::var("SLUICE_TEST_BULK_MIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(GIB, |mib| mib * MIB);
        each_way(engine, len);
    }
}
engines!(one_gib_each_way);

#[test]
fn auto_engine_256mib_each_way() {
    sluice_tests::init();
    each_way("auto", 256 * MIB);
}
