//! Flow control of the sockmap fast path: allowances from the daemon-wide budget ([`Pool`],
//! [`grant`]), forwarding held bytes, and the tick's sampling of kernel queues.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use io_uring::{opcode, types};

use super::Worker;
use super::conn::{TO_CLIENT, TO_UPSTREAM};
use super::fast::{DRAIN_WAITS_MS, FastConn, sent_total};
use super::user_data::{Op, UserData};
use crate::ebpf::{self, Cookie, FastPath, Kick};
use crate::metrics::Counter;
use crate::sys;

/// Bytes flow control moves per event before yielding to other connections.
pub(super) const FORWARD_ROUNDS: usize = 16;

/// Flow control: the verdict is asked to warn ([`sluice_common::HeldEvent::LOW`]) half-way
/// through an allowance only when at least twice this is left; a smaller one simply runs out.
pub(super) const MIN_WARN: u64 = 64 << 10;

/// Flow control: what a direction's allowance starts at (a few chat messages' worth), before it
/// doubles each time it runs out or half of it was used (up to its window). Most connections
/// never need more, so the daemon-wide budget is reserved by the ones that stream. Every
/// direction reserves this much from its first byte, so it bounds how many connections the
/// budget carries before directions that are idle between messages lose their allowance and
/// their next message goes through the worker: at 128 KiB, 1 000 chatting connections used the
/// default 256 MiB up, and most of their messages at 20 000 msg/s were held (37 393 holds in
/// 3.5 s, p99 35 ms; 2026-12-07). A stream starts with three holds more than it did then
/// (16, 32, 64 KiB) before its allowance is large enough to be warned of half-way.
pub(super) const FIRST_GRANT: u64 = 16 << 10;

/// Fast-path connections whose kernel queues one tick samples (for the gauges, and to give back
/// budget their destinations freed); the next tick goes on from there.
pub(super) const SAMPLE_BATCH: usize = 256;

/// Samples in a row (about 10 s while a worker has under [`SAMPLE_BATCH`] fast-path
/// connections) after which a direction whose held bytes did not move is logged (debug).
pub(super) const STALL_SAMPLES: u16 = 40;

/// The daemon-wide budget of kernel memory for the fast path, as one worker takes from it.
#[derive(Clone, Copy)]
pub(super) struct Pool<'a> {
    pub(super) shared: &'a crate::metrics::Shared,
    pub(super) row: crate::metrics::Row<'a>,
    pub(super) worker: usize,
    /// Bytes in all (`u64::MAX`: no limit).
    pub(super) limit: u64,
}

impl Pool<'_> {
    pub(super) fn take(&self, want: u64) -> u64 {
        if want == 0 {
            return 0;
        }
        let got = self.shared.fast_budget_take(self.worker, want, self.limit);
        if got < want {
            self.row.inc(Counter::FastPathBudgetShort);
        }
        got
    }

    pub(super) fn give(&self, n: u64) {
        if n > 0 {
            self.shared.fast_budget_give(self.worker, n);
        }
    }

    pub(super) fn force(&self, n: u64) {
        if n > 0 {
            self.shared.fast_budget_force(self.worker, n);
        }
    }

    /// Whether over half the budget is taken (then idle directions give theirs back).
    pub(super) fn pressed(&self) -> bool {
        self.limit != u64::MAX
            && self.shared.supervisor_get(Counter::FastPathReservedBytes) > self.limit / 2
    }
}

