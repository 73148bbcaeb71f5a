//! The operator's commands, run as the real `sluicectl` binary: `share` (the links users tap,
//! their QR codes in the terminal and in a PNG that is decoded back here) and `doctor` (against
//! a running relay, a port held by another program, an unresolvable upstream, and a process
//! without CAP_BPF).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_tests::servers::EchoServer;
use sluice_tests::sluice::sluicectl_bin;
use sluice_tests::{Host, Sluice, TempDir, init, require_bpf, require_program, run_with_timeout};

const RUN: Duration = Duration::from_secs(60);

fn sluicectl(args: &[&str]) -> sluice_tests::Output {
    run_with_timeout(Command::new(sluicectl_bin()).args(args), RUN)
}

/// The `messenger: url` lines `share` prints.
fn printed_links(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once(": https://"))
        .map(|(m, rest)| (m.to_string(), format!("https://{rest}")))
        .collect()
}

/// The query parameters of a wa.me proxy link, checked for its fixed parts.
fn wa_params(url: &str) -> BTreeMap<String, String> {
    let query = url
        .strip_prefix("https://wa.me/proxy?")
        .unwrap_or_else(|| panic!("not a wa.me proxy link: {url}"));
    query
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{url}: {kv}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The text of the QR code in a PNG file, decoded with rqrr.
fn decode_png(path: &Path) -> String {
    let file = std::fs::File::open(path).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Grayscale, "greyscale PNG");
    let (w, h) = (info.width as usize, info.height as usize);
    let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| buf[y * w + x]);
    let grids = img.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in {}", path.display());
    let (_meta, content) = grids[0].decode().expect("the QR code decodes");
    content
}

#[test]
fn share_prints_the_whatsapp_link_with_the_presets_ports_and_a_png_qr_of_it() {
    init();
    let dir = TempDir::new();
    let png = dir.join("qr.png");
    let out = sluicectl(&[
        "share",
        "--preset",
        "whatsapp",
        "--host",
        "Proxy.Example.org",
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", out.text());
    let links = printed_links(&out.stdout);
    assert_eq!(links.len(), 1, "{}", out.stdout);
    let url = &links["whatsapp"];
    let p = wa_params(url);
    assert_eq!(p["host"], "proxy.example.org");
    assert_eq!(p["chatPort"], "443");
    assert_eq!(p["mediaPort"], "587");
    assert_eq!(p["chatTLS"], "1");
    assert_eq!(p.len(), 4, "{url}");
    // The terminal QR code: Unicode half blocks, below the link.
    assert!(
        out.stdout.matches('█').count() > 50,
        "no QR code:\n{}",
        out.stdout
    );
    assert_eq!(&decode_png(&png), url);
}

#[test]
fn share_signal_and_public_host_from_the_config() {
    init();
    let out = sluicectl(&["share", "--preset", "signal", "--host", "203.0.113.9"]);
    assert!(out.status.success(), "{}", out.text());
    assert_eq!(
        printed_links(&out.stdout)["signal"],
        "https://signal.tube/#203.0.113.9"
    );
    // A config with public_host and its own ports: the link follows the listeners.
    let dir = TempDir::new();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        "public_host = \"relay.example.net\"\n\
         [[listen]]\nname = \"chat\"\nbind = \"0.0.0.0:5222\"\nupstream = [\"g.whatsapp.net:5222\"]\n\
         [[listen]]\nname = \"media\"\nbind = \"0.0.0.0:7777\"\nupstream = [\"whatsapp.net:443\"]\n",
    )
    .unwrap();
    let png = dir.join("qr.png");
    let out = sluicectl(&[
        "share",
        "--config",
        config.to_str().unwrap(),
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", out.text());
    let url = &printed_links(&out.stdout)["whatsapp"];
    assert_eq!(
        url,
        "https://wa.me/proxy?host=relay.example.net&chatPort=5222&mediaPort=7777&chatTLS=0"
    );
    assert_eq!(&decode_png(&png), url);
}

#[test]
fn share_refuses_a_bad_host_or_none() {
    init();
    for (args, says) in [
        (
            &["share", "--host", "https://proxy.example.org"][..],
            "looks like a URL",
        ),
        (&["share", "--host", "proxy.example.org:443"], "has a port"),
        (&["share", "--host", "bad host"], "neither an IP address"),
        (&["share"], "--host"),
    ] {
        let out = sluicectl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.text());
        assert!(out.stderr.contains(says), "{args:?}: {}", out.text());
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed a link: {}",
            out.stdout
        );
    }
    // A bad public_host in a config is refused when the config is read, naming the key.
    let dir = TempDir::new();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        "public_host = \"a b\"\n[[listen]]\nname = \"m\"\nbind = \"0.0.0.0:587\"\nupstream = [\"whatsapp.net:443\"]\n",
    )
    .unwrap();
    let out = sluicectl(&["share", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", out.text());
    assert!(out.stderr.contains("public_host"), "{}", out.text());
}

/// `sluicectl doctor --json` with `args`; returns (exit code, checks by name).
fn doctor(
    prefix: &[&str],
    control: &Path,
    config: &Path,
) -> (i32, BTreeMap<String, serde_json::Value>) {
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(sluicectl_bin());
            c
        }
        None => Command::new(sluicectl_bin()),
    };
    cmd.arg("--control")
        .arg(control)
        .args(["doctor", "--json", "--timeout-ms", "2000", "--config"])
        .arg(config);
    let out = run_with_timeout(&mut cmd, RUN);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {}", out.text()));
    let checks = v["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("no checks: {v}"))
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c.clone()))
        .collect();
    let code = out.status.code().unwrap_or(-1);
    assert_eq!(
        v["passed"].as_bool(),
        Some(code == 0),
        "`passed` and the exit code disagree: {v}"
    );
    (code, checks)
}

