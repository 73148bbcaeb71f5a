//! Admission lists: which clients may connect (allow/deny CIDRs) and which upstream addresses the
//! relay may connect to (the destination allowlist), changed live without a reload.
//!
//! The supervisor owns the lists ([`Rules`]), seeded from the config's `[admission]` table and
//! changed by `sluicectl allow|deny|dest` over the control socket ([`Command`]). Every change is
//! sent whole to every worker down its control pipe (`admission` line of
//! [`crate::wire::ControlMsg`]), and to a restarted worker before `ready`. Workers check the
//! client at accept (its peer address, looked up only while a client list is non-empty, and the
//! source of a PROXY header once parsed) and never connect to an address outside a non-empty
//! destination allowlist.
//!
//! Invariant: a client address is only compared here, never stored, logged or counted by
//! address. The lists hold what the operator entered; a rule is a range, not a client.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::Serialize;

use crate::cidr::{Cidr, canonical};

/// A set of CIDRs with longest-prefix lookup: one hash set of networks per prefix length, probed
/// from the longest length present to the shortest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CidrSet {
    /// Prefix length -> networks (host bits zero), IPv4 as u32.
    v4: BTreeMap<u8, HashSet<u32>>,
    /// Prefix length -> networks (host bits zero), IPv6 as u128.
    v6: BTreeMap<u8, HashSet<u128>>,
    /// Every rule in the order the operator gave them (for listing), without repeats.
    rules: Vec<Cidr>,
}

fn mask4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl CidrSet {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Adds a rule; false if it was already there.
    pub(crate) fn insert(&mut self, cidr: Cidr) -> bool {
        if self.rules.contains(&cidr) {
            return false;
        }
        match cidr.addr() {
            IpAddr::V4(a) => {
                self.v4
                    .entry(cidr.prefix_len())
                    .or_default()
                    .insert(u32::from(a));
            }
            IpAddr::V6(a) => {
                self.v6
                    .entry(cidr.prefix_len())
                    .or_default()
                    .insert(u128::from(a));
            }
        }
        self.rules.push(cidr);
        true
    }

    /// Removes exactly this rule; false if it was not there.
    pub(crate) fn remove(&mut self, cidr: Cidr) -> bool {
        let Some(pos) = self.rules.iter().position(|c| *c == cidr) else {
            return false;
        };
        self.rules.remove(pos);
        let len = cidr.prefix_len();
        match cidr.addr() {
            IpAddr::V4(a) => {
                if let Some(set) = self.v4.get_mut(&len) {
                    set.remove(&u32::from(a));
                    if set.is_empty() {
                        self.v4.remove(&len);
                    }
                }
            }
            IpAddr::V6(a) => {
                if let Some(set) = self.v6.get_mut(&len) {
                    set.remove(&u128::from(a));
                    if set.is_empty() {
                        self.v6.remove(&len);
                    }
                }
            }
        }
        true
    }

    /// The longest rule that contains `ip`, if any.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Option<Cidr> {
        match canonical(ip) {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().rev().find_map(|(&len, nets)| {
                    let net = a & mask4(len);
                    nets.contains(&net)
                        .then(|| Cidr::new(IpAddr::V4(net.into()), len).ok())
                        .flatten()
                })
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().rev().find_map(|(&len, nets)| {
                    let net = a & mask6(len);
                    nets.contains(&net)
                        .then(|| Cidr::new(IpAddr::V6(net.into()), len).ok())
                        .flatten()
                })
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.lookup(ip).is_some()
    }

    /// The rules, in the order they were added.
    pub fn rules(&self) -> &[Cidr] {
        &self.rules
    }

    pub(crate) fn from_rules(rules: impl IntoIterator<Item = Cidr>) -> CidrSet {
        let mut set = CidrSet::default();
        for r in rules {
            set.insert(r);
        }
        set
    }
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Admit,
    /// It falls in a deny rule, or an allow list exists and it falls in none.
    Deny,
}

/// The three lists, as the supervisor holds them and as every worker gets them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Rules {
    pub allow: CidrSet,
    pub deny: CidrSet,
    /// Upstream addresses the relay may connect to; empty = any.
    pub dests: BTreeSet<SocketAddr>,
}

impl Rules {
    /// Whether the client lists say anything (else no peer address needs to be looked up).
    pub(crate) fn checks_clients(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty()
    }

