//! The anti-probing decoy: a connection whose first bytes are not what its port expects — an
//! HTTP request on a plain or TLS-terminated port, a ClientHello for a name outside a listener's
//! allowlist, anything but a TLS handshake on a TLS port — is relayed to the listener's decoy
//! (`decoy = "builtin"`, `"dir:/PATH"` or `"HOST:PORT"`) instead of being closed, so a censor's
//! probe finds an ordinary web site. Real clients never look like that: WhatsApp's chat stream
//! starts with its own prologue (`WA`), Signal's with a ClientHello for one of its hosts.
//!
//! `builtin` and `dir:` are an HTTP/1.x server of the supervisor's own on 127.0.0.1 (a thread,
//! one thread per connection; connections relayed to it like to any upstream, so on a TLS port
//! the page goes out inside the TLS session) that imitates nginx 1.22 as Debian 12 ships it with
//! its default site (`root /var/www/html; index index.html index.htm index.nginx-debian.html;
//! try_files $uri $uri/ =404;`, `server_tokens` on), checked probe by probe against the real one
//! (tests/src/tests/scanner.rs):
//! - the same header set and order, a real `Date`, `Last-Modified`/`ETag` of the file,
//!   `Accept-Ranges` and single byte ranges; nginx's error pages byte for byte and its reason
//!   phrases (`405 Not Allowed`, `414 Request-URI Too Large`, `400` for a too-large header);
//! - nginx's request parsing: upper-case methods only (`400` otherwise), an unknown method on a
//!   file `405`, `TRACE` `405`, HTTP/0.9 answered without headers, `505` from HTTP/2.0 up, `400`
//!   for HTTP/1.1 without `Host`, a duplicate or empty `Host`, a header line without a colon,
//!   `..` above the root, a target that is neither a path nor an absolute URI (`OPTIONS *`);
//! - keep-alive (HTTP/1.1 unless `Connection: close`, HTTP/1.0 with `keep-alive`) with pipelining
//!   and request bodies skipped, closed after `timeouts.decoy_keepalive_ms` (75 s); error
//!   answers that nginx closes after (`400`, `414`, `505`, `TRACE`) close;
//! - `client_header_timeout` (`timeouts.decoy_header_ms`, 60 s) as a total deadline for a request
//!   head, not renewed by each byte: an unfinished or trickled header is closed quietly (FIN, no
//!   answer) at the deadline. A client that sends nothing never reaches the decoy: the engine
//!   closes it as quietly after `timeouts.header_ms` (set it to nginx's 60 s to match that too);
//! - plain HTTP sent to a TLS port (the engine sends such connections to a twin listener of the
//!   site) gets nginx's `400 The plain HTTP request was sent to HTTPS port`.
//!
//! `builtin` serves Debian's `index.nginx-debian.html` (the page nginx's package installs,
//! shipped byte for byte) at `/`; `dir:` serves the directory's files. Nothing about a request is
//! logged or kept. `gzip on` (Debian's nginx.conf) is imitated with nginx's own compressed
//! bytes of Debian's page and of the 404 and 403 pages; other files go out uncompressed. Not
//! imitated (ARCHITECTURE.md, "Decoy"): compression of the operator's other files, multi-range
//! requests, conditional requests (`304`), `Expect: 100-continue`, MSIE padding of error pages.
//!
//! ACME HTTP-01 ([`crate::acme`]): while an order waits for validation, the ACME thread (in
//! the supervisor, like these sites) offers its tokens here ([`AcmeTokens`]); a `GET` or
//! `HEAD` of `/.well-known/acme-challenge/TOKEN` for exactly such a token (base64url only)
//! gets `200` with the key authorization as `application/octet-stream`, like certbot's
//! standalone server. Any other path, and a token no longer pending, is answered as before
//! (nginx's `404`). The tokens are taken back once the order is decided.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Request methods an HTTP/1.x request line starts with (and the HTTP/2 preface's `PRI`).
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"CONNECT ",
    b"PATCH ",
    b"TRACE ",
    b"PRI ",
];

