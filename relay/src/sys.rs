//! Thin, safe wrappers over the libc calls std and socket2 do not cover.
//!
//! One of the three places `unsafe` is allowed (with `engine::uring` and `engine::splice`).
//! Every fd a syscall returns becomes an [`OwnedFd`] at once, so nothing here can leak one.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A pipe `(read end, write end)`, nonblocking and close-on-exec, resized to `size` bytes when
/// the kernel allows it (the result is the size it really has).
pub(crate) fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two c_ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ takes an int argument; `w` is an open pipe.
    let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    let got = if got > 0 {
        got as usize
    } else {
        // SAFETY: F_GETPIPE_SZ takes no argument; `w` is an open pipe.
        cvt(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) })? as usize
    };
    Ok((r, w, got))
}

/// Bytes queued in a pipe, not yet read (FIONREAD).
pub(crate) fn pipe_pending(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n as usize)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub(crate) fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct it is given.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// Moves `fd` to the fixed number `target` and clears close-on-exec there, for a child about to
/// exec. Only async-signal-safe calls: this runs between fork and exec.
pub(crate) fn dup_to_for_exec(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        // SAFETY: fcntl on an fd number; failure is reported, nothing is dereferenced.
        let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) })?;
    } else {
        // SAFETY: dup2 onto a number this child reserved for it; the new fd lacks CLOEXEC.
        cvt(unsafe { libc::dup2(fd, target) })?;
    }
    Ok(())
}

/// Takes ownership of the `n` fds a parent process left open at `first..first + n`.
///
/// Callable once per process (later calls fail), so no two owners of one fd can exist; an fd
/// number that is not open is an error.
pub(crate) fn take_inherited_fds(first: RawFd, n: usize) -> io::Result<Vec<OwnedFd>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other("inherited fds were already taken"));
    }
    let range = first..first + n as RawFd;
    if !range.clone().all(fd_is_open) {
        return Err(io::Error::other(
            "inherited fds are missing: only the supervisor starts workers",
        ));
    }
    // SAFETY: the fds are open (checked), were inherited from the parent, and this function
    // runs once per process before anything else could have claimed them.
    Ok(range
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect())
}

/// Is `fd` an open file descriptor here?
pub(crate) fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only inspects the fd table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Sets close-on-exec on an inherited fd, so workers do not pass it on.
/// The uid of the process that connected Unix socket `fd` (SO_PEERCRED: the credentials the
/// kernel recorded at its connect, which the peer cannot change afterwards).
pub(crate) fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes for the call; the kernel writes at most
    // `len` bytes, a `ucred`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// This process's effective uid.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl flags on a borrowed, open fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Makes a pipe end nonblocking (the supervisor's end of a worker's control pipe: a write it
/// cannot finish now must not stop its event loop).
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl reads and sets the status flags of a borrowed, open fd.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Sends `sig` to process `pid`.
pub(crate) fn kill(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    cvt(unsafe { libc::kill(pid as libc::pid_t, sig) })?;
    Ok(())
}

/// Asks the kernel to send SIGKILL to this process when its parent dies (a worker must not
/// outlive its supervisor).
pub(crate) fn die_with_parent() -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number.
    cvt(unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    Ok(())
}

