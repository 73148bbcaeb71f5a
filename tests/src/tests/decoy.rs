//! The anti-probing decoy, probed with real clients: curl and openssl see an ordinary web site
//! where a censor's probe does not speak the port's protocol, and real clients' bytes still
//! reach the upstream byte-exact (every engine):
//!
//! - `decoy = "builtin"` on a plain port: `curl http://relay/` gets the built-in page (200,
//!   Debian's nginx welcome page), a
//!   WhatsApp-like stream (`WA` + bytes) reaches the upstream;
//! - on a TLS port: `curl -k https://relay/` gets the page inside TLS, `curl http://` (plain
//!   HTTP to the TLS port) gets nginx's "plain HTTP request was sent to HTTPS port", scanner garbage gets `400 Bad Request`, and
//!   `openssl s_client -servername not-allowed.example` sending an HTTP request gets the page;
//!   a WhatsApp-like stream inside TLS reaches the upstream;
//! - `decoy = "HOST:PORT"`: the probe gets that site's page (a local nginx) instead;
//! - every probe is counted in `decoyed`, never a real client;
//! - clients trickling a request head cannot hold the builtin site: each is cut at
//!   `timeouts.decoy_header_ms`, a total deadline, and a fresh client is then served.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use sluice_tests::peers::{Nginx, SClient};
use sluice_tests::servers::TagEchoServer;
use sluice_tests::{HUNG, Host, Sluice, client, init, require_program, run_with_timeout};

use super::engine_ok;

/// curl `url` (`-k`: the relay's certificate is generated); returns (exit ok, body).
fn curl(url: &str) -> (bool, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "--max-time", "10", url]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    (out.status.success(), out.stdout)
}

/// Sends `bytes` on a new connection and reads until the relay closes (at most [`HUNG`]).
fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = client::connect(addr);
    s.set_read_timeout(Some(HUNG)).unwrap();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

/// A WhatsApp-like client on a plain port: the upstream's tag, then its own bytes echoed.
fn real_client_plain(addr: SocketAddr) {
    let mut s = client::connect(addr);
    s.set_read_timeout(Some(HUNG)).unwrap();
    let msg = b"WA\x06\x03 chat stream bytes";
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; 3 + msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got[..3], b"up\n", "a real client reached the upstream");
    assert_eq!(&got[3..], msg, "byte-exact");
}