/// Whether a connection's first bytes are an HTTP request line: `None` while `prefix` is still
/// the start of a method (more bytes needed), else the answer.
pub fn looks_like_http(prefix: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for m in METHODS {
        let n = prefix.len().min(m.len());
        if prefix[..n] == m[..n] {
            if prefix.len() >= m.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

/// The server it names (`Server:` and the error pages' signature): Debian 12's nginx.
pub(crate) const SERVER: &str = "nginx/1.22.1";

/// The page `builtin` serves at `/`: Debian's `index.nginx-debian.html`, byte for byte (from
/// the package nginx-common, `/usr/share/nginx/html/index.html`; nginx's BSD licence).
pub(crate) const PAGE: &[u8] = include_bytes!("decoy_page.html");

/// The name `builtin`'s page has (reachable as `/index.nginx-debian.html` too, as on Debian).
const PAGE_NAME: &str = "index.nginx-debian.html";

/// nginx's `index` on Debian's default site, in order.
const INDEX: &[&str] = &["index.html", "index.htm", "index.nginx-debian.html"];

/// nginx's `large_client_header_buffers 4 8k`: a request line or a header line this long is too
/// long, and so is a head longer than four of them.
const LARGE_BUFFER: usize = 8 * 1024;
const MAX_HEAD: usize = 4 * LARGE_BUFFER;
/// nginx's `lingering_timeout` and `lingering_time`: after an answer it closes with, it reads
/// (and drops) what the client still sends, until a pause this long or at most this total.
const LINGERING_TIMEOUT: Duration = Duration::from_secs(5);
const LINGERING_TIME: Duration = Duration::from_secs(30);

/// Connections the built-in site serves at once; more wait in the listen backlog.
const MAX_AT_ONCE: usize = 64;

/// What a local decoy serves.
#[derive(Debug, Clone)]
pub(crate) enum Site {
    /// Debian's default page ([`PAGE`]), dated when the site started.
    Builtin { mtime: SystemTime },
    /// The operator's files under this directory.
    Dir(PathBuf),
}

/// The site's timeouts (from `[timeouts]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// `client_header_timeout`: a total deadline for each request head.
    pub header: Duration,
    /// `keepalive_timeout`.
    pub keepalive: Duration,
}

impl Timing {
    pub(crate) fn from_config(t: &crate::config::Timeouts) -> Timing {
        let ms = |v: u32| Duration::from_millis(u64::from(v));
        Timing {
            header: ms(t.decoy_header_ms),
            keepalive: ms(t.decoy_keepalive_ms),
        }
    }
}

/// Binds a local site on 127.0.0.1 (an ephemeral port).
pub(crate) fn bind() -> std::io::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
}

/// A local site as the supervisor runs it: the listener's decoy setting it serves, its address
/// for probes, and its twin's for plaintext sent to a TLS port.
#[derive(Debug, Clone)]
pub(crate) struct Local {
    pub decoy: crate::config::Decoy,
    pub addr: std::net::SocketAddr,
    pub https_addr: std::net::SocketAddr,
}

/// Starts a local site (and its TLS-port twin) for each `builtin` or `dir:` decoy of `config`
/// that `running` does not have yet (sites are never stopped: a reload that drops one leaves
/// an idle thread). Errors name the step.
pub(crate) fn start_local(
    config: &crate::config::Config,
    running: &mut Vec<Local>,
) -> Result<(), String> {
    let timing = Timing::from_config(&config.timeouts);
    for l in &config.listeners {
        if !l.decoy.is_local() || running.iter().any(|r| r.decoy == l.decoy) {
            continue;
        }
        let site = match &l.decoy {
            crate::config::Decoy::Dir(p) => Site::Dir(p.clone()),
            _ => Site::Builtin {
                mtime: SystemTime::now(),
            },
        };
        let what = format!("the decoy site `{}` (listener {})", l.decoy, l.name);
        let bound = |https| -> Result<std::net::SocketAddr, String> {
            let sock = bind().map_err(|e| format!("{what}: binding 127.0.0.1:0: {e}"))?;
            let addr = sock
                .local_addr()
                .map_err(|e| format!("{what}: its address: {e}"))?;
            spawn(sock, site.clone(), timing, https)
                .map_err(|e| format!("{what}: starting its thread: {e}"))?;
            Ok(addr)
        };
        let (addr, https_addr) = (bound(false)?, bound(true)?);
        running.push(Local {
            decoy: l.decoy.clone(),
            addr,
            https_addr,
        });
    }
    Ok(())
}

/// Serves a local site on its own thread (one short-lived thread per connection, at most
/// [`MAX_AT_ONCE`]). `https_port`: what comes here is plaintext sent to a TLS port.
pub(crate) fn spawn(
    listener: TcpListener,
    site: Site,
    timing: Timing,
    https_port: bool,
) -> std::io::Result<()> {
    let busy = Arc::new(AtomicUsize::new(0));
    let site = Arc::new(site);
    std::thread::Builder::new()
        .name("decoy".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                while busy.load(Ordering::Relaxed) >= MAX_AT_ONCE {
                    std::thread::sleep(Duration::from_millis(10));
                }
                busy.fetch_add(1, Ordering::Relaxed);
                let done = busy.clone();
                let site = site.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("decoy-conn".into())
                        .spawn(move || {
                            serve(stream, &site, timing, https_port);
                            done.fetch_sub(1, Ordering::Relaxed);
                        });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!("decoy: no thread for a connection");
                }
            }
        })
        .map(drop)
}

// ---------------------------------------------------------------------------------------------
// ACME HTTP-01 answers.

/// Where HTTP-01 tokens are asked for (RFC 8555 section 8.3).
const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

/// The HTTP-01 tokens pending in this process: token to key authorization. The ACME thread
/// and the local sites both run in the supervisor.
static ACME_PENDING: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// A token as RFC 8555 makes them: base64url characters only (no padding, no `.` or `/`), so a
/// path that matches one can name nothing else; at most 256 of them.
fn is_acme_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// HTTP-01 tokens answered by every local site while this lives (dropped: taken back).
#[derive(Debug)]
pub(crate) struct AcmeTokens(Vec<String>);

impl AcmeTokens {
    /// Offers `(token, key authorization)` pairs; a token outside the base64url alphabet, or a
    /// key authorization that is not `token.thumbprint` of that alphabet, is refused.
    pub(crate) fn offer(pairs: Vec<(String, String)>) -> Result<AcmeTokens, String> {
        for (token, key_auth) in &pairs {
            let ok = is_acme_token(token)
                && key_auth
                    .split_once('.')
                    .is_some_and(|(t, thumb)| t == token && is_acme_token(thumb));
            if !ok {
                return Err(format!(
                    "an http-01 token the CA sent is malformed: {token:?}"
                ));
            }
        }
        let mut map = ACME_PENDING.lock().unwrap_or_else(|e| e.into_inner());
        let mut tokens = Vec::with_capacity(pairs.len());
        for (token, key_auth) in pairs {
            map.insert(token.clone(), key_auth);
            tokens.push(token);
        }
        Ok(AcmeTokens(tokens))
    }
}

