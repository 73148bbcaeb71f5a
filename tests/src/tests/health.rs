//! Layer-4 health checks (`[listen.health]`) and `fallback` upstreams: while the primary
//! answers, connections reach it; once it refuses connects (its listener dropped), the checks
//! take it down after `fall` failures and new connections reach the fallback, counted in
//! `sluicectl status --json` (`upstreams_down`, `upstream_state_changes`) and said in one WARN
//! line that names the upstream `HOST:PORT`, never its address; when the primary listens again
//! on the same port, `rise` successes bring it back (an INFO line) and connections return to
//! it. `fallback` without `[listen.health]` is a config error.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sluice_tests::client::{read_all, try_connect};
use sluice_tests::servers::TagEchoServer;
use sluice_tests::sluice::HealthConfig;
use sluice_tests::{Config, Host, Sluice, init, wait_until};

use super::engine_ok;

const PRIMARY: &[u8] = b"primary\n";
const FALLBACK: &[u8] = b"fallback\n";
const PING: &[u8] = b"ping\n";

/// How long a change of upstream health may take to show (checks every 100-300 ms, fall 3,
/// rise 2: well under a second when the machine is not loaded).
const CHANGE: Duration = Duration::from_secs(20);

/// One connection through the relay: the tag of the server it reached followed by the echo of
/// [`PING`], or whatever came back before the relay closed it (empty when the relay could not
/// reach an upstream).
fn reach(relay: SocketAddr) -> Vec<u8> {
    let Ok(mut s) = try_connect(relay, None) else {
        return Vec::new();
    };
    if s.write_all(PING).is_err() || s.shutdown(std::net::Shutdown::Write).is_err() {
        return Vec::new();
    }
    read_all(&mut s, Duration::from_secs(10)).0
}

fn tagged(tag: &[u8]) -> Vec<u8> {
    [tag, PING].concat()
}

/// Polls (up to [`CHANGE`]) until a new connection reaches the server tagged `tag`; returns
/// what the last connection got.
fn wait_reach(relay: SocketAddr, tag: &[u8]) -> Result<(), Vec<u8>> {
    let mut last = Vec::new();
    if wait_until(CHANGE, || {
        last = reach(relay);
        last == tagged(tag)
    }) {
        Ok(())
    } else {
        Err(last)
    }
}

/// Does `text` contain a dotted-quad IPv4 address?
fn has_ipv4(text: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .any(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 4 && parts.iter().all(|p| p.parse::<u8>().is_ok())
        })
}

/// Lines of `log` at `level` that name `upstream` and say `what`.
fn lines_with<'a>(log: &'a str, level: &str, upstream: &str, what: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(level) && l.contains(upstream) && l.contains(what))
        .collect()
}

