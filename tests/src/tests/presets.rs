//! The `whatsapp` and `signal` presets: `sluice check-config --preset NAME` prints what the
//! real deployments configure (WhatsApp/proxy's HAProxy file, Signal-TLS-Proxy's nginx tiers),
//! checked key by key; then each preset runs end to end from that output, with every `bind`
//! moved to a test address, the upstream names kept (only their ports moved) and pointed at
//! local servers with `[resolve]` / `--resolve`, and the TLS tables given certificate files.
//!
//! - WhatsApp: all eight ports reach their upstream with the right PROXY behaviour (sent from
//!   the socket, passed on from the client's v1/v2 header, or none), TLS on the chat ports,
//!   8443 behind HAProxy `send-proxy-v2` like the Helm chart's load balancer.
//! - Signal: outer TLS (socat) around an inner TLS (curl) for `chat.signal.org` reaches a local
//!   nginx with that name's certificate, byte-exact; a name outside the list, and plain HTTP
//!   inside the outer TLS, never reach an upstream: the preset's decoy answers them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use sluice_tests::client::{proxy_v1, proxy_v2, send_and_read_to_end};
use sluice_tests::peers::{Haproxy, KeyKind, Leaf, Nginx, Pki, SClient};
use sluice_tests::servers::TagEchoServer;
use sluice_tests::sluice::sluice_bin;
use sluice_tests::{
    ChildGuard, HUNG, Host, Output, Pattern, Sluice, find_program, init, require_program,
    run_with_timeout, tail, wait_listening,
};
use toml::Value;

use super::seed;

