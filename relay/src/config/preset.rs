//! Built-in deployments that reproduce the real projects' own configuration files.
//!
//! `whatsapp` is WhatsApp/proxy's HAProxy configuration (proxy/src/proxy_config.cfg): the same
//! ports, TLS on 443 and 8443 with a generated certificate, PROXY headers accepted on the
//! `*-proxied` ports (from loopback and private ranges only: `trusted_proxies`) and sent upstream
//! as v1, maxconn 27500 (27495 per frontend), timeouts connect 5 s, client/server 200 s,
//! client-fin/server-fin 1 s. Binds are IPv4, like theirs.
//!
//! Where both presets add to their upstream (issue 17, "a TLS handshake flood"): a limit on new
//! connections per client per second on the TLS ports ([`WHATSAPP_TLS_NEW_PER_SECOND`],
//! [`SIGNAL_TLS_NEW_PER_SECOND`]; neither HAProxy's nor nginx's file has one), and a generated
//! certificate is ECDSA P-256 rather than RSA-4096 ([`crate::proto::tls`]). The WhatsApp TLS
//! ports resume sessions with tickets, as its HAProxy does (`no-tls-tickets` is commented out
//! there); the Signal port does not, as its nginx says `ssl_session_tickets off`.

use super::{
    Config, Decoy, EngineChoice, HealthSettings, HostPort, Listener, Route, SendProxy, Timeouts,
    TlsSettings,
};

/// The Signal service names Signal-TLS-Proxy relays to, from its nginx configuration.
pub const SIGNAL_HOSTS: &[&str] = &[
    "chat.signal.org",
    "storage.signal.org",
    "cdn.signal.org",
    "cdn2.signal.org",
    "cdn3.signal.org",
    "cdsi.signal.org",
    "contentproxy.signal.org",
    "grpc.chat.signal.org",
    "sfu.voip.signal.org",
    "svr2.signal.org",
    "svrb.signal.org",
    "updates.signal.org",
    "updates2.signal.org",
];

/// A named built-in configuration (`--preset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Preset {
    /// The WhatsApp proxy: ports 80/8080, 443/8443 (TLS), 5222/8222, 587/7777.
    #[default]
    Whatsapp,
    /// Signal-TLS-Proxy: TLS on 443, then the inner ClientHello's name picks one of Signal's
    /// hosts on 443.
    Signal,
}

impl Preset {
    pub fn config(self) -> Config {
        match self {
            Preset::Whatsapp => whatsapp(),
            Preset::Signal => signal(),
        }
    }

    /// The preset for a relay users reach at `domain` (`--domain`): the Signal preset's port
    /// 443 gets its certificate for it from Let's Encrypt (`[listen.tls] acme`, with `email` as
    /// the account's contact) instead of a generated one, and `public_host` is `domain`. The
    /// WhatsApp preset has no use for it: the app does not check the proxy's certificate.
    pub fn config_for_domain(self, domain: &str, email: Option<&str>) -> Result<Config, String> {
        let mut c = self.config();
        match self {
            Preset::Whatsapp => Err(
                "--domain applies to the Signal preset: WhatsApp does not check the proxy's \
                 certificate"
                    .into(),
            ),
            Preset::Signal => {
                let tls = c.listeners[0]
                    .tls
                    .as_mut()
                    .expect("the Signal preset terminates TLS");
                tls.acme = Some(super::AcmeSettings {
                    domains: vec![domain.to_owned()],
                    email: email.map(str::to_owned),
                    directory: super::defaults::acme_directory(),
                    directory_ca: None,
                    renew_before_days: super::defaults::acme_renew_before_days(),
                    challenge: None,
                });
                c.public_host = Some(domain.to_owned());
                Ok(c)
            }
        }
    }
}

