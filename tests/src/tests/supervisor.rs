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

/// Sets the soft RLIMIT_NPROC of `pid` (a process of the `sluice` user): from a process of that
/// user, as this machine gives root no CAP_SYS_RESOURCE to change another user's limits.
/// `soft` None: back to the hard limit.
fn set_nproc(pid: u32, soft: Option<u64>) {
    let as_sluice = |args: &[&str]| {
        let out = sluice_tests::run_with_timeout(
            std::process::Command::new("setpriv")
                .args([
                    "--reuid=sluice",
                    "--regid=sluice",
                    "--clear-groups",
                    "--",
                    "prlimit",
                    "--pid",
                    &pid.to_string(),
                ])
                .args(args),
            HUNG,
        );
        assert!(out.status.success(), "prlimit {args:?}: {}", out.text());
        out.stdout
    };
    let soft = match soft {
        Some(n) => n.to_string(),
        None => as_sluice(&["--nproc", "--raw", "--noheadings", "--output=HARD"])
            .trim()
            .to_string(),
    };
    as_sluice(&[&format!("--nproc={soft}:")]);
}

/// Worker pids, once every one of `expected` others is gone and `n` run (bounded).
fn wait_worker_count(relay: &Sluice, n: usize, gone: &[u32]) -> Vec<u32> {
    let mut now = Vec::new();
    let ok = wait_until(HUNG, || {
        now = relay.worker_pids();
        now.len() == n && !now.iter().any(|p| gone.contains(p))
    });
    assert!(
        ok,
        "workers {now:?}, wanted {n} without {gone:?}\nsluice stderr:\n{}",
        sluice_tests::tail(&relay.stderr_log(), 30)
    );
    now
}

/// `count` new clients, all open at once, each echoed byte-exact (a client the kernel queued on
/// a socket no worker accepts from would hang: the echo then fails after [`HUNG`]).
fn new_clients_served(relay: &Sluice, count: usize, what: &str) {
    let conns = client::open_many(relay.addr(), None, count)
        .unwrap_or_else(|e| panic!("{what}: cannot connect: {e}"));
    client::echo_many(&conns, seed(), 16 * 1024, true, HUNG)
        .unwrap_or_else(|e| panic!("{what}: a new client was not served: {e}"));
}

