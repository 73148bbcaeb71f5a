//! `sluice_verdict`, the `sk_skb/stream_verdict` program of the sockmap fast path.
//!
//! It runs for every skb that arrives on a socket in `SLUICE_SOCKS` and sends it out of the
//! socket's peer (egress redirect), so relayed bytes never reach user space. What it does:
//! - a zero-length skb (a FIN) gets `SK_DROP`: FIN is not forwarded; user space sees POLLRDHUP on
//!   the socket and shuts the peer's write side once every byte is delivered;
//! - no peer, or the peer already left the sockmap: `SK_PASS`, the bytes stay on the socket's own
//!   receive queue for user space (never dropped);
//! - flow control ([`sluice_common::Peer::allow`]): past the bytes user space allowed, or while
//!   bytes it left on the socket before are not all taken by user space, `SK_PASS` too: the skb
//!   stays on the socket, charged to its receive buffer, so the sender's window closes when the
//!   destination does not read (redirected skbs are charged to nobody while they wait for the
//!   peer's send buffer: without this, a destination that never reads lets the kernel queue
//!   without limit). Starting to hold is announced on the `SLUICE_HELD` ring; when the ring is
//!   full the skb is held all the same (never redirected past the bound), and counted in
//!   `SLUICE_FLOW`, where user space looks for holds it was not told of;
//! - every outcome is counted in `SLUICE_COUNTERS` if the relay created an entry for the socket.

use core::intrinsics::{AtomicOrdering, atomic_xadd};
use core::mem::offset_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::stream_verdict,
    programs::SkBuffContext,
};
use sluice_common::{ConnCounters, Cookie, FLOW_STATS_SLOT, FlowStats, HeldEvent};

use crate::maps::{COUNTERS, FLOW, HELD, PEERS, SOCKS};

