//! The eBPF side of the relay, in user space: loads the object `cargo xtask build-ebpf` built
//! (embedded at compile time, see `build.rs`), attaches its programs and owns its maps.
//!
//! - [`FastPath`]: the sockmap engine's kernel half. [`FastPath::insert_pair`] puts both sockets of
//!   a relayed connection in `SLUICE_SOCKS` and records each one's peer; from then on the
//!   `sluice_verdict` program moves their bytes inside the kernel. User space keeps the sockets
//!   open, watches for POLLRDHUP/POLLERR, and calls [`FastPath::remove_pair`] before closing.
//! - [`XdpDeny`]: the XDP program that drops SYNs of denied clients to the relay's own ports
//!   ([`XdpDeny::set_ports`]) before they cost a socket.
//!
//! What the kernel does *not* do for the fast path (measured by `tests/src/tests/ebpf.rs`):
//! - bytes already queued on a socket when it is inserted are not redirected; a later byte moves
//!   them only if the receive window is still open, otherwise the pair stalls for good. After
//!   [`FastPath::insert_pair`] the engine [`kick`]s both sockets (one non-blocking read each,
//!   which makes the kernel run the verdict over the queue) and forwards whatever a read returns;
//! - a FIN is dropped by the verdict (a zero-length skb), never forwarded: the engine sees
//!   POLLRDHUP and shuts the peer's write side once every byte has been delivered;
//! - an skb user space has partly read (a PROXY header consumed off the front) goes to the
//!   verdict whole, so the read bytes would be sent again: the engine moves everything queued on
//!   such a socket itself before inserting it (`proxy_protocol::headers_relayed::sockmap`).
//!
//! Maps are private to one [`FastPath`]/[`XdpDeny`] unless loaded with a pin directory (normally
//! [`PIN_DIR`]), where a restarted daemon and `sluicectl` find the same maps. All errors here are
//! local (this host's kernel or capabilities), never a client's or an upstream's.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read as _};
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{
    Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, RingBuf, SockHash,
};
use aya::programs::{ProgramError, SkSkb, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};
use sluice_common::{FLOW_STATS_SLOT, HeldEvent, Peer, XDP_STATS_SLOT, admission, fast_path};
use socket2::SockRef;

use crate::cidr::Cidr;

pub use sluice_common::{ConnCounters, Cookie, FlowStats, PIN_DIR, RuleId, XdpStats};

/// Every map of the object: pinning one pins all, so every loader of a pin directory shares them.
const ALL_MAPS: [&str; 9] = [
    fast_path::SOCKS,
    fast_path::PEERS,
    fast_path::COUNTERS,
    fast_path::HELD,
    fast_path::FLOW,
    admission::DENY_V4,
    admission::DENY_V6,
    admission::XDP_STATS,
    admission::PORTS,
];

/// Why the eBPF side could not do what was asked. Always local: the kernel refused, a capability
/// is missing, or the object does not match this code.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("cannot load the eBPF object (needs root, or CAP_BPF and CAP_NET_ADMIN): {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no map {0} of the expected type: {1}")]
    MissingMap(&'static str, #[source] Box<MapError>),
    #[error("the eBPF object has no program {0} of the expected type")]
    MissingProgram(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("cannot read the socket cookie: {0}")]
    Cookie(#[source] io::Error),
    #[error("this fast path only observes pinned maps; the process that attached inserts")]
    NotAttached,
    #[error("the supervisor handed this worker no fast-path maps")]
    NoMaps,
    #[error("a socket cannot be its own peer")]
    SamePeer,
    #[error("cannot create the pin directory (it must be on a bpffs): {0}")]
    PinDir(#[source] io::Error),
    #[error(
        "this binary was built without its eBPF programs (`cargo xtask build-ebpf` had not run \
         before `cargo build`): the sockmap engine, XDP deny and `sluicectl load` need a build \
         that has them"
    )]
    NotBuilt,
    #[error("invalid cidr: {0}")]
    Cidr(#[from] crate::cidr::CidrError),
    #[error(
        "kernel {release} is older than {major}.{minor}, the oldest the sockmap fast path is \
         proven on (Debian 12's 6.1 sent relayed bytes twice under memory pressure); \
         {env}=1 uses it anyway",
        major = PROVEN_SINCE.0,
        minor = PROVEN_SINCE.1,
        env = ENV_ANY_KERNEL
    )]
    KernelUnproven { release: String },
    #[error("cannot pin {name}: {message}")]
    Pin { name: &'static str, message: String },
    #[error(
        "the pin directory {dir} is from an older Sluice (no {missing}): run `sluicectl load --pin-dir {dir}` again to add what is missing"
    )]
    OldPins { dir: String, missing: String },
}

type Result<T, E = EbpfError> = std::result::Result<T, E>;

