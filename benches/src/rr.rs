//! Open-loop request/response: many persistent connections, small messages at a fixed offered
//! rate, latency measured from the time each message *should* have been sent.
//!
//! Two threads. The sender owns the schedule: message `k` of a phase is due at
//! `phase_start + k / rate`, goes to connection `k mod conns`, and carries its due time (ns since
//! the start) and its phase in its first 9 bytes. A late sender catches up at once rather than
//! shifting the schedule, so a stalled relay shows up as latency (no coordinated omission). The
//! receiver reads echoes with epoll, reassembles 64-byte messages per connection and records
//! `now - due` for messages of measured phases. Neither thread shares anything but the sockets
//! and two counters.
//!
//! Each offered rate gets a warm-up phase and a measured phase (`MARK start/end <rate>` around
//! the latter). Messages still unanswered when the drain ends are recorded with the drain's
//! length as their latency (a lower bound) and counted as not received.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::wire::{self, Latency, LoadResult};

/// Message size on the wire.
pub const MSG_LEN: usize = 64;

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    pub target: SocketAddr,
    pub conns: usize,
    pub rates: Vec<u32>,
    pub warmup: Duration,
    pub measure: Duration,
    /// How long to wait for the last answers after the last phase.
    pub drain: Duration,
}

/// Connects, runs every rate, prints `MARK` and `RESULT` lines.
pub fn run(p: &Params) -> io::Result<()> {
    let streams = connect_all(p)?;
    let primed = prime(&streams, Duration::from_secs(30))?;
    eprintln!(
        "rr: {} connections open, each relayed one message after {} ms",
        streams.len(),
        primed.as_millis()
    );
    let streams = Arc::new(streams);
    let t0 = Instant::now();
    let sent_total = Arc::new(AtomicU64::new(0));
    let sender_done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let streams = Arc::clone(&streams);
        let sent_total = Arc::clone(&sent_total);
        let sender_done = Arc::clone(&sender_done);
        let phases = p.rates.len() * 2;
        let drain = p.drain;
        std::thread::spawn(move || receive(&streams, t0, phases, &sent_total, &sender_done, drain))
    };
    let sent = send(p, &streams, t0, &sent_total);
    sender_done.store(true, Ordering::Release);
    let recv = receiver.join().expect("receiver panicked")?;
    for (r, &rate) in p.rates.iter().enumerate() {
        let phase = 2 * r + 1;
        let mut hist = recv.hist[phase].clone();
        let lost = sent.count[phase].saturating_sub(recv.count[phase]);
        if lost > 0 {
            let _ = hist.record_n(p.drain.as_micros() as u64, lost);
        }
        wire::result(&LoadResult::Rr {
            rate,
            secs: p.measure.as_secs_f64(),
            conns: streams.len(),
            sent: sent.count[phase],
            received: recv.count[phase],
            blocked_writes: sent.blocked[phase],
            latency: Latency::of(&hist),
        });
    }
    Ok(())
}

fn connect_all(p: &Params) -> io::Result<Vec<TcpStream>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::with_capacity(p.conns);
    for i in 0..p.conns {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "only {i} of {} connections opened in 30 s",
                p.conns
            )));
        }
        let s = crate::net::connect(
            crate::net::client_source(i),
            p.target,
            Duration::from_secs(5),
        )
        .map_err(|e| io::Error::new(e.kind(), format!("connection {i}: {e}")))?;
        out.push(s);
    }
    Ok(out)
}

/// Proves every connection relayed before the clock starts: one message out on each, then each
/// echo back (blocking, bounded by `timeout` per read or write). Latency is measured on
/// established relayed connections; their setup (the relay's upstream connect, a SYN that
/// waited for its retransmission) belongs to the connection-rate workload, not here.
fn prime(streams: &[TcpStream], timeout: Duration) -> io::Result<Duration> {
    let t = Instant::now();
    let msg = [0u8; MSG_LEN];
    let named =
        |i: usize, e: io::Error| io::Error::new(e.kind(), format!("priming connection {i}: {e}"));
    for (i, mut s) in streams.iter().enumerate() {
        s.set_nonblocking(false)?;
        s.set_write_timeout(Some(timeout))?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(&msg).map_err(|e| named(i, e))?;
    }
    let mut buf = [0u8; MSG_LEN];
    for (i, mut s) in streams.iter().enumerate() {
        s.read_exact(&mut buf).map_err(|e| named(i, e))?;
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        s.set_nonblocking(true)?;
    }
    Ok(t.elapsed())
}

struct Sent {
    count: Vec<u64>,
    blocked: Vec<u64>,
}