/// A shared, zero-filled memory region backed by a memfd, mapped read-write. The memfd can be
/// passed to another process, which maps the same pages with [`SharedMap::from_fd`].
pub(crate) struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory that outlives every reference handed out; all
// access to it goes through atomics (see `metrics::Shared`).
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// A new zeroed region of `len` bytes.
    pub fn new(name: &str, len: usize) -> io::Result<SharedMap> {
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: memfd_create reads a NUL-terminated name.
        let raw = cvt(unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) })?;
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
        SharedMap::from_fd(fd, len)
    }

    /// Maps `len` bytes of an existing memfd (one another process made).
    pub(crate) fn from_fd(fd: OwnedFd, len: usize) -> io::Result<SharedMap> {
        // SAFETY: a fresh shared mapping of an fd we own; the kernel chooses the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedMap { ptr, len, fd })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The region as a slice of atomics.
    pub(crate) fn atomics(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping is page-aligned, `len` bytes long and lives as long as `self`;
        // AtomicU64 has no invalid bit patterns and all access is atomic, so sharing the pages
        // with other processes is sound.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len / 8) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmapping the region this value mapped; no reference outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Anonymous private memory, page-aligned, for io_uring's provided-buffer ring.
pub(crate) struct AnonMap {
    ptr: NonNull<u8>,
    len: usize,
}

impl AnonMap {
    pub fn new(len: usize) -> io::Result<AnonMap> {
        // SAFETY: a fresh anonymous mapping; the kernel chooses the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(AnonMap { ptr, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped; the owner (the buffer ring) unregisters it from
        // the io_uring before dropping it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An epoll instance (for the engine used where io_uring is refused).
pub(crate) struct Epoll {
    fd: OwnedFd,
}

pub use libc::epoll_event as EpollEvent;

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes flags only and returns a new fd.
        let raw = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Epoll { fd })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    pub(crate) fn add(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), events, token)
    }

    pub(crate) fn modify(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd.as_raw_fd(), events, token)
    }

    pub(crate) fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0)
    }

    /// Waits up to `timeout_ms` and fills `events`; returns how many are valid.
    pub(crate) fn wait(&self, events: &mut [EpollEvent], timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `events.len()` entries into the slice.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        match cvt(n) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// A zeroed epoll event array entry.
pub(crate) fn epoll_event_zeroed() -> EpollEvent {
    libc::epoll_event { events: 0, u64: 0 }
}

/// A close-on-exec duplicate of `fd` numbered at least `min` (so fds handed to a child at fixed
/// low numbers never collide with their sources).
pub(crate) fn dup_high(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd that nothing else owns.
    let raw = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// IP_BIND_ADDRESS_NO_PORT: a later bind() to port 0 picks the address only; the port is chosen
/// at connect() time, per destination, so source ports are not used up by bind().
pub(crate) fn set_bind_address_no_port(fd: BorrowedFd<'_>) -> io::Result<()> {
    const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from the pointer, which points at `one`.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Number of online CPUs.
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Makes `cmd`'s child receive `fds` at `first`, `first + 1`, … (without close-on-exec).
///
/// Every source fd must be numbered at or above `first + fds.len()` (see [`dup_high`]), so no
/// dup2 overwrites a source not yet moved.
pub(crate) fn pass_fds(cmd: &mut std::process::Command, fds: Vec<RawFd>, first: RawFd) {
    use std::os::unix::process::CommandExt;
    assert!(fds.iter().all(|&fd| fd >= first + fds.len() as RawFd));
    // SAFETY: the closure runs between fork and exec; it only calls dup2/fcntl, which are
    // async-signal-safe, and allocates nothing (`fds` was allocated before the fork).
    unsafe {
        cmd.pre_exec(move || {
            for (i, &fd) in fds.iter().enumerate() {
                dup_to_for_exec(fd, first + i as RawFd)?;
            }
            Ok(())
        });
    }
}

/// recv(2) into `buf` with `flags` (e.g. MSG_PEEK | MSG_DONTWAIT).
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// accept4(2) of a connection on `listener`, nonblocking and close-on-exec from the start (one
/// syscall, where accept and then O_NONBLOCK take three).
pub(crate) fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers: the peer's address is not asked for.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// send(2) of `buf` with `flags` (e.g. MSG_NOSIGNAL | MSG_DONTWAIT).
pub(crate) fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// recv(2) with MSG_PEEK | MSG_DONTWAIT: the bytes waiting on a socket, left there.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// read(2) from any fd (a pipe, here) into `buf`.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether a bpffs is mounted at `dir` (read from /proc/self/mounts).
pub(crate) fn is_bpffs(dir: &std::path::Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next(), f.next(), f.next());
        at.is_some_and(|a| std::path::Path::new(a) == dir) && kind == Some("bpf")
    })
}

/// Mounts a bpffs at `dir` (`mount -t bpf bpf DIR`); needs CAP_SYS_ADMIN.
pub(crate) fn mount_bpffs(dir: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call (two literals and
    // `target`); a null `data` is allowed for bpffs.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    cvt(r).map(drop)
}

/// The head of the kernel's `struct tcp_info` (include/uapi/linux/tcp.h) up to the byte
/// counters. libc's glibc definition stops before them; the kernel copies
/// `min(optlen, sizeof)` bytes, so a prefix is a valid request on every kernel since 4.6.
#[repr(C)]
#[derive(Default)]
struct TcpInfoHead {
    bytes_u8: [u8; 8],
    /// rto .. total_retrans: 24 `u32`s.
    words: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

const _: () = assert!(std::mem::size_of::<TcpInfoHead>() == 136);

/// A TCP socket's delivery counters, for deciding when every relayed byte has left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TcpProgress {
    /// `tcpi_state` (TCP_ESTABLISHED = 1 .. TCP_CLOSING = 11).
    pub state: u8,
    /// Bytes the peer acknowledged (`tcpi_bytes_acked`).
    pub acked: u64,
    /// Bytes received in order (`tcpi_bytes_received`).
    pub received: u64,
}

/// `TCP_INFO`'s byte counters of `fd`.
pub(crate) fn tcp_progress(fd: BorrowedFd<'_>) -> io::Result<TcpProgress> {
    let mut info = TcpInfoHead::default();
    let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a plain-integer struct for which
    // every bit pattern is valid.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of::<TcpInfoHead>() {
        return Err(io::Error::other(
            "TCP_INFO without byte counters (kernel < 4.6)",
        ));
    }
    Ok(TcpProgress {
        state: info.bytes_u8[0],
        acked: info.bytes_acked,
        received: info.bytes_received,
    })
}

