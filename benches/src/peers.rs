//! The candidates (no relay, Sluice's four engines, HAProxy, nginx, socat): how each is
//! configured and started, and the guard that stops it.
//!
//! Each relay listens on its own 127.77.0.x address and relays to the upstream on 127.77.0.2.
//! Peers run with their packaged defaults except where a default would make the comparison
//! meaningless (connection limits, listen backlog); [`Candidate::config_text`] is what the report
//! prints, so every deviation is on the page.
//!
//! Every process started here is a [`Guard`]: dropping it stops the process and its descendants by
//! pid (SIGTERM, then SIGKILL after 3 s), and `PR_SET_PDEATHSIG` stops them if this process dies.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::net::RELAY_PORT;

/// Who relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Sluice(&'static str),
    Haproxy,
    Nginx,
    Socat,
}

/// One column of the report.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: &'static str,
    pub kind: Kind,
    pub listen_ip: Ipv4Addr,
}

/// Every candidate, in report order.
pub fn all() -> Vec<Candidate> {
    let c = |name, kind, last| Candidate {
        name,
        kind,
        listen_ip: Ipv4Addr::new(127, 77, 0, last),
    };
    vec![
        c("direct", Kind::Direct, 2),
        c("sluice-splice", Kind::Sluice("splice"), 3),
        c("sluice-copy", Kind::Sluice("copy"), 4),
        c("sluice-epoll", Kind::Sluice("epoll"), 5),
        c("sluice-sockmap", Kind::Sluice("sockmap"), 9),
        c("haproxy", Kind::Haproxy, 6),
        c("nginx", Kind::Nginx, 7),
        c("socat", Kind::Socat, 8),
        // The splice engine with histogram recording off: the cost of recording, measured
        // against `sluice-splice` in one run. Only when named in `--candidates`.
        c(NO_HISTOGRAMS, Kind::Sluice("splice"), 9),
        // Another build of Sluice (`SLUICE_BENCH_BASELINE`: the directory holding its `sluice`),
        // so a change is measured against the code before it in one run. Only when named.
        c("baseline-splice", Kind::Sluice("splice"), 10),
        c("baseline-copy", Kind::Sluice("copy"), 11),
        c("baseline-epoll", Kind::Sluice("epoll"), 12),
        c("baseline-sockmap", Kind::Sluice("sockmap"), 13),
    ]
}

/// The environment variable naming the directory of the `baseline-*` candidates' `sluice`.
pub const BASELINE_ENV: &str = "SLUICE_BENCH_BASELINE";

/// The candidate that runs Sluice with `--no-histograms`.
pub const NO_HISTOGRAMS: &str = "sluice-splice-nohist";

/// Candidates a run includes only when asked for by name.
pub fn opt_in(name: &str) -> bool {
    name == NO_HISTOGRAMS || name.starts_with("baseline-")
}

/// HAProxy's pipe pool for `splice-auto`; each pipe is two fds.
pub const HAPROXY_MAXPIPES: u64 = 64;

/// Where the binaries are and where files go.
#[derive(Debug, Clone)]
pub struct Env {
    /// Holds `sluice`, `sluicectl`, `loadgen`.
    pub bin_dir: PathBuf,
    /// Configs, control sockets and logs of this run.
    pub work_dir: PathBuf,
    /// RLIMIT_NOFILE the relays get (the hard limit).
    pub nofile: u64,
}

impl Candidate {
    /// Where clients connect: the relay, or the upstream itself for `direct`.
    pub fn target(&self, upstream: SocketAddr) -> SocketAddr {
        match self.kind {
            Kind::Direct => upstream,
            _ => SocketAddr::V4(SocketAddrV4::new(self.listen_ip, RELAY_PORT)),
        }
    }

    /// HAProxy's maxconn: two fds per connection, the pipe pool, and 60 spare, under the limit.
    pub fn haproxy_maxconn(nofile: u64) -> u64 {
        nofile.saturating_sub(2 * HAPROXY_MAXPIPES + 60) / 2
    }

