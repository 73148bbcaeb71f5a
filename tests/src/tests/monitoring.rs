//! Monitoring a fleet, proven against a real Prometheus (the Debian package): it scrapes a
//! running relay under load, plus a second target that is down, and every PromQL expression of
//! `dist/grafana/sluice.json` (panels and template variables) and of
//! `dist/prometheus/sluice-rules.yml` is evaluated through its HTTP API (`/api/v1/query`) and
//! must return data. The expressions are read from those files, so the test cannot drift
//! from them. The relay is put in every state an alert is about, so each alert expression
//! returns data because its condition holds, not because its threshold was taken off: a target
//! down, capacity above 90 % (of the relay and of a listener's own limit), an upstream that
//! is down, refusals (reason `full`), probes sent to the decoy, a worker restarted and a worker
//! slot that cannot be started again. `promtool check rules` and `promtool test rules` run on
//! the rule files too, and Prometheus's own evaluation of every rule must be healthy.
//!
//! What each expression returned is written to `target/monitoring-expressions.txt`.
//!
//! Prometheus runs on 127.x.y.z with a temporary storage directory and is stopped by its pid.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use sluice_tests::servers::EchoServer;
use sluice_tests::sluice::sluice_bin;
use sluice_tests::{
    ChildGuard, HUNG, Host, Sluice, TempDir, client, init, require_program, run_with_timeout, sys,
    wait_until,
};

/// How long every expression together may take to return data (the rates need two scrapes
/// of a counter that moved; Prometheus scrapes every second).
const EXPRESSIONS: Duration = Duration::from_secs(120);

/// What the dashboard's template variables and `$__rate_interval` are set to (All, and a
/// window of ten scrapes).
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
        .replace("${listener}", ".*")
        .replace("$listener", ".*")
}

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

/// One expression to evaluate: where it comes from and its PromQL.
struct Expr {
    origin: String,
    promql: String,
    /// From a template variable `label_values(SELECTOR, LABEL)`: the label that must be set.
    label: Option<String>,
}

/// Every target expression of every panel (rows' nested panels too) and every template
/// variable's query of the dashboard.
fn dashboard_exprs() -> Vec<Expr> {
    let text = std::fs::read_to_string(dist().join("grafana/sluice.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    fn panels(list: &serde_json::Value, out: &mut Vec<Expr>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("every target has an expr");
                out.push(Expr {
                    origin: format!(
                        "panel {:?} {}",
                        p["title"].as_str().unwrap_or(""),
                        t["refId"].as_str().unwrap_or("")
                    ),
                    promql: substitute(expr),
                    label: None,
                });
            }
            panels(&p["panels"], out);
        }
    }
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .expect("a query variable has a query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: only label_values(...) is used: {q}",
                    v["name"]
                )
            });
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(SELECTOR, LABEL)");
        out.push(Expr {
            origin: format!("variable ${}", v["name"].as_str().unwrap_or("")),
            promql: substitute(selector.trim()),
            label: Some(label.trim().to_string()),
        });
    }
    out
}

/// Every rule's expression, by alert name.
fn rule_exprs() -> Vec<Expr> {
    let text = std::fs::read_to_string(dist().join("prometheus/sluice-rules.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("the rules are YAML");
    let mut out = Vec::new();
    for g in doc["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            out.push(Expr {
                origin: format!("rule {name}"),
                promql: r["expr"]
                    .as_str()
                    .expect("every rule has an expr")
                    .to_string(),
                label: None,
            });
        }
    }
    out
}

