//! Live admission lists through `sluicectl`, on real sockets: client deny and allow lists, the
//! destination allowlist, `--kill-existing`, the `[admission]` config table, the PROXY header's
//! source, IPv4-mapped rules (`::ffff:a.b.c.d`) matching IPv4 clients, and sluicectl's errors. Every change is checked on the same daemon process: nothing
//! is reloaded.
//!
//! Clients connect from 127.0.0.2 and 127.0.0.3 (no other test uses them as sources, and each
//! relay here is this test's own, so its lists touch nobody else's connections). A refused
//! client sees its connection accepted by the kernel and then reset, with no byte relayed.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sluice_tests::servers::{EchoServer, Ended, read_until_end};
use sluice_tests::{HUNG, Host, Sluice, client, run_with_timeout, wait_until};

use super::engine_ok;

const SERVED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const DENIED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// A relay with 2 workers in front of an echo server.
fn echo_relay(engine: &str) -> (Sluice, EchoServer) {
    let echo = EchoServer::start(Host::new().addr());
    let relay = Sluice::forward(Host::new().addr(), echo.addr())
        .engine(engine)
        .workers(2)
        .start();
    (relay, echo)
}

/// One echo round trip on `s`.
fn echoes(s: &mut TcpStream) -> Result<(), String> {
    s.write_all(b"ping").map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    if &buf != b"ping" {
        return Err(format!("echoed {buf:?}"));
    }
    Ok(())
}

/// How a new connection from `src` fares: Ok when it is relayed (echoed), Err with what
/// happened otherwise.
fn try_new(addr: SocketAddr, src: IpAddr) -> Result<TcpStream, String> {
    let mut s = client::try_connect(addr, Some(src)).map_err(|e| format!("connect: {e}"))?;
    echoes(&mut s)?;
    Ok(s)
}

fn assert_served(relay: &Sluice, src: IpAddr, what: &str) {
    if let Err(e) = try_new(relay.addr(), src) {
        panic!(
            "{what}: a client from {src} should be relayed: {e}\n{}",
            relay.stderr_log()
        );
    }
}

/// A new connection from `src` is reset without a byte relayed.
fn assert_refused(relay: &Sluice, src: IpAddr, what: &str) {
    let s = match client::try_connect(relay.addr(), Some(src)) {
        Ok(s) => s,
        // Reset before the client finished setting its socket up: refused all the same.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("{what}: connect from {src}: {e}"),
    };
    // A write the reset overtook fails with it, and takes the error: a read would then see
    // EOF, so that write is the answer.
    if let Err(e) = (&s).write_all(b"ping") {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{what}: writing from {src}: {e}"
        );
        return;
    }
    match read_until_end(&s, HUNG) {
        (0, Some(Ended::Reset)) => {}
        other => panic!("{what}: a client from {src} should be reset, got {other:?}"),
    }
}

/// Runs `sluicectl ARGS` against `relay`; panics unless it succeeds. Returns stdout.
fn ctl_ok(relay: &Sluice, args: &[&str]) -> String {
    let out = relay.ctl(args);
    assert!(
        out.status.success(),
        "sluicectl {args:?} failed ({}): {}",
        out.status,
        out.text()
    );
    out.stdout
}

fn counter(relay: &Sluice, name: &str) -> u64 {
    relay
        .counter(name)
        .unwrap_or_else(|| panic!("no counter {name} in sluicectl status"))
}

/// Same supervisor, same workers: the change was applied live.
fn assert_same_processes(relay: &Sluice, workers: &[u32]) {
    let mut now = relay.worker_pids();
    now.sort_unstable();
    let mut before = workers.to_vec();
    before.sort_unstable();
    assert_eq!(now, before, "the workers were replaced");
}

/// The test: `deny add 127.0.0.3/32` refuses new connections from 127.0.0.3 (reset,
/// `refused_denied`), 127.0.0.2 is still served, `del` restores 127.0.0.3; same processes.
fn deny_add_del_live(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let (relay, _echo) = echo_relay(engine);
    let pid = relay.pid();
    let workers = relay.wait_workers(2, HUNG);
    assert_served(&relay, DENIED, "before the deny rule");
    let out = ctl_ok(&relay, &["deny", "add", "127.0.0.3/32"]);
    assert!(out.contains("added"), "{out}");
    assert!(out.contains("2/2 workers"), "{out}");
    for _ in 0..4 {
        assert_refused(&relay, DENIED, "after deny add");
        assert_served(&relay, SERVED, "after deny add");
    }
    assert!(counter(&relay, "refused_denied") >= 4);
    let listed = ctl_ok(&relay, &["deny", "list"]);
    assert_eq!(listed.trim(), "127.0.0.3/32");
    let out = ctl_ok(&relay, &["deny", "del", "127.0.0.3/32"]);
    assert!(out.contains("removed"), "{out}");
    for _ in 0..4 {
        assert_served(&relay, DENIED, "after deny del");
    }
    assert_eq!(ctl_ok(&relay, &["deny", "list"]).trim(), "");
    assert_eq!(relay.pid(), pid);
    assert_same_processes(&relay, &workers);
}
engines!(deny_add_del_live);

