//! Capacity past one process's fd limit: 30 000 relayed connections held at once by one
//! `sluice run` whose supervisor sizes the worker count from `max_connections` and the fd limit.
//! Clients and upstreams live in `holder` processes (one process may open at most 20000 fds
//! here): three clients of 10 000 connections from 127.0.0.x sources of their own, three echo
//! upstreams sharing one port with SO_REUSEPORT. After they close, the workers' fds and memory
//! are back to their baseline. (This test found io_uring answering a CONNECT with EINPROGRESS
//! under load: see `on_connect` in `relay/src/engine/uring/connect.rs`.)

use std::time::Duration;

use sluice_tests::holder::Holder;
use sluice_tests::sluice::Config;
use sluice_tests::{HUNG, Host, Sluice, init, procfs, require_nofile, wait_until};

use super::holder_exe;

const PROCS: usize = 3;
const PER_PROC: usize = 10_000;
const TOTAL: usize = PROCS * PER_PROC;

/// Sum of `count` over the echo holders: (active, errors).
fn echo_counts(echoes: &mut [Holder]) -> (usize, usize) {
    let mut active = 0;
    let mut errors = 0;
    for e in echoes.iter_mut() {
        e.send("count");
        let words: Vec<usize> = e
            .expect("count", HUNG)
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        active += words[0];
        errors += words[2];
    }
    (active, errors)
}

/// "index: accepted/active" per worker, from `sluicectl status --json`.
fn per_worker(relay: &Sluice) -> String {
    let status = relay.status();
    let workers = status["workers"].as_array().cloned().unwrap_or_default();
    let list: Vec<String> = workers
        .iter()
        .map(|w| format!("{}: {}/{}", w["index"], w["accepted"], w["active"]))
        .collect();
    format!(
        "[{}] (accepted/active); totals {}",
        list.join(", "),
        status["totals"]
    )
}

#[test]
fn thirty_thousand_connections_through_one_relay() {
    init();
    let _alone = sluice_tests::exclusive();
    if !require_nofile(PER_PROC as u64 + 1000) {
        return;
    }
    let relay_host = Host::new();
    let upstream = Host::new().addr();
    let sources: Vec<Host> = (0..PROCS).map(|_| Host::new()).collect();
    let (out_a, out_b) = (Host::new(), Host::new());

    let mut echoes: Vec<Holder> = (0..PROCS)
        .map(|_| {
            Holder::spawn(
                holder_exe(),
                &["echo".into(), upstream.to_string(), "--reuseport".into()],
            )
        })
        .collect();
    for e in &mut echoes {
        e.expect("ready", HUNG);
    }
    let config = Config {
        max_connections: Some(TOTAL as u32 + 2000),
        // Tens of thousands of SYNs at once: some wait for a retransmission (1 s, 3 s, ...).
        connect_ms: Some(30_000),
        ..Config::new()
    }
    .listen("many", relay_host.addr(), &[&upstream.to_string()])
    // 30000 connections to one upstream address from one source address would need more than
    // the ~28k ephemeral ports; two sources double them (the feature under test too).
    .source_addresses(&[out_a.ip.into(), out_b.ip.into()]);
    // Debug logs name why an upstream connect failed (never an address), for the message below.
    let relay = Sluice::run_config(&config)
        .env("SLUICE_LOG", "debug")
        .start();
    // No `workers` given: the supervisor sizes it (10 % headroom over the fd limit's capacity).
    let nworkers = relay.status()["workers"].as_array().map_or(0, Vec::len);
    assert!(
        nworkers >= 3,
        "{TOTAL} connections need at least 3 workers of ~9800: {}",
        relay.status()
    );
    relay.wait_workers(nworkers, HUNG);
    let baseline = relay.fd_baseline();
    let rss = |relay: &Sluice| -> u64 {
        relay
            .worker_pids()
            .iter()
            .filter_map(|p| procfs::rss_kib(*p))
            .sum()
    };
    let rss_before = rss(&relay);

    let mut clients: Vec<Holder> = sources
        .iter()
        .map(|s| {
            Holder::spawn(
                holder_exe(),
                &[
                    "client".into(),
                    relay.addr().to_string(),
                    s.ip.to_string(),
                    PER_PROC.to_string(),
                ],
            )
        })
        .collect();
    for c in &mut clients {
        match c.try_expect("held", Duration::from_secs(240)) {
            Ok(held) => assert_eq!(held, PER_PROC.to_string()),
            Err(e) => {
                let log = relay.stderr_log();
                let failures: Vec<&str> = log.lines().filter(|l| l.contains("failed")).collect();
                panic!(
                    "{e}\nper worker: {}\nfailures in the relay log ({}):\n{}\nrelay log:\n{}",
                    per_worker(&relay),
                    failures.len(),
                    failures
                        .iter()
                        .take(10)
                        .copied()
                        .collect::<Vec<_>>()
                        .join("\n"),
                    sluice_tests::tail(&log, 30)
                )
            }
        }
    }

    // All of them are relayed at the same time.
    let mut counts = (0, 0);
    let all = wait_until(HUNG, || {
        counts = echo_counts(&mut echoes);
        counts.0 == TOTAL
    });
    assert!(
        all,
        "upstreams hold {} connections (errors {}), expected {TOTAL}",
        counts.0, counts.1
    );
    let mut status = relay.status();
    let counted = wait_until(HUNG, || {
        status = relay.status();
        status["active"].as_u64() == Some(TOTAL as u64)
    });
    assert!(counted, "status does not count {TOTAL} active: {status}");
    let workers = status["workers"].as_array().map(Vec::len);
    assert_eq!(workers, Some(nworkers), "status: {status}");
    let rss_held = rss(&relay);

    // A sample exchanges more bytes, byte-exact, while all are held.
    for c in &mut clients {
        c.send(&format!("sample 100 {}", 64 * 1024));
    }
    for c in &mut clients {
        let n: usize = c
            .expect("sampled", Duration::from_secs(120))
            .parse()
            .unwrap();
        assert_eq!(n, PER_PROC.div_ceil(100));
    }

    // All close; the relay lets go of every fd.
    for c in &mut clients {
        c.send("close");
    }
    for c in &mut clients {
        c.expect("closed", HUNG);
    }
    if let Err(e) = relay.settle_fds(baseline, 64, Duration::from_secs(60)) {
        panic!("after {TOTAL} connections closed: {e}");
    }
    // Memory: what holding them cost comes back (the slab is released once a worker is idle);
    // a tenth of the growth, or 4 MiB, may stay with the allocator.
    let grown = rss_held.saturating_sub(rss_before);
    let slack = (grown / 10).max(4096);
    let mut rss_after = 0;
    let back = wait_until(HUNG, || {
        rss_after = rss(&relay);
        rss_after <= rss_before + slack
    });
    let in_progress = relay
        .stderr_log()
        .matches("connect still in progress")
        .count();
    eprintln!(
        "workers' RSS: {rss_before} KiB before, {rss_held} KiB holding {TOTAL}, {rss_after} KiB \
         after; upstream connects io_uring answered EINPROGRESS (waited for): {in_progress}"
    );
    assert!(
        back,
        "workers' RSS {rss_after} KiB after close, {rss_before} KiB before ({rss_held} KiB while \
         holding {TOTAL}): more than {slack} KiB stayed"
    );
    let drained = wait_until(HUNG, || echo_counts(&mut echoes).0 == 0);
    assert!(
        drained,
        "upstream connections left open: {:?}",
        echo_counts(&mut echoes)
    );
    for c in clients {
        c.quit();
    }
    for e in echoes {
        e.quit();
    }
}
