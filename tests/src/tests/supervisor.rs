//! The supervisor: a SIGKILLed worker is replaced while the other workers' connections carry
//! on; SIGTERM stops everything; `run --config` serves several listeners (names resolved with
//! `--resolve`); `sluicectl status --json` describes the workers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use sluice_tests::servers::{EchoServer, Mode, StreamServer, StreamSpec, read_until_end};
use sluice_tests::{Config, HUNG, Host, Sluice, client, init, procfs, sys, wait_until};

use super::seed;

/// SIGKILLs `victim`; checks a new worker replaces it, its clients are closed and every other
/// connection still relays byte-exact. Returns the survivors and the workers now.
fn kill_worker(
    relay: &Sluice,
    victim: u32,
    conns: Vec<(TcpStream, u32)>,
) -> (Vec<(TcpStream, u32)>, Vec<u32>) {
    let before = relay.worker_pids();
    assert!(
        sys::kill(victim, libc::SIGKILL),
        "cannot signal worker {victim}"
    );
    let mut now = Vec::new();
    let replaced = wait_until(HUNG, || {
        now = relay.worker_pids();
        now.len() == before.len() && !now.contains(&victim)
    });
    assert!(
        replaced,
        "workers after killing {victim}: {now:?} (before {before:?})"
    );
    let (dead, alive): (Vec<_>, Vec<_>) = conns.into_iter().partition(|(_, o)| *o == victim);
    for (c, _) in &dead {
        let (_, end) = read_until_end(c, HUNG);
        assert!(
            end.is_some(),
            "a client of the killed worker is still open {HUNG:?} later"
        );
    }
    let streams: Vec<TcpStream> = alive.iter().map(|(c, _)| c.try_clone().unwrap()).collect();
    client::echo_many(&streams, seed(), 64 * 1024, false, HUNG)
        .unwrap_or_else(|e| panic!("connections on the workers that were not killed: {e}"));
    (alive, now)
}

#[test]
fn killed_worker_is_restarted_and_others_keep_their_connections() {
    init();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), echo.addr()).workers(2).start();
    let workers = relay.wait_workers(2, HUNG);

    // Open connections until both workers hold some (bounded), and learn who holds which.
    let mut conns: Vec<(TcpStream, u32)> = Vec::new();
    for _ in 0..200 {
        let c = client::connect(relay.addr());
        client::echo_many(std::slice::from_ref(&c), seed(), 100, false, HUNG).unwrap();
        let local = c.local_addr().unwrap();
        let o = procfs::socket_owner(relay.addr(), local, &workers)
            .expect("a worker holds the accepted socket");
        conns.push((c, o));
        if conns.len() >= 16 && workers.iter().all(|w| conns.iter().any(|(_, o)| o == w)) {
            break;
        }
    }
    let count = |w: u32, conns: &[(TcpStream, u32)]| conns.iter().filter(|(_, o)| *o == w).count();
    let per_worker: HashMap<u32, usize> = workers.iter().map(|w| (*w, count(*w, &conns))).collect();
    eprintln!("connections per worker: {per_worker:?}");
    let busy = *workers.iter().max_by_key(|w| per_worker[w]).unwrap();
    let other = *workers.iter().find(|w| **w != busy).unwrap();

    // First the less busy worker: the busy one's connections must carry on. Then the busy
    // one: its clients must be closed. Whatever the spread, both are seen.
    let (conns, _) = kill_worker(&relay, other, conns);
    let (conns, _) = kill_worker(&relay, busy, conns);
    drop(conns);

    // New clients are relayed by the new workers.
    let fresh = client::open_many(relay.addr(), None, 20).unwrap();
    client::echo_many(&fresh, seed(), 64 * 1024, true, HUNG).unwrap();
    assert_eq!(relay.status()["workers"].as_array().map(Vec::len), Some(2));
}

#[test]
fn sigterm_stops_supervisor_and_workers() {
    init();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), echo.addr()).workers(2).start();
    relay.wait_workers(2, HUNG);
    let c = client::connect(relay.addr());
    client::echo_many(std::slice::from_ref(&c), seed(), 1000, false, HUNG).unwrap();
    let addr = relay.addr();
    // stop() sends SIGTERM and fails unless the supervisor and every worker are gone in 10 s.
    let (status, _) = relay.stop();
    assert!(
        status.success() || status.code().is_none(),
        "sluice exit status after SIGTERM: {status}"
    );
    // An io_uring's requests (a multishot accept) are torn down by the kernel shortly after the
    // process is gone: the port is released within moments, not necessarily at once.
    let released = wait_until(Duration::from_secs(10), || !procfs::is_listening(addr));
    assert!(
        released,
        "the listen port is still bound 10 s after the relay stopped"
    );
    let (_, end) = read_until_end(&c, HUNG);
    assert!(
        end.is_some(),
        "the client is still open after the relay stopped"
    );
}

