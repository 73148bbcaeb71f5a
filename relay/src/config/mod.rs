//! Typed configuration: TOML (or a preset) parsed once into structs, validated once.
//!
//! Every key is in README.md's example (a test holds it to that). Unknown keys are rejected;
//! every error names the key and, for a file, the line. Nothing here touches the network: host
//! names in `upstream` are resolved later by [`crate::upstream`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod preset;

/// Let's Encrypt's production directory: `directory` when the configuration names none.
pub(crate) const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// The whole configuration of one `sluice` daemon.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Worker processes; 0 means "as many as cores, or more if `max_connections` needs them".
    #[serde(default)]
    pub workers: u32,
    /// Relay engine for plain ports.
    #[serde(default)]
    pub engine: EngineChoice,
    /// Relayed connections the whole daemon holds at once; past it new clients are refused.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    /// How often upstream host names are resolved again, in seconds.
    #[serde(default = "defaults::resolve_interval_s")]
    pub resolve_interval_s: u32,
    /// Sockmap engine: MiB the kernel may queue for one direction of a connection whose
    /// destination does not keep up, beyond its socket buffers (flow control of the fast path;
    /// those bytes are charged to no socket buffer). 0 = only `sockmap_queue_total_mib` bounds
    /// it. Lower bounds kernel memory tighter and costs fast streams throughput.
    #[serde(default = "defaults::sockmap_queue_limit_mib")]
    pub sockmap_queue_limit_mib: u32,
    /// Sockmap engine: MiB the kernel may queue for the fast path of the whole daemon, all
    /// connections together (the sum of what `sockmap_queue_limit_mib` allows each). When it is
    /// spent, new bytes wait on their source socket for the worker, which forwards them with
    /// ordinary backpressure. 0 = no daemon-wide limit (and, with `sockmap_queue_limit_mib = 0`
    /// too, no flow control at all).
    #[serde(default = "defaults::sockmap_queue_total_mib")]
    pub sockmap_queue_total_mib: u32,
    /// After binding and loading eBPF, run as this user (its primary group too), keeping only
    /// the capabilities the engine still needs. None: stay as started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The name or address users reach this relay at (a DNS name or an IP address, no port).
    /// Only `sluicectl share` reads it, to print the links users tap; the daemon ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_host: Option<String>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Host names resolved to a fixed address instead of DNS (`--resolve HOST=IP`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub resolve: std::collections::BTreeMap<String, IpAddr>,
    /// Client allow/deny lists and the destination allowlist at start (changed live with
    /// `sluicectl allow|deny|dest`).
    #[serde(default, skip_serializing_if = "AdmissionSettings::is_empty")]
    pub admission: AdmissionSettings,
    /// The metrics/stats HTTP listener and histogram recording (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Where the daemon keeps what must outlive a restart (ACME account and certificates), as
    /// files of mode 0600; the systemd unit's `StateDirectory=sluice`.
    #[serde(default = "defaults::state_dir")]
    pub state_dir: std::path::PathBuf,
    /// One table per listening port.
    #[serde(rename = "listen")]
    pub listeners: Vec<Listener>,
}

/// The `[admission]` table: the lists the daemon starts with.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionSettings {
    /// Clients that may connect (CIDRs); empty = every client not denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<crate::cidr::Cidr>,
    /// Clients refused (CIDRs); deny wins over allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<crate::cidr::Cidr>,
    /// Upstream `HOST:PORT`s the relay may connect to (names resolved once, at start); empty =
    /// any upstream of the listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<HostPort>,
    /// Network interfaces to attach the XDP program to, which drops SYNs of denied clients
    /// before they cost a socket (needs CAP_BPF and CAP_NET_ADMIN).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xdp_interfaces: Vec<String>,
}

impl AdmissionSettings {
    pub fn is_empty(&self) -> bool {
        *self == AdmissionSettings::default()
    }
}

/// Default address of the metrics/stats HTTP listener.
pub(crate) const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9199";

/// `state_dir` when the configuration does not name one: what systemd's
/// `StateDirectory=sluice` makes.
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/sluice";

/// `[metrics]`: where Prometheus text and the stats page are served, and whether workers record
/// latency histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// `"127.0.0.1:9199"` (default) or `"off"`.
    #[serde(default = "defaults::metrics_listen")]
    pub listen: MetricsListen,
    /// Allow a non-loopback `listen` address (the page shows usage: keep it private).
    #[serde(default)]
    pub public: bool,
    /// Record per-listener latency/size histograms in the workers (`sluicectl stats`).
    #[serde(default = "defaults::yes")]
    pub histograms: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: defaults::metrics_listen(),
            public: false,
            histograms: true,
        }
    }
}

/// An HTTP listen address or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl FromStr for MetricsListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" | "false" => Ok(MetricsListen(None)),
            _ => s
                .parse()
                .map(|a| MetricsListen(Some(a)))
                .map_err(|_| format!("`{s}` is neither IP:PORT nor `off`")),
        }
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("off"),
        }
    }
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for MetricsListen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Timeouts, in milliseconds, like the WhatsApp proxy's HAProxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Upstream TCP connect, per address tried.
    #[serde(default = "defaults::connect_ms")]
    pub connect_ms: u32,
    /// No byte in either direction for this long closes the connection.
    #[serde(default = "defaults::idle_ms")]
    pub idle_ms: u32,
    /// After one side has half-closed, the other has this long to finish.
    #[serde(default = "defaults::fin_ms")]
    pub fin_ms: u32,
    /// A client on an `accept_proxy` port has this long to send its PROXY header.
    #[serde(default = "defaults::header_ms")]
    pub header_ms: u32,
    /// The builtin decoy's `client_header_timeout` (nginx's, 60 s): a request head must be
    /// complete this long after the connection came (or after the keep-alive wait ended); the
    /// wait is not renewed by each byte, so trickling clients cannot hold the site.
    #[serde(default = "defaults::decoy_header_ms")]
    pub decoy_header_ms: u32,
    /// The builtin decoy's `keepalive_timeout` (nginx's, 75 s): an idle kept-alive connection is
    /// closed after this long.
    #[serde(default = "defaults::decoy_keepalive_ms")]
    pub decoy_keepalive_ms: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: defaults::connect_ms(),
            idle_ms: defaults::idle_ms(),
            fin_ms: defaults::fin_ms(),
            header_ms: defaults::header_ms(),
            decoy_header_ms: defaults::decoy_header_ms(),
            decoy_keepalive_ms: defaults::decoy_keepalive_ms(),
        }
    }
}

