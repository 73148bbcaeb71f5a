//! Certificates from an ACME CA (Let's Encrypt) without certbot: one supervisor thread per
//! distinct `[listen.tls] acme` table gets, stores and renews the certificate with
//! `instant-acme`, and hands it to the supervisor's main loop, which sends it to every worker
//! like a changed certificate file (new handshakes use it, open connections keep theirs).
//!
//! Validation is TLS-ALPN-01 (RFC 8737) on the TLS listener itself, so no port 80 is needed:
//! the thread builds each domain's challenge certificate, the supervisor pushes it to the
//! workers ([`crate::wire::ControlMsg::Challenges`]) and waits until every live worker
//! applied it, and only then is the CA told to validate; the challenges are taken back once the
//! order is decided. Workers never talk to the CA (they are unprivileged and sandboxed).
//!
//! HTTP-01 (RFC 8555 section 8.3) is used instead when `challenge = "http-01"` says so, or
//! when the CA offers no TLS-ALPN-01 and the configuration has a plain listener on port 80
//! with a local decoy ([`crate::config::Config::http01_listener`]): the thread offers the
//! tokens to the decoy sites, which run in the supervisor's process like this thread
//! ([`crate::decoy::AcmeTokens`], a map in the process: nothing goes to the workers), before
//! the CA is told to validate, and takes them back once the order is decided.
//!
//! State (`state_dir`/acme, every file mode 0600, the directory 0700): the account's
//! credentials per directory URL, and per certificate (named by its first domain) the chain
//! and key. At start a stored certificate that covers the domains and is not yet due is served
//! at once, with no order; until a certificate exists the listener serves the generated
//! fallback. The thread checks every [`CHECK_INTERVAL`] (and at start) and renews when fewer
//! than `renew_before_days` remain; a failed try is logged, counted
//! (`sluice_acme_renewals_total{result="error"}`) and tried again after [`RETRY_FIRST`],
//! doubling up to [`CHECK_INTERVAL`].
//!
//! API boundary: the thread sends [`AcmeEvent`]s and reads nothing of the supervisor's state
//! but the workers' applied generation; it never touches a socket of the relay.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};

use crate::config::{AcmeChallengeKind, AcmeSettings};
use crate::metrics::{Counter, Shared};
use crate::proto::tls::{AcmeChallenge, PemIdentity};

/// How often a certificate's remaining validity is looked at (certbot's timer: 12 h).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(12 * 3600);

/// Environment variable that sets another check interval in milliseconds (at least 100; tests).
pub const ENV_CHECK_MS: &str = "SLUICE_ACME_CHECK_MS";

/// The wait after a first failed try; it doubles with each failure up to the check interval.
pub const RETRY_FIRST: Duration = Duration::from_secs(60);

/// How long the workers get to apply a pushed challenge before the CA is told to validate.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// How long an order may take to be validated, and to be issued once finalized.
const ORDER_WAIT: Duration = Duration::from_secs(120);

/// What the ACME thread asks of the supervisor's main loop.
#[derive(Debug)]
pub enum AcmeEvent {
    /// Answer these TLS-ALPN-01 challenges on these listeners (empty: stop answering); the
    /// main loop replies with the generation the workers report once they applied it.
    Challenges {
        listeners: Vec<usize>,
        challenges: Vec<AcmeChallenge>,
        applied: mpsc::Sender<u64>,
    },
    /// Serve this certificate on these listeners from now on.
    Certificate {
        listeners: Vec<usize>,
        id: PemIdentity,
    },
}

/// One certificate to keep: its settings and the listeners that serve it.
#[derive(Debug, Clone)]
pub struct Job {
    pub settings: AcmeSettings,
    pub listeners: Vec<usize>,
    /// The first listener's name, for the log.
    pub name: String,
    pub state_dir: PathBuf,
    /// Whether HTTP-01 can be answered: the configuration has a plain port-80 listener with a
    /// local decoy ([`crate::config::Config::http01_listener`]).
    pub http01: bool,
}

/// Why getting a certificate failed; the message names the step.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{step}: {reason}")]
    Step { step: &'static str, reason: String },
}

fn step<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> AcmeError {
    move |e| AcmeError::Step {
        step,
        reason: e.to_string(),
    }
}

/// The check interval: [`ENV_CHECK_MS`] if set, else [`CHECK_INTERVAL`].
pub fn check_interval() -> Duration {
    std::env::var(ENV_CHECK_MS)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(CHECK_INTERVAL, |ms| Duration::from_millis(ms.max(100)))
}