/// An allow list admits only its ranges; deny wins over allow; an empty list admits everyone.
#[test]
fn allow_list_admits_only_its_ranges() {
    if !engine_ok("epoll") {
        return;
    }
    let (relay, _echo) = echo_relay("epoll");
    let workers = relay.wait_workers(2, HUNG);
    ctl_ok(&relay, &["allow", "add", "127.0.0.2"]);
    assert_served(&relay, SERVED, "on the allow list");
    assert_refused(&relay, DENIED, "not on the allow list");
    ctl_ok(&relay, &["allow", "add", "127.0.0.0/30"]);
    assert_served(&relay, DENIED, "in an allowed /30");
    ctl_ok(&relay, &["deny", "add", "127.0.0.3"]);
    assert_refused(&relay, DENIED, "allowed but denied");
    assert_served(&relay, SERVED, "allowed, not denied");
    let listed = ctl_ok(&relay, &["allow", "list"]);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        ["127.0.0.2/32", "127.0.0.0/30"]
    );
    ctl_ok(&relay, &["deny", "del", "127.0.0.3"]);
    ctl_ok(&relay, &["allow", "del", "127.0.0.0/30"]);
    assert_refused(&relay, DENIED, "the /30 is gone");
    ctl_ok(&relay, &["allow", "del", "127.0.0.2/32"]);
    assert_served(&relay, DENIED, "empty allow list");
    assert!(counter(&relay, "refused_denied") >= 3);
    assert_same_processes(&relay, &workers);
}

/// With a destination allowlist, an upstream address not on it is never connected to: the
/// client is refused (`refused_dest`) and the upstream sees no connection.
#[test]
fn destination_allowlist_refuses_other_upstreams() {
    if !engine_ok("splice") {
        return;
    }
    let (relay, echo) = echo_relay("splice");
    let other = Host::new().addr().to_string();
    let up = echo.addr().to_string();
    ctl_ok(&relay, &["dest", "add", &other]);
    let accepted = echo.accepted();
    for _ in 0..3 {
        assert_refused(&relay, SERVED, "upstream not on the destination allowlist");
    }
    assert!(counter(&relay, "refused_dest") >= 3);
    assert_eq!(
        echo.accepted(),
        accepted,
        "the relay connected to an address not on the allowlist"
    );
    let out = ctl_ok(&relay, &["dest", "add", &up]);
    assert!(out.contains("added"), "{out}");
    assert_served(&relay, SERVED, "upstream on the allowlist");
    let mut listed: Vec<String> = ctl_ok(&relay, &["dest", "list"])
        .lines()
        .map(String::from)
        .collect();
    listed.sort();
    let mut want = vec![other.clone(), up.clone()];
    want.sort();
    assert_eq!(listed, want);
    ctl_ok(&relay, &["dest", "del", &up]);
    assert_refused(&relay, SERVED, "upstream taken off the allowlist");
    ctl_ok(&relay, &["dest", "del", &other]);
    assert_served(&relay, SERVED, "empty allowlist");
}

/// Health checks do not connect to an address outside the destination allowlist either; once
/// the allowlist takes it back, they do.
#[test]
fn health_checks_respect_the_destination_allowlist() {
    if !engine_ok("epoll") {
        return;
    }
    let echo = EchoServer::start(Host::new().addr());
    let other = Host::new().addr();
    let listen = Host::new().addr();
    let toml = format!(
        "workers = 1\nengine = \"epoll\"\n\n[admission]\ndestinations = [\"{other}\"]\n\n[[listen]]\nname = \"a\"\nbind = \"{listen}\"\nupstream = [\"{up}\"]\n[listen.health]\ninterval_ms = 100\nfast_interval_ms = 100\ndown_interval_ms = 100\n",
        up = echo.addr()
    );
    let relay = Sluice::run_config_text(&toml, vec![listen])
        .workers(1)
        .start();
    assert_refused(&relay, SERVED, "upstream not on the allowlist");
    // Ten check intervals: no check may have reached the upstream.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        echo.accepted(),
        0,
        "a health check connected to a disallowed address"
    );
    ctl_ok(&relay, &["dest", "add", &echo.addr().to_string()]);
    assert!(
        wait_until(HUNG, || echo.accepted() > 0),
        "no health check after the allowlist took the address back"
    );
    assert_served(&relay, SERVED, "upstream on the allowlist");
}

