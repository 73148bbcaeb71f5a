//! Layer-4 health checks of upstream addresses, run by the supervisor, like HAProxy's
//! `check inter 60s fastinter 1s downinter 3s rise 2 fall 3` in the WhatsApp proxy.
//!
//! A check is a TCP connect (bounded by the connect timeout) to one resolved address. An address
//! goes down after `fall` failures in a row and up again after `rise` successes; while its state
//! is changing it is checked every `fast_interval_ms`, while down every `down_interval_ms`,
//! otherwise every `interval_ms`. Workers only get addresses that are up ([`Checker::filter`]);
//! when every address of a listener's `upstream` list is down its `fallback` list is used, and
//! when that is down too the full list is kept (a check can be wrong; a connect fails fast).
//!
//! Each change of state is one log line naming the upstream `HOST:PORT` and the address's
//! position in its list (never the address) and bumps the supervisor's counters.

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Config, HealthSettings};

/// The resolved upstream addresses: for each listener, for each of its upstream entries, the
/// addresses in order. What the resolver thread ([`crate::upstream::spawn_resolver`]) reports
/// to the supervisor's main loop, and what the checks here track and filter.
pub type Table = Vec<Vec<Vec<SocketAddr>>>;

/// One configured upstream (or fallback) `HOST:PORT` of a listener: how many addresses it
/// resolved to and how many of those are down. Names only, never a client address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub listener: String,
    /// The configured `HOST:PORT`.
    pub upstream: String,
    /// A `fallback` entry (used while every `upstream` address is down).
    #[serde(default)]
    pub fallback: bool,
    /// Addresses it resolved to (after the DNS filter).
    pub addresses: usize,
    /// Of those, addresses the health checks found down.
    pub down: usize,
}

impl UpstreamStatus {
    /// Usable: resolved, and at least one address not down.
    pub fn up(&self) -> bool {
        self.addresses > self.down
    }
}

/// The destination allowlist as the health checks see it (empty: any address may be checked).
/// The supervisor owns the lists ([`crate::admission::Rules`]): it makes one `Dests`, gives a
/// clone to each resolver thread it starts and [`Dests::set`]s it at every change, so a check
/// never connects where a worker may not.
#[derive(Debug, Clone, Default)]
pub struct Dests(Arc<RwLock<BTreeSet<SocketAddr>>>);

impl Dests {
    /// Replaces the allowlist the checks keep to.
    pub fn set(&self, dests: &BTreeSet<SocketAddr>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = dests.clone();
    }

    /// Whether a check may connect to `addr` (an IPv4-mapped address compared as IPv4).
    pub fn permits(&self, addr: SocketAddr) -> bool {
        let dests = self.0.read().unwrap_or_else(|p| p.into_inner());
        dests.is_empty() || dests.contains(&SocketAddr::new(addr.ip().to_canonical(), addr.port()))
    }
}

/// State of one checked address.
#[derive(Debug, Clone)]
struct AddrState {
    up: bool,
    /// Consecutive results against the current state.
    streak: u32,
    next_due: Instant,
}

/// What changed in one round of checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub went_down: u32,
    pub went_up: u32,
}

/// Health of every checked address, keyed by (listener, address). `Checker::default()` checks
/// any address (it is only asked to [`Checker::filter`] or [`Checker::summary`]).
#[derive(Debug, Default)]
pub struct Checker {
    state: HashMap<(usize, SocketAddr), AddrState>,
    /// The destination allowlist: an address outside it is never connected to.
    dests: Dests,
}

impl Checker {
    pub fn new(dests: Dests) -> Checker {
        Checker {
            state: HashMap::new(),
            dests,
        }
    }

    /// Is this address usable? Addresses never checked count as up.
    pub fn is_up(&self, listener: usize, addr: SocketAddr) -> bool {
        self.state.get(&(listener, addr)).is_none_or(|s| s.up)
    }

    /// Addresses currently down, over all listeners.
    pub fn down_count(&self) -> usize {
        self.state.values().filter(|s| !s.up).count()
    }

    /// Every configured upstream and fallback `HOST:PORT` of every listener: addresses
    /// resolved and addresses down (never checked counts as up).
    pub fn summary(&self, config: &Config, table: &Table) -> Vec<UpstreamStatus> {
        let mut out = Vec::new();
        for (l, listener) in config.listeners.iter().enumerate() {
            let names = listener
                .upstream
                .iter()
                .map(|n| (n, false))
                .chain(listener.fallback.iter().map(|n| (n, true)));
            for (i, (name, fallback)) in names.enumerate() {
                let addrs = table.get(l).and_then(|e| e.get(i)).map_or(&[][..], |a| a);
                out.push(UpstreamStatus {
                    listener: listener.name.clone(),
                    upstream: name.to_string(),
                    fallback,
                    addresses: addrs.len(),
                    down: addrs.iter().filter(|&&a| !self.is_up(l, a)).count(),
                });
            }
        }
        out
    }

    /// When the next check is due (None: nothing is checked).
    pub fn next_due(&self) -> Option<Instant> {
        self.state.values().map(|s| s.next_due).min()
    }