/// `SIOCINQ` (`in_queue`) or `SIOCOUTQ`: bytes received and not yet read, or written and not yet
/// acknowledged.
pub(crate) fn socket_queue(fd: BorrowedFd<'_>, in_queue: bool) -> io::Result<u64> {
    let req = if in_queue {
        libc::FIONREAD // SIOCINQ
    } else {
        libc::TIOCOUTQ // SIOCOUTQ
    };
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one `int` through the pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut n) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as u64)
    }
}

/// A user to run as: its uid and primary gid, from the system's user database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UserIds {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Looks `name` up with getpwnam_r (NSS: /etc/passwd and whatever else is configured).
pub(crate) fn lookup_user(name: &str) -> io::Result<Option<UserIds>> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::other("NUL in a user name"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `passwd` is plain data the call fills in; `out` receives a pointer to it or null.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives it and its length is passed.
    let r = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    if out.is_null() {
        return Ok(None);
    }
    Ok(Some(UserIds {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    }))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Capability names as `capabilities(7)` spells them, by bit number (0..=40), for messages.
const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The name of capability `cap` (`CAP_BPF`), or `capability N` for one newer than this list.
pub(crate) fn cap_name(cap: u32) -> String {
    CAP_NAMES
        .get(cap as usize)
        .map_or_else(|| format!("capability {cap}"), |n| (*n).to_owned())
}

const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;

/// The capability sets of this thread, read from /proc/thread-self/status (bit masks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub bounding: u64,
    pub ambient: u64,
}

impl CapSets {
    pub(crate) fn of_this_thread() -> io::Result<CapSets> {
        let status = std::fs::read_to_string("/proc/thread-self/status")?;
        let field = |name: &str| -> io::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .ok_or_else(|| io::Error::other(format!("no {name} in /proc/thread-self/status")))
        };
        Ok(CapSets {
            effective: field("CapEff:")?,
            permitted: field("CapPrm:")?,
            inheritable: field("CapInh:")?,
            bounding: field("CapBnd:")?,
            ambient: field("CapAmb:")?,
        })
    }
}

/// Why [`become_user`] failed: the step, and what is missing for it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DropError {
    #[error("cannot read this thread's capabilities: {0}")]
    Read(io::Error),
    #[error("cannot become the user: {cap} is not in the bounding set")]
    NoSetid { cap: String },
    #[error("cannot drop {cap} from the bounding set: {source}")]
    BoundingSet { cap: String, source: io::Error },
    #[error("cannot {step}: {source}")]
    Step {
        step: &'static str,
        source: io::Error,
    },
    #[error(
        "capabilities are left after the drop: effective {effective:#x}, permitted \
         {permitted:#x}, inheritable {inheritable:#x}, ambient {ambient:#x}"
    )]
    Left {
        effective: u64,
        permitted: u64,
        inheritable: u64,
        ambient: u64,
    },
}

/// Sets this thread's capabilities: `effective` and `permitted` as given, inheritable empty.
fn capset(effective: u64, permitted: u64) -> io::Result<()> {
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: effective as u32,
            permitted: permitted as u32,
            inheritable: 0,
        },
        CapData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads one header and two data structs (version 3), both valid here.
    cvt(unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) as libc::c_int })?;
    Ok(())
}

/// Empties this thread's inheritable and ambient sets, keeping effective and permitted.
///
/// For a process that will [`become_user`], called before it starts any thread: a uid change
/// clears a thread's effective, permitted and ambient sets but leaves its inheritable set as it
/// was, and [`become_user`] can empty only the calling thread's. Threads started afterwards
/// inherit the empty sets. (Root's inheritable set is normally empty already; a container
/// runtime or a wrapper such as `setpriv --inh-caps` may have filled it.)
pub(crate) fn clear_inheritable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    let now = CapSets::of_this_thread()?;
    capset(now.effective, now.permitted)
}