#[stream_verdict]
pub fn sluice_verdict(ctx: SkBuffContext) -> u32 {
    match try_sluice_verdict(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_sluice_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    // SAFETY: `ctx.as_ptr()` is the `__sk_buff` the kernel passed this program; the helper only
    // reads the socket it belongs to.
    let cookie: Cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let counters = COUNTERS.get_ptr_mut(cookie);
    let len = ctx.len();
    if len == 0 {
        count(counters, offset_of!(ConnCounters, empty_skbs), 1);
        return Err(SK_DROP);
    }
    let Some(peer) = PEERS.get_ptr(cookie) else {
        return Ok(pass(counters, len));
    };
    // SAFETY: the pointer came from a successful lookup and map values stay valid for the whole
    // program run (RCU); `Peer` is plain old data, and the map is not preallocated, so a concurrent
    // delete or update (user space replaces the whole value) cannot make it alias another entry.
    let (mut peer_cookie, allow, released, owner, warn_at): (Cookie, u64, u64, u32, u64) = unsafe {
        (
            (*peer).cookie,
            (*peer).allow,
            (*peer).released,
            (*peer).owner,
            (*peer).warn_at,
        )
    };
    if let Some(c) = counters {
        // SAFETY: as in `count`: a live value of this socket, written only by its serialized runs.
        let (bytes, held) = unsafe { ((*c).bytes, (*c).held) };
        if held != released {
            // Already holding (user space was told, or finds it): in order behind the held bytes.
            return Ok(pass(counters, len));
        }
        if bytes.saturating_add(u64::from(len)) > allow {
            // The bound is reached: hold this skb, and with it every later one until user space
            // took them all (`held != released` above). `held` is counted before user space is
            // told, so the counters it reads on the event already show the held bytes.
            let verdict = pass(counters, len);
            flow_add(offset_of!(FlowStats, holds));
            let event = HeldEvent {
                cookie,
                owner,
                kind: HeldEvent::HELD,
            };
            if HELD.output::<HeldEvent>(&event, 0).is_err() {
                // The ring is full: hold all the same (redirecting would let the kernel queue
                // past the bound). User space learns of it from this count (it looks at its
                // sockets' counters when the count moves), not from an event.
                flow_add(offset_of!(FlowStats, unannounced));
            }
            return Ok(verdict);
        } else if bytes < warn_at && bytes.saturating_add(u64::from(len)) >= warn_at {
            // Half the allowance used: user space may move it on before it runs out (a lost
            // event only means this direction is held at `allow` instead).
            let event = HeldEvent {
                cookie,
                owner,
                kind: HeldEvent::LOW,
            };
            if HELD.output::<HeldEvent>(&event, 0).is_err() {
                flow_add(offset_of!(FlowStats, lost_low));
            }
        }
    }
    // Egress redirect (flags 0): the skb is sent out of the peer socket.
    let verdict = SOCKS.redirect_skb(ctx, &mut peer_cookie, 0);
    if verdict == i64::from(SK_PASS) {
        count(counters, offset_of!(ConnCounters, bytes), u64::from(len));
        count(counters, offset_of!(ConnCounters, skbs), 1);
        first_seen(counters);
        Ok(SK_PASS)
    } else {
        // The peer left the sockmap between the two lookups: keep the bytes here, user space
        // forwards them.
        Ok(pass(counters, len))
    }
}

/// Leaves the skb on its own socket for user space, counted as held.
#[inline(always)]
fn pass(counters: Option<*mut ConnCounters>, len: u32) -> u32 {
    count(counters, offset_of!(ConnCounters, passed_skbs), 1);
    count(counters, offset_of!(ConnCounters, held), u64::from(len));
    SK_PASS
}

/// Stamps `first_ns` with the time of the first redirected skb, if the entry exists and has none.
#[inline(always)]
fn first_seen(counters: Option<*mut ConnCounters>) {
    let Some(entry) = counters else { return };
    // SAFETY: `entry` came from a successful lookup and stays valid for this program run; only
    // this socket's serialized runs write it (see `count`).
    unsafe {
        if (*entry).first_ns == 0 {
            (*entry).first_ns = bpf_ktime_get_ns();
        }
    }
}

/// Adds `n` to one field of a counters entry, if the entry exists. A plain add is enough: an entry
/// belongs to one socket, and the kernel runs the verdict for a socket's skbs one at a time (the
/// TCP receive path holds the socket lock, or the bh lock with the socket not owned by a user).
#[inline(always)]
fn count(counters: Option<*mut ConnCounters>, field_offset: usize, n: u64) {
    let Some(entry) = counters else { return };
    // SAFETY: `entry` came from a successful map lookup and stays valid for this program run;
    // `field_offset` is an `offset_of!` into `ConnCounters`, so the result stays inside the value.
    let field = unsafe { entry.cast::<u8>().add(field_offset).cast::<u64>() };
    // SAFETY: `field` is an 8-byte aligned `u64` inside a live map value (ConnCounters is all
    // u64s, map values are 8-byte aligned), and only this socket's serialized runs write it.
    unsafe { *field += n };
}

/// Adds one to a field of the `SLUICE_FLOW` totals. Atomic: its one slot is shared by the
/// verdicts of every socket, running on every CPU at once.
#[inline(always)]
fn flow_add(field_offset: usize) {
    let Some(stats) = FLOW.get_ptr_mut(FLOW_STATS_SLOT) else {
        return;
    };
    // SAFETY: `stats` points at the array's only value, valid for the program run (array values
    // are never freed); `field_offset` is an `offset_of!` into `FlowStats` (all u64s, 8-byte
    // aligned in an 8-byte aligned map value), so the result is an aligned u64 inside it, and
    // every writer uses atomic adds.
    unsafe {
        let field = stats.cast::<u8>().add(field_offset).cast::<u64>();
        // `AtomicU64::fetch_add` does not exist for this target (no compare-and-swap); the
        // intrinsic, its result unused, is the BPF atomic add every kernel version has.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, 1);
    }
}