/// One listening port and where its connections go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Label used in metrics and logs (never an address).
    pub name: String,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Upstream servers `HOST:PORT`, tried in order (every resolved address of each).
    pub upstream: Vec<HostPort>,
    /// Expect a PROXY protocol header (v1 or v2) from the client before its bytes.
    #[serde(default)]
    pub accept_proxy: bool,
    /// On an `accept_proxy` listener, the sources a PROXY header is required from and believed
    /// from (CIDRs without host bits, or single addresses): a connection from anywhere else is
    /// refused at accept, before a byte is read (`refused_untrusted_proxy`). Absent: loopback
    /// and the private and CGNAT ranges a load balancer lives in ([`DEFAULT_TRUSTED_PROXIES`]),
    /// filled in when the configuration is read, so `check-config` prints the effective list.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "cidr_list")]
    pub trusted_proxies: Option<Vec<IpNet>>,
    /// How a connection picks its upstream: `static` (the `upstream` list in turn) or `sni` (the
    /// entry whose host is the TLS ClientHello's server name; other names are refused).
    #[serde(default)]
    pub route: Route,
    /// Send a PROXY protocol header to the upstream before the client's bytes.
    #[serde(default)]
    pub send_proxy: SendProxy,
    /// Per-listener cap on relayed connections (HAProxy's frontend maxconn); 0 = the global cap.
    #[serde(default)]
    pub max_connections: u32,
    /// Connections one client IP may hold open on this listener at once; 0 = no limit. With
    /// `accept_proxy`, the client is the PROXY header's source ([`crate::limits`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_connections_per_client: u32,
    /// New connections one client IP may open on this listener per second; 0 = no limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub new_connections_per_second_per_client: u32,
    /// Local addresses the upstream connections leave from, in turn (each gives another ~28k
    /// source ports toward one upstream address); empty = the kernel's choice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_addresses: Vec<IpAddr>,
    /// Servers used only while every `upstream` address is down (needs `[listen.health]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<HostPort>,
    /// Layer-4 health checks of the upstream addresses; absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSettings>,
    /// Terminate TLS on this port (the client speaks TLS to the relay; the upstream gets the
    /// plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
    /// Where a connection goes whose first bytes are not what this port expects (an HTTP
    /// request, a ClientHello for another name, not TLS on a TLS port): `off` (closed, the
    /// default), `builtin` (an ordinary static page) or a web site's `HOST:PORT`
    /// ([`crate::decoy`]).
    #[serde(default, skip_serializing_if = "Decoy::is_off")]
    pub decoy: Decoy,
}

/// What `trusted_proxies` is on an `accept_proxy` listener that does not say: loopback, the
/// RFC 1918 ranges, CGNAT (100.64.0.0/10) and IPv6 unique local addresses, where a load
/// balancer in front of the relay lives (HAProxy's `expect-proxy layer4 if { src -f trusted }`,
/// nginx's `set_real_ip_from`). A balancer reaching the relay from a public address has to be
/// named.
pub(crate) const DEFAULT_TRUSTED_PROXIES: &[&str] = &[
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

/// [`DEFAULT_TRUSTED_PROXIES`], parsed.
pub(crate) fn default_trusted_proxies() -> Vec<IpNet> {
    DEFAULT_TRUSTED_PROXIES
        .iter()
        .map(|s| s.parse().expect("the default trusted proxies are CIDRs"))
        .collect()
}

impl Listener {
    /// The sources whose PROXY headers this listener believes (its `trusted_proxies`, or the
    /// default when it has none); empty when it does not take PROXY headers.
    pub(crate) fn trusted_proxies(&self) -> std::borrow::Cow<'_, [IpNet]> {
        match (&self.trusted_proxies, self.accept_proxy) {
            (_, false) => std::borrow::Cow::Borrowed(&[]),
            (Some(list), true) => std::borrow::Cow::Borrowed(list),
            (None, true) => std::borrow::Cow::Owned(default_trusted_proxies()),
        }
    }
}

/// `trusted_proxies`: a list of `ADDRESS/PREFIX` (or a bare address, one host) strings. Host
/// bits are kept as written, so validation can refuse them by key and line.
mod cidr_list {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::IpAddr;

    /// An IPv4-mapped range (`::ffff:10.0.0.0/104`) is read as the IPv4 one (`10.0.0.0/8`):
    /// peers are compared as IPv4 ([`crate::cidr::canonical_range`]).
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let net = match s.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => s
                .parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| format!("`{s}` is not a CIDR (ADDRESS/PREFIX)"))?,
        };
        let (addr, len) = crate::cidr::canonical_range(net.addr(), net.prefix_len());
        IpNet::new(addr, len).map_err(|e| format!("`{s}`: {e}"))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<IpNet>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| parse(s).map_err(serde::de::Error::custom))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub(crate) fn serialize<S: Serializer>(
        v: &Option<Vec<IpNet>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().flatten().map(|n| n.to_string()))
    }
}

/// A listener's anti-probing decoy ([`crate::decoy`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Decoy {
    #[default]
    Off,
    Builtin,
    /// `dir:PATH`: the builtin site serving the operator's files from `PATH` (like nginx's
    /// Debian default site: `index.html`, `index.htm`, `index.nginx-debian.html`).
    Dir(std::path::PathBuf),
    Site(HostPort),
}

impl Decoy {
    pub(crate) fn is_off(&self) -> bool {
        *self == Decoy::Off
    }

    /// Served by the supervisor's own site ([`crate::decoy`]), not by another server.
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, Decoy::Builtin | Decoy::Dir(_))
    }
}

impl FromStr for Decoy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Decoy::Off),
            "builtin" => Ok(Decoy::Builtin),
            _ if s.starts_with("dir:") => {
                let p = std::path::PathBuf::from(&s[4..]);
                if p.is_absolute() {
                    Ok(Decoy::Dir(p))
                } else {
                    Err(format!("`{s}`: the decoy's directory must be an absolute path"))
                }
            }
            _ => s.parse().map(Decoy::Site).map_err(|e| {
                format!(
                    "`{s}` is neither `off`, `builtin`, `dir:/PATH` nor a web site's HOST:PORT ({e})"
                )
            }),
        }
    }
}

