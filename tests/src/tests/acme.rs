//! Certificates from an ACME CA, end to end against Pebble (Let's Encrypt's test CA, the Debian
//! package `pebble`): Pebble validates TLS-ALPN-01 by really connecting to the relay's TLS port,
//! for a name that `pebble-challtestsrv` (its DNS server) resolves to the relay's address.
//! `issues_reuses_and_renews`: the relay gets a certificate chained to Pebble's root for the
//! name, stores it (and the account) 0600 under `state_dir`; restarted, it serves the stored
//! certificate with no new order (Pebble's log counts issuances); with `renew_before_days`
//! above Pebble's validity it renews at each check, a connection opened before a renewal keeps
//! relaying bytes across it, and new handshakes see the new certificate.
//! `unreachable_directory_keeps_the_fallback`: a directory nobody answers at gives an error
//! line and `sluice_acme_renewals_total{result="error"}`, while the TLS port serves the
//! generated certificate.
//! `http01_on_the_plain_port_80_decoy`: with `challenge = "http-01"` Pebble validates by
//! `GET /.well-known/acme-challenge/TOKEN` on port 80 of the relay's address, where a plain
//! listener's builtin decoy answers the pending token; the certificate is issued, and the
//! decoy serves its page as before. Without such a listener `check-config` refuses the key.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use sluice_tests::peers::{KeyKind, Pki};
use sluice_tests::servers::EchoServer;
use sluice_tests::{Host, Sluice, TempDir, init, require_program, require_root, wait_until};

/// The name the relay gets its certificate for (resolved by Pebble's DNS server only).
const DOMAIN: &str = "relay.acme.test";

/// Pebble's certificate validity here (its `certificateValidityPeriod`): 10 days.
const VALIDITY_DAYS: u32 = 10;

/// How long an issuance may take before the test gives up (measured: about a second).
const ISSUE_WAIT: Duration = Duration::from_secs(60);

/// A running Pebble with its DNS server; both stopped (by pid) on drop.
struct Pebble {
    pebble: Child,
    dns: Child,
    /// The directory URL and the PEM of the HTTPS certificate it serves.
    directory: String,
    https_ca: PathBuf,
    _pki: Pki,
    management: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pebble {
    /// Pebble validating on `tls_port` (TLS-ALPN-01) or `http_port` (HTTP-01) of whatever
    /// `DOMAIN` resolves to: `relay_ip`.
    fn start(relay_ip: std::net::Ipv4Addr, tls_port: u16, http_port: u16) -> Pebble {
        let dir = TempDir::new();
        let host = Host::new();
        let (api, management, dns) = (host.addr(), host.addr(), host.addr());
        // Pebble's own HTTPS certificate, for its address, from a CA the relay trusts.
        let pki = Pki::new();
        let ip = format!("IP:{}", host.ip);
        let leaf = pki.leaf("pebble", &[ip.as_str()], KeyKind::Ec);
        let (cert, key) = (leaf.cert.clone(), leaf.key.clone());
        let config = dir.join("pebble.json");
        std::fs::write(
            &config,
            serde_json::json!({"pebble": {
                "listenAddress": api.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": cert,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": u64::from(VALIDITY_DAYS) * 86_400,
            }})
            .to_string(),
        )
        .unwrap();
        let dns_child = Command::new("pebble-challtestsrv")
            .arg("-dns01")
            .arg(dns.to_string())
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .arg("-management")
            .arg(host.addr().to_string())
            .arg("-defaultIPv4")
            .arg(relay_ip.to_string())
            .args(["-defaultIPv6", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv starts");
        let log = dir.join("pebble.log");
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .arg("-dnsserver")
            .arg(dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            // Every order validated anew (Pebble reuses half of the valid authorizations by
            // default): each renewal goes through the workers' TLS-ALPN-01 answer.
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble starts");
        let p = Pebble {
            pebble,
            dns: dns_child,
            directory: format!("https://{api}/dir"),
            https_ca: pki.ca(),
            _pki: pki,
            management,
            log,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(20), || TcpStream::connect(api).is_ok()
                && TcpStream::connect(management).is_ok()),
            "pebble did not listen on {api}"
        );
        p
    }

    /// Pebble's issuing root (management interface, /roots/0).
    fn root(&self) -> CertificateDer<'static> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-k"])
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "curl /roots/0: {out:?}");
        CertificateDer::from_pem_slice(&out.stdout).expect("a PEM root")
    }

    /// Certificates Pebble issued so far (its log says each).
    fn issued(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Issued certificate serial")
            .count()
    }
}

/// The relay's config: one TLS listener relaying to `upstream`, its certificate from Pebble.
fn config(
    bind: SocketAddr,
    upstream: SocketAddr,
    state: &Path,
    pebble_dir: &str,
    pebble_ca: &Path,
    renew_before_days: u32,
) -> String {
    format!(
        "state_dir = {state:?}\n\
         [[listen]]\nname = \"tls\"\nbind = \"{bind}\"\nupstream = [\"{upstream}\"]\n\
         [listen.tls]\n\
         acme = {{ domains = [\"{DOMAIN}\"], email = \"ops@acme.test\", directory = \"{pebble_dir}\", \
         directory_ca = {pebble_ca:?}, renew_before_days = {renew_before_days} }}\n"
    )
}

/// A TLS session to `addr` for `DOMAIN`, verified against `root` (None: accept anything).
fn tls_connect(
    addr: SocketAddr,
    root: Option<&CertificateDer<'static>>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match root {
        Some(root) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(root.clone()).unwrap();
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth(),
    };
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(DOMAIN.to_owned()).unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(s)
}

