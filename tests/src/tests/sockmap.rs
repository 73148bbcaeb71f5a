//! The `sockmap` engine through the daemon: what the sockmap probe taught, each as a test on real
//! sockets. The engine-independent checks (1 GiB each way, half-close each direction, resets,
//! timeouts, PROXY headers, SNI, 2000 connections) run for `sockmap` too, through `engines!`.
//!
//! Here:
//! - bytes a client sent while the upstream connect was still pending (queued on the socket
//!   before it entered the sockmap) all arrive;
//! - a gigabyte on the fast path, without flow control, passes through user space only what
//!   was queued before insertion (`fast_path_user_bytes`: counted, never timed);
//! - 10 000 connections churned leave no entry in the worker's maps;
//! - without CAP_BPF the daemon says so once and splices.
//! - with maps pinned by `sluicectl load`, the daemon relays through them, and a killed
//!   worker's entries are cleared.

use std::io::{Read, Write};
use std::thread;

use sluice::ebpf::{FastPath, Occupancy};
use sluice_tests::servers::{BlackHole, EchoServer, Mode, StreamServer, StreamSpec};
use sluice_tests::sluice::Config;
use sluice_tests::{HUNG, Host, Sluice, client, require_program, wait_until};

use super::{assert_engine, engine_ok, seed};

/// Bytes sent at once by a client that does not wait for anything: more than the initial
/// receive window, so without the kick after insertion the connection would stall.
const EARLY: u64 = 3 << 20;

#[test]
fn bytes_sent_before_the_upstream_connects_all_arrive() {
    if !engine_ok("sockmap") {
        return;
    }
    let host = Host::new();
    let hole_host = Host::new();
    let hole = BlackHole::new(hole_host.addr());
    let server = StreamServer::start(host.addr());
    let bind = Host::new().addr();
    // The black hole first: each connect waits out its timeout there while the client's bytes
    // pile up on the relay's socket; the next address takes it. Connections start at
    // alternating addresses, so several of them are checked to hit the slow path.
    let config = Config {
        connect_ms: Some(400),
        ..Config::new()
    }
    .listen(
        "early",
        bind,
        &[&hole.addr().to_string(), &server.addr().to_string()],
    );
    let relay = Sluice::run_config(&config)
        .engine("sockmap")
        .workers(1)
        .start();
    assert_engine(&relay, "sockmap");
    for mode in [Mode::ReplyAfterEof, Mode::Concurrent, Mode::ReplyAfterEof] {
        let spec = StreamSpec::new(seed(), EARLY, EARLY, mode);
        let client = client::run_stream(relay.addr(), spec);
        let server = server.result(spec.seed, HUNG);
        assert!(
            client.is_ok() && server.is_ok(),
            "{mode:?}: client {client:?}, server {server:?}"
        );
    }
    assert!(
        relay.counter("fast_path_pairs").unwrap_or(0) >= 3,
        "connections did not take the fast path: {}",
        relay.status()
    );
}

