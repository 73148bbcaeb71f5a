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
/// Distinguishable probes allowed: those of [`BY_DESIGN`] (ARCHITECTURE.md, "Decoy").
const ALLOWED: usize = BY_DESIGN.len();

#[derive(Clone, Copy, PartialEq, Debug)]
enum Port {
    Plain,
    /// The TLS port, spoken to in plaintext.
    Tls,
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
    vec![
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
    ]
}

/// How a connection ended, as a probe saw it.
#[derive(Clone, Copy, PartialEq, Debug)]
enum End {
    ClosedAtOnce,
    ClosedAfterWait,
    ResetAtOnce,
    ResetAfterWait,
    Open,
}

/// What came back for one probe.
#[derive(Clone, PartialEq, Debug)]
struct Seen {
    bytes: Vec<u8>,
    end: End,
    /// A write failed (the peer had already closed or reset).
    write_failed: bool,
}

/// Reads into `got` until `done` says so; returns the end if the connection ended.
fn read_some(s: &mut TcpStream, got: &mut Vec<u8>, until: Instant, quiet: bool) -> Option<bool> {
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
        s.set_read_timeout(Some(wait.min(until - now).max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if quiet && got.len() > start {
                    return None;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Some(true),
        }
    }
}

fn run(p: &Probe, addr: SocketAddr) -> Seen {
    let mut s = client::connect(addr);
    let mut got = Vec::new();
    let mut write_failed = false;
    let mut last = Instant::now();
    for step in &p.steps {
        match step {
            Step::Send(b) => {
                if s.write_all(b).is_err() {
                    write_failed = true;
                }
                last = Instant::now();
            }
            Step::Read => {
                if let Some(reset) = read_some(&mut s, &mut got, Instant::now() + END_WAIT, true) {
                    let end = end_kind(reset, last.elapsed());
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
    let end = match read_some(&mut s, &mut got, last + END_WAIT, false) {
        Some(reset) => end_kind(reset, last.elapsed()),
        None => End::Open,
    };
    Seen {
        bytes: got,
        end,
        write_failed,
    }
}

fn end_kind(reset: bool, after: Duration) -> End {
    match (reset, after < AT_ONCE) {
        (false, true) => End::ClosedAtOnce,
        (false, false) => End::ClosedAfterWait,
        (true, true) => End::ResetAtOnce,
        (true, false) => End::ResetAfterWait,
    }
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
         decoy = \"{decoy}\"\n[listen.tls]\ndns_names = [\"relay.test\"]\n",
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
                    Port::Tls => (n_tls, s_tls),
                };
                let a = scope.spawn(move || run(p, n));
                let b = scope.spawn(move || run(p, s));
                (a, b)
            })
            .collect();
        handles
            .into_iter()
            .map(|(a, b)| (a.join().unwrap(), b.join().unwrap()))
            .collect()
    });

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
            } else if BY_DESIGN.contains(&p.name) {
                "DIFF (by design)"
            } else {
                "DIFF"
            }
        ));
    }
    println!(
        "{table}\n{details}\n{} of {} probes distinguishable",
        different.len(),
        probes.len()
    );
    let unexpected: Vec<_> = different
        .iter()
        .filter(|n| !BY_DESIGN.contains(n))
        .collect();
    assert!(
        different.len() <= ALLOWED && unexpected.is_empty(),
        "{} of {} probes distinguishable (allowed {ALLOWED}: {BY_DESIGN:?}); unexpected: {unexpected:?}\n{table}\n{details}\n{}",
        different.len(),
        probes.len(),
        relay.status(),
    );
}