/// `%XX`-encodes everything but unreserved characters.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path` (HTTP/1.0, so the body ends at close); returns (status line, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(HUNG))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// `/api/v1/query` of `promql` at the current time: the result vector (or an error).
fn query(prom: SocketAddr, promql: &str) -> Result<Vec<serde_json::Value>, String> {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", urlencode(promql)))
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// One line for a result: its series, labels and values (the first few).
fn describe(result: &[serde_json::Value]) -> String {
    let mut s = format!("{} series:", result.len());
    for r in result.iter().take(4) {
        let labels: Vec<String> = r["metric"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| *k != "job")
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        let value = r["value"][1].as_str().unwrap_or("?");
        let value = value.parse::<f64>().map_or(value.to_string(), |f| {
            format!("{}", (f * 1000.0).round() / 1000.0)
        });
        let _ = write!(s, " {{{}}} {value};", labels.join(","));
    }
    if result.len() > 4 {
        let _ = write!(s, " …");
    }
    s
}

/// `{{label}}` in a legend format, filled from a series' labels.
fn legend(format: &str, labels: &serde_json::Value) -> String {
    let mut out = format.to_string();
    for (k, v) in labels.as_object().into_iter().flatten() {
        out = out.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or(""));
    }
    out
}

/// Draws the dashboard from `/api/v1/query_range` over `[start, end]` (unix seconds) into
/// `target/monitoring-dashboard.html`, and screenshots it with headless Chromium into
/// `target/monitoring-dashboard.png` when Chromium is installed. Returns the PNG's path.
fn render_dashboard(prom: SocketAddr, start: u64, end: u64) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dist().join("grafana/sluice.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut panels = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        let mut series = Vec::new();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = substitute(t["expr"].as_str().unwrap_or(""));
            let path = format!(
                "/api/v1/query_range?query={}&start={start}&end={end}&step=1",
                urlencode(&expr)
            );
            let Ok((_, body)) = http_get(prom, &path) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            for r in v["data"]["result"].as_array().into_iter().flatten() {
                let points: Vec<serde_json::Value> = r["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|pt| {
                        let value = pt[1].as_str().and_then(|s| s.parse::<f64>().ok());
                        serde_json::json!([pt[0], value.filter(|f| f.is_finite())])
                    })
                    .collect();
                series.push(serde_json::json!({
                    "name": legend(t["legendFormat"].as_str().unwrap_or(""), &r["metric"]),
                    "labels": r["metric"],
                    "points": points,
                }));
            }
        }
        panels.push(serde_json::json!({
            "title": p["title"],
            "type": p["type"],
            "gridPos": p["gridPos"],
            "unit": p["fieldConfig"]["defaults"]["unit"],
            "series": series,
        }));
    }
    let data = serde_json::json!({
        "range": format!("last {} s", end - start),
        "panels": panels,
    });
    let html = include_str!("monitoring_dashboard.html").replace("__DATA__", &data.to_string());
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let page = target.join("monitoring-dashboard.html");
    std::fs::write(&page, html).unwrap();
    // Without Chromium, the page is all there is.
    sluice_tests::find_program("chromium")?;
    let height = dash["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["gridPos"]["y"].as_u64().unwrap_or(0) + p["gridPos"]["h"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0)
        * 30
        + 50;
    let shot = target.join("monitoring-dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let profile = TempDir::new();
    let mut cmd = sluice_tests::headless_chromium(profile.path(), 3000);
    cmd.arg("--hide-scrollbars")
        .arg(format!("--window-size=1200,{height}"))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()));
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot at {} ({e}): {}", shot.display(), out.text()));
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    Some(shot)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A port on a fresh address that nothing listens on.
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind(Host::new().addr()).unwrap();
    l.local_addr().unwrap()
}