/// User + system CPU ticks of every worker of `relay` (from /proc/PID/stat).
fn worker_cpu_ticks(relay: &Sluice) -> u64 {
    relay
        .worker_pids()
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            // Fields after the command name (which may hold spaces): utime is the 14th field.
            let rest = &stat[stat.rfind(')').expect("stat has a comm") + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn a_gib_on_the_fast_path_passes_through_user_space_only_what_came_before_insertion() {
    if !engine_ok("sockmap") {
        return;
    }
    // Without flow control (`sockmap_queue_limit_mib = 0`) the verdict redirects every skb that
    // arrives after insertion, so the worker forwards itself only what the client got queued
    // on its socket before (at most one receive buffer: the kernel's `tcp_rmem` maximum): the
    // property that makes the fast path cheap, counted in bytes rather than timed. How much
    // that is depends on scheduling (0 on a quiet machine, 251 KiB seen with a busy core); how
    // much flow control holds depends on how far the reader lags: `faults::slow_reader_*`.
    let host = Host::new();
    let server = StreamServer::start(host.addr());
    let config = Config {
        sockmap_queue_limit_mib: Some(0),
        ..Config::new()
    }
    .listen("bulk", host.addr(), &[&server.addr().to_string()]);
    let relay = Sluice::run_config(&config)
        .engine("sockmap")
        .workers(1)
        .start();
    assert_engine(&relay, "sockmap");
    let ticks_before = worker_cpu_ticks(&relay);
    const LEN: u64 = 1 << 30;
    let spec = StreamSpec::new(seed(), LEN, 0, Mode::ReplyAfterEof);
    let client = client::run_stream(relay.addr(), spec);
    let server = server.result(spec.seed, HUNG);
    assert!(
        client.is_ok() && server.is_ok(),
        "client {client:?}, server {server:?}"
    );
    assert!(
        relay.wait_counter("closed", 1, HUNG) >= 1,
        "the connection never closed: {}",
        relay.status()
    );
    assert_eq!(
        relay.counter("fast_path_pairs"),
        Some(1),
        "{}",
        relay.status()
    );
    let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .expect("tcp_rmem")
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .expect("tcp_rmem's maximum");
    let user = relay.counter("fast_path_user_bytes").unwrap_or(u64::MAX);
    assert!(
        user <= rmem_max,
        "the worker forwarded {user} bytes itself, more than one receive buffer ({rmem_max}): {}",
        relay.status()
    );
    eprintln!("bytes the sockmap worker forwarded itself: {user} of {LEN}");
    assert!(
        relay.counter("bytes_client_to_upstream").unwrap_or(0) >= LEN,
        "the kernel's bytes were not counted: {}",
        relay.status()
    );
    // For the log only (never a pass/fail timing): the worker's CPU for the whole GiB.
    eprintln!(
        "sockmap worker CPU for 1 GiB: {} ticks",
        worker_cpu_ticks(&relay) - ticks_before
    );
}

#[test]
fn ten_thousand_connections_leave_no_map_entry() {
    if !engine_ok("sockmap") {
        return;
    }
    const CONNS: u64 = 10_000;
    const THREADS: u64 = 4;
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let relay = Sluice::forward(Host::new().addr(), echo.addr())
        .engine("sockmap")
        .workers(1)
        .start();
    assert_engine(&relay, "sockmap");
    let addr = relay.addr();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..CONNS / THREADS {
                    let mut s = client::connect(addr);
                    s.set_read_timeout(Some(HUNG)).unwrap();
                    let msg = (t * CONNS + i).to_le_bytes();
                    s.write_all(&msg).unwrap();
                    let mut back = [0u8; 8];
                    s.read_exact(&mut back).unwrap();
                    assert_eq!(back, msg, "echo through the fast path");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a client thread failed");
    }
    assert!(
        relay.wait_counter("closed", CONNS, HUNG) >= CONNS,
        "not every connection closed: {}",
        relay.status()
    );
    // The worker counts its map entries on its first tick with no connection left.
    assert!(
        relay.wait_counter("fast_path_audited_pairs", CONNS, HUNG) >= CONNS,
        "the worker never counted its maps after the last connection: {}",
        relay.status()
    );
    assert_eq!(
        relay.counter("fast_path_pairs"),
        Some(CONNS),
        "every connection on the fast path: {}",
        relay.status()
    );
    assert_eq!(
        relay.counter("fast_path_entries"),
        Some(0),
        "entries left in the fast-path maps after {CONNS} connections: {}",
        relay.status()
    );
}

#[test]
fn without_cap_bpf_the_daemon_splices_and_says_why() {
    if !engine_ok("sockmap") || !require_program("setpriv") {
        return;
    }
    let host = Host::new();
    let server = StreamServer::start(host.addr());
    // setpriv drops CAP_BPF (and CAP_SYS_ADMIN, which also allows BPF) from the bounding set
    // before exec: the daemon runs as root without them.
    let relay = Sluice::forward(Host::new().addr(), server.addr())
        .engine("sockmap")
        .workers(2)
        .wrap(&[
            "setpriv",
            "--bounding-set=-bpf,-sys_admin,-perfmon",
            "--inh-caps=-bpf,-sys_admin,-perfmon",
            "--",
        ])
        .start();
    assert_engine(&relay, "splice");
    let status = relay.status();
    let why = status["fast_path"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("unavailable: "),
        "status does not say why the fast path is off: {status}"
    );
    let log = relay.stderr_log();
    assert_eq!(
        log.matches("sockmap fast path is unavailable").count(),
        1,
        "one clear line, from the supervisor only:\n{log}"
    );
    let spec = StreamSpec::new(seed(), 1 << 20, 1 << 20, Mode::Concurrent);
    let client = client::run_stream(relay.addr(), spec);
    let server = server.result(spec.seed, HUNG);
    assert!(
        client.is_ok() && server.is_ok(),
        "client {client:?}, server {server:?}"
    );
}

/// With maps pinned by `sluicectl load`, the daemon uses them: the supervisor attaches the
/// verdict to the pinned sockmap and every worker inserts its pairs there, so what the daemon
/// relays is visible through the pins (as `sluicectl` and other tools see it). A worker killed
/// with connections open leaves no entry behind (the supervisor clears its pairs), the other
/// worker's pairs stay and relay, and once every connection closed the pinned maps are empty.
#[test]
fn with_pinned_maps_the_daemon_relays_through_them() {
    if !engine_ok("sockmap") {
        return;
    }
    const CONNS: usize = 40;
    let bpffs = super::ebpf::Bpffs::mount();
    let pins = bpffs.path().join("sluice");
    let pins_s = pins.to_string_lossy().into_owned();
    let ctl = |args: &[&str]| {
        let mut cmd = std::process::Command::new(sluice_tests::sluice::sluicectl_bin());
        cmd.args(args);
        sluice_tests::run_with_timeout(&mut cmd, HUNG)
    };
    let out = ctl(&["load", "--pin-dir", &pins_s]);
    assert!(out.status.success(), "sluicectl load: {}", out.text());

    let echo = EchoServer::start(Host::new().addr());
    let stream = StreamServer::start(Host::new().addr());
    let stream_addr = Host::new().addr();
    // A 1 MiB fast-path allowance: the stream below makes the verdict hold, and the supervisor
    // (which reads the shared maps' event ring) tells the worker.
    let config = Config {
        sockmap_queue_limit_mib: Some(1),
        ..Config::new()
    }
    .listen("echo", Host::new().addr(), &[&echo.addr().to_string()])
    .listen("stream", stream_addr, &[&stream.addr().to_string()]);
    let relay = Sluice::run_config(&config)
        .engine("sockmap")
        .workers(2)
        .arg("--bpf-pin-dir")
        .arg(pins_s.clone())
        .start();
    let workers = relay.wait_workers(2, HUNG);
    assert_engine(&relay, "sockmap");
    let status = relay.status();
    assert!(
        status["fast_path"]
            .as_str()
            .is_some_and(|s| s.contains("pinned under")),
        "status does not say the pinned maps are used: {status}"
    );
    let conns = client::open_many(relay.addr(), None, CONNS).unwrap();
    client::echo_many(&conns, seed(), 64 << 10, false, HUNG).unwrap();
    let pinned = FastPath::open_pinned(&pins).expect("open the pins");
    let entries = |n: usize| Occupancy {
        sockets: n,
        peers: n,
        counters: n,
    };
    let mut seen = Occupancy::default();
    assert!(
        wait_until(HUNG, || {
            seen = pinned.occupancy().unwrap();
            seen == entries(2 * CONNS)
        }),
        "every relayed connection's two sockets in the pinned maps: {seen:?}"
    );
    assert_eq!(relay.counter("fast_path_pairs"), Some(CONNS as u64));

    // Flow control through the shared maps: 16 MiB each way, byte-exact.
    let spec = StreamSpec::new(seed(), 16 << 20, 16 << 20, Mode::Concurrent);
    let client = client::run_stream(stream_addr, spec);
    let server = stream.result(spec.seed, HUNG);
    assert!(
        client.is_ok() && server.is_ok(),
        "held and forwarded through the shared maps: client {client:?}, server {server:?}\n{}",
        relay.stderr_log()
    );
    assert!(
        wait_until(HUNG, || {
            seen = pinned.occupancy().unwrap();
            seen == entries(2 * CONNS)
        }),
        "the stream's entries left the pinned maps: {seen:?}"
    );

    // Kill one worker: its sockets close, the supervisor clears its peers and counters.
    let victim = workers[0];
    assert!(sluice_tests::sys::kill(victim, libc::SIGKILL));
    assert!(
        wait_until(HUNG, || {
            let now = relay.worker_pids();
            now.len() == 2 && !now.contains(&victim)
        }),
        "the killed worker was not replaced"
    );
    let survivors: Vec<&std::net::TcpStream> = conns
        .iter()
        .filter(|c| client::echo_many(std::slice::from_ref(*c), seed(), 1024, false, HUNG).is_ok())
        .collect();
    assert!(
        !survivors.is_empty() && survivors.len() < CONNS,
        "{} of {CONNS} connections survived killing one of two workers",
        survivors.len()
    );
    assert!(
        wait_until(HUNG, || {
            seen = pinned.occupancy().unwrap();
            seen == entries(2 * survivors.len())
        }),
        "after the kill the pinned maps should hold the {} surviving connections only: {seen:?}",
        survivors.len()
    );
    drop(conns);
    assert!(
        wait_until(HUNG, || {
            seen = pinned.occupancy().unwrap();
            seen == Occupancy::default()
        }),
        "entries left in the pinned maps after every connection closed: {seen:?}"
    );
    // New connections (also on the new worker) relay through the same maps.
    let fresh = client::open_many(relay.addr(), None, 10).unwrap();
    client::echo_many(&fresh, seed(), 4096, true, HUNG).unwrap();
    drop(fresh);
    drop(pinned);
    drop(relay);
    let out = ctl(&["unload", "--pin-dir", &pins_s]);
    assert!(out.status.success(), "sluicectl unload: {}", out.text());
}
