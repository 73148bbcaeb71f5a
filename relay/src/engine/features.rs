//! What this kernel's io_uring can do, asked of the kernel instead of assumed from its version.
//!
//! The io_uring engines need more than `io_uring_setup`: every opcode they submit (checked with
//! io_uring's probe interface, `IORING_REGISTER_PROBE`), a provided-buffer ring (5.19),
//! multishot accept (5.19) and multishot receive (6.0), the last three tried for real on a ring,
//! a socket pair and a listening Unix socket of this process. Two setup flags are only
//! optimisations and degrade: SINGLE_ISSUER (6.0) and COOP_TASKRUN (5.19); a ring is built with
//! whichever the kernel takes. Debian 12 (6.1) has everything; Ubuntu 22.04 (5.15) and
//! Debian 11 (5.10) lack the buffer ring and the multishot operations, so the supervisor runs
//! the epoll engine there and says why in one line (`supervisor::run`), and `sluicectl doctor`
//! reports the same.
//!
//! `SLUICE_IO_URING_DISABLE=single_issuer,coop_taskrun` leaves those flags out on purpose (a
//! kernel bug to route around, and the tests' way to run without them on a kernel that has
//! them).
//!
//! `unsafe` is allowed here (besides `sys` and the other ring modules) because the probe's
//! buffer ring is memory shared with the kernel: see the SAFETY comments.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

use io_uring::{IoUring, Probe, cqueue, opcode, types};

use crate::sys::AnonMap;

/// The environment variable naming setup flags not to use (comma-separated).
pub const ENV_DISABLE: &str = "SLUICE_IO_URING_DISABLE";

/// The optional setup flags this kernel takes (all of them on 6.0 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// IORING_SETUP_SINGLE_ISSUER (6.0): one thread submits, so the kernel skips locking.
    pub single_issuer: bool,
    /// IORING_SETUP_COOP_TASKRUN (5.19): completions run when the thread enters the kernel
    /// anyway, not by interrupting it.
    pub coop_taskrun: bool,
}

impl Features {
    /// What a fallback from the full set gave up, for the one log line (empty: nothing).
    pub fn degraded(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.single_issuer {
            out.push("SINGLE_ISSUER (6.0)");
        }
        if !self.coop_taskrun {
            out.push("COOP_TASKRUN (5.19)");
        }
        out
    }
}

/// Why the io_uring engines cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// io_uring_setup itself failed (a seccomp profile, `kernel.io_uring_disabled`, no kernel
    /// support at all).
    #[error("io_uring_setup failed: {0}")]
    Refused(io::Error),
    /// The ring works but lacks what the engines are built on.
    #[error("this kernel's io_uring lacks {}", .0.join(", "))]
    Lacks(Vec<String>),
}

/// Opcodes the io_uring engines submit, with the kernel that brought each.
const REQUIRED_OPS: &[(u8, &str)] = &[
    (opcode::Nop::CODE, "NOP"),
    (opcode::Accept::CODE, "ACCEPT (5.5)"),
    (opcode::Connect::CODE, "CONNECT (5.5)"),
    (opcode::PollAdd::CODE, "POLL_ADD (5.1)"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL (5.5)"),
    (opcode::Timeout::CODE, "TIMEOUT (5.4)"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT (5.5)"),
    (opcode::Read::CODE, "READ (5.6)"),
    (opcode::Send::CODE, "SEND (5.6)"),
    (opcode::Recv::CODE, "RECV (5.6)"),
    (opcode::Splice::CODE, "SPLICE (5.7)"),
];

/// Setup flags left out by [`ENV_DISABLE`].
fn disabled() -> (bool, bool) {
    let v = std::env::var(ENV_DISABLE).unwrap_or_default();
    let has = |name: &str| v.split(',').any(|s| s.trim() == name);
    (has("single_issuer"), has("coop_taskrun"))
}

/// Builds a ring of `entries` (and `cq_entries` completions) with the setup flags the kernel
/// takes: SINGLE_ISSUER and COOP_TASKRUN when it has them and [`ENV_DISABLE`] does not name
/// them; an EINVAL for either (older kernels) retries without it.
pub fn build_ring(entries: u32, cq_entries: u32) -> io::Result<(IoUring, Features)> {
    let (no_si, no_ct) = disabled();
    let mut f = Features {
        single_issuer: !no_si,
        coop_taskrun: !no_ct,
    };
    loop {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq_entries);
        if f.single_issuer {
            b.setup_single_issuer();
        }
        if f.coop_taskrun {
            b.setup_coop_taskrun();
        }
        match b.build(entries) {
            Ok(ring) => return Ok((ring, f)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && f.single_issuer => {
                f.single_issuer = false
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && f.coop_taskrun => {
                f.coop_taskrun = false
            }
            Err(e) => return Err(e),
        }
    }
}

/// Asks the kernel what the io_uring engines need (see the module doc). Takes a few
/// milliseconds: one ring, a socket pair, a Unix listener.
pub fn detect() -> Result<Features, Unusable> {
    // Declared before the ring, so they are dropped after it: the kernel may use the buffer
    // ring's memory until the ring is gone.
    let entries = AnonMap::new(4096).map_err(Unusable::Refused)?;
    let data = AnonMap::new(4096).map_err(Unusable::Refused)?;
    let (mut ring, features) = build_ring(8, 16).map_err(Unusable::Refused)?;
    let mut lacks = Vec::new();
    let mut probe = Probe::new();
    match ring.submitter().register_probe(&mut probe) {
        Ok(()) => {
            for (code, name) in REQUIRED_OPS {
                if !probe.is_supported(*code) {
                    lacks.push(format!("the {name} operation"));
                }
            }
        }
        Err(e) => lacks.push(format!("the probe interface, 5.6 ({e})")),
    }
    if !lacks.is_empty() {
        return Err(Unusable::Lacks(lacks));
    }
    const BGID: u16 = 0;
    const NBUF: u16 = 8;
    // SAFETY: `entries` is a page-aligned mapping with room for NBUF entries (16 bytes each)
    // that outlives the ring (declared first, dropped last).
    let registered = unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(entries.as_ptr() as u64, NBUF, BGID, 0)
    };
    if let Err(e) = registered {
        lacks.push(format!("provided buffer rings, 5.19 ({e})"));
        return Err(Unusable::Lacks(lacks));
    }
    let base = entries.as_ptr().cast::<types::BufRingEntry>();
    // SAFETY: entry 0 lies inside `entries` and the kernel owns no entry yet (the tail is 0);
    // the buffer is `data`, 4096 bytes that outlive the ring.
    unsafe {
        (*base).set_addr(data.as_ptr() as u64);
        (*base).set_len(4096);
        (*base).set_bid(0);
        let tail = types::BufRingEntry::tail(base) as *const std::sync::atomic::AtomicU16;
        (*tail).store(1, std::sync::atomic::Ordering::Release);
    }
    match multishot_recv(&mut ring, BGID) {
        Ok(true) => {}
        Ok(false) => lacks.push("multishot receive (6.0)".into()),
        Err(e) => lacks.push(format!("multishot receive, 6.0 ({e})")),
    }
    match multishot_accept(&mut ring) {
        Ok(true) => {}
        Ok(false) => lacks.push("multishot accept (5.19)".into()),
        Err(e) => lacks.push(format!("multishot accept, 5.19 ({e})")),
    }
    drop(ring);
    if lacks.is_empty() {
        Ok(features)
    } else {
        Err(Unusable::Lacks(lacks))
    }
}

/// The one completion of a probe operation (each probe makes sure one is due at once).
fn one_completion(ring: &mut IoUring) -> io::Result<cqueue::Entry> {
    ring.submit_and_wait(1)?;
    ring.completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))
}