    /// The configuration file or command line, as the report shows it.
    pub fn config_text(&self, env: &Env, upstream: SocketAddr) -> String {
        let listen = self.target(upstream);
        match self.kind {
            Kind::Direct => "(no relay: clients connect to the upstream)".into(),
            Kind::Sluice(engine) => format!(
                "sluice forward {listen} {upstream} --engine {engine} --control <dir>/sluice.sock \
                 --metrics off{}",
                if self.name == NO_HISTOGRAMS {
                    " --no-histograms"
                } else {
                    ""
                }
            ),
            Kind::Haproxy => {
                let maxconn = Candidate::haproxy_maxconn(env.nofile);
                format!(
                    "global\n    maxconn {maxconn}\n    maxpipes {HAPROXY_MAXPIPES}\n    nbthread 2\n\
                     defaults\n    mode tcp\n    option splice-auto\n    maxconn {maxconn}\n\
                     \x20   timeout connect 5s\n    timeout client 200s\n    timeout server 200s\n\
                     \x20   timeout client-fin 1s\n    timeout server-fin 1s\n\
                     frontend fe\n    bind {listen}\n    default_backend be\n\
                     backend be\n    server up {upstream}\n"
                )
            }
            Kind::Nginx => format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 worker_processes auto;\nworker_rlimit_nofile {nofile};\n\
                 pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
                 daemon off;\n\
                 events {{\n    worker_connections {wc};\n}}\n\
                 stream {{\n    server {{\n        listen {listen} reuseport backlog=4096;\n\
                 \x20       proxy_pass {upstream};\n        proxy_connect_timeout 5s;\n\
                 \x20       proxy_timeout 200s;\n    }}\n}}\n",
                nofile = env.nofile,
                wc = env.nofile.saturating_sub(100),
                dir = env.work_dir.display(),
            ),
            Kind::Socat => format!(
                "socat TCP-LISTEN:{port},bind={ip},fork,reuseaddr,backlog=4096 TCP:{upstream}",
                port = RELAY_PORT,
                ip = self.listen_ip,
            ),
        }
    }

    /// Starts the relay towards `upstream` and waits until it listens. `None` for `direct`.
    pub fn start(&self, env: &Env, upstream: SocketAddr, log: &Path) -> Result<Option<Running>> {
        self.start_with(env, upstream, log, &[])
    }

    /// [`Candidate::start`] with more command-line arguments for Sluice (ignored by the others).
    pub fn start_with(
        &self,
        env: &Env,
        upstream: SocketAddr,
        log: &Path,
        sluice_args: &[String],
    ) -> Result<Option<Running>> {
        let listen = self.target(upstream);
        let cmd = match self.kind {
            Kind::Direct => return Ok(None),
            Kind::Sluice(engine) => {
                let mut c = Command::new(self.sluice_bin(env)?);
                c.arg("forward")
                    .arg(listen.to_string())
                    .arg(upstream.to_string())
                    .args(["--engine", engine, "--control"])
                    .arg(self.control_path(env))
                    // No stats HTTP listener: relays of a run must not share 127.0.0.1:9199.
                    .args(["--metrics", "off"])
                    .env("SLUICE_LOG", "warn");
                if self.name == NO_HISTOGRAMS {
                    c.arg("--no-histograms");
                }
                c.args(sluice_args);
                c
            }
            Kind::Haproxy => {
                let path = env.work_dir.join("haproxy.cfg");
                fs::write(&path, self.config_text(env, upstream))?;
                let mut c = Command::new("haproxy");
                c.arg("-f").arg(path).arg("-db");
                c
            }
            Kind::Nginx => {
                let path = env.work_dir.join("nginx.conf");
                fs::write(&path, self.config_text(env, upstream))?;
                let mut c = Command::new("nginx");
                c.arg("-c")
                    .arg(&path)
                    .arg("-p")
                    .arg(&env.work_dir)
                    .arg("-e")
                    .arg(env.work_dir.join("nginx-error.log"));
                c
            }
            Kind::Socat => {
                let mut c = Command::new("socat");
                c.arg(format!(
                    "TCP-LISTEN:{RELAY_PORT},bind={},fork,reuseaddr,backlog=4096",
                    self.listen_ip
                ))
                .arg(format!("TCP:{upstream}"));
                c
            }
        };
        self.start_command(env, cmd, log).map(Some)
    }

    /// Starts this candidate by `cmd` (stdout and stderr to `log`) and waits until it listens
    /// on [`Candidate::target`] (and, for Sluice, every worker is up; its control socket is
    /// [`Candidate::control_path`]).
    pub fn start_command(&self, env: &Env, mut cmd: Command, log: &Path) -> Result<Running> {
        let logfile = fs::File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile);
        let guard = Guard::spawn(cmd, self.name)?;
        let mut running = Running {
            guard,
            control: matches!(self.kind, Kind::Sluice(_)).then(|| self.control_path(env)),
            sluicectl: env.bin_dir.join("sluicectl"),
        };
        running.wait_ready(self.target(SocketAddr::from(([0, 0, 0, 0], 0))), self, log)?;
        Ok(running)
    }

    /// The `sluice` binary this candidate runs: the run's own, or the baseline build's.
    fn sluice_bin(&self, env: &Env) -> Result<PathBuf> {
        if !self.name.starts_with("baseline-") {
            return Ok(env.bin_dir.join("sluice"));
        }
        let dir = std::env::var_os(BASELINE_ENV).with_context(|| {
            format!(
                "candidate {} needs {BASELINE_ENV}: the directory of the build to compare with",
                self.name
            )
        })?;
        let bin = PathBuf::from(dir).join("sluice");
        if !bin.is_file() {
            bail!("{BASELINE_ENV}: {} is not a file", bin.display());
        }
        Ok(bin)
    }

    /// Where Sluice's control socket is for this candidate.
    pub fn control_path(&self, env: &Env) -> PathBuf {
        env.work_dir.join(format!("{}.sock", self.name))
    }
}

