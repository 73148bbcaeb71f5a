//! Socket plumbing shared by the load generators and the echo server: the loopback address plan,
//! client sockets bound to a chosen source address, listeners, and the few process knobs
//! (file limit, timer slack, parent-death signal) that std does not expose.
//!
//! Every address here is in 127.77.0.0/16 so that the run does not collide with tests that other
//! people run on 127.0.0.1 at the same time. The upstream and each relay have their own address;
//! clients spread over [`CLIENT_SOURCES`] source addresses so that no (source, destination) pair
//! runs out of ephemeral ports.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Where the upstream servers (echo, iperf3) listen.
pub const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 2);
/// Port of the echo server on [`UPSTREAM_IP`].
pub const ECHO_PORT: u16 = 27000;
/// Port of the iperf3 server on [`UPSTREAM_IP`].
pub const IPERF_PORT: u16 = 25201;
/// Port every relay listens on, each on its own address.
pub const RELAY_PORT: u16 = 28000;
/// How many client source addresses there are: 127.77.1.1 ..= 127.77.1.CLIENT_SOURCES.
pub const CLIENT_SOURCES: u8 = 64;

/// The `i`-th client source address (wrapping over [`CLIENT_SOURCES`]).
pub fn client_source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 77, 1, 1 + (i % usize::from(CLIENT_SOURCES)) as u8)
}

/// A TCP socket bound to `source` (port chosen at connect time) with its connect to `target`
/// started. Nonblocking: the connect completes when the socket becomes writable.
pub fn start_connect(source: Ipv4Addr, target: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    bind_address_no_port(&sock)?;
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

/// A blocking connect from `source` to `target`, then switched to nonblocking with `TCP_NODELAY`.
pub fn connect(source: Ipv4Addr, target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    bind_address_no_port(&sock)?;
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    sock.connect_timeout(&target.into(), timeout)?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    Ok(sock.into())
}

/// A listening socket with `SO_REUSEADDR` and `SO_REUSEPORT` (several echo threads and processes
/// share one port; the kernel spreads connections over them), nonblocking.
pub fn listen(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// `IP_BIND_ADDRESS_NO_PORT`: binding a source address does not reserve a port; `connect` picks
/// one unique for the whole 4-tuple, so each source address is good for far more than 28k
/// connections.
pub fn bind_address_no_port(sock: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is open (owned by `sock`) and `one` lives across the call; the length matches.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit read just above; only the soft limit changed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Timer slack of 1 µs for this thread, so that the open-loop sender wakes when it asked to.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Returns on a line or EOF on stdin, or after `max`: how the orchestrator tells a load
/// generator that holds connections (idle, media) to stop.
pub fn wait_for_stdin(max: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = io::BufRead::read_line(&mut io::stdin().lock(), &mut line);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(max);
}
