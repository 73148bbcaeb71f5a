//! The harness's only `unsafe`: thin libc wrappers (signals, rlimits, epoll, poll, the io_uring
//! probe, the seccomp filter and the parent-death signal installed between fork and exec).
//!
//! Everything else in the crate calls these safe functions; each block says why it is sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

/// `kill(pid, sig)`; false when the process is gone (or not ours to signal).
pub fn kill(pid: u32, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false; // never signal a process group or everything
    }
    // SAFETY: kill takes plain integers; pid > 0 names exactly one process.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// (soft, hard) RLIMIT_NOFILE of this process.
pub fn nofile_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0, "getrlimit: {}", io::Error::last_os_error());
    (lim.rlim_cur, lim.rlim_max)
}

/// Raises the soft RLIMIT_NOFILE to the hard one; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let (_, hard) = nofile_limit();
    let lim = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit read by the call only.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());
    hard
}

/// An epoll instance (level-triggered use only).
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes a flag and returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is valid for the call; the kernel copies it and keeps no pointer.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms`; fills `events` (its capacity is the batch size).
    pub fn wait(&self, events: &mut Vec<libc::epoll_event>, timeout_ms: i32) -> io::Result<()> {
        events.clear();
        let cap = i32::try_from(events.capacity()).unwrap_or(i32::MAX).max(1);
        if events.capacity() == 0 {
            events.reserve(1);
        }
        // SAFETY: the buffer has room for `cap` events; the kernel writes at most that many.
        let n =
            unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), cap, timeout_ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(err)
            };
        }
        // SAFETY: the kernel initialised the first `n` entries (n <= cap <= capacity).
        unsafe { events.set_len(n as usize) };
        Ok(())
    }
}

/// `poll(2)` over `fds`; returns how many have events (0 on timeout or EINTR).
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, writable slice of pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(err)
        };
    }
    Ok(n as usize)
}

/// Tries `io_uring_setup(1, ..)`: Ok when this process may create a ring.
pub fn probe_io_uring() -> io::Result<()> {
    // struct io_uring_params is 120 bytes; zeroed means "defaults".
    let mut params = [0u32; 30];
    // SAFETY: `params` is a writable buffer of sizeof(struct io_uring_params) bytes.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is the ring fd the kernel just returned; we own it and close it here.
    drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    Ok(())
}

/// Tries to create a network namespace in a child (`unshare(CLONE_NEWNET)` before exec `true`).
pub fn probe_netns() -> io::Result<()> {
    let mut cmd = Command::new("true");
    // SAFETY: the closure only calls unshare, which is async-signal-safe, and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = cmd.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("`true` in a new netns: {status}")))
    }
}

// Classic BPF, as seccomp wants it (linux/filter.h, linux/seccomp.h).
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const SECCOMP_RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const SECCOMP_RET_ERRNO: u32 = libc::SECCOMP_RET_ERRNO;
const SECCOMP_MODE_FILTER: libc::c_ulong = libc::SECCOMP_MODE_FILTER as libc::c_ulong;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64
/// io_uring_setup, io_uring_enter, io_uring_register: 425..427 in the unified syscall table.
const NR_IO_URING_SETUP: u32 = 425;
const NR_IO_URING_ENTER: u32 = 426;
const NR_IO_URING_REGISTER: u32 = 427;

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Docker's default profile in miniature: the io_uring syscalls fail with EPERM, all else runs.
/// `seccomp_data` has `nr` at offset 0 and `arch` at offset 4.
static IO_URING_BLOCK: [libc::sock_filter; 8] = [
    insn(BPF_LD_W_ABS, 0, 0, 4),
    insn(BPF_JEQ_K, 0, 5, AUDIT_ARCH), // another arch: allow (index 7)
    insn(BPF_LD_W_ABS, 0, 0, 0),
    insn(BPF_JEQ_K, 2, 0, NR_IO_URING_SETUP),
    insn(BPF_JEQ_K, 1, 0, NR_IO_URING_ENTER),
    insn(BPF_JEQ_K, 0, 1, NR_IO_URING_REGISTER),
    insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
    insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
];

/// IORING_REGISTER_PBUF_RING: io_uring_register's opcode for a provided-buffer ring (5.19).
const IORING_REGISTER_PBUF_RING: u32 = 22;

/// A kernel before 5.19 in miniature: io_uring_register(fd, IORING_REGISTER_PBUF_RING, ..)
/// fails with EINVAL, as it does there; everything else runs. `args[1]` (the opcode) is at
/// offset 24 of `seccomp_data` (low word first on these little-endian machines).
static PBUF_RING_REFUSE: [libc::sock_filter; 8] = [
    insn(BPF_LD_W_ABS, 0, 0, 4),
    insn(BPF_JEQ_K, 0, 5, AUDIT_ARCH), // another arch: allow (index 7)
    insn(BPF_LD_W_ABS, 0, 0, 0),
    insn(BPF_JEQ_K, 0, 3, NR_IO_URING_REGISTER),
    insn(BPF_LD_W_ABS, 0, 0, 24),
    insn(BPF_JEQ_K, 0, 1, IORING_REGISTER_PBUF_RING),
    insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EINVAL as u32),
    insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
];

/// epoll_ctl's number in this architecture's own syscall table (not the unified one).
#[cfg(target_arch = "x86_64")]
const NR_EPOLL_CTL: u32 = 233;
#[cfg(target_arch = "aarch64")]
const NR_EPOLL_CTL: u32 = 21;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;

/// A full `fs.epoll.max_user_watches` in miniature: epoll_ctl(_, EPOLL_CTL_ADD, fd, _) fails
/// with ENOSPC, as it does at that limit, for every `fd >= from_fd`; smaller fds (a worker's
/// listeners and control pipe) and every other call run. `args[1]` (op) is at offset 24 of
/// `seccomp_data`, `args[2]` (fd) at 32, low words first.
fn epoll_watch_refuse(from_fd: u32) -> [libc::sock_filter; 10] {
    [
        insn(BPF_LD_W_ABS, 0, 0, 4),
        insn(BPF_JEQ_K, 0, 7, AUDIT_ARCH), // another arch: allow (index 9)
        insn(BPF_LD_W_ABS, 0, 0, 0),
        insn(BPF_JEQ_K, 0, 5, NR_EPOLL_CTL),
        insn(BPF_LD_W_ABS, 0, 0, 24),
        insn(BPF_JEQ_K, 0, 3, libc::EPOLL_CTL_ADD as u32),
        insn(BPF_LD_W_ABS, 0, 0, 32),
        insn(BPF_JGE_K, 0, 1, from_fd),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSPC as u32),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// Makes `cmd`'s process (and everything it forks) get ENOSPC when it adds an fd numbered
/// `from_fd` or above to an epoll set ([`epoll_watch_refuse`]).
pub fn refuse_epoll_watches(cmd: &mut Command, from_fd: u32) {
    // Leaked on purpose: the filter must outlive the fork it is installed in; a few bytes a test.
    install_filter(cmd, Box::leak(Box::new(epoll_watch_refuse(from_fd))));
}

/// Makes `cmd`'s process (and everything it forks) get EPERM from io_uring_setup: sets
/// PR_SET_NO_NEW_PRIVS and installs [`IO_URING_BLOCK`] between fork and exec.
pub fn block_io_uring(cmd: &mut Command) {
    install_filter(cmd, &IO_URING_BLOCK);
}

/// Makes `cmd`'s process (and everything it forks) get EINVAL when it registers a provided
/// buffer ring, as on a kernel older than 5.19 ([`PBUF_RING_REFUSE`]).
pub fn refuse_buffer_rings(cmd: &mut Command) {
    install_filter(cmd, &PBUF_RING_REFUSE);
}

/// Sets PR_SET_NO_NEW_PRIVS and installs the seccomp `filter` between fork and exec.
fn install_filter(cmd: &mut Command, filter: &'static [libc::sock_filter]) {
    // SAFETY: the closure only calls prctl (async-signal-safe) with a pointer to a static
    // filter; it allocates nothing and touches no lock.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The child gets `sig` when the thread that spawned it exits: a test process killed mid-test
/// (timeout, ^C) does not leave a relay behind. Drop guards still stop children the normal way.
pub fn parent_death_signal(cmd: &mut Command, sig: i32) {
    // SAFETY: the closure only calls prctl, which is async-signal-safe, and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// IP_BIND_ADDRESS_NO_PORT: a socket bound to an address with port 0 gets its port at connect
/// time, per destination, so many connections from one source address share ports.
pub fn set_bind_address_no_port(fd: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int for the duration of the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