impl fmt::Display for Decoy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decoy::Off => f.write_str("off"),
            Decoy::Builtin => f.write_str("builtin"),
            Decoy::Dir(p) => write!(f, "dir:{}", p.display()),
            Decoy::Site(hp) => write!(f, "{hp}"),
        }
    }
}

impl<'de> Deserialize<'de> for Decoy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Decoy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Health checks of a listener's upstream addresses (HAProxy's `check inter fastinter
/// downinter rise fall`); the defaults are the WhatsApp proxy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Between checks of an address that is up and steady.
    #[serde(default = "defaults::health_interval_ms")]
    pub interval_ms: u32,
    /// Between checks while an address is changing state.
    #[serde(default = "defaults::health_fast_interval_ms")]
    pub fast_interval_ms: u32,
    /// Between checks of an address that is down.
    #[serde(default = "defaults::health_down_interval_ms")]
    pub down_interval_ms: u32,
    /// Successes in a row that bring an address up.
    #[serde(default = "defaults::health_rise")]
    pub rise: u32,
    /// Failures in a row that take an address down.
    #[serde(default = "defaults::health_fall")]
    pub fall: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval_ms: defaults::health_interval_ms(),
            fast_interval_ms: defaults::health_fast_interval_ms(),
            down_interval_ms: defaults::health_down_interval_ms(),
            rise: defaults::health_rise(),
            fall: defaults::health_fall(),
        }
    }
}

/// TLS termination on a listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain (e.g. Let's Encrypt's fullchain.pem). Without `cert` and `key`, a
    /// private CA and a leaf are generated at every start, like the WhatsApp proxy does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key of `cert` (e.g. privkey.pem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<std::path::PathBuf>,
    /// DNS names of a generated certificate (the WhatsApp proxy's SSL_DNS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// IP addresses of a generated certificate (the WhatsApp proxy's SSL_IP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// Key type of a generated certificate: `ecdsa-p256` when absent (a full handshake costs
    /// the relay ~25× less CPU than with RSA-4096), `rsa-4096` (the WhatsApp proxy's own) or
    /// `rsa-2048`.
    /// Not with `cert`/`key`: the key file decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<KeyType>,
    /// Resume TLS sessions with tickets (TLS 1.3 and 1.2), under keys shared by every worker
    /// and rotated by the supervisor ([`crate::proto::tls`]); a resumed handshake skips the
    /// certificate signature. On by default, as in OpenSSL, nginx and HAProxy; the Signal preset
    /// turns it off like Signal-TLS-Proxy's nginx (`ssl_session_tickets off`).
    #[serde(default = "defaults::yes")]
    pub session_tickets: bool,
    /// Get and renew the certificate from an ACME CA (Let's Encrypt by default) instead of
    /// files: `acme = { domains = ["relay.example.org"], email = "ops@example.org" }`. Until
    /// the first certificate is issued the listener serves a generated one (from `dns_names`,
    /// `ips` and `key_type`, as without `acme`). Not with `cert`/`key`. See [`crate::acme`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeSettings>,
}

/// `[listen.tls] acme`: where a listener's certificate comes from when an ACME CA issues it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSettings {
    /// The names the certificate is for (each must resolve to this host: the CA connects to
    /// it to validate). No wildcards: TLS-ALPN-01 and HTTP-01 cannot validate them.
    pub domains: Vec<String>,
    /// The account's contact address (the CA's expiry warnings go there); none: no contact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The CA's directory URL: Let's Encrypt's production directory by default.
    #[serde(default = "defaults::acme_directory")]
    pub directory: String,
    /// A PEM file of the root that the directory's HTTPS certificate chains to, when it is not
    /// a public one (a test CA such as Pebble's); none: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory_ca: Option<std::path::PathBuf>,
    /// Renew when fewer than this many days of the certificate's validity remain.
    #[serde(default = "defaults::acme_renew_before_days")]
    pub renew_before_days: u32,
    /// How the CA validates the domains: absent, TLS-ALPN-01 on this TLS port when the CA
    /// offers it, else HTTP-01 through the decoy of a plain port-80 listener (when the
    /// configuration has one); `tls-alpn-01` or `http-01`: that one only (`http-01` needs a
    /// plain listener on port 80 with `decoy = "builtin"` or `"dir:..."`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<AcmeChallengeKind>,
}

/// `[listen.tls] acme.challenge`: the ACME validation method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AcmeChallengeKind {
    /// RFC 8737: a challenge certificate on the TLS port itself.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// RFC 8555 8.3: `GET /.well-known/acme-challenge/TOKEN` on port 80, answered by the decoy.
    #[serde(rename = "http-01")]
    Http01,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            cert: None,
            key: None,
            dns_names: Vec::new(),
            ips: Vec::new(),
            key_type: None,
            session_tickets: true,
            acme: None,
        }
    }
}

/// The key type of a generated certificate, as the generator ([`crate::proto::tls`]) takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// RSA with this many bits (at least 2048, what `ring` signs with); 4096 as WhatsApp's.
    Rsa(u16),
    /// ECDSA on P-256: fast to generate, far cheaper to sign with than RSA-4096.
    EcdsaP256,
}

impl KeyKind {
    /// What a generated certificate uses unless the configuration says otherwise.
    pub(crate) const DEFAULT: KeyKind = KeyKind::EcdsaP256;
}

/// The key type of a generated certificate (`[listen.tls] key_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum KeyType {
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-4096")]
    Rsa4096,
}

impl KeyType {
    /// The key generator's name for it.
    pub(crate) fn kind(self) -> KeyKind {
        match self {
            KeyType::EcdsaP256 => KeyKind::EcdsaP256,
            KeyType::Rsa2048 => KeyKind::Rsa(2048),
            KeyType::Rsa4096 => KeyKind::Rsa(4096),
        }
    }
}

impl AcmeSettings {
    /// Why these settings cannot work, or None.
    pub(crate) fn invalid(&self) -> Option<String> {
        if self.domains.is_empty() {
            return Some("`domains` is empty: name at least one".into());
        }
        for d in &self.domains {
            if d.starts_with("*.") {
                return Some(format!(
                    "`{d}`: a wildcard needs DNS-01, which Sluice does not do"
                ));
            }
            if !is_dns_name(d) {
                return Some(format!("`{d}` is not a DNS name"));
            }
        }
        if let Some(e) = &self.email
            && (e.split('@').count() != 2 || e.starts_with('@') || e.ends_with('@'))
        {
            return Some(format!("email `{e}` is not an address"));
        }
        if !self.directory.starts_with("https://") {
            return Some(format!(
                "directory `{}` is not an https:// URL",
                self.directory
            ));
        }
        if self.renew_before_days == 0 {
            return Some("`renew_before_days` must be at least 1".into());
        }
        None
    }
}

