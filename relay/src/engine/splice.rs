//! The `splice` engine's parts: a bounded per-worker pool of pipes and splice(2).
//!
//! A direction takes a pipe when its source becomes readable, splices socket → pipe → socket
//! (the bytes never enter user space), and gives the pipe back as soon as it is empty and the
//! source has nothing more (EAGAIN): an idle connection holds no pipe. When the pool is empty the
//! direction relays with [`super::copy`] instead, so a burst of busy connections never fails.
//!
//! Invariant: a pipe in the pool is empty. A pipe that still holds bytes when its connection dies
//! is closed, not pooled. What a pipe holds is the lender's own count (what splice(2) said it
//! moved in and out: exact), not asked of the kernel each time (FIONREAD on every return cost a
//! syscall per message); debug builds check the two agree.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use crate::sys;

/// Pipes a worker holds at most (each costs 2 fds and up to [`PIPE_SIZE`] of kernel memory
/// while it holds bytes). Linux also caps pipe memory per user (pipe-user-pages-soft).
pub const PIPE_POOL_MAX: usize = 32;
/// Requested pipe capacity; 256 KiB moves a socket buffer's worth per splice(2).
pub const PIPE_SIZE: usize = 256 * 1024;

/// One pipe: bytes go in at `w` and out at `r`.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    size: u32,
}

impl Pipe {
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Is the pipe truly empty (what the pool's invariant needs)?
    pub fn is_empty(&self) -> bool {
        sys::pipe_pending(self.r.as_fd())
            .map(|n| n == 0)
            .unwrap_or(false)
    }
}

/// The bounded pool. Pipes are made on demand up to [`PIPE_POOL_MAX`] and kept when returned.
#[derive(Debug, Default)]
pub struct PipePool {
    free: Vec<Pipe>,
    /// Pipes that exist (free + lent out).
    made: usize,
}

impl PipePool {
    pub fn new() -> PipePool {
        PipePool::default()
    }

    /// An empty pipe, or None when all [`PIPE_POOL_MAX`] are lent out (or the kernel refuses).
    pub fn take(&mut self) -> Option<Pipe> {
        if let Some(p) = self.free.pop() {
            return Some(p);
        }
        if self.made >= PIPE_POOL_MAX {
            return None;
        }
        let (r, w, size) = sys::pipe(PIPE_SIZE).ok()?;
        self.made += 1;
        Some(Pipe {
            r,
            w,
            size: size as u32,
        })
    }

    /// Takes a pipe back that holds `held` bytes by the lender's count; one that still holds
    /// bytes is closed instead.
    pub fn give(&mut self, pipe: Pipe, held: u32) {
        debug_assert_eq!(
            held == 0,
            pipe.is_empty(),
            "the lender's count of a pipe is wrong"
        );
        if held == 0 {
            self.free.push(pipe);
        } else {
            self.made -= 1;
        }
    }

    /// Pipes lent out now.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.made - self.free.len()
    }
}

const FLAGS: u32 = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;

/// splice(2) from `from` to `to`, nonblocking, without io_uring: the calling thread moves up to
/// `len` bytes at once. Ok(0) is end of stream (from a socket).
pub fn splice_now(from: RawFd, to: RawFd, len: u32) -> std::io::Result<usize> {
    loop {
        // SAFETY: splice(2) with null offsets only reads and writes the kernel objects behind the
        // two fds; no user memory is involved.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len as usize,
                FLAGS,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Pipe {
    pub fn read_end(&self) -> RawFd {
        self.r.as_raw_fd()
    }

    pub fn write_end(&self) -> RawFd {
        self.w.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_bounded_and_reuses_pipes() {
        let mut pool = PipePool::new();
        let pipes: Vec<Pipe> = (0..PIPE_POOL_MAX).map(|_| pool.take().unwrap()).collect();
        assert!(pool.take().is_none(), "the pool is bounded");
        assert_eq!(pool.in_use(), PIPE_POOL_MAX);
        assert!(pipes[0].size() >= 64 * 1024);
        for p in pipes {
            pool.give(p, 0);
        }
        assert_eq!(pool.in_use(), 0);
        assert!(pool.take().is_some());
    }

    #[test]
    fn a_pipe_with_bytes_is_not_pooled() {
        let mut pool = PipePool::new();
        let p = pool.take().unwrap();
        let n = write_into(&p);
        assert_eq!(n, 3);
        pool.give(p, 3);
        assert_eq!(pool.in_use(), 0);
        assert!(pool.free.is_empty(), "a non-empty pipe is closed, not kept");
    }

    fn write_into(p: &Pipe) -> usize {
        use std::io::Write;
        let mut f = std::fs::File::from(p.w.try_clone().unwrap());
        f.write(b"abc").unwrap()
    }
}
