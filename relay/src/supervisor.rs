//! The supervisor: the `sluice` process an operator starts.
//!
//! It decides the engine (probing io_uring once, so a refusal is logged once), sizes the worker
//! count to the fd limit, binds every listener (a port in use is an error naming it), resolves
//! upstreams, starts the worker processes and keeps them running: a worker that dies is replaced
//! while the others keep their connections. It serves the control socket ([`crate::control`]).
//!
//! Signal contract: SIGTERM / SIGINT stop the workers (their connections close) and exit 0;
//! SIGCHLD reaps and restarts dead workers (see [`Supervisor::reap`] for a worker that cannot be
//! started again); SIGHUP (or `sluicectl reload`) reloads the
//! configuration file: the workers take the new configuration for their new connections while
//! established ones go on and the listening sockets stay open (see [`Supervisor::reload`]). Workers die with the supervisor (PR_SET_PDEATHSIG
//! and EOF on their control pipe).
//!
//! The main loop never waits on a worker: its control pipes are nonblocking, each with a queue
//! of what the pipe did not take yet (a worker that takes nothing for [`CONTROL_STALL`] is
//! killed and replaced), and restarts that are due are driven by the loop's receive timeout,
//! never by a sleep.

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use crate::admission::{self, Rules};
use crate::config::KeyKind;
use crate::config::{Config, EngineChoice, TlsSettings};
use crate::control::{self, Status, WorkerStatus};
use crate::ebpf::XdpDeny;
use crate::engine::{self, EngineKind};
use crate::error::StartError;
use crate::health::Table;
use crate::metrics::{self, Counter, Shared};
use crate::proto::tls::{PemIdentity, TicketKeys};
use crate::sys;
use crate::upstream;
use crate::wire::ControlMsg;
use crate::worker::{self, Identity};
use crate::{histo, http};

/// Listen backlog (the kernel caps it at net.core.somaxconn).
const BACKLOG: i32 = 65_535;
/// A worker that dies sooner than this after its start counts as crash-looping.
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(2);
/// Crash-looping: after this many quick deaths in a row the slot backs off like a failed start.
const CRASH_LOOP_LIMIT: u32 = 3;
/// Back-off of a worker that cannot be started: the first try after this, each next one twice
/// as late, at most [`RESTART_BACKOFF_MAX`].
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(500);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker with control bytes waiting that took none for this long does not read its pipe
/// (stopped, or stuck): it is killed and a new one starts with the whole state.
pub(crate) const CONTROL_STALL: Duration = Duration::from_secs(5);
/// Queued control bytes for one worker beyond which it is killed at once (a bound on the
/// supervisor's memory; far above what the whole state takes).
const CONTROL_QUEUE_MAX: usize = 256 << 20;
/// While bytes wait for a worker's pipe, the loop tries the write again this often.
const CONTROL_RETRY: Duration = Duration::from_millis(20);

/// When the `attempt`th try (1-based) to start a worker in a slot comes after the last failure.
fn restart_backoff(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    RESTART_BACKOFF_FIRST
        .saturating_mul(factor)
        .min(RESTART_BACKOFF_MAX)
}

/// How the daemon was asked to run, beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Control socket path; None = no control socket.
    pub control: Option<PathBuf>,
    /// Interfaces to attach the XDP deny program to, besides `[admission] xdp_interfaces`.
    pub xdp: Vec<String>,
    /// Where `sluicectl load` pinned the eBPF maps; used when maps are pinned there.
    pub pin_dir: Option<PathBuf>,
    /// How to build the configuration again on a reload (the file read again, with the command
    /// line's overrides); None when the daemon was started from a preset or the command line.
    pub reload: Option<ReloadFrom>,
    /// The preset the configuration came from (`whatsapp`, `signal`); None: a file or the
    /// command line. Only shown (`sluice_build_info{preset}`).
    pub preset: Option<String>,
}

/// Builds the configuration again for a reload, validated, or says why it cannot.
#[derive(Clone)]
pub struct ReloadFrom(pub Arc<dyn Fn() -> Result<Config, String> + Send + Sync>);

impl std::fmt::Debug for ReloadFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadFrom(..)")
    }
}

/// What the main loop answers to a list command: the reply so far and the generation the
/// control thread waits for every worker to reach.
type AdmissionAnswer = Result<(admission::Reply, u64), String>;

/// What the main loop answers to `reload`: what changed and the generation the workers report
/// once they applied it, or why nothing was changed.
type ReloadAnswer = Result<(serde_json::Value, u64), String>;

enum Event {
    Signal(i32),
    /// A table from the resolver thread of the given epoch (one of a configuration since
    /// replaced is ignored).
    Resolved(u64, Table),
    /// `sluicectl reload`: the answer goes back on the channel.
    Reload(mpsc::Sender<ReloadAnswer>),
    /// The shared fast path's verdict started holding bytes of a worker's socket.
    Held(sluice_common::HeldEvent),
    /// Time to look whether certificate files changed.
    CheckFiles,
    /// `sluicectl allow|deny|dest ...` from the control socket.
    Admission(admission::Command, mpsc::Sender<AdmissionAnswer>),
    /// A certificate or TLS-ALPN-01 challenges from an ACME thread ([`crate::acme`]).
    Acme(crate::acme::AcmeEvent),
}

/// How long `sluicectl` waits for the workers to confirm a list change.
const APPLY_WAIT: Duration = Duration::from_secs(3);

/// How often certificate files are checked for changes (certbot renews every 12 h).
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(30);

struct WorkerProc {
    child: Child,
    /// The control pipe, nonblocking.
    stdin: ChildStdin,
    started: Instant,
    /// Control bytes the pipe did not take yet (`out[sent..]`), written as it drains.
    out: Vec<u8>,
    sent: usize,
    /// When the pipe last took bytes, or bytes started waiting.
    moved: Instant,
    /// Killed for not reading its pipe (reaped like any dead worker).
    killed: bool,
}

impl WorkerProc {
    /// Bytes waiting for the pipe.
    fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Queues control lines and writes what the pipe takes now; never waits.
    fn send(&mut self, msg: &[u8]) {
        if msg.is_empty() {
            return;
        }
        if self.pending() == 0 {
            self.moved = Instant::now();
        }
        self.out.extend_from_slice(msg);
        self.flush();
    }

    /// Writes queued bytes until the pipe is full. A broken pipe (the worker is gone; SIGCHLD
    /// follows) drops the queue.
    fn flush(&mut self) {
        while self.sent < self.out.len() {
            match self.stdin.write(&self.out[self.sent..]) {
                Ok(0) => break,
                Ok(n) => {
                    self.sent += n;
                    self.moved = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("cannot reach a worker's control pipe: {e}");
                    self.sent = self.out.len();
                }
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        } else if self.sent > (1 << 20) && self.sent * 2 > self.out.len() {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
    }
}

/// A worker slot whose worker could not be started: why, and when the next try is.
struct Down {
    why: String,
    retry_at: Instant,
}

/// Worker processes needed so `max_connections` fit under the per-process fd limit.
pub(crate) fn workers_needed(config: &Config, nofile: u64) -> usize {
    if config.workers > 0 {
        return config.workers as usize;
    }
    let per_worker = engine::worker_capacity(nofile);
    // 10 % headroom: SO_REUSEPORT spreads by hash, so workers fill unevenly; a full worker
    // refuses while its neighbours still have room.
    let wanted = u64::from(config.max_connections) + u64::from(config.max_connections) / 10;
    let for_conns = wanted.div_ceil(per_worker.max(1)) as usize;
    sys::cpus().max(for_conns).min(metrics::MAX_WORKERS - 1)
}

/// Is some socket already listening on `addr`'s port at that address or a wildcard? Read from
/// /proc/net/tcp{,6}: SO_REUSEPORT would otherwise let a second daemon (same user) share the
/// port silently instead of failing with "address in use".
pub(crate) fn already_listening(addr: SocketAddr) -> bool {
    let files: &[&str] = if addr.is_ipv4() {
        &["/proc/net/tcp"]
    } else {
        &["/proc/net/tcp6"]
    };
    let want_ip = match addr.ip() {
        std::net::IpAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.octets())),
        std::net::IpAddr::V6(v6) => v6
            .octets()
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    };
    let want_port = format!("{:04X}", addr.port());
    files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut cols = line.split_whitespace();
                let (Some(local), Some(_remote), Some(state)) =
                    (cols.nth(1), cols.next(), cols.next())
                else {
                    return false;
                };
                let Some((ip, port)) = local.split_once(':') else {
                    return false;
                };
                state == "0A"
                    && port == want_port
                    && (ip == want_ip
                        || ip.bytes().all(|b| b == b'0')
                        || want_ip.bytes().all(|b| b == b'0'))
            })
        })
    })
}