/// `deny add --kill-existing` closes the live connections of the denied client only; without
/// it, established connections stay.
fn kill_existing(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let (relay, _echo) = echo_relay(engine);
    let mut denied: Vec<TcpStream> = (0..3)
        .map(|_| try_new(relay.addr(), DENIED).expect("client from 127.0.0.3"))
        .collect();
    let mut served: Vec<TcpStream> = (0..3)
        .map(|_| try_new(relay.addr(), SERVED).expect("client from 127.0.0.2"))
        .collect();
    // Without --kill-existing: new connections refused, established ones untouched.
    ctl_ok(&relay, &["deny", "add", "127.0.0.3/32"]);
    assert_refused(&relay, DENIED, "denied");
    for s in denied.iter_mut().chain(served.iter_mut()) {
        echoes(s).expect("an established connection survives a deny without --kill-existing");
    }
    let out = ctl_ok(&relay, &["deny", "add", "127.0.0.3/32", "--kill-existing"]);
    assert!(out.contains("closed"), "{out}");
    for s in &denied {
        match read_until_end(s, HUNG) {
            (0, Some(_)) => {}
            other => panic!("a denied client's connection stayed open: {other:?}"),
        }
    }
    for s in &mut served {
        echoes(s).expect("a connection of a client not denied was touched");
    }
    assert!(wait_until(HUNG, || counter(&relay, "killed_denied") >= 3));
    assert_eq!(counter(&relay, "killed_denied"), 3);
    assert_served(&relay, SERVED, "after the kill");
}
engines!(kill_existing);

/// `[admission]` in the config file seeds the lists; `sluicectl` lists and changes them.
#[test]
fn config_table_seeds_the_lists() {
    if !engine_ok("epoll") {
        return;
    }
    let echo = EchoServer::start(Host::new().addr());
    let listen = Host::new().addr();
    let toml = format!(
        "workers = 2\nengine = \"epoll\"\n\n[admission]\ndeny = [\"127.0.0.3/32\"]\ndestinations = [\"{}\"]\n\n[[listen]]\nname = \"a\"\nbind = \"{listen}\"\nupstream = [\"{}\"]\n",
        echo.addr(),
        echo.addr()
    );
    let relay = Sluice::run_config_text(&toml, vec![listen])
        .workers(2)
        .start();
    assert_refused(&relay, DENIED, "denied by the config");
    assert_served(&relay, SERVED, "not denied");
    assert_eq!(ctl_ok(&relay, &["deny", "list"]).trim(), "127.0.0.3/32");
    let status = relay.status();
    assert_eq!(status["admission"]["deny_rules"], 1, "{status}");
    assert_eq!(status["admission"]["destinations"], 1, "{status}");
    assert_eq!(
        ctl_ok(&relay, &["dest", "list"]).trim(),
        echo.addr().to_string()
    );
    ctl_ok(&relay, &["deny", "del", "127.0.0.3/32"]);
    assert_served(&relay, DENIED, "after deny del");
}

/// On an `accept_proxy` port the client is the PROXY header's source: a denied source is
/// refused once its header is parsed, another one from the same peer is served.
#[test]
fn proxy_header_source_is_checked() {
    if !engine_ok("copy") {
        return;
    }
    let echo = EchoServer::start(Host::new().addr());
    let listen = Host::new().addr();
    let config = sluice_tests::Config::new()
        .listen("lb", listen, &[&echo.addr().to_string()])
        .accept_proxy();
    let relay = Sluice::run_config(&config)
        .engine("copy")
        .workers(2)
        .start();
    ctl_ok(&relay, &["deny", "add", "203.0.113.0/24"]);
    let denied_src: SocketAddr = "203.0.113.9:4000".parse().unwrap();
    let other_src: SocketAddr = "198.51.100.7:4000".parse().unwrap();
    let s = client::try_connect(listen, Some(SERVED)).expect("connect");
    (&s).write_all(&client::proxy_v1(denied_src, listen))
        .unwrap();
    let _ = (&s).write_all(b"ping");
    match read_until_end(&s, HUNG) {
        (0, Some(_)) => {}
        other => panic!("a denied PROXY source was relayed: {other:?}"),
    }
    let mut s = client::try_connect(listen, Some(SERVED)).expect("connect");
    s.write_all(&client::proxy_v2(other_src, listen)).unwrap();
    echoes(&mut s).expect("a PROXY source not denied is relayed");
    assert!(counter(&relay, "refused_denied") >= 1);
}

