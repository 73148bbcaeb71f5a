//! The life of one relayed connection as plain data: which phase it is in, what each event
//! means, and what the engine does next. No socket, no clock, no ring.
//!
//! An engine ([`super::uring`], [`super::epoll`]) moves bytes and tells the [`Session`] what
//! happened: the PROXY header was read, the first bytes are these, the TLS handshake ended, the
//! connect failed, a direction's FIN went out, an error, the time. The session answers with one
//! [`Step`] for the engine to carry out. Routing by SNI, the decoy, failover over the upstream
//! addresses, each phase's time limit, and how a connection ends (FIN or RST, and what it is
//! counted as) are decided here and only here, so the engines cannot drift apart, and every
//! transition is unit-tested without a socket or a sleep. Modelled on quinn-proto and rustls:
//! the protocol's state is a value that any runtime drives.
//!
//! ```text
//! accept ── accept_proxy? ── Header ──(read, admitted)──┐
//!    └──────────────────────────────────────────────────┤
//!  ┌────────────────────────────────────────────────────┘
//!  ├─ plain port routed by SNI, or with a decoy ── Sni ──(first bytes)── entry N | decoy
//!  ├─ TLS port with a decoy ── Sni (the first byte) ── TLS: Handshake | anything else: decoy
//!  ├─ TLS port ── Handshake ──(done)── routed by SNI or with a decoy? ── Sni (plaintext) ── …
//!  └─ otherwise ───────────────────────────────────────────────────────────────────────┐
//!  Connecting (each address in turn; none left: closed) ── Relaying ──(both FINs)── Closing
//! ```

use std::net::SocketAddr;

use super::{SNI_PEEK_MAX, SniStep, Sniff};
use crate::config::{Listener, Route, SendProxy, Timeouts};
use crate::metrics::Counter;

/// Direction of a relayed byte stream: client → upstream.
pub const TO_UPSTREAM: usize = 0;
/// Direction of a relayed byte stream: upstream → client.
pub const TO_CLIENT: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the client's PROXY header (`accept_proxy`).
    Header,
    /// TLS handshake with the client; the upstream is chosen once it completes.
    Handshake,
    /// Reading the first bytes that choose the upstream or the decoy: a ClientHello's name, an
    /// HTTP request, the first byte on a TLS port (or the same inside TLS, after the handshake).
    Sni,
    /// Connecting to the upstream (or the decoy), one address after another.
    Connecting,
    Relaying,
    /// Decided to end; the engine is releasing what the connection holds.
    Closing,
}

/// Who bounds each connect attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectTimer {
    /// The engine does, exactly (io_uring's LINK_TIMEOUT), and reports the end of the attempt
    /// as a failed connect; the session's own limit is only a backstop that closes.
    Engine,
    /// The session does: at its limit, the next address is tried.
    Session,
}

/// What the engine does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing now; the next event of this phase (more bytes, a completion) moves it on.
    Wait,
    /// Wait for the client's PROXY header to be readable, then read it ([`super::read_proxy_header`])
    /// and call [`Session::header`].
    ReadHeader,
    /// Wait for the client's first bytes, then read them and call [`Session::first_bytes`] (a
    /// plain port), or peek at the first one and call [`Session::peeked`] (a TLS port).
    Sniff,
    /// Start a TLS session with the client under the listener's certificate and handshake;
    /// [`Session::tls_refused`] if there is none, [`Session::handshake_done`] when it is done.
    StartTls,
    /// Connect to this address (dropping any earlier attempt's socket), from a source address of
    /// the listener's; then [`Session::connected`] or [`Session::connect_failed`].
    Connect(SocketAddr),
    /// The upstream is connected: send this PROXY header, then the bytes read so far, and relay.
    Relay(SendProxy),
    /// End the connection.
    Close(Close),
}

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// RST both ways (SO_LINGER 0), rather than FIN.
    pub reset: bool,
    /// A TLS client whose handshake is done gets its close_notify first (as nginx's
    /// `SSL_shutdown` at its header timeout), if nothing else is being sent to it.
    pub close_notify: bool,
}

