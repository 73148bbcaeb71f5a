//! From ACCEPT to CONNECT: admission, the PROXY header, the first bytes (SNI routing, decoy
//! sniffing), and the start of a TLS handshake.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use io_uring::{opcode, types};

use super::Worker;
use super::conn::{Conn, Dir, Mode, Phase, TO_UPSTREAM};
use super::tls::TlsSide;
use super::user_data::{Op, UserData};
use crate::config::Route;
use crate::engine::{EngineKind, HeaderStep, SniStep, Sniff};
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
        crate::engine::tune_socket(client.as_fd());
        let mode = match self.kind {
            EngineKind::Copy | EngineKind::Epoll => Mode::Copy,
            EngineKind::Splice | EngineKind::Sockmap => Mode::Splice,
        };
        let conn = Conn {
            listener: listener as u16,
            phase: Phase::Connecting,
            client_slot,
            decoy: false,
            sniffed: false,
            client,
            upstream: None,
            inflight: 0,
            last_active_ms: self.now_ms,
            addr_start: self.upstreams.start(listener),
            attempt: 0,
            connect_addr: None,
            dirs: [Dir::new(mode), Dir::new(mode)],
            reset: false,
            bytes: [0, 0],
            inbound: None,
            tls: None,
            entry: None,
            times: self.ctx.histos.accepted(),
            fast: None,
        };
        let slot = self.insert(conn);
        self.ctx.row.listener_open(listener);
        if self.ctx.config.listeners[listener].accept_proxy {
            let c = self.conn(slot);
            c.phase = Phase::Header;
            c.inbound = Some(Box::default());
            self.poll_header(slot);
        } else {
            self.after_header(slot);
        }
        self.maybe_free(slot);
    }

    pub(super) fn poll_header(&mut self, slot: u32) {
        let fd = self.conn(slot).client.as_raw_fd();
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(self.ud(slot, Op::HeaderPoll, 0));
        self.conn(slot).inflight += 1;
        self.push(&[e]);
    }

    pub(super) fn on_header_poll(&mut self, slot: u32, res: i32) {
        let phase = self.conn(slot).phase;
        if phase != Phase::Header && phase != Phase::Sni {
            return;
        }
        if res < 0 {
            self.close(slot, true);
            return;
        }
        if phase == Phase::Sni {
            self.on_sni_readable(slot);
            return;
        }
        let c = self.conn(slot);
        let inbound = c.inbound.as_mut().expect("header phase has inbound state");
        match crate::engine::read_proxy_header(c.client.as_fd(), &mut inbound.acc) {
            HeaderStep::More => self.poll_header(slot),
            HeaderStep::Done(h) => {
                inbound.acc = Vec::new();
                inbound.header = Some(h);
                let listener = c.listener as usize;
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
                        self.after_header(slot);
                    }
                    Err(_) => self.close(slot, true),
                }
            }
            HeaderStep::Bad => {
                self.ctx.row.inc(Counter::RefusedBadHeader);
                self.close(slot, true);
            }
        }
    }

    /// The first bytes decide (plain ports routed by SNI, and ports with a decoy): they are
    /// read (kept, to be sent first) until the ClientHello's name picks the upstream, or they
    /// show a probe, which goes to the decoy. A TLS port with a decoy only peeks at the first
    /// byte: a TLS handshake goes on to the handshake, anything else to the decoy.
    pub(super) fn on_sni_readable(&mut self, slot: u32) {
        let config = self.ctx.config.clone();
        let listener = self.conn(slot).listener as usize;
        let l = &config.listeners[listener];
        if l.tls.is_some() {
            let c = self.conn(slot);
            match crate::engine::peek_tls_start(c.client.as_fd()) {
                Ok(None) => self.poll_header(slot),
                Ok(Some(true)) => {
                    c.sniffed = true;
                    self.after_header(slot);
                }
                Ok(Some(false)) => {
                    let acc = &mut c.inbound.get_or_insert_with(Box::default).acc;
                    let _ = crate::engine::read_available(
                        c.client.as_fd(),
                        acc,
                        crate::engine::SNI_PEEK_MAX,
                    );
                    self.go_decoy(slot);
                }
                Err(_) => self.close(slot, false),
            }
            return;
        }
        let c = self.conn(slot);
        let acc = &mut c.inbound.get_or_insert_with(Box::default).acc;
        let closed =
            crate::engine::read_available(c.client.as_fd(), acc, crate::engine::SNI_PEEK_MAX);
        if l.route == Route::Static {
            let ended = !matches!(closed, Ok(false));
            match crate::engine::sniff(acc, ended) {
                Sniff::Decoy => self.go_decoy(slot),
                Sniff::More => self.poll_header(slot),
                Sniff::Relay if ended && acc.is_empty() => self.close(slot, false),
                Sniff::Relay => {
                    self.conn(slot).phase = Phase::Connecting;
                    self.connect_next(slot);
                }
            }
            return;
        }
        match (crate::engine::route_by_sni(l, acc), closed) {
            (SniStep::Entry(e), _) => self.connect_entry(slot, e),
            (SniStep::More, Ok(false)) => self.poll_header(slot),
            _ if !l.decoy.is_off() => self.go_decoy(slot),
            _ => {
                self.ctx.row.inc(Counter::RefusedBadSni);
                self.close(slot, true);
            }
        }
    }

    /// The connection is a probe: it goes to the listener's decoy with the bytes it sent so far
    /// (no PROXY header), or is closed when there is no decoy to go to.
    pub(super) fn go_decoy(&mut self, slot: u32) {
        self.ctx.row.inc(Counter::Decoyed);
        let c = self.conn(slot);
        c.decoy = true;
        c.entry = None;
        c.attempt = 0;
        c.phase = Phase::Connecting;
        self.connect_next(slot);
    }

    /// SNI routing chose entry `e`: connect to its addresses.
    pub(super) fn connect_entry(&mut self, slot: u32, e: usize) {
        let c = self.conn(slot);
        c.entry = Some(e as u16);
        c.phase = Phase::Connecting;
        self.connect_next(slot);
    }

    /// A TLS port routed by SNI, or with a decoy: the start of the plaintext (the inner
    /// ClientHello, or what the client sends first) picks the upstream or the decoy.
    pub(super) fn tls_route(&mut self, slot: u32) {
        let config = self.ctx.config.clone();
        let c = self.conn(slot);
        let listener = &config.listeners[c.listener as usize];
        let hello = &c.tls.as_ref().expect("a TLS connection").out[TO_UPSTREAM].pending;
        if listener.route == Route::Static {
            match crate::engine::sniff(hello, false) {
                Sniff::Decoy => self.go_decoy(slot),
                Sniff::Relay => {
                    c.phase = Phase::Connecting;
                    self.connect_next(slot);
                }
                Sniff::More => {}
            }
            return;
        }
        match crate::engine::route_by_sni(listener, hello) {
            SniStep::Entry(e) => self.connect_entry(slot, e),
            SniStep::More if hello.len() < crate::engine::SNI_PEEK_MAX => {}
            _ if !listener.decoy.is_off() => self.go_decoy(slot),
            _ => {
                self.ctx.row.inc(Counter::RefusedBadSni);
                self.close(slot, false);
            }
        }
    }

    /// The client's PROXY header (if any) is read: TLS handshake first, else connect.
    pub(super) fn after_header(&mut self, slot: u32) {
        let listener = self.conn(slot).listener as usize;
        let l = &self.ctx.config.listeners[listener];
        let decoy = !l.decoy.is_off();
        if l.tls.is_none() {
            if l.route == Route::Sni || decoy {
                self.conn(slot).phase = Phase::Sni;
                self.poll_header(slot);
            } else {
                self.conn(slot).phase = Phase::Connecting;
                self.connect_next(slot);
            }
            return;
        }
        if decoy && !self.conn(slot).sniffed {
            // Is it TLS at all? Looked at before the handshake, so a probe's bytes can still go
            // to the decoy as they came.
            self.conn(slot).phase = Phase::Sni;
            self.poll_header(slot);
            return;
        }
        let Some(server) = self.ctx.tls[listener].as_ref() else {
            // Never relay a TLS port's bytes as plaintext: no certificate, no service.
            self.ctx.row.inc(Counter::RefusedBadTls);
            self.close(slot, true);
            return;
        };
        match server.accept() {
            Ok(conn) => {
                let now = self.now_ms;
                let c = self.conn(slot);
                c.tls = Some(Box::new(TlsSide {
                    conn,
                    out: Default::default(),
                }));
                c.phase = Phase::Handshake;
                c.last_active_ms = now;
                c.dirs = [Dir::new(Mode::Copy), Dir::new(Mode::Copy)];
                self.start_read(slot, TO_UPSTREAM);
            }
            Err(e) => {
                tracing::warn!("tls session refused: {e}");
                self.close(slot, true);
            }
        }
    }
}
