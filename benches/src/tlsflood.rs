//! TLS handshake flood: one attacking host against a relay's TLS port, and a legitimate client
//! measuring its connect + handshake latency meanwhile.
//!
//! - [`flood`]: `threads` blocking client threads, all from one source address (one attacking
//!   host), each looping connect → full TLS handshake (TLS 1.3 offered first, no session
//!   resumption, the certificate not verified) → client Finished sent → reset (`SO_LINGER` 0,
//!   as a flooder that wants no TIME_WAIT would). Bounded by `secs` and by `max_attempts`.
//! - [`probe`]: one client from another source address, one connection at a time every
//!   `interval` (the next starts at once when one ran late): connect, handshake, 64 bytes out and
//!   their echo back, close. The latency is taken from before `connect` to the end of the
//!   handshake (what a user waits before the messenger's own protocol can start) and to the echo.
//!   Its phases (`base` without the flood, then `flood`) are announced with `MARK` lines; the
//!   orchestrator starts the flood when it reads `MARK start flood`.
//!
//! Both count a connection that is reset or closed before the handshake ends as refused, one
//! that takes longer than [`CONN_TIMEOUT`] as timed out.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, SignatureScheme,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::wire::{self, Latency, LoadResult};

/// A connection whose handshake (and echo) has not completed by then failed.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// The server name both clients send (SNI); nothing checks it.
const SNI: &str = "relay.bench";

const MSG: [u8; 64] = [0x5A; 64];

/// Accepts any certificate: the WhatsApp client cannot verify a proxy's generated certificate
/// either (its CA is made at the proxy's start), and skipping the check keeps the client's CPU
/// out of the measurement. Signatures are not checked for the same reason.
#[derive(Debug)]
struct AnyCertificate(Vec<SignatureScheme>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

/// A client configuration: rustls's defaults (TLS 1.3 and 1.2, X25519 first), no certificate
/// check, resumption only when `resume` (then rustls keeps tickets in memory and offers one).
pub fn client_config(resume: bool) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("rustls's default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(schemes)))
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// A blocking TCP connection from `source` (port picked at connect time) to `target`, with
/// [`CONN_TIMEOUT`] on connect, reads and writes.
fn connect(source: Ipv4Addr, target: SocketAddr, linger0: bool) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    crate::net::bind_address_no_port(&sock)?;
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    if linger0 {
        sock.set_linger(Some(Duration::ZERO))?;
    }
    sock.set_nodelay(true)?;
    sock.connect_timeout(&target.into(), CONN_TIMEOUT)?;
    sock.set_read_timeout(Some(CONN_TIMEOUT))?;
    sock.set_write_timeout(Some(CONN_TIMEOUT))?;
    Ok(sock.into())
}

/// How one connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Handshake done; the flag says whether it was a resumption.
    Handshake {
        resumed: bool,
    },
    /// Reset, or closed, before the handshake ended (or the connect was refused).
    Refused,
    TimedOut,
    /// Anything else (a TLS alert, a local error).
    Error,
}

fn classify(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => Outcome::Refused,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Outcome::TimedOut,
        _ => Outcome::Error,
    }
}

/// Runs a client handshake on `sock` to its end, including the client's Finished.
fn handshake(conn: &mut ClientConnection, sock: &mut TcpStream) -> Outcome {
    while conn.is_handshaking() {
        match conn.complete_io(sock) {
            Ok((0, 0)) if conn.is_handshaking() => return Outcome::Refused,
            Ok(_) => {}
            Err(e) => return classify(&e),
        }
    }
    while conn.wants_write() {
        if let Err(e) = conn.write_tls(sock) {
            return classify(&e);
        }
    }
    Outcome::Handshake {
        resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
    }
}

#[derive(Debug, Clone)]
pub struct FloodParams {
    pub target: SocketAddr,
    pub source: Ipv4Addr,
    pub threads: usize,
    pub duration: Duration,
    pub max_attempts: u64,
    /// Scheduling niceness of the whole process (0: unchanged).
    pub nice: i32,
}

#[derive(Default)]
struct FloodCounts {
    attempts: AtomicU64,
    handshakes: AtomicU64,
    refused: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
}