    /// Deny wins; then, with an allow list, only what it contains is admitted.
    pub(crate) fn client(&self, ip: IpAddr) -> Verdict {
        if self.deny.contains(ip) || (!self.allow.is_empty() && !self.allow.contains(ip)) {
            Verdict::Deny
        } else {
            Verdict::Admit
        }
    }
}

/// Encodes a list for a control-socket command (`dest add A,B`, what `sluicectl` sends): comma
/// separated, `-` when empty (no spaces in either).
pub fn encode_list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let list: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if list.is_empty() {
        "-".to_string()
    } else {
        list.join(",")
    }
}

/// Which list a control command is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Allow,
    Deny,
    Dest,
}

impl List {
    pub fn name(self) -> &'static str {
        match self {
            List::Allow => "allow",
            List::Deny => "deny",
            List::Dest => "dest",
        }
    }
}

/// One rule, as a command names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Client(Cidr),
    Dest(Vec<SocketAddr>),
}

/// A control-socket command about the lists: `allow|deny|dest add|del RULE`, `... list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add {
        list: List,
        rule: Rule,
        /// `deny add ... kill`: also close the live connections of clients in the range.
        kill_existing: bool,
    },
    Del {
        list: List,
        rule: Rule,
    },
    List(List),
}

/// How long a name given to `dest add|del` may take to resolve: past it the command fails,
/// naming the name and this deadline, instead of waiting for the resolver's own timeouts
/// (`options timeout:` x `attempts:` x name servers in /etc/resolv.conf, tens of seconds).
pub(crate) const DEST_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Lookups that may run at once on [`resolve_within`]'s helper threads, counting those given
/// up on but still inside getaddrinfo (it cannot be interrupted): a resolver that never
/// answers leaves at most this many threads behind.
pub(crate) const MAX_LOOKUPS: usize = 8;

static LOOKUPS: AtomicUsize = AtomicUsize::new(0);

/// Parses `HOST:PORT` for the destination allowlist: an IP literal, or a name resolved once
/// here (every address it has), within [`DEST_RESOLVE_TIMEOUT`].
pub fn parse_dest(s: &str) -> Result<Vec<SocketAddr>, String> {
    parse_dest_within(s, DEST_RESOLVE_TIMEOUT)
}

/// [`parse_dest`] with another deadline for a name.
pub(crate) fn parse_dest_within(s: &str, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(vec![SocketAddr::new(canonical(sa.ip()), sa.port())]);
    }
    let hp: crate::config::HostPort = s.parse()?;
    let addrs: Vec<SocketAddr> = resolve_within(&hp.host, hp.port, timeout)?
        .into_iter()
        .map(|a| SocketAddr::new(canonical(a.ip()), a.port()))
        .collect();
    if addrs.is_empty() {
        return Err(format!("`{}` has no address", hp.host));
    }
    Ok(addrs)
}

/// Resolves `host` on a short-lived helper thread and waits for it at most `timeout`, so the
/// caller (the control socket's thread, `sluicectl`) is never held by a resolver that does not
/// answer. A lookup given up on finishes on its own thread, its answer dropped.
pub(crate) fn resolve_within(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, String> {
    if LOOKUPS.fetch_add(1, Ordering::SeqCst) >= MAX_LOOKUPS {
        LOOKUPS.fetch_sub(1, Ordering::SeqCst);
        return Err(format!(
            "cannot resolve `{host}` now: {MAX_LOOKUPS} lookups are still waiting for the DNS \
             server; try again later or give the address"
        ));
    }
    let (tx, rx) = mpsc::channel();
    let name = host.to_string();
    let spawned = std::thread::Builder::new()
        .name("dest-resolve".into())
        .spawn(move || {
            let found = (name.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>());
            LOOKUPS.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(found);
        });
    if let Err(e) = spawned {
        LOOKUPS.fetch_sub(1, Ordering::SeqCst);
        return Err(format!(
            "cannot resolve `{host}`: no thread for the lookup: {e}"
        ));
    }
    match rx.recv_timeout(timeout) {
        Ok(Ok(addrs)) => Ok(addrs),
        Ok(Err(e)) => Err(format!("cannot resolve `{host}`: {e}")),
        Err(_) => Err(format!(
            "cannot resolve `{host}`: no answer from DNS within {} s (check the name servers \
             in /etc/resolv.conf, or give the address)",
            timeout.as_secs_f64()
        )),
    }
}

/// Parses a CIDR with the message `sluicectl` shows.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse::<Cidr>().map_err(|e| {
        format!("`{s}` is not a CIDR ({e}); expected e.g. 192.0.2.0/24 or 2001:db8::/32")
    })
}