/// The object built by `cargo xtask build-ebpf`, 8-byte aligned as the ELF parser needs.
fn object() -> &'static [u8] {
    include_bytes_aligned!(env!("SLUICE_EBPF_OBJECT"))
}

/// Loads the object: maps are created (or, with `pin_dir`, opened from or pinned to it); programs
/// are not yet loaded into the kernel.
fn load_object(pin_dir: Option<&Path>) -> Result<Ebpf> {
    load_object_with(pin_dir, fast_path::HELD_BYTES)
}

/// [`load_object`] with a flow-control event ring of `held_bytes` (a new ring only: a pinned one
/// keeps its size).
fn load_object_with(pin_dir: Option<&Path>, held_bytes: u32) -> Result<Ebpf> {
    if object().is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    let mut loader = EbpfLoader::new();
    if held_bytes != fast_path::HELD_BYTES {
        loader.map_max_entries(fast_path::HELD, held_bytes);
    }
    if let Some(dir) = pin_dir {
        std::fs::create_dir_all(dir).map_err(EbpfError::PinDir)?;
        for name in ALL_MAPS {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    loader
        .load(object())
        .map_err(|e| EbpfError::Load(Box::new(e)))
}

/// Takes map `name` out of `ebpf` as the typed map `M`.
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(
        name,
        Box::new(MapError::InvalidName { name: name.into() }),
    ))?;
    M::try_from(map).map_err(|e| EbpfError::MissingMap(name, Box::new(e)))
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map {
        name,
        source: Box::new(source),
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> EbpfError {
    move |source| EbpfError::Program {
        name,
        source: Box::new(source),
    }
}

/// Whether a map operation failed only because the key was not there.
fn is_not_found(err: &MapError) -> bool {
    match err {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The socket's cookie (`SO_COOKIE`): the key the verdict program sees for its skbs.
pub(crate) fn socket_cookie(socket: BorrowedFd<'_>) -> Result<Cookie> {
    SockRef::from(&socket).cookie().map_err(EbpfError::Cookie)
}

/// What [`kick`] found on a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    /// Nothing for user space: the queue was empty, or the kernel redirected it to the peer.
    Empty,
    /// `n` bytes the kernel left to this socket (they arrived before its peer was inserted): the
    /// caller forwards `buf[..n]` to the peer itself, then kicks again.
    Data(usize),
    /// The socket's client or upstream closed its write side before the pair was inserted.
    Eof,
}

/// The kick every socket needs right after [`FastPath::insert_pair`]: one non-blocking read.
///
/// Bytes that were queued on a socket before it entered the sockmap are not redirected by
/// themselves, and when they fill the receive window no later byte arrives to move them, so the
/// connection stalls. A read makes the kernel run the verdict over the queue (it then returns
/// [`Kick::Empty`]); bytes the verdict passed to the socket itself come back as [`Kick::Data`].
/// The socket's blocking mode is restored before returning.
pub fn kick(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Kick> {
    let sock = SockRef::from(&socket);
    let was_nonblocking = sock.nonblocking()?;
    if !was_nonblocking {
        sock.set_nonblocking(true)?;
    }
    let read = (&*sock).read(buf);
    if !was_nonblocking {
        sock.set_nonblocking(false)?;
    }
    match read {
        Ok(0) => Ok(Kick::Eof),
        Ok(n) => Ok(Kick::Data(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Kick::Empty),
        Err(e) => Err(e),
    }
}

/// How many entries each fast-path map holds (a gauge for metrics; all zero when idle).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Sockets in `SLUICE_SOCKS` (the kernel removes a socket from it when the socket closes).
    pub sockets: usize,
    /// Entries in `SLUICE_PEERS`.
    pub peers: usize,
    /// Entries in `SLUICE_COUNTERS`.
    pub counters: usize,
}

/// The sockmap fast path: `sluice_verdict` attached to `SLUICE_SOCKS`, plus the peer and counter
/// maps. Dropping it detaches the program; sockets still in the map then fall back to their own
/// receive queues.
pub struct FastPath {
    socks: SockHash<MapData, Cookie>,
    peers: HashMap<MapData, Cookie, Peer>,
    counters: HashMap<MapData, Cookie, ConnCounters>,
    /// Flow-control totals of every socket ([`FlowStats`]).
    flow: Array<MapData, FlowStats>,
    /// Whether the verdict is attached to `socks` (by this value, or by the process that handed
    /// the maps over): only then may sockets be inserted.
    attached: bool,
    /// [`Peer::owner`] of the pairs this value inserts.
    owner: u32,
    /// The verdict's flow-control events (None: maps handed over by fd; the process that
    /// attached the verdict reads them).
    held: Option<HeldRing>,
    /// Owns the loaded program and its attachment to `socks` (None: maps handed over by fd).
    _ebpf: Option<Ebpf>,
}

impl fmt::Debug for FastPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastPath").finish_non_exhaustive()
    }
}

/// The oldest kernel series the sockmap fast path is proven on: the VM suite (`cargo xtask vm`)
/// passes on Debian's 6.12 backports kernel. On Debian 12's own 6.1 (6.1.192) the 2000-connection
/// echo, with the guest's TCP memory under pressure, now and then delivered a connection's last
/// bytes twice (every one of them moved by the kernel: no byte went through user space), which
/// splice, copy and epoll never did on the same run; 6.1 has the upstream fix for duplicated
/// data transmission, so the cause is elsewhere in its sockmap backports.
///
/// Every kernel since (6.12, 6.18) shares one defect that may be that cause: a segment the peer
/// sent again that overlaps bytes already received is queued whole, and `tcp_read_skb` hands it
/// to the verdict whole, so the overlap is redirected twice. The engine detects it and resets
/// such a connection (`fast_path_duplicated_bytes`; `Worker::fast_duplicated` in the uring
/// engine).
pub(crate) const PROVEN_SINCE: (u32, u32) = (6, 12);

/// Set to `1` to use the sockmap fast path on a kernel older than [`PROVEN_SINCE`] (tests of the
/// kernel itself, or an operator who checked their kernel).
pub(crate) const ENV_ANY_KERNEL: &str = "SLUICE_SOCKMAP_ANY_KERNEL";

/// Whether this kernel is one the fast path is proven on (see [`PROVEN_SINCE`]); the daemon
/// and `doctor` ask this before loading, and splice instead when it says no. A release that
/// cannot be read or parsed is let through: the load then says what the kernel refuses.
pub(crate) fn kernel_proven() -> Result<()> {
    if std::env::var(ENV_ANY_KERNEL).is_ok_and(|v| v == "1") {
        return Ok(());
    }
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return Ok(());
    };
    let release = release.trim();
    match parse_release(release) {
        Some(v) if v < PROVEN_SINCE => Err(EbpfError::KernelUnproven {
            release: release.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// `6.1.0-57-cloud-amd64` → (6, 1).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

impl FastPath {
    /// Loads the object with maps private to this value and attaches the stream verdict.
    pub fn load() -> Result<Self> {
        Self::load_from(None)
    }

    /// Like [`FastPath::load`], but with the maps pinned under `dir` (created and pinned the first
    /// time, opened after that), so a restarted daemon and `sluicectl` see the same entries.
    ///
    /// One process per `dir` loads this way (the daemon): attaching replaces the verdict on the
    /// shared sockmap for sockets inserted later, and dropping the value detaches it. Observers use
    /// [`FastPath::open_pinned`].
    pub fn load_pinned(dir: &Path) -> Result<Self> {
        Self::load_from(Some(dir))
    }

    /// Opens the maps pinned under `dir` without loading or attaching anything: for observers
    /// (`sluicectl stats`, tests) that read counters or remove pairs. [`FastPath::insert_pair`]
    /// refuses on such a value, since only the attaching process should put sockets in the map.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        check_pins(dir)?;
        let mut ebpf = load_object(Some(dir))?;
        Ok(Self {
            socks: take_map(&mut ebpf, fast_path::SOCKS)?,
            peers: take_map(&mut ebpf, fast_path::PEERS)?,
            counters: take_map(&mut ebpf, fast_path::COUNTERS)?,
            flow: take_map(&mut ebpf, fast_path::FLOW)?,
            attached: false,
            owner: Peer::PRIVATE,
            held: None,
            _ebpf: Some(ebpf),
        })
    }

    /// The maps' fds (sockets, peers, counters, flow totals), to hand to the worker processes
    /// that share these maps ([`FastPath::from_fds`]).
    pub(crate) fn map_fds(&self) -> [BorrowedFd<'_>; MAP_FDS] {
        [
            self.socks.fd().as_fd(),
            self.peers.map().fd().as_fd(),
            self.counters.map().fd().as_fd(),
            self.flow.map().fd().as_fd(),
        ]
    }

    /// The maps another process loaded and attached the verdict to (the supervisor, for its
    /// workers: maps of its own or pinned by `sluicectl load`), from their fds in
    /// [`FastPath::map_fds`] order. Needs no capability: the kernel checks map access against
    /// the fd. Pairs this value inserts carry `owner`, so [`FastPath::purge_owner`] can clear
    /// them if this process dies.
    pub(crate) fn from_fds(
        [socks, peers, counters, flow]: [OwnedFd; MAP_FDS],
        owner: u32,
    ) -> Result<Self> {
        fn typed<M: TryFrom<Map, Error = MapError>>(fd: OwnedFd, name: &'static str) -> Result<M> {
            let data = MapData::from_fd(fd).map_err(map_err(name))?;
            let map = Map::from_map_data(data).map_err(map_err(name))?;
            M::try_from(map).map_err(map_err(name))
        }
        Ok(Self {
            socks: typed(socks, fast_path::SOCKS)?,
            peers: typed(peers, fast_path::PEERS)?,
            counters: typed(counters, fast_path::COUNTERS)?,
            flow: typed(flow, fast_path::FLOW)?,
            attached: true,
            owner,
            held: None,
            _ebpf: None,
        })
    }

    /// The fd to poll for flow-control events (readable when [`FastPath::held_events`] has some),
    /// if this value attached the verdict.
    pub(crate) fn held_fd(&self) -> Option<BorrowedFd<'_>> {
        self.held.as_ref().map(|r| r.0.as_fd())
    }

    /// Moves the flow-control events waiting in the ring to `out`.
    pub fn held_events(&mut self, out: &mut Vec<HeldEvent>) {
        if let Some(ring) = self.held.as_mut() {
            ring.drain(out);
        }
    }

    /// Takes the event ring out (a process that shares its maps with workers reads it on a
    /// thread of its own and tells each event's owner).
    pub(crate) fn take_held_ring(&mut self) -> Option<HeldRing> {
        self.held.take()
    }

    /// Whether these maps are shared with other processes (handed over by fd).
    pub(crate) fn is_shared(&self) -> bool {
        self.owner != Peer::PRIVATE
    }

    /// [`FastPath::load`] with a flow-control event ring of `bytes` (a power of two, at least a
    /// page) instead of [`fast_path::HELD_BYTES`]: tests fill a small one to see what the
    /// verdict does when the ring has no room.
    pub fn load_with_ring(bytes: u32) -> Result<Self> {
        Self::load_inner(None, bytes)
    }

    /// The ring size the daemon's loader uses: [`fast_path::HELD_BYTES`], or the value of
    /// `SLUICE_HELD_RING_BYTES` (a diagnostic knob: the integration tests shrink the ring to
    /// check what happens when it is full). A value that is not a power of two of at least 4096
    /// is ignored.
    pub(crate) fn ring_bytes_from_env() -> u32 {
        std::env::var("SLUICE_HELD_RING_BYTES")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|b| b.is_power_of_two() && *b >= 4096)
            .unwrap_or(fast_path::HELD_BYTES)
    }

    fn load_from(pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_inner(pin_dir, Self::ring_bytes_from_env())
    }

    fn load_inner(pin_dir: Option<&Path>, held_bytes: u32) -> Result<Self> {
        if let Some(dir) = pin_dir {
            check_pins(dir)?;
        }
        let mut ebpf = load_object_with(pin_dir, held_bytes)?;
        let socks: SockHash<MapData, Cookie> = take_map(&mut ebpf, fast_path::SOCKS)?;
        let peers = take_map(&mut ebpf, fast_path::PEERS)?;
        let counters = take_map(&mut ebpf, fast_path::COUNTERS)?;
        let flow = take_map(&mut ebpf, fast_path::FLOW)?;
        let held = take_map(&mut ebpf, fast_path::HELD)?;
        let name = fast_path::PROG_VERDICT;
        let prog: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()
            .map_err(|_| EbpfError::MissingProgram(name))?;
        prog.load().map_err(prog_err(name))?;
        prog.attach(socks.fd()).map_err(prog_err(name))?;
        Ok(Self {
            socks,
            peers,
            counters,
            flow,
            attached: true,
            owner: Peer::PRIVATE,
            held: Some(HeldRing(held)),
            _ebpf: Some(ebpf),
        })
    }

    /// Puts both sockets of a relayed connection on the fast path: bytes arriving on `client` leave
    /// through `upstream` and the other way round. Returns their cookies (client, upstream), the
    /// handle for [`FastPath::counters`] and [`FastPath::remove_pair`].
    ///
    /// Peers and counters are recorded before either socket enters the sockmap, so the verdict
    /// never sees a socket without its peer. Bytes already queued on either socket are not moved:
    /// the caller [`kick`]s both sockets afterwards. On error nothing stays inserted.
    pub fn insert_pair(
        &mut self,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
    ) -> Result<(Cookie, Cookie)> {
        self.insert_pair_with(client, upstream, u64::MAX, u64::MAX)
    }

    /// [`FastPath::insert_pair`] with flow control: each socket's verdict redirects at most
    /// `allow` bytes before user space must move it on ([`FastPath::set_flow`]), and says so
    /// when it passes `warn_at`.
    pub fn insert_pair_with(
        &mut self,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
        allow: u64,
        warn_at: u64,
    ) -> Result<(Cookie, Cookie)> {
        self.insert_pair_flows(client, upstream, [(allow, warn_at); 2])
    }

    /// [`FastPath::insert_pair_with`] with an `(allow, warn_at)` per socket: `flows[0]` for the
    /// bytes arriving on `client` (client to upstream), `flows[1]` for those on `upstream`.
    pub(crate) fn insert_pair_flows(
        &mut self,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
        flows: [(u64, u64); 2],
    ) -> Result<(Cookie, Cookie)> {
        if !self.attached {
            return Err(EbpfError::NotAttached);
        }
        let c = socket_cookie(client)?;
        let u = socket_cookie(upstream)?;
        if c == u {
            return Err(EbpfError::SamePeer);
        }
        let inserted = self.try_insert(c, client, u, upstream, flows);
        if let Err(err) = inserted {
            // Best effort: the first error is the one worth reporting.
            let _ = self.remove_pair((c, u));
            return Err(err);
        }
        Ok((c, u))
    }

    fn try_insert(
        &mut self,
        c: Cookie,
        client: BorrowedFd<'_>,
        u: Cookie,
        upstream: BorrowedFd<'_>,
        [(c_allow, c_warn), (u_allow, u_warn)]: [(u64, u64); 2],
    ) -> Result<()> {
        let zero = ConnCounters::default();
        for cookie in [c, u] {
            self.counters
                .insert(cookie, zero, 0)
                .map_err(map_err(fast_path::COUNTERS))?;
        }
        let peer = |cookie, allow, warn_at| Peer {
            cookie,
            owner: self.owner,
            reserved: 0,
            allow,
            released: 0,
            warn_at,
        };
        self.peers
            .insert(c, peer(u, c_allow, c_warn), 0)
            .map_err(map_err(fast_path::PEERS))?;
        self.peers
            .insert(u, peer(c, u_allow, u_warn), 0)
            .map_err(map_err(fast_path::PEERS))?;
        self.socks
            .insert(c, client.as_fd(), 0)
            .map_err(map_err(fast_path::SOCKS))?;
        self.socks
            .insert(u, upstream.as_fd(), 0)
            .map_err(map_err(fast_path::SOCKS))?;
        Ok(())
    }

    /// Takes a pair off the fast path and returns its final counters (client, upstream); entries
    /// already gone (a closed socket leaves the sockmap by itself) are not an error. Peers go
    /// first, so an skb in flight is passed to its own socket rather than redirected into a
    /// socket that is leaving.
    pub fn remove_pair(
        &mut self,
        (c, u): (Cookie, Cookie),
    ) -> Result<(ConnCounters, ConnCounters)> {
        let mut first_err = None;
        let mut keep = |r: std::result::Result<(), MapError>, name: &'static str| {
            if let Err(e) = r
                && !is_not_found(&e)
                && first_err.is_none()
            {
                first_err = Some(map_err(name)(e));
            }
        };
        keep(self.peers.remove(&c), fast_path::PEERS);
        keep(self.peers.remove(&u), fast_path::PEERS);
        keep(self.socks.remove(&c), fast_path::SOCKS);
        keep(self.socks.remove(&u), fast_path::SOCKS);
        let totals = (
            self.counters(c)?.unwrap_or_default(),
            self.counters(u)?.unwrap_or_default(),
        );
        keep(self.counters.remove(&c), fast_path::COUNTERS);
        keep(self.counters.remove(&u), fast_path::COUNTERS);
        match first_err {
            Some(err) => Err(err),
            None => Ok(totals),
        }
    }

    /// What the verdict did with the bytes that arrived on socket `cookie` so far, or `None` if
    /// the socket is not (or no longer) on the fast path.
    pub fn counters(&self, cookie: Cookie) -> Result<Option<ConnCounters>> {
        match self.counters.get(&cookie, 0) {
            Ok(c) => Ok(Some(c)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(fast_path::COUNTERS)(e)),
        }
    }

    /// Flow control of socket `cookie` (see [`Peer::allow`]): the verdict may redirect until its
    /// `bytes` counter reaches `allow`, and user space has taken every held byte up to
    /// `released` (a value of its `held` counter).
    pub fn set_flow(
        &mut self,
        cookie: Cookie,
        allow: u64,
        warn_at: u64,
        released: u64,
    ) -> Result<()> {
        let mut peer = self
            .peers
            .get(&cookie, 0)
            .map_err(map_err(fast_path::PEERS))?;
        peer.allow = allow;
        peer.warn_at = warn_at;
        peer.released = released;
        // Replaces the whole value at once: the verdict reads either the old one or this one.
        self.peers
            .insert(cookie, peer, 0)
            .map_err(map_err(fast_path::PEERS))
    }

    /// Flow-control totals over every socket of these maps (holds, and holds the event ring had
    /// no room to announce).
    pub fn flow_stats(&self) -> Result<FlowStats> {
        self.flow
            .get(&FLOW_STATS_SLOT, 0)
            .map_err(map_err(fast_path::FLOW))
    }

    /// Takes every pair `owner` inserted off the fast path (a dead worker's, with shared maps:
    /// its sockets left the sockmap when they closed, its peer and counter entries did not).
    /// Returns how many sockets' entries were removed.
    pub(crate) fn purge_owner(&mut self, owner: u32) -> Result<usize> {
        let mut keys = Vec::new();
        for entry in self.peers.iter() {
            let (cookie, peer) = entry.map_err(map_err(fast_path::PEERS))?;
            if peer.owner == owner {
                keys.push(cookie);
            }
        }
        for cookie in &keys {
            for r in [
                self.peers.remove(cookie),
                self.socks.remove(cookie),
                self.counters.remove(cookie),
            ] {
                if let Err(e) = r
                    && !is_not_found(&e)
                {
                    return Err(map_err(fast_path::PEERS)(e));
                }
            }
        }
        Ok(keys.len())
    }

    /// Peer entries of the pairs this value inserted (walks the map): with shared maps, the
    /// entries another worker holds are not this worker's leak.
    pub(crate) fn owned_peers(&self) -> Result<usize> {
        let mut n = 0;
        for entry in self.peers.iter() {
            let (_, peer) = entry.map_err(map_err(fast_path::PEERS))?;
            n += usize::from(peer.owner == self.owner);
        }
        Ok(n)
    }

    /// Counts the entries of every fast-path map (walks them: for metrics and tests, not the
    /// hot path). There is no per-socket lookup in `SLUICE_SOCKS`: the kernel only answers it for
    /// 8-byte values, and aya-ebpf's `SockHash` has 4-byte ones (ENOSPC).
    pub fn occupancy(&self) -> Result<Occupancy> {
        fn count<K: aya::Pod>(
            keys: impl Iterator<Item = std::result::Result<K, MapError>>,
            name: &'static str,
        ) -> Result<usize> {
            let mut n = 0;
            for key in keys {
                key.map_err(map_err(name))?;
                n += 1;
            }
            Ok(n)
        }
        Ok(Occupancy {
            sockets: count(self.socks.keys(), fast_path::SOCKS)?,
            peers: count(self.peers.keys(), fast_path::PEERS)?,
            counters: count(self.counters.keys(), fast_path::COUNTERS)?,
        })
    }
}

/// The verdict's flow-control events ([`fast_path::HELD`]): each names a socket whose verdict
/// started holding bytes for user space.
pub(crate) struct HeldRing(RingBuf<MapData>);

impl HeldRing {
    /// Readable (POLLIN) when events wait.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Moves the waiting events to `out`.
    pub(crate) fn drain(&mut self, out: &mut Vec<HeldEvent>) {
        while let Some(item) = self.0.next() {
            // A `#[repr(C)]` HeldEvent in the host's byte order: cookie (8 bytes), owner (4),
            // kind (4).
            if let (Some(cookie), Some(owner), Some(kind)) =
                (item.get(0..8), item.get(8..12), item.get(12..16))
            {
                out.push(HeldEvent {
                    cookie: u64::from_ne_bytes(cookie.try_into().expect("8 bytes")),
                    owner: u32::from_ne_bytes(owner.try_into().expect("4 bytes")),
                    kind: u32::from_ne_bytes(kind.try_into().expect("4 bytes")),
                });
            }
        }
    }
}

/// Maps an older `sluicectl load` pinned that this object no longer has (no program ever read
/// them: the client and destination allowlists are checked in user space); `sluicectl unload`
/// still removes their pins.
const RETIRED_MAPS: [&str; 3] = ["SLUICE_ALLOW_V4", "SLUICE_ALLOW_V6", "SLUICE_DESTS"];

/// How many map fds [`FastPath::map_fds`] hands to a worker.
pub(crate) const MAP_FDS: usize = 4;

const ALL_PROGRAMS: [&str; 2] = [fast_path::PROG_VERDICT, admission::PROG_XDP_DENY];

/// Where bpffs is mounted on every distribution; [`pin_all`] mounts it there when missing.
pub(crate) const BPFFS: &str = "/sys/fs/bpf";

/// `sluicectl load`: mounts bpffs at [`BPFFS`] when `dir` is under it and nothing is mounted
/// there, then loads the object with every map pinned under `dir` (created, or reused when
/// already pinned) and loads and pins each program there too (not attached: the daemon
/// attaches its own instances to the pinned maps). Returns the names pinned.
pub fn pin_all(dir: &Path) -> Result<Vec<&'static str>> {
    let bpffs = Path::new(BPFFS);
    if dir.starts_with(bpffs) && !crate::sys::is_bpffs(bpffs) {
        crate::sys::mount_bpffs(bpffs).map_err(EbpfError::PinDir)?;
    }
    let mut ebpf = load_object(Some(dir))?;
    let mut pinned: Vec<&'static str> = ALL_MAPS.to_vec();
    for name in ALL_PROGRAMS {
        let path = dir.join(name);
        if !path.exists() {
            let prog = ebpf
                .program_mut(name)
                .ok_or(EbpfError::MissingProgram(name))?;
            match prog {
                aya::programs::Program::SkSkb(p) => p.load().map_err(prog_err(name))?,
                aya::programs::Program::Xdp(p) => p.load().map_err(prog_err(name))?,
                _ => return Err(EbpfError::MissingProgram(name)),
            }
            prog.pin(&path).map_err(|e| EbpfError::Pin {
                name,
                message: e.to_string(),
            })?;
        }
        pinned.push(name);
    }
    Ok(pinned)
}

