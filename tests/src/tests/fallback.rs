//! `--engine auto` where io_uring is refused (a seccomp filter returns EPERM for
//! io_uring_setup, as Docker's default profile does): the relay falls back to epoll, says so in
//! `sluicectl status --json`, and still relays byte-exact, half-close included.

use std::process::Command;
use std::time::Duration;

use sluice_tests::servers::{EchoServer, Mode, StreamServer, StreamSpec};
use sluice_tests::{HUNG, Host, Sluice, client, init, run_with_timeout, sys};

use super::{assert_engine, holder_exe, seed};

#[test]
fn seccomp_filter_refuses_io_uring() {
    init();
    let mut probe = Command::new(holder_exe());
    probe.arg("probe-io-uring");
    sys::block_io_uring(&mut probe);
    let out = run_with_timeout(&mut probe, Duration::from_secs(10));
    assert!(
        !out.status.success() && out.stdout.contains("Operation not permitted"),
        "io_uring_setup under the filter: {}",
        out.text()
    );
}

#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_blocked() {
    init();
    let host = Host::new();
    let server = StreamServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), server.addr())
        .engine("auto")
        .workers(2)
        .block_io_uring()
        .start();
    assert_engine(&relay, "epoll");
    for (len, mode) in [
        (256u64 << 20, Mode::Concurrent),
        (1 << 20, Mode::ReplyAfterEof),
        (1 << 20, Mode::SendFirst),
    ] {
        let spec = StreamSpec::new(seed(), len, len, mode);
        let client = client::run_stream(relay.addr(), spec);
        let server = server.result(spec.seed, HUNG);
        assert!(
            client.is_ok() && server.is_ok(),
            "{mode:?}, {len} bytes: client {client:?}, server {server:?}"
        );
    }
    let echo_host = Host::new();
    let echo = EchoServer::start(echo_host.addr());
    let relay = Sluice::forward(echo_host.addr(), echo.addr())
        .workers(1)
        .block_io_uring()
        .start();
    assert_engine(&relay, "epoll");
    let conns = client::open_many(relay.addr(), None, 200).unwrap();
    client::echo_many(&conns, seed(), 16 * 1024, true, Duration::from_secs(60)).unwrap();
}
