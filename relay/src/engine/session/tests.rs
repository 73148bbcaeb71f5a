//! The session's transitions, one test per story, with no socket and no sleep: a [`World`] is
//! the worker as the session sees it.

use std::sync::Arc;

use super::*;
use crate::config::Config;

/// A worker as the session sees it: the configuration, each entry's addresses, a decoy,
/// what was counted, and a clock the test moves.
struct World {
    config: Config,
    /// `addrs[entry]`: the addresses of listener 0's upstream entry.
    addrs: Vec<Vec<SocketAddr>>,
    decoy: Option<SocketAddr>,
    decoy_https: Option<SocketAddr>,
    refused: bool,
    counted: Vec<Counter>,
    now: u64,
}

impl Env for World {
    fn listener(&self, l: usize) -> &Listener {
        &self.config.listeners[l]
    }
    fn upstream(
        &self,
        _: usize,
        entry: Option<usize>,
        start: usize,
        attempt: usize,
    ) -> Option<SocketAddr> {
        let all: Vec<SocketAddr> = match entry {
            Some(e) => self.addrs.get(e).cloned().unwrap_or_default(),
            None => self.addrs.concat(),
        };
        (attempt < all.len()).then(|| all[(start + attempt) % all.len()])
    }
    fn decoy(&self, _: usize, plain_on_tls: bool) -> Option<SocketAddr> {
        if plain_on_tls {
            self.decoy_https.or(self.decoy)
        } else {
            self.decoy
        }
    }
    fn dest_refused(&self, _: usize, _: Option<usize>) -> bool {
        self.refused
    }
    fn count(&mut self, c: Counter) {
        self.counted.push(c);
    }
    fn now_ms(&self) -> u64 {
        self.now
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], port))
}

/// Listener 0 of `[[listen]]` written with these extra lines, entries A (:1, :2) and B (:3).
fn world(extra: &str) -> World {
    let text = format!(
        "[[listen]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n\
         upstream = [\"a.example:1\", \"b.example:3\"]\n{extra}\n"
    );
    World {
        config: Config::from_toml(&text, "t").unwrap(),
        addrs: vec![vec![addr(1), addr(2)], vec![addr(3)]],
        decoy: Some(addr(80)),
        decoy_https: Some(addr(443)),
        refused: false,
        counted: Vec::new(),
        now: 1000,
    }
}

fn expired(s: &Session, t: &Timeouts, now: u64) -> bool {
    s.deadline(t).is_some_and(|d| now >= d)
}

fn start(w: &mut World) -> (Session, Step) {
    let mut s = Session::new(0, 0, ConnectTimer::Session, w.now);
    let step = s.begin(w);
    (s, step)
}

fn hello(name: &str) -> Vec<u8> {
    use rustls::pki_types::ServerName;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    client.write_tls(&mut out).unwrap();
    out
}

#[test]
fn a_plain_port_connects_at_once_and_fails_over_address_by_address() {
    let mut w = world("");
    let (mut s, step) = start(&mut w);
    assert_eq!(step, Step::Connect(addr(1)));
    assert_eq!(s.phase(), Phase::Connecting);
    // Refused, unreachable, EINPROGRESS that then failed: each is one failed attempt.
    assert_eq!(s.connect_failed(&mut w), Step::Connect(addr(2)));
    assert_eq!(s.connect_failed(&mut w), Step::Connect(addr(3)));
    assert_eq!(s.connect_failed(&mut w), RESET);
    assert_eq!(w.counted, [Counter::UpstreamUnreachable]);
    assert!(s.is_closing());
    // Nothing moves a closing session, and nothing is counted twice.
    assert_eq!(s.connect_failed(&mut w), Step::Wait);
    assert_eq!(s.failed(&mut w, 0, libc::ECONNRESET, true), Step::Wait);
    assert_eq!(w.counted.len(), 1);
}

#[test]
fn the_round_robin_start_is_kept_across_attempts() {
    let mut w = world("");
    let mut s = Session::new(0, 2, ConnectTimer::Session, w.now);
    assert_eq!(s.begin(&mut w), Step::Connect(addr(3)));
    assert_eq!(s.connect_failed(&mut w), Step::Connect(addr(1)));
    assert_eq!(s.connected(&mut w), Step::Relay(SendProxy::None));
}