impl Drop for AcmeTokens {
    fn drop(&mut self) {
        let mut map = ACME_PENDING.lock().unwrap_or_else(|e| e.into_inner());
        for t in &self.0 {
            map.remove(t);
        }
    }
}

/// The key authorization for a request of a pending token's path, else None.
fn acme_key_authorization(req: &Request) -> Option<String> {
    if req.method != "GET" && req.method != "HEAD" {
        return None;
    }
    let token = req.path.strip_prefix(ACME_PREFIX)?;
    if !is_acme_token(token) {
        return None;
    }
    ACME_PENDING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(token)
        .cloned()
}

/// The answer with a key authorization (certbot's standalone server sends it this way too).
fn acme_answer(req: &Request, key_auth: &str) -> Vec<u8> {
    if req.http09 {
        return key_auth.as_bytes().to_vec();
    }
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nServer: {SERVER}\r\nDate: {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        http_date(SystemTime::now()),
        key_auth.len(),
        if req.keepalive { "keep-alive" } else { "close" },
    )
    .into_bytes();
    if req.method != "HEAD" {
        out.extend_from_slice(key_auth.as_bytes());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Parsing a request head, nginx's way.

/// Why a request is refused before it reaches the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    /// nginx's 494: a header line or the head too long (status 400).
    HeaderTooLarge,
    UriTooLarge,
    VersionNotSupported,
    /// TRACE (nginx refuses it while reading the head, and closes).
    TraceNotAllowed,
    NotImplemented,
}

/// A request head, as far as the site cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The decoded, normalised path (always starts with `/`).
    pub path: String,
    /// HTTP/0.9: no headers either way.
    pub http09: bool,
    pub keepalive: bool,
    pub body: Body,
    pub range: Option<String>,
    /// nginx's `gzip on` would compress the answer: HTTP/1.1 or later (`gzip_http_version`),
    /// `Accept-Encoding` with `gzip` not at q=0, no `Via` (`gzip_proxied off`).
    pub gzip: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

/// What the bytes so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole head yet (and nothing wrong so far).
    More,
    /// Refused (answered, then closed); `http09`: answered without headers.
    Refused(Refusal, bool),
    /// A whole head of `len` bytes.
    Request(Request, usize),
}

fn is_method_byte(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'_' || b == b'-'
}

