//! Media beside chat: a few connections each moving paced blocks through the relay to the echo
//! server, which returns them, so every block crosses the relay both ways. Runs beside the
//! request/response generator in the mixed workload: most connections chat, these few carry a
//! phone's media upload and download.
//!
//! One writer and one reader thread per connection. The writer owns a fixed schedule (block `k`
//! is due at `start + k × block / rate`) and catches up at once when late, so a relay that cannot
//! keep up shows as bytes not echoed, not as a slower offer. Writes time out after 200 ms
//! (`SO_SNDTIMEO`) so the stop is seen even when the relay stopped reading. Runs until a line or
//! EOF on stdin, or `max`; then every writer sends its FIN and every reader reads to the echo
//! server's close (bounded), and one `RESULT` line says what was offered and what came back.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::wire::{self, LoadResult};

/// What to run.
#[derive(Debug, Clone)]
pub struct Params {
    pub target: SocketAddr,
    pub conns: usize,
    /// Offered rate of each connection, one way, Mbit/s.
    pub mbps: u32,
    /// Bytes per write.
    pub block: usize,
    /// Stop after this long even if stdin stays open.
    pub max: Duration,
}

/// Connects, moves blocks until told to stop, prints one `RESULT` line.
pub fn run(p: &Params) -> io::Result<()> {
    let mut streams = Vec::with_capacity(p.conns);
    for i in 0..p.conns {
        let s = crate::net::connect(
            crate::net::client_source(i),
            p.target,
            Duration::from_secs(5),
        )
        .map_err(|e| io::Error::new(e.kind(), format!("media connection {i}: {e}")))?;
        s.set_nonblocking(false)?;
        s.set_write_timeout(Some(Duration::from_millis(200)))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        streams.push(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_secs_f64(p.block as f64 * 8.0 / (f64::from(p.mbps) * 1e6));
    let t0 = Instant::now();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for s in &streams {
        let (w, r) = (s.try_clone()?, s.try_clone()?);
        let (stop_w, stop_r) = (Arc::clone(&stop), Arc::clone(&stop));
        let block = p.block;
        writers.push(std::thread::spawn(move || {
            write_paced(w, block, interval, t0, &stop_w)
        }));
        readers.push(std::thread::spawn(move || read_all(r, &stop_r)));
    }
    eprintln!(
        "media: {} connections, {} Mbit/s each way each, {} KiB blocks",
        p.conns,
        p.mbps,
        p.block / 1024
    );
    crate::net::wait_for_stdin(p.max);
    stop.store(true, Ordering::Release);
    let mut sent = 0u64;
    let mut errors = 0u64;
    for w in writers {
        match w.join().expect("media writer panicked") {
            Ok(n) => sent += n,
            Err(_) => errors += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut echoed = 0u64;
    for r in readers {
        let (n, ok) = r.join().expect("media reader panicked");
        echoed += n;
        errors += u64::from(!ok);
    }
    wire::result(&LoadResult::Media {
        conns: p.conns,
        secs,
        offered_mbps: f64::from(p.mbps) * p.conns as f64,
        sent,
        echoed,
        errors,
    });
    Ok(())
}

/// Writes `block`-byte chunks on schedule until `stop`, then sends FIN; returns bytes written.
fn write_paced(
    mut s: TcpStream,
    block: usize,
    interval: Duration,
    t0: Instant,
    stop: &AtomicBool,
) -> io::Result<u64> {
    let buf: Vec<u8> = (0..block).map(|i| (i % 251) as u8).collect();
    let mut written = 0u64;
    let mut k = 0u32;
    while !stop.load(Ordering::Acquire) {
        let due = t0 + interval * k;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
            continue;
        }
        let mut off = 0;
        while off < block && !stop.load(Ordering::Acquire) {
            match s.write(&buf[off..]) {
                Ok(n) => off += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        written += off as u64;
        k += 1;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(written)
}

/// Reads until the peer's close, or 5 s after `stop`; returns (bytes, whether it ended cleanly).
fn read_all(mut s: TcpStream, stop: &AtomicBool) -> (u64, bool) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Acquire) {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_secs(5) {
                return (got, false);
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return (got, false),
        }
    }
}