/// Signal's hosts, from Signal-TLS-Proxy's nginx relay tier.
const SIGNAL_HOSTS: [&str; 13] = [
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

/// `sluice check-config --preset NAME`, parsed; also fed back to `sluice check-config FILE`.
pub(super) fn preset(name: &str) -> Value {
    let mut cmd = Command::new(sluice_bin());
    cmd.args(["check-config", "--preset", name]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(
        out.status.success(),
        "check-config --preset {name}: {}",
        out.text()
    );
    let back = Sluice::check_config(&out.stdout);
    assert!(
        back.status.success(),
        "the printed {name} preset is not a valid config file: {}\n{}",
        back.text(),
        out.stdout
    );
    out.stdout.parse::<Value>().unwrap_or_else(|e| {
        panic!(
            "check-config --preset {name} is not TOML ({e}):\n{}",
            out.stdout
        )
    })
}

fn int(v: &Value, key: &str) -> i64 {
    v.get(key)
        .and_then(Value::as_integer)
        .unwrap_or_else(|| panic!("no integer `{key}` in {v}"))
}

pub(super) fn string<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string `{key}` in {v}"))
}

pub(super) fn listeners(v: &Value) -> &Vec<Value> {
    v["listen"].as_array().expect("[[listen]] tables")
}

fn upstreams(l: &Value) -> Vec<&str> {
    l["upstream"]
        .as_array()
        .expect("upstream list")
        .iter()
        .map(|u| u.as_str().expect("upstream string"))
        .collect()
}

/// The listener tables by port.
fn by_port(v: &Value) -> BTreeMap<u16, &Value> {
    listeners(v)
        .iter()
        .map(|l| {
            let bind: SocketAddr = string(l, "bind").parse().expect("bind address");
            assert_eq!(
                bind.ip(),
                IpAddr::from([0, 0, 0, 0]),
                "preset binds are IPv4 any: {l}"
            );
            (bind.port(), l)
        })
        .collect()
}

#[test]
fn whatsapp_preset_matches_haproxy_config() {
    init();
    let v = preset("whatsapp");
    assert_eq!(int(&v, "max_connections"), 27_500);
    let t = &v["timeouts"];
    assert_eq!(
        (int(t, "connect_ms"), int(t, "idle_ms"), int(t, "fin_ms")),
        (5_000, 200_000, 1_000),
        "timeouts connect, client/server, client-fin/server-fin"
    );
    let ports = by_port(&v);
    assert_eq!(
        ports.keys().copied().collect::<Vec<_>>(),
        vec![80, 443, 587, 5222, 7777, 8080, 8222, 8443]
    );
    for (port, l) in ports {
        let tls = l.get("tls");
        assert_eq!(tls.is_some(), matches!(port, 443 | 8443), "tls on {port}");
        if let Some(tls) = tls {
            // The WhatsApp proxy generates its certificate at every start.
            assert!(
                tls.get("cert").is_none() && tls.get("key").is_none(),
                "{port}: a generated certificate, not files: {tls}"
            );
        }
        assert_eq!(
            l.get("accept_proxy")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            matches!(port, 8080 | 8443 | 8222),
            "accept_proxy on {port}"
        );
        let send = l
            .get("send_proxy")
            .and_then(Value::as_str)
            .unwrap_or("none");
        let want = if matches!(port, 587 | 7777) {
            "none"
        } else {
            "v1"
        };
        assert_eq!(send, want, "send_proxy on {port}");
        assert_eq!(int(l, "max_connections"), 27_495, "maxconn of {port}");
        assert_eq!(
            l.get("route").and_then(Value::as_str).unwrap_or("static"),
            "static"
        );
        let up = match port {
            80 | 8080 => "g.whatsapp.net:80",
            443 | 8443 | 5222 | 8222 => "g.whatsapp.net:5222",
            _ => "whatsapp.net:443",
        };
        assert_eq!(upstreams(l), vec![up], "upstream of {port}");
        // HAProxy's `check inter 60s fastinter 1s downinter 3s rise 2 fall 3`.
        let h = l
            .get("health")
            .unwrap_or_else(|| panic!("no health checks on {port}: {l}"));
        assert_eq!(
            [
                "interval_ms",
                "fast_interval_ms",
                "down_interval_ms",
                "rise",
                "fall"
            ]
            .map(|k| int(h, k)),
            [60_000, 1_000, 3_000, 2, 3],
            "health checks of {port}"
        );
    }
}

#[test]
fn signal_preset_matches_signal_tls_proxy() {
    init();
    let v = preset("signal");
    let t = &v["timeouts"];
    assert_eq!(int(t, "header_ms"), 30_000, "preread timeout");
    assert_eq!(int(t, "connect_ms"), 60_000, "proxy_connect_timeout");
    assert_eq!(int(t, "idle_ms"), 600_000, "proxy_timeout");
    let ports = by_port(&v);
    assert_eq!(ports.keys().copied().collect::<Vec<_>>(), vec![443]);
    let l = ports[&443];
    assert!(l.get("tls").is_some(), "443 terminates TLS: {l}");
    assert_eq!(string(l, "route"), "sni");
    assert!(
        !l.get("accept_proxy")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    );
    assert_eq!(
        l.get("send_proxy")
            .and_then(Value::as_str)
            .unwrap_or("none"),
        "none"
    );
    let got: BTreeSet<&str> = upstreams(l).into_iter().collect();
    let want: BTreeSet<String> = SIGNAL_HOSTS.iter().map(|h| format!("{h}:443")).collect();
    let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
    assert_eq!(got, want, "Signal's hosts on 443");
}

/// Rewrites a preset for a test: `workers = 1`, each listener's `bind` to `binds[name]`, each
/// upstream `HOST:PORT` to `HOST:ports[HOST:PORT]`, `resolve` as the `[resolve]` table, and
/// `leaf`'s files in every `[listen.tls]`.
pub(super) fn rewrite(
    mut v: Value,
    binds: &BTreeMap<String, SocketAddr>,
    ports: &BTreeMap<String, u16>,
    resolve: &[(&str, IpAddr)],
    leaf: &Leaf,
) -> String {
    v["workers"] = Value::Integer(1);
    if !resolve.is_empty() {
        let table = resolve
            .iter()
            .map(|(h, ip)| (h.to_string(), Value::String(ip.to_string())))
            .collect();
        v.as_table_mut()
            .unwrap()
            .insert("resolve".into(), Value::Table(table));
    }
    for l in v["listen"].as_array_mut().unwrap() {
        let name = string(l, "name").to_owned();
        let bind = binds
            .get(&name)
            .unwrap_or_else(|| panic!("no test address for listener {name}"));
        l["bind"] = Value::String(bind.to_string());
        for u in l["upstream"].as_array_mut().unwrap() {
            let s = u.as_str().unwrap().to_owned();
            let (host, _) = s.rsplit_once(':').unwrap();
            let port = ports
                .get(&s)
                .unwrap_or_else(|| panic!("no test port for upstream {s}"));
            *u = Value::String(format!("{host}:{port}"));
        }
        // Fallback servers (if the preset lists any) go to the same test ports when known.
        if let Some(list) = l.get_mut("fallback").and_then(Value::as_array_mut) {
            for u in list {
                let s = u.as_str().unwrap_or_default().to_owned();
                if let (Some((host, _)), Some(port)) = (s.rsplit_once(':'), ports.get(&s)) {
                    *u = Value::String(format!("{host}:{port}"));
                }
            }
        }
        if let Some(tls) = l.get_mut("tls").and_then(Value::as_table_mut) {
            tls.insert(
                "cert".into(),
                Value::String(leaf.fullchain.display().to_string()),
            );
            tls.insert("key".into(), Value::String(leaf.key.display().to_string()));
        }
    }
    toml::to_string(&v).unwrap()
}

/// Splits a v1 line off `got`: its fields and the rest.
fn v1_fields(got: &[u8]) -> (Vec<String>, &[u8]) {
    let end = got
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or_else(|| panic!("no PROXY v1 line in {:?}", String::from_utf8_lossy(got)));
    let line = String::from_utf8_lossy(&got[..end]).into_owned();
    (line.split(' ').map(String::from).collect(), &got[end + 2..])
}

/// The WhatsApp preset from `check-config`, on test addresses, every port end to end.
#[test]
fn whatsapp_preset_end_to_end() {
    init();
    if !require_program("openssl") || !require_program("haproxy") {
        return;
    }
    let v = preset("whatsapp");
    let (relay_host, g, w, client) = (Host::new(), Host::new(), Host::new(), Host::new());
    // Each upstream greets with its tag (the preset's health checks connect too, so which
    // server a client reached is told by the tag, not by counting connections).
    let (e80, e5222, e443) = (
        TagEchoServer::start(g.addr(), b"g80\n"),
        TagEchoServer::start(g.addr(), b"g5222\n"),
        TagEchoServer::start(w.addr(), b"w443\n"),
    );
    let ports: BTreeMap<String, u16> = [
        ("g.whatsapp.net:80", e80.addr().port()),
        ("g.whatsapp.net:5222", e5222.addr().port()),
        ("whatsapp.net:443", e443.addr().port()),
    ]
    .map(|(k, p)| (k.to_owned(), p))
    .into();
    let binds: BTreeMap<String, SocketAddr> = listeners(&v)
        .iter()
        .map(|l| (string(l, "name").to_owned(), relay_host.addr()))
        .collect();
    // The preset's port of each listener -> its test address.
    let at: BTreeMap<u16, SocketAddr> = listeners(&v)
        .iter()
        .map(|l| {
            let port = string(l, "bind").parse::<SocketAddr>().unwrap().port();
            (port, binds[string(l, "name")])
        })
        .collect();
    let pki = Pki::new();
    let leaf = pki.leaf("wa-relay.test", &["DNS:wa-relay.test"], KeyKind::Ec);
    let text = rewrite(
        v,
        &binds,
        &ports,
        &[
            ("g.whatsapp.net", IpAddr::V4(g.ip)),
            ("whatsapp.net", IpAddr::V4(w.ip)),
        ],
        &leaf,
    );
    let relay = Sluice::run_config_text(&text, at.values().copied().collect()).start();
    let payload = Pattern::new(seed()).bytes(0, 4096);
    let src: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let dst: SocketAddr = "203.0.113.9:8443".parse().unwrap();
    let from_header = format!(
        "PROXY TCP4 {} {} {} {}",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    );

    // Plain ports sending v1 from the client's socket: 80, 5222.
    for (port, tag) in [(80, "g80"), (5222, "g5222")] {
        let (local, got, _) =
            send_and_read_to_end(at[&port], Some(IpAddr::V4(client.ip)), &payload);
        let (fields, rest) = v1_fields(untag(&got, tag, port));
        let want = format!(
            "PROXY TCP4 {} {} {} {}",
            client.ip,
            at[&port].ip(),
            local.port(),
            at[&port].port()
        );
        assert_eq!(fields.join(" "), want, "port {port}: the header upstream");
        assert!(
            rest == payload.as_slice(),
            "port {port}: the bytes after it"
        );
    }
    // PROXY ports: v1 on 8080 and v2 on 8222 in, v1 out with the header's addresses; no header
    // is refused.
    for (port, tag, header) in [
        (8080, "g80", proxy_v1(src, dst)),
        (8222, "g5222", proxy_v2(src, dst)),
    ] {
        let (_, got, _) =
            send_and_read_to_end(at[&port], None, &[header, payload.clone()].concat());
        let (fields, rest) = v1_fields(untag(&got, tag, port));
        assert_eq!(
            fields.join(" "),
            from_header,
            "port {port}: the header upstream"
        );
        assert!(
            rest == payload.as_slice(),
            "port {port}: the bytes after it"
        );
        let (_, got, ended) = send_and_read_to_end(at[&port], None, &payload);
        assert!(
            got.is_empty() && ended.is_some(),
            "port {port}: a client without a PROXY header got {} bytes",
            got.len()
        );
    }
    assert_eq!(relay.wait_counter("refused_bad_header", 2, HUNG), 2);
    // Media ports: no header either way, the bytes as they are (a PROXY line is just data).
    for port in [587, 7777] {
        let data = [proxy_v1(src, dst), payload.clone()].concat();
        let (_, got, _) = send_and_read_to_end(at[&port], None, &data);
        let got = untag(&got, "w443", port);
        assert!(got == data, "port {port}: {} bytes back", got.len());
    }
    // TLS on 443: s_client (verifying the configured certificate) -> v1 from its socket.
    let tls_exchange = |addr: SocketAddr| -> Vec<u8> {
        let mut c = SClient::start(&[
            "-connect",
            &addr.to_string(),
            "-servername",
            "wa-relay.test",
            "-verify_hostname",
            "wa-relay.test",
            "-verify_return_error",
            "-CAfile",
            &pki.ca().display().to_string(),
        ]);
        c.send(&payload);
        let got = c.read_until(HUNG, |g| g.ends_with(&payload));
        assert!(
            got.ends_with(&payload),
            "TLS via {addr}: got {} bytes; s_client: {}",
            got.len(),
            c.stderr()
        );
        got
    };
    let got = tls_exchange(at[&443]);
    let (fields, rest) = v1_fields(untag(&got, "g5222", 443));
    assert_eq!(fields.len(), 6, "{fields:?}");
    assert_eq!(
        (&fields[..2], fields[3].as_str(), fields[5].as_str()),
        (
            &["PROXY".to_owned(), "TCP4".to_owned()][..],
            at[&443].ip().to_string().as_str(),
            at[&443].port().to_string().as_str()
        ),
        "443: the header upstream"
    );
    assert!(rest == payload.as_slice());
    // TLS on 8443 behind HAProxy send-proxy-v2 (the Helm chart's load balancer).
    let fe = Host::new().addr();
    let _haproxy = Haproxy::start(
        &format!(
            "frontend lb\n    bind {fe}\n    default_backend relay\n\
             backend relay\n    server r {} send-proxy-v2\n",
            at[&8443]
        ),
        &[fe],
    );
    let got = tls_exchange(fe);
    let (fields, rest) = v1_fields(untag(&got, "g5222", 8443));
    assert_eq!(fields.len(), 6, "{fields:?}");
    assert_eq!(
        (fields[3].as_str(), fields[5].as_str()),
        (fe.ip().to_string().as_str(), fe.port().to_string().as_str()),
        "8443: the load balancer's header passed on: {fields:?}"
    );
    assert!(rest == payload.as_slice());
}

/// `got` without the upstream's greeting `tag` (and its newline), which must be there.
pub(super) fn untag<'a>(got: &'a [u8], tag: &str, port: u16) -> &'a [u8] {
    let tag = format!("{tag}\n");
    got.strip_prefix(tag.as_bytes()).unwrap_or_else(|| {
        panic!(
            "port {port}: the answer does not start with upstream {tag:?}: {:?}",
            String::from_utf8_lossy(&got[..got.len().min(80)])
        )
    })
}

