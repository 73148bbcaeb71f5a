//! The contract between Sluice's eBPF programs (`ebpf/programs`) and the relay (`relay/src/ebpf.rs`).
//!
//! Everything a map holds is defined here once, `#[repr(C)]` with explicit fields: no `bool`, no
//! implicit padding (spare bytes are named `reserved` and must be zero), and a `const` assert on
//! every size so a layout change breaks the build instead of the verifier or, worse, the data.
//! Names of maps and programs and the pin directory live here too, grouped per feature.
//!
//! With the `user` feature the types implement `aya::Pod`, which the relay needs to read and write
//! them; the eBPF side builds this crate without it (`no_std`, no dependencies).
#![no_std]

use core::mem::size_of;

/// Where `sluicectl load` pins programs and maps, so a restarted daemon and `sluicectl` share them.
pub const PIN_DIR: &str = "/sys/fs/bpf/sluice";

/// A socket cookie (`SO_COOKIE`, `bpf_get_socket_cookie`): unique per socket for the boot, never 0.
pub type Cookie = u64;

/// The sockmap fast path: both sockets of a relayed connection sit in [`fast_path::SOCKS`]; the
/// stream verdict program redirects every skb that arrives on one of them to its [`Peer`].
pub mod fast_path {
    /// `SockHash<Cookie>`: every socket on the fast path, keyed by its own cookie.
    pub const SOCKS: &str = "SLUICE_SOCKS";
    /// `HashMap<Cookie, Peer>`: where bytes arriving on a socket go.
    pub const PEERS: &str = "SLUICE_PEERS";
    /// `HashMap<Cookie, ConnCounters>`: what the verdict program did with a socket's bytes.
    pub const COUNTERS: &str = "SLUICE_COUNTERS";
    /// `RingBuf` of [`crate::HeldEvent`]: the verdict tells user space that a socket's flow
    /// control started holding bytes (poll can not: a sockmap socket reads as always readable).
    pub const HELD: &str = "SLUICE_HELD";
    /// Bytes of [`HELD`] (a page multiple; thousands of events).
    pub const HELD_BYTES: u32 = 64 * 1024;
    /// `Array<FlowStats>` with one slot ([`crate::FLOW_STATS_SLOT`]): what the verdicts of every
    /// socket did with flow control, in particular the holds [`HELD`] had no room to announce
    /// (user space sweeps its sockets when that count moves).
    pub const FLOW: &str = "SLUICE_FLOW";
    /// The `sk_skb/stream_verdict` program, attached to [`SOCKS`].
    pub const PROG_VERDICT: &str = "sluice_verdict";
    /// Default capacity of each fast-path map (sockets, not connections: two per connection).
    pub const MAX_SOCKETS: u32 = 262_144;
}

/// The XDP deny filter: denied clients (LPM tries, one per address family) and the ports it
/// guards. (The client allowlist and the destination allowlist are checked by the workers in
/// user space; the maps `SLUICE_ALLOW_V4`, `SLUICE_ALLOW_V6` and `SLUICE_DESTS` that an older
/// `sluicectl load` pinned for them were never read by a program, and are gone.)
pub mod admission {
    /// `LpmTrie<[u8; 4], RuleId>`: IPv4 clients refused; the XDP program drops their SYNs.
    pub const DENY_V4: &str = "SLUICE_DENY_V4";
    /// `LpmTrie<[u8; 16], RuleId>`: IPv6 clients refused; the XDP program drops their SYNs.
    pub const DENY_V6: &str = "SLUICE_DENY_V6";
    /// `PerCpuArray<XdpStats>` with one slot ([`super::XDP_STATS_SLOT`]).
    pub const XDP_STATS: &str = "SLUICE_XDPSTATS";
    /// `HashMap<[u8; 2], u8>`: the relay's listening ports (network byte order; the value is
    /// 1). The XDP program drops only SYNs to these, so other services on the host (SSH) are
    /// never cut off by a deny rule.
    pub const PORTS: &str = "SLUICE_PORTS";
    /// The XDP program that drops TCP SYNs from denied clients before they cost a socket.
    pub const PROG_XDP_DENY: &str = "sluice_xdp_deny";
    /// Capacity of each client trie.
    pub const MAX_CLIENT_RULES: u32 = 65_536;
    /// Capacity of [`PORTS`] (a daemon has at most a few dozen listeners).
    pub const MAX_PORTS: u32 = 1_024;
}

/// The only slot of [`admission::XDP_STATS`].
pub const XDP_STATS_SLOT: u32 = 0;

/// The only slot of [`fast_path::FLOW`].
pub const FLOW_STATS_SLOT: u32 = 0;

/// Value of [`fast_path::PEERS`]: the socket that receives what arrives on the key's socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Cookie of the peer socket, a key of [`fast_path::SOCKS`].
    pub cookie: Cookie,
    /// The worker process (its index) that inserted the pair, so that with maps shared through
    /// pins the supervisor can clear a dead worker's entries; [`Peer::PRIVATE`] in maps only one
    /// process uses.
    pub owner: u32,
    pub reserved: u32,
    /// Flow control, written by user space only. The verdict redirects an skb of the key's socket
    /// only while `ConnCounters::bytes` (redirected so far) plus its length stays within
    /// `allow`, and every byte it ever left on the socket (`ConnCounters::held`) was taken by
    /// user space (`released` equals it). Otherwise it leaves the skb on the socket (charged to
    /// its receive buffer, so TCP's window closes when user space does not read): user space
    /// forwards those bytes in order once the peer caught up, then moves `allow` on.
    /// `u64::MAX` means no limit. User space keeps `allow` at most its bound past the bytes the
    /// peer has taken, so what the kernel queues for the peer (redirected, charged to no socket)
    /// stays within that bound; it may also lower `allow` at any time (holding is always safe:
    /// the held bytes wait on the socket, in order, for user space).
    pub allow: u64,
    /// `ConnCounters::held` as of the last time user space had taken every byte left on the
    /// socket.
    pub released: u64,
    /// When `ConnCounters::bytes` passes this, the verdict tells user space ([`HeldEvent::LOW`]),
    /// which moves `allow` on if the peer keeps up, so a fast stream is never held.
    pub warn_at: u64,
}

