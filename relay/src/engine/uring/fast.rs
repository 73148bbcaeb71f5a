//! The sockmap fast path: the kernel moves a connection's bytes; the worker inserts the pair,
//! watches each source for FIN and errors, forwards a FIN once drained, and audits the maps.

use std::io;
use std::os::fd::AsFd;

use io_uring::{opcode, types};

use super::Worker;
use super::conn::{TO_CLIENT, TO_UPSTREAM};
use super::flow::{FIRST_GRANT, Forward, grant};
use super::user_data::Op;
use crate::config::Route;
use crate::ebpf::Cookie;
use crate::metrics::Counter;
use crate::sys;

/// Send buffer of both sockets of a fast-path connection: with the default (autotuned) size a
/// full peer send buffer makes the kernel retry a redirect only after ~4 ms, and throughput
/// swung 4.7–22 Gb/s in the probe; 4 MiB (the host's `wmem_max`) kept it steady.
pub(super) const FAST_SNDBUF: usize = 4 << 20;

/// Re-check delays (ms) while waiting for a fast-path direction's bytes to reach the
/// destination's send queue before forwarding its FIN; the last one repeats.
pub(super) const DRAIN_WAITS_MS: [u32; 6] = [1, 2, 4, 8, 16, 32];

/// `tcpi_state` of a socket that was reset or fully closed.
pub(super) const TCP_CLOSE: u8 = 7;

/// A connection on the sockmap fast path: the kernel moves its bytes, the worker watches.
pub(super) struct FastConn {
    /// Socket cookies (client, upstream): the keys of the fast-path maps.
    pub(super) cookies: (Cookie, Cookie),
    /// `written[d]`: bytes user space itself wrote to direction `d`'s destination (PROXY header,
    /// first bytes, bytes a kick returned), exact at insertion.
    pub(super) written: [u64; 2],
    /// `before[d]`: bytes direction `d`'s source received in order that the verdict will never
    /// see (user space read them before insertion). Past it, every byte TCP receives reaches
    /// the verdict once; more than that is the kernel sending bytes on twice
    /// ([`Worker::fast_duplicated`]).
    pub(super) before: [u64; 2],
    /// The source of direction `d` sent FIN (POLLRDHUP seen, or a kick read EOF).
    pub(super) fin: [bool; 2],
    /// How many drain re-checks direction `d` had (picks the next delay).
    pub(super) waits: [u8; 2],
    /// Bytes moved and acknowledged, summed, at the last idle check (the kernel moves the bytes,
    /// so activity is read from its counters only when the idle limit is reached).
    pub(super) seen: u64,
    /// Flow control, per direction: the `released` value last given to the verdict (bytes it
    /// held that user space has taken), bytes taken but not yet accepted by the destination,
    /// and whether a re-check (timer or POLLOUT) is in flight instead of the source's watch.
    pub(super) released: [u64; 2],
    pub(super) pending: [Vec<u8>; 2],
    pub(super) waiting: [bool; 2],
    /// How many forward re-checks direction `d` had in a row (picks the next delay).
    pub(super) forward_waits: [u8; 2],
    /// Bytes user space read from direction `d`'s source since insertion: every one of them was
    /// held by the verdict, so flow control releases only when this equals its `held` count
    /// (held bytes the kernel has not yet made readable would otherwise be overtaken).
    pub(super) taken: [u64; 2],
    /// Whether direction `d`'s source has a POLLRDHUP watch in flight.
    pub(super) watching: [bool; 2],
    /// Flow control: the most the kernel may queue for a direction, redirected but not yet in
    /// its destination's send buffer (charged to no socket): `sockmap_queue_limit_mib`, or the
    /// daemon-wide budget when that is 0; `u64::MAX` for no flow control. The verdict's
    /// allowance ([`sluice_common::Peer::allow`]) is kept at most this far past the bytes the
    /// destination took, and only as far as the daemon-wide budget (`sockmap_queue_total_mib`)
    /// has room for ([`grant`]). Half-way the verdict says so and the allowance slides on by what
    /// the destination took meanwhile; when it runs out, the source socket's receive buffer fills
    /// with held bytes and TCP closes the sender's window, user space waits for the destination,
    /// forwards what was held meanwhile (a copy), and lets the verdict go on.
    pub(super) window: u64,
    /// `Peer::allow` of direction `d` as last written.
    pub(super) allow: [u64; 2],
    /// Bytes of the daemon-wide budget direction `d` holds: at least what the kernel can queue
    /// for it under `allow` (`allow` minus what its destination had taken at the last look).
    pub(super) reserved: [u64; 2],
    /// What direction `d`'s reservation grows towards: [`FIRST_GRANT`], doubled each time the
    /// allowance was used up to half or held (at most `window`), back to the start when the
    /// direction was idle and its allowance taken back.
    pub(super) ramp: [u64; 2],
    /// Whether user space knows direction `d` is holding (from an event or a sweep) and has not
    /// released it yet: each hold is counted once.
    pub(super) holding: [bool; 2],
    /// Sampling ([`Worker::fast_sample`]): direction `d`'s redirected bytes at the last sample
    /// (unchanged at the next one: idle), and its kernel-queued and held bytes then (in the
    /// worker's gauges).
    pub(super) sampled_bytes: [u64; 2],
    pub(super) sampled_queued: [u64; 2],
    pub(super) sampled_held: [u64; 2],
    /// Samples in a row at which direction `d` had held bytes and neither the verdict's held
    /// count nor what user space took of it moved: at [`STALL_SAMPLES`] it is logged once.
    pub(super) still: [u16; 2],
    pub(super) sampled_taken: [u64; 2],
    pub(super) sampled_kheld: [u64; 2],
}

