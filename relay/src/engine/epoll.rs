//! The `epoll` engine: the whole worker loop on readiness and nonblocking read/write, for hosts
//! where io_uring is refused (Docker's default seccomp profile returns EPERM for io_uring_setup).
//!
//! Same semantics as [`super::uring`], because both drive the same [`Session`]: admission,
//! failover over upstream addresses, the decoy, half-close forwarded once every byte is written,
//! RST propagated, the same timeouts. Here the session times each connect attempt itself
//! ([`ConnectTimer::Session`]). Bytes go through one scratch buffer per worker; a direction keeps
//! its own buffer only while its destination is full (the unsent rest), so an idle connection
//! holds none.
//!
//! Sockets are registered edge-triggered; any event on either socket of a connection pumps both
//! directions until they would block.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};

use socket2::{SockAddr, Socket};

use super::session::{self, Close, ConnectTimer, Phase, Session, Source, Step};
use super::{Around, HeaderStep, Inbound, WorkerCtx};
use crate::metrics::Counter;
use crate::proto::tls::TlsConn;
use crate::sys::{self, Epoll};
use crate::upstream::Upstreams;

const TICK_MS: i32 = 250;
const SCRATCH: usize = 64 * 1024;
const TOKEN_LISTENER: u64 = 1 << 62;
const TOKEN_CONTROL: u64 = 1 << 61;
const EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

#[derive(Debug, Default)]
struct Dir {
    /// Bytes read but not yet written (the destination was full).
    pending: Vec<u8>,
    eof: bool,
    done: bool,
}

struct Conn {
    /// The connection's phase and routing ([`Session`]).
    s: Session,
    /// Where the client counts against its per-client limits, if one is set.
    client_slot: Option<crate::limits::ClientSlot>,
    client: TcpStream,
    upstream: Option<TcpStream>,
    dirs: [Dir; 2],
    inbound: Option<Box<Inbound>>,
    tls: Option<Box<TlsConn>>,
    /// Bytes read each way (for the per-connection histograms).
    bytes: [u64; 2],
    /// Timestamps for the histograms ([`crate::histo`]).
    times: crate::histo::ConnTimes,
}

/// Why the relay of a connection stopped, for its session to decide how it ends.
enum End {
    /// The client left, or a step's bytes could not be written: FIN.
    Graceful,
    /// An error on direction `d`, at its source or its destination.
    Failed {
        d: usize,
        at_source: bool,
        errno: i32,
    },
    /// The TLS session failed (`acme`: a TLS-ALPN-01 validation ended with its handshake).
    Tls { acme: bool },
    /// The session decided.
    Closed(Close),
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
            super::tune_listener(l.as_fd());
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
                self.on_again(tok);
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
    fn kill_clients(&mut self, generation: u64, cidrs: &[crate::cidr::Cidr]) {
        let mut n = 0;
        for slot in 0..self.slots.len() {
            let Some(conn) = self.slots[slot].1.as_ref() else {
                continue;
            };
            if !WorkerCtx::kills(cidrs, conn.client.as_fd()) {
                continue;
            }
            n += 1;
            let step = self.drive(slot, |s, _| s.close(true));
            self.apply(slot, step);
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
            let client = match crate::sys::accept_nonblocking(self.listeners[listener].as_fd()) {
                Ok(fd) => Socket::from(fd),
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
            let start = self.upstreams.start(listener);
            let conn = Conn {
                s: Session::new(listener, start, ConnectTimer::Session, self.now_ms),
                client_slot,
                client: TcpStream::from(OwnedFd::from(client)),
                upstream: None,
                dirs: Default::default(),
                inbound: None,
                tls: None,
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
            let step = self.drive(slot, |s, env| s.begin(env));
            self.apply_first(slot, step);
        }
    }

    /// Runs `f` on slot `slot`'s session with the worker around it.
    fn drive(
        &mut self,
        slot: usize,
        f: impl FnOnce(&mut Session, &mut Around<'_, 'a>) -> Step,
    ) -> Step {
        let Some(conn) = self.slots[slot].1.as_mut() else {
            return Step::Wait;
        };
        let mut env = Around {
            ctx: &self.ctx,
            upstreams: &self.upstreams,
            now_ms: self.now_ms,
        };
        f(&mut conn.s, &mut env)
    }

    /// [`Worker::apply`], and a first look at the client's bytes when the session starts
    /// waiting for them: edge-triggered readiness may have fired before (with the PROXY header).
    fn apply_first(&mut self, slot: usize, step: Step) {
        let sniff = step == Step::Sniff;
        self.apply(slot, step);
        if sniff {
            self.plain_sni(slot);
        }
    }

    /// Carries out a session's step.
    fn apply(&mut self, slot: usize, step: Step) {
        match step {
            // Readiness brings the next bytes.
            Step::Wait | Step::ReadHeader | Step::Sniff => {}
            Step::StartTls => {
                let conn = self.slots[slot].1.as_mut().expect("live slot");
                let session = self.ctx.tls[conn.s.listener()].as_ref().map(|s| s.accept());
                match session {
                    Some(Ok(tls)) => {
                        conn.tls = Some(Box::new(tls));
                        match self.handshake(slot) {
                            Ok(step) => self.apply(slot, step),
                            Err(end) => self.end(slot, end),
                        }
                    }
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::warn!("tls session refused: {e}");
                        }
                        let step = self.drive(slot, |s, env| s.tls_refused(env));
                        self.apply(slot, step);
                    }
                }
            }
            Step::Connect(addr) => self.connect(slot, addr),
            Step::Relay(send) => {
                if let Err(end) = self.start_relay(slot, send) {
                    return self.end(slot, end);
                }
                if let Err(end) = self.pump(slot, [true; 2]) {
                    self.end(slot, end);
                }
            }
            Step::Close(close) => self.close(slot, close),
        }
    }

