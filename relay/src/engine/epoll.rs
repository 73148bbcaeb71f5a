//! The `epoll` engine: the whole worker loop on readiness and nonblocking read/write, for hosts
//! where io_uring is refused (Docker's default seccomp profile returns EPERM for io_uring_setup).
//!
//! Same semantics as [`super::uring`]: admission, failover over upstream addresses, half-close
//! forwarded once every byte is written, RST propagated, the same timeouts. Bytes go through one
//! scratch buffer per worker; a direction keeps its own buffer only while its destination is
//! full (the unsent rest), so an idle connection holds none.
//!
//! Sockets are registered edge-triggered; any event on either socket of a connection pumps both
//! directions until they would block.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};

use socket2::{SockAddr, Socket};

use super::{HeaderStep, Inbound, SniStep, Sniff, WorkerCtx};
use crate::config::Route;
use crate::metrics::Counter;
use crate::proto::tls::TlsConn;
use crate::sys::{self, Epoll};
use crate::upstream::Upstreams;

const TICK_MS: i32 = 250;
const SCRATCH: usize = 64 * 1024;
const TOKEN_LISTENER: u64 = 1 << 62;
const TOKEN_CONTROL: u64 = 1 << 61;
const EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the client's PROXY header.
    Header,
    /// TLS handshake with the client; the upstream is connected once it completes.
    Handshake,
    /// Reading the (inner, on a TLS port) ClientHello whose server name picks the upstream.
    Sni,
    Connecting,
    Relaying,
}

#[derive(Debug, Default)]
struct Dir {
    /// Bytes read but not yet written (the destination was full).
    pending: Vec<u8>,
    eof: bool,
    done: bool,
}

struct Conn {
    listener: usize,
    phase: Phase,
    /// Where the client counts against its per-client limits, if one is set.
    client_slot: Option<crate::limits::ClientSlot>,
    /// Going to the listener's decoy instead of its upstream ([`crate::decoy`]).
    decoy: bool,
    /// A TLS port with a decoy: the first byte was seen to start a TLS handshake.
    sniffed: bool,
    client: TcpStream,
    upstream: Option<TcpStream>,
    last_active_ms: u64,
    addr_start: usize,
    attempt: usize,
    dirs: [Dir; 2],
    inbound: Option<Box<Inbound>>,
    tls: Option<Box<TlsConn>>,
    /// The upstream entry SNI routing chose; None = every address of the listener.
    entry: Option<usize>,
    /// Bytes read each way (for the per-connection histograms).
    bytes: [u64; 2],
    /// Timestamps for the histograms ([`crate::histo`]).
    times: crate::histo::ConnTimes,
}

/// What ended a connection.
enum End {
    Graceful,
    /// Reset or error; `from_client` tells which side caused it (for the counters).
    Reset {
        from_client: bool,
        reset: bool,
    },
}

pub struct Worker<'a> {
    ctx: WorkerCtx<'a>,
    epoll: Epoll,
    listeners: Vec<Socket>,
    control: std::fs::File,
    control_line: Vec<u8>,
    slots: Vec<(u32, Option<Conn>)>,
    free: Vec<usize>,
    upstreams: Upstreams,
    scratch: Box<[u8]>,
    active: u64,
    paused: bool,
    draining: bool,
    now_ms: u64,
    /// Connections that spent their per-event budget before the kernel said WouldBlock.
    again: Vec<u64>,
    /// Whether the next tick scans the slab for timeouts.
    scan: super::ScanGate,
}

fn token(slot: usize, generation: u32, upstream: bool) -> u64 {
    (slot as u64) | (u64::from(generation) & 0xff_ffff) << 32 | u64::from(upstream) << 60
}

