//! SNI routing on a plain port (`route = "sni"`): the ClientHello's server name picks the
//! `upstream` entry (exact, ignoring case), whose host `[resolve]` maps to a local
//! `openssl s_server`; the ClientHello is relayed untouched, so the client completes its
//! handshake with that server's own certificate (verified) and gets that server's answer. Other
//! names, no SNI, and plain HTTP are refused and counted (`refused_bad_sni`). A ClientHello in
//! two pieces, or written one byte per write, is still routed.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::thread;
use std::time::Duration;

use sluice_tests::client::{connect, read_all, send_and_read_to_end};
use sluice_tests::peers::{KeyKind, Pki, SServer, openssl};
use sluice_tests::servers::Ended;
use sluice_tests::{
    Config, HUNG, Host, Output, Sluice, require_program, run_with_input, wait_until,
};

use super::engine_ok;

/// `header_ms` here: how long a client may take to send its whole ClientHello.
const SNI_WAIT_MS: u32 = 1_500;

/// `openssl s_client EXTRA...` through `addr` with `sni` (None: `-noservername`), verifying the
/// server's certificate for `verify_name` against `ca`, asking for `/who.txt`.
fn fetch_who(
    addr: SocketAddr,
    ca: &std::path::Path,
    sni: Option<&str>,
    verify_name: &str,
    extra: &[&str],
) -> Output {
    let mut cmd = openssl();
    cmd.args(["s_client", "-quiet", "-nocommands", "-verify_return_error"])
        .args(extra)
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-CAfile")
        .arg(ca)
        .args(["-verify_hostname", verify_name]);
    match sni {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    run_with_input(&mut cmd, b"GET /who.txt HTTP/1.0\r\n\r\n", HUNG)
}

/// The bytes of a real ClientHello for `name`: `openssl s_client` connects to a listener
/// here that reads what it sends and hangs up.
fn client_hello(name: &str) -> Vec<u8> {
    let host = Host::new();
    let listener = TcpListener::bind((host.ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cmd = openssl();
    cmd.args([
        "s_client",
        "-quiet",
        "-connect",
        &addr.to_string(),
        "-servername",
        name,
    ]);
    let client = thread::spawn(move || run_with_input(&mut cmd, b"", HUNG));
    listener.set_nonblocking(true).unwrap();
    let mut accepted = None;
    wait_until(HUNG, || {
        accepted = listener.accept().ok();
        accepted.is_some()
    });
    let (mut s, _) = accepted.expect("s_client connected to get its ClientHello");
    s.set_nonblocking(false).unwrap();
    // One ClientHello record: 5-byte header + its length.
    let mut hello = Vec::new();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(HUNG)).unwrap();
    while hello.len() < 5 || hello.len() < 5 + usize::from(u16::from_be_bytes([hello[3], hello[4]]))
    {
        let n = std::io::Read::read(&mut s, &mut buf).expect("read the ClientHello");
        assert!(n > 0, "s_client closed before its ClientHello was whole");
        hello.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let _ = client.join();
    assert_eq!(hello[0], 0x16, "not a TLS handshake record");
    hello
}

fn routes_by_sni(engine: &str) {
    if !engine_ok(engine) || !require_program("openssl") {
        return;
    }
    let (relay_host, host_a, host_b) = (Host::new(), Host::new(), Host::new());
    let pki = Pki::new();
    let leaf_a = pki.leaf("a.test", &["DNS:a.test"], KeyKind::Ec);
    let leaf_b = pki.leaf("b.test", &["DNS:b.test"], KeyKind::Ec);
    let a = SServer::start_www(host_a.addr(), &leaf_a, &[("who.txt", b"server-A\n")]);
    let b = SServer::start_www(host_b.addr(), &leaf_b, &[("who.txt", b"server-B\n")]);
    let mut config = Config::new()
        .listen(
            "sni",
            relay_host.addr(),
            &[
                &format!("a.test:{}", a.addr().port()),
                &format!("b.test:{}", b.addr().port()),
            ],
        )
        .route_sni()
        .resolve("a.test", IpAddr::V4(host_a.ip))
        .resolve("b.test", IpAddr::V4(host_b.ip));
    config.workers = Some(1);
    config.engine = Some(engine.into());
    config.header_ms = Some(SNI_WAIT_MS);
    let relay = Sluice::run_config(&config).start();
    super::assert_engine(&relay, engine);
    let ca = pki.ca();

    // Each name lands on its own server (its certificate verifies, its answer comes back);
    // the match ignores case; a ClientHello fragmented over several TLS records (records of
    // at most 512 bytes, a hello over 1 KB with a long ALPN list) is routed too.
    let alpn: Vec<String> = (0..90).map(|i| format!("proto{i:03}")).collect();
    let alpn = alpn.join(",");
    let fragmented = ["-max_send_frag", "512", "-alpn", &alpn];
    for (sni, verify, want, extra) in [
        ("a.test", "a.test", "server-A", &[][..]),
        ("b.test", "b.test", "server-B", &[]),
        ("A.Test", "a.test", "server-A", &[]),
        ("b.test", "b.test", "server-B", &fragmented),
    ] {
        let out = fetch_who(relay.addr(), &ca, Some(sni), verify, extra);
        assert!(
            out.status.success() && out.stdout.contains(want),
            "{engine} SNI {sni}: want {want}, got: {}\ns_server A: {}\ns_server B: {}",
            out.text(),
            a.log(),
            b.log()
        );
    }

    // Names not in the list, and no name at all: refused and counted.
    let mut refused = 0;
    for sni in [
        Some("evil.test"),
        Some("a.test.evil.test"),
        Some("test"),
        None,
    ] {
        let out = fetch_who(relay.addr(), &ca, sni, "a.test", &[]);
        assert!(
            !out.status.success() && !out.stdout.contains("server-"),
            "{engine} SNI {sni:?} was not refused: {}",
            out.text()
        );
        refused += 1;
        assert_eq!(
            relay.wait_counter("refused_bad_sni", refused, HUNG),
            refused,
            "{engine} SNI {sni:?}: refused_bad_sni"
        );
    }

    // Not TLS at all: closed without an answer.
    for (what, bytes) in [
        (
            "plain HTTP",
            &b"GET /who.txt HTTP/1.0\r\nHost: a.test\r\n\r\n"[..],
        ),
        (
            "a handshake record of garbage",
            &b"\x16\x03\x01\x00\x08garbage!"[..],
        ),
    ] {
        let (_, got, ended) = send_and_read_to_end(relay.addr(), None, bytes);
        assert!(
            ended.is_some() && got.is_empty(),
            "{engine} {what}: got {got:?}, ended {ended:?}"
        );
        refused += 1;
        assert_eq!(
            relay.wait_counter("refused_bad_sni", refused, HUNG),
            refused,
            "{engine} {what}: refused_bad_sni"
        );
    }

    // A client that connects and says nothing is closed once `header_ms` has passed.
    let mut s = connect(relay.addr());
    let (got, ended) = read_all(&mut s, HUNG);
    assert!(
        ended.is_some() && got.is_empty(),
        "{engine}: a silent client is still connected after {HUNG:?} (header_ms {SNI_WAIT_MS})"
    );
    refused += 1;
    assert_eq!(
        relay.wait_counter("refused_bad_sni", refused, HUNG),
        refused,
        "{engine}: a silent client"
    );

    // A ClientHello that arrives in two pieces is still routed, and relayed unchanged: B's
    // s_server answers it with a ServerHello.
    let hello = client_hello("b.test");
    let mut s = connect(relay.addr());
    s.write_all(&hello[..7]).unwrap();
    thread::sleep(Duration::from_millis(200));
    s.write_all(&hello[7..]).unwrap();
    s.set_read_timeout(Some(HUNG)).unwrap();
    let mut first = [0u8; 6];
    let r = std::io::Read::read_exact(&mut s, &mut first);
    assert!(
        r.is_ok() && first[0] == 0x16 && first[5] == 0x02,
        "{engine}: no ServerHello for a split ClientHello ({r:?}, {first:?}); s_server B: {}",
        b.log()
    );
    drop(s);
    let (_, ended) = read_all(&mut connect_and_close(relay.addr()), HUNG);
    assert!(matches!(ended, Some(Ended::Eof | Ended::Reset)));
    assert_eq!(
        relay.wait_counter("refused_bad_sni", refused + 1, HUNG),
        refused + 1,
        "{engine}: a client that closed before its ClientHello"
    );
}
engines!(routes_by_sni);

/// A client that connects and sends its FIN at once: the relay refuses it (no ClientHello).
fn connect_and_close(addr: SocketAddr) -> std::net::TcpStream {
    let s = connect(addr);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s
}

/// A ClientHello that reaches a `route = "sni"` port one byte per write (a few ms apart): the
/// relay waits for the whole of it, routes it by its name and relays it untouched, so the
/// client completes its handshake with that server (its certificate verified) and gets its
/// answer.
fn slow_client_hello_routed(engine: &str) {
    if !engine_ok(engine) || !require_program("openssl") {
        return;
    }
    let (relay_host, host_a, host_b) = (Host::new(), Host::new(), Host::new());
    let pki = Pki::new();
    let leaf_a = pki.leaf("a.test", &["DNS:a.test"], KeyKind::Ec);
    let leaf_b = pki.leaf("b.test", &["DNS:b.test"], KeyKind::Ec);
    let a = SServer::start_www(host_a.addr(), &leaf_a, &[("who.txt", b"server-A\n")]);
    let b = SServer::start_www(host_b.addr(), &leaf_b, &[("who.txt", b"server-B\n")]);
    let mut config = Config::new()
        .listen(
            "sni",
            relay_host.addr(),
            &[
                &format!("a.test:{}", a.addr().port()),
                &format!("b.test:{}", b.addr().port()),
            ],
        )
        .route_sni()
        .resolve("a.test", IpAddr::V4(host_a.ip))
        .resolve("b.test", IpAddr::V4(host_b.ip));
    config.workers = Some(1);
    config.engine = Some(engine.into());
    config.header_ms = Some(super::tls::SLOW_HELLO_MS);
    let relay = Sluice::run_config(&config).start();
    super::assert_engine(&relay, engine);
    let got = super::tls::slow_hello_exchange(
        relay.addr(),
        &pki.ca(),
        "b.test",
        b"GET /who.txt HTTP/1.0\r\n\r\n",
        |g| g.windows(9).any(|w| w == b"server-B\n"),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{engine}: SNI b.test with a ClientHello 1 byte per write: {e}\ns_server B: {}",
            b.log()
        )
    });
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.contains("server-B\n") && !got.contains("server-A"),
        "{engine}: want server-B's answer, got {got:?}"
    );
    assert_eq!(relay.counter("refused_bad_sni"), Some(0));
}
engines!(slow_client_hello_routed);
