//! Submission: the one way entries reach the kernel's submission queue.
//!
//! Entries go in as chains: every entry but the last carries `IO_LINK` (or the chain is one
//! entry). A chain is pushed whole or not at all, so a submit never hands the kernel a linked
//! operation without what is linked to it (a CONNECT without its LINK_TIMEOUT would run with no
//! time limit). When the queue lacks room for a whole chain, what it holds is submitted first.
//!
//! When the kernel takes nothing (EBUSY: it wants completions reaped first; or any other error),
//! the chain waits in a backlog instead of a retry loop: a completion handler that loops until
//! the kernel takes an entry never returns, since only the run loop reaps completions. The run
//! loop flushes the backlog, in order, after each batch of completions. While a backlog exists
//! new chains queue behind it, so submissions keep their order (a cancel never overtakes the
//! operation it cancels). Entries in the backlog are counted in their slot's `inflight` like
//! submitted ones, so what they point at stays alive until they complete.

use std::collections::VecDeque;
use std::io;

use io_uring::{IoUring, cqueue, squeue};

use super::Worker;

/// The worker's ring and the chains the kernel could not take yet.
pub(super) struct Ring {
    uring: IoUring,
    backlog: VecDeque<Vec<squeue::Entry>>,
    /// The errnos a failed submit was logged for (each once).
    logged: Vec<i32>,
}

impl Ring {
    pub(super) fn new(uring: IoUring) -> Ring {
        Ring {
            uring,
            backlog: VecDeque::new(),
            logged: Vec::new(),
        }
    }

    /// Queues `chain` whole: into the submission queue (submitting what it holds first if it
    /// lacks room for every entry), else at the end of the backlog.
    ///
    /// # Safety
    ///
    /// Every entry of `chain` points only at memory that stays valid until its completion
    /// arrives.
    pub(super) unsafe fn push(&mut self, chain: &[squeue::Entry]) {
        debug_assert!(
            !chain.is_empty() && chain.len() <= self.uring.params().sq_entries() as usize
        );
        if self.backlog.is_empty() && self.room_for(chain.len()) {
            // SAFETY: the caller's promise; `push_multiple` pushes every entry or none.
            unsafe { self.uring.submission().push_multiple(chain) }.expect("room checked");
            return;
        }
        self.backlog.push_back(chain.to_vec());
    }

    /// Moves backlogged chains, in order, into the submission queue as far as there is room
    /// (the run loop calls this after reaping completions).
    pub(super) fn flush(&mut self) {
        while let Some(n) = self.backlog.front().map(Vec::len) {
            if !self.room_for(n) {
                return;
            }
            let chain = self.backlog.pop_front().expect("checked above");
            // SAFETY: `push`'s caller promised the entries' memory lives until their completion,
            // which has not come: they were never submitted.
            unsafe { self.uring.submission().push_multiple(&chain) }.expect("room checked");
        }
    }

    /// Chains waiting for room.
    #[cfg(test)]
    fn backlogged(&self) -> usize {
        self.backlog.len()
    }

    /// Submits what is queued and waits for `want` completions.
    pub(super) fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        self.uring.submit_and_wait(want)
    }

    /// The completions that arrived.
    pub(super) fn completion(&mut self) -> cqueue::CompletionQueue<'_> {
        self.uring.completion()
    }

    /// Whether the submission queue has room for `n` entries, after submitting what it holds
    /// when it has not.
    fn room_for(&mut self, n: usize) -> bool {
        if self.free() >= n {
            return true;
        }
        if let Err(e) = self.uring.submit() {
            let errno = e.raw_os_error().unwrap_or(0);
            if errno != libc::EINTR && !self.logged.contains(&errno) {
                self.logged.push(errno);
                tracing::error!(
                    "io_uring submit failed: {e}; submissions wait until completions are reaped \
                     (logged once)"
                );
            }
        }
        self.free() >= n
    }

    fn free(&mut self) -> usize {
        let sq = self.uring.submission();
        sq.capacity() - sq.len()
    }
}

