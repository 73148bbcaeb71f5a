//! Clients: connect (optionally from a chosen 127.0.0.x source), run the client side of a
//! [`StreamSpec`], and drive thousands of echo connections at once with `poll(2)`.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::pattern::{Pattern, Verifier};
use crate::servers::{Mode, StreamSpec, expect_pattern_then_eof, send_pattern};
use crate::{HUNG, sys};

/// Connects to `addr` (up to 10 s), with TCP_NODELAY and [`HUNG`] read/write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr, None).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Connects to `addr` from `source` (any port), or from the default source when None.
pub fn try_connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(ip) = source {
        // The port is chosen at connect time, per destination: many connections share a port.
        s.set_reuse_address(true)?;
        sys::set_bind_address_no_port(&s)?;
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.connect_timeout(&addr.into(), Duration::from_secs(10))?;
    let s: TcpStream = s.into();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(HUNG))?;
    s.set_write_timeout(Some(HUNG))?;
    Ok(s)
}

/// The client side of `spec` against a [`crate::servers::StreamServer`] behind `addr`: sends
/// the header and the up stream, checks the down stream byte for byte, each direction ending
/// with a FIN in the order `spec.mode` asks for.
pub fn run_stream(addr: SocketAddr, spec: StreamSpec) -> Result<(), String> {
    let mut s = try_connect(addr, None).map_err(|e| format!("connect: {e}"))?;
    s.write_all(&spec.header())
        .map_err(|e| format!("send header: {e}"))?;
    let send = move |s: &mut TcpStream| -> Result<(), String> {
        send_pattern(s, spec.up(), spec.up_len).map_err(|e| format!("client send failed: {e}"))?;
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("client shutdown failed: {e}"))
    };
    let recv = |s: &mut TcpStream| {
        expect_pattern_then_eof(s, spec.down(), spec.down_len).map_err(|e| format!("client: {e}"))
    };
    match spec.mode {
        Mode::Concurrent => {
            let mut w = s.try_clone().unwrap();
            let writer = thread::spawn(move || send(&mut w));
            let r = recv(&mut s);
            let w = writer.join().unwrap();
            r.and(w)
        }
        Mode::ReplyAfterEof => {
            send(&mut s)?;
            recv(&mut s)
        }
        Mode::SendFirst => {
            recv(&mut s)?;
            send(&mut s)?;
            // Wait for the server to close once it has checked everything.
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(0) => Ok(()),
                Ok(_) => Err("bytes after the server's FIN".into()),
                Err(e) => Err(format!("after sending: {e}")),
            }
        }
        Mode::ResetAfterSend | Mode::Watch => {
            Err(format!("run_stream does not drive {:?}", spec.mode))
        }
    }
}

/// Opens `n` connections to `addr` (from `source` if given), sequentially.
pub fn open_many(
    addr: SocketAddr,
    source: Option<IpAddr>,
    n: usize,
) -> Result<Vec<TcpStream>, String> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        v.push(try_connect(addr, source).map_err(|e| format!("connection {i} of {n}: {e}"))?);
    }
    Ok(v)
}

/// Exchanges `len` bytes on every connection with an echo server, all at once, and checks the
/// echo byte-exact (connection `i` uses the pattern `seed_base + i`). With `shutdown`, each
/// client shuts its write side after its last byte and must then see the echo's FIN; without,
/// the connections stay open for more. Fails on the first error, or after `timeout`.
pub fn echo_many(
    conns: &[TcpStream],
    seed_base: u64,
    len: usize,
    shutdown: bool,
    timeout: Duration,
) -> Result<(), String> {
    struct St {
        sent: usize,
        verifier: Verifier,
        shut: bool,
        done: bool,
    }
    let deadline = Instant::now() + timeout;
    let mut st: Vec<St> = (0..conns.len())
        .map(|i| St {
            sent: 0,
            verifier: Verifier::new(seed_base + i as u64),
            shut: false,
            done: false,
        })
        .collect();
    for c in conns {
        c.set_nonblocking(true).map_err(|e| e.to_string())?;
    }
    let mut chunk = vec![0u8; 16 * 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(conns.len());
    let mut idx: Vec<usize> = Vec::with_capacity(conns.len());
    let result = (|| {
        loop {
            pfds.clear();
            idx.clear();
            for (i, s) in st.iter().enumerate() {
                if s.done {
                    continue;
                }
                let mut events = libc::POLLIN;
                if s.sent < len {
                    events |= libc::POLLOUT;
                }
                pfds.push(libc::pollfd {
                    fd: conns[i].as_raw_fd(),
                    events,
                    revents: 0,
                });
                idx.push(i);
            }
            if pfds.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} of {} connections unfinished after {timeout:?}",
                    pfds.len(),
                    conns.len()
                ));
            }
            sys::poll(&mut pfds, 100).map_err(|e| format!("poll: {e}"))?;
            for (p, &i) in pfds.iter().zip(&idx) {
                if p.revents == 0 {
                    continue;
                }
                let s = &mut st[i];
                let mut c = &conns[i];
                if s.sent < len && p.revents & libc::POLLOUT != 0 {
                    let n = (len - s.sent).min(chunk.len());
                    Pattern::new(seed_base + i as u64).fill(s.sent as u64, &mut chunk[..n]);
                    match c.write(&chunk[..n]) {
                        Ok(w) => s.sent += w,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => {
                            return Err(format!(
                                "connection {i}: write after {} bytes: {e}",
                                s.sent
                            ));
                        }
                    }
                }
                if shutdown && s.sent == len && !s.shut {
                    c.shutdown(Shutdown::Write)
                        .map_err(|e| format!("connection {i}: shutdown: {e}"))?;
                    s.shut = true;
                }
                if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    // Bounded: a few reads per wakeup.
                    for _ in 0..4 {
                        match c.read(&mut buf) {
                            Ok(0) => {
                                let got = s.verifier.offset();
                                if got < len as u64 || !shutdown {
                                    return Err(format!(
                                        "connection {i}: closed after {got} of {len} echoed bytes"
                                    ));
                                }
                                s.done = true;
                                break;
                            }
                            Ok(n) => {
                                if s.verifier.offset() + n as u64 > len as u64 {
                                    return Err(format!(
                                        "connection {i}: more than {len} bytes echoed"
                                    ));
                                }
                                s.verifier
                                    .check(&buf[..n])
                                    .map_err(|e| format!("connection {i}: {e}"))?;
                                if !shutdown && s.verifier.offset() == len as u64 {
                                    s.done = true;
                                    break;
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) => {
                                return Err(format!(
                                    "connection {i}: read after {} bytes: {e}",
                                    s.verifier.offset()
                                ));
                            }
                        }
                    }
                }
            }
        }
    })();
    for c in conns {
        let _ = c.set_nonblocking(false);
    }
    result
}
