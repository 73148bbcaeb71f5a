//! The `copy` engine's parts: a provided-buffer ring shared by every connection of a worker, and
//! the multishot RECV / SEND operations that use it.
//!
//! The kernel picks a free buffer when bytes arrive, so an idle connection holds no buffer: the
//! buffers are the worker's, lent to a direction from a RECV completion until its SEND completes.
//! A direction queues at most [`MAX_QUEUED`] filled buffers; past that it cancels its multishot
//! RECV (backpressure) and re-arms it once the queue drains.
//!
//! `unsafe` is allowed here (besides `sys`, `engine::uring`, `engine::splice`) because the ring
//! is memory shared with the kernel: see the SAFETY comments.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{IoUring, opcode, squeue, types};

use crate::sys::AnonMap;

/// Buffer group id of the worker's one buffer ring.
pub const BGID: u16 = 0;
/// Buffers in the ring (a power of two, as the kernel requires).
pub const BUFFERS: u16 = 512;
/// Bytes per buffer.
pub const BUF_SIZE: u32 = 16 * 1024;
/// Filled buffers a direction may hold before its RECV is paused.
pub const MAX_QUEUED: usize = 4;

/// Buffer id: which buffer of the ring.
type Bid = u16;

/// A buffer of the ring that the kernel filled and [`BufRing::lend`] lent to one holder, until
/// [`BufRing::recycle`] gives it back. Neither `Copy` nor `Clone`, only `lend` makes one, and
/// `recycle` takes it by value: a buffer cannot be given back twice (the kernel would then fill
/// it for two RECVs at once, and one SEND would send the other's bytes).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a lent buffer goes back with `BufRing::recycle`, or the ring has one fewer"]
pub struct Lent(Bid);

/// A provided-buffer ring registered with one io_uring.
///
/// Invariant: every buffer id is either in the ring (the kernel may fill it) or lent to exactly
/// one holder of its [`Lent`], which returns it with [`BufRing::recycle`] once its SEND
/// completed.
pub struct BufRing {
    /// `BUFFERS` ring entries (the kernel reads them; the tail lives in the first entry).
    entries: AnonMap,
    /// `BUFFERS * BUF_SIZE` bytes of buffers.
    data: AnonMap,
    /// Our copy of the tail: entries published to the kernel so far.
    tail: u16,
    /// Buffers lent out now.
    lent: usize,
}

