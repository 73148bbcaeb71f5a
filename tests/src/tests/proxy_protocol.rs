//! PROXY protocol in and out: `accept_proxy` listeners take a v1 or v2 header strictly (garbage,
//! a missing header, a wrong v2 version or a header cut short past `header_ms` close the
//! connection, count `refused_bad_header` and never reach the upstream), and `send_proxy`
//! writes v1 or v2 to the upstream with the client's address (from its header, else its
//! socket). End to end with real peers: curl -> HAProxy (`send-proxy` and `send-proxy-v2`) ->
//! Sluice -> nginx (`listen ... proxy_protocol`) sees curl's own source address, also over
//! IPv6 (HAProxy on `[::1]`: nginx sees `::1`).

use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use sluice_tests::client::{
    proxy_v1, proxy_v2, proxy_v2_raw, send_and_read_to_end, split_proxy_v2,
};
use sluice_tests::peers::{Haproxy, Nginx};
use sluice_tests::servers::CaptureServer;
use sluice_tests::{
    Config, HUNG, Host, Pattern, Sluice, init, require_program, run_with_timeout, skip, tail,
};

use super::{engine_ok, seed};

/// What every [`CaptureServer`] here answers after the client's FIN.
const REPLY: &[u8] = b"captured\n";

/// `header_ms` of the relays here: a header cut short is refused after this long.
const HEADER_MS: u32 = 500;

/// Asserts that sending `bytes` to `addr` gets the connection closed without an answer.
fn assert_refused(addr: SocketAddr, bytes: &[u8], what: &str) {
    let (_, got, ended) = send_and_read_to_end(addr, None, bytes);
    assert!(
        ended.is_some(),
        "{what}: the relay kept the connection open for {HUNG:?}"
    );
    assert!(
        got.is_empty(),
        "{what}: the client got {} bytes back: {:?}",
        got.len(),
        String::from_utf8_lossy(&got)
    );
}

/// Malformed or missing PROXY headers: each connection is closed, counted, and the upstream
/// never sees a connection.
fn malformed_headers_refused(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let upstream = CaptureServer::start(host.addr(), REPLY);
    let mut config = Config::new()
        .listen("in", host.addr(), &[&upstream.addr().to_string()])
        .accept_proxy()
        .send_proxy("v1");
    config.workers = Some(1);
    config.engine = Some(engine.into());
    config.header_ms = Some(HEADER_MS);
    let relay = Sluice::run_config(&config).start();
    super::assert_engine(&relay, engine);

    let src: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let dst: SocketAddr = "203.0.113.9:443".parse().unwrap();
    let v2 = proxy_v2(src, dst);
    let mut bad_version = v2.clone();
    bad_version[12] = 0x11; // version 1 with the v2 signature
    let mut bad_command = v2.clone();
    bad_command[12] = 0x2f; // v2, command 15
    let mut long_v1 = b"PROXY TCP4 ".to_vec();
    long_v1.extend(std::iter::repeat_n(b'1', 200));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GARBAGE GARBAGE GARBAGE\r\n\r\n".to_vec()),
        ("no header (HTTP)", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        (
            "lowercase v1",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        ),
        (
            "v1 bad address",
            b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\nhello".to_vec(),
        ),
        ("v1 longer than 107 bytes", long_v1),
        ("v2 with version 1", bad_version),
        ("v2 with command 15", bad_command),
        (
            "v2 TCP4 with a short block",
            proxy_v2_raw(0x21, 0x11, &[1, 2, 3]),
        ),
        // Cut short, then silence (the write side stays open): refused after header_ms.
        ("v1 cut short", b"PROXY TCP4 198.51.100.7 ".to_vec()),
        ("v2 cut short", v2[..20].to_vec()),
        // The signature and version, not the length: the header is not even whole.
        ("v2 fixed header cut short", v2[..14].to_vec()),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        if what.ends_with("cut short") {
            let mut s = sluice_tests::client::connect(relay.addr());
            std::io::Write::write_all(&mut s, bytes).unwrap();
            let (got, ended) = sluice_tests::client::read_all(&mut s, HUNG);
            assert!(
                ended.is_some() && got.is_empty(),
                "{engine} {what}: still open after {HUNG:?} (header_ms {HEADER_MS}), or got {got:?}"
            );
        } else {
            assert_refused(relay.addr(), bytes, &format!("{engine} {what}"));
        }
        let n = relay.wait_counter("refused_bad_header", i as u64 + 1, HUNG);
        assert_eq!(
            n,
            i as u64 + 1,
            "{engine} {what}: refused_bad_header after {} bad headers",
            i + 1
        );
    }
    assert_eq!(
        upstream.accepted(),
        0,
        "{engine}: a refused connection reached the upstream"
    );
    // The listener still works for a good header.
    let (_, got, _) = send_and_read_to_end(relay.addr(), None, &proxy_v1(src, dst));
    assert_eq!(got, REPLY, "{engine}: a good header after the bad ones");
    let seen = upstream
        .next(HUNG)
        .expect("the upstream got the good connection");
    assert_eq!(seen, proxy_v1(src, dst), "{engine}: what the upstream got");
    assert_eq!(
        relay.counter("refused_bad_header"),
        Some(cases.len() as u64)
    );
}
engines!(malformed_headers_refused);