/// A host name of letters, digits and hyphens in dot-separated labels of 1 to 63 characters,
/// with at least two labels.
fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').count() >= 2
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl TlsSettings {
    /// The key type a generated certificate gets.
    pub(crate) fn generated_key(&self) -> KeyKind {
        self.key_type.map_or(KeyKind::DEFAULT, KeyType::kind)
    }
}

/// How a listener picks the upstream of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Every connection goes to the `upstream` list, tried in turn.
    #[default]
    Static,
    /// The ClientHello's server name (of the inner TLS, on a `tls` port) picks the `upstream`
    /// entry with that host, exactly, ignoring case; any other name, none, or non-TLS is refused.
    Sni,
}

/// Which engine relays plain connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// io_uring if the kernel allows it (splice, copy when pipes run out), else epoll.
    #[default]
    Auto,
    /// io_uring SPLICE through pipes; copy takes over when the pipe pool is empty.
    Splice,
    /// io_uring multishot recv into a provided-buffer ring, then send.
    Copy,
    /// epoll readiness and nonblocking read/write, for hosts that refuse io_uring.
    Epoll,
    /// The eBPF sockmap fast path for plain connections (bytes move inside the kernel; user
    /// space only watches for FIN and errors); TLS ports copy. Falls back to splice where BPF is
    /// refused. What the kernel queues for a destination that lags is bounded per direction
    /// (`sockmap_queue_limit_mib`) and for the whole daemon (`sockmap_queue_total_mib`); past
    /// that, bytes wait on the source socket (see docs/OPERATIONS.md).
    Sockmap,
}

impl fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineChoice::Auto => "auto",
            EngineChoice::Splice => "splice",
            EngineChoice::Copy => "copy",
            EngineChoice::Epoll => "epoll",
            EngineChoice::Sockmap => "sockmap",
        })
    }
}

/// The PROXY protocol header sent to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    #[default]
    None,
    V1,
    V2,
}