fn probes_see_a_web_site(engine: &str) {
    if !engine_ok(engine)
        || !require_program("curl")
        || !require_program("openssl")
        || !require_program("nginx")
    {
        return;
    }
    init();
    let host = Host::new();
    let upstream = TagEchoServer::start(host.addr(), b"up\n");
    let site = Nginx::start(Host::new().addr());
    std::fs::write(
        site.root().join("index.html"),
        "the decoy site of this test\n",
    )
    .unwrap();
    let (plain, tls, to_site) = (host.addr(), host.addr(), host.addr());
    let text = format!(
        "[[listen]]\nname = \"plain\"\nbind = \"{plain}\"\nupstream = [\"{up}\"]\n\
         decoy = \"builtin\"\n\n\
         [[listen]]\nname = \"tls\"\nbind = \"{tls}\"\nupstream = [\"{up}\"]\n\
         decoy = \"builtin\"\n[listen.tls]\ndns_names = [\"relay.test\"]\n\n\
         [[listen]]\nname = \"site\"\nbind = \"{to_site}\"\nupstream = [\"{up}\"]\n\
         decoy = \"{site}\"\n",
        up = upstream.addr(),
        site = site.addr(),
    );
    let relay = Sluice::run_config_text(&text, vec![plain, tls, to_site])
        .engine(engine)
        .workers(2)
        .start();
    let mut probes = 0;

    // Plain port: curl gets the built-in page; a real client its upstream.
    let (ok, body) = curl(&format!("http://{plain}/"));
    assert!(
        ok && body.contains("<title>Welcome to nginx!</title>"),
        "{ok} {body}"
    );
    probes += 1;
    let (ok, body) = curl(&format!("http://{plain}/admin"));
    assert!(ok && body.contains("404 Not Found"), "{ok} {body}");
    probes += 1;
    real_client_plain(plain);
    // The first bytes, read to tell a probe from a client, are relayed bytes too (they were
    // left out of the byte counters).
    let up = relay.counter("bytes_client_to_upstream").unwrap_or(0);
    assert!(up >= 22, "{up} bytes counted client to upstream");

    // TLS port: the page inside TLS, plain HTTP and garbage answered like a web server.
    let (ok, body) = curl(&format!("https://{tls}/"));
    assert!(
        ok && body.contains("<title>Welcome to nginx!</title>"),
        "https: {ok} {body}"
    );
    probes += 1;
    let (ok, body) = curl(&format!("http://{tls}/"));
    assert!(
        ok && body.contains("The plain HTTP request was sent to HTTPS port"),
        "http to the TLS port: {ok} {body}"
    );
    probes += 1;
    let got = raw(tls, b"\x00\x01\x02 scanner garbage\r\n\r\n");
    assert!(
        got.starts_with(b"HTTP/1.1 400 Bad Request\r\n"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    probes += 1;
    let mut s = SClient::start(&[
        "-connect",
        &tls.to_string(),
        "-servername",
        "not-allowed.example",
    ]);
    let page = s.exchange(b"GET / HTTP/1.0\r\n\r\n".to_vec(), usize::MAX, HUNG);
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains("<title>Welcome to nginx!</title>"),
        "openssl: {page}\n{}",
        s.stderr()
    );
    probes += 1;
    // A real client inside TLS reaches its upstream.
    let mut s = SClient::start(&["-connect", &tls.to_string()]);
    let msg = b"WA\x06\x03 inside TLS".to_vec();
    let back = s.exchange(msg.clone(), 3 + msg.len(), HUNG);
    assert_eq!(&back[..3.min(back.len())], b"up\n", "{}", s.stderr());
    assert_eq!(&back[3..], &msg[..]);

    // A decoy site: the probe gets that site's page.
    let (ok, body) = curl(&format!("http://{to_site}/"));
    assert!(
        ok && body.contains("the decoy site of this test"),
        "{ok} {body}"
    );
    probes += 1;
    real_client_plain(to_site);

    assert_eq!(relay.counter("decoyed"), Some(probes), "{}", relay.status());
}
engines!(probes_see_a_web_site);

/// Clients trickling a request head a line every 250 ms, more of them than the builtin site
/// serves at once (64), are each cut at `timeouts.decoy_header_ms` (a total deadline for the
/// head, as nginx's `client_header_timeout`, not renewed by each byte), and then a fresh client
/// is served (issue 17, item 7).
fn trickling_clients_are_cut(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    init();
    const TRICKLERS: usize = 70;
    const LINES: usize = 40;
    let host = Host::new();
    let upstream = TagEchoServer::start(host.addr(), b"up\n");
    let plain = host.addr();
    let text = format!(
        "[timeouts]\ndecoy_header_ms = 2000\n\n\
         [[listen]]\nname = \"plain\"\nbind = \"{plain}\"\nupstream = [\"{up}\"]\n\
         decoy = \"builtin\"\n",
        up = upstream.addr(),
    );
    let relay = Sluice::run_config_text(&text, vec![plain])
        .engine(engine)
        .workers(1)
        .start();
    let cut: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..TRICKLERS)
            .map(|_| {
                scope.spawn(move || {
                    let mut s = client::connect(plain);
                    s.set_read_timeout(Some(Duration::from_millis(250)))
                        .unwrap();
                    if s.write_all(b"GET / HTTP/1.1\r\nHost: relay.test\r\n")
                        .is_err()
                    {
                        return true;
                    }
                    let mut buf = [0u8; 1024];
                    for _ in 0..LINES {
                        match s.read(&mut buf) {
                            Ok(0) => return true,
                            Ok(_) => return false, // an answer to an unfinished head
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return true,
                        }
                        if s.write_all(b"X-Trickle: 1\r\n").is_err() {
                            return true;
                        }
                    }
                    false
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let held = cut.iter().filter(|c| !**c).count();
    assert_eq!(
        held, 0,
        "{engine}: {held} of {TRICKLERS} trickling clients held the decoy for all {LINES} lines"
    );
    let got = raw(
        plain,
        b"GET / HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n",
    );
    assert!(
        got.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{engine}: a fresh client after the tricklers: {:?}\n{}",
        String::from_utf8_lossy(&got),
        relay.status()
    );
}
engines!(trickling_clients_are_cut);