/// New connections per second one client (an IPv4 address or an IPv6 /64; with a PROXY
/// header, its source) may open on the WhatsApp preset's TLS ports (443, 8443); refused ones are
/// reset and counted (`refused_client_rate`). Sized for a carrier-grade NAT address shared by
/// hundreds to a few thousand users: a WhatsApp client holds one chat connection and opens a new
/// one when its network changes or the app wakes, well under one a minute on average, so
/// 100 a second carries several thousand users on one address, and when all of a thousand
/// reconnect at once (the NAT or the relay restarted) every one is back within about ten
/// seconds of retries. What it bounds: the full handshakes one attacking address forces, from
/// 3 600–5 900 a second on a 2-core host to 100, about 2 % of one core with the ECDSA
/// certificate (docs/OPERATIONS.md, "Handshake floods"). With `key_type = "rsa-4096"` 100
/// RSA-4096 handshakes a second are almost half a core: lower it there.
pub(crate) const WHATSAPP_TLS_NEW_PER_SECOND: u32 = 100;

/// The same for the Signal preset's port 443, twice as high: a Signal client opens several
/// connections through the proxy at once (the authenticated and unauthenticated websockets,
/// then storage, CDN, contact discovery as it needs them), each its own TLS session to the
/// relay with no resumption (tickets are off, as upstream).
pub(crate) const SIGNAL_TLS_NEW_PER_SECOND: u32 = 200;

fn hp(s: &str) -> HostPort {
    s.parse().expect("preset upstreams are valid")
}

fn whatsapp() -> Config {
    // (name, port, tls, accept PROXY, upstream, send PROXY)
    let table: [(&str, u16, bool, bool, &str, SendProxy); 8] = [
        ("http", 80, false, false, "g.whatsapp.net:80", SendProxy::V1),
        (
            "http-proxied",
            8080,
            false,
            true,
            "g.whatsapp.net:80",
            SendProxy::V1,
        ),
        (
            "chat-tls",
            443,
            true,
            false,
            "g.whatsapp.net:5222",
            SendProxy::V1,
        ),
        (
            "chat-tls-proxied",
            8443,
            true,
            true,
            "g.whatsapp.net:5222",
            SendProxy::V1,
        ),
        (
            "chat",
            5222,
            false,
            false,
            "g.whatsapp.net:5222",
            SendProxy::V1,
        ),
        (
            "chat-proxied",
            8222,
            false,
            true,
            "g.whatsapp.net:5222",
            SendProxy::V1,
        ),
        (
            "media",
            587,
            false,
            false,
            "whatsapp.net:443",
            SendProxy::None,
        ),
        (
            "media-alt",
            7777,
            false,
            false,
            "whatsapp.net:443",
            SendProxy::None,
        ),
    ];
    Config {
        workers: 0,
        engine: EngineChoice::Auto,
        max_connections: 27_500,
        resolve_interval_s: 300,
        sockmap_queue_limit_mib: super::defaults::sockmap_queue_limit_mib(),
        sockmap_queue_total_mib: super::defaults::sockmap_queue_total_mib(),
        resolve: Default::default(),
        admission: Default::default(),
        user: None,
        metrics: Default::default(),
        public_host: None,
        state_dir: super::DEFAULT_STATE_DIR.into(),
        timeouts: Timeouts {
            connect_ms: 5_000,
            idle_ms: 200_000,
            fin_ms: 1_000,
            header_ms: 5_000,
            decoy_header_ms: super::defaults::decoy_header_ms(),
            decoy_keepalive_ms: super::defaults::decoy_keepalive_ms(),
        },
        listeners: table
            .iter()
            .map(
                |&(name, port, tls, accept_proxy, upstream, send_proxy)| Listener {
                    name: name.into(),
                    bind: std::net::SocketAddr::from(([0, 0, 0, 0], port)),
                    upstream: vec![hp(upstream)],
                    accept_proxy,
                    // The `*-proxied` ports bind 0.0.0.0 like WhatsApp's: only a balancer on
                    // loopback or a private range may send their PROXY headers.
                    trusted_proxies: accept_proxy.then(super::default_trusted_proxies),
                    route: Route::Static,
                    send_proxy,
                    max_connections: 27_495,
                    // No cap on concurrent connections per client: a NAT address with a
                    // thousand users holds a thousand chat connections.
                    max_connections_per_client: 0,
                    new_connections_per_second_per_client: if tls {
                        WHATSAPP_TLS_NEW_PER_SECOND
                    } else {
                        0
                    },
                    decoy: if accept_proxy {
                        Decoy::Off
                    } else {
                        Decoy::Builtin
                    },
                    source_addresses: Vec::new(),
                    fallback: Vec::new(),
                    // check inter 60s fastinter 1s downinter 3s rise 2 fall 3
                    health: Some(HealthSettings::default()),
                    tls: tls.then(TlsSettings::default),
                },
            )
            .collect(),
    }
}