#[test]
fn prometheus_evaluates_every_dashboard_and_alert_expression() {
    init();
    if !require_program("prometheus") || !require_program("promtool") {
        return;
    }
    // The rule files first: syntax, then their unit tests.
    for args in [
        &["check", "rules", "sluice-rules.yml"][..],
        &["test", "rules", "sluice-rules.test.yml"][..],
    ] {
        let mut cmd = Command::new("promtool");
        cmd.args(args).current_dir(dist().join("prometheus"));
        let out = run_with_timeout(&mut cmd, HUNG);
        assert!(out.status.success(), "promtool {args:?}: {}", out.text());
        eprintln!("promtool {}:\n{}", args.join(" "), out.text());
    }

    // The relay: runs from a copy of its binary, so that deleting the copy makes a worker
    // slot impossible to start again (as in metrics_http.rs).
    let dir = TempDir::new();
    let copy = dir.join("sluice");
    std::fs::copy(sluice_bin(), &copy).unwrap();
    let echo = EchoServer::start(Host::new().addr());
    let (held, relay_port, dead) = (Host::new().addr(), Host::new().addr(), Host::new().addr());
    let metrics = Host::new().addr();
    let nowhere = closed_port();
    // Capacity 40: the 37 connections held on `held` (its own limit) are 92.5 % of it, and
    // three places are left for the load.
    let text = format!(
        "workers = 2\nmax_connections = 40\n\n\
         [[listen]]\nname = \"held\"\nbind = \"{held}\"\nupstream = [\"{up}\"]\nmax_connections = 37\n\n\
         [[listen]]\nname = \"relay\"\nbind = \"{relay_port}\"\nupstream = [\"{up}\"]\ndecoy = \"builtin\"\n\n\
         [[listen]]\nname = \"dead\"\nbind = \"{dead}\"\nupstream = [\"{nowhere}\"]\n\
         [listen.health]\ninterval_ms = 200\nfast_interval_ms = 100\ndown_interval_ms = 200\nfall = 1\n",
        up = echo.addr(),
    );
    let relay = Sluice::run_config_text(&text, vec![held, relay_port, dead])
        .metrics(metrics)
        .wrap(&[
            "sh",
            "-c",
            "shift; exec \"$0\" \"$@\"",
            copy.to_str().unwrap(),
        ])
        .start();

    // Prometheus: this relay and a second target that is down, scraped every second, with
    // the rules loaded (evaluated every second too).
    let prom_dir = TempDir::new();
    let prom_addr = Host::new().addr();
    let dead_target = closed_port();
    let config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: [\"{metrics}\", \"{dead_target}\"]\n",
            rules = dist().join("prometheus/sluice-rules.yml").display(),
        ),
    )
    .unwrap();
    let mut prometheus = ChildGuard::spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(prom_dir.join("prometheus.log")).unwrap()),
    );
    let prom_log = || std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default();
    assert!(
        wait_until(HUNG, || http_get(prom_addr, "/-/ready")
            .is_ok_and(|(s, _)| s.contains(" 200 "))),
        "Prometheus did not get ready: {}",
        prom_log()
    );
    // Scraped at least once before a worker restarts, so the restart is an increase.
    assert!(
        wait_until(HUNG, || query(prom_addr, "sluice_worker_restarts_total")
            .is_ok_and(|r| !r.is_empty())),
        "Prometheus never scraped the relay: {:?}\n{}",
        http_get(prom_addr, "/api/v1/targets"),
        prom_log()
    );

    // A worker dies and is replaced; then, its binary gone, another dies for good.
    let first = relay.wait_workers(2, HUNG);
    assert!(sys::kill(first[0], libc::SIGKILL));
    assert!(
        wait_until(HUNG, || relay.counter("worker_restarts").unwrap_or(0) >= 1
            && relay.worker_pids().len() == 2),
        "the worker was not replaced: {}",
        relay.status()
    );
    std::fs::remove_file(&copy).unwrap();
    assert!(sys::kill(relay.worker_pids()[0], libc::SIGKILL));
    // `workers_down` counts the slot once the worker is reaped, before the restart fails and
    // its listening sockets leave the port: a failed start is counted after they left, so no
    // client below lands in a backlog that is about to be reset.
    assert!(
        wait_until(HUNG, || relay.counter("workers_down") == Some(1)
            && relay
                .counter("worker_start_failures")
                .is_some_and(|n| n >= 1)),
        "no worker slot went down: {}",
        relay.status()
    );

    // Connections held on `held` up to its limit (the living worker takes them all), and
    // seen by Prometheus.
    let conns: Vec<TcpStream> = (0..37).map(|_| client::connect(held)).collect();
    assert!(
        wait_until(HUNG, || relay.counter("active") == Some(37)),
        "{}",
        relay.status()
    );
    assert!(
        wait_until(HUNG, || query(
            prom_addr,
            "sum(sluice_connections_active) == 37"
        )
        .is_ok_and(|r| !r.is_empty())),
        "Prometheus did not see the held connections"
    );

    // Load until every expression returned data: relayed exchanges, probes, refusals, and
    // connections whose upstream is unreachable.
    let load_start = unix_now();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let load = thread::spawn(move || {
        let mut rounds = 0u64;
        while !st.load(Ordering::Relaxed) {
            if let Ok(mut c) = client::try_connect(relay_port, None) {
                let msg = b"WA\x06\x03 a chat message";
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                if c.write_all(msg).is_ok() {
                    let mut got = vec![0u8; msg.len()];
                    let _ = c.read_exact(&mut got);
                }
            }
            if let Ok(mut c) = client::try_connect(relay_port, None) {
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = c.write_all(b"GET / HTTP/1.0\r\n\r\n");
                let _ = c.read_to_end(&mut Vec::new());
            }
            for addr in [held, dead] {
                if let Ok(mut c) = client::try_connect(addr, None) {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = c.read_to_end(&mut Vec::new());
                }
            }
            rounds += 1;
            thread::sleep(Duration::from_millis(50));
        }
        rounds
    });

    // Relayed bytes flow both ways before anything is asked (the first bytes, read to tell a
    // probe from a client, were once left out of the client-to-upstream count).
    for dir in ["client_to_upstream", "upstream_to_client"] {
        let q = format!("sum(rate(sluice_relayed_bytes_total{{direction=\"{dir}\"}}[10s])) > 0");
        assert!(
            wait_until(HUNG, || query(prom_addr, &q).is_ok_and(|r| !r.is_empty())),
            "no bytes relayed {dir}: {}",
            relay.status()
        );
    }
    let exprs: Vec<Expr> = dashboard_exprs().into_iter().chain(rule_exprs()).collect();
    assert!(
        exprs.len() >= 30,
        "too few expressions found: {}",
        exprs.len()
    );
    let deadline = Instant::now() + EXPRESSIONS;
    let mut report = String::new();
    let mut missing = Vec::new();
    for e in &exprs {
        let last = loop {
            let got = query(prom_addr, &e.promql);
            let ok = match (&got, &e.label) {
                (Ok(r), None) => !r.is_empty(),
                (Ok(r), Some(l)) => r.iter().any(|s| s["metric"][l].is_string()),
                (Err(_), _) => false,
            };
            if ok || Instant::now() >= deadline {
                break got;
            }
            thread::sleep(Duration::from_millis(500));
        };
        let line = match &last {
            Ok(r) if !r.is_empty() => describe(r),
            Ok(_) => {
                missing.push(e.origin.clone());
                "NO DATA".to_string()
            }
            Err(err) => {
                missing.push(e.origin.clone());
                format!("ERROR {err}")
            }
        };
        let _ = writeln!(
            report,
            "{}\n  {}\n  => {line}",
            e.origin,
            e.promql.replace('\n', " ")
        );
    }
    // Prometheus's own evaluation of the rules: loaded and healthy.
    let (_, rules) = http_get(prom_addr, "/api/v1/rules").unwrap();
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let mut loaded = 0;
    for g in rules["data"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            loaded += 1;
            assert_eq!(
                r["health"], "ok",
                "rule {} evaluates with an error: {r}",
                r["name"]
            );
            let _ = writeln!(
                report,
                "rule {} in Prometheus: health {}, state {}",
                r["name"], r["health"], r["state"]
            );
        }
    }
    assert_eq!(
        loaded,
        rule_exprs().len(),
        "Prometheus loaded other rules: {rules}"
    );
    // A few more seconds of load, so the charts have a shape.
    thread::sleep(Duration::from_secs(5));
    if let Some(shot) = render_dashboard(prom_addr, load_start.saturating_sub(20), unix_now()) {
        let _ = writeln!(report, "dashboard drawn into {}", shot.display());
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = load.join().unwrap();
    let _ = writeln!(report, "load: {rounds} rounds");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/monitoring-expressions.txt");
    let _ = std::fs::write(&path, &report);
    eprintln!("{report}");
    assert!(
        missing.is_empty(),
        "expressions without data after {EXPRESSIONS:?}: {missing:#?}\n{report}\nPrometheus log:\n{}",
        prom_log()
    );
    drop(conns);
    prometheus.stop(Duration::from_secs(10));
    relay.stop();
}
