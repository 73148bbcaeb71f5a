//! Upstream connects: each address in turn, under the connect timeout (a LINK_TIMEOUT).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use io_uring::{opcode, squeue, types};
use socket2::SockAddr;

use super::Worker;
use super::conn::{TO_CLIENT, TO_UPSTREAM};
use super::user_data::Op;
use crate::config::SendProxy;
use crate::metrics::Counter;

/// The LINK_TIMEOUT of an upstream connect.
pub(super) fn connect_timespec(ms: u32) -> types::Timespec {
    types::Timespec::new()
        .sec(u64::from(ms / 1000))
        .nsec((ms % 1000) * 1_000_000)
}

impl Worker<'_> {
    /// Starts a CONNECT to `addr` (the session's next address), from a source address of the
    /// listener's; a socket that cannot be made is a failed attempt.
    pub(super) fn connect(&mut self, slot: u32, addr: std::net::SocketAddr) {
        let listener = self.conn(slot).s.listener();
        let source = self.ctx.next_source(listener, addr);
        let sock = match crate::engine::upstream_socket(addr, source) {
            Ok(s) => OwnedFd::from(s),
            Err(e) => {
                tracing::warn!("cannot create an upstream socket: {e}");
                return self.attempt_failed(slot, e.raw_os_error().unwrap_or(libc::EIO));
            }
        };
        self.ctx
            .histos
            .connecting(&mut self.slots[slot as usize].conn.as_mut().expect("live").times);
        let sa = Box::new(SockAddr::from(addr));
        let connect = opcode::Connect::new(types::Fd(sock.as_raw_fd()), sa.as_ptr(), sa.len())
            .build()
            .user_data(self.ud(slot, Op::Connect, 0));
        {
            let c = self.conn(slot);
            c.upstream = Some(sock);
            c.connect_addr = Some(sa);
        }
        self.push_under_connect_timeout(slot, connect);
    }

    /// The attempt in flight ended without a connection (`errno`): its socket goes, and the
    /// session says where next.
    fn attempt_failed(&mut self, slot: u32, errno: i32) {
        let now = self.now_ms;
        self.ctx.connect_failed(errno, now);
        let c = self.conn(slot);
        c.upstream = None;
        c.connect_addr = None;
        let step = self.drive(slot, |s, env| s.connect_failed(env));
        self.apply(slot, step);
    }

    /// Submits a connect step linked to a LINK_TIMEOUT of the connect timeout (two operations
    /// in flight for the slot).
    pub(super) fn push_under_connect_timeout(&mut self, slot: u32, e: squeue::Entry) {
        let timeout = opcode::LinkTimeout::new(&*self.connect_timeout)
            .build()
            .user_data(self.ud(slot, Op::LinkTimeout, 0));
        self.conn(slot).inflight += 2;
        self.push(&[e.flags(squeue::Flags::IO_LINK), timeout]);
    }

    pub(super) fn on_connect(&mut self, slot: u32, res: i32) {
        if self.conn(slot).s.is_closing() {
            return;
        }
        if res == -libc::EINPROGRESS || res == -libc::EALREADY {
            // io_uring handed the connect to an io-wq thread (it does under load, when it could
            // not arm its own poll), where the nonblocking socket answers "in progress" while
            // the handshake goes on: wait for it to end instead of calling it a failure.
            tracing::debug!("upstream connect still in progress after io-wq; waiting for it");
            self.wait_connected(slot);
            return;
        }
        if res < 0 {
            tracing::debug!(
                "upstream connect failed: {}",
                io::Error::from_raw_os_error(-res)
            );
            // Refused, unreachable, or cancelled by the linked timeout: next address.
            return self.attempt_failed(slot, -res);
        }
        self.conn(slot).connect_addr = None;
        let step = self.drive(slot, |s, env| s.connected(env));
        self.apply(slot, step);
    }

    /// The upstream is connected: the PROXY header `send` says, then the bytes read before it
    /// was chosen, then the relay (TLS, the fast path, or a direction each).
    pub(super) fn start_relay(&mut self, slot: u32, send: SendProxy) {
        self.record_connected(slot);
        let c = self.conn(slot);
        let up = c.upstream.as_ref().expect("connected upstream");
        crate::engine::tune_socket(up.as_fd());
        let inbound = c.inbound.take().map(|i| *i).unwrap_or_default();
        if let Err(e) = crate::engine::send_proxy_header(
            send,
            c.client.as_fd(),
            up.as_fd(),
            inbound.header.as_ref(),
        )
        .and_then(|()| crate::engine::send_prefix(up.as_fd(), &inbound.acc))
        {
            tracing::debug!("cannot send the connection's first bytes: {e}");
            return self.close(slot, true);
        }
        // The bytes read while sniffing (or waiting for a ClientHello) are relayed bytes too.
        let prefix = inbound.acc.len() as u64;
        if prefix > 0 {
            self.conn(slot).bytes[TO_UPSTREAM] += prefix;
            self.ctx.row.add(Counter::BytesClientToUpstream, prefix);
        }
        if self.conn(slot).tls.is_some() {
            self.start_read(slot, TO_CLIENT);
            self.tls_flush(slot, TO_UPSTREAM);
        } else if self.fast.is_some() {
            self.start_fast(slot);
        } else {
            for d in [TO_UPSTREAM, TO_CLIENT] {
                self.start_read(slot, d);
            }
        }
    }

    /// POLLOUT on an upstream socket whose connect is still in progress, under the connect
    /// timeout again (a second wait at most).
    pub(super) fn wait_connected(&mut self, slot: u32) {
        let fd = self
            .conn(slot)
            .upstream
            .as_ref()
            .map_or(-1, |u| u.as_raw_fd());
        let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(self.ud(slot, Op::ConnectPoll, 0));
        self.push_under_connect_timeout(slot, poll);
    }

    /// The end of a connect that was in progress: SO_ERROR is its result.
    pub(super) fn on_connect_poll(&mut self, slot: u32, res: i32) {
        if self.conn(slot).s.is_closing() {
            return;
        }
        let res = if res == -libc::ECANCELED {
            -libc::ETIMEDOUT
        } else if res < 0 {
            res
        } else {
            let up = self
                .conn(slot)
                .upstream
                .as_ref()
                .expect("connecting upstream");
            match socket2::SockRef::from(up).take_error() {
                Ok(None) => 0,
                Ok(Some(e)) | Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            }
        };
        self.on_connect(slot, res);
    }
}
