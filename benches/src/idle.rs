//! Idle capacity: open `count` connections through the relay, prove each is relayed end to end
//! with one echoed byte, then hold them all, idle, until told to close.
//!
//! At most [`IN_FLIGHT`] connections are being set up at once (the relay's accept backlog is
//! not the thing measured); one that has not echoed within [`CONN_TIMEOUT`] counts as failed and
//! is closed. When every connection is settled, or the setup deadline passes, the result line
//! goes out and the process waits for a line (or EOF) on stdin, at most `hold_max`, then closes
//! everything by exiting. One process holds up to ~19k sockets (RLIMIT_NOFILE 20000): the
//! orchestrator starts several for more.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::wire::{self, LoadResult};

/// Connections being set up at once.
pub const IN_FLIGHT: usize = 256;
/// A connection that has not echoed its byte by then failed.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct Params {
    pub target: SocketAddr,
    pub count: usize,
    /// Index of the first client source address this process uses.
    pub source_base: usize,
    pub setup_max: Duration,
    pub hold_max: Duration,
    /// Give up when connections failed and none became held for this long (the relay is full).
    pub patience: Duration,
    /// A connection not proven relayed by then failed ([`CONN_TIMEOUT`] by default).
    pub conn_timeout: Duration,
}

#[derive(PartialEq)]
enum State {
    Connecting,
    Sent,
    Held,
}

struct Conn {
    stream: TcpStream,
    state: State,
    started: Instant,
}

/// Why connections failed, for the log (the report counts only how many did).
#[derive(Default)]
struct Failures {
    /// The connect could not even start (e.g. no source port): the last error.
    not_started: usize,
    last_start_error: Option<io::Error>,
    /// Refused, reset or closed before the echoed byte came back.
    closed_before_echo: usize,
    /// Neither connected nor echoed within the connection timeout.
    timed_out_connecting: usize,
    timed_out_echo: usize,
    /// Held, then closed by the relay.
    closed_after_held: usize,
}

pub fn run(p: &Params) -> io::Result<()> {
    let nofile = crate::net::raise_nofile()?;
    if p.count as u64 + 64 > nofile {
        return Err(io::Error::other(format!(
            "{} connections need more than the file limit {nofile}",
            p.count
        )));
    }
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<Conn>> = Vec::with_capacity(p.count);
    let (mut held, mut failed, mut in_flight) = (0usize, 0usize, 0usize);
    let start = Instant::now();
    let deadline = start + p.setup_max;
    let mut buf = [0u8; 64];
    let mut last_progress = Instant::now();
    let mut why = Failures::default();
    // Connections not yet proven relayed, in the order they started (so in deadline order: one
    // timeout for all): timeouts are found at the front, without walking every connection.
    let mut unproven: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    while held + failed < p.count && Instant::now() < deadline {
        // Nothing became held for a while although connections failed: the relay is full.
        if failed > 0 && last_progress.elapsed() > p.patience {
            eprintln!(
                "idle: no progress for {} ms ({failed} failed): the relay holds no more",
                p.patience.as_millis()
            );
            break;
        }
        while in_flight < IN_FLIGHT && conns.len() < p.count {
            let i = conns.len();
            let source = crate::net::client_source(p.source_base + i);
            match crate::net::start_connect(source, p.target) {
                Ok(s) => {
                    let mut stream = TcpStream::from_std(s);
                    poll.registry().register(
                        &mut stream,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    conns.push(Some(Conn {
                        stream,
                        state: State::Connecting,
                        started: Instant::now(),
                    }));
                    unproven.push_back(i);
                    in_flight += 1;
                }
                Err(e) => {
                    conns.push(None);
                    failed += 1;
                    why.not_started += 1;
                    why.last_start_error = Some(e);
                }
            }
        }
        match poll.poll(&mut events, Some(Duration::from_millis(50))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in &events {
            let i = ev.token().0;
            let Some(conn) = conns[i].as_mut() else {
                continue;
            };
            match advance(conn, &mut buf) {
                Some(true) => {
                    held += 1;
                    in_flight -= 1;
                    last_progress = Instant::now();
                }
                Some(false) => {
                    if conn.state == State::Held {
                        // The relay closed a connection it had accepted.
                        held -= 1;
                        why.closed_after_held += 1;
                    } else {
                        in_flight -= 1;
                        why.closed_before_echo += 1;
                    }
                    failed += 1;
                    conns[i] = None;
                }
                None => {}
            }
        }
        let now = Instant::now();
        while let Some(&i) = unproven.front() {
            let c = &mut conns[i];
            match c.as_ref() {
                // Proven, or failed and counted already.
                None => {}
                Some(conn) if conn.state == State::Held => {}
                Some(conn) if now.duration_since(conn.started) > p.conn_timeout => {
                    if conn.state == State::Connecting {
                        why.timed_out_connecting += 1;
                    } else {
                        why.timed_out_echo += 1;
                    }
                    *c = None;
                    failed += 1;
                    in_flight -= 1;
                }
                // The oldest unproven one has time left, so every later one has too.
                Some(_) => break,
            }
            unproven.pop_front();
        }
    }
    if held < p.count {
        eprintln!(
            "idle: {held} of {} held; failed: {} could not start (last: {:?}), {} closed before \
             the echo, {} still connecting and {} connected but not echoed after {} ms, {} closed \
             after being held, {} in flight and {} never tried when setup time ran out",
            p.count,
            why.not_started,
            why.last_start_error,
            why.closed_before_echo,
            why.timed_out_connecting,
            why.timed_out_echo,
            p.conn_timeout.as_millis(),
            why.closed_after_held,
            in_flight,
            p.count - conns.len(),
        );
    }
    wire::result(&LoadResult::Idle {
        attempted: p.count,
        held,
        failed: p.count - held,
        setup_secs: start.elapsed().as_secs_f64(),
    });
    crate::net::wait_for_stdin(p.hold_max);
    drop(conns);
    Ok(())
}

/// Moves a connection on; `Some(true)` when it just became held, `Some(false)` when it failed
/// (or a held one was closed by the relay).
fn advance(conn: &mut Conn, buf: &mut [u8]) -> Option<bool> {
    if conn.state == State::Connecting {
        match conn.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                return match conn.stream.take_error() {
                    Ok(None) => None,
                    _ => Some(false),
                };
            }
            Err(_) => return Some(false),
        }
        match conn.stream.write(b"x") {
            Ok(1) => conn.state = State::Sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            _ => return Some(false),
        }
    }
    match conn.stream.read(buf) {
        Ok(0) => Some(false),
        Ok(_) if conn.state == State::Sent => {
            conn.state = State::Held;
            Some(true)
        }
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(_) => Some(false),
    }
}