impl Worker<'_> {
    /// Queues one chain of submissions: a single entry, or entries linked with `IO_LINK`, which
    /// go to the kernel together ([`Ring::push`]).
    pub(super) fn push(&mut self, chain: &[squeue::Entry]) {
        // SAFETY: every entry built in this module points only at memory that outlives its
        // completion: the worker's own boxes (`tick`, `connect_timeout`, `control_buf`), the
        // buffer ring (lives as long as the ring), or a slot's boxed connect address / lent
        // buffer / pipe, which stay until the slot's `inflight` count returns to zero (an entry
        // waiting in the backlog is counted there too).
        unsafe { self.ring.push(chain) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, types};

    fn nop(ud: u64) -> squeue::Entry {
        opcode::Nop::new().build().user_data(ud)
    }

    /// Every completion until `n` arrived: (user data, result), in arrival order.
    fn reap(ring: &mut Ring, n: usize) -> Vec<(u64, i32)> {
        let mut got = Vec::new();
        while got.len() < n {
            ring.submit_and_wait(1).unwrap();
            got.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        }
        got
    }

    #[test]
    fn a_linked_chain_is_never_split_by_a_full_queue() {
        let mut ring = Ring::new(IoUring::new(4).unwrap());
        let timeout = types::Timespec::new().sec(10);
        // SAFETY: NOPs point at nothing; the LINK_TIMEOUT points at `timeout`, which outlives
        // every completion reaped below.
        unsafe {
            for ud in 0..3 {
                ring.push(&[nop(ud)]);
            }
            // One free entry: the chain must not go in half.
            ring.push(&[
                nop(10).flags(squeue::Flags::IO_LINK),
                opcode::LinkTimeout::new(&timeout).build().user_data(11),
            ]);
        }
        assert_eq!(
            ring.uring.submission().len(),
            2,
            "the whole chain, queued together"
        );
        let got = reap(&mut ring, 5);
        // A LINK_TIMEOUT submitted without the operation it is linked to fails with EINVAL;
        // linked to the NOP it is cancelled when the NOP completes.
        let t = got
            .iter()
            .find(|c| c.0 == 11)
            .expect("the timeout completed");
        assert_eq!(t.1, -libc::ECANCELED, "{got:?}");
    }

    #[test]
    fn chains_wait_in_order_while_the_kernel_refuses_submissions() {
        // A disabled ring refuses every submit (EBADFD) until it is enabled: pushing must
        // neither spin nor reorder.
        let uring = IoUring::builder().setup_r_disabled().build(4).unwrap();
        let mut ring = Ring::new(uring);
        let timeout = types::Timespec::new().sec(10);
        // SAFETY: as above.
        unsafe {
            for ud in 0..3 {
                ring.push(&[nop(ud)]);
            }
            ring.push(&[
                nop(10).flags(squeue::Flags::IO_LINK),
                opcode::LinkTimeout::new(&timeout).build().user_data(11),
            ]);
            // Would fit in the queue, but goes behind the waiting chain.
            ring.push(&[nop(12)]);
        }
        assert_eq!(ring.backlogged(), 2);
        assert_eq!(ring.uring.submission().len(), 3);
        ring.flush();
        assert_eq!(ring.backlogged(), 2, "still refused: nothing moved");
        ring.uring.submitter().register_enable_rings().unwrap();
        ring.flush();
        assert_eq!(ring.backlogged(), 0);
        assert_eq!(
            ring.uring.submission().len(),
            3,
            "the chain and the NOP behind it"
        );
        let got = reap(&mut ring, 6);
        let at = |ud| got.iter().position(|c| c.0 == ud).expect("completed");
        assert_eq!((at(0), at(1), at(2)), (0, 1, 2), "{got:?}");
        assert!(at(10) < at(12), "{got:?}");
        assert_eq!(got[at(11)].1, -libc::ECANCELED, "{got:?}");
    }
}
