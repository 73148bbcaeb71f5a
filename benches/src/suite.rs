//! The end-to-end run: every candidate, every workload, one run, one machine; CPU and memory read
//! from `/proc` around each measurement window.
//!
//! Order: the upstreams (iperf3 server, echo server) start once; then for each candidate, each
//! workload group gets a freshly started relay (so that pools, TIME_WAIT sockets and caches of one
//! workload do not colour the next) which is stopped afterwards. Every wait is bounded; every
//! process is a [`Guard`].
//!
//! CPU accounting per window: relay = the candidate's process tree; explained = relay + upstream
//! servers + load generators (live ones read from `/proc`, exited ones through
//! `RUSAGE_CHILDREN`) + this process; machine = `/proc/stat`. What the machine spent beyond the
//! explained part is someone else's: above [`DISTURBED_FRAC`] of the machine's capacity the
//! window is flagged "disturbed".

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::net::{self, ECHO_PORT, IPERF_PORT, UPSTREAM_IP};
use crate::peers::{self, Candidate, Env, Guard, Kind, LineChild};
use crate::procstat::{self, Cpu, Machine};
use crate::wire::{Latency, Line, LoadResult};

/// A window where more than this fraction of the machine's CPU went to processes outside the
/// benchmark is flagged as disturbed.
pub const DISTURBED_FRAC: f64 = 0.10;

/// Idle connections one load-generator process holds at most (RLIMIT_NOFILE is 20000).
const IDLE_PER_PROCESS: usize = 15_000;

mod scale;
pub mod tlsflood;

/// The workloads, as `--only` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    Bulk,
    Rr,
    Connrate,
    Idle,
    /// Most connections chatting (request/response at one rate) while a few move media
    /// (paced blocks both ways through the same relay and echo server).
    Mixed,
    /// 100 000 idle connections held through Sluice while 1000 others exchange messages (only
    /// when named: `--only scale`).
    Scale,
    /// One host floods a TLS port with handshakes while a client measures its handshake
    /// latency: Sluice's WhatsApp TLS port beside nginx (only when named: `--only tls-flood`).
    TlsFlood,
}

/// Sizes and durations of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub quick: bool,
    pub bulk_secs: u32,
    pub rr_conns: usize,
    pub rr_rates: Vec<u32>,
    pub rr_warmup_ms: u64,
    pub rr_measure_ms: u64,
    pub conn_concurrency: usize,
    pub conn_measure_ms: u64,
    /// Mixed workload: the chat's rate (its connections are `rr_conns`), and the media
    /// connections beside it with each one's rate one way.
    #[serde(default)]
    pub mixed_rate: u32,
    #[serde(default)]
    pub media_conns: usize,
    #[serde(default)]
    pub media_mbps: u32,
    pub idle_conns: usize,
    /// socat forks a process per connection: it gets fewer.
    pub idle_conns_socat: usize,
    /// Idle connections of the scale workload.
    #[serde(default)]
    pub scale_conns: usize,
    /// TLS flood: the legitimate client alone, then under the flood, ms; its pace; the
    /// attacker's threads.
    #[serde(default)]
    pub tls_base_ms: u64,
    #[serde(default)]
    pub tls_flood_ms: u64,
    #[serde(default)]
    pub tls_interval_ms: u64,
    #[serde(default)]
    pub tls_flood_threads: usize,
}

impl Params {
    pub fn new(quick: bool) -> Params {
        if quick {
            Params {
                quick,
                bulk_secs: 2,
                rr_conns: 1000,
                rr_rates: vec![5_000, 20_000],
                rr_warmup_ms: 500,
                rr_measure_ms: 2_500,
                conn_concurrency: 50,
                conn_measure_ms: 2_000,
                mixed_rate: 5_000,
                media_conns: 4,
                media_mbps: 250,
                idle_conns: 10_000,
                idle_conns_socat: 1_000,
                scale_conns: 30_000,
                tls_base_ms: 3_000,
                tls_flood_ms: 5_000,
                tls_interval_ms: 40,
                tls_flood_threads: 16,
            }
        } else {
            Params {
                quick,
                bulk_secs: 10,
                rr_conns: 1000,
                rr_rates: vec![5_000, 20_000, 40_000],
                rr_warmup_ms: 1_000,
                rr_measure_ms: 8_000,
                conn_concurrency: 50,
                conn_measure_ms: 8_000,
                mixed_rate: 5_000,
                media_conns: 4,
                media_mbps: 250,
                // One upstream address: the relay's connections to it share ~28k ephemeral ports.
                idle_conns: 25_000,
                idle_conns_socat: 2_000,
                scale_conns: 100_000,
                tls_base_ms: 4_000,
                tls_flood_ms: 8_000,
                tls_interval_ms: 40,
                tls_flood_threads: 16,
            }
        }
    }
}

