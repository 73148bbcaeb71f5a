//! Runs the real `sluice` binary: builders for `sluice forward` and `sluice run --config`, a
//! guard that stops the supervisor and every worker it forked by pid (also on panic), and the
//! views the tests need of a running relay (worker pids, their fds, `sluicectl status --json`).

use std::collections::HashMap;
use std::fs::{self, File};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::procfs::FdKinds;
use crate::{Output, READY, TempDir, procfs, run_with_timeout, sys, tail, wait_until};

/// Pipe fds a worker may keep while idle: the splice engine's bounded pool of free, empty pipes
/// (the relay's `PIPE_POOL_MAX` = 32 pipes, 2 fds each). Not a leak.
pub const PIPE_FDS_PER_WORKER: usize = 64;

/// Where the binaries under test are: `$SLUICE_BIN_DIR` (set by `cargo xtask test`), else the
/// workspace's `target/release`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("SLUICE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"),
    }
}

fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --release -p sluice --bins` (or run `cargo xtask test`)",
        path.display()
    );
    path
}

/// The `sluice` daemon binary.
pub fn sluice_bin() -> PathBuf {
    bin("sluice")
}

/// The `sluicectl` control binary.
pub fn sluicectl_bin() -> PathBuf {
    bin("sluicectl")
}

/// A `[[listen]]` table of a generated config.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub upstream: Vec<String>,
    pub max_connections: Option<u32>,
}

/// A config file for `sluice run --config`, written as TOML by [`Config::to_toml`].
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub workers: Option<u32>,
    pub engine: Option<String>,
    pub max_connections: Option<u32>,
    pub resolve_interval_s: Option<u32>,
    pub connect_ms: Option<u32>,
    pub idle_ms: Option<u32>,
    pub fin_ms: Option<u32>,
    pub header_ms: Option<u32>,
    pub listeners: Vec<ListenerConfig>,
}

impl Config {
    pub fn new() -> Config {
        Config::default()
    }

    /// Adds a `[[listen]]` table.
    pub fn listen(mut self, name: &str, bind: SocketAddr, upstream: &[&str]) -> Config {
        self.listeners.push(ListenerConfig {
            name: name.to_owned(),
            bind,
            upstream: upstream.iter().map(|s| s.to_string()).collect(),
            max_connections: None,
        });
        self
    }

    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let mut top = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                s.push_str(&format!("{k} = {v}\n"));
            }
        };
        top("workers", self.workers.map(|v| v.to_string()));
        top("engine", self.engine.as_ref().map(|v| format!("{v:?}")));
        top(
            "max_connections",
            self.max_connections.map(|v| v.to_string()),
        );
        top(
            "resolve_interval_s",
            self.resolve_interval_s.map(|v| v.to_string()),
        );
        let timeouts = [
            ("connect_ms", self.connect_ms),
            ("idle_ms", self.idle_ms),
            ("fin_ms", self.fin_ms),
            ("header_ms", self.header_ms),
        ];
        if timeouts.iter().any(|(_, v)| v.is_some()) {
            s.push_str("\n[timeouts]\n");
            for (k, v) in timeouts {
                if let Some(v) = v {
                    s.push_str(&format!("{k} = {v}\n"));
                }
            }
        }
        for l in &self.listeners {
            s.push_str("\n[[listen]]\n");
            s.push_str(&format!("name = {:?}\n", l.name));
            s.push_str(&format!("bind = \"{}\"\n", l.bind));
            let ups: Vec<String> = l.upstream.iter().map(|u| format!("{u:?}")).collect();
            s.push_str(&format!("upstream = [{}]\n", ups.join(", ")));
            if let Some(m) = l.max_connections {
                s.push_str(&format!("max_connections = {m}\n"));
            }
        }
        s
    }
}

/// A `sluice` command line being built; [`SluiceCmd::start`] runs it as a relay,
/// [`SluiceCmd::run_to_exit`] runs it to completion.
#[derive(Debug)]
pub struct SluiceCmd {
    args: Vec<String>,
    listen: Vec<SocketAddr>,
    workers: Option<usize>,
    env: Vec<(String, String)>,
    block_io_uring: bool,
    dir: TempDir,
}

impl SluiceCmd {
    fn new(args: Vec<String>, listen: Vec<SocketAddr>, dir: TempDir) -> SluiceCmd {
        SluiceCmd {
            args,
            listen,
            workers: None,
            env: Vec::new(),
            block_io_uring: false,
            dir,
        }
    }

    /// Any further argument.
    pub fn arg(mut self, a: impl Into<String>) -> SluiceCmd {
        self.args.push(a.into());
        self
    }

    fn opt(self, name: &str, value: impl ToString) -> SluiceCmd {
        self.arg(name).arg(value.to_string())
    }

    /// `--engine auto|splice|copy|epoll`.
    pub fn engine(self, engine: &str) -> SluiceCmd {
        self.opt("--engine", engine)
    }

    /// `--workers N`; [`SluiceCmd::start`] then waits for N workers.
    pub fn workers(mut self, n: usize) -> SluiceCmd {
        self.workers = Some(n);
        self.opt("--workers", n)
    }

    pub fn max_connections(self, n: u32) -> SluiceCmd {
        self.opt("--max-connections", n)
    }

    pub fn connect_timeout_ms(self, ms: u64) -> SluiceCmd {
        self.opt("--connect-timeout-ms", ms)
    }

    pub fn idle_timeout_ms(self, ms: u64) -> SluiceCmd {
        self.opt("--idle-timeout-ms", ms)
    }

    pub fn fin_timeout_ms(self, ms: u64) -> SluiceCmd {
        self.opt("--fin-timeout-ms", ms)
    }

    /// `--resolve HOST=IP` (for `run --config`).
    pub fn resolve(self, host: &str, ip: IpAddr) -> SluiceCmd {
        self.opt("--resolve", format!("{host}={ip}"))
    }

    /// An environment variable for the daemon (e.g. `RUST_LOG`).
    pub fn env(mut self, key: &str, value: &str) -> SluiceCmd {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Runs the daemon under a seccomp filter that makes io_uring_setup fail with EPERM, as
    /// Docker's default profile does.
    pub fn block_io_uring(mut self) -> SluiceCmd {
        self.block_io_uring = true;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(sluice_bin());
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if self.block_io_uring {
            sys::block_io_uring(&mut cmd);
        }
        cmd
    }

    /// Runs the command to its end (for commands that exit: `check-config`, a failing start).
    pub fn run_to_exit(self, timeout: Duration) -> Output {
        run_with_timeout(&mut self.command(), timeout)
    }

    /// Starts the relay with a control socket in its temp dir and waits until every listener
    /// is bound and the workers are forked (up to [`READY`]). Panics with the relay's stderr
    /// when it exits or is not ready in time.
    pub fn start(self) -> Sluice {
        let control = self.dir.join("control.sock");
        let stderr_path = self.dir.join("stderr.log");
        let mut cmd = self.command();
        cmd.arg("--control").arg(&control);
        cmd.stdin(Stdio::null())
            .stdout(File::create(self.dir.join("stdout.log")).unwrap())
            .stderr(File::create(&stderr_path).unwrap());
        // The supervisor stops its workers on SIGTERM: a dead test thread leaves nothing running.
        sys::parent_death_signal(&mut cmd, libc::SIGTERM);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", sluice_bin().display()));
        let pid = child.id();
        let mut s = Sluice {
            child: Some(child),
            pid,
            control,
            stderr_path,
            listen: self.listen.clone(),
            expected_workers: self.workers.unwrap_or(1),
            seen: Mutex::new(HashMap::new()),
            args: self.args.clone(),
            dir: self.dir,
        };
        s.wait_ready();
        s
    }
}

/// A running relay. Dropping it stops the supervisor (SIGTERM, then SIGKILL) and kills any
/// worker left behind, each by its pid and start time.
#[derive(Debug)]
pub struct Sluice {
    child: Option<Child>,
    pid: u32,
    control: PathBuf,
    stderr_path: PathBuf,
    listen: Vec<SocketAddr>,
    expected_workers: usize,
    /// Every worker seen: pid -> start time (so a recycled pid is never signalled).
    seen: Mutex<HashMap<u32, u64>>,
    args: Vec<String>,
    dir: TempDir,
}

impl Sluice {
    /// `sluice forward LISTEN UPSTREAM`.
    pub fn forward(listen: SocketAddr, upstream: SocketAddr) -> SluiceCmd {
        let args = vec!["forward".into(), listen.to_string(), upstream.to_string()];
        SluiceCmd::new(args, vec![listen], TempDir::new())
    }

    /// `sluice run --config FILE` with `config` written to the relay's temp dir.
    pub fn run_config(config: &Config) -> SluiceCmd {
        Sluice::run_config_text(
            &config.to_toml(),
            config.listeners.iter().map(|l| l.bind).collect(),
        )
    }

    /// `sluice run --config FILE` with a config given as text; `listen` is what to wait for.
    pub fn run_config_text(toml: &str, listen: Vec<SocketAddr>) -> SluiceCmd {
        let dir = TempDir::new();
        let path = dir.join("sluice.toml");
        fs::write(&path, toml).unwrap();
        let args = vec![
            "run".into(),
            "--config".into(),
            path.to_string_lossy().into_owned(),
        ];
        SluiceCmd::new(args, listen, dir)
    }

    /// `sluice check-config FILE` on `toml`, run to its end.
    pub fn check_config(toml: &str) -> Output {
        let dir = TempDir::new();
        let path = dir.join("check.toml");
        fs::write(&path, toml).unwrap();
        let args = vec!["check-config".into(), path.to_string_lossy().into_owned()];
        SluiceCmd::new(args, Vec::new(), dir).run_to_exit(Duration::from_secs(10))
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "sluice {:?} exited at start ({status}); stderr:\n{}",
                    self.args,
                    tail(&self.stderr_log(), 60)
                );
            }
            let bound = self.listen.iter().all(|a| procfs::is_listening(*a));
            if bound && self.worker_pids().len() >= self.expected_workers {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "sluice {:?} not ready in {READY:?} (listening: {bound}, workers: {:?}); stderr:\n{}",
                    self.args,
                    self.worker_pids(),
                    tail(&self.stderr_log(), 60)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The first listen address.
    pub fn addr(&self) -> SocketAddr {
        self.listen[0]
    }

    /// The relay's temp dir (config, logs, control socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Live worker processes (children of the supervisor), recorded for cleanup.
    pub fn worker_pids(&self) -> Vec<u32> {
        let pids: Vec<u32> = procfs::children(self.pid)
            .into_iter()
            .filter(|p| procfs::alive(*p))
            .collect();
        let mut seen = self.seen.lock().unwrap();
        for &p in &pids {
            if let Some(t) = procfs::start_time(p) {
                seen.entry(p).or_insert(t);
            }
        }
        pids
    }

    /// Waits until exactly `n` workers are alive; returns their pids.
    pub fn wait_workers(&self, n: usize, timeout: Duration) -> Vec<u32> {
        let mut pids = Vec::new();
        let ok = wait_until(timeout, || {
            pids = self.worker_pids();
            pids.len() == n
        });
        assert!(
            ok,
            "expected {n} workers, have {pids:?}; stderr:\n{}",
            tail(&self.stderr_log(), 40)
        );
        pids
    }

    /// `sluicectl status --json` counter `name`: top level, or under `totals`.
    pub fn counter(&self, name: &str) -> Option<u64> {
        let s = self.status();
        s[name].as_u64().or_else(|| s["totals"][name].as_u64())
    }

    /// Open fds of all workers, by kind.
    pub fn worker_fds(&self) -> FdKinds {
        self.worker_pids()
            .iter()
            .filter_map(|p| procfs::fd_kinds(*p))
            .fold(FdKinds::default(), |a, b| a + b)
    }

    /// The workers' fds once they stop changing (same non-pipe count over 300 ms, at most
    /// 10 s): a baseline for leak checks.
    pub fn fd_baseline(&self) -> FdKinds {
        let mut last = self.worker_fds();
        let mut stable = 0;
        for _ in 0..100 {
            thread::sleep(Duration::from_millis(100));
            let now = self.worker_fds();
            if now.non_pipe() == last.non_pipe() {
                stable += 1;
                if stable >= 3 {
                    return now;
                }
            } else {
                stable = 0;
            }
            last = now;
        }
        last
    }

    /// Waits (up to `timeout`) until the workers hold no more sockets and other fds than
    /// `baseline` plus `slack`, and no more pipes than the baseline (control and log pipes) plus
    /// what their pools may keep
    /// ([`PIPE_FDS_PER_WORKER`] each). Err names what stayed.
    pub fn settle_fds(
        &self,
        baseline: FdKinds,
        slack: usize,
        timeout: Duration,
    ) -> Result<FdKinds, String> {
        let mut now = FdKinds::default();
        let ok = wait_until(timeout, || {
            now = self.worker_fds();
            let pipe_cap = PIPE_FDS_PER_WORKER * self.worker_pids().len();
            now.non_pipe() <= baseline.non_pipe() + slack && now.pipes <= baseline.pipes + pipe_cap
        });
        if ok {
            Ok(now)
        } else {
            Err(format!(
                "workers hold {now:?} fds, {baseline:?} before (slack {slack}, pipes at most {PIPE_FDS_PER_WORKER} per worker)"
            ))
        }
    }

    /// Runs `sluicectl --control SOCKET ARGS...` to its end.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(sluicectl_bin());
        cmd.arg("--control").arg(&self.control).args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(10))
    }

    /// `sluicectl status --json`, parsed; retried for up to 10 s while the control socket
    /// comes up.
    pub fn status(&self) -> serde_json::Value {
        let mut last = String::new();
        for _ in 0..50 {
            let out = self.ctl(&["status", "--json"]);
            if out.status.success() {
                match serde_json::from_str(&out.stdout) {
                    Ok(v) => return v,
                    Err(e) => last = format!("not JSON ({e}): {}", out.stdout),
                }
            } else {
                last = format!("{}: {}", out.status, out.text());
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "sluicectl status --json failed: {last}\nsluice stderr:\n{}",
            tail(&self.stderr_log(), 40)
        );
    }

    /// Everything the relay wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// True while the supervisor runs.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// SIGTERM, then waits (up to 10 s) for the supervisor to exit and its workers to be gone;
    /// panics when either outlives the grace period. Returns the exit status and the whole log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let workers = self.worker_pids();
        let seen = self.seen.lock().unwrap().clone();
        let mut child = self.child.take().expect("running");
        sys::kill(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                sys::kill(self.pid, libc::SIGKILL);
                let _ = child.wait();
                panic!(
                    "sluice did not exit within 10 s of SIGTERM; stderr:\n{}",
                    tail(&self.stderr_log(), 40)
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let gone = wait_until(Duration::from_secs(10), || {
            workers
                .iter()
                .all(|p| seen.get(p).is_none_or(|t| !procfs::same_process(*p, *t)))
        });
        assert!(gone, "workers {workers:?} outlived their supervisor");
        (status, self.stderr_log())
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- sluice {:?} stderr (tail) ---\n{}\n---",
                self.args,
                tail(&self.stderr_log(), 60)
            );
        }
        self.worker_pids();
        if let Some(mut child) = self.child.take() {
            sys::kill(self.pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                thread::sleep(Duration::from_millis(10));
            }
            if child.try_wait().ok().flatten().is_none() {
                sys::kill(self.pid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        // Workers the supervisor did not stop (it crashed, or was SIGKILLed): kill each one that
        // is still the process we saw.
        let seen = self.seen.lock().unwrap().clone();
        for (pid, start) in seen {
            if procfs::same_process(pid, start) {
                sys::kill(pid, libc::SIGKILL);
            }
        }
    }
}