/// The jobs of a configuration: one per distinct `acme` table (listeners with the same one
/// share the certificate, as the WhatsApp preset's 443 and 8443 share theirs).
pub fn jobs(config: &crate::config::Config) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let Some(a) = l.tls.as_ref().and_then(|t| t.acme.as_ref()) else {
            continue;
        };
        match jobs.iter_mut().find(|j| &j.settings == a) {
            Some(j) => j.listeners.push(i),
            None => jobs.push(Job {
                settings: a.clone(),
                listeners: vec![i],
                name: l.name.clone(),
                state_dir: config.state_dir.clone(),
                http01: config.http01_listener().is_some(),
            }),
        }
    }
    jobs
}

/// The directory of ACME files under `state_dir`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("acme")
}

/// Makes `state_dir`/acme (0700) if missing; the ACME thread does it at its start, after the
/// privilege drop (the supervisor made `state_dir` itself before).
pub fn prepare(state_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let d = dir(state_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", d.display())))
}

/// The stored certificate of a job: (chain file, key file).
fn cert_paths(job: &Job) -> (PathBuf, PathBuf) {
    paths_for(&job.state_dir, &job.settings)
}

fn paths_for(state_dir: &Path, settings: &AcmeSettings) -> (PathBuf, PathBuf) {
    let name = settings.domains[0].to_ascii_lowercase();
    let d = dir(state_dir);
    (
        d.join(format!("{name}.crt.pem")),
        d.join(format!("{name}.key.pem")),
    )
}

/// The account file for a directory URL (one account per CA).
fn account_path(job: &Job) -> PathBuf {
    let host: String = job
        .settings
        .directory
        .trim_start_matches("https://")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir(&job.state_dir).join(format!("account-{host}.json"))
}

/// Writes `data` to `path` with mode 0600, through a temporary file renamed over it, so a
/// crash leaves the old file or the new one.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The leaf's notAfter (seconds since the epoch) and whether its SANs cover `domains`.
pub fn leaf_facts(chain_pem: &str, domains: &[String]) -> Option<(u64, bool)> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|e| {
            e.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let covers = domains
        .iter()
        .all(|d| sans.contains(&d.to_ascii_lowercase()));
    Some((not_after, covers))
}

/// The leaf's notAfter, for the expiry gauge.
pub fn not_after(chain_pem: &str) -> Option<u64> {
    leaf_facts(chain_pem, &[]).map(|(t, _)| t)
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The stored certificate for `settings` if there is one that loads and covers the domains:
/// what a listener serves at start, before its ACME thread runs.
pub fn stored_for(state_dir: &Path, settings: &AcmeSettings, name: &str) -> Option<PemIdentity> {
    stored(&Job {
        settings: settings.clone(),
        listeners: Vec::new(),
        name: name.to_owned(),
        state_dir: state_dir.to_owned(),
        http01: false,
    })
    .map(|(id, _)| id)
}

/// The stored certificate of `job` if it loads, works and covers its domains, with its
/// notAfter.
fn stored(job: &Job) -> Option<(PemIdentity, u64)> {
    let (crt, key) = cert_paths(job);
    if !crt.exists() {
        return None;
    }
    match PemIdentity::from_files(&crt, &key) {
        Ok(id) => match leaf_facts(&id.chain_pem, &job.settings.domains) {
            Some((t, true)) => Some((id, t)),
            Some((_, false)) => {
                tracing::info!(listener = %job.name, "the stored certificate does not cover every domain: ordering a new one");
                None
            }
            None => {
                tracing::warn!(listener = %job.name, "cannot read the stored certificate's validity: ordering a new one");
                None
            }
        },
        Err(e) => {
            tracing::warn!(listener = %job.name, "the stored certificate does not load ({e}): ordering a new one");
            None
        }
    }
}

/// Starts the thread of one job. `applied_wait(generation)` blocks until the live workers
/// report that generation applied (at most a few seconds).
pub fn spawn(
    job: Job,
    events: Box<dyn Fn(AcmeEvent) -> bool + Send>,
    shared: Arc<Shared>,
    applied_wait: Box<dyn Fn(u64, Duration) + Send>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("acme".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(listener = %job.name, "acme: cannot start its runtime: {e}; the certificate will not be renewed");
                    return;
                }
            };
            rt.block_on(run(job, events, shared, applied_wait));
        })
        .map(drop)
}