impl Command {
    /// Parses a control line (`deny add 10.0.0.0/8 kill`); Ok(None) when it is not about the
    /// lists at all.
    pub fn parse(line: &str) -> Result<Option<Command>, String> {
        Command::parse_with(line, parse_dest)
    }

    /// [`Command::parse`] with the `dest` rules' `HOST:PORT` parsed by `dest` instead of
    /// [`parse_dest`] (which resolves names): the fuzz target passes one that never touches DNS.
    pub fn parse_with(
        line: &str,
        dest: impl Fn(&str) -> Result<Vec<SocketAddr>, String>,
    ) -> Result<Option<Command>, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let list = match words.first() {
            Some(&"allow") => List::Allow,
            Some(&"deny") => List::Deny,
            Some(&"dest") => List::Dest,
            _ => return Ok(None),
        };
        let rule = |w: Option<&&str>| -> Result<Rule, String> {
            let w = w.ok_or_else(|| format!("`{} add|del` needs a rule", list.name()))?;
            match list {
                // `sluicectl` sends every address a name resolved to, comma separated.
                List::Dest => {
                    let mut all = Vec::new();
                    for one in w.split(',') {
                        all.extend(dest(one)?);
                    }
                    Ok(Rule::Dest(all))
                }
                _ => parse_cidr(w).map(Rule::Client),
            }
        };
        let cmd = match words.get(1) {
            Some(&"add") => {
                let kill_existing = match words.get(3) {
                    None => false,
                    Some(&"kill") if list == List::Deny => true,
                    Some(w) => return Err(format!("unexpected `{w}`")),
                };
                Command::Add {
                    list,
                    rule: rule(words.get(2))?,
                    kill_existing,
                }
            }
            Some(&"del") => {
                if let Some(w) = words.get(3) {
                    return Err(format!("unexpected `{w}`"));
                }
                Command::Del {
                    list,
                    rule: rule(words.get(2))?,
                }
            }
            Some(&"list") if words.len() == 2 => Command::List(list),
            _ => {
                return Err(format!(
                    "usage: {} add|del RULE, {} list",
                    list.name(),
                    list.name()
                ));
            }
        };
        Ok(Some(cmd))
    }

    /// The line `sluicectl` sends.
    pub fn encode(&self) -> String {
        let rule = |r: &Rule| match r {
            Rule::Client(c) => c.to_string(),
            Rule::Dest(a) => encode_list(a),
        };
        match self {
            Command::Add {
                list,
                rule: r,
                kill_existing,
            } => format!(
                "{} add {}{}",
                list.name(),
                rule(r),
                if *kill_existing { " kill" } else { "" }
            ),
            Command::Del { list, rule: r } => format!("{} del {}", list.name(), rule(r)),
            Command::List(list) => format!("{} list", list.name()),
        }
    }
}

/// What the daemon answers to a list command.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Reply {
    /// Whether the command changed the list (an add of a rule already there does not).
    pub changed: bool,
    /// The list after the command, as the operator entered it.
    pub rules: Vec<String>,
    /// Workers that confirmed the change before the answer (all live ones, unless one is stuck).
    pub workers_applied: usize,
    pub workers: usize,
    /// Whether the deny rules are also in the XDP program's tries.
    #[serde(default)]
    pub xdp: bool,
}