/// The leaf a TLS session to `addr` is served, if the handshake works with `root`.
fn leaf(addr: SocketAddr, root: Option<&CertificateDer<'static>>) -> Option<Vec<u8>> {
    let s = tls_connect(addr, root).ok()?;
    Some(s.conn.peer_certificates()?.first()?.to_vec())
}

/// Sends `msg` over `s` and reads the echo back.
fn echo(s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    s.flush().unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).unwrap();
    back
}

#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `GET /metrics` from the relay's metrics listener.
fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn issues_reuses_and_renews() {
    init();
    if !require_program("pebble") || !require_program("pebble-challtestsrv") {
        return;
    }
    let host = Host::new();
    let relay = host.addr();
    let echo_server = EchoServer::start(Host::new().addr());
    let pebble = Pebble::start(host.ip, relay.port(), 1);
    let state = TempDir::new();
    let state_dir = state.join("state");
    let text = |renew: u32| {
        config(
            relay,
            echo_server.addr(),
            &state_dir,
            &pebble.directory,
            &pebble.https_ca,
            renew,
        )
    };

    // First start: the generated fallback, then Pebble's certificate.
    let started = Instant::now();
    let sluice = Sluice::run_config_text(&text(1), vec![relay]).start();
    let root = pebble.root();
    let mut issued_at = None;
    let issued = wait_until(ISSUE_WAIT, || {
        let ok = leaf(relay, Some(&root)).is_some();
        if ok {
            issued_at = Some(started.elapsed());
        }
        ok
    });
    assert!(
        issued,
        "no certificate chained to pebble's root within {ISSUE_WAIT:?}; relay log:\n{}",
        sluice.stderr_log()
    );
    eprintln!(
        "acme: issued {:?} after the relay's start (pebble, TLS-ALPN-01)",
        issued_at.unwrap()
    );
    let first = leaf(relay, Some(&root)).unwrap();
    assert_eq!(pebble.issued(), 1);
    let acme_dir = state_dir.join("acme");
    let files: Vec<_> = std::fs::read_dir(&acme_dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 3, "account, chain and key: {files:?}");
    for f in &files {
        let mode = f.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", f.path().display());
    }
    let (status, log) = sluice.stop();
    assert!(status.success(), "{log}");

    // Restarted: the stored certificate at once, no new order.
    let sluice = Sluice::run_config_text(&text(1), vec![relay]).start();
    assert_eq!(
        leaf(relay, Some(&root)).as_deref(),
        Some(&first[..]),
        "the first handshake after a restart gets the stored certificate"
    );
    // The ACME thread says so once it has decided; it orders nothing before its next check.
    assert!(
        wait_until(ISSUE_WAIT, || sluice
            .stderr_log()
            .contains("acme: using the stored certificate")),
        "the ACME thread did not take the stored certificate; relay log:\n{}",
        sluice.stderr_log()
    );
    assert_eq!(pebble.issued(), 1, "a restart orders nothing");
    let (status, log) = sluice.stop();
    assert!(status.success(), "{log}");

    // renew_before_days above the validity: renewed at start and at each check (2 s here).
    let sluice = Sluice::run_config_text(&text(VALIDITY_DAYS + 20), vec![relay])
        .env("SLUICE_ACME_CHECK_MS", "2000")
        .start();
    assert!(
        wait_until(ISSUE_WAIT, || pebble.issued() >= 2
            && leaf(relay, Some(&root)).is_some_and(|l| l != first)),
        "not renewed at start; relay log:\n{}",
        sluice.stderr_log()
    );
    let mut open = tls_connect(relay, Some(&root)).unwrap();
    let before = open.conn.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(
        echo(&mut open, b"before the renewal"),
        b"before the renewal"
    );
    let n = pebble.issued();
    assert!(
        wait_until(ISSUE_WAIT, || pebble.issued() > n
            && leaf(relay, Some(&root)).is_some_and(|l| l != before)),
        "not renewed at the next check; relay log:\n{}",
        sluice.stderr_log()
    );
    assert_eq!(
        echo(&mut open, b"after the renewal"),
        b"after the renewal",
        "a connection opened before the renewal goes on"
    );
    let (status, log) = sluice.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("acme: the stored certificate is valid") && !log.contains("account created"),
        "renewed at start with the stored account: {log}"
    );
}