async fn run(
    job: Job,
    events: Box<dyn Fn(AcmeEvent) -> bool + Send>,
    shared: Arc<Shared>,
    applied_wait: Box<dyn Fn(u64, Duration) + Send>,
) {
    // After the privilege drop: the directory belongs to the user the daemon runs as.
    if let Err(e) = prepare(&job.state_dir) {
        tracing::error!(listener = %job.name, "acme: {e}; certificates cannot be stored");
    }
    let interval = check_interval();
    let renew_before = u64::from(job.settings.renew_before_days) * 86_400;
    let mut current: Option<u64> = None;
    let mut failures = 0u32;
    let mut first = true;
    loop {
        let have = stored(&job);
        if let Some((id, t)) = &have
            && current != Some(*t)
        {
            // At start, or a certificate another process stored: serve it.
            current = Some(*t);
            if !events(AcmeEvent::Certificate {
                listeners: job.listeners.clone(),
                id: id.clone(),
            }) {
                return;
            }
        }
        let due = match &have {
            Some((_, t)) => t.saturating_sub(now_s()) < renew_before,
            None => true,
        };
        if first && let Some((_, t)) = &have {
            // Said once the decision is taken: nothing is ordered before the next check.
            let days = t.saturating_sub(now_s()) / 86_400;
            if due {
                tracing::info!(listener = %job.name, "acme: the stored certificate is valid {days} more days, fewer than renew_before_days ({}): renewing it", job.settings.renew_before_days);
            } else {
                tracing::info!(listener = %job.name, "acme: using the stored certificate (valid {days} more days; renewed when fewer than {} remain)", job.settings.renew_before_days);
            }
        }
        // A new certificate that is due at once (renew_before_days above the CA's validity)
        // is renewed at each check, never in a loop: every order is followed by a wait.
        let wait = if due {
            let started = std::time::Instant::now();
            match issue(&job, &events, &applied_wait).await {
                Ok(id) => {
                    let t = not_after(&id.chain_pem).unwrap_or(0);
                    tracing::info!(listener = %job.name, "acme: certificate issued for {} in {} ms (valid {} more days); new connections use it", job.settings.domains.join(", "), started.elapsed().as_millis(), t.saturating_sub(now_s()) / 86_400);
                    shared.supervisor().inc(Counter::AcmeRenewalsOk);
                    if t.saturating_sub(now_s()) < renew_before {
                        tracing::warn!(listener = %job.name, "acme: renew_before_days ({}) is longer than the CA's certificates last: it is renewed at every check", job.settings.renew_before_days);
                    }
                    failures = 0;
                    current = Some(t);
                    if !events(AcmeEvent::Certificate {
                        listeners: job.listeners.clone(),
                        id,
                    }) {
                        return;
                    }
                    interval
                }
                Err(e) => {
                    shared.supervisor().inc(Counter::AcmeRenewalsError);
                    let wait = RETRY_FIRST
                        .saturating_mul(1 << failures.min(16))
                        .min(interval.max(RETRY_FIRST));
                    failures += 1;
                    tracing::error!(listener = %job.name, "acme: no certificate from {}: {e}; {}; next try in {} s", job.settings.directory, if current.is_some() { "the current one is kept" } else { "the generated fallback is served" }, wait.as_secs());
                    wait
                }
            }
        } else {
            interval
        };
        first = false;
        tokio::time::sleep(wait).await;
    }
}

