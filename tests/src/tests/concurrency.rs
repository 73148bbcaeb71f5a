//! Many connections at once: 2000 relayed connections all open together, each echoing its own
//! pattern byte-exact; and `--max-connections`: the connection past the cap is closed at once,
//! and a freed slot takes a new client.

use std::time::Duration;

use sluice_tests::servers::{EchoServer, read_until_end};
use sluice_tests::{HUNG, Host, Sluice, client, wait_until};

use super::{engine_ok, seed};

const CONNS: usize = 2000;

fn two_thousand_connections(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), echo.addr())
        .engine(engine)
        .workers(2)
        .start();
    let baseline = relay.fd_baseline();
    let conns = client::open_many(relay.addr(), None, CONNS).unwrap();
    let all_up = wait_until(HUNG, || echo.active() >= CONNS);
    assert!(
        all_up,
        "{engine}: {} of {CONNS} connections reached the upstream",
        echo.active()
    );
    client::echo_many(&conns, seed(), 64 * 1024, true, Duration::from_secs(120)).unwrap_or_else(
        |e| {
            // Who reset it: the relay's counters and the kernel's (the guest VMs have tcp_mem
            // and TIME_WAIT limits sized to 2 GiB of memory).
            panic!(
                "{engine}: {e}\nrelay totals: {}\nkernel: {}{}",
                relay.status()["totals"],
                std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default(),
                tcp_aborts()
            )
        },
    );
    drop(conns);
    if let Err(e) = relay.settle_fds(baseline, 8, Duration::from_secs(20)) {
        panic!("{engine}, after {CONNS} connections closed: {e}");
    }
}
engines!(two_thousand_connections);

/// The kernel's TCP abort and memory-pressure counters (`/proc/net/netstat`, TcpExt) that are
/// not zero: why a socket was reset when the relay did not say.
fn tcp_aborts() -> String {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return String::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter(|(n, v)| (n.contains("Abort") || n.contains("Memory")) && *v != "0")
        .map(|(n, v)| format!("{n}={v} "))
        .collect()
}

#[test]
fn max_connections_refuses_the_extra_client() {
    sluice_tests::init();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), echo.addr())
        .workers(1)
        .max_connections(5)
        .start();
    let mut held = client::open_many(relay.addr(), None, 5).unwrap();
    client::echo_many(&held, seed(), 1000, false, HUNG).unwrap();
    assert!(
        wait_until(HUNG, || echo.active() == 5),
        "{} upstream connections for 5 clients",
        echo.active()
    );

    // The sixth is closed right away, with nothing relayed.
    let extra = client::try_connect(relay.addr(), None);
    if let Ok(extra) = extra {
        let (n, end) = read_until_end(&extra, HUNG);
        assert!(
            end.is_some(),
            "the client past max_connections is still open {HUNG:?} later"
        );
        assert_eq!(n, 0, "the refused client got bytes");
    }
    let refused = relay.counter("refused_full");
    assert!(
        refused.is_some_and(|n| n >= 1),
        "refused_full in status: {}",
        relay.status()
    );
    assert_eq!(echo.active(), 5, "the refused client reached the upstream");

    // The five still work; closing one frees a slot for a new client (bounded retries while the
    // relay notices the close).
    client::echo_many(&held, seed(), 1000, false, HUNG).unwrap();
    held.pop();
    let mut newcomer = None;
    for _ in 0..100 {
        let quick = Duration::from_secs(2);
        if let Ok(c) = client::try_connect(relay.addr(), None)
            && client::echo_many(std::slice::from_ref(&c), seed(), 100, false, quick).is_ok()
        {
            newcomer = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        newcomer.is_some(),
        "no new client was relayed after one of five closed"
    );
    client::echo_many(&held, seed(), 1000, false, HUNG).unwrap();
}

/// The cap is the whole daemon's, whatever the number of workers: 30 clients at once against
/// `--max-connections 10 --workers 4` get at most 10 relayed connections.
#[test]
fn max_connections_holds_across_workers() {
    sluice_tests::init();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), echo.addr())
        .workers(4)
        .max_connections(10)
        .start();
    relay.wait_workers(4, HUNG);
    let conns: Vec<_> = (0..30)
        .filter_map(|_| client::try_connect(relay.addr(), None).ok())
        .collect();
    // Each client is either relayed (echo works) or closed; none hangs.
    let mut relayed = Vec::new();
    for c in conns {
        let quick = Duration::from_secs(5);
        if client::echo_many(std::slice::from_ref(&c), seed(), 100, false, quick).is_ok() {
            relayed.push(c);
        }
    }
    assert!(
        (1..=10).contains(&relayed.len()),
        "{} of 30 clients relayed under --max-connections 10 (upstream holds {})",
        relayed.len(),
        echo.active()
    );
    assert!(
        echo.active() <= 10,
        "upstream holds {} connections",
        echo.active()
    );
}