/// A started relay.
pub struct Running {
    pub guard: Guard,
    control: Option<PathBuf>,
    sluicectl: PathBuf,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// `sluicectl status --json`, for Sluice.
    pub fn status(&self) -> Option<serde_json::Value> {
        let control = self.control.as_ref()?;
        let out = Command::new(&self.sluicectl)
            .arg("--control")
            .arg(control)
            .args(["status", "--json"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Listening (per `/proc/net/tcp`), and for Sluice every worker started; at most 10 s.
    fn wait_ready(&mut self, listen: SocketAddr, cand: &Candidate, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.guard.exited() {
                let tail = fs::read_to_string(log).unwrap_or_default();
                bail!("{} exited at start ({status}): {}", cand.name, tail.trim());
            }
            let listening = is_listening(listen);
            let workers_up = match cand.kind {
                Kind::Sluice(_) => self.status().is_some_and(|s| {
                    s["workers"].as_array().is_some_and(|w| {
                        !w.is_empty() && w.iter().all(|w| w["pid"].as_u64().unwrap_or(0) > 0)
                    })
                }),
                Kind::Nginx | Kind::Haproxy => {
                    crate::procstat::tree(self.pid()).len() > 1
                        || matches!(cand.kind, Kind::Haproxy)
                }
                _ => true,
            };
            if listening && workers_up {
                std::thread::sleep(Duration::from_millis(200));
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not start listening on {listen} in 10 s", cand.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether some socket listens on `addr`, per `/proc/net/tcp` (state 0A). Probing with a
/// connect would open a connection to the upstream (and confuse iperf3's server).
pub fn is_listening(addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        return false;
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
    })
}

/// A process this run started; dropping it stops the process and its descendants.
pub struct Guard {
    child: Child,
    name: String,
}

impl Guard {
    pub fn spawn(mut cmd: Command, name: &str) -> Result<Guard> {
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe; it allocates nothing and touches no lock.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        Ok(Guard {
            child,
            name: name.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops the process tree: SIGTERM to the root, up to 3 s, then SIGKILL to whatever of the
    /// tree is left.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let tree = crate::procstat::tree(self.pid());
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in tree.into_iter().rev() {
            if fs::metadata(format!("/proc/{pid}")).is_ok() && pid != self.pid() {
                signal(pid, libc::SIGKILL);
            }
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            eprintln!("bench: {} ignored SIGTERM; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill() takes plain integers; the pid is one this run started or a descendant of
    // it, read from /proc just before.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A load generator or client whose stdout lines arrive on a channel (read by a thread), so that
/// waiting for them is always bounded.
pub struct LineChild {
    pub guard: Guard,
    pub lines: Receiver<String>,
    pub stdin: Option<ChildStdin>,
}

impl LineChild {
    pub fn spawn(mut cmd: Command, name: &str, stderr_to: &Path) -> Result<LineChild> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(stderr_to)?);
        let mut guard = Guard::spawn(cmd, name)?;
        let stdout = guard.child().stdout.take().expect("piped");
        let stdin = guard.child().stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(LineChild {
            guard,
            lines: rx,
            stdin,
        })
    }

    /// The next line, or None at EOF or after `deadline`.
    pub fn next_line(&self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.lines.recv_timeout(left).ok()
    }

    /// Waits for the process to exit, at most until `deadline`; then it is stopped.
    pub fn finish(mut self, deadline: Instant) {
        drop(self.stdin.take());
        while Instant::now() < deadline {
            if matches!(self.guard.child().try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.guard.stop();
    }
}