#[test]
fn a_destination_the_allowlist_refused_is_counted_as_refused() {
    let mut w = world("");
    w.addrs = vec![vec![], vec![]];
    w.refused = true;
    let (s, step) = start(&mut w);
    assert_eq!(step, RESET);
    assert!(s.is_closing());
    assert_eq!(w.counted, [Counter::RefusedDest]);
}

#[test]
fn failover_across_a_reload_uses_the_addresses_in_force() {
    let mut w = world("");
    let (mut s, step) = start(&mut w);
    assert_eq!(step, Step::Connect(addr(1)));
    // A reload replaced the upstreams while the first attempt was in flight.
    w.addrs = vec![vec![addr(7), addr(8), addr(9)]];
    assert_eq!(s.connect_failed(&mut w), Step::Connect(addr(8)));
    assert_eq!(s.connect_failed(&mut w), Step::Connect(addr(9)));
    assert_eq!(s.connect_failed(&mut w), RESET);
}

#[test]
fn the_proxy_header_comes_first_and_a_bad_one_is_reset() {
    let mut w = world("accept_proxy = true\nsend_proxy = \"v2\"");
    let (mut s, step) = start(&mut w);
    assert_eq!((step, s.phase()), (Step::ReadHeader, Phase::Header));
    // A connect result cannot arrive before a connect: it changes nothing.
    assert_eq!(s.connected(&mut w), Step::Wait);
    assert_eq!(s.header(&mut w, Header::Admitted), Step::Connect(addr(1)));
    assert_eq!(s.connected(&mut w), Step::Relay(SendProxy::V2));

    let (mut s, _) = start(&mut w);
    assert_eq!(s.header(&mut w, Header::Bad), RESET);
    assert_eq!(w.counted, [Counter::RefusedBadHeader]);
    let (mut s, _) = start(&mut w);
    assert_eq!(s.header(&mut w, Header::Refused), RESET);
    assert_eq!(
        w.counted,
        [Counter::RefusedBadHeader],
        "admission counts its own"
    );
}

#[test]
fn a_header_that_trickles_in_does_not_renew_its_time() {
    let mut w = world("accept_proxy = true");
    let t = w.config.timeouts;
    let (mut s, _) = start(&mut w);
    s.touch(w.now + 1);
    assert_eq!(s.deadline(&t), Some(1000 + u64::from(t.header_ms)));
    assert!(!expired(&s, &t, 1000 + u64::from(t.header_ms) - 1));
    assert!(expired(&s, &t, 1000 + u64::from(t.header_ms)));
    assert_eq!(s.expire(&mut w), RESET);
    assert_eq!(w.counted, [Counter::RefusedBadHeader]);
}

#[test]
fn sni_routing_picks_the_entry_and_refuses_an_unknown_name() {
    let mut w = world("route = \"sni\"");
    let (mut s, step) = start(&mut w);
    assert_eq!((step, s.phase()), (Step::Sniff, Phase::Sni));
    let h = hello("b.example");
    // Half a ClientHello: wait for the rest.
    assert_eq!(s.first_bytes(&mut w, &h[..40], Source::Open), Step::Sniff);
    assert_eq!(
        s.first_bytes(&mut w, &h, Source::Open),
        Step::Connect(addr(3))
    );
    // Entry B has one address: no failover into entry A.
    assert_eq!(s.connect_failed(&mut w), RESET);
    assert_eq!(w.counted, [Counter::UpstreamUnreachable]);

    for (bytes, source) in [
        (hello("c.example"), Source::Open),
        (b"GET / HTTP/1.1\r\n".to_vec(), Source::Open),
        (h[..40].to_vec(), Source::Ended),
    ] {
        let mut w = world("route = \"sni\"");
        let (mut s, _) = start(&mut w);
        assert_eq!(s.first_bytes(&mut w, &bytes, source), RESET);
        assert_eq!(w.counted, [Counter::RefusedBadSni]);
    }
}