/// Parses a v1 line at the start of `buf`: (the line without CRLF, the rest).
fn split_v1(buf: &[u8]) -> Option<(String, &[u8])> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((
        String::from_utf8(buf[..end].to_vec()).ok()?,
        &buf[end + 2..],
    ))
}

/// v1 and v2 in, v1 and v2 out, with the addresses of the client's header (IPv4 and IPv6), or
/// of its socket on a port without `accept_proxy`; the client's bytes follow byte-exact.
fn headers_relayed(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let client_host = Host::new();
    let up1 = CaptureServer::start(host.addr(), REPLY);
    let up2 = CaptureServer::start(host.addr(), REPLY);
    let up3 = CaptureServer::start(host.addr(), REPLY);
    let mut config = Config::new()
        .listen("v1-out", host.addr(), &[&up1.addr().to_string()])
        .accept_proxy()
        .send_proxy("v1")
        .listen("v2-out", host.addr(), &[&up2.addr().to_string()])
        .accept_proxy()
        .send_proxy("v2")
        .listen("socket-v1", host.addr(), &[&up3.addr().to_string()])
        .send_proxy("v1");
    config.workers = Some(1);
    config.engine = Some(engine.into());
    let [l1, l2, l3] = [0, 1, 2].map(|i| config.listeners[i].bind);
    let relay = Sluice::run_config(&config).start();
    let payload = Pattern::new(seed()).bytes(0, 64 << 10);

    let v4_src: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let v4_dst: SocketAddr = "203.0.113.9:8443".parse().unwrap();
    let v6_src: SocketAddr = "[2001:db8::7]:40001".parse().unwrap();
    let v6_dst: SocketAddr = "[2001:db8::9]:443".parse().unwrap();
    let with = |h: Vec<u8>| [h, payload.clone()].concat();

    // v1 out: from a v1 header, a v2 header (IPv4 and IPv6).
    for (what, inbound, line) in [
        (
            "v1 TCP4 in",
            proxy_v1(v4_src, v4_dst),
            "PROXY TCP4 198.51.100.7 203.0.113.9 40000 8443",
        ),
        (
            "v2 TCP4 in",
            proxy_v2(v4_src, v4_dst),
            "PROXY TCP4 198.51.100.7 203.0.113.9 40000 8443",
        ),
        (
            "v1 TCP6 in",
            proxy_v1(v6_src, v6_dst),
            "PROXY TCP6 2001:db8::7 2001:db8::9 40001 443",
        ),
        (
            "v2 TCP6 in",
            proxy_v2(v6_src, v6_dst),
            "PROXY TCP6 2001:db8::7 2001:db8::9 40001 443",
        ),
    ] {
        let (_, got, _) = send_and_read_to_end(l1, None, &with(inbound));
        assert_eq!(got, REPLY, "{engine} {what}: the client's answer");
        let seen = up1.next(HUNG).expect("the upstream got the connection");
        let (seen_line, rest) = split_v1(&seen)
            .unwrap_or_else(|| panic!("{engine} {what}: no v1 line upstream: {seen:?}"));
        assert_eq!(seen_line, line, "{engine} {what}: the header sent upstream");
        assert!(
            rest == payload.as_slice(),
            "{engine} {what}: {} bytes after the header upstream, the client sent {}",
            rest.len(),
            payload.len()
        );
    }

    // v2 out, from a v1 header and a v2 header.
    for (what, inbound) in [
        ("v1 in", proxy_v1(v4_src, v4_dst)),
        ("v2 in", proxy_v2(v4_src, v4_dst)),
    ] {
        let (_, got, _) = send_and_read_to_end(l2, None, &with(inbound));
        assert_eq!(got, REPLY, "{engine} {what} -> v2: the client's answer");
        let seen = up2.next(HUNG).expect("the upstream got the connection");
        let (ver_cmd, fam, block, rest) = split_proxy_v2(&seen)
            .unwrap_or_else(|| panic!("{engine} {what}: no v2 header upstream: {seen:?}"));
        assert_eq!(
            (ver_cmd, fam),
            (0x21, 0x11),
            "{engine} {what}: v2 PROXY TCP4"
        );
        let (_, want) = sluice_tests::client::proxy_v2_block(v4_src, v4_dst);
        assert!(
            block.len() >= 12 && block[..12] == want[..],
            "{engine} {what}: v2 address block {block:?}, want {want:?}"
        );
        assert!(
            rest == payload.as_slice(),
            "{engine} {what} -> v2: the client's bytes upstream differ"
        );
    }

    // v2 with TLVs (a unique ID, as HAProxy's `proxy-v2-options unique-id` sends), v2 with
    // v4-mapped IPv6 addresses, v1 UNKNOWN, and a v2 header that arrives in two pieces.
    let (fam, mut block) = sluice_tests::client::proxy_v2_block(v4_src, v4_dst);
    block.extend_from_slice(&[0x05, 0x00, 0x04, b'u', b'i', b'd', b'1']);
    let with_tlv = proxy_v2_raw(0x21, fam, &block);
    let mapped = proxy_v2(
        "[::ffff:198.51.100.7]:40000".parse().unwrap(),
        "[::ffff:203.0.113.9]:8443".parse().unwrap(),
    );
    let v4_line = "PROXY TCP4 198.51.100.7 203.0.113.9 40000 8443";
    for (what, inbound, line, split) in [
        ("v2 with a TLV", with_tlv, v4_line, false),
        ("v2 v4-mapped", mapped, v4_line, false),
        (
            "v1 UNKNOWN",
            b"PROXY UNKNOWN\r\n".to_vec(),
            "PROXY UNKNOWN",
            false,
        ),
        ("v2 in two pieces", proxy_v2(v4_src, v4_dst), v4_line, true),
    ] {
        let got = if split {
            let mut s = sluice_tests::client::connect(l1);
            s.write_all(&inbound[..10]).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(&inbound[10..]).unwrap();
            s.write_all(&payload).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            sluice_tests::client::read_all(&mut s, HUNG).0
        } else {
            send_and_read_to_end(l1, None, &with(inbound)).1
        };
        assert_eq!(got, REPLY, "{engine} {what}: the client's answer");
        let seen = up1.next(HUNG).expect("the upstream got the connection");
        let (seen_line, rest) = split_v1(&seen)
            .unwrap_or_else(|| panic!("{engine} {what}: no v1 line upstream: {seen:?}"));
        assert_eq!(seen_line, line, "{engine} {what}: the header sent upstream");
        assert!(rest == payload.as_slice(), "{engine} {what}: bytes");
    }

    // A v2 LOCAL command (a load balancer's health check): no client address to pass on.
    let (_, got, _) = send_and_read_to_end(l1, None, &with(proxy_v2_raw(0x20, 0x00, &[])));
    assert_eq!(got, REPLY, "{engine} v2 LOCAL in");
    let seen = up1
        .next(HUNG)
        .expect("the upstream got the LOCAL connection");
    let (line, rest) = split_v1(&seen).expect("a v1 line");
    assert_eq!(line, "PROXY UNKNOWN", "{engine} v2 LOCAL in -> v1 out");
    assert!(rest == payload.as_slice(), "{engine} v2 LOCAL in: bytes");

    // No accept_proxy: the client's socket address, and the address it connected to.
    let (local, got, _) = send_and_read_to_end(l3, Some(IpAddr::V4(client_host.ip)), &payload);
    assert_eq!(got, REPLY, "{engine} socket address -> v1");
    let seen = up3.next(HUNG).expect("the upstream got the connection");
    let (line, rest) = split_v1(&seen).expect("a v1 line");
    assert_eq!(
        line,
        format!(
            "PROXY TCP4 {} {} {} {}",
            local.ip(),
            l3.ip(),
            local.port(),
            l3.port()
        ),
        "{engine}: v1 from the client's socket"
    );
    assert!(rest == payload.as_slice(), "{engine} socket -> v1: bytes");
    assert_eq!(relay.counter("refused_bad_header"), Some(0));
}
engines!(headers_relayed);

