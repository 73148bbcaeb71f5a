//! Trust boundaries: whom the relay believes, and where it lets itself be sent.
//!
//! - PROXY headers: an `accept_proxy` listener takes a header only from its `trusted_proxies`.
//!   A trusted source's header is believed (its address goes upstream with `send_proxy`); any
//!   other source is reset at accept, before a byte is read (a silent connection is refused
//!   long before `header_ms`), counted in `refused_untrusted_proxy`, and never reaches the
//!   upstream. A range with host bits set is refused by `check-config`, naming the key.
//! - Upstream addresses: a name whose DNS answer is a loopback (or private, link-local, ...)
//!   address is not dialled (`localhost` through the system resolver: counted in
//!   `upstream_addresses_refused`, said in the log with the name and the address), while the
//!   same address written as a literal is relayed to as before.
//!
//! Clients come from test addresses of their own (127.x.y.z), so "trusted" and "untrusted" are
//! two loopback sources.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};

use sluice_tests::client::{proxy_v1, read_all, send_and_read_to_end, try_connect};
use sluice_tests::servers::{CaptureServer, EchoServer, Ended};
use sluice_tests::{HUNG, Host, Sluice, init, mentions_number, wait_until};

use super::engine_ok;

/// What every [`CaptureServer`] here answers after the client's FIN.
const REPLY: &[u8] = b"captured\n";

/// Longer than [`HUNG`]: a connection the relay waited on for its header would outlive the
/// test's patience, so an end seen within [`HUNG`] is a refusal at accept.
const HEADER_MS: u32 = 120_000;

/// Connects from `src`, sends `bytes` (if any; a silent connection keeps its write side
/// open) and reads until the end: what came back and how it ended. A reset that came before
/// `connect` returned is a reset too (the relay refuses as soon as it accepts).
fn exchange(addr: SocketAddr, src: IpAddr, bytes: &[u8]) -> (Vec<u8>, Option<Ended>) {
    let mut s = match try_connect(addr, Some(src)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return (Vec::new(), Some(Ended::Reset));
        }
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    if !bytes.is_empty() {
        // The relay may refuse while this is still being written: only what comes back counts.
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    read_all(&mut s, HUNG)
}

/// A trusted balancer's header is relayed with its client address; an untrusted source is
/// reset at accept (with or without a header, before the header timeout), counted, and never
/// reaches the upstream.
fn only_trusted_proxies_are_believed(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let (trusted, untrusted) = (Host::new().ip, Host::new().ip);
    let upstream = CaptureServer::start(host.addr(), REPLY);
    let bind = host.addr();
    let text = format!(
        "workers = 1\n[timeouts]\nheader_ms = {HEADER_MS}\n\
         [[listen]]\nname = \"from-lb\"\nbind = \"{bind}\"\nupstream = [\"{}\"]\n\
         accept_proxy = true\ntrusted_proxies = [\"{trusted}/32\"]\nsend_proxy = \"v1\"\n",
        upstream.addr()
    );
    let relay = Sluice::run_config_text(&text, vec![bind])
        .engine(engine)
        .start();
    super::assert_engine(&relay, engine);
    let src: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let header = proxy_v1(src, bind);

    // From the balancer: relayed, and the upstream hears of the header's client.
    let (_, got, _) = send_and_read_to_end(
        bind,
        Some(IpAddr::V4(trusted)),
        &[header.as_slice(), b"hello"].concat(),
    );
    assert_eq!(
        got, REPLY,
        "{engine}: the trusted balancer's client is relayed"
    );
    let seen = upstream
        .next(HUNG)
        .expect("the upstream got the connection");
    assert_eq!(
        seen,
        [
            format!(
                "PROXY TCP4 198.51.100.7 {} 40000 {}\r\n",
                bind.ip(),
                bind.port()
            )
            .as_bytes(),
            b"hello"
        ]
        .concat(),
        "{engine}: the header's address went upstream"
    );

    // From anyone else, with a header: reset, nothing relayed.
    let (got, ended) = exchange(
        bind,
        IpAddr::V4(untrusted),
        &[header.as_slice(), b"hello"].concat(),
    );
    assert!(
        got.is_empty() && ended == Some(Ended::Reset),
        "{engine}: an untrusted source's header: got {got:?}, ended {ended:?}"
    );
    assert_eq!(relay.wait_counter("refused_untrusted_proxy", 1, HUNG), 1);

    // Silent: refused at accept, not after header_ms.
    let (got, ended) = exchange(bind, IpAddr::V4(untrusted), b"");
    assert!(
        got.is_empty() && ended == Some(Ended::Reset),
        "{engine}: a silent untrusted connection: got {got:?}, ended {ended:?} \
         (header_ms is {HEADER_MS})"
    );
    assert_eq!(relay.wait_counter("refused_untrusted_proxy", 2, HUNG), 2);
    assert_eq!(relay.counter("refused_bad_header"), Some(0));
    assert_eq!(
        upstream.accepted(),
        1,
        "{engine}: only the trusted connection reached the upstream"
    );
}
engines!(only_trusted_proxies_are_believed);

/// `check-config` refuses a `trusted_proxies` range with host bits set, naming the key and its
/// line, and prints the default list for an `accept_proxy` listener that has none.
#[test]
fn check_config_refuses_host_bits_and_prints_the_default_trust() {
    init();
    let host = Host::new();
    let listener = format!(
        "[[listen]]\nname = \"lb\"\nbind = \"{}\"\nupstream = [\"{}\"]\naccept_proxy = true\n",
        host.addr(),
        host.addr()
    );
    let out = Sluice::check_config(&format!(
        "{listener}trusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7/24\"]\n"
    ));
    assert_eq!(out.status.code(), Some(2), "host bits: {}", out.text());
    let text = out.text();
    assert!(
        text.contains("listen[0].trusted_proxies") && text.contains("192.168.1.7/24"),
        "the message names the key and the range: {text}"
    );
    assert!(
        mentions_number(&text, 6),
        "the message names line 6: {text}"
    );

    let out = Sluice::check_config(&listener);
    assert_eq!(out.status.code(), Some(0), "default trust: {}", out.text());
    let parsed: toml::Value = toml::from_str(&out.stdout).expect("check-config prints TOML");
    let list: Vec<&str> = parsed["listen"][0]["trusted_proxies"]
        .as_array()
        .unwrap_or_else(|| panic!("no trusted_proxies printed:\n{}", out.stdout))
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        list,
        [
            "127.0.0.0/8",
            "::1/128",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "fc00::/7"
        ]
    );
}

