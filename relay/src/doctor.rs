//! `sluicectl doctor`: checks that this host can run the configured relay well, and says what
//! to do about each thing that is not right.
//!
//! Every check gives one [`Check`]: `ok`, `warn` (Sluice runs, but slower or with less) or `fail`
//! (something will not work: a port held by another program, an upstream that cannot be
//! resolved or reached). Checks read /proc and /sys, try io_uring and the eBPF fast path in this
//! process, ask the running daemon for its status, and resolve and connect to the configured
//! upstreams with bounded timeouts. Nothing is changed on the host. No client address is read.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::Serialize;

use crate::config::{Config, HostPort};
use crate::control;
use crate::engine;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked, e.g. `io_uring`, `port chat-tls`, `upstream g.whatsapp.net:5222`.
    pub name: String,
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// What to do about it (empty when `ok`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

fn check(name: impl Into<String>, level: Level, detail: impl Into<String>, fix: &str) -> Check {
    Check {
        name: name.into(),
        level,
        detail: detail.into(),
        fix: fix.to_string(),
    }
}

/// What to check against.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: Config,
    /// The daemon's control socket.
    pub control: PathBuf,
    /// Bound on each DNS lookup and each TCP connect to an upstream.
    pub timeout: Duration,
}

/// Runs every check, in a fixed order.
pub fn run(opts: &Options) -> Vec<Check> {
    let mut out = Vec::new();
    let caps = Caps::read();
    out.push(io_uring());
    out.extend(bpf(&caps));
    out.push(capabilities(&caps, &opts.config));
    out.push(fd_limits(&opts.config));
    let status = control::request(&opts.control, "status");
    out.push(daemon(&status, &opts.control));
    let held_by_sluice: BTreeSet<String> = status
        .as_ref()
        .ok()
        .and_then(|v| v.get("listeners")?.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|l| Some(l.get("bind")?.as_str()?.to_string()))
        .collect();
    out.extend(ports(&opts.config, &held_by_sluice));
    out.extend(proxy_trust(&opts.config));
    out.extend(certificates(&opts.config));
    out.extend(upstreams(&opts.config, opts.timeout));
    if let Some(host) = &opts.config.public_host {
        out.push(public_host(host, opts.timeout));
    }
    out.extend(acme_domains(&opts.config, opts.timeout));
    out.push(clock());
    out.extend(sysctls());
    out
}

/// True when no check failed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.level != Level::Fail)
}

/// The report as text: one `ok|warn|fail  name: detail` line per check, the fix indented below.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        s.push_str(&format!("{:<5} {}: {}\n", c.level.name(), c.name, c.detail));
        if !c.fix.is_empty() {
            s.push_str(&format!("      -> {}\n", c.fix));
        }
    }
    let count = |l| checks.iter().filter(|c| c.level == l).count();
    s.push_str(&format!(
        "\n{} ok, {} warn, {} fail\n",
        count(Level::Ok),
        count(Level::Warn),
        count(Level::Fail)
    ));
    s
}

// ---------------------------------------------------------------------------------------------
// Kernel features

fn io_uring() -> Check {
    match engine::uring::probe() {
        Ok(f) if f.degraded().is_empty() => check(
            "io_uring",
            Level::Ok,
            "every operation the engines use, buffer rings, multishot accept and receive, \
             SINGLE_ISSUER and COOP_TASKRUN",
            "",
        ),
        Ok(f) => check(
            "io_uring",
            Level::Ok,
            format!(
                "every operation the engines use; without {} (slightly more CPU per operation)",
                f.degraded().join(" and ")
            ),
            "",
        ),
        Err(e @ engine::features::Unusable::Lacks(_)) => check(
            "io_uring",
            Level::Warn,
            format!("{e}: the relay runs on the slower epoll engine"),
            "a kernel of 6.0 or later has everything (Debian 12's 6.1; Ubuntu 22.04's HWE kernel)",
        ),
        Err(e) => check(
            "io_uring",
            Level::Warn,
            format!("io_uring_setup refused ({e}): the relay runs on the slower epoll engine"),
            "in Docker, run with --security-opt seccomp=dist/docker/seccomp.json; on a host, \
             check sysctl kernel.io_uring_disabled (0 allows it)",
        ),
    }
}

const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_BPF: u32 = 39;

/// The capability sets of this process (/proc/self/status).
struct Caps {
    eff: u64,
    bnd: u64,
}

impl Caps {
    fn read() -> Caps {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .unwrap_or(0)
        };
        Caps {
            eff: field("CapEff:"),
            bnd: field("CapBnd:"),
        }
    }

    fn has(&self, cap: u32) -> bool {
        self.eff & (1 << cap) != 0
    }

    /// CAP_BPF, or CAP_SYS_ADMIN which also allows BPF.
    fn bpf(&self) -> bool {
        self.has(CAP_BPF) || self.has(CAP_SYS_ADMIN)
    }
}

