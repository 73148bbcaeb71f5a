//! The TLS flood workload (`--only tls-flood`): one attacking host floods a TLS port with full
//! handshakes while a legitimate client measures its connect + handshake latency, for Sluice's
//! WhatsApp preset TLS port and for nginx terminating TLS with the same key type, one after the
//! other in one run.
//!
//! Each candidate gets a fresh relay in front of the echo upstream. The legitimate client
//! ([`crate::tlsflood::probe`], from 127.77.3.1) runs a `base` phase alone, then a `flood` phase
//! during which the attacker ([`crate::tlsflood::flood`], every thread from 127.77.2.1, niced so
//! that on this shared box it takes the CPU the relay leaves, as a separate machine would) runs.
//! The relay's CPU is measured over each phase.
//!
//! Sluice runs `sluice run --config` with the `chat-tls` listener of `sluice check-config
//! --preset whatsapp` (so whatever the preset says for its TLS port: certificate, limits,
//! tickets, timeouts), moved to 127.77.0.x, pointed at the echo upstream and without the PROXY
//! header it sends upstream (the echo server would send it back). The variants change one key
//! each. nginx is Debian's, `stream` with `ssl`, a self-signed certificate made by `openssl` of
//! the named key type, and its defaults otherwise.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{ECHO_PORT, Measurement, Suite, Window, upstream};
use crate::net::RELAY_PORT;
use crate::peers::{Candidate, Kind, LineChild};
use crate::wire::{Latency, Line, LoadResult};

/// The attacking host.
pub const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 77, 2, 1);
/// The legitimate client.
pub const USER: Ipv4Addr = Ipv4Addr::new(127, 77, 3, 1);
/// The attacker's scheduling niceness.
const ATTACKER_NICE: i32 = 10;

/// A key type for nginx's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    Rsa4096,
    EcdsaP256,
}

/// How a TLS candidate is set up.
#[derive(Debug, Clone, Copy)]
pub enum Setup {
    /// Sluice with the preset's TLS listener, with `[listen]` keys overridden (`key = value`
    /// TOML, `tls.` for `[listen.tls]`).
    Sluice(&'static [(&'static str, &'static str)]),
    Nginx(KeyAlg),
}

/// One column of the TLS flood table.
#[derive(Debug, Clone, Copy)]
pub struct TlsCandidate {
    pub name: &'static str,
    pub setup: Setup,
    pub last_octet: u8,
}

/// Every TLS candidate, in report order.
pub fn candidates() -> Vec<TlsCandidate> {
    vec![
        TlsCandidate {
            name: "sluice-tls",
            setup: Setup::Sluice(&[]),
            last_octet: 20,
        },
        TlsCandidate {
            name: "sluice-tls-nolimit",
            setup: Setup::Sluice(&[("new_connections_per_second_per_client", "0")]),
            last_octet: 21,
        },
        TlsCandidate {
            name: "sluice-tls-rsa4096",
            setup: Setup::Sluice(&[("tls.key_type", "\"rsa-4096\"")]),
            last_octet: 22,
        },
        TlsCandidate {
            name: "nginx-tls-rsa4096",
            setup: Setup::Nginx(KeyAlg::Rsa4096),
            last_octet: 23,
        },
        TlsCandidate {
            name: "nginx-tls-ecdsa",
            setup: Setup::Nginx(KeyAlg::EcdsaP256),
            last_octet: 24,
        },
    ]
}

/// What one candidate did under the flood.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TlsFlood {
    /// What the candidate's certificate is, as `openssl` reports its public key.
    pub key: String,
    /// The attacker's threads and how long it ran.
    pub threads: usize,
    pub flood_secs: f64,
    pub attempts: u64,
    pub handshakes: u64,
    pub refused: u64,
    pub timeouts: u64,
    pub errors: u64,
    /// Full handshakes per second the attacker completed (forced on the relay).
    pub handshakes_per_s: f64,
    /// The legitimate client alone, then during the flood.
    pub base: Option<Probe>,
    pub flood: Option<Probe>,
    /// Relay CPU in each phase (seconds of CPU per second of wall time).
    pub relay_cpu_base: Option<f64>,
    pub relay_cpu_flood: Option<f64>,
    /// Relay CPU per completed handshake during the flood, µs.
    pub relay_cpu_us_per_handshake: Option<f64>,
    /// Sluice's `refused_client_rate` counter at the end.
    pub refused_client_rate: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Probe {
    pub attempts: u64,
    pub ok: u64,
    pub resumed: u64,
    pub refused: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub handshake: Latency,
    pub exchange: Latency,
}

impl Suite {
    pub(super) fn tls_flood_all(&mut self) {
        let wanted = |name: &str| {
            self.opts.candidates.is_empty() || self.opts.candidates.iter().any(|n| n == name)
        };
        let list: Vec<TlsCandidate> = candidates()
            .into_iter()
            .filter(|c| wanted(c.name))
            .collect();
        for c in list {
            self.progress(&format!("== {} (tls-flood)", c.name));
            if let Err(e) = self.tls_flood(&c) {
                self.progress(&format!("{}: tls-flood failed: {e:#}", c.name));
                self.measurements.push(Measurement {
                    candidate: c.name.to_owned(),
                    workload: "tls-flood".into(),
                    error: Some(format!("{e:#}")),
                    ..Measurement::default()
                });
            }
            self.meter.relay = None;
            self.meter.loadgen.clear();
        }
    }