/// An upstream named `localhost` (a DNS answer of 127.0.0.1) is not dialled: connections are
/// refused as having no upstream, the refused address is counted and logged with its name.
/// The same address written as a literal is relayed to.
#[test]
fn a_dns_answer_may_not_point_the_relay_at_loopback() {
    init();
    // A server on 127.0.0.1, where `localhost` points.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port();
    let echo = EchoServer::start(SocketAddr::from(([127, 0, 0, 1], port)));
    let host = Host::new();
    let (by_name, literal) = (host.addr(), host.addr());
    let text = format!(
        "workers = 1\n\
         [[listen]]\nname = \"by-name\"\nbind = \"{by_name}\"\nupstream = [\"localhost:{port}\"]\n\
         [[listen]]\nname = \"literal\"\nbind = \"{literal}\"\nupstream = [\"{}\"]\n",
        echo.addr()
    );
    let relay = Sluice::run_config_text(&text, vec![by_name, literal]).start();

    let (_, got, _) = send_and_read_to_end(literal, None, b"ping");
    assert_eq!(got, b"ping", "a literal loopback upstream is relayed to");

    let (got, ended) = exchange(by_name, IpAddr::V4(Host::new().ip), b"ping");
    assert!(
        got.is_empty() && ended.is_some(),
        "`localhost` was dialled: got {got:?}, ended {ended:?}"
    );
    assert!(relay.wait_counter("refused_no_upstream", 1, HUNG) >= 1);
    assert!(
        relay.counter("upstream_addresses_refused").unwrap_or(0) >= 1,
        "status: {}",
        relay.status()
    );
    let refusals = || -> Vec<String> {
        relay
            .stderr_log()
            .lines()
            .filter(|l| l.contains("upstream address refused"))
            .map(String::from)
            .collect()
    };
    assert!(
        wait_until(HUNG, || !refusals().is_empty()),
        "no log line of the refused address:\n{}",
        relay.stderr_log()
    );
    let lines = refusals();
    assert_eq!(lines.len(), 1, "said once: {lines:?}");
    assert!(
        lines[0].contains(&format!("localhost:{port} ->"))
            && lines[0].contains("127.0.0.1 (loopback)"),
        "the line names the upstream and its address: {lines:?}"
    );
    assert_eq!(
        echo.accepted(),
        1,
        "only the literal's connection reached 127.0.0.1"
    );
}