fn bpf(caps: &Caps) -> Vec<Check> {
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    let btf_check = if btf {
        check("btf", Level::Ok, "/sys/kernel/btf/vmlinux is present", "")
    } else {
        check(
            "btf",
            Level::Warn,
            "/sys/kernel/btf/vmlinux is missing",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's is)",
        )
    };
    let fast = match crate::ebpf::FastPath::load() {
        Ok(_) => check(
            "bpf",
            Level::Ok,
            "the sockmap fast path loads and attaches (sk_skb stream verdict on a sockhash)",
            "",
        ),
        Err(e) => {
            let why = if !caps.bpf() {
                "this process has neither CAP_BPF nor CAP_SYS_ADMIN".to_string()
            } else if !caps.has(CAP_NET_ADMIN) {
                "this process lacks CAP_NET_ADMIN".to_string()
            } else if !btf {
                "the kernel has no BTF".to_string()
            } else {
                "the kernel refused it (sockmap or the verifier)".to_string()
            };
            check(
                "bpf",
                Level::Warn,
                format!(
                    "BPF unavailable: {why} ({e}); `--engine sockmap` falls back to splice, \
                     XDP deny cannot attach"
                ),
                "run as root with CAP_BPF and CAP_NET_ADMIN (the systemd unit grants them); \
                 only the sockmap engine and XDP need them",
            )
        }
    };
    let kernel = match crate::ebpf::kernel_proven() {
        Ok(()) => check(
            "sockmap-kernel",
            Level::Ok,
            "the sockmap fast path is proven on this kernel series",
            "",
        ),
        Err(e) => check(
            "sockmap-kernel",
            Level::Warn,
            format!("`--engine sockmap` splices here: {e}"),
            "a 6.12 or later kernel for the fast path (Debian 12: linux-image-cloud-amd64 \
             from bookworm-backports); the other engines need nothing more",
        ),
    };
    vec![btf_check, fast, kernel]
}

fn capabilities(caps: &Caps, config: &Config) -> Check {
    let names = [
        (CAP_NET_BIND_SERVICE, "CAP_NET_BIND_SERVICE"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_BPF, "CAP_BPF"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_SYS_RESOURCE, "CAP_SYS_RESOURCE"),
    ];
    let have: Vec<&str> = names
        .iter()
        .filter(|(c, _)| caps.has(*c))
        .map(|(_, n)| *n)
        .collect();
    let have = if have.is_empty() {
        "none of the relevant ones".to_string()
    } else {
        have.join(", ")
    };
    let unprivileged_start: u16 = read_sysctl("net/ipv4/ip_unprivileged_port_start")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    let low: Vec<u16> = config
        .listeners
        .iter()
        .map(|l| l.bind.port())
        .filter(|p| *p < unprivileged_start)
        .collect();
    if !low.is_empty() && !caps.has(CAP_NET_BIND_SERVICE) {
        return check(
            "capabilities",
            Level::Fail,
            format!(
                "effective: {have}; ports {low:?} are below {unprivileged_start} and need \
                 CAP_NET_BIND_SERVICE"
            ),
            "run as root or grant CAP_NET_BIND_SERVICE (AmbientCapabilities= in the unit)",
        );
    }
    let bounding_lacks_bpf = caps.bnd & (1 << CAP_BPF) == 0;
    check(
        "capabilities",
        Level::Ok,
        format!(
            "effective: {have}{}",
            if bounding_lacks_bpf {
                "; CAP_BPF is not in the bounding set"
            } else {
                ""
            }
        ),
        "",
    )
}

// ---------------------------------------------------------------------------------------------
// Limits and ports

/// RLIMIT_NOFILE (soft, hard) of this process, from /proc/self/limits (u64::MAX = unlimited).
pub(crate) fn nofile_limits() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut cols = line["Max open files".len()..].split_whitespace();
    let parse = |s: Option<&str>| match s? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    Some((parse(cols.next())?, parse(cols.next())?))
}

fn fd_limits(config: &Config) -> Check {
    let Some((soft, hard)) = nofile_limits() else {
        return check("fd limit", Level::Warn, "cannot read /proc/self/limits", "");
    };
    // The daemon raises its soft limit to the hard one; capacity follows the hard limit.
    let per_worker = engine::worker_capacity(hard);
    let workers = crate::supervisor::workers_needed(config, hard);
    let detail = format!(
        "RLIMIT_NOFILE soft {soft}, hard {hard}: one worker holds {per_worker} connections; \
         max_connections {} gives {workers} workers",
        config.max_connections
    );
    if per_worker < 1000 {
        check(
            "fd limit",
            Level::Warn,
            detail,
            "raise the hard limit (LimitNOFILE= in the unit, `ulimit -Hn`, or \
             /etc/security/limits.conf): each connection costs 2 fds",
        )
    } else {
        check("fd limit", Level::Ok, detail, "")
    }
}

