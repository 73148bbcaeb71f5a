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

/// A PROXY protocol v1 header for a TCP connection from `src` to `dst` (`TCP4` or `TCP6` by
/// the addresses' family).
pub fn proxy_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// The 12-byte signature every PROXY protocol v2 header starts with.
pub const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY protocol v2 header: version/command byte `ver_cmd` (0x21 = v2 PROXY, 0x20 = v2
/// LOCAL), family/protocol byte `fam` (0x11 = TCP over IPv4, 0x21 = TCP over IPv6), then
/// `block` (addresses, TLVs) with its length.
pub fn proxy_v2_raw(ver_cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
    let mut h = PROXY_V2_SIGNATURE.to_vec();
    h.push(ver_cmd);
    h.push(fam);
    h.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    h.extend_from_slice(block);
    h
}

/// The address block of a v2 header for `src` -> `dst` (both IPv4 or both IPv6) and its
/// family byte.
pub fn proxy_v2_block(src: SocketAddr, dst: SocketAddr) -> (u8, Vec<u8>) {
    let mut b = Vec::new();
    let fam = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
            0x11
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
            0x21
        }
        _ => panic!("proxy_v2_block: {src} and {dst} differ in family"),
    };
    b.extend_from_slice(&src.port().to_be_bytes());
    b.extend_from_slice(&dst.port().to_be_bytes());
    (fam, b)
}

/// A PROXY protocol v2 `PROXY` header for a TCP connection from `src` to `dst`.
pub fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (fam, block) = proxy_v2_block(src, dst);
    proxy_v2_raw(0x21, fam, &block)
}

/// Splits a PROXY v2 header off the start of `buf`: (version/command, family, block, rest).
pub fn split_proxy_v2(buf: &[u8]) -> Option<(u8, u8, &[u8], &[u8])> {
    if buf.len() < 16 || buf[..12] != PROXY_V2_SIGNATURE {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let end = 16 + len;
    (buf.len() >= end).then(|| (buf[12], buf[13], &buf[16..end], &buf[end..]))
}

/// Connects (from `source` if given), sends `bytes`, shuts the write side and reads until the
/// connection ends (up to [`HUNG`]): what came back, and how it ended (None: still open).
pub fn send_and_read_to_end(
    addr: SocketAddr,
    source: Option<IpAddr>,
    bytes: &[u8],
) -> (SocketAddr, Vec<u8>, Option<crate::servers::Ended>) {
    let mut s = try_connect(addr, source).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let local = s.local_addr().unwrap();
    // The relay may refuse while this is still being written: only what comes back counts.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let (got, ended) = read_all(&mut s, HUNG);
    (local, got, ended)
}

/// Reads until the connection ends or `timeout` passes: the bytes, and how it ended (None:
/// still open at the deadline).
pub fn read_all(s: &mut TcpStream, timeout: Duration) -> (Vec<u8>, Option<crate::servers::Ended>) {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, None);
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(500))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (got, Some(crate::servers::Ended::Eof)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return (got, Some(crate::servers::Ended::Reset)),
        }
    }
}

/// A real TLS 1.2/1.3 ClientHello (rustls's first flight) naming `name`, a DNS name or an IP
/// address: what a TLS client, or a Signal app inside the proxy's TLS, sends first.
pub fn client_hello(name: &str) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server_name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    hello
}