    /// Connects to `addr`, dropping an earlier attempt's socket; a socket that cannot be made
    /// is a failed attempt.
    fn connect(&mut self, slot: usize, addr: SocketAddr) {
        let generation = self.slots[slot].0;
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        if let Some(up) = conn.upstream.take() {
            let _ = self.epoll.delete(up.as_fd());
        }
        self.ctx.histos.connecting(&mut conn.times);
        let source = self.ctx.next_source(conn.s.listener(), addr);
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
                    let step = conn.s.close(true);
                    return self.apply(slot, step);
                }
                conn.upstream = Some(s);
            }
            Err(e) => {
                let now = self.now_ms;
                self.ctx
                    .connect_failed(e.raw_os_error().unwrap_or(libc::EIO), now);
                let step = self.drive(slot, |s, env| s.connect_failed(env));
                self.apply(slot, step);
            }
        }
    }

    /// The upstream is connected: the PROXY header, then the bytes read before (the
    /// ClientHello read for SNI routing, a probe's request) go first.
    fn start_relay(&mut self, slot: usize, send: crate::config::SendProxy) -> Result<(), End> {
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        let up = conn.upstream.as_ref().expect("connected upstream");
        self.ctx
            .histos
            .connected(conn.s.listener(), &mut conn.times);
        super::tune_socket(up.as_fd());
        let inbound = conn.inbound.take().map(|i| *i).unwrap_or_default();
        if !inbound.acc.is_empty() {
            // Read while sniffing, relayed now: counted like any byte read.
            let n = inbound.acc.len() as u64;
            self.ctx.row.add(Counter::BytesClientToUpstream, n);
            conn.bytes[0] += n;
            let mut first = inbound.acc;
            first.append(&mut conn.dirs[0].pending);
            conn.dirs[0].pending = first;
        }
        super::send_proxy_header(
            send,
            conn.client.as_fd(),
            up.as_fd(),
            inbound.header.as_ref(),
        )
        .map_err(|e| End::Failed {
            d: 0,
            at_source: false,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })
    }

    /// A connection that spent its budget runs again, both ways (either may have bytes left).
    fn on_again(&mut self, tok: u64) {
        let Some(slot) = self.live(tok) else { return };
        if self.slots[slot].1.as_ref().map(|c| c.s.phase()) != Some(Phase::Relaying) {
            return;
        }
        if let Err(end) = self.pump(slot, [true; 2]) {
            self.end(slot, end);
        }
    }

    /// The slot a connection's token names, if that connection still lives there.
    fn live(&self, tok: u64) -> Option<usize> {
        let slot = (tok & 0xffff_ffff) as usize;
        let generation = ((tok >> 32) & 0xff_ffff) as u32;
        match self.slots.get(slot) {
            Some((g, Some(_))) if *g & 0xff_ffff == generation => Some(slot),
            _ => None,
        }
    }

    fn on_event(&mut self, tok: u64, bits: u32) {
        let upstream_side = tok & (1 << 60) != 0;
        let Some(slot) = self.live(tok) else { return };
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        match conn.s.phase() {
            Phase::Header if !upstream_side => {
                let inbound = conn.inbound.get_or_insert_with(Box::default);
                let read = match super::read_proxy_header(conn.client.as_fd(), &mut inbound.acc) {
                    HeaderStep::More => return,
                    HeaderStep::Done(h) => {
                        inbound.acc = Vec::new();
                        let admitted =
                            self.ctx
                                .admit_proxied(conn.s.listener(), &h, conn.client.as_fd());
                        inbound.header = Some(h);
                        match admitted {
                            Ok(client_slot) => {
                                conn.client_slot = client_slot;
                                session::Header::Admitted
                            }
                            Err(_) => session::Header::Refused,
                        }
                    }
                    HeaderStep::Bad => session::Header::Bad,
                };
                let step = self.drive(slot, |s, env| s.header(env, read));
                self.apply_first(slot, step);
            }
            Phase::Handshake | Phase::Sni if !upstream_side && conn.tls.is_some() => {
                match self.handshake(slot) {
                    Ok(step) => self.apply(slot, step),
                    Err(end) => self.end(slot, end),
                }
            }
            Phase::Sni if !upstream_side => self.plain_sni(slot),
            Phase::Header | Phase::Handshake | Phase::Sni | Phase::Closing => {}
            Phase::Connecting => {
                if !upstream_side {
                    // Client bytes wait in its socket until the upstream is connected.
                    return;
                }
                let up = conn.upstream.as_ref().expect("connecting has a socket");
                let failed = bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0
                    || super::take_socket_error(up).is_some();
                let step = if failed {
                    self.drive(slot, |s, env| s.connect_failed(env))
                } else if bits & libc::EPOLLOUT as u32 != 0 {
                    self.drive(slot, |s, env| s.connected(env))
                } else {
                    Step::Wait
                };
                self.apply(slot, step);
            }
            Phase::Relaying => {
                let dirs = fired(conn, upstream_side, bits);
                if let Err(end) = self.pump(slot, dirs) {
                    self.end(slot, end);
                }
            }
        }
    }

    /// The first bytes decide (plain ports routed by SNI, and ports with a decoy): they are read
    /// (kept, to go first) until the session has what it needs. A TLS port with a decoy only
    /// peeks at the first byte; a probe's bytes are read to go to the decoy as they came.
    fn plain_sni(&mut self, slot: usize) {
        let Some(conn) = self.slots[slot].1.as_mut() else {
            return;
        };
        if conn.s.phase() != Phase::Sni {
            return;
        }
        let step = if self.ctx.config.listeners[conn.s.listener()].tls.is_some() {
            let first = super::peek_tls_start(conn.client.as_fd());
            if let Ok(Some(false)) = first {
                let acc = &mut conn.inbound.get_or_insert_with(Box::default).acc;
                let _ = super::read_available(conn.client.as_fd(), acc, super::SNI_PEEK_MAX);
            }
            self.drive(slot, |s, env| s.peeked(env, first))
        } else {
            let mut inbound = conn.inbound.take().unwrap_or_default();
            let source = match super::read_available(
                conn.client.as_fd(),
                &mut inbound.acc,
                super::SNI_PEEK_MAX,
            ) {
                Ok(false) => Source::Open,
                Ok(true) => Source::Ended,
                Err(_) => Source::Failed,
            };
            let step = self.drive(slot, |s, env| s.first_bytes(env, &inbound.acc, source));
            if let Some(conn) = self.slots[slot].1.as_mut() {
                conn.inbound = Some(inbound);
            }
            step
        };
        self.apply(slot, step);
    }

    /// Drives the TLS handshake with the client, and once it is done, feeds what the client
    /// sends inside it to the session until it chose where the connection goes.
    fn handshake(&mut self, slot: usize) -> Result<Step, End> {
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        for _ in 0..64 {
            let n = match (&conn.client).read(&mut self.scratch) {
                Ok(0) => return Err(End::Graceful),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail(0, true, &e)),
            };
            // No renewal of the session's time: the handshake's limit counts from its start.
            let tls = conn.tls.as_mut().expect("handshake has a session");
            let fed = tls.feed_ciphertext(&self.scratch[..n]);
            tls.take_plaintext(&mut conn.dirs[0].pending);
            tls.take_ciphertext(&mut conn.dirs[1].pending);
            flush(&conn.client, &mut conn.dirs[1].pending, 1)?;
            if let Err(e) = fed {
                return Err(End::Tls {
                    acme: matches!(e, crate::proto::tls::TlsError::AcmeAnswered),
                });
            }
            if tls.is_handshaking() {
                continue;
            }
            let resumed = tls.resumed();
            let mut env = Around {
                ctx: &self.ctx,
                upstreams: &self.upstreams,
                now_ms: self.now_ms,
            };
            let step = if conn.s.phase() == Phase::Handshake {
                conn.s
                    .handshake_done(&mut env, resumed, &conn.dirs[0].pending, false)
            } else {
                conn.s.plaintext(&mut env, &conn.dirs[0].pending, false)
            };
            if step != Step::Wait {
                return Ok(step);
            }
        }
        Ok(Step::Wait)
    }

    /// Moves the bytes of directions `dirs` until each would block; Err ends the connection.
    fn pump(&mut self, slot: usize, dirs: [bool; 2]) -> Result<(), End> {
        let conn = self.slots[slot].1.as_mut().expect("live slot");
        let up = conn.upstream.as_ref().expect("relaying has an upstream");
        let mut again = false;
        for d in (0..2).filter(|&d| dirs[d]) {
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
                    conn.s.touch(self.now_ms);
                }
                if !all {
                    break; // the destination is full; its EPOLLOUT brings us back
                }
                if conn.dirs[d].eof {
                    if !conn.dirs[d].done {
                        conn.dirs[d].done = true;
                        super::shutdown_write(dst);
                        if let Step::Close(close) = conn.s.finished(d, self.now_ms) {
                            return Err(End::Closed(close));
                        }
                    }
                    break;
                }
                let n = match src.read(&mut self.scratch) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(fail(d, true, &e)),
                };
                conn.s.touch(self.now_ms);
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
                        .upstream_bytes(conn.s.listener(), &mut conn.times);
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
                            return Err(End::Tls { acme: false });
                        }
                        if tls.peer_closed() {
                            to_up.eof = true;
                        }
                    }
                    (_, 0) => {
                        tls.server_ended(conn.s.is_decoy());
                        to_client.eof = true;
                    }
                    _ => {
                        if let Err(e) = tls.push_plaintext(data) {
                            tracing::debug!("tls: {e}");
                            return Err(End::Failed {
                                d,
                                at_source: false,
                                errno: libc::EIO,
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
            let Some(deadline) = self.slots[slot].1.as_ref().and_then(|c| c.s.deadline(&t)) else {
                continue;
            };
            self.scan.deadline(deadline);
            if self.now_ms < deadline {
                continue;
            }
            self.scan.touch();
            let step = self.drive(slot, |s, env| s.expire(env));
            self.apply(slot, step);
        }
        if self.paused && !self.draining && self.active < self.ctx.worker_cap * 9 / 10 {
            self.set_accepting(true);
        }
    }

    /// The relay stopped: the session decides how the connection ends.
    fn end(&mut self, slot: usize, end: End) {
        let step = match end {
            End::Closed(close) => Step::Close(close),
            End::Graceful => self.drive(slot, |s, _| s.close(false)),
            End::Failed {
                d,
                at_source,
                errno,
            } => self.drive(slot, |s, env| s.failed(env, d, errno, at_source)),
            End::Tls { acme } => self.drive(slot, |s, env| s.tls_failed(env, acme)),
        };
        self.apply(slot, step);
    }

    /// Ends the connection as its session decided: FIN or RST, after a close_notify when asked
    /// to a TLS client whose handshake is done (as nginx's `SSL_shutdown` at its header timeout).
    fn close(&mut self, slot: usize, close: Close) {
        let Some(mut conn) = self.slots[slot].1.take() else {
            return;
        };
        if close.close_notify
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
        if close.reset {
            super::set_reset_on_close(&conn.client);
            if let Some(u) = &conn.upstream {
                super::set_reset_on_close(u);
            }
        }
        let listener = conn.s.listener();
        self.free.push(slot);
        self.active -= 1;
        self.ctx.row.listener_close(listener);
        self.ctx.release(conn.client_slot);
        self.ctx.row.inc(Counter::Closed);
        self.ctx.histos.closed(listener, &conn.times, conn.bytes);
        // Dropping the streams closes them; epoll forgets closed fds by itself.
    }
}

/// Writes as much of `pending` to `dst` as it takes; true when all of it went.
/// The directions an event on one socket of a relaying connection can move: the one it reads
/// from when it is readable, and the one it writes to when it is writable and bytes wait for it.
/// Edge-triggered epoll reports every ready bit, and a socket is nearly always writable, so
/// without the second condition each message would also try a read that finds nothing. TLS
/// connections, errors and hang-ups move both (a record read from the client can make bytes
/// for it).
fn fired(conn: &Conn, upstream_side: bool, bits: u32) -> [bool; 2] {
    if conn.tls.is_some() || bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
        return [true; 2];
    }
    let from = usize::from(upstream_side);
    let mut dirs = [false; 2];
    dirs[from] = bits & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0;
    dirs[1 - from] = bits & libc::EPOLLOUT as u32 != 0 && !conn.dirs[1 - from].pending.is_empty();
    dirs
}

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
    End::Failed {
        d,
        at_source,
        errno: e.raw_os_error().unwrap_or(libc::EIO),
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