impl BufRing {
    /// Allocates the ring and registers it as group [`BGID`] of `ring`.
    pub fn register(ring: &IoUring) -> io::Result<BufRing> {
        let entries = AnonMap::new(BUFFERS as usize * std::mem::size_of::<types::BufRingEntry>())?;
        let data = AnonMap::new(BUFFERS as usize * BUF_SIZE as usize)?;
        // SAFETY: `entries` is a page-aligned mapping of exactly BUFFERS entries that lives in
        // this BufRing; the worker drops the BufRing only after the IoUring (field order in
        // `engine::uring::Worker`), so the kernel never sees it unmapped while registered.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.as_ptr() as u64,
                BUFFERS,
                BGID,
                0,
            )?;
        }
        let mut br = BufRing {
            entries,
            data,
            tail: 0,
            lent: BUFFERS as usize,
        };
        for bid in 0..BUFFERS {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn entry_ptr(&self, idx: u16) -> *mut types::BufRingEntry {
        let base = self.entries.as_ptr().cast::<types::BufRingEntry>();
        // SAFETY: idx is masked to the ring size, so the pointer stays inside `entries`.
        unsafe { base.add((idx & (BUFFERS - 1)) as usize) }
    }

    /// Writes buffer `bid` at the tail (not yet visible to the kernel).
    fn push(&mut self, bid: Bid) {
        let e = self.entry_ptr(self.tail);
        // SAFETY: `e` points at the ring entry the kernel does not own (it is past the published
        // tail); `bid` is lent to nobody, so its memory may be filled by the kernel again.
        unsafe {
            (*e).set_addr(self.data.as_ptr().add(bid as usize * BUF_SIZE as usize) as u64);
            (*e).set_len(BUF_SIZE);
            (*e).set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        self.lent -= 1;
    }

    /// Makes the pushed entries visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field is a u16 inside the first entry, which the kernel only reads;
        // the release store orders the entry writes before it.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries.as_ptr().cast()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The buffer the kernel filled for a RECV completion with `flags` (None when it names
    /// none): lent to the caller from now on.
    pub fn lend(&mut self, flags: u32) -> Option<Lent> {
        let bid = io_uring::cqueue::buffer_select(flags)?;
        self.lent += 1;
        Some(Lent(bid))
    }

    /// Gives a lent buffer back to the kernel.
    pub fn recycle(&mut self, buf: Lent) {
        self.push(buf.0);
        self.publish();
    }

    /// Buffers lent to directions now.
    #[cfg(test)]
    pub fn lent(&self) -> usize {
        self.lent
    }

    /// Pointer to byte `off` of buffer `bid`.
    fn ptr(&self, bid: Bid, off: u32) -> *const u8 {
        debug_assert!(off <= BUF_SIZE);
        // SAFETY: bid < BUFFERS and off <= BUF_SIZE, so the pointer is inside `data` (or one past
        // a buffer's end, which is allowed).
        unsafe {
            self.data
                .as_ptr()
                .add(bid as usize * BUF_SIZE as usize + off as usize)
        }
    }

    /// The filled bytes of a lent buffer (for protocol code that reads them).
    pub fn bytes(&self, buf: &Lent, len: u32) -> &[u8] {
        let bid = buf.0;
        assert!(bid < BUFFERS && len <= BUF_SIZE);
        // SAFETY: the range is inside `data`; the buffer is lent to the caller, so the kernel
        // does not write it while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.ptr(bid, 0), len as usize) }
    }
}

/// Multishot RECV from `src` into buffers of group [`BGID`].
pub fn recv_multi(src: RawFd) -> squeue::Entry {
    opcode::RecvMulti::new(types::Fd(src), BGID).build()
}

/// SEND bytes `off..len` of a lent buffer to `dst`.
pub fn send(ring: &BufRing, dst: RawFd, buf: &Lent, off: u32, len: u32) -> squeue::Entry {
    opcode::Send::new(types::Fd(dst), ring.ptr(buf.0, off), len - off)
        .flags(libc::MSG_NOSIGNAL)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn recv_multi_fills_ring_buffers_and_recycled_ones_come_back() {
        let mut ring = IoUring::new(8).unwrap();
        let mut br = BufRing::register(&ring).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        a.write_all(b"hello ring").unwrap();
        let e = recv_multi(b.as_raw_fd()).user_data(7);
        // SAFETY: the entry points at no user memory; the buffer ring outlives the ring's use here.
        unsafe { ring.submission().push(&e).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        assert_eq!(cqe.result(), 10);
        let buf = br.lend(cqe.flags()).unwrap();
        assert_eq!(br.bytes(&buf, 10), b"hello ring");
        assert_eq!(br.lent(), 1);
        // Send it back the other way through a SEND of the same buffer.
        let e = send(&br, b.as_raw_fd(), &buf, 6, 10).user_data(8);
        // SAFETY: `buf` stays lent (not recycled) until the completion below.
        unsafe { ring.submission().push(&e).unwrap() };
        // The multishot RECV stays armed and silent; wait for the SEND's completion only.
        let mut sent = None;
        for _ in 0..10 {
            ring.submit_and_wait(1).unwrap();
            if let Some(c) = ring.completion().find(|c| c.user_data() == 8) {
                sent = Some(c.result());
                break;
            }
        }
        assert_eq!(sent, Some(4));
        br.recycle(buf);
        assert_eq!(br.lent(), 0);
        let mut buf = [0u8; 4];
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ring");
        drop(b.flush());
    }
}
