//! Never an open proxy: whatever a client sends, Sluice connects only to its configured
//! upstreams.
//!
//! Both presets run from `check-config` output on test addresses (as in `presets.rs`), their
//! upstream names pointed at local tagged echo servers. Decoy "canary" listeners sit on every
//! address a probe names: ports 80, 443, 5222, 8443 and a free port of a test address of their
//! own, a free port on 127.0.0.1 and on ::1 (what `localhost` resolves to), and a free port on
//! the upstream's own address (a configured name with another port). Every listener is probed
//! with: PROXY v1/v2 headers claiming a canary as destination, IPv4 and IPv6-mapped; a
//! ClientHello whose SNI names a canary, `localhost` or a private address; HTTP `CONNECT` and
//! absolute-URI `GET` requests for canaries by address and by a name that resolves to
//! 127.0.0.1, and for private addresses. Each probe must either reach the listener's configured
//! upstream (its tag comes back, then the probe's bytes, echoed), be answered by the preset's
//! built-in decoy site (on a client-facing port: an HTTP request, or not TLS on a TLS port;
//! `decoyed` one higher), or be closed with nothing from any upstream and the matching refusal
//! counter one higher; no canary may ever accept.
//!
//! The Signal preset is probed twice: in plaintext (refused by TLS) and inside the outer TLS
//! (socat, as the Signal app does), where the inner SNI picks the upstream.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::time::Duration;

use sluice_tests::client::{client_hello, proxy_v1, proxy_v2, send_and_read_to_end};
use sluice_tests::peers::{KeyKind, Pki};
use sluice_tests::servers::{CaptureServer, TagEchoServer};
use sluice_tests::{Host, Sluice, init, require_program, require_root, wait_until};

use super::presets::{listeners, outer_tls, preset, rewrite, string};

/// The refusal counters a probe may move.
const REFUSALS: [&str; 5] = [
    "refused_bad_header",
    "refused_bad_tls",
    "refused_bad_sni",
    "refused_dest",
    "refused_no_upstream",
];

/// The decoys: listeners on every address a probe names. None may ever accept.
struct Canaries {
    servers: Vec<CaptureServer>,
    /// A canary on a test address of its own, port 80 (`host:80`) and a free port.
    host: Ipv4Addr,
    free: u16,
    /// Free ports with a canary on 127.0.0.1 and (when IPv6 loopback works) ::1.
    v4_loopback: u16,
    v6_loopback: Option<u16>,
    /// A free port on the upstream's own address (a configured name, another port).
    upstream_ip: Ipv4Addr,
    upstream_other: u16,
}

