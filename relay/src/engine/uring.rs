//! The io_uring event loop of one worker: one ring, one thread, no lock on the hot path.
//!
//! A connection lives in a slot of a slab. Every submission carries a [`UserData`] = slot +
//! generation + [`Op`] + direction, so a completion for a slot that was freed and reused (a stale
//! CQE) is recognised by its generation and dropped.
//!
//! Lifecycle of a connection: multishot ACCEPT → admission → CONNECT (+ LINK_TIMEOUT), trying each
//! upstream address in turn → relay, each direction on its own ([`Dir`]) with SPLICE
//! ([`super::splice`]) or RECV/SEND ([`super::copy`]) → half-close forwarded once every byte of a
//! direction was handed to the kernel → close when both directions are done, or at once with RST
//! when either side reset or a timeout expired.
//!
//! Soundness rule (the one every `// SAFETY:` below leans on): nothing a submission points at is
//! freed before its completion. A slot counts its in-flight operations (`inflight`) and is freed
//! only when that count is back to zero — its connect address, pipes and lent buffers with it.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use socket2::SockAddr;

use super::copy::{self, Bid, BufRing};
use super::splice::{self, Pipe, PipePool};
use super::{EngineKind, HeaderStep, Inbound, Refusal, SniStep, WorkerCtx};
use crate::config::Route;
use crate::metrics::Counter;
use crate::proto::tls::TlsConn;
use crate::upstream::Upstreams;

/// Submission queue entries; completions are twice that (the kernel's default).
const RING_ENTRIES: u32 = 4096;
/// The timer tick that checks every connection's timeout.
const TICK_MS: u64 = 250;
/// io-wq threads (bounded, unbounded) this ring may start: SPLICE always runs in io-wq.
const IOWQ_MAX_WORKERS: [u32; 2] = [2, 4];
/// Splice with splice(2) on readiness in this thread, instead of io_uring SPLICE operations
/// (which always run in io-wq threads: a thread handoff per operation).
const SPLICE_INLINE: bool = true;
/// Socket → pipe → socket rounds per readiness event before yielding to other connections.
const SPLICE_ROUNDS: usize = 16;
/// Slot value meaning "no connection" (listener, control, timer, cancel operations).
const NO_SLOT: u32 = u32::MAX;

/// What an operation was, decoded from a completion's user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AcceptMulti = 1,
    ControlRead,
    Tick,
    Cancel,
    Connect,
    LinkTimeout,
    PollIn,
    PollOut,
    SpliceIn,
    SpliceOut,
    RecvMulti,
    Send,
    /// Waiting for a client's PROXY header bytes.
    HeaderPoll,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        use Op::*;
        Some(match v {
            1 => AcceptMulti,
            2 => ControlRead,
            3 => Tick,
            4 => Cancel,
            5 => Connect,
            6 => LinkTimeout,
            7 => PollIn,
            8 => PollOut,
            9 => SpliceIn,
            10 => SpliceOut,
            11 => RecvMulti,
            12 => Send,
            13 => HeaderPoll,
            _ => return None,
        })
    }
}

/// Direction of a relayed byte stream: index into [`Conn::dirs`].
const TO_UPSTREAM: usize = 0;
const TO_CLIENT: usize = 1;

/// `slot | generation << 32 | op << 48 | direction << 56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UserData {
    slot: u32,
    generation: u16,
    op: Op,
    dir: u8,
}

impl UserData {
    fn encode(self) -> u64 {
        u64::from(self.slot)
            | u64::from(self.generation) << 32
            | u64::from(self.op as u8) << 48
            | u64::from(self.dir) << 56
    }

    fn decode(v: u64) -> Option<UserData> {
        Some(UserData {
            slot: v as u32,
            generation: (v >> 32) as u16,
            op: Op::from_u8((v >> 48) as u8)?,
            dir: (v >> 56) as u8,
        })
    }

    fn global(op: Op, index: u32) -> u64 {
        UserData {
            slot: NO_SLOT,
            generation: index as u16,
            op,
            dir: 0,
        }
        .encode()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the client's PROXY header (`accept_proxy`).
    Header,
    /// TLS handshake with the client; the upstream is connected once it completes.
    Handshake,
    /// Reading the (inner, on a TLS port) ClientHello whose server name picks the upstream.
    Sni,
    Connecting,
    Relaying,
    Closing,
}

/// How a direction moves bytes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Splice,
    Copy,
}

/// One direction of a relayed connection (client → upstream or back).
#[derive(Debug)]
struct Dir {
    mode: Mode,
    /// Splice: the pipe lent to this direction while bytes are in flight.
    pipe: Option<Pipe>,
    /// Splice: bytes in the pipe not yet spliced out.
    in_pipe: u32,
    /// Copy: filled buffers (id, length) waiting to be sent, front first.
    queue: VecDeque<(Bid, u32)>,
    /// Copy: bytes of the front buffer already sent.
    sent: u32,
    recv_armed: bool,
    sending: bool,
    /// Copy: RECV was cancelled because the queue is full.
    paused: bool,
    /// Copy: RECV ended with ENOBUFS; re-armed when a buffer is recycled.
    starved: bool,
    /// The source sent FIN.
    eof: bool,
    /// FIN forwarded (SHUT_WR on the destination) after every byte.
    done: bool,
}

impl Dir {
    fn new(mode: Mode) -> Dir {
        Dir {
            mode,
            pipe: None,
            in_pipe: 0,
            queue: VecDeque::new(),
            sent: 0,
            recv_armed: false,
            sending: false,
            paused: false,
            starved: false,
            eof: false,
            done: false,
        }
    }
}

