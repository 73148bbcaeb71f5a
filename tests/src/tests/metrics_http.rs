//! The metrics listener as a server: clients served side by side (idle connections held open
//! do not delay a scrape), a cap on connections with a defined answer (`503`, counted in
//! `metrics_http_refused`), and `/healthz` (`200 ok` while every worker runs, `503` with the
//! reason when one cannot be started again).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};

use sluice_tests::servers::EchoServer;
use sluice_tests::sluice::sluice_bin;
use sluice_tests::{HUNG, Host, Sluice, TempDir, client, init, sys, wait_until};

/// The relay's cap (`http::MAX_CONNS`).
const MAX_CONNS: usize = 64;

/// GET `path`; returns (status line, body). The read times out after [`HUNG`] (a hung server
/// fails the test, it does not hang it).
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = client::connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("GET {path}: {e} after {raw:?}"));
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.lines().next().unwrap_or("").to_string();
    (status, body.to_string())
}

/// Is the server's side of `s` still open (no FIN, no RST, nothing sent)?
fn still_open(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

#[test]
fn idle_connections_held_open_do_not_delay_a_scrape() {
    init();
    let up = EchoServer::start(Host::new().addr());
    let metrics = Host::new().addr();
    let relay = Sluice::forward(Host::new().addr(), up.addr())
        .metrics(metrics)
        .start();
    // Every worker up first (the relay may answer before its supervisor published them).
    assert!(wait_until(HUNG, || get(metrics, "/healthz").0 == "HTTP/1.1 200 OK"));
    // Idle clients: four that send nothing, two that send half a request head.
    let mut held: Vec<TcpStream> = (0..6).map(|_| client::connect(metrics)).collect();
    for s in &mut held[4..] {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
    }
    // Scrapes while they are held. A server that takes one client at a time answers these
    // only after it gave up on every idle client before them, closing each.
    let (status, body) = get(metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("sluice_connections_accepted_total"), "{body}");
    let (status, body) = get(metrics, "/healthz");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    let (status, _) = get(metrics, "/stats.json");
    assert!(status.contains("200"), "{status}");
    for (i, s) in held.iter_mut().enumerate() {
        assert!(
            still_open(s),
            "idle connection {i} was closed before the scrapes were answered"
        );
    }
    // Each idle one is closed at its deadline (bounded: the test waits at most HUNG).
    for (i, s) in held.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
            "idle connection {i} was not closed: {r:?}"
        );
    }
    relay.stop();
}

#[test]
fn connections_past_the_cap_get_a_503_and_are_counted() {
    init();
    let up = EchoServer::start(Host::new().addr());
    let metrics = Host::new().addr();
    let relay = Sluice::forward(Host::new().addr(), up.addr())
        .metrics(metrics)
        .start();
    // Every place taken by an idle client; the server accepts in order, so the next one is
    // past the cap.
    let mut held: Vec<TcpStream> = (0..MAX_CONNS).map(|_| client::connect(metrics)).collect();
    let mut extra = client::connect(metrics);
    let mut answer = String::new();
    extra
        .read_to_string(&mut answer)
        .expect("the connection past the cap is answered and closed");
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with("too many connections to the metrics listener\n"));
    // The held ones were not disturbed by it.
    assert!(held.iter_mut().all(still_open));
    drop(held);
    // Places free again once those clients left: scrapes work, and the refusal is counted.
    let mut counted = String::new();
    assert!(
        wait_until(HUNG, || {
            counted = get(metrics, "/metrics").1;
            counted.contains("sluice_metrics_http_refused_total 1\n")
        }),
        "{counted}"
    );
    assert_eq!(relay.counter("metrics_http_refused"), Some(1));
    relay.stop();
}

#[test]
fn healthz_is_503_with_the_reason_while_a_worker_cannot_be_started() {
    init();
    // The daemon runs from a copy of its binary, so deleting the copy makes every new worker
    // fail to start (a supervisor starts workers by executing itself).
    let dir = TempDir::new();
    let copy = dir.join("sluice");
    std::fs::copy(sluice_bin(), &copy).unwrap();
    let up = EchoServer::start(Host::new().addr());
    let metrics = Host::new().addr();
    let relay = Sluice::forward(Host::new().addr(), up.addr())
        .workers(2)
        .metrics(metrics)
        .wrap(&[
            "sh",
            "-c",
            "shift; exec \"$0\" \"$@\"",
            copy.to_str().unwrap(),
        ])
        .start();
    let mut last = (String::new(), String::new());
    assert!(
        wait_until(HUNG, || {
            last = get(metrics, "/healthz");
            last.0 == "HTTP/1.1 200 OK"
        }),
        "{last:?}"
    );
    assert_eq!(last.1, "ok\n");
    std::fs::remove_file(&copy).unwrap();
    let victim = relay.worker_pids()[0];
    assert!(sys::kill(victim, libc::SIGKILL));
    assert!(
        wait_until(HUNG, || {
            last = get(metrics, "/healthz");
            // "… is starting (or has just exited)" comes first, until the supervisor has
            // reaped the worker and failed to start its replacement.
            last.0 == "HTTP/1.1 503 Service Unavailable" && last.1.contains(" is down ")
        }),
        "{last:?}"
    );
    assert!(
        last.1.starts_with("worker ")
            && last
                .1
                .contains(" of 2 is down (restart retried with back-off): "),
        "{:?}",
        last.1
    );
    assert_eq!(last.1.lines().count(), 1, "{:?}", last.1);
    relay.stop();
}
