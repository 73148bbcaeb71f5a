//! Submission: how entries reach the kernel's submission queue.

use io_uring::squeue;

use super::Worker;

impl Worker<'_> {
    /// Queues a submission, flushing the queue to the kernel first when it is full.
    pub(super) fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: every entry built in this module points only at memory that outlives its
            // completion: the worker's own boxes (`tick`, `connect_timeout`, `control_buf`), the
            // buffer ring (lives as long as the ring), or a slot's boxed connect address / lent
            // buffer / pipe, which stay until the slot's `inflight` count returns to zero.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            if let Err(err) = self.ring.submit()
                && err.raw_os_error() != Some(libc::EBUSY)
            {
                tracing::error!("io_uring submit failed: {err}");
            }
        }
    }
}