struct Conn {
    listener: u16,
    phase: Phase,
    client: OwnedFd,
    upstream: Option<OwnedFd>,
    /// Submissions whose completion has not arrived (multishot ones count once).
    inflight: u32,
    /// Coarse clock (ms) of the last byte moved, or of the phase start.
    last_active_ms: u64,
    /// Failover: first address index and attempts so far.
    addr_start: usize,
    attempt: usize,
    /// The address a CONNECT in flight points at.
    connect_addr: Option<Box<SockAddr>>,
    dirs: [Dir; 2],
    reset: bool,
    /// Counters already bumped for this connection's accounting.
    bytes: [u64; 2],
    /// The client's PROXY header: bytes so far, then what it said (only on `accept_proxy`).
    inbound: Option<Box<Inbound>>,
    /// TLS termination state (only on `tls` listeners).
    tls: Option<Box<TlsSide>>,
    /// The upstream entry SNI routing chose; None = every address of the listener.
    entry: Option<u16>,
    /// Timestamps for the histograms ([`crate::histo`]).
    times: crate::histo::ConnTimes,
}

/// TLS termination of one connection: the session and the bytes waiting to be sent each way.
struct TlsSide {
    conn: TlsConn,
    /// `out[d]`: bytes for direction `d`'s destination (plaintext to the upstream, ciphertext
    /// to the client).
    out: [OutBuf; 2],
}

/// Bytes to send from an owned buffer. Invariant: `inflight` is not touched while a SEND of it
/// is in flight (`sending`); new bytes go to `pending`, swapped in when `inflight` is done.
#[derive(Default)]
struct OutBuf {
    inflight: Vec<u8>,
    pending: Vec<u8>,
    sent: usize,
    sending: bool,
}

impl OutBuf {
    fn queued(&self) -> usize {
        self.inflight.len() - self.sent + self.pending.len()
    }
}

/// Bytes a TLS direction may have queued before its source is paused.
const TLS_OUT_MAX: usize = 256 * 1024;

struct Slot {
    generation: u16,
    conn: Option<Conn>,
}

/// The worker. Field order matters: `ring` is dropped before `bufs` (registered memory).
pub struct Worker<'a> {
    ring: IoUring,
    bufs: BufRing,
    ctx: WorkerCtx<'a>,
    kind: EngineKind,
    listeners: Vec<OwnedFd>,
    control: OwnedFd,
    control_buf: Box<[u8; 4096]>,
    control_line: Vec<u8>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    pipes: PipePool,
    upstreams: Upstreams,
    /// Copy directions waiting for a free buffer: (slot, generation, dir).
    starved: VecDeque<(u32, u16, u8)>,
    tick: Box<types::Timespec>,
    connect_timeout: Box<types::Timespec>,
    accept_armed: Vec<bool>,
    accept_paused: bool,
    draining: bool,
    active: u64,
    now_ms: u64,
    cqes: Vec<(u64, i32, u32)>,
}

/// Tries to make a ring; the error is what `auto` falls back on (EPERM under seccomp, ENOSYS
/// on old kernels).
pub fn probe() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

