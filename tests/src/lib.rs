//! The integration-test harness of Sluice, shaped like aya's `integration-test` crate: this
//! library runs the real `sluice` binary ([`sluice`]), real test servers written with std
//! ([`servers`]), clients ([`client`]), helper processes ([`holder`]) and real peers ([`peers`]);
//! the tests themselves are `src/tests/<area>.rs`, compiled into one test binary by
//! `tests/integration.rs`.
//!
//! House rules, so the suite can run in parallel threads on a shared machine:
//! - traffic only on 127.0.0.0/8; every test takes its own address from [`Host::new`], so ports
//!   never collide between tests;
//! - everything started is stopped by pid from a `Drop` guard (also when a test panics);
//! - every loop is bounded in count and time; timeouts are generous and only make a hung test
//!   fail, nothing asserts how fast something was;
//! - a missing capability (root, io_uring, netns, a peer program) prints why and skips, unless
//!   `SLUICE_REQUIRE_CAPS=1` (set by CI) turns it into a failure: see [`require_root`].
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod client;
pub mod holder;
pub mod pattern;
pub mod peers;
pub mod procfs;
pub mod servers;
pub mod sluice;
pub mod sys;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub use pattern::{Pattern, Verifier};
pub use sluice::{Config, ListenerConfig, Sluice, SluiceCmd, TlsConfig};

/// How long anything that should be quick may take before the test calls it hung.
pub const HUNG: Duration = Duration::from_secs(30);
/// How long the relay may take to become ready (its port bound, its workers forked).
pub const READY: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Capability gates

/// True when CI asked for every capability to be present (`SLUICE_REQUIRE_CAPS=1`).
pub fn caps_required() -> bool {
    std::env::var("SLUICE_REQUIRE_CAPS").is_ok_and(|v| v == "1")
}

/// Prints why a test does not run and returns false; panics instead under
/// `SLUICE_REQUIRE_CAPS=1`. The message goes to the real stderr, past the test harness's
/// capture, so a skip is always visible.
pub fn skip(why: &str) -> bool {
    if caps_required() {
        panic!("{why} (SLUICE_REQUIRE_CAPS=1 makes a missing capability a failure)");
    }
    let name = thread::current().name().unwrap_or("?").to_owned();
    let _ = writeln!(io::stderr(), "SKIPPED {name}: {why}");
    false
}

/// Gate for tests that need root: `if !require_root() { return; }`.
pub fn require_root() -> bool {
    sys::euid() == 0 || skip("needs root")
}

/// Gate for tests of the io_uring engines: io_uring_setup must work in this process.
pub fn require_io_uring() -> bool {
    match sys::probe_io_uring() {
        Ok(()) => true,
        Err(e) => skip(&format!("io_uring unavailable: io_uring_setup failed: {e}")),
    }
}

/// Gate for tests that load eBPF programs (the sockmap engine): CAP_BPF and CAP_NET_ADMIN in the
/// effective set, read from /proc/self/status.
pub fn require_bpf() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_BPF: u32 = 39;
    let need = (1u64 << CAP_BPF) | (1u64 << CAP_NET_ADMIN);
    effective_caps() & need == need || skip("needs CAP_BPF and CAP_NET_ADMIN to load eBPF programs")
}

/// This process's effective capability set (`CapEff` in /proc/self/status; 0 if unreadable).
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Gate for tests that make network namespaces.
pub fn require_netns() -> bool {
    match sys::probe_netns() {
        Ok(()) => true,
        Err(e) => skip(&format!("cannot create a network namespace: {e}")),
    }
}

/// Gate for tests that run a peer program (iperf3, nginx, curl, ...) found in PATH.
pub fn require_program(name: &str) -> bool {
    find_program(name).is_some()
        || skip(&format!(
            "`{name}` is not installed (cargo xtask setup installs it)"
        ))
}

/// Gate for tests that need `n` fds in one process (RLIMIT_NOFILE hard limit).
pub fn require_nofile(n: u64) -> bool {
    let (_, hard) = sys::nofile_limit();
    hard >= n || skip(&format!("RLIMIT_NOFILE hard limit {hard} < {n}"))
}