impl FastConn {
    /// A connection about to enter the fast path, with flow control `window` (cookies and
    /// `written` are filled in once it is inserted).
    pub(super) fn new(window: u64) -> FastConn {
        FastConn {
            cookies: (0, 0),
            written: [0; 2],
            before: [0; 2],
            fin: [false; 2],
            waits: [0; 2],
            seen: 0,
            released: [0; 2],
            pending: [Vec::new(), Vec::new()],
            waiting: [false; 2],
            forward_waits: [0; 2],
            taken: [0; 2],
            watching: [false; 2],
            window,
            allow: [0; 2],
            reserved: [0; 2],
            ramp: [FIRST_GRANT.min(window); 2],
            holding: [false; 2],
            sampled_bytes: [0; 2],
            sampled_queued: [0; 2],
            sampled_held: [0; 2],
            still: [0; 2],
            sampled_taken: [0; 2],
            sampled_kheld: [0; 2],
        }
    }
}

/// Moves every byte queued on `src` now to `dst` (both nonblocking), before a pair enters the
/// sockmap. Fails if `dst` cannot take them at once (then the connection is spliced instead);
/// a FIN on `src` is left for the kick after insertion to find.
pub(super) fn move_queued(
    src: std::os::fd::BorrowedFd<'_>,
    dst: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<u64> {
    let mut moved = 0;
    for _ in 0..256 {
        let n = match sys::recv(src, buf, libc::MSG_DONTWAIT) {
            Ok(0) => return Ok(moved),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
            Err(e) => return Err(e),
        };
        let sent = sys::send(dst, &buf[..n], libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)?;
        if sent != n {
            return Err(io::Error::other("the upstream send buffer is full"));
        }
        moved += n as u64;
    }
    Err(io::Error::other("more bytes queued than one move takes"))
}

/// Every byte written to a TCP socket so far: acknowledged + still in the send queue. Reads the
/// acknowledged count on both sides of SIOCOUTQ and retries until it did not move, so an ACK
/// arriving in between cannot make the sum too large (or too small).
pub(super) fn sent_total(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    for _ in 0..16 {
        let before = sys::tcp_progress(fd)?.acked;
        let queued = sys::socket_queue(fd, false)?;
        if sys::tcp_progress(fd)?.acked == before {
            return Ok(before + queued);
        }
    }
    Err(io::Error::other("TCP_INFO kept moving"))
}

/// Bytes `fd` received in order and that were read already (not the ones still queued on it):
/// `tcpi_bytes_received` minus SIOCINQ, retried until the received count did not move in
/// between. Only meaningful before the socket enters the sockmap (SIOCINQ is plain TCP then).
pub(super) fn read_total(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    for _ in 0..16 {
        let before = sys::tcp_progress(fd)?.received;
        let queued = sys::socket_queue(fd, true)?;
        if sys::tcp_progress(fd)?.received == before {
            return Ok(before.saturating_sub(queued));
        }
    }
    Err(io::Error::other("TCP_INFO kept moving"))
}

impl Worker<'_> {
    /// Puts a connected plain connection on the fast path: both sockets into the sockmap, then a
    /// kick each (bytes queued before insertion go through the verdict now), then a POLLRDHUP
    /// watch per source. If the kernel refuses the pair, the connection is spliced instead.
    pub(super) fn start_fast(&mut self, slot: u32) {
        let pool = self.pool();
        let s = &mut self.slots[slot as usize];
        let c = s.conn.as_mut().expect("live slot");
        let fast = self.fast.as_mut().expect("sockmap engine");
        let up = c.upstream.as_ref().expect("connected upstream");
        let listener = &self.ctx.config.listeners[c.s.listener()];
        // User space read part of the client's bytes (a PROXY header, a ClientHello peeked for
        // SNI). The kernel hands a partly read skb to the verdict whole, so those bytes would be
        // sent again: whatever is queued now is moved here first, and only whole skbs arrive
        // after insertion.
        let partly_read =
            listener.accept_proxy || listener.route == Route::Sni || !listener.decoy.is_off();
        let window = match (
            self.ctx.config.sockmap_queue_limit_mib,
            self.ctx.config.sockmap_queue_total_mib,
        ) {
            (0, 0) => u64::MAX,
            (0, total) => u64::from(total) << 20,
            (mib, _) => u64::from(mib) << 20,
        };
        let mut f = FastConn::new(window);
        // Each direction starts with as much of its window as the daemon-wide budget has room
        // for (none: its first bytes wait for the worker, which forwards them and asks again).
        let flows = [TO_UPSTREAM, TO_CLIENT].map(|d| grant(&mut f, d, 0, 0, false, &pool));
        let buf = &mut self.kick_buf;
        let row = &self.ctx.row;
        let inserted = (|| {
            if partly_read {
                let n = move_queued(c.client.as_fd(), up.as_fd(), buf)?;
                row.add(Counter::BytesClientToUpstream, n);
                row.add(Counter::FastPathUserBytes, n);
            }
            // Exact now: nothing but this thread has written to either socket yet.
            let written = [sent_total(up.as_fd())?, sent_total(c.client.as_fd())?];
            let before = [read_total(c.client.as_fd())?, read_total(up.as_fd())?];
            for fd in [c.client.as_fd(), up.as_fd()] {
                let _ = socket2::SockRef::from(&fd).set_send_buffer_size(FAST_SNDBUF);
            }
            let cookies = fast
                .insert_pair_flows(c.client.as_fd(), up.as_fd(), flows)
                .map_err(io::Error::other)?;
            Ok::<_, io::Error>((cookies, written, before))
        })();
        match inserted {
            Ok((cookies, written, before)) => {
                f.cookies = cookies;
                f.written = written;
                f.before = before;
                c.fast = Some(Box::new(f));
                self.fast_cookies.insert(cookies.0, slot);
                self.fast_cookies.insert(cookies.1, slot);
                self.ctx.row.inc(Counter::FastPathPairs);
                self.fast_pairs += 1;
            }
            Err(e) => {
                pool.give(f.reserved[0] + f.reserved[1]);
                tracing::debug!("fast path refused a connection ({e}); splicing it");
                self.ctx.row.inc(Counter::FastPathRefused);
                for d in [TO_UPSTREAM, TO_CLIENT] {
                    self.start_read(slot, d);
                }
                return;
            }
        }
        // The kick: a read of each source runs the verdict over what was queued before
        // insertion; what it left on the socket is forwarded here, in order.
        for d in [TO_UPSTREAM, TO_CLIENT] {
            if self.conn(slot).s.is_closing() {
                return;
            }
            self.fast_step(slot, d);
        }
    }

    /// Takes held bytes of direction `d` on (see [`Worker::fast_forward`]), then watches the
    /// source again, or starts forwarding its FIN, unless a re-check is in flight.
    pub(super) fn fast_step(&mut self, slot: u32, d: usize) {
        match self.fast_forward(slot, d) {
            Err((errno, at_source)) => self.fail(slot, d, errno, at_source),
            Ok(Forward::Waiting) => {}
            Ok(Forward::Done) if self.fast_conn(slot).fin[d] => {
                if !self.conn(slot).dirs[d].done {
                    self.fast_drain(slot, d)
                }
            }
            // Only POLLRDHUP: a sockmap socket always polls readable (its read sequence stays
            // behind what the verdict redirected), so held bytes are announced by the verdict's
            // event ring instead.
            Ok(Forward::Done) if !self.fast_conn(slot).watching[d] => {
                self.fast_watch(slot, d, libc::POLLRDHUP as u32)
            }
            Ok(Forward::Done) => {}
        }
    }

    pub(super) fn fast_conn(&mut self, slot: u32) -> &mut FastConn {
        self.conn(slot)
            .fast
            .as_mut()
            .expect("a fast-path connection")
    }

    /// Polls direction `d`'s source for `mask` (POLLERR and POLLHUP always come too).
    pub(super) fn fast_watch(&mut self, slot: u32, d: usize, mask: u32) {
        self.fast_conn(slot).watching[d] = true;
        let (src, _) = self.fds(slot, d);
        let e = opcode::PollAdd::new(types::Fd(src), mask)
            .build()
            .user_data(self.ud(slot, Op::PollIn, d));
        self.conn(slot).inflight += 1;
        self.push(&[e]);
    }

    /// A watch on direction `d`'s source fired: held bytes to forward (POLLIN: flow control left
    /// skbs on the socket), FIN (forward what is held, then start draining) or an error (reset).
    /// The watch is not re-armed after a FIN: io_uring always reports POLLRDHUP, so it would fire
    /// at once forever; the tick checks a half-closed socket for a reset instead
    /// ([`Worker::fast_check_half_closed`]).
    pub(super) fn on_fast_poll(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).s.is_closing() {
            return;
        }
        self.fast_conn(slot).watching[d] = false;
        if res < 0 {
            return self.fail(slot, d, -res, true);
        }
        let ev = res as u32;
        let (src, _) = self.fds(slot, d);
        if ev & libc::POLLERR as u32 != 0 {
            // SAFETY: `src` is this live connection's socket, open until the slot is freed.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(src) };
            let errno = crate::engine::take_socket_error(fd)
                .and_then(|e| e.raw_os_error())
                .unwrap_or(libc::ECONNRESET);
            return self.fail(slot, d, errno, true);
        }
        if ev & (libc::POLLRDHUP | libc::POLLHUP) as u32 != 0 {
            self.fast_conn(slot).fin[d] = true;
        }
        self.touch(slot);
        self.fast_step(slot, d);
    }

    /// On the tick: a fast-path socket whose FIN was seen still receives the other direction,
    /// but is no longer polled; a reset on it (SO_ERROR, or the TCP state went to CLOSE) ends
    /// the connection with RST both ways, as a poll would have.
    pub(super) fn fast_check_half_closed(&mut self, slot: u32) {
        let c = self.slots[slot as usize].conn.as_ref().expect("live slot");
        let Some(f) = c.fast.as_ref() else { return };
        let up = c.upstream.as_ref().expect("connected upstream");
        for d in [TO_UPSTREAM, TO_CLIENT] {
            let other = 1 - d;
            if !f.fin[d] || c.dirs[other].done {
                continue;
            }
            let src = if d == TO_UPSTREAM {
                c.client.as_fd()
            } else {
                up.as_fd()
            };
            let errno = match crate::engine::take_socket_error(src) {
                Some(e) => e.raw_os_error().unwrap_or(libc::ECONNRESET),
                None if sys::tcp_progress(src).is_ok_and(|p| p.state == TCP_CLOSE) => {
                    libc::ECONNRESET
                }
                None => continue,
            };
            return self.fail(slot, other, errno, false);
        }
    }

    /// Forwards direction `d`'s FIN if every byte of it reached the destination's send queue,
    /// else checks again after a short delay.
    pub(super) fn fast_drain(&mut self, slot: u32, d: usize) {
        // A stream the kernel garbled never ends with a FIN, as if it were whole.
        if self.fast_garbled(slot) {
            return;
        }
        match self.fast_drained(slot, d) {
            Ok(true) => self.source_done(slot, d),
            Ok(false) => {
                let f = self.fast_conn(slot);
                let wait = usize::from(f.waits[d]).min(DRAIN_WAITS_MS.len() - 1);
                f.waits[d] = f.waits[d].saturating_add(1);
                let e = opcode::Timeout::new(&self.drain_waits[wait])
                    .build()
                    .user_data(self.ud(slot, Op::Drain, d));
                self.conn(slot).inflight += 1;
                self.push(&[e]);
            }
            Err(e) => self.fail(slot, d, e.raw_os_error().unwrap_or(libc::EIO), false),
        }
    }

    pub(super) fn on_drain(&mut self, slot: u32, d: usize) {
        if !self.conn(slot).s.is_closing()
            && !self.conn(slot).dirs[d].done
            && !self.fast_conn(slot).waiting[d]
        {
            // Held bytes (if any) go first; the FIN follows once they are all out.
            self.fast_step(slot, d);
        }
    }

    /// Whether every byte that arrived on direction `d`'s source is in its destination's send
    /// queue (then a FIN sent after them cannot cut them off):
    /// - nothing on the source is readable: a peek (which takes the socket lock, so no verdict
    ///   is half-way through an skb) finds neither an skb the verdict has yet to see nor held
    ///   bytes. Not SIOCINQ: on 6.1 (Debian 12) the kernel's read sequence lags bytes the
    ///   verdict redirected or user space took from the psock, so SIOCINQ stays above 0 after
    ///   the last byte moved and a FIN waiting on it was never forwarded;
    /// - the destination's written total (acknowledged + SIOCOUTQ) covers what user space wrote
    ///   plus what the verdict redirected: the redirect backlog (the peer's psock queue, retried
    ///   by a kernel worker when the peer's send buffer was full) is empty.
    ///
    /// - flow control left nothing behind: no byte taken but not yet sent, every held byte
    ///   taken.
    ///
    /// Every read errs towards "not yet": `sent_total` never over-counts.
    pub(super) fn fast_drained(&mut self, slot: u32, d: usize) -> io::Result<bool> {
        let c = self.slots[slot as usize].conn.as_ref().expect("live slot");
        let f = c.fast.as_ref().expect("fast");
        if !f.pending[d].is_empty() || f.waiting[d] {
            return Ok(false);
        }
        let up = c.upstream.as_ref().expect("connected upstream");
        let (src, dst, cookie) = if d == TO_UPSTREAM {
            (c.client.as_fd(), up.as_fd(), f.cookies.0)
        } else {
            (up.as_fd(), c.client.as_fd(), f.cookies.1)
        };
        match sys::recv(src, &mut [0u8; 1], libc::MSG_PEEK | libc::MSG_DONTWAIT) {
            Ok(0) => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let fast = self.fast.as_ref().expect("sockmap engine");
        let counters = fast
            .counters(cookie)
            .map_err(io::Error::other)?
            .unwrap_or_default();
        if counters.held != f.released[d] {
            return Ok(false);
        }
        let redirected = counters.bytes;
        match sent_total(dst) {
            Ok(total) => Ok(total >= f.written[d] + redirected),
            // Kept moving (ACKs streaming in): not settled, look again later.
            Err(e) if e.raw_os_error().is_none() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Bytes the verdict of direction `d` saw beyond what its source received in order: 0, unless
    /// the kernel handed it bytes twice. TCP queues a segment that the peer sent again and that
    /// overlaps bytes already received whole (readers skip the overlap by sequence number), and
    /// `tcp_read_skb` gives the verdict that skb whole, overlap included (Linux up to 6.18 at
    /// least): the overlap goes to the destination a second time. Read after the verdict's
    /// counters, the received count can only be ahead of them, never behind.
    pub(super) fn fast_duplicated(&self, slot: u32, d: usize) -> u64 {
        let Some(c) = self.slots[slot as usize].conn.as_ref() else {
            return 0;
        };
        let (Some(f), Some(up), Some(fast)) = (c.fast.as_ref(), c.upstream.as_ref(), &self.fast)
        else {
            return 0;
        };
        let (src, cookie) = if d == TO_UPSTREAM {
            (c.client.as_fd(), f.cookies.0)
        } else {
            (up.as_fd(), f.cookies.1)
        };
        let Ok(Some(counters)) = fast.counters(cookie) else {
            return 0;
        };
        let Ok(p) = sys::tcp_progress(src) else {
            return 0;
        };
        (counters.bytes + counters.held).saturating_sub(p.received.saturating_sub(f.before[d]))
    }

    /// Whether the kernel sent bytes of either direction on twice ([`Self::fast_duplicated`]):
    /// then the destination's stream is garbled past repair, so the connection is counted
    /// (`fast_path_duplicated_bytes`) and reset both ways (a relay error), and true is returned.
    pub(super) fn fast_garbled(&mut self, slot: u32) -> bool {
        for d in [TO_UPSTREAM, TO_CLIENT] {
            let dup = self.fast_duplicated(slot, d);
            if dup > 0 {
                tracing::warn!(
                    direction = d,
                    bytes = dup,
                    "fast path: the kernel sent bytes twice (a retransmitted segment overlapped \
                     bytes already received); the connection is reset"
                );
                self.ctx.row.add(Counter::FastPathDuplicatedBytes, dup);
                self.fail(slot, d, libc::EBADMSG, true);
                return true;
            }
        }
        false
    }

    /// Whether the kernel moved or delivered any byte of a fast-path connection since the last
    /// call (read only when its idle limit is reached).
    pub(super) fn fast_moved(&mut self, slot: u32) -> bool {
        let c = self.slots[slot as usize].conn.as_mut().expect("live slot");
        let Some(fast) = self.fast.as_ref() else {
            return false;
        };
        let up = c.upstream.as_ref().expect("connected upstream");
        let f = c.fast.as_mut().expect("fast");
        let mut sum = 0u64;
        for cookie in [f.cookies.0, f.cookies.1] {
            sum += fast.counters(cookie).ok().flatten().map_or(0, |c| c.bytes);
        }
        for fd in [c.client.as_fd(), up.as_fd()] {
            sum += sys::tcp_progress(fd).map_or(0, |p| p.acked);
        }
        let moved = sum != f.seen;
        f.seen = sum;
        moved
    }

    /// When the worker has no connection left and pairs were inserted since the last count,
    /// counts the fast-path map entries (cheap then: the maps should be empty) and publishes
    /// it, so a leak shows in `sluicectl status` as `fast_path_entries` > 0.
    pub(super) fn audit_fast_path(&mut self) {
        let Some(fast) = self.fast.as_ref() else {
            return;
        };
        if self.active > 0 || self.fast_audited == self.fast_pairs {
            return;
        }
        self.fast_audited = self.fast_pairs;
        // Maps shared with the other workers hold their pairs too: count only this worker's.
        let entries = if fast.is_shared() {
            fast.owned_peers()
        } else {
            fast.occupancy().map(|o| o.sockets + o.peers + o.counters)
        };
        match entries {
            Ok(n) => {
                self.ctx.row.set(Counter::FastPathEntries, n as u64);
                self.ctx
                    .row
                    .set(Counter::FastPathAuditedPairs, self.fast_audited);
            }
            Err(e) => tracing::warn!("cannot count the fast-path map entries: {e}"),
        }
    }
}
