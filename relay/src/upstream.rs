//! Where connections go: upstream names resolved by the supervisor, sent to workers.
//!
//! The supervisor resolves every `HOST:PORT` of every listener (all addresses, in order) at start
//! and every `resolve_interval_s`, or every [`RETRY_S`] while a name fails, and writes each
//! change down every worker's control pipe as one line ([`ControlMsg`]). A name that cannot be
//! resolved is said once in the log; connections to a listener with no address are refused and
//! counted (`refused_no_upstream`) until it resolves. Workers never block on DNS.
//!
//! A DNS answer is not trusted to name any address: loopback, private, link-local, unspecified
//! and multicast addresses in it are left out, counted (`upstream_addresses_refused`) and said
//! once per change in the log ([`refused_kind`]). Only the operator's own words may name such
//! an address: an IP literal in the config, or `[resolve]` / `--resolve HOST=IP`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use crate::config::{Config, HostPort};
use crate::health::{Changes, Checker, Dests, Table, UpstreamStatus};

/// Seconds between attempts while a name does not resolve.
pub const RETRY_S: u64 = 5;

/// Why an address a DNS answer gave is not dialled, or None when it may be: loopback,
/// private (RFC 1918), shared (CGNAT, 100.64.0.0/10), link-local (169.254.0.0/16 holds cloud
/// metadata services, fe80::/10), unique local (fc00::/7), unspecified (0.0.0.0/8, which Linux
/// connects to this host, and ::), multicast and broadcast. A spoofed or poisoned answer for
/// an upstream name must not turn the relay into a way into the host or its network. An
/// IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
pub fn refused_kind(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let [first, second, ..] = a.octets();
            if first == 0 {
                Some("unspecified")
            } else if a.is_loopback() {
                Some("loopback")
            } else if a.is_private() {
                Some("private")
            } else if first == 100 && second & 0xc0 == 64 {
                Some("shared (CGNAT)")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_multicast() {
                Some("multicast")
            } else if a.is_broadcast() {
                Some("broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_loopback() {
                Some("loopback")
            } else if a.is_unique_local() {
                Some("unique local")
            } else if a.is_unicast_link_local() {
                Some("link-local")
            } else if a.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// What one name resolved to: the addresses to dial, and those a DNS answer gave that are not
/// dialled ([`refused_kind`]). An IP literal and a `[resolve]` / `--resolve` address are the
/// operator's own words and always dialled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lookup {
    pub addrs: Vec<SocketAddr>,
    pub refused: Vec<SocketAddr>,
}

impl Lookup {
    /// The refused addresses for a log line: `ADDRESS (kind)`, comma-separated.
    pub fn describe_refused(&self) -> String {
        self.refused
            .iter()
            .map(|a| format!("{} ({})", a.ip(), refused_kind(a.ip()).unwrap_or("refused")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a log line says after the refused addresses of a name.
pub const REFUSED_WHY: &str = "not dialled: a DNS answer may not point the relay at a loopback, \
     private, link-local, unspecified or multicast address (write such an address in the config, \
     [resolve] or --resolve HOST=IP if it is meant)";

/// Resolves one `HOST:PORT` as upstreams are resolved (IP literals and `[resolve]` first).
pub fn resolve_one(config: &Config, hp: &HostPort) -> std::io::Result<Lookup> {
    resolve(config, hp)
}

/// Resolves one name; IP literals need no lookup. Err when DNS gives no address at all; an
/// answer whose every address is refused is an Ok with no address to dial.
fn resolve(config: &Config, hp: &HostPort) -> std::io::Result<Lookup> {
    let fixed = |sa| Lookup {
        addrs: vec![sa],
        refused: Vec::new(),
    };
    if let Some(sa) = hp.literal() {
        return Ok(fixed(sa));
    }
    if let Some(&ip) = config.resolve.get(&hp.host) {
        return Ok(fixed(SocketAddr::new(ip, hp.port)));
    }
    let (mut refused, addrs): (Vec<SocketAddr>, Vec<SocketAddr>) = (hp.host.as_str(), hp.port)
        .to_socket_addrs()?
        .partition(|a| refused_kind(a.ip()).is_some());
    // Sorted, so the same answer in another order is not a change to log.
    refused.sort();
    if addrs.is_empty() && refused.is_empty() {
        return Err(std::io::Error::other("no address"));
    }
    Ok(Lookup { addrs, refused })
}

/// What the resolver remembers of each name from one round to the next, so each change of
/// state is logged once, and the refused addresses not yet counted.
#[derive(Debug, Default)]
pub struct Names {
    /// Names whose last lookup failed.
    failing: HashMap<HostPort, bool>,
    /// Each name's refused addresses at its last lookup.
    refused: HashMap<HostPort, Vec<SocketAddr>>,
    /// Refused addresses of lookups since [`Names::take_refused`] (one per address per lookup).
    uncounted: u64,
}

impl Names {
    /// Refused addresses since the last call, for `upstream_addresses_refused`.
    pub fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.uncounted)
    }
}

/// Resolves every listener's upstreams once. Returns the table and whether every name has an
/// address to dial. `names` remembers what each name gave last time, so each change of state is
/// logged once, and counts the refused addresses.
pub fn resolve_all(config: &Config, names: &mut Names) -> (Table, bool) {
    let mut all_ok = true;
    let mut cache: HashMap<&HostPort, Vec<SocketAddr>> = HashMap::new();
    let mut newly_failing: Vec<String> = Vec::new();
    let mut last_error = String::new();
    let mut recovered: Vec<String> = Vec::new();
    let mut newly_refused: Vec<String> = Vec::new();
    let table = config
        .listeners
        .iter()
        .map(|l| {
            let mut out = Vec::new();
            for hp in l.upstream.iter().chain(&l.fallback) {
                let addrs = cache.entry(hp).or_insert_with(|| {
                    let was_failing = names.failing.get(hp).copied().unwrap_or(false);
                    let result = resolve(config, hp);
                    names.failing.insert(hp.clone(), result.is_err());
                    match result {
                        Ok(found) => {
                            if was_failing {
                                recovered.push(hp.to_string());
                            }
                            names.uncounted += found.refused.len() as u64;
                            let before = names.refused.insert(hp.clone(), found.refused.clone());
                            if !found.refused.is_empty() && before.as_ref() != Some(&found.refused)
                            {
                                newly_refused.push(format!("{hp} -> {}", found.describe_refused()));
                            }
                            found.addrs
                        }
                        Err(e) => {
                            if !was_failing {
                                newly_failing.push(hp.to_string());
                                last_error = e.to_string();
                            }
                            Vec::new()
                        }
                    }
                });
                all_ok &= !addrs.is_empty();
                out.push(addrs.clone());
            }
            out
        })
        .collect();
    // One line per change of state, however many names changed.
    if !newly_failing.is_empty() {
        tracing::warn!(
            "cannot resolve {} ({last_error}); still listening, refusing those connections, retrying every {RETRY_S} s",
            newly_failing.join(", ")
        );
    }
    if !newly_refused.is_empty() {
        tracing::warn!(
            "upstream address refused: {}; {REFUSED_WHY}",
            newly_refused.join("; ")
        );
    }
    if !recovered.is_empty() {
        tracing::info!("upstream names resolve again: {}", recovered.join(", "));
    }
    (table, all_ok)
}

/// Runs on its own thread until `stop` is set (a reload replaced its configuration) or the
/// receiver is gone: resolves names when due, runs health checks when due ([`crate::health`]),
/// and sends the table workers should use whenever it changes. `on_health` is told each round's
/// state changes and how many addresses are down; `on_refused` how many addresses of DNS
/// answers were refused in a round that refused some. `dests` is the destination allowlist the
/// health checks keep to, kept current by the supervisor.
#[allow(clippy::too_many_arguments)]
pub fn spawn_resolver<E: Send + 'static>(
    config: Config,
    first: Table,
    first_ok: bool,
    mut names: Names,
    tx: Sender<E>,
    wrap: impl Fn(Table) -> E + Send + 'static,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    on_health: Box<dyn Fn(Changes, usize) + Send>,
    on_refused: Box<dyn Fn(u64) + Send>,
    on_upstreams: Box<dyn Fn(Vec<UpstreamStatus>) + Send>,
    dests: Dests,
) -> std::io::Result<()> {
    let stopped = move || stop.load(std::sync::atomic::Ordering::Relaxed);
    std::thread::Builder::new()
        .name("resolver".into())
        .spawn(move || {
            let mut resolved = first;
            let mut ok = first_ok;
            let mut checker = Checker::new(dests);
            let start = Instant::now();
            checker.track(&config, &resolved, start);
            let mut sent = checker.filter(&config, &resolved);
            let mut next_resolve = start + resolve_wait(&config, ok);
            let mut summary = Vec::new();
            loop {
                if stopped() {
                    return;
                }
                let now = Instant::now();
                if now >= next_resolve {
                    let (table, now_ok) = resolve_all(&config, &mut names);
                    let refused = names.take_refused();
                    if refused > 0 {
                        on_refused(refused);
                    }
                    ok = now_ok;
                    if table != resolved {
                        checker.track(&config, &table, now);
                        resolved = table;
                    }
                    next_resolve = now + resolve_wait(&config, ok);
                }
                let changes = checker.run_due(&config, &resolved, Instant::now());
                if changes != Changes::default() {
                    on_health(changes, checker.down_count());
                }
                let now_summary = checker.summary(&config, &resolved);
                if now_summary != summary {
                    summary = now_summary;
                    on_upstreams(summary.clone());
                }
                let table = checker.filter(&config, &resolved);
                if table != sent {
                    sent = table.clone();
                    if tx.send(wrap(table)).is_err() {
                        return;
                    }
                }
                let wake = checker
                    .next_due()
                    .map_or(next_resolve, |d| d.min(next_resolve));
                // In steps of at most a second, so a stopped resolver ends soon.
                std::thread::sleep(
                    wake.saturating_duration_since(Instant::now())
                        .clamp(Duration::from_millis(10), Duration::from_secs(1)),
                );
            }
        })
        .map(drop)
}

fn resolve_wait(config: &Config, ok: bool) -> Duration {
    Duration::from_secs(if ok {
        u64::from(config.resolve_interval_s)
    } else {
        RETRY_S
    })
}

/// A worker's view of the upstream addresses, updated from its control pipe. Addresses outside
/// a non-empty destination allowlist ([`Upstreams::set_dests`]) are left out of every list, so
/// they are never connected to.
#[derive(Debug, Default)]
pub struct Upstreams {
    /// `raw[listener][entry]`: the addresses of one configured `HOST:PORT`, as resolved.
    raw: Vec<Vec<Vec<SocketAddr>>>,
    /// The destination allowlist; empty = every address.
    dests: std::collections::BTreeSet<SocketAddr>,
    /// `entries[listener][entry]`: `raw` without the addresses the allowlist leaves out.
    entries: Vec<Vec<Vec<SocketAddr>>>,
    /// `flat[listener]`: every entry's addresses in order, without repeats (static routing).
    flat: Vec<Vec<SocketAddr>>,
    next: Vec<usize>,
}

impl Upstreams {
    /// `entries[l]` is the number of upstream entries of listener `l`.
    pub fn new(entries: &[usize]) -> Upstreams {
        Upstreams {
            raw: entries.iter().map(|&n| vec![Vec::new(); n]).collect(),
            dests: Default::default(),
            entries: entries.iter().map(|&n| vec![Vec::new(); n]).collect(),
            flat: vec![Vec::new(); entries.len()],
            next: vec![0; entries.len()],
        }
    }

    /// A reload changed how many entries listeners have: lists keep what they hold where the
    /// entry still exists (the supervisor sends every list again right after).
    pub fn reshape(&mut self, entries: &[usize]) {
        for (l, &n) in entries.iter().enumerate().take(self.raw.len()) {
            self.raw[l].resize(n, Vec::new());
            self.refilter(l);
        }
    }

    pub fn set(&mut self, listener: usize, entry: usize, addrs: Vec<SocketAddr>) {
        let Some(slot) = self.raw.get_mut(listener).and_then(|l| l.get_mut(entry)) else {
            return;
        };
        *slot = addrs;
        self.refilter(listener);
    }

    /// Replaces the destination allowlist (empty = every address) and filters every list again.
    pub fn set_dests(&mut self, dests: std::collections::BTreeSet<SocketAddr>) {
        if dests == self.dests {
            return;
        }
        self.dests = dests;
        for l in 0..self.raw.len() {
            self.refilter(l);
        }
    }

    fn allowed(&self, a: &SocketAddr) -> bool {
        self.dests.is_empty()
            || self
                .dests
                .contains(&SocketAddr::new(a.ip().to_canonical(), a.port()))
    }

    fn refilter(&mut self, listener: usize) {
        let filtered: Vec<Vec<SocketAddr>> = self.raw[listener]
            .iter()
            .map(|addrs| addrs.iter().copied().filter(|a| self.allowed(a)).collect())
            .collect();
        self.entries[listener] = filtered;
        let flat = &mut self.flat[listener];
        flat.clear();
        for a in self.entries[listener].iter().flatten() {
            if !flat.contains(a) {
                flat.push(*a);
            }
        }
        self.next[listener] = 0;
    }

    /// Addresses known for a listener (any entry) that may be connected to.
    pub fn count(&self, listener: usize) -> usize {
        self.flat[listener].len()
    }

    /// True when addresses are known for the listener (or its SNI `entry`) but the destination
    /// allowlist leaves none: the connection is refused as `refused_dest`.
    pub fn dest_refused(&self, listener: usize, entry: Option<usize>) -> bool {
        let (raw, allowed) = match entry {
            // An entry a reload took away has no address.
            Some(e) => (
                self.raw[listener].get(e).is_none_or(|a| a.is_empty()),
                self.entries[listener].get(e).is_none_or(|a| a.is_empty()),
            ),
            None => (
                self.raw[listener].iter().all(|a| a.is_empty()),
                self.flat[listener].is_empty(),
            ),
        };
        !raw && allowed
    }

    fn list(&self, listener: usize, entry: Option<usize>) -> &[SocketAddr] {
        match entry {
            Some(e) => self.entries[listener].get(e).map_or(&[], |a| a.as_slice()),
            None => &self.flat[listener],
        }
    }

    /// Where a new connection starts in the address list (round-robin, so equal servers share
    /// the load; failover walks on from there).
    pub fn start(&mut self, listener: usize) -> usize {
        let i = self.next[listener];
        self.next[listener] = i.wrapping_add(1);
        i
    }

    /// The `attempt`-th address to try from `start`, among all of the listener's addresses
    /// (`entry` None) or one entry's (SNI routing); None once all were tried.
    pub fn pick(
        &self,
        listener: usize,
        entry: Option<usize>,
        start: usize,
        attempt: usize,
    ) -> Option<SocketAddr> {
        let list = self.list(listener, entry);
        if attempt >= list.len() {
            return None;
        }
        Some(list[(start + attempt) % list.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_walks_every_address_once() {
        let mut u = Upstreams::new(&[2]);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:1".parse().unwrap();
        u.set(0, 0, vec![a]);
        u.set(0, 1, vec![b, a]);
        let s = u.start(0);
        assert_eq!(s, 0);
        assert_eq!(u.pick(0, None, s, 0), Some(a));
        assert_eq!(u.pick(0, None, s, 1), Some(b));
        assert_eq!(u.pick(0, None, s, 2), None, "repeats are tried once");
        let s = u.start(0);
        assert_eq!(
            u.pick(0, None, s, 0),
            Some(b),
            "the next connection starts at the next address"
        );
        assert_eq!(
            u.pick(0, Some(0), s, 0),
            Some(a),
            "an entry's own list (SNI routing)"
        );
        assert_eq!(u.pick(0, Some(0), s, 1), None);
    }

    #[test]
    fn destination_allowlist_filters_addresses() {
        let mut u = Upstreams::new(&[2]);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:1".parse().unwrap();
        u.set(0, 0, vec![a]);
        u.set(0, 1, vec![b]);
        assert_eq!(u.count(0), 2);
        u.set_dests([b].into_iter().collect());
        assert_eq!(u.count(0), 1);
        let s = u.start(0);
        assert_eq!(u.pick(0, None, s, 0), Some(b));
        assert_eq!(u.pick(0, None, s, 1), None, "a is never tried");
        assert!(!u.dest_refused(0, None));
        assert!(u.dest_refused(0, Some(0)), "entry 0 has only `a`");
        u.set_dests(["127.0.0.9:1".parse().unwrap()].into_iter().collect());
        assert_eq!(u.count(0), 0);
        assert!(u.dest_refused(0, None));
        u.set_dests(Default::default());
        assert_eq!(u.count(0), 2);
        let mut empty = Upstreams::new(&[1]);
        empty.set_dests([a].into_iter().collect());
        assert!(
            !empty.dest_refused(0, None),
            "nothing known is `no upstream`"
        );
    }

    #[test]
    fn dns_answers_for_internal_addresses_are_classified_refused() {
        let kind = |s: &str| refused_kind(s.parse().unwrap());
        for (ip, want) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("::1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.255", "shared (CGNAT)"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
        ] {
            assert_eq!(kind(ip), Some(want), "{ip}");
        }
        for ip in [
            "157.240.1.53",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "172.15.255.255",
            "192.169.0.1",
            "169.255.0.1",
            "2a03:2880:f10c::1",
            "fec0::1",
            "::ffff:157.240.1.53",
        ] {
            assert_eq!(kind(ip), None, "{ip} is dialled");
        }
    }

    #[test]
    fn only_the_operator_may_name_an_internal_upstream_address() {
        let cfg = Config::from_toml(
            "[[listen]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n\
             upstream = [\"localhost:80\", \"127.0.0.5:9\", \"meta.example:80\"]\n\
             [resolve]\n\"meta.example\" = \"169.254.169.254\"\n",
            "t",
        )
        .unwrap();
        // `localhost` through the system resolver: a DNS answer, so refused.
        let found = resolve_one(&cfg, &cfg.listeners[0].upstream[0]).unwrap();
        assert!(found.addrs.is_empty(), "{found:?}");
        assert!(!found.refused.is_empty(), "{found:?}");
        assert!(found.describe_refused().contains("(loopback)"), "{found:?}");
        let mut names = Names::default();
        let (table, ok) = resolve_all(&cfg, &mut names);
        assert!(!ok, "a name with nothing to dial is not resolved");
        assert_eq!(
            table,
            vec![vec![
                vec![],
                vec!["127.0.0.5:9".parse().unwrap()],
                vec!["169.254.169.254:80".parse().unwrap()],
            ]],
            "a literal and a [resolve] address are the operator's words"
        );
        assert_eq!(names.take_refused(), found.refused.len() as u64);
        assert_eq!(names.take_refused(), 0, "counted once");
        resolve_all(&cfg, &mut names);
        assert_eq!(
            names.take_refused(),
            found.refused.len() as u64,
            "every lookup counts"
        );
    }

    #[test]
    fn unresolvable_name_gives_an_empty_list_not_an_error() {
        let cfg = Config::from_toml(
            "[[listen]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nupstream = [\"does-not-exist.invalid:80\", \"127.0.0.5:9\"]\n",
            "t",
        )
        .unwrap();
        let (table, ok) = resolve_all(&cfg, &mut Names::default());
        assert!(!ok);
        assert_eq!(
            table,
            vec![vec![vec![], vec!["127.0.0.5:9".parse().unwrap()]]]
        );
    }
}
