//! Upstream servers for the tests, written with std: an epoll echo server for thousands of
//! connections, a stream server that checks and sends pattern streams (byte-exact, with
//! half-close and reset variants chosen by the client's header), a silent server, a refusing
//! port, a black hole (SYNs dropped, so connects time out), a capture server (records what a
//! relay sends, PROXY header included) and a tagged echo (tells a client which upstream it
//! reached).
//!
//! Every server stops when dropped. Stray connections (a readiness probe, a connection the relay
//! opened and closed) never count as a test's result: stream connections announce themselves
//! with a [`StreamSpec`] header first.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use crate::pattern::{Pattern, Verifier};
use crate::{HUNG, sys};

/// A listening socket on `addr` (SO_REUSEADDR; SO_REUSEPORT when asked), nonblocking.
pub fn listen(addr: SocketAddr, reuseport: bool, backlog: i32) -> TcpListener {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    if reuseport {
        s.set_reuse_port(true).unwrap();
    }
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.listen(backlog).unwrap();
    s.set_nonblocking(true).unwrap();
    s.into()
}

/// Waits up to `timeout_ms` for `fd` to become readable.
fn readable(fd: &impl AsRawFd, timeout_ms: i32) -> bool {
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    sys::poll(&mut fds, timeout_ms).unwrap_or(0) > 0
}

// ---------------------------------------------------------------------------------------------
// Echo

/// Counters of an [`EchoServer`].
#[derive(Debug, Default)]
pub struct EchoStats {
    /// Connections accepted so far.
    pub accepted: AtomicUsize,
    /// Connections open now.
    pub active: AtomicUsize,
    /// Connections that ended with an error (reset) rather than a FIN.
    pub errors: AtomicUsize,
}

/// Echoes every byte back; after the client's FIN and the last echoed byte it shuts its write
/// side (so half-close is visible end to end) and closes. One thread, epoll, thousands of
/// connections.
pub struct EchoServer {
    addr: SocketAddr,
    stats: Arc<EchoStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct EchoConn {
    stream: TcpStream,
    pending: Vec<u8>,
    sent: usize,
    eof: bool,
}

const LISTENER: u64 = u64::MAX;

impl EchoServer {
    pub fn start(addr: SocketAddr) -> EchoServer {
        EchoServer::with_listener(listen(addr, false, 4096))
    }

    /// Several processes may listen on `addr` together (SO_REUSEPORT); the kernel spreads
    /// connections over them.
    pub fn start_reuseport(addr: SocketAddr) -> EchoServer {
        EchoServer::with_listener(listen(addr, true, 4096))
    }

