//! The control socket: a Unix stream socket the supervisor serves and `sluicectl` talks to.
//!
//! Protocol: the client writes one command line (`status`, or an admission command such as
//! `deny add 192.0.2.0/24 kill`, see [`crate::admission::Command`]), the server answers with one
//! JSON document (`{"error": ...}` on failure) and closes. The socket file is created mode 0600: the control plane is for the
//! operator (root), not for every local user. After a drop to `user` (0660 to that user's
//! group), a peer running as that user itself, i.e. a worker, is refused ([`peer_allowed`]).
//! Nothing it returns contains a client address.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::engine::EngineKind;
use crate::health::UpstreamStatus;
use crate::metrics::{ALL_COUNTERS, Counter, Shared};

/// Default path of the control socket.
pub const DEFAULT_PATH: &str = "/run/sluice/control.sock";

/// What `sluicectl status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub engine: String,
    pub max_connections: u32,
    pub listeners: Vec<ListenerStatus>,
    pub workers: Vec<WorkerStatus>,
    /// Per-counter totals over all workers (see `metrics::ALL_COUNTERS`).
    #[serde(default)]
    pub totals: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub active: u64,
    /// Daemon-wide `max_connections` places taken now ([`Shared::reserve`]): `active` plus
    /// connections between admission and their first count, so 0 once every connection is
    /// closed (a place an error path did not give back stays counted here).
    #[serde(default)]
    pub places: u64,
    /// Connections this daemon can hold: `max_connections`, or less when the workers' fd limits
    /// allow less.
    #[serde(default)]
    pub capacity: u64,
    /// Connections one worker can hold (its fd limit, two fds a connection).
    #[serde(default)]
    pub per_worker_capacity: u64,
    /// Sizes of the admission lists and where XDP is attached (`sluicectl allow|deny|dest list`
    /// shows the rules).
    #[serde(default)]
    pub admission: AdmissionStatus,
    /// The sockmap fast path: `attached`, or `unavailable: <why>` (then workers splice); absent
    /// when the engine is not `sockmap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_path: Option<String>,
    /// Health of every configured upstream `HOST:PORT` of every listener
    /// ([`crate::health::Checker::summary`]); updated by the resolver thread.
    #[serde(default)]
    pub upstreams: Vec<UpstreamStatus>,
}

/// The admission part of [`Status`]: counts only.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdmissionStatus {
    pub allow_rules: usize,
    pub deny_rules: usize,
    pub destinations: usize,
    /// Interfaces the XDP deny program is attached to.
    pub xdp_interfaces: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub bind: String,
    pub active: u64,
    /// The listener's own `max_connections`; 0: none (only the daemon's applies).
    #[serde(default)]
    pub max_connections: u32,
    /// When its certificate expires (seconds since the epoch); absent without TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_expiry_unix: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub index: usize,
    pub pid: u32,
    pub engine: String,
    #[serde(default)]
    pub active: u64,
    #[serde(default)]
    pub accepted: u64,
    /// Workers started in this slot to replace one that died.
    #[serde(default)]
    pub restarts: u64,
    /// Why this slot has no process (its start failed; retried with back-off, its listening
    /// sockets closed meanwhile); absent while a worker runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
}

impl Status {
    pub fn new(config: &Config, kind: EngineKind, workers: usize) -> Status {
        Status {
            engine: kind.name().to_string(),
            max_connections: config.max_connections,
            listeners: config
                .listeners
                .iter()
                .map(|l| ListenerStatus {
                    name: l.name.clone(),
                    bind: l.bind.to_string(),
                    active: 0,
                    max_connections: l.max_connections,
                    cert_expiry_unix: None,
                })
                .collect(),
            workers: (0..workers)
                .map(|index| WorkerStatus {
                    index,
                    pid: 0,
                    engine: kind.name().to_string(),
                    active: 0,
                    accepted: 0,
                    restarts: 0,
                    down: None,
                })
                .collect(),
            totals: Default::default(),
            active: 0,
            places: 0,
            capacity: 0,
            per_worker_capacity: 0,
            admission: AdmissionStatus::default(),
            fast_path: None,
            upstreams: Vec::new(),
        }
    }