/// Parses the request at the start of `buf` (leading empty lines skipped, as nginx does).
pub fn parse(buf: &[u8]) -> Parsed {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let b = &buf[start..];
    let eol = b.iter().position(|&c| c == b'\n');
    let line = match eol {
        Some(i) => &b[..i],
        None => b,
    };
    let complete = eol.is_some();
    // Method.
    let mut i = 0;
    while i < line.len() && is_method_byte(line[i]) {
        i += 1;
    }
    if i == line.len() {
        return too_long_or_more(complete, line.len(), Refusal::BadRequest);
    }
    if line[i] != b' ' || i == 0 {
        return Parsed::Refused(Refusal::BadRequest, false);
    }
    let method = String::from_utf8_lossy(&line[..i]).into_owned();
    while i < line.len() && line[i] == b' ' {
        i += 1;
    }
    if i == line.len() {
        return too_long_or_more(complete, line.len(), Refusal::BadRequest);
    }
    // Target: a path, or an absolute URI (`scheme://host[:port]/path`).
    let mut host_in_uri = None;
    if line[i].is_ascii_alphabetic() {
        while i < line.len()
            && (line[i].is_ascii_alphanumeric() || matches!(line[i], b'+' | b'-' | b'.'))
        {
            i += 1;
        }
        if i == line.len() {
            return too_long_or_more(complete, line.len(), Refusal::BadRequest);
        }
        let rest = &line[i..];
        let sep = b"://";
        let n = rest.len().min(3);
        if rest[..n] != sep[..n] {
            return Parsed::Refused(Refusal::BadRequest, false);
        }
        if rest.len() < 3 {
            return too_long_or_more(complete, line.len(), Refusal::BadRequest);
        }
        i += 3;
        let h = i;
        while i < line.len() && !matches!(line[i], b'/' | b' ' | b'\r') {
            i += 1;
        }
        host_in_uri = Some(String::from_utf8_lossy(&line[h..i]).into_owned());
    } else if line[i] != b'/' {
        return Parsed::Refused(Refusal::BadRequest, false);
    }
    let path_start = i;
    while i < line.len() && !matches!(line[i], b' ' | b'\r') {
        if line[i] == 0 {
            return Parsed::Refused(Refusal::BadRequest, false);
        }
        i += 1;
    }
    if !complete {
        return too_long_or_more(false, line.len(), Refusal::UriTooLarge);
    }
    if line.len() >= LARGE_BUFFER {
        return Parsed::Refused(Refusal::UriTooLarge, false);
    }
    let raw_path: &[u8] = if path_start == i {
        b"/"
    } else {
        &line[path_start..i]
    };
    while i < line.len() && line[i] == b' ' {
        i += 1;
    }
    let rest = &line[i..];
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    let head_start = start + eol.expect("complete") + 1;
    if rest.is_empty() {
        // HTTP/0.9: only GET, no headers.
        if method != "GET" {
            return Parsed::Refused(Refusal::BadRequest, true);
        }
        let Some(path) = normalise(raw_path) else {
            return Parsed::Refused(Refusal::BadRequest, true);
        };
        return Parsed::Request(
            Request {
                method,
                path,
                http09: true,
                keepalive: false,
                body: Body::None,
                range: None,
                gzip: false,
            },
            head_start,
        );
    }
    let Some(version) = rest.strip_prefix(b"HTTP/") else {
        return Parsed::Refused(Refusal::BadRequest, false);
    };
    let version = version.trim_ascii_end();
    let Some((major, minor)) = std::str::from_utf8(version)
        .ok()
        .and_then(|v| v.split_once('.'))
        .filter(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.len() <= 2
                && b.len() <= 3
                && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
        })
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
    else {
        return Parsed::Refused(Refusal::BadRequest, false);
    };
    if major > 1 {
        return Parsed::Refused(Refusal::VersionNotSupported, false);
    }
    let http11 = major == 1 && minor >= 1;
    let Some(path) = normalise(raw_path) else {
        return Parsed::Refused(Refusal::BadRequest, false);
    };
    // Header lines.
    let mut at = head_start;
    let mut host: Option<String> = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut te = false;
    let mut connection = String::new();
    let mut range = None;
    let mut accept_gzip = false;
    let mut via = false;
    loop {
        let Some(n) = buf[at..].iter().position(|&c| c == b'\n') else {
            if buf.len() - at >= LARGE_BUFFER || buf.len() >= MAX_HEAD {
                return Parsed::Refused(Refusal::HeaderTooLarge, false);
            }
            return Parsed::More;
        };
        let line = &buf[at..at + n];
        at += n + 1;
        if n >= LARGE_BUFFER || at > MAX_HEAD {
            return Parsed::Refused(Refusal::HeaderTooLarge, false);
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            return Parsed::Refused(Refusal::BadRequest, false);
        };
        let name = &line[..colon];
        if name.contains(&0) || line.contains(&0) {
            return Parsed::Refused(Refusal::BadRequest, false);
        }
        // nginx ignores header names with characters outside [A-Za-z0-9-] (and `_`).
        if name.is_empty() || !name.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') {
            continue;
        }
        let value = String::from_utf8_lossy(line[colon + 1..].trim_ascii()).into_owned();
        match name.to_ascii_lowercase().as_slice() {
            b"host" => {
                if host.is_some() {
                    return Parsed::Refused(Refusal::BadRequest, false);
                }
                host = Some(value);
            }
            b"content-length" => {
                if length.is_some() {
                    return Parsed::Refused(Refusal::BadRequest, false);
                }
                match value.parse::<u64>() {
                    Ok(v) if value.bytes().all(|c| c.is_ascii_digit()) => length = Some(v),
                    _ => return Parsed::Refused(Refusal::BadRequest, false),
                }
            }
            b"transfer-encoding" => {
                if te {
                    return Parsed::Refused(Refusal::BadRequest, false);
                }
                te = true;
                chunked = value.eq_ignore_ascii_case("chunked");
            }
            b"connection" => connection = value.to_ascii_lowercase(),
            b"range" => range = Some(value),
            b"accept-encoding" => accept_gzip = accepts_gzip(&value),
            b"via" => via = true,
            _ => {}
        }
    }
    let host = host_in_uri.or(host);
    match &host {
        None if http11 => return Parsed::Refused(Refusal::BadRequest, false),
        Some(h) if !valid_host(h) => return Parsed::Refused(Refusal::BadRequest, false),
        _ => {}
    }
    let body = if te {
        if !http11 || length.is_some() {
            return Parsed::Refused(Refusal::BadRequest, false);
        }
        if !chunked {
            return Parsed::Refused(Refusal::NotImplemented, false);
        }
        Body::Chunked
    } else {
        length.map_or(Body::None, Body::Length)
    };
    if method == "TRACE" {
        return Parsed::Refused(Refusal::TraceNotAllowed, false);
    }
    let keepalive = if http11 {
        !connection.contains("close")
    } else {
        connection.contains("keep-alive")
    };
    Parsed::Request(
        Request {
            method,
            path,
            http09: false,
            keepalive,
            body,
            range,
            gzip: http11 && accept_gzip && !via,
        },
        at,
    )
}

/// nginx's `ngx_http_gzip_accept_encoding`: `gzip` in the list, not with a q-value of 0.
fn accepts_gzip(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    let Some(at) = lower.find("gzip") else {
        return false;
    };
    let rest = lower[at + 4..].trim_start();
    let Some(params) = rest.strip_prefix(';') else {
        return true;
    };
    let q = params.split(',').next().unwrap_or("").trim();
    match q.strip_prefix("q=") {
        Some(v) => v.trim().parse::<f32>().map_or(true, |q| q > 0.0),
        None => true,
    }
}

/// nginx's gzip output (level 1, as `gzip on` leaves it) of the bodies the builtin site sends,
/// captured from Debian 12's nginx 1.22.1 (zlib 1.2.13): compressing them here with another
/// deflate would give other bytes.
const PAGE_GZ: &[u8] = include_bytes!("decoy_gz/page.gz");
const NOT_FOUND_GZ: &[u8] = include_bytes!("decoy_gz/404.gz");
const FORBIDDEN_GZ: &[u8] = include_bytes!("decoy_gz/403.gz");

/// A gzip-encoded answer as nginx sends it: chunked (the length is not known in advance), one
/// chunk; `extra` headers (`Last-Modified`, ...) go where nginx puts them.
fn gzip_answer(
    status: &str,
    content_type: &str,
    before_te: &str,
    after_connection: &str,
    keepalive: bool,
    head_only: bool,
    gz: &[u8],
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nServer: {SERVER}\r\nDate: {}\r\nContent-Type: {content_type}\r\n\
         {before_te}{}Connection: {}\r\n{after_connection}Content-Encoding: gzip\r\n\r\n",
        http_date(SystemTime::now()),
        if head_only {
            ""
        } else {
            "Transfer-Encoding: chunked\r\n"
        },
        if keepalive { "keep-alive" } else { "close" },
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(format!("{:x}\r\n", gz.len()).as_bytes());
        out.extend_from_slice(gz);
        out.extend_from_slice(b"\r\n0\r\n\r\n");
    }
    out
}

