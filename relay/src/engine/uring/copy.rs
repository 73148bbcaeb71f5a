//! Copy directions: multishot RECV into the worker's buffer ring, SEND of each filled buffer
//! ([`crate::engine::copy`]).

use io_uring::{cqueue, opcode, types};

use super::Worker;
use super::conn::Phase;
use super::user_data::{Op, UserData};
use crate::engine::copy::{self, Lent};

impl Worker<'_> {
    pub(super) fn on_recv(&mut self, slot: u32, d: usize, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        if self.conn(slot).tls.is_some() {
            self.on_tls_recv(slot, d, res, flags);
            return;
        }
        if let Some(buf) = self.bufs.lend(flags) {
            if res > 0 && !self.conn(slot).s.is_closing() {
                self.moved(slot, d, res as u64);
                let dir = &mut self.conn(slot).dirs[d];
                dir.queue.push_back((buf, res as u32));
                if !dir.sending {
                    self.send_front(slot, d);
                }
            } else {
                self.recycle(buf);
            }
        }
        if !more {
            self.conn(slot).dirs[d].recv_armed = false;
        }
        if self.conn(slot).s.is_closing() {
            return;
        }
        match res {
            0 => {
                self.conn(slot).dirs[d].eof = true;
                self.after_send(slot, d);
            }
            n if n > 0 => {
                let dir = &self.conn(slot).dirs[d];
                if dir.queue.len() >= copy::MAX_QUEUED && dir.recv_armed && !dir.paused {
                    self.pause_recv(slot, d);
                } else if !more {
                    self.rearm_recv(slot, d);
                }
            }
            e if -e == libc::ENOBUFS => self.starve(slot, d),
            e if -e == libc::ECANCELED => self.rearm_recv(slot, d),
            e => self.fail(slot, d, -e, true),
        }
    }

    /// Backpressure: cancels direction `d`'s multishot RECV until its destination drains
    /// ([`Worker::rearm_recv`] arms it again once there is room).
    pub(super) fn pause_recv(&mut self, slot: u32, d: usize) {
        self.conn(slot).dirs[d].paused = true;
        let target = self.ud(slot, Op::RecvMulti, d);
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target))
            .build()
            .user_data(UserData::global(Op::Cancel, 0));
        self.push(&[e]);
    }

    /// The buffer ring was empty (RECV ended with ENOBUFS): direction `d` waits for a recycled
    /// buffer ([`Worker::recycle`] re-arms it).
    pub(super) fn starve(&mut self, slot: u32, d: usize) {
        let generation = self.slots[slot as usize].generation;
        self.conn(slot).dirs[d].starved = true;
        self.starved.push_back((slot, generation, d as u8));
    }

    /// Re-arms a copy direction's RECV if nothing stands in the way.
    pub(super) fn rearm_recv(&mut self, slot: u32, d: usize) {
        let dir = &self.conn(slot).dirs[d];
        if dir.recv_armed || dir.eof || dir.starved || dir.queue.len() >= copy::MAX_QUEUED {
            return;
        }
        self.start_read(slot, d);
    }

    pub(super) fn send_front(&mut self, slot: u32, d: usize) {
        let (_, dst) = self.fds(slot, d);
        let ud = self.ud(slot, Op::Send, d);
        let c = self.slots[slot as usize].conn.as_ref().expect("live slot");
        let dir = &c.dirs[d];
        let Some((buf, len)) = dir.queue.front() else {
            return;
        };
        let e = copy::send(&self.bufs, dst, buf, dir.sent, *len).user_data(ud);
        let c = self.conn(slot);
        c.dirs[d].sending = true;
        c.inflight += 1;
        self.push(&[e]);
    }

    /// What every SEND completion does first: nothing more once closing, fail on an error,
    /// count the activity. Some(bytes sent) when the caller should go on.
    pub(super) fn send_done(&mut self, slot: u32, d: usize, res: i32) -> Option<u32> {
        if self.conn(slot).s.is_closing() {
            return None;
        }
        if res < 0 {
            self.fail(slot, d, -res, false);
            return None;
        }
        self.touch(slot);
        Some(res as u32)
    }

    pub(super) fn on_send(&mut self, slot: u32, d: usize, res: i32) {
        self.conn(slot).dirs[d].sending = false;
        let Some(n) = self.send_done(slot, d, res) else {
            return;
        };
        let dir = &mut self.conn(slot).dirs[d];
        let len = dir
            .queue
            .front()
            .expect("a SEND completes the front buffer")
            .1;
        dir.sent += n;
        if dir.sent < len {
            self.send_front(slot, d);
            return;
        }
        dir.sent = 0;
        let (buf, _) = dir.queue.pop_front().expect("checked above");
        self.recycle(buf);
        if self.conn(slot).s.is_closing() {
            return;
        }
        self.after_send(slot, d);
    }

    /// After a SEND finished or the source ended: send the next buffer, re-arm, or forward FIN.
    pub(super) fn after_send(&mut self, slot: u32, d: usize) {
        let dir = &self.conn(slot).dirs[d];
        if dir.sending {
            return;
        }
        if !dir.queue.is_empty() {
            self.send_front(slot, d);
        } else if dir.eof {
            if !dir.done {
                self.source_done(slot, d);
            }
        } else {
            self.rearm_recv(slot, d);
        }
    }

    pub(super) fn recycle(&mut self, buf: Lent) {
        self.bufs.recycle(buf);
        // A buffer is free again: wake one direction that ran out.
        while let Some((slot, generation, d)) = self.starved.pop_front() {
            let live = self.slots.get(slot as usize).is_some_and(|s| {
                s.generation == generation
                    && s.conn
                        .as_ref()
                        .is_some_and(|c| c.s.phase() == Phase::Relaying)
            });
            if live {
                self.conn(slot).dirs[d as usize].starved = false;
                self.rearm_recv(slot, d as usize);
                break;
            }
        }
    }
}