impl<'a> Worker<'a> {
    pub fn new(
        ctx: WorkerCtx<'a>,
        listeners: Vec<OwnedFd>,
        control: OwnedFd,
        upstreams: Upstreams,
    ) -> io::Result<Worker<'a>> {
        let epoll = Epoll::new()?;
        for (i, l) in listeners.iter().enumerate() {
            epoll.add(
                l.as_fd(),
                (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                TOKEN_LISTENER | i as u64,
            )?;
        }
        epoll.add(control.as_fd(), libc::EPOLLIN as u32, TOKEN_CONTROL)?;
        Ok(Worker {
            ctx,
            epoll,
            listeners: listeners.into_iter().map(Socket::from).collect(),
            control: std::fs::File::from(control),
            control_line: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            upstreams,
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            active: 0,
            paused: false,
            draining: false,
            now_ms: 0,
            again: Vec::new(),
            scan: super::ScanGate::default(),
        })
    }

    pub fn run(mut self) -> io::Result<()> {
        self.ctx
            .row
            .set(Counter::Engine, super::EngineKind::Epoll.id());
        let mut events = vec![sys::epoll_event_zeroed(); 1024];
        let mut last_tick = 0;
        loop {
            // Connections that spent their budget with bytes still waiting run again at once.
            let wait = if self.again.is_empty() { TICK_MS } else { 0 };
            let n = self.epoll.wait(&mut events, wait)?;
            self.now_ms = self.ctx.now_ms();
            if n > 0 || !self.again.is_empty() {
                self.scan.touch();
            }
            for ev in &events[..n] {
                let (tok, bits) = (ev.u64, ev.events);
                if tok & TOKEN_LISTENER != 0 {
                    self.accept((tok & 0xffff) as usize);
                } else if tok & TOKEN_CONTROL != 0 {
                    if !self.read_control() {
                        return Ok(());
                    }
                } else {
                    self.on_event(tok, bits);
                }
            }
            // Taken whole: a connection that spends its budget again is queued for the next
            // round, after the events that arrived meanwhile.
            for tok in std::mem::take(&mut self.again) {
                self.on_event(tok, (libc::EPOLLIN | libc::EPOLLOUT) as u32);
            }
            if self.now_ms >= last_tick + TICK_MS as u64 {
                last_tick = self.now_ms;
                self.on_tick();
                if self.draining && self.active == 0 {
                    return Ok(());
                }
            }
        }
    }

