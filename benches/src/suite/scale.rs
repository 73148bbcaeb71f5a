//! The scale workload (`--only scale`, never in CI): `scale_conns` idle connections (100 000 in a
//! full run) held through one `sluice forward` whose supervisor sizes its workers itself, from
//! 127.77.1.x client sources to the local echo upstream, while 1000 other connections exchange
//! 64-byte messages at a fixed rate.
//!
//! Reported: connections held, time to establish them, the relay's user memory per connection
//! (RSS and PSS of its process tree, after − before), the kernel's TCP buffer memory from
//! /proc/net/sockstat and slab memory from /proc/meminfo (all sockets of the machine: clients,
//! relay and upstream), and the
//! request/response latency of the active connections while the idle ones are held.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{ECHO_PORT, Measurement, Suite, upstream};
use crate::peers::Candidate;
use crate::procstat;
use crate::wire::{Latency, LoadResult};

/// Message rate of the active connections while the idle ones are held.
const ACTIVE_RATE: u32 = 5_000;
/// How long the relay's CPU time is measured while it holds only idle connections.
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(5);
/// Upstream connections one relay source address carries at most (ephemeral ports ~28k).
const PER_SOURCE: usize = 25_000;

/// What the scale workload measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scale {
    pub attempted: usize,
    pub held: usize,
    pub setup_secs: f64,
    pub workers: usize,
    pub rss_kb_per_conn: Option<f64>,
    pub pss_kb_per_conn: Option<f64>,
    pub rss_before_kb: u64,
    pub rss_after_kb: u64,
    /// TCP sockets in use on the machine (sockstat `inuse`), before and while held.
    pub tcp_inuse_before: u64,
    pub tcp_inuse_after: u64,
    /// Kernel TCP memory (sockstat `mem`, pages → KB), before and while held.
    pub tcp_mem_kb_before: u64,
    pub tcp_mem_kb_after: u64,
    /// Kernel slab memory (/proc/meminfo `Slab`, KB), before and while held: the sockets
    /// themselves live there, not in `TCP: mem` (which counts buffers).
    #[serde(default)]
    pub slab_kb_before: u64,
    #[serde(default)]
    pub slab_kb_after: u64,
    /// The relay's CPU time (whole process tree) per second of wall time while only the idle
    /// connections were held, over [`IDLE_CPU_WINDOW`]: what holding them costs.
    #[serde(default)]
    pub idle_cpu_ms_per_s: Option<f64>,
    /// The active connections' latency at [`ACTIVE_RATE`] while the idle ones are held.
    pub active_rate: u32,
    pub active_conns: usize,
    pub active_sent: u64,
    pub active_received: u64,
    pub active_latency: Option<Latency>,
}

/// `Slab:` of /proc/meminfo, in KB.
fn slab_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// (`inuse`, `mem` in KB) of the TCP line of /proc/net/sockstat.
fn sockstat() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) else {
        return (0, 0);
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .position(|w| *w == name)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // `mem` is in pages.
    let page_kb = 4;
    (field("inuse"), field("mem") * page_kb)
}

