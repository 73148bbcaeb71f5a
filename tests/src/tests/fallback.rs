//! Where io_uring is refused (a seccomp filter returns EPERM for io_uring_setup, as Docker's
//! default profile does), `--engine auto` falls back to epoll, says so in `sluicectl status
//! --json`, and still relays byte-exact, half-close included. Where io_uring works but lacks
//! what the engines are built on (buffer rings refused with EINVAL, as before 5.19), every
//! engine choice falls back the same way with one line saying why; without the optional setup
//! flags the io_uring engines run on.

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

/// A kernel older than 5.19 has io_uring but no provided-buffer rings (and no multishot accept
/// or receive): every engine choice falls back to epoll, with one line naming what is missing,
/// and relays byte-exact. The kernel's refusal is real (a seccomp filter makes
/// io_uring_register(IORING_REGISTER_PBUF_RING) fail with EINVAL, as it does there); before the
/// probe, every worker failed at start.
#[test]
fn every_engine_falls_back_to_epoll_without_buffer_rings() {
    init();
    for engine in ["auto", "splice", "copy"] {
        let host = Host::new();
        let server = StreamServer::start(host.addr());
        let relay = Sluice::forward(host.addr(), server.addr())
            .engine(engine)
            .workers(2)
            .refuse_buffer_rings()
            .start();
        assert_engine(&relay, "epoll");
        let log = relay.stderr_log();
        let why: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("lacks provided buffer rings"))
            .collect();
        assert_eq!(why.len(), 1, "{engine}: one line says why: {log}");
        assert!(
            why[0].contains("using the epoll engine"),
            "{engine}: {}",
            why[0]
        );
        for (len, mode) in [
            (8u64 << 20, Mode::Concurrent),
            (1 << 20, Mode::ReplyAfterEof),
        ] {
            let spec = StreamSpec::new(seed(), len, len, mode);
            let client = client::run_stream(relay.addr(), spec);
            let server = server.result(spec.seed, HUNG);
            assert!(
                client.is_ok() && server.is_ok(),
                "{engine}, {mode:?}: client {client:?}, server {server:?}"
            );
        }
        // doctor, run under the same refusal, says what the relay will use.
        let mut doctor = Command::new(sluice_tests::sluice::sluicectl_bin());
        doctor.args(["doctor", "--json"]);
        sys::refuse_buffer_rings(&mut doctor);
        let out = run_with_timeout(&mut doctor, Duration::from_secs(60));
        assert!(
            out.stdout.contains("lacks provided buffer rings")
                && out.stdout.contains("epoll engine"),
            "doctor under the refusal: {}",
            out.text()
        );
    }
}

/// Without SINGLE_ISSUER and COOP_TASKRUN (kernels before 6.0 / 5.19; here left out through
/// SLUICE_IO_URING_DISABLE, the switch that routes around them) the io_uring engines still
/// run, say so once, and relay byte-exact.
#[test]
fn io_uring_engines_run_without_the_optional_setup_flags() {
    init();
    if !sluice_tests::require_io_uring() {
        return;
    }
    for engine in ["splice", "copy"] {
        let host = Host::new();
        let server = StreamServer::start(host.addr());
        let relay = Sluice::forward(host.addr(), server.addr())
            .engine(engine)
            .workers(2)
            .env("SLUICE_IO_URING_DISABLE", "single_issuer,coop_taskrun")
            .start();
        assert_engine(&relay, engine);
        let log = relay.stderr_log();
        assert!(
            log.contains("io_uring runs without SINGLE_ISSUER (6.0) and COOP_TASKRUN (5.19)"),
            "{engine}: {log}"
        );
        let spec = StreamSpec::new(seed(), 8 << 20, 8 << 20, Mode::Concurrent);
        let client = client::run_stream(relay.addr(), spec);
        let server = server.result(spec.seed, HUNG);
        assert!(
            client.is_ok() && server.is_ok(),
            "{engine}: client {client:?}, server {server:?}"
        );
    }
}