impl Rules {
    /// Applies a command; returns whether something changed and, for `deny add ... kill`, the
    /// range whose live connections must close.
    pub(crate) fn apply(&mut self, cmd: &Command) -> (bool, Option<Cidr>) {
        match cmd {
            Command::Add {
                list,
                rule,
                kill_existing,
            } => match (list, rule) {
                (List::Allow, Rule::Client(c)) => (self.allow.insert(*c), None),
                (List::Deny, Rule::Client(c)) => {
                    (self.deny.insert(*c), kill_existing.then_some(*c))
                }
                (List::Dest, Rule::Dest(addrs)) => {
                    let mut changed = false;
                    for a in addrs {
                        changed |= self.dests.insert(*a);
                    }
                    (changed, None)
                }
                _ => (false, None),
            },
            Command::Del { list, rule } => match (list, rule) {
                (List::Allow, Rule::Client(c)) => (self.allow.remove(*c), None),
                (List::Deny, Rule::Client(c)) => (self.deny.remove(*c), None),
                (List::Dest, Rule::Dest(addrs)) => {
                    let mut changed = false;
                    for a in addrs {
                        changed |= self.dests.remove(a);
                    }
                    (changed, None)
                }
                _ => (false, None),
            },
            Command::List(_) => (false, None),
        }
    }