fn level(checks: &BTreeMap<String, serde_json::Value>, name: &str) -> String {
    checks
        .get(name)
        .unwrap_or_else(|| panic!("no check `{name}` in {checks:?}"))["level"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn doctor_against_a_running_relay_on_loopback() {
    init();
    let listen = Host::new().addr();
    let server = EchoServer::start(Host::new().addr());
    let toml = format!(
        "[[listen]]\nname = \"chat\"\nbind = \"{}\"\nupstream = [\"{}\"]\n",
        listen,
        server.addr()
    );
    let relay = Sluice::run_config_text(&toml, vec![listen]).start();
    let config = relay.dir().join("sluice.toml");
    let control = relay.dir().join("control.sock");
    let (code, checks) = doctor(&[], &control, &config);
    assert_eq!(code, 0, "{checks:#?}");
    let port = format!("port {} (chat)", listen.port());
    assert_eq!(level(&checks, &port), "ok");
    assert!(
        checks[&port]["detail"]
            .as_str()
            .unwrap()
            .contains("held by the running Sluice"),
        "{checks:#?}"
    );
    assert_eq!(level(&checks, "daemon"), "ok");
    assert!(
        checks["daemon"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("running: engine "),
        "{checks:#?}"
    );
    assert_eq!(level(&checks, &format!("upstream {}", server.addr())), "ok");
    for name in ["io_uring", "fd limit", "clock", "capabilities"] {
        assert_ne!(level(&checks, name), "fail", "{checks:#?}");
    }
    // The text form: one line per check, ok/warn/fail first.
    let out = sluicectl(&[
        "--control",
        control.to_str().unwrap(),
        "doctor",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", out.text());
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("ok    daemon: running")),
        "{}",
        out.stdout
    );
    drop(relay);
}

#[test]
fn doctor_fails_on_a_port_held_by_another_program_and_an_unresolvable_upstream() {
    init();
    let held = Host::new().addr();
    let _foreign = TcpListener::bind(held).unwrap();
    let free = Host::new().addr();
    let dir = TempDir::new();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\nname = \"held\"\nbind = \"{held}\"\nupstream = [\"{free}\"]\n\
             [[listen]]\nname = \"dns\"\nbind = \"{free}\"\nupstream = [\"no-such-host.invalid:5222\"]\n"
        ),
    )
    .unwrap();
    let control = dir.join("no-daemon.sock");
    let (code, checks) = doctor(&[], &control, &config);
    assert_eq!(code, 1, "{checks:#?}");
    let held_check = &checks[&format!("port {} (held)", held.port())];
    assert_eq!(held_check["level"], "fail", "{checks:#?}");
    assert!(
        held_check["detail"]
            .as_str()
            .unwrap()
            .contains("another program")
            && !held_check["fix"].as_str().unwrap().is_empty(),
        "{held_check}"
    );
    assert_eq!(level(&checks, &format!("port {} (dns)", free.port())), "ok");
    let dns = &checks["upstream no-such-host.invalid:5222"];
    assert_eq!(dns["level"], "fail", "{dns}");
    assert!(
        dns["detail"].as_str().unwrap().contains("does not resolve"),
        "{dns}"
    );
    // Nothing listens at `free` (the upstream of `held`): resolved, but no TCP connection.
    let refused = &checks[&format!("upstream {free}")];
    assert_eq!(refused["level"], "fail", "{refused}");
    assert_eq!(level(&checks, "daemon"), "warn");
}

#[test]
fn doctor_without_cap_bpf_says_bpf_is_unavailable_and_why() {
    init();
    if !require_bpf() || !require_program("setpriv") {
        return;
    }
    let dir = TempDir::new();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\nname = \"a\"\nbind = \"{}\"\nupstream = [\"127.0.0.1:9\"]\n",
            Host::new().addr()
        ),
    )
    .unwrap();
    let control = Path::new("/nonexistent/sluice.sock");
    let (_, with) = doctor(&[], control, &config);
    assert_eq!(level(&with, "bpf"), "ok", "{with:#?}");
    let (_, without) = doctor(
        &[
            "setpriv",
            "--bounding-set=-bpf,-sys_admin,-perfmon",
            "--inh-caps=-bpf,-sys_admin,-perfmon",
            "--",
        ],
        control,
        &config,
    );
    let bpf = &without["bpf"];
    assert_eq!(bpf["level"], "warn", "{without:#?}");
    let detail = bpf["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("BPF unavailable: ")
            && detail.contains("neither CAP_BPF nor CAP_SYS_ADMIN"),
        "{bpf}"
    );
    assert!(bpf["fix"].as_str().unwrap().contains("CAP_BPF"), "{bpf}");

    // A daemon started that way runs sockmap without its fast path; doctor (with every
    // capability) reports it from the daemon's status, with the reason.
    if !sluice_tests::require_io_uring() {
        return;
    }
    let server = EchoServer::start(Host::new().addr());
    let relay = Sluice::forward(Host::new().addr(), server.addr())
        .engine("sockmap")
        .workers(1)
        .wrap(&[
            "setpriv",
            "--bounding-set=-bpf,-sys_admin,-perfmon",
            "--inh-caps=-bpf,-sys_admin,-perfmon",
            "--",
        ])
        .start();
    let (_, checks) = doctor(&[], &relay.dir().join("control.sock"), &config);
    let daemon = &checks["daemon"];
    assert_eq!(daemon["level"], "warn", "{daemon}");
    let detail = daemon["detail"].as_str().unwrap();
    assert!(
        detail.contains("engine splice") && detail.contains("sockmap fast path unavailable: "),
        "{daemon}"
    );
    drop(relay);
}

/// Under the unit's `Type=notify`, systemd waits for `READY=1` on `$NOTIFY_SOCKET`: it comes
/// once the listener takes connections, and `STOPPING=1` at SIGTERM (sd_notify(3)'s datagram
/// protocol, read here from a socket this test binds).
#[test]
fn tells_systemd_when_it_is_ready_and_when_it_stops() {
    init();
    let dir = TempDir::new();
    let path = dir.join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    notify.set_read_timeout(Some(RUN)).unwrap();
    let up = EchoServer::start(Host::new().addr());
    let relay = Sluice::forward(Host::new().addr(), up.addr())
        .workers(1)
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .start();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from the daemon");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), "READY=1");
    std::net::TcpStream::connect(relay.addr()).expect("the listener takes connections by then");
    let (status, _) = relay.stop();
    assert!(status.success(), "{status:?}");
    let n = notify.recv(&mut buf).expect("STOPPING=1 from the daemon");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), "STOPPING=1");
}