#[test]
fn with_a_decoy_probes_go_to_it_and_clients_to_their_upstream() {
    let mut w = world("route = \"sni\"\ndecoy = \"builtin\"");
    let (mut s, _) = start(&mut w);
    assert_eq!(
        s.first_bytes(&mut w, b"GET / HTTP/1.1\r\n", Source::Open),
        Step::Connect(addr(80))
    );
    assert!(s.is_decoy());
    // The decoy gets no PROXY header, and is tried once.
    let mut again = s.clone();
    assert_eq!(s.connected(&mut w), Step::Relay(SendProxy::None));
    assert_eq!(again.connect_failed(&mut w), RESET);
    assert_eq!(w.counted, [Counter::Decoyed, Counter::UpstreamUnreachable]);

    // A static port with a decoy: an HTTP method goes to it, anything else is relayed.
    let mut w = world("decoy = \"builtin\"\nsend_proxy = \"v1\"");
    let (mut s, step) = start(&mut w);
    assert_eq!(step, Step::Sniff);
    assert_eq!(s.first_bytes(&mut w, b"GE", Source::Open), Step::Sniff);
    assert_eq!(
        s.first_bytes(&mut w, b"\x16\x03\x01", Source::Open),
        Step::Connect(addr(1))
    );
    assert_eq!(s.connected(&mut w), Step::Relay(SendProxy::V1));
    // A client that closes without a byte is let go quietly.
    let (mut s, _) = start(&mut w);
    assert_eq!(s.first_bytes(&mut w, b"", Source::Ended), FIN);
}

#[test]
fn a_tls_port_with_a_decoy_looks_at_the_first_byte_before_the_handshake() {
    let mut w = world("decoy = \"builtin\"\n[listen.tls]");
    let (mut s, step) = start(&mut w);
    assert_eq!((step, s.phase()), (Step::Sniff, Phase::Sni));
    assert_eq!(s.peeked(&mut w, Ok(None)), Step::Sniff);
    assert_eq!(s.peeked(&mut w, Ok(Some(true))), Step::StartTls);
    assert_eq!(s.phase(), Phase::Handshake);
    // Plain HTTP to a TLS port: the decoy's https twin.
    let (mut s, _) = start(&mut w);
    assert_eq!(s.peeked(&mut w, Ok(Some(false))), Step::Connect(addr(443)));
    let (mut s, _) = start(&mut w);
    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
    assert_eq!(s.peeked(&mut w, Err(eof)), FIN);
}

#[test]
fn after_the_handshake_the_plaintext_decides() {
    let mut w = world("route = \"sni\"\ndecoy = \"builtin\"\n[listen.tls]");
    let (mut s, _) = start(&mut w);
    assert_eq!(s.peeked(&mut w, Ok(Some(true))), Step::StartTls);
    let inner = hello("a.example");
    assert_eq!(
        s.handshake_done(&mut w, true, &inner[..30], false),
        Step::Wait
    );
    assert_eq!(s.phase(), Phase::Sni);
    assert_eq!(s.plaintext(&mut w, &inner, false), Step::Connect(addr(1)));
    assert_eq!(
        w.counted,
        [Counter::TlsHandshakes, Counter::TlsResumed],
        "counted once each"
    );
    // Inside TLS, a probe goes to the decoy's plain-HTTP side (the TLS is terminated).
    let (mut s, _) = start(&mut w);
    s.peeked(&mut w, Ok(Some(true)));
    assert_eq!(
        s.handshake_done(&mut w, false, b"GET / HTTP/1.1\r\n", false),
        Step::Connect(addr(80))
    );
    // The client sent FIN before the ClientHello was complete: nothing more can decide.
    let (mut s, _) = start(&mut w);
    s.peeked(&mut w, Ok(Some(true)));
    s.handshake_done(&mut w, false, &inner[..30], false);
    assert_eq!(s.plaintext(&mut w, &inner[..30], true), FIN);
    // Without a decoy, a name not served is refused, with FIN after the alert.
    let mut w = world("route = \"sni\"\n[listen.tls]");
    let (mut s, step) = start(&mut w);
    assert_eq!(step, Step::StartTls);
    assert_eq!(
        s.handshake_done(&mut w, false, &hello("z.example"), false),
        FIN
    );
    assert_eq!(w.counted, [Counter::TlsHandshakes, Counter::RefusedBadSni]);
}