/// Signal-TLS-Proxy's two nginx tiers in one listener: port 443 terminates TLS (a generated
/// certificate unless `cert`/`key` point at Let's Encrypt's files; the outer SNI is not
/// checked), then the inner ClientHello's server name must be one of [`SIGNAL_HOSTS`] and picks
/// that host on 443. Timeouts are nginx's defaults: 30 s to read the ClientHello (preread), 60 s
/// to connect, 10 min idle (nginx has no separate half-close timeout, so after-FIN is 10 min
/// too). Port 80 (ACME challenges, 404 otherwise) is certbot's business and not part of this
/// preset.
fn signal() -> Config {
    Config {
        workers: 0,
        engine: EngineChoice::Auto,
        max_connections: 27_500,
        resolve_interval_s: 6 * 3600,
        sockmap_queue_limit_mib: super::defaults::sockmap_queue_limit_mib(),
        sockmap_queue_total_mib: super::defaults::sockmap_queue_total_mib(),
        resolve: Default::default(),
        admission: Default::default(),
        user: None,
        metrics: Default::default(),
        public_host: None,
        state_dir: super::DEFAULT_STATE_DIR.into(),
        timeouts: Timeouts {
            connect_ms: 60_000,
            idle_ms: 600_000,
            fin_ms: 600_000,
            header_ms: 30_000,
            decoy_header_ms: super::defaults::decoy_header_ms(),
            decoy_keepalive_ms: super::defaults::decoy_keepalive_ms(),
        },
        listeners: vec![Listener {
            name: "signal-tls".into(),
            bind: std::net::SocketAddr::from(([0, 0, 0, 0], 443)),
            upstream: SIGNAL_HOSTS
                .iter()
                .map(|h| hp(&format!("{h}:443")))
                .collect(),
            accept_proxy: false,
            trusted_proxies: None,
            route: Route::Sni,
            send_proxy: SendProxy::None,
            max_connections: 0,
            max_connections_per_client: 0,
            new_connections_per_second_per_client: SIGNAL_TLS_NEW_PER_SECOND,
            decoy: Decoy::Builtin,
            source_addresses: Vec::new(),
            fallback: Vec::new(),
            health: None,
            tls: Some(TlsSettings {
                // Signal-TLS-Proxy's nginx: `ssl_session_tickets off`.
                session_tickets: false,
                ..TlsSettings::default()
            }),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whatsapp_preset_matches_the_haproxy_config() {
        let c = Preset::Whatsapp.config();
        c.validate().unwrap();
        let ports: Vec<u16> = c.listeners.iter().map(|l| l.bind.port()).collect();
        assert_eq!(ports, [80, 8080, 443, 8443, 5222, 8222, 587, 7777]);
        let tls: Vec<u16> = c
            .listeners
            .iter()
            .filter(|l| l.tls.is_some())
            .map(|l| l.bind.port())
            .collect();
        assert_eq!(tls, [443, 8443]);
        let accept: Vec<u16> = c
            .listeners
            .iter()
            .filter(|l| l.accept_proxy)
            .map(|l| l.bind.port())
            .collect();
        assert_eq!(accept, [8080, 8443, 8222]);
        for l in &c.listeners {
            let want = l.accept_proxy.then(crate::config::default_trusted_proxies);
            assert_eq!(l.trusted_proxies, want, "trusted_proxies of {}", l.name);
        }
        for l in &c.listeners {
            let media = matches!(l.bind.port(), 587 | 7777);
            assert_eq!(
                l.send_proxy,
                if media {
                    SendProxy::None
                } else {
                    SendProxy::V1
                }
            );
            assert_eq!(l.max_connections, 27_495);
            // The TLS ports limit new connections per client; the plain ones, like HAProxy's
            // file, do not.
            let tls = l.tls.is_some();
            assert_eq!(
                l.new_connections_per_second_per_client,
                if tls { WHATSAPP_TLS_NEW_PER_SECOND } else { 0 },
                "{}",
                l.name
            );
            assert_eq!(l.max_connections_per_client, 0, "{}", l.name);
            if let Some(t) = &l.tls {
                assert!(t.session_tickets, "HAProxy's TLS binds keep tickets on");
                assert_eq!(t.generated_key(), crate::config::KeyKind::EcdsaP256);
            }
        }
        assert_eq!(c.max_connections, 27_500);
        assert_eq!(
            (c.timeouts.connect_ms, c.timeouts.idle_ms, c.timeouts.fin_ms),
            (5_000, 200_000, 1_000)
        );
    }

    #[test]
    fn preset_prints_as_toml_that_parses_back() {
        for p in [Preset::Whatsapp, Preset::Signal] {
            let c = p.config();
            assert_eq!(Config::from_toml(&c.to_toml(), "printed").unwrap(), c);
        }
    }

    #[test]
    fn signal_preset_with_a_domain_gets_its_certificate_by_acme() {
        let c = Preset::Signal
            .config_for_domain("relay.example.org", Some("ops@example.org"))
            .unwrap();
        c.validate().unwrap();
        let tls = c.listeners[0].tls.as_ref().unwrap();
        let acme = tls.acme.as_ref().expect("acme with a domain");
        assert_eq!(acme.domains, ["relay.example.org"]);
        assert_eq!(acme.email.as_deref(), Some("ops@example.org"));
        assert_eq!(acme.directory, crate::config::LETS_ENCRYPT);
        assert!(tls.cert.is_none() && !tls.session_tickets, "{tls:?}");
        assert_eq!(c.public_host.as_deref(), Some("relay.example.org"));
        // Everything else is the preset's.
        let mut plain = c.clone();
        plain.listeners[0].tls.as_mut().unwrap().acme = None;
        plain.public_host = None;
        assert_eq!(plain.to_toml(), Preset::Signal.config().to_toml());
        assert!(
            Preset::Signal.config().listeners[0]
                .tls
                .as_ref()
                .unwrap()
                .acme
                .is_none()
        );
        // A name the CA cannot validate is refused by the usual check; WhatsApp refuses it.
        let bad = Preset::Signal
            .config_for_domain("*.example.org", None)
            .unwrap();
        assert!(bad.validate().is_err());
        let e = Preset::Whatsapp
            .config_for_domain("relay.example.org", None)
            .unwrap_err();
        assert!(e.contains("Signal"), "{e}");
    }

    #[test]
    fn signal_preset_routes_by_inner_sni_to_the_thirteen_hosts() {
        let c = Preset::Signal.config();
        c.validate().unwrap();
        let l = &c.listeners[0];
        assert_eq!(
            (l.bind.port(), l.route, l.tls.is_some()),
            (443, Route::Sni, true)
        );
        assert_eq!(l.upstream.len(), 13);
        let t = l.tls.as_ref().unwrap();
        assert!(!t.session_tickets, "nginx's ssl_session_tickets off");
        assert_eq!(t.generated_key(), crate::config::KeyKind::EcdsaP256);
        assert_eq!(
            l.new_connections_per_second_per_client,
            SIGNAL_TLS_NEW_PER_SECOND
        );
        assert!(
            l.upstream
                .iter()
                .all(|u| u.port == 443 && u.host.ends_with(".signal.org"))
        );
        assert_eq!(
            (
                c.timeouts.header_ms,
                c.timeouts.connect_ms,
                c.timeouts.idle_ms
            ),
            (30_000, 60_000, 600_000)
        );
    }
}
