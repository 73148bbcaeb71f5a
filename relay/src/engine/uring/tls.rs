//! TLS-terminated connections: bytes received either way go through the session, and the
//! results are sent from owned buffers.

use std::os::fd::AsFd;

use io_uring::{cqueue, opcode, types};

use super::Worker;
use super::conn::{Phase, TO_CLIENT, TO_UPSTREAM};
use super::user_data::Op;
use crate::engine::Around;
use crate::engine::session::Step;
use crate::proto::tls::{TlsConn, TlsError};

/// TLS termination of one connection: the session and the bytes waiting to be sent each way.
pub(super) struct TlsSide {
    pub(super) conn: TlsConn,
    /// `out[d]`: bytes for direction `d`'s destination (plaintext to the upstream, ciphertext
    /// to the client).
    pub(super) out: [OutBuf; 2],
}

/// Bytes to send from an owned buffer. Invariant: `inflight` is not touched while a SEND of it
/// is in flight (`sending`); new bytes go to `pending`, swapped in when `inflight` is done.
#[derive(Default)]
pub(super) struct OutBuf {
    pub(super) inflight: Vec<u8>,
    pub(super) pending: Vec<u8>,
    pub(super) sent: usize,
    pub(super) sending: bool,
}

impl OutBuf {
    pub(super) fn queued(&self) -> usize {
        self.inflight.len() - self.sent + self.pending.len()
    }
}

/// Bytes a TLS direction may have queued before its source is paused.
pub(super) const TLS_OUT_MAX: usize = 256 * 1024;

/// Feeds bytes received on direction `d` through the TLS session: ciphertext from the client
/// becomes plaintext for the upstream (and handshake records for the client); plaintext from
/// the upstream becomes ciphertext for the client.
pub(super) fn tls_transform(
    side: &mut TlsSide,
    d: usize,
    data: &[u8],
) -> Result<(), crate::proto::tls::TlsError> {
    if d == TO_UPSTREAM {
        side.conn.feed_ciphertext(data)?;
        side.conn.take_plaintext(&mut side.out[TO_UPSTREAM].pending);
    } else {
        side.conn.push_plaintext(data)?;
    }
    side.conn.take_ciphertext(&mut side.out[TO_CLIENT].pending);
    Ok(())
}

