//! The metrics and stats HTTP listener of the supervisor (127.0.0.1:9199 by default).
//!
//! - `/metrics`: Prometheus / OpenMetrics text (prometheus-client): counters and gauges from
//!   [`crate::metrics`], histograms from [`crate::histo`] with fixed buckets.
//! - `/stats.json`: the live numbers the stats page polls every second.
//! - `/healthz`: `200 ok` while every worker runs and serves its listening sockets, else `503`
//!   with a one-line reason (asked of the supervisor through [`Source::health`]).
//! - `/`: the stats page (`stats.html`, self-contained: inline JS and canvas, no CDN).
//!
//! One thread, one epoll set, nonblocking sockets: clients are served side by side, so an idle
//! or slow one delays no one. Bounded: at most [`MAX_CONNS`] connections at once (one past that
//! gets `503` and is closed; `metrics_http_refused`), each with [`DEADLINE`] from accept to the
//! last byte of its answer, a request head of at most [`MAX_REQUEST`] bytes (`431` past it),
//! HTTP/1.1 with `Connection: close`. Every [`crate::histo::Window::STEP`] it also snapshots the
//! latency histograms, for the stats page's last-minute percentiles. Answers are built on the thread when the head is complete
//! (a scrape is a few hundred microseconds of encoding); the supervisor's own work never waits
//! for it. The peer's address is never read, logged or stored.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::control::Status;
use crate::engine::EngineKind;
use crate::histo::{KINDS, Kind, Stats};
use crate::metrics::{ABORTS, ALL_COUNTERS, Counter, REFUSALS, Shared};
use crate::sys::{self, Epoll};

/// Largest request head read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Connections served at once; one more is answered `503` and closed.
pub const MAX_CONNS: usize = 64;
/// From accept to the last byte of the answer; a connection still open then is closed.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// How long accepting pauses when accept(2) fails (EMFILE and the like), so it does not spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

const PAGE: &str = include_str!("stats.html");

/// What `/healthz` asks: Ok when the relay serves every port, else the reason (one line, no
/// address).
pub type Health = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the HTTP thread reads.
pub struct Source {
    pub shared: Arc<Shared>,
    pub stats: Arc<Stats>,
    pub workers: usize,
    pub engine: String,
    /// `sluice_build_info{preset}`: `whatsapp`, `signal` or `none`.
    pub preset: String,
    /// Capacity, per-listener caps and upstream health, as `sluicectl status` shows them.
    pub status: Arc<Mutex<Status>>,
    pub started: Instant,
    /// The same moment in seconds since the Unix epoch (`sluice_start_time_seconds`).
    pub started_unix: u64,
    /// The stats page's recent percentiles (snapshots taken when it asks).
    pub recent: Mutex<crate::histo::Window>,
    pub health: Health,
}

/// Binds the listener (before the workers start, so a port in use fails the start).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Serves `listener` on a thread of its own.
pub fn spawn(listener: TcpListener, src: Source) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    epoll.add(listener.as_fd(), libc::EPOLLIN as u32, LISTENER)?;
    let src = Arc::new(src);
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            let mut server = Server {
                listener,
                epoll,
                conns: (0..MAX_CONNS).map(|_| None).collect(),
                accept_paused: None,
                src,
            };
            server.run();
        })
        .map(drop)
}

/// The epoll token of the listening socket; a connection's is its slot + 1.
const LISTENER: u64 = 0;

/// One client: its request head so far, then its answer.
struct Conn {
    stream: TcpStream,
    deadline: Instant,
    head: Vec<u8>,
    /// The answer, once the head is complete; `sent` bytes of it written.
    out: Option<Vec<u8>>,
    sent: usize,
}

struct Server {
    listener: TcpListener,
    epoll: Epoll,
    conns: Vec<Option<Conn>>,
    /// Accepting stopped until then (accept(2) failed).
    accept_paused: Option<Instant>,
    src: Arc<Source>,
}

/// What a connection wants next.
enum Next {
    Read,
    Write,
    Close,
}