/// Binds one listening socket of a worker: SO_REUSEADDR + SO_REUSEPORT (each worker has its own
/// socket in the port's group, so the kernel spreads new connections evenly over the workers),
/// nonblocking, close-on-exec, at a high fd number.
fn bind(addr: SocketAddr) -> Result<OwnedFd, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )
    .map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(err)?;
    }
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(BACKLOG).map_err(err)?;
    // High numbers, so handing them to a worker at fds 3.. never overwrites another source fd.
    sys::dup_high(sock.as_fd(), 1000).map_err(err)
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(config: Config, opts: Options) -> Result<(), StartError> {
    sys::no_core_dumps()
        .map_err(|e| std::io::Error::other(format!("cannot turn core dumps off: {e}")))?;
    // The user to become is looked up first, so a missing one stops the start before binding.
    let run_as = match &config.user {
        Some(name) => Some((
            name.clone(),
            sys::lookup_user(name)?.ok_or_else(|| {
                std::io::Error::other(format!(
                    "user `{name}` does not exist; create it with \
                     `useradd --system --no-create-home --shell /usr/sbin/nologin {name}`"
                ))
            })?,
        )),
        None => None,
    };
    if run_as.is_some() {
        // Before the first thread: a uid change leaves each thread's inheritable set as it was.
        sys::clear_inheritable().map_err(|e| {
            std::io::Error::other(format!("cannot empty the inheritable capability set: {e}"))
        })?;
    }
    let uring_ok = if config.engine == EngineChoice::Epoll {
        false
    } else {
        match engine::uring::probe() {
            Ok(features) => {
                let degraded = features.degraded();
                if !degraded.is_empty() {
                    tracing::info!(
                        "io_uring runs without {} (this kernel lacks them, or {} says so)",
                        degraded.join(" and "),
                        engine::features::ENV_DISABLE
                    );
                }
                true
            }
            // The kernel lacks what the io_uring engines are built on: nothing the operator
            // can change but the kernel, so every engine choice falls back, as sockmap
            // falls back to splice.
            Err(e @ engine::features::Unusable::Lacks(_)) => {
                tracing::warn!("{e}; using the epoll engine");
                false
            }
            Err(e) => {
                if config.engine != EngineChoice::Auto {
                    return Err(StartError::UringRefused(e.to_string()));
                }
                tracing::warn!("io_uring is refused here ({e}); using the epoll engine");
                false
            }
        }
    };
    let mut kind = EngineKind::decide(config.engine, uring_ok);
    // The sockmap engine needs BPF: the supervisor creates the maps (or opens the ones pinned
    // by `sluicectl load`), loads the verdict and attaches it, once, here, while it still holds
    // the capabilities that takes; a refusal (no CAP_BPF, no BTF, verifier) is one clear line
    // and every worker starts on splice instead. It keeps the verdict attached while it runs
    // and hands the maps to every worker by fd: inserting into a map through an fd already
    // open needs no capability, so workers need none (see `drop_privileges`). With pinned maps,
    // sluicectl and other tools see the daemon's pairs.
    let mut fast_path = None;
    let mut shared_fast = None;
    if kind == EngineKind::Sockmap {
        // Pins from an older `sluicectl load` (a map added since is missing) are not used: one
        // clear line says to load again, and the fast path runs on maps of its own meanwhile.
        let old_pins = opts
            .pin_dir
            .as_deref()
            .and_then(|d| crate::ebpf::check_pins(d).err());
        if let Some(e) = &old_pins {
            tracing::warn!("{e}; the fast path uses maps of its own until then");
        }
        let pinned = opts
            .pin_dir
            .as_deref()
            .filter(|d| crate::ebpf::is_pinned(d));
        let loaded = crate::ebpf::kernel_proven().and_then(|()| match pinned {
            Some(dir) => crate::ebpf::FastPath::load_pinned(dir),
            None => crate::ebpf::FastPath::load(),
        });
        match loaded {
            Ok(fast) => {
                fast_path = Some(match (pinned, &old_pins) {
                    (Some(dir), _) => format!("attached (maps pinned under {})", dir.display()),
                    (None, Some(e)) => format!("attached (maps of its own: {e})"),
                    (None, None) => "attached".to_string(),
                });
                shared_fast = Some(fast);
            }
            Err(e) => {
                tracing::warn!(
                    "the sockmap fast path is unavailable ({e}); using the splice engine"
                );
                fast_path = Some(format!("unavailable: {e}"));
                kind = EngineKind::Splice;
            }
        }
    }
    let nofile = sys::raise_nofile_limit()?;
    let nworkers = workers_needed(&config, nofile);
    if config.listeners.len() > metrics::MAX_LISTENERS {
        return Err(std::io::Error::other(format!(
            "at most {} listeners are supported",
            metrics::MAX_LISTENERS
        ))
        .into());
    }
    for l in &config.listeners {
        if already_listening(l.bind) {
            return Err(StartError::Bind {
                addr: l.bind,
                source: std::io::Error::from_raw_os_error(libc::EADDRINUSE),
            });
        }
    }
    // One socket per worker and listener; a restarted worker gets its slot's sockets back, with
    // the connections that queued there meanwhile.
    let listeners = (0..nworkers)
        .map(|_| config.listeners.iter().map(|l| bind(l.bind)).collect())
        .collect::<Result<Vec<Vec<_>>, _>>()?;
    let shared = Arc::new(Shared::new()?);
    let stats = Arc::new(histo::Stats {
        region: histo::Region::new(nworkers, config.listeners.len())?,
        merged: Mutex::new(histo::Merged::new(
            config.listeners.iter().map(|l| l.name.clone()).collect(),
            nworkers,
        )),
    });
    histo::install(stats.clone());
    let histo_fd = sys::dup_high(stats.region.fd(), 1000)?;
    // The metrics/stats HTTP listener: bound now, so a port in use fails the start.
    let metrics_http = match config.metrics.listen.0 {
        Some(addr) => {
            let l = http::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    "the metrics and stats page listen on a non-loopback address: anyone who reaches {addr} sees usage numbers"
                );
            }
            Some((addr, l))
        }
        None => None,
    };
    // The local decoy sites, when a listener asks for one (bound before privileges go).
    let mut local_decoys = Vec::new();
    crate::decoy::start_local(&config, &mut local_decoys).map_err(std::io::Error::other)?;
    // After binding, so a port in use is reported before seconds of key generation.
    let tls = load_tls(&config, None)?;
    // Before the resolver thread starts: its health checks skip addresses not on the
    // destination allowlist.
    let rules = initial_rules(&config);
    let health_dests = crate::health::Dests::default();
    health_dests.set(&rules.dests);

    let mut names = upstream::Names::default();
    let (resolved, resolved_ok) = upstream::resolve_all(&config, &mut names);
    shared
        .supervisor()
        .add(Counter::UpstreamAddressesRefused, names.take_refused());
    let (tx, rx) = mpsc::channel::<Event>();
    // What workers start with: every address counts as up until checked.
    let table = crate::health::Checker::default().filter(&config, &resolved);
    let mut interfaces = config.admission.xdp_interfaces.clone();
    interfaces.extend(opts.xdp.iter().cloned());
    let (xdp, xdp_interfaces) = attach_xdp(
        &interfaces,
        opts.pin_dir.as_deref(),
        &rules,
        &listener_ports(&config),
    );
    let handler_tx = tx.clone();
    spawn_signal_thread(tx.clone())?;

    let mut st = Status::new(&config, kind, nworkers);
    st.per_worker_capacity = engine::worker_capacity(nofile);
    st.fast_path = fast_path;
    st.upstreams = crate::health::Checker::default().summary(&config, &resolved);
    st.capacity = (st.per_worker_capacity * nworkers as u64).min(u64::from(config.max_connections));
    let status = Arc::new(Mutex::new(st));
    if let Some(path) = &opts.control
        && let Err(e) = control::serve(
            path,
            status.clone(),
            shared.clone(),
            admission_handler(handler_tx, shared.clone(), nworkers),
        )
    {
        tracing::warn!("no control socket at {}: {e}", path.display());
    }
    let acme_jobs = crate::acme::jobs(&config);
    if !acme_jobs.is_empty() {
        // Made (and given to the user's group) while still root; the ACME thread writes in it
        // after the drop.
        prepare_state_dir(&config.state_dir, run_as.as_ref())?;
    }
    if let Some((name, ids)) = &run_as {
        drop_privileges(name, *ids, opts.control.as_deref())?;
    }

    if let Some((addr, l)) = metrics_http {
        http::spawn(
            l,
            http::Source {
                shared: shared.clone(),
                stats: stats.clone(),
                workers: nworkers,
                engine: kind.name().to_string(),
                preset: opts.preset.clone().unwrap_or_else(|| "none".into()),
                status: status.clone(),
                started: Instant::now(),
                started_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                recent: Default::default(),
                health: {
                    let (shared, status) = (shared.clone(), status.clone());
                    Box::new(move || serving(&shared, &status))
                },
            },
        )?;
        tracing::info!("metrics at http://{addr}/metrics, stats page at http://{addr}/");
    }

    let config_toml = config.to_toml();
    let mut sup = Supervisor {
        config_toml,
        config,
        reload_from: opts.reload.clone(),
        nofile,
        tx,
        resolver_epoch: 0,
        resolver_stop: Arc::new(AtomicBool::new(false)),
        cert_watch: false,
        local_decoys,
        shared_fast_fds: match &shared_fast {
            Some(fast) => fast
                .map_fds()
                .into_iter()
                .map(|fd| sys::dup_high(fd, 1000))
                .collect::<std::io::Result<Vec<_>>>()?,
            None => Vec::new(),
        },
        shared_fast,
        kind,
        nworkers,
        listeners,
        metrics_fd: sys::dup_high(shared.fd(), 1000)?,
        histo_fd,
        tls,
        challenges: Vec::new(),
        tickets: TicketKeys::generate(crate::proto::tls::ticket_rotate())
            .map_err(std::io::Error::other)?,
        tickets_made: Instant::now(),
        ticket_rotate: crate::proto::tls::ticket_rotate(),
        shared,
        table,
        procs: Vec::new(),
        down: (0..nworkers).map(|_| None).collect(),
        failures: vec![0; nworkers],
        paused: vec![false; nworkers],
        restarts: vec![0; nworkers],
        status,
        crash_streak: vec![0; nworkers],
        rules,
        health_dests,
        generation: 1,
        xdp,
        xdp_interfaces,
    };
    sup.start_resolver(resolved, resolved_ok, names)?;
    if let Some(ring) = sup.shared_fast.as_mut().and_then(|f| f.take_held_ring()) {
        spawn_held_relay(ring, sup.tx.clone())?;
    }
    sup.watch_cert_files()?;
    sup.challenges = vec![Vec::new(); sup.config.listeners.len()];
    for i in 0..nworkers {
        let p = sup.spawn(i)?;
        sup.procs.push(Some(p));
    }
    sup.publish_status();
    sup.publish_cert_expiry();
    for job in acme_jobs {
        let tx = sup.tx.clone();
        let shared = sup.shared.clone();
        crate::acme::spawn(
            job,
            Box::new(move |ev| tx.send(Event::Acme(ev)).is_ok()),
            sup.shared.clone(),
            Box::new(move |generation, wait| {
                applied_by(&shared, nworkers, generation, wait);
            }),
        )
        .map_err(|e| std::io::Error::other(format!("cannot start the acme thread: {e}")))?;
    }
    tracing::info!(
        listeners = sup.config.listeners.len(),
        workers = nworkers,
        engine = kind.name(),
        "ready"
    );
    // Under the unit's Type=notify, `systemctl start` returns (and dependants start) only now:
    // a generated RSA-4096 certificate can take seconds on a small host.
    if let Err(e) = sys::sd_notify("READY=1") {
        tracing::warn!("cannot tell systemd the relay is ready (NOTIFY_SOCKET): {e}");
    }
    loop {
        let ev = match rx.recv_timeout(sup.next_wake()) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                sup.tick();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match ev {
            Event::Resolved(epoch, table) => {
                if epoch == sup.resolver_epoch {
                    sup.table = table;
                    for i in 0..nworkers {
                        sup.send_table(i);
                    }
                }
            }
            Event::Signal(signal_hook::consts::SIGCHLD) => sup.reap(),
            Event::Signal(signal_hook::consts::SIGHUP) => {
                tracing::info!("SIGHUP: reloading");
                let _ = sup.reload();
            }
            Event::Reload(reply) => {
                let _ = reply.send(sup.reload());
            }
            Event::Held(e) => {
                let msg = ControlMsg::Held {
                    cookie: e.cookie,
                    kind: e.kind,
                }
                .encode();
                if let Some(Some(p)) = sup.procs.get_mut(e.owner as usize) {
                    p.send(msg.as_bytes());
                }
            }
            Event::CheckFiles => sup.reload_tls(false),
            Event::Acme(ev) => sup.acme(ev),
            Event::Admission(cmd, reply) => {
                let _ = reply.send(Ok(sup.admission(&cmd)));
            }
            Event::Signal(sig) => {
                tracing::info!("signal {sig}: stopping");
                let _ = sys::sd_notify("STOPPING=1");
                sup.stop();
                return Ok(());
            }
        }
        sup.tick();
    }
    Ok(())
}