impl Suite {
    pub(super) fn scale(&mut self, cand: &Candidate) -> Result<()> {
        let p = self.params.clone();
        let total = p.scale_conns + p.rr_conns;
        let sources = total.div_ceil(PER_SOURCE).max(1);
        let mut args = vec![
            "--max-connections".to_string(),
            (total + total / 10).to_string(),
        ];
        for i in 0..sources {
            args.push("--source-address".into());
            args.push(Ipv4Addr::new(127, 78, 0, 1 + i as u8).to_string());
        }
        let up = upstream(ECHO_PORT);
        let log = self.log_path(&format!("{}-scale", cand.name));
        let relay = cand
            .start_with(&self.env, up, &log, &args)?
            .context("scale needs a relay")?;
        self.meter.relay = Some(relay.pid());
        let workers = relay
            .status()
            .and_then(|s| s["workers"].as_array().map(Vec::len))
            .unwrap_or(0);
        let target = cand.target(up);
        std::thread::sleep(Duration::from_millis(500));
        let before = procstat::tree_mem(relay.pid());
        let (inuse_before, tcp_mem_before) = sockstat();
        let slab_before = slab_kb();
        let setup_max_s = 180;
        // Setting up 100 000 at once, some SYNs wait for a retransmission.
        let patient = ["--patience-ms", "20000", "--conn-timeout-ms", "15000"];
        let gens = self.spawn_idle(
            target,
            p.scale_conns,
            setup_max_s,
            setup_max_s + 120,
            &patient,
            "scale-idle",
        )?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(setup_max_s + 15);
        let (attempted, held, setup_secs) = self.collect_idle(&gens, deadline);
        std::thread::sleep(Duration::from_secs(1));
        let after = procstat::tree_mem(relay.pid());
        let (inuse_after, tcp_mem_after) = sockstat();
        let slab_after = slab_kb();
        let cpu_before = procstat::tree_runtime_s(relay.pid());
        std::thread::sleep(IDLE_CPU_WINDOW);
        let idle_cpu_ms_per_s = (procstat::tree_runtime_s(relay.pid()) - cpu_before) * 1e3
            / IDLE_CPU_WINDOW.as_secs_f64();
        let refusals = relay.status().map_or(String::new(), |s| {
            [
                "refused_full",
                "upstream_unreachable",
                "source_ports_exhausted",
                "relay_errors",
                "idle_timeout",
            ]
            .iter()
            .map(|k| format!("{k} {}", s["totals"][*k]))
            .collect::<Vec<_>>()
            .join(", ")
        });
        self.progress(&format!(
            "{}: scale: {held}/{attempted} idle held in {setup_secs:.1} s by {workers} workers ({refusals}); relay CPU while they idle: {idle_cpu_ms_per_s:.1} ms/s",
            cand.name
        ));

        // The active connections, while the idle ones are held.
        let lg = self.rr_loadgen(target, &ACTIVE_RATE.to_string(), "scale-rr")?;
        let deadline = Instant::now()
            + Duration::from_millis(p.rr_warmup_ms + p.rr_measure_ms)
            + Duration::from_secs(60);
        let (_, results) = self.collect(&lg, deadline, 1);
        lg.finish(Instant::now() + Duration::from_secs(3));
        let mut scale = Scale {
            attempted,
            held,
            setup_secs,
            workers,
            rss_kb_per_conn: (held > 0)
                .then(|| (after.rss_kb as f64 - before.rss_kb as f64) / held as f64),
            pss_kb_per_conn: (held > 0)
                .then(|| (after.pss_kb as f64 - before.pss_kb as f64) / held as f64),
            rss_before_kb: before.rss_kb,
            rss_after_kb: after.rss_kb,
            tcp_inuse_before: inuse_before,
            tcp_inuse_after: inuse_after,
            tcp_mem_kb_before: tcp_mem_before,
            tcp_mem_kb_after: tcp_mem_after,
            slab_kb_before: slab_before,
            slab_kb_after: slab_after,
            idle_cpu_ms_per_s: (held > 0).then_some(idle_cpu_ms_per_s),
            active_rate: ACTIVE_RATE,
            ..Scale::default()
        };
        for r in results {
            if let LoadResult::Rr {
                sent,
                received,
                latency,
                conns,
                ..
            } = r
            {
                self.progress(&format!(
                    "{}: scale: {conns} active at {ACTIVE_RATE} msg/s beside {held} idle: p50 {:.3} ms, p99 {:.3} ms, {received}/{sent} answered",
                    cand.name,
                    latency.p50_us / 1e3,
                    latency.p99_us / 1e3,
                ));
                scale.active_conns = conns;
                scale.active_sent = sent;
                scale.active_received = received;
                scale.active_latency = Some(latency);
            }
        }
        for lg in gens {
            lg.finish(Instant::now() + Duration::from_secs(10));
        }
        drop(relay);
        if scale.active_latency.is_none() {
            bail!("the active connections' load generator gave no result");
        }
        self.push(Measurement {
            candidate: cand.name.to_owned(),
            workload: "scale".into(),
            scale: Some(scale),
            ..Measurement::default()
        });
        Ok(())
    }
}