/// A multishot RECV into buffer group `bgid` on a socket with a byte waiting: Ok(true) when it
/// delivered the byte and stays armed, Ok(false) when the kernel refused the flag (EINVAL).
fn multishot_recv(ring: &mut IoUring, bgid: u16) -> io::Result<bool> {
    let (a, b) = UnixStream::pair()?;
    std::io::Write::write_all(&mut &b, b"x")?;
    let sqe = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), bgid)
        .build()
        .user_data(1);
    // SAFETY: the SQE names `a` (alive until the ring is dropped at the end of `detect`, after
    // which nothing of this operation remains) and the buffer group registered in `detect`.
    unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
    let cqe = one_completion(ring)?;
    let result = match cqe.result() {
        r if r == -libc::EINVAL => Ok(false),
        r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
        r => Ok(r == 1 && cqueue::more(cqe.flags())),
    };
    // The multishot RECV is still armed on `a`: cancel it before `a` closes.
    cancel(ring, 1);
    result
}

/// A multishot ACCEPT on a listening Unix socket with a connection waiting: Ok(true) when it
/// accepted it and stays armed, Ok(false) when the kernel refused the flag (EINVAL).
fn multishot_accept(ring: &mut IoUring) -> io::Result<bool> {
    use std::os::linux::net::SocketAddrExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("sluice-probe-{}-{nanos}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let _client = UnixStream::connect_addr(&addr)?;
    let sqe = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .build()
        .user_data(2);
    // SAFETY: the SQE names `listener`, alive until after the cancel below.
    unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
    let cqe = one_completion(ring)?;
    let result = match cqe.result() {
        r if r == -libc::EINVAL => Ok(false),
        r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
        fd => {
            // SAFETY: a successful ACCEPT completion's result is a new fd that nothing else owns.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            Ok(cqueue::more(cqe.flags()))
        }
    };
    cancel(ring, 2);
    result
}

/// Cancels what is still armed under `user_data` and waits for the completions that follow,
/// so no operation outlives the socket it names.
fn cancel(ring: &mut IoUring, user_data: u64) {
    const CANCEL: u64 = u64::MAX;
    let sqe = opcode::AsyncCancel::new(user_data)
        .build()
        .user_data(CANCEL);
    // SAFETY: ASYNC_CANCEL points at no memory.
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        return;
    }
    // The cancel's own completion; when it found the operation (result 0), that operation's
    // last completion too. Two rounds at most, each with a completion due at once.
    let (mut cancel_done, mut op_done) = (false, false);
    for _ in 0..2 {
        if ring.submit_and_wait(1).is_err() {
            return;
        }
        for c in ring.completion() {
            if c.user_data() == CANCEL {
                cancel_done = true;
                op_done |= c.result() != 0;
            } else if c.user_data() == user_data && !cqueue::more(c.flags()) {
                op_done = true;
            }
        }
        if cancel_done && op_done {
            return;
        }
    }
}