/// Loads or generates the certificate of every TLS listener, once: listeners with the same
/// settings share one (the WhatsApp preset's 443 and 8443 serve the same certificate). On a
/// reload, `before` holds the running configuration's certificates: a generated one whose
/// settings did not change is kept (clients may have pinned its CA), files are read again.
fn load_tls(
    config: &Config,
    before: Option<(&Config, &[Option<PemIdentity>])>,
) -> Result<Vec<Option<PemIdentity>>, StartError> {
    let mut done: Vec<(&TlsSettings, PemIdentity)> = Vec::new();
    if let Some((old, ids)) = before {
        for (l, id) in old.listeners.iter().zip(ids) {
            if let (Some(t), Some(id)) = (&l.tls, id)
                && t.cert.is_none()
            {
                done.push((t, id.clone()));
            }
        }
    }
    let mut out = Vec::new();
    for l in &config.listeners {
        let Some(t) = &l.tls else {
            out.push(None);
            continue;
        };
        if let Some((_, id)) = done.iter().find(|(s, _)| *s == t) {
            out.push(Some(id.clone()));
            continue;
        }
        let stored = t
            .acme
            .as_ref()
            .and_then(|a| crate::acme::stored_for(&config.state_dir, a, &l.name));
        let id = match (&t.cert, &t.key) {
            (Some(cert), Some(key)) => PemIdentity::from_files(cert, key),
            // A certificate the CA issued before, from the state directory.
            _ if stored.is_some() => Ok(stored.expect("checked")),
            _ => {
                let started = Instant::now();
                let kind = t.generated_key();
                let id = PemIdentity::generate(&t.dns_names, &t.ips, kind);
                tracing::info!(
                    listener = %l.name,
                    "generated a private CA and certificate ({}) in {} ms",
                    match kind {
                        KeyKind::EcdsaP256 => "ECDSA P-256".to_owned(),
                        KeyKind::Rsa(bits) => format!("RSA-{bits}"),
                    },
                    started.elapsed().as_millis()
                );
                id
            }
        }
        .map_err(|e| std::io::Error::other(format!("listener {}: {e}", l.name)))?;
        done.push((t, id.clone()));
        out.push(Some(id));
    }
    Ok(out)
}