/// A worker that dies and cannot be started again (the supervisor, running as `sluice`, may
/// not fork: its RLIMIT_NPROC set to 0 from outside with prlimit, a real cause) leaves its port to the living
/// workers: its listening sockets leave the SO_REUSEPORT group, so every new client is served.
/// The supervisor's loop keeps answering while it retries with back-off, the failure is one log
/// line naming why and shows in status and the counters; with the cause gone, the worker comes
/// back and serves again.
#[test]
fn a_worker_that_cannot_restart_leaves_its_port_to_the_others() {
    init();
    if !sluice_tests::require_root() {
        return;
    }
    if !sluice_tests::require_program("setpriv") || !sluice_tests::require_program("prlimit") {
        return;
    }
    super::privileges::sluice_user();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let relay = Sluice::forward(Host::new().addr(), echo.addr())
        .workers(3)
        .arg("--user")
        .arg("sluice")
        .start();
    let workers = relay.wait_workers(3, HUNG);
    set_nproc(relay.pid(), Some(0));
    let victim = workers[1];
    assert!(sys::kill(victim, libc::SIGKILL), "cannot kill {victim}");
    // The replacement cannot start: two workers run, and the supervisor said why.
    wait_worker_count(&relay, 2, &[victim]);
    let logged = wait_until(HUNG, || relay.stderr_log().contains("cannot start"));
    assert!(
        logged,
        "no log line for the failed start:\n{}",
        sluice_tests::tail(&relay.stderr_log(), 30)
    );
    // Every new client is served by the two living workers, several rounds (the socket that
    // lost its worker would take about a third of them).
    for round in 0..3 {
        new_clients_served(&relay, 30, &format!("round {round} while a worker is down"));
    }
    // The supervisor's loop answers (a list command goes through it) while it backs off.
    let out = relay.ctl(&["allow", "list"]);
    assert!(
        out.status.success(),
        "allow list during back-off: {}",
        out.text()
    );
    let status = relay.status();
    assert_eq!(status["totals"]["workers_down"], 1, "status: {status}");
    assert!(
        status["totals"]["worker_start_failures"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "status: {status}"
    );
    let down: Vec<&serde_json::Value> = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["down"].is_string())
        .collect();
    assert_eq!(down.len(), 1, "one worker down in status: {status}");
    assert!(
        down[0]["down"]
            .as_str()
            .is_some_and(|why| why.contains("Resource temporarily unavailable")),
        "the reason in status: {status}"
    );
    let log = relay.stderr_log();
    let line = log
        .lines()
        .find(|l| l.contains("cannot start worker"))
        .unwrap();
    assert!(
        line.contains("Resource temporarily unavailable") && line.contains("next try in"),
        "the failure's log line names why and when it retries: {line}"
    );

    // The cause goes: the worker comes back and the port is whole again.
    set_nproc(relay.pid(), None);
    let now = wait_worker_count(&relay, 3, &[victim]);
    let mut status = relay.status();
    let back = wait_until(HUNG, || {
        status = relay.status();
        status["totals"]["workers_down"] == 0
    });
    assert!(back, "status after the cause went: {status}");
    assert!(
        status["totals"]["worker_restarts"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "status: {status}"
    );
    // The new worker accepts on the socket that came back (its own fds are listening ones).
    let returned = *now.iter().find(|p| !workers.contains(p)).unwrap();
    let mut served_by_new = false;
    for _ in 0..200 {
        let c = client::connect(relay.addr());
        client::echo_many(std::slice::from_ref(&c), seed(), 100, false, HUNG).unwrap();
        let local = c.local_addr().unwrap();
        if procfs::socket_owner(relay.addr(), local, &now) == Some(returned) {
            served_by_new = true;
            break;
        }
    }
    assert!(
        served_by_new,
        "no client of 200 reached the returned worker"
    );
    new_clients_served(&relay, 30, "after the worker came back");
}

/// A worker that stops reading its control pipe (SIGSTOP) does not stall the supervisor: a
/// reload whose messages are larger than the pipe holds still answers at once, list commands
/// too, and after `CONTROL_STALL` the worker is killed and replaced (it would start with the
/// whole state), with a log line and a counter.
#[test]
fn a_worker_that_stops_reading_its_control_pipe_does_not_stall_the_supervisor() {
    init();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let listen = host.addr();
    let text = |deny: &str| {
        format!(
            "workers = 2\n\n[admission]\ndeny = [{deny}]\n\n[[listen]]\nname = \"a\"\nbind = \"{listen}\"\nupstream = [\"{}\"]\n",
            echo.addr()
        )
    };
    let relay = Sluice::run_config_text(&text(""), vec![listen])
        .workers(2)
        .start();
    let workers = relay.wait_workers(2, HUNG);
    let stopped = workers[0];
    assert!(sys::kill(stopped, libc::SIGSTOP), "cannot stop {stopped}");
    // 4000 deny rules: the reload sends each worker the configuration and the lists, about
    // 150 KB, more than a pipe holds (64 KiB). (Not more: a worker gets the configuration in
    // its environment, where one string may not exceed 128 KiB.)
    let deny: Vec<String> = (0..4_000u32)
        .map(|i| format!("\"10.{}.{}.1/32\"", i >> 8, i & 255))
        .collect();
    std::fs::write(relay.dir().join("sluice.toml"), text(&deny.join(", "))).unwrap();
    let out = relay.ctl(&["reload"]);
    assert!(
        out.status.success() && out.stdout.contains("reloaded"),
        "reload with a stopped worker: {}\nsluice stderr:\n{}",
        out.text(),
        sluice_tests::tail(&relay.stderr_log(), 30)
    );
    assert!(
        out.stdout.contains("1 of 2 workers applied it"),
        "the running worker applied it: {}",
        out.text()
    );
    let out = relay.ctl(&["deny", "list"]);
    assert!(
        out.status.success() && out.stdout.contains("10.15.159.1/32"),
        "deny list with a stopped worker: {}",
        tail(&out.text())
    );
    // The defined answer: the worker that does not read is replaced.
    let now = wait_worker_count(&relay, 2, &[stopped]);
    assert!(
        now.contains(&workers[1]),
        "the reading worker stays: {now:?}"
    );
    let log = relay.stderr_log();
    assert!(
        log.contains("does not read its control pipe"),
        "no log line for the stalled worker:\n{}",
        sluice_tests::tail(&log, 30)
    );
    assert_eq!(
        relay.counter("workers_killed_unread"),
        Some(1),
        "status: {}",
        relay.status()
    );
    // The new worker has the lists; new clients are served (127.0.0.x is not denied).
    let status = relay.status();
    assert_eq!(status["admission"]["deny_rules"], 4_000, "status: {status}");
    new_clients_served(&relay, 20, "after the stalled worker was replaced");
}

fn tail(text: &str) -> String {
    sluice_tests::tail(text, 10)
}
