//! The engines that move a relayed connection's bytes, and what every engine shares.
//!
//! - [`uring`]: the io_uring event loop of a worker (accept, connect, timers, teardown); it relays
//!   with [`splice`] (SPLICE through a pipe from a bounded pool) or [`copy`] (multishot recv into
//!   a provided-buffer ring, then send), copy taking over a direction when the pipe pool is empty.
//! - [`epoll`]: the whole worker loop again on epoll and nonblocking read/write, for hosts that
//!   refuse io_uring (Docker's default seccomp profile).
//!
//! - [`session`]: the life of one connection as plain data (phases, routing, decoy, failover,
//!   time limits, how it ends), which both engines drive; no I/O.
//!
//! An engine is a closed `enum` ([`EngineKind`]), not a trait object: a worker runs exactly one
//! loop, chosen once at start, and the hot path should not pay for dynamic dispatch.

pub mod copy;
mod ctx;
pub mod epoll;
pub mod features;
pub mod session;
pub mod splice;
pub mod uring;

use std::os::fd::{AsFd, BorrowedFd};

use socket2::SockRef;

use crate::config::{Config, EngineChoice, Listener, SendProxy};
use crate::proto::proxy::{self, Parsed, ProxyHeader};
use crate::proto::sni::{self, SniResult};
use crate::sys;

pub use self::ctx::{Around, WorkerCtx};

/// The engine a worker really runs (after `auto` was decided).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Splice,
    Copy,
    Epoll,
    /// io_uring worker whose plain connections ride the eBPF sockmap fast path.
    Sockmap,
}

impl EngineKind {
    pub const ALL: [EngineKind; 4] = [
        EngineKind::Splice,
        EngineKind::Copy,
        EngineKind::Epoll,
        EngineKind::Sockmap,
    ];

    pub fn id(self) -> u64 {
        match self {
            EngineKind::Splice => 1,
            EngineKind::Copy => 2,
            EngineKind::Epoll => 3,
            EngineKind::Sockmap => 4,
        }
    }

    pub fn from_id(id: u64) -> Option<EngineKind> {
        match id {
            1 => Some(EngineKind::Splice),
            2 => Some(EngineKind::Copy),
            3 => Some(EngineKind::Epoll),
            4 => Some(EngineKind::Sockmap),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Splice => "splice",
            EngineKind::Copy => "copy",
            EngineKind::Epoll => "epoll",
            EngineKind::Sockmap => "sockmap",
        }
    }

    /// The engine for a configured choice, given whether io_uring works here. `sockmap` also
    /// needs BPF: the supervisor checks that separately and falls back to splice.
    pub fn decide(choice: EngineChoice, uring_ok: bool) -> EngineKind {
        match (choice, uring_ok) {
            (EngineChoice::Epoll, _) | (_, false) => EngineKind::Epoll,
            (EngineChoice::Copy, true) => EngineKind::Copy,
            (EngineChoice::Sockmap, true) => EngineKind::Sockmap,
            (EngineChoice::Splice | EngineChoice::Auto, true) => EngineKind::Splice,
        }
    }
}

/// Slab slots a worker keeps when it has no connection; a larger slab (left by a burst) is
/// released on the next tick.
pub const SLAB_KEEP: usize = 1024;

/// Whether a worker's timer tick has to look over its connections for timeouts. A scan notes
/// the earliest moment any connection it saw can time out; until then, a tick with nothing
/// having happened since the last scan (no completion, no readiness, no control line: so no
/// connection was added, changed phase or saw bytes) skips it. An idle worker holding
/// thousands of connections then costs a timer wake-up and a comparison per tick, not a pass
/// over its slab.
#[derive(Debug, Clone, Copy)]
pub struct ScanGate {
    dirty: bool,
    next_ms: u64,
}

impl Default for ScanGate {
    fn default() -> ScanGate {
        ScanGate {
            dirty: true,
            next_ms: 0,
        }
    }
}