/// `sluicectl unload`: removes every pin [`pin_all`] made under `dir`, then `dir` if empty.
/// Returns the names removed. Programs and maps still in use (an attached daemon) live on
/// until their last user closes them.
pub fn unpin_all(dir: &Path) -> Result<Vec<&'static str>> {
    let mut removed = Vec::new();
    for name in ALL_MAPS
        .iter()
        .chain(ALL_PROGRAMS.iter())
        .chain(RETIRED_MAPS.iter())
    {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed.push(*name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(EbpfError::PinDir(e)),
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// Whether `sluicectl load` pinned the maps under `dir`: every map of this object is there.
/// A directory with only some of them ([`check_pins`] names what is missing) is not.
pub(crate) fn is_pinned(dir: &Path) -> bool {
    ALL_MAPS.iter().all(|m| dir.join(m).exists())
}

/// Refuses a pin directory an older `sluicectl load` made: some maps of this object are pinned
/// there, others (added since) are not. Loading it as is would pin the missing maps in passing,
/// next to maps another daemon may still use; `sluicectl load` adds them deliberately (the
/// layouts of maps already pinned do not change; a change would be refused by the kernel's
/// verifier or by the size checks of the typed maps). An empty or absent directory is fine.
pub(crate) fn check_pins(dir: &Path) -> Result<()> {
    let missing: Vec<&str> = ALL_MAPS
        .iter()
        .copied()
        .filter(|m| !dir.join(m).exists())
        .collect();
    if missing.is_empty() || missing.len() == ALL_MAPS.len() {
        return Ok(());
    }
    Err(EbpfError::OldPins {
        dir: dir.display().to_string(),
        missing: missing.join(", "),
    })
}

/// `sluice_xdp_deny` attached to one interface, with the deny tries and the port map it reads
/// (or, from [`XdpDeny::open_pinned`], only the pinned maps). Dropping it detaches the program.
/// It drops nothing until [`XdpDeny::set_ports`] names the relay's ports.
pub struct XdpDeny {
    deny_v4: LpmTrie<MapData, [u8; 4], RuleId>,
    deny_v6: LpmTrie<MapData, [u8; 16], RuleId>,
    ports: HashMap<MapData, [u8; 2], u8>,
    stats: PerCpuArray<MapData, XdpStats>,
    /// Owns the loaded program and its link to the interface.
    _ebpf: Ebpf,
}

impl fmt::Debug for XdpDeny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpDeny").finish_non_exhaustive()
    }
}