impl Canaries {
    fn start(upstream_ip: Ipv4Addr) -> Canaries {
        let host = Host::new();
        let mut servers = Vec::new();
        for port in [80, 443, 5222, 8443] {
            servers.push(CaptureServer::start(
                SocketAddr::new(host.ip.into(), port),
                b"",
            ));
        }
        let free_srv = CaptureServer::start(host.addr(), b"");
        let free = free_srv.addr().port();
        servers.push(free_srv);
        let lo = CaptureServer::start((Ipv4Addr::LOCALHOST, 0).into(), b"");
        let v4_loopback = lo.addr().port();
        servers.push(lo);
        let v6_loopback = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).ok().map(|l| {
            let addr = l.local_addr().unwrap();
            drop(l);
            let srv = CaptureServer::start(addr, b"");
            let port = srv.addr().port();
            servers.push(srv);
            port
        });
        let other = CaptureServer::start((upstream_ip, 0).into(), b"");
        let upstream_other = other.addr().port();
        servers.push(other);
        Canaries {
            servers,
            host: host.ip,
            free,
            v4_loopback,
            v6_loopback,
            upstream_ip,
            upstream_other,
        }
    }

    /// Every canary address with its accept count.
    fn accepted(&self) -> Vec<(SocketAddr, usize)> {
        self.servers
            .iter()
            .map(|s| (s.addr(), s.accepted()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The probes: (what it is, its bytes, whether it starts with a PROXY header).
    fn probes(&self) -> Vec<(String, Vec<u8>, bool)> {
        let c = self.host;
        let canary = SocketAddr::new(c.into(), self.free);
        let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mapped =
            |ip: Ipv4Addr, port: u16| SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), port);
        let mut out: Vec<(String, Vec<u8>, bool)> = vec![
            (
                "PROXY v1 to a canary".into(),
                proxy_v1(client, SocketAddr::new(c.into(), 80)),
                true,
            ),
            (
                "PROXY v2 to a canary".into(),
                proxy_v2(client, canary),
                true,
            ),
            (
                "PROXY v1 TCP6, IPv6-mapped".into(),
                proxy_v1(
                    mapped(Ipv4Addr::new(198, 51, 100, 7), 40000),
                    mapped(c, 5222),
                ),
                true,
            ),
            (
                "PROXY v2 TCP6, IPv6-mapped 127.0.0.1".into(),
                proxy_v2(
                    mapped(Ipv4Addr::new(198, 51, 100, 7), 40000),
                    mapped(Ipv4Addr::LOCALHOST, self.v4_loopback),
                ),
                true,
            ),
            (
                "PROXY v1 to the upstream's address, another port".into(),
                proxy_v1(
                    client,
                    SocketAddr::new(self.upstream_ip.into(), self.upstream_other),
                ),
                true,
            ),
        ];
        let mut requests = vec![
            format!("CONNECT {canary} HTTP/1.1\r\nHost: {canary}\r\n\r\n"),
            format!("GET http://{canary}/ HTTP/1.1\r\nHost: {canary}\r\n\r\n"),
            format!("GET http://{c}:443/ HTTP/1.1\r\nHost: {c}:443\r\n\r\n"),
            format!(
                "CONNECT localhost:{0} HTTP/1.1\r\nHost: localhost:{0}\r\n\r\n",
                self.v4_loopback
            ),
            format!(
                "GET http://localhost:{0}/ HTTP/1.1\r\nHost: localhost:{0}\r\n\r\n",
                self.v4_loopback
            ),
            format!(
                "CONNECT g.whatsapp.net:{0} HTTP/1.1\r\nHost: g.whatsapp.net:{0}\r\n\r\n",
                self.upstream_other
            ),
            "CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n".into(),
            "GET http://192.168.1.1/ HTTP/1.1\r\nHost: 192.168.1.1\r\n\r\n".into(),
        ];
        if let Some(p) = self.v6_loopback {
            requests.push(format!(
                "CONNECT [::1]:{p} HTTP/1.1\r\nHost: [::1]:{p}\r\n\r\n"
            ));
        }
        for r in requests {
            out.push((r.lines().next().unwrap().to_owned(), r.into_bytes(), false));
        }
        // (For an IP address rustls sends no SNI at all.)
        for name in ["localhost", "canary.invalid", "10.0.0.1", "evil.signal.org"] {
            out.push((format!("ClientHello for {name}"), client_hello(name), false));
        }
        out.push((
            "PROXY v1 to a canary, then CONNECT".into(),
            [
                proxy_v1(client, canary),
                format!("CONNECT {canary} HTTP/1.1\r\n\r\n").into_bytes(),
            ]
            .concat(),
            true,
        ));
        out
    }
}

/// The refusal counters now.
fn refusals(relay: &Sluice) -> BTreeMap<&'static str, u64> {
    let status = relay.status();
    REFUSALS
        .iter()
        .map(|&c| (c, status["totals"][c].as_u64().unwrap_or(0)))
        .collect()
}

/// How a probe ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The configured upstream's tag came back, then the bytes the relay passed on.
    Upstream,
    /// Closed, nothing from an upstream; this refusal counter went up by one.
    Refused(&'static str),
    /// Closed with nothing back and no refusal counted: the probe hung up first (a PROXY
    /// header alone on a TLS port, before any TLS byte).
    Closed,
    /// Only the relay's own TLS handshake came back (the probe was a ClientHello on a TLS
    /// port); nothing from an upstream.
    TlsServer,
    /// The built-in decoy site answered (an ordinary web server's reply), `decoyed` one higher;
    /// nothing from an upstream.
    Decoy,
}

/// The `decoyed` counter now.
fn decoyed(relay: &Sluice) -> u64 {
    relay.status()["totals"]["decoyed"].as_u64().unwrap_or(0)
}

/// Whether a probe's bytes start with an HTTP request line (what the presets' decoys catch on
/// a plain port).
fn is_http(bytes: &[u8]) -> bool {
    sluice::decoy::looks_like_http(bytes) == Some(true)
}