    /// A list as text, for listing.
    pub(crate) fn listing(&self, list: List) -> Vec<String> {
        match list {
            List::Allow => self.allow.rules().iter().map(|c| c.to_string()).collect(),
            List::Deny => self.deny.rules().iter().map(|c| c.to_string()).collect(),
            List::Dest => self.dests.iter().map(|a| a.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_mapped_rules_are_ipv4_rules() {
        let mapped = cidr("::ffff:10.0.0.0/104");
        assert_eq!(mapped, cidr("10.0.0.0/8"));
        assert_eq!(cidr("::ffff:192.0.2.7"), cidr("192.0.2.7/32"));
        assert_eq!(cidr("::ffff:0:0/96"), cidr("0.0.0.0/0"));
        let set = CidrSet::from_rules([mapped]);
        assert!(set.contains(ip("10.1.2.3")));
        assert!(set.contains(ip("::ffff:10.1.2.3")));
        assert!(!set.contains(ip("11.0.0.1")));
        assert!(CidrSet::from_rules([cidr("10.0.0.0/8")]).contains(ip("::ffff:10.9.9.9")));
        // A shorter IPv6 range stays IPv6, for IPv6 clients.
        let all6 = cidr("::/0");
        assert!(all6.addr().is_ipv6());
        assert!(!CidrSet::from_rules([all6]).contains(ip("10.1.2.3")));
        assert!(cidr("::/8").addr().is_ipv6());
    }

    /// Text with host bits set is refused, naming the range it would have meant; a bare
    /// address is one host. (It used to become the range silently: `10.1.2.3/8` denied 10/8.)
    #[test]
    fn host_bits_are_refused_not_guessed() {
        for (text, range) in [
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("2001:db8::1/32", "2001:db8::/32"),
            ("::ffff:10.0.0.0/8", "::/8"),
        ] {
            let e = text.parse::<Cidr>().unwrap_err().to_string();
            assert!(e.contains("host bits") && e.contains(range), "{text}: {e}");
        }
        assert_eq!(cidr("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("lb.example".parse::<Cidr>().is_err());
        // From a map or computed: host bits cleared, as before.
        assert_eq!(
            Cidr::new(ip("10.1.2.3"), 8).unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn longest_prefix_wins() {
        let set = CidrSet::from_rules([cidr("10.0.0.0/8"), cidr("10.1.0.0/16"), cidr("::/0")]);
        assert_eq!(set.lookup(ip("10.1.2.3")), Some(cidr("10.1.0.0/16")));
        assert_eq!(set.lookup(ip("10.2.2.3")), Some(cidr("10.0.0.0/8")));
        assert_eq!(set.lookup(ip("11.0.0.1")), None);
        assert_eq!(set.lookup(ip("2001:db8::1")), Some(cidr("::/0")));
        assert_eq!(
            set.lookup(ip("::ffff:10.1.0.9")),
            Some(cidr("10.1.0.0/16")),
            "a v4-mapped client is its v4 address"
        );
    }

    #[test]
    fn remove_takes_exactly_one_rule() {
        let mut set = CidrSet::from_rules([cidr("127.0.0.3/32"), cidr("127.0.0.0/24")]);
        assert!(!set.remove(cidr("127.0.0.4/32")));
        assert!(set.remove(cidr("127.0.0.3/32")));
        assert_eq!(set.lookup(ip("127.0.0.3")), Some(cidr("127.0.0.0/24")));
        assert!(set.remove(cidr("127.0.0.0/24")));
        assert!(set.is_empty());
        assert!(!set.contains(ip("127.0.0.3")));
        assert!(set.insert(cidr("0.0.0.0/0")));
        assert!(!set.insert(cidr("0.0.0.0/0")), "no repeats");
        assert!(set.contains(ip("1.2.3.4")));
        assert!(!set.contains(ip("::1")));
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let mut r = Rules::default();
        assert_eq!(r.client(ip("127.0.0.3")), Verdict::Admit);
        assert!(!r.checks_clients());
        r.deny.insert(cidr("127.0.0.3"));
        assert_eq!(r.client(ip("127.0.0.3")), Verdict::Deny);
        assert_eq!(r.client(ip("127.0.0.2")), Verdict::Admit);
        r.allow.insert(cidr("127.0.0.0/30"));
        assert_eq!(r.client(ip("127.0.0.2")), Verdict::Admit);
        assert_eq!(r.client(ip("127.0.0.3")), Verdict::Deny, "deny wins");
        assert_eq!(r.client(ip("127.0.0.9")), Verdict::Deny, "not allowed");
    }

    #[test]
    fn commands_parse_and_round_trip() {
        for line in [
            "allow add 10.0.0.0/8",
            "deny add 127.0.0.3/32 kill",
            "deny del 2001:db8::/32",
            "dest add 127.0.0.1:443",
            "dest list",
            "allow list",
        ] {
            let cmd = Command::parse(line).unwrap().unwrap();
            assert_eq!(cmd.encode(), line);
            assert_eq!(Command::parse(&cmd.encode()).unwrap(), Some(cmd));
        }
        let several = Command::Add {
            list: List::Dest,
            rule: Rule::Dest(vec![
                "127.0.0.1:443".parse().unwrap(),
                "[2001:db8::1]:443".parse().unwrap(),
            ]),
            kill_existing: false,
        };
        assert_eq!(
            Command::parse(&several.encode()).unwrap(),
            Some(several),
            "a name that resolved to several addresses"
        );
        assert_eq!(Command::parse("status").unwrap(), None);
        let e = Command::parse("deny add 10.0.0.0/33").unwrap_err();
        assert!(e.contains("10.0.0.0/33") && e.contains("not a CIDR"), "{e}");
        assert!(Command::parse("deny add nonsense").is_err());
        assert!(Command::parse("allow add 1.2.3.4 kill").is_err());
        assert!(Command::parse("dest add 1.2.3.4").is_err());
        assert!(Command::parse("deny").is_err());
    }

    #[test]
    fn apply_reports_changes_and_kills() {
        let mut r = Rules::default();
        let add = Command::parse("deny add 127.0.0.3 kill").unwrap().unwrap();
        assert_eq!(r.apply(&add), (true, Some(cidr("127.0.0.3/32"))));
        assert!(!r.apply(&add).0);
        assert_eq!(r.listing(List::Deny), vec!["127.0.0.3/32"]);
        let del = Command::parse("deny del 127.0.0.3/32").unwrap().unwrap();
        assert_eq!(r.apply(&del), (true, None));
        assert!(r.listing(List::Deny).is_empty());
    }

    #[test]
    fn lists_encode_without_spaces() {
        let v: Vec<Cidr> = vec![cidr("10.0.0.0/8"), cidr("::1")];
        let s = encode_list(&v);
        assert!(!s.contains(' '));
        assert_eq!(s, "10.0.0.0/8,::1/128");
        assert_eq!(encode_list(Vec::<Cidr>::new()), "-");
    }

    #[test]
    fn parse_with_takes_dest_rules_from_the_given_parser() {
        let literal = |s: &str| -> Result<Vec<SocketAddr>, String> {
            s.parse::<SocketAddr>()
                .map(|a| vec![a])
                .map_err(|_| format!("`{s}` not resolved here"))
        };
        let cmd = Command::parse_with("dest add 127.0.0.2:80,[::1]:443", literal).unwrap();
        assert_eq!(
            cmd,
            Some(Command::Add {
                list: List::Dest,
                rule: Rule::Dest(vec![
                    "127.0.0.2:80".parse().unwrap(),
                    "[::1]:443".parse().unwrap()
                ]),
                kill_existing: false,
            })
        );
        assert_eq!(
            Command::parse_with("dest add g.whatsapp.net:80", literal),
            Err("`g.whatsapp.net:80` not resolved here".into())
        );
    }
}
