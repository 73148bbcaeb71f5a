//! The anti-probing decoy: a connection whose first bytes are not what its port expects — an
//! HTTP request on a plain or TLS-terminated port, a ClientHello for a name outside a listener's
//! allowlist, anything but a TLS handshake on a TLS port — is relayed to the listener's decoy
//! (`decoy = "builtin"` or `"HOST:PORT"`) instead of being closed, so a censor's probe finds an
//! ordinary web site. Real clients never look like that: WhatsApp's chat stream starts with its
//! own prologue (`WA`), Signal's with a ClientHello for one of its hosts.
//!
//! `builtin` is a small HTTP server of the supervisor's own on 127.0.0.1 (a thread; connections
//! relayed to it like to any upstream, so on a TLS port the page goes out inside the TLS
//! session): an ordinary static page for `GET /`, 404 for other paths, 400 for what is not HTTP
//! — what a default nginx answers. Nothing about the request is logged or kept.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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

/// Bytes that settle [`looks_like_http`] whatever they are (the longest method and its space).
pub const SNIFF_MAX: usize = 8;

/// The page `builtin` serves at `/`.
pub const PAGE: &str = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<title>Welcome</title>\n<style>body{font-family:sans-serif;max-width:40em;margin:4em auto;\
color:#333}</style>\n</head>\n<body>\n<h1>Welcome</h1>\n<p>This server is up. There is nothing \
to see here yet.</p>\n</body>\n</html>\n";

fn response(status: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nServer: nginx\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// What `builtin` answers to a request head (the bytes up to the blank line, or what came).
pub fn answer(head: &[u8]) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.trim_end().split(' ');
    let (method, target, version) = (words.next(), words.next(), words.next());
    match (method, target, version) {
        (Some(m @ ("GET" | "HEAD")), Some(t), Some(v)) if v.starts_with("HTTP/1.") => {
            let head_only = m == "HEAD";
            if t == "/" || t == "/index.html" {
                response("200 OK", PAGE, head_only)
            } else {
                response(
                    "404 Not Found",
                    "<html><body><h1>404 Not Found</h1></body></html>\n",
                    head_only,
                )
            }
        }
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => response(
            "405 Not Allowed",
            "<html><body><h1>405 Not Allowed</h1></body></html>\n",
            false,
        ),
        _ => response(
            "400 Bad Request",
            "<html><body><h1>400 Bad Request</h1></body></html>\n",
            false,
        ),
    }
}

/// Connections the built-in site serves at once; more wait in the listen backlog.
const MAX_AT_ONCE: usize = 64;
/// How long it waits for a request head, and for the client to leave after the answer.
const WAIT: Duration = Duration::from_secs(2);

/// Binds the built-in site on 127.0.0.1 (an ephemeral port).
pub fn bind() -> std::io::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
}

/// Serves the built-in site on its own thread (one short-lived thread per connection, at most
/// [`MAX_AT_ONCE`]).
pub fn spawn(listener: TcpListener) -> std::io::Result<()> {
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("decoy".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                while busy.load(Ordering::Relaxed) >= MAX_AT_ONCE {
                    std::thread::sleep(Duration::from_millis(10));
                }
                busy.fetch_add(1, Ordering::Relaxed);
                let done = busy.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("decoy-conn".into())
                        .spawn(move || {
                            serve(stream);
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

/// One connection: reads a request head (at most 8 KiB, [`WAIT`]), answers, shuts its side,
/// and reads until the client leaves (so closing does not reset the answer away).
fn serve(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(WAIT));
    let _ = s.set_write_timeout(Some(WAIT));
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if looks_like_http(&head) == Some(false) {
            break;
        }
    }
    let _ = s.write_all(&answer(&head));
    let _ = s.shutdown(Shutdown::Write);
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
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

    #[test]
    fn answers_like_a_default_web_server() {
        let ok = String::from_utf8(answer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")).unwrap();
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with(PAGE),
            "{ok}"
        );
        let head = String::from_utf8(answer(b"HEAD / HTTP/1.1\r\n\r\n")).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK") && !head.contains("<html"));
        assert!(answer(b"GET /admin HTTP/1.1\r\n\r\n").starts_with(b"HTTP/1.1 404"));
        assert!(answer(b"\x00\x01garbage").starts_with(b"HTTP/1.1 400"));
        assert!(answer(b"POST / HTTP/1.1\r\n\r\n").starts_with(b"HTTP/1.1 405"));
    }
}
