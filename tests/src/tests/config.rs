//! Bad input and operator-facing output: `check-config` names the unknown key and its line,
//! prints a good config back as TOML; a port in use stops `forward` with a message naming the
//! port; the logs never carry an IP address.

use std::net::TcpListener;
use std::time::Duration;

use sluice_tests::servers::{EchoServer, RefusingPort};
use sluice_tests::{Config, Host, Sluice, client, init, mentions_number};

use super::seed;

#[test]
fn check_config_names_unknown_key_and_line() {
    init();
    let host = Host::new();
    let text = format!(
        "workers = 1\n\n[[listen]]\nname = \"a\"\nbind = \"{}\"\nupstream = [\"{}\"]\nflavour = \"vanilla\"\n",
        host.addr(),
        host.addr()
    );
    let out = Sluice::check_config(&text);
    assert_eq!(
        out.status.code(),
        Some(2),
        "check-config on an unknown key: {}",
        out.text()
    );
    let text = out.text();
    assert!(
        text.contains("flavour"),
        "the message does not name the key: {text}"
    );
    assert!(
        mentions_number(&text, 7),
        "the message does not name line 7: {text}"
    );
}

#[test]
fn check_config_prints_a_good_config_as_toml() {
    init();
    let host = Host::new();
    let (bind, up) = (host.addr(), host.addr());
    let mut config = Config::new().listen("one", bind, &[&up.to_string()]);
    config.idle_ms = Some(4321);
    let out = Sluice::check_config(&config.to_toml());
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-config on a good file: {}",
        out.text()
    );
    let parsed: toml::Value =
        toml::from_str(&out.stdout).unwrap_or_else(|e| panic!("not TOML ({e}):\n{}", out.stdout));
    let listen = &parsed["listen"][0];
    assert_eq!(
        listen["bind"].as_str(),
        Some(bind.to_string().as_str()),
        "{}",
        out.stdout
    );
    assert_eq!(
        listen["upstream"][0].as_str(),
        Some(up.to_string().as_str()),
        "{}",
        out.stdout
    );
    assert_eq!(
        parsed["timeouts"]["idle_ms"].as_integer(),
        Some(4321),
        "{}",
        out.stdout
    );
}

#[test]
fn port_in_use_fails_forward_naming_the_port() {
    init();
    let host = Host::new();
    let taken = TcpListener::bind(host.addr()).unwrap();
    let addr = taken.local_addr().unwrap();
    let out = Sluice::forward(addr, host.addr())
        .workers(1)
        .run_to_exit(Duration::from_secs(10));
    assert!(
        !out.status.success(),
        "forward on a port in use succeeded: {}",
        out.text()
    );
    assert!(
        mentions_number(&out.stderr, addr.port().into()),
        "the error does not name port {}: {}",
        addr.port(),
        out.stderr
    );
}

#[test]
fn logs_carry_no_ip_address() {
    init();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let refusing = RefusingPort::new(host.addr());
    let ok = Sluice::forward(host.addr(), echo.addr())
        .workers(1)
        .env("SLUICE_LOG", "trace")
        .start();
    let bad = Sluice::forward(host.addr(), refusing.addr())
        .workers(1)
        .env("SLUICE_LOG", "trace")
        .start();
    let conns = client::open_many(ok.addr(), None, 5).unwrap();
    client::echo_many(&conns, seed(), 1000, true, Duration::from_secs(30)).unwrap();
    for _ in 0..5 {
        if let Ok(c) = client::try_connect(bad.addr(), None) {
            sluice_tests::servers::read_until_end(&c, Duration::from_secs(30));
        }
    }
    let ip = host.ip.to_string();
    for relay in [ok, bad] {
        let (_, log) = relay.stop();
        let leaks: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&ip) || l.contains("127.0.0.1"))
            .collect();
        assert!(
            leaks.is_empty(),
            "log lines with an IP address:\n{}",
            leaks.join("\n")
        );
    }
}