/// curl (from its own 127.0.0.x) -> HAProxy `send-proxy` / `send-proxy-v2` -> Sluice
/// (`accept_proxy`, `send_proxy = "v1"`) -> nginx `listen ... proxy_protocol` answering
/// `$proxy_protocol_addr`: nginx sees curl's address, through two PROXY hops.
#[test]
fn haproxy_sluice_nginx_keep_client_address() {
    init();
    if !require_program("haproxy") || !require_program("nginx") || !require_program("curl") {
        return;
    }
    let host = Host::new();
    let nginx = Nginx::start_with(
        host.addr(),
        "proxy_protocol",
        "default_type text/plain; location / { return 200 \"$proxy_protocol_addr\\n\"; }",
    );
    let mut config = Config::new()
        .listen("from-lb", host.addr(), &[&nginx.addr().to_string()])
        .accept_proxy()
        .send_proxy("v1");
    config.workers = Some(1);
    let relay = Sluice::run_config(&config).start();
    let (fe_v1, fe_v2) = (host.addr(), host.addr());
    let haproxy = Haproxy::start(
        &format!(
            "frontend fe_v1\n    bind {fe_v1}\n    default_backend be_v1\n\
             backend be_v1\n    server relay {relay} send-proxy\n\
             frontend fe_v2\n    bind {fe_v2}\n    default_backend be_v2\n\
             backend be_v2\n    server relay {relay} send-proxy-v2\n",
            relay = relay.addr()
        ),
        &[fe_v1, fe_v2],
    );
    for (what, fe) in [("send-proxy", fe_v1), ("send-proxy-v2", fe_v2)] {
        let client = Host::new();
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--fail", "--max-time", "20", "--interface"])
            .arg(client.ip.to_string())
            .arg(format!("http://{fe}/"));
        let out = run_with_timeout(&mut curl, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "haproxy {what}: curl failed: {}\nhaproxy: {}\nnginx: {}",
            out.text(),
            tail(&haproxy.stderr(), 20),
            tail(&nginx.error_log(), 20)
        );
        assert_eq!(
            out.stdout,
            format!("{}\n", client.ip),
            "haproxy {what}: nginx's $proxy_protocol_addr is not curl's address"
        );
    }
    assert_eq!(relay.counter("refused_bad_header"), Some(0));
}