/// One order, from account to stored certificate.
async fn issue(
    job: &Job,
    events: &(dyn Fn(AcmeEvent) -> bool + Send),
    applied_wait: &(dyn Fn(u64, Duration) + Send),
) -> Result<PemIdentity, AcmeError> {
    let s = &job.settings;
    let builder = || match &s.directory_ca {
        Some(ca) => Account::builder_with_root(ca).map_err(step("trusting directory_ca")),
        None => Account::builder().map_err(step("the HTTPS client")),
    };
    let account_file = account_path(job);
    let account = match std::fs::read(&account_file) {
        Ok(bytes) => {
            let creds: AccountCredentials = serde_json::from_slice(&bytes).map_err(step(
                "reading the stored account (delete the file to make a new one)",
            ))?;
            builder()?
                .from_credentials(creds)
                .await
                .map_err(step("reaching the directory"))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let contact: Vec<String> = s.email.iter().map(|e| format!("mailto:{e}")).collect();
            let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
            let (account, creds) = builder()?
                .create(
                    &NewAccount {
                        contact: &contact,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    s.directory.clone(),
                    None,
                )
                .await
                .map_err(step("creating the account"))?;
            let json = serde_json::to_vec(&creds).map_err(step("storing the account"))?;
            write_private(&account_file, &json).map_err(step("storing the account"))?;
            tracing::info!(listener = %job.name, "acme: account created at {}", s.directory);
            account
        }
        Err(e) => return Err(step("reading the stored account")(e)),
    };
    let ids: Vec<Identifier> = s
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(step("ordering"))?;

    // The challenge certificates (or HTTP-01 tokens) first; the CA is told to look only once
    // they are answered.
    let mut challenges = Vec::new();
    let mut tokens = Vec::new();
    let mut chosen = Vec::new();
    {
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(step("reading the authorizations"))?;
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(step("authorizing")(format!(
                        "an authorization is {other:?}"
                    )));
                }
            }
            let offered: Vec<ChallengeType> =
                a.challenges.iter().map(|c| c.r#type.clone()).collect();
            let kind = choose(job, &offered).map_err(step("authorizing"))?;
            let ch = a
                .challenge(kind.clone())
                .ok_or_else(|| step("authorizing")("the chosen challenge vanished"))?;
            let domain = ch.identifier().to_string();
            if kind == ChallengeType::Http01 {
                tokens.push((ch.token.clone(), ch.key_authorization().as_str().to_owned()));
            } else {
                let c = AcmeChallenge::new(&domain, ch.key_authorization().digest().as_ref())
                    .map_err(step("making the challenge certificate"))?;
                challenges.push(c);
            }
            chosen.push((domain, kind));
        }
    }
    if !chosen.is_empty() {
        let by: Vec<String> = chosen
            .iter()
            .map(|(d, k)| match k {
                ChallengeType::Http01 => format!("{d} by http-01 (the port-80 decoy answers)"),
                _ => format!("{d} by tls-alpn-01"),
            })
            .collect();
        tracing::info!(listener = %job.name, "acme: validating {}", by.join(", "));
    }
    // Answered by the decoy sites from here until the order is decided (dropped below).
    let offered = crate::decoy::AcmeTokens::offer(tokens).map_err(step("authorizing"))?;
    let result =
        validate_and_finalize(job, &mut order, challenges, &chosen, events, applied_wait).await;
    drop(offered);
    // Whatever happened, the workers stop answering.
    let (tx, _rx) = mpsc::channel();
    events(AcmeEvent::Challenges {
        listeners: job.listeners.clone(),
        challenges: Vec::new(),
        applied: tx,
    });
    let (chain, key) = result?;
    let id = PemIdentity {
        chain_pem: chain,
        key_pem: key,
        ca_pem: None,
    };
    crate::proto::tls::TlsServer::from_pem(&id).map_err(step("loading the issued certificate"))?;
    let (crt, keyf) = cert_paths(job);
    // The key first: a chain next to an old key would not load.
    write_private(&keyf, id.key_pem.as_bytes()).map_err(step("storing the key"))?;
    write_private(&crt, id.chain_pem.as_bytes()).map_err(step("storing the certificate"))?;
    Ok(id)
}