/// An unfinished line: too long already (`too_long`), or more to come.
fn too_long_or_more(complete: bool, len: usize, too_long: Refusal) -> Parsed {
    if complete {
        Parsed::Refused(Refusal::BadRequest, false)
    } else if len >= LARGE_BUFFER {
        Parsed::Refused(too_long, false)
    } else {
        Parsed::More
    }
}

/// nginx's `ngx_http_validate_host`, in short: not empty, no `/`, no `..`, no leading dot.
fn valid_host(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty() && !h.starts_with('.') && !h.contains("..") && !h.contains(['/', '\\', '\0'])
}

/// The path of a request target: the query dropped, `%XX` decoded, `//` merged, `.` and `..`
/// resolved; None (400) when it is malformed or leaves the root.
pub(crate) fn normalise(raw: &[u8]) -> Option<String> {
    let raw = match raw.iter().position(|&c| c == b'?' || c == b'#') {
        Some(q) => &raw[..q],
        None => raw,
    };
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if v == 0 {
                return None;
            }
            bytes.push(v);
            i += 3;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    let trailing = bytes.ends_with(b"/") || bytes.ends_with(b"/.") || bytes.ends_with(b"/..");
    let mut parts: Vec<&[u8]> = Vec::new();
    for seg in bytes.split(|&c| c == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            s => parts.push(s),
        }
    }
    let mut out = String::from("/");
    for (n, p) in parts.iter().enumerate() {
        if n > 0 {
            out.push('/');
        }
        out.push_str(&String::from_utf8_lossy(p));
    }
    if trailing && !parts.is_empty() {
        out.push('/');
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Answers.

/// `Date`'s format: `Sat, 05 Dec 2026 19:20:00 GMT`.
pub(crate) fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
        WEEKDAYS[(days.rem_euclid(7)) as usize],
        MONTHS[(month - 1) as usize]
    )
}

/// nginx's status line reason phrase.
fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Not Allowed",
        414 => "Request-URI Too Large",
        416 => "Requested Range Not Satisfiable",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// nginx's error page for `code` (with its extra line for 494 and 497, both status 400).
pub(crate) fn error_page(code: u16, extra: Option<&str>) -> String {
    let title = match extra {
        Some(e) => format!("400 {e}"),
        None => format!("{code} {}", reason(code)),
    };
    let mut page = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n\
         <center><h1>{code} {}</h1></center>\r\n",
        reason(code)
    );
    if let Some(e) = extra {
        page.push_str(&format!("<center>{e}</center>\r\n"));
    }
    page.push_str(&format!(
        "<hr><center>{SERVER}</center>\r\n</body>\r\n</html>\r\n"
    ));
    page
}

/// An error answer: the status line and nginx's headers, then its page (`head_only`: HEAD).
fn error_answer(
    code: u16,
    extra: Option<&str>,
    keepalive: bool,
    head_only: bool,
    http09: bool,
) -> Vec<u8> {
    let page = error_page(code, extra);
    if http09 {
        return page.into_bytes();
    }
    let mut out = format!(
        "HTTP/1.1 {code} {}\r\nServer: {SERVER}\r\nDate: {}\r\nContent-Type: text/html\r\n\
         Content-Length: {}\r\nConnection: {}\r\n\r\n",
        reason(code),
        http_date(SystemTime::now()),
        page.len(),
        if keepalive { "keep-alive" } else { "close" },
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(page.as_bytes());
    }
    out
}

/// The answer to a head the parser refused (nginx closes after each of them).
pub(crate) fn refusal_answer(r: Refusal, http09: bool) -> Vec<u8> {
    match r {
        Refusal::BadRequest => error_answer(400, None, false, false, http09),
        Refusal::HeaderTooLarge => error_answer(
            400,
            Some("Request Header Or Cookie Too Large"),
            false,
            false,
            http09,
        ),
        Refusal::UriTooLarge => error_answer(414, None, false, false, http09),
        Refusal::VersionNotSupported => error_answer(505, None, false, false, http09),
        Refusal::TraceNotAllowed => error_answer(405, None, false, false, http09),
        Refusal::NotImplemented => error_answer(501, None, false, false, http09),
    }
}

/// A file found for a request.
struct Found {
    body: FileBody,
    len: u64,
    mtime: SystemTime,
    name: String,
}

enum FileBody {
    Builtin,
    File(PathBuf),
}

/// What `try_files $uri $uri/ =404` with Debian's `index` finds: Ok(file), Err(403 or 404).
fn lookup(site: &Site, path: &str) -> Result<Found, u16> {
    match site {
        Site::Builtin { mtime } => {
            let page = || Found {
                body: FileBody::Builtin,
                len: PAGE.len() as u64,
                mtime: *mtime,
                name: PAGE_NAME.into(),
            };
            match path {
                "/" => Ok(page()),
                p if p.strip_prefix('/') == Some(PAGE_NAME) => Ok(page()),
                _ => Err(404),
            }
        }
        Site::Dir(root) => {
            let rel = path.trim_start_matches('/');
            let full = root.join(rel);
            let file = |p: &Path| -> Option<Found> {
                let meta = std::fs::metadata(p).ok()?;
                meta.is_file().then(|| Found {
                    body: FileBody::File(p.to_path_buf()),
                    len: meta.len(),
                    mtime: meta.modified().unwrap_or(UNIX_EPOCH),
                    name: p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                })
            };
            if !path.ends_with('/')
                && let Some(f) = file(&full)
            {
                return Ok(f);
            }
            if std::fs::metadata(&full).is_ok_and(|m| m.is_dir()) {
                return INDEX.iter().find_map(|i| file(&full.join(i))).ok_or(403);
            }
            Err(404)
        }
    }
}

