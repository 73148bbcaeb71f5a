//! A worker process: the supervisor re-executes `sluice` with a hidden `__worker` argument and
//! hands it, at fixed fd numbers, everything it needs. The worker runs one engine's loop on one
//! thread until its control pipe closes or it has drained.
//!
//! The fd contract between [`crate::supervisor`] and a worker:
//! - fd 0: the control pipe (lines of [`crate::wire::ControlMsg`]); EOF means "exit now";
//! - fd 3 .. 3+L: the L listening sockets, in config order (shared by all workers);
//! - fd 3+L: the memfd of the shared counters ([`crate::metrics::Shared`]);
//! - fd 4+L: the memfd of the histogram slots ([`crate::histo::Region`]);
//! - fds 5+L .. 8+L, only with [`ENV_SHARED_FAST_PATH`] (set for every sockmap worker): the
//!   sockmap fast path's maps (sockets, peers, counters, flow totals) the supervisor created or
//!   opened and attached the verdict to ([`crate::ebpf::FastPath::from_fds`]); the worker loads
//!   nothing.
//!
//! The environment carries the rest: `SLUICE_WORKER=index/workers/engine` and the effective
//! configuration as TOML in `SLUICE_CONFIG`.

use std::os::fd::{AsFd, RawFd};

use crate::config::Config;
use crate::engine::{self, EngineKind, WorkerCtx};
use crate::error::StartError;
use crate::metrics::{Counter, Shared};
use crate::sys;
use crate::upstream::Upstreams;
use crate::wire::ControlMsg;

/// First fd number of the listeners in a worker.
pub(crate) const FIRST_LISTENER_FD: RawFd = 3;
pub(crate) const ENV_WORKER: &str = "SLUICE_WORKER";
pub(crate) const ENV_CONFIG: &str = "SLUICE_CONFIG";
/// Set when the supervisor hands the worker the fast path's maps (always with sockmap).
pub(crate) const ENV_SHARED_FAST_PATH: &str = "SLUICE_SHARED_FAST_PATH";

/// Who this worker is, as the supervisor said in [`ENV_WORKER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub index: usize,
    pub workers: usize,
    pub engine: EngineKind,
}

impl Identity {
    pub fn encode(&self) -> String {
        format!("{}/{}/{}", self.index, self.workers, self.engine.name())
    }

    pub fn decode(s: &str) -> Option<Identity> {
        let mut it = s.split('/');
        let index = it.next()?.parse().ok()?;
        let workers = it.next()?.parse().ok()?;
        let engine = match it.next()? {
            "splice" => EngineKind::Splice,
            "copy" => EngineKind::Copy,
            "epoll" => EngineKind::Epoll,
            "sockmap" => EngineKind::Sockmap,
            _ => return None,
        };
        Some(Identity {
            index,
            workers,
            engine,
        })
    }
}

/// Entry point of a worker process (`sluice __worker`).
pub fn main() -> Result<(), StartError> {
    sys::die_with_parent()?;
    // Dumpable comes back with every execve: each worker turns it off again.
    sys::no_core_dumps()
        .map_err(|e| std::io::Error::other(format!("cannot turn core dumps off: {e}")))?;
    let id = std::env::var(ENV_WORKER)
        .ok()
        .and_then(|s| Identity::decode(&s))
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "{ENV_WORKER} is missing: only the supervisor starts workers"
            ))
        })?;
    let text = std::env::var(ENV_CONFIG)
        .map_err(|_| std::io::Error::other(format!("{ENV_CONFIG} is missing")))?;
    let config = Config::from_toml(&text, "supervisor").map_err(std::io::Error::other)?;
    let n = config.listeners.len();
    let shared_fast = std::env::var_os(ENV_SHARED_FAST_PATH).is_some();
    let map_fds = if shared_fast { crate::ebpf::MAP_FDS } else { 0 };
    let mut inherited = sys::take_inherited_fds(FIRST_LISTENER_FD, n + 2 + map_fds)?;
    let fast_maps = if shared_fast {
        let maps: Vec<_> = inherited.split_off(inherited.len() - map_fds);
        Some(<[_; crate::ebpf::MAP_FDS]>::try_from(maps).expect("MAP_FDS map fds"))
    } else {
        None
    };
    let histo_fd = inherited.pop().expect("n + 2 fds");
    let metrics_fd = inherited.pop().expect("n + 2 fds");
    let listeners = inherited;
    let control = std::io::stdin().as_fd().try_clone_to_owned()?;
    for fd in listeners
        .iter()
        .map(|l| l.as_fd())
        .chain([metrics_fd.as_fd(), histo_fd.as_fd(), control.as_fd()])
        .chain(fast_maps.iter().flatten().map(|m| m.as_fd()))
    {
        sys::set_cloexec(fd)?;
    }
    let shared = Shared::from_fd(metrics_fd)?;
    let nofile = sys::raise_nofile_limit()?;
    let histograms = config.metrics.histograms;
    let mut upstreams = Upstreams::new(&engine::upstream_entries(&config));
    let mut ctx = WorkerCtx::new(config, id.index, id.workers, &shared, nofile);
    ctx.row.set(Counter::Pid, u64::from(std::process::id()));
    if histograms {
        let region = crate::histo::Region::from_fd(histo_fd, id.workers, n)?;
        ctx.histos = crate::histo::Histos::new(n, Some(region), id.index);
    }
    // Start-up messages (addresses, certificates) are applied before the first accept, so a
    // TLS port never sees a connection before its certificate.
    let mut buf = read_until_ready(&control)?;
    ctx.apply_control(&mut buf, &mut upstreams);
    match id.engine {
        EngineKind::Splice | EngineKind::Copy | EngineKind::Sockmap => {
            engine::uring::Worker::new(ctx, id.engine, listeners, control, upstreams, fast_maps)?
                .run()?
        }
        EngineKind::Epoll => {
            engine::epoll::Worker::new(ctx, listeners, control, upstreams)?.run()?
        }
    }
    Ok(())
}

/// Reads the control pipe up to and including the `ready` line, byte by byte so nothing after
/// it is consumed here (the engine's loop reads the rest).
fn read_until_ready(control: &std::os::fd::OwnedFd) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let ready = ControlMsg::Ready.encode();
    let mut byte = [0u8; 1];
    loop {
        match sys::read(control.as_fd(), &mut byte) {
            Ok(0) => {
                return Err(std::io::Error::other(
                    "the supervisor closed the control pipe",
                ));
            }
            Ok(_) => buf.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if byte[0] == b'\n' && buf.ends_with(ready.as_bytes()) {
            let line_start = buf.len() - ready.len();
            if line_start == 0 || buf[line_start - 1] == b'\n' {
                return Ok(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips() {
        let id = Identity {
            index: 3,
            workers: 8,
            engine: EngineKind::Copy,
        };
        assert_eq!(Identity::decode(&id.encode()), Some(id));
        assert_eq!(Identity::decode("1/2/turbo"), None);
    }
}