impl Worker<'_> {
    /// Before a quiet close of a TLS client whose handshake is done: its close_notify, sent
    /// at once (best effort, as nginx's `SSL_shutdown` at its header timeout), unless a SEND to
    /// the client is in flight (its bytes would be overtaken).
    pub(super) fn close_notify_now(&mut self, slot: u32) {
        let c = self.conn(slot);
        let Some(tls) = c.tls.as_mut() else { return };
        if tls.conn.is_handshaking() || !tls.out[TO_CLIENT].inflight.is_empty() {
            return;
        }
        let mut out = std::mem::take(&mut tls.out[TO_CLIENT].pending);
        tls.conn.send_close_notify();
        tls.conn.take_ciphertext(&mut out);
        let _ = crate::sys::send(
            c.client.as_fd(),
            &out,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }

    pub(super) fn tls(&mut self, slot: u32) -> &mut TlsSide {
        self.conn(slot).tls.as_mut().expect("a TLS connection")
    }

    pub(super) fn on_tls_recv(&mut self, slot: u32, d: usize, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        if !more {
            self.conn(slot).dirs[d].recv_armed = false;
        }
        let closing = self.conn(slot).s.is_closing();
        if let Some(buf) = self.bufs.lend(flags) {
            if res > 0 && !closing {
                self.moved(slot, d, res as u64);
                let data = self.bufs.bytes(&buf, res as u32);
                let side = self.slots[slot as usize]
                    .conn
                    .as_mut()
                    .and_then(|c| c.tls.as_mut())
                    .expect("a TLS connection");
                let r = tls_transform(side, d, data);
                self.recycle(buf);
                if let Err(e) = r {
                    tracing::debug!("tls: {e}");
                    // A TLS-ALPN-01 validation ends with its handshake; it is no bad client.
                    self.tls_abort(slot, matches!(e, TlsError::AcmeAnswered));
                    return;
                }
            } else {
                self.recycle(buf);
            }
        }
        if closing {
            return;
        }
        match res {
            0 => {
                let phase = self.conn(slot).s.phase();
                if d == TO_UPSTREAM && matches!(phase, Phase::Sni | Phase::Connecting) {
                    // The client sent its bytes and FIN (or close_notify and FIN) before the
                    // upstream was connected: a half-close, not a departure. What it sent is
                    // queued; the FIN follows it once connected (`tls_flush`).
                    let tls = self.tls(slot);
                    tls.conn.feed_eof();
                    let mut out = std::mem::take(&mut tls.out[TO_UPSTREAM].pending);
                    tls.conn.take_plaintext(&mut out);
                    tls.out[TO_UPSTREAM].pending = out;
                    self.conn(slot).dirs[d].eof = true;
                    if phase == Phase::Sni {
                        // No more bytes will come: what there is decides, or nothing does.
                        self.tls_decide(slot, true);
                    }
                    return;
                }
                if phase != Phase::Relaying {
                    // The client left before its session was relayed (mid-handshake).
                    self.close(slot, false);
                    return;
                }
                let decoy = self.conn(slot).s.is_decoy();
                let tls = self.tls(slot);
                if d == TO_UPSTREAM {
                    tls.conn.feed_eof();
                    let mut out = std::mem::take(&mut tls.out[TO_UPSTREAM].pending);
                    tls.conn.take_plaintext(&mut out);
                    tls.out[TO_UPSTREAM].pending = out;
                } else {
                    tls.conn.server_ended(decoy);
                    let mut out = std::mem::take(&mut tls.out[TO_CLIENT].pending);
                    tls.conn.take_ciphertext(&mut out);
                    tls.out[TO_CLIENT].pending = out;
                }
                self.conn(slot).dirs[d].eof = true;
                self.tls_flush(slot, d);
                return;
            }
            n if n > 0 => {}
            e if -e == libc::ENOBUFS => {
                self.starve(slot, d);
                return;
            }
            e if -e == libc::ECANCELED => {
                self.tls_rearm(slot, d);
                return;
            }
            e => {
                self.fail(slot, d, -e, true);
                return;
            }
        }
        self.tls_decide(slot, false);
        if self.conn(slot).s.is_closing() {
            return;
        }
        if d == TO_UPSTREAM && self.tls(slot).conn.peer_closed() {
            // close_notify: the client is done sending, as if it sent FIN.
            self.conn(slot).dirs[d].eof = true;
        }
        if self.tls(slot).out[d].queued() > TLS_OUT_MAX {
            let dir = &self.conn(slot).dirs[d];
            if dir.recv_armed && !dir.paused {
                self.pause_recv(slot, d);
            }
        } else if !more {
            self.tls_rearm(slot, d);
        }
        self.tls_flush(slot, TO_CLIENT);
        if self.conn(slot).s.phase() == Phase::Relaying {
            self.tls_flush(slot, TO_UPSTREAM);
        }
    }

    /// Re-arms a TLS direction's RECV when its output has room again.
    pub(super) fn tls_rearm(&mut self, slot: u32, d: usize) {
        if self.tls(slot).out[d].queued() <= TLS_OUT_MAX {
            self.rearm_recv(slot, d);
        }
    }

    /// Sends what is queued toward direction `d`'s destination, or forwards FIN when done.
    pub(super) fn tls_flush(&mut self, slot: u32, d: usize) {
        if self.conn(slot).s.is_closing() {
            return;
        }
        let ob = &mut self.tls(slot).out[d];
        if ob.sending {
            return;
        }
        if ob.sent == ob.inflight.len() {
            ob.inflight.clear();
            ob.sent = 0;
            std::mem::swap(&mut ob.inflight, &mut ob.pending);
        }
        if ob.inflight.is_empty() {
            ob.inflight = Vec::new(); // an idle connection holds no buffer
            ob.pending = Vec::new();
            let dir = &self.conn(slot).dirs[d];
            if dir.eof && !dir.done {
                self.source_done(slot, d);
            } else if !dir.recv_armed && !dir.eof {
                // The upstream's side is read only once it is connected.
                if d == TO_UPSTREAM || self.conn(slot).s.phase() == Phase::Relaying {
                    self.tls_rearm(slot, d);
                }
            }
            return;
        }
        let (_, dst) = self.fds(slot, d);
        let ud = self.ud(slot, Op::Send, d);
        let ob = &mut self.tls(slot).out[d];
        let rest = &ob.inflight[ob.sent..];
        let e = opcode::Send::new(types::Fd(dst), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        ob.sending = true;
        self.conn(slot).inflight += 1;
        self.push(&[e]);
    }

    pub(super) fn on_tls_send(&mut self, slot: u32, d: usize, res: i32) {
        self.tls(slot).out[d].sending = false;
        let Some(n) = self.send_done(slot, d, res) else {
            return;
        };
        self.tls(slot).out[d].sent += n as usize;
        self.tls_flush(slot, d);
    }

    /// Before the upstream is chosen: the end of the handshake, then the plaintext so far (the
    /// inner ClientHello, or what the client sends first), go to the session, which picks the
    /// upstream or the decoy (`ended`: the client sent FIN, nothing more will come).
    fn tls_decide(&mut self, slot: u32, ended: bool) {
        let Some(c) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        let tls = c.tls.as_ref().expect("a TLS connection");
        let hello = &tls.out[TO_UPSTREAM].pending;
        let mut env = Around {
            ctx: &self.ctx,
            upstreams: &self.upstreams,
            now_ms: self.now_ms,
        };
        let step = match c.s.phase() {
            Phase::Handshake if !tls.conn.is_handshaking() => {
                c.s.handshake_done(&mut env, tls.conn.resumed(), hello, ended)
            }
            Phase::Sni => c.s.plaintext(&mut env, hello, ended),
            _ => Step::Wait,
        };
        self.apply(slot, step);
    }

    /// A TLS error: send the alert rustls queued (best effort, nonblocking), then close
    /// (`acme`: a TLS-ALPN-01 validation that ended with its handshake, as it should).
    pub(super) fn tls_abort(&mut self, slot: u32, acme: bool) {
        let c = self.conn(slot);
        if let Some(tls) = c.tls.as_mut() {
            let mut alert = Vec::new();
            tls.conn.take_ciphertext(&mut alert);
            let _ = crate::sys::send(
                c.client.as_fd(),
                &alert,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            );
        }
        let step = self.drive(slot, |s, env| s.tls_failed(env, acme));
        self.apply(slot, step);
    }
}