#[test]
fn a_static_tls_port_connects_once_the_handshake_is_done() {
    let mut w = world("[listen.tls]");
    let (mut s, step) = start(&mut w);
    assert_eq!(step, Step::StartTls);
    // Bytes the client sent before the upstream connected wait in the session's buffer; the
    // session connects at once, whatever they are.
    assert_eq!(
        s.handshake_done(&mut w, false, b"early", true),
        Step::Connect(addr(1))
    );
    let (mut s, _) = start(&mut w);
    assert_eq!(s.tls_refused(&mut w), RESET);
    assert_eq!(s.tls_failed(&mut w, false), Step::Wait);
    let (mut s, _) = start(&mut w);
    assert_eq!(s.tls_failed(&mut w, true), FIN);
    assert_eq!(
        w.counted,
        [Counter::TlsHandshakes, Counter::RefusedBadTls],
        "an answered TLS-ALPN-01 validation is no bad client"
    );
}

#[test]
fn half_close_runs_on_the_fin_timeout_and_both_fins_end_it() {
    let mut w = world("");
    let t = w.config.timeouts;
    let (mut s, _) = start(&mut w);
    w.now = 2000;
    s.connected(&mut w);
    assert_eq!(s.deadline(&t), Some(2000 + u64::from(t.idle_ms)));
    s.touch(3000);
    assert_eq!(s.deadline(&t), Some(3000 + u64::from(t.idle_ms)));
    assert_eq!(s.finished(TO_UPSTREAM, 4000), Step::Wait);
    assert_eq!(s.done, [true, false]);
    assert_eq!(s.deadline(&t), Some(4000 + u64::from(t.fin_ms)));
    // The half-closed connection did not finish in time: reset, counted as idle.
    let mut late = s.clone();
    assert!(expired(&late, &t, 4000 + u64::from(t.fin_ms)));
    assert_eq!(late.expire(&mut w), RESET);
    assert_eq!(w.counted, [Counter::IdleTimeout]);
    // The other direction's FIN: a graceful end.
    assert_eq!(s.finished(TO_CLIENT, 4500), FIN);
    assert_eq!(s.deadline(&t), None);
}

#[test]
fn a_reset_is_counted_on_the_side_whose_socket_failed() {
    let cases = [
        (TO_UPSTREAM, true, libc::ECONNRESET, Counter::ClientReset),
        (TO_UPSTREAM, false, libc::EPIPE, Counter::UpstreamReset),
        (TO_CLIENT, true, libc::ECONNRESET, Counter::UpstreamReset),
        // A reset overtaking a write: the write to the client fails.
        (TO_CLIENT, false, libc::ECONNRESET, Counter::ClientReset),
        (TO_CLIENT, true, libc::ETIMEDOUT, Counter::RelayErrors),
    ];
    for (d, at_source, errno, counter) in cases {
        let mut w = world("");
        let (mut s, _) = start(&mut w);
        s.connected(&mut w);
        assert_eq!(s.failed(&mut w, d, errno, at_source), RESET);
        assert_eq!(w.counted, [counter], "{d} {at_source} {errno}");
    }
}

#[test]
fn connect_timeouts_fail_over_or_back_stop_by_who_times_them() {
    let mut w = world("");
    let t = w.config.timeouts;
    let connect = u64::from(t.connect_ms);
    let (mut s, _) = start(&mut w);
    w.now += connect;
    assert!(expired(&s, &t, w.now));
    assert_eq!(s.expire(&mut w), Step::Connect(addr(2)));
    assert!(!expired(&s, &t, w.now), "each attempt has its own time");
    assert!(w.counted.is_empty());

    // The engine times each attempt (LINK_TIMEOUT): the session's limit is a backstop.
    let mut s = Session::new(0, 0, ConnectTimer::Engine, w.now);
    s.begin(&mut w);
    assert!(!expired(&s, &t, w.now + connect));
    assert!(expired(&s, &t, w.now + 2 * connect + 1000));
    assert_eq!(s.expire(&mut w), RESET);
    assert_eq!(w.counted, [Counter::UpstreamUnreachable]);
}

#[test]
fn a_silent_client_on_a_decoy_port_is_let_go_quietly() {
    let mut w = world("decoy = \"builtin\"");
    let (mut s, _) = start(&mut w);
    assert_eq!(
        s.expire(&mut w),
        Step::Close(Close {
            reset: false,
            close_notify: true
        })
    );
    assert_eq!(w.counted, [Counter::RefusedBadSni]);
    // Without a decoy, the same silence is reset.
    let mut w = world("route = \"sni\"");
    let (mut s, _) = start(&mut w);
    assert_eq!(s.expire(&mut w), RESET);
}
