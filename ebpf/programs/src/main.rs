//! Sluice's eBPF object: every program and map the relay loads, built for `bpfel-unknown-none`.
//!
//! One file per program, each a thin entry calling `try_<name>() -> Result<u32, u32>`; the maps
//! are `#[map]` statics in [`maps`]. Types and names come from `sluice-common`, which the relay
//! shares, so the two sides cannot disagree on a layout.
#![no_std]
#![no_main]
// `atomic_xadd` for the verdict's shared counters (the BPF target has no `AtomicU64::fetch_add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod maps;
mod verdict;
mod xdp_deny;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any program with a reachable panic path, so this is never called.
    loop {}
}

/// Kernel-facing licence string: GPL-only helpers (e.g. `bpf_sk_redirect_hash`) need it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
