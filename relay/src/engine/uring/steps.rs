//! Carrying out what a connection's [`Session`] decides: every event handler reports to the
//! session through [`Worker::drive`], and [`Worker::apply`] turns its answer into submissions.

use super::Worker;
use super::conn::{Dir, Mode, TO_UPSTREAM};
use super::tls::TlsSide;
use crate::engine::Around;
use crate::engine::session::{Session, Step};

impl<'a> Worker<'a> {
    /// Runs `f` on slot `slot`'s session with the worker around it ([`Around`]).
    pub(super) fn drive(
        &mut self,
        slot: u32,
        f: impl FnOnce(&mut Session, &mut Around<'_, 'a>) -> Step,
    ) -> Step {
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return Step::Wait;
        };
        let mut env = Around {
            ctx: &self.ctx,
            upstreams: &self.upstreams,
            now_ms: self.now_ms,
        };
        f(&mut conn.s, &mut env)
    }

    /// Carries out a session's step.
    pub(super) fn apply(&mut self, slot: u32, step: Step) {
        match step {
            Step::Wait => {}
            Step::ReadHeader | Step::Sniff => self.poll_header(slot),
            Step::StartTls => self.start_tls(slot),
            Step::Connect(addr) => self.connect(slot, addr),
            Step::Relay(send) => self.start_relay(slot, send),
            Step::Close(close) => {
                if close.close_notify {
                    self.close_notify_now(slot);
                }
                self.shut(slot, close.reset);
            }
        }
    }

    /// A TLS session with the client under the listener's certificate; its handshake records
    /// come and go through the copy path.
    fn start_tls(&mut self, slot: u32) {
        let listener = self.conn(slot).s.listener();
        let accepted = self.ctx.tls[listener]
            .as_ref()
            .map(|server| server.accept());
        match accepted {
            Some(Ok(conn)) => {
                let c = self.conn(slot);
                c.tls = Some(Box::new(TlsSide {
                    conn,
                    out: Default::default(),
                }));
                c.dirs = [Dir::new(Mode::Copy), Dir::new(Mode::Copy)];
                self.start_read(slot, TO_UPSTREAM);
            }
            other => {
                // Never relay a TLS port's bytes as plaintext: no certificate, no service.
                if let Some(Err(e)) = other {
                    tracing::warn!("tls session refused: {e}");
                }
                let step = self.drive(slot, |s, env| s.tls_refused(env));
                self.apply(slot, step);
            }
        }
    }
}
