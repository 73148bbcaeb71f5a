//! What a worker knows besides its engine's own state ([`WorkerCtx`]: configuration, counters,
//! admission, control messages, TLS servers, decoys), and the view a connection's session has of
//! it ([`Around`]).

use std::os::fd::BorrowedFd;
use std::rc::Rc;
use std::time::Instant;

use socket2::SockRef;

use super::{session, trusts, upstream_entries, worker_capacity};
use crate::admission::{Rules, Verdict};
use crate::cidr::Cidr;
use crate::config::{Config, Listener};
use crate::limits::{ClientSlot, ClientTable, Over};
use crate::metrics::{Counter, Row, Shared};
use crate::proto::proxy::ProxyHeader;
use crate::proto::tls::{PemIdentity, TicketKeys, TlsServer};
use crate::sys;
use crate::upstream::Upstreams;
use crate::wire::ControlMsg;

/// What a worker needs to know besides its engine's own state.
pub struct WorkerCtx<'a> {
    /// The configuration new connections follow; replaced whole by a reload
    /// ([`ControlMsg::Config`]). A connection reads it at each step, never keeps a copy.
    pub config: Rc<Config>,
    pub index: usize,
    pub workers: usize,
    pub shared: &'a Shared,
    pub row: Row<'a>,
    /// Connections this worker may hold: what its fd limit allows.
    pub worker_cap: u64,
    pub started: Instant,
    /// The TLS server of each listener that terminates TLS (index = listener).
    pub tls: Vec<Option<TlsServer>>,
    /// The session-ticket keys the supervisor handed out (the same in every worker), applied
    /// to each listener with `session_tickets`.
    tickets: Option<TicketKeys>,
    /// Round-robin position in each listener's `source_addresses`.
    next_source: Vec<usize>,
    /// Coarse clock of the last "source ports exhausted" warning (one per 10 s at most).
    last_ports_warning_ms: Option<u64>,
    /// The client allow/deny lists from the supervisor (the destination allowlist lives in
    /// [`Upstreams`], which leaves disallowed addresses out).
    rules: Rules,
    /// A `kill` from the supervisor the engine has yet to carry out: (generation, ranges).
    pending_kill: Option<(u64, Vec<Cidr>)>,
    /// Per-listener latency and size histograms ([`crate::histo`]).
    pub histos: crate::histo::Histos,
    /// Fast-path sockets whose verdict started holding bytes, as the supervisor relayed them.
    pending_held: Vec<(u64, u32)>,
    /// Each listener's decoy address ([`crate::decoy`]), as the supervisor said.
    decoys: Vec<(Option<std::net::SocketAddr>, Option<std::net::SocketAddr>)>,
}

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Full,
    NoUpstream,
    /// The client is denied (deny list, or outside a non-empty allow list).
    Denied,
    /// Upstream addresses are known, but none is on the destination allowlist.
    Dest,
    /// The client has `max_connections_per_client` connections open on the listener.
    ClientConnections,
    /// The client opened `new_connections_per_second_per_client` already this second.
    ClientRate,
    /// The peer of an `accept_proxy` listener is not in its `trusted_proxies`.
    UntrustedProxy,
}

impl<'a> WorkerCtx<'a> {
    pub fn new(
        config: Config,
        index: usize,
        workers: usize,
        shared: &'a Shared,
        nofile: u64,
    ) -> Self {
        WorkerCtx {
            tls: vec![None; config.listeners.len()],
            tickets: None,
            next_source: vec![0; config.listeners.len()],
            config: Rc::new(config),
            index,
            workers,
            shared,
            row: shared.worker(index),
            worker_cap: worker_capacity(nofile),
            started: Instant::now(),
            last_ports_warning_ms: None,
            rules: Rules::default(),
            pending_kill: None,
            histos: crate::histo::Histos::disabled(),
            pending_held: Vec::new(),
            decoys: Vec::new(),
        }
    }

