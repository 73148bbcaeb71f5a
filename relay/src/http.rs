//! The metrics and stats HTTP listener of the supervisor (127.0.0.1:9199 by default).
//!
//! - `/metrics`: Prometheus / OpenMetrics text (prometheus-client): counters and gauges from
//!   [`crate::metrics`], histograms from [`crate::histo`] with fixed buckets.
//! - `/stats.json`: the live numbers the stats page polls every second.
//! - `/`: the stats page (`stats.html`, self-contained: inline JS and canvas, no CDN).
//!
//! One thread, one request at a time, HTTP/1.1 with `Connection: close`. A request is read
//! with a 2 s timeout and at most [`MAX_REQUEST`] bytes; a slow or hostile client can delay
//! other scrapes by 2 s at most and never the supervisor's own work (it runs on its own thread).
//! The peer's address is never read, logged or stored.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::engine::EngineKind;
use crate::histo::{KINDS, Kind, Stats};
use crate::metrics::{ALL_COUNTERS, Counter, Shared};

/// Largest request head read.
pub const MAX_REQUEST: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

const PAGE: &str = include_str!("stats.html");

/// What the HTTP thread reads.
pub struct Source {
    pub shared: Arc<Shared>,
    pub stats: Arc<Stats>,
    pub workers: usize,
    pub engine: String,
    pub started: Instant,
}

/// Binds the listener (before the workers start, so a port in use fails the start).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Serves `listener` on a thread of its own.
pub fn spawn(listener: TcpListener, src: Source) -> std::io::Result<()> {
    let src = Arc::new(src);
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &src) {
                            tracing::trace!("metrics http request failed: {}", e.kind());
                        }
                    }
                    // EMFILE and the like: do not spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .map(drop)
}

fn answer(mut s: TcpStream, src: &Arc<Source>) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() >= MAX_REQUEST {
            return respond(
                &mut s,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"",
            );
        }
        if Instant::now() > deadline {
            return Ok(());
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut s,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
        );
    }
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body): (&str, &str, Vec<u8>) = match path {
        "/" | "/index.html" => (
            "200 OK",
            "text/html; charset=utf-8",
            PAGE.as_bytes().to_vec(),
        ),
        // OpenMetrics for scrapers that ask for it (Prometheus does), else the classic text
        // format (promtool, curl).
        "/metrics"
            if head
                .to_ascii_lowercase()
                .contains("application/openmetrics-text") =>
        {
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                prometheus_text(src).into_bytes(),
            )
        }
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            classic_text(&prometheus_text(src)).into_bytes(),
        ),
        "/stats.json" => (
            "200 OK",
            "application/json",
            stats_json(src).to_string().into_bytes(),
        ),
        _ => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
    };
    let body = if method == "HEAD" { &[][..] } else { &body[..] };
    respond(&mut s, status, ctype, body)
}

fn respond(s: &mut TcpStream, status: &str, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

/// Counters that are gauges (values that go down).
fn is_gauge(c: Counter) -> bool {
    matches!(
        c,
        Counter::Active | Counter::PipesInUse | Counter::UpstreamsDown | Counter::WorkersDown
    )
}

/// The live numbers for the stats page.
pub fn stats_json(src: &Source) -> serde_json::Value {
    let n = src.workers;
    let counters: serde_json::Map<String, serde_json::Value> = ALL_COUNTERS
        .iter()
        .filter(|(c, _)| !matches!(c, Counter::Engine | Counter::Pid))
        .map(|&(c, name)| (name.to_string(), src.shared.total(n, c).into()))
        .chain([
            (
                "upstream_state_changes".to_string(),
                src.shared
                    .supervisor_get(Counter::UpstreamStateChanges)
                    .into(),
            ),
            (
                "upstreams_down".to_string(),
                src.shared.supervisor_get(Counter::UpstreamsDown).into(),
            ),
            (
                "reloads".to_string(),
                src.shared.supervisor_get(Counter::Reloads).into(),
            ),
            (
                "reloads_failed".to_string(),
                src.shared.supervisor_get(Counter::ReloadsFailed).into(),
            ),
            (
                "upstream_addresses_refused".to_string(),
                src.shared
                    .supervisor_get(Counter::UpstreamAddressesRefused)
                    .into(),
            ),
            (
                "workers_down".to_string(),
                src.shared.supervisor_get(Counter::WorkersDown).into(),
            ),
            (
                "worker_restarts".to_string(),
                src.shared.supervisor_get(Counter::WorkerRestarts).into(),
            ),
            (
                "worker_start_failures".to_string(),
                src.shared
                    .supervisor_get(Counter::WorkerStartFailures)
                    .into(),
            ),
            (
                "workers_killed_unread".to_string(),
                src.shared
                    .supervisor_get(Counter::WorkersKilledUnread)
                    .into(),
            ),
        ])
        .collect();
    let m = src.stats.fresh();
    let report = m.report();
    let listeners: Vec<serde_json::Value> = m
        .listeners()
        .iter()
        .enumerate()
        .map(|(i, name)| {
            serde_json::json!({
                "name": name,
                "active": src.shared.listener_active(n, i),
            })
        })
        .collect();
    serde_json::json!({
        "time_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        "uptime_s": src.started.elapsed().as_secs(),
        "engine": src.engine,
        "workers": n,
        "active": src.shared.total(n, Counter::Active),
        "counters": counters,
        "listeners": listeners,
        "histograms": report,
    })
}

/// Bucket upper bounds: seconds for times, bytes for sizes.
const TIME_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 1800.0, 3600.0, 86400.0,
];
const BYTE_BUCKETS: &[f64] = &[100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11];