impl XdpDeny {
    /// Loads the object with private maps and attaches the XDP program to `ifname` (native mode
    /// where the driver has it, generic otherwise).
    pub fn attach(ifname: &str) -> Result<Self> {
        Self::attach_from(ifname, None)
    }

    /// Like [`XdpDeny::attach`], with the maps pinned under `dir` (see [`FastPath::load_pinned`]).
    pub(crate) fn attach_pinned(ifname: &str, dir: &Path) -> Result<Self> {
        Self::attach_from(ifname, Some(dir))
    }

    /// Opens the deny tries pinned under `dir` without attaching anything, for `sluicectl deny`:
    /// changes apply at once to the XDP program the daemon attached.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        check_pins(dir)?;
        let mut ebpf = load_object(Some(dir))?;
        Ok(Self {
            deny_v4: take_map(&mut ebpf, admission::DENY_V4)?,
            deny_v6: take_map(&mut ebpf, admission::DENY_V6)?,
            ports: take_map(&mut ebpf, admission::PORTS)?,
            stats: take_map(&mut ebpf, admission::XDP_STATS)?,
            _ebpf: ebpf,
        })
    }

    fn attach_from(ifname: &str, pin_dir: Option<&Path>) -> Result<Self> {
        if let Some(dir) = pin_dir {
            check_pins(dir)?;
        }
        let mut ebpf = load_object(pin_dir)?;
        let deny_v4 = take_map(&mut ebpf, admission::DENY_V4)?;
        let deny_v6 = take_map(&mut ebpf, admission::DENY_V6)?;
        let ports = take_map(&mut ebpf, admission::PORTS)?;
        let stats = take_map(&mut ebpf, admission::XDP_STATS)?;
        let name = admission::PROG_XDP_DENY;
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()
            .map_err(|_| EbpfError::MissingProgram(name))?;
        prog.load().map_err(prog_err(name))?;
        prog.attach(ifname, XdpMode::Default)
            .map_err(prog_err(name))?;
        Ok(Self {
            deny_v4,
            deny_v6,
            ports,
            stats,
            _ebpf: ebpf,
        })
    }

    /// Makes the port map hold exactly `ports` (the relay's listening ports, both families):
    /// only SYNs to them are ever dropped. Ports left out are removed first, so a port that stays
    /// is never missing in between.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<()> {
        let want: HashSet<u16> = ports.iter().copied().collect();
        for port in self.ports()? {
            if !want.contains(&port) {
                match self.ports.remove(&port.to_be_bytes()) {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(map_err(admission::PORTS)(e)),
                }
            }
        }
        for port in want {
            self.ports
                .insert(port.to_be_bytes(), 1, 0)
                .map_err(map_err(admission::PORTS))?;
        }
        Ok(())
    }

    /// The ports whose SYNs the program inspects, in ascending order.
    pub fn ports(&self) -> Result<Vec<u16>> {
        let mut out = self
            .ports
            .keys()
            .map(|k| k.map(u16::from_be_bytes))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err(admission::PORTS))?;
        out.sort_unstable();
        Ok(out)
    }

    /// Drops SYNs from `cidr` from now on; connections already established are not touched.
    pub fn deny_add(&mut self, cidr: Cidr) -> Result<()> {
        self.deny_add_rule(cidr, 0)
    }

    /// [`XdpDeny::deny_add`] with the id of the config rule it comes from (for listing).
    pub(crate) fn deny_add_rule(&mut self, cidr: Cidr, rule: RuleId) -> Result<()> {
        let prefix_len = u32::from(cidr.prefix_len());
        match cidr.addr() {
            IpAddr::V4(a) => self
                .deny_v4
                .insert(&Key::new(prefix_len, a.octets()), rule, 0)
                .map_err(map_err(admission::DENY_V4)),
            IpAddr::V6(a) => self
                .deny_v6
                .insert(&Key::new(prefix_len, a.octets()), rule, 0)
                .map_err(map_err(admission::DENY_V6)),
        }
    }

    /// Stops dropping SYNs from exactly `cidr`; returns whether it was there.
    pub fn deny_remove(&mut self, cidr: Cidr) -> Result<bool> {
        let prefix_len = u32::from(cidr.prefix_len());
        let (removed, name) = match cidr.addr() {
            IpAddr::V4(a) => (
                self.deny_v4.remove(&Key::new(prefix_len, a.octets())),
                admission::DENY_V4,
            ),
            IpAddr::V6(a) => (
                self.deny_v6.remove(&Key::new(prefix_len, a.octets())),
                admission::DENY_V6,
            ),
        };
        match removed {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    /// Every denied range, IPv4 first (each listed once).
    pub fn deny_list(&self) -> Result<Vec<Cidr>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for key in self.deny_v4.keys() {
            let key = key.map_err(map_err(admission::DENY_V4))?;
            let cidr = Cidr::new(IpAddr::from(key.data()), key.prefix_len() as u8)?;
            if seen.insert(cidr) {
                out.push(cidr);
            }
        }
        for key in self.deny_v6.keys() {
            let key = key.map_err(map_err(admission::DENY_V6))?;
            let cidr = Cidr::new(IpAddr::from(key.data()), key.prefix_len() as u8)?;
            if seen.insert(cidr) {
                out.push(cidr);
            }
        }
        Ok(out)
    }

    /// SYNs seen and dropped so far, summed over CPUs.
    pub fn stats(&self) -> Result<XdpStats> {
        let per_cpu = self
            .stats
            .get(&XDP_STATS_SLOT, 0)
            .map_err(map_err(admission::XDP_STATS))?;
        Ok(per_cpu.iter().fold(XdpStats::default(), |sum, s| XdpStats {
            syns: sum.syns + s.syns,
            dropped_v4: sum.dropped_v4 + s.dropped_v4,
            dropped_v6: sum.dropped_v6 + s.dropped_v6,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::{PROVEN_SINCE, object, parse_release};

    /// A build without `cargo xtask build-ebpf` embeds an empty object (so `cargo check` works
    /// on a fresh clone); the suite refuses it, so a tested or packaged binary always has one.
    #[test]
    fn the_object_is_built_in() {
        let o = object();
        assert!(
            o.len() > 4 && o.starts_with(b"\x7fELF"),
            "the embedded eBPF object is missing or not ELF ({} bytes): run cargo xtask build-ebpf",
            o.len()
        );
    }

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(parse_release("6.1.0-57-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_release("6.12.95+deb12-cloud-amd64"), Some((6, 12)));
        assert_eq!(parse_release("6.18.0"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("garbage"), None);
        assert!(parse_release("6.1.0-57-cloud-amd64").unwrap() < PROVEN_SINCE);
        assert!(parse_release("6.12.95+deb12-cloud-amd64").unwrap() >= PROVEN_SINCE);
        assert!(parse_release("7.0.1").unwrap() >= PROVEN_SINCE);
    }
}