    /// Milliseconds since the worker started: the coarse clock of every timeout.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Admission of a client just accepted on `listener`: on an `accept_proxy` listener, a
    /// peer in its `trusted_proxies` (before a byte is read); the client lists and per-client
    /// limits (the peer address is looked up only while a list is non-empty, a limit is set or
    /// the listener takes PROXY headers, and not kept), global and per-listener caps (summed
    /// over every worker's row), and an upstream address that may be connected to. The
    /// client's per-client slot, if a limit counted it, goes back with [`WorkerCtx::release`].
    pub fn admit(
        &self,
        listener: usize,
        upstreams: &Upstreams,
        client: BorrowedFd<'_>,
    ) -> Result<Option<ClientSlot>, Refusal> {
        let l = &self.config.listeners[listener];
        // Behind a load balancer the client is the PROXY header's source: limited there.
        let limited = !l.accept_proxy
            && (l.max_connections_per_client > 0 || l.new_connections_per_second_per_client > 0);
        let mut peer_ip = None;
        if self.rules.checks_clients() || limited || l.accept_proxy {
            // A socket without a peer address (already reset) is refused too.
            let Some(ip) = peer_ip_of(client) else {
                return Err(Refusal::Denied);
            };
            if l.accept_proxy && !trusts(l, ip) {
                return Err(Refusal::UntrustedProxy);
            }
            if self.rules.client(ip) != Verdict::Admit {
                return Err(Refusal::Denied);
            }
            peer_ip = Some(ip);
        }
        let upstream_known = upstreams.count(listener) > 0;
        if !upstream_known && upstreams.dest_refused(listener, None) {
            return Err(Refusal::Dest);
        }
        let c = &*self.config;
        let l = &c.listeners[listener];
        // This worker's own fd capacity first: accepts already queued when accepting paused
        // must not take it past its fd limit.
        if self.shared.get(self.index, Counter::Active) >= self.worker_cap
            || (l.max_connections > 0
                && self.shared.listener_active(self.workers, listener)
                    >= u64::from(l.max_connections))
        {
            return Err(Refusal::Full);
        }
        if !upstream_known {
            return Err(Refusal::NoUpstream);
        }
        let slot = match peer_ip.filter(|_| limited) {
            Some(ip) => Some(self.limit_client(listener, ip)?),
            None => None,
        };
        // Last, since it takes a place: one atomic shared by every worker, so workers admitting
        // at the same moment cannot both take the last place. Released by `release`.
        if !self.shared.reserve(u64::from(c.max_connections)) {
            if let Some(s) = slot {
                self.clients().release(s);
            }
            return Err(Refusal::Full);
        }
        Ok(slot)
    }