const RESET: Step = Step::Close(Close {
    reset: true,
    close_notify: false,
});
const FIN: Step = Step::Close(Close {
    reset: false,
    close_notify: false,
});

/// How a read of a client's first bytes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client may send more.
    Open,
    /// The client sent FIN after them.
    Ended,
    /// The read failed (reset).
    Failed,
}

/// How reading a client's PROXY header ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Complete, and the address it names was admitted.
    Admitted,
    /// Complete, and admission refused the address it names (admission counted why).
    Refused,
    /// Malformed, too long, or the client closed or failed first.
    Bad,
}

/// What a session needs to know of the worker around it, and where it counts.
pub trait Env {
    /// Listener `l` of the configuration in force (a reload changes it under live sessions).
    fn listener(&self, l: usize) -> &Listener;
    /// Address `attempt` of listener `listener`'s upstreams (`entry`: only that SNI-chosen one),
    /// counting from `start`; None once every address was tried.
    fn upstream(
        &self,
        listener: usize,
        entry: Option<usize>,
        start: usize,
        attempt: usize,
    ) -> Option<SocketAddr>;
    /// The listener's decoy (`plain_on_tls`: for plaintext that came to a TLS port).
    fn decoy(&self, listener: usize, plain_on_tls: bool) -> Option<SocketAddr>;
    /// Whether the upstreams have addresses, all of them refused by the destination allowlist.
    fn dest_refused(&self, listener: usize, entry: Option<usize>) -> bool;
    fn count(&mut self, c: Counter);
    /// The worker's coarse clock, in ms.
    fn now_ms(&self) -> u64;
}

/// One connection's phase and the facts that decide its next steps.
#[derive(Debug, Clone)]
pub struct Session {
    listener: u16,
    phase: Phase,
    timer: ConnectTimer,
    /// Going to the listener's decoy instead of its upstream ([`crate::decoy`]).
    decoy: bool,
    /// A TLS port with a decoy: the first byte was seen to start a TLS handshake.
    sniffed: bool,
    /// A TLS session with the client was started.
    terminated: bool,
    /// The upstream entry SNI routing chose; None = every address of the listener.
    entry: Option<u16>,
    /// Failover: the address to start at, and attempts so far.
    start: usize,
    attempt: u32,
    /// When the phase started, or (relaying) the last byte moved: the time limits count from it.
    since_ms: u64,
    /// Direction `d`'s FIN was forwarded after its last byte.
    done: [bool; 2],
}

impl Session {
    /// A connection accepted on listener `listener`, starting at upstream address `start`
    /// (the worker's round robin); [`Session::begin`] gives its first step.
    pub fn new(listener: usize, start: usize, timer: ConnectTimer, now_ms: u64) -> Session {
        Session {
            listener: listener as u16,
            phase: Phase::Header,
            timer,
            decoy: false,
            sniffed: false,
            terminated: false,
            entry: None,
            start,
            attempt: 0,
            since_ms: now_ms,
            done: [false; 2],
        }
    }