    /// Fills the live numbers from the shared counters.
    fn refresh(&mut self, shared: &Shared) {
        let n = self.workers.len();
        for w in &mut self.workers {
            w.active = shared.get(w.index, Counter::Active);
            w.accepted = shared.get(w.index, Counter::Accepted);
            if let Some(k) = EngineKind::from_id(shared.get(w.index, Counter::Engine)) {
                w.engine = k.name().to_string();
            }
        }
        for (i, l) in self.listeners.iter_mut().enumerate() {
            l.active = shared.listener_active(n, i);
        }
        self.totals = ALL_COUNTERS
            .iter()
            .filter(|(c, _)| !matches!(c, Counter::Engine | Counter::Pid))
            .map(|&(c, name)| (name.to_string(), shared.total(n, c)))
            .collect();
        self.active = shared.total(n, Counter::Active);
        self.places = shared.supervisor_get(Counter::Active);
        for (c, name) in [
            (Counter::UpstreamStateChanges, "upstream_state_changes"),
            (Counter::UpstreamsDown, "upstreams_down"),
            (Counter::Reloads, "reloads"),
            (Counter::ReloadsFailed, "reloads_failed"),
            (
                Counter::UpstreamAddressesRefused,
                "upstream_addresses_refused",
            ),
            (Counter::WorkersDown, "workers_down"),
            (Counter::WorkerRestarts, "worker_restarts"),
            (Counter::WorkerStartFailures, "worker_start_failures"),
            (Counter::WorkersKilledUnread, "workers_killed_unread"),
            (Counter::MetricsHttpRefused, "metrics_http_refused"),
        ] {
            self.totals
                .insert(name.to_string(), shared.supervisor_get(c));
        }
        // The engine every worker reports (they agree unless one fell back).
        if let Some(w) = self.workers.first() {
            self.engine = w.engine.clone();
        }
    }
}

/// Answers a command line other than `status` (the admission lists, `reload`), or None when it
/// does not know it. Runs on the request's own thread, possibly beside others.
pub(crate) type Handler = Box<dyn Fn(&str) -> Option<serde_json::Value> + Send + Sync>;

/// Requests answered at once, each on a thread of its own; a connection past them is answered
/// [`BUSY`] at once.
pub(crate) const MAX_IN_FLIGHT: usize = 16;

/// The answer to a connection past [`MAX_IN_FLIGHT`].
pub(crate) const BUSY: &str = "busy: too many control requests in progress; try again";

/// Serves the control socket: a thread accepts, and each request is read and answered on a
/// short-lived thread of its own, so one that waits (a `dest` name to resolve, workers to
/// apply a change, a reload generating a certificate, a client that sends nothing) never holds
/// `status` or any other request up.
pub(crate) fn serve(
    path: &Path,
    status: Arc<Mutex<Status>>,
    shared: Arc<Shared>,
    handler: Handler,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let handler = Arc::new(handler);
    let in_flight = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // A refused peer (a worker) is answered here, after a short wait for its line,
                // and never takes a request's place: workers cannot crowd the operator out.
                if !peer_allowed(&stream) {
                    let _ = refuse(stream);
                    continue;
                }
                if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let reply = serde_json::json!({ "error": BUSY }).to_string();
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
                    continue;
                }
                let done = InFlight(in_flight.clone());
                let (st, sh, h) = (status.clone(), shared.clone(), handler.clone());
                // The stream stays reachable from here: when no thread can start (RLIMIT_NPROC
                // reached, say), the request is answered on this thread instead, as before
                // requests had threads of their own.
                let slot = Arc::new(Mutex::new(Some(stream)));
                let theirs = slot.clone();
                let started = std::thread::Builder::new()
                    .name("control-request".into())
                    .spawn(move || {
                        let _done = done;
                        let stream = theirs.lock().ok().and_then(|mut s| s.take());
                        if let Some(stream) = stream {
                            let _ = answer(stream, &st, &sh, &h);
                        }
                    });
                if started.is_err() {
                    let stream = slot.lock().ok().and_then(|mut s| s.take());
                    if let Some(stream) = stream {
                        let _ = answer(stream, &status, &shared, &handler);
                    }
                }
            }
        })?;
    Ok(())
}