struct Supervisor {
    /// The running configuration (replaced by a reload) and its TOML, which workers start with.
    config: Config,
    config_toml: String,
    reload_from: Option<ReloadFrom>,
    nofile: u64,
    /// The main loop's own channel (for the threads it starts).
    tx: mpsc::Sender<Event>,
    /// The resolver thread of the running configuration: its epoch, and the flag that stops it.
    resolver_epoch: u64,
    resolver_stop: Arc<AtomicBool>,
    /// Whether the thread that looks at certificate files runs.
    cert_watch: bool,
    /// The local decoy sites started so far (`builtin`, `dir:`; [`crate::decoy`]).
    local_decoys: Vec<crate::decoy::Local>,
    /// The sockmap fast path's maps (the daemon's own, or pinned by `sluicectl load`), with the
    /// verdict this process attached to them; handed to every worker. None: another engine.
    shared_fast: Option<crate::ebpf::FastPath>,
    /// Its maps' fds at high numbers (see `bind`), handed to each worker.
    shared_fast_fds: Vec<OwnedFd>,
    kind: EngineKind,
    nworkers: usize,
    /// `listeners[worker][listener]`.
    listeners: Vec<Vec<OwnedFd>>,
    shared: Arc<Shared>,
    /// The counters' memfd at a high fd number (see `bind`).
    metrics_fd: OwnedFd,
    /// The histogram slots' memfd ([`histo::Region`]), also at a high number.
    histo_fd: OwnedFd,
    /// Certificate and key of each TLS listener, sent to every worker at its start.
    tls: Vec<Option<PemIdentity>>,
    /// The TLS-ALPN-01 challenges each listener answers now (almost always none).
    challenges: Vec<Vec<crate::proto::tls::AcmeChallenge>>,
    /// The session-ticket keys every worker shares, when the current one was made, and how
    /// often a new one is ([`crate::proto::tls::ticket_rotate`]).
    tickets: TicketKeys,
    tickets_made: Instant,
    ticket_rotate: Duration,
    table: Table,
    procs: Vec<Option<WorkerProc>>,
    /// Slots whose worker could not be started (`procs[i]` is None), retried with back-off.
    down: Vec<Option<Down>>,
    /// Failed tries in a row per slot (the back-off's exponent); reset when a worker of the
    /// slot lived past [`CRASH_LOOP_WINDOW`].
    failures: Vec<u32>,
    /// Slots whose listening sockets are closed (shut down, out of the SO_REUSEPORT group).
    paused: Vec<bool>,
    /// Workers started in each slot to replace one that died.
    restarts: Vec<u64>,
    status: Arc<Mutex<Status>>,
    crash_streak: Vec<u32>,
    /// The admission lists: the source of truth, pushed whole to every worker on each change.
    rules: Rules,
    /// `rules.dests` as the resolver thread's health checks see it (set with every change).
    health_dests: crate::health::Dests,
    /// Grows with every change sent to the workers (they report the last one applied).
    generation: u64,
    /// The XDP deny program on each interface asked for (deny rules mirrored into its tries).
    xdp: Vec<XdpDeny>,
    /// Names of the interfaces in `xdp`, in order.
    xdp_interfaces: Vec<String>,
}