async fn validate_and_finalize(
    job: &Job,
    order: &mut instant_acme::Order,
    challenges: Vec<AcmeChallenge>,
    chosen: &[(String, ChallengeType)],
    events: &(dyn Fn(AcmeEvent) -> bool + Send),
    applied_wait: &(dyn Fn(u64, Duration) + Send),
) -> Result<(String, String), AcmeError> {
    if !challenges.is_empty() {
        let (tx, rx) = mpsc::channel();
        events(AcmeEvent::Challenges {
            listeners: job.listeners.clone(),
            challenges,
            applied: tx,
        });
        let generation = rx
            .recv_timeout(APPLY_WAIT)
            .map_err(step("handing the challenge to the workers"))?;
        applied_wait(generation, APPLY_WAIT);
    }
    if !chosen.is_empty() {
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(step("reading the authorizations"))?;
            if a.status != AuthorizationStatus::Pending {
                continue;
            }
            let domain = a.identifier().to_string();
            let kind = chosen
                .iter()
                .find(|(d, _)| *d == domain)
                .map(|(_, k)| k.clone())
                .ok_or_else(|| step("authorizing")(format!("{domain} was not pending before")))?;
            let mut ch = a
                .challenge(kind)
                .ok_or_else(|| step("authorizing")("the chosen challenge vanished"))?;
            ch.set_ready().await.map_err(step("starting validation"))?;
        }
    }
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(ORDER_WAIT);
    let status = order
        .poll_ready(&retries)
        .await
        .map_err(step("validation"))?;
    if status != OrderStatus::Ready {
        return Err(step("validation")(format!(
            "the order is {status:?} (does every domain resolve to this host, and reach \
             {}?)",
            if chosen.iter().any(|(_, k)| *k == ChallengeType::Http01) {
                "the plain listener on port 80"
            } else {
                "this listener on port 443"
            }
        )));
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(step("making the key"))?;
    let mut params =
        rcgen::CertificateParams::new(job.settings.domains.clone()).map_err(step("the CSR"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(step("the CSR"))?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(step("finalizing"))?;
    let chain = order
        .poll_certificate(&retries)
        .await
        .map_err(step("downloading the certificate"))?;
    Ok((chain, key.serialize_pem()))
}

/// The challenge to answer among those the CA offers for an authorization: the configured
/// one, else TLS-ALPN-01 when offered, else HTTP-01 when a port-80 decoy can answer it.
fn choose(job: &Job, offered: &[ChallengeType]) -> Result<ChallengeType, String> {
    let has = |t: &ChallengeType| offered.contains(t);
    let (alpn, http) = (ChallengeType::TlsAlpn01, ChallengeType::Http01);
    match job.settings.challenge {
        Some(AcmeChallengeKind::TlsAlpn01) if has(&alpn) => Ok(alpn),
        Some(AcmeChallengeKind::TlsAlpn01) => {
            Err("the CA offers no tls-alpn-01 challenge (`challenge = \"tls-alpn-01\"`)".into())
        }
        Some(AcmeChallengeKind::Http01) if !job.http01 => Err(
            "`challenge = \"http-01\"` but no plain listener on port 80 has a local decoy".into(),
        ),
        Some(AcmeChallengeKind::Http01) if has(&http) => Ok(http),
        Some(AcmeChallengeKind::Http01) => {
            Err("the CA offers no http-01 challenge (`challenge = \"http-01\"`)".into())
        }
        None if has(&alpn) => Ok(alpn),
        None if job.http01 && has(&http) => Ok(http),
        None if job.http01 => Err("the CA offers neither tls-alpn-01 nor http-01".into()),
        None => Err(
            "the CA offers no tls-alpn-01 challenge (http-01 would need a plain listener on \
             port 80 with a local decoy)"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_challenge_certificate_is_accepted_by_the_workers_server() {
        // RFC 8737's certificate has a critical acmeIdentifier extension that webpki refuses:
        // the server must take it anyway (a worker that refused it answered no challenge).
        let c = AcmeChallenge::new("Relay.Example.org", &[7; 32]).unwrap();
        assert_eq!(c.domain, "relay.example.org");
        let server =
            crate::proto::tls::TlsServer::self_signed(&["relay.example.org".into()], &[]).unwrap();
        let with = server.with_challenges(std::slice::from_ref(&c)).unwrap();
        assert_eq!(with.challenges(), vec![c]);
        assert!(with.with_challenges(&[]).unwrap().challenges().is_empty());
        assert!(AcmeChallenge::new("relay.example.org", &[7; 31]).is_err());
    }

    #[test]
    fn tls_alpn_01_first_http_01_when_configured_or_the_only_way() {
        let job = |challenge, http01| Job {
            settings: AcmeSettings {
                domains: vec!["relay.example.org".into()],
                email: None,
                directory: crate::config::LETS_ENCRYPT.into(),
                directory_ca: None,
                renew_before_days: 30,
                challenge,
            },
            listeners: vec![0],
            name: "t".into(),
            state_dir: PathBuf::from("/nonexistent"),
            http01,
        };
        let (alpn, http, dns) = (
            ChallengeType::TlsAlpn01,
            ChallengeType::Http01,
            ChallengeType::Dns01,
        );
        let all = [http.clone(), dns.clone(), alpn.clone()];
        let no_alpn = [http.clone(), dns.clone()];
        assert_eq!(choose(&job(None, true), &all), Ok(alpn.clone()));
        assert_eq!(choose(&job(None, false), &all), Ok(alpn.clone()));
        assert_eq!(choose(&job(None, true), &no_alpn), Ok(http.clone()));
        assert!(choose(&job(None, false), &no_alpn).is_err());
        assert!(choose(&job(None, true), std::slice::from_ref(&dns)).is_err());
        let h = Some(AcmeChallengeKind::Http01);
        assert_eq!(choose(&job(h, true), &all), Ok(http.clone()));
        assert!(choose(&job(h, false), &all).is_err());
        assert!(choose(&job(h, true), std::slice::from_ref(&alpn)).is_err());
        let t = Some(AcmeChallengeKind::TlsAlpn01);
        assert_eq!(choose(&job(t, true), &all), Ok(alpn.clone()));
        assert!(choose(&job(t, true), &no_alpn).is_err());
    }
}