/// Sends `probe` through `send` (which returns what came back), then waits until either the
/// reply shows `tag` (the configured upstream) or exactly one refusal counter went up by one.
fn outcome(
    relay: &Sluice,
    tag: &str,
    what: &str,
    send: impl FnOnce() -> Vec<u8>,
    other_tags: &[&str],
) -> Outcome {
    let before = refusals(relay);
    let decoyed_before = decoyed(relay);
    let got = send();
    for other in other_tags.iter().filter(|o| **o != tag) {
        assert!(
            !got.starts_with(format!("{other}\n").as_bytes()),
            "{what}: reached upstream {other}, not {tag}"
        );
    }
    if got.starts_with(format!("{tag}\n").as_bytes()) {
        return Outcome::Upstream;
    }
    // A TLS listener answers a ClientHello itself (ServerHello, certificate); the probe then
    // hangs up mid-handshake, which is the client leaving, not a refusal.
    if got.starts_with(&[0x16, 0x03]) {
        return Outcome::TlsServer;
    }
    if got.starts_with(b"HTTP/1.1 ") && got.windows(13).any(|w| w == b"Server: nginx") {
        assert!(
            wait_until(Duration::from_secs(3), || decoyed(relay)
                == decoyed_before + 1),
            "{what}: the decoy answered but `decoyed` did not count it"
        );
        return Outcome::Decoy;
    }
    // Otherwise nothing, or a TLS alert from the relay's own TLS server.
    assert!(
        got.is_empty() || got.starts_with(&[0x15, 0x03]),
        "{what}: neither the upstream's tag nor the relay's TLS (got {} bytes: {:?})",
        got.len(),
        String::from_utf8_lossy(&got[..got.len().min(60)])
    );
    // A refusal is counted before the socket is closed; the wait only covers reading status.
    let mut after = before.clone();
    let moved = wait_until(Duration::from_secs(3), || {
        after = refusals(relay);
        after.values().sum::<u64>() > before.values().sum::<u64>()
    });
    if !moved {
        return Outcome::Closed;
    }
    let grown: Vec<&str> = REFUSALS
        .iter()
        .copied()
        .filter(|c| after[c] > before[c])
        .collect();
    assert_eq!(grown.len(), 1, "{what}: counters {before:?} -> {after:?}");
    assert_eq!(after[grown[0]], before[grown[0]] + 1, "{what}: {after:?}");
    Outcome::Refused(grown[0])
}

#[test]
fn whatsapp_preset_connects_only_to_its_upstreams() {
    init();
    if !require_root() || !require_program("openssl") {
        return;
    }
    let v = preset("whatsapp");
    let (relay_host, g, w) = (Host::new(), Host::new(), Host::new());
    let (e80, e5222, e443) = (
        TagEchoServer::start(g.addr(), b"g80\n"),
        TagEchoServer::start(g.addr(), b"g5222\n"),
        TagEchoServer::start(w.addr(), b"w443\n"),
    );
    let canaries = Canaries::start(g.ip);
    let ports: BTreeMap<String, u16> = [
        ("g.whatsapp.net:80", e80.addr().port()),
        ("g.whatsapp.net:5222", e5222.addr().port()),
        ("whatsapp.net:443", e443.addr().port()),
    ]
    .map(|(k, p)| (k.to_owned(), p))
    .into();
    let mut at = BTreeMap::new();
    let binds: BTreeMap<String, SocketAddr> = listeners(&v)
        .iter()
        .map(|l| {
            let bind = relay_host.addr();
            let port = string(l, "bind").parse::<SocketAddr>().unwrap().port();
            at.insert(port, bind);
            (string(l, "name").to_owned(), bind)
        })
        .collect();
    let pki = Pki::new();
    let leaf = pki.leaf("wa-relay.test", &["DNS:wa-relay.test"], KeyKind::Ec);
    let text = rewrite(
        v,
        &binds,
        &ports,
        &[
            ("g.whatsapp.net", IpAddr::V4(g.ip)),
            ("whatsapp.net", IpAddr::V4(w.ip)),
        ],
        &leaf,
    );
    let relay = Sluice::run_config_text(&text, at.values().copied().collect()).start();
    let tags = ["g80", "g5222", "w443"];
    let probes = canaries.probes();
    let mut reached = 0;
    for (&port, &addr) in &at {
        let tag = match port {
            80 | 8080 => "g80",
            587 | 7777 => "w443",
            _ => "g5222",
        };
        let accept_proxy = matches!(port, 8080 | 8222 | 8443);
        let tls = matches!(port, 443 | 8443);
        for (what, bytes, has_header) in &probes {
            let what = format!("port {port}: {what}");
            let got = outcome(
                &relay,
                tag,
                &what,
                || send_and_read_to_end(addr, None, bytes).1,
                &tags,
            );
            // The preset's client-facing ports (no PROXY header expected) have the built-in
            // decoy: what a probe sends there that is not the port's protocol gets a web page.
            let decoy = !accept_proxy;
            let want = if accept_proxy && !has_header {
                Outcome::Refused("refused_bad_header")
            } else if port == 8443 && !what.contains("then") {
                // The header was all: the probe left before its TLS handshake.
                Outcome::Closed
            } else if tls && what.contains("ClientHello") {
                Outcome::TlsServer
            } else if tls && decoy {
                // Not TLS on a TLS port: the decoy answers.
                Outcome::Decoy
            } else if tls {
                // Plaintext, or a ClientHello alone (the handshake cannot finish): TLS refuses.
                Outcome::Refused("refused_bad_tls")
            } else if decoy && is_http(bytes) {
                Outcome::Decoy
            } else {
                Outcome::Upstream
            };
            assert_eq!(got, want, "{what}");
            reached += usize::from(got == Outcome::Upstream);
        }
    }
    assert!(reached > 0);
    assert_eq!(canaries.accepted(), vec![], "canaries were connected to");
    drop(relay);
}