fn ports(config: &Config, held_by_sluice: &BTreeSet<String>) -> Vec<Check> {
    config
        .listeners
        .iter()
        .map(|l| {
            let name = format!("port {} ({})", l.bind.port(), l.name);
            if !crate::supervisor::already_listening(l.bind) {
                check(name, Level::Ok, format!("{} is free", l.bind), "")
            } else if held_by_sluice.contains(&l.bind.to_string()) {
                check(
                    name,
                    Level::Ok,
                    format!("{} is held by the running Sluice", l.bind),
                    "",
                )
            } else {
                check(
                    name,
                    Level::Fail,
                    format!("{} is held by another program", l.bind),
                    "find it with `ss -ltnp 'sport = :PORT'` and stop it, or bind this \
                     listener elsewhere",
                )
            }
        })
        .collect()
}

/// Whether `net` lies wholly in loopback, a private, CGNAT, unique local or link-local range:
/// where a load balancer may be, and no one on the internet is.
fn is_internal(net: &IpNet) -> bool {
    // The default trusted ranges are where balancers live; link-local is internal too.
    const LINK_LOCAL: &[&str] = &["169.254.0.0/16", "fe80::/10"];
    crate::config::DEFAULT_TRUSTED_PROXIES
        .iter()
        .chain(LINK_LOCAL)
        .filter_map(|r| r.parse::<IpNet>().ok())
        .any(|r| r.contains(net))
}

/// One check per `accept_proxy` listener: a PROXY header lets its sender name any client
/// address (and with it, get past per-client limits and the allow/deny lists), so a listener
/// reachable from the internet must believe headers only from its balancers' private ranges.
fn proxy_trust(config: &Config) -> Vec<Check> {
    config
        .listeners
        .iter()
        .filter(|l| l.accept_proxy)
        .map(|l| {
            let name = format!("proxy trust {}", l.name);
            let trusted = l.trusted_proxies();
            let list = trusted
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let public: Vec<String> = trusted
                .iter()
                .filter(|n| !is_internal(n))
                .map(|n| n.to_string())
                .collect();
            let bind_ip = l.bind.ip().to_canonical();
            let bound_publicly = bind_ip.is_unspecified() || !is_internal(&IpNet::from(bind_ip));
            match (bound_publicly, public.is_empty()) {
                (true, false) => check(
                    name,
                    Level::Warn,
                    format!(
                        "{} is reachable from outside and believes PROXY headers from {}, \
                         public range{}: a host there can claim to be any client",
                        l.bind,
                        public.join(", "),
                        if public.len() == 1 { "" } else { "s" }
                    ),
                    "narrow `trusted_proxies` to the load balancers' own addresses, or bind \
                     the listener to a private address only the balancers reach",
                ),
                (true, true) => check(
                    name,
                    Level::Ok,
                    format!(
                        "{} is reachable from outside; PROXY headers are believed only from \
                         {list}, every other source is refused",
                        l.bind
                    ),
                    "",
                ),
                (false, _) => check(
                    name,
                    Level::Ok,
                    format!("{} is internal; PROXY headers from {list}", l.bind),
                    "",
                ),
            }
        })
        .collect()
}