/// nginx's `mime.types` for the common extensions; else `default_type`.
fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("html" | "htm" | "shtml") => "text/html",
        Some("css") => "text/css",
        Some("xml") => "text/xml",
        Some("txt") => "text/plain",
        Some("js") => "application/javascript",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("svg" | "svgz") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        Some("webp") => "image/webp",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        _ => "application/octet-stream",
    }
}

/// A single `bytes=` range of a file of `len` bytes: Some(Ok(start, end)) inclusive,
/// Some(Err) unsatisfiable, None: not one range nginx would honour (the whole file is sent).
fn byte_range(spec: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = spec.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if a.is_empty() {
        let n = num(b)?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        return Some(Ok((len.saturating_sub(n), len - 1)));
    }
    let start = num(a)?;
    let end = if b.is_empty() { u64::MAX } else { num(b)? };
    if end < start {
        return None;
    }
    if start >= len {
        return Some(Err(()));
    }
    Some(Ok((start, end.min(len - 1))))
}

/// The answer to a request: head and body (`Some(range)` of the file, sent after).
fn answer(site: &Site, req: &Request, https_port: bool) -> (Vec<u8>, Option<(Found, u64, u64)>) {
    let head_only = req.method == "HEAD";
    if https_port {
        let extra = Some("The plain HTTP request was sent to HTTPS port");
        return (error_answer(400, extra, false, false, req.http09), None);
    }
    if let Some(key_auth) = acme_key_authorization(req) {
        return (acme_answer(req, &key_auth), None);
    }
    let found = match lookup(site, &req.path) {
        Ok(f) => f,
        Err(code) => {
            let gz = match code {
                404 => NOT_FOUND_GZ,
                _ => FORBIDDEN_GZ,
            };
            if req.gzip {
                let status = format!("{code} {}", reason(code));
                let a = gzip_answer(&status, "text/html", "", "", req.keepalive, head_only, gz);
                return (a, None);
            }
            return (
                error_answer(code, None, req.keepalive, head_only, req.http09),
                None,
            );
        }
    };
    if req.method != "GET" && req.method != "HEAD" {
        return (
            error_answer(405, None, req.keepalive, false, req.http09),
            None,
        );
    }
    let len = found.len;
    if req.http09 {
        return (Vec::new(), Some((found, 0, len)));
    }
    let connection = if req.keepalive { "keep-alive" } else { "close" };
    let date = http_date(SystemTime::now());
    let mtime_s = found
        .mtime
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let common = |status: &str, length: u64| {
        format!(
            "HTTP/1.1 {status}\r\nServer: {SERVER}\r\nDate: {date}\r\nContent-Type: {}\r\n\
             Content-Length: {length}\r\nLast-Modified: {}\r\nConnection: {connection}\r\n\
             ETag: \"{mtime_s:x}-{len:x}\"\r\n",
            content_type(&found.name),
            http_date(found.mtime),
        )
    };
    if req.gzip && is_page(&found) {
        // Ranges do not apply to a compressed answer: nginx sends all of it.
        let a = gzip_answer(
            "200 OK",
            content_type(&found.name),
            &format!("Last-Modified: {}\r\n", http_date(found.mtime)),
            &format!("ETag: W/\"{mtime_s:x}-{len:x}\"\r\n"),
            req.keepalive,
            head_only,
            PAGE_GZ,
        );
        return (a, None);
    }
    let range = req.range.as_deref().and_then(|r| byte_range(r, len));
    let (head, start, end) = match range {
        Some(Ok((a, b))) => (
            format!(
                "{}Content-Range: bytes {a}-{b}/{len}\r\n\r\n",
                common("206 Partial Content", b - a + 1)
            ),
            a,
            b + 1,
        ),
        Some(Err(())) => {
            let page = error_page(416, None);
            let head = format!(
                "HTTP/1.1 416 {}\r\nServer: {SERVER}\r\nDate: {date}\r\n\
                 Content-Type: text/html\r\nContent-Length: {}\r\nConnection: {connection}\r\n\
                 Content-Range: bytes */{len}\r\n\r\n{}",
                reason(416),
                page.len(),
                if head_only { "" } else { page.as_str() },
            );
            return (head.into_bytes(), None);
        }
        None => (
            format!("{}Accept-Ranges: bytes\r\n\r\n", common("200 OK", len)),
            0,
            len,
        ),
    };
    if head_only {
        (head.into_bytes(), None)
    } else {
        (head.into_bytes(), Some((found, start, end)))
    }
}

/// Whether a found file is Debian's page (whose gzip form is known, [`PAGE_GZ`]); other files
/// go out uncompressed.
fn is_page(f: &Found) -> bool {
    match &f.body {
        FileBody::Builtin => true,
        FileBody::File(p) => {
            f.len == PAGE.len() as u64 && std::fs::read(p).is_ok_and(|b| b == PAGE)
        }
    }
}

