//! Connection rate: `concurrency` slots, each looping connect → send 64 bytes → read the echo →
//! close, as fast as the relay lets it. One thread, nonblocking sockets, epoll (mio).
//!
//! Sources rotate over the client addresses (`IP_BIND_ADDRESS_NO_PORT`) so TIME_WAIT sockets of
//! closed connections never run a source out of ports. A connection that takes longer than
//! [`CONN_TIMEOUT`] or fails counts as an error and its slot starts over. Completions are
//! counted between `MARK start` and `MARK end`, after a warm-up.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::wire::{self, Latency, LoadResult};

/// A connection that has not completed its exchange by then is an error.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(3);

const MSG: [u8; 64] = [0x5A; 64];

#[derive(Debug, Clone)]
pub struct Params {
    pub target: SocketAddr,
    pub concurrency: usize,
    pub warmup: Duration,
    pub measure: Duration,
}

enum State {
    Connecting,
    Sent { got: usize },
}

struct Slot {
    stream: TcpStream,
    state: State,
    started: Instant,
}

pub fn run(p: &Params) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    let mut next_source = 0usize;
    let mut slots: Vec<Option<Slot>> = (0..p.concurrency).map(|_| None).collect();
    let mut hist = wire::histogram();
    let (mut completed, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    let measure_from = start + p.warmup;
    let measure_to = measure_from + p.measure;
    let mut measuring = false;
    let mut buf = [0u8; 256];
    for i in 0..slots.len() {
        open(
            &poll,
            &mut slots,
            i,
            p.target,
            &mut next_source,
            &mut errors,
        );
    }
    loop {
        let now = Instant::now();
        if !measuring && now >= measure_from {
            measuring = true;
            (completed, errors) = (0, 0);
            hist.reset();
            wire::mark("start", "connrate");
        }
        if now >= measure_to {
            wire::mark("end", "connrate");
            break;
        }
        match poll.poll(&mut events, Some(Duration::from_millis(10))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in &events {
            let i = ev.token().0;
            let Some(slot) = slots[i].as_mut() else {
                continue;
            };
            match step(slot, &mut buf) {
                Step::Wait => {}
                Step::Done => {
                    let now = Instant::now();
                    if now < measure_to {
                        completed += 1;
                        let us = now.duration_since(slot.started).as_micros() as u64;
                        let _ = hist.record(us.max(1));
                    }
                    close(&poll, &mut slots, i);
                    open(
                        &poll,
                        &mut slots,
                        i,
                        p.target,
                        &mut next_source,
                        &mut errors,
                    );
                }
                Step::Failed => {
                    errors += 1;
                    close(&poll, &mut slots, i);
                    open(
                        &poll,
                        &mut slots,
                        i,
                        p.target,
                        &mut next_source,
                        &mut errors,
                    );
                }
            }
        }
        let now = Instant::now();
        for i in 0..slots.len() {
            let late = slots[i]
                .as_ref()
                .is_none_or(|s| now.duration_since(s.started) > CONN_TIMEOUT);
            if late {
                errors += 1;
                close(&poll, &mut slots, i);
                open(
                    &poll,
                    &mut slots,
                    i,
                    p.target,
                    &mut next_source,
                    &mut errors,
                );
            }
        }
    }
    for i in 0..slots.len() {
        close(&poll, &mut slots, i);
    }
    wire::result(&LoadResult::Connrate {
        concurrency: p.concurrency,
        secs: p.measure.as_secs_f64(),
        completed,
        errors,
        latency: Latency::of(&hist),
    });
    Ok(())
}

enum Step {
    Wait,
    Done,
    Failed,
}

fn step(slot: &mut Slot, buf: &mut [u8]) -> Step {
    if let State::Connecting = slot.state {
        match slot.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                // Still connecting, or failed: the error says which.
                return match slot.stream.take_error() {
                    Ok(None) => Step::Wait,
                    _ => Step::Failed,
                };
            }
            Err(_) => return Step::Failed,
        }
        match slot.stream.write(&MSG) {
            Ok(n) if n == MSG.len() => slot.state = State::Sent { got: 0 },
            Ok(_) => return Step::Failed,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(_) => return Step::Failed,
        }
    }
    let State::Sent { got } = &mut slot.state else {
        return Step::Wait;
    };
    loop {
        match slot.stream.read(buf) {
            Ok(0) => return Step::Failed,
            Ok(n) => {
                *got += n;
                if *got >= MSG.len() {
                    return Step::Done;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Failed,
        }
    }
}

fn open(
    poll: &Poll,
    slots: &mut [Option<Slot>],
    i: usize,
    target: SocketAddr,
    next_source: &mut usize,
    errors: &mut u64,
) {
    let source = crate::net::client_source(*next_source);
    *next_source += 1;
    let stream = match crate::net::start_connect(source, target) {
        Ok(s) => s,
        Err(_) => {
            *errors += 1;
            return;
        }
    };
    let mut stream = TcpStream::from_std(stream);
    if poll
        .registry()
        .register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )
        .is_err()
    {
        *errors += 1;
        return;
    }
    slots[i] = Some(Slot {
        stream,
        state: State::Connecting,
        started: Instant::now(),
    });
}

fn close(poll: &Poll, slots: &mut [Option<Slot>], i: usize) {
    if let Some(mut s) = slots[i].take() {
        let _ = poll.registry().deregister(&mut s.stream);
    }
}