impl ScanGate {
    /// Something happened that may have added a connection or moved a deadline earlier.
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Whether this tick must scan.
    pub fn due(&self, now_ms: u64) -> bool {
        self.dirty || now_ms >= self.next_ms
    }

    /// A scan starts: what it sees sets the next deadline.
    pub fn begin(&mut self) {
        self.dirty = false;
        self.next_ms = u64::MAX;
    }

    /// A connection the scan saw times out at `at_ms` unless it moves.
    pub fn deadline(&mut self, at_ms: u64) {
        self.next_ms = self.next_ms.min(at_ms);
    }
}

/// Fds one relayed connection costs at most: client, upstream, and two pipes' ends per
/// direction while splicing.
pub const FDS_PER_CONN: u64 = 2;
/// Fds a worker keeps for itself (listeners, ring, pipes pool, control pipe, logs).
pub const FDS_RESERVED: u64 = 256;

/// How many upstream entries (`upstream` then `fallback`) each listener has: the shape of a
/// worker's [`Upstreams`].
pub fn upstream_entries(config: &Config) -> Vec<usize> {
    config
        .listeners
        .iter()
        .map(|l| l.upstream.len() + l.fallback.len())
        .collect()
}

/// Relayed connections one worker process can hold with `nofile` file descriptors.
pub fn worker_capacity(nofile: u64) -> u64 {
    let pipes = splice::PIPE_POOL_MAX as u64 * 2;
    nofile.saturating_sub(FDS_RESERVED + pipes) / FDS_PER_CONN
}

/// Whether listener `l` believes a PROXY header from `peer` (its `trusted_proxies`).
pub fn trusts(l: &Listener, peer: std::net::IpAddr) -> bool {
    l.trusted_proxies().iter().any(|net| net.contains(&peer))
}

/// A nonblocking, close-on-exec socket for a connection to `addr`, leaving from `source` when
/// given (IP_BIND_ADDRESS_NO_PORT: the port is picked at connect time, per destination).
pub fn upstream_socket(
    addr: std::net::SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    if let Some(ip) = source {
        sys::set_bind_address_no_port(sock.as_fd())?;
        sock.bind(&std::net::SocketAddr::new(ip, 0).into())?;
    }
    Ok(sock)
}

/// Sets up a socket of a relayed connection: no Nagle delay (messages are small and
/// latency-bound; the relay never holds bytes back to coalesce them).
pub fn tune_socket(fd: BorrowedFd<'_>) {
    let _ = SockRef::from(&fd).set_nodelay(true);
}

/// Sets up a listening socket, once per worker: every socket accepted from it is born with
/// TCP_NODELAY (Linux copies the listener's TCP state into each child), so no client costs a
/// setsockopt of its own. Per worker rather than at bind, so listeners a previous version bound
/// and handed over get it too.
pub fn tune_listener(fd: BorrowedFd<'_>) {
    tune_socket(fd);
}

/// Closes with RST instead of FIN when the fd is dropped (reset propagation, refusals).
pub fn set_reset_on_close(fd: impl AsFd) {
    let _ = SockRef::from(&fd.as_fd()).set_linger(Some(std::time::Duration::ZERO));
}