impl<'a> Worker<'a> {
    pub fn new(
        ctx: WorkerCtx<'a>,
        kind: EngineKind,
        listeners: Vec<OwnedFd>,
        control: OwnedFd,
        upstreams: Upstreams,
    ) -> io::Result<Worker<'a>> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 4)
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(RING_ENTRIES)?;
        let mut max = IOWQ_MAX_WORKERS;
        let _ = ring.submitter().register_iowq_max_workers(&mut max);
        let bufs = BufRing::register(&ring)?;
        let nlisteners = ctx.config.listeners.len();
        let t = ctx.config.timeouts.connect_ms;
        Ok(Worker {
            ring,
            bufs,
            kind,
            listeners,
            control,
            control_buf: Box::new([0; 4096]),
            control_line: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            pipes: PipePool::new(),
            upstreams,
            starved: VecDeque::new(),
            tick: Box::new(types::Timespec::new().nsec((TICK_MS * 1_000_000) as u32)),
            connect_timeout: Box::new(
                types::Timespec::new()
                    .sec(u64::from(t / 1000))
                    .nsec((t % 1000) * 1_000_000),
            ),
            accept_armed: vec![false; nlisteners],
            accept_paused: false,
            draining: false,
            active: 0,
            now_ms: 0,
            cqes: Vec::with_capacity(RING_ENTRIES as usize * 4),
            ctx,
        })
    }

    /// Runs until drained (or the supervisor goes away).
    pub fn run(mut self) -> io::Result<()> {
        self.ctx.row.set(Counter::Engine, self.kind.id());
        self.arm_accepts();
        self.arm_control();
        let e = opcode::Timeout::new(&*self.tick)
            .flags(types::TimeoutFlags::MULTISHOT)
            .build()
            .user_data(UserData::global(Op::Tick, 0));
        self.push(e);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.now_ms = self.ctx.now_ms();
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(ud, res, flags) in &cqes {
                if !self.handle(ud, res, flags) {
                    return Ok(());
                }
            }
            cqes.clear();
            self.cqes = cqes;
        }
    }

    /// Queues a submission, flushing the queue to the kernel first when it is full.
    fn push(&mut self, e: squeue::Entry) {
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

    /// Arms a multishot ACCEPT on every listener that has none, unless paused or draining.
    fn arm_accepts(&mut self) {
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
            self.push(e);
        }
    }

    /// Stops accepting (this worker is at its fd capacity, or draining); other workers take the
    /// new connections meanwhile.
    fn pause_accepts(&mut self) {
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
            self.push(e);
        }
    }

    fn arm_control(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.control.as_raw_fd()),
            self.control_buf.as_mut_ptr(),
            self.control_buf.len() as u32,
        )
        .build()
        .user_data(UserData::global(Op::ControlRead, 0));
        self.push(e);
    }

    /// Handles one completion; false means the worker should exit.
    fn handle(&mut self, ud: u64, res: i32, flags: u32) -> bool {
        let Some(u) = UserData::decode(ud) else {
            return true;
        };
        if u.slot == NO_SLOT {
            return self.handle_global(u, res, flags);
        }
        let Some(slot) = self.slots.get_mut(u.slot as usize) else {
            return true;
        };
        if slot.generation != u.generation || slot.conn.is_none() {
            return true; // stale: the connection this was for is gone
        }
        let more = cqueue::more(flags);
        {
            let conn = slot.conn.as_mut().expect("checked above");
            if !more {
                conn.inflight -= 1;
            }
        }
        let d = u.dir as usize;
        match u.op {
            Op::Connect => self.on_connect(u.slot, res),
            Op::LinkTimeout => {}
            Op::PollIn => self.on_poll_in(u.slot, d, res),
            Op::PollOut => self.on_poll_out(u.slot, d, res),
            Op::SpliceIn => self.on_splice_in(u.slot, d, res),
            Op::SpliceOut => self.on_splice_out(u.slot, d, res),
            Op::RecvMulti => self.on_recv(u.slot, d, res, flags),
            Op::Send
                if self.slots[u.slot as usize]
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.tls.is_some()) =>
            {
                self.on_tls_send(u.slot, d, res)
            }
            Op::Send => self.on_send(u.slot, d, res),
            Op::HeaderPoll => self.on_header_poll(u.slot, res),
            Op::AcceptMulti | Op::ControlRead | Op::Tick | Op::Cancel => {}
        }
        self.maybe_free(u.slot);
        true
    }

    fn handle_global(&mut self, u: UserData, res: i32, flags: u32) -> bool {
        match u.op {
            Op::AcceptMulti => {
                let listener = u.generation as usize;
                if res >= 0 {
                    // SAFETY: a successful ACCEPT completion hands us a new fd nobody owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(res) };
                    self.on_accept(listener, fd);
                } else if res != -libc::ECANCELED {
                    // EMFILE/ENFILE/ENOMEM: the multishot ended; the tick re-arms it.
                    tracing::debug!("accept failed: {}", io::Error::from_raw_os_error(-res));
                }
                if !cqueue::more(flags) {
                    // The multishot ended (error, or our cancel): the tick re-arms it.
                    self.accept_armed[listener] = false;
                }
                if self.active >= self.ctx.worker_cap {
                    self.pause_accepts();
                }
            }
            Op::ControlRead => {
                if res <= 0 {
                    tracing::debug!("supervisor went away; worker exits");
                    return false;
                }
                let n = res as usize;
                let buf = self.control_buf[..n].to_vec();
                self.on_control(&buf);
                self.arm_control();
            }
            Op::Tick => {
                if !cqueue::more(flags) {
                    let e = opcode::Timeout::new(&*self.tick)
                        .flags(types::TimeoutFlags::MULTISHOT)
                        .build()
                        .user_data(UserData::global(Op::Tick, 0));
                    self.push(e);
                }
                self.on_tick();
                if self.draining && self.active == 0 {
                    return false;
                }
            }
            _ => {}
        }
        true
    }

    fn on_control(&mut self, bytes: &[u8]) {
        self.control_line.extend_from_slice(bytes);
        if self
            .ctx
            .apply_control(&mut self.control_line, &mut self.upstreams)
        {
            self.pause_accepts();
            self.draining = true;
        }
    }

    fn on_tick(&mut self) {
        self.ctx.histos.tick();
        let now = self.now_ms;
        let t = self.ctx.config.timeouts;
        for i in 0..self.slots.len() {
            let Some(conn) = self.slots[i].conn.as_ref() else {
                continue;
            };
            let limit = match conn.phase {
                Phase::Closing => continue,
                Phase::Header | Phase::Handshake | Phase::Sni => u64::from(t.header_ms),
                // The linked timeout bounds each attempt; this catches a stuck connect.
                Phase::Connecting => u64::from(t.connect_ms) * 2 + 1000,
                Phase::Relaying if conn.dirs.iter().any(|d| d.done) => u64::from(t.fin_ms),
                Phase::Relaying => u64::from(t.idle_ms),
            };
            if now.saturating_sub(conn.last_active_ms) >= limit {
                self.ctx.row.inc(timeout_counter(conn.phase));
                self.close(i as u32, true);
                self.maybe_free(i as u32);
            }
        }
        if self.accept_paused && self.active < self.ctx.worker_cap * 9 / 10 {
            self.accept_paused = false;
        }
        self.arm_accepts();
    }

    fn on_accept(&mut self, listener: usize, client: OwnedFd) {
        self.ctx.row.inc(Counter::Accepted);
        let known = self.upstreams.count(listener) > 0;
        if let Err(r) = self.ctx.admit(listener, known) {
            self.ctx.count_refusal(r);
            if r == Refusal::Full || r == Refusal::NoUpstream {
                super::set_reset_on_close(&client);
            }
            return; // dropping `client` closes it: the refusal the client sees
        }
        super::tune_socket(client.as_fd());
        let mode = match self.kind {
            EngineKind::Copy | EngineKind::Epoll => Mode::Copy,
            EngineKind::Splice => Mode::Splice,
        };
        let conn = Conn {
            listener: listener as u16,
            phase: Phase::Connecting,
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
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.generation = s.generation.wrapping_add(1);
        s.conn = Some(conn);
        self.active += 1;
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

    fn poll_header(&mut self, slot: u32) {
        let fd = self.conn(slot).client.as_raw_fd();
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(self.ud(slot, Op::HeaderPoll, 0));
        self.conn(slot).inflight += 1;
        self.push(e);
    }

    fn on_header_poll(&mut self, slot: u32, res: i32) {
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
        match super::read_proxy_header(c.client.as_fd(), &mut inbound.acc) {
            HeaderStep::More => self.poll_header(slot),
            HeaderStep::Done(h) => {
                inbound.acc = Vec::new();
                inbound.header = Some(h);
                self.after_header(slot);
            }
            HeaderStep::Bad => {
                self.ctx.row.inc(Counter::RefusedBadHeader);
                self.close(slot, true);
            }
        }
    }

    /// A plain port routed by SNI: the ClientHello's bytes are read (kept to be sent upstream
    /// first) until its server name is known.
    fn on_sni_readable(&mut self, slot: u32) {
        let config = self.ctx.config;
        let c = self.conn(slot);
        let acc = &mut c.inbound.get_or_insert_with(Box::default).acc;
        let closed = super::read_available(c.client.as_fd(), acc, super::SNI_PEEK_MAX);
        let step = super::route_by_sni(&config.listeners[c.listener as usize], acc);
        match (step, closed) {
            (SniStep::Entry(e), _) => self.connect_entry(slot, e),
            (SniStep::More, Ok(false)) => self.poll_header(slot),
            _ => {
                self.ctx.row.inc(Counter::RefusedBadSni);
                self.close(slot, true);
            }
        }
    }

    /// SNI routing chose entry `e`: connect to its addresses.
    fn connect_entry(&mut self, slot: u32, e: usize) {
        let c = self.conn(slot);
        c.entry = Some(e as u16);
        c.phase = Phase::Connecting;
        self.connect_next(slot);
    }

    /// A TLS port routed by SNI: the inner ClientHello is the start of the plaintext.
    fn tls_route(&mut self, slot: u32) {
        let config = self.ctx.config;
        let c = self.conn(slot);
        let listener = &config.listeners[c.listener as usize];
        let hello = &c.tls.as_ref().expect("a TLS connection").out[TO_UPSTREAM].pending;
        match super::route_by_sni(listener, hello) {
            SniStep::Entry(e) => self.connect_entry(slot, e),
            SniStep::More if hello.len() < super::SNI_PEEK_MAX => {}
            _ => {
                self.ctx.row.inc(Counter::RefusedBadSni);
                self.close(slot, false);
            }
        }
    }

    /// The client's PROXY header (if any) is read: TLS handshake first, else connect.
    fn after_header(&mut self, slot: u32) {
        let listener = self.conn(slot).listener as usize;
        let l = &self.ctx.config.listeners[listener];
        if l.tls.is_none() {
            if l.route == Route::Sni {
                self.conn(slot).phase = Phase::Sni;
                self.poll_header(slot);
            } else {
                self.conn(slot).phase = Phase::Connecting;
                self.connect_next(slot);
            }
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

    fn ud(&self, slot: u32, op: Op, dir: usize) -> u64 {
        UserData {
            slot,
            generation: self.slots[slot as usize].generation,
            op,
            dir: dir as u8,
        }
        .encode()
    }

    fn conn(&mut self, slot: u32) -> &mut Conn {
        self.slots[slot as usize]
            .conn
            .as_mut()
            .expect("a live slot has a connection")
    }

    /// Starts a CONNECT to the next upstream address, or gives up when all were tried.
    fn connect_next(&mut self, slot: u32) {
        let (listener, start, attempt) = {
            let c = self.conn(slot);
            (c.listener as usize, c.addr_start, c.attempt)
        };
        let entry = self.conn(slot).entry.map(usize::from);
        let Some(addr) = self.upstreams.pick(listener, entry, start, attempt) else {
            self.ctx.row.inc(Counter::UpstreamUnreachable);
            self.close(slot, true);
            return;
        };
        self.conn(slot).attempt += 1;
        let source = self.ctx.next_source(listener, addr);
        let sock = match super::upstream_socket(addr, source) {
            Ok(s) => OwnedFd::from(s),
            Err(e) => {
                tracing::warn!("cannot create an upstream socket: {e}");
                self.close(slot, true);
                return;
            }
        };
        let now = self.now_ms;
        self.ctx
            .histos
            .connecting(&mut self.slots[slot as usize].conn.as_mut().expect("live").times);
        let sa = Box::new(SockAddr::from(addr));
        let connect = opcode::Connect::new(types::Fd(sock.as_raw_fd()), sa.as_ptr(), sa.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(self.ud(slot, Op::Connect, 0));
        let timeout = opcode::LinkTimeout::new(&*self.connect_timeout)
            .build()
            .user_data(self.ud(slot, Op::LinkTimeout, 0));
        {
            let c = self.conn(slot);
            c.upstream = Some(sock);
            c.connect_addr = Some(sa);
            c.inflight += 2;
            c.last_active_ms = now;
        }
        self.push(connect);
        self.push(timeout);
    }

    fn on_connect(&mut self, slot: u32, res: i32) {
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        if res < 0 {
            let now = self.now_ms;
            self.ctx.connect_failed(-res, now);
            // Refused, unreachable, or cancelled by the linked timeout: next address.
            let c = self.conn(slot);
            c.upstream = None;
            c.connect_addr = None;
            self.connect_next(slot);
            return;
        }
        let now = self.now_ms;
        let send_proxy = self.ctx.config.listeners[self.conn(slot).listener as usize].send_proxy;
        self.record_connected(slot);
        let c = self.conn(slot);
        c.phase = Phase::Relaying;
        c.last_active_ms = now;
        c.connect_addr = None;
        let up = c.upstream.as_ref().expect("connected upstream");
        super::tune_socket(up.as_fd());
        let inbound = c.inbound.take().map(|i| *i).unwrap_or_default();
        if let Err(e) = super::send_proxy_header(
            send_proxy,
            c.client.as_fd(),
            up.as_fd(),
            inbound.header.as_ref(),
        )
        .and_then(|()| super::send_prefix(up.as_fd(), &inbound.acc))
        {
            tracing::debug!("cannot send the connection's first bytes: {e}");
            self.close(slot, true);
            return;
        }
        if self.conn(slot).tls.is_some() {
            self.start_read(slot, TO_CLIENT);
            self.tls_flush(slot, TO_UPSTREAM);
        } else {
            for d in [TO_UPSTREAM, TO_CLIENT] {
                self.start_read(slot, d);
            }
        }
    }

    /// Source and destination fds of a direction.
    fn fds(&mut self, slot: u32, d: usize) -> (RawFd, RawFd) {
        let c = self.conn(slot);
        let client = c.client.as_raw_fd();
        let upstream = c.upstream.as_ref().map_or(-1, |u| u.as_raw_fd());
        if d == TO_UPSTREAM {
            (client, upstream)
        } else {
            (upstream, client)
        }
    }

    /// Waits for bytes on a direction's source.
    fn start_read(&mut self, slot: u32, d: usize) {
        let mode = self.conn(slot).dirs[d].mode;
        let (src, _) = self.fds(slot, d);
        let e = match mode {
            Mode::Splice => {
                opcode::PollAdd::new(types::Fd(src), (libc::POLLIN | libc::POLLRDHUP) as u32)
                    .build()
                    .user_data(self.ud(slot, Op::PollIn, d))
            }
            Mode::Copy => {
                let dir = &mut self.conn(slot).dirs[d];
                dir.recv_armed = true;
                dir.paused = false;
                dir.starved = false;
                copy::recv_multi(src).user_data(self.ud(slot, Op::RecvMulti, d))
            }
        };
        self.conn(slot).inflight += 1;
        self.push(e);
    }

    // ---- splice directions ----

    fn on_poll_in(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        if res < 0 {
            self.fail(slot, d, -res, true);
            return;
        }
        if self.conn(slot).dirs[d].pipe.is_none() {
            match self.pipes.take() {
                Some(p) => {
                    self.conn(slot).dirs[d].pipe = Some(p);
                    self.ctx.row.inc(Counter::PipesInUse);
                }
                None => {
                    // The pool is empty: this direction copies from now on.
                    self.ctx.row.inc(Counter::PipePoolEmpty);
                    self.conn(slot).dirs[d].mode = Mode::Copy;
                    self.start_read(slot, d);
                    return;
                }
            }
        }
        if SPLICE_INLINE {
            self.splice_now(slot, d);
        } else {
            self.splice_in(slot, d);
        }
    }

    /// Moves a direction's bytes with splice(2) called right here, on readiness (no io-wq hop):
    /// socket → pipe → socket until the source is empty (EAGAIN: the pipe goes back to the pool
    /// and POLLIN is armed), the destination is full (POLLOUT is armed, the pipe is kept), or a
    /// round limit is reached (fairness: re-armed, it fires again at once).
    fn splice_now(&mut self, slot: u32, d: usize) {
        let (src, dst) = self.fds(slot, d);
        for _ in 0..SPLICE_ROUNDS {
            let dir = &mut self.conn(slot).dirs[d];
            let pipe = dir.pipe.as_ref().expect("splicing holds a pipe");
            if dir.in_pipe > 0 {
                match splice::splice_now(pipe.read_end(), dst, dir.in_pipe) {
                    Ok(n) => {
                        dir.in_pipe -= n as u32;
                        self.touch(slot);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        return self.fail(slot, d, e.raw_os_error().unwrap_or(libc::EIO), false);
                    }
                }
                if self.conn(slot).dirs[d].in_pipe > 0 {
                    return self.wait_writable(slot, d);
                }
                continue;
            }
            let size = pipe.size();
            match splice::splice_now(src, pipe.write_end(), size) {
                Ok(0) => {
                    self.return_pipe(slot, d);
                    return self.source_done(slot, d);
                }
                Ok(n) => {
                    self.moved(slot, d, n as u64);
                    self.conn(slot).dirs[d].in_pipe = n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.return_pipe(slot, d);
                    return self.start_read(slot, d);
                }
                Err(e) => return self.fail(slot, d, e.raw_os_error().unwrap_or(libc::EIO), true),
            }
        }
        if self.conn(slot).dirs[d].in_pipe > 0 {
            self.wait_writable(slot, d);
        } else {
            self.start_read(slot, d);
        }
    }

    fn splice_in(&mut self, slot: u32, d: usize) {
        let (src, _) = self.fds(slot, d);
        let ud = self.ud(slot, Op::SpliceIn, d);
        let c = self.conn(slot);
        let pipe = c.dirs[d].pipe.as_ref().expect("splice_in holds a pipe");
        let e = splice::splice_in(src, pipe).user_data(ud);
        c.inflight += 1;
        self.push(e);
    }

    fn splice_out(&mut self, slot: u32, d: usize) {
        let (_, dst) = self.fds(slot, d);
        let ud = self.ud(slot, Op::SpliceOut, d);
        let c = self.conn(slot);
        let dir = &c.dirs[d];
        let pipe = dir.pipe.as_ref().expect("splice_out holds a pipe");
        let e = splice::splice_out(pipe, dst, dir.in_pipe).user_data(ud);
        c.inflight += 1;
        self.push(e);
    }

    fn return_pipe(&mut self, slot: u32, d: usize) {
        if let Some(p) = self.conn(slot).dirs[d].pipe.take() {
            self.pipes.give(p);
            self.ctx.row.dec(Counter::PipesInUse);
        }
    }

    fn on_splice_in(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        match res {
            n if n > 0 => {
                self.moved(slot, d, n as u64);
                self.conn(slot).dirs[d].in_pipe = n as u32;
                self.splice_out(slot, d);
            }
            0 => {
                self.return_pipe(slot, d);
                self.source_done(slot, d);
            }
            e if -e == libc::EAGAIN => {
                // Nothing more for now: the pipe is empty, give it back and wait.
                self.return_pipe(slot, d);
                self.start_read(slot, d);
            }
            e => self.fail(slot, d, -e, true),
        }
    }

    fn on_splice_out(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        match res {
            n if n > 0 => {
                self.touch(slot);
                let dir = &mut self.conn(slot).dirs[d];
                dir.in_pipe -= n as u32;
                if dir.in_pipe > 0 {
                    self.wait_writable(slot, d);
                } else {
                    // Drained: read more right away (bulk transfers rarely stop here).
                    self.splice_in(slot, d);
                }
            }
            e if -e == libc::EAGAIN || e == 0 => self.wait_writable(slot, d),
            e => self.fail(slot, d, -e, false),
        }
    }

    fn wait_writable(&mut self, slot: u32, d: usize) {
        let (_, dst) = self.fds(slot, d);
        let e = opcode::PollAdd::new(types::Fd(dst), libc::POLLOUT as u32)
            .build()
            .user_data(self.ud(slot, Op::PollOut, d));
        self.conn(slot).inflight += 1;
        self.push(e);
    }

    fn on_poll_out(&mut self, slot: u32, d: usize, res: i32) {
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        if res < 0 || res & (libc::POLLERR | libc::POLLHUP) as i32 != 0 {
            let errno = if res < 0 { -res } else { libc::EPIPE };
            self.fail(slot, d, errno, false);
            return;
        }
        if SPLICE_INLINE {
            self.splice_now(slot, d);
        } else {
            self.splice_out(slot, d);
        }
    }

    // ---- copy directions ----

    fn on_recv(&mut self, slot: u32, d: usize, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        if self.conn(slot).tls.is_some() {
            self.on_tls_recv(slot, d, res, flags);
            return;
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.bufs.lend(bid);
            if res > 0 && self.conn(slot).phase != Phase::Closing {
                self.moved(slot, d, res as u64);
                let dir = &mut self.conn(slot).dirs[d];
                dir.queue.push_back((bid, res as u32));
                if !dir.sending {
                    self.send_front(slot, d);
                }
            } else {
                self.recycle(bid);
            }
        }
        if !more {
            self.conn(slot).dirs[d].recv_armed = false;
        }
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        match res {
            0 => {
                self.conn(slot).dirs[d].eof = true;
                self.after_send(slot, d);
            }
            n if n > 0 => {
                let dir = &self.conn(slot).dirs[d];
                if dir.queue.len() >= copy::MAX_QUEUED && dir.recv_armed && !dir.paused {
                    // Backpressure: stop receiving until the destination drains.
                    self.conn(slot).dirs[d].paused = true;
                    let target = self.ud(slot, Op::RecvMulti, d);
                    let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target))
                        .build()
                        .user_data(UserData::global(Op::Cancel, 0));
                    self.push(e);
                } else if !more {
                    self.rearm_recv(slot, d);
                }
            }
            e if -e == libc::ENOBUFS => {
                let generation = self.slots[slot as usize].generation;
                self.conn(slot).dirs[d].starved = true;
                self.starved.push_back((slot, generation, d as u8));
            }
            e if -e == libc::ECANCELED => self.rearm_recv(slot, d),
            e => self.fail(slot, d, -e, true),
        }
    }

    /// Re-arms a copy direction's RECV if nothing stands in the way.
    fn rearm_recv(&mut self, slot: u32, d: usize) {
        let dir = &self.conn(slot).dirs[d];
        if dir.recv_armed || dir.eof || dir.starved || dir.queue.len() >= copy::MAX_QUEUED {
            return;
        }
        self.start_read(slot, d);
    }

    fn send_front(&mut self, slot: u32, d: usize) {
        let (_, dst) = self.fds(slot, d);
        let ud = self.ud(slot, Op::Send, d);
        let dir = &self.conn(slot).dirs[d];
        let Some(&(bid, len)) = dir.queue.front() else {
            return;
        };
        let sent = dir.sent;
        let e = copy::send(&self.bufs, dst, bid, sent, len).user_data(ud);
        let c = self.conn(slot);
        c.dirs[d].sending = true;
        c.inflight += 1;
        self.push(e);
    }

    /// What every SEND completion does first: nothing more once closing, fail on an error,
    /// count the activity. Some(bytes sent) when the caller should go on.
    fn send_done(&mut self, slot: u32, d: usize, res: i32) -> Option<u32> {
        if self.conn(slot).phase == Phase::Closing {
            return None;
        }
        if res < 0 {
            self.fail(slot, d, -res, false);
            return None;
        }
        self.touch(slot);
        Some(res as u32)
    }

    fn on_send(&mut self, slot: u32, d: usize, res: i32) {
        self.conn(slot).dirs[d].sending = false;
        let Some(n) = self.send_done(slot, d, res) else {
            return;
        };
        let dir = &mut self.conn(slot).dirs[d];
        let (bid, len) = *dir
            .queue
            .front()
            .expect("a SEND completes the front buffer");
        dir.sent += n;
        if dir.sent < len {
            self.send_front(slot, d);
            return;
        }
        dir.sent = 0;
        dir.queue.pop_front();
        self.recycle(bid);
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        self.after_send(slot, d);
    }

    /// After a SEND finished or the source ended: send the next buffer, re-arm, or forward FIN.
    fn after_send(&mut self, slot: u32, d: usize) {
        let dir = &self.conn(slot).dirs[d];
        if dir.sending {
            return;
        }
        if !dir.queue.is_empty() {
            self.send_front(slot, d);
        } else if dir.eof {
            if !dir.done {
                self.source_done(slot, d);
            }
        } else {
            self.rearm_recv(slot, d);
        }
    }

    fn recycle(&mut self, bid: Bid) {
        self.bufs.recycle(bid);
        // A buffer is free again: wake one direction that ran out.
        while let Some((slot, generation, d)) = self.starved.pop_front() {
            let live = self.slots.get(slot as usize).is_some_and(|s| {
                s.generation == generation
                    && s.conn.as_ref().is_some_and(|c| c.phase == Phase::Relaying)
            });
            if live {
                self.conn(slot).dirs[d as usize].starved = false;
                self.rearm_recv(slot, d as usize);
                break;
            }
        }
    }

    // ---- TLS-terminated connections ----

    fn tls(&mut self, slot: u32) -> &mut TlsSide {
        self.conn(slot).tls.as_mut().expect("a TLS connection")
    }

    fn on_tls_recv(&mut self, slot: u32, d: usize, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        if !more {
            self.conn(slot).dirs[d].recv_armed = false;
        }
        let closing = self.conn(slot).phase == Phase::Closing;
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.bufs.lend(bid);
            if res > 0 && !closing {
                self.moved(slot, d, res as u64);
                let data = self.bufs.bytes(bid, res as u32);
                let side = self.slots[slot as usize]
                    .conn
                    .as_mut()
                    .and_then(|c| c.tls.as_mut())
                    .expect("a TLS connection");
                let r = tls_transform(side, d, data);
                self.recycle(bid);
                if let Err(e) = r {
                    tracing::debug!("tls: {e}");
                    self.ctx.row.inc(Counter::RefusedBadTls);
                    self.tls_abort(slot);
                    return;
                }
            } else {
                self.recycle(bid);
            }
        }
        if closing {
            return;
        }
        match res {
            0 => {
                if self.conn(slot).phase != Phase::Relaying {
                    // The client left before its session was relayed.
                    self.close(slot, false);
                    return;
                }
                let tls = self.tls(slot);
                if d == TO_UPSTREAM {
                    tls.conn.feed_eof();
                    let mut out = std::mem::take(&mut tls.out[TO_UPSTREAM].pending);
                    tls.conn.take_plaintext(&mut out);
                    tls.out[TO_UPSTREAM].pending = out;
                } else {
                    tls.conn.send_close_notify();
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
                let generation = self.slots[slot as usize].generation;
                self.conn(slot).dirs[d].starved = true;
                self.starved.push_back((slot, generation, d as u8));
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
        if self.conn(slot).phase == Phase::Handshake && !self.tls(slot).conn.is_handshaking() {
            let listener = self.conn(slot).listener as usize;
            if self.ctx.config.listeners[listener].route == Route::Sni {
                self.conn(slot).phase = Phase::Sni;
            } else {
                self.conn(slot).phase = Phase::Connecting;
                self.connect_next(slot);
            }
        }
        if self.conn(slot).phase == Phase::Sni {
            self.tls_route(slot);
        }
        if self.conn(slot).phase == Phase::Closing {
            return;
        }
        if d == TO_UPSTREAM && self.tls(slot).conn.peer_closed() {
            // close_notify: the client is done sending, as if it sent FIN.
            self.conn(slot).dirs[d].eof = true;
        }
        if self.tls(slot).out[d].queued() > TLS_OUT_MAX {
            let dir = &self.conn(slot).dirs[d];
            if dir.recv_armed && !dir.paused {
                self.conn(slot).dirs[d].paused = true;
                let target = self.ud(slot, Op::RecvMulti, d);
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target))
                    .build()
                    .user_data(UserData::global(Op::Cancel, 0));
                self.push(e);
            }
        } else if !more {
            self.tls_rearm(slot, d);
        }
        self.tls_flush(slot, TO_CLIENT);
        if self.conn(slot).phase == Phase::Relaying {
            self.tls_flush(slot, TO_UPSTREAM);
        }
    }

    /// Re-arms a TLS direction's RECV when its output has room again.
    fn tls_rearm(&mut self, slot: u32, d: usize) {
        if self.tls(slot).out[d].queued() <= TLS_OUT_MAX {
            self.rearm_recv(slot, d);
        }
    }

    /// Sends what is queued toward direction `d`'s destination, or forwards FIN when done.
    fn tls_flush(&mut self, slot: u32, d: usize) {
        if self.conn(slot).phase == Phase::Closing {
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
                if d == TO_UPSTREAM || self.conn(slot).phase == Phase::Relaying {
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
        self.push(e);
    }

    fn on_tls_send(&mut self, slot: u32, d: usize, res: i32) {
        self.tls(slot).out[d].sending = false;
        let Some(n) = self.send_done(slot, d, res) else {
            return;
        };
        self.tls(slot).out[d].sent += n as usize;
        self.tls_flush(slot, d);
    }

    /// A TLS error: send the alert rustls queued (best effort, nonblocking), then close.
    fn tls_abort(&mut self, slot: u32) {
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
        self.close(slot, false);
    }

    // ---- both ----

    /// Bytes went out: the connection is not idle (timeouts count inactivity either way).
    /// Before the relay starts (header, handshake, ClientHello) the phase's time limit counts
    /// from its start, so a client trickling bytes cannot hold a connection open.
    fn touch(&mut self, slot: u32) {
        let now = self.now_ms;
        let c = self.conn(slot);
        if c.phase == Phase::Relaying {
            c.last_active_ms = now;
        }
    }

    /// Histograms: the upstream connection is established.
    fn record_connected(&mut self, slot: u32) {
        let c = self.slots[slot as usize].conn.as_mut().expect("live");
        self.ctx.histos.connected(c.listener as usize, &mut c.times);
    }

    fn moved(&mut self, slot: u32, d: usize, n: u64) {
        self.touch(slot);
        if d == TO_CLIENT {
            let c = self.slots[slot as usize].conn.as_mut().expect("live");
            self.ctx
                .histos
                .upstream_bytes(c.listener as usize, &mut c.times);
        }
        let c = self.conn(slot);
        c.bytes[d] += n;
        self.ctx.row.add(
            if d == TO_UPSTREAM {
                Counter::BytesClientToUpstream
            } else {
                Counter::BytesUpstreamToClient
            },
            n,
        );
    }

    /// The source of `d` sent FIN and every byte was handed to the destination: forward it.
    fn source_done(&mut self, slot: u32, d: usize) {
        let now = self.now_ms;
        let c = self.conn(slot);
        let dir = &mut c.dirs[d];
        dir.eof = true;
        dir.done = true;
        c.last_active_ms = now;
        let dst = if d == TO_UPSTREAM {
            c.upstream.as_ref().map(|u| u.as_fd())
        } else {
            Some(c.client.as_fd())
        };
        if let Some(dst) = dst {
            super::shutdown_write(dst);
        }
        if c.dirs.iter().all(|d| d.done) {
            self.close(slot, false);
        }
    }

    /// An error on direction `d`: on its source (`at_source`) or its destination.
    fn fail(&mut self, slot: u32, d: usize, errno: i32, at_source: bool) {
        let from_client = (d == TO_UPSTREAM) == at_source;
        if super::is_reset(errno) {
            self.ctx.row.inc(if from_client {
                Counter::ClientReset
            } else {
                Counter::UpstreamReset
            });
        } else {
            self.ctx.row.inc(Counter::RelayErrors);
            tracing::debug!(
                from_client,
                "relay error: {}",
                io::Error::from_raw_os_error(errno)
            );
        }
        self.close(slot, true);
    }

    /// Starts closing: cancels what is in flight; the slot is freed when the last completion
    /// arrives ([`Self::maybe_free`]). `reset` closes both sockets with RST.
    fn close(&mut self, slot: u32, reset: bool) {
        let c = self.conn(slot);
        if c.phase == Phase::Closing {
            return;
        }
        c.phase = Phase::Closing;
        c.reset = reset;
        if reset {
            super::set_reset_on_close(&c.client);
            if let Some(u) = &c.upstream {
                super::set_reset_on_close(u);
            }
        }
        if c.inflight > 0 {
            let fds: Vec<RawFd> = std::iter::once(c.client.as_raw_fd())
                .chain(c.upstream.as_ref().map(|u| u.as_raw_fd()))
                .collect();
            for fd in fds {
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                    .build()
                    .user_data(UserData::global(Op::Cancel, 0));
                self.push(e);
            }
        }
    }

    /// Frees a closing slot whose last completion arrived: closes fds, returns pipes and
    /// buffers.
    fn maybe_free(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        let ready = s
            .conn
            .as_ref()
            .is_some_and(|c| c.phase == Phase::Closing && c.inflight == 0);
        if !ready {
            return;
        }
        let mut conn = s.conn.take().expect("checked above");
        self.free.push(slot);
        self.active -= 1;
        self.ctx.row.listener_close(conn.listener as usize);
        self.ctx.row.inc(Counter::Closed);
        self.ctx
            .histos
            .closed(conn.listener as usize, &conn.times, conn.bytes);
        for dir in &mut conn.dirs {
            if let Some(p) = dir.pipe.take() {
                self.pipes.give(p);
                self.ctx.row.dec(Counter::PipesInUse);
            }
            for (bid, _) in dir.queue.drain(..) {
                self.bufs.recycle(bid);
            }
        }
        // Dropping `conn` closes both sockets (with RST when `reset` set linger 0).
    }
}

/// Feeds bytes received on direction `d` through the TLS session: ciphertext from the client
/// becomes plaintext for the upstream (and handshake records for the client); plaintext from
/// the upstream becomes ciphertext for the client.
fn tls_transform(
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

/// What a timeout in `phase` counts as.
fn timeout_counter(phase: Phase) -> Counter {
    match phase {
        Phase::Header => Counter::RefusedBadHeader,
        Phase::Handshake => Counter::RefusedBadTls,
        Phase::Sni => Counter::RefusedBadSni,
        Phase::Connecting => Counter::UpstreamUnreachable,
        Phase::Relaying | Phase::Closing => Counter::IdleTimeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        let u = UserData {
            slot: 123_456,
            generation: 65_000,
            op: Op::SpliceOut,
            dir: 1,
        };
        assert_eq!(UserData::decode(u.encode()), Some(u));
        for v in 1..=13u8 {
            assert_eq!(Op::from_u8(v).map(|o| o as u8), Some(v));
        }
        assert_eq!(Op::from_u8(0), None);
    }
}