#[test]
fn unreachable_directory_keeps_the_fallback() {
    init();
    let host = Host::new();
    let relay = host.addr();
    let metrics_addr = Host::new().addr();
    let echo_server = EchoServer::start(Host::new().addr());
    let state = TempDir::new();
    // Nothing listens there (a port of this test's own address, never bound).
    let nobody = Host::new().addr();
    let ca = state.join("none.pem");
    std::fs::write(&ca, "").unwrap();
    let text = config(
        relay,
        echo_server.addr(),
        &state.join("state"),
        &format!("https://{nobody}/dir"),
        &ca,
        30,
    )
    .replace(&format!(", directory_ca = {ca:?}"), "");
    let sluice = Sluice::run_config_text(&text, vec![relay])
        .metrics(metrics_addr)
        .start();
    assert!(
        wait_until(Duration::from_secs(30), || metric(
            &metrics(metrics_addr),
            "sluice_acme_renewals_total{result=\"error\"}"
        ) >= 1),
        "no acme error counted; relay log:\n{}",
        sluice.stderr_log()
    );
    let log = sluice.stderr_log();
    assert!(
        log.contains("acme: no certificate from") && log.contains("generated fallback"),
        "{log}"
    );
    // The generated certificate still serves, and relays.
    let mut s = tls_connect(relay, None).expect("the fallback certificate serves");
    assert_eq!(echo(&mut s, b"still here"), b"still here");
    let text = metrics(metrics_addr);
    assert!(
        text.contains("sluice_certificate_expiry_timestamp_seconds{listener=\"tls\"}"),
        "{text}"
    );
    let (status, log) = sluice.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn http01_on_the_plain_port_80_decoy() {
    init();
    if !require_root() || !require_program("pebble") || !require_program("pebble-challtestsrv") {
        return;
    }
    let host = Host::new();
    let relay = host.addr();
    // Port 80 of the relay's own test address: where the CA looks for HTTP-01.
    let http = SocketAddr::new(host.ip.into(), 80);
    let echo_server = EchoServer::start(Host::new().addr());
    let pebble = Pebble::start(host.ip, relay.port(), http.port());
    let state = TempDir::new();
    let tls = config(
        relay,
        echo_server.addr(),
        &state.join("state"),
        &pebble.directory,
        &pebble.https_ca,
        1,
    )
    .replace(" }\n", ", challenge = \"http-01\" }\n");
    assert!(tls.contains("challenge = \"http-01\" }"), "{tls}");

    // Refused at load without a plain port-80 listener with a decoy.
    let out = Sluice::check_config(&tls);
    assert!(
        !out.status.success()
            && out
                .stderr
                .contains("`http-01` needs a plain listener on port 80"),
        "{out:?}"
    );

    let text = format!(
        "{tls}[[listen]]\nname = \"http\"\nbind = \"{http}\"\nupstream = [\"{}\"]\n\
         decoy = \"builtin\"\n",
        echo_server.addr()
    );
    let started = Instant::now();
    let sluice = Sluice::run_config_text(&text, vec![relay, http]).start();
    let root = pebble.root();
    let mut issued_at = None;
    let issued = wait_until(ISSUE_WAIT, || {
        let ok = leaf(relay, Some(&root)).is_some();
        if ok {
            issued_at = Some(started.elapsed());
        }
        ok
    });
    assert!(
        issued,
        "no certificate chained to pebble's root within {ISSUE_WAIT:?}; relay log:\n{}",
        sluice.stderr_log()
    );
    eprintln!(
        "acme: issued {:?} after the relay's start (pebble, HTTP-01)",
        issued_at.unwrap()
    );
    assert_eq!(pebble.issued(), 1);
    let log = sluice.stderr_log();
    assert!(
        log.contains(&format!("acme: validating {DOMAIN} by http-01")),
        "{log}"
    );
    // The decoy is still nginx's default site; relayed bytes still go upstream.
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    assert!(
        page.starts_with("HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n")
            && page.contains("Welcome to nginx!"),
        "{page}"
    );
    let mut s = tls_connect(relay, Some(&root)).unwrap();
    assert_eq!(echo(&mut s, b"over http-01"), b"over http-01");
    let (status, log) = sluice.stop();
    assert!(status.success(), "{log}");
}
