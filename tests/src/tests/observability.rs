//! Observability: `sluicectl stats` histograms (counts, percentiles bracketing an injected
//! upstream delay, kept across a worker's death and SIGHUP, `--reset`), Prometheus text that
//! `promtool check metrics` accepts during traffic, the stats page rendered by headless
//! Chromium, and no client address in any log line (at trace level), metric, stats document
//! or file the daemon wrote.
//!
//! Clients of the address test connect from 127.0.0.2 and 127.0.0.3: no other test uses those
//! source addresses (test hosts are 127.1xx.y.z, see `Host`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use sluice_tests::servers::EchoServer;
use sluice_tests::{
    HUNG, Host, Sluice, TempDir, client, init, require_program, run_with_input, run_with_timeout,
    sys, wait_until,
};

/// What the slow upstream waits before it answers.
const DELAY: Duration = Duration::from_millis(20);

/// An upstream that reads one line, sleeps [`DELAY`], answers `pong\n` and closes after the
/// client's FIN. One thread per connection (short-lived); stops when dropped.
struct SlowServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SlowServer {
    fn start(addr: SocketAddr) -> SlowServer {
        let l = TcpListener::bind(addr).expect("bind the slow upstream");
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        thread::spawn(move || {
                            let _ = serve_slow(s);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        SlowServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

fn serve_slow(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(HUNG))?;
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.contains(&b'\n') {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        got.extend_from_slice(&buf[..n]);
    }
    thread::sleep(DELAY);
    s.write_all(b"pong\n")?;
    // Wait for the client's FIN, then close.
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

impl Drop for SlowServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request/response exchange on a new connection through `relay`, from `source`.
fn exchange(relay: SocketAddr, source: Option<IpAddr>) -> Result<(), String> {
    let mut c = client::try_connect(relay, source).map_err(|e| format!("connect: {e}"))?;
    c.write_all(b"ping\n").map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 16];
    while !reply.ends_with(b"\n") {
        let n = c.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("closed after {reply:?}"));
        }
        reply.extend_from_slice(&buf[..n]);
    }
    if reply != b"pong\n" {
        return Err(format!("reply {reply:?}"));
    }
    c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    while c.read(&mut buf).map_err(|e| format!("read to end: {e}"))? > 0 {}
    Ok(())
}

/// `n` exchanges over `threads` client threads.
fn exchanges(relay: SocketAddr, n: usize, threads: usize, sources: &[IpAddr]) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let sources = sources.to_vec();
            thread::spawn(move || {
                for i in (t..n).step_by(threads) {
                    let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
                    if let Err(e) = exchange(relay, source) {
                        return Err(format!("exchange {i}: {e}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread").unwrap();
    }
}

/// `sluicectl stats --json`, parsed.
fn stats(relay: &Sluice) -> serde_json::Value {
    let out = relay.ctl(&["stats", "--json"]);
    assert!(out.status.success(), "sluicectl stats: {}", out.text());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

/// The summary of histogram `name` of the first listener.
fn histogram(stats: &serde_json::Value, name: &str) -> serde_json::Value {
    stats["listeners"][0]["histograms"]
        .as_array()
        .expect("histograms")
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no histogram {name} in {stats}"))
        .clone()
}

fn count(stats: &serde_json::Value, name: &str) -> u64 {
    histogram(stats, name)["count"].as_u64().expect("count")
}

/// Waits (bounded) until every histogram of the first listener counts `n`.
fn wait_counts(relay: &Sluice, n: u64) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(HUNG, || {
        last = stats(relay);
        ["connect", "first_byte", "duration"]
            .iter()
            .all(|h| count(&last, h) == n)
    });
    assert!(ok, "histogram counts never reached {n}: {last:#}");
    last
}

#[test]
fn stats_count_every_connection_and_bracket_the_upstream_delay() {
    init();
    let up = SlowServer::start(Host::new().addr());
    let listen = Host::new().addr();
    let relay = Sluice::forward(listen, up.addr).workers(2).start();
    const N: usize = 1000;
    exchanges(listen, N, 8, &[]);
    let s = wait_counts(&relay, N as u64);

    let delay_ms = DELAY.as_secs_f64() * 1000.0;
    for name in ["first_byte", "duration"] {
        let h = histogram(&s, name);
        assert_eq!(h["unit"], "ms");
        let p = |k: &str| h[k].as_f64().unwrap();
        // Every exchange waited DELAY for its answer, so every percentile is at least DELAY
        // (hdrhistogram reports a bucket's highest value: never below the true one) ...
        for k in ["p50", "p90", "p99", "p999", "p9999", "max"] {
            assert!(
                p(k) >= delay_ms,
                "{name} {k} = {} ms < {delay_ms} ms: {h}",
                p(k)
            );
        }
        // ... and percentiles are ordered and finite (an upper bracket that is not a speed
        // assertion: nothing took longer than the test's own hang limit).
        assert!(
            p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("max"),
            "{h}"
        );
        assert!(p("max") < HUNG.as_secs_f64() * 1000.0, "{h}");
    }
    // The connect happens before the upstream's delay: it is not part of it.
    assert_eq!(count(&s, "connect"), N as u64);
    for name in ["bytes_client_to_upstream", "bytes_upstream_to_client"] {
        let h = histogram(&s, name);
        assert_eq!(count(&s, name), N as u64, "{h}");
        assert_eq!(h["unit"], "bytes");
        assert_eq!(h["p50"].as_f64(), Some(5.0), "ping/pong are 5 bytes: {h}");
        assert_eq!(h["max"].as_f64(), Some(5.0), "{h}");
    }
    // The table form names every histogram.
    let table = relay.ctl(&["stats"]);
    assert!(table.status.success(), "{}", table.text());
    for name in ["connect", "first_byte", "duration", "p99.99", "forward"] {
        assert!(
            table.stdout.contains(name),
            "no {name} in:\n{}",
            table.stdout
        );
    }

    // Histograms survive a worker's death and a reload (SIGHUP).
    let victim = relay.worker_pids()[0];
    assert!(
        sys::kill(victim, libc::SIGKILL),
        "cannot kill worker {victim}"
    );
    assert!(
        wait_until(HUNG, || {
            let w = relay.worker_pids();
            w.len() == 2 && !w.contains(&victim)
        }),
        "the killed worker was not replaced"
    );
    assert!(sys::kill(relay.pid(), libc::SIGHUP));
    exchanges(listen, 10, 2, &[]);
    wait_counts(&relay, N as u64 + 10);

    // --reset clears them; new connections count from zero.
    let out = relay.ctl(&["stats", "--reset", "--json"]);
    assert!(out.status.success(), "{}", out.text());
    let before: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        count(&before, "duration"),
        N as u64 + 10,
        "--reset prints what it cleared"
    );
    assert_eq!(count(&stats(&relay), "duration"), 0);
    exchanges(listen, 3, 1, &[]);
    wait_counts(&relay, 3);
    relay.stop();
}

/// Every engine records: counts and the delay bracket on a few exchanges.
fn every_engine_records(engine: &str) {
    init();
    let up = SlowServer::start(Host::new().addr());
    let listen = Host::new().addr();
    let relay = Sluice::forward(listen, up.addr)
        .engine(engine)
        .workers(1)
        .start();
    exchanges(listen, 20, 2, &[]);
    let s = wait_counts(&relay, 20);
    let fb = histogram(&s, "first_byte");
    assert!(
        fb["p50"].as_f64().unwrap() >= DELAY.as_secs_f64() * 1000.0,
        "{engine}: {fb}"
    );
    assert_eq!(
        histogram(&s, "bytes_upstream_to_client")["max"].as_f64(),
        Some(5.0),
        "{engine}: {s}"
    );
    relay.stop();
}
engines!(every_engine_records);

/// GET `path` from the metrics listener; returns (status line, headers, body).
fn http_get(addr: SocketAddr, path: &str, accept: &str) -> (String, String, String) {
    let mut s = client::connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the HTTP answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

#[test]
fn promtool_accepts_a_scrape_during_traffic() {
    init();
    if !require_program("promtool") {
        return;
    }
    let up = EchoServer::start(Host::new().addr());
    let listen = Host::new().addr();
    let metrics = Host::new().addr();
    let relay = Sluice::forward(listen, up.addr())
        .workers(2)
        .metrics(metrics)
        .start();
    // Traffic while scraping: held connections plus a stream of short ones.
    let held: Vec<TcpStream> = (0..5).map(|_| client::connect(listen)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let traffic = thread::spawn(move || {
        let mut n = 0u64;
        while !st.load(Ordering::Relaxed) {
            let c = client::connect(listen);
            client::echo_many(&[c], n, 1000, true, HUNG).expect("echo through the relay");
            n += 1;
        }
        n
    });
    assert!(
        wait_until(HUNG, || relay.counter("closed").unwrap_or(0) >= 20),
        "no traffic"
    );
    let mut scrapes = Vec::new();
    for _ in 0..3 {
        let (status, headers, body) = http_get(metrics, "/metrics", "text/plain");
        assert!(status.contains("200"), "{status}");
        assert!(headers.contains("text/plain; version=0.0.4"), "{headers}");
        scrapes.push(body);
        thread::sleep(Duration::from_millis(600));
    }
    stop.store(true, Ordering::Relaxed);
    let relayed = traffic.join().unwrap();
    assert!(relayed >= 20);
    // One more once only the held connections remain (the last of the traffic may still be
    // closing: wait, bounded).
    assert!(
        wait_until(HUNG, || relay.counter("active") == Some(5)),
        "the short connections did not close"
    );
    scrapes.push(http_get(metrics, "/metrics", "text/plain").2);
    for body in &scrapes {
        let mut cmd = Command::new("promtool");
        cmd.args(["check", "metrics"]);
        let out = run_with_input(&mut cmd, body.as_bytes(), HUNG);
        assert!(
            out.status.success(),
            "promtool check metrics: {}\n--- scrape ---\n{body}",
            out.text()
        );
    }
    let last = scrapes.last().unwrap();
    let upstream = format!(
        "sluice_upstream_up{{listener=\"forward\",upstream=\"{}\"}} 1\n",
        up.addr()
    );
    for needle in [
        "# TYPE sluice_build_info gauge",
        "sluice_build_info{version=\"",
        "# TYPE sluice_connections_accepted_total counter",
        "# TYPE sluice_connections_active gauge",
        "sluice_connections_active{listener=\"forward\"} 5\n",
        "# TYPE sluice_connections_capacity gauge",
        "# TYPE sluice_connections_refused_total counter",
        "sluice_connections_refused_total{reason=\"full\"} 0\n",
        "# TYPE sluice_connections_aborted_total counter",
        "# TYPE sluice_relayed_bytes_total counter",
        "sluice_relayed_bytes_total{direction=\"upstream_to_client\",engine=\"",
        "# TYPE sluice_fast_path_entries gauge",
        "# TYPE sluice_fast_path_audited_pairs gauge",
        "# TYPE sluice_upstream_up gauge",
        &upstream,
        "# TYPE sluice_upstream_first_byte_seconds histogram",
        "sluice_connection_duration_seconds_bucket{le=\"+Inf\",listener=\"forward\"}",
        "sluice_connection_relayed_bytes_count{direction=\"upstream_to_client\",listener=\"forward\"}",
    ] {
        assert!(last.contains(needle), "no `{needle}` in:\n{last}");
    }
    // One family per thing measured: every refusal reason in one family, no old names.
    let lines = |prefix: &str| last.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(
        lines("sluice_connections_refused_total{reason="),
        10,
        "{last}"
    );
    assert_eq!(
        lines("sluice_connections_aborted_total{reason="),
        6,
        "{last}"
    );
    for old in [
        "sluice_accepted_total",
        "sluice_active ",
        "sluice_engine_bytes",
        "sluice_refused_",
    ] {
        assert!(!last.contains(old), "old name `{old}` in:\n{last}");
    }
    // Every family says what it is.
    for help in last.lines().filter_map(|l| l.strip_prefix("# HELP ")) {
        let (name, text) = help.split_once(' ').unwrap_or((help, ""));
        assert!(
            text.len() >= 30,
            "HELP of {name} explains nothing: {text:?}"
        );
    }
    // OpenMetrics for a scraper that asks for it.
    let (_, headers, body) = http_get(metrics, "/metrics", "application/openmetrics-text");
    assert!(
        headers.contains("application/openmetrics-text"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    // Robustness: unknown paths, other methods, oversized requests.
    assert!(http_get(metrics, "/nope", "*/*").0.contains("404"));
    let mut s = client::connect(metrics);
    let _ = s.write_all(format!("GET /{} HTTP/1.1\r\n", "a".repeat(20_000)).as_bytes());
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    drop(held);
    relay.stop();
}

/// Where screenshots go: `target/` of the workspace.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

#[test]
fn headless_chromium_shows_live_numbers_on_the_stats_page() {
    init();
    if !require_program("chromium") {
        return;
    }
    let up = SlowServer::start(Host::new().addr());
    let listen = Host::new().addr();
    let metrics = Host::new().addr();
    let relay = Sluice::forward(listen, up.addr)
        .workers(2)
        .metrics(metrics)
        .start();
    const N: usize = 17;
    exchanges(listen, N, 4, &[]);
    wait_counts(&relay, N as u64);
    // Three more held open: the page must show 3 active connections and 20 accepted.
    let held: Vec<TcpStream> = (0..3).map(|_| client::connect(listen)).collect();
    assert!(wait_until(HUNG, || relay.counter("active") == Some(3)));

    let profile = TempDir::new();
    let url = format!("http://{metrics}/");
    let chromium = |extra: &[String]| {
        let mut cmd = sluice_tests::headless_chromium(profile.path(), 4000);
        cmd.arg("--window-size=1200,900").args(extra).arg(&url);
        run_with_timeout(&mut cmd, Duration::from_secs(60))
    };
    let text_of = |dom: &str, id: &str| -> Option<String> {
        let at = dom.find(&format!("id=\"{id}\""))?;
        let start = at + dom[at..].find('>')? + 1;
        Some(dom[start..].split('<').next()?.to_string())
    };
    // A polling loop, bounded: the page fills its numbers from the first /stats.json.
    let mut dom = String::new();
    let rendered = (0..5).any(|_| {
        let out = chromium(&["--dump-dom".to_string()]);
        dom = out.stdout;
        text_of(&dom, "active").as_deref() == Some("3")
            && text_of(&dom, "accepted").as_deref() == Some(&(N + 3).to_string())
            && text_of(&dom, "relayed").as_deref() == Some(&N.to_string())
    });
    assert!(
        rendered,
        "the stats page did not show 3 active / {} accepted:\n{dom}",
        N + 3
    );
    assert_eq!(text_of(&dom, "status").as_deref(), Some("live"));
    assert!(
        dom.contains("<td>first_byte</td>"),
        "no histogram table:\n{dom}"
    );
    // The present: the first-byte p99 of the last minute (the exchanges were in it), and a
    // text alternative for each chart.
    assert_ne!(text_of(&dom, "fb99").as_deref(), Some("–"), "{dom}");
    let lat = text_of(&dom, "c-lat-alt").unwrap_or_default();
    assert!(
        lat.starts_with("Over the last ")
            && lat.contains(&format!(
                " s, {N} connections: time to first upstream byte p50 "
            )),
        "{lat}"
    );
    for id in ["c-active-alt", "c-tput-alt"] {
        let alt = text_of(&dom, id).unwrap_or_default();
        assert!(alt.len() > 30 && alt != "–", "{id}: {alt:?}");
    }
    assert!(
        text_of(&dom, "c-active-alt").is_some_and(|t| t.starts_with("Active connections now 3;")),
        "{dom}"
    );
    // Per-upstream health.
    assert_eq!(text_of(&dom, "ups").as_deref(), Some("1 / 1"), "{dom}");
    assert!(
        dom.contains(&format!(
            "<td>forward</td><td>{}</td><td class=\"up\">up</td>",
            up.addr
        )),
        "no upstream row:\n{dom}"
    );
    // The refused card counts every reason: a client on the deny list (not one of the five
    // reasons the card once added up).
    let denied: IpAddr = "127.0.0.4".parse().unwrap();
    let out = relay.ctl(&["deny", "add", "127.0.0.4/32"]);
    assert!(out.status.success(), "{}", out.text());
    if let Ok(mut c) = client::try_connect(listen, Some(denied)) {
        let _ = c.set_read_timeout(Some(HUNG));
        let _ = c.read_to_end(&mut Vec::new());
    }
    assert!(wait_until(HUNG, || relay.counter("refused_denied") == Some(1)));
    let refused = (0..5).any(|_| {
        dom = chromium(&["--dump-dom".to_string()]).stdout;
        text_of(&dom, "refused").as_deref() == Some("1")
    });
    assert!(
        refused,
        "the refused card does not count the denied client:\n{dom}"
    );
    assert_eq!(text_of(&dom, "refused-why").as_deref(), Some("denied 1"));

    let shot = target_dir().join("observability-stats-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&[format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot at {} ({e}): {}", shot.display(), out.text()));
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    drop(held);
    relay.stop();
}

/// Occurrences of `ip` in `text` that are the whole address (not a prefix of 127.0.0.20).
fn mentions(text: &str, ip: &str) -> bool {
    text.match_indices(ip).any(|(i, _)| {
        let after = text[i + ip.len()..].chars().next();
        let before = text[..i].chars().next_back();
        !after.is_some_and(|c| c.is_ascii_digit()) && !before.is_some_and(|c| c.is_ascii_digit())
    })
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

/// Regular files (not memfds, sockets or pipes) process `pid` has open.
fn open_files(pid: u32) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|p| p.is_absolute() && p.is_file() && !p.starts_with("/memfd:"))
        .collect()
}

#[test]
fn no_client_address_in_logs_metrics_stats_or_files() {
    init();
    // The check itself can fail: it finds an address, and only a whole one.
    assert!(mentions("peer 127.0.0.2:4000 reset", "127.0.0.2"));
    assert!(!mentions("127.0.0.25 127.0.0.31", "127.0.0.2"));
    let sources: Vec<IpAddr> = [2, 3]
        .map(|d| IpAddr::V4(Ipv4Addr::new(127, 0, 0, d)))
        .to_vec();
    let up = SlowServer::start(Host::new().addr());
    let listen = Host::new().addr();
    let metrics = Host::new().addr();
    let relay = Sluice::forward(listen, up.addr)
        .workers(2)
        .metrics(metrics)
        .env("SLUICE_LOG", "trace")
        .env("RUST_LOG", "trace")
        .start();
    exchanges(listen, 40, 4, &sources);
    wait_counts(&relay, 40);
    // Also connections that end badly: a client that resets mid-exchange, one that leaves
    // before the answer.
    for src in &sources {
        let c = client::try_connect(listen, Some(*src)).unwrap();
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        let mut c = client::try_connect(listen, Some(*src)).unwrap();
        c.write_all(b"ping\n").unwrap();
        drop(c);
    }
    assert!(
        wait_until(HUNG, || relay.counter("active") == Some(0)),
        "connections still open"
    );

    let mut documents: Vec<(String, String)> = vec![
        ("/metrics".into(), http_get(metrics, "/metrics", "*/*").2),
        (
            "/metrics (OpenMetrics)".into(),
            http_get(metrics, "/metrics", "application/openmetrics-text").2,
        ),
        (
            "/stats.json".into(),
            http_get(metrics, "/stats.json", "*/*").2,
        ),
        ("/".into(), http_get(metrics, "/", "*/*").2),
        ("sluicectl stats".into(), relay.ctl(&["stats"]).text()),
        (
            "sluicectl stats --json".into(),
            relay.ctl(&["stats", "--json"]).text(),
        ),
        (
            "sluicectl status --json".into(),
            relay.ctl(&["status", "--json"]).text(),
        ),
    ];
    let mut files: Vec<PathBuf> = files_under(relay.dir());
    for pid in std::iter::once(relay.pid()).chain(relay.worker_pids()) {
        files.extend(open_files(pid));
    }
    files.sort();
    files.dedup();
    for f in &files {
        if let Ok(bytes) = std::fs::read(f) {
            documents.push((
                f.display().to_string(),
                String::from_utf8_lossy(&bytes).into(),
            ));
        }
    }
    // The log again once the daemon has stopped (its last lines included).
    let (_, log) = relay.stop();
    assert!(!log.is_empty(), "trace logging produced nothing at all");
    documents.push(("the daemon's stderr (trace)".into(), log));
    assert!(
        documents.iter().any(|(n, _)| n.ends_with("stderr.log")),
        "the daemon's log file was not checked: {files:?}"
    );
    for (name, text) in &documents {
        for ip in ["127.0.0.2", "127.0.0.3"] {
            assert!(
                !mentions(text, ip),
                "{name} mentions the client address {ip}:\n{text}"
            );
        }
    }
}

#[test]
fn metrics_port_in_use_or_public_without_consent_fails_the_start() {
    init();
    let up = Host::new().addr();
    let taken = TcpListener::bind(Host::new().addr()).unwrap();
    let addr = taken.local_addr().unwrap();
    let out = Sluice::forward(Host::new().addr(), up)
        .metrics(addr)
        .run_to_exit(HUNG);
    assert_eq!(out.status.code(), Some(1), "{}", out.text());
    assert!(
        out.stderr.contains(&format!("cannot listen on {addr}")),
        "{}",
        out.text()
    );
    let out = Sluice::forward(Host::new().addr(), up)
        .arg("--metrics")
        .arg("0.0.0.0:0")
        .run_to_exit(HUNG);
    assert_eq!(out.status.code(), Some(2), "{}", out.text());
    assert!(out.stderr.contains("metrics.listen"), "{}", out.text());
    assert!(out.stderr.contains("--metrics-public"), "{}", out.text());
}
