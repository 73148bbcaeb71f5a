//! Latency and size histograms (hdrhistogram): recorded by each worker, merged by the
//! supervisor.
//!
//! - **Worker side** ([`Histos`]): per listener, five preallocated histograms — upstream connect
//!   time, time to the first upstream byte, connection duration, bytes client→upstream and
//!   upstream→client per connection. Recording is a bounds-checked increment in a counts array
//!   allocated at start: no allocation, no lock, no syscall (the clock is read 3–4 times per
//!   connection, at accept, connect start/end, first upstream byte and close; never per message).
//! - **Shipping**: on the worker's timer tick (every [`PUBLISH_TICKS`] ticks, only if something
//!   was recorded) the worker serializes its cumulative histograms with hdrhistogram's V2
//!   serializer into its own slot of a memfd shared with the supervisor ([`Region`]). The slot
//!   is a seqlock: sequence odd while writing, even when done; the writer's pid tags whose
//!   histograms they are.
//! - **Supervisor side** ([`Merged`]): on every read (and just before a dead worker's slot is
//!   reused) it reads each slot, subtracts what it saw last time from that same pid and adds the
//!   difference to a cumulative total. A worker that dies or restarts therefore loses nothing it
//!   had published; a reload (SIGHUP) does not touch the totals; `reset` clears the totals only.
//!
//! Nothing here knows an address: histograms are keyed by listener name.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::sys::SharedMap;

/// What a histogram measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Kind {
    /// Upstream connect: first CONNECT submitted → connection established (failover included).
    Connect = 0,
    /// Upstream connection established → first upstream byte seen by the worker (in the splice
    /// engine: the first completed splice of the upstream→client direction).
    FirstByte,
    /// Client accepted → connection closed (relayed connections only).
    Duration,
    /// Bytes client → upstream, per relayed connection.
    BytesUp,
    /// Bytes upstream → client, per relayed connection.
    BytesDown,
}

pub(crate) const KINDS: [Kind; 5] = [
    Kind::Connect,
    Kind::FirstByte,
    Kind::Duration,
    Kind::BytesUp,
    Kind::BytesDown,
];

impl Kind {
    /// Name in `sluicectl stats`, stats.json and (with a unit suffix) Prometheus.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::FirstByte => "first_byte",
            Kind::Duration => "duration",
            Kind::BytesUp => "bytes_client_to_upstream",
            Kind::BytesDown => "bytes_upstream_to_client",
        }
    }

    /// Times are recorded in microseconds, sizes in bytes.
    pub(crate) fn is_time(self) -> bool {
        matches!(self, Kind::Connect | Kind::FirstByte | Kind::Duration)
    }

    /// A new empty histogram for this kind, fixed range (no auto-resize: never allocates).
    pub(crate) fn histogram(self) -> Histogram<u64> {
        let high = if self.is_time() {
            // One day in microseconds.
            86_400_000_000
        } else {
            // 1 TiB.
            1 << 40
        };
        Histogram::new_with_bounds(1, high, 2).expect("static bounds are valid")
    }
}

/// The five histograms of one listener.
pub(crate) type Set = [Histogram<u64>; 5];

fn new_set() -> Set {
    KINDS.map(Kind::histogram)
}

/// Bytes one serialized histogram of `kind` can take at most.
fn max_encoded(kind: Kind) -> usize {
    // V2 header (40 bytes) + a zigzag LEB128 varint (≤ 9 bytes) per counts-array slot.
    40 + kind.histogram().distinct_values() * 9
}

/// Slot layout, in u64 words: sequence, pid, payload length, then the payload.
const HEADER_WORDS: usize = 3;

/// Bytes of one worker's slot for `listeners` listeners (rounded up to whole words).
pub(crate) fn slot_bytes(listeners: usize) -> usize {
    let payload: usize = KINDS.iter().map(|&k| max_encoded(k)).sum::<usize>() * listeners;
    (HEADER_WORDS * 8 + payload).div_ceil(4096) * 4096
}

/// The memfd region holding every worker's latest serialized histograms.
pub struct Region {
    map: SharedMap,
    workers: usize,
    slot_words: usize,
}

impl Region {
    pub fn bytes(workers: usize, listeners: usize) -> usize {
        workers * slot_bytes(listeners)
    }

    /// A new zeroed region (the supervisor makes it once, before the first worker).
    pub fn new(workers: usize, listeners: usize) -> std::io::Result<Region> {
        let map = SharedMap::new("sluice-histograms", Self::bytes(workers, listeners))?;
        Ok(Region {
            map,
            workers,
            slot_words: slot_bytes(listeners) / 8,
        })
    }

