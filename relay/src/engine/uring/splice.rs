//! Splice directions: socket → pipe → socket with splice(2) on readiness
//! ([`crate::engine::splice`]).

use std::io;

use io_uring::{opcode, types};

use super::Worker;
use super::conn::Mode;
use super::user_data::Op;
use crate::engine::splice;
use crate::metrics::Counter;

/// Socket → pipe → socket rounds per readiness event before yielding to other connections.
pub(super) const SPLICE_ROUNDS: usize = 16;

impl Worker<'_> {
    pub(super) fn on_poll_in(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).s.is_closing() {
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
        self.splice_now(slot, d);
    }

    /// Moves a direction's bytes with splice(2) called right here, on readiness (no io-wq hop):
    /// socket → pipe → socket until the source is empty (EAGAIN, or a read that did not fill the
    /// pipe: the pipe goes back to the pool and POLLIN is armed), the destination is full
    /// (POLLOUT is armed, the pipe is kept), or a round limit is reached (fairness: re-armed, it
    /// fires again at once).
    ///
    /// A read shorter than the pipe took everything the socket had: a chat message is one read
    /// and one write, with no third splice to learn what the poll re-armed next tells anyway (a
    /// poll armed on a socket that is readable again completes at once).
    pub(super) fn splice_now(&mut self, slot: u32, d: usize) {
        let (src, dst) = self.fds(slot, d);
        let mut drained = false;
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
                if drained {
                    self.return_pipe(slot, d);
                    return self.start_read(slot, d);
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
                    drained = (n as u32) < size;
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

    pub(super) fn return_pipe(&mut self, slot: u32, d: usize) {
        let dir = &mut self.conn(slot).dirs[d];
        if let Some(p) = dir.pipe.take() {
            let held = dir.in_pipe;
            self.pipes.give(p, held);
            self.ctx.row.dec(Counter::PipesInUse);
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
        if self.conn(slot).s.is_closing() {
            return;
        }
        if res < 0 || res & (libc::POLLERR | libc::POLLHUP) as i32 != 0 {
            let errno = if res < 0 { -res } else { libc::EPIPE };
            self.fail(slot, d, errno, false);
            return;
        }
        self.splice_now(slot, d);
    }
}