/// `HOST:PORT` where HOST is a name or an IP literal (`[v6]:port` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// The address when the host is an IP literal, so no resolution is needed.
    pub(crate) fn literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(HostPort {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` in `{s}` is not a port number"))?;
        if port == 0 {
            return Err(format!("port 0 in `{s}` cannot be connected to"));
        }
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(format!("`{host}` in `{s}` is not a host name"));
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A configuration that could not be used; the message names the key (and line, for a file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Checks that `host` is something a phone can connect to: an IP address, or a DNS name
/// (letters, digits, `-`, dots; labels of 1-63 characters not starting or ending with `-`).
/// A URL, a port or spaces get an error saying what to give instead. For `public_host` here
/// and the host of `sluicectl share` ([`crate::share`]).
pub(crate) fn validate_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty: give the relay's public DNS name or IP address".into());
    }
    if host.contains("://") || host.contains('/') {
        return Err(format!(
            "`{host}` looks like a URL: give only the host name or IP address, e.g. proxy.example.org"
        ));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if let Some((_, port)) = host.rsplit_once(':')
        && port.parse::<u16>().is_ok()
    {
        return Err(format!(
            "`{host}` has a port: give only the host; the ports come from the listeners"
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "`{host}` is neither an IP address nor a DNS name (letters, digits, `-` and dots)"
        ));
    }
    // An all-numeric name like 300.1.2.3 is a mistyped address, not a name.
    if name
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("`{host}` is not a valid IP address"));
    }
    Ok(())
}

mod defaults {
    pub(crate) fn acme_directory() -> String {
        super::LETS_ENCRYPT.to_owned()
    }
    pub(crate) fn acme_renew_before_days() -> u32 {
        30
    }
    pub(crate) fn state_dir() -> std::path::PathBuf {
        super::DEFAULT_STATE_DIR.into()
    }
    pub(crate) fn metrics_listen() -> super::MetricsListen {
        super::MetricsListen(Some(
            super::DEFAULT_METRICS_ADDR.parse().expect("valid default"),
        ))
    }
    pub(crate) fn yes() -> bool {
        true
    }
    pub(crate) fn max_connections() -> u32 {
        27_500
    }
    pub(crate) fn resolve_interval_s() -> u32 {
        300
    }
    pub(crate) fn sockmap_queue_limit_mib() -> u32 {
        16
    }
    pub(crate) fn sockmap_queue_total_mib() -> u32 {
        256
    }
    pub(crate) fn connect_ms() -> u32 {
        5_000
    }
    pub(crate) fn idle_ms() -> u32 {
        200_000
    }
    pub(crate) fn fin_ms() -> u32 {
        1_000
    }
    pub(crate) fn header_ms() -> u32 {
        5_000
    }
    pub(crate) fn decoy_header_ms() -> u32 {
        60_000
    }
    pub(crate) fn decoy_keepalive_ms() -> u32 {
        75_000
    }
    pub(crate) fn health_interval_ms() -> u32 {
        60_000
    }
    pub(crate) fn health_fast_interval_ms() -> u32 {
        1_000
    }
    pub(crate) fn health_down_interval_ms() -> u32 {
        3_000
    }
    pub(crate) fn health_rise() -> u32 {
        2
    }
    pub(crate) fn health_fall() -> u32 {
        3
    }
}

/// Hard bounds; past them a value is a typo, not a tuning.
const MAX_WORKERS: u32 = 1024;
const MAX_CONNECTIONS: u32 = 10_000_000;

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors (a path or "preset whatsapp").
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            origin: origin.to_string(),
            message: describe_toml_error(text, &e),
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                origin: origin.to_string(),
                message: match find_key_line(text, &key) {
                    Some(line) => format!("line {line}: `{key}`: {message}"),
                    None => format!("`{key}`: {message}"),
                },
            })?;
        config.fill_defaults();
        Ok(config)
    }

    /// Writes out what a key left to its default means where the default is not a constant:
    /// each `accept_proxy` listener's `trusted_proxies`.
    pub(crate) fn fill_defaults(&mut self) {
        for l in &mut self.listeners {
            if l.accept_proxy && l.trusted_proxies.is_none() {
                l.trusted_proxies = Some(default_trusted_proxies());
            }
        }
    }

    /// One port relayed to one upstream with the default timeouts (`sluice forward`).
    pub fn forward(listen: SocketAddr, upstream: HostPort) -> Config {
        Config {
            workers: 0,
            engine: EngineChoice::Auto,
            max_connections: defaults::max_connections(),
            resolve_interval_s: defaults::resolve_interval_s(),
            sockmap_queue_limit_mib: defaults::sockmap_queue_limit_mib(),
            sockmap_queue_total_mib: defaults::sockmap_queue_total_mib(),
            timeouts: Timeouts::default(),
            resolve: Default::default(),
            admission: AdmissionSettings::default(),
            user: None,
            metrics: MetricsSettings::default(),
            public_host: None,
            state_dir: defaults::state_dir(),
            listeners: vec![Listener {
                name: "forward".into(),
                bind: listen,
                upstream: vec![upstream],
                accept_proxy: false,
                trusted_proxies: None,
                route: Route::Static,
                send_proxy: SendProxy::None,
                max_connections: 0,
                max_connections_per_client: 0,
                new_connections_per_second_per_client: 0,
                decoy: Decoy::Off,
                source_addresses: Vec::new(),
                fallback: Vec::new(),
                health: None,
                tls: None,
            }],
        }
    }

    /// The listener that can answer ACME HTTP-01 challenges: the first plain (no `tls`),
    /// static-route listener on port 80 whose decoy is a local site (`builtin` or `dir:`),
    /// which gets the CA's `GET /.well-known/acme-challenge/TOKEN` ([`crate::decoy`]).
    pub(crate) fn http01_listener(&self) -> Option<usize> {
        self.listeners.iter().position(|l| {
            l.bind.port() == 80 && l.tls.is_none() && l.route == Route::Static && l.decoy.is_local()
        })
    }

    /// Checks what types alone cannot; on error returns (key path, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if self.workers > MAX_WORKERS {
            return err(
                "workers",
                format!("{} is more than {MAX_WORKERS}", self.workers),
            );
        }
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS {
            return err(
                "max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        if self.resolve_interval_s == 0 {
            return err("resolve_interval_s", "must be at least 1".into());
        }
        if let Some(a) = self.metrics.listen.0
            && !a.ip().is_loopback()
            && !self.metrics.public
        {
            return err(
                "metrics.listen",
                format!(
                    "{a} is not a loopback address; the stats page shows usage to whoever reaches \
                     it: set `metrics.public = true` (--metrics-public) to really expose it"
                ),
            );
        }
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.connect_ms", t.connect_ms),
            ("timeouts.idle_ms", t.idle_ms),
            ("timeouts.fin_ms", t.fin_ms),
            ("timeouts.header_ms", t.header_ms),
            ("timeouts.decoy_header_ms", t.decoy_header_ms),
            ("timeouts.decoy_keepalive_ms", t.decoy_keepalive_ms),
        ] {
            if v == 0 {
                return err(key, "must be at least 1 ms".into());
            }
        }
        if let Some(user) = &self.user {
            let ok = !user.is_empty()
                && user.len() <= 32
                && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && user
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !ok {
                return err("user", format!("`{user}` is not a user name"));
            }
        }
        for (i, name) in self.admission.xdp_interfaces.iter().enumerate() {
            // IFNAMSIZ is 16 with the terminating NUL.
            if name.is_empty()
                || name.len() > 15
                || name.contains('/')
                || name.chars().any(|c| c.is_whitespace())
            {
                return err(
                    &format!("admission.xdp_interfaces[{i}]"),
                    format!("`{name}` is not a network interface name (1-15 characters)"),
                );
            }
        }
        if let Some(h) = &self.public_host
            && let Err(e) = validate_host(h)
        {
            return err("public_host", e);
        }
        if self.listeners.is_empty() {
            return err("listen", "at least one [[listen]] table is needed".into());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty()
                || !l
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return err(
                    &format!("listen[{i}].name"),
                    format!("`{}` must be non-empty letters, digits, `-` or `_`", l.name),
                );
            }
            if l.upstream.is_empty() {
                return err(
                    &format!("listen[{i}].upstream"),
                    "needs at least one HOST:PORT".into(),
                );
            }
            if !l.fallback.is_empty() && l.health.is_none() {
                return err(
                    &format!("listen[{i}].fallback"),
                    "is used when health checks find the upstream down: add [listen.health]".into(),
                );
            }
            if !l.fallback.is_empty() && l.route == Route::Sni {
                return err(
                    &format!("listen[{i}].fallback"),
                    "has no meaning with route = \"sni\" (the name picks the upstream)".into(),
                );
            }
            if let Some(h) = &l.health {
                for (key, v) in [
                    ("interval_ms", h.interval_ms),
                    ("fast_interval_ms", h.fast_interval_ms),
                    ("down_interval_ms", h.down_interval_ms),
                ] {
                    if v < 100 {
                        return err(
                            &format!("listen[{i}].health.{key}"),
                            "must be at least 100 ms".into(),
                        );
                    }
                }
                if h.rise == 0 || h.fall == 0 {
                    return err(
                        &format!("listen[{i}].health"),
                        "`rise` and `fall` must be at least 1".into(),
                    );
                }
            }
            if let Some(list) = &l.trusted_proxies {
                let key = format!("listen[{i}].trusted_proxies");
                if !l.accept_proxy {
                    return err(
                        &key,
                        "is where PROXY headers may come from: it needs `accept_proxy = true`"
                            .into(),
                    );
                }
                if list.is_empty() {
                    return err(
                        &key,
                        "is empty, so every connection would be refused: name the load \
                         balancers' addresses, or leave the key out for loopback and the \
                         private ranges"
                            .into(),
                    );
                }
                if let Some(why) = list.iter().find_map(crate::cidr::host_bits) {
                    return err(&key, why);
                }
            }
            if let Some(t) = &l.tls
                && t.cert.is_some() != t.key.is_some()
            {
                return err(
                    &format!("listen[{i}].tls"),
                    "`cert` and `key` go together (or neither, for a generated certificate)".into(),
                );
            }
            if let Some(t) = &l.tls
                && t.cert.is_some()
                && t.key_type.is_some()
            {
                return err(
                    &format!("listen[{i}].tls.key_type"),
                    "applies to a generated certificate only: with `cert` and `key` the key file \
                     decides"
                        .into(),
                );
            }
            if let Some(a) = l.tls.as_ref().and_then(|t| t.acme.as_ref()) {
                let t = l.tls.as_ref().expect("acme is inside tls");
                let key = format!("listen[{i}].tls.acme");
                if t.cert.is_some() {
                    return err(
                        &key,
                        "`acme` and `cert`/`key` exclude each other: the certificate comes \
                         from the CA or from files"
                            .into(),
                    );
                }
                if let Some(why) = a.invalid() {
                    return err(&key, why);
                }
                if a.challenge == Some(AcmeChallengeKind::Http01)
                    && self.http01_listener().is_none()
                {
                    return err(
                        &format!("{key}.challenge"),
                        "`http-01` needs a plain listener on port 80 with a local decoy \
                         (`decoy = \"builtin\"` or `\"dir:...\"`, static route, no `tls`): the \
                         decoy answers the CA's `/.well-known/acme-challenge/` requests"
                            .into(),
                    );
                }
            }
            if l.max_connections > self.max_connections {
                return err(
                    &format!("listen[{i}].max_connections"),
                    format!(
                        "{} is above the global max_connections {}",
                        l.max_connections, self.max_connections
                    ),
                );
            }
            for (j, other) in self.listeners[..i].iter().enumerate() {
                if other.bind == l.bind {
                    return err(
                        &format!("listen[{i}].bind"),
                        format!("{} is already bound by listen[{j}]", l.bind),
                    );
                }
                if other.name == l.name {
                    return err(
                        &format!("listen[{i}].name"),
                        format!("`{}` is already the name of listen[{j}]", l.name),
                    );
                }
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML an operator can copy and edit.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serializes")
    }

    /// Resolves upstream host `host` to `ip` instead of asking DNS (like /etc/hosts); the name
    /// itself stays, so SNI routing still matches it.
    pub fn apply_resolve(&mut self, host: &str, ip: IpAddr) {
        self.resolve.insert(host.to_ascii_lowercase(), ip);
    }
}