/// One request in progress; counted down when its thread ends (or never started).
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers a peer [`peer_allowed`] refuses. Its line is read first (briefly), so it gets the
/// answer instead of a broken pipe; the command itself is never looked at.
fn refuse(stream: UnixStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    stream.set_write_timeout(Some(Duration::from_millis(100)))?;
    let _ = read_request(&stream);
    let reply = serde_json::json!({ "error": REFUSED_DAEMON_USER }).to_string();
    (&stream).write_all(format!("{reply}\n").as_bytes())
}

fn answer(
    stream: UnixStream,
    status: &Mutex<Status>,
    shared: &Shared,
    handler: &Handler,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let line = read_request(&stream)?;
    let reply = match line.as_str() {
        "status" => {
            let mut st = status.lock().expect("status lock");
            st.refresh(shared);
            serde_json::to_string(&*st).map_err(std::io::Error::other)?
        }
        cmd if let Some(reply) = crate::histo::control_command(cmd) => reply,
        other => match handler(other) {
            Some(v) => v.to_string(),
            None => {
                serde_json::json!({ "error": format!("unknown command `{other}`") }).to_string()
            }
        },
    };
    (&stream).write_all(reply.as_bytes())?;
    (&stream).write_all(b"\n")
}

/// The answer to a peer running as the daemon's own (non-root) user.
pub(crate) const REFUSED_DAEMON_USER: &str =
    "refused: the daemon's own user may not use the control socket (its workers run as it)";

/// Whether the peer may use the control socket: not when it runs as the daemon's own uid and
/// that uid is not root. After `user` dropped privileges, that uid is the workers' (and only
/// theirs): a compromised worker cannot become another uid (no CAP_SETUID), and the kernel
/// records the peer's uid at connect (SO_PEERCRED), so it cannot lie about it. The socket's
/// mode (0660 to the user's group) still keeps every other user out; root and the group's
/// other members get in. A peer whose credentials cannot be read is refused.
fn peer_allowed(stream: &UnixStream) -> bool {
    use std::os::fd::AsFd;
    let own = crate::sys::effective_uid();
    match crate::sys::peer_uid(stream.as_fd()) {
        Ok(uid) => own == 0 || uid != own,
        Err(_) => false,
    }
}

/// Longest request line the server reads; the rest of a longer one is ignored.
pub(crate) const MAX_REQUEST_LEN: u64 = 1024;

/// Reads a request: its first line (at most [`MAX_REQUEST_LEN`] bytes), surrounding whitespace
/// trimmed. Errs on bytes that are not UTF-8. Public for the fuzz target (`fuzz/`).
pub fn read_request(stream: impl Read) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(stream)
        .take(MAX_REQUEST_LEN)
        .read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Client side: sends `command`, returns the daemon's JSON answer.
pub fn request(path: &Path, command: &str) -> Result<serde_json::Value, ControlError> {
    let mut s = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ControlError::NotRunning {
                path: path.display().to_string(),
            }
        }
        std::io::ErrorKind::PermissionDenied => ControlError::PermissionDenied {
            path: path.display().to_string(),
        },
        _ => ControlError::Io(e),
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| ControlError::Protocol(e.to_string()))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(ControlError::Protocol(err.to_string()));
    }
    Ok(v)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the daemon is not running (no control socket at {path}); start it with `sluice run`")]
    NotRunning { path: String },
    #[error("permission denied on {path}: the control socket is for root")]
    PermissionDenied { path: String },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon answered: {0}")]
    Protocol(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_its_first_line_trimmed_and_bounded() {
        assert_eq!(
            read_request(&b"  status \r\nignored"[..]).unwrap(),
            "status"
        );
        assert_eq!(read_request(&b""[..]).unwrap(), "");
        let long = [b'a'; 3000];
        assert_eq!(
            read_request(&long[..]).unwrap().len(),
            MAX_REQUEST_LEN as usize
        );
        assert!(read_request(&b"deny add \xff\n"[..]).is_err());
    }
}