fn send(p: &Params, streams: &[TcpStream], t0: Instant, sent_total: &AtomicU64) -> Sent {
    crate::net::tight_timer_slack();
    let phases = p.rates.len() * 2;
    let mut sent = Sent {
        count: vec![0; phases],
        blocked: vec![0; phases],
    };
    let mut backlog = Backlog::new(streams.len());
    let mut next_conn = 0usize;
    let mut msg = [0xABu8; MSG_LEN];
    for (r, &rate) in p.rates.iter().enumerate() {
        for (phase, len) in [(2 * r, p.warmup), (2 * r + 1, p.measure)] {
            let measured = phase % 2 == 1;
            let start_ns = t0.elapsed().as_nanos() as u64;
            let len_ns = len.as_nanos() as u64;
            let interval_ns = 1_000_000_000 / u64::from(rate.max(1));
            if measured {
                wire::mark("start", &rate.to_string());
            }
            let mut k = 0u64;
            loop {
                let due = start_ns + k * interval_ns;
                if due >= start_ns + len_ns {
                    break;
                }
                let now = t0.elapsed().as_nanos() as u64;
                if due > now + 20_000 {
                    backlog.retry(streams);
                    let now = t0.elapsed().as_nanos() as u64;
                    if due > now {
                        std::thread::sleep(Duration::from_nanos(due - now));
                    }
                }
                msg[..8].copy_from_slice(&due.to_le_bytes());
                msg[8] = phase as u8;
                let c = next_conn;
                next_conn = (next_conn + 1) % streams.len();
                if !backlog.write(streams, c, &msg) {
                    sent.blocked[phase] += 1;
                }
                sent.count[phase] += 1;
                sent_total.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
            if measured {
                wire::mark("end", &rate.to_string());
            }
        }
    }
    // Whatever is still queued goes out during the drain.
    let deadline = Instant::now() + p.drain;
    while !backlog.queued.is_empty() && Instant::now() < deadline {
        backlog.retry(streams);
        std::thread::sleep(Duration::from_micros(200));
    }
    sent
}

/// Bytes a connection could not take yet; they go out before anything new on that connection.
struct Backlog {
    bytes: Vec<Vec<u8>>,
    /// Connections with a non-empty backlog, each once.
    queued: Vec<usize>,
    is_queued: Vec<bool>,
}

impl Backlog {
    fn new(conns: usize) -> Backlog {
        Backlog {
            bytes: vec![Vec::new(); conns],
            queued: Vec::new(),
            is_queued: vec![false; conns],
        }
    }

    /// Writes `msg` on connection `c` after its backlog; false if some of it had to wait.
    fn write(&mut self, streams: &[TcpStream], c: usize, msg: &[u8]) -> bool {
        let done = if self.bytes[c].is_empty() {
            let mut s = &streams[c];
            match s.write(msg) {
                Ok(n) if n == msg.len() => true,
                Ok(n) => {
                    self.bytes[c].extend_from_slice(&msg[n..]);
                    false
                }
                Err(_) => {
                    self.bytes[c].extend_from_slice(msg);
                    false
                }
            }
        } else {
            self.bytes[c].extend_from_slice(msg);
            flush(&streams[c], &mut self.bytes[c]);
            false
        };
        if !self.bytes[c].is_empty() && !self.is_queued[c] {
            self.is_queued[c] = true;
            self.queued.push(c);
        }
        done
    }

    fn retry(&mut self, streams: &[TcpStream]) {
        let Backlog {
            bytes,
            queued,
            is_queued,
        } = self;
        queued.retain(|&c| {
            flush(&streams[c], &mut bytes[c]);
            let keep = !bytes[c].is_empty();
            is_queued[c] = keep;
            keep
        });
    }
}

fn flush(stream: &TcpStream, backlog: &mut Vec<u8>) {
    let mut s = stream;
    while !backlog.is_empty() {
        match s.write(backlog) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                backlog.drain(..n);
            }
        }
    }
}

struct Received {
    count: Vec<u64>,
    hist: Vec<hdrhistogram::Histogram<u64>>,
}

fn receive(
    streams: &[TcpStream],
    t0: Instant,
    phases: usize,
    sent_total: &AtomicU64,
    sender_done: &AtomicBool,
    drain: Duration,
) -> io::Result<Received> {
    let mut poll = Poll::new()?;
    for (i, s) in streams.iter().enumerate() {
        poll.registry()
            .register(&mut SourceFd(&s.as_raw_fd()), Token(i), Interest::READABLE)?;
    }
    let mut out = Received {
        count: vec![0; phases],
        hist: (0..phases).map(|_| wire::histogram()).collect(),
    };
    let mut partial: Vec<([u8; MSG_LEN], usize)> = vec![([0; MSG_LEN], 0); streams.len()];
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut received_total = 0u64;
    let mut drain_deadline: Option<Instant> = None;
    // Bounded even if the sender dies: the schedule is known in advance by the caller, and the
    // drain starts as soon as the sender says it is done.
    loop {
        if sender_done.load(Ordering::Acquire) {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + drain);
            if received_total >= sent_total.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break;
            }
        }
        match poll.poll(&mut events, Some(Duration::from_millis(20))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in &events {
            let i = ev.token().0;
            let mut s = &streams[i];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let now = t0.elapsed().as_nanos() as u64;
                        let (msg, fill) = &mut partial[i];
                        let mut data = &buf[..n];
                        while !data.is_empty() {
                            let take = (MSG_LEN - *fill).min(data.len());
                            msg[*fill..*fill + take].copy_from_slice(&data[..take]);
                            *fill += take;
                            data = &data[take..];
                            if *fill == MSG_LEN {
                                *fill = 0;
                                received_total += 1;
                                let due = u64::from_le_bytes(msg[..8].try_into().expect("8"));
                                let phase = usize::from(msg[8]);
                                if phase < phases {
                                    out.count[phase] += 1;
                                    let us = now.saturating_sub(due) / 1000;
                                    let _ = out.hist[phase].record(us.max(1));
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
    }
    Ok(out)
}
