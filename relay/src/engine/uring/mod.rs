//! The io_uring event loop of one worker: one ring, one thread, no lock on the hot path.
//!
//! A connection lives in a slot of a slab. Every submission carries a [`UserData`] = slot +
//! generation + [`Op`] + direction, so a completion for a slot that was freed and reused (a stale
//! CQE) is recognised by its generation and dropped.
//!
//! Lifecycle of a connection: multishot ACCEPT → admission → CONNECT (+ LINK_TIMEOUT), trying each
//! upstream address in turn → relay, each direction on its own ([`Dir`](conn::Dir)) with splice(2)
//! on readiness ([`super::splice`]) or RECV/SEND ([`super::copy`]) → half-close forwarded once every byte of a
//! direction was handed to the kernel → close when both directions are done, or at once with RST
//! when either side reset or a timeout expired.
//!
//! With the `sockmap` engine, a plain connection goes on the eBPF fast path once its upstream is
//! connected (and any PROXY header and first bytes are written): both sockets enter the sockmap,
//! the kernel moves their bytes, and the worker only polls each socket for FIN (POLLRDHUP) and
//! errors. A FIN is forwarded once every byte of that direction reached the destination's send
//! queue ([`Worker::fast_drained`]), which user space checks on a short backoff timer.
//!
//! Soundness rule (the one every `// SAFETY:` in this module and its files leans on): nothing a
//! submission points at is freed before its completion. A slot counts its in-flight operations
//! (`inflight`) and is freed only when that count is back to zero — its connect address, pipes
//! and lent buffers with it.
//!
//! Here: the [`Worker`], its run loop, the dispatch of completions, control messages and the
//! tick. The rest, one `impl Worker` per file: `user_data` (what a completion is for), `ring`
//! (submission), `conn` (the slab and a connection's state), `accept` (from ACCEPT to CONNECT:
//! PROXY header, SNI, decoy, TLS handshake start), `connect` (upstream addresses under the
//! connect timeout), `splice`, `copy` and `tls` (the relay directions), `fast` and `flow` (the
//! sockmap fast path and its flow control), `teardown` (accounting, FIN, errors, close, free).
#![allow(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use io_uring::{cqueue, opcode, types};

use self::conn::{Phase, Slot};
use self::connect::connect_timespec;
use self::fast::DRAIN_WAITS_MS;
use self::ring::Ring;
use self::user_data::{NO_SLOT, Op, UserData};
use super::copy::BufRing;
use super::splice::PipePool;
use super::{EngineKind, WorkerCtx};
use crate::ebpf::{Cookie, FastPath};
use crate::metrics::Counter;
use crate::upstream::Upstreams;

mod accept;
mod conn;
mod connect;
mod copy;
mod fast;
mod flow;
mod ring;
mod splice;
mod steps;
mod teardown;
mod tls;
mod user_data;

/// Submission queue entries; completions are twice that (the kernel's default).
const RING_ENTRIES: u32 = 4096;

/// The timer tick that checks every connection's timeout.
const TICK_MS: u64 = 250;

/// io-wq threads (bounded, unbounded) this ring may start, for the operations io_uring cannot
/// complete inline (a CONNECT it could not arm a poll for, under load).
const IOWQ_MAX_WORKERS: [u32; 2] = [2, 4];

/// The worker. Field order matters: `ring` is dropped before `bufs` (registered memory).
pub struct Worker<'a> {
    ring: Ring,
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
    /// The sockmap fast path (engine `sockmap` only; None if BPF refused, then this worker
    /// splices).
    fast: Option<FastPath>,
    /// Bytes a kick returns (`sockmap` only).
    kick_buf: Vec<u8>,
    /// Fast-path sockets by cookie (the slot of their connection), for flow-control events.
    fast_cookies: HashMap<Cookie, u32>,
    /// Whether the poll on the fast path's event ring is in flight.
    held_armed: bool,
    held_events: Vec<sluice_common::HeldEvent>,
    /// Pairs inserted so far, and how many of them the last audit of the maps came after.
    fast_pairs: u64,
    fast_audited: u64,
    /// `FlowStats::unannounced` as last seen: when it moves, the verdict held bytes on some
    /// socket without an event (the ring was full), and the worker looks at all of its own.
    flow_unannounced: u64,
    /// The slot the next sampling of kernel queues starts at.
    sample_next: usize,
    /// Sums of the connections' sampled kernel-queued and held bytes (the gauges).
    sampled_queued: u64,
    sampled_held: u64,
    drain_waits: Box<[types::Timespec; DRAIN_WAITS_MS.len()]>,
    upstreams: Upstreams,
    /// Copy directions waiting for a free buffer: (slot, generation, dir).
    starved: VecDeque<(u32, u16, u8)>,
    tick: Box<types::Timespec>,
    connect_timeout: Box<types::Timespec>,
    accept_armed: Vec<bool>,
    accept_paused: bool,
    /// Whether the next tick scans the slab for timeouts.
    scan: super::ScanGate,
    draining: bool,
    active: u64,
    now_ms: u64,
    cqes: Vec<(u64, i32, u32)>,
}