/// `--resolve HOST=IP`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOverride {
    pub host: String,
    pub ip: IpAddr,
}

impl FromStr for ResolveOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, ip) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not HOST=IP"))?;
        let ip = ip
            .parse()
            .map_err(|_| format!("`{ip}` in `{s}` is not an IP address"))?;
        Ok(ResolveOverride {
            host: host.to_string(),
            ip,
        })
    }
}

/// The toml crate's message, reworded so it starts with the line number.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end_matches('\n');
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let key = text[span.clone()].trim();
            if key.is_empty() || key.contains('\n') {
                format!("line {line}: {msg}")
            } else {
                format!("line {line}: `{key}`: {msg}")
            }
        }
        None => msg.to_string(),
    }
}

/// Line of `key` (`a.b`, `listen[2].bind`, `listen[1].tls.cert`) in `text`, from the spans of
/// the parsed document (so sub-tables, inline tables and arrays of tables are found as TOML
/// reads them); a key that is not written (a missing one) gives the line of the nearest table
/// that is.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    use toml_edit::{ImDocument, Item, Value};
    let doc = ImDocument::parse(text).ok()?;
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut found = None;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (name, index) = match part.split_once('[') {
            Some((n, idx)) => (n, Some(idx.trim_end_matches(']').parse::<usize>().ok()?)),
            None => (*part, None),
        };
        let Some((k, item)) = table.get_key_value(name) else {
            break;
        };
        let last = i + 1 == parts.len();
        let item: &Item = match (item, index) {
            (Item::ArrayOfTables(a), Some(n)) => match a.get(n) {
                Some(t) => {
                    found = t.span().map(|s| s.start).or(found);
                    if last {
                        break;
                    }
                    table = t;
                    continue;
                }
                None => break,
            },
            (item, _) => item,
        };
        found = k.span().map(|s| s.start).or(found);
        match (item, index) {
            (Item::Table(t), None) => table = t,
            (Item::Value(Value::InlineTable(t)), None) => table = t,
            (Item::Value(Value::Array(a)), Some(n)) => {
                if let Some(Value::InlineTable(t)) = a.get(n) {
                    found = t.span().map(|s| s.start).or(found);
                    table = t;
                } else {
                    if let Some(v) = a.get(n) {
                        found = v.span().map(|s| s.start).or(found);
                    }
                    break;
                }
            }
            _ => break,
        }
    }
    found.map(line_of)
}