    fn with_listener(listener: TcpListener) -> EchoServer {
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(EchoStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("echo".into())
            .spawn(move || echo_loop(listener, &s, &st))
            .unwrap();
        EchoServer {
            addr,
            stats,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &EchoStats {
        &self.stats
    }

    pub fn active(&self) -> usize {
        self.stats.active.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo_loop(listener: TcpListener, stats: &EchoStats, stop: &AtomicBool) {
    let ep = sys::Epoll::new().unwrap();
    ep.add(listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER)
        .unwrap();
    let mut conns: HashMap<u64, EchoConn> = HashMap::new();
    let mut next: u64 = 0;
    let mut events = Vec::with_capacity(256);
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if ep.wait(&mut events, 50).is_err() {
            break;
        }
        for ev in events.iter().copied() {
            let token = ev.u64;
            if token == LISTENER {
                // Bounded: at most 1024 accepts per wakeup, the rest on the next.
                for _ in 0..1024 {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(true).unwrap();
                            let _ = stream.set_nodelay(true);
                            next += 1;
                            if ep
                                .add(stream.as_raw_fd(), libc::EPOLLIN as u32, next)
                                .is_err()
                            {
                                stats.errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            conns.insert(
                                next,
                                EchoConn {
                                    stream,
                                    pending: Vec::new(),
                                    sent: 0,
                                    eof: false,
                                },
                            );
                            stats.accepted.fetch_add(1, Ordering::Relaxed);
                            stats.active.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => {
                            // EMFILE and friends: count it, try again on the next wakeup.
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                continue;
            }
            let Some(conn) = conns.get_mut(&token) else {
                continue;
            };
            match echo_step(conn, &mut buf) {
                Ok(Some(interest)) => {
                    let _ = ep.modify(conn.stream.as_raw_fd(), interest, token);
                }
                Ok(None) | Err(_) => {
                    let conn = conns.remove(&token).unwrap();
                    let _ = ep.delete(conn.stream.as_raw_fd());
                    if !conn.eof {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.active.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
    stats.active.store(0, Ordering::Relaxed);
}

/// One readiness event: Some(next interest) to keep the connection, None when it is done.
fn echo_step(c: &mut EchoConn, buf: &mut [u8]) -> io::Result<Option<u32>> {
    // Flush what the peer could not take before.
    while c.sent < c.pending.len() {
        match c.stream.write(&c.pending[c.sent..]) {
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Some(libc::EPOLLOUT as u32)),
            Err(e) => return Err(e),
        }
    }
    c.pending.clear();
    c.sent = 0;
    // Read and echo; bounded so one busy connection cannot starve the others.
    for _ in 0..16 {
        if c.eof {
            break;
        }
        let n = match c.stream.read(buf) {
            Ok(0) => {
                c.eof = true;
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Some(libc::EPOLLIN as u32)),
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            match c.stream.write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.pending.extend_from_slice(&buf[off..n]);
                    return Ok(Some(libc::EPOLLOUT as u32));
                }
                Err(e) => return Err(e),
            }
        }
    }
    if c.eof {
        let _ = c.stream.shutdown(Shutdown::Write);
        return Ok(None);
    }
    Ok(Some(libc::EPOLLIN as u32))
}

// ---------------------------------------------------------------------------------------------
// Pattern streams

/// "SLUICE" + a version: the first 8 bytes of every stream connection.
pub const MAGIC: u64 = 0x534c_5549_4345_0001;
/// Bytes in a [`StreamSpec`] header.
pub const HEADER_LEN: usize = 40;

/// How the two directions of a stream connection are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Both directions at once; each side shuts its write side after its last byte.
    Concurrent = 0,
    /// The client sends everything and shuts; the server answers only after that FIN.
    ReplyAfterEof = 1,
    /// The server sends everything and shuts first; the client sends only after that FIN.
    SendFirst = 2,
    /// The server sends `down_len` bytes, then resets the connection (SO_LINGER 0).
    ResetAfterSend = 3,
    /// The server sends one byte (`W`: "the upstream side is connected"), then reads until
    /// the connection ends and reports how (FIN or reset).
    Watch = 4,
}

impl Mode {
    fn from_u64(v: u64) -> Option<Mode> {
        Some(match v {
            0 => Mode::Concurrent,
            1 => Mode::ReplyAfterEof,
            2 => Mode::SendFirst,
            3 => Mode::ResetAfterSend,
            4 => Mode::Watch,
            _ => return None,
        })
    }
}

/// What one stream connection does: the client sends `up_len` bytes of the up pattern, the
/// server `down_len` bytes of the down pattern, both derived from `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSpec {
    pub seed: u64,
    pub up_len: u64,
    pub down_len: u64,
    pub mode: Mode,
}

impl StreamSpec {
    pub fn new(seed: u64, up_len: u64, down_len: u64, mode: Mode) -> StreamSpec {
        StreamSpec {
            seed,
            up_len,
            down_len,
            mode,
        }
    }

    /// The client-to-upstream stream.
    pub fn up(&self) -> Pattern {
        Pattern::new(self.seed.wrapping_mul(2))
    }

    /// The upstream-to-client stream.
    pub fn down(&self) -> Pattern {
        Pattern::new(self.seed.wrapping_mul(2).wrapping_add(1))
    }

    pub fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        for (i, v) in [
            MAGIC,
            self.seed,
            self.up_len,
            self.down_len,
            self.mode as u64,
        ]
        .into_iter()
        .enumerate()
        {
            h[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    pub fn parse(h: &[u8; HEADER_LEN]) -> Option<StreamSpec> {
        let f = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().unwrap());
        if f(0) != MAGIC {
            return None;
        }
        Some(StreamSpec {
            seed: f(1),
            up_len: f(2),
            down_len: f(3),
            mode: Mode::from_u64(f(4))?,
        })
    }
}

/// How a connection ended, seen from one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// read returned 0: the peer (or the relay for it) sent a FIN.
    Eof,
    /// read failed with ECONNRESET (or another error): the connection was reset.
    Reset,
}

/// Sends `len` bytes of `p` from offset 0.
pub fn send_pattern(w: &mut impl Write, p: Pattern, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        p.fill(off, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Reads exactly `len` bytes of `seed`'s pattern, then expects the end of the stream (FIN).
/// The socket's read timeout bounds each read.
pub fn expect_pattern_then_eof(r: &mut impl Read, p: Pattern, len: u64) -> Result<(), String> {
    let mut v = Verifier::for_pattern(p);
    let mut buf = vec![0u8; 256 * 1024];
    while v.offset() < len {
        let want = (len - v.offset()).min(buf.len() as u64) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("stream ended after {} of {len} bytes", v.offset())),
            Ok(n) => v.check(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "read failed after {} of {len} bytes: {e}",
                    v.offset()
                ));
            }
        }
    }
    match r.read(&mut buf[..1]) {
        Ok(0) => Ok(()),
        Ok(_) => Err(format!("more than the {len} bytes expected arrived")),
        Err(e) => Err(format!("no FIN after all {len} bytes: {e}")),
    }
}

/// Reads until the connection ends or `timeout` passes; returns the bytes read and how it
/// ended (None: still open at the deadline).
pub fn read_until_end(s: &TcpStream, timeout: Duration) -> (u64, Option<Ended>) {
    let deadline = Instant::now() + timeout;
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut r = s;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (total, None);
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(500))))
            .unwrap();
        match r.read(&mut buf) {
            Ok(0) => return (total, Some(Ended::Eof)),
            Ok(n) => total += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return (total, Some(Ended::Reset)),
        }
    }
}

/// What a [`StreamServer`] concluded about one connection.
pub type StreamResult = Result<Ended, String>;

/// Reports as they arrive, and those collected while waiting for another seed.
type Results = (Receiver<(u64, StreamResult)>, HashMap<u64, StreamResult>);

/// Serves [`StreamSpec`] connections, one thread each; results are collected by seed.
pub struct StreamServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    results: Mutex<Results>,
    thread: Option<JoinHandle<()>>,
}

impl StreamServer {
    pub fn start(addr: SocketAddr) -> StreamServer {
        let listener = listen(addr, false, 1024);
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let st = stop.clone();
        let thread = thread::Builder::new()
            .name("stream-accept".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    if !readable(&listener, 50) {
                        continue;
                    }
                    let Ok((stream, _)) = listener.accept() else {
                        continue;
                    };
                    let tx: Sender<_> = tx.clone();
                    let _ = thread::Builder::new()
                        .name("stream-conn".into())
                        .spawn(move || serve_stream(stream, &tx));
                }
            })
            .unwrap();
        StreamServer {
            addr,
            stop,
            results: Mutex::new((rx, HashMap::new())),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The result of the connection that announced `seed`, waiting up to `timeout` for it.
    pub fn result(&self, seed: u64, timeout: Duration) -> StreamResult {
        let deadline = Instant::now() + timeout;
        let mut guard = self.results.lock().unwrap();
        let (rx, done) = &mut *guard;
        loop {
            if let Some(r) = done.remove(&seed) {
                return r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((s, r)) => {
                    done.insert(s, r);
                }
                Err(_) => {
                    return Err(format!(
                        "the server reported nothing for stream {seed} within {timeout:?}"
                    ));
                }
            }
        }
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_stream(mut s: TcpStream, tx: &Sender<(u64, StreamResult)>) {
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(HUNG)).unwrap();
    s.set_write_timeout(Some(HUNG)).unwrap();
    let mut h = [0u8; HEADER_LEN];
    if s.read_exact(&mut h).is_err() {
        return; // a probe or a connection the relay gave up on: not a test's stream
    }
    let Some(spec) = StreamSpec::parse(&h) else {
        return;
    };
    let result = serve_spec(s, spec);
    let _ = tx.send((spec.seed, result));
}

fn serve_spec(mut s: TcpStream, spec: StreamSpec) -> StreamResult {
    let send = move |s: &mut TcpStream| -> Result<(), String> {
        send_pattern(s, spec.down(), spec.down_len)
            .map_err(|e| format!("server send failed: {e}"))?;
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("server shutdown failed: {e}"))
    };
    match spec.mode {
        Mode::Concurrent => {
            let mut w = s.try_clone().unwrap();
            let writer = thread::spawn(move || send(&mut w));
            let r = expect_pattern_then_eof(&mut s, spec.up(), spec.up_len)
                .map_err(|e| format!("server: {e}"));
            let w = writer.join().unwrap();
            r.and(w).map(|()| Ended::Eof)
        }
        Mode::ReplyAfterEof => {
            expect_pattern_then_eof(&mut s, spec.up(), spec.up_len)
                .map_err(|e| format!("server: {e}"))?;
            send(&mut s)?;
            Ok(Ended::Eof)
        }
        Mode::SendFirst => {
            send(&mut s)?;
            expect_pattern_then_eof(&mut s, spec.up(), spec.up_len)
                .map_err(|e| format!("server: {e}"))?;
            Ok(Ended::Eof)
        }
        Mode::ResetAfterSend => {
            send_pattern(&mut s, spec.down(), spec.down_len)
                .map_err(|e| format!("server send failed: {e}"))?;
            SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
            Ok(Ended::Reset)
        }
        Mode::Watch => match s.write_all(b"W").map(|()| read_until_end(&s, HUNG)) {
            Err(e) => Err(format!("server could not greet: {e}")),
            Ok((_, Some(end))) => Ok(end),
            Ok((n, None)) => Err(format!(
                "connection still open {HUNG:?} after the client went ({n} bytes read)"
            )),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Silent, refusing, black hole

/// Accepts connections and never reads or writes; holds them until dropped.
pub struct SilentServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SilentServer {
    pub fn start(addr: SocketAddr) -> SilentServer {
        let listener = listen(addr, false, 1024);
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (acc, st) = (accepted.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut held = Vec::new();
            while !st.load(Ordering::Relaxed) {
                if readable(&listener, 50)
                    && let Ok((s, _)) = listener.accept()
                {
                    held.push(s);
                    acc.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        SilentServer {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A port that is bound but not listening: connecting to it is refused (RST), and nothing
/// else can take the port while this lives.
pub struct RefusingPort {
    addr: SocketAddr,
    _socket: Socket,
}

impl RefusingPort {
    pub fn new(addr: SocketAddr) -> RefusingPort {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        s.bind(&addr.into()).unwrap();
        RefusingPort { addr, _socket: s }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A listener whose accept queue is full and never drained: the kernel drops further SYNs, so
/// a connect to it neither succeeds nor fails until the connector gives up.
pub struct BlackHole {
    addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<Socket>,
}

impl BlackHole {
    pub fn new(addr: SocketAddr) -> BlackHole {
        let listener = listen(addr, false, 0);
        // Backlog 0 holds one connection; two more nonblocking connects make sure it is full.
        let mut fillers = Vec::new();
        for _ in 0..3 {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            fillers.push(s);
            thread::sleep(Duration::from_millis(50));
        }
        BlackHole {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// True when a fresh connect to it does not complete within `wait` (the hole works).
    pub fn swallows_syns(&self, wait: Duration) -> bool {
        let s = Socket::new(Domain::for_address(self.addr), Type::STREAM, None).unwrap();
        s.connect_timeout(&self.addr.into(), wait).is_err()
    }
}

// ---------------------------------------------------------------------------------------------
// Capture

/// Records everything each connection sends up to its FIN (the PROXY header a relay wrote
/// first included), then answers `reply`, shuts its write side and closes. One thread per
/// connection; counts accepted connections, so a test can prove nothing reached it.
pub struct CaptureServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    captured: Mutex<Receiver<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CaptureServer {
    pub fn start(addr: SocketAddr, reply: &'static [u8]) -> CaptureServer {
        let listener = listen(addr, false, 1024);
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let (acc, st) = (accepted.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("capture-accept".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    if !readable(&listener, 50) {
                        continue;
                    }
                    let Ok((mut s, _)) = listener.accept() else {
                        continue;
                    };
                    acc.fetch_add(1, Ordering::Relaxed);
                    let tx: Sender<Vec<u8>> = tx.clone();
                    let _ = thread::Builder::new()
                        .name("capture-conn".into())
                        .spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(HUNG));
                            let _ = s.set_write_timeout(Some(HUNG));
                            let mut got = Vec::new();
                            let _ = s.read_to_end(&mut got);
                            let _ = tx.send(got);
                            let _ = s.write_all(reply);
                            let _ = s.shutdown(Shutdown::Write);
                        });
                }
            })
            .unwrap();
        CaptureServer {
            addr,
            accepted,
            captured: Mutex::new(rx),
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// What the next finished connection sent (in the order they finished), waiting up to
    /// `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.captured.lock().unwrap().recv_timeout(timeout).ok()
    }
}

impl Drop for CaptureServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tagged echo

/// Greets every connection with its `tag` at once, then echoes until the client's FIN, then
/// shuts its write side: the client learns which server it reached even when a relay passes
/// through more connections (health checks) than the test makes. One thread per connection.
pub struct TagEchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TagEchoServer {
    pub fn start(addr: SocketAddr, tag: &'static [u8]) -> TagEchoServer {
        let listener = listen(addr, false, 1024);
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = thread::Builder::new()
            .name("tag-echo-accept".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    if !readable(&listener, 50) {
                        continue;
                    }
                    let Ok((mut s, _)) = listener.accept() else {
                        continue;
                    };
                    let _ = thread::Builder::new()
                        .name("tag-echo-conn".into())
                        .spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(HUNG));
                            let _ = s.set_write_timeout(Some(HUNG));
                            if s.write_all(tag).is_err() {
                                return;
                            }
                            let mut buf = vec![0u8; 64 << 10];
                            loop {
                                match s.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        if s.write_all(&buf[..n]).is_err() {
                                            return;
                                        }
                                    }
                                    Err(_) => return,
                                }
                            }
                            let _ = s.shutdown(Shutdown::Write);
                        });
                }
            })
            .unwrap();
        TagEchoServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TagEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