/// Per TLS listener: a certificate from files loads (chain and key match), and a generated one
/// is a warning: a private CA's certificate on a port that looks like a web server is what a
/// censor's scanner looks for (it is the one thing the decoy cannot hide; ARCHITECTURE.md,
/// "Decoy").
fn certificates(config: &Config) -> Vec<Check> {
    config
        .listeners
        .iter()
        .filter_map(|l| Some((l, l.tls.as_ref()?)))
        .map(|(l, tls)| {
            let name = format!("certificate {}", l.name);
            if let Some(acme) = &tls.acme {
                return check(
                    name,
                    Level::Ok,
                    format!(
                        "from the ACME CA {} for {} (a self-signed one until the first is \
                         issued; see `acme domain` below)",
                        acme.directory,
                        acme.domains.join(", ")
                    ),
                    "",
                );
            }
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => {
                    match crate::proto::tls::TlsServer::from_pem_files(cert, key) {
                        Ok(_) => check(
                            name,
                            Level::Ok,
                            format!("{} with its key {}", cert.display(), key.display()),
                            "",
                        ),
                        Err(e) => check(
                            name,
                            Level::Fail,
                            e.to_string(),
                            "point `cert` at the full chain and `key` at its private key, \
                             both readable by root",
                        ),
                    }
                }
                _ => check(
                    name,
                    Level::Warn,
                    format!(
                        "{} serves a self-signed certificate from a private CA, generated at \
                         start: scanners fingerprint exactly that",
                        l.bind
                    ),
                    "give the relay a domain name and a real certificate for it (`cert` and \
                     `key`, e.g. certbot's fullchain.pem and privkey.pem)",
                ),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Upstreams

/// Every distinct upstream and fallback of the configuration, in order.
fn upstream_list(config: &Config) -> Vec<HostPort> {
    let mut seen = BTreeSet::new();
    config
        .listeners
        .iter()
        .flat_map(|l| l.upstream.iter().chain(&l.fallback))
        .filter(|u| seen.insert(u.to_string()))
        .cloned()
        .collect()
}

fn upstreams(config: &Config, timeout: Duration) -> Vec<Check> {
    let list = upstream_list(config);
    // Each upstream in its own thread, so the whole check takes about two timeouts however
    // many there are; a lookup stuck in getaddrinfo is left behind when its time is up.
    let (tx, rx) = mpsc::channel();
    for (i, u) in list.iter().enumerate() {
        let thread_tx = tx.clone();
        let u = u.clone();
        let fixed = config.resolve.get(&u.host).copied();
        let spawned = std::thread::Builder::new()
            .name("doctor-upstream".into())
            .spawn(move || {
                let _ = thread_tx.send((i, check_upstream(&u, fixed, timeout)));
            });
        if spawned.is_err() {
            let _ = tx.send((
                i,
                check(
                    format!("upstream {}", list[i]),
                    Level::Warn,
                    "cannot start a thread",
                    "",
                ),
            ));
        }
    }
    drop(tx);
    let mut results: Vec<Option<Check>> = vec![None; list.len()];
    let deadline = std::time::Instant::now() + timeout * 2 + Duration::from_secs(1);
    while results.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, c)) => results[i] = Some(c),
            Err(_) => break,
        }
    }
    results
        .into_iter()
        .zip(&list)
        .map(|(c, u)| {
            c.unwrap_or_else(|| {
                check(
                    format!("upstream {u}"),
                    Level::Fail,
                    format!("no answer from DNS in {timeout:?}"),
                    "check /etc/resolv.conf and that this host reaches its DNS server",
                )
            })
        })
        .collect()
}

fn check_upstream(u: &HostPort, fixed: Option<std::net::IpAddr>, timeout: Duration) -> Check {
    let name = format!("upstream {u}");
    let (addrs, how) = if let Some(sa) = u.literal() {
        (vec![sa], "an address")
    } else if let Some(ip) = fixed {
        (vec![SocketAddr::new(ip, u.port)], "set by [resolve]")
    } else {
        match (u.host.as_str(), u.port).to_socket_addrs() {
            Ok(a) => {
                // What the daemon would refuse to dial ([`crate::upstream::refused_kind`]).
                let (refused, dialled): (Vec<SocketAddr>, Vec<SocketAddr>) =
                    a.partition(|a| crate::upstream::refused_kind(a.ip()).is_some());
                if dialled.is_empty() && !refused.is_empty() {
                    let found = crate::upstream::Lookup {
                        addrs: Vec::new(),
                        refused,
                    };
                    return check(
                        name,
                        Level::Fail,
                        format!(
                            "`{}` resolves only to addresses the relay does not dial: {}",
                            u.host,
                            found.describe_refused()
                        ),
                        "if that address is meant, write it in the config or point the name \
                         at it with [resolve] / --resolve HOST=IP",
                    );
                }
                (dialled, "resolved")
            }
            Err(e) => {
                return check(
                    name,
                    Level::Fail,
                    format!("`{}` does not resolve: {e}", u.host),
                    "check /etc/resolv.conf, or point the name at an address with [resolve] \
                     / --resolve HOST=IP",
                );
            }
        }
    };
    if addrs.is_empty() {
        return check(
            name,
            Level::Fail,
            format!("`{}` resolves to no address", u.host),
            "check the name",
        );
    }
    let n = addrs.len();
    // Try up to four addresses, so a name with many answers stays within the time bound.
    for a in addrs.iter().take(4) {
        if TcpStream::connect_timeout(a, timeout).is_ok() {
            return check(
                name,
                Level::Ok,
                format!("{how} ({n} address{}), TCP connect works", plural(n)),
                "",
            );
        }
    }
    check(
        name,
        Level::Fail,
        format!(
            "{how} ({n} address{}), but no TCP connection within {timeout:?}",
            plural(n)
        ),
        "check this host's firewall and routes toward the upstream",
    )
}

/// `public_host` (what `sluicectl share` puts in the links) resolves, within `timeout`, to an
/// address of this host: compared with its interfaces' addresses.
fn public_host(host: &str, timeout: Duration) -> Check {
    let resolved = lookup(host, timeout);
    let interfaces = crate::sys::interface_addrs().unwrap_or_default();
    public_host_check(host, resolved, &interfaces)
}