/// An outer TLS tunnel like the Signal app's: socat listens on a fresh test address, takes one
/// connection, and carries it over TLS (verifying the relay's certificate, with an outer SNI the
/// relay does not check) to `relay`.
pub(super) fn outer_tls(relay: SocketAddr, ca: &std::path::Path) -> (ChildGuard, SocketAddr) {
    let at = Host::new().addr();
    let mut cmd = Command::new(find_program("socat").expect("socat"));
    cmd.args(["-T", "30"])
        .arg(format!(
            "TCP-LISTEN:{},bind={},reuseaddr",
            at.port(),
            at.ip()
        ))
        .arg(format!(
            "OPENSSL:{}:{},cafile={},commonname=signal-proxy.test,snihost=anything.example",
            relay.ip(),
            relay.port(),
            ca.display()
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let guard = ChildGuard::spawn("socat", &mut cmd);
    assert!(
        wait_listening(at, Duration::from_secs(10)),
        "socat not listening on {at}"
    );
    (guard, at)
}

/// curl `url` (https or http), its host name connected to `via`, trusting `ca`.
fn curl_via(
    url: &str,
    name: &str,
    via: SocketAddr,
    ca: &std::path::Path,
    out: &std::path::Path,
) -> Output {
    let port = if url.starts_with("https") { 443 } else { 80 };
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--fail", "--max-time", "20", "--cacert"])
        .arg(ca)
        .arg("--connect-to")
        .arg(format!("{name}:{port}:{}:{}", via.ip(), via.port()))
        .arg("-o")
        .arg(out)
        .arg(url);
    run_with_timeout(&mut curl, Duration::from_secs(40))
}

/// The Signal preset from `check-config` on a test address, names pointed at a local nginx with
/// `--resolve`: TLS inside TLS reaches it for Signal's names only.
#[test]
fn signal_preset_end_to_end() {
    init();
    if !require_program("openssl")
        || !require_program("socat")
        || !require_program("curl")
        || !require_program("nginx")
    {
        return;
    }
    let v = preset("signal");
    let (relay_host, signal) = (Host::new(), Host::new());
    let pki = Pki::new();
    let sans: Vec<String> = SIGNAL_HOSTS.iter().map(|h| format!("DNS:{h}")).collect();
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    let inner = pki.leaf("chat.signal.org", &sans, KeyKind::Ec);
    let outer = pki.leaf("signal-proxy.test", &["DNS:signal-proxy.test"], KeyKind::Ec);
    let nginx = Nginx::start_with(
        signal.addr(),
        "ssl",
        &format!(
            "ssl_certificate {}; ssl_certificate_key {}; ssl_protocols TLSv1.2 TLSv1.3;",
            inner.fullchain.display(),
            inner.key.display()
        ),
    );
    let len = 2_000_000;
    let body = Pattern::new(seed()).bytes(0, len);
    fs::write(nginx.root().join("file.bin"), &body).unwrap();
    let ports: BTreeMap<String, u16> = SIGNAL_HOSTS
        .iter()
        .map(|h| (format!("{h}:443"), nginx.addr().port()))
        .collect();
    let bind = relay_host.addr();
    let binds: BTreeMap<String, SocketAddr> = listeners(&v)
        .iter()
        .map(|l| (string(l, "name").to_owned(), bind))
        .collect();
    let text = rewrite(v, &binds, &ports, &[], &outer);
    let mut cmd = Sluice::run_config_text(&text, vec![bind]);
    for h in SIGNAL_HOSTS {
        cmd = cmd.resolve(h, IpAddr::V4(signal.ip));
    }
    let relay = cmd.start();
    let ca = pki.ca();

    for name in ["chat.signal.org", "storage.signal.org"] {
        let (mut socat, via) = outer_tls(relay.addr(), &ca);
        let out_path = nginx.dir().join(format!("{name}.bin"));
        let out = curl_via(
            &format!("https://{name}/file.bin"),
            name,
            via,
            &ca,
            &out_path,
        );
        assert!(
            out.status.success(),
            "{name} through TLS in TLS: {}\nnginx: {}",
            out.text(),
            tail(&nginx.error_log(), 20)
        );
        let got = fs::read(&out_path).unwrap();
        assert!(
            got == body,
            "{name}: {} bytes of {len}, or different ones",
            got.len()
        );
        socat.wait_timeout(Duration::from_secs(5));
    }

    // Inside the outer TLS, a name outside the list and plain HTTP never reach an upstream: the
    // preset's decoy answers them as an ordinary web server would (counted in `decoyed`).
    let mut refused = 0;
    for (url, name) in [
        ("https://evil.signal.org/file.bin", "evil.signal.org"),
        ("https://signal.org/file.bin", "signal.org"),
        ("http://chat.signal.org/file.bin", "chat.signal.org"),
    ] {
        let (_socat, via) = outer_tls(relay.addr(), &ca);
        let out_path = nginx.dir().join("refused.bin");
        let out = curl_via(url, name, via, &ca, &out_path);
        assert!(
            !out.status.success(),
            "{url} was not refused: {}",
            out.text()
        );
        refused += 1;
        assert_eq!(
            relay.wait_counter("decoyed", refused, HUNG),
            refused,
            "{url}: decoyed"
        );
    }
    assert_eq!(relay.counter("refused_bad_sni"), Some(0));
    assert_eq!(relay.counter("refused_bad_tls"), Some(0));
}