    /// Starts tracking the addresses of `table` on listeners with health checks, forgets the
    /// ones no longer resolved. New addresses start up and are checked at once.
    pub fn track(&mut self, config: &Config, table: &Table, now: Instant) {
        let mut keep = HashMap::new();
        for (l, entries) in table.iter().enumerate() {
            if config.listeners[l].health.is_none() {
                continue;
            }
            for &addr in entries.iter().flatten() {
                let st = self.state.remove(&(l, addr)).unwrap_or(AddrState {
                    up: true,
                    streak: 0,
                    next_due: now,
                });
                keep.insert((l, addr), st);
            }
        }
        self.state = keep;
    }

    /// Runs every check that is due (in parallel, each bounded by `connect_ms`) and applies the
    /// results; logs each change of state.
    pub fn run_due(&mut self, config: &Config, table: &Table, now: Instant) -> Changes {
        let mut due: Vec<(usize, SocketAddr)> = self
            .state
            .iter()
            .filter(|(_, s)| s.next_due <= now)
            .map(|(k, _)| *k)
            .collect();
        // An address outside the destination allowlist is never connected to, not even to
        // check it: its state stays as it is until the allowlist takes it back.
        due.retain(|&(l, addr)| {
            let permitted = self.dests.permits(addr);
            if !permitted
                && let (Some(st), Some(h)) = (
                    self.state.get_mut(&(l, addr)),
                    config.listeners[l].health.as_ref(),
                )
            {
                st.next_due = now + Duration::from_millis(u64::from(h.interval_ms));
            }
            permitted
        });
        if due.is_empty() {
            return Changes::default();
        }
        let timeout = Duration::from_millis(u64::from(config.timeouts.connect_ms));
        let (tx, rx) = mpsc::channel();
        for &(l, addr) in &due {
            let thread_tx = tx.clone();
            // One short-lived thread per due address: there are few (tens), each waits on a
            // connect at most `timeout`.
            let spawned = std::thread::Builder::new()
                .name("health".into())
                .spawn(move || {
                    let ok = TcpStream::connect_timeout(&addr, timeout).is_ok();
                    let _ = thread_tx.send(((l, addr), ok));
                });
            if spawned.is_err() {
                let _ = tx.send(((l, addr), false));
            }
        }
        drop(tx);
        let mut changes = Changes::default();
        let after = Instant::now();
        for ((l, addr), ok) in rx {
            let Some(settings) = config.listeners[l].health.as_ref() else {
                continue;
            };
            let Some(st) = self.state.get_mut(&(l, addr)) else {
                continue;
            };
            if let Some(up) = apply(st, settings, ok, after) {
                let name = describe(config, table, l, addr);
                if up {
                    changes.went_up += 1;
                    tracing::info!(listener = %config.listeners[l].name, "upstream {name} is up again ({} checks passed)", settings.rise);
                } else {
                    changes.went_down += 1;
                    tracing::warn!(listener = %config.listeners[l].name, "upstream {name} is down ({} checks failed)", settings.fall);
                }
            }
        }
        changes
    }

    /// The table workers get: only addresses that are up; the fallback entries when every
    /// primary address is down; everything primary when nothing at all is up.
    pub fn filter(&self, config: &Config, table: &Table) -> Table {
        table
            .iter()
            .enumerate()
            .map(|(l, entries)| {
                let primary = config.listeners[l].upstream.len().min(entries.len());
                let up = |e: &Vec<SocketAddr>| -> Vec<SocketAddr> {
                    e.iter().copied().filter(|&a| self.is_up(l, a)).collect()
                };
                let empty = || vec![Vec::new(); entries.len() - primary];
                let primary_up: Vec<Vec<SocketAddr>> = entries[..primary].iter().map(up).collect();
                if primary_up.iter().any(|e| !e.is_empty()) {
                    return primary_up.into_iter().chain(empty()).collect();
                }
                let fallback_up: Vec<Vec<SocketAddr>> = entries[primary..].iter().map(up).collect();
                if fallback_up.iter().any(|e| !e.is_empty()) {
                    return vec![Vec::new(); primary]
                        .into_iter()
                        .chain(fallback_up)
                        .collect();
                }
                entries[..primary].iter().cloned().chain(empty()).collect()
            })
            .collect()
    }
}

/// Applies one check result; returns the new state when it changed.
fn apply(st: &mut AddrState, h: &HealthSettings, ok: bool, now: Instant) -> Option<bool> {
    let ms = |v: u32| Duration::from_millis(u64::from(v));
    let mut changed = None;
    if ok == st.up {
        st.streak = 0;
    } else {
        st.streak += 1;
        let needed = if st.up { h.fall } else { h.rise };
        if st.streak >= needed {
            st.up = ok;
            st.streak = 0;
            changed = Some(ok);
        }
    }
    let wait = if st.streak > 0 {
        h.fast_interval_ms
    } else if !st.up {
        h.down_interval_ms
    } else {
        h.interval_ms
    };
    st.next_due = now + ms(wait);
    changed
}