/// The attacking host: see the module docs.
pub fn flood(p: &FloodParams) -> io::Result<()> {
    if p.nice != 0 {
        // SAFETY: setpriority takes plain integers; 0 is this process.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, p.nice);
        }
    }
    let config = client_config(false);
    let counts = Arc::new(FloodCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + p.duration;
    wire::mark("start", "flood");
    let threads: Vec<_> = (0..p.threads)
        .map(|_| {
            let (config, counts, stop, p) =
                (config.clone(), counts.clone(), stop.clone(), p.clone());
            std::thread::spawn(move || {
                let name = ServerName::try_from(SNI).expect("valid name");
                while !stop.load(Relaxed) && Instant::now() < deadline {
                    if counts.attempts.fetch_add(1, Relaxed) >= p.max_attempts {
                        stop.store(true, Relaxed);
                        break;
                    }
                    let outcome = match connect(p.source, p.target, true) {
                        Ok(mut sock) => {
                            let mut conn = ClientConnection::new(config.clone(), name.clone())
                                .expect("client connection");
                            handshake(&mut conn, &mut sock)
                        }
                        Err(e) => classify(&e),
                    };
                    let counter = match outcome {
                        Outcome::Handshake { .. } => &counts.handshakes,
                        Outcome::Refused => &counts.refused,
                        Outcome::TimedOut => &counts.timeouts,
                        Outcome::Error => &counts.errors,
                    };
                    counter.fetch_add(1, Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let secs = started.elapsed().as_secs_f64();
    wire::mark("end", "flood");
    let c = &counts;
    wire::result(&LoadResult::TlsFlood {
        threads: p.threads,
        secs,
        attempts: c.attempts.load(Relaxed).min(p.max_attempts),
        handshakes: c.handshakes.load(Relaxed),
        refused: c.refused.load(Relaxed),
        timeouts: c.timeouts.load(Relaxed),
        errors: c.errors.load(Relaxed),
    });
    Ok(())
}

#[derive(Debug, Clone)]
pub struct ProbeParams {
    pub target: SocketAddr,
    pub source: Ipv4Addr,
    pub interval: Duration,
    /// (label, how long) in order.
    pub phases: Vec<(String, Duration)>,
    /// Offer tickets from earlier connections (rustls's in-memory store).
    pub resume: bool,
}

/// The legitimate client: see the module docs.
pub fn probe(p: &ProbeParams) -> io::Result<()> {
    let config = client_config(p.resume);
    let name = ServerName::try_from(SNI).expect("valid name");
    for (label, duration) in &p.phases {
        let mut handshake_hist = wire::histogram();
        let mut exchange_hist = wire::histogram();
        let (mut attempts, mut ok, mut resumed, mut refused, mut timeouts, mut errors) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        wire::mark("start", label);
        let started = Instant::now();
        let end = started + *duration;
        let mut next = started;
        while Instant::now() < end {
            let now = Instant::now();
            if now < next {
                std::thread::sleep(next - now);
            }
            next += p.interval;
            attempts += 1;
            let t0 = Instant::now();
            let outcome = match connect(p.source, p.target, false) {
                Ok(mut sock) => {
                    let mut conn =
                        ClientConnection::new(config.clone(), name.clone()).expect("client");
                    let outcome = handshake(&mut conn, &mut sock);
                    if let Outcome::Handshake { resumed: r } = outcome {
                        let us = t0.elapsed().as_micros() as u64;
                        let _ = handshake_hist.record(us.max(1));
                        match echo(&mut conn, &mut sock) {
                            Ok(()) => {
                                let us = t0.elapsed().as_micros() as u64;
                                let _ = exchange_hist.record(us.max(1));
                                ok += 1;
                                resumed += u64::from(r);
                            }
                            Err(e) => match classify(&e) {
                                Outcome::TimedOut => timeouts += 1,
                                _ => errors += 1,
                            },
                        }
                        conn.send_close_notify();
                        let _ = conn.write_tls(&mut sock);
                        continue;
                    }
                    outcome
                }
                Err(e) => classify(&e),
            };
            match outcome {
                Outcome::Refused => refused += 1,
                Outcome::TimedOut => timeouts += 1,
                _ => errors += 1,
            }
        }
        wire::mark("end", label);
        wire::result(&LoadResult::TlsProbe {
            phase: label.clone(),
            secs: started.elapsed().as_secs_f64(),
            attempts,
            ok,
            resumed,
            refused,
            timeouts,
            errors,
            handshake: Latency::of(&handshake_hist),
            exchange: Latency::of(&exchange_hist),
        });
    }
    Ok(())
}

/// 64 bytes through the relay to the echo upstream and back.
fn echo(conn: &mut ClientConnection, sock: &mut TcpStream) -> io::Result<()> {
    let mut tls = rustls::Stream::new(conn, sock);
    tls.write_all(&MSG)?;
    let mut got = 0;
    let mut buf = [0u8; 256];
    while got < MSG.len() {
        match tls.read(&mut buf)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}