/// `name` as found in PATH (or as given when it is a path).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Per-process setup every test calls first (idempotent): the fd soft limit goes up to the hard
/// one, so thousands of sockets fit in the test process and in what it spawns.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        sys::raise_nofile_limit();
    });
}

/// Tests that load the whole machine (tens of thousands of sockets) run alone: they take this
/// lock for writing, every relay another test starts holds it for reading. Without it, on two
/// cores, a heavy test starves its neighbours' upstreams and readiness checks and they fail
/// for reasons that are not theirs.
static HEAVY: std::sync::RwLock<()> = std::sync::RwLock::new(());

std::thread_local! {
    static EXCLUSIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A relay's share of the machine (see [`exclusive`]).
pub type SharedGuard = std::sync::RwLockReadGuard<'static, ()>;

/// Holds the machine for one heavy test until dropped.
pub struct ExclusiveGuard {
    _guard: std::sync::RwLockWriteGuard<'static, ()>,
}

impl Drop for ExclusiveGuard {
    fn drop(&mut self) {
        EXCLUSIVE.with(|e| e.set(false));
    }
}

/// Waits until no other test's relay runs, then keeps new ones from starting until the guard
/// is dropped. Relays this thread starts meanwhile are not held back.
pub fn exclusive() -> ExclusiveGuard {
    let guard = HEAVY.write().unwrap_or_else(|p| p.into_inner());
    EXCLUSIVE.with(|e| e.set(true));
    ExclusiveGuard { _guard: guard }
}

/// The shared hold a starting relay takes (none inside an [`exclusive`] test).
pub(crate) fn shared() -> Option<SharedGuard> {
    if EXCLUSIVE.with(|e| e.get()) {
        None
    } else {
        Some(HEAVY.read().unwrap_or_else(|p| p.into_inner()))
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses

static NEXT_HOST: AtomicU32 = AtomicU32::new(0);

/// Second octet of this process's test addresses: 100..=199 (127.77.x.x is the benchmark's).
pub fn process_octet() -> u8 {
    100 + (std::process::id() % 100) as u8
}

/// One loopback address of its own for a test: 127.P.0.10 .. 127.P.0.250, then 127.P.1.10 ...,
/// where P is derived from this process's pid ([`process_octet`]), so two test processes
/// running at once (two checkouts, a helper's run) rarely share an address either. No other test
/// in this process gets it, so its ports are the test's alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub ip: Ipv4Addr,
}

impl Host {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Host {
        let n = NEXT_HOST.fetch_add(1, Ordering::Relaxed);
        let third = u8::try_from(n / 241).expect("more than 60000 test addresses");
        let fourth = 10 + (n % 241) as u8;
        Host {
            ip: Ipv4Addr::new(127, process_octet(), third, fourth),
        }
    }

    /// A port that is free on this address now and never handed out before in this process,
    /// taken from outside the kernel's ephemeral range (`ip_local_port_range`): a port the
    /// kernel picked would be free only until some client socket bound to this address is
    /// given the same port for a connection, and the test's later bind then fails with
    /// "address in use". Ports in turn from one process-wide counter, each checked by a bind.
    ///
    /// The check binds with SO_REUSEADDR and never listens: a process another test forks at
    /// that moment inherits the probe socket until its exec, and a *listening* probe would hold
    /// the port against the test's own bind for that long (the "address in use" flake of
    /// `max_connections_refuses_the_extra_client`); a bound, non-listening SO_REUSEADDR socket
    /// does not stand in the way of the SO_REUSEADDR binds of the tests, the relay and the peers.
    pub fn addr(&self) -> SocketAddr {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let (first, last) = *FIXED_PORTS;
        let span = last - first + 1;
        for _ in 0..span.min(5000) {
            let port = first + NEXT.fetch_add(1, Ordering::Relaxed) % span;
            let addr = SocketAddr::new(self.ip.into(), port as u16);
            let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("a probe socket");
            probe.set_reuse_address(true).expect("SO_REUSEADDR");
            if probe.bind(&addr.into()).is_ok() {
                return addr;
            }
        }
        panic!("no free port on {} in {first}-{last}", self.ip);
    }
}

/// The ports [`Host::addr`] hands out: below the ephemeral range when it leaves room there
/// (the default 32768-60999 does), else above it.
static FIXED_PORTS: std::sync::LazyLock<(u32, u32)> = std::sync::LazyLock::new(|| {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = range
        .split_whitespace()
        .filter_map(|w| w.parse::<u32>().ok());
    let (lo, hi) = (it.next().unwrap_or(32768), it.next().unwrap_or(60999));
    if lo > 12_000 {
        (10_000, lo - 1)
    } else if hi < 63_000 {
        (hi + 1, 65_535)
    } else {
        panic!("ip_local_port_range {lo}-{hi} leaves no room for the tests' fixed ports")
    }
});

// ---------------------------------------------------------------------------------------------
// Files and processes

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A directory under /tmp removed on drop (kept when `SLUICE_KEEP_TMP=1`).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    #[allow(clippy::new_without_default)]
    pub fn new() -> TempDir {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sluice-tests.{}.{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("SLUICE_KEEP_TMP").is_ok_and(|v| v == "1") {
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A child process stopped by pid when dropped: SIGTERM, a grace period, then SIGKILL; reaped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd` (it gets SIGTERM if the spawning thread dies without dropping the guard).
    pub fn spawn(name: &str, cmd: &mut Command) -> ChildGuard {
        sys::parent_death_signal(cmd, libc::SIGTERM);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        ChildGuard {
            child: Some(child),
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already taken")
    }

    /// The exit status when the child has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child().try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("{} already stopped", self.name)
        };
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        sys::kill(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                return s;
            }
            thread::sleep(Duration::from_millis(10));
        }
        sys::kill(child.id(), libc::SIGKILL);
        child.wait().expect("wait for a killed child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop(Duration::from_secs(3));
        }
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stdout and stderr together, for messages.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Debian's Chromium, headless, quiet (no first-run, extensions or background traffic), with
/// its profile under `profile` and a virtual-time budget of `budget_ms` for a page's scripts;
/// the caller adds the window size, what to dump and the URL.
pub fn headless_chromium(profile: &std::path::Path, budget_ms: u32) -> Command {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ])
    .arg(format!("--virtual-time-budget={budget_ms}"))
    .arg(format!(
        "--user-data-dir={}",
        profile.join("profile").display()
    ));
    cmd
}

/// Runs `cmd` to completion with stdin closed; a command still running after `timeout` is
/// killed and the test fails.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    run_child(cmd, None, timeout)
}

/// Like [`run_with_timeout`], with `input` written to the command's stdin, which is then
/// closed (a command that exits before reading it all is not an error).
pub fn run_with_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> Output {
    run_child(cmd, Some(input.to_vec()), timeout)
}

fn run_child(cmd: &mut Command, input: Option<Vec<u8>>, timeout: Duration) -> Output {
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let name = cmd.get_program().to_string_lossy().into_owned();
    let mut guard = ChildGuard::spawn(&name, cmd);
    if let Some(input) = input {
        let mut w = guard.child().stdin.take().unwrap();
        thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    let mut out = guard.child().stdout.take().unwrap();
    let mut err = guard.child().stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t_err = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let status = guard.wait_timeout(timeout);
    let status = match status {
        Some(s) => s,
        None => {
            guard.stop(Duration::from_millis(100));
            panic!(
                "{cmd:?} did not finish in {timeout:?}; stdout:\n{}\nstderr:\n{}",
                t_out.join().unwrap(),
                t_err.join().unwrap()
            );
        }
    };
    guard.child = None;
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Polls `cond` every 20 ms for up to `timeout`; true once it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until something listens on `addr` (read from /proc/net/tcp, no connection made).
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    wait_until(timeout, || procfs::is_listening(addr))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// True when `text` contains `n` as a whole number (not as part of a longer one).
pub fn mentions_number(text: &str, n: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|w| w == n.to_string())
}