    fn tls_flood(&mut self, c: &TlsCandidate) -> Result<()> {
        let cand = Candidate {
            name: c.name,
            kind: match c.setup {
                Setup::Sluice(_) => Kind::Sluice("auto"),
                Setup::Nginx(_) => Kind::Nginx,
            },
            listen_ip: Ipv4Addr::new(127, 77, 0, c.last_octet),
        };
        let target = SocketAddr::V4(SocketAddrV4::new(cand.listen_ip, RELAY_PORT));
        let up = upstream(ECHO_PORT);
        let dir = self.env.work_dir.join(c.name);
        std::fs::create_dir_all(&dir)?;
        // nginx takes paths relative to its prefix: every path here is absolute.
        let dir = dir.canonicalize()?;
        let log = self.log_path(&format!("{}-tls-flood", c.name));
        let cmd = match c.setup {
            Setup::Sluice(overrides) => {
                let text = sluice_config(&self.env.bin_dir, target, up, overrides)?;
                let path = dir.join("sluice.toml");
                std::fs::write(&path, &text)?;
                self.tls_configs.insert(c.name.to_owned(), text);
                let mut cmd = Command::new(self.env.bin_dir.join("sluice"));
                cmd.arg("run")
                    .arg("--config")
                    .arg(&path)
                    .arg("--control")
                    .arg(cand.control_path(&self.env))
                    .args(["--metrics", "off"])
                    .env("SLUICE_LOG", "warn");
                cmd
            }
            Setup::Nginx(alg) => {
                let (cert, key) = make_certificate(&dir, alg)?;
                let text = nginx_config(&self.env, &dir, target, up, &cert, &key);
                let path = dir.join("nginx.conf");
                std::fs::write(&path, &text)?;
                self.tls_configs.insert(c.name.to_owned(), text);
                let mut cmd = Command::new("nginx");
                cmd.arg("-c")
                    .arg(&path)
                    .arg("-p")
                    .arg(&dir)
                    .arg("-e")
                    .arg(dir.join("nginx-error.log"));
                cmd
            }
        };
        let relay = cand.start_command(&self.env, cmd, &log)?;
        self.meter.relay = Some(relay.pid());
        let key = served_key(target);
        let p = self.params.clone();
        let phases = [("base", p.tls_base_ms), ("flood", p.tls_flood_ms)];
        let probe = self.loadgen(
            &[
                "tls-probe".into(),
                "--target".into(),
                target.to_string(),
                "--source".into(),
                USER.to_string(),
                "--interval-ms".into(),
                p.tls_interval_ms.to_string(),
                "--phases".into(),
                phases
                    .iter()
                    .map(|(l, ms)| format!("{l}={ms}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ],
            &format!("{}-probe", c.name),
        )?;
        self.meter.loadgen = vec![probe.guard.pid()];
        let deadline =
            Instant::now() + Duration::from_millis(p.tls_base_ms + p.tls_flood_ms + 30_000);
        let mut open = BTreeMap::new();
        let mut windows: BTreeMap<String, Window> = BTreeMap::new();
        let mut probes: BTreeMap<String, Probe> = BTreeMap::new();
        let mut flood: Option<LineChild> = None;
        while probes.len() < phases.len() {
            let Some(line) = probe.next_line(deadline) else {
                break;
            };
            match Line::parse(&line) {
                Line::Mark { start: true, label } => {
                    if label == "flood" {
                        let lg = self.loadgen(
                            &[
                                "tls-flood".into(),
                                "--target".into(),
                                target.to_string(),
                                "--source".into(),
                                ATTACKER.to_string(),
                                "--threads".into(),
                                p.tls_flood_threads.to_string(),
                                "--duration-ms".into(),
                                p.tls_flood_ms.to_string(),
                                "--nice".into(),
                                ATTACKER_NICE.to_string(),
                            ],
                            &format!("{}-flood", c.name),
                        )?;
                        self.meter.loadgen.push(lg.guard.pid());
                        flood = Some(lg);
                    }
                    open.insert(label, self.meter.snap());
                }
                Line::Mark {
                    start: false,
                    label,
                } => {
                    let b = self.meter.snap();
                    if let Some(a) = open.remove(&label) {
                        windows.insert(label, self.meter.window(&a, &b));
                    }
                }
                Line::Result(LoadResult::TlsProbe {
                    phase,
                    attempts,
                    ok,
                    resumed,
                    refused,
                    timeouts,
                    errors,
                    handshake,
                    exchange,
                    ..
                }) => {
                    probes.insert(
                        phase,
                        Probe {
                            attempts,
                            ok,
                            resumed,
                            refused,
                            timeouts,
                            errors,
                            handshake,
                            exchange,
                        },
                    );
                }
                Line::Result(_) => {}
                Line::Other(s) => eprintln!("    {s}"),
            }
        }
        probe.finish(Instant::now() + Duration::from_secs(3));
        let Some(flood) = flood else {
            bail!("the probe never started its flood phase");
        };
        let (_, results) = self.collect(&flood, Instant::now() + Duration::from_secs(20), 1);
        flood.finish(Instant::now() + Duration::from_secs(3));
        let Some(LoadResult::TlsFlood {
            threads,
            secs,
            attempts,
            handshakes,
            refused,
            timeouts,
            errors,
        }) = results.into_iter().next()
        else {
            bail!("the flood gave no result");
        };
        let refused_client_rate = relay.status().and_then(|s| {
            s["refused_client_rate"]
                .as_u64()
                .or_else(|| s["totals"]["refused_client_rate"].as_u64())
        });
        let per_s = |w: &Window| w.relay_s().map(|r| r / w.wall_s);
        let base = probes.remove("base");
        let flood_probe = probes.remove("flood");
        let fw = windows.get("flood");
        let done = handshakes + flood_probe.as_ref().map_or(0, |p| p.ok);
        let r = TlsFlood {
            key,
            threads,
            flood_secs: secs,
            attempts,
            handshakes,
            refused,
            timeouts,
            errors,
            handshakes_per_s: handshakes as f64 / secs,
            relay_cpu_base: windows.get("base").and_then(per_s),
            relay_cpu_flood: fw.and_then(per_s),
            relay_cpu_us_per_handshake: fw
                .and_then(Window::relay_s)
                .filter(|_| done > 0)
                .map(|s| s * 1e6 / done as f64),
            refused_client_rate,
            base,
            flood: flood_probe,
        };
        let lat = |p: &Option<Probe>| {
            p.as_ref().map_or("–".into(), |p| {
                format!(
                    "p50 {:.1} ms p99 {:.1} ms ({}/{} ok)",
                    p.handshake.p50_us / 1e3,
                    p.handshake.p99_us / 1e3,
                    p.ok,
                    p.attempts
                )
            })
        };
        self.progress(&format!(
            "{}: {} | flood {:.0} handshakes/s forced ({} refused, {} timeouts, {} errors of {}) | \
             user alone {} | user under flood {} | relay CPU {:.2} → {:.2} cores{}",
            c.name,
            r.key,
            r.handshakes_per_s,
            refused,
            timeouts,
            errors,
            attempts,
            lat(&r.base),
            lat(&r.flood),
            r.relay_cpu_base.unwrap_or(0.0),
            r.relay_cpu_flood.unwrap_or(0.0),
            fw.map_or(String::new(), super::disturbed_note),
        ));
        self.push(Measurement {
            candidate: c.name.to_owned(),
            workload: "tls-flood".into(),
            cpu: fw.cloned(),
            tls_flood: Some(r),
            ..Measurement::default()
        });
        drop(relay);
        Ok(())
    }
}

/// The preset's `chat-tls` listener as `sluice check-config --preset whatsapp` prints it, alone,
/// on `listen` toward `upstream`, with `overrides` applied.
fn sluice_config(
    bin_dir: &std::path::Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    overrides: &[(&str, &str)],
) -> Result<String> {
    let out = Command::new(bin_dir.join("sluice"))
        .args(["check-config", "--preset", "whatsapp"])
        .output()
        .context("sluice check-config --preset whatsapp")?;
    if !out.status.success() {
        bail!(
            "sluice check-config --preset whatsapp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut doc: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout))
        .context("the preset printed as TOML")?;
    let listeners = doc
        .remove("listen")
        .and_then(|l| l.as_array().cloned())
        .context("the preset has listeners")?;
    let mut tls = listeners
        .into_iter()
        .find(|l| l.get("name").and_then(toml::Value::as_str) == Some("chat-tls"))
        .context("the preset has a chat-tls listener")?;
    let l = tls.as_table_mut().context("a listener is a table")?;
    l.insert("bind".into(), toml::Value::String(listen.to_string()));
    l.insert(
        "upstream".into(),
        toml::Value::Array(vec![toml::Value::String(upstream.to_string())]),
    );
    l.insert("send_proxy".into(), toml::Value::String("none".into()));
    for (key, value) in overrides {
        let v: toml::Table = toml::from_str(&format!("v = {value}"))?;
        let v = v["v"].clone();
        match key.strip_prefix("tls.") {
            Some(k) => {
                l.get_mut("tls")
                    .and_then(toml::Value::as_table_mut)
                    .context("the listener has a [listen.tls] table")?
                    .insert(k.into(), v);
            }
            None => {
                l.insert((*key).into(), v);
            }
        }
    }
    doc.insert("listen".into(), toml::Value::Array(vec![tls]));
    Ok(toml::to_string(&doc)?)
}

/// A self-signed certificate and key of `alg` for nginx, made by `openssl req`.
fn make_certificate(
    dir: &std::path::Path,
    alg: KeyAlg,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let mut cmd = Command::new("openssl");
    cmd.args([
        "req",
        "-x509",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=relay.bench",
    ]);
    match alg {
        KeyAlg::Rsa4096 => cmd.args(["-newkey", "rsa:4096"]),
        KeyAlg::EcdsaP256 => {
            cmd.args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        }
    };
    cmd.arg("-keyout").arg(&key).arg("-out").arg(&cert);
    let out = cmd.output().context("openssl req")?;
    if !out.status.success() {
        bail!("openssl req: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((cert, key))
}

/// nginx `stream` terminating TLS on `listen` toward `upstream`: its defaults otherwise
/// (tickets on, no session cache, all of Debian's OpenSSL protocols that TLS 1.2+ leaves).
fn nginx_config(
    env: &crate::peers::Env,
    dir: &std::path::Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> String {
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes auto;\nworker_rlimit_nofile {nofile};\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
         daemon off;\n\
         events {{\n    worker_connections {wc};\n}}\n\
         stream {{\n    server {{\n        listen {listen} ssl reuseport backlog=4096;\n\
         \x20       ssl_certificate {cert};\n        ssl_certificate_key {key};\n\
         \x20       ssl_protocols TLSv1.2 TLSv1.3;\n\
         \x20       proxy_pass {upstream};\n        proxy_connect_timeout 5s;\n\
         \x20       proxy_timeout 200s;\n    }}\n}}\n",
        nofile = env.nofile,
        wc = env.nofile.saturating_sub(100),
        dir = dir.display(),
        cert = cert.display(),
        key = key.display(),
    )
}

/// The public key of the certificate served on `addr`, as `openssl x509 -text` names it
/// (e.g. "RSA 4096 bit", "EC 256 bit"); "?" when it cannot be read.
fn served_key(addr: SocketAddr) -> String {
    let fetch = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "relay.bench",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(fetch) = fetch else {
        return "?".into();
    };
    let text = String::from_utf8_lossy(&fetch.stdout);
    let Some(pem) = text
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|s| s.split("-----END CERTIFICATE-----").next())
    else {
        return "?".into();
    };
    let pem = format!("-----BEGIN CERTIFICATE-----{pem}-----END CERTIFICATE-----\n");
    let mut child = match Command::new("openssl")
        .args(["x509", "-noout", "-text"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return "?".into(),
    };
    {
        use std::io::Write as _;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(pem.as_bytes());
        }
    }
    let Ok(out) = child.wait_with_output() else {
        return "?".into();
    };
    let info = String::from_utf8_lossy(&out.stdout);
    let alg = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Public Key Algorithm:"))
        .map(str::trim)
        .unwrap_or("?");
    let bits = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Public-Key:"))
        .map(str::trim)
        .unwrap_or("");
    let alg = match alg {
        "rsaEncryption" => "RSA",
        "id-ecPublicKey" => "ECDSA",
        other => other,
    };
    format!("{alg} {}", bits.trim_matches(|c| c == '(' || c == ')'))
}