    fn clients(&self) -> ClientTable<'_> {
        ClientTable::new(self.shared.client_cells())
    }

    /// Counts a new connection of client `ip` on `listener` against its per-client limits.
    fn limit_client(&self, listener: usize, ip: std::net::IpAddr) -> Result<ClientSlot, Refusal> {
        let l = &self.config.listeners[listener];
        let t = self.clients();
        let slot = t.slot(listener, ip);
        let now_s = sys::monotonic_ns() / 1_000_000_000;
        match t.admit(
            slot,
            l.max_connections_per_client,
            l.new_connections_per_second_per_client,
            now_s,
        ) {
            Ok(()) => Ok(slot),
            Err(Over::Connections) => Err(Refusal::ClientConnections),
            Err(Over::Rate) => Err(Refusal::ClientRate),
        }
    }

    /// Gives back the daemon-wide place an admitted connection held, and its client's count.
    pub fn release(&self, client: Option<ClientSlot>) {
        self.shared.release(1);
        if let Some(s) = client {
            self.clients().release(s);
        }
    }

    /// Whether the client named in a PROXY header may connect (the header's source address,
    /// checked like a peer address and counted against the listener's per-client limits).
    /// Counts a refusal (the Err is already counted). Ok carries the client's per-client slot,
    /// for [`WorkerCtx::release`].
    ///
    /// A header that names no client (v2 `LOCAL`, v1 `UNKNOWN`) is counted against the
    /// connecting peer: the balancer, looked up again now and not kept. The protocol says
    /// the receiver then uses the connection's own endpoints, so the balancer is the client;
    /// the allow/deny lists already checked it at accept. A shared per-listener "unknown"
    /// cell was the other choice: it would let one balancer's health checks use up the limit
    /// of every other balancer in front of the same listener, and never counting such
    /// headers at all would let a trusted source open connections past every per-client limit.
    pub fn admit_proxied(
        &self,
        listener: usize,
        header: &ProxyHeader,
        client: BorrowedFd<'_>,
    ) -> Result<Option<ClientSlot>, Refusal> {
        let l = &self.config.listeners[listener];
        let limited =
            l.max_connections_per_client > 0 || l.new_connections_per_second_per_client > 0;
        let ip = match header.source {
            Some(src) => {
                let ip = src.ip().to_canonical();
                if self.rules.checks_clients() && self.rules.client(ip) != Verdict::Admit {
                    self.row.inc(Counter::RefusedDenied);
                    return Err(Refusal::Denied);
                }
                ip
            }
            None if !limited => return Ok(None),
            // The peer reset meanwhile: nothing to count, and nothing to relay either.
            None => peer_ip_of(client).ok_or_else(|| {
                self.row.inc(Counter::RefusedDenied);
                Refusal::Denied
            })?,
        };
        if !limited {
            return Ok(None);
        }
        self.limit_client(listener, ip)
            .map(Some)
            .inspect_err(|&r| self.count_refusal(r))
    }

    /// Listener `l`'s decoy address, if it has one that resolved; `plain_on_tls`: for bytes
    /// that came in plaintext to a TLS listener (the local site's twin, when there is one).
    pub fn decoy_addr(&self, l: usize, plain_on_tls: bool) -> Option<std::net::SocketAddr> {
        let (addr, https) = self.decoys.get(l).copied()?;
        if plain_on_tls { https.or(addr) } else { addr }
    }

    /// Flow-control events the supervisor relayed, for the engine to act on now.
    pub fn take_held(&mut self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.pending_held)
    }

    /// A `kill` the supervisor sent, to be carried out by the engine now (it closes every live
    /// connection whose client [`WorkerCtx::kills`], then calls [`WorkerCtx::killed`]).
    pub fn take_kill(&mut self) -> Option<(u64, Vec<Cidr>)> {
        self.pending_kill.take()
    }

    /// Whether the client of a live connection is in one of `cidrs` now (its peer address,
    /// looked up at this moment and not kept).
    pub fn kills(cidrs: &[Cidr], client: BorrowedFd<'_>) -> bool {
        let Some(peer) = SockRef::from(&client)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
        else {
            return false;
        };
        let set = crate::admission::CidrSet::from_rules(cidrs.iter().copied());
        set.contains(peer.ip())
    }

    /// The engine closed `n` connections for the kill of `generation`.
    pub fn killed(&self, generation: u64, n: u64) {
        self.row.add(Counter::KilledDenied, n);
        let seen = self.shared.get(self.index, Counter::AdmissionGeneration);
        self.row
            .set(Counter::AdmissionGeneration, seen.max(generation));
    }

    /// Applies every complete line of `buf` (control messages from the supervisor); returns
    /// true when one of them asked the worker to drain.
    pub fn apply_control(&mut self, buf: &mut Vec<u8>, upstreams: &mut Upstreams) -> bool {
        let mut drain = false;
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            match ControlMsg::decode(&line) {
                Some(ControlMsg::Addrs {
                    listener,
                    entry,
                    addrs,
                }) => upstreams.set(listener, entry, addrs),
                Some(ControlMsg::Drain) => drain = true,
                Some(ControlMsg::Tls {
                    listener,
                    chain_pem,
                    key_pem,
                }) => {
                    let id = PemIdentity {
                        chain_pem,
                        key_pem,
                        ca_pem: None,
                    };
                    match (TlsServer::from_pem(&id), self.tls.get_mut(listener)) {
                        (Ok(server), Some(slot)) => {
                            let l = &self.config.listeners[listener];
                            let keys = l
                                .tls
                                .as_ref()
                                .is_some_and(|t| t.session_tickets)
                                .then_some(self.tickets.as_ref())
                                .flatten();
                            // A port that answers HTTP (its decoy) negotiates ALPN as nginx's
                            // http module; one that does not, none (nginx's stream module,
                            // HAProxy's `bind ... ssl`).
                            let server = if l.decoy.is_off() {
                                server
                            } else {
                                server.with_alpn(crate::proto::tls::HTTP_ALPN)
                            };
                            let server = server.with_tickets(keys);
                            // A pending TLS-ALPN-01 challenge outlives a new certificate.
                            let pending = slot.as_ref().map(|s| s.challenges()).unwrap_or_default();
                            *slot = Some(match server.with_challenges(&pending) {
                                Ok(with) => with,
                                Err(_) => server,
                            });
                        }
                        (Err(e), _) => tracing::error!("tls certificate from the supervisor: {e}"),
                        (_, None) => tracing::warn!("tls certificate for an unknown listener"),
                    }
                }
                Some(ControlMsg::Challenges {
                    listener,
                    challenges,
                }) => match self.tls.get_mut(listener).and_then(|s| s.as_mut()) {
                    Some(server) => match server.with_challenges(&challenges) {
                        Ok(with) => *server = with,
                        Err(e) => tracing::error!("acme challenge from the supervisor: {e}"),
                    },
                    None => tracing::warn!("acme challenge for a listener without tls"),
                },
                Some(ControlMsg::TicketKeys(keys)) => {
                    for slot in &mut self.tls {
                        if let Some(server) = slot.as_mut()
                            && server.tickets()
                        {
                            *server = server.with_tickets(Some(&keys));
                        }
                    }
                    self.tickets = Some(keys);
                }
                Some(ControlMsg::Ready) => {}
                Some(ControlMsg::Held { cookie, kind }) => self.pending_held.push((cookie, kind)),
                Some(ControlMsg::Decoy {
                    listener,
                    addr,
                    https_addr,
                }) => {
                    if self.decoys.len() <= listener {
                        self.decoys.resize(listener + 1, (None, None));
                    }
                    self.decoys[listener] = (addr, https_addr);
                }
                Some(ControlMsg::Config { toml }) => self.reload(&toml, upstreams),
                Some(ControlMsg::Admission {
                    generation,
                    allow,
                    deny,
                    dests,
                }) => {
                    self.rules = Rules {
                        allow: crate::admission::CidrSet::from_rules(allow),
                        deny: crate::admission::CidrSet::from_rules(deny),
                        dests: Default::default(),
                    };
                    upstreams.set_dests(dests.into_iter().collect());
                    self.row.set(Counter::AdmissionGeneration, generation);
                }
                Some(ControlMsg::Kill { generation, cidrs }) => match &mut self.pending_kill {
                    Some((g, pending)) => {
                        *g = (*g).max(generation);
                        pending.extend(cidrs);
                    }
                    None => self.pending_kill = Some((generation, cidrs)),
                },
                None => tracing::warn!("unknown control message from the supervisor"),
            }
        }
        drain
    }

    /// A reload: the new configuration (same listeners, in the same order: the supervisor
    /// refuses other changes) replaces the old one for every step taken from now on. Upstream
    /// lists take their new shape; the addresses and certificates follow in the next lines.
    fn reload(&mut self, toml: &str, upstreams: &mut Upstreams) {
        let new = match Config::from_toml(toml, "supervisor") {
            Ok(c) if c.listeners.len() == self.config.listeners.len() => c,
            Ok(_) => {
                tracing::error!("a reload from the supervisor changes the listeners; ignored");
                return;
            }
            Err(e) => {
                tracing::error!("a reload from the supervisor does not parse ({e}); ignored");
                return;
            }
        };
        upstreams.reshape(&upstream_entries(&new));
        for (slot, l) in self.tls.iter_mut().zip(&new.listeners) {
            if l.tls.is_none() {
                *slot = None;
            }
        }
        self.config = Rc::new(new);
    }

    /// The next source address for a connection of `listener` to `addr` (same family), in turn.
    pub fn next_source(
        &mut self,
        listener: usize,
        addr: std::net::SocketAddr,
    ) -> Option<std::net::IpAddr> {
        let list = &self.config.listeners[listener].source_addresses;
        let same: Vec<std::net::IpAddr> = list
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv4() == addr.is_ipv4())
            .collect();
        if same.is_empty() {
            return None;
        }
        let i = self.next_source[listener];
        self.next_source[listener] = i.wrapping_add(1);
        Some(same[i % same.len()])
    }

    /// An upstream connect failed with `errno`: EADDRNOTAVAIL means the source ports toward
    /// that address ran out; it is counted and said (at most once per 10 s).
    pub fn connect_failed(&mut self, errno: i32, now_ms: u64) {
        if errno != libc::EADDRNOTAVAIL {
            return;
        }
        self.row.inc(Counter::SourcePortsExhausted);
        if self
            .last_ports_warning_ms
            .is_none_or(|t| now_ms >= t + 10_000)
        {
            self.last_ports_warning_ms = Some(now_ms);
            tracing::warn!(
                "out of source ports toward an upstream address; add `source_addresses` to the listener"
            );
        }
    }

    pub fn count_refusal(&self, r: Refusal) {
        self.row.inc(match r {
            Refusal::Full => Counter::RefusedFull,
            Refusal::NoUpstream => Counter::RefusedNoUpstream,
            Refusal::Denied => Counter::RefusedDenied,
            Refusal::Dest => Counter::RefusedDest,
            Refusal::ClientConnections => Counter::RefusedClientConnections,
            Refusal::ClientRate => Counter::RefusedClientRate,
            Refusal::UntrustedProxy => Counter::RefusedUntrustedProxy,
        });
    }
}