/// Writes bytes `start..end` of a found file.
fn send_file(s: &mut TcpStream, f: &Found, start: u64, end: u64) -> std::io::Result<()> {
    match &f.body {
        FileBody::Builtin => {
            let (a, b) = (start as usize, (end as usize).min(PAGE.len()));
            s.write_all(&PAGE[a.min(b)..b])
        }
        FileBody::File(p) => {
            use std::io::{Seek, SeekFrom};
            let mut file = std::fs::File::open(p)?;
            file.seek(SeekFrom::Start(start))?;
            let copied = std::io::copy(&mut file.take(end - start), s)?;
            if copied < end - start {
                // The file shrank: the length is promised, so the connection cannot go on.
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One connection.

/// Reads more into `buf` until `deadline`; false: timed out, closed or failed.
fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    let _ = s.set_read_timeout(Some(left));
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Drops a request body from the front of `buf` (reading more until `deadline`); false: the
/// connection cannot go on.
fn skip_body(s: &mut TcpStream, buf: &mut Vec<u8>, body: Body, deadline: Instant) -> bool {
    match body {
        Body::None => true,
        Body::Length(mut n) => loop {
            let take = (buf.len() as u64).min(n) as usize;
            buf.drain(..take);
            n -= take as u64;
            if n == 0 {
                return true;
            }
            if !read_more(s, buf, deadline) {
                return false;
            }
        },
        Body::Chunked => {
            // size line, data, CRLF ... `0`, trailers, empty line.
            loop {
                let Some(eol) = buf.iter().position(|&c| c == b'\n') else {
                    if buf.len() > 4096 || !read_more(s, buf, deadline) {
                        return false;
                    }
                    continue;
                };
                let line = String::from_utf8_lossy(&buf[..eol]).into_owned();
                buf.drain(..=eol);
                let hex = line.trim().split(';').next().unwrap_or("").trim();
                let Ok(size) = u64::from_str_radix(hex, 16) else {
                    return false;
                };
                if size == 0 {
                    // Trailers until an empty line.
                    loop {
                        let Some(eol) = buf.iter().position(|&c| c == b'\n') else {
                            if buf.len() > 4096 || !read_more(s, buf, deadline) {
                                return false;
                            }
                            continue;
                        };
                        let empty = buf[..eol].trim_ascii().is_empty();
                        buf.drain(..=eol);
                        if empty {
                            return true;
                        }
                    }
                }
                if !skip_body(s, buf, Body::Length(size + 2), deadline) {
                    return false;
                }
            }
        }
    }
}

/// After an answer nginx closes with: its side shut, what the client still sends read and
/// dropped (so the answer is not lost to a reset) for a while.
fn lingering_close(s: &mut TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
    let end = Instant::now() + LINGERING_TIME;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let _ = s.set_read_timeout(Some(left.min(LINGERING_TIMEOUT)));
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// One connection: requests read, answered, kept alive, closed, nginx's way.
fn serve(mut s: TcpStream, site: &Site, timing: Timing, https_port: bool) {
    let _ = s.set_write_timeout(Some(timing.header.max(Duration::from_secs(10))));
    let mut buf = Vec::new();
    let mut deadline = Instant::now() + timing.header;
    loop {
        match parse(&buf) {
            Parsed::More => {
                if !read_more(&mut s, &mut buf, deadline) {
                    // client_header_timeout, or the client left: closed without an answer.
                    return;
                }
            }
            Parsed::Refused(r, http09) => {
                let _ = s.write_all(&refusal_answer(r, http09));
                lingering_close(&mut s);
                return;
            }
            Parsed::Request(req, len) => {
                buf.drain(..len);
                let (head, file) = answer(site, &req, https_port);
                let keepalive = req.keepalive && !https_port && !req.http09;
                let sent = s.write_all(&head).is_ok()
                    && file
                        .as_ref()
                        .is_none_or(|(f, a, b)| send_file(&mut s, f, *a, *b).is_ok());
                if !sent {
                    return;
                }
                if !keepalive {
                    lingering_close(&mut s);
                    return;
                }
                if !skip_body(&mut s, &mut buf, req.body, Instant::now() + timing.header) {
                    return;
                }
                if buf.is_empty() && !read_more(&mut s, &mut buf, Instant::now() + timing.keepalive)
                {
                    // keepalive_timeout, or the client left.
                    return;
                }
                deadline = Instant::now() + timing.header;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_request_lines_are_recognised_byte_by_byte() {
        let req = b"GET / HTTP/1.1\r\n";
        for n in 0..4 {
            assert_eq!(looks_like_http(&req[..n]), None, "{n} bytes");
        }
        assert_eq!(looks_like_http(&req[..4]), Some(true));
        assert_eq!(looks_like_http(b"WA\x06\x03"), Some(false));
        assert_eq!(looks_like_http(b"\x16\x03\x01"), Some(false));
        assert_eq!(looks_like_http(b"PO"), None);
        assert_eq!(looks_like_http(b"POST /x HTTP/1.0"), Some(true));
        assert_eq!(looks_like_http(b"GETX"), Some(false));
    }

    fn request(bytes: &[u8]) -> Request {
        match parse(bytes) {
            Parsed::Request(r, _) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_like_nginx() {
        let r = request(b"GET /a//b/../c?x=1 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((r.path.as_str(), r.keepalive), ("/a/c", true));
        assert!(!request(b"GET / HTTP/1.0\r\n\r\n").keepalive);
        assert!(request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keepalive);
        assert!(request(b"GET /\r\n").http09);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parsed::More);
        assert_eq!(parse(b"GE"), Parsed::More);
        let bad = |b: &[u8]| match parse(b) {
            Parsed::Refused(r, _) => r,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(b)),
        };
        assert_eq!(bad(b"get / HTTP/1.1\r\n"), Refusal::BadRequest);
        assert_eq!(bad(b"GET / HTTP/1.1\r\n\r\n"), Refusal::BadRequest);
        assert_eq!(bad(b"GET / HTTP/2.0\r\n\r\n"), Refusal::VersionNotSupported);
        assert_eq!(bad(b"OPTIONS * HTTP/1.1\r\n"), Refusal::BadRequest);
        assert_eq!(bad(b"GET /../x HTTP/1.1\r\n"), Refusal::BadRequest);
        assert_eq!(bad(b"\x16\x03\x01\x00"), Refusal::BadRequest);
        assert_eq!(bad(b"SSH-2.0-x\r\n"), Refusal::BadRequest);
        let long = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 9000]].concat();
        assert_eq!(bad(&long), Refusal::HeaderTooLarge);
        let uri = [b"GET /".as_slice(), &[b'a'; 9000]].concat();
        assert_eq!(bad(&uri), Refusal::UriTooLarge);
        assert_eq!(
            bad(b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Refusal::TraceNotAllowed
        );
    }

    #[test]
    fn error_pages_are_nginx_s() {
        // Content-Length values of nginx 1.22.1's pages, as measured (tests/src/tests/scanner.rs).
        assert_eq!(error_page(400, None).len(), 157);
        assert_eq!(error_page(404, None).len(), 153);
        assert_eq!(error_page(405, None).len(), 157);
        assert_eq!(error_page(414, None).len(), 177);
        assert_eq!(error_page(505, None).len(), 187);
        let big = error_page(400, Some("Request Header Or Cookie Too Large"));
        assert_eq!(big.len(), 233);
        let https = error_page(400, Some("The plain HTTP request was sent to HTTPS port"));
        assert_eq!(https.len(), 255);
    }

    #[test]
    fn dates_are_http_dates() {
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(1_796_498_400);
        assert_eq!(http_date(t), "Sat, 05 Dec 2026 19:20:00 GMT");
    }

    #[test]
    fn pending_acme_tokens_are_answered_and_nothing_else() {
        let site = Site::Builtin { mtime: UNIX_EPOCH };
        let get = |path: &str| {
            let req = request(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
            let (head, file) = answer(&site, &req, false);
            assert!(file.is_none());
            String::from_utf8(head).unwrap()
        };
        let token = "decoyUnitTest_tok-3n8Q";
        let key_auth = format!("{token}.thumbPRINT_-9");
        let path = format!("/.well-known/acme-challenge/{token}");
        assert!(
            get(&path).starts_with("HTTP/1.1 404 Not Found\r\n"),
            "not pending yet"
        );
        let offered = AcmeTokens::offer(vec![(token.into(), key_auth.clone())]).unwrap();
        let a = get(&path);
        assert!(
            a.starts_with("HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"),
            "{a}"
        );
        assert!(
            a.contains("\r\nContent-Type: application/octet-stream\r\n"),
            "{a}"
        );
        assert!(
            a.ends_with(&format!(
                "Content-Length: {}\r\nConnection: keep-alive\r\n\r\n{key_auth}",
                key_auth.len()
            )),
            "the body is exactly the key authorization: {a}"
        );
        // HEAD: the head alone; the same path reached another way is the same file.
        let req = request(format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let head = String::from_utf8(answer(&site, &req, false).0).unwrap();
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(get(&format!("/.well-known/x/../acme-challenge/{token}?q")).ends_with(&key_auth));
        // Unknown tokens, other paths, other methods, the TLS-port twin: as before.
        for p in [
            "/.well-known/acme-challenge/unknownToken",
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge",
            &format!("/.well-known/acme-challenge/{token}/"),
            &format!("/.well-known/acme-challenge/{token}x"),
            &format!("/.well-known/acme-challenge/{token}.x"),
            &format!("/.well-known/acme-challenge/{token}/../../../etc/passwd"),
            &format!("/.WELL-KNOWN/acme-challenge/{token}"),
            &format!("/{token}"),
        ] {
            assert!(get(p).starts_with("HTTP/1.1 404 Not Found\r\n"), "{p}");
        }
        let req = request(format!("POST {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        assert!(
            answer(&site, &req, false)
                .0
                .starts_with(b"HTTP/1.1 404 Not Found\r\n")
        );
        let req = request(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        assert!(
            answer(&site, &req, true)
                .0
                .starts_with(b"HTTP/1.1 400 Bad Request\r\n")
        );
        // Malformed tokens are never offered.
        for (t, k) in [
            ("../x", "../x.y"),
            ("a/b", "a/b.c"),
            ("", ".x"),
            ("ab", "ab"),
            ("ab", "cd.x"),
        ] {
            assert!(
                AcmeTokens::offer(vec![(t.into(), k.into())]).is_err(),
                "{t:?} {k:?}"
            );
        }
        drop(offered);
        assert!(
            get(&path).starts_with("HTTP/1.1 404 Not Found\r\n"),
            "taken back"
        );
    }

    #[test]
    fn builtin_serves_debian_s_page() {
        let site = Site::Builtin { mtime: UNIX_EPOCH };
        let req = request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let (head, file) = answer(&site, &req, false);
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"),
            "{head}"
        );
        assert!(head.contains("Content-Length: 615\r\n"), "{head}");
        assert!(file.is_some());
        assert!(PAGE.starts_with(b"<!DOCTYPE html>") && PAGE.len() == 615);
        let req = request(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            answer(&site, &req, false)
                .0
                .starts_with(b"HTTP/1.1 404 Not Found\r\n")
        );
        let req = request(b"PUT / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            answer(&site, &req, false)
                .0
                .starts_with(b"HTTP/1.1 405 Not Allowed\r\n")
        );
    }
}