/// Asks the kernel whether the io_uring engines can run here ([`super::features::detect`]);
/// the error is what the supervisor falls back to epoll on.
pub fn probe() -> Result<super::features::Features, super::features::Unusable> {
    super::features::detect()
}

impl<'a> Worker<'a> {
    pub fn new(
        ctx: WorkerCtx<'a>,
        kind: EngineKind,
        listeners: Vec<OwnedFd>,
        control: OwnedFd,
        upstreams: Upstreams,
        shared_fast: Option<[OwnedFd; crate::ebpf::MAP_FDS]>,
    ) -> io::Result<Worker<'a>> {
        // The supervisor's probe found the kernel has what this engine needs; the setup flags
        // that are only optimisations are left out where the kernel lacks them.
        let (ring, _) = super::features::build_ring(RING_ENTRIES, RING_ENTRIES * 4)?;
        for l in &listeners {
            super::tune_listener(l.as_fd());
        }
        let mut max = IOWQ_MAX_WORKERS;
        let _ = ring.submitter().register_iowq_max_workers(&mut max);
        let bufs = BufRing::register(&ring)?;
        let nlisteners = ctx.config.listeners.len();
        let t = ctx.config.timeouts.connect_ms;
        let mut kind = kind;
        let fast = if kind == EngineKind::Sockmap {
            // The supervisor loaded and attached the fast path and hands every sockmap worker
            // its maps; a worker loads nothing (it holds no capability to).
            let loaded = match shared_fast {
                Some(maps) => FastPath::from_fds(maps, ctx.index as u32),
                None => Err(crate::ebpf::EbpfError::NoMaps),
            };
            match loaded {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(
                        "the sockmap fast path is unavailable ({e}); this worker splices"
                    );
                    kind = EngineKind::Splice;
                    None
                }
            }
        } else {
            None
        };
        // Holds other workers (or an earlier daemon, with pinned maps) left unannounced are not
        // this worker's to look for.
        let flow_unannounced = fast
            .as_ref()
            .and_then(|f| f.flow_stats().ok())
            .map_or(0, |s| s.unannounced);
        Ok(Worker {
            ring: Ring::new(ring),
            bufs,
            kind,
            listeners,
            control,
            control_buf: Box::new([0; 4096]),
            control_line: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            pipes: PipePool::new(),
            scan: super::ScanGate::default(),
            kick_buf: if fast.is_some() {
                vec![0; 64 * 1024]
            } else {
                Vec::new()
            },
            fast,
            fast_cookies: HashMap::new(),
            held_armed: false,
            held_events: Vec::new(),
            fast_pairs: 0,
            fast_audited: 0,
            flow_unannounced,
            sample_next: 0,
            sampled_queued: 0,
            sampled_held: 0,
            drain_waits: Box::new(
                DRAIN_WAITS_MS.map(|ms| types::Timespec::new().nsec(ms * 1_000_000)),
            ),
            upstreams,
            starved: VecDeque::new(),
            tick: Box::new(types::Timespec::new().nsec((TICK_MS * 1_000_000) as u32)),
            connect_timeout: Box::new(connect_timespec(t)),
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
        self.arm_held();
        let e = opcode::Timeout::new(&*self.tick)
            .flags(types::TimeoutFlags::MULTISHOT)
            .build()
            .user_data(UserData::global(Op::Tick, 0));
        self.push(&[e]);
        loop {
            // Chains the kernel could not take while completions were handled go first.
            self.ring.flush();
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

    /// Handles one completion; false means the worker should exit.
    fn handle(&mut self, ud: u64, res: i32, flags: u32) -> bool {
        let Some(u) = UserData::decode(ud) else {
            return true;
        };
        if u.op != Op::Tick {
            self.scan.touch();
        }
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
            Op::ConnectPoll => self.on_connect_poll(u.slot, res),
            Op::LinkTimeout => {}
            Op::PollIn
                if self.slots[u.slot as usize]
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.fast.is_some()) =>
            {
                self.on_fast_poll(u.slot, d, res)
            }
            Op::PollIn => self.on_poll_in(u.slot, d, res),
            Op::Drain => self.on_drain(u.slot, d),
            Op::Forward => self.on_forward(u.slot, d),
            Op::PollOut
                if self.slots[u.slot as usize]
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.fast.is_some()) =>
            {
                self.on_forward(u.slot, d)
            }
            Op::PollOut => self.on_poll_out(u.slot, d, res),
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
            Op::AcceptMulti | Op::ControlRead | Op::Tick | Op::Cancel | Op::HeldPoll => {}
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
            Op::HeldPoll => {
                self.held_armed = false;
                let mut events = std::mem::take(&mut self.held_events);
                if let Some(fast) = self.fast.as_mut() {
                    fast.held_events(&mut events);
                }
                self.on_held(events.drain(..));
                self.held_events = events;
                self.fast_find_unannounced();
                self.arm_held();
            }
            Op::Tick => {
                if !cqueue::more(flags) {
                    let e = opcode::Timeout::new(&*self.tick)
                        .flags(types::TimeoutFlags::MULTISHOT)
                        .build()
                        .user_data(UserData::global(Op::Tick, 0));
                    self.push(&[e]);
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

    fn arm_control(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.control.as_raw_fd()),
            self.control_buf.as_mut_ptr(),
            self.control_buf.len() as u32,
        )
        .build()
        .user_data(UserData::global(Op::ControlRead, 0));
        self.push(&[e]);
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
        // A reload may have changed the connect timeout; the kernel copies the value at each
        // submission, so changing it in place only affects connects from now on.
        *self.connect_timeout = connect_timespec(self.ctx.config.timeouts.connect_ms);
        if let Some((generation, cidrs)) = self.ctx.take_kill() {
            self.kill_clients(generation, &cidrs);
        }
        // Flow-control events the supervisor relayed (maps shared through pins).
        let held = self.ctx.take_held();
        let owner = self.ctx.index as u32;
        let events = !held.is_empty();
        self.on_held(
            held.into_iter()
                .map(|(cookie, kind)| sluice_common::HeldEvent {
                    cookie,
                    owner,
                    kind,
                }),
        );
        if events {
            self.fast_find_unannounced();
        }
    }

    /// `sluicectl deny add --kill-existing`: closes (RST) every connection whose client is in
    /// `cidrs` now; no other connection is touched.
    fn kill_clients(&mut self, generation: u64, cidrs: &[crate::cidr::Cidr]) {
        let mut n = 0;
        for i in 0..self.slots.len() {
            let Some(conn) = self.slots[i].conn.as_ref() else {
                continue;
            };
            if conn.s.is_closing() || !WorkerCtx::kills(cidrs, conn.client.as_fd()) {
                continue;
            }
            n += 1;
            self.close(i as u32, true);
            self.maybe_free(i as u32);
        }
        self.ctx.killed(generation, n);
    }

    fn on_tick(&mut self) {
        self.ctx.histos.tick();
        let now = self.now_ms;
        let t = self.ctx.config.timeouts;
        let scan = self.scan.due(now);
        if scan {
            self.scan.begin();
        }
        for i in 0..if scan { self.slots.len() } else { 0 } {
            let Some(conn) = self.slots[i].conn.as_ref() else {
                continue;
            };
            if conn.s.phase() == Phase::Relaying
                && conn.fast.as_ref().is_some_and(|f| f.fin.iter().any(|&x| x))
            {
                // Watched every tick until its bytes are out.
                self.scan.deadline(now);
                self.fast_check_half_closed(i as u32);
                self.maybe_free(i as u32);
            }
            let Some(deadline) = self.slots[i].conn.as_ref().and_then(|c| c.s.deadline(&t)) else {
                continue;
            };
            self.scan.deadline(deadline);
            if now < deadline {
                continue;
            }
            self.scan.touch();
            let slot = i as u32;
            if self.conn(slot).fast.is_some() && self.fast_moved(slot) {
                // The kernel moved its bytes meanwhile: not idle.
                self.conn(slot).s.touch(now);
                continue;
            }
            let step = self.drive(slot, |s, env| s.expire(env));
            self.apply(slot, step);
            self.maybe_free(slot);
        }
        if self.accept_paused && self.active < self.ctx.worker_cap * 9 / 10 {
            self.accept_paused = false;
        }
        self.arm_accepts();
        self.audit_fast_path();
        self.fast_find_unannounced();
        self.fast_sample();
        // An idle worker gives its slab back, so the memory of a burst does not stay. Safe:
        // with no connection, no completion in flight names a slot.
        if self.active == 0 && self.slots.capacity() > super::SLAB_KEEP {
            self.slots = Vec::new();
            self.free = Vec::new();
            self.starved = VecDeque::new();
        }
    }
}