fn falls_back_and_recovers(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let (relay_host, primary_host, fallback_host) = (Host::new(), Host::new(), Host::new());
    let primary_addr = primary_host.addr();
    let primary = TagEchoServer::start(primary_addr, PRIMARY);
    let fallback = TagEchoServer::start(fallback_host.addr(), FALLBACK);
    let primary_name = format!("primary.test:{}", primary_addr.port());
    let fallback_name = format!("fallback.test:{}", fallback.addr().port());
    let mut config = Config::new()
        .listen("in", relay_host.addr(), &[&primary_name])
        .fallback(&[&fallback_name])
        .health(HealthConfig {
            interval_ms: Some(300),
            fast_interval_ms: Some(100),
            down_interval_ms: Some(200),
            rise: Some(2),
            fall: Some(3),
        })
        .resolve("primary.test", IpAddr::V4(primary_host.ip))
        .resolve("fallback.test", IpAddr::V4(fallback_host.ip));
    config.workers = Some(1);
    config.engine = Some(engine.into());
    let relay = Sluice::run_config(&config).start();
    super::assert_engine(&relay, engine);
    let totals = |relay: &Sluice| {
        let s = relay.status();
        (
            s["totals"]["upstreams_down"].as_u64(),
            s["totals"]["upstream_state_changes"].as_u64(),
        )
    };

    // The primary is up: every connection reaches it.
    for i in 0..3 {
        assert_eq!(
            reach(relay.addr()),
            tagged(PRIMARY),
            "{engine}: connection {i} with the primary up"
        );
    }
    assert_eq!(totals(&relay), (Some(0), Some(0)), "{engine}: all up");

    // The primary stops listening (connects refused): new connections reach the fallback.
    drop(primary);
    if let Err(last) = wait_reach(relay.addr(), FALLBACK) {
        panic!(
            "{engine}: no connection reached the fallback within {CHANGE:?} of the primary \
             stopping; the last got {:?}",
            String::from_utf8_lossy(&last)
        );
    }
    let mut now = (None, None);
    wait_until(CHANGE, || {
        now = totals(&relay);
        now.0 == Some(1)
    });
    let (down, changes) = now;
    assert_eq!(
        down,
        Some(1),
        "{engine}: upstreams_down with the primary down"
    );
    assert!(
        changes >= Some(1),
        "{engine}: upstream_state_changes {changes:?} with the primary down"
    );
    let mut log = String::new();
    wait_until(CHANGE, || {
        log = relay.stderr_log();
        !lines_with(&log, "WARN", &primary_name, "is down").is_empty()
    });
    let warns = lines_with(&log, "WARN", &primary_name, "is down");
    assert_eq!(
        warns.len(),
        1,
        "{engine}: WARN lines saying {primary_name} is down; log:\n{log}"
    );
    let line = warns[0];
    assert!(
        !has_ipv4(line)
            && !line.contains(&primary_host.ip.to_string())
            && !line.contains(&fallback_host.ip.to_string()),
        "{engine}: the health log line names an address: {line}"
    );
    assert_eq!(
        lines_with(&log, "WARN", "", "is down").len(),
        1,
        "{engine}: only the primary went down; log:\n{log}"
    );
    for i in 0..3 {
        assert_eq!(
            reach(relay.addr()),
            tagged(FALLBACK),
            "{engine}: connection {i} with the primary down"
        );
    }

    // The primary listens again on the same port: connections go back to it.
    let primary = TagEchoServer::start(primary_addr, PRIMARY);
    assert_eq!(primary.addr(), primary_addr);
    if let Err(last) = wait_reach(relay.addr(), PRIMARY) {
        panic!(
            "{engine}: no connection reached the restarted primary within {CHANGE:?}; the last \
             got {:?}",
            String::from_utf8_lossy(&last)
        );
    }
    let mut now = (None, None);
    wait_until(CHANGE, || {
        now = totals(&relay);
        now.0 == Some(0)
    });
    assert_eq!(
        now.0,
        Some(0),
        "{engine}: upstreams_down with the primary back"
    );
    assert!(
        now.1 >= Some(2) && now.1 >= changes,
        "{engine}: upstream_state_changes {:?} after down and up again",
        now.1
    );
    let mut log = String::new();
    wait_until(CHANGE, || {
        log = relay.stderr_log();
        !lines_with(&log, "INFO", &primary_name, "is up again").is_empty()
    });
    let infos = lines_with(&log, "INFO", &primary_name, "is up again");
    assert_eq!(
        infos.len(),
        1,
        "{engine}: INFO lines saying {primary_name} is up again; log:\n{log}"
    );
    assert!(
        !has_ipv4(infos[0]),
        "{engine}: the health log line names an address: {}",
        infos[0]
    );
    assert_eq!(
        lines_with(&log, "WARN", "", "is down").len(),
        1,
        "{engine}: only the primary ever went down; log:\n{log}"
    );
    for i in 0..3 {
        assert_eq!(
            reach(relay.addr()),
            tagged(PRIMARY),
            "{engine}: connection {i} with the primary back"
        );
    }
}
engines!(falls_back_and_recovers);

/// `fallback` is only used when health checks find the upstream down: without
/// `[listen.health]`, `sluice check-config` refuses it (exit 2) and names the key.
#[test]
fn fallback_needs_health_checks() {
    init();
    let host = Host::new();
    let config = Config::new()
        .listen("in", host.addr(), &["primary.test:8080"])
        .fallback(&["fallback.test:8080"])
        .resolve("primary.test", IpAddr::V4(host.ip))
        .resolve("fallback.test", IpAddr::V4(host.ip));
    let out = Sluice::check_config(&config.to_toml());
    assert_eq!(
        out.status.code(),
        Some(2),
        "check-config of fallback without [listen.health]: {}",
        out.text()
    );
    assert!(
        out.text().contains("listen[0].fallback"),
        "check-config does not name listen[0].fallback: {}",
        out.text()
    );
    // With the health table the same config is valid.
    let config = config.health(HealthConfig::default());
    let out = Sluice::check_config(&config.to_toml());
    assert!(
        out.status.success(),
        "check-config with [listen.health]: {}",
        out.text()
    );
}
