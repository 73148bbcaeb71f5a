//! The upstream of the request/response, connection-rate and idle workloads: an echo server.
//!
//! Shape: `threads` threads, each with its own `SO_REUSEPORT` listener and its own epoll (mio),
//! so nothing is shared and the kernel spreads connections. A connection costs one slab entry and
//! no buffer while idle; bytes read are written straight back from one per-thread buffer, and
//! only what the socket would not take is kept until it becomes writable (reading pauses
//! meanwhile). A client's FIN is answered with a close once everything has been echoed.
//! Several processes may serve the same port (one file limit each) for large idle counts.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);

/// Serves until `max_secs` have passed (the orchestrator stops it earlier).
pub fn serve(addr: SocketAddr, threads: usize, max_secs: u64) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let listener = crate::net::listen(addr, 4096)?;
            Ok(std::thread::spawn(move || {
                serve_thread(TcpListener::from_std(listener), deadline)
            }))
        })
        .collect::<io::Result<_>>()?;
    for h in handles {
        h.join().expect("echo thread panicked")?;
    }
    Ok(())
}

struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet written back.
    pending: Vec<u8>,
    /// The client sent FIN: close once `pending` is empty.
    eof: bool,
}

fn serve_thread(mut listener: TcpListener, deadline: Instant) -> io::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        match poll.poll(&mut events, Some(Duration::from_millis(500))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in &events {
            if ev.token() == LISTENER {
                accept_all(&listener, &poll, &mut conns, &mut free)?;
                continue;
            }
            let i = ev.token().0;
            let Some(conn) = conns.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            if !service(conn, &mut buf) {
                let mut c = conns[i].take().expect("present");
                let _ = poll.registry().deregister(&mut c.stream);
                free.push(i);
            }
        }
    }
    Ok(())
}

fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
) -> io::Result<()> {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nodelay(true);
                let i = free.pop().unwrap_or_else(|| {
                    conns.push(None);
                    conns.len() - 1
                });
                poll.registry().register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                conns[i] = Some(Conn {
                    stream,
                    pending: Vec::new(),
                    eof: false,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            // Out of fds or the client gave up: keep serving the others.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(()),
        }
    }
}

/// Echoes what can be echoed now; false when the connection is finished.
fn service(conn: &mut Conn, buf: &mut [u8]) -> bool {
    if !flush(conn) {
        return false;
    }
    while conn.pending.is_empty() && !conn.eof {
        match conn.stream.read(buf) {
            Ok(0) => conn.eof = true,
            Ok(n) => {
                let mut data = &buf[..n];
                while !data.is_empty() {
                    match conn.stream.write(data) {
                        Ok(w) => data = &data[w..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            conn.pending.extend_from_slice(data);
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return false,
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    !(conn.eof && conn.pending.is_empty())
}

/// Writes out `pending`; false on a write error.
fn flush(conn: &mut Conn) -> bool {
    while !conn.pending.is_empty() {
        match conn.stream.write(&conn.pending) {
            Ok(w) => {
                conn.pending.drain(..w);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    conn.pending = Vec::new();
    true
}