impl Supervisor {
    fn spawn(&self, index: usize) -> Result<WorkerProc, StartError> {
        let id = Identity {
            index,
            workers: self.nworkers,
            engine: self.kind,
        };
        let mut fds: Vec<i32> = self.listeners[index]
            .iter()
            .map(|l| l.as_raw_fd())
            .collect();
        fds.push(self.metrics_fd.as_raw_fd());
        fds.push(self.histo_fd.as_raw_fd());
        let mut cmd = Command::new(std::env::current_exe()?);
        if !self.shared_fast_fds.is_empty() {
            fds.extend(self.shared_fast_fds.iter().map(|fd| fd.as_raw_fd()));
            cmd.env(worker::ENV_SHARED_FAST_PATH, "1");
        }
        cmd.arg("__worker")
            .env(worker::ENV_WORKER, id.encode())
            .env(worker::ENV_CONFIG, &self.config_toml)
            .stdin(Stdio::piped());
        sys::pass_fds(&mut cmd, fds, worker::FIRST_LISTENER_FD);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        if let Err(e) = sys::set_nonblocking(stdin.as_fd()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "cannot make the control pipe nonblocking: {e}"
            ))
            .into());
        }
        let mut p = WorkerProc {
            child,
            stdin,
            started: Instant::now(),
            out: Vec::new(),
            sent: 0,
            moved: Instant::now(),
            killed: false,
        };
        self.write_table(&mut p);
        let mut start = ControlMsg::TicketKeys(self.tickets.clone()).encode();
        for listener in 0..self.tls.len() {
            start.push_str(&self.tls_message(listener));
        }
        for (listener, challenges) in self.challenges.iter().enumerate() {
            if !challenges.is_empty() {
                start.push_str(
                    &ControlMsg::Challenges {
                        listener,
                        challenges: challenges.clone(),
                    }
                    .encode(),
                );
            }
        }
        start.push_str(&self.decoy_message());
        start.push_str(&self.admission_message());
        start.push_str(&ControlMsg::Ready.encode());
        p.send(start.as_bytes());
        Ok(p)
    }

    fn write_table(&self, p: &mut WorkerProc) {
        p.send(self.table_message().as_bytes());
    }

    /// Every address list of the table, as control lines.
    fn table_message(&self) -> String {
        let mut msgs = String::new();
        for (listener, entries) in self.table.iter().enumerate() {
            for (entry, addrs) in entries.iter().enumerate() {
                let msg = ControlMsg::Addrs {
                    listener,
                    entry,
                    addrs: addrs.clone(),
                };
                msgs.push_str(&msg.encode());
            }
        }
        msgs
    }

    /// Starts the resolver and health-check thread of the running configuration; the one
    /// before it (if any) is told to stop, and what it still sends is ignored.
    fn start_resolver(
        &mut self,
        first: Table,
        ok: bool,
        names: upstream::Names,
    ) -> std::io::Result<()> {
        self.resolver_stop.store(true, Ordering::Relaxed);
        self.resolver_stop = Arc::new(AtomicBool::new(false));
        self.resolver_epoch += 1;
        let epoch = self.resolver_epoch;
        let health_row = self.shared.clone();
        let refused_row = self.shared.clone();
        let (status, stop) = (self.status.clone(), self.resolver_stop.clone());
        upstream::spawn_resolver(
            self.config.clone(),
            first,
            ok,
            names,
            self.tx.clone(),
            move |table| Event::Resolved(epoch, table),
            self.resolver_stop.clone(),
            Box::new(move |changes, down| {
                let row = health_row.supervisor();
                row.add(
                    Counter::UpstreamStateChanges,
                    u64::from(changes.went_down + changes.went_up),
                );
                row.set(Counter::UpstreamsDown, down as u64);
            }),
            Box::new(move |n| {
                refused_row
                    .supervisor()
                    .add(Counter::UpstreamAddressesRefused, n);
            }),
            // Checked under the lock: a resolver told to stop (a reload started a new one)
            // cannot overwrite what the new one wrote.
            Box::new(move |upstreams| {
                let mut st = status.lock().expect("status lock");
                if !stop.load(Ordering::Relaxed) {
                    st.upstreams = upstreams;
                }
            }),
            self.health_dests.clone(),
        )
    }

    /// Starts the thread that has certificate files looked at every [`CERT_CHECK_INTERVAL`],
    /// once some listener uses files.
    fn watch_cert_files(&mut self) -> std::io::Result<()> {
        let uses_files = self
            .config
            .listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.cert.is_some()));
        if self.cert_watch || !uses_files {
            return Ok(());
        }
        self.cert_watch = true;
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("cert-watch".into())
            .spawn(move || {
                while tx.send(Event::CheckFiles).is_ok() {
                    std::thread::sleep(CERT_CHECK_INTERVAL);
                }
            })
            .map(drop)
    }

    /// SIGHUP or `sluicectl reload`: builds the configuration again (the file read anew) and,
    /// when only what can change live changed, hands it to every worker. Workers follow it for
    /// each new connection and each step an established one takes from now on; no socket
    /// closes and no connection is dropped. Listeners added, removed or moved, another engine,
    /// user, worker count or metrics address need a restart: such a reload is refused whole and
    /// the running configuration kept, like one that does not parse. Names are resolved anew,
    /// certificate files read again, and the `[admission]` lists start over from the file when
    /// that table changed (otherwise live `sluicectl allow|deny|dest` changes stay).
    fn reload(&mut self) -> ReloadAnswer {
        let answer = self.try_reload();
        match &answer {
            Ok((v, _)) => {
                self.shared.supervisor().inc(Counter::Reloads);
                tracing::info!("configuration reloaded: {v}");
            }
            Err(e) => {
                self.shared.supervisor().inc(Counter::ReloadsFailed);
                tracing::error!("reload refused, the running configuration is kept: {e}");
            }
        }
        answer.map_err(|e| format!("{e} (the running configuration is kept)"))
    }

    fn try_reload(&mut self) -> ReloadAnswer {
        let Some(from) = self.reload_from.clone() else {
            // Started from a preset or the command line: what can be refreshed is.
            let mut names = upstream::Names::default();
            let (table, _) = upstream::resolve_all(&self.config, &mut names);
            self.shared
                .supervisor()
                .add(Counter::UpstreamAddressesRefused, names.take_refused());
            self.table = table;
            for i in 0..self.nworkers {
                self.send_table(i);
            }
            self.reload_tls(true);
            return Err(
                "the daemon was started from a preset or the command line, not a \
                        config file: upstream names were resolved and certificate files read \
                        again, nothing else changed"
                    .into(),
            );
        };
        let new = (from.0)()?;
        if let Some(why) = restart_needed(&self.config, &new, self.nworkers, self.nofile) {
            return Err(format!("{why}: restart sluice for that"));
        }
        let tls = load_tls(&new, Some((&self.config, &self.tls))).map_err(|e| e.to_string())?;
        let changed: Vec<String> = new
            .listeners
            .iter()
            .zip(&self.config.listeners)
            .filter(|(n, o)| n != o)
            .map(|(n, _)| n.name.clone())
            .collect();
        let admission_changed = new.admission != self.config.admission;
        let global_changed = Config {
            listeners: Vec::new(),
            ..new.clone()
        } != Config {
            listeners: Vec::new(),
            ..self.config.clone()
        };
        self.config_toml = new.to_toml();
        self.config = new;
        self.tls = tls;
        if admission_changed {
            self.rules = initial_rules(&self.config);
            self.health_dests.set(&self.rules.dests);
        }
        // The deny tries (the lists may have started over) and the relay's ports.
        let ports = listener_ports(&self.config);
        for x in &mut self.xdp {
            if let Err(e) = sync_xdp(x, &self.rules, &ports) {
                tracing::warn!(
                    "cannot fill the XDP deny maps ({e}); denied clients are refused by the workers instead"
                );
            }
        }
        let mut names = upstream::Names::default();
        let (resolved, ok) = upstream::resolve_all(&self.config, &mut names);
        self.shared
            .supervisor()
            .add(Counter::UpstreamAddressesRefused, names.take_refused());
        self.table = crate::health::Checker::default().filter(&self.config, &resolved);
        self.start_resolver(resolved, ok, names)
            .map_err(|e| format!("cannot start the resolver thread: {e}"))?;
        self.watch_cert_files()
            .map_err(|e| format!("cannot start the certificate watch: {e}"))?;
        // One write per worker: the configuration first (it gives the lists their shape),
        // then its addresses, certificates and lists; the last carries the generation the
        // worker reports back once everything before it is applied.
        self.generation += 1;
        let mut msg = ControlMsg::Config {
            toml: self.config_toml.clone(),
        }
        .encode();
        msg.push_str(&self.table_message());
        for listener in 0..self.tls.len() {
            msg.push_str(&self.tls_message(listener));
        }
        crate::decoy::start_local(&self.config, &mut self.local_decoys)?;
        msg.push_str(&self.decoy_message());
        msg.push_str(&self.admission_message());
        self.broadcast(&msg);
        {
            let mut st = self.status.lock().expect("status lock");
            st.max_connections = self.config.max_connections;
            for (l, new) in st.listeners.iter_mut().zip(&self.config.listeners) {
                l.max_connections = new.max_connections;
            }
            st.capacity = (st.per_worker_capacity * self.nworkers as u64)
                .min(u64::from(self.config.max_connections));
        }
        self.publish_status();
        let reply = serde_json::json!({
            "reloaded": true,
            "listeners_changed": changed,
            "settings_changed": global_changed,
            "admission_lists_reset": admission_changed,
            "workers": self.nworkers,
        });
        Ok((reply, self.generation))
    }

    /// The control line that hands listener `listener`'s certificate to a worker ("" if none).
    fn tls_message(&self, listener: usize) -> String {
        match &self.tls[listener] {
            Some(id) => ControlMsg::Tls {
                listener,
                chain_pem: id.chain_pem.clone(),
                key_pem: id.key_pem.clone(),
            }
            .encode(),
            None => String::new(),
        }
    }

    /// What an ACME thread asks: challenges to answer (acknowledged with the generation the
    /// workers report once they applied them), or a certificate to serve from now on.
    fn acme(&mut self, ev: crate::acme::AcmeEvent) {
        use crate::acme::AcmeEvent;
        match ev {
            AcmeEvent::Challenges {
                listeners,
                challenges,
                applied,
            } => {
                let mut msg = String::new();
                for &l in &listeners {
                    if let Some(slot) = self.challenges.get_mut(l) {
                        slot.clone_from(&challenges);
                    }
                    msg.push_str(
                        &ControlMsg::Challenges {
                            listener: l,
                            challenges: challenges.clone(),
                        }
                        .encode(),
                    );
                }
                // The admission line after it carries a generation the workers report back
                // once everything before it is applied.
                self.generation += 1;
                msg.push_str(&self.admission_message());
                self.broadcast(&msg);
                let _ = applied.send(self.generation);
            }
            AcmeEvent::Certificate { listeners, id } => {
                for l in listeners {
                    if l >= self.tls.len() || self.tls[l].as_ref() == Some(&id) {
                        continue;
                    }
                    self.tls[l] = Some(id.clone());
                    let msg = self.tls_message(l);
                    self.broadcast(&msg);
                }
                self.publish_cert_expiry();
            }
        }
    }

    /// Each TLS listener's certificate expiry, for `sluice_certificate_expiry_timestamp_seconds`.
    fn publish_cert_expiry(&self) {
        let mut st = self.status.lock().expect("status lock");
        for (l, id) in st.listeners.iter_mut().zip(&self.tls) {
            l.cert_expiry_unix = id
                .as_ref()
                .and_then(|id| crate::acme::not_after(&id.chain_pem));
        }
    }

    /// Reads certificate files again; a changed pair goes to every worker, which uses it for new
    /// connections (established ones keep their session). A pair that does not load is logged
    /// and the old one kept. `always` logs even when nothing changed (SIGHUP).
    fn reload_tls(&mut self, always: bool) {
        let mut changed = false;
        for (i, l) in self.config.listeners.iter().enumerate() {
            let Some((cert, key)) = l
                .tls
                .as_ref()
                .and_then(|t| t.cert.as_ref().zip(t.key.as_ref()))
            else {
                continue;
            };
            match PemIdentity::from_files(cert, key) {
                Ok(id) if self.tls[i].as_ref() == Some(&id) => {
                    if always {
                        tracing::info!(listener = %l.name, "certificate files unchanged");
                    }
                }
                Ok(id) => {
                    self.tls[i] = Some(id);
                    let msg = self.tls_message(i);
                    for p in self.procs.iter_mut().flatten() {
                        p.send(msg.as_bytes());
                    }
                    tracing::info!(listener = %l.name, "new certificate loaded; new connections use it");
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(listener = %l.name, "certificate reload failed, keeping the old one: {e}")
                }
            }
        }
        if changed {
            self.publish_cert_expiry();
        }
    }

    /// Where each listener's decoy is, as control lines: the built-in site, or the decoy site's
    /// `HOST:PORT` resolved now (one that does not resolve is said in the log; such probes are
    /// closed).
    fn decoy_message(&self) -> String {
        use crate::config::Decoy;
        let mut out = String::new();
        for (listener, l) in self.config.listeners.iter().enumerate() {
            let mut https_addr = None;
            let addr = match &l.decoy {
                Decoy::Off => None,
                Decoy::Builtin | Decoy::Dir(_) => {
                    let local = self.local_decoys.iter().find(|d| d.decoy == l.decoy);
                    https_addr = local.map(|d| d.https_addr);
                    local.map(|d| d.addr)
                }
                Decoy::Site(hp) => match upstream::resolve_one(&self.config, hp) {
                    Ok(found) => {
                        if !found.refused.is_empty() {
                            self.shared.supervisor().add(
                                Counter::UpstreamAddressesRefused,
                                found.refused.len() as u64,
                            );
                            tracing::warn!(
                                listener = %l.name,
                                "decoy address refused: {hp} -> {}; {}",
                                found.describe_refused(),
                                upstream::REFUSED_WHY
                            );
                        }
                        found.addrs.first().copied()
                    }
                    Err(e) => {
                        tracing::warn!(listener = %l.name, "decoy {hp} does not resolve ({e}); probes are closed instead");
                        None
                    }
                },
            };
            out.push_str(
                &ControlMsg::Decoy {
                    listener,
                    addr,
                    https_addr,
                }
                .encode(),
            );
        }
        out
    }

    /// The whole lists as one control line, at the current generation.
    fn admission_message(&self) -> String {
        ControlMsg::Admission {
            generation: self.generation,
            allow: self.rules.allow.rules().to_vec(),
            deny: self.rules.deny.rules().to_vec(),
            dests: self.rules.dests.iter().copied().collect(),
        }
        .encode()
    }

    fn broadcast(&mut self, msg: &str) {
        for p in self.procs.iter_mut().flatten() {
            p.send(msg.as_bytes());
        }
    }

    /// Applies a list command: changes go to every worker (and deny rules to the XDP tries);
    /// `deny add ... kill` also has every worker close its connections from that range.
    fn admission(&mut self, cmd: &admission::Command) -> (admission::Reply, u64) {
        use admission::{Command, List, Rule};
        let (changed, kill) = self.rules.apply(cmd);
        if changed {
            self.generation += 1;
            self.health_dests.set(&self.rules.dests);
            let msg = self.admission_message();
            self.broadcast(&msg);
            let mut failed = None;
            for x in &mut self.xdp {
                let r = match cmd {
                    Command::Add {
                        list: List::Deny,
                        rule: Rule::Client(c),
                        ..
                    } => x.deny_add(*c),
                    Command::Del {
                        list: List::Deny,
                        rule: Rule::Client(c),
                    } => x.deny_remove(*c).map(drop),
                    _ => Ok(()),
                };
                if let Err(e) = r {
                    failed = Some(e);
                }
            }
            if let Some(e) = failed {
                tracing::warn!(
                    "cannot mirror a deny rule into the XDP tries ({e}); the workers still refuse"
                );
            }
        }
        if let Some(cidr) = kill {
            self.generation += 1;
            let msg = ControlMsg::Kill {
                generation: self.generation,
                cidrs: vec![cidr],
            }
            .encode();
            self.broadcast(&msg);
        }
        if changed {
            self.publish_status();
        }
        let list = match cmd {
            Command::Add { list, .. } | Command::Del { list, .. } | Command::List(list) => *list,
        };
        let reply = admission::Reply {
            changed,
            rules: self.rules.listing(list),
            workers_applied: 0,
            workers: self.nworkers,
            xdp: list == List::Deny && !self.xdp.is_empty(),
        };
        (reply, self.generation)
    }

    fn send_table(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            self.write_table(&mut p);
            self.procs[i] = Some(p);
        }
    }

    /// Reaps dead workers and starts their replacements. A replacement that cannot be started
    /// (the process cannot be made, or it keeps exiting right after its start) leaves the slot
    /// down: its listening sockets are closed, so the kernel spreads new clients over the
    /// living workers instead of queueing them where no one accepts, and the start is tried
    /// again with back-off ([`Supervisor::tick`]).
    fn reap(&mut self) {
        for i in 0..self.procs.len() {
            let Some(p) = self.procs[i].as_mut() else {
                continue;
            };
            let Ok(Some(exit)) = p.child.try_wait() else {
                continue;
            };
            let lived = p.started.elapsed();
            let killed = p.killed;
            self.procs[i] = None;
            self.shared.clear_gauges(i);
            // Its sockets left the shared sockmap as they closed; its peer and counter entries
            // go now, before a new worker takes its index.
            if let Some(fast) = self.shared_fast.as_mut() {
                match fast.purge_owner(i as u32) {
                    Ok(n) => tracing::debug!(worker = i, entries = n, "fast-path entries cleared"),
                    Err(e) => tracing::warn!(
                        worker = i,
                        "cannot clear a dead worker's fast-path entries: {e}"
                    ),
                }
            }
            // Fold in the dead worker's last histograms before a new one reuses its slot.
            if let Some(stats) = histo::installed() {
                drop(stats.fresh());
            }
            if lived < CRASH_LOOP_WINDOW && !killed {
                self.crash_streak[i] += 1;
            } else {
                self.crash_streak[i] = 0;
                self.failures[i] = 0;
            }
            if self.crash_streak[i] > CRASH_LOOP_LIMIT {
                // Crash-looping: back off, so a broken host does not spin the CPU.
                let why = format!(
                    "it exited within {} ms of its start {} times in a row, the last time {exit}",
                    CRASH_LOOP_WINDOW.as_millis(),
                    self.crash_streak[i]
                );
                self.mark_down(i, why);
                continue;
            }
            tracing::warn!(worker = i, "worker exited ({exit}); starting a new one");
            self.restart(i);
        }
        self.publish_status();
    }

    /// Starts a worker in slot `i` (its listening sockets listening again first, if they were
    /// closed); on failure the slot is down until the next try.
    fn restart(&mut self, i: usize) {
        if self.paused[i] {
            for (l, fd) in self.listeners[i].iter().enumerate() {
                if let Err(e) = SockRef::from(fd).listen(BACKLOG) {
                    let why = format!(
                        "cannot listen again on {}: {e}",
                        self.config.listeners[l].bind
                    );
                    self.mark_down(i, why);
                    return;
                }
            }
            self.paused[i] = false;
        }
        let was_down = self.down[i].take().is_some();
        match self.spawn(i) {
            Ok(p) => {
                self.procs[i] = Some(p);
                self.restarts[i] += 1;
                self.shared.supervisor().inc(Counter::WorkerRestarts);
                if was_down {
                    tracing::info!(
                        worker = i,
                        "worker {i} started again; its listening sockets are open again"
                    );
                }
            }
            Err(e) => self.mark_down(i, e.to_string()),
        }
        self.count_down();
    }

    /// Slot `i` has no worker and cannot get one now: its listening sockets leave the port's
    /// SO_REUSEPORT group (shut down, not closed: the fd keeps the socket bound, so listening
    /// again needs no privilege the daemon dropped) and the next try is scheduled.
    fn mark_down(&mut self, i: usize, why: String) {
        self.failures[i] += 1;
        let delay = restart_backoff(self.failures[i]);
        if !self.paused[i] {
            for (l, fd) in self.listeners[i].iter().enumerate() {
                // A listening socket shut down for reading stops listening: the connections
                // queued on it are reset, new ones go to the other sockets of the group.
                if let Err(e) = SockRef::from(fd).shutdown(std::net::Shutdown::Read) {
                    tracing::warn!(
                        worker = i,
                        "cannot close the listening socket on {}: {e}",
                        self.config.listeners[l].bind
                    );
                }
            }
            self.paused[i] = true;
        }
        self.shared.supervisor().inc(Counter::WorkerStartFailures);
        tracing::error!(
            worker = i,
            "cannot start worker {i}: {why}; its listening sockets are closed, so new clients \
             go to the other workers; next try in {} ms",
            delay.as_millis()
        );
        self.down[i] = Some(Down {
            why,
            retry_at: Instant::now() + delay,
        });
        self.count_down();
    }

    fn count_down(&self) {
        let n = self.procs.iter().filter(|p| p.is_none()).count();
        self.shared.supervisor().set(Counter::WorkersDown, n as u64);
    }

    /// How long the main loop may wait for an event: until the next restart is due, or a short
    /// while when control bytes wait for a pipe.
    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut wake = Duration::from_secs(3600);
        for d in self.down.iter().flatten() {
            wake = wake.min(d.retry_at.saturating_duration_since(now));
        }
        if self.procs.iter().flatten().any(|p| p.pending() > 0) {
            wake = wake.min(CONTROL_RETRY);
        }
        wake.min((self.tickets_made + self.ticket_rotate).saturating_duration_since(now))
    }

    /// Makes a new session-ticket key once the current one is a rotation period old and hands
    /// the keys to every worker (the one before stays, to decrypt; the one before that is
    /// forgotten).
    fn rotate_tickets(&mut self) {
        if self.tickets_made.elapsed() < self.ticket_rotate {
            return;
        }
        match self.tickets.rotate() {
            Ok(keys) => {
                self.tickets = keys;
                self.tickets_made = Instant::now();
                let msg = ControlMsg::TicketKeys(self.tickets.clone()).encode();
                self.broadcast(&msg);
                tracing::debug!("new session-ticket key handed to the workers");
            }
            Err(e) => {
                // The keys in use keep working meanwhile; try again in a minute.
                tracing::error!("cannot make a new session-ticket key: {e}");
                self.tickets_made += Duration::from_secs(60);
            }
        }
    }

    /// Runs after every event and timeout: writes what waits for the control pipes (a worker
    /// that takes nothing for [`CONTROL_STALL`] is killed; its replacement starts with the whole
    /// state), and tries the starts that are due.
    fn tick(&mut self) {
        self.rotate_tickets();
        for (i, slot) in self.procs.iter_mut().enumerate() {
            let Some(p) = slot.as_mut() else {
                continue;
            };
            if p.pending() == 0 || p.killed {
                continue;
            }
            p.flush();
            let waiting = p.pending();
            if waiting > 0 && (p.moved.elapsed() >= CONTROL_STALL || waiting > CONTROL_QUEUE_MAX) {
                tracing::error!(
                    worker = i,
                    pid = p.child.id(),
                    "worker {i} does not read its control pipe ({waiting} bytes wait, none \
                     taken for {} ms): killing it; a new one starts with the whole state",
                    p.moved.elapsed().as_millis()
                );
                let _ = sys::kill(p.child.id(), libc::SIGKILL);
                p.killed = true;
                p.out = Vec::new();
                p.sent = 0;
                self.shared.supervisor().inc(Counter::WorkersKilledUnread);
            }
        }
        let now = Instant::now();
        let due: Vec<usize> = (0..self.procs.len())
            .filter(|&i| self.procs[i].is_none())
            .filter(|&i| self.down[i].as_ref().is_some_and(|d| d.retry_at <= now))
            .collect();
        if !due.is_empty() {
            for i in due {
                self.restart(i);
            }
            self.publish_status();
        }
    }

    fn publish_status(&self) {
        let mut st = self.status.lock().expect("status lock");
        st.admission = control::AdmissionStatus {
            allow_rules: self.rules.allow.len(),
            deny_rules: self.rules.deny.len(),
            destinations: self.rules.dests.len(),
            xdp_interfaces: self.xdp_interfaces.clone(),
        };
        st.workers = self
            .procs
            .iter()
            .enumerate()
            .map(|(i, p)| WorkerStatus {
                index: i,
                pid: p.as_ref().map_or(0, |p| p.child.id()),
                engine: self.kind.name().to_string(),
                active: 0,
                accepted: 0,
                restarts: self.restarts[i],
                down: self.down[i].as_ref().map(|d| d.why.clone()),
            })
            .collect();
    }

    fn stop(&mut self) {
        for p in self.procs.iter().flatten() {
            let _ = sys::kill(p.child.id(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for p in self.procs.iter_mut().flatten() {
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

/// What `/healthz` answers ([`http::Source::health`]): Ok while every worker slot has a live
/// process (published by [`Supervisor::publish_status`]) that started and serves its listening
/// sockets (it wrote its pid into its counters row; [`Shared::clear_gauges`] clears it when it
/// dies). The supervisor binds every listening socket before the first worker starts, so a
/// running worker means its sockets are bound. The one place that reads worker state for it:
/// a change to how workers are restarted needs to keep only this true.
fn serving(shared: &Shared, status: &Mutex<Status>) -> Result<(), String> {
    let st = status
        .lock()
        .map_err(|_| "the supervisor's status is poisoned")?;
    let n = st.workers.len();
    for w in &st.workers {
        if let Some(why) = &w.down {
            return Err(format!(
                "worker {} of {n} is down (restart retried with back-off): {why}",
                w.index
            ));
        }
        if w.pid == 0 {
            return Err(format!("worker {} of {n} is not running", w.index));
        }
        if shared.get(w.index, Counter::Pid) != u64::from(w.pid) {
            return Err(format!(
                "worker {} of {n} is starting (or has just exited)",
                w.index
            ));
        }
    }
    if n == 0 {
        return Err("no worker started yet".into());
    }
    Ok(())
}

/// The lists the daemon starts with, from `[admission]` (destination names resolved once here;
/// one that does not resolve is said in the log and left out).
fn initial_rules(config: &Config) -> Rules {
    let a = &config.admission;
    let mut rules = Rules {
        allow: admission::CidrSet::from_rules(a.allow.iter().copied()),
        deny: admission::CidrSet::from_rules(a.deny.iter().copied()),
        dests: Default::default(),
    };
    for hp in &a.destinations {
        match admission::parse_dest(&hp.to_string()) {
            Ok(addrs) => rules.dests.extend(addrs),
            Err(e) => tracing::warn!("admission.destinations: {e}; left out"),
        }
    }
    if !a.destinations.is_empty() && rules.dests.is_empty() {
        tracing::warn!(
            "no destination of [admission] resolved: every upstream connection is refused until `sluicectl dest add`"
        );
    }
    rules
}

/// After every privileged step (binding, eBPF, XDP, the control socket): the control socket
/// becomes 0660 to the user's group, and the daemon becomes the user with no capability left,
/// whatever the engine (`sys::become_user`; threads started later and the workers it executes
/// hold none either).
///
/// Nothing after this point needs one. Capabilities are checked when an eBPF object is created
/// (maps: CAP_BPF, the sockhash CAP_NET_ADMIN; the verdict: CAP_BPF and CAP_NET_ADMIN, and
/// CAP_PERFMON where the verifier wants it for the counters' pointer arithmetic; 6.18 does
/// not), when a program is attached (the verdict to the sockmap, XDP to an interface:
/// CAP_NET_ADMIN) and when a port below 1024 is bound; all of that happened above. What follows goes through fds opened above, which the kernel checks
/// against the fd, not the caller's capabilities (since Linux 5.19, c8644cd0efe7,
/// `kernel.unprivileged_bpf_disabled` refuses only BPF_MAP_CREATE and BPF_PROG_LOAD; the
/// sockmap engine needs io_uring's buffer rings, 5.19 too): workers insert and remove pairs and
/// read counters in the maps handed to them; the supervisor reads the verdict's event ring
/// (mmap), clears a dead worker's entries and mirrors deny rules into the XDP tries. A
/// restarted worker gets the same fds, and a reload cannot change `engine`, `xdp_interfaces` or
/// `user`, so nothing is loaded or attached again.
fn drop_privileges(
    name: &str,
    ids: sys::UserIds,
    control: Option<&std::path::Path>,
) -> Result<(), StartError> {
    if let Some(path) = control.filter(|p| p.exists()) {
        // Our own runtime directory (/run/sluice) too, so the group can reach the socket.
        if let Some(dir) = path.parent().filter(|d| d.ends_with("sluice")) {
            give_to_group(dir, name, ids.gid, 0o750)?;
        }
        give_to_group(path, name, ids.gid, 0o660)?;
    }
    sys::become_user(ids)
        .map_err(|e| std::io::Error::other(format!("dropping privileges to user `{name}`: {e}")))?;
    tracing::info!(user = name, "running unprivileged, with no capability");
    Ok(())
}

/// Makes `path` root's and `gid`'s with `mode`. Changing a file's group needs CAP_CHOWN unless
/// the process already runs with that group: the systemd unit starts the daemon with
/// `Group=sluice` (its bounding set has no CAP_CHOWN), so systemd's /run/sluice and the socket
/// the daemon creates there already belong to the group and nothing needs changing.
fn give_to_group(path: &std::path::Path, user: &str, gid: u32, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(path)?;
    if (meta.uid(), meta.gid()) != (0, gid) {
        std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(|e| {
            std::io::Error::other(format!(
                "cannot give {} to the group of `{user}`: {e} (needs CAP_CHOWN, or start \
                 with that group, as the systemd unit's Group={user} does)",
                path.display()
            ))
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The ports the relay listens on: the only ones whose SYNs XDP may drop.
fn listener_ports(config: &Config) -> Vec<u16> {
    config.listeners.iter().map(|l| l.bind.port()).collect()
}

/// Makes an XDP program's maps hold exactly the daemon's deny list (pinned ones may hold an
/// older one; a reload may have started the lists over) and its listening ports (pinned ones
/// may hold another daemon's).
fn sync_xdp(x: &mut XdpDeny, rules: &Rules, ports: &[u16]) -> Result<(), crate::ebpf::EbpfError> {
    x.set_ports(ports)?;
    for c in x.deny_list()? {
        if !rules.deny.rules().contains(&c) {
            x.deny_remove(c)?;
        }
    }
    for c in rules.deny.rules() {
        x.deny_add(*c)?;
    }
    Ok(())
}

/// Why `new` cannot replace `old` in a running daemon (None: it can). Listeners are the
/// workers' sockets and the rows of their counters and histograms; engine, user and worker
/// count are fixed when the processes start; the metrics listener is bound once.
fn restart_needed(old: &Config, new: &Config, nworkers: usize, nofile: u64) -> Option<String> {
    let ids = |c: &Config| -> Vec<(String, SocketAddr)> {
        c.listeners
            .iter()
            .map(|l| (l.name.clone(), l.bind))
            .collect()
    };
    if ids(old) != ids(new) {
        return Some(
            "listeners were added, removed, renamed, moved to another address or reordered".into(),
        );
    }
    let fixed = [
        ("engine", old.engine != new.engine),
        ("user", old.user != new.user),
        ("workers", old.workers != new.workers),
        ("metrics", old.metrics != new.metrics),
        ("state_dir", old.state_dir != new.state_dir),
        (
            "listen.tls.acme",
            crate::acme::jobs(old)
                .iter()
                .map(|j| (&j.settings, &j.listeners, j.http01))
                .ne(crate::acme::jobs(new)
                    .iter()
                    .map(|j| (&j.settings, &j.listeners, j.http01))),
        ),
        (
            "admission.xdp_interfaces",
            old.admission.xdp_interfaces != new.admission.xdp_interfaces,
        ),
    ];
    if let Some((key, _)) = fixed.iter().find(|(_, changed)| *changed) {
        return Some(format!("`{key}` changed"));
    }
    let needed = workers_needed(new, nofile);
    if needed > nworkers {
        return Some(format!(
            "`max_connections` = {} needs {needed} worker processes and this daemon runs {nworkers}",
            new.max_connections
        ));
    }
    None
}

/// Attaches the XDP deny program to each interface (with the maps pinned under `pin_dir` when
/// `sluicectl load` pinned them there, else private ones), puts the deny rules in its tries and
/// the listeners' ports in its port map (it drops only SYNs to those, so a deny rule never cuts
/// the host's other services off). A failure is one log line; the workers' own check still
/// applies.
fn attach_xdp(
    interfaces: &[String],
    pin_dir: Option<&std::path::Path>,
    rules: &Rules,
    ports: &[u16],
) -> (Vec<XdpDeny>, Vec<String>) {
    let pinned = pin_dir.filter(|d| crate::ebpf::is_pinned(d));
    let mut out = Vec::new();
    let mut names = Vec::new();
    for ifname in interfaces {
        let attached = match pinned {
            Some(dir) => XdpDeny::attach_pinned(ifname, dir),
            None => XdpDeny::attach(ifname),
        };
        let mut x = match attached {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(
                    interface = %ifname,
                    "cannot attach the XDP deny program ({e}); denied clients are refused by the workers instead"
                );
                continue;
            }
        };
        match sync_xdp(&mut x, rules, ports) {
            Ok(()) => {
                tracing::info!(interface = %ifname, pinned = pinned.is_some(), "XDP deny program attached");
                out.push(x);
                names.push(ifname.clone());
            }
            Err(e) => tracing::warn!(
                interface = %ifname,
                "cannot fill the XDP deny maps ({e}); denied clients are refused by the workers instead"
            ),
        }
    }
    (out, names)
}

/// Waits until every live worker reports `generation` applied, at most `wait`; returns how many
/// did.
fn applied_by(shared: &Shared, nworkers: usize, generation: u64, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    loop {
        let live: Vec<usize> = (0..nworkers)
            .filter(|&i| shared.get(i, Counter::Pid) != 0)
            .collect();
        let applied = live
            .iter()
            .filter(|&&i| shared.get(i, Counter::AdmissionGeneration) >= generation)
            .count();
        if applied == live.len() || Instant::now() >= deadline {
            return applied;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Makes `state_dir` (0700) if it is missing; with `user`, gives it to the user's group (0770)
/// so the ACME thread can write there after the privilege drop. systemd's
/// `StateDirectory=sluice` makes it already.
fn prepare_state_dir(
    dir: &std::path::Path,
    run_as: Option<&(String, sys::UserIds)>,
) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                std::io::Error::other(format!(
                    "acme: cannot create state_dir {}: {e}",
                    dir.display()
                ))
            })?;
    }
    if let Some((name, ids)) = run_as {
        give_to_group(dir, name, ids.gid, 0o770).map_err(|e| {
            std::io::Error::other(format!(
                "acme: state_dir {} cannot be given to user `{name}`'s group: {e}",
                dir.display()
            ))
        })?;
    }
    Ok(())
}

/// The control socket's handler for list commands and `reload`: hands the command to the main
/// loop, then waits (at most [`APPLY_WAIT`]) until every live worker reports the change applied.
fn admission_handler(
    tx: mpsc::Sender<Event>,
    shared: Arc<Shared>,
    nworkers: usize,
) -> control::Handler {
    let tx = Mutex::new(tx);
    // Waits until every live worker reports `generation` applied (at most APPLY_WAIT); returns
    // how many did.
    let applied =
        move |generation: u64| -> usize { applied_by(&shared, nworkers, generation, APPLY_WAIT) };
    Box::new(move |line| {
        if line == "reload" {
            let (reply_tx, reply_rx) = mpsc::channel();
            if tx
                .lock()
                .expect("control sender")
                .send(Event::Reload(reply_tx))
                .is_err()
            {
                return Some(serde_json::json!({ "error": "the daemon is stopping" }));
            }
            // Generating a certificate for changed TLS settings takes seconds.
            return Some(match reply_rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok((mut v, generation))) => {
                    v["workers_applied"] = applied(generation).into();
                    v
                }
                Ok(Err(e)) => serde_json::json!({ "error": e }),
                Err(_) => serde_json::json!({ "error": "the daemon did not answer" }),
            });
        }
        let cmd = match admission::Command::parse(line) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => return None,
            Err(e) => return Some(serde_json::json!({ "error": e })),
        };
        let (reply_tx, reply_rx) = mpsc::channel();
        if tx
            .lock()
            .expect("control sender")
            .send(Event::Admission(cmd, reply_tx))
            .is_err()
        {
            return Some(serde_json::json!({ "error": "the daemon is stopping" }));
        }
        let (mut reply, generation) = match reply_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Some(serde_json::json!({ "error": e })),
            Err(_) => return Some(serde_json::json!({ "error": "the daemon did not answer" })),
        };
        reply.workers_applied = applied(generation);
        Some(serde_json::to_value(&reply).unwrap_or_default())
    })
}

/// Reads the shared fast path's event ring on a thread of its own (the verdict the supervisor
/// attached writes there) and hands each event to the main loop, which tells the worker that
/// owns the socket.
fn spawn_held_relay(
    mut ring: crate::ebpf::HeldRing,
    tx: mpsc::Sender<Event>,
) -> std::io::Result<()> {
    let epoll = sys::Epoll::new()?;
    epoll.add(ring.fd(), libc::EPOLLIN as u32, 0)?;
    std::thread::Builder::new()
        .name("fast-held".into())
        .spawn(move || {
            let mut ready = [sys::epoll_event_zeroed(); 1];
            let mut events = Vec::new();
            loop {
                if epoll.wait(&mut ready, 1000).is_err() {
                    return;
                }
                ring.drain(&mut events);
                for e in events.drain(..) {
                    if tx.send(Event::Held(e)).is_err() {
                        return;
                    }
                }
            }
        })
        .map(drop)
}

fn spawn_signal_thread(tx: mpsc::Sender<Event>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGCHLD, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_backoff_doubles_up_to_its_bound() {
        let ms: Vec<u128> = (1..=9).map(|n| restart_backoff(n).as_millis()).collect();
        assert_eq!(
            ms,
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
        );
        assert_eq!(restart_backoff(u32::MAX), RESTART_BACKOFF_MAX);
    }

    #[test]
    fn a_listening_port_is_seen_as_in_use() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(already_listening(addr));
        let other: SocketAddr = "127.0.0.3:1".parse().unwrap();
        assert!(!already_listening(SocketAddr::new(
            other.ip(),
            addr.port() ^ 1
        )));
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        assert!(already_listening(l6.local_addr().unwrap()));
    }
}