/// The addresses `host` resolves to, within `timeout`.
fn lookup(host: &str, timeout: Duration) -> Result<Vec<std::net::IpAddr>, String> {
    let (tx, rx) = mpsc::channel();
    let name = host.to_string();
    let spawned = std::thread::Builder::new()
        .name("doctor-lookup".into())
        .spawn(move || {
            let r = (name.as_str(), 0u16)
                .to_socket_addrs()
                .map(|a| a.map(|s| s.ip()).collect::<Vec<_>>());
            let _ = tx.send(r);
        });
    match spawned.map(|_| rx.recv_timeout(timeout)) {
        Ok(Ok(Ok(a))) => Ok(a),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(_)) => Err(format!("no answer within {timeout:?}")),
        Err(e) => Err(format!("cannot start the lookup: {e}")),
    }
}

/// Each domain of a `[listen.tls] acme` table (once): the CA validates it by connecting to
/// port 443 of what it resolves to, so it must resolve to this host.
fn acme_domains(config: &Config, timeout: Duration) -> Vec<Check> {
    let mut domains: Vec<&str> = Vec::new();
    for l in &config.listeners {
        if let Some(a) = l.tls.as_ref().and_then(|t| t.acme.as_ref()) {
            for d in &a.domains {
                if !domains.iter().any(|x| x.eq_ignore_ascii_case(d)) {
                    domains.push(d);
                }
            }
        }
    }
    if domains.is_empty() {
        return Vec::new();
    }
    let interfaces = crate::sys::interface_addrs().unwrap_or_default();
    domains
        .into_iter()
        .map(|d| acme_domain_check(d, lookup(d, timeout), &interfaces))
        .collect()
}

/// What a name resolved to, as a doctor check reports it: the addresses, them as a list, and
/// those an interface of this host has (`ADDR on IFNAME`).
struct Resolution {
    addrs: Vec<std::net::IpAddr>,
    found: String,
    on: Vec<String>,
}

impl Resolution {
    /// Err: why the name gave no address (the check's detail).
    fn of(
        name: &str,
        resolved: Result<Vec<std::net::IpAddr>, String>,
        interfaces: &[(String, std::net::IpAddr)],
    ) -> Result<Resolution, String> {
        let addrs = match resolved {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => return Err(format!("`{name}` resolves to no address")),
            Err(e) => return Err(format!("`{name}` does not resolve: {e}")),
        };
        let found = addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let on = addrs
            .iter()
            .filter_map(|a| {
                interfaces
                    .iter()
                    .find(|(_, ip)| ip == a)
                    .map(|(ifname, _)| format!("{a} on {ifname}"))
            })
            .collect();
        Ok(Resolution { addrs, found, on })
    }
}

/// Not an address the internet reaches: one a DNS answer may not give the relay, or internal.
fn is_not_internet(a: &std::net::IpAddr) -> bool {
    crate::upstream::refused_kind(*a).is_some() || is_internal(&IpNet::from(*a))
}

/// The verdict of [`acme_domains`] for one domain.
fn acme_domain_check(
    domain: &str,
    resolved: Result<Vec<std::net::IpAddr>, String>,
    interfaces: &[(String, std::net::IpAddr)],
) -> Check {
    let name = format!("acme domain {domain}");
    let Resolution { addrs, found, on } = match Resolution::of(domain, resolved, interfaces) {
        Ok(r) => r,
        Err(detail) => {
            return check(
                name,
                Level::Fail,
                detail,
                "the CA cannot validate it, so no certificate is issued and the generated one \
                 is served: create an A (or AAAA) record pointing at this host",
            );
        }
    };
    if addrs.iter().all(is_not_internet) {
        return check(
            name,
            Level::Fail,
            format!("resolves to {found}, not an internet address"),
            "the CA connects from the internet to port 443 of that address and cannot reach \
             it: point the name at this host's public address",
        );
    }
    if on.is_empty() {
        return check(
            name,
            Level::Warn,
            format!("resolves to {found}, which no interface of this host has"),
            "right if that address forwards port 443 to this relay (NAT, a load balancer); \
             otherwise the CA validates another host and no certificate is issued",
        );
    }
    check(
        name,
        Level::Ok,
        format!("resolves to {found}, this host's ({})", on.join(", ")),
        "",
    )
}

