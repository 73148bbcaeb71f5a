//! From ACCEPT to the session's first decision: admission, the PROXY header, the first bytes
//! (SNI routing, decoy sniffing), each handed to the connection's [`Session`].

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use io_uring::{opcode, types};

use super::Worker;
use super::conn::{Conn, Dir, Mode, Phase};
use super::user_data::{Op, UserData};
use crate::engine::session::{ConnectTimer, Header, Session, Source};
use crate::engine::{EngineKind, HeaderStep, SNI_PEEK_MAX};
use crate::metrics::Counter;

impl Worker<'_> {
    /// Arms a multishot ACCEPT on every listener that has none, unless paused or draining.
    pub(super) fn arm_accepts(&mut self) {
        if self.accept_paused || self.draining {
            return;
        }
        for i in 0..self.listeners.len() {
            if self.accept_armed[i] {
                continue;
            }
            self.accept_armed[i] = true;
            let e = opcode::AcceptMulti::new(types::Fd(self.listeners[i].as_raw_fd()))
                .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                .build()
                .user_data(UserData::global(Op::AcceptMulti, i as u32));
            self.push(&[e]);
        }
    }

    /// Stops accepting (this worker is at its fd capacity, or draining); other workers take the
    /// new connections meanwhile.
    pub(super) fn pause_accepts(&mut self) {
        if self.accept_paused {
            return;
        }
        self.accept_paused = true;
        for i in 0..self.listeners.len() {
            if !self.accept_armed[i] {
                continue;
            }
            let target = UserData::global(Op::AcceptMulti, i as u32);
            let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target).all())
                .build()
                .user_data(UserData::global(Op::Cancel, 0));
            self.push(&[e]);
        }
    }

    pub(super) fn on_accept(&mut self, listener: usize, client: OwnedFd) {
        self.ctx.row.inc(Counter::Accepted);
        let client_slot = match self.ctx.admit(listener, &self.upstreams, client.as_fd()) {
            Ok(s) => s,
            Err(r) => {
                self.ctx.count_refusal(r);
                crate::engine::set_reset_on_close(&client);
                return; // dropping `client` closes it: the refusal the client sees
            }
        };
        let mode = match self.kind {
            EngineKind::Copy | EngineKind::Epoll => Mode::Copy,
            EngineKind::Splice | EngineKind::Sockmap => Mode::Splice,
        };
        let start = self.upstreams.start(listener);
        let conn = Conn {
            // Each attempt is bounded by its LINK_TIMEOUT (`connect.rs`).
            s: Session::new(listener, start, ConnectTimer::Engine, self.now_ms),
            client_slot,
            client,
            upstream: None,
            inflight: 0,
            connect_addr: None,
            dirs: [Dir::new(mode), Dir::new(mode)],
            bytes: [0, 0],
            inbound: None,
            tls: None,
            times: self.ctx.histos.accepted(),
            fast: None,
        };
        let slot = self.insert(conn);
        self.ctx.row.listener_open(listener);
        let step = self.drive(slot, |s, env| s.begin(env));
        self.apply(slot, step);
        self.maybe_free(slot);
    }

    /// Waits for the client's socket to be readable (its PROXY header, its first bytes).
    pub(super) fn poll_header(&mut self, slot: u32) {
        let fd = self.conn(slot).client.as_raw_fd();
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(self.ud(slot, Op::HeaderPoll, 0));
        self.conn(slot).inflight += 1;
        self.push(&[e]);
    }

    pub(super) fn on_header_poll(&mut self, slot: u32, res: i32) {
        let phase = self.conn(slot).s.phase();
        if phase != Phase::Header && phase != Phase::Sni {
            return;
        }
        if res < 0 {
            return self.close(slot, true);
        }
        if phase == Phase::Sni {
            return self.on_sni_readable(slot);
        }
        let c = self.conn(slot);
        let inbound = c.inbound.get_or_insert_with(Box::default);
        let read = match crate::engine::read_proxy_header(c.client.as_fd(), &mut inbound.acc) {
            HeaderStep::More => return self.poll_header(slot),
            HeaderStep::Done(h) => {
                inbound.acc = Vec::new();
                inbound.header = Some(h);
                let listener = c.s.listener();
                // The fields apart, so the connection's socket is lent while `ctx` is read.
                let client = self.slots[slot as usize]
                    .conn
                    .as_ref()
                    .expect("a live slot has a connection")
                    .client
                    .as_fd();
                match self.ctx.admit_proxied(listener, &h, client) {
                    Ok(client_slot) => {
                        self.conn(slot).client_slot = client_slot;
                        Header::Admitted
                    }
                    Err(_) => Header::Refused,
                }
            }
            HeaderStep::Bad => Header::Bad,
        };
        let step = self.drive(slot, |s, env| s.header(env, read));
        self.apply(slot, step);
    }

    /// The first bytes decide (plain ports routed by SNI, and ports with a decoy): they are
    /// read (kept, to be sent first) until the session has what it needs. A TLS port with a
    /// decoy only peeks at the first byte; a probe's bytes are read to go to the decoy as they
    /// came.
    fn on_sni_readable(&mut self, slot: u32) {
        let listener = self.conn(slot).s.listener();
        let tls_port = self.ctx.config.listeners[listener].tls.is_some();
        let c = self.conn(slot);
        let step = if tls_port {
            let first = crate::engine::peek_tls_start(c.client.as_fd());
            if let Ok(Some(false)) = first {
                let acc = &mut c.inbound.get_or_insert_with(Box::default).acc;
                let _ = crate::engine::read_available(c.client.as_fd(), acc, SNI_PEEK_MAX);
            }
            self.drive(slot, |s, env| s.peeked(env, first))
        } else {
            let mut inbound = c.inbound.take().unwrap_or_default();
            let source = match crate::engine::read_available(
                c.client.as_fd(),
                &mut inbound.acc,
                SNI_PEEK_MAX,
            ) {
                Ok(false) => Source::Open,
                Ok(true) => Source::Ended,
                Err(_) => Source::Failed,
            };
            let step = self.drive(slot, |s, env| s.first_bytes(env, &inbound.acc, source));
            self.conn(slot).inbound = Some(inbound);
            step
        };
        self.apply(slot, step);
    }
}