/// sluicectl's errors: a bad CIDR (exit 2, before asking the daemon), no daemon (exit 1).
#[test]
fn sluicectl_errors_are_clear() {
    sluice_tests::init();
    let dir = sluice_tests::TempDir::new();
    let absent: PathBuf = dir.join("no-daemon.sock");
    let ctl = |args: &[&str]| {
        let mut cmd = Command::new(sluice_tests::sluice::sluicectl_bin());
        cmd.arg("--control").arg(&absent).args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(10))
    };
    for bad in [
        "10.0.0.0/33",
        "nonsense",
        "10.0.0.1/x",
        "::1/129",
        "10.1.2.3/8",
    ] {
        let out = ctl(&["deny", "add", bad]);
        assert_eq!(out.status.code(), Some(2), "deny add {bad}: {}", out.text());
        assert!(
            out.stderr.contains(bad) && out.stderr.contains("not a CIDR"),
            "deny add {bad}: {}",
            out.stderr
        );
    }
    let out = ctl(&["dest", "add", "127.0.0.1"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.text());
    assert!(out.stderr.contains("HOST:PORT"), "{}", out.stderr);
    for args in [
        &["deny", "add", "127.0.0.3/32"][..],
        &["allow", "list"],
        &["status"],
    ] {
        let out = ctl(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", out.text());
        assert!(
            out.stderr.contains("not running"),
            "{args:?}: {}",
            out.stderr
        );
    }
    // A socket file nobody listens on (a daemon that died) is "not running" too.
    let stale = std::os::unix::net::UnixListener::bind(&absent).unwrap();
    drop(stale);
    let out = ctl(&["deny", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.text());
    assert!(out.stderr.contains("not running"), "{}", out.stderr);
}

/// A worker that dies is replaced with the lists already in force: its replacement refuses
/// the denied client from its first accept.
#[test]
fn a_restarted_worker_starts_with_the_lists() {
    if !engine_ok("splice") {
        return;
    }
    let echo = EchoServer::start(Host::new().addr());
    let relay = Sluice::forward(Host::new().addr(), echo.addr())
        .engine("splice")
        .workers(1)
        .start();
    let old = relay.wait_workers(1, HUNG);
    ctl_ok(&relay, &["deny", "add", "127.0.0.3/32"]);
    ctl_ok(&relay, &["dest", "add", &echo.addr().to_string()]);
    assert!(sluice_tests::sys::kill(old[0], libc::SIGKILL));
    let mut new = Vec::new();
    assert!(
        wait_until(HUNG, || {
            new = relay.worker_pids();
            new.len() == 1 && new != old
        }),
        "no replacement worker: {}",
        relay.stderr_log()
    );
    for _ in 0..3 {
        assert_refused(&relay, DENIED, "by the replacement worker");
        assert_served(&relay, SERVED, "by the replacement worker");
    }
}

/// A port on ::1 that was free a moment ago.
fn free_v6_addr() -> SocketAddr {
    let port = std::net::TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    SocketAddr::new("::1".parse().unwrap(), port)
}

/// One epoll worker with a listener `v4` on `v4` and one `v6` on `v6`, both to `up`.
fn v4_and_v6(v4: SocketAddr, v6: SocketAddr, up: SocketAddr) -> String {
    format!(
        "workers = 1\nengine = \"epoll\"\n\n\
         [[listen]]\nname = \"v4\"\nbind = \"{v4}\"\nupstream = [\"{up}\"]\n\n\
         [[listen]]\nname = \"v6\"\nbind = \"{v6}\"\nupstream = [\"{up}\"]\n"
    )
}

/// IPv6 clients: a /128 and a v6 range are matched like IPv4 ones.
#[test]
fn ipv6_clients_are_matched() {
    if !engine_ok("epoll") {
        return;
    }
    let echo = EchoServer::start(Host::new().addr());
    let listen = free_v6_addr();
    // The harness waits for IPv4 listeners only: a second, IPv4 one tells when both are bound.
    let v4 = Host::new().addr();
    let toml = v4_and_v6(v4, listen, echo.addr());
    let relay = Sluice::run_config_text(&toml, vec![v4]).workers(1).start();
    let v6: IpAddr = "::1".parse().unwrap();
    try_new(listen, v6).expect("before the rule");
    ctl_ok(&relay, &["deny", "add", "::/1"]);
    let s = client::try_connect(listen, Some(v6));
    if let Ok(s) = s {
        let _ = (&s).write_all(b"ping");
        assert_eq!(read_until_end(&s, HUNG), (0, Some(Ended::Reset)));
    }
    assert!(counter(&relay, "refused_denied") >= 1);
    ctl_ok(&relay, &["deny", "del", "::/1"]);
    try_new(listen, v6).expect("after deny del");
}

/// Whether a connection to `listen` from `src` that sends `header`, then a ping, is relayed
/// (false: refused, by a reset or an end before the echo).
fn relayed_after(listen: SocketAddr, src: IpAddr, header: &[u8]) -> bool {
    let Ok(mut s) = client::try_connect(listen, Some(src)) else {
        return false;
    };
    s.set_read_timeout(Some(HUNG)).unwrap();
    s.write_all(header).is_ok() && echoes(&mut s).is_ok()
}

/// IPv4-mapped IPv6 rules (`::ffff:a.b.c.d`, what a dual-stack socket shows a v4 client as)
/// match IPv4 clients, in every place an address is compared: a `deny` rule refuses the v4
/// client it maps (and is listed, and deleted, as the IPv4 range it is); `trusted_proxies`
/// believes the v4 balancer it maps; over a real IPv6 listener ([::1]), a PROXY header from a
/// dual-stack balancer naming `::ffff:a.b.c.d` (TCP6) or a.b.c.d (v2, IPv4) is refused by a
/// `::ffff:` rule and by the IPv4 rule alike. Before the fix, each `::ffff:` rule was an IPv6
/// range no client address (compared as IPv4) ever fell in.
#[test]
fn ipv4_mapped_rules_match_ipv4_clients() {
    if !engine_ok("epoll") {
        return;
    }
    let echo = EchoServer::start(Host::new().addr());
    let v6_lb = free_v6_addr();
    let (plain, v4_lb) = (Host::new().addr(), Host::new().addr());
    let toml = format!(
        "workers = 1\nengine = \"epoll\"\n\n\
         [[listen]]\nname = \"plain\"\nbind = \"{plain}\"\nupstream = [\"{up}\"]\n\n\
         [[listen]]\nname = \"v4-lb\"\nbind = \"{v4_lb}\"\nupstream = [\"{up}\"]\n\
         accept_proxy = true\ntrusted_proxies = [\"::ffff:{SERVED}/128\"]\n\n\
         [[listen]]\nname = \"v6-lb\"\nbind = \"{v6_lb}\"\nupstream = [\"{up}\"]\n\
         accept_proxy = true\n",
        up = echo.addr()
    );
    // The harness waits for IPv4 listeners only; the [::1] one is bound in the same step.
    let relay = Sluice::run_config_text(&toml, vec![plain, v4_lb])
        .workers(1)
        .start();

    // A deny rule written as the mapped address refuses the IPv4 client.
    assert_served(&relay, DENIED, "before the rule");
    ctl_ok(&relay, &["deny", "add", "::ffff:127.0.0.3"]);
    assert_refused(&relay, DENIED, "deny ::ffff:127.0.0.3");
    assert_served(&relay, SERVED, "not denied");
    let listed = ctl_ok(&relay, &["deny", "list"]);
    assert_eq!(
        listed.trim(),
        "127.0.0.3/32",
        "listed as the IPv4 rule it is"
    );
    ctl_ok(&relay, &["deny", "del", "::ffff:127.0.0.3/128"]);
    assert_served(&relay, DENIED, "after deny del of the mapped form");

    // trusted_proxies written as the mapped address believes the IPv4 balancer.
    let src: SocketAddr = "198.51.100.7:4000".parse().unwrap();
    assert!(
        relayed_after(v4_lb, SERVED, &client::proxy_v1(src, v4_lb)),
        "a balancer trusted as ::ffff:{SERVED} is believed"
    );
    assert!(
        !relayed_after(v4_lb, DENIED, &client::proxy_v1(src, v4_lb)),
        "another source is not"
    );

    // Over [::1]: a dual-stack balancer's IPv4 client, as ::ffff: (TCP6) or IPv4 (v2).
    let v6: IpAddr = "::1".parse().unwrap();
    let mapped: SocketAddr = "[::ffff:198.51.100.7]:4000".parse().unwrap();
    let plain_v4: SocketAddr = "198.51.100.8:4000".parse().unwrap();
    let v4_dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
    let tcp6 = client::proxy_v1(mapped, v6_lb);
    let v2 = client::proxy_v2(plain_v4, v4_dst);
    assert!(
        relayed_after(v6_lb, v6, &tcp6),
        "TCP6 ::ffff: before a rule"
    );
    assert!(relayed_after(v6_lb, v6, &v2), "v2 IPv4 before a rule");
    for rule in ["::ffff:198.51.100.0/120", "198.51.100.0/24"] {
        ctl_ok(&relay, &["deny", "add", rule]);
        assert!(
            !relayed_after(v6_lb, v6, &tcp6),
            "TCP6 ::ffff: under {rule}"
        );
        assert!(!relayed_after(v6_lb, v6, &v2), "v2 IPv4 under {rule}");
        ctl_ok(&relay, &["deny", "del", rule]);
        assert!(
            relayed_after(v6_lb, v6, &tcp6),
            "TCP6 ::ffff: after del {rule}"
        );
    }
    assert!(counter(&relay, "refused_denied") >= 5);
}

/// An interface XDP cannot attach to costs one clear log line; the workers still refuse.
#[test]
fn xdp_attach_failure_is_one_line_and_deny_still_works() {
    if !engine_ok("epoll") {
        return;
    }
    let echo = EchoServer::start(Host::new().addr());
    let relay = Sluice::forward(Host::new().addr(), echo.addr())
        .engine("epoll")
        .workers(2)
        .arg("--xdp")
        .arg("nosuchif0")
        .start();
    ctl_ok(&relay, &["deny", "add", "127.0.0.3/32"]);
    assert_refused(&relay, DENIED, "denied, XDP not attached");
    assert_served(&relay, SERVED, "not denied");
    let log = relay.stderr_log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot attach the XDP deny program"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("nosuchif0"), "{log}");
    assert!(
        !log.contains("127.0.0.3"),
        "a client address in the log: {log}"
    );
}

/// The control socket is mode 0600: another user gets "permission denied" (exit 1), and the
/// lists stay as they were.
#[test]
fn sluicectl_permission_denied_for_other_users() {
    if !sluice_tests::require_root()
        || !sluice_tests::require_program("setpriv")
        || !engine_ok("epoll")
    {
        return;
    }
    let (relay, _echo) = echo_relay("epoll");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(sluice_tests::sluice::sluicectl_bin())
        .arg("--control")
        .arg(relay.dir().join("control.sock"))
        .args(["deny", "add", "127.0.0.3/32"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1), "{}", out.text());
    assert!(out.stderr.contains("permission denied"), "{}", out.stderr);
    assert_eq!(ctl_ok(&relay, &["deny", "list"]).trim(), "");
    assert_served(&relay, DENIED, "nothing was denied");
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Runs only with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (namespaces, bpffs); otherwise says
/// why and returns false, or fails under `SLUICE_REQUIRE_CAPS=1` (see `sluice_tests::skip`).
fn bpf_gate() -> bool {
    let eff = sluice_tests::effective_caps();
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(bit, _)| eff & (1 << bit) == 0)
    .map(|(_, n)| *n)
    .collect();
    if !missing.is_empty() {
        return sluice_tests::skip(&format!("needs {}", missing.join(", ")));
    }
    sluice_tests::require_netns()
}

/// Runs `f` on a thread of its own inside a new network namespace with `lo` up; processes it
/// starts live there too. The namespace dies with the thread and its processes.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: plain syscall on this thread only; CLONE_NEWNET moves just the calling thread
        // (network namespaces are per task), which no other code shares.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let status = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip (iproute2; cargo xtask setup installs it)");
        assert!(status.success(), "ip link set lo up: {status}");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// In a namespace of its own: `sluicectl load` pins the maps and programs in a private pin
/// directory, the daemon attaches XDP to `lo` with those maps (`--xdp lo --bpf-pin-dir`), and
/// `sluicectl deny add` makes SYNs from the denied address vanish before they cost a socket
/// (the XDP counter rises, the workers accept nothing), while other clients are served. `del`
/// lets the client in again; `sluicectl unload` removes the pins.
#[test]
fn xdp_drops_denied_syns_through_the_daemon() {
    if !bpf_gate() || !engine_ok("epoll") {
        return;
    }
    in_netns(|| {
        let bpffs = super::ebpf::Bpffs::mount();
        let pins = bpffs.path().join("sluice");
        let pins_s = pins.to_string_lossy().into_owned();
        let ctl = |args: &[&str]| {
            let mut cmd = Command::new(sluice_tests::sluice::sluicectl_bin());
            cmd.args(args);
            run_with_timeout(&mut cmd, Duration::from_secs(30))
        };
        let out = ctl(&["load", "--pin-dir", &pins_s]);
        assert!(out.status.success(), "sluicectl load: {}", out.text());
        for name in [
            "SLUICE_DENY_V4",
            "SLUICE_SOCKS",
            "sluice_xdp_deny",
            "sluice_verdict",
        ] {
            assert!(
                pins.join(name).exists(),
                "{name} not pinned: {}",
                out.text()
            );
        }

        let echo = EchoServer::start(Host::new().addr());
        let relay = Sluice::forward(Host::new().addr(), echo.addr())
            .engine("epoll")
            .workers(1)
            .arg("--xdp")
            .arg("lo")
            .arg("--bpf-pin-dir")
            .arg(pins_s.clone())
            .start();
        assert!(
            wait_until(HUNG, || relay
                .stderr_log()
                .contains("XDP deny program attached")),
            "{}",
            relay.stderr_log()
        );
        assert_served(&relay, DENIED, "before the rule");
        let status = relay.status();
        assert_eq!(
            status["admission"]["xdp_interfaces"],
            serde_json::json!(["lo"]),
            "{status}"
        );
        let out = ctl_ok(&relay, &["deny", "add", "127.0.0.3/32"]);
        assert!(out.contains("XDP"), "{out}");

        let xdp = sluice::ebpf::XdpDeny::open_pinned(&pins).expect("open the pinned tries");
        assert_eq!(
            xdp.deny_list()
                .unwrap()
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
            ["127.0.0.3/32"],
            "the daemon mirrored its deny list into the pinned trie"
        );
        let before = xdp.stats().unwrap();
        let accepted = counter(&relay, "accepted");
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(DENIED, 0).into()).unwrap();
        let err = s
            .connect_timeout(&relay.addr().into(), Duration::from_millis(1500))
            .expect_err("a denied client's handshake completed");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        let after = xdp.stats().unwrap();
        assert!(
            after.dropped_v4 > before.dropped_v4,
            "{before:?} -> {after:?}"
        );
        assert_eq!(
            counter(&relay, "refused_denied"),
            0,
            "a socket was accepted"
        );
        assert_eq!(counter(&relay, "accepted"), accepted);
        assert_served(&relay, SERVED, "not denied");

        ctl_ok(&relay, &["deny", "del", "127.0.0.3/32"]);
        assert!(xdp.deny_list().unwrap().is_empty());
        assert_served(&relay, DENIED, "after deny del");
        drop(xdp);
        let _ = relay.stop();

        let out = ctl(&["unload", "--pin-dir", &pins_s]);
        assert!(out.status.success(), "sluicectl unload: {}", out.text());
        assert!(!pins.exists(), "pins left after unload");
    });
}

/// `sluicectl load` with the default pin directory mounts bpffs at /sys/fs/bpf when nothing is
/// mounted there, pins under /sys/fs/bpf/sluice, and `unload` removes the pins. Run in a
/// private mount namespace (`unshare --mount`), so the host's /sys/fs/bpf is never touched.
#[test]
fn load_mounts_bpffs_and_unload_removes_the_pins() {
    if !bpf_gate() || !sluice_tests::require_program("unshare") {
        return;
    }
    sluice_tests::init();
    let ctl = sluice_tests::sluice::sluicectl_bin();
    let ctl = ctl.to_string_lossy();
    let script = format!(
        "set -e
umount -l /sys/fs/bpf 2>/dev/null || true
if grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; then echo 'still mounted'; exit 3; fi
'{ctl}' load
grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts || {{ echo 'not mounted by load'; exit 4; }}
for f in SLUICE_DENY_V4 SLUICE_SOCKS sluice_xdp_deny sluice_verdict; do
  test -e /sys/fs/bpf/sluice/$f || {{ echo \"$f not pinned\"; exit 5; }}
done
'{ctl}' load
'{ctl}' unload
test ! -e /sys/fs/bpf/sluice || {{ echo 'pins left'; exit 6; }}
'{ctl}' unload
echo done
"
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}: {}", out.status, out.text());
    assert!(
        out.stdout.contains("pinned under /sys/fs/bpf/sluice"),
        "{}",
        out.text()
    );
    assert!(out.stdout.contains("unpinned from"), "{}", out.text());
    assert!(out.stdout.contains("nothing pinned"), "{}", out.text());
}

/// The name every DNS test below asks for: in no hosts file, so only DNS could answer it.
const SILENT_NAME: &str = "never-answers.sluice-test";

/// A DNS server that never answers: a UDP socket on port 53 of an address of its own that
/// takes queries and never reads them (nothing listening would refuse them at once), and the
/// resolv.conf and nsswitch.conf that point at it only. [`SilentDns::wrapper`] runs a program
/// under those files in a mount namespace of its own (`unshare --mount`, bind mounts), so the
/// host's resolver configuration is never touched.
struct SilentDns {
    _socket: std::net::UdpSocket,
    dir: sluice_tests::TempDir,
}

impl SilentDns {
    fn start() -> SilentDns {
        let ip = Host::new().ip;
        let socket = std::net::UdpSocket::bind((ip, 53)).expect("bind UDP port 53 (root)");
        let dir = sluice_tests::TempDir::new();
        // glibc's longest wait (30 s), one try: without a deadline of its own a lookup hangs
        // for all of it.
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {ip}\noptions timeout:30 attempts:1\n"),
        )
        .unwrap();
        std::fs::write(dir.join("nsswitch.conf"), "hosts: files dns\n").unwrap();
        SilentDns {
            _socket: socket,
            dir,
        }
    }

    /// A prefix that execs the rest of the command line with this resolver.
    fn wrapper(&self) -> Vec<String> {
        let script = "mount --bind \"$1\" /etc/resolv.conf && \
                      mount --bind \"$2\" /etc/nsswitch.conf && shift 2 && exec \"$@\"";
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            self.dir.join("resolv.conf").to_string_lossy().into_owned(),
            self.dir
                .join("nsswitch.conf")
                .to_string_lossy()
                .into_owned(),
        ])
        .collect()
    }
}

