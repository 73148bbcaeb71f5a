//! Limits per client (`max_connections_per_client`, `new_connections_per_second_per_client`),
//! counted across worker processes: a client over a limit is reset without a byte relayed and
//! counted, other clients are served, a closed connection makes room again, and nothing leaks
//! when hundreds churn. Behind a load balancer (`accept_proxy`) the client is the PROXY header's
//! source, so two users behind one balancer are limited separately; a header naming no client
//! (`LOCAL`, `UNKNOWN`) counts against the balancer. Clients come from test addresses of their
//! own (127.x.y.z), so no other test's connections count.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use sluice_tests::servers::{EchoServer, Ended, read_until_end};
use sluice_tests::{HUNG, Host, Sluice, client, init, wait_until};

use super::engine_ok;

/// A relay with 2 workers and the given per-client limits on one listener (`accept_proxy`
/// when `proxy`), in front of an echo server.
fn relay_with(engine: &str, max: u32, per_second: u32, proxy: bool) -> (Sluice, EchoServer) {
    let echo = EchoServer::start(Host::new().addr());
    let bind = Host::new().addr();
    let text = format!(
        "[[listen]]\nname = \"limited\"\nbind = \"{bind}\"\nupstream = [\"{}\"]\n\
         accept_proxy = {proxy}\nmax_connections_per_client = {max}\n\
         new_connections_per_second_per_client = {per_second}\n",
        echo.addr()
    );
    let relay = Sluice::run_config_text(&text, vec![bind])
        .engine(engine)
        .workers(2)
        .start();
    relay.wait_workers(2, HUNG);
    (relay, echo)
}

/// A new connection from `src` (after `greeting`, e.g. a PROXY header) that is relayed: one
/// echo round trip. Err says what happened instead.
fn relayed(addr: SocketAddr, src: IpAddr, greeting: &[u8]) -> Result<TcpStream, String> {
    let mut s = client::try_connect(addr, Some(src)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(HUNG)).unwrap();
    s.write_all(greeting).map_err(|e| format!("write: {e}"))?;
    s.write_all(b"ping").map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    if &buf != b"ping" {
        return Err(format!("echoed {buf:?}"));
    }
    Ok(s)
}