/// A new allowance for direction `d` of `f`, whose verdict redirected `bytes` so far, of which
/// the destination's send queue took `delivered`: at most `f.ramp[d]` (doubled first when
/// `grow`: the direction used what it had) past `delivered`, as far as the pool has room. First
/// the reservation shrinks to what the present allowance still lets the kernel queue (what the
/// destination took since is given back), then it grows towards the ramp, never past the
/// window. The allowance never moves back (the caller writes it with the returned `warn_at`).
pub(super) fn grant(
    f: &mut FastConn,
    d: usize,
    bytes: u64,
    delivered: u64,
    grow: bool,
    pool: &Pool<'_>,
) -> (u64, u64) {
    if f.window == u64::MAX {
        return (u64::MAX, u64::MAX);
    }
    let delivered = delivered.min(bytes);
    let now = f.allow[d].max(bytes) - delivered;
    if f.reserved[d] > now {
        pool.give(f.reserved[d] - now);
    } else {
        pool.force(now - f.reserved[d]);
    }
    if grow {
        f.ramp[d] = f.ramp[d].saturating_mul(2).min(f.window);
    }
    let got = pool.take(f.ramp[d].saturating_sub(now));
    f.reserved[d] = now + got;
    let allow = delivered + f.reserved[d];
    f.allow[d] = allow;
    let room = allow - bytes;
    let warn_at = if room >= 2 * MIN_WARN {
        bytes + room / 2
    } else {
        u64::MAX
    };
    (allow, warn_at)
}

/// Where a flow-control step of a fast-path direction ended.
pub(super) enum Forward {
    /// Every held byte went on; the source may be watched again.
    Done,
    /// A re-check (timer or POLLOUT) is in flight.
    Waiting,
}

/// The `held` counter of fast-path socket `cookie`, if it can be read.
pub(super) fn fast_held(fast: Option<&FastPath>, cookie: Cookie) -> Option<u64> {
    fast?.counters(cookie).ok().flatten().map(|c| c.held)
}

/// A fast-path socket's counters (zero before the verdict saw it); Err as (errno, at the
/// source), like the other fast-path steps.
pub(super) fn counters_of(
    fast: &FastPath,
    cookie: Cookie,
) -> Result<sluice_common::ConnCounters, (i32, bool)> {
    match fast.counters(cookie) {
        Ok(c) => Ok(c.unwrap_or_default()),
        Err(e) => Err((
            io::Error::other(e).raw_os_error().unwrap_or(libc::EIO),
            true,
        )),
    }
}