fn prom_name(k: Kind) -> (&'static str, Unit) {
    match k {
        Kind::Connect => ("sluice_upstream_connect", Unit::Seconds),
        Kind::FirstByte => ("sluice_upstream_first_byte", Unit::Seconds),
        Kind::Duration => ("sluice_connection_duration", Unit::Seconds),
        Kind::BytesUp => ("sluice_connection_client_to_upstream", Unit::Bytes),
        Kind::BytesDown => ("sluice_connection_upstream_to_client", Unit::Bytes),
    }
}

/// Histograms converted to Prometheus buckets: (listener, kind, sum, count, buckets).
type PromHisto = (String, Kind, f64, u64, Vec<(f64, u64)>);

fn prom_histograms(src: &Source) -> Vec<PromHisto> {
    let m = src.stats.fresh();
    let mut out = Vec::new();
    for (l, name) in m.listeners().iter().enumerate() {
        for k in KINDS {
            let h = &m.set(l)[k as usize];
            let (bounds, scale) = if k.is_time() {
                (TIME_BUCKETS, 1e-6)
            } else {
                (BYTE_BUCKETS, 1.0)
            };
            let mut buckets: Vec<(f64, u64)> = bounds
                .iter()
                .map(|&b| (b, 0))
                .chain([(f64::INFINITY, 0)])
                .collect();
            let mut sum = 0.0;
            for v in h.iter_recorded() {
                let value = h.median_equivalent(v.value_iterated_to()) as f64 * scale;
                let c = v.count_at_value();
                sum += value * c as f64;
                let i = buckets
                    .iter()
                    .position(|(b, _)| value <= *b)
                    .unwrap_or(buckets.len() - 1);
                buckets[i].1 += c;
            }
            out.push((name.clone(), k, sum, h.len(), buckets));
        }
    }
    out
}