impl Server {
    fn run(&mut self) {
        let mut events = vec![sys::epoll_event_zeroed(); MAX_CONNS + 1];
        let mut next_snapshot = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_snapshot {
                // The stats page's recent window needs a history from before it is opened.
                let m = self.src.stats.fresh();
                let _ = self
                    .src
                    .recent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .recent(&m, now);
                next_snapshot = now + crate::histo::Window::STEP;
            }
            let wake = self
                .conns
                .iter()
                .flatten()
                .map(|c| c.deadline)
                .chain(self.accept_paused)
                .chain([next_snapshot])
                .min();
            let timeout = wake.map_or(-1, |w| {
                w.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1
            });
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("metrics http: epoll_wait failed ({e}); serving stops");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.u64;
                if token == LISTENER {
                    self.accept();
                } else {
                    self.step(token as usize - 1);
                }
            }
            self.expire();
        }
    }

    fn accept(&mut self) {
        // Bounded: at most a backlog's worth per wake-up, then the others get their turn.
        for _ in 0..2 * MAX_CONNS {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("metrics http: accept failed: {}", e.kind());
                    self.pause_accepting();
                    return;
                }
            };
            let Some(slot) = self.conns.iter().position(Option::is_none) else {
                self.refuse(stream);
                continue;
            };
            if stream.set_nonblocking(true).is_err()
                || self
                    .epoll
                    .add(stream.as_fd(), libc::EPOLLIN as u32, slot as u64 + 1)
                    .is_err()
            {
                continue;
            }
            self.conns[slot] = Some(Conn {
                stream,
                deadline: Instant::now() + DEADLINE,
                head: Vec::new(),
                out: None,
                sent: 0,
            });
        }
    }

    /// Every place is taken: a short answer written as far as the socket takes it at once,
    /// then closed. The answer fits an empty send buffer, so the client reads all of it.
    fn refuse(&self, mut stream: TcpStream) {
        self.src
            .shared
            .supervisor()
            .inc(Counter::MetricsHttpRefused);
        let _ = stream.set_nonblocking(true);
        let _ = stream.write(&response(
            "503 Service Unavailable",
            "text/plain",
            b"too many connections to the metrics listener\n",
        ));
    }

    fn pause_accepting(&mut self) {
        if self
            .epoll
            .modify(self.listener.as_fd(), 0, LISTENER)
            .is_ok()
        {
            self.accept_paused = Some(Instant::now() + ACCEPT_PAUSE);
        }
    }

    fn step(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let next = if conn.out.is_none() {
            read_head(conn, &self.src)
        } else {
            Next::Write
        };
        let next = match next {
            Next::Write => write_out(conn),
            other => other,
        };
        match next {
            Next::Read => {}
            Next::Write => {
                let _ =
                    self.epoll
                        .modify(conn.stream.as_fd(), libc::EPOLLOUT as u32, slot as u64 + 1);
            }
            Next::Close => self.close(slot),
        }
    }

    fn close(&mut self, slot: usize) {
        if let Some(conn) = self.conns[slot].take() {
            let _ = self.epoll.delete(conn.stream.as_fd());
        }
    }

    /// Closes connections past their deadline and resumes accepting after a pause.
    fn expire(&mut self) {
        let now = Instant::now();
        for slot in 0..self.conns.len() {
            if self.conns[slot].as_ref().is_some_and(|c| c.deadline <= now) {
                self.close(slot);
            }
        }
        if self.accept_paused.is_some_and(|t| t <= now)
            && self
                .epoll
                .modify(self.listener.as_fd(), libc::EPOLLIN as u32, LISTENER)
                .is_ok()
        {
            self.accept_paused = None;
        }
    }
}