/// CPU over one measurement window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Window {
    pub wall_s: f64,
    /// Relay process tree; None for `direct`.
    pub relay_user_s: Option<f64>,
    pub relay_sys_s: Option<f64>,
    /// Threads in the relay's tree at the end of the window.
    pub relay_threads: Option<usize>,
    pub upstream_s: f64,
    pub loadgen_s: f64,
    /// Capacity minus the idle (and iowait) time of `/proc/stat`. The kernel measures idle time
    /// exactly (nohz idle accounting), but user and system time by sampling at the tick, and a
    /// load whose wake-ups fall into step with the tick escapes the samples: the direct run's
    /// 5000 msg/s window once summed 0.27 s of ticks while its two processes ran 0.90 s.
    pub machine_busy_s: f64,
    pub machine_irq_s: f64,
    /// Kernel threads (kworkers, ksoftirqd): where the sockmap path forwards bytes, and where
    /// softirq work goes when it is deferred. Part of what a relay adds to the machine.
    #[serde(default)]
    pub kthreads_s: f64,
    /// TCP segments sent, and sent again, by every socket of the run during the window.
    #[serde(default)]
    pub tcp: Option<procstat::Tcp>,
    /// Capacity: wall × cores.
    pub machine_capacity_s: f64,
    /// Machine busy time not explained by relay, upstream, load generators, this process and
    /// kernel threads: interrupts, and processes outside the benchmark.
    pub other_s: f64,
    pub disturbed: bool,
}

