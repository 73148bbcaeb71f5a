//! The slab of connections: a [`Slot`] per connection, its [`Conn`] state and the two [`Dir`]s.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{opcode, types};
use socket2::SockAddr;

use super::Worker;
use super::fast::FastConn;
use super::tls::TlsSide;
use super::user_data::{Op, UserData};
use crate::engine::Inbound;
use crate::engine::copy::{self, Lent};
use crate::engine::session::Session;
use crate::engine::splice::Pipe;

/// Directions of a relayed byte stream: indexes into [`Conn::dirs`].
pub(super) use crate::engine::session::{Phase, TO_CLIENT, TO_UPSTREAM};

/// How a direction moves bytes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Splice,
    Copy,
}

/// One direction of a relayed connection (client → upstream or back).
#[derive(Debug)]
pub(super) struct Dir {
    pub(super) mode: Mode,
    /// Splice: the pipe lent to this direction while bytes are in flight.
    pub(super) pipe: Option<Pipe>,
    /// Splice: bytes in the pipe not yet spliced out.
    pub(super) in_pipe: u32,
    /// Copy: filled buffers (lent, length) waiting to be sent, front first.
    pub(super) queue: VecDeque<(Lent, u32)>,
    /// Copy: bytes of the front buffer already sent.
    pub(super) sent: u32,
    pub(super) recv_armed: bool,
    pub(super) sending: bool,
    /// Copy: RECV was cancelled because the queue is full.
    pub(super) paused: bool,
    /// Copy: RECV ended with ENOBUFS; re-armed when a buffer is recycled.
    pub(super) starved: bool,
    /// The source sent FIN.
    pub(super) eof: bool,
    /// FIN forwarded (SHUT_WR on the destination) after every byte.
    pub(super) done: bool,
}

impl Dir {
    pub(super) fn new(mode: Mode) -> Dir {
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

pub(super) struct Conn {
    /// The connection's phase and routing ([`Session`]): what happens next is its to decide.
    pub(super) s: Session,
    /// Where the client counts against its per-client limits, if one is set.
    pub(super) client_slot: Option<crate::limits::ClientSlot>,
    pub(super) client: OwnedFd,
    pub(super) upstream: Option<OwnedFd>,
    /// Submissions whose completion has not arrived (multishot ones count once).
    pub(super) inflight: u32,
    /// The address a CONNECT in flight points at.
    pub(super) connect_addr: Option<Box<SockAddr>>,
    pub(super) dirs: [Dir; 2],
    /// Counters already bumped for this connection's accounting.
    pub(super) bytes: [u64; 2],
    /// The client's PROXY header: bytes so far, then what it said (only on `accept_proxy`).
    pub(super) inbound: Option<Box<Inbound>>,
    /// TLS termination state (only on `tls` listeners).
    pub(super) tls: Option<Box<TlsSide>>,
    /// Timestamps for the histograms ([`crate::histo`]).
    pub(super) times: crate::histo::ConnTimes,
    /// Set while the connection is on the sockmap fast path.
    pub(super) fast: Option<Box<FastConn>>,
}

pub(super) struct Slot {
    pub(super) generation: u16,
    pub(super) conn: Option<Conn>,
}

impl Worker<'_> {
    /// Puts a new connection in a free slot (or a new one), under the slot's next generation, so
    /// completions still in flight for the slot's previous connection are recognised as stale.
    pub(super) fn insert(&mut self, conn: Conn) -> u32 {
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
        slot
    }

    pub(super) fn ud(&self, slot: u32, op: Op, dir: usize) -> u64 {
        UserData {
            slot,
            generation: self.slots[slot as usize].generation,
            op,
            dir: dir as u8,
        }
        .encode()
    }

    pub(super) fn conn(&mut self, slot: u32) -> &mut Conn {
        self.slots[slot as usize]
            .conn
            .as_mut()
            .expect("a live slot has a connection")
    }

    /// Source and destination fds of a direction.
    pub(super) fn fds(&mut self, slot: u32, d: usize) -> (RawFd, RawFd) {
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
    pub(super) fn start_read(&mut self, slot: u32, d: usize) {
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
        self.push(&[e]);
    }
}