/// A session's view of its worker ([`session::Env`]): the configuration in force, the
/// upstream table, the decoys, the worker's counters and clock.
pub struct Around<'x, 'a> {
    pub ctx: &'x WorkerCtx<'a>,
    pub upstreams: &'x Upstreams,
    pub now_ms: u64,
}

impl session::Env for Around<'_, '_> {
    fn listener(&self, l: usize) -> &Listener {
        &self.ctx.config.listeners[l]
    }

    fn upstream(
        &self,
        listener: usize,
        entry: Option<usize>,
        start: usize,
        attempt: usize,
    ) -> Option<std::net::SocketAddr> {
        self.upstreams.pick(listener, entry, start, attempt)
    }

    fn decoy(&self, listener: usize, plain_on_tls: bool) -> Option<std::net::SocketAddr> {
        self.ctx.decoy_addr(listener, plain_on_tls)
    }

    fn dest_refused(&self, listener: usize, entry: Option<usize>) -> bool {
        self.upstreams.dest_refused(listener, entry)
    }

    fn count(&mut self, c: Counter) {
        self.ctx.row.inc(c);
    }

    fn now_ms(&self) -> u64 {
        self.now_ms
    }
}

/// The peer address of a connected socket, IPv4-mapped IPv6 as IPv4 (a dual-stack listener's
/// IPv4 clients); None once the socket was reset.
fn peer_ip_of(client: BorrowedFd<'_>) -> Option<std::net::IpAddr> {
    SockRef::from(&client)
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.ip().to_canonical())
}