/// Gate for tests that use the IPv6 loopback: a socket must bind `[::1]`.
fn require_ipv6_loopback() -> bool {
    match TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) {
        Ok(_) => true,
        Err(e) => skip(&format!("no IPv6 loopback: cannot bind [::1]: {e}")),
    }
}

/// The PROXY chain over IPv6: curl -> HAProxy on `[::1]` (`send-proxy-v2`, a TCP6 header) ->
/// Sluice (`accept_proxy`, `send_proxy = "v1"`, so `PROXY TCP6 ...`) -> nginx `listen ...
/// proxy_protocol` answering `$proxy_protocol_addr`: nginx sees `::1`, curl's address.
#[test]
fn haproxy_ipv6_sluice_nginx_keep_client_address() {
    init();
    if !require_program("haproxy")
        || !require_program("nginx")
        || !require_program("curl")
        || !require_ipv6_loopback()
    {
        return;
    }
    let host = Host::new();
    let nginx = Nginx::start_with(
        host.addr(),
        "proxy_protocol",
        "default_type text/plain; location / { return 200 \"$proxy_protocol_addr\\n\"; }",
    );
    let mut config = Config::new()
        .listen("from-lb", host.addr(), &[&nginx.addr().to_string()])
        .accept_proxy()
        .send_proxy("v1");
    config.workers = Some(1);
    let relay = Sluice::run_config(&config).start();
    // A free port on [::1] (nothing else in the tests binds [::1]).
    let fe = TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port on [::1]");
    let haproxy = Haproxy::start(
        &format!(
            "frontend fe6\n    bind {fe}\n    default_backend be\n\
             backend be\n    server relay {relay} send-proxy-v2\n",
            relay = relay.addr()
        ),
        &[fe],
    );
    let mut curl = Command::new("curl");
    curl.args(["-g", "-sS", "--fail", "--max-time", "20"])
        .arg(format!("http://{fe}/"));
    let out = run_with_timeout(&mut curl, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "curl over [::1]: {}\nhaproxy: {}\nnginx: {}",
        out.text(),
        tail(&haproxy.stderr(), 20),
        tail(&nginx.error_log(), 20)
    );
    assert_eq!(
        out.stdout, "::1\n",
        "nginx's $proxy_protocol_addr is not curl's address over IPv6"
    );
    assert_eq!(relay.counter("refused_bad_header"), Some(0));
}
