//! Splice directions: socket → pipe → socket with splice(2) on readiness ([`crate::engine::splice`]).

use std::io;

use io_uring::{opcode, types};

use super::Worker;
use super::conn::{Mode, Phase};
use super::user_data::Op;
use crate::engine::splice;
use crate::metrics::Counter;

/// Splice with splice(2) on readiness in this thread, instead of io_uring SPLICE operations
/// (which always run in io-wq threads: a thread handoff per operation).
pub(super) const SPLICE_INLINE: bool = true;

/// Socket → pipe → socket rounds per readiness event before yielding to other connections.
pub(super) const SPLICE_ROUNDS: usize = 16;

impl Worker<'_> {
    pub(super) fn on_poll_in(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        if res < 0 {
            self.fail(slot, d, -res, true);
            return;
        }
        if self.conn(slot).dirs[d].pipe.is_none() {
            match self.pipes.take() {
                Some(p) => {
                    self.conn(slot).dirs[d].pipe = Some(p);
                    self.ctx.row.inc(Counter::PipesInUse);
                }
                None => {
                    // The pool is empty: this direction copies from now on.
                    self.ctx.row.inc(Counter::PipePoolEmpty);
                    self.conn(slot).dirs[d].mode = Mode::Copy;
                    self.start_read(slot, d);
                    return;
                }
            }
        }
        if SPLICE_INLINE {
            self.splice_now(slot, d);
        } else {
            self.splice_in(slot, d);
        }
    }

    /// Moves a direction's bytes with splice(2) called right here, on readiness (no io-wq hop):
    /// socket → pipe → socket until the source is empty (EAGAIN: the pipe goes back to the pool
    /// and POLLIN is armed), the destination is full (POLLOUT is armed, the pipe is kept), or a
    /// round limit is reached (fairness: re-armed, it fires again at once).
    pub(super) fn splice_now(&mut self, slot: u32, d: usize) {
        let (src, dst) = self.fds(slot, d);
        for _ in 0..SPLICE_ROUNDS {
            let dir = &mut self.conn(slot).dirs[d];
            let pipe = dir.pipe.as_ref().expect("splicing holds a pipe");
            if dir.in_pipe > 0 {
                match splice::splice_now(pipe.read_end(), dst, dir.in_pipe) {
                    Ok(n) => {
                        dir.in_pipe -= n as u32;
                        self.touch(slot);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        return self.fail(slot, d, e.raw_os_error().unwrap_or(libc::EIO), false);
                    }
                }
                if self.conn(slot).dirs[d].in_pipe > 0 {
                    return self.wait_writable(slot, d);
                }
                continue;
            }
            let size = pipe.size();
            match splice::splice_now(src, pipe.write_end(), size) {
                Ok(0) => {
                    self.return_pipe(slot, d);
                    return self.source_done(slot, d);
                }
                Ok(n) => {
                    self.moved(slot, d, n as u64);
                    self.conn(slot).dirs[d].in_pipe = n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.return_pipe(slot, d);
                    return self.start_read(slot, d);
                }
                Err(e) => return self.fail(slot, d, e.raw_os_error().unwrap_or(libc::EIO), true),
            }
        }
        if self.conn(slot).dirs[d].in_pipe > 0 {
            self.wait_writable(slot, d);
        } else {
            self.start_read(slot, d);
        }
    }

    pub(super) fn splice_in(&mut self, slot: u32, d: usize) {
        let (src, _) = self.fds(slot, d);
        let ud = self.ud(slot, Op::SpliceIn, d);
        let c = self.conn(slot);
        let pipe = c.dirs[d].pipe.as_ref().expect("splice_in holds a pipe");
        let e = splice::splice_in(src, pipe).user_data(ud);
        c.inflight += 1;
        self.push(&[e]);
    }

    pub(super) fn splice_out(&mut self, slot: u32, d: usize) {
        let (_, dst) = self.fds(slot, d);
        let ud = self.ud(slot, Op::SpliceOut, d);
        let c = self.conn(slot);
        let dir = &c.dirs[d];
        let pipe = dir.pipe.as_ref().expect("splice_out holds a pipe");
        let e = splice::splice_out(pipe, dst, dir.in_pipe).user_data(ud);
        c.inflight += 1;
        self.push(&[e]);
    }

    pub(super) fn return_pipe(&mut self, slot: u32, d: usize) {
        if let Some(p) = self.conn(slot).dirs[d].pipe.take() {
            self.pipes.give(p);
            self.ctx.row.dec(Counter::PipesInUse);
        }
    }

    pub(super) fn on_splice_in(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        match res {
            n if n > 0 => {
                self.moved(slot, d, n as u64);
                self.conn(slot).dirs[d].in_pipe = n as u32;
                self.splice_out(slot, d);
            }
            0 => {
                self.return_pipe(slot, d);
                self.source_done(slot, d);
            }
            e if -e == libc::EAGAIN => {
                // Nothing more for now: the pipe is empty, give it back and wait.
                self.return_pipe(slot, d);
                self.start_read(slot, d);
            }
            e => self.fail(slot, d, -e, true),
        }
    }

    pub(super) fn on_splice_out(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        match res {
            n if n > 0 => {
                self.touch(slot);
                let dir = &mut self.conn(slot).dirs[d];
                dir.in_pipe -= n as u32;
                if dir.in_pipe > 0 {
                    self.wait_writable(slot, d);
                } else {
                    // Drained: read more right away (bulk transfers rarely stop here).
                    self.splice_in(slot, d);
                }
            }
            e if -e == libc::EAGAIN || e == 0 => self.wait_writable(slot, d),
            e => self.fail(slot, d, -e, false),
        }
    }

    pub(super) fn wait_writable(&mut self, slot: u32, d: usize) {
        let (_, dst) = self.fds(slot, d);
        let e = opcode::PollAdd::new(types::Fd(dst), libc::POLLOUT as u32)
            .build()
            .user_data(self.ud(slot, Op::PollOut, d));
        self.conn(slot).inflight += 1;
        self.push(&[e]);
    }

    pub(super) fn on_poll_out(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        if res < 0 || res & (libc::POLLERR | libc::POLLHUP) as i32 != 0 {
            let errno = if res < 0 { -res } else { libc::EPIPE };
            self.fail(slot, d, errno, false);
            return;
        }
        if SPLICE_INLINE {
            self.splice_now(slot, d);
        } else {
            self.splice_out(slot, d);
        }
    }
}