    pub fn listener(&self) -> usize {
        usize::from(self.listener)
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// Whether the connection goes (or went) to the decoy.
    pub fn is_decoy(&self) -> bool {
        self.decoy
    }

    /// The first step of an accepted connection.
    pub fn begin(&mut self, env: &mut impl Env) -> Step {
        if env.listener(self.listener()).accept_proxy {
            self.phase = Phase::Header;
            return Step::ReadHeader;
        }
        self.after_header(env)
    }

    /// The PROXY header was read (or could not be).
    pub fn header(&mut self, env: &mut impl Env, read: Header) -> Step {
        if self.phase != Phase::Header {
            return Step::Wait;
        }
        match read {
            Header::Admitted => self.after_header(env),
            Header::Refused => self.close(true),
            Header::Bad => {
                env.count(Counter::RefusedBadHeader);
                self.close(true)
            }
        }
    }

    /// The client's PROXY header (if any) is read: what its port does first.
    fn after_header(&mut self, env: &mut impl Env) -> Step {
        let l = env.listener(self.listener());
        let decoy = !l.decoy.is_off();
        if l.tls.is_none() {
            if l.route == Route::Sni || decoy {
                self.enter(Phase::Sni, env.now_ms());
                return Step::Sniff;
            }
            return self.connect_first(env);
        }
        if decoy && !self.sniffed {
            // Is it TLS at all? Looked at before the handshake, so a probe's bytes can still go
            // to the decoy as they came.
            self.enter(Phase::Sni, env.now_ms());
            return Step::Sniff;
        }
        self.terminated = true;
        self.enter(Phase::Handshake, env.now_ms());
        Step::StartTls
    }

    /// A TLS port with a decoy: whether the client's first byte starts a TLS handshake (None:
    /// nothing yet; Err: the client closed or failed). Anything else goes to the decoy, with the
    /// bytes the engine read meanwhile.
    pub fn peeked(&mut self, env: &mut impl Env, tls: std::io::Result<Option<bool>>) -> Step {
        if self.phase != Phase::Sni || self.terminated {
            return Step::Wait;
        }
        match tls {
            Ok(None) => Step::Sniff,
            Ok(Some(true)) => {
                self.sniffed = true;
                self.after_header(env)
            }
            Ok(Some(false)) => self.go_decoy(env),
            Err(_) => self.close(false),
        }
    }

    /// A plain port routed by SNI or with a decoy: the client's first bytes so far (`acc`, all
    /// of them, kept by the engine to be sent first) and how the read ended.
    pub fn first_bytes(&mut self, env: &mut impl Env, acc: &[u8], source: Source) -> Step {
        if self.phase != Phase::Sni || self.terminated {
            return Step::Wait;
        }
        let l = env.listener(self.listener());
        if l.route == Route::Static {
            let ended = source != Source::Open;
            return match super::sniff(acc, ended) {
                Sniff::Decoy => self.go_decoy(env),
                Sniff::More => Step::Sniff,
                Sniff::Relay if ended && acc.is_empty() => self.close(false),
                Sniff::Relay => self.connect_first(env),
            };
        }
        match (super::route_by_sni(l, acc), source) {
            (SniStep::Entry(e), _) => self.connect_entry(env, e),
            (SniStep::More, Source::Open) => Step::Sniff,
            _ if !l.decoy.is_off() => self.go_decoy(env),
            _ => {
                env.count(Counter::RefusedBadSni);
                self.close(true)
            }
        }
    }

    /// [`Step::StartTls`] could not be carried out: no certificate (never relay a TLS port's
    /// bytes as plaintext), or the session was refused.
    pub fn tls_refused(&mut self, env: &mut impl Env) -> Step {
        env.count(Counter::RefusedBadTls);
        self.close(true)
    }

    /// The TLS session failed (a bad record, a refused handshake; the engine sends the alert):
    /// counted as a bad TLS client, unless it was a TLS-ALPN-01 validation that ended with its
    /// handshake, as it should (`acme_answered`).
    pub fn tls_failed(&mut self, env: &mut impl Env, acme_answered: bool) -> Step {
        if self.phase == Phase::Closing {
            return Step::Wait;
        }
        if !acme_answered {
            env.count(Counter::RefusedBadTls);
        }
        self.close(false)
    }

    /// The TLS handshake is done; `plaintext` is what the client sent inside it so far
    /// (`ended`: it also sent FIN or close_notify).
    pub fn handshake_done(
        &mut self,
        env: &mut impl Env,
        resumed: bool,
        plaintext: &[u8],
        ended: bool,
    ) -> Step {
        if self.phase != Phase::Handshake {
            return Step::Wait;
        }
        env.count(Counter::TlsHandshakes);
        if resumed {
            env.count(Counter::TlsResumed);
        }
        let l = env.listener(self.listener());
        if l.route == Route::Sni || !l.decoy.is_off() {
            // The handshake's limit goes on: the phase started when the client came.
            self.phase = Phase::Sni;
            return self.plaintext(env, plaintext, ended);
        }
        self.connect_first(env)
    }

    /// A TLS port routed by SNI or with a decoy, after the handshake: the plaintext so far (the
    /// inner ClientHello, or what the client sends first) picks the upstream or the decoy.
    pub fn plaintext(&mut self, env: &mut impl Env, hello: &[u8], ended: bool) -> Step {
        if self.phase != Phase::Sni || !self.terminated {
            return Step::Wait;
        }
        let l = env.listener(self.listener());
        let step = if l.route == Route::Static {
            match super::sniff(hello, false) {
                Sniff::Decoy => return self.go_decoy(env),
                Sniff::Relay => return self.connect_first(env),
                Sniff::More => Step::Wait,
            }
        } else {
            match super::route_by_sni(l, hello) {
                SniStep::Entry(e) => return self.connect_entry(env, e),
                SniStep::More if hello.len() < SNI_PEEK_MAX => Step::Wait,
                _ if !l.decoy.is_off() => return self.go_decoy(env),
                _ => {
                    env.count(Counter::RefusedBadSni);
                    return self.close(false);
                }
            }
        };
        // No more bytes will come to complete what decides.
        if ended { self.close(false) } else { step }
    }

    /// The connection is a probe: to the listener's decoy with the bytes it sent so far (no
    /// PROXY header), or closed when there is no decoy to go to.
    fn go_decoy(&mut self, env: &mut impl Env) -> Step {
        env.count(Counter::Decoyed);
        self.decoy = true;
        self.entry = None;
        self.attempt = 0;
        self.phase = Phase::Connecting;
        self.next(env)
    }

    /// SNI routing chose upstream entry `e`.
    fn connect_entry(&mut self, env: &mut impl Env, e: usize) -> Step {
        self.entry = Some(e as u16);
        self.connect_first(env)
    }

    fn connect_first(&mut self, env: &mut impl Env) -> Step {
        self.phase = Phase::Connecting;
        self.next(env)
    }

    /// The next address to connect to, or the end when every one was tried: a destination the
    /// allowlist refused at the first attempt counts as refused, anything else as unreachable.
    fn next(&mut self, env: &mut impl Env) -> Step {
        let listener = self.listener();
        let entry = self.entry.map(usize::from);
        let attempt = self.attempt as usize;
        let picked = if self.decoy {
            // The decoy has one address, tried once.
            let plain_on_tls = !self.terminated && env.listener(listener).tls.is_some();
            env.decoy(listener, plain_on_tls).filter(|_| attempt == 0)
        } else {
            env.upstream(listener, entry, self.start, attempt)
        };
        let Some(addr) = picked else {
            env.count(
                if attempt == 0 && !self.decoy && env.dest_refused(listener, entry) {
                    Counter::RefusedDest
                } else {
                    Counter::UpstreamUnreachable
                },
            );
            return self.close(true);
        };
        self.attempt += 1;
        self.since_ms = env.now_ms();
        Step::Connect(addr)
    }

    /// The attempt failed (refused, unreachable, timed out, or its socket could not be made):
    /// the next address.
    pub fn connect_failed(&mut self, env: &mut impl Env) -> Step {
        if self.phase != Phase::Connecting {
            return Step::Wait;
        }
        self.next(env)
    }

    /// The upstream is connected: relay, after the PROXY header the listener sends (none to a
    /// decoy).
    pub fn connected(&mut self, env: &mut impl Env) -> Step {
        if self.phase != Phase::Connecting {
            return Step::Wait;
        }
        self.enter(Phase::Relaying, env.now_ms());
        let send = if self.decoy {
            SendProxy::None
        } else {
            env.listener(self.listener()).send_proxy
        };
        Step::Relay(send)
    }

    /// Bytes moved. Only a relaying connection is renewed: before it, each phase's limit counts
    /// from the phase's start, so a client trickling bytes cannot hold a connection open.
    pub fn touch(&mut self, now_ms: u64) {
        if self.phase == Phase::Relaying {
            self.since_ms = now_ms;
        }
    }

    /// Direction `d`'s FIN went out after its last byte; both done: the connection ends.
    pub fn finished(&mut self, d: usize, now_ms: u64) -> Step {
        if self.phase == Phase::Closing {
            return Step::Wait;
        }
        self.done[d] = true;
        self.since_ms = now_ms;
        if self.done.iter().all(|&x| x) {
            return self.close(false);
        }
        Step::Wait
    }

    /// An error on direction `d` (`errno`), at its source or its destination: a reset from
    /// whichever side's socket failed, or a relay error; the connection ends with RST both ways.
    pub fn failed(&mut self, env: &mut impl Env, d: usize, errno: i32, at_source: bool) -> Step {
        if self.phase == Phase::Closing {
            return Step::Wait;
        }
        let from_client = (d == TO_UPSTREAM) == at_source;
        if super::is_reset(errno) {
            env.count(if from_client {
                Counter::ClientReset
            } else {
                Counter::UpstreamReset
            });
        } else {
            env.count(Counter::RelayErrors);
            tracing::debug!(
                from_client,
                "relay error: {}",
                std::io::Error::from_raw_os_error(errno)
            );
        }
        self.close(true)
    }

    /// The engine ends the connection itself (`sluicectl deny --kill-existing`, a socket it
    /// cannot watch, the client left): RST or FIN, counted by the caller if at all.
    pub fn close(&mut self, reset: bool) -> Step {
        if self.phase == Phase::Closing {
            return Step::Wait;
        }
        self.phase = Phase::Closing;
        if reset { RESET } else { FIN }
    }

    /// How long the present phase may last without progress.
    fn limit(&self, t: &Timeouts) -> Option<u64> {
        Some(match self.phase {
            Phase::Closing => return None,
            Phase::Header | Phase::Handshake | Phase::Sni => u64::from(t.header_ms),
            Phase::Connecting => match self.timer {
                ConnectTimer::Session => u64::from(t.connect_ms),
                // A backstop for an attempt whose own timer did not end it.
                ConnectTimer::Engine => u64::from(t.connect_ms) * 2 + 1000,
            },
            Phase::Relaying if self.done.iter().any(|&x| x) => u64::from(t.fin_ms),
            Phase::Relaying => u64::from(t.idle_ms),
        })
    }

    /// When the present phase's time runs out (None: closing).
    pub fn deadline(&self, t: &Timeouts) -> Option<u64> {
        Some(self.since_ms.saturating_add(self.limit(t)?))
    }

    /// The present phase's time ran out (the engine checked [`Session::deadline`], and that a
    /// fast-path connection's kernel moved nothing meanwhile). A connect attempt the session
    /// times goes on to the next address; anything else ends, counted by its phase. A port with
    /// a decoy closes a client that said nothing it could use as a web server does at its
    /// header timeout: quietly (FIN, after close_notify inside TLS), not with a reset.
    pub fn expire(&mut self, env: &mut impl Env) -> Step {
        let counter = match self.phase {
            Phase::Closing => return Step::Wait,
            Phase::Connecting if self.timer == ConnectTimer::Session => return self.next(env),
            Phase::Header => Counter::RefusedBadHeader,
            Phase::Handshake => Counter::RefusedBadTls,
            Phase::Sni => Counter::RefusedBadSni,
            Phase::Connecting => Counter::UpstreamUnreachable,
            Phase::Relaying => Counter::IdleTimeout,
        };
        env.count(counter);
        let quiet = self.phase == Phase::Sni && !env.listener(self.listener()).decoy.is_off();
        self.phase = Phase::Closing;
        Step::Close(Close {
            reset: !quiet,
            close_notify: quiet,
        })
    }

    fn enter(&mut self, phase: Phase, now_ms: u64) {
        self.phase = phase;
        self.since_ms = now_ms;
    }
}

#[cfg(test)]
mod tests;
