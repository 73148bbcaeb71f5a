//! Activity, accounting and the end of a connection: FIN forwarding, errors, close, free.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use io_uring::{opcode, types};

use super::Worker;
use super::conn::{TO_CLIENT, TO_UPSTREAM};
use super::user_data::{Op, UserData};
use crate::metrics::Counter;
use crate::sys;

impl Worker<'_> {
    /// Bytes went out: the connection is not idle (timeouts count inactivity either way).
    /// Before the relay starts (header, handshake, ClientHello) the phase's time limit counts
    /// from its start, so a client trickling bytes cannot hold a connection open.
    pub(super) fn touch(&mut self, slot: u32) {
        let now = self.now_ms;
        self.conn(slot).s.touch(now);
    }

    /// Histograms: the upstream connection is established.
    pub(super) fn record_connected(&mut self, slot: u32) {
        let c = self.slots[slot as usize].conn.as_mut().expect("live");
        self.ctx.histos.connected(c.s.listener(), &mut c.times);
    }

    pub(super) fn moved(&mut self, slot: u32, d: usize, n: u64) {
        self.touch(slot);
        if d == TO_CLIENT {
            let c = self.slots[slot as usize].conn.as_mut().expect("live");
            self.ctx.histos.upstream_bytes(c.s.listener(), &mut c.times);
        }
        let c = self.conn(slot);
        c.bytes[d] += n;
        self.ctx.row.add(
            if d == TO_UPSTREAM {
                Counter::BytesClientToUpstream
            } else {
                Counter::BytesUpstreamToClient
            },
            n,
        );
    }

    /// The source of `d` sent FIN and every byte was handed to the destination: forward it.
    pub(super) fn source_done(&mut self, slot: u32, d: usize) {
        let now = self.now_ms;
        let c = self.conn(slot);
        let dir = &mut c.dirs[d];
        dir.eof = true;
        dir.done = true;
        let dst = if d == TO_UPSTREAM {
            c.upstream.as_ref().map(|u| u.as_fd())
        } else {
            Some(c.client.as_fd())
        };
        if let Some(dst) = dst {
            crate::engine::shutdown_write(dst);
        }
        let step = c.s.finished(d, now);
        self.apply(slot, step);
    }

    /// An error on direction `d`: on its source (`at_source`) or its destination.
    pub(super) fn fail(&mut self, slot: u32, d: usize, errno: i32, at_source: bool) {
        let step = self.drive(slot, |s, env| s.failed(env, d, errno, at_source));
        self.apply(slot, step);
    }

    /// The engine ends the connection itself (an error the session has no word for, `sluicectl
    /// deny --kill-existing`): RST (`reset`) or FIN, through the session, once.
    pub(super) fn close(&mut self, slot: u32, reset: bool) {
        let step = self.conn(slot).s.close(reset);
        self.apply(slot, step);
    }

    /// Starts closing, as the session decided: cancels what is in flight; the slot is freed
    /// when the last completion arrives ([`Self::maybe_free`]). `reset` closes both sockets
    /// with RST.
    pub(super) fn shut(&mut self, slot: u32, reset: bool) {
        let c = self.conn(slot);
        if reset {
            crate::engine::set_reset_on_close(&c.client);
            if let Some(u) = &c.upstream {
                crate::engine::set_reset_on_close(u);
            }
        }
        if c.inflight > 0 {
            let fds: Vec<RawFd> = std::iter::once(c.client.as_raw_fd())
                .chain(c.upstream.as_ref().map(|u| u.as_raw_fd()))
                .collect();
            for fd in fds {
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                    .build()
                    .user_data(UserData::global(Op::Cancel, 0));
                self.push(&[e]);
            }
        }
    }

    /// Frees a closing slot whose last completion arrived: closes fds, returns pipes and
    /// buffers.
    pub(super) fn maybe_free(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        let ready = s
            .conn
            .as_ref()
            .is_some_and(|c| c.s.is_closing() && c.inflight == 0);
        if !ready {
            return;
        }
        let mut conn = s.conn.take().expect("checked above");
        let pool = self.pool();
        if let (Some(f), Some(fast)) = (conn.fast.take(), self.fast.as_mut()) {
            self.fast_cookies.remove(&f.cookies.0);
            self.fast_cookies.remove(&f.cookies.1);
            // Its sockets close now, and the kernel's queues for them with them.
            pool.give(f.reserved[0] + f.reserved[1]);
            self.sampled_queued -= f.sampled_queued[0] + f.sampled_queued[1];
            self.sampled_held -= f.sampled_held[0] + f.sampled_held[1];
            self.ctx
                .row
                .set(Counter::FastPathQueuedBytes, self.sampled_queued);
            self.ctx
                .row
                .set(Counter::FastPathHeldBytes, self.sampled_held);
            // Out of the maps before the sockets close; what the kernel moved is counted now.
            match fast.remove_pair(f.cookies) {
                Ok((from_client, from_upstream)) => {
                    conn.bytes[TO_UPSTREAM] += from_client.bytes;
                    conn.bytes[TO_CLIENT] += from_upstream.bytes;
                    if from_upstream.first_ns != 0 {
                        let ago_ns = sys::monotonic_ns().saturating_sub(from_upstream.first_ns);
                        self.ctx.histos.upstream_bytes_ago(
                            conn.s.listener(),
                            &mut conn.times,
                            ago_ns / 1000,
                        );
                    }
                    self.ctx
                        .row
                        .add(Counter::BytesClientToUpstream, from_client.bytes);
                    self.ctx
                        .row
                        .add(Counter::BytesUpstreamToClient, from_upstream.bytes);
                }
                Err(e) => tracing::warn!("cannot take a connection off the fast path: {e}"),
            }
        }
        self.free.push(slot);
        self.active -= 1;
        self.ctx.row.listener_close(conn.s.listener());
        self.ctx.release(conn.client_slot);
        self.ctx.row.inc(Counter::Closed);
        self.ctx
            .histos
            .closed(conn.s.listener(), &conn.times, conn.bytes);
        for dir in &mut conn.dirs {
            if let Some(p) = dir.pipe.take() {
                self.pipes.give(p, dir.in_pipe);
                self.ctx.row.dec(Counter::PipesInUse);
            }
            for (buf, _) in dir.queue.drain(..) {
                self.bufs.recycle(buf);
            }
        }
        // Dropping `conn` closes both sockets (with RST when `reset` set linger 0).
    }
}
