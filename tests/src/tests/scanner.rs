//! A censor's scanner, differentially: the same battery of probes goes to a real nginx from
//! Debian's package (configured like Debian's default site: `nginx.conf`'s `http` settings,
//! root with `index.nginx-debian.html`, `try_files $uri $uri/ =404`, `server_tokens` at its
//! default) and to Sluice with `decoy = "builtin"` on a plain and a TLS port, and what comes
//! back is compared: status lines, header names and order, bodies, and how the connection
//! ends (closed at once, closed after a wait, reset, still open). `Date`, `ETag` and
//! `Last-Modified` values and the `nginx/VERSION` string are normalised away. The test prints a
//! table and "N of M probes distinguishable" and fails above [`ALLOWED`].
//!
//! nginx's 60 s `client_header_timeout` and 75 s `keepalive_timeout` are shortened on both sides
//! to the same [`TIMEOUT_S`] (nginx's directives; Sluice's `timeouts.decoy_header_ms` and
//! `decoy_keepalive_ms`, and `header_ms`, the engine's wait for a first byte), so a silent client or an idle keep-alive connection ends within the
//! test's wait. "When" is a coarse bucket: an end within [`AT_ONCE`] of the last thing the probe
//! sent or read is "at once", later ones "after a wait" (the timeouts are [`TIMEOUT_S`], well
//! apart from both).
//!
//! The probes that reach the plain port's *upstream* by design are listed in [`BY_DESIGN`]: a
//! plain port sends only what starts like an HTTP request to the decoy, everything else
//! (lowercase or unknown methods, binary, an SSH banner, a TLS hello) to the messenger, because
//! a real client's first bytes there cannot be told from those with confidence (ARCHITECTURE.md,
//! "Decoy"). They count as distinguishable and are what [`ALLOWED`] allows.
//!
//! Every HTTP probe of the plain port is sent again inside TLS (`in-tls:*`), and a battery of
//! `openssl s_client` handshakes (`hs:*`: versions, suites, groups, ALPN lists, SNI, a session
//! resumed from the ticket) compares what a TLS scanner sees: version, suite, ALPN, key
//! exchange, signature, chain, session id, ticket lifetime and count, alerts. The few that
//! differ because rustls lacks what OpenSSL has, or Sluice will not refuse a client over ALPN,
//! are [`TLS_BY_DESIGN`].

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use sluice_tests::peers::{KeyKind, Nginx, Pki};
use sluice_tests::servers::RefusingPort;
use sluice_tests::{Host, Sluice, client, init, require_program};

use super::engine_ok;

/// The shortened `client_header_timeout` and `keepalive_timeout`, both sides.
const TIMEOUT_S: u64 = 3;
/// An end within this of the probe's last step is "at once".
const AT_ONCE: Duration = Duration::from_millis(1500);
/// How long a probe waits for the end before calling the connection "open".
const END_WAIT: Duration = Duration::from_secs(3 * TIMEOUT_S);
/// Plain-port probes relayed to the upstream by design (see the module docs).
const BY_DESIGN: &[&str] = &[
    "lowercase-method",
    "unknown-method",
    "binary-junk",
    "ssh-banner",
    "tls-hello-on-plain",
];
/// TLS handshakes that differ by design: a client offering only `h2` gets no ALPN where nginx
/// refuses it (Sluice never refuses a ClientHello over ALPN: a messenger client offers none or
/// its own), and what rustls does not implement: CBC suites (TLS 1.2 only, with known
/// padding-oracle history) and the X448 group (ARCHITECTURE.md, "Decoy").
const TLS_BY_DESIGN: &[&str] = &["hs:alpn-h2", "hs:tls1.2-cbc", "hs:group-x448"];
/// Distinguishable probes allowed: those of [`BY_DESIGN`] and [`TLS_BY_DESIGN`]
/// (ARCHITECTURE.md, "Decoy").
const ALLOWED: usize = BY_DESIGN.len() + TLS_BY_DESIGN.len();