/// The verdict of [`public_host`], from what the name resolved to and the interfaces' addresses.
fn public_host_check(
    host: &str,
    resolved: Result<Vec<std::net::IpAddr>, String>,
    interfaces: &[(String, std::net::IpAddr)],
) -> Check {
    let name = format!("public_host {host}");
    let Resolution { addrs, found, on } = match Resolution::of(host, resolved, interfaces) {
        Ok(r) => r,
        Err(detail) => {
            return check(
                name,
                Level::Fail,
                detail,
                "clients cannot use the shared links: create or fix the DNS record, or set \
                 public_host to the relay's public IP address",
            );
        }
    };
    let list = |v: &[std::net::IpAddr]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !on.is_empty() {
        if addrs.iter().all(is_not_internet) {
            return check(
                name,
                Level::Warn,
                format!(
                    "resolves to {found}, this host's ({}), but not an internet address",
                    on.join(", ")
                ),
                "clients on the internet cannot reach it: set public_host to the public name \
                 or address",
            );
        }
        return check(
            name,
            Level::Ok,
            format!("resolves to {found}, this host's ({})", on.join(", ")),
            "",
        );
    }
    let mine: Vec<std::net::IpAddr> = interfaces
        .iter()
        .map(|(_, a)| *a)
        .filter(|a| !a.is_loopback())
        .collect();
    let public_mine = mine.iter().any(|a| !is_not_internet(a));
    let why = if public_mine {
        "if a load balancer or NAT in front of this host owns that address and forwards the \
         relay's ports here, this is right; otherwise the name points at another host"
    } else {
        "this host has only internal addresses, so it is likely behind NAT (a cloud's 1:1 NAT, \
         a router forwarding ports): that is fine if that public address forwards the relay's \
         ports to this host"
    };
    check(
        name,
        Level::Warn,
        format!(
            "resolves to {found}, which no interface of this host has (this host: {})",
            if mine.is_empty() {
                "no address but loopback".to_string()
            } else {
                list(&mine)
            }
        ),
        why,
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "es" }
}

// ---------------------------------------------------------------------------------------------
// The daemon, the clock, sysctls

fn daemon(status: &Result<serde_json::Value, control::ControlError>, path: &Path) -> Check {
    match status {
        Ok(v) => {
            let engine = v.get("engine").and_then(|e| e.as_str()).unwrap_or("?");
            let workers = v
                .get("workers")
                .and_then(|w| w.as_array())
                .map_or(0, Vec::len);
            let fast = v.get("fast_path").and_then(|f| f.as_str());
            let detail = format!(
                "running: engine {engine}, {workers} worker{}{}",
                if workers == 1 { "" } else { "s" },
                fast.map(|f| format!(", sockmap fast path {f}"))
                    .unwrap_or_default()
            );
            match fast {
                Some(f) if f.starts_with("unavailable") => check(
                    "daemon",
                    Level::Warn,
                    detail,
                    "see the `bpf` line above for what the fast path needs",
                ),
                _ => check("daemon", Level::Ok, detail, ""),
            }
        }
        Err(e) => check(
            "daemon",
            Level::Warn,
            format!("no status from {}: {e}", path.display()),
            "start it (systemctl start sluice), or pass --control PATH if it uses another socket",
        ),
    }
}

fn clock() -> Check {
    let now = SystemTime::now();
    // The executable's mtime is its build (or install) time: a clock before it is wrong.
    let built = std::env::current_exe()
        .and_then(std::fs::metadata)
        .and_then(|m| m.modified());
    match built {
        Ok(built) if now + Duration::from_secs(3600) < built => check(
            "clock",
            Level::Fail,
            "the system clock is earlier than this program's build time",
            "set the time (timedatectl set-ntp true): TLS certificates and their renewal \
             need a correct clock",
        ),
        Ok(_) => check(
            "clock",
            Level::Ok,
            "not earlier than this program's build time",
            "",
        ),
        Err(e) => check(
            "clock",
            Level::Warn,
            format!("cannot compare: {e}"),
            "check the time with `date`",
        ),
    }
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(path)).ok()
}