#[test]
fn status_describes_workers_and_counts_connections() {
    init();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), echo.addr()).workers(2).start();
    let pids: HashSet<u32> = relay.wait_workers(2, HUNG).into_iter().collect();
    let conns = client::open_many(relay.addr(), None, 10).unwrap();
    client::echo_many(&conns, seed(), 1000, false, HUNG).unwrap();
    let mut status = relay.status();
    let settled = wait_until(HUNG, || {
        status = relay.status();
        status["active"].as_u64() == Some(10)
    });
    assert!(settled, "status: {status}");
    let accepted = relay.counter("accepted");
    assert!(accepted.is_some_and(|n| n >= 10), "status: {status}");
    let workers = status["workers"].as_array().expect("workers array");
    let listed: HashSet<u32> = workers
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    assert_eq!(listed, pids, "worker pids in status: {status}");
    let indexes: HashSet<u64> = workers.iter().filter_map(|w| w["index"].as_u64()).collect();
    assert_eq!(
        indexes,
        HashSet::from([0, 1]),
        "worker indexes in status: {status}"
    );
    let active: u64 = workers.iter().filter_map(|w| w["active"].as_u64()).sum();
    assert_eq!(active, 10, "per-worker active in status: {status}");
}

#[test]
fn run_config_serves_every_listener_and_resolves_names() {
    init();
    let host = Host::new();
    let a = StreamServer::start(host.addr());
    let b = StreamServer::start(host.addr());
    let (la, lb) = (host.addr(), host.addr());
    let mut config = Config::new()
        .listen("plain", la, &[&a.addr().to_string()])
        .listen(
            "named",
            lb,
            &[&format!("upstream-b.test:{}", b.addr().port())],
        );
    config.workers = Some(2);
    config.listeners[1].max_connections = Some(100);
    let _relay = Sluice::run_config(&config)
        .resolve("upstream-b.test", IpAddr::V4(host.ip))
        .workers(2)
        .start();
    for (listen, server) in [(la, &a), (lb, &b)] {
        let spec = StreamSpec::new(seed(), 3 << 20, 3 << 20, Mode::Concurrent);
        let client = client::run_stream(listen, spec);
        let server = server.result(spec.seed, HUNG);
        assert!(
            client.is_ok() && server.is_ok(),
            "listener {listen}: client {client:?}, server {server:?}"
        );
    }
}

#[test]
fn config_timeouts_apply() {
    init();
    let host = Host::new();
    let silent = sluice_tests::servers::SilentServer::start(host.addr());
    let listen = host.addr();
    let mut config = Config::new().listen("quiet", listen, &[&silent.addr().to_string()]);
    config.idle_ms = Some(1000);
    let relay = Sluice::run_config(&config).workers(1).start();
    let c = client::connect(relay.addr());
    let (_, end) = read_until_end(&c, HUNG);
    assert!(
        end.is_some(),
        "[timeouts] idle_ms = 1000 did not close a silent connection in {HUNG:?}"
    );
}

/// A listener's own `max_connections` caps that listener only.
#[test]
fn listener_max_connections_caps_that_listener() {
    init();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let (capped, free) = (host.addr(), host.addr());
    let up = echo.addr().to_string();
    let mut config = Config::new()
        .listen("capped", capped, &[&up])
        .listen("free", free, &[&up]);
    config.listeners[0].max_connections = Some(2);
    let relay = Sluice::run_config(&config).workers(1).start();
    let held = client::open_many(capped, None, 2).unwrap();
    client::echo_many(&held, seed(), 100, false, HUNG).unwrap();
    let third = client::try_connect(capped, None);
    if let Ok(third) = third {
        let (n, end) = read_until_end(&third, HUNG);
        assert!(
            end.is_some() && n == 0,
            "a third client on a listener capped at 2 was relayed"
        );
    }
    let others = client::open_many(free, None, 5).unwrap();
    client::echo_many(&others, seed(), 100, true, HUNG).unwrap();
    client::echo_many(&held, seed(), 100, true, HUNG).unwrap();
    drop(relay);
}
