//! Real peers through `sluice forward`: iperf3 (Debian's, control and data connections relayed)
//! in both directions, and curl fetching a 10 MB file from a real nginx, compared byte-exact.

use std::fs;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use sluice_tests::peers::Nginx;
use sluice_tests::{
    ChildGuard, Host, Pattern, Sluice, init, require_program, run_with_timeout, wait_listening,
};

/// Bytes that may legitimately be in flight when iperf3 ends a timed test (socket buffers and
/// the relay's pipes): the server counts what it read, the client what it wrote.
const IN_FLIGHT_MAX: u64 = 64 << 20;

fn iperf3(reverse: bool) {
    init();
    if !require_program("iperf3") {
        return;
    }
    let host = Host::new();
    let server_addr = host.addr();
    let mut server = Command::new("iperf3");
    server
        .args([
            "-s",
            "-1",
            "-B",
            &host.ip.to_string(),
            "-p",
            &server_addr.port().to_string(),
        ])
        .stdout(std::process::Stdio::null());
    let mut server = ChildGuard::spawn("iperf3 -s", &mut server);
    assert!(
        wait_listening(server_addr, Duration::from_secs(10)),
        "iperf3 -s not listening"
    );
    let relay = Sluice::forward(host.addr(), server_addr).workers(2).start();
    let relay_addr: SocketAddr = relay.addr();
    let mut client = Command::new("iperf3");
    client.args([
        "-c",
        &host.ip.to_string(),
        "-p",
        &relay_addr.port().to_string(),
        "-t",
        "3",
        "--json",
    ]);
    if reverse {
        client.arg("-R");
    }
    let out = run_with_timeout(&mut client, Duration::from_secs(60));
    let json: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 output is not JSON ({e}): {}", out.text()));
    assert!(
        out.status.success() && json.get("error").is_none(),
        "iperf3 failed: {}",
        out.text()
    );
    let sent = json["end"]["sum_sent"]["bytes"]
        .as_u64()
        .expect("end.sum_sent.bytes");
    let received = json["end"]["sum_received"]["bytes"]
        .as_u64()
        .expect("end.sum_received.bytes");
    assert!(received > 0, "iperf3 received nothing (sent {sent})");
    assert!(
        received <= sent && sent - received <= IN_FLIGHT_MAX,
        "iperf3 sent {sent} bytes, received {received} (more than {IN_FLIGHT_MAX} apart)"
    );
    let status = server.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "iperf3 -s -1 exit: {status:?}"
    );
}

#[test]
fn iperf3_through_relay() {
    iperf3(false);
}

#[test]
fn iperf3_reverse_through_relay() {
    iperf3(true);
}

#[test]
fn curl_fetches_10mb_from_nginx_byte_exact() {
    init();
    if !require_program("nginx") || !require_program("curl") {
        return;
    }
    let host = Host::new();
    let nginx = Nginx::start(host.addr());
    let len = 10_000_000;
    let body = Pattern::new(0xc0ffee).bytes(0, len);
    fs::write(nginx.root().join("file.bin"), &body).unwrap();
    let relay = Sluice::forward(host.addr(), nginx.addr())
        .workers(2)
        .start();
    for i in 0..3 {
        let out_path = nginx.dir().join(format!("got-{i}.bin"));
        let url = format!("http://{}/file.bin", relay.addr());
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--fail", "--max-time", "30", "-o"])
            .arg(&out_path)
            .arg(&url);
        let out = run_with_timeout(&mut curl, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "curl {url}: {}\nnginx: {}",
            out.text(),
            nginx.error_log()
        );
        let got = fs::read(&out_path).unwrap();
        assert_eq!(got.len(), len, "curl got {} bytes", got.len());
        assert!(got == body, "curl's bytes differ from the file");
    }
}