/// A `dest` command naming a host whose DNS server never answers (the daemon resolves names it
/// is sent; `sluicectl` resolves its own first) holds neither the control socket nor the
/// supervisor: while it waits, `status` answers within a second and `deny add` (which goes
/// through the supervisor's loop to every worker) is applied; the lookup is given up at its
/// deadline (5 s) with an error naming the name. `sluicectl dest add NAME` under the same
/// resolver fails the same way at the same deadline instead of hanging. Before the fix the
/// control socket answered one request at a time and the lookup waited for glibc's 30 s, so
/// `status` waited behind it (and timed out at 10 s).
#[test]
fn a_dest_name_the_dns_never_answers_holds_nothing_up() {
    if !sluice_tests::require_root()
        || !sluice_tests::require_program("unshare")
        || !engine_ok("epoll")
    {
        return;
    }
    let dns = SilentDns::start();
    let wrapper = dns.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let echo = EchoServer::start(Host::new().addr());
    let relay = Sluice::forward(Host::new().addr(), echo.addr())
        .engine("epoll")
        .workers(2)
        .wrap(&wrapper)
        .start();
    let path = relay.control_path().to_path_buf();
    let line = format!("dest add {SILENT_NAME}:443");
    let started = std::time::Instant::now();
    let waiting = std::thread::spawn(move || {
        let r = sluice::control::request(&path, &line);
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let r = sluice::control::request(relay.control_path(), "status");
        let took = t.elapsed();
        eprintln!("status while `{SILENT_NAME}` resolves took {took:?}");
        assert!(r.is_ok(), "status while a dest name resolves: {r:?}");
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("status while `{SILENT_NAME}` resolves: slowest of 5 took {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "status took {slowest:?} while a dest name resolved"
    );
    let t = std::time::Instant::now();
    let out = ctl_ok(&relay, &["deny", "add", "127.0.0.3/32"]);
    eprintln!(
        "deny add while `{SILENT_NAME}` resolves took {:?}",
        t.elapsed()
    );
    assert!(out.contains("2/2 workers applied it"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the checks above took until the lookup's deadline: they were not served beside it"
    );
    assert_refused(&relay, DENIED, "denied while a dest name resolved");

    let (r, took) = waiting.join().unwrap();
    eprintln!("raw `dest add {SILENT_NAME}:443` answered after {took:?}: {r:?}");
    let e = r.expect_err("a name no DNS answers was added").to_string();
    assert!(
        e.contains(SILENT_NAME) && e.contains("within 5 s"),
        "the error names neither the name nor the deadline: {e}"
    );
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(8),
        "answered after {took:?}, not at the 5 s deadline"
    );
    assert_eq!(ctl_ok(&relay, &["dest", "list"]).trim(), "");

    // sluicectl resolves the name itself, under the same resolver: the same deadline.
    let mut cmd = Command::new(wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(sluice_tests::sluice::sluicectl_bin())
        .arg("--control")
        .arg(relay.control_path())
        .args(["dest", "add", &format!("{SILENT_NAME}:443")]);
    let t = std::time::Instant::now();
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    let took = t.elapsed();
    eprintln!(
        "sluicectl dest add {SILENT_NAME}:443 exited after {took:?}: {}",
        out.text()
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.text());
    assert!(
        out.stderr.contains(SILENT_NAME) && out.stderr.contains("within 5 s"),
        "{}",
        out.stderr
    );
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(8),
        "sluicectl gave up after {took:?}, not at the 5 s deadline"
    );
    assert_served(&relay, SERVED, "after the lookups");
}

/// Connects from `from` (port 0) to `to` with a deadline: Ok when the handshake completed.
fn handshake(from: IpAddr, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), timeout)?;
    Ok(s.into())
}