/// Becomes `user` for good, with no capability left: effective, permitted, inheritable and
/// ambient are empty afterwards (checked in /proc), so threads this thread starts and the
/// processes it executes (workers) hold none either.
///
/// Every capability also leaves the bounding set when this thread may do that (CAP_SETPCAP).
/// Inside a systemd unit whose `CapabilityBoundingSet` leaves CAP_SETPCAP out, what the unit
/// allows stays in the bounding set: harmless once the process is not root and holds nothing
/// (a bounding set only caps what an execve can gain, and the relay executes only itself, with
/// no file capabilities and no setuid bit).
///
/// Nothing is kept because nothing is needed once started (ARCHITECTURE.md, "Capabilities"):
/// what needs a capability (binding low ports, creating maps, loading and attaching programs)
/// is done before, and what follows uses the fds it opened.
///
/// Call it from the thread that will start processes: capability sets are per thread (the uid
/// change itself reaches every thread, glibc makes sure of that, and the other threads lose
/// their effective, permitted and ambient sets with it; see [`clear_inheritable`] for the
/// rest).
pub(crate) fn become_user(user: UserIds) -> Result<(), DropError> {
    let step = |step: &'static str| move |source: io::Error| DropError::Step { step, source };
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let before = CapSets::of_this_thread().map_err(DropError::Read)?;
    let has = |set: u64, cap: u32| set & (1u64 << cap) != 0;
    for cap in [CAP_SETUID, CAP_SETGID] {
        if !has(before.effective, cap) {
            return Err(DropError::NoSetid { cap: cap_name(cap) });
        }
    }
    if has(before.effective, CAP_SETPCAP) {
        for cap in 0..64u32 {
            if has(before.bounding, cap) {
                // SAFETY: prctl with integer arguments only.
                check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })
                    .map_err(|source| DropError::BoundingSet {
                        cap: cap_name(cap),
                        source,
                    })?;
            }
        }
    }
    // Capabilities are not to survive the uid change, whatever an earlier PR_SET_KEEPCAPS said.
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) })
        .map_err(step("clear PR_SET_KEEPCAPS"))?;
    let groups = [user.gid];
    // SAFETY: one gid from a valid array; glibc applies it to every thread.
    check(unsafe { libc::setgroups(1, groups.as_ptr()) })
        .map_err(step("set the supplementary groups"))?;
    // SAFETY: integer arguments; glibc applies these to every thread.
    check(unsafe { libc::setresgid(user.gid, user.gid, user.gid) })
        .map_err(step("change the group id"))?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(user.uid, user.uid, user.uid) })
        .map_err(step("change the user id"))?;
    // The uid change emptied effective, permitted and ambient; the inheritable set goes here.
    capset(0, 0).map_err(step("empty the capability sets (capset)"))?;
    let after = CapSets::of_this_thread().map_err(DropError::Read)?;
    if after.effective | after.permitted | after.inheritable | after.ambient != 0 {
        return Err(DropError::Left {
            effective: after.effective,
            permitted: after.permitted,
            inheritable: after.inheritable,
            ambient: after.ambient,
        });
    }
    Ok(())
}

/// No core dumps from this process or what it executes: RLIMIT_CORE 0 (inherited across
/// execve) and not dumpable (PR_SET_DUMPABLE 0, reset by execve, so each process calls this).
/// A dump would hold client addresses, connection state and the TLS private key.
pub(crate) fn no_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every address on this host's network interfaces, with the interface's name (getifaddrs).
pub(crate) fn interface_addrs() -> io::Result<Vec<(String, std::net::IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocated into `head`; freed below with freeifaddrs.
    cvt(unsafe { libc::getifaddrs(&mut head) })?;
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points at a sockaddr whose family says its size:
        // sockaddr_in for AF_INET, sockaddr_in6 for AF_INET6 (read only for those).
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(std::net::IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(std::net::IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip {
            out.push((name, ip));
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no reference into it remains.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Tells systemd `state` (`READY=1`, `STOPPING=1`) through `$NOTIFY_SOCKET` (sd_notify(3)'s
/// protocol: one datagram to a Unix socket, `@` for the abstract namespace). `Ok(false)` when
/// not started by systemd with `Type=notify`.
pub(crate) fn sd_notify(state: &str) -> io::Result<bool> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.as_bytes();
    let addr = match path.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path))?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}