fn sysctls() -> Vec<Check> {
    let mut out = Vec::new();
    let num = |p: &str| read_sysctl(p).and_then(|s| s.trim().parse::<u64>().ok());
    match num("net/core/somaxconn") {
        Some(n) if n < 4096 => out.push(check(
            "net.core.somaxconn",
            Level::Warn,
            format!("{n}: accept queues overflow in a burst of new connections"),
            "sysctl -w net.core.somaxconn=65535 (and in /etc/sysctl.d/)",
        )),
        Some(n) => out.push(check("net.core.somaxconn", Level::Ok, n.to_string(), "")),
        None => {}
    }
    if let Some(range) = read_sysctl("net/ipv4/ip_local_port_range") {
        let v: Vec<u64> = range
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        if let [lo, hi] = v[..] {
            let n = hi.saturating_sub(lo) + 1;
            let detail = format!("{lo}-{hi}: {n} source ports toward each upstream address");
            out.push(if n < 20_000 {
                check(
                    "net.ipv4.ip_local_port_range",
                    Level::Warn,
                    detail,
                    "widen it (sysctl -w net.ipv4.ip_local_port_range='1024 65535') or give \
                     listeners more source_addresses",
                )
            } else {
                check("net.ipv4.ip_local_port_range", Level::Ok, detail, "")
            });
        }
    }
    match num("net/core/wmem_max") {
        Some(n) if n < 4 << 20 => out.push(check(
            "net.core.wmem_max",
            Level::Warn,
            format!("{n}: the sockmap engine asks for 4 MiB send buffers and gets less"),
            "sysctl -w net.core.wmem_max=4194304",
        )),
        Some(n) => out.push(check("net.core.wmem_max", Level::Ok, n.to_string(), "")),
        None => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_host_is_compared_with_the_interfaces() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let ifs = vec![
            ("lo".to_string(), ip("127.0.0.1")),
            ("eth0".to_string(), ip("10.0.0.4")),
        ];
        // Behind NAT: a public address on no interface, only internal ones here: warn.
        let c = public_host_check("relay.example", Ok(vec![ip("203.0.113.5")]), &ifs);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(
            c.detail.contains("203.0.113.5") && c.detail.contains("10.0.0.4"),
            "{c:?}"
        );
        assert!(c.fix.contains("NAT"), "{c:?}");
        // On an interface with a public address: ok, naming it.
        let mut public = ifs.clone();
        public.push(("eth1".to_string(), ip("203.0.113.5")));
        let c = public_host_check("relay.example", Ok(vec![ip("203.0.113.5")]), &public);
        assert_eq!(c.level, Level::Ok, "{c:?}");
        assert!(c.detail.contains("203.0.113.5 on eth1"), "{c:?}");
        // Another host's public address while this host has one: warn, saying so.
        let c = public_host_check("relay.example", Ok(vec![ip("198.51.100.7")]), &public);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(c.fix.contains("another host"), "{c:?}");
        // A private address on an interface: warn, not reachable from the internet.
        let c = public_host_check("10.0.0.4", Ok(vec![ip("10.0.0.4")]), &ifs);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        // No answer: fail.
        let c = public_host_check("nx.example", Err("no such name".into()), &ifs);
        assert_eq!(c.level, Level::Fail, "{c:?}");
    }

    #[test]
    fn acme_domains_must_resolve_to_this_host() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let ifs = vec![
            ("lo".to_string(), ip("127.0.0.1")),
            ("eth0".to_string(), ip("203.0.113.5")),
        ];
        let c = acme_domain_check("relay.example", Ok(vec![ip("203.0.113.5")]), &ifs);
        assert_eq!(c.level, Level::Ok, "{c:?}");
        assert!(c.detail.contains("203.0.113.5 on eth0"), "{c:?}");
        // Another address: maybe NAT forwarding 443 here, maybe another host.
        let c = acme_domain_check("relay.example", Ok(vec![ip("198.51.100.7")]), &ifs);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(c.fix.contains("another host"), "{c:?}");
        // Unreachable from the CA, even on an interface: fail.
        let c = acme_domain_check("relay.example", Ok(vec![ip("127.0.0.1")]), &ifs);
        assert_eq!(c.level, Level::Fail, "{c:?}");
        for r in [Ok(Vec::new()), Err("no such name".to_string())] {
            let c = acme_domain_check("nx.example", r, &ifs);
            assert_eq!(c.level, Level::Fail, "{c:?}");
            assert!(
                c.name == "acme domain nx.example" && c.fix.contains("record"),
                "{c:?}"
            );
        }
        // Only for listeners with `acme`, each domain once.
        let mut config = crate::config::preset::Preset::Signal.config();
        assert!(acme_domains(&config, Duration::from_millis(100)).is_empty());
        config.listeners[0].tls.as_mut().unwrap().acme = Some(crate::config::AcmeSettings {
            domains: vec!["localhost".into(), "LOCALHOST".into()],
            email: None,
            directory: crate::config::LETS_ENCRYPT.into(),
            directory_ca: None,
            renew_before_days: 30,
            challenge: None,
        });
        let checks = acme_domains(&config, Duration::from_secs(5));
        assert_eq!(checks.len(), 1, "{checks:?}");
        assert_eq!(checks[0].name, "acme domain localhost");
    }

    #[test]
    fn this_hosts_interfaces_are_read_and_loopback_is_found() {
        let ifs = crate::sys::interface_addrs().unwrap();
        assert!(
            ifs.iter().any(|(_, a)| a.is_loopback()),
            "interfaces: {ifs:?}"
        );
        let c = public_host("127.0.0.1", Duration::from_secs(5));
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(c.detail.contains("127.0.0.1 on lo"), "{c:?}");
    }

    #[test]
    fn nofile_limits_are_read() {
        let (soft, hard) = nofile_limits().unwrap();
        assert!(soft > 0 && soft <= hard, "{soft} {hard}");
    }

    #[test]
    fn a_foreign_listener_fails_and_a_free_port_is_ok() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let held = l.local_addr().unwrap();
        let text = format!(
            "[[listen]]\nname = \"held\"\nbind = \"{held}\"\nupstream = [\"127.0.0.1:9\"]\n\
             [[listen]]\nname = \"free\"\nbind = \"127.0.0.1:{}\"\nupstream = [\"127.0.0.1:9\"]\n",
            held.port() ^ 1
        );
        let c = Config::from_toml(&text, "t").unwrap();
        let p = ports(&c, &BTreeSet::new());
        assert_eq!(p[0].level, Level::Fail, "{p:?}");
        assert_eq!(p[1].level, Level::Ok, "{p:?}");
        let mine: BTreeSet<String> = [held.to_string()].into();
        assert_eq!(ports(&c, &mine)[0].level, Level::Ok);
        assert!(!passed(&p));
        assert!(render(&p).contains("fail  port"));
    }

    #[test]
    fn a_public_proxy_listener_trusting_a_public_range_warns() {
        let listener = |bind: &str, trusted: &str| {
            let text = format!(
                "[[listen]]\nname = \"lb\"\nbind = \"{bind}\"\nupstream = [\"127.0.0.1:9\"]\n\
                 accept_proxy = true\n{trusted}"
            );
            proxy_trust(&Config::from_toml(&text, "t").unwrap())
        };
        let default = listener("0.0.0.0:8080", "");
        assert_eq!(default[0].level, Level::Ok, "{default:?}");
        assert!(default[0].detail.contains("10.0.0.0/8"), "{default:?}");
        let public = listener(
            "0.0.0.0:8080",
            "trusted_proxies = [\"10.0.0.0/8\", \"0.0.0.0/0\"]",
        );
        assert_eq!(public[0].level, Level::Warn, "{public:?}");
        assert!(public[0].detail.contains("0.0.0.0/0"), "{public:?}");
        assert!(!public[0].detail.contains("10.0.0.0/8,"), "{public:?}");
        let v6 = listener("[::]:8080", "trusted_proxies = [\"2001:db8::/32\"]");
        assert_eq!(v6[0].level, Level::Warn, "{v6:?}");
        let internal = listener("10.1.2.3:8080", "trusted_proxies = [\"198.51.100.0/24\"]");
        assert_eq!(internal[0].level, Level::Ok, "{internal:?}");
        let plain = Config::from_toml(
            "[[listen]]\nname = \"a\"\nbind = \"0.0.0.0:1\"\nupstream = [\"127.0.0.1:9\"]\n",
            "t",
        )
        .unwrap();
        assert!(proxy_trust(&plain).is_empty(), "no accept_proxy, no check");
    }

    #[test]
    fn a_generated_certificate_warns_and_a_broken_one_fails() {
        let listener = |tls: &str| {
            let text = format!(
                "[[listen]]\nname = \"t\"\nbind = \"0.0.0.0:443\"\nupstream = [\"127.0.0.1:9\"]\n\
                 [listen.tls]\n{tls}"
            );
            certificates(&Config::from_toml(&text, "t").unwrap())
        };
        let generated = listener("");
        assert_eq!(generated[0].level, Level::Warn, "{generated:?}");
        let acme = listener("acme = { domains = [\"relay.example\"] }");
        assert_eq!(acme[0].level, Level::Ok, "{acme:?}");
        assert!(generated[0].detail.contains("self-signed"), "{generated:?}");

        let dir = std::env::temp_dir().join(format!("sluice-doctor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = crate::proto::tls::PemIdentity::generate(
            &["relay.example".to_string()],
            &[],
            crate::config::KeyKind::EcdsaP256,
        )
        .unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &id.chain_pem).unwrap();
        std::fs::write(&key, &id.key_pem).unwrap();
        let files = format!("cert = {:?}\nkey = {:?}\n", cert, key);
        let good = listener(&files);
        assert_eq!(good[0].level, Level::Ok, "{good:?}");
        std::fs::write(&key, "not a key").unwrap();
        let bad = listener(&files);
        assert_eq!(bad[0].level, Level::Fail, "{bad:?}");
        std::fs::remove_dir_all(&dir).unwrap();
        let plain = Config::from_toml(
            "[[listen]]\nname = \"a\"\nbind = \"0.0.0.0:1\"\nupstream = [\"127.0.0.1:9\"]\n",
            "t",
        )
        .unwrap();
        assert!(certificates(&plain).is_empty(), "no TLS, no check");
    }

    #[test]
    fn an_unresolvable_upstream_fails_within_the_bound() {
        let c = Config::from_toml(
            "[[listen]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nupstream = [\"nonexistent.invalid:443\"]\n",
            "t",
        )
        .unwrap();
        let start = std::time::Instant::now();
        let r = upstreams(&c, Duration::from_secs(2));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].level, Level::Fail, "{r:?}");
    }
}
