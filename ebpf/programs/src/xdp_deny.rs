//! `sluice_xdp_deny`: drops TCP SYNs from denied clients to the relay's ports before they cost a
//! socket.
//!
//! Parses Ethernet, then IPv4 (any header length, first fragment only) or IPv6 (TCP as the first
//! next header); a SYN to a port in `SLUICE_PORTS` (the relay's listeners) has its source
//! address looked up in `SLUICE_DENY_V4`/`SLUICE_DENY_V6`. Only a SYN without ACK to one of
//! those ports is ever dropped: other services on the host (SSH), established connections and
//! every other packet pass, and so does anything the parser does not understand (fail open, the
//! relay's own admission check still runs). An empty port map drops nothing.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use sluice_common::{XDP_STATS_SLOT, XdpStats};

use crate::maps::{DENY_V4, DENY_V6, PORTS, XDP_STATS};

const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
const IPPROTO_TCP: u8 = 6;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// The TCP header up to its flags byte: ports (0..4), sequence and acknowledgement numbers,
/// data offset (12), flags (13).
const TCP_HEAD: usize = 14;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[xdp]
pub fn sluice_xdp_deny(ctx: XdpContext) -> u32 {
    match try_sluice_xdp_deny(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_sluice_xdp_deny(ctx: &XdpContext) -> Result<u32, u32> {
    let ethertype: [u8; 2] = read(ctx, 12)?;
    // Each fixed-size header is copied whole after one bounds check: the verifier cannot carry a
    // check made at a variable offset (the TCP header after IPv4 options) over to fixed ones.
    if ethertype == ETH_P_IP {
        let ip: [u8; IPV4_HLEN] = read(ctx, ETH_HLEN)?;
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        // Only the first fragment carries the TCP header.
        let first_fragment = ip[6] & 0x1f == 0 && ip[7] == 0;
        if ip[0] >> 4 != 4 || ihl < IPV4_HLEN || ip[9] != IPPROTO_TCP || !first_fragment {
            return Ok(XDP_PASS);
        }
        if !is_relay_syn(ctx, ETH_HLEN + ihl)? {
            return Ok(XDP_PASS);
        }
        let src = [ip[12], ip[13], ip[14], ip[15]];
        let denied = DENY_V4.get(Key::new(32, src)).is_some();
        Ok(verdict(denied, |s| &mut s.dropped_v4))
    } else if ethertype == ETH_P_IPV6 {
        let ip: [u8; IPV6_HLEN] = read(ctx, ETH_HLEN)?;
        if ip[6] != IPPROTO_TCP || !is_relay_syn(ctx, ETH_HLEN + IPV6_HLEN)? {
            return Ok(XDP_PASS);
        }
        let mut src = [0u8; 16];
        src.copy_from_slice(&ip[8..24]);
        let denied = DENY_V6.get(Key::new(128, src)).is_some();
        Ok(verdict(denied, |s| &mut s.dropped_v6))
    } else {
        Ok(XDP_PASS)
    }
}

/// Whether the TCP header at `offset` is a SYN without ACK (a new connection) to one of the
/// relay's ports.
#[inline(always)]
fn is_relay_syn(ctx: &XdpContext, offset: usize) -> Result<bool, u32> {
    let tcp: [u8; TCP_HEAD] = read(ctx, offset)?;
    if tcp[TCP_FLAGS_OFFSET] & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(false);
    }
    let port = [tcp[2], tcp[3]];
    Ok(PORTS.get_ptr(&port).is_some())
}

/// Counts the SYN (and the drop) and returns the action.
#[inline(always)]
fn verdict(denied: bool, dropped: impl FnOnce(&mut XdpStats) -> &mut u64) -> u32 {
    if let Some(stats) = XDP_STATS.get_ptr_mut(XDP_STATS_SLOT) {
        // SAFETY: a per-CPU slot, and XDP runs with migration disabled, so nothing else touches
        // it during this program run; the pointer came from a successful lookup.
        let stats = unsafe { &mut *stats };
        stats.syns += 1;
        if denied {
            *dropped(stats) += 1;
        }
    }
    if denied { XDP_DROP } else { XDP_PASS }
}

/// Copies a `T` (a byte, or an array of bytes: alignment 1) from the packet at `offset`, or passes
/// the packet if it is too short. The bounds check is the one the verifier needs to see.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, u32> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(XDP_PASS);
    }
    // SAFETY: the check above keeps `[start + offset, start + offset + size_of::<T>())` inside the
    // packet, and `T` is only ever a byte or a byte array, so any address is aligned for it.
    Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}