fn encode_all(src: &Source, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let n = src.workers;
    for &(c, name) in ALL_COUNTERS {
        if matches!(c, Counter::Engine | Counter::Pid) {
            continue;
        }
        let v = src.shared.total(n, c);
        let full = format!("sluice_{name}");
        let help = format!("{name} summed over the workers (see docs/OPERATIONS.md)");
        if is_gauge(c) {
            let g = ConstGauge::new(v as i64);
            g.encode(e.encode_descriptor(&full, &help, None, g.metric_type())?)?;
        } else {
            let ctr = ConstCounter::new(v);
            ctr.encode(e.encode_descriptor(&full, &help, None, ctr.metric_type())?)?;
        }
    }
    let ctr = ConstCounter::new(src.shared.supervisor_get(Counter::UpstreamStateChanges));
    ctr.encode(e.encode_descriptor(
        "sluice_upstream_state_changes",
        "Upstream addresses that went down or up (health checks)",
        None,
        ctr.metric_type(),
    )?)?;
    for (c, name, help) in [
        (
            Counter::Reloads,
            "sluice_reloads",
            "Configuration reloads applied (SIGHUP or sluicectl reload)",
        ),
        (
            Counter::ReloadsFailed,
            "sluice_reloads_failed",
            "Configuration reloads refused; the running configuration was kept",
        ),
        (
            Counter::UpstreamAddressesRefused,
            "sluice_upstream_addresses_refused",
            "Loopback, private, link-local, unspecified or multicast addresses in DNS answers for \
             upstream or decoy names, not dialled",
        ),
        (
            Counter::WorkerRestarts,
            "sluice_worker_restarts",
            "Workers started to replace one that died",
        ),
        (
            Counter::WorkerStartFailures,
            "sluice_worker_start_failures",
            "Tries to start a worker that failed (retried with back-off)",
        ),
        (
            Counter::WorkersKilledUnread,
            "sluice_workers_killed_unread",
            "Workers killed because they did not read their control pipe",
        ),
    ] {
        let ctr = ConstCounter::new(src.shared.supervisor_get(c));
        ctr.encode(e.encode_descriptor(name, help, None, ctr.metric_type())?)?;
    }
    let g = ConstGauge::new(src.shared.supervisor_get(Counter::UpstreamsDown) as i64);
    g.encode(e.encode_descriptor(
        "sluice_upstreams_down",
        "Upstream addresses down now",
        None,
        g.metric_type(),
    )?)?;
    let g = ConstGauge::new(n as i64);
    g.encode(e.encode_descriptor("sluice_workers", "Worker processes", None, g.metric_type())?)?;
    let g = ConstGauge::new(src.shared.supervisor_get(Counter::WorkersDown) as i64);
    g.encode(e.encode_descriptor(
        "sluice_workers_down",
        "Worker slots with no process: its start failed and is retried with back-off, its \
         listening sockets closed meanwhile",
        None,
        g.metric_type(),
    )?)?;
    {
        // Bytes by engine: each worker runs one engine (they differ when one fell back).
        let mut me = e.encode_descriptor(
            "sluice_engine_bytes",
            "Bytes relayed, by the engine of the worker that relayed them",
            None,
            MetricType::Counter,
        )?;
        for kind in [EngineKind::Splice, EngineKind::Copy, EngineKind::Epoll] {
            let of = |c: Counter| -> u64 {
                (0..n)
                    .filter(|&w| src.shared.get(w, Counter::Engine) == kind.id())
                    .map(|w| src.shared.get(w, c))
                    .sum()
            };
            for (dir, c) in [
                ("client_to_upstream", Counter::BytesClientToUpstream),
                ("upstream_to_client", Counter::BytesUpstreamToClient),
            ] {
                let labels = [("engine", kind.name()), ("direction", dir)];
                ConstCounter::new(of(c)).encode(me.encode_family(&labels)?)?;
            }
        }
    }
    let names: Vec<String> = src.stats.fresh().listeners().to_vec();
    {
        let mut me = e.encode_descriptor(
            "sluice_listener_active",
            "Relayed connections open now, per listener",
            None,
            MetricType::Gauge,
        )?;
        for (i, name) in names.iter().enumerate() {
            let labels = [("listener", name.as_str())];
            let g = ConstGauge::new(src.shared.listener_active(n, i) as i64);
            g.encode(me.encode_family(&labels)?)?;
        }
    }
    let histos = prom_histograms(src);
    for k in KINDS {
        let (name, unit) = prom_name(k);
        let mut me = e.encode_descriptor(name, k.help(), Some(&unit), MetricType::Histogram)?;
        for (listener, _, sum, count, buckets) in histos.iter().filter(|h| h.1 == k) {
            let labels = [("listener", listener.as_str())];
            me.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    *sum, *count, buckets, None,
                )?;
        }
    }
    Ok(())
}

/// Encodes everything on each scrape (a registry with one collector, made per request).
#[derive(Clone)]
struct Scrape(Arc<Source>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

impl Collector for Scrape {
    fn encode(&self, e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_all(&self.0, e)
    }
}

/// The `/metrics` document.
pub fn prometheus_text(src: &Arc<Source>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(src.clone())));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
        out.push_str("# encoding failed\n# EOF\n");
    }
    out
}

/// OpenMetrics text → Prometheus text format 0.0.4: counter families are named with their
/// `_total` suffix, `# UNIT` and `# EOF` lines go.
pub fn classic_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + 64 * counters.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        if let Some((kind, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(&format!("{kind}{name}_total {tail}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_with_total() {
        let open = "# HELP a_x Some.\n# TYPE a_x counter\na_x_total 1\n# HELP b_seconds B.\n\
                    # TYPE b_seconds histogram\n# UNIT b_seconds seconds\nb_seconds_count 0\n# EOF\n";
        assert_eq!(
            classic_text(open),
            "# HELP a_x_total Some.\n# TYPE a_x_total counter\na_x_total 1\n\
             # HELP b_seconds B.\n# TYPE b_seconds histogram\nb_seconds_count 0\n"
        );
    }
}