/// Leaves a zero (off) per-client limit out of the printed configuration.
fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(text: &str, expect: &str) {
        let e = Config::from_toml(text, "test.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(expect),
            "error `{e}` does not contain `{expect}`"
        );
    }

    const ONE: &str =
        "[[listen]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:2\"]\n";

    #[test]
    fn minimal_config_gets_the_whatsapp_defaults() {
        let c = Config::from_toml(ONE, "t").unwrap();
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.timeouts.connect_ms, 5000);
        assert_eq!(c.timeouts.idle_ms, 200_000);
        assert_eq!(c.timeouts.fin_ms, 1000);
        assert_eq!(c.max_connections, 27_500);
        assert_eq!(c.engine, EngineChoice::Auto);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        check_err(
            &format!("{ONE}colour = 3\n"),
            "line 5: `colour`: unknown field `colour`",
        );
        check_err("workers = 1\nfoo = 2\n[[listen]]\n", "line 2: `foo`");
    }

    #[test]
    fn bad_value_is_named_with_its_line() {
        check_err(
            "[[listen]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nupstream = [\"nohost\"]\n",
            "line 4",
        );
        check_err(
            "engine = \"turbo\"\n[[listen]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nupstream = [\"h:1\"]\n",
            "line 1: `\"turbo\"`: unknown variant `turbo`",
        );
        check_err(
            "[[listen]]\nname = \"a\"\nbind = \"localhost\"\nupstream = [\"h:1\"]\n",
            "line 3",
        );
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        check_err(
            &format!("max_connections = 0\n{ONE}"),
            "line 1: `max_connections`",
        );
        check_err(
            &format!("{ONE}\n[timeouts]\nidle_ms = 0\n"),
            "line 7: `timeouts.idle_ms`",
        );
        let two = format!(
            "{ONE}[[listen]]\nname = \"b\"\nbind = \"127.0.0.1:1\"\nupstream = [\"h:3\"]\n"
        );
        check_err(
            &two,
            "line 7: `listen[1].bind`: 127.0.0.1:1 is already bound by listen[0]",
        );
        // After a listener's sub-table, the next `[[listen]]` is still listen[1] (a scan of
        // the headers used to count it as listen[0] again and give no line).
        let after_sub_table = format!(
            "{ONE}[listen.health]\nrise = 2\n[[listen]]\nname = \"b\"\n\
             bind = \"127.0.0.1:1\"\nupstream = [\"h:3\"]\n"
        );
        check_err(
            &after_sub_table,
            "line 9: `listen[1].bind`: 127.0.0.1:1 is already bound by listen[0]",
        );
        // A table's own error: the line of its header.
        check_err(
            &format!("{ONE}[listen.health]\nrise = 0\n"),
            "line 5: `listen[0].health`",
        );
    }

    /// README.md's configuration example is a file the relay accepts, and it names every key
    /// the effective configuration of each preset has (`sluice check-config --preset`), so a
    /// reader finds each one there.
    #[test]
    fn the_readme_example_parses_and_names_every_key() {
        let readme = include_str!("../../../README.md");
        let at = readme
            .find("A configuration file is TOML:")
            .expect("README.md introduces its example");
        let block = readme[at..]
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("\n```").next())
            .expect("a ```toml block follows");
        Config::from_toml(block, "README.md").unwrap();
        fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        out.push(k.clone());
                        if prefix != "resolve" {
                            keys(k, v, out);
                        }
                    }
                }
                toml::Value::Array(a) => a.iter().for_each(|v| keys(prefix, v, out)),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        for preset in [preset::Preset::Whatsapp, preset::Preset::Signal] {
            let mut all = Vec::new();
            keys(
                "",
                &toml::Value::try_from(preset.config()).unwrap(),
                &mut all,
            );
            for k in all {
                let written = block.lines().any(|l| {
                    let l = l.trim_start_matches(['#', ' ']);
                    l.starts_with(&format!("{k} ="))
                        || l.starts_with(&format!("[{k}]"))
                        || l.starts_with(&format!("[[{k}]]"))
                        || l.starts_with(&format!("[listen.{k}]"))
                        || l.contains(&format!(" {k} = "))
                });
                if !written && !missing.contains(&k) {
                    missing.push(k);
                }
            }
        }
        assert!(missing.is_empty(), "README.md's example lacks {missing:?}");
    }

    #[test]
    fn tls_key_type_and_tickets() {
        let tls = |extra: &str| {
            format!(
                "[[listen]]\nname = \"t\"\nbind = \"127.0.0.1:443\"\nupstream = [\"h:1\"]\n\
                 [listen.tls]\n{extra}"
            )
        };
        let c = Config::from_toml(&tls(""), "t").unwrap();
        let t = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(
            (t.key_type, t.generated_key(), t.session_tickets),
            (None, KeyKind::EcdsaP256, true),
            "absent: ECDSA P-256, tickets on"
        );
        assert_eq!(Config::from_toml(&c.to_toml(), "t").unwrap(), c);
        let c = Config::from_toml(
            &tls("key_type = \"rsa-4096\"\nsession_tickets = false\n"),
            "t",
        )
        .unwrap();
        let t = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(
            (t.generated_key(), t.session_tickets),
            (KeyKind::Rsa(4096), false)
        );
        assert_eq!(Config::from_toml(&c.to_toml(), "t").unwrap(), c);
        check_err(
            &tls("key_type = \"rsa-1024\"\n"),
            "line 6: `\"rsa-1024\"`: unknown variant `rsa-1024`, expected one of `ecdsa-p256`, \
             `rsa-2048`, `rsa-4096`",
        );
        check_err(
            &tls("cert = \"/c.pem\"\nkey = \"/k.pem\"\nkey_type = \"ecdsa-p256\"\n"),
            "`listen[0].tls.key_type`: applies to a generated certificate only",
        );
    }

    #[test]
    fn acme_http01_needs_a_plain_port_80_decoy() {
        let tls = |challenge: &str, port80: &str| {
            format!(
                "[[listen]]\nname = \"t\"\nbind = \"127.0.0.1:443\"\nupstream = [\"h:1\"]\n\
                 [listen.tls]\nacme = {{ domains = [\"relay.example.org\"]{challenge} }}\n\
                 [[listen]]\nname = \"http\"\nbind = \"127.0.0.1:80\"\nupstream = [\"h:2\"]\n\
                 {port80}"
            )
        };
        let c = Config::from_toml(&tls("", ""), "t").unwrap();
        assert_eq!(c.http01_listener(), None);
        let acme = |c: &Config| c.listeners[0].tls.as_ref().unwrap().acme.clone().unwrap();
        assert_eq!(acme(&c).challenge, None, "absent: TLS-ALPN-01 first");
        let c = Config::from_toml(
            &tls(", challenge = \"http-01\"", "decoy = \"builtin\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(c.http01_listener(), Some(1));
        assert_eq!(acme(&c).challenge, Some(AcmeChallengeKind::Http01));
        assert_eq!(Config::from_toml(&c.to_toml(), "t").unwrap(), c);
        let c = Config::from_toml(&tls(", challenge = \"tls-alpn-01\"", ""), "t").unwrap();
        assert_eq!(acme(&c).challenge, Some(AcmeChallengeKind::TlsAlpn01));
        let why = "`http-01` needs a plain listener on port 80 with a local decoy";
        check_err(&tls(", challenge = \"http-01\"", ""), why);
        // A remote decoy cannot answer, nor a TLS port 80.
        check_err(
            &tls(", challenge = \"http-01\"", "decoy = \"192.0.2.1:80\"\n"),
            why,
        );
        check_err(
            &tls(
                ", challenge = \"http-01\"",
                "decoy = \"builtin\"\n[listen.tls]\n",
            ),
            why,
        );
        check_err(
            &tls(", challenge = \"dns-01\"", ""),
            "unknown variant `dns-01`",
        );
    }

    #[test]
    fn admission_table_is_typed_and_checked() {
        let c = Config::from_toml(
            &format!(
                "[admission]\nallow = [\"10.0.0.0/8\", \"2001:db8::/32\"]\ndeny = [\"10.1.2.3\"]\ndestinations = [\"127.0.0.1:5222\", \"g.example.net:443\"]\nxdp_interfaces = [\"eth0\"]\n{ONE}"
            ),
            "t",
        )
        .unwrap();
        assert_eq!(c.admission.allow.len(), 2);
        assert_eq!(c.admission.deny[0].to_string(), "10.1.2.3/32");
        assert_eq!(c.admission.destinations[1].to_string(), "g.example.net:443");
        assert_eq!(Config::from_toml(&c.to_toml(), "t").unwrap(), c);
        check_err(
            &format!("[admission]\ndeny = [\"10.0.0.0/33\"]\n{ONE}"),
            "line 2: `[\"10.0.0.0/33\"]`: `10.0.0.0/33` is not a CIDR",
        );
        check_err(
            &format!("[admission]\nallow = [\"example.org\"]\n{ONE}"),
            "line 2",
        );
        check_err(
            &format!("[admission]\ndestinations = [\"127.0.0.1\"]\n{ONE}"),
            "line 2",
        );
        check_err(
            &format!("[admission]\nblock = []\n{ONE}"),
            "line 2: `block`: unknown field `block`",
        );
        check_err(
            &format!("[admission]\n\nxdp_interfaces = [\"\"]\n{ONE}"),
            "line 3: `admission.xdp_interfaces[0]`",
        );
    }

    #[test]
    fn trusted_proxies_default_print_and_refuse_host_bits() {
        let proxied = "[[listen]]\nname = \"lb\"\nbind = \"0.0.0.0:8080\"\nupstream = [\"h:1\"]\naccept_proxy = true\n";
        let c = Config::from_toml(proxied, "t").unwrap();
        assert_eq!(
            c.listeners[0].trusted_proxies,
            Some(default_trusted_proxies()),
            "absent = the default, written out"
        );
        let printed = c.to_toml();
        assert!(
            printed.contains("trusted_proxies = [") && printed.contains("\"100.64.0.0/10\""),
            "check-config prints the effective list: {printed}"
        );
        assert_eq!(Config::from_toml(&printed, "t").unwrap(), c);
        let plain = Config::from_toml(ONE, "t").unwrap();
        assert_eq!(plain.listeners[0].trusted_proxies, None);
        assert!(plain.listeners[0].trusted_proxies().is_empty());
        assert!(!plain.to_toml().contains("trusted_proxies"));

        let given = Config::from_toml(
            &format!("{proxied}trusted_proxies = [\"192.0.2.0/24\", \"2001:db8::7\"]\n"),
            "t",
        )
        .unwrap();
        let list: Vec<String> = given.listeners[0]
            .trusted_proxies()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            list,
            ["192.0.2.0/24", "2001:db8::7/128"],
            "a bare address is one host"
        );
        let mapped = Config::from_toml(
            &format!(
                "{proxied}trusted_proxies = [\"::ffff:10.0.0.0/104\", \"::ffff:192.0.2.9\"]\n"
            ),
            "t",
        )
        .unwrap();
        let list: Vec<String> = mapped.listeners[0]
            .trusted_proxies()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            list,
            ["10.0.0.0/8", "192.0.2.9/32"],
            "an IPv4-mapped range is the IPv4 one"
        );

        check_err(
            &format!("{proxied}trusted_proxies = [\"10.0.0.0/8\", \"10.1.2.3/8\"]\n"),
            "line 6: `listen[0].trusted_proxies`: `10.1.2.3/8` has host bits set (the range is 10.0.0.0/8)",
        );
        check_err(
            &format!("{proxied}trusted_proxies = [\"2001:db8::1/32\"]\n"),
            "`listen[0].trusted_proxies`: `2001:db8::1/32` has host bits set",
        );
        check_err(
            &format!("{proxied}trusted_proxies = []\n"),
            "line 6: `listen[0].trusted_proxies`: is empty",
        );
        check_err(
            &format!("{proxied}trusted_proxies = [\"lb.example\"]\n"),
            "line 6: `[\"lb.example\"]`: `lb.example` is not a CIDR",
        );
        check_err(
            &format!("{ONE}trusted_proxies = [\"10.0.0.0/8\"]\n"),
            "line 5: `listen[0].trusted_proxies`: is where PROXY headers may come from: it needs `accept_proxy = true`",
        );
    }

    #[test]
    fn metrics_settings_parse_and_a_public_address_needs_consent() {
        let c = Config::from_toml(ONE, "t").unwrap();
        assert_eq!(c.metrics, MetricsSettings::default());
        assert_eq!(c.metrics.listen.to_string(), DEFAULT_METRICS_ADDR);
        let off = Config::from_toml(&format!("{ONE}[metrics]\nlisten = \"off\"\n"), "t").unwrap();
        assert_eq!(off.metrics.listen, MetricsListen(None));
        assert_eq!(Config::from_toml(&off.to_toml(), "t").unwrap(), off);
        check_err(
            &format!("{ONE}[metrics]\nlisten = \"0.0.0.0:9199\"\n"),
            "line 6: `metrics.listen`: 0.0.0.0:9199 is not a loopback address",
        );
        let public = format!("{ONE}[metrics]\nlisten = \"0.0.0.0:9199\"\npublic = true\n");
        assert!(Config::from_toml(&public, "t").is_ok());
        check_err(
            &format!("{ONE}[metrics]\nlisten = \"nowhere\"\n"),
            "`nowhere` is neither IP:PORT nor `off`",
        );
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            "Example.NET:80".parse::<HostPort>().unwrap().to_string(),
            "example.net:80"
        );
        assert_eq!(
            "[::1]:5".parse::<HostPort>().unwrap().to_string(),
            "[::1]:5"
        );
        assert_eq!(
            "[::1]:5".parse::<HostPort>().unwrap().literal(),
            Some("[::1]:5".parse().unwrap())
        );
        assert!("a b:1".parse::<HostPort>().is_err());
        assert!("a:0".parse::<HostPort>().is_err());
        assert!("a:99999".parse::<HostPort>().is_err());
    }

    #[test]
    fn toml_round_trips() {
        let c = Config::from_toml(ONE, "t").unwrap();
        assert_eq!(Config::from_toml(&c.to_toml(), "t").unwrap(), c);
    }

    #[test]
    fn resolve_override_rewrites_hosts() {
        let mut c = Config::from_toml(
            "[[listen]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nupstream = [\"g.example.net:5222\"]\n",
            "t",
        )
        .unwrap();
        let r: ResolveOverride = "G.example.net=127.0.0.9".parse().unwrap();
        c.apply_resolve(&r.host, r.ip);
        assert_eq!(
            c.resolve["g.example.net"],
            "127.0.0.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            c.listeners[0].upstream[0].host, "g.example.net",
            "the name stays for SNI"
        );
        let printed = c.to_toml();
        assert!(printed.contains("[resolve]"), "{printed}");
        assert_eq!(Config::from_toml(&printed, "t").unwrap(), c);
    }
}