#[test]
fn signal_preset_connects_only_to_its_upstreams() {
    init();
    if !require_root() || !require_program("openssl") || !require_program("socat") {
        return;
    }
    let v = preset("signal");
    let (relay_host, signal) = (Host::new(), Host::new());
    let upstream = TagEchoServer::start(signal.addr(), b"sig\n");
    let canaries = Canaries::start(signal.ip);
    let pki = Pki::new();
    let outer = pki.leaf("signal-proxy.test", &["DNS:signal-proxy.test"], KeyKind::Ec);
    let mut ports = BTreeMap::new();
    for l in listeners(&v) {
        for u in l["upstream"].as_array().unwrap() {
            ports.insert(u.as_str().unwrap().to_owned(), upstream.addr().port());
        }
    }
    let bind = relay_host.addr();
    let binds: BTreeMap<String, SocketAddr> = listeners(&v)
        .iter()
        .map(|l| (string(l, "name").to_owned(), bind))
        .collect();
    let hosts: Vec<String> = ports
        .keys()
        .map(|u| u.rsplit_once(':').unwrap().0.to_owned())
        .collect();
    let text = rewrite(v, &binds, &ports, &[], &outer);
    let mut cmd = Sluice::run_config_text(&text, vec![bind]);
    for h in &hosts {
        cmd = cmd.resolve(h, IpAddr::V4(signal.ip));
    }
    let relay = cmd.start();
    let ca = pki.ca();
    let mut probes = canaries.probes();
    probes.push((
        "ClientHello for chat.signal.org".into(),
        client_hello("chat.signal.org"),
        false,
    ));
    for (what, bytes, _) in &probes {
        // In plaintext: TLS refuses it.
        let got = outcome(
            &relay,
            "sig",
            &format!("plain: {what}"),
            || send_and_read_to_end(bind, None, bytes).1,
            &[],
        );
        // Not TLS on the preset's TLS port: its decoy answers.
        let want = if what.starts_with("ClientHello") {
            Outcome::TlsServer
        } else {
            Outcome::Decoy
        };
        assert_eq!(got, want, "plain: {what}");
        // Inside the outer TLS: only a ClientHello for one of Signal's names reaches it.
        let (_socat, via) = outer_tls(bind, &ca);
        let got = outcome(
            &relay,
            "sig",
            &format!("inside TLS: {what}"),
            || send_and_read_to_end(via, None, bytes).1,
            &[],
        );
        // Anything else inside the TLS goes to the decoy, which answers as a web server.
        let want = if what.ends_with("chat.signal.org") {
            Outcome::Upstream
        } else {
            Outcome::Decoy
        };
        assert_eq!(got, want, "inside TLS: {what}");
    }
    assert_eq!(canaries.accepted(), vec![], "canaries were connected to");
}