    fn read_control(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.control.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.control_line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            if self.control_line.contains(&b'\n') {
                break;
            }
        }
        if self
            .ctx
            .apply_control(&mut self.control_line, &mut self.upstreams)
        {
            self.draining = true;
            self.set_accepting(false);
        }
        if let Some((generation, cidrs)) = self.ctx.take_kill() {
            self.kill_clients(generation, &cidrs);
        }
        true
    }

    /// `sluicectl deny add --kill-existing`: closes (RST) every connection whose client is in
    /// `cidrs` now; no other connection is touched.
    fn kill_clients(&mut self, generation: u64, cidrs: &[crate::admission::Cidr]) {
        let mut n = 0;
        for slot in 0..self.slots.len() {
            let Some(conn) = self.slots[slot].1.as_ref() else {
                continue;
            };
            if !WorkerCtx::kills(cidrs, conn.client.as_fd()) {
                continue;
            }
            n += 1;
            self.end(
                slot,
                End::Reset {
                    from_client: false,
                    reset: false,
                },
            );
        }
        self.ctx.killed(generation, n);
    }

    fn set_accepting(&mut self, on: bool) {
        if on != self.paused {
            return;
        }
        self.paused = !on;
        for (i, l) in self.listeners.iter().enumerate() {
            let r = if on {
                self.epoll.add(
                    l.as_fd(),
                    (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                    TOKEN_LISTENER | i as u64,
                )
            } else {
                self.epoll.delete(l.as_fd())
            };
            if let Err(e) = r {
                tracing::warn!("cannot change accepting on a listener: {e}");
            }
        }
    }

    fn accept(&mut self, listener: usize) {
        // Bounded: at most this many accepts per readiness event, so one busy port cannot
        // starve the connections already relayed.
        for _ in 0..256 {
            if self.active >= self.ctx.worker_cap {
                self.set_accepting(false);
                return;
            }
            let client = match self.listeners[listener].accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("accept failed: {e}");
                    return;
                }
            };
            self.ctx.row.inc(Counter::Accepted);
            let client_slot = match self.ctx.admit(listener, &self.upstreams, client.as_fd()) {
                Ok(s) => s,
                Err(r) => {
                    self.ctx.count_refusal(r);
                    super::set_reset_on_close(&client);
                    continue;
                }
            };
            if client.set_nonblocking(true).is_err() {
                self.ctx.release(client_slot);
                continue;
            }
            super::tune_socket(client.as_fd());
            let conn = Conn {
                listener,
                phase: Phase::Connecting,
                client_slot,
                decoy: false,
                sniffed: false,
                client: TcpStream::from(OwnedFd::from(client)),
                upstream: None,
                last_active_ms: self.now_ms,
                addr_start: self.upstreams.start(listener),
                attempt: 0,
                dirs: Default::default(),
                inbound: None,
                tls: None,
                entry: None,
                bytes: [0, 0],
                times: self.ctx.histos.accepted(),
            };
            let slot = self.free.pop().unwrap_or_else(|| {
                self.slots.push((0, None));
                self.slots.len() - 1
            });
            let s = &mut self.slots[slot];
            s.0 = s.0.wrapping_add(1);
            let generation = s.0;
            if self
                .epoll
                .add(conn.client.as_fd(), EVENTS, token(slot, generation, false))
                .is_err()
            {
                // ENOSPC (`fs.epoll.max_user_watches` reached) or ENOMEM: the connection cannot
                // be watched, so it is refused with a reset, counted, and its places (the
                // daemon-wide `max_connections` one and the client's count) given back here,
                // the only place: it never reaches the slab, so `end` never sees it.
                self.free.push(slot);
                self.ctx.release(conn.client_slot);
                self.ctx.row.inc(Counter::RelayErrors);
                super::set_reset_on_close(&conn.client);
                continue;
            }
            s.1 = Some(conn);
            self.active += 1;
            self.ctx.row.listener_open(listener);
            if self.ctx.config.listeners[listener].accept_proxy {
                self.slots[slot].1.as_mut().expect("just set").phase = Phase::Header;
            } else {
                self.after_header(slot);
            }
        }
    }

    fn connect_next(&mut self, slot: usize) {
        let generation = self.slots[slot].0;
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        let picked = if conn.decoy {
            let plain_on_tls =
                conn.tls.is_none() && self.ctx.config.listeners[conn.listener].tls.is_some();
            self.ctx
                .decoy_addr(conn.listener, plain_on_tls)
                .filter(|_| conn.attempt == 0)
        } else {
            self.upstreams
                .pick(conn.listener, conn.entry, conn.addr_start, conn.attempt)
        };
        let Some(addr) = picked else {
            self.ctx.row.inc(
                if conn.attempt == 0 && self.upstreams.dest_refused(conn.listener, conn.entry) {
                    Counter::RefusedDest
                } else {
                    Counter::UpstreamUnreachable
                },
            );
            self.end(
                slot,
                End::Reset {
                    from_client: false,
                    reset: false,
                },
            );
            return;
        };
        conn.attempt += 1;
        conn.last_active_ms = self.now_ms;
        self.ctx.histos.connecting(&mut conn.times);
        let source = self.ctx.next_source(conn.listener, addr);
        match start_connect(addr, source) {
            Ok(s) => {
                if self
                    .epoll
                    .add(s.as_fd(), EVENTS, token(slot, generation, true))
                    .is_err()
                {
                    // The upstream socket cannot be watched (as at accept): the connection
                    // ends, and `end` gives its places back.
                    self.ctx.row.inc(Counter::RelayErrors);
                    self.end(
                        slot,
                        End::Reset {
                            from_client: false,
                            reset: false,
                        },
                    );
                    return;
                }
                conn.upstream = Some(s);
            }
            Err(e) => {
                let now = self.now_ms;
                self.ctx
                    .connect_failed(e.raw_os_error().unwrap_or(libc::EIO), now);
                self.connect_next(slot)
            }
        }
    }

    fn on_event(&mut self, tok: u64, bits: u32) {
        let slot = (tok & 0xffff_ffff) as usize;
        let generation = ((tok >> 32) & 0xff_ffff) as u32;
        let upstream_side = tok & (1 << 60) != 0;
        let Some((g, Some(conn))) = self.slots.get_mut(slot) else {
            return;
        };
        if *g & 0xff_ffff != generation {
            return;
        }
        match conn.phase {
            Phase::Header if !upstream_side => {
                let inbound = conn.inbound.get_or_insert_with(Box::default);
                match super::read_proxy_header(conn.client.as_fd(), &mut inbound.acc) {
                    HeaderStep::More => {}
                    HeaderStep::Done(h) => {
                        inbound.acc = Vec::new();
                        let admitted =
                            self.ctx
                                .admit_proxied(conn.listener, &h, conn.client.as_fd());
                        inbound.header = Some(h);
                        if let Ok(client_slot) = admitted {
                            conn.client_slot = client_slot;
                            self.after_header(slot);
                        } else {
                            self.end(
                                slot,
                                End::Reset {
                                    from_client: true,
                                    reset: false,
                                },
                            );
                        }
                    }
                    HeaderStep::Bad => {
                        self.ctx.row.inc(Counter::RefusedBadHeader);
                        self.end(
                            slot,
                            End::Reset {
                                from_client: true,
                                reset: false,
                            },
                        );
                    }
                }
                return;
            }
            Phase::Handshake | Phase::Sni if !upstream_side && conn.tls.is_some() => {
                if let Err(end) = self.handshake(slot) {
                    self.end(slot, end);
                }
                return;
            }
            Phase::Sni if !upstream_side => {
                self.plain_sni(slot);
                return;
            }
            Phase::Header | Phase::Handshake | Phase::Sni => return,
            Phase::Connecting => {
                if !upstream_side {
                    // Client bytes wait in its socket until the upstream is connected.
                    return;
                }
                let up = conn.upstream.as_ref().expect("connecting has a socket");
                let failed = bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0
                    || super::take_socket_error(up).is_some();
                if failed {
                    if let Some(up) = conn.upstream.take() {
                        let _ = self.epoll.delete(up.as_fd());
                    }
                    self.connect_next(slot);
                    return;
                }
                if bits & libc::EPOLLOUT as u32 == 0 {
                    return;
                }
                conn.phase = Phase::Relaying;
                conn.last_active_ms = self.now_ms;
                self.ctx.histos.connected(conn.listener, &mut conn.times);
                super::tune_socket(up.as_fd());
                let send = if conn.decoy {
                    crate::config::SendProxy::None
                } else {
                    self.ctx.config.listeners[conn.listener].send_proxy
                };
                let inbound = conn.inbound.take().map(|i| *i).unwrap_or_default();
                // The ClientHello read for SNI routing (plain port) goes out first.
                if !inbound.acc.is_empty() {
                    // Read while sniffing, relayed now: counted like any byte read.
                    let n = inbound.acc.len() as u64;
                    self.ctx.row.add(Counter::BytesClientToUpstream, n);
                    conn.bytes[0] += n;
                    let mut first = inbound.acc;
                    first.append(&mut conn.dirs[0].pending);
                    conn.dirs[0].pending = first;
                }
                if super::send_proxy_header(
                    send,
                    conn.client.as_fd(),
                    up.as_fd(),
                    inbound.header.as_ref(),
                )
                .is_err()
                {
                    self.end(
                        slot,
                        End::Reset {
                            from_client: false,
                            reset: false,
                        },
                    );
                    return;
                }
            }
            Phase::Relaying => {}
        }
        match self.pump(slot) {
            Ok(()) => {}
            Err(end) => self.end(slot, end),
        }
    }

    /// The first bytes decide (plain ports routed by SNI, and ports with a decoy): they are read
    /// (kept, to go first) until the ClientHello's name picks the upstream, or they show a
    /// probe, which goes to the decoy. A TLS port with a decoy only peeks at the first byte: a
    /// TLS handshake goes on to the handshake, anything else to the decoy.
    fn plain_sni(&mut self, slot: usize) {
        let config = self.ctx.config.clone();
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        let listener = &config.listeners[conn.listener];
        if listener.tls.is_some() {
            match super::peek_tls_start(conn.client.as_fd()) {
                Ok(None) => {}
                Ok(Some(true)) => {
                    conn.sniffed = true;
                    self.after_header(slot);
                }
                Ok(Some(false)) => {
                    let acc = &mut conn.inbound.get_or_insert_with(Box::default).acc;
                    let _ = super::read_available(conn.client.as_fd(), acc, super::SNI_PEEK_MAX);
                    self.go_decoy(slot);
                }
                Err(_) => self.end(slot, End::Graceful),
            }
            return;
        }
        let acc = &mut conn.inbound.get_or_insert_with(Box::default).acc;
        let closed = super::read_available(conn.client.as_fd(), acc, super::SNI_PEEK_MAX);
        if listener.route == Route::Static {
            let ended = !matches!(closed, Ok(false));
            match super::sniff(acc, ended) {
                Sniff::Decoy => self.go_decoy(slot),
                Sniff::More => {}
                Sniff::Relay if ended && acc.is_empty() => self.end(slot, End::Graceful),
                Sniff::Relay => {
                    conn.phase = Phase::Connecting;
                    self.connect_next(slot);
                }
            }
            return;
        }
        match (super::route_by_sni(listener, acc), closed) {
            (SniStep::Entry(e), _) => {
                conn.entry = Some(e);
                conn.phase = Phase::Connecting;
                self.connect_next(slot);
            }
            (SniStep::More, Ok(false)) => {}
            _ if !listener.decoy.is_off() => self.go_decoy(slot),
            _ => {
                self.ctx.row.inc(Counter::RefusedBadSni);
                self.end(
                    slot,
                    End::Reset {
                        from_client: true,
                        reset: false,
                    },
                );
            }
        }
    }

    /// The connection is a probe: it goes to the listener's decoy with the bytes it sent so far
    /// (no PROXY header), or is closed when there is no decoy to go to.
    fn go_decoy(&mut self, slot: usize) {
        self.ctx.row.inc(Counter::Decoyed);
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        conn.decoy = true;
        conn.entry = None;
        conn.attempt = 0;
        conn.phase = Phase::Connecting;
        self.connect_next(slot);
    }

    /// The PROXY header (if any) is read: TLS handshake first on a TLS port, else connect.
    fn after_header(&mut self, slot: usize) {
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        let listener = conn.listener;
        let l = &self.ctx.config.listeners[listener];
        let decoy = !l.decoy.is_off();
        if l.tls.is_none() {
            if l.route == Route::Sni || decoy {
                conn.phase = Phase::Sni;
                self.plain_sni(slot);
            } else {
                conn.phase = Phase::Connecting;
                self.connect_next(slot);
            }
            return;
        }
        if decoy && !conn.sniffed {
            // Is it TLS at all? Looked at before the handshake, so a probe's bytes can still go
            // to the decoy as they came.
            conn.phase = Phase::Sni;
            self.plain_sni(slot);
            return;
        }
        let session = self.ctx.tls[listener].as_ref().map(|s| s.accept());
        match session {
            Some(Ok(tls)) => {
                conn.tls = Some(Box::new(tls));
                conn.phase = Phase::Handshake;
                conn.last_active_ms = self.now_ms;
                if let Err(end) = self.handshake(slot) {
                    self.end(slot, end);
                }
            }
            _ => {
                // Never relay a TLS port's bytes as plaintext: no certificate, no service.
                self.ctx.row.inc(Counter::RefusedBadTls);
                self.end(
                    slot,
                    End::Reset {
                        from_client: false,
                        reset: false,
                    },
                );
            }
        }
    }

    /// Drives the TLS handshake with the client; connects upstream once it completes.
    fn handshake(&mut self, slot: usize) -> Result<(), End> {
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        for _ in 0..64 {
            let n = match (&conn.client).read(&mut self.scratch) {
                Ok(0) => return Err(End::Graceful),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail(0, true, &e)),
            };
            // No refresh of `last_active_ms`: the handshake's limit counts from its start.
            let tls = conn.tls.as_mut().expect("handshake has a session");
            let fed = tls.feed_ciphertext(&self.scratch[..n]);
            tls.take_plaintext(&mut conn.dirs[0].pending);
            tls.take_ciphertext(&mut conn.dirs[1].pending);
            flush(&conn.client, &mut conn.dirs[1].pending, 1)?;
            if let Err(e) = fed {
                // A TLS-ALPN-01 validation ends with its handshake; it is no bad client.
                if !matches!(e, crate::proto::tls::TlsError::AcmeAnswered) {
                    self.ctx.row.inc(Counter::RefusedBadTls);
                }
                return Err(End::Graceful);
            }
            if !tls.is_handshaking() {
                self.ctx.row.inc(Counter::TlsHandshakes);
                if tls.resumed() {
                    self.ctx.row.inc(Counter::TlsResumed);
                }
                let listener = &self.ctx.config.listeners[conn.listener];
                let decoy = !listener.decoy.is_off();
                if listener.route == Route::Static {
                    // With a decoy, what the client sends first inside TLS decides.
                    let step = if decoy {
                        super::sniff(&conn.dirs[0].pending, false)
                    } else {
                        Sniff::Relay
                    };
                    match step {
                        Sniff::More => conn.phase = Phase::Sni,
                        Sniff::Decoy => self.go_decoy(slot),
                        Sniff::Relay => {
                            conn.phase = Phase::Connecting;
                            self.connect_next(slot);
                        }
                    }
                    return Ok(());
                }
                // The inner ClientHello is the start of the plaintext.
                conn.phase = Phase::Sni;
                match super::route_by_sni(listener, &conn.dirs[0].pending) {
                    SniStep::Entry(e) => {
                        conn.entry = Some(e);
                        conn.phase = Phase::Connecting;
                        self.connect_next(slot);
                        return Ok(());
                    }
                    SniStep::More if conn.dirs[0].pending.len() < super::SNI_PEEK_MAX => {}
                    _ if decoy => {
                        self.go_decoy(slot);
                        return Ok(());
                    }
                    _ => {
                        self.ctx.row.inc(Counter::RefusedBadSni);
                        return Err(End::Graceful);
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves bytes both ways until each direction would block; Err ends the connection.
    fn pump(&mut self, slot: usize) -> Result<(), End> {
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        let up = conn.upstream.as_ref().expect("relaying has an upstream");
        let mut again = false;
        for d in 0..2 {
            let (mut src, dst) = if d == 0 {
                (&conn.client, up)
            } else {
                (up, &conn.client)
            };
            // Bounded per event, like accepts: fairness between connections. Readiness is
            // edge-triggered, so a direction that spends its budget before the kernel says
            // WouldBlock gets no new edge: it is queued to run again after this batch.
            for round in 0..=64 {
                if round == 64 {
                    again = true;
                    break;
                }
                let had = conn.dirs[d].pending.len();
                let all = flush(dst, &mut conn.dirs[d].pending, d)?;
                if conn.dirs[d].pending.len() < had {
                    // Bytes went out: not idle (timeouts count inactivity either way).
                    conn.last_active_ms = self.now_ms;
                }
                if !all {
                    break; // the destination is full; its EPOLLOUT brings us back
                }
                if conn.dirs[d].eof {
                    if !conn.dirs[d].done {
                        conn.dirs[d].done = true;
                        super::shutdown_write(dst);
                        conn.last_active_ms = self.now_ms;
                    }
                    break;
                }
                let n = match src.read(&mut self.scratch) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(fail(d, true, &e)),
                };
                conn.last_active_ms = self.now_ms;
                self.ctx.row.add(
                    if d == 0 {
                        Counter::BytesClientToUpstream
                    } else {
                        Counter::BytesUpstreamToClient
                    },
                    n as u64,
                );
                conn.bytes[d] += n as u64;
                if d == 1 && n > 0 {
                    self.ctx
                        .histos
                        .upstream_bytes(conn.listener, &mut conn.times);
                }
                let data = &self.scratch[..n];
                let Some(tls) = conn.tls.as_mut() else {
                    if n == 0 {
                        conn.dirs[d].eof = true;
                        continue;
                    }
                    // Straight from the scratch buffer; only what the destination refuses is
                    // kept (the direction's only allocation, freed once written).
                    let mut off = 0;
                    while off < n {
                        match (&*dst).write(&data[off..]) {
                            Ok(m) => off += m,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(fail(d, false, &e)),
                        }
                    }
                    conn.dirs[d].pending.extend_from_slice(&data[off..]);
                    continue;
                };
                // TLS: client ciphertext becomes upstream plaintext; upstream plaintext becomes
                // client ciphertext; the end of either stream is told to the session.
                let [to_up, to_client] = &mut conn.dirs;
                match (d, n) {
                    (0, 0) => {
                        tls.feed_eof();
                        to_up.eof = true;
                    }
                    (0, _) => {
                        if tls.feed_ciphertext(data).is_err() {
                            tls.take_ciphertext(&mut to_client.pending);
                            let _ = flush(&conn.client, &mut to_client.pending, 1);
                            self.ctx.row.inc(Counter::RefusedBadTls);
                            return Err(End::Graceful);
                        }
                        if tls.peer_closed() {
                            to_up.eof = true;
                        }
                    }
                    (_, 0) => {
                        tls.server_ended(conn.decoy);
                        to_client.eof = true;
                    }
                    _ => {
                        if tls.push_plaintext(data).is_err() {
                            return Err(End::Reset {
                                from_client: false,
                                reset: false,
                            });
                        }
                    }
                }
                tls.take_plaintext(&mut to_up.pending);
                tls.take_ciphertext(&mut to_client.pending);
                if d == 0 && !to_client.pending.is_empty() {
                    flush(&conn.client, &mut to_client.pending, 1)?;
                }
            }
        }
        for dir in &mut conn.dirs {
            if dir.pending.is_empty() && dir.pending.capacity() > 0 {
                dir.pending = Vec::new(); // an idle direction holds no buffer
            }
        }
        if conn.dirs.iter().all(|d| d.done) {
            return Err(End::Graceful);
        }
        if again {
            self.again.push(token(slot, self.slots[slot].0, false));
        }
        Ok(())
    }

    fn on_tick(&mut self) {
        // An idle worker gives its slab back, so the memory of a burst does not stay (no token
        // in `again` or in epoll can name a slot: every connection's sockets are closed).
        if self.active == 0 && self.slots.capacity() > super::SLAB_KEEP {
            self.slots = Vec::new();
            self.free = Vec::new();
            self.again = Vec::new();
        }
        self.ctx.histos.tick();
        let t = self.ctx.config.timeouts;
        let scan = self.scan.due(self.now_ms);
        if scan {
            self.scan.begin();
        }
        for slot in 0..if scan { self.slots.len() } else { 0 } {
            let Some(conn) = self.slots[slot].1.as_ref() else {
                continue;
            };
            let limit = match conn.phase {
                Phase::Header | Phase::Handshake | Phase::Sni => u64::from(t.header_ms),
                Phase::Connecting => u64::from(t.connect_ms),
                Phase::Relaying if conn.dirs.iter().any(|d| d.done) => u64::from(t.fin_ms),
                Phase::Relaying => u64::from(t.idle_ms),
            };
            self.scan
                .deadline(conn.last_active_ms.saturating_add(limit));
            if self.now_ms.saturating_sub(conn.last_active_ms) < limit {
                continue;
            }
            self.scan.touch();
            if conn.phase == Phase::Connecting {
                // This address timed out: drop it and try the next one.
                let conn = self.slots[slot].1.as_mut().expect("live");
                if let Some(up) = conn.upstream.take() {
                    let _ = self.epoll.delete(up.as_fd());
                }
                self.connect_next(slot);
            } else {
                self.ctx.row.inc(match conn.phase {
                    Phase::Header => Counter::RefusedBadHeader,
                    Phase::Handshake => Counter::RefusedBadTls,
                    Phase::Sni => Counter::RefusedBadSni,
                    _ => Counter::IdleTimeout,
                });
                // A port with a decoy closes a client that said nothing it could use as a web
                // server does at its header timeout: quietly (FIN), not with a reset.
                let quiet = conn.phase == Phase::Sni && self.ctx.decoy_on(conn.listener);
                // As nginx's `SSL_shutdown` at its header timeout: close_notify first.
                let conn = self.slots[slot].1.as_mut().expect("live");
                if quiet
                    && let Some(tls) = conn.tls.as_mut()
                    && !tls.is_handshaking()
                {
                    let mut out = std::mem::take(&mut conn.dirs[1].pending);
                    tls.send_close_notify();
                    tls.take_ciphertext(&mut out);
                    let _ = crate::sys::send(
                        conn.client.as_fd(),
                        &out,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    );
                }
                self.end(
                    slot,
                    if quiet {
                        End::Graceful
                    } else {
                        End::Reset {
                            from_client: false,
                            reset: false,
                        }
                    },
                );
            }
        }
        if self.paused && !self.draining && self.active < self.ctx.worker_cap * 9 / 10 {
            self.set_accepting(true);
        }
    }

    fn end(&mut self, slot: usize, end: End) {
        let Some(conn) = self.slots[slot].1.take() else {
            return;
        };
        if let End::Reset { from_client, reset } = end {
            if reset {
                self.ctx.row.inc(if from_client {
                    Counter::ClientReset
                } else {
                    Counter::UpstreamReset
                });
            }
            super::set_reset_on_close(&conn.client);
            if let Some(u) = &conn.upstream {
                super::set_reset_on_close(u);
            }
        }
        self.free.push(slot);
        self.active -= 1;
        self.ctx.row.listener_close(conn.listener);
        self.ctx.release(conn.client_slot);
        self.ctx.row.inc(Counter::Closed);
        self.ctx
            .histos
            .closed(conn.listener, &conn.times, conn.bytes);
        // Dropping the streams closes them; epoll forgets closed fds by itself.
    }
}

/// Writes as much of `pending` to `dst` as it takes; true when all of it went.
fn flush(mut dst: &TcpStream, pending: &mut Vec<u8>, d: usize) -> Result<bool, End> {
    while !pending.is_empty() {
        match dst.write(pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(d, false, &e)),
        }
    }
    Ok(true)
}

/// An error on direction `d` (0: client → upstream), at its source or destination.
fn fail(d: usize, at_source: bool, e: &io::Error) -> End {
    let from_client = (d == 0) == at_source;
    End::Reset {
        from_client,
        reset: e.raw_os_error().is_some_and(super::is_reset),
    }
}

fn start_connect(addr: SocketAddr, source: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    let sock = super::upstream_socket(addr, source)?;
    match sock.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from(OwnedFd::from(sock)))
}