/// `HOST:PORT (address N of M)` of an address, for logs: the name, never the address.
fn describe(config: &Config, table: &Table, l: usize, addr: SocketAddr) -> String {
    let listener = &config.listeners[l];
    let names = listener.upstream.iter().chain(listener.fallback.iter());
    for (entry, name) in table[l].iter().zip(names) {
        if let Some(i) = entry.iter().position(|&a| a == addr) {
            return format!("{name} (address {} of {})", i + 1, entry.len());
        }
    }
    "(an address no longer resolved)".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dests_permit_what_the_allowlist_names() {
        let dests = Dests::default();
        let a: SocketAddr = "127.0.0.5:80".parse().unwrap();
        assert!(dests.permits(a), "an empty allowlist permits any address");
        let seen_by_the_resolver = dests.clone();
        dests.set(&["127.0.0.6:80".parse().unwrap()].into_iter().collect());
        assert!(
            !seen_by_the_resolver.permits(a),
            "a clone sees every change"
        );
        dests.set(&[a].into_iter().collect());
        assert!(seen_by_the_resolver.permits(a));
        assert!(seen_by_the_resolver.permits("[::ffff:127.0.0.5]:80".parse().unwrap()));
        assert!(!seen_by_the_resolver.permits("127.0.0.5:81".parse().unwrap()));
        dests.set(&BTreeSet::new());
        assert!(seen_by_the_resolver.permits("127.0.0.9:1".parse().unwrap()));
    }

    fn settings() -> HealthSettings {
        HealthSettings {
            interval_ms: 60_000,
            fast_interval_ms: 1_000,
            down_interval_ms: 3_000,
            rise: 2,
            fall: 3,
        }
    }

    #[test]
    fn fall_three_rise_two_with_haproxy_intervals() {
        let now = Instant::now();
        let mut st = AddrState {
            up: true,
            streak: 0,
            next_due: now,
        };
        let h = settings();
        assert_eq!(apply(&mut st, &h, false, now), None);
        assert_eq!(
            st.next_due - now,
            Duration::from_secs(1),
            "fast while changing"
        );
        assert_eq!(apply(&mut st, &h, false, now), None);
        assert_eq!(apply(&mut st, &h, false, now), Some(false), "down after 3");
        assert_eq!(st.next_due - now, Duration::from_secs(3), "down interval");
        assert_eq!(apply(&mut st, &h, true, now), None);
        assert_eq!(apply(&mut st, &h, true, now), Some(true), "up after 2");
        assert_eq!(st.next_due - now, Duration::from_secs(60));
        assert_eq!(apply(&mut st, &h, false, now), None);
        assert_eq!(
            apply(&mut st, &h, true, now),
            None,
            "one success resets the streak"
        );
        assert_eq!(st.streak, 0);
    }

    fn config_with_fallback() -> Config {
        Config::from_toml(
            "[[listen]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nupstream = [\"127.0.0.2:9\"]\nfallback = [\"127.0.0.3:9\"]\n[listen.health]\n",
            "t",
        )
        .unwrap()
    }

    #[test]
    fn fallback_only_when_every_primary_is_down() {
        let config = config_with_fallback();
        let p: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let f: SocketAddr = "127.0.0.3:9".parse().unwrap();
        let table: Table = vec![vec![vec![p], vec![f]]];
        let mut c = Checker::default();
        let now = Instant::now();
        c.track(&config, &table, now);
        assert_eq!(c.filter(&config, &table), vec![vec![vec![p], vec![]]]);
        c.state.get_mut(&(0, p)).unwrap().up = false;
        assert_eq!(c.filter(&config, &table), vec![vec![vec![], vec![f]]]);
        c.state.get_mut(&(0, f)).unwrap().up = false;
        assert_eq!(
            c.filter(&config, &table),
            vec![vec![vec![p], vec![]]],
            "all down: try the primary"
        );
        assert_eq!(c.down_count(), 2);
        let s = c.summary(&config, &table);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (
                s[0].upstream.as_str(),
                s[0].fallback,
                s[0].addresses,
                s[0].down,
                s[0].up()
            ),
            ("127.0.0.2:9", false, 1, 1, false)
        );
        assert!(s[1].fallback && !s[1].up());
    }

    #[test]
    fn a_real_check_sees_a_closed_port_down() {
        let config = config_with_fallback();
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = open.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let table: Table = vec![vec![vec![up, closed], vec![]]];
        let mut c = Checker::default();
        let mut now = Instant::now();
        c.track(&config, &table, now);
        let mut changes = Changes::default();
        for _ in 0..3 {
            let ch = c.run_due(&config, &table, now);
            changes.went_down += ch.went_down;
            now = c.next_due().unwrap();
        }
        assert_eq!(
            changes.went_down, 1,
            "the closed port goes down after 3 checks"
        );
        assert!(c.is_up(0, up));
        assert!(!c.is_up(0, closed));
        assert_eq!(c.filter(&config, &table), vec![vec![vec![up], vec![]]]);
    }
}
