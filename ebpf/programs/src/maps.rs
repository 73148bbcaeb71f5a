//! Every map of the object, as `#[map]` statics named after the constants in `sluice-common`.
//!
//! Nothing is pinned here: the relay decides at load time (aya's `map_pin_path`) whether a map is
//! private to one process (tests) or shared under `sluice_common::PIN_DIR`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, SockHash, lpm_trie::Key},
};
use sluice_common::{
    ClientKeyV4, ClientKeyV6, ConnCounters, Cookie, FlowStats, Peer, RuleId, XdpStats,
    admission::{MAX_CLIENT_RULES, MAX_PORTS},
    fast_path::{HELD_BYTES, MAX_SOCKETS},
};

// The client tries are keyed by aya's `Key<[u8; N]>`; `sluice-common` documents the same layout.
const _: () = assert!(size_of::<Key<[u8; 4]>>() == size_of::<ClientKeyV4>());
const _: () = assert!(size_of::<Key<[u8; 16]>>() == size_of::<ClientKeyV6>());

/// Every socket on the fast path, keyed by its cookie.
#[map(name = "SLUICE_SOCKS")]
pub(crate) static SOCKS: SockHash<Cookie> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie -> the peer its bytes go to. Not preallocated: most slots stay empty.
#[map(name = "SLUICE_PEERS")]
pub(crate) static PEERS: HashMap<Cookie, Peer> =
    HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Socket cookie -> what the verdict program did with its bytes; the relay creates the entries.
#[map(name = "SLUICE_COUNTERS")]
pub(crate) static COUNTERS: HashMap<Cookie, ConnCounters> =
    HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Sockets whose flow control started holding bytes, for user space to forward them.
#[map(name = "SLUICE_HELD")]
pub(crate) static HELD: RingBuf = RingBuf::with_byte_size(HELD_BYTES, 0);

/// Flow-control totals over every socket, in slot `FLOW_STATS_SLOT` (one slot shared by all CPUs:
/// the verdict adds atomically).
#[map(name = "SLUICE_FLOW")]
pub(crate) static FLOW: Array<FlowStats> = Array::with_max_entries(1, 0);

/// IPv4 clients whose SYNs [`crate::xdp_deny`] drops.
#[map(name = "SLUICE_DENY_V4")]
pub(crate) static DENY_V4: LpmTrie<[u8; 4], RuleId> =
    LpmTrie::with_max_entries(MAX_CLIENT_RULES, 0);

/// IPv6 clients whose SYNs [`crate::xdp_deny`] drops.
#[map(name = "SLUICE_DENY_V6")]
pub(crate) static DENY_V6: LpmTrie<[u8; 16], RuleId> =
    LpmTrie::with_max_entries(MAX_CLIENT_RULES, 0);

/// The relay's listening ports (network byte order): [`crate::xdp_deny`] drops only SYNs to
/// these.
#[map(name = "SLUICE_PORTS")]
pub(crate) static PORTS: HashMap<[u8; 2], u8> = HashMap::with_max_entries(MAX_PORTS, 0);

/// What [`crate::xdp_deny`] saw and dropped, per CPU, in slot `XDP_STATS_SLOT`.
#[map(name = "SLUICE_XDPSTATS")]
pub(crate) static XDP_STATS: PerCpuArray<XdpStats> = PerCpuArray::with_max_entries(1, 0);
