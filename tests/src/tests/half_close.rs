//! Half-close: a FIN is forwarded only after every byte before it, and the other direction
//! stays open until its own FIN (and keeps flowing past the after-FIN timeout while bytes move).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use sluice_tests::servers::{Mode, StreamServer, StreamSpec, expect_pattern_then_eof};
use sluice_tests::{HUNG, Host, Sluice, client};

use super::{engine_ok, seed};

const LEN: u64 = 4 << 20;

fn relay_and_server(engine: &str) -> (StreamServer, Sluice) {
    let host = Host::new();
    let server = StreamServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), server.addr())
        .engine(engine)
        .workers(2)
        .start();
    (server, relay)
}

fn check(engine: &str, mode: Mode) {
    if !engine_ok(engine) {
        return;
    }
    let (server, relay) = relay_and_server(engine);
    // Several sizes: an empty direction, a few bytes, megabytes.
    for (up, down) in [(LEN, LEN), (0, LEN), (LEN, 0), (1, 1), (0, 0)] {
        let spec = StreamSpec::new(seed(), up, down, mode);
        let client = client::run_stream(relay.addr(), spec);
        let server = server.result(spec.seed, HUNG);
        assert!(
            client.is_ok() && server.is_ok(),
            "{engine} {mode:?} up {up} down {down}: client {client:?}, server {server:?}"
        );
    }
}

/// The client sends everything and shuts its write side; the upstream answers only once it has
/// seen that FIN; the client still gets the whole answer, then the upstream's FIN.
fn client_shuts_first(engine: &str) {
    check(engine, Mode::ReplyAfterEof);
}
engines!(client_shuts_first);

/// The mirror: the upstream sends everything and shuts first; the client sends only after it
/// got that FIN, and the upstream still gets every byte.
fn upstream_shuts_first(engine: &str) {
    check(engine, Mode::SendFirst);
}
engines!(upstream_shuts_first);

/// After the upstream's FIN, the client keeps sending in slow pieces for longer than the
/// after-FIN timeout (1 s, as in WhatsApp's HAProxy, where it is an inactivity timeout): a
/// half-closed connection that still moves bytes is not cut.
fn half_closed_keeps_flowing(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let server = StreamServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), server.addr())
        .engine(engine)
        .workers(1)
        .fin_timeout_ms(1000)
        .start();
    let pieces = 8u64;
    let piece = 64 * 1024u64;
    let spec = StreamSpec::new(seed(), pieces * piece, 1000, Mode::SendFirst);
    let mut s = client::connect(relay.addr());
    s.write_all(&spec.header()).unwrap();
    expect_pattern_then_eof(&mut s, spec.down(), spec.down_len).unwrap();
    for i in 0..pieces {
        thread::sleep(Duration::from_millis(300));
        let bytes = spec.up().bytes(i * piece, piece as usize);
        if let Err(e) = s.write_all(&bytes) {
            panic!("{engine}: piece {i} of {pieces} after the upstream's FIN: {e}");
        }
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut b = [0u8; 1];
    let end = s.read(&mut b);
    let server = server.result(spec.seed, HUNG);
    assert!(
        server.is_ok(),
        "{engine}: upstream got {server:?} (client saw {end:?})"
    );
}
engines!(half_closed_keeps_flowing);