    /// Maps the region a supervisor passed down.
    pub fn from_fd(
        fd: std::os::fd::OwnedFd,
        workers: usize,
        listeners: usize,
    ) -> std::io::Result<Region> {
        let map = SharedMap::from_fd(fd, Self::bytes(workers, listeners))?;
        Ok(Region {
            map,
            workers,
            slot_words: slot_bytes(listeners) / 8,
        })
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.map.fd()
    }

    fn slot(&self, worker: usize) -> &[AtomicU64] {
        &self.map.atomics()[worker * self.slot_words..(worker + 1) * self.slot_words]
    }

    /// Writes `payload` into `worker`'s slot (seqlock writer; only that worker writes it).
    /// Returns false when it does not fit (it always should: the slot is sized for the worst).
    pub(crate) fn write(&self, worker: usize, pid: u32, payload: &[u8]) -> bool {
        let slot = self.slot(worker);
        if payload.len() > (slot.len() - HEADER_WORDS) * 8 {
            return false;
        }
        let seq = slot[0].load(Ordering::Relaxed);
        slot[0].store(seq | 1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        slot[1].store(u64::from(pid), Ordering::Relaxed);
        slot[2].store(payload.len() as u64, Ordering::Relaxed);
        for (i, chunk) in payload.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            slot[HEADER_WORDS + i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        slot[0].store((seq | 1) + 1, Ordering::Release);
        true
    }

    /// A consistent copy of `worker`'s slot: (pid, payload); None if never written or the
    /// writer kept it busy through a few attempts.
    pub(crate) fn read(&self, worker: usize) -> Option<(u32, Vec<u8>)> {
        let slot = self.slot(worker);
        for _ in 0..100 {
            let s1 = slot[0].load(Ordering::Acquire);
            if s1 == 0 {
                return None;
            }
            if s1 & 1 == 1 {
                std::thread::yield_now();
                continue;
            }
            let pid = slot[1].load(Ordering::Relaxed) as u32;
            let len =
                (slot[2].load(Ordering::Relaxed) as usize).min((slot.len() - HEADER_WORDS) * 8);
            let mut out = Vec::with_capacity(len.next_multiple_of(8));
            for w in &slot[HEADER_WORDS..HEADER_WORDS + len.div_ceil(8)] {
                out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            out.truncate(len);
            std::sync::atomic::fence(Ordering::Acquire);
            if slot[0].load(Ordering::Relaxed) == s1 {
                return Some((pid, out));
            }
        }
        None
    }

    pub(crate) fn workers(&self) -> usize {
        self.workers
    }
}

/// Per-connection timestamps, in microseconds since the worker started (24 bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnTimes {
    accepted_us: u64,
    /// Offsets from `accepted_us`; `u32::MAX` = not yet.
    connect_start: u32,
    connected: u32,
    first_byte: bool,
}

/// A worker's histograms.
pub struct Histos {
    enabled: bool,
    started: Instant,
    sets: Vec<Set>,
    dirty: bool,
    ticks: u32,
    region: Option<Region>,
    index: usize,
    pid: u32,
    buf: Vec<u8>,
    serializer: V2Serializer,
    warned: bool,
}

/// Ticks (250 ms each) between two publications.
pub(crate) const PUBLISH_TICKS: u32 = 2;

impl Histos {
    /// Histograms that record nothing (before the worker set them up, or `histograms = false`).
    pub fn disabled() -> Histos {
        Histos {
            enabled: false,
            started: Instant::now(),
            sets: Vec::new(),
            dirty: false,
            ticks: 0,
            region: None,
            index: 0,
            pid: 0,
            buf: Vec::new(),
            serializer: V2Serializer::new(),
            warned: false,
        }
    }

    /// Worker `index`'s histograms for `listeners` listeners, published into `region`.
    pub fn new(listeners: usize, region: Option<Region>, index: usize) -> Histos {
        // Grows (rarely) to what the histograms need; serialized once a publication, not per
        // connection.
        let buf = Vec::with_capacity(64 * 1024);
        Histos {
            enabled: true,
            started: Instant::now(),
            sets: (0..listeners).map(|_| new_set()).collect(),
            dirty: false,
            ticks: 0,
            region,
            index,
            pid: std::process::id(),
            buf,
            serializer: V2Serializer::new(),
            warned: false,
        }
    }

    #[inline]
    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    #[inline]
    fn since(&self, t: &ConnTimes) -> u32 {
        self.now_us()
            .saturating_sub(t.accepted_us)
            .min(u64::from(u32::MAX - 1)) as u32
    }

    /// Timestamps for a connection just accepted.
    #[inline]
    pub fn accepted(&self) -> ConnTimes {
        ConnTimes {
            accepted_us: if self.enabled { self.now_us() } else { 0 },
            connect_start: u32::MAX,
            connected: u32::MAX,
            first_byte: false,
        }
    }

    /// The first upstream connect of this connection is being submitted (later attempts of the
    /// failover keep the first start).
    #[inline]
    pub fn connecting(&self, t: &mut ConnTimes) {
        if self.enabled && t.connect_start == u32::MAX {
            t.connect_start = self.since(t);
        }
    }

    /// The upstream connection is established.
    #[inline]
    pub fn connected(&mut self, listener: usize, t: &mut ConnTimes) {
        if !self.enabled {
            return;
        }
        let now = self.since(t);
        t.connected = now;
        let start = if t.connect_start == u32::MAX {
            0
        } else {
            t.connect_start
        };
        self.record(
            listener,
            Kind::Connect,
            u64::from(now.saturating_sub(start)),
        );
    }

    /// Bytes moved upstream → client: the first time, records the time to first byte.
    #[inline]
    pub fn upstream_bytes(&mut self, listener: usize, t: &mut ConnTimes) {
        if !self.enabled || t.first_byte || t.connected == u32::MAX {
            return;
        }
        t.first_byte = true;
        let now = self.since(t);
        self.record(
            listener,
            Kind::FirstByte,
            u64::from(now.saturating_sub(t.connected)),
        );
    }

    /// Like [`Histos::upstream_bytes`], for a first byte the kernel moved `ago_us` microseconds
    /// ago (the sockmap fast path stamps it in eBPF; user space learns it at close).
    #[inline]
    pub(crate) fn upstream_bytes_ago(&mut self, listener: usize, t: &mut ConnTimes, ago_us: u64) {
        if !self.enabled || t.first_byte || t.connected == u32::MAX {
            return;
        }
        t.first_byte = true;
        let at = self
            .since(t)
            .saturating_sub(ago_us.min(u64::from(u32::MAX)) as u32);
        self.record(
            listener,
            Kind::FirstByte,
            u64::from(at.saturating_sub(t.connected)),
        );
    }

    /// The connection is gone; `bytes` = [client→upstream, upstream→client]. Only connections
    /// that reached their upstream are recorded.
    #[inline]
    pub fn closed(&mut self, listener: usize, t: &ConnTimes, bytes: [u64; 2]) {
        if !self.enabled || t.connected == u32::MAX {
            return;
        }
        let d = self.now_us().saturating_sub(t.accepted_us);
        self.record(listener, Kind::Duration, d);
        self.record(listener, Kind::BytesUp, bytes[0]);
        self.record(listener, Kind::BytesDown, bytes[1]);
    }

    #[inline]
    fn record(&mut self, listener: usize, kind: Kind, v: u64) {
        if let Some(set) = self.sets.get_mut(listener) {
            set[kind as usize].saturating_record(v);
            self.dirty = true;
        }
    }

    /// Called on every timer tick: publishes every [`PUBLISH_TICKS`] ticks if anything changed.
    pub(crate) fn tick(&mut self) {
        self.ticks += 1;
        if self.ticks >= PUBLISH_TICKS {
            self.ticks = 0;
            self.publish();
        }
    }

    /// Serializes every histogram into this worker's slot (not on the hot path).
    pub fn publish(&mut self) {
        if !self.dirty || !self.enabled {
            return;
        }
        let Some(region) = &self.region else {
            return;
        };
        self.buf.clear();
        for set in &self.sets {
            for h in set {
                if let Err(e) = self.serializer.serialize(h, &mut self.buf) {
                    tracing::warn!("cannot serialize a histogram: {e:?}");
                    return;
                }
            }
        }
        if region.write(self.index, self.pid, &self.buf) {
            self.dirty = false;
        } else if !self.warned {
            self.warned = true;
            tracing::warn!("histograms do not fit their shared slot; not published");
        }
    }
}

/// Decodes a worker's payload: `listeners` sets of five histograms.
pub fn decode(payload: &[u8], listeners: usize) -> Option<Vec<Set>> {
    let mut de = Deserializer::new();
    let mut cur = Cursor::new(payload);
    let mut out = Vec::with_capacity(listeners);
    for _ in 0..listeners {
        let mut set = new_set();
        for h in &mut set {
            let got: Histogram<u64> = de.deserialize(&mut cur).ok()?;
            h.add(&got).ok()?;
        }
        out.push(set);
    }
    Some(out)
}

/// The supervisor's merged, cumulative histograms.
pub(crate) struct Merged {
    listeners: Vec<String>,
    total: Vec<Set>,
    /// What was last seen in each worker's slot: (pid, histograms).
    last: Vec<Option<(u32, Vec<Set>)>>,
    pub since: std::time::SystemTime,
}

impl Merged {
    pub fn new(listeners: Vec<String>, workers: usize) -> Merged {
        Merged {
            total: listeners.iter().map(|_| new_set()).collect(),
            listeners,
            last: vec![None; workers],
            since: std::time::SystemTime::now(),
        }
    }

    /// Folds in what every worker published since the last call.
    pub(crate) fn poll(&mut self, region: &Region) {
        let n = self.listeners.len();
        for w in 0..region.workers().min(self.last.len()) {
            let Some((pid, payload)) = region.read(w) else {
                continue;
            };
            let Some(sets) = decode(&payload, n) else {
                continue;
            };
            let prev = match &self.last[w] {
                Some((p, prev)) if *p == pid => Some(prev),
                _ => None,
            };
            for (l, set) in sets.iter().enumerate() {
                for (k, h) in set.iter().enumerate() {
                    let mut delta = h.clone();
                    if let Some(prev) = prev
                        && delta.subtract(&prev[l][k]).is_err()
                    {
                        // Counts went backwards: not the same run; take it whole.
                        delta = h.clone();
                    }
                    let _ = self.total[l][k].add(&delta);
                }
            }
            self.last[w] = Some((pid, sets));
        }
    }

    /// Clears the totals (`sluicectl stats --reset`); later recordings count from now.
    pub(crate) fn reset(&mut self) {
        for set in &mut self.total {
            for h in set {
                h.reset();
            }
        }
        self.since = std::time::SystemTime::now();
    }

    pub(crate) fn listeners(&self) -> &[String] {
        &self.listeners
    }

    /// The merged histograms of listener `l`.
    pub(crate) fn set(&self, l: usize) -> &Set {
        &self.total[l]
    }

    /// The summary `sluicectl stats` and stats.json show.
    pub(crate) fn report(&self) -> Report {
        Report {
            since_unix_s: self
                .since
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            listeners: self
                .listeners
                .iter()
                .zip(&self.total)
                .map(|(name, set)| ListenerReport {
                    name: name.clone(),
                    histograms: KINDS
                        .iter()
                        .map(|&k| Summary::of(k, &set[k as usize]))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Percentiles of one histogram. Times are in milliseconds (fractional), sizes in bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub name: String,
    pub unit: String,
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(kind: Kind, h: &Histogram<u64>) -> Summary {
        let scale = if kind.is_time() { 1000.0 } else { 1.0 };
        let q = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / scale
            }
        };
        Summary {
            name: kind.name().to_string(),
            unit: if kind.is_time() { "ms" } else { "bytes" }.to_string(),
            count: h.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            p9999: q(0.9999),
            max: if h.is_empty() {
                0.0
            } else {
                h.max() as f64 / scale
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListenerReport {
    pub name: String,
    pub histograms: Vec<Summary>,
}

/// What `sluicectl stats --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// When the totals started (daemon start or the last reset), Unix seconds.
    pub since_unix_s: u64,
    pub listeners: Vec<ListenerReport>,
}

/// The kinds the stats page charts over a recent window (latency; sizes and durations stay
/// cumulative).
pub(crate) const RECENT_KINDS: [Kind; 2] = [Kind::Connect, Kind::FirstByte];

/// Percentiles of the last minute or so, from the differences of the merged histograms: the
/// stats page's "now", where percentiles since start flatten with uptime.
///
/// Snapshots of [`RECENT_KINDS`] are taken at most every [`Window::STEP`] (the metrics thread
/// asks every step, the stats page every second); the newest one at least [`Window::SPAN`] old
/// is the baseline, so the window is `SPAN` to `SPAN + STEP` long (shorter in the first
/// minute after start: it then covers what was recorded since). Memory: at most
/// `SPAN / STEP + 2` snapshots of two histograms per listener (about 30 KB each).
#[derive(Default)]
pub(crate) struct Window {
    snapshots: std::collections::VecDeque<(std::time::Instant, Vec<[Histogram<u64>; 2]>)>,
}

/// One listener's recent percentiles; `all` merges every listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct RecentReport {
    /// Seconds the window covers (shorter right after the first request).
    pub window_s: f64,
    pub all: Vec<Summary>,
    pub listeners: Vec<ListenerReport>,
}

impl Window {
    pub(crate) const SPAN: std::time::Duration = std::time::Duration::from_secs(60);
    pub(crate) const STEP: std::time::Duration = std::time::Duration::from_secs(10);

    /// The recent percentiles of `merged` at `now` (taking a snapshot if one is due).
    pub(crate) fn recent(&mut self, merged: &Merged, now: std::time::Instant) -> RecentReport {
        let current: Vec<[Histogram<u64>; 2]> = merged
            .total
            .iter()
            .map(|set| RECENT_KINDS.map(|k| set[k as usize].clone()))
            .collect();
        if self
            .snapshots
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Self::STEP)
        {
            self.snapshots.push_back((now, current.clone()));
        }
        // Keep one snapshot at least SPAN old (the baseline), drop the ones before it.
        while self.snapshots.len() > 1 && now.duration_since(self.snapshots[1].0) >= Self::SPAN {
            self.snapshots.pop_front();
        }
        let (since, base) = self.snapshots.front().expect("pushed above");
        let mut all = RECENT_KINDS.map(Kind::histogram);
        let listeners = merged
            .listeners
            .iter()
            .enumerate()
            .map(|(l, name)| {
                let histograms = RECENT_KINDS
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| {
                        let mut delta = current[l][i].clone();
                        // A reset (or a listener not there then) since the baseline: what
                        // there is now is all recent.
                        if let Some(b) = base.get(l)
                            && delta.subtract(&b[i]).is_err()
                        {
                            delta = current[l][i].clone();
                        }
                        let _ = all[i].add(&delta);
                        Summary::of(k, &delta)
                    })
                    .collect();
                ListenerReport {
                    name: name.clone(),
                    histograms,
                }
            })
            .collect();
        RecentReport {
            window_s: now.duration_since(*since).as_secs_f64(),
            all: RECENT_KINDS
                .iter()
                .zip(&all)
                .map(|(&k, h)| Summary::of(k, h))
                .collect(),
            listeners,
        }
    }
}

/// The supervisor's histograms and the region they are read from, shared by the control
/// socket and the HTTP thread.
pub(crate) struct Stats {
    pub region: Region,
    pub merged: std::sync::Mutex<Merged>,
}

impl Stats {
    /// Reads the workers' slots and returns the merged state, locked.
    pub(crate) fn fresh(&self) -> std::sync::MutexGuard<'_, Merged> {
        let mut m = self.merged.lock().unwrap_or_else(|e| e.into_inner());
        m.poll(&self.region);
        m
    }
}

static STATS: std::sync::OnceLock<std::sync::Arc<Stats>> = std::sync::OnceLock::new();

/// Installs the daemon's histograms (once, by the supervisor).
pub(crate) fn install(stats: std::sync::Arc<Stats>) {
    let _ = STATS.set(stats);
}

/// The daemon's histograms, if this process is a supervisor that installed them.
pub(crate) fn installed() -> Option<&'static std::sync::Arc<Stats>> {
    STATS.get()
}

/// Control-socket commands this module answers (`stats`, `stats-reset`); None = not ours.
pub(crate) fn control_command(cmd: &str) -> Option<String> {
    let reply = match cmd {
        "stats" | "stats-reset" => match installed() {
            None => serde_json::json!({ "error": "histograms are not available" }),
            Some(s) => {
                // The reply is what the totals held; `stats-reset` clears them after.
                let mut m = s.fresh();
                let report = m.report();
                if cmd == "stats-reset" {
                    m.reset();
                }
                serde_json::to_value(report).unwrap_or_default()
            }
        },
        _ => return None,
    };
    Some(reply.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_recent_window_shows_what_was_recorded_in_the_last_minute() {
        use std::time::Duration;
        let fb = Kind::FirstByte as usize;
        let mut m = Merged::new(vec!["a".into(), "b".into()], 1);
        m.total[0][fb].record_n(1_000, 100).unwrap();
        let mut w = Window::default();
        let t0 = std::time::Instant::now();
        let r = w.recent(&m, t0);
        assert_eq!(r.all[1].count, 0, "nothing recorded since the first look");
        m.total[1][fb].record_n(50_000, 10).unwrap();
        let r = w.recent(&m, t0 + Duration::from_secs(5));
        assert_eq!(
            (r.all[1].count, r.listeners[1].histograms[1].count),
            (10, 10)
        );
        assert!((r.all[1].p50 - 50.0).abs() < 1.0, "{r:?}");
        let _ = w.recent(&m, t0 + Duration::from_secs(10));
        m.total[0][fb].record_n(2_000, 5).unwrap();
        let r = w.recent(&m, t0 + Duration::from_secs(70));
        assert_eq!(r.window_s, 60.0);
        assert_eq!(
            r.all[1].count, 5,
            "only what came after the baseline: {r:?}"
        );
        assert!((r.all[1].p99 - 2.0).abs() < 0.1, "{r:?}");
        assert!(w.snapshots.len() <= 3);
        // A reset since the baseline: what there is now is all recent.
        m.reset();
        m.total[0][fb].record_n(3_000, 2).unwrap();
        let r = w.recent(&m, t0 + Duration::from_secs(71));
        assert_eq!(r.all[1].count, 2);
    }

    use super::*;

    #[test]
    fn worker_histograms_reach_the_supervisor_and_survive_a_restart() {
        let region = Region::new(2, 2).unwrap();
        let fd = region.fd().try_clone_to_owned().unwrap();
        let mut merged = Merged::new(vec!["a".into(), "b".into()], 2);
        let mut h = Histos::new(2, Some(Region::from_fd(fd, 2, 2).unwrap()), 1);
        let mut t = h.accepted();
        h.connecting(&mut t);
        h.connected(1, &mut t);
        h.upstream_bytes(1, &mut t);
        h.closed(1, &t, [10, 2000]);
        h.publish();
        merged.poll(&region);
        merged.poll(&region); // the same snapshot twice counts once
        let r = merged.report();
        assert_eq!(r.listeners[1].histograms[Kind::Connect as usize].count, 1);
        // Two significant digits: values are exact to 1 %.
        let max = r.listeners[1].histograms[Kind::BytesDown as usize].max;
        assert!((2000.0..2020.0).contains(&max), "{max}");
        assert_eq!(r.listeners[0].histograms[0].count, 0);

        // A restarted worker (another pid) starts from zero; the total keeps the old one's.
        let mut h2 = Histos::new(
            2,
            Some(Region::from_fd(region.fd().try_clone_to_owned().unwrap(), 2, 2).unwrap()),
            1,
        );
        h2.pid += 1;
        let mut t = h2.accepted();
        h2.connected(1, &mut t);
        h2.closed(1, &t, [1, 1]);
        h2.publish();
        merged.poll(&region);
        assert_eq!(
            merged.report().listeners[1].histograms[Kind::Duration as usize].count,
            2
        );

        merged.reset();
        assert_eq!(
            merged.report().listeners[1].histograms[Kind::Duration as usize].count,
            0
        );
        merged.poll(&region);
        assert_eq!(
            merged.report().listeners[1].histograms[Kind::Duration as usize].count,
            0,
            "nothing new since the reset"
        );
    }

    #[test]
    fn unconnected_connections_and_disabled_histograms_record_nothing() {
        let mut h = Histos::new(1, None, 0);
        let t = h.accepted();
        h.closed(0, &t, [1, 1]);
        assert!(h.sets[0].iter().all(|h| h.is_empty()));
        let mut off = Histos::disabled();
        let mut t = off.accepted();
        off.connected(0, &mut t);
        off.closed(0, &t, [1, 1]);
        assert!(!off.dirty);
    }

    #[test]
    fn a_full_slot_fits_the_worst_case() {
        let region = Region::new(1, 1).unwrap();
        let mut h = Histos::new(
            1,
            Some(Region::from_fd(region.fd().try_clone_to_owned().unwrap(), 1, 1).unwrap()),
            0,
        );
        // One value in every counts slot: the largest encoding.
        for k in KINDS {
            let mut v = 1u64;
            while v < k.histogram().high() {
                h.sets[0][k as usize].saturating_record(v);
                v = h.sets[0][k as usize].next_non_equivalent(v);
            }
        }
        h.dirty = true;
        h.publish();
        assert!(!h.dirty, "published");
        let (_, payload) = region.read(0).unwrap();
        assert!(decode(&payload, 1).is_some());
    }
}