/// XDP drops denied SYNs to the relay's own ports only: with `deny add 0.0.0.0/0` and `::/0`
/// (and XDP on `lo` in a namespace of this test's own), a client can no longer reach the
/// relay's IPv4 and IPv6 listeners (the SYN vanishes: the handshake times out, no worker
/// accepts), but it still reaches another service listening on other ports in the same
/// namespace (the host's SSH, say). Before the fix the program dropped every denied SYN to any port of the host.
#[test]
fn xdp_deny_spares_ports_the_relay_does_not_listen_on() {
    if !bpf_gate() || !engine_ok("epoll") {
        return;
    }
    in_netns(|| {
        let echo = EchoServer::start(Host::new().addr());
        let v6 = free_v6_addr();
        let v4 = Host::new().addr();
        let toml = v4_and_v6(v4, v6, echo.addr());
        // A pin directory nothing is pinned in: the daemon's own, private maps.
        let unpinned = sluice_tests::TempDir::new();
        // The harness waits for IPv4 listeners only; the [::1] one is bound in the same step.
        let relay = Sluice::run_config_text(&toml, vec![v4])
            .workers(1)
            .arg("--xdp")
            .arg("lo")
            .arg("--bpf-pin-dir")
            .arg(unpinned.join("sluice").to_string_lossy().into_owned())
            .start();
        assert!(
            wait_until(HUNG, || relay
                .stderr_log()
                .contains("XDP deny program attached")),
            "{}",
            relay.stderr_log()
        );
        // Another service in the namespace, on ports the relay does not listen on.
        let service4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let service6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let (other4, other6) = (
            service4.local_addr().unwrap(),
            service6.local_addr().unwrap(),
        );
        let six: IpAddr = "::1".parse().unwrap();
        try_new(v4, DENIED).expect("relayed before the rules");
        try_new(v6, six).expect("relayed over IPv6 before the rules");

        for rule in ["0.0.0.0/0", "::/0"] {
            let out = ctl_ok(&relay, &["deny", "add", rule]);
            assert!(out.contains("XDP"), "{out}");
        }
        let accepted = counter(&relay, "accepted");
        for (from, to) in [(DENIED, v4), (six, v6)] {
            let err = handshake(from, to, Duration::from_millis(1500))
                .expect_err("a denied client's handshake with the relay completed");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::TimedOut,
                "{from} -> {to}: {err}"
            );
        }
        assert_eq!(counter(&relay, "accepted"), accepted, "a worker accepted");
        for (from, to) in [(DENIED, other4), (six, other6)] {
            handshake(from, to, Duration::from_millis(1500)).unwrap_or_else(|e| {
                panic!("{from} -> {to}, a port the relay does not listen on: {e}")
            });
        }

        for rule in ["0.0.0.0/0", "::/0"] {
            ctl_ok(&relay, &["deny", "del", rule]);
        }
        try_new(v4, DENIED).expect("relayed after deny del");
        try_new(v6, six).expect("relayed over IPv6 after deny del");
    });
}