impl<'a> Worker<'a> {
    /// The daemon-wide fast-path budget, as this worker takes from it.
    pub(super) fn pool(&self) -> Pool<'a> {
        let limit = match self.ctx.config.sockmap_queue_total_mib {
            0 => u64::MAX,
            mib => u64::from(mib) << 20,
        };
        Pool {
            shared: self.ctx.shared,
            row: self.ctx.row,
            worker: self.ctx.index,
            limit,
        }
    }

    /// Polls the fast path's event ring (when this worker attached the verdict itself).
    pub(super) fn arm_held(&mut self) {
        let Some(fd) = self.fast.as_ref().and_then(|f| f.held_fd()) else {
            return;
        };
        if self.held_armed {
            return;
        }
        self.held_armed = true;
        let e = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(UserData::global(Op::HeldPoll, 0));
        self.push(&[e]);
    }

    /// Flow-control events: each names a socket whose verdict started holding bytes; its
    /// direction forwards them now, unless a re-check is already in flight.
    pub(super) fn on_held(&mut self, events: impl IntoIterator<Item = sluice_common::HeldEvent>) {
        for sluice_common::HeldEvent { cookie, kind, .. } in events {
            let Some(&slot) = self.fast_cookies.get(&cookie) else {
                continue; // gone meanwhile
            };
            let Some(c) = self.slots[slot as usize].conn.as_ref() else {
                continue;
            };
            let Some(f) = c.fast.as_ref() else { continue };
            let d = if f.cookies.0 == cookie {
                TO_UPSTREAM
            } else {
                TO_CLIENT
            };
            if c.s.is_closing() || c.dirs[d].done || f.waiting[d] {
                continue;
            }
            if kind == sluice_common::HeldEvent::LOW {
                if let Err((errno, at_source)) = self.fast_extend(slot, d) {
                    self.fail(slot, d, errno, at_source);
                }
            } else {
                self.fast_step(slot, d);
            }
            self.maybe_free(slot);
        }
    }

    /// Holds the verdict could not announce (its event ring was full; it held all the same):
    /// when their count ([`sluice_common::FlowStats::unannounced`]) moved since the last look,
    /// every fast-path direction of this worker is looked at, and one holding bytes user space
    /// does not know of is forwarded now, as its event would have made it. Called after each
    /// batch of events and on every tick, so such a hold waits one tick at most. The count moves
    /// after the socket's `held` counter does, so a look that follows it sees the held bytes.
    pub(super) fn fast_find_unannounced(&mut self) {
        let Some(fast) = self.fast.as_ref() else {
            return;
        };
        if self.fast_cookies.is_empty() {
            return;
        }
        let Ok(stats) = fast.flow_stats() else {
            return;
        };
        if stats.unannounced == self.flow_unannounced {
            return;
        }
        self.flow_unannounced = stats.unannounced;
        for slot in 0..self.slots.len() as u32 {
            for d in [TO_UPSTREAM, TO_CLIENT] {
                let Some(c) = self.slots[slot as usize].conn.as_ref() else {
                    continue;
                };
                let Some(f) = c.fast.as_ref() else { continue };
                if c.s.is_closing() || c.dirs[d].done || f.waiting[d] || f.holding[d] {
                    continue;
                }
                let cookie = if d == TO_UPSTREAM {
                    f.cookies.0
                } else {
                    f.cookies.1
                };
                let held = fast_held(self.fast.as_ref(), cookie);
                if held.is_some_and(|h| h != f.released[d]) {
                    self.ctx.row.inc(Counter::FastPathHoldsUnannounced);
                    self.fast_step(slot, d);
                    self.maybe_free(slot);
                }
            }
        }
    }

    /// Samples the kernel queues of up to [`SAMPLE_BATCH`] fast-path connections (the next ones
    /// after the last tick's), for the gauges `fast_path_queued_bytes` and
    /// `fast_path_held_bytes`; gives back the budget their destinations freed; and, while more
    /// than half the daemon-wide budget is taken, takes the allowance of directions that were
    /// idle since their last sample (their next bytes wait for the worker, which asks again).
    pub(super) fn fast_sample(&mut self) {
        if self.fast.is_none() {
            return;
        }
        if !self.fast_cookies.is_empty() {
            let pool = self.pool();
            let pressed = pool.pressed();
            let n = self.slots.len();
            let mut at = self.sample_next;
            let mut sampled = 0;
            for _ in 0..n {
                if at >= n {
                    at = 0;
                }
                let slot = at;
                at += 1;
                let live = self.slots[slot]
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.fast.is_some() && !c.s.is_closing());
                if live {
                    self.fast_sample_conn(slot, pressed, &pool);
                    sampled += 1;
                    self.fast_garbled(slot as u32);
                    if sampled == SAMPLE_BATCH {
                        break;
                    }
                }
            }
            self.sample_next = at;
        }
        self.ctx
            .row
            .set(Counter::FastPathQueuedBytes, self.sampled_queued);
        self.ctx
            .row
            .set(Counter::FastPathHeldBytes, self.sampled_held);
    }

    pub(super) fn fast_sample_conn(&mut self, slot: usize, pressed: bool, pool: &Pool<'_>) {
        let c = self.slots[slot].conn.as_mut().expect("live slot");
        let up = c.upstream.as_ref().expect("connected upstream");
        let f = c.fast.as_mut().expect("fast");
        let fast = self.fast.as_mut().expect("sockmap engine");
        for d in [TO_UPSTREAM, TO_CLIENT] {
            let (dst, cookie) = if d == TO_UPSTREAM {
                (up.as_fd(), f.cookies.0)
            } else {
                (c.client.as_fd(), f.cookies.1)
            };
            let Ok(Some(counters)) = fast.counters(cookie) else {
                continue;
            };
            let held = counters.held.saturating_sub(f.taken[d]) + f.pending[d].len() as u64;
            // Unknown this time (ACKs kept moving): the last sample stands.
            let mut queued = f.sampled_queued[d];
            if let Ok(total) = sent_total(dst) {
                let delivered = total.saturating_sub(f.written[d]).min(counters.bytes);
                queued = counters.bytes - delivered;
                if f.window != u64::MAX {
                    // What the destination took since the last look goes back to the pool.
                    let now = f.allow[d].max(counters.bytes) - delivered;
                    if f.reserved[d] > now {
                        pool.give(f.reserved[d] - now);
                        f.reserved[d] = now;
                    }
                    let idle = queued == 0
                        && counters.bytes == f.sampled_bytes[d]
                        && counters.held == f.released[d]
                        && !f.waiting[d];
                    if pressed
                        && idle
                        && f.reserved[d] > 0
                        && fast
                            .set_flow(cookie, counters.bytes, u64::MAX, f.released[d])
                            .is_ok()
                    {
                        f.allow[d] = counters.bytes;
                        f.ramp[d] = FIRST_GRANT.min(f.window);
                        pool.give(f.reserved[d]);
                        f.reserved[d] = 0;
                        // An skb redirected between the read and the write went past the new
                        // allowance: still the kernel's, still counted.
                        if let Ok(Some(after)) = fast.counters(cookie)
                            && after.bytes > counters.bytes
                        {
                            f.reserved[d] = after.bytes - counters.bytes;
                            pool.force(f.reserved[d]);
                        }
                    }
                }
            }
            if held > 0 && counters.held == f.sampled_kheld[d] && f.taken[d] == f.sampled_taken[d] {
                f.still[d] = f.still[d].saturating_add(1);
                if f.still[d] == STALL_SAMPLES {
                    let src = if d == TO_UPSTREAM {
                        c.client.as_fd()
                    } else {
                        up.as_fd()
                    };
                    let readable = sys::socket_queue(src, true).ok();
                    let sent = sent_total(dst).ok();
                    // Debug: a destination that does not read stalls a direction legitimately.
                    tracing::debug!(
                        direction = d,
                        held = counters.held,
                        released = f.released[d],
                        taken = f.taken[d],
                        pending = f.pending[d].len(),
                        redirected = counters.bytes,
                        allow = f.allow[d],
                        reserved = f.reserved[d],
                        written = f.written[d],
                        sent_total = ?sent,
                        source_inq = ?readable,
                        waiting = f.waiting[d],
                        holding = f.holding[d],
                        watching = f.watching[d],
                        fin = f.fin[d],
                        "fast path: a direction holds bytes that have not moved for {} samples",
                        STALL_SAMPLES
                    );
                }
            } else {
                f.still[d] = 0;
            }
            f.sampled_taken[d] = f.taken[d];
            f.sampled_kheld[d] = counters.held;
            f.sampled_bytes[d] = counters.bytes;
            self.sampled_queued = self.sampled_queued - f.sampled_queued[d] + queued;
            self.sampled_held = self.sampled_held - f.sampled_held[d] + held;
            f.sampled_queued[d] = queued;
            f.sampled_held[d] = held;
        }
    }

    /// Flow control of direction `d`: the verdict leaves an skb on the source socket when the
    /// direction used its allowance or earlier held bytes are not all taken. Those bytes are
    /// forwarded here, in order: only once every redirected byte reached the destination's send
    /// queue (else a timer re-checks), and only as fast as the destination takes them (else
    /// POLLOUT on it). Once the source has nothing left, the verdict gets the new `released`
    /// point and a fresh allowance and redirects again. While this waits, the source is not
    /// read: its receive buffer fills and TCP closes the sender's window (backpressure).
    pub(super) fn fast_forward(&mut self, slot: u32, d: usize) -> Result<Forward, (i32, bool)> {
        let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        let pool = self.pool();
        for _ in 0..FORWARD_ROUNDS {
            let s = &mut self.slots[slot as usize];
            let c = s.conn.as_mut().expect("live slot");
            let up = c.upstream.as_ref().expect("connected upstream");
            let (src, dst) = if d == TO_UPSTREAM {
                (c.client.as_fd(), up.as_fd())
            } else {
                (up.as_fd(), c.client.as_fd())
            };
            let f = c.fast.as_mut().expect("fast");
            let cookie = if d == TO_UPSTREAM {
                f.cookies.0
            } else {
                f.cookies.1
            };
            let fast = self.fast.as_mut().expect("sockmap engine");
            let counters = counters_of(fast, cookie)?;
            let holding = counters.held != f.released[d];
            if holding && !f.holding[d] {
                f.holding[d] = true;
                pool.row.inc(Counter::FastPathHolds);
            }
            // Held bytes (and those read and not yet sent: `pending` is only ever filled while
            // holding) may only follow the redirected ones. While holding, the verdict
            // redirects nothing more, so once this holds it holds until the release.
            if holding {
                let redirected = counters.bytes;
                match sent_total(dst) {
                    Ok(total) if total >= f.written[d] + redirected => {}
                    Ok(_) => return Ok(self.fast_wait(slot, d, false)),
                    Err(e) if e.raw_os_error().is_none() => {
                        return Ok(self.fast_wait(slot, d, false));
                    }
                    Err(e) => return Err((errno(e), false)),
                }
            }
            if !f.pending[d].is_empty() {
                let sent =
                    match sys::send(dst, &f.pending[d], libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                        Err(e) => return Err((errno(e), false)),
                    };
                f.pending[d].drain(..sent);
                f.written[d] += sent as u64;
                let more = !f.pending[d].is_empty();
                self.moved(slot, d, sent as u64);
                if more {
                    return Ok(self.fast_wait(slot, d, true));
                }
                continue;
            }
            let n = match ebpf::kick(src, &mut self.kick_buf) {
                Ok(Kick::Data(n)) => n,
                Ok(end @ (Kick::Empty | Kick::Eof)) => {
                    if matches!(end, Kick::Eof) {
                        f.fin[d] = true;
                    }
                    if counters.held == f.released[d] {
                        f.forward_waits[d] = 0;
                        return Ok(Forward::Done);
                    }
                    if f.taken[d] < counters.held {
                        // Held bytes the kernel has yet to make readable (its own backlog).
                        return Ok(self.fast_wait(slot, d, false));
                    }
                    // Everything held up to `counters.held` was taken and sent, and every byte
                    // it redirected reached the destination (checked above): the verdict may
                    // redirect again, as far as the window and the daemon-wide budget allow.
                    f.released[d] = counters.held;
                    f.holding[d] = false;
                    let (allow, warn_at) = grant(f, d, counters.bytes, counters.bytes, true, &pool);
                    fast.set_flow(cookie, allow, warn_at, counters.held)
                        .map_err(|e| (errno(io::Error::other(e)), true))?;
                    // An skb held after `counters` was read came without an event (the verdict
                    // was holding already): look again before going back to waiting for one.
                    let now = counters_of(fast, cookie)?;
                    if now.held != counters.held {
                        continue;
                    }
                    f.forward_waits[d] = 0;
                    return Ok(Forward::Done);
                }
                Err(e) => return Err((errno(e), true)),
            };
            f.taken[d] += n as u64;
            self.ctx.row.add(Counter::FastPathUserBytes, n as u64);
            let sent = if !holding {
                // Held after `counters` was read, so the check above did not run for it: kept
                // in `pending` until the next round has checked.
                0
            } else {
                match sys::send(
                    dst,
                    &self.kick_buf[..n],
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                ) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err((errno(e), false)),
                }
            };
            let f = self.slots[slot as usize]
                .conn
                .as_mut()
                .and_then(|c| c.fast.as_mut())
                .expect("fast");
            f.written[d] += sent as u64;
            if sent < n {
                f.pending[d].extend_from_slice(&self.kick_buf[sent..n]);
            } else if n < self.kick_buf.len() {
                // The read emptied the queue and the destination took it all: if the verdict
                // held nothing more meanwhile, it may redirect again now. Waiting for a read
                // that finds the queue empty would rarely end while the sender keeps sending
                // (it refills the queue as fast as it is read), and every byte until then
                // would come through here instead of the kernel.
                let fast = self.fast.as_mut().expect("sockmap engine");
                let now = counters_of(fast, cookie)?;
                if now.held == f.taken[d] && now.held != f.released[d] {
                    // While holding the verdict redirects nothing, and every byte it redirected
                    // before reached the destination (checked above this round).
                    f.released[d] = now.held;
                    f.holding[d] = false;
                    let (allow, warn_at) = grant(f, d, now.bytes, now.bytes, true, &pool);
                    fast.set_flow(cookie, allow, warn_at, now.held)
                        .map_err(|e| (errno(io::Error::other(e)), true))?;
                }
            }
            self.moved(slot, d, sent as u64);
        }
        // Moving bytes: yield to other connections, and come back right after them (a NOP
        // completes at once, behind what is already queued).
        self.fast_conn(slot).forward_waits[d] = 0;
        self.fast_conn(slot).waiting[d] = true;
        let e = opcode::Nop::new()
            .build()
            .user_data(self.ud(slot, Op::Forward, d));
        self.conn(slot).inflight += 1;
        self.push(&[e]);
        Ok(Forward::Waiting)
    }

    /// Direction `d` used half its allowance: it slides on by what the destination took since
    /// ([`grant`]), so a stream whose destination keeps up is never held, and one whose
    /// destination lags is held once the kernel queued its window for it.
    pub(super) fn fast_extend(&mut self, slot: u32, d: usize) -> Result<(), (i32, bool)> {
        let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        let pool = self.pool();
        let c = self.slots[slot as usize].conn.as_mut().expect("live slot");
        let up = c.upstream.as_ref().expect("connected upstream");
        let f = c.fast.as_mut().expect("fast");
        let (dst, cookie) = if d == TO_UPSTREAM {
            (up.as_fd(), f.cookies.0)
        } else {
            (c.client.as_fd(), f.cookies.1)
        };
        let fast = self.fast.as_mut().expect("sockmap engine");
        let counters = counters_of(fast, cookie)?;
        if counters.held != f.released[d] || f.window == u64::MAX {
            return Ok(()); // holding: its own event takes it from here
        }
        let total = match sent_total(dst) {
            Ok(t) => t,
            Err(e) if e.raw_os_error().is_none() => return Ok(()),
            Err(e) => return Err((errno(e), false)),
        };
        let delivered = total.saturating_sub(f.written[d]);
        let (allow, warn_at) = grant(f, d, counters.bytes, delivered, true, &pool);
        fast.set_flow(cookie, allow, warn_at, f.released[d])
            .map_err(|e| (errno(io::Error::other(e)), true))
    }

    /// Arms the re-check of direction `d`'s flow control: POLLOUT on the destination when it is
    /// full (`writable`), else a short timer (growing while the destination lags).
    pub(super) fn fast_wait(&mut self, slot: u32, d: usize, writable: bool) -> Forward {
        let f = self.fast_conn(slot);
        f.waiting[d] = true;
        let e = if writable {
            let (_, dst) = self.fds(slot, d);
            opcode::PollAdd::new(types::Fd(dst), libc::POLLOUT as u32)
                .build()
                .user_data(self.ud(slot, Op::PollOut, d))
        } else {
            let f = self.fast_conn(slot);
            let wait = usize::from(f.forward_waits[d]).min(DRAIN_WAITS_MS.len() - 1);
            f.forward_waits[d] = f.forward_waits[d].saturating_add(1);
            opcode::Timeout::new(&self.drain_waits[wait])
                .build()
                .user_data(self.ud(slot, Op::Forward, d))
        };
        self.conn(slot).inflight += 1;
        self.push(&[e]);
        Forward::Waiting
    }

    /// A flow-control re-check of direction `d` is due (timer, or the destination is writable).
    pub(super) fn on_forward(&mut self, slot: u32, d: usize) {
        if self.conn(slot).s.is_closing() || self.conn(slot).dirs[d].done {
            return;
        }
        self.fast_conn(slot).waiting[d] = false;
        self.fast_step(slot, d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::uring::fast::FastConn;

    /// What the kernel can queue for a direction under an allowance: everything redirected up
    /// to `allow` that the destination has not taken.
    fn exposure(f: &FastConn, d: usize, delivered: u64) -> u64 {
        f.allow[d] - delivered
    }

    #[test]
    fn a_grant_keeps_the_kernel_queue_within_the_window_and_the_pool() {
        const MIB: u64 = 1 << 20;
        const K: u64 = FIRST_GRANT;
        let shared = crate::metrics::Shared::new().unwrap();
        let pool = Pool {
            shared: &shared,
            row: shared.worker(0),
            worker: 0,
            limit: 10 * MIB,
        };
        let used = || shared.supervisor_get(Counter::FastPathReservedBytes);
        let mut a = FastConn::new(4 * MIB);
        // A fresh direction starts small: too small to be warned of half-way (it runs out, and
        // the worker forwards and grows it).
        const { assert!(K < 2 * MIN_WARN) };
        let (allow, warn) = grant(&mut a, 0, 0, 0, false, &pool);
        assert_eq!((allow, warn), (K, u64::MAX));
        assert_eq!(used(), K);
        // Each time it runs out or half of it is used, it doubles past what the destination
        // took, up to the window; what the kernel can queue never exceeds the reservation, and
        // once the allowance is large enough the verdict warns half-way.
        let mut bytes = 0;
        let mut delivered = 0;
        let mut warn = u64::MAX;
        for _ in 0..10 {
            bytes = a.allow[0] - a.reserved[0] / 2;
            warn = grant(&mut a, 0, bytes, delivered, true, &pool).1;
            assert!(exposure(&a, 0, delivered) <= a.reserved[0]);
            assert!(a.reserved[0] <= 4 * MIB);
        }
        assert_eq!(a.reserved[0], 4 * MIB, "grown to its window");
        assert_eq!(warn, bytes + (a.allow[0] - bytes) / 2, "warned half-way");
        assert_eq!(used(), 4 * MIB, "nothing more reserved than the window");
        // The destination took 1 MiB: the allowance slides by that, no further.
        let before = a.allow[0];
        delivered += MIB;
        let (allow, _) = grant(&mut a, 0, bytes, delivered, true, &pool);
        assert_eq!(allow, before + MIB);
        assert_eq!(exposure(&a, 0, delivered), 4 * MIB);
        // The destination took nothing more: the allowance does not move, and never back.
        assert_eq!(grant(&mut a, 0, allow, delivered, true, &pool).0, allow);
        // Others take what is left of the pool, then none of it.
        let mut b = FastConn::new(4 * MIB);
        b.ramp = [4 * MIB; 2];
        assert_eq!(grant(&mut b, 0, 0, 0, false, &pool).0, 4 * MIB);
        assert_eq!(grant(&mut b, 1, 0, 0, false, &pool).0, 2 * MIB);
        let mut c = FastConn::new(4 * MIB);
        let (allow, warn) = grant(&mut c, 0, 0, 0, false, &pool);
        assert_eq!(
            (allow, warn),
            (0, u64::MAX),
            "held at once: the worker forwards"
        );
        assert_eq!(used(), 10 * MIB);
        assert!(shared.get(0, Counter::FastPathBudgetShort) >= 2);
        // The first direction's destination caught up: what it took goes back to the pool and
        // comes back to it as a full window past it.
        let all = a.allow[0];
        let (allow, _) = grant(&mut a, 0, all, all, true, &pool);
        assert_eq!(allow, all + 4 * MIB);
        assert_eq!(used(), 10 * MIB);
        // Given back (an idle direction, under pressure): another direction's next grant gets it.
        pool.give(a.reserved[0]);
        a.reserved[0] = 0;
        let (allow, _) = grant(&mut c, 0, 100, 100, true, &pool);
        assert_eq!(allow, 100 + 2 * K);
        assert!(used() <= pool.limit);
        // Without flow control nothing is reserved.
        let mut free = FastConn::new(u64::MAX);
        assert_eq!(grant(&mut free, 0, 0, 0, true, &pool), (u64::MAX, u64::MAX));
    }
}