impl Window {
    pub fn relay_s(&self) -> Option<f64> {
        Some(self.relay_user_s? + self.relay_sys_s?)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bulk {
    pub streams: u32,
    pub gbps: f64,
    pub bytes: f64,
    pub relay_cpu_s_per_gb: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rr {
    pub rate: u32,
    pub conns: usize,
    pub sent: u64,
    pub received: u64,
    pub blocked_writes: u64,
    pub latency: Latency,
    pub relay_cpu_us_per_msg: Option<f64>,
}

/// The media side of the mixed workload (its chat side is an [`Rr`] on the same measurement).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Media {
    pub conns: usize,
    /// Offered, all connections together, one way.
    pub offered_gbps: f64,
    /// Echoed back, all connections together, over the media generator's whole run.
    pub echoed_gbps: f64,
    pub errors: u64,
}

impl Rr {
    /// The request/response result of a load generator's line (relay CPU not yet known).
    fn of(r: LoadResult) -> Option<Rr> {
        let LoadResult::Rr {
            rate,
            sent,
            received,
            blocked_writes,
            latency,
            conns,
            ..
        } = r
        else {
            return None;
        };
        Some(Rr {
            rate,
            conns,
            sent,
            received,
            blocked_writes,
            latency,
            relay_cpu_us_per_msg: None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connrate {
    pub concurrency: usize,
    pub conns_per_s: f64,
    pub completed: u64,
    pub errors: u64,
    pub latency: Latency,
    pub relay_cpu_us_per_conn: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Idle {
    pub attempted: usize,
    pub held: usize,
    pub setup_secs: f64,
    pub rss_before_kb: u64,
    pub rss_after_kb: u64,
    pub pss_before_kb: u64,
    pub pss_after_kb: u64,
    pub rss_kb_per_conn: Option<f64>,
    pub pss_kb_per_conn: Option<f64>,
    /// What the relay itself counts as active (Sluice only).
    pub relay_active: Option<u64>,
}

/// One cell group of the report: a candidate under one workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measurement {
    pub candidate: String,
    /// `bulk-1`, `bulk-8`, `rr-<rate>`, `connrate`, `idle`.
    pub workload: String,
    pub cpu: Option<Window>,
    pub bulk: Option<Bulk>,
    pub rr: Option<Rr>,
    pub connrate: Option<Connrate>,
    pub idle: Option<Idle>,
    #[serde(default)]
    pub media: Option<Media>,
    #[serde(default)]
    pub scale: Option<scale::Scale>,
    #[serde(default)]
    pub tls_flood: Option<tlsflood::TlsFlood>,
    /// Sluice: connections accepted by each worker during the workload group (from
    /// `sluicectl status`), to show how evenly the kernel spread them.
    pub worker_accepted: Option<Vec<u64>>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandidateInfo {
    pub name: String,
    /// What the report prints as the candidate's configuration.
    pub config: String,
    /// For Sluice: the engine `sluicectl status` reported.
    pub engine_reported: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub started: String,
    pub duration_s: f64,
    pub params: Params,
    pub cpus: usize,
    pub nofile: u64,
    pub kernel: String,
    /// Fraction of the machine busy during one second before the run (others' work).
    pub background_busy_frac: f64,
    pub versions: BTreeMap<String, String>,
    pub candidates: Vec<CandidateInfo>,
    pub measurements: Vec<Measurement>,
    /// The TLS flood candidates' configuration files, by name.
    #[serde(default)]
    pub tls_configs: BTreeMap<String, String>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub only: Vec<Workload>,
    /// Candidate names to run (all when empty).
    pub candidates: Vec<String>,
    pub bin_dir: PathBuf,
    pub out_dir: PathBuf,
}

/// A tree's CPU both ways (see [`procstat`]): `stat` ticks with the user/system split, and the
/// scheduler's runtime.
#[derive(Clone, Copy, Default)]
struct TreeCpu {
    ticks: Cpu,
    runtime_s: f64,
}

impl TreeCpu {
    fn read(pids: &[u32]) -> TreeCpu {
        pids.iter().fold(TreeCpu::default(), |acc, &p| TreeCpu {
            ticks: acc.ticks.plus(procstat::tree_cpu(p)),
            runtime_s: acc.runtime_s + procstat::tree_runtime_s(p),
        })
    }

    /// Seconds spent between `self` and `later`: the runtime reading, unless the tick reading is
    /// clearly larger (threads exited in between and took their runtime with them).
    fn spent(&self, later: &TreeCpu) -> f64 {
        let runtime = later.runtime_s - self.runtime_s;
        let ticks = later.ticks.minus(self.ticks).total();
        if ticks > runtime * 1.1 + 0.05 {
            ticks
        } else {
            runtime.max(0.0)
        }
    }
}

/// CPU counters sampled at one instant.
struct Snap {
    at: Instant,
    relay: Option<TreeCpu>,
    upstream: TreeCpu,
    loadgen: TreeCpu,
    children: Cpu,
    me: Cpu,
    machine: Machine,
    kthreads_s: f64,
    tcp: procstat::Tcp,
}

/// The processes whose CPU the current window accounts for.
#[derive(Default)]
struct Meter {
    relay: Option<u32>,
    upstream: Vec<u32>,
    loadgen: Vec<u32>,
}

impl Meter {
    fn snap(&self) -> Snap {
        Snap {
            at: Instant::now(),
            relay: self.relay.map(|p| TreeCpu::read(&[p])),
            upstream: TreeCpu::read(&self.upstream),
            loadgen: TreeCpu::read(&self.loadgen),
            children: procstat::children_cpu(),
            me: procstat::self_cpu(),
            machine: procstat::machine(),
            kthreads_s: procstat::kernel_threads_s(),
            tcp: procstat::tcp(),
        }
    }

    fn window(&self, a: &Snap, b: &Snap) -> Window {
        let wall_s = b.at.duration_since(a.at).as_secs_f64();
        // The relay's time, split into user and system in the proportion of the tick counts.
        let relay = match (a.relay, b.relay) {
            (Some(x), Some(y)) => {
                let total = x.spent(&y);
                let ticks = y.ticks.minus(x.ticks);
                let user_frac = if ticks.total() > 0.0 {
                    (ticks.user_s / ticks.total()).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                Some(Cpu {
                    user_s: total * user_frac,
                    sys_s: total * (1.0 - user_frac),
                })
            }
            _ => None,
        };
        let upstream_s = a.upstream.spent(&b.upstream);
        let loadgen_s = a.loadgen.spent(&b.loadgen)
            + b.children.minus(a.children).total()
            + b.me.minus(a.me).total();
        let machine_capacity_s = wall_s * procstat::cpus() as f64;
        let machine_busy_s = (machine_capacity_s - (b.machine.idle_s - a.machine.idle_s))
            .clamp(0.0, machine_capacity_s);
        let kthreads_s = (b.kthreads_s - a.kthreads_s).max(0.0);
        let explained = relay.map_or(0.0, |r| r.total()) + upstream_s + loadgen_s + kthreads_s;
        let other_s = (machine_busy_s - explained).max(0.0);
        Window {
            wall_s,
            relay_user_s: relay.map(|r| r.user_s),
            relay_sys_s: relay.map(|r| r.sys_s),
            relay_threads: self.relay.map(procstat::tree_threads),
            upstream_s,
            loadgen_s,
            machine_busy_s,
            machine_irq_s: b.machine.irq_s - a.machine.irq_s,
            kthreads_s,
            tcp: Some(b.tcp.minus(&a.tcp)),
            machine_capacity_s,
            other_s,
            disturbed: machine_capacity_s > 0.0 && other_s / machine_capacity_s > DISTURBED_FRAC,
        }
    }
}

/// The whole run.
struct Suite {
    opts: Options,
    params: Params,
    env: Env,
    meter: Meter,
    started: Instant,
    measurements: Vec<Measurement>,
    engines: BTreeMap<String, String>,
    tls_configs: BTreeMap<String, String>,
}

fn upstream(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(UPSTREAM_IP, port))
}

/// Runs everything `opts` asks for and returns the report (nothing written yet).
pub fn run(opts: Options) -> Result<Report> {
    let nofile = net::raise_nofile().context("cannot raise RLIMIT_NOFILE")?;
    for tool in ["iperf3", "haproxy", "nginx", "socat"] {
        if which(tool).is_none() {
            bail!("{tool} is not installed (cargo xtask bench installs it)");
        }
    }
    let work_dir = opts.out_dir.join("run");
    let _ = std::fs::remove_dir_all(&work_dir);
    std::fs::create_dir_all(&work_dir)?;
    let params = Params::new(opts.quick);
    let background_busy_frac = background_load();
    if background_busy_frac > DISTURBED_FRAC {
        eprintln!(
            "bench: the machine is already {:.0}% busy before the run: numbers will be noisy",
            background_busy_frac * 100.0
        );
    }
    let mut suite = Suite {
        env: Env {
            bin_dir: opts.bin_dir.clone(),
            work_dir,
            nofile,
        },
        opts,
        params,
        meter: Meter::default(),
        started: Instant::now(),
        measurements: Vec::new(),
        engines: BTreeMap::new(),
        tls_configs: BTreeMap::new(),
    };
    let started = utc_now();
    suite.run_all()?;
    let candidates = suite
        .candidates()
        .iter()
        .filter(|c| suite.measurements.iter().any(|m| m.candidate == c.name))
        .map(|c| CandidateInfo {
            name: c.name.to_owned(),
            config: c.config_text(&suite.env, upstream(ECHO_PORT)),
            engine_reported: suite.engines.get(c.name).cloned(),
        })
        .collect();
    Ok(Report {
        started,
        duration_s: suite.started.elapsed().as_secs_f64(),
        params: suite.params.clone(),
        cpus: procstat::cpus(),
        nofile,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        background_busy_frac,
        versions: versions(),
        candidates,
        measurements: suite.measurements,
        tls_configs: suite.tls_configs,
    })
}

impl Suite {
    fn wants(&self, w: Workload) -> bool {
        if matches!(w, Workload::Scale | Workload::TlsFlood) {
            // Minutes, and hundreds of thousands of sockets or RSA keys: only when asked for.
            return self.opts.only.contains(&w);
        }
        self.opts.only.is_empty() || self.opts.only.contains(&w)
    }

    fn candidates(&self) -> Vec<Candidate> {
        peers::all()
            .into_iter()
            .filter(|c| {
                if self.opts.candidates.is_empty() {
                    !peers::opt_in(c.name)
                } else {
                    self.opts.candidates.iter().any(|n| n == c.name)
                }
            })
            .collect()
    }

    fn progress(&self, msg: &str) {
        eprintln!("[{:>4.0}s] {msg}", self.started.elapsed().as_secs_f64());
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.env.work_dir.join(format!("{name}.log"))
    }

    fn run_all(&mut self) -> Result<()> {
        let needs_echo = self.wants(Workload::Rr)
            || self.wants(Workload::Mixed)
            || self.wants(Workload::Connrate)
            || self.wants(Workload::Idle)
            || self.wants(Workload::Scale)
            || self.wants(Workload::TlsFlood);
        let _iperf = if self.wants(Workload::Bulk) {
            Some(self.start_iperf_server()?)
        } else {
            None
        };
        let _echo = if needs_echo {
            self.start_echo()?
        } else {
            Vec::new()
        };
        let plain = [
            Workload::Bulk,
            Workload::Rr,
            Workload::Connrate,
            Workload::Idle,
            Workload::Mixed,
            Workload::Scale,
        ];
        let candidates = if plain.iter().any(|&w| self.wants(w)) {
            self.candidates()
        } else {
            Vec::new()
        };
        for cand in candidates {
            self.progress(&format!("== {}", cand.name));
            if self.wants(Workload::Bulk) {
                self.guarded(&cand, "bulk", Suite::bulk);
            }
            if self.wants(Workload::Rr) {
                self.guarded(&cand, "rr", Suite::rr);
            }
            if self.wants(Workload::Connrate) {
                self.guarded(&cand, "connrate", Suite::connrate);
            }
            if self.wants(Workload::Mixed) {
                self.guarded(&cand, "mixed", Suite::mixed);
            }
            if self.wants(Workload::Idle) && cand.kind != Kind::Direct {
                self.guarded(&cand, "idle", Suite::idle);
            }
            if self.wants(Workload::Scale) && matches!(cand.kind, Kind::Sluice(_)) {
                self.guarded(&cand, "scale", Suite::scale);
            }
        }
        if self.wants(Workload::TlsFlood) {
            self.tls_flood_all();
        }
        Ok(())
    }

    /// Runs one workload group; an error becomes a measurement with `error` set, not the end of
    /// the run.
    fn guarded(
        &mut self,
        cand: &Candidate,
        workload: &str,
        f: fn(&mut Suite, &Candidate) -> Result<()>,
    ) {
        if let Err(e) = f(self, cand) {
            self.progress(&format!("{}: {workload} failed: {e:#}", cand.name));
            self.measurements.push(Measurement {
                candidate: cand.name.to_owned(),
                workload: workload.to_owned(),
                error: Some(format!("{e:#}")),
                ..Measurement::default()
            });
        }
        self.meter.relay = None;
        self.meter.loadgen.clear();
    }

    fn start_iperf_server(&mut self) -> Result<Guard> {
        let mut cmd = Command::new("iperf3");
        cmd.args([
            "-s",
            "-B",
            &UPSTREAM_IP.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(self.log_path("iperf3-server"))?)
        .stderr(Stdio::null());
        let g = Guard::spawn(cmd, "iperf3 -s")?;
        wait_listening(upstream(IPERF_PORT))?;
        self.meter.upstream.push(g.pid());
        Ok(g)
    }

    fn start_echo(&mut self) -> Result<Vec<Guard>> {
        let mut needed = if self.wants(Workload::Idle) {
            self.params.idle_conns
        } else {
            self.params.rr_conns
        };
        if self.wants(Workload::Scale) {
            needed = needed.max(self.params.scale_conns + self.params.rr_conns);
        }
        let procs = needed.div_ceil(IDLE_PER_PROCESS).max(1);
        let mut guards = Vec::new();
        for i in 0..procs {
            let mut cmd = Command::new(self.env.bin_dir.join("loadgen"));
            cmd.args(["echo", "--listen", &upstream(ECHO_PORT).to_string()])
                .args(["--threads", "2", "--max-secs", "3600"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.log_path(&format!("echo-{i}")))?);
            let g = Guard::spawn(cmd, "echo")?;
            self.meter.upstream.push(g.pid());
            guards.push(g);
        }
        wait_listening(upstream(ECHO_PORT))?;
        Ok(guards)
    }

    fn start_relay(
        &mut self,
        cand: &Candidate,
        up: SocketAddr,
        what: &str,
    ) -> Result<Option<peers::Running>> {
        let log = self.log_path(&format!("{}-{what}", cand.name));
        let running = cand.start(&self.env, up, &log)?;
        if let Some(r) = &running {
            self.meter.relay = Some(r.pid());
            if let Some(engine) = r
                .status()
                .and_then(|s| s["engine"].as_str().map(str::to_owned))
            {
                self.engines.insert(cand.name.to_owned(), engine);
            }
        }
        Ok(running)
    }

    fn push(&mut self, m: Measurement) {
        self.measurements.push(m);
    }

    /// Records, on the measurements of `workload_prefix` for `cand` pushed since `first`, how
    /// many connections each Sluice worker accepted.
    fn note_workers(&mut self, relay: Option<&peers::Running>, first: usize) {
        let Some(status) = relay.and_then(peers::Running::status) else {
            return;
        };
        let accepted: Option<Vec<u64>> = status["workers"].as_array().map(|ws| {
            ws.iter()
                .map(|w| w["accepted"].as_u64().unwrap_or(0))
                .collect()
        });
        for m in &mut self.measurements[first..] {
            m.worker_accepted = accepted.clone();
        }
    }

    fn bulk(&mut self, cand: &Candidate) -> Result<()> {
        let relay = self.start_relay(cand, upstream(IPERF_PORT), "bulk")?;
        let first = self.measurements.len();
        let target = cand.target(upstream(IPERF_PORT));
        for streams in [1u32, 8] {
            let a = self.meter.snap();
            let json = self.iperf3(target, streams)?;
            let b = self.meter.snap();
            let cpu = self.meter.window(&a, &b);
            let v: serde_json::Value =
                serde_json::from_str(&json).context("iperf3 printed no JSON")?;
            if let Some(e) = v["error"].as_str() {
                bail!("iperf3 -P {streams}: {e}");
            }
            let sum = &v["end"]["sum_received"];
            let bps = sum["bits_per_second"].as_f64().context("no sum_received")?;
            let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
            let bulk = Bulk {
                streams,
                gbps: bps / 1e9,
                bytes,
                relay_cpu_s_per_gb: cpu
                    .relay_s()
                    .filter(|_| bytes > 0.0)
                    .map(|s| s / (bytes / 1e9)),
            };
            self.progress(&format!(
                "{}: bulk {streams} stream(s): {:.2} Gbit/s, relay {}{}",
                cand.name,
                bulk.gbps,
                fmt_opt(bulk.relay_cpu_s_per_gb, "CPU-s/GB", 3),
                disturbed_note(&cpu),
            ));
            self.push(Measurement {
                candidate: cand.name.to_owned(),
                workload: format!("bulk-{streams}"),
                cpu: Some(cpu),
                bulk: Some(bulk),
                ..Measurement::default()
            });
        }
        self.note_workers(relay.as_ref(), first);
        Ok(())
    }

    /// Runs the iperf3 client to completion (bounded) and returns its JSON.
    fn iperf3(&self, target: SocketAddr, streams: u32) -> Result<String> {
        let secs = self.params.bulk_secs;
        let mut cmd = Command::new("iperf3");
        cmd.args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
        ])
        .args(["-B", &net::client_source(0).to_string()])
        .args(["-J", "-t", &secs.to_string(), "-P", &streams.to_string()])
        .args(["--connect-timeout", "3000"]);
        let lg = LineChild::spawn(cmd, "iperf3 -c", &self.log_path("iperf3-client"))?;
        let deadline = Instant::now() + Duration::from_secs(u64::from(secs) + 15);
        let mut out = String::new();
        while let Some(line) = lg.next_line(deadline) {
            out.push_str(&line);
            out.push('\n');
        }
        lg.finish(deadline + Duration::from_secs(1));
        Ok(out)
    }

    fn loadgen(&self, args: &[String], name: &str) -> Result<LineChild> {
        let mut cmd = Command::new(self.env.bin_dir.join("loadgen"));
        cmd.args(args);
        LineChild::spawn(cmd, name, &self.log_path(&format!("loadgen-{name}")))
    }

    /// The request/response load generator on `rr_conns` connections to `target`, one phase
    /// (warm-up and measured) per rate of `rates` (comma-separated).
    fn rr_loadgen(&self, target: SocketAddr, rates: &str, name: &str) -> Result<LineChild> {
        let p = &self.params;
        self.loadgen(
            &[
                "rr".into(),
                "--target".into(),
                target.to_string(),
                "--conns".into(),
                p.rr_conns.to_string(),
                "--rates".into(),
                rates.into(),
                "--warmup-ms".into(),
                p.rr_warmup_ms.to_string(),
                "--measure-ms".into(),
                p.rr_measure_ms.to_string(),
            ],
            name,
        )
    }

    fn rr(&mut self, cand: &Candidate) -> Result<()> {
        let relay = self.start_relay(cand, upstream(ECHO_PORT), "rr")?;
        let first = self.measurements.len();
        let p = self.params.clone();
        let target = cand.target(upstream(ECHO_PORT));
        let rates: Vec<String> = p.rr_rates.iter().map(u32::to_string).collect();
        let lg = self.rr_loadgen(target, &rates.join(","), "rr")?;
        self.meter.loadgen = vec![lg.guard.pid()];
        let total_ms = (p.rr_warmup_ms + p.rr_measure_ms) * p.rr_rates.len() as u64;
        let deadline = Instant::now() + Duration::from_millis(total_ms) + Duration::from_secs(40);
        let (windows, results) = self.collect(&lg, deadline, p.rr_rates.len());
        lg.finish(Instant::now() + Duration::from_secs(3));
        if results.is_empty() {
            bail!(
                "rr load generator gave no result (see {})",
                self.log_path("loadgen-rr").display()
            );
        }
        for mut rr in results.into_iter().filter_map(Rr::of) {
            let rate = rr.rate;
            let cpu = windows.get(&rate.to_string()).cloned();
            // Per message offered during the sampled window (which may be a few ms off the
            // load generator's own: the schedule is fixed, so rate × wall is what was sent).
            rr.relay_cpu_us_per_msg = cpu.as_ref().and_then(|w| {
                let msgs = f64::from(rate) * w.wall_s;
                Some(w.relay_s()? * 1e6 / msgs).filter(|_| msgs > 0.0)
            });
            let l = &rr.latency;
            self.progress(&format!(
                "{}: rr {rate} msg/s: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, {}/{} answered, relay {}{}",
                cand.name,
                l.p50_us / 1e3,
                l.p99_us / 1e3,
                l.p999_us / 1e3,
                rr.received,
                rr.sent,
                fmt_opt(rr.relay_cpu_us_per_msg, "µs/msg", 1),
                cpu.as_ref().map_or(String::new(), disturbed_note),
            ));
            self.push(Measurement {
                candidate: cand.name.to_owned(),
                workload: format!("rr-{rate}"),
                cpu,
                rr: Some(rr),
                ..Measurement::default()
            });
        }
        self.note_workers(relay.as_ref(), first);
        Ok(())
    }

    /// The mixed workload: media connections start first and keep moving while the chat's
    /// request/response generator runs one rate; the CPU window is the chat's measured phase.
    fn mixed(&mut self, cand: &Candidate) -> Result<()> {
        let relay = self.start_relay(cand, upstream(ECHO_PORT), "mixed")?;
        let first = self.measurements.len();
        let p = self.params.clone();
        let target = cand.target(upstream(ECHO_PORT));
        let mut media = self.loadgen(
            &[
                "media".into(),
                "--target".into(),
                target.to_string(),
                "--conns".into(),
                p.media_conns.to_string(),
                "--mbps".into(),
                p.media_mbps.to_string(),
                "--max-ms".into(),
                "120000".into(),
            ],
            "media",
        )?;
        let chat = self.rr_loadgen(target, &p.mixed_rate.to_string(), "mixed-rr")?;
        self.meter.loadgen = vec![media.guard.pid(), chat.guard.pid()];
        let deadline = Instant::now()
            + Duration::from_millis(p.rr_warmup_ms + p.rr_measure_ms)
            + Duration::from_secs(40);
        let (windows, chat_results) = self.collect(&chat, deadline, 1);
        chat.finish(Instant::now() + Duration::from_secs(3));
        // Tells the media generator to stop: it sends its FINs and reads the last echoes.
        drop(media.stdin.take());
        let (_, media_results) = self.collect(&media, Instant::now() + Duration::from_secs(15), 1);
        media.finish(Instant::now() + Duration::from_secs(3));
        let Some(rr) = chat_results.into_iter().find_map(Rr::of) else {
            bail!(
                "the chat's load generator gave no result (see {})",
                self.log_path("loadgen-mixed-rr").display()
            );
        };
        let Some(LoadResult::Media {
            conns: media_conns,
            secs,
            offered_mbps,
            echoed,
            errors,
            ..
        }) = media_results.into_iter().next()
        else {
            bail!(
                "the media load generator gave no result (see {})",
                self.log_path("loadgen-media").display()
            );
        };
        let cpu = windows.get(&rr.rate.to_string()).cloned();
        let media = Media {
            conns: media_conns,
            offered_gbps: offered_mbps / 1e3,
            echoed_gbps: echoed as f64 * 8.0 / secs.max(1e-9) / 1e9,
            errors,
        };
        self.progress(&format!(
            "{}: mixed: chat {} msg/s p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, {}/{} \
             answered; media {:.2} of {:.2} Gbit/s echoed ({errors} errors){}",
            cand.name,
            rr.rate,
            rr.latency.p50_us / 1e3,
            rr.latency.p99_us / 1e3,
            rr.latency.p999_us / 1e3,
            rr.received,
            rr.sent,
            media.echoed_gbps,
            media.offered_gbps,
            cpu.as_ref().map_or(String::new(), disturbed_note),
        ));
        self.push(Measurement {
            candidate: cand.name.to_owned(),
            workload: "mixed".into(),
            cpu,
            rr: Some(rr),
            media: Some(media),
            ..Measurement::default()
        });
        self.note_workers(relay.as_ref(), first);
        Ok(())
    }

    /// Starts idle load generators for `count` connections to `target` ([`IDLE_PER_PROCESS`]
    /// each, 16 client source addresses apart), with `extra` arguments; logs `NAME-i`.
    fn spawn_idle(
        &mut self,
        target: SocketAddr,
        count: usize,
        setup_max_s: u64,
        hold_max_s: u64,
        extra: &[&str],
        name: &str,
    ) -> Result<Vec<LineChild>> {
        let procs = count.div_ceil(IDLE_PER_PROCESS).max(1);
        let mut gens = Vec::new();
        for i in 0..procs {
            let n = count / procs + usize::from(i < count % procs);
            let mut args: Vec<String> = vec![
                "idle".into(),
                "--target".into(),
                target.to_string(),
                "--count".into(),
                n.to_string(),
                "--source-base".into(),
                (i * 16).to_string(),
                "--setup-max-ms".into(),
                (setup_max_s * 1000).to_string(),
                "--hold-max-ms".into(),
                (hold_max_s * 1000).to_string(),
            ];
            args.extend(extra.iter().map(|a| a.to_string()));
            let lg = self.loadgen(&args, &format!("{name}-{i}"))?;
            self.meter.loadgen.push(lg.guard.pid());
            gens.push(lg);
        }
        Ok(gens)
    }

    /// The idle load generators' results, summed: (attempted, held, slowest setup in s).
    fn collect_idle(&self, gens: &[LineChild], deadline: Instant) -> (usize, usize, f64) {
        let (mut attempted, mut held, mut setup_secs) = (0, 0, 0.0f64);
        for lg in gens {
            let (_, results) = self.collect(lg, deadline, 1);
            for r in results {
                if let LoadResult::Idle {
                    attempted: a,
                    held: h,
                    setup_secs: s,
                    ..
                } = r
                {
                    attempted += a;
                    held += h;
                    setup_secs = setup_secs.max(s);
                }
            }
        }
        (attempted, held, setup_secs)
    }

    /// Reads a load generator's lines until `results` results or the deadline: windows by label.
    fn collect(
        &self,
        lg: &LineChild,
        deadline: Instant,
        results: usize,
    ) -> (BTreeMap<String, Window>, Vec<LoadResult>) {
        let mut open: BTreeMap<String, Snap> = BTreeMap::new();
        let mut windows = BTreeMap::new();
        let mut out = Vec::new();
        while out.len() < results {
            let Some(line) = lg.next_line(deadline) else {
                break;
            };
            match Line::parse(&line) {
                Line::Mark { start: true, label } => {
                    open.insert(label, self.meter.snap());
                }
                Line::Mark {
                    start: false,
                    label,
                } => {
                    let b = self.meter.snap();
                    if let Some(a) = open.remove(&label) {
                        windows.insert(label, self.meter.window(&a, &b));
                    }
                }
                Line::Result(r) => out.push(r),
                Line::Other(s) => eprintln!("    {s}"),
            }
        }
        (windows, out)
    }

    fn connrate(&mut self, cand: &Candidate) -> Result<()> {
        let relay = self.start_relay(cand, upstream(ECHO_PORT), "connrate")?;
        let first = self.measurements.len();
        let p = self.params.clone();
        let target = cand.target(upstream(ECHO_PORT));
        let lg = self.loadgen(
            &[
                "connrate".into(),
                "--target".into(),
                target.to_string(),
                "--concurrency".into(),
                p.conn_concurrency.to_string(),
                "--warmup-ms".into(),
                "300".into(),
                "--measure-ms".into(),
                p.conn_measure_ms.to_string(),
            ],
            "connrate",
        )?;
        self.meter.loadgen = vec![lg.guard.pid()];
        let deadline = Instant::now() + Duration::from_millis(p.conn_measure_ms + 15_000);
        let (windows, results) = self.collect(&lg, deadline, 1);
        lg.finish(Instant::now() + Duration::from_secs(3));
        let Some(LoadResult::Connrate {
            concurrency,
            secs,
            completed,
            errors,
            latency,
        }) = results.into_iter().next()
        else {
            bail!("connrate load generator gave no result");
        };
        let cpu = windows.get("connrate").cloned();
        let conns_per_s = completed as f64 / secs;
        let relay_cpu_us_per_conn = cpu.as_ref().and_then(|w| {
            let conns = conns_per_s * w.wall_s;
            Some(w.relay_s()? * 1e6 / conns).filter(|_| conns > 0.0)
        });
        self.progress(&format!(
            "{}: connrate: {conns_per_s:.0} conn/s ({errors} errors), relay {}{}",
            cand.name,
            fmt_opt(relay_cpu_us_per_conn, "µs/conn", 1),
            cpu.as_ref().map_or(String::new(), disturbed_note),
        ));
        self.push(Measurement {
            candidate: cand.name.to_owned(),
            workload: "connrate".into(),
            cpu,
            connrate: Some(Connrate {
                concurrency,
                conns_per_s,
                completed,
                errors,
                latency,
                relay_cpu_us_per_conn,
            }),
            ..Measurement::default()
        });
        self.note_workers(relay.as_ref(), first);
        Ok(())
    }

    fn idle(&mut self, cand: &Candidate) -> Result<()> {
        let relay = self
            .start_relay(cand, upstream(ECHO_PORT), "idle")?
            .context("idle needs a relay")?;
        let p = self.params.clone();
        let count = if cand.kind == Kind::Socat {
            p.idle_conns_socat
        } else {
            p.idle_conns
        };
        let target = cand.target(upstream(ECHO_PORT));
        std::thread::sleep(Duration::from_millis(300));
        let before = procstat::tree_mem(relay.pid());
        let a = self.meter.snap();
        let setup_max_s = if p.quick { 25 } else { 60 };
        let gens = self.spawn_idle(target, count, setup_max_s, setup_max_s + 60, &[], "idle")?;
        let deadline = Instant::now() + Duration::from_secs(setup_max_s + 10);
        let (attempted, held, setup_secs) = self.collect_idle(&gens, deadline);
        // Let the relay settle: buffers of the one echoed byte go back to their pools.
        std::thread::sleep(Duration::from_secs(1));
        let after = procstat::tree_mem(relay.pid());
        let b = self.meter.snap();
        let cpu = self.meter.window(&a, &b);
        let relay_active = relay.status().and_then(|s| s["active"].as_u64());
        let first = self.measurements.len();
        let per = |x: u64, y: u64| (held > 0).then(|| (y as f64 - x as f64) / held as f64);
        let idle = Idle {
            attempted,
            held,
            setup_secs,
            rss_before_kb: before.rss_kb,
            rss_after_kb: after.rss_kb,
            pss_before_kb: before.pss_kb,
            pss_after_kb: after.pss_kb,
            rss_kb_per_conn: per(before.rss_kb, after.rss_kb),
            pss_kb_per_conn: per(before.pss_kb, after.pss_kb),
            relay_active,
        };
        self.progress(&format!(
            "{}: idle: {held}/{attempted} held, {} RSS / {} PSS per connection",
            cand.name,
            fmt_opt(idle.rss_kb_per_conn, "KB", 2),
            fmt_opt(idle.pss_kb_per_conn, "KB", 2),
        ));
        self.push(Measurement {
            candidate: cand.name.to_owned(),
            workload: "idle".into(),
            cpu: Some(cpu),
            idle: Some(idle),
            ..Measurement::default()
        });
        self.note_workers(Some(&relay), first);
        for lg in gens {
            lg.finish(Instant::now() + Duration::from_secs(5));
        }
        drop(relay);
        Ok(())
    }
}

fn fmt_opt(v: Option<f64>, unit: &str, digits: usize) -> String {
    match v {
        Some(v) => format!("{v:.digits$} {unit}"),
        None => format!("– {unit}"),
    }
}

fn disturbed_note(w: &Window) -> String {
    if w.disturbed {
        format!(
            " [disturbed: {:.0}% of the machine went elsewhere]",
            100.0 * w.other_s / w.machine_capacity_s
        )
    } else {
        String::new()
    }
}

fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !peers::is_listening(addr) {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Machine busy fraction over one second.
fn background_load() -> f64 {
    let a = procstat::machine();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let b = procstat::machine();
    let cap = t.elapsed().as_secs_f64() * procstat::cpus() as f64;
    ((cap - (b.idle_s - a.idle_s)) / cap).clamp(0.0, 1.0)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d: PathBuf| d.join(tool))
        .find(|p| p.is_file())
}

/// First line of each peer's version output.
fn versions() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, args, line) in [
        ("haproxy", &["-v"][..], 0),
        ("nginx", &["-v"][..], 0),
        ("socat", &["-V"][..], 1),
        ("iperf3", &["-v"][..], 0),
    ] {
        if let Ok(o) = Command::new(name).args(args).output() {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if let Some(l) = text.lines().nth(line) {
                out.insert(name.to_owned(), l.trim().to_owned());
            }
        }
    }
    if let Ok(o) = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
    {
        out.insert(
            "sluice".into(),
            String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    }
    out
}

/// The current UTC time as `YYYY-MM-DD HH:MM`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Writes the JSON report.
pub fn write_json(report: &Report, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report)?)?;
    Ok(())
}