/// Whether a TLS port's client starts with a TLS handshake record (its first byte, peeked, not
/// consumed): None while nothing has arrived; Err on EOF or an error.
pub fn peek_tls_start(client: BorrowedFd<'_>) -> std::io::Result<Option<bool>> {
    let mut first = [0u8; 1];
    match sys::peek(client, &mut first) {
        Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        Ok(_) => Ok(Some(first[0] == 0x16)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// What the first plaintext bytes of a static-route connection whose listener has a decoy say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough bytes yet.
    More,
    /// An HTTP request: a probe, for the decoy.
    Decoy,
    /// Anything else: relayed as usual.
    Relay,
}

/// Classifies a connection's first plaintext bytes (`closed`: the client sent FIN after them).
pub fn sniff(first: &[u8], closed: bool) -> Sniff {
    match crate::decoy::looks_like_http(first) {
        Some(true) => Sniff::Decoy,
        Some(false) => Sniff::Relay,
        None if closed => Sniff::Relay,
        None => Sniff::More,
    }
}

/// Half-closes the write side (FIN after every queued byte).
pub fn shutdown_write(fd: impl AsFd) {
    let _ = SockRef::from(&fd.as_fd()).shutdown(std::net::Shutdown::Write);
}

/// The socket's pending error (SO_ERROR), e.g. after POLLERR.
pub fn take_socket_error(fd: impl AsFd) -> Option<std::io::Error> {
    SockRef::from(&fd.as_fd()).take_error().ok().flatten()
}

/// Does this error mean the peer reset the connection (as opposed to any other failure)?
pub fn is_reset(errno: i32) -> bool {
    errno == libc::ECONNRESET || errno == libc::EPIPE || errno == libc::ECONNABORTED
}

/// The first bytes of a connection, read before its upstream is chosen: the client's PROXY
/// header (then what it said), or, on an SNI-routed plain port, its ClientHello (sent upstream
/// first).
#[derive(Debug, Default)]
pub struct Inbound {
    pub acc: Vec<u8>,
    pub header: Option<ProxyHeader>,
}

/// One step of reading a client's PROXY header.
#[derive(Debug)]
pub enum HeaderStep {
    /// The header is complete and consumed; the socket now holds only the client's own bytes.
    Done(ProxyHeader),
    /// Not complete yet: wait for the socket to be readable again.
    More,
    /// Malformed, too long, or the client closed first: refuse the connection.
    Bad,
}

/// Reads what is there of a PROXY header from a nonblocking socket without taking a byte past
/// it: peeks, parses `acc` + the peeked bytes, then consumes exactly the header's bytes (or all
/// peeked bytes into `acc` when the header is still incomplete, so readiness does not spin).
pub fn read_proxy_header(fd: BorrowedFd<'_>, acc: &mut Vec<u8>) -> HeaderStep {
    let mut buf = [0u8; proxy::MAX_HEADER_LEN];
    let room = proxy::MAX_HEADER_LEN.saturating_sub(acc.len());
    if room == 0 {
        return HeaderStep::Bad;
    }
    let n = match sys::recv(fd, &mut buf[..room], libc::MSG_PEEK | libc::MSG_DONTWAIT) {
        Ok(0) => return HeaderStep::Bad,
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return HeaderStep::More,
        Err(_) => return HeaderStep::Bad,
    };
    let old = acc.len();
    acc.extend_from_slice(&buf[..n]);
    let (consume, step) = match proxy::parse(acc) {
        Ok(Parsed::Complete { len, header }) => (len - old, HeaderStep::Done(header)),
        Ok(Parsed::Incomplete) => (n, HeaderStep::More),
        Err(_) => return HeaderStep::Bad,
    };
    // The bytes were just peeked, so this reads exactly `consume` of them.
    match sys::recv(fd, &mut buf[..consume], libc::MSG_DONTWAIT) {
        Ok(m) if m == consume => step,
        _ => HeaderStep::Bad,
    }
}

/// One step of routing a connection by its ClientHello's server name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniStep {
    /// The `upstream` entry the name picks.
    Entry(usize),
    /// The ClientHello is not complete yet.
    More,
    /// Not TLS, no name, or a name not in the listener's `upstream` list: refuse.
    Bad,
}

/// Routes by the server name of the ClientHello at the start of `hello`.
pub fn route_by_sni(listener: &Listener, hello: &[u8]) -> SniStep {
    match sni::peek_sni(hello) {
        Ok(SniResult::Found(name)) => listener
            .upstream
            .iter()
            .position(|u| u.host.eq_ignore_ascii_case(&name))
            .map_or(SniStep::Bad, SniStep::Entry),
        Ok(SniResult::Incomplete) => SniStep::More,
        Ok(SniResult::NoSni) | Err(_) => SniStep::Bad,
    }
}

/// Reads (consumes) what a nonblocking socket holds into `acc`, up to `max` bytes in all.
/// Returns true when the peer closed.
pub fn read_available(fd: BorrowedFd<'_>, acc: &mut Vec<u8>, max: usize) -> std::io::Result<bool> {
    let mut buf = [0u8; 4096];
    while acc.len() < max {
        let room = (max - acc.len()).min(buf.len());
        match sys::recv(fd, &mut buf[..room], libc::MSG_DONTWAIT) {
            Ok(0) => return Ok(true),
            Ok(n) => acc.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Sends the bytes read from the client before the upstream was chosen (its ClientHello, on an
/// SNI-routed plain port) to the just-connected upstream, whole, at once: a new socket's send
/// buffer holds a ClientHello (at most [`SNI_PEEK_MAX`]), anything else is an error.
pub fn send_prefix(upstream: BorrowedFd<'_>, prefix: &[u8]) -> std::io::Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    let n = sys::send(upstream, prefix, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)?;
    if n != prefix.len() {
        return Err(std::io::Error::other("short write of the first bytes"));
    }
    Ok(())
}

/// Most bytes read from a client while waiting for its ClientHello (SNI routing).
pub const SNI_PEEK_MAX: usize = sni::MAX_CLIENT_HELLO_LEN + 1024;

/// Writes the PROXY header `version` asks for to a just-connected upstream: the client's
/// addresses from its own PROXY header when it sent one, else from its socket. A new socket's
/// send buffer is empty, so the whole header goes at once; anything else is an error.
pub fn send_proxy_header(
    version: SendProxy,
    client: BorrowedFd<'_>,
    upstream: BorrowedFd<'_>,
    inbound: Option<&ProxyHeader>,
) -> std::io::Result<()> {
    if version == SendProxy::None {
        return Ok(());
    }
    let sock = SockRef::from(&client);
    let (source, destination) = match inbound {
        Some(h) => (h.source, h.destination),
        None => (
            sock.peer_addr().ok().and_then(|a| a.as_socket()),
            sock.local_addr().ok().and_then(|a| a.as_socket()),
        ),
    };
    let mut out = Vec::with_capacity(64);
    proxy::encode(version, source, destination, &mut out);
    let n = sys::send(upstream, &out, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)?;
    if n != out.len() {
        return Err(std::io::Error::other("short write of the PROXY header"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// What [`super::tune_listener`] relies on: an accepted socket inherits TCP_NODELAY.
    #[test]
    fn accepted_sockets_inherit_no_delay_from_their_listener() {
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        super::tune_listener(listener.as_fd());
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    use super::*;

    #[test]
    fn scan_gate_skips_quiet_ticks_until_the_earliest_deadline() {
        let mut g = ScanGate::default();
        assert!(g.due(0), "the first tick scans");
        g.begin();
        g.deadline(5_000);
        g.deadline(3_000);
        assert!(
            !g.due(2_999),
            "nothing happened and nothing can time out yet"
        );
        assert!(g.due(3_000), "the earliest deadline is reached");
        g.touch();
        assert!(g.due(0), "an event since the scan means scanning again");
        g.begin();
        assert!(!g.due(u64::MAX - 1), "no connection: no deadline");
    }

    #[test]
    fn auto_prefers_uring_and_falls_back_to_epoll() {
        assert_eq!(
            EngineKind::decide(EngineChoice::Auto, true),
            EngineKind::Splice
        );
        assert_eq!(
            EngineKind::decide(EngineChoice::Auto, false),
            EngineKind::Epoll
        );
        assert_eq!(
            EngineKind::decide(EngineChoice::Copy, false),
            EngineKind::Epoll
        );
        assert_eq!(
            EngineKind::decide(EngineChoice::Copy, true),
            EngineKind::Copy
        );
        for k in [EngineKind::Splice, EngineKind::Copy, EngineKind::Epoll] {
            assert_eq!(EngineKind::from_id(k.id()), Some(k));
        }
    }
}