/// Reads what the client sent (nonblocking); once the head is complete, the answer goes to
/// `conn.out`.
fn read_head(conn: &mut Conn, src: &Arc<Source>) -> Next {
    let mut chunk = [0u8; 2048];
    // Bounded: the head is at most MAX_REQUEST bytes, read in chunks.
    for _ in 0..=MAX_REQUEST / chunk.len() + 1 {
        if head_complete(&conn.head) {
            conn.out = Some(answer(&conn.head, src));
            return Next::Write;
        }
        if conn.head.len() >= MAX_REQUEST {
            conn.out = Some(response(
                "431 Request Header Fields Too Large",
                "text/plain",
                b"",
            ));
            return Next::Write;
        }
        match conn.stream.read(&mut chunk) {
            Ok(0) => return Next::Close,
            Ok(n) => conn.head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Read,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
    Next::Read
}

fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// Writes what the socket takes of the answer; closes once all of it is written.
fn write_out(conn: &mut Conn) -> Next {
    let Some(out) = conn.out.as_ref() else {
        return Next::Close;
    };
    while conn.sent < out.len() {
        match conn.stream.write(&out[conn.sent..]) {
            Ok(0) => return Next::Close,
            Ok(n) => conn.sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Write,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
    Next::Close
}

/// The whole answer (head and body) to a complete request head.
fn answer(buf: &[u8], src: &Arc<Source>) -> Vec<u8> {
    let head = String::from_utf8_lossy(buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return response("405 Method Not Allowed", "text/plain", b"GET only\n");
    }
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body): (&str, &str, Vec<u8>) = match path {
        "/" | "/index.html" => (
            "200 OK",
            "text/html; charset=utf-8",
            PAGE.as_bytes().to_vec(),
        ),
        "/healthz" => match (src.health)() {
            Ok(()) => ("200 OK", "text/plain", b"ok\n".to_vec()),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("{}\n", why.replace(['\r', '\n'], " ")).into_bytes(),
            ),
        },
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
    if method == "HEAD" {
        // The head says the body's length; the body is left out.
        let mut out = response(status, ctype, &body);
        out.truncate(out.len() - body.len());
        return out;
    }
    response(status, ctype, &body)
}

fn response(status: &str, ctype: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
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
            (
                "metrics_http_refused".to_string(),
                src.shared
                    .supervisor_get(Counter::MetricsHttpRefused)
                    .into(),
            ),
        ])
        .collect();
    let m = src.stats.fresh();
    let report = m.report();
    let recent = src
        .recent
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .recent(&m, Instant::now());
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
    let refused: serde_json::Map<String, serde_json::Value> = REFUSALS
        .iter()
        .map(|&(c, reason)| (reason.to_string(), src.shared.total(n, c).into()))
        .collect();
    let (capacity, upstreams) = {
        let st = src.status.lock().unwrap_or_else(|p| p.into_inner());
        (st.capacity, st.upstreams.clone())
    };
    let upstreams: Vec<serde_json::Value> = upstreams
        .iter()
        .map(|u| {
            serde_json::json!({
                "listener": u.listener,
                "upstream": u.upstream,
                "fallback": u.fallback,
                "addresses": u.addresses,
                "down": u.down,
                "up": u.up(),
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
        // Every refusal reason, and their sum (the page's "refused" card).
        "refused": refused.values().filter_map(|v| v.as_u64()).sum::<u64>(),
        "refused_by_reason": refused,
        "capacity": capacity,
        "upstreams": upstreams,
        "recent": recent,
    })
}

/// Bucket upper bounds: seconds for times, bytes for sizes.
const TIME_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 1800.0, 3600.0, 86400.0,
];
const BYTE_BUCKETS: &[f64] = &[100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11];

/// The histogram family of a kind (name without its unit suffix), its unit, help, and the
/// `direction` label of the per-connection byte histograms (one family for both).
fn prom_name(k: Kind) -> (&'static str, Unit, &'static str, Option<&'static str>) {
    match k {
        Kind::Connect => (
            "sluice_upstream_connect",
            Unit::Seconds,
            "Time from the first upstream connect to the connection established, failover \
             attempts included, per relayed connection",
            None,
        ),
        Kind::FirstByte => (
            "sluice_upstream_first_byte",
            Unit::Seconds,
            "Time from the upstream connection established to its first byte, per relayed \
             connection",
            None,
        ),
        Kind::Duration => (
            "sluice_connection_duration",
            Unit::Seconds,
            "Relayed connection lifetime, accept to close",
            None,
        ),
        Kind::BytesUp | Kind::BytesDown => (
            "sluice_connection_relayed",
            Unit::Bytes,
            "Bytes relayed per connection, by direction (client_to_upstream, \
             upstream_to_client), counted at close",
            Some(if k == Kind::BytesUp {
                "client_to_upstream"
            } else {
                "upstream_to_client"
            }),
        ),
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

/// A counter or gauge family of labelled values.
fn family<L: prometheus_client::encoding::EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut me = e.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in values {
        let m = me.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(m)?,
            _ => ConstGauge::new(v as i64).encode(m)?,
        }
    }
    Ok(())
}

/// One unlabelled counter or gauge.
fn single(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let me = e.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(me),
        _ => ConstGauge::new(v as i64).encode(me),
    }
}

/// Every metric of `/metrics`. Names follow Prometheus's conventions: counters end in `_total`
/// (added by the encoder), units are in the name, one family per thing measured with the
/// variants as labels (`reason`, `direction`, `listener`, `upstream`). No label ever holds a
/// client address. The families and what each means are listed in docs/OPERATIONS.md.
fn encode_all(src: &Source, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
    use MetricType::{Counter as C, Gauge as G};
    let n = src.workers;
    let sh = &src.shared;
    let total = |c: Counter| sh.total(n, c);
    let sup = |c: Counter| sh.supervisor_get(c);
    let e = &mut e;
    let (capacity, listener_limits, upstreams, cert_expiry) = {
        let st = src.status.lock().unwrap_or_else(|p| p.into_inner());
        (
            st.capacity,
            st.listeners
                .iter()
                .map(|l| (l.name.clone(), l.max_connections))
                .collect::<Vec<_>>(),
            st.upstreams.clone(),
            st.listeners
                .iter()
                .filter_map(|l| Some((l.name.clone(), l.cert_expiry_unix?)))
                .collect::<Vec<_>>(),
        )
    };
    family(
        e,
        "sluice_certificate_expiry_timestamp_seconds",
        "When the certificate each TLS listener serves now expires, in seconds since the Unix \
         epoch (an ACME certificate is renewed renew_before_days before)",
        G,
        cert_expiry
            .iter()
            .map(|(l, t)| ([("listener", l.as_str())], *t)),
    )?;
    family(
        e,
        "sluice_acme_renewals",
        "Tries to get a certificate from an ACME CA, by result (ok: issued; error: failed, \
         retried with back-off while the current certificate is kept)",
        C,
        [
            ([("result", "ok")], sup(Counter::AcmeRenewalsOk)),
            ([("result", "error")], sup(Counter::AcmeRenewalsError)),
        ],
    )?;
    family(
        e,
        "sluice_build_info",
        "Always 1; the labels say which Sluice runs: its version, the relay engine its \
         workers run (splice, copy, epoll, sockmap) and the preset it was started from \
         (none: a config file or the command line)",
        G,
        [(
            [
                ("version", env!("CARGO_PKG_VERSION")),
                ("engine", src.engine.as_str()),
                ("preset", src.preset.as_str()),
            ],
            1,
        )],
    )?;
    single(
        e,
        "sluice_start_time_seconds",
        "When this relay started, in seconds since the Unix epoch",
        G,
        src.started_unix,
    )?;
    single(
        e,
        "sluice_workers",
        "Worker processes this relay runs (configured, whether running or not)",
        G,
        n as u64,
    )?;
    single(
        e,
        "sluice_workers_down",
        "Worker slots with no process now: the worker died and its replacement could not be \
         started; retried with back-off, its listening sockets closed meanwhile",
        G,
        sup(Counter::WorkersDown),
    )?;
    single(
        e,
        "sluice_worker_restarts",
        "Workers started to replace one that died (a crash, an OOM kill, a kill)",
        C,
        sup(Counter::WorkerRestarts),
    )?;
    single(
        e,
        "sluice_worker_start_failures",
        "Tries to start a worker that failed (could not be started, or exited right after \
         its start), one per try",
        C,
        sup(Counter::WorkerStartFailures),
    )?;
    single(
        e,
        "sluice_workers_killed_unread",
        "Workers killed because they stopped reading their control pipe",
        C,
        sup(Counter::WorkersKilledUnread),
    )?;
    let names: Vec<String> = src.stats.fresh().listeners().to_vec();
    family(
        e,
        "sluice_connections_active",
        "Relayed connections open now, per listener (sum them for the relay)",
        G,
        names
            .iter()
            .enumerate()
            .map(|(i, name)| ([("listener", name.as_str())], sh.listener_active(n, i))),
    )?;
    single(
        e,
        "sluice_connections_capacity",
        "Connections this relay holds at most: max_connections, or less when the workers' \
         file descriptor limits allow less; clients past it are refused (reason=\"full\")",
        G,
        capacity,
    )?;
    family(
        e,
        "sluice_listener_connections_limit",
        "A listener's own max_connections, for listeners that set one; clients past it are \
         refused (reason=\"full\")",
        G,
        listener_limits
            .iter()
            .filter(|(_, max)| *max > 0)
            .map(|(name, max)| ([("listener", name.as_str())], u64::from(*max))),
    )?;
    single(
        e,
        "sluice_connections_accepted",
        "Client connections accepted (including those then refused)",
        C,
        total(Counter::Accepted),
    )?;
    family(
        e,
        "sluice_connections_refused",
        "Client connections turned away before any byte was relayed, by reason: full \
         (max_connections), no_upstream (no address resolved), denied (deny or allow list), \
         dest (upstream not on the destination allowlist), client_connections and client_rate \
         (per-client limits), untrusted_proxy (PROXY peer not in trusted_proxies), bad_header \
         (PROXY header malformed or late), bad_tls (TLS handshake failed), bad_sni (no \
         allowed name, or not TLS)",
        C,
        REFUSALS
            .iter()
            .map(|&(c, reason)| ([("reason", reason)], total(c))),
    )?;
    single(
        e,
        "sluice_connections_closed",
        "Accepted connections closed, however they ended (refused after accept, aborted or \
         finished)",
        C,
        total(Counter::Closed),
    )?;
    family(
        e,
        "sluice_connections_aborted",
        "Connections that ended otherwise than by both sides finishing, by reason: \
         client_reset, upstream_reset, relay_error (another socket error), idle_timeout, \
         upstream_unreachable (every upstream address refused or timed out), killed_denied \
         (sluicectl deny add --kill-existing)",
        C,
        ABORTS
            .iter()
            .map(|&(c, reason)| ([("reason", reason)], total(c))),
    )?;
    single(
        e,
        "sluice_connections_decoyed",
        "Connections sent to the listener's decoy because their first bytes were not what \
         the port expects (scanners, probes)",
        C,
        total(Counter::Decoyed),
    )?;
    {
        // Each worker runs one engine; they differ when one fell back. Rows that never said
        // theirs count under the relay's engine.
        let own = EngineKind::ALL
            .into_iter()
            .find(|k| k.name() == src.engine)
            .unwrap_or(EngineKind::Epoll);
        let engine_of = |w: usize| EngineKind::from_id(sh.get(w, Counter::Engine)).unwrap_or(own);
        let mut values = Vec::new();
        for kind in EngineKind::ALL {
            if kind != own && !(0..n).any(|w| engine_of(w) == kind) {
                continue;
            }
            for (dir, c) in [
                ("client_to_upstream", Counter::BytesClientToUpstream),
                ("upstream_to_client", Counter::BytesUpstreamToClient),
            ] {
                let v = (0..n)
                    .filter(|&w| engine_of(w) == kind)
                    .map(|w| sh.get(w, c))
                    .sum();
                values.push(([("direction", dir), ("engine", kind.name())], v));
            }
        }
        family(
            e,
            "sluice_relayed_bytes",
            "Bytes relayed, by direction (client_to_upstream, upstream_to_client) and by the \
             engine of the worker that relayed them",
            C,
            values,
        )?;
    }
    single(
        e,
        "sluice_fast_path_connections",
        "Connections put on the eBPF sockmap fast path (engine sockmap)",
        C,
        total(Counter::FastPathPairs),
    )?;
    single(
        e,
        "sluice_fast_path_refused",
        "Connections the fast path could not take (map full, socket refused), relayed by \
         splice instead",
        C,
        total(Counter::FastPathRefused),
    )?;
    single(
        e,
        "sluice_fast_path_user_space_bytes",
        "Bytes of fast-path connections forwarded through user space instead of the kernel \
         (queued before the socket entered the sockmap, or held back by flow control); part \
         of sluice_relayed_bytes_total",
        C,
        total(Counter::FastPathUserBytes),
    )?;
    single(
        e,
        "sluice_fast_path_entries",
        "Entries left in the workers' fast-path maps, counted when a worker had no \
         connection (0 once every connection is gone; more is a leak)",
        G,
        total(Counter::FastPathEntries),
    )?;
    single(
        e,
        "sluice_fast_path_audited_pairs",
        "Fast-path connections the workers had made when they last counted their map entries",
        G,
        total(Counter::FastPathAuditedPairs),
    )?;
    single(
        e,
        "sluice_fast_path_reserved_bytes",
        "Bytes of the daemon-wide fast-path kernel budget (sockmap_queue_total_mib) the \
         connections hold: the most the kernel can have queued for them beyond what their \
         destinations took",
        G,
        total(Counter::FastPathReservedBytes),
    )?;
    single(
        e,
        "sluice_fast_path_queued_bytes",
        "Bytes the kernel has queued for fast-path connections (redirected, not yet in the \
         destination's send buffer), as last sampled",
        G,
        total(Counter::FastPathQueuedBytes),
    )?;
    single(
        e,
        "sluice_fast_path_held_bytes",
        "Bytes flow control holds back on fast-path source sockets or in the workers, as last \
         sampled",
        G,
        total(Counter::FastPathHeldBytes),
    )?;
    single(
        e,
        "sluice_fast_path_holds",
        "Times a fast-path direction reached its bound (sockmap_queue_limit_mib) and its \
         verdict started holding bytes",
        C,
        total(Counter::FastPathHolds),
    )?;
    single(
        e,
        "sluice_fast_path_holds_unannounced",
        "Of sluice_fast_path_holds_total, those found by looking at the sockets because the \
         verdict's event ring was full",
        C,
        total(Counter::FastPathHoldsUnannounced),
    )?;
    single(
        e,
        "sluice_fast_path_budget_short",
        "Fast-path allowances the daemon-wide budget (sockmap_queue_total_mib) cut short",
        C,
        total(Counter::FastPathBudgetShort),
    )?;
    single(
        e,
        "sluice_fast_path_duplicated_bytes",
        "Bytes the kernel's fast path sent on twice (a peer's retransmission overlapped bytes \
         already received); each such connection was reset",
        C,
        total(Counter::FastPathDuplicatedBytes),
    )?;
    single(
        e,
        "sluice_pipes_in_use",
        "Kernel pipes held by connections with bytes in flight (splice engine)",
        G,
        total(Counter::PipesInUse),
    )?;
    single(
        e,
        "sluice_pipe_pool_empty",
        "Times a direction was relayed by copying because the pipe pool was empty",
        C,
        total(Counter::PipePoolEmpty),
    )?;
    single(
        e,
        "sluice_source_ports_exhausted",
        "Upstream connects that found no free source port (EADDRNOTAVAIL); add \
         source_addresses to the listener",
        C,
        total(Counter::SourcePortsExhausted),
    )?;
    family(
        e,
        "sluice_upstream_up",
        "1 while a configured upstream HOST:PORT of a listener is usable: it resolved and at \
         least one of its addresses passes the health checks (addresses of listeners without \
         health checks count as up); 0 otherwise",
        G,
        upstreams.iter().map(|u| {
            (
                [
                    ("listener", u.listener.as_str()),
                    ("upstream", u.upstream.as_str()),
                ],
                u64::from(u.up()),
            )
        }),
    )?;
    single(
        e,
        "sluice_upstream_addresses_down",
        "Upstream addresses the health checks find down now, over all listeners",
        G,
        sup(Counter::UpstreamsDown),
    )?;
    single(
        e,
        "sluice_upstream_state_changes",
        "Upstream addresses that went down or came back up (health checks)",
        C,
        sup(Counter::UpstreamStateChanges),
    )?;
    single(
        e,
        "sluice_upstream_addresses_refused",
        "Loopback, private, link-local, unspecified or multicast addresses in DNS answers for \
         upstream or decoy names, not dialled (one per address per lookup)",
        C,
        sup(Counter::UpstreamAddressesRefused),
    )?;
    single(
        e,
        "sluice_reloads",
        "Configuration reloads applied (SIGHUP or sluicectl reload)",
        C,
        sup(Counter::Reloads),
    )?;
    single(
        e,
        "sluice_reloads_failed",
        "Configuration reloads refused (the file did not parse or validate, or needs a \
         restart); the running configuration was kept",
        C,
        sup(Counter::ReloadsFailed),
    )?;
    single(
        e,
        "sluice_metrics_http_refused",
        "Connections to this metrics listener answered 503 because too many were open",
        C,
        sup(Counter::MetricsHttpRefused),
    )?;
    let histos = prom_histograms(src);
    for k in [
        Kind::Connect,
        Kind::FirstByte,
        Kind::Duration,
        Kind::BytesUp,
    ] {
        let (name, unit, help, _) = prom_name(k);
        let mut me = e.encode_descriptor(name, help, Some(&unit), MetricType::Histogram)?;
        for (listener, kind, sum, count, buckets) in
            histos.iter().filter(|h| prom_name(h.1).0 == name)
        {
            let mut labels = vec![("listener", listener.as_str())];
            if let Some(dir) = prom_name(*kind).3 {
                labels.insert(0, ("direction", dir));
            }
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