impl Peer {
    /// [`Peer::owner`] of an entry in maps private to one process.
    pub const PRIVATE: u32 = u32::MAX;
}

/// Value of [`fast_path::FLOW`]: flow-control totals over every socket of the maps, updated by
/// the verdict with atomic adds (it runs on every CPU at once).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Times a socket's verdict started holding bytes (its [`Peer::allow`] ran out).
    pub holds: u64,
    /// Of [`FlowStats::holds`], those [`fast_path::HELD`] had no room to announce. The socket
    /// holds all the same (every later skb of it is held behind, so order is kept); user space
    /// finds it by looking at its sockets' counters when this number moves. Incremented after
    /// the socket's `ConnCounters::held`, so a sweep that saw the new value sees the held bytes.
    pub unannounced: u64,
    /// [`HeldEvent::LOW`] events the ring had no room for (harmless: that direction is held at
    /// its `allow` instead of having it moved on early).
    pub lost_low: u64,
    pub reserved: u64,
}

/// Record of [`fast_path::HELD`]: socket `cookie` (inserted by worker `owner`) started holding
/// bytes for user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldEvent {
    pub cookie: Cookie,
    pub owner: u32,
    /// [`HeldEvent::HELD`] or [`HeldEvent::LOW`].
    pub kind: u32,
}

impl HeldEvent {
    /// The socket's verdict started holding bytes.
    pub const HELD: u32 = 0;
    /// The socket's redirected bytes passed [`Peer::warn_at`]: its allowance runs low.
    pub const LOW: u32 = 1;
}

/// Value of [`fast_path::COUNTERS`]: what the verdict program did with the skbs that arrived on
/// the key's socket. The relay creates the entry (zeroed) when it inserts the socket and removes it
/// with the socket; the program only adds, so a late skb cannot resurrect a removed entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCounters {
    /// Payload bytes redirected to the peer.
    pub bytes: u64,
    /// Skbs redirected to the peer.
    pub skbs: u64,
    /// Skbs left on the socket's own receive queue (no peer, or the peer left the sockmap): user
    /// space must read and forward them.
    pub passed_skbs: u64,
    /// Zero-length skbs (a FIN) dropped; user space sees the FIN as POLLRDHUP.
    pub empty_skbs: u64,
    /// CLOCK_MONOTONIC (ns, `bpf_ktime_get_ns`) of the first skb redirected; 0 = none yet. The
    /// upstream socket's is the connection's first upstream byte (for the histograms).
    pub first_ns: u64,
    /// Payload bytes left on the socket for user space (flow control held them, or the peer was
    /// gone), in all.
    pub held: u64,
}

/// Identifies the rule that put an entry in a deny map (for listing and per-rule
/// metrics); 0 when the caller has none.
pub type RuleId = u32;

/// Key of [`admission::DENY_V4`], byte for byte aya's LPM `Key<[u8; 4]>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientKeyV4 {
    /// Significant leading bits of `addr`, 0..=32.
    pub prefix_len: u32,
    /// Address in network byte order.
    pub addr: [u8; 4],
}

/// Key of [`admission::DENY_V6`], byte for byte aya's LPM `Key<[u8; 16]>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientKeyV6 {
    /// Significant leading bits of `addr`, 0..=128.
    pub prefix_len: u32,
    /// Address in network byte order.
    pub addr: [u8; 16],
}

/// Value of [`admission::XDP_STATS`] (per CPU): SYNs the XDP program saw and dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpStats {
    /// TCP SYNs (without ACK) to one of the relay's ports ([`admission::PORTS`]) inspected.
    pub syns: u64,
    /// SYNs dropped because the IPv4 source matched [`admission::DENY_V4`].
    pub dropped_v4: u64,
    /// SYNs dropped because the IPv6 source matched [`admission::DENY_V6`].
    pub dropped_v6: u64,
}

// Layouts are part of the contract with already-pinned maps: any change must be deliberate.
const _: () = assert!(size_of::<Cookie>() == 8);
const _: () = assert!(size_of::<Peer>() == 40);
const _: () = assert!(size_of::<HeldEvent>() == 16);
const _: () = assert!(size_of::<FlowStats>() == 32);
const _: () = assert!(size_of::<ConnCounters>() == 48);
const _: () = assert!(size_of::<ClientKeyV4>() == 8);
const _: () = assert!(size_of::<ClientKeyV6>() == 20);
const _: () = assert!(size_of::<XdpStats>() == 24);
const _: () = assert!(size_of::<RuleId>() == 4);

#[cfg(feature = "user")]
mod pod {
    //! `aya::Pod` for every map key and value: they are `#[repr(C)]`, `Copy`, and every bit
    //! pattern is valid (only integers and byte arrays, no padding), which is what `Pod` requires.
    use super::{ClientKeyV4, ClientKeyV6, ConnCounters, FlowStats, HeldEvent, Peer, XdpStats};

    // SAFETY: `#[repr(C)]` structs of integers and byte arrays without padding (the size asserts
    // above pin the layout); any bit pattern is a valid value.
    unsafe impl aya::Pod for Peer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HeldEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ClientKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ClientKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for XdpStats {}
}