/// A new connection from `src` is reset without a byte relayed (Err says what happened).
fn refused(addr: SocketAddr, src: IpAddr, greeting: &[u8]) -> Result<(), String> {
    let s = match client::try_connect(addr, Some(src)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
        Err(e) => return Err(format!("connect: {e}")),
    };
    // A write the reset overtook fails with it (and takes the error, so a read would see EOF).
    for bytes in [greeting, b"ping"] {
        if let Err(e) = (&s).write_all(bytes) {
            return match e.kind() {
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => Ok(()),
                _ => Err(format!("write: {e}")),
            };
        }
    }
    match read_until_end(&s, HUNG) {
        (0, Some(Ended::Reset)) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

fn counter(relay: &Sluice, name: &str) -> u64 {
    relay
        .counter(name)
        .unwrap_or_else(|| panic!("no counter {name} in sluicectl status"))
}

/// Five at once from one client, the sixth refused (counted); another client served; closing
/// one makes room; 200 connections churned five at a time are all admitted (no count leaks).
fn concurrent_connections_per_client(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    init();
    let (relay, _echo) = relay_with(engine, 5, 0, false);
    let (a, b) = (IpAddr::V4(Host::new().ip), IpAddr::V4(Host::new().ip));
    let mut open: Vec<TcpStream> = (0..5)
        .map(|i| relayed(relay.addr(), a, b"").unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    if let Err(e) = refused(relay.addr(), a, b"") {
        panic!("a sixth connection from {a}: {e}");
    }
    assert!(counter(&relay, "refused_client_connections") >= 1);
    relayed(relay.addr(), b, b"").expect("another client is served");
    // Closing one makes room once the relay has freed it.
    drop(open.pop());
    let mut again = None;
    assert!(
        wait_until(HUNG, || {
            again = relayed(relay.addr(), a, b"").ok();
            again.is_some()
        }),
        "no room after one of five closed"
    );
    drop(again);
    drop(open);
    // Churn: at most five open at a time, 200 in all; every one admitted.
    let mut window = std::collections::VecDeque::new();
    for i in 0..200 {
        if window.len() == 5 {
            drop(window.pop_front());
        }
        let mut conn = None;
        let ok = wait_until(HUNG, || {
            conn = relayed(relay.addr(), a, b"").ok();
            conn.is_some()
        });
        assert!(ok, "churned connection {i} refused: a count leaked");
        window.push_back(conn.unwrap());
    }
}
engines!(concurrent_connections_per_client);

/// Seconds of CLOCK_MONOTONIC (the clock the relay counts seconds of).
fn monotonic_s() -> u64 {
    sluice::sys::monotonic_ns() / 1_000_000_000
}

#[test]
fn new_connections_per_second_per_client() {
    init();
    const RATE: u32 = 10;
    const BURST: usize = 50;
    let (relay, _echo) = relay_with("splice", 0, RATE, false);
    let (a, b) = (IpAddr::V4(Host::new().ip), IpAddr::V4(Host::new().ip));
    let start = monotonic_s();
    let mut admitted = Vec::new();
    let mut refusals = 0;
    for _ in 0..BURST {
        match relayed(relay.addr(), a, b"") {
            Ok(s) => admitted.push(s),
            Err(_) => refusals += 1,
        }
    }
    let seconds = monotonic_s() - start + 1;
    let bound = RATE as usize * seconds as usize;
    assert!(
        admitted.len() <= bound,
        "{} of {BURST} admitted within {seconds} s at {RATE}/s",
        admitted.len()
    );
    assert!(
        !admitted.is_empty(),
        "the first ones of a second are admitted"
    );
    assert_eq!(refusals, BURST - admitted.len());
    assert!(counter(&relay, "refused_client_rate") >= refusals as u64);
    relayed(relay.addr(), b, b"").expect("another client is not limited");
    // A later second admits again.
    assert!(
        wait_until(HUNG, || relayed(relay.addr(), a, b"").is_ok()),
        "the client stays refused"
    );
}

#[test]
fn behind_a_load_balancer_each_proxied_client_has_its_own_limit() {
    init();
    let (relay, _echo) = relay_with("splice", 2, 0, true);
    let balancer = IpAddr::V4(Host::new().ip);
    let dst = relay.addr();
    let user = |n: u8| proxy_header(SocketAddr::from(([203, 0, 113, n], 40000)), dst);
    let first: Vec<TcpStream> = (0..2)
        .map(|_| relayed(dst, balancer, &user(1)).expect("user 1 within its limit"))
        .collect();
    if let Err(e) = refused(dst, balancer, &user(1)) {
        panic!("user 1's third connection: {e}\n{}", relay.stderr_log());
    }
    assert!(counter(&relay, "refused_client_connections") >= 1);
    let second: Vec<TcpStream> = (0..2)
        .map(|_| relayed(dst, balancer, &user(2)).expect("user 2 is limited on its own"))
        .collect();
    drop((first, second));
}

/// A header that names no client (v2 `LOCAL`, v1 `UNKNOWN`: a balancer's health check, or a
/// balancer hiding its clients) is counted against the balancer itself, so it gets no way past
/// `max_connections_per_client`; another balancer has a count of its own, and the clients a
/// balancer names in headers keep theirs.
#[test]
fn behind_a_load_balancer_headers_without_a_client_count_against_the_balancer() {
    init();
    let (relay, _echo) = relay_with("splice", 2, 0, true);
    let (balancer, other) = (IpAddr::V4(Host::new().ip), IpAddr::V4(Host::new().ip));
    let dst = relay.addr();
    let local = client::proxy_v2_raw(0x20, 0x00, &[]);
    let unknown = b"PROXY UNKNOWN\r\n".to_vec();
    let first = [
        relayed(dst, balancer, &local).expect("a LOCAL header within the balancer's limit"),
        relayed(dst, balancer, &unknown).expect("an UNKNOWN header within the balancer's limit"),
    ];
    for (what, header) in [("LOCAL", &local), ("UNKNOWN", &unknown)] {
        if let Err(e) = refused(dst, balancer, header) {
            panic!(
                "a third header without a client ({what}) from one balancer: {e}
{}",
                relay.stderr_log()
            );
        }
    }
    assert!(counter(&relay, "refused_client_connections") >= 2);
    let others = [
        relayed(dst, other, &local).expect("another balancer has its own count"),
        relayed(dst, other, &unknown).expect("another balancer has its own count"),
    ];
    let user = proxy_header(SocketAddr::from(([203, 0, 113, 9], 40000)), dst);
    let named =
        relayed(dst, balancer, &user).expect("a client the balancer names is not limited by it");
    drop((first, others, named));
}

fn proxy_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    client::proxy_v1(src, dst)
}