/// Whether a probe differs from nginx by design.
fn by_design(name: &str) -> bool {
    BY_DESIGN.contains(&name) || TLS_BY_DESIGN.contains(&name)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Port {
    Plain,
    /// The TLS port, spoken to in plaintext.
    Tls,
    /// The TLS port, inside TLS (a rustls client offering `h2` and `http/1.1`, as browsers do).
    TlsInside,
}

#[derive(Clone)]
enum Step {
    Send(Vec<u8>),
    /// Reads until something came and then nothing for 300 ms (at most [`END_WAIT`]).
    Read,
    Sleep(u64),
}

struct Probe {
    name: &'static str,
    port: Port,
    steps: Vec<Step>,
}

fn probe(name: &'static str, port: Port, steps: Vec<Step>) -> Probe {
    Probe { name, port, steps }
}

fn send(bytes: &[u8]) -> Step {
    Step::Send(bytes.to_vec())
}

/// A request with `Host: relay.test` and `extra` header lines.
fn req(line: &str, extra: &str) -> Vec<u8> {
    format!("{line}\r\nHost: relay.test\r\n{extra}\r\n").into_bytes()
}

fn battery() -> Vec<Probe> {
    use Port::{Plain, Tls};
    use Step::{Read, Sleep};
    let get = |path: &str| req(&format!("GET {path} HTTP/1.1"), "Connection: close\r\n");
    let mut tls_hello = vec![
        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03,
    ];
    tls_hello.extend_from_slice(&[7u8; 32]);
    tls_hello.extend_from_slice(&[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00, 0x00, 0x00]);
    let big_header = req(
        "GET / HTTP/1.1",
        &format!("X-Big: {}\r\n", "a".repeat(12 * 1024)),
    );
    let long_uri = req(&format!("GET /{} HTTP/1.1", "b".repeat(9 * 1024)), "");
    let mut probes = vec![
        probe("get-1.1", Plain, vec![send(&get("/"))]),
        probe("get-1.0", Plain, vec![send(b"GET / HTTP/1.0\r\n\r\n")]),
        probe(
            "get-1.0-host",
            Plain,
            vec![send(&req("GET / HTTP/1.0", ""))],
        ),
        probe(
            "get-1.1-no-host",
            Plain,
            vec![send(b"GET / HTTP/1.1\r\n\r\n")],
        ),
        probe(
            "head",
            Plain,
            vec![send(&req("HEAD / HTTP/1.1", "Connection: close\r\n"))],
        ),
        probe("index.html", Plain, vec![send(&get("/index.html"))]),
        probe(
            "debian-page",
            Plain,
            vec![send(&get("/index.nginx-debian.html"))],
        ),
        probe("not-found", Plain, vec![send(&get("/nothing-here"))]),
        probe("not-found-dir", Plain, vec![send(&get("/admin/"))]),
        probe("wp-login", Plain, vec![send(&get("/wp-login.php"))]),
        probe("query", Plain, vec![send(&get("/?q=1"))]),
        probe("double-slash", Plain, vec![send(&get("//"))]),
        probe("dot-dot", Plain, vec![send(&get("/../etc/passwd"))]),
        probe(
            "encoded-dot-dot",
            Plain,
            vec![send(&get("/%2e%2e/%2e%2e/etc/passwd"))],
        ),
        probe(
            "absolute-uri",
            Plain,
            vec![send(&get("http://example.com/"))],
        ),
        probe(
            "post",
            Plain,
            vec![
                send(&req(
                    "POST / HTTP/1.1",
                    "Content-Length: 5\r\nConnection: close\r\n",
                )),
                send(b"hello"),
            ],
        ),
        probe(
            "put",
            Plain,
            vec![send(&req("PUT /x HTTP/1.1", "Content-Length: 0\r\n"))],
        ),
        probe(
            "put-root",
            Plain,
            vec![send(&req("PUT / HTTP/1.1", "Content-Length: 0\r\n"))],
        ),
        probe("delete", Plain, vec![send(&req("DELETE / HTTP/1.1", ""))]),
        probe(
            "options-star",
            Plain,
            vec![send(&req("OPTIONS * HTTP/1.1", ""))],
        ),
        probe("options", Plain, vec![send(&req("OPTIONS / HTTP/1.1", ""))]),
        probe("trace", Plain, vec![send(&req("TRACE / HTTP/1.1", ""))]),
        probe(
            "connect",
            Plain,
            vec![send(&req("CONNECT example.com:443 HTTP/1.1", ""))],
        ),
        probe("patch", Plain, vec![send(&req("PATCH / HTTP/1.1", ""))]),
        probe(
            "lowercase-method",
            Plain,
            vec![send(&req("get / HTTP/1.1", ""))],
        ),
        probe(
            "unknown-method",
            Plain,
            vec![send(&req("FOO / HTTP/1.1", ""))],
        ),
        probe("http-0.9", Plain, vec![send(b"GET /\r\n")]),
        probe("http-0.9-not-found", Plain, vec![send(b"GET /nothing\r\n")]),
        probe(
            "http-1.2",
            Plain,
            vec![send(&req("GET / HTTP/1.2", "Connection: close\r\n"))],
        ),
        probe("http-2.0", Plain, vec![send(&req("GET / HTTP/2.0", ""))]),
        probe("http-3.0", Plain, vec![send(&req("GET / HTTP/3.0", ""))]),
        probe("bad-version", Plain, vec![send(&req("GET / HTTX/1.1", ""))]),
        probe(
            "h2-preface",
            Plain,
            vec![send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")],
        ),
        probe(
            "bare-lf",
            Plain,
            vec![send(
                b"GET / HTTP/1.1\nHost: relay.test\nConnection: close\n\n",
            )],
        ),
        probe(
            "two-hosts",
            Plain,
            vec![send(&req("GET / HTTP/1.1", "Host: other.test\r\n"))],
        ),
        probe(
            "empty-host",
            Plain,
            vec![send(
                b"GET / HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
            )],
        ),
        probe(
            "bad-header",
            Plain,
            vec![send(&req("GET / HTTP/1.1", "no colon here\r\n"))],
        ),
        probe("header-12k", Plain, vec![send(&big_header)]),
        probe("uri-9k", Plain, vec![send(&long_uri)]),
        probe(
            "range",
            Plain,
            vec![send(&req(
                "GET / HTTP/1.1",
                "Range: bytes=0-9\r\nConnection: close\r\n",
            ))],
        ),
        probe(
            "chunked-post",
            Plain,
            vec![
                send(&req("POST / HTTP/1.1", "Transfer-Encoding: chunked\r\n")),
                send(b"5\r\nhello\r\n0\r\n\r\n"),
            ],
        ),
        probe(
            "pipelined",
            Plain,
            vec![send(
                &[
                    req("GET / HTTP/1.1", ""),
                    req("GET /nothing HTTP/1.1", ""),
                    get("/"),
                ]
                .concat(),
            )],
        ),
        probe(
            "keep-alive",
            Plain,
            vec![
                send(&req("GET / HTTP/1.1", "")),
                Read,
                send(&req("HEAD /nothing HTTP/1.1", "")),
                Read,
            ],
        ),
        probe(
            "keep-alive-1.0",
            Plain,
            vec![
                send(&req("GET / HTTP/1.0", "Connection: keep-alive\r\n")),
                Read,
                send(&req("GET / HTTP/1.0", "")),
            ],
        ),
        probe(
            "keep-alive-idle",
            Plain,
            vec![send(&req("GET /nothing HTTP/1.1", "")), Read],
        ),
        probe(
            "gzip",
            Plain,
            vec![send(&req(
                "GET / HTTP/1.1",
                "Accept-Encoding: gzip, deflate\r\n",
            ))],
        ),
        probe(
            "gzip-head",
            Plain,
            vec![send(&req("HEAD / HTTP/1.1", "Accept-Encoding: gzip\r\n"))],
        ),
        probe(
            "gzip-not-found",
            Plain,
            vec![send(&req(
                "GET /nothing HTTP/1.1",
                "Accept-Encoding: gzip\r\nConnection: close\r\n",
            ))],
        ),
        probe(
            "gzip-1.0",
            Plain,
            vec![send(&req("GET / HTTP/1.0", "Accept-Encoding: gzip\r\n"))],
        ),
        probe(
            "gzip-q0",
            Plain,
            vec![send(&req(
                "GET / HTTP/1.1",
                "Accept-Encoding: gzip;q=0\r\nConnection: close\r\n",
            ))],
        ),
        probe(
            "gzip-range",
            Plain,
            vec![send(&req(
                "GET / HTTP/1.1",
                "Accept-Encoding: gzip\r\nRange: bytes=0-9\r\nConnection: close\r\n",
            ))],
        ),
        probe(
            "gzip-post",
            Plain,
            vec![send(&req(
                "POST / HTTP/1.1",
                "Accept-Encoding: gzip\r\nContent-Length: 0\r\nConnection: close\r\n",
            ))],
        ),
        probe(
            "gzip-via",
            Plain,
            vec![send(&req(
                "GET / HTTP/1.1",
                "Accept-Encoding: gzip\r\nVia: 1.1 proxy\r\nConnection: close\r\n",
            ))],
        ),
        probe("silent", Plain, vec![]),
        probe(
            "unfinished-header",
            Plain,
            vec![send(b"GET / HTTP/1.1\r\nHost: relay.test\r\n")],
        ),
        probe(
            "slow-header",
            Plain,
            vec![
                send(b"GET / HTTP/1.1\r\n"),
                Sleep(500),
                send(b"Host: relay.test\r\nConnection: close\r\n\r\n"),
            ],
        ),
        probe(
            "binary-junk",
            Plain,
            vec![send(b"\x00\x01\x02\x03\xff\xfe scanner\r\n\r\n")],
        ),
        probe(
            "ssh-banner",
            Plain,
            vec![send(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")],
        ),
        probe("tls-hello-on-plain", Plain, vec![send(&tls_hello)]),
        probe("tls:plain-http", Tls, vec![send(&get("/"))]),
        probe(
            "tls:plain-http-1.0",
            Tls,
            vec![send(b"GET / HTTP/1.0\r\n\r\n")],
        ),
        probe(
            "tls:junk",
            Tls,
            vec![send(b"\x00\x01\x02\x03\xff\xfe scanner\r\n\r\n")],
        ),
        probe(
            "tls:ssh-banner",
            Tls,
            vec![send(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")],
        ),
        probe(
            "tls:lowercase-method",
            Tls,
            vec![send(&req("get / HTTP/1.1", ""))],
        ),
    ];
    // Every HTTP probe of the plain port again, inside TLS on the TLS port.
    let inside: Vec<Probe> = probes
        .iter()
        .filter(|p| p.port == Plain && !BY_DESIGN.contains(&p.name))
        .map(|p| Probe {
            name: Box::leak(format!("in-tls:{}", p.name).into_boxed_str()),
            port: Port::TlsInside,
            steps: p.steps.clone(),
        })
        .collect();
    probes.extend(inside);
    probes
}

/// How a connection ended, as a probe saw it.
#[derive(Clone, Copy, PartialEq, Debug)]
enum End {
    ClosedAtOnce,
    ClosedAfterWait,
    ResetAtOnce,
    ResetAfterWait,
    /// Inside TLS: a FIN without a `close_notify` before it (OpenSSL's quiet shutdown).
    TruncatedAtOnce,
    TruncatedAfterWait,
    Open,
}

/// What ended a connection.
#[derive(Clone, Copy, PartialEq, Debug)]
enum How {
    Fin,
    Reset,
    /// Inside TLS: the peer closed without `close_notify`.
    Truncated,
}

/// What came back for one probe.
#[derive(Clone, PartialEq, Debug)]
struct Seen {
    bytes: Vec<u8>,
    end: End,
    /// A write failed (the peer had already closed or reset).
    write_failed: bool,
}

/// A probe's connection: TCP, or TLS over it.
trait Conn: Read + Write {
    fn read_timeout(&mut self, d: Duration);
}

impl Conn for TcpStream {
    fn read_timeout(&mut self, d: Duration) {
        self.set_read_timeout(Some(d)).unwrap();
    }
}

impl Conn for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn read_timeout(&mut self, d: Duration) {
        self.sock.set_read_timeout(Some(d)).unwrap();
    }
}

/// Reads into `got` until `done` says so; returns how the connection ended, if it did.
fn read_some(s: &mut dyn Conn, got: &mut Vec<u8>, until: Instant, quiet: bool) -> Option<How> {
    let mut buf = [0u8; 16 * 1024];
    let start = got.len();
    loop {
        let now = Instant::now();
        if now >= until {
            return None;
        }
        let wait = if quiet && got.len() > start {
            Duration::from_millis(300)
        } else {
            until - now
        };
        s.read_timeout(wait.min(until - now).max(Duration::from_millis(1)));
        match s.read(&mut buf) {
            Ok(0) => return Some(How::Fin),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if quiet && got.len() > start {
                    return None;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Some(How::Truncated),
            Err(_) => return Some(How::Reset),
        }
    }
}

/// A TLS client as a browser's first flight has it (SNI, ALPN `h2` then `http/1.1`) that
/// trusts `ca` (PEM), connected and through its handshake; `Err` says why the handshake failed.
fn tls_connect(
    addr: SocketAddr,
    ca: &std::path::Path,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, client::connect(addr));
    s.sock.set_read_timeout(Some(END_WAIT)).unwrap();
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("handshake failed: {e}"))?;
    }
    let alpn = s
        .conn
        .alpn_protocol()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    if alpn.as_deref() != Some("http/1.1") {
        return Err(format!("ALPN {alpn:?}"));
    }
    Ok(s)
}

fn run(p: &Probe, addr: SocketAddr, ca: &std::path::Path) -> Seen {
    let mut s: Box<dyn Conn> = if p.port == Port::TlsInside {
        match tls_connect(addr, ca) {
            Ok(s) => Box::new(s),
            Err(e) => {
                return Seen {
                    bytes: e.into_bytes(),
                    end: End::Open,
                    write_failed: false,
                };
            }
        }
    } else {
        Box::new(client::connect(addr))
    };
    let mut got = Vec::new();
    let mut write_failed = false;
    let mut last = Instant::now();
    for step in &p.steps {
        match step {
            Step::Send(b) => {
                if s.write_all(b).and_then(|()| s.flush()).is_err() {
                    write_failed = true;
                }
                last = Instant::now();
            }
            Step::Read => {
                if let Some(how) = read_some(&mut *s, &mut got, Instant::now() + END_WAIT, true) {
                    let end = end_kind(how, last.elapsed());
                    return Seen {
                        bytes: got,
                        end,
                        write_failed,
                    };
                }
                last = Instant::now();
            }
            Step::Sleep(ms) => thread::sleep(Duration::from_millis(*ms)),
        }
    }
    let end = match read_some(&mut *s, &mut got, last + END_WAIT, false) {
        Some(how) => end_kind(how, last.elapsed()),
        None => End::Open,
    };
    Seen {
        bytes: got,
        end,
        write_failed,
    }
}

fn end_kind(how: How, after: Duration) -> End {
    match (how, after < AT_ONCE) {
        (How::Fin, true) => End::ClosedAtOnce,
        (How::Fin, false) => End::ClosedAfterWait,
        (How::Reset, true) => End::ResetAtOnce,
        (How::Reset, false) => End::ResetAfterWait,
        (How::Truncated, true) => End::TruncatedAtOnce,
        (How::Truncated, false) => End::TruncatedAfterWait,
    }
}

/// TLS handshakes a scanner makes with `openssl s_client` (name, arguments), each followed by
/// one HTTP request inside: protocol versions, ALPN lists, cipher and group restrictions, SNI,
/// tickets and resumption.
fn handshakes() -> Vec<(&'static str, Vec<&'static str>)> {
    let v = |a: &[&'static str]| a.to_vec();
    vec![
        ("hs:default", v(&[])),
        ("hs:alpn-h2-http1.1", v(&["-alpn", "h2,http/1.1"])),
        ("hs:alpn-http1.1", v(&["-alpn", "http/1.1"])),
        ("hs:alpn-h2", v(&["-alpn", "h2"])),
        ("hs:alpn-http1.0", v(&["-alpn", "http/1.0"])),
        ("hs:tls1.2", v(&["-tls1_2"])),
        ("hs:tls1.2-alpn", v(&["-tls1_2", "-alpn", "h2,http/1.1"])),
        ("hs:tls1.1", v(&["-tls1_1"])),
        ("hs:tls1.0", v(&["-tls1"])),
        ("hs:no-sni", v(&["-noservername"])),
        ("hs:other-sni", v(&["-servername", "other.example"])),
        (
            "hs:aes128-only",
            v(&["-ciphersuites", "TLS_AES_128_GCM_SHA256"]),
        ),
        (
            "hs:chacha-only",
            v(&["-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"]),
        ),
        (
            "hs:client-prefers-aes128",
            v(&[
                "-ciphersuites",
                "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384",
            ]),
        ),
        (
            "hs:tls1.2-client-order",
            v(&[
                "-tls1_2",
                "-cipher",
                "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384",
            ]),
        ),
        (
            "hs:tls1.2-cbc",
            v(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"]),
        ),
        ("hs:group-p384", v(&["-groups", "secp384r1"])),
        ("hs:group-p256", v(&["-groups", "prime256v1"])),
        ("hs:group-x448", v(&["-groups", "X448"])),
        ("hs:no-ticket", v(&["-no_ticket"])),
        ("hs:tls1.2-no-ticket", v(&["-tls1_2", "-no_ticket"])),
        ("hs:resume", v(&["RESUME"])),
        ("hs:tls1.2-resume", v(&["RESUME", "-tls1_2"])),
    ]
}

/// What `openssl s_client ARGS` saw of `addr`'s TLS, as comparable lines: the handshake's
/// outcome (or the error), version and cipher, ALPN, key exchange, signature, renegotiation,
/// EMS, the certificate chain's shape, tickets (count, lifetime hint), and the status line of
/// the HTTP request sent inside. With `RESUME` first, a first connection saves its session and
/// what a second one that offers it sees is reported.
fn s_client(addr: SocketAddr, args: &[&str], dir: &std::path::Path, tag: &str) -> String {
    let (resume, args) = match args.first() {
        Some(&"RESUME") => (true, &args[1..]),
        _ => (false, args),
    };
    let run = |extra: &[String]| {
        let mut cmd = sluice_tests::peers::openssl();
        cmd.args(["s_client", "-connect", &addr.to_string()]);
        if !args.iter().any(|a| a.contains("servername")) {
            cmd.args(["-servername", "relay.test"]);
        }
        cmd.args(args).args(extra).arg("-ign_eof");
        sluice_tests::run_with_input(
            &mut cmd,
            b"GET / HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n",
            Duration::from_secs(20),
        )
    };
    let out = if resume {
        let sess = dir.join(format!("{tag}.sess"));
        let sess = sess.to_str().unwrap().to_string();
        run(&["-sess_out".into(), sess.clone()]);
        run(&["-sess_in".into(), sess])
    } else {
        run(&[])
    };
    let mut lines = Vec::new();
    let mut tickets = 0;
    for l in out.stdout.lines() {
        let t = l.trim();
        if t.starts_with("Post-Handshake New Session Ticket arrived") {
            tickets += 1;
        }
        let keep = [
            "New, ",
            "Reused, ",
            "Secure Renegotiation",
            "ALPN protocol:",
            "No ALPN negotiated",
            "Server Temp Key:",
            "Peer signing digest:",
            "Peer signature type:",
            "Server public key is",
            "Extended master secret:",
            "Max Early Data:",
            "TLS session ticket lifetime hint:",
            "HTTP/1.",
        ];
        if keep.iter().any(|k| t.starts_with(k)) {
            lines.push(t.to_string());
        } else if t.starts_with("Protocol  :") || t.starts_with("Cipher    :") {
            lines.push(t.split_whitespace().collect::<Vec<_>>().join(" "));
        } else if t.starts_with("Session-ID:") {
            let empty = t.trim_start_matches("Session-ID:").trim().is_empty();
            lines.push(format!(
                "Session-ID: {}",
                if empty { "empty" } else { "present" }
            ));
        } else if l.len() > 3 && l.as_bytes()[1].is_ascii_digit() && l[2..].starts_with(" s:") {
            lines.push(format!("chain: {}", l.trim()));
        }
    }
    // Within one answer, lines from the session printed twice (the handshake, then each
    // ticket) are kept once each.
    let mut seen = std::collections::HashSet::new();
    lines.retain(|l| seen.insert(l.clone()));
    lines.push(format!("post-handshake tickets: {tickets}"));
    for l in out.stderr.lines() {
        // "...:error:0A000410:SSL routines:ssl3_read_bytes:sslv3 alert handshake failure:..."
        if let Some(i) = l.find("SSL routines:") {
            let reason = l[i..].split(':').nth(2).unwrap_or("");
            let alert = l.rsplit_once("SSL alert number ").map_or("", |x| x.1);
            lines.push(format!("error: {reason} {alert}").trim_end().to_string());
        }
    }
    lines.join("\n")
}

/// The text compared: the bytes with `Date`/`ETag`/`Last-Modified` values and nginx's version
/// replaced, then how it ended.
fn normalised(seen: &Seen) -> String {
    // Binary-safe: bytes outside printable ASCII are written as \xNN.
    let text: String = seen
        .bytes
        .iter()
        .map(|&b| match b {
            b'\r' | b'\n' | b'\t' | 0x20..=0x7e => char::from(b).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect();
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let lower = line.to_ascii_lowercase();
        let line = if lower.starts_with("date: ") {
            "Date: <date>\r\n".to_string()
        } else if lower.starts_with("etag: ") {
            "ETag: <etag>\r\n".to_string()
        } else if lower.starts_with("last-modified: ") {
            "Last-Modified: <date>\r\n".to_string()
        } else {
            without_version(line)
        };
        out.push_str(&line);
    }
    format!(
        "{out}\n-- end: {:?}{}",
        seen.end,
        if seen.write_failed {
            ", a write failed"
        } else {
            ""
        }
    )
}

/// `nginx/1.22.1` → `nginx/<v>`.
fn without_version(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find("nginx/") {
        out.push_str(&rest[..i + 6]);
        rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
        out.push_str("<v>");
    }
    out.push_str(rest);
    out
}

/// One cell of the table: the status lines that came back, and the end.
fn summary(seen: &Seen) -> String {
    let text = String::from_utf8_lossy(&seen.bytes);
    let statuses: Vec<&str> = text
        .split("\r\n")
        .filter(|l| l.starts_with("HTTP/"))
        .map(|l| l.split_once(' ').map_or(l, |x| x.1))
        .collect();
    let what = if statuses.is_empty() {
        if seen.bytes.is_empty() {
            "nothing".to_string()
        } else {
            format!("{} bytes", seen.bytes.len())
        }
    } else {
        statuses.join("+")
    };
    format!("{what}; {:?}", seen.end)
}

/// The first line where two normalised answers differ.
fn first_difference(a: &str, b: &str) -> String {
    for (x, y) in a.lines().zip(b.lines()) {
        if x != y {
            return format!("nginx {x:?} / sluice {y:?}");
        }
    }
    format!(
        "lengths {} / {} lines",
        a.lines().count(),
        b.lines().count()
    )
}

fn differential(engine: &str) {
    differential_with(engine, None)
}
engines!(differential);

/// The same with `decoy = "dir:PATH"` on nginx's own document root (Debian's page in it).
fn differential_dir(engine: &str) {
    differential_with(engine, Some(()))
}
engines!(differential_dir);

/// The battery against nginx and Sluice; `dir`: Sluice serves nginx's root with `dir:`.
fn differential_with(engine: &str, dir: Option<()>) {
    if !engine_ok(engine) || !require_program("nginx") || !require_program("openssl") {
        return;
    }
    init();
    let page = [
        "/usr/share/nginx/html/index.html",
        "/var/www/html/index.nginx-debian.html",
    ]
    .iter()
    .find_map(|p| std::fs::read(p).ok())
    .expect("Debian's nginx default page (package nginx-common)");
    // nginx, as Debian's default site.
    let pki = Pki::new();
    let leaf = pki.leaf("relay.test", &["DNS:relay.test"], KeyKind::Ec);
    let (n_plain, n_tls) = (Host::new().addr(), Host::new().addr());
    let nginx = Nginx::start_debian(
        n_plain,
        Some((n_tls, &leaf)),
        &format!("client_header_timeout {TIMEOUT_S}s; keepalive_timeout {TIMEOUT_S}s;"),
    );
    std::fs::write(nginx.root().join("index.nginx-debian.html"), &page).unwrap();
    // Sluice with the builtin decoy; the upstream refuses (what it does is the messenger's).
    let host = Host::new();
    let upstream = RefusingPort::new(host.addr());
    let (s_plain, s_tls) = (host.addr(), host.addr());
    let text = format!(
        "[timeouts]\nheader_ms = {t}\ndecoy_header_ms = {t}\ndecoy_keepalive_ms = {t}\n\n\
         [[listen]]\nname = \"plain\"\nbind = \"{s_plain}\"\nupstream = [\"{up}\"]\n\
         decoy = \"{decoy}\"\n\n\
         [[listen]]\nname = \"tls\"\nbind = \"{s_tls}\"\nupstream = [\"{up}\"]\n\
         decoy = \"{decoy}\"\n[listen.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        cert = leaf.fullchain.display(),
        key = leaf.key.display(),
        t = TIMEOUT_S * 1000,
        decoy = match dir {
            Some(()) => format!("dir:{}", nginx.root().display()),
            None => "builtin".to_string(),
        },
        up = upstream.addr(),
    );
    let relay = Sluice::run_config_text(&text, vec![s_plain, s_tls])
        .engine(engine)
        .workers(1)
        .start();

    // Every probe to both at once, each on its own connection.
    let probes = battery();
    assert!(probes.len() >= 40, "{} probes", probes.len());
    let results: Vec<(Seen, Seen)> = thread::scope(|scope| {
        let handles: Vec<_> = probes
            .iter()
            .map(|p| {
                let (n, s) = match p.port {
                    Port::Plain => (n_plain, s_plain),
                    Port::Tls | Port::TlsInside => (n_tls, s_tls),
                };
                let ca = pki.ca();
                let a = scope.spawn(move || run(p, n, &ca));
                let ca = pki.ca();
                let b = scope.spawn(move || run(p, s, &ca));
                (a, b)
            })
            .collect();
        handles
            .into_iter()
            .map(|(a, b)| (a.join().unwrap(), b.join().unwrap()))
            .collect()
    });

    let tmp = sluice_tests::TempDir::new();
    let tls_rows: Vec<(&str, String, String)> = handshakes()
        .into_iter()
        .map(|(name, args)| {
            let n = s_client(n_tls, &args, tmp.path(), &format!("n-{name}"));
            let s = s_client(s_tls, &args, tmp.path(), &format!("s-{name}"));
            (name, n, s)
        })
        .collect();

    let mut table = format!(
        "{:<22} {:<36} {:<36} {}\n",
        "probe", "nginx", "sluice", "same?"
    );
    let mut different = Vec::new();
    let mut details = String::new();
    for (p, (n, s)) in probes.iter().zip(&results) {
        let (nn, sn) = (normalised(n), normalised(s));
        let same = nn == sn;
        if std::env::var_os("SCANNER_DUMP").is_some() {
            println!("=== {}\n{}\n", p.name, nn.replace("\r\n", "\\r\\n\n"));
        }
        if !same {
            different.push(p.name);
            details.push_str(&format!("{}: {}\n", p.name, first_difference(&nn, &sn)));
        }
        table.push_str(&format!(
            "{:<22} {:<36} {:<36} {}\n",
            p.name,
            summary(n),
            summary(s),
            if same {
                "same"
            } else if by_design(p.name) {
                "DIFF (by design)"
            } else {
                "DIFF"
            }
        ));
    }
    for (name, n, s) in &tls_rows {
        let same = n == s;
        if std::env::var_os("SCANNER_DUMP").is_some() {
            println!("=== {name}\nnginx:\n{n}\nsluice:\n{s}\n");
        }
        let first = |t: &str| t.lines().next().unwrap_or("").to_string();
        if !same {
            different.push(name);
            details.push_str(&format!("{name}: {}\n", first_difference(n, s)));
        }
        table.push_str(&format!(
            "{:<22} {:<36} {:<36} {}\n",
            name,
            first(n),
            first(s),
            if same {
                "same"
            } else if by_design(name) {
                "DIFF (by design)"
            } else {
                "DIFF"
            }
        ));
    }
    let total = probes.len() + tls_rows.len();
    println!(
        "{table}\n{details}\n{} of {total} probes distinguishable",
        different.len(),
    );
    let unexpected: Vec<_> = different.iter().filter(|n| !by_design(n)).collect();
    assert!(
        different.len() <= ALLOWED && unexpected.is_empty(),
        "{} of {} probes distinguishable (allowed {ALLOWED}: {BY_DESIGN:?} {TLS_BY_DESIGN:?}); unexpected: {unexpected:?}\n{table}\n{details}\n{}",
        different.len(),
        total,
        relay.status(),
    );
}
