//! The install paths in `dist/`: the systemd unit (verified by `systemd-analyze verify`, with
//! the hardening keys present), the Docker seccomp profile (parses; allows io_uring; allows every
//! system call the relay and `sluicectl` make, traced with strace on both the io_uring and the
//! epoll engine), the Dockerfile's shape (non-root user, /healthz HEALTHCHECK, dependencies
//! fetched before the sources are copied), and the Helm chart, linted (`--strict`) and rendered
//! by Helm's own code (`helm-python-sdk`, installed by `cargo xtask setup`): a PROXY-v2
//! LoadBalancer in front of listeners that accept PROXY, non-root pods with every capability
//! dropped, /healthz probes on the metrics port, a metrics Service and ServiceMonitor, a
//! NetworkPolicy keeping the PROXY ports to the balancer's CIDRs, sockmap refused.
//!
//! The Debian package `cargo xtask dist` builds: lintian finds no error in it, and it installs,
//! runs and purges cleanly in a throwaway Debian 12 root (mmdebstrap, cached under
//! `target/deb-rootfs/`).
//!
//! Docker is not run here (no daemon on the machines this runs on); the image is not built. That the relay still works where a seccomp profile refuses io_uring
//! (Docker's default) is `fallback::auto_falls_back_to_epoll_when_io_uring_is_blocked`.
//! `cargo xtask dist`'s tarball is checked by the unit test in `xtask/src/dist.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::servers::EchoServer;
use sluice_tests::sluice::{sluice_bin, sluicectl_bin};
use sluice_tests::{HUNG, Host, TempDir, init, procfs, require_program, run_with_timeout, sys};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// systemd

/// `Key=value` lines of a unit's `[section]` (the last value of a repeated key).
fn unit_section(text: &str, section: &str) -> BTreeMap<String, String> {
    let mut inside = false;
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
        } else if inside
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            out.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    init();
    let text = read("dist/systemd/sluice.service");
    let service = unit_section(&text, "Service");
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("RuntimeDirectory", "sluice"),
        // state_dir for ACME certificates: ProtectSystem=strict leaves /var/lib read-only.
        ("StateDirectory", "sluice"),
        ("Group", "sluice"),
        ("LimitCORE", "0"),
        ("ProtectKernelTunables", "yes"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(service.get(key).map(String::as_str), Some(want), "{key}");
    }
    let caps: BTreeSet<&str> = service["CapabilityBoundingSet"]
        .split_whitespace()
        .collect();
    assert_eq!(
        caps,
        BTreeSet::from([
            "CAP_NET_BIND_SERVICE",
            "CAP_BPF",
            "CAP_NET_ADMIN",
            "CAP_PERFMON",
            "CAP_SETUID",
            "CAP_SETGID",
        ]),
        "only what Sluice uses"
    );
    let nofile: u64 = service["LimitNOFILE"].parse().unwrap();
    assert!(nofile >= 100_000, "LimitNOFILE {nofile}");
    // The daemon's control socket lives in the RuntimeDirectory.
    assert!(
        service["ExecStart"].contains("--control /run/sluice/control.sock")
            && service["ExecStart"].contains("--user sluice"),
        "{}",
        service["ExecStart"]
    );
    if !require_program("systemd-analyze") {
        return;
    }
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let dir = TempDir::new();
    let unit = dir.join("sluice.service");
    std::fs::write(
        &unit,
        text.replace(
            "/usr/local/bin/sluice ",
            &format!("{} ", sluice_bin().display()),
        ),
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit),
        Duration::from_secs(60),
    );
    // verify exits 0 even for unknown keys and bad values; it prints them, so nothing printed
    // is the pass.
    assert!(
        out.status.success() && out.text().trim().is_empty(),
        "systemd-analyze verify: {}",
        out.text()
    );
}

/// `systemd-analyze security --offline` scores the unit's exposure (0 safest, 10 worst); the
/// unit's hardening keeps it at 2.4 (4.3 before `SystemCallFilter` and the rest came in).
#[test]
fn systemd_unit_exposure_stays_low() {
    init();
    if !require_program("systemd-analyze") {
        return;
    }
    let out = run_with_timeout(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(repo().join("dist/systemd/sluice.service")),
        Duration::from_secs(60),
    );
    let text = out.text();
    let score: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for sluice.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    eprintln!("systemd-analyze security: sluice.service exposure {score}");
    assert!(score <= 2.5, "exposure {score} above 2.5: {text}");
}

/// Every system call the Docker profile allows (itself checked against strace of the relay
/// below) is allowed by the unit's `SystemCallFilter`, its groups expanded by systemd itself.
#[test]
fn systemd_unit_allows_every_call_the_relay_makes() {
    init();
    if !require_program("systemd-analyze") {
        return;
    }
    let service = unit_section(&read("dist/systemd/sluice.service"), "Service");
    let filter = &service["SystemCallFilter"];
    assert!(!filter.starts_with('~'), "an allow list: {filter}");
    let out = run_with_timeout(
        Command::new("systemd-analyze").args(["syscall-filter", "--no-pager"]),
        Duration::from_secs(60),
    );
    // `@group` headers, then one call or `@subgroup` a line.
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in out.stdout.lines() {
        if line.starts_with('@') {
            let name = line.split_whitespace().next().unwrap().to_owned();
            groups.insert(name.clone(), Vec::new());
            current = Some(name);
        } else if let Some(g) = &current
            && let Some(word) = line.split_whitespace().next()
            && !word.starts_with('#')
        {
            groups.get_mut(g).unwrap().push(word.to_owned());
        }
    }
    fn expand(item: &str, groups: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
        match groups.get(item) {
            Some(members) => members.iter().for_each(|m| expand(m, groups, out)),
            None => {
                out.insert(item.to_owned());
            }
        }
    }
    let mut allowed = BTreeSet::new();
    for item in filter.split_whitespace() {
        expand(item, &groups, &mut allowed);
    }
    assert!(allowed.len() > 100, "{filter} expanded to {allowed:?}");
    let missing: Vec<_> = seccomp_allowed()
        .into_iter()
        .filter(|c| !allowed.contains(c))
        .collect();
    assert!(
        missing.is_empty(),
        "the unit's SystemCallFilter refuses what the relay calls: {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Docker

fn seccomp_allowed() -> BTreeSet<String> {
    let v: serde_json::Value =
        serde_json::from_str(&read("dist/docker/seccomp.json")).expect("seccomp.json is JSON");
    assert_eq!(v["defaultAction"], "SCMP_ACT_ERRNO", "an allowlist");
    v["syscalls"]
        .as_array()
        .expect("a syscalls array")
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW" && r.get("args").is_none())
        .flat_map(|r| r["names"].as_array().expect("names").iter())
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// System call names in an `strace -f` output file (one `PID name(...` line per call).
fn traced_syscalls(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter_map(|l| {
            let rest = l
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start();
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            (!name.is_empty() && rest[name.len()..].starts_with('(')).then_some(name)
        })
        .collect()
}

/// Runs `sluice forward` with `engine` under strace, relays a few bytes and asks for its
/// status; returns the system calls of the daemon, its workers and `sluicectl`.
fn trace_relay(engine: &str) -> BTreeSet<String> {
    let dir = TempDir::new();
    let trace = dir.join("relay.strace");
    let ctl_trace = dir.join("ctl.strace");
    let control = dir.join("control.sock");
    let echo = EchoServer::start(Host::new().addr());
    let listen = Host::new().addr();
    let mut strace = Command::new("strace");
    strace
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(sluice_bin())
        .args(["forward", &listen.to_string(), &echo.addr().to_string()])
        .args(["--workers", "1", "--engine", engine, "--control"])
        .arg(&control)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    sys::parent_death_signal(&mut strace, libc::SIGKILL);
    let mut child = strace.spawn().expect("start strace");
    let stop = |child: &mut std::process::Child| {
        // SIGTERM to the daemon (strace's child) ends it; strace then exits by itself.
        for pid in procfs::children(child.id()) {
            sys::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + HUNG;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                sys::kill(child.id(), libc::SIGKILL);
                let _ = child.wait();
                panic!("strace did not end after its daemon was stopped");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let deadline = Instant::now() + HUNG;
    while !(procfs::is_listening(listen) && control.exists()) {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            stop(&mut child);
            panic!("the relay under strace did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = TcpStream::connect(listen).unwrap();
    c.set_read_timeout(Some(HUNG)).unwrap();
    c.write_all(b"through the profile").unwrap();
    let mut back = [0u8; 19];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"through the profile");
    drop(c);
    let ctl = run_with_timeout(
        Command::new("strace")
            .args(["-f", "-qq", "-o"])
            .arg(&ctl_trace)
            .arg(sluicectl_bin())
            .arg("--control")
            .arg(&control)
            .args(["status", "--json"]),
        HUNG,
    );
    stop(&mut child);
    assert!(ctl.status.success(), "sluicectl status: {}", ctl.text());
    assert!(
        ctl.stdout.contains(&format!("\"engine\":\"{engine}\""))
            || engine == "auto" && ctl.stdout.contains("\"engine\":\"splice\""),
        "{}",
        ctl.stdout
    );
    let mut calls = traced_syscalls(&trace);
    calls.extend(traced_syscalls(&ctl_trace));
    calls
}

#[test]
fn seccomp_profile_allows_io_uring_and_every_call_the_relay_makes() {
    init();
    let allowed = seccomp_allowed();
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed.contains(call), "{call} not allowed");
    }
    if !require_program("strace") || !sluice_tests::require_io_uring() {
        return;
    }
    for engine in ["auto", "epoll"] {
        let used = trace_relay(engine);
        assert!(used.len() > 20, "strace saw too little: {used:?}");
        if engine == "auto" {
            assert!(used.contains("io_uring_setup"), "{used:?}");
        } else {
            assert!(
                used.contains("epoll_wait") || used.contains("epoll_pwait"),
                "{used:?}"
            );
        }
        let refused: Vec<&String> = used.difference(&allowed).collect();
        assert!(
            refused.is_empty(),
            "engine {engine}: the profile refuses calls the relay makes: {refused:?}"
        );
    }
}

#[test]
fn dockerfile_is_multi_stage_with_a_slim_runtime() {
    let text = read("dist/docker/Dockerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 3, "{froms:?}");
    assert!(froms[0].ends_with(" AS skeleton"), "{froms:?}");
    assert!(froms[1].ends_with(" AS build"), "{froms:?}");
    assert!(
        froms[2].contains("slim") || froms[2].contains("distroless"),
        "{froms:?}"
    );
    // Dependencies fetched before the sources are copied (a cached layer).
    let fetch = text.find("RUN cargo fetch --locked").expect("cargo fetch");
    let copy = text[text.find(" AS build").unwrap()..]
        .find("COPY . .")
        .map(|i| i + text.find(" AS build").unwrap());
    assert!(copy.is_some_and(|c| fetch < c), "fetch before COPY . .");
    // Runs as the sluice user, checked through /healthz.
    assert!(text.lines().any(|l| l == "USER sluice:sluice"));
    assert!(text.contains("HEALTHCHECK") && text.contains("GET /healthz"));
    assert!(
        text.contains("cargo xtask build-ebpf"),
        "builds the eBPF object"
    );
    assert!(
        text.contains("COPY --from=build"),
        "runtime copies from the build stage"
    );
    for bin in ["/usr/local/bin/sluice", "/usr/local/bin/sluicectl"] {
        assert!(text.contains(bin), "{bin}");
    }
    assert!(text.contains("seccomp.json"), "says how to use the profile");
    let cmd = text.lines().find(|l| l.starts_with("CMD ")).unwrap();
    let cmd: Vec<String> = serde_json::from_str(cmd.trim_start_matches("CMD ")).unwrap();
    assert_eq!(cmd[..3], ["run", "--config", "/etc/sluice/sluice.toml"]);
    // The config the image runs with is valid.
    sluice::config::Config::from_toml(&read("dist/sluice.toml"), "dist/sluice.toml").unwrap();
}

// ---------------------------------------------------------------------------------------------
// Helm

/// Each template's manifest by path, or why rendering failed.
type Rendered = Result<BTreeMap<String, String>, String>;

/// Helm's own lint and template engine (Helm 4 as a library, `helm-python-sdk` from PyPI,
/// installed by `cargo xtask setup` at `xtask::setup::HELM_SDK_DIR`): lints the chart and
/// renders it with `values` (JSON); returns the lint report and each template's manifest, or
/// the render error.
fn helm(values: &serde_json::Value) -> Option<(serde_json::Value, Rendered)> {
    let python = Path::new(xtask::setup::HELM_SDK_DIR).join("bin/python3");
    if !python.is_file() {
        sluice_tests::skip("helm-python-sdk is not installed (cargo xtask setup)");
        return None;
    }
    const SCRIPT: &str = r#"
import json, sys, helm_python as h
chart, values = sys.argv[1], json.loads(sys.argv[2])
out = {"lint": h.lint(chart, values, strict=True)}
try:
    out["manifests"] = h.Chart.load(chart).render(values, name="relay")
except Exception as e:
    out["error"] = str(e)
print(json.dumps(out))
"#;
    let chart = repo().join("dist/helm/sluice");
    let out = run_with_timeout(
        Command::new(python)
            .arg("-c")
            .arg(SCRIPT)
            .arg(&chart)
            .arg(values.to_string()),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "helm: {}", out.text());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let rendered = match v["error"].as_str() {
        Some(e) => Err(e.to_string()),
        None => Ok(serde_json::from_value(v["manifests"].clone()).unwrap()),
    };
    Some((v["lint"].clone(), rendered))
}

#[test]
fn helm_chart_renders_to_valid_manifests_for_proxy_v2_behind_a_load_balancer() {
    let Some((lint, rendered)) = helm(&serde_json::json!({})) else {
        return;
    };
    // `helm lint --strict`: no error, no warning (an info, "icon is recommended", is fine).
    assert!(lint["errors"].as_array().unwrap().is_empty(), "{lint}");
    assert!(
        lint["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["severity"].as_u64() < Some(2)),
        "{lint}"
    );
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read("dist/helm/sluice/values.yaml")).unwrap();
    let mut docs: BTreeMap<String, serde_yaml::Value> = BTreeMap::new();
    for (path, text) in rendered.unwrap() {
        if text.trim().is_empty() {
            continue;
        }
        let doc: serde_yaml::Value = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{path} is not valid YAML ({e}):\n{text}"));
        if doc.is_null() {
            continue; // only comments: a template switched off by its values
        }
        let kind = doc["kind"].as_str().expect("a kind").to_string();
        let name = doc["metadata"]["name"].as_str().unwrap().to_string();
        docs.insert(format!("{kind}/{name}"), doc);
    }
    for key in [
        "ConfigMap/relay-config",
        "Deployment/relay",
        "Service/relay",
        "Service/relay-metrics",
        "HorizontalPodAutoscaler/relay",
        "NetworkPolicy/relay",
    ] {
        assert!(docs.contains_key(key), "no {key}: {:?}", docs.keys());
    }
    // The ServiceMonitor only where asked for (it needs the operator's CRD).
    assert!(!docs.keys().any(|k| k.starts_with("ServiceMonitor/")));
    // The relay's configuration: valid, every listener expects the balancer's PROXY header, the
    // metrics listener on the pod's address.
    let toml = docs["ConfigMap/relay-config"]["data"]["sluice.toml"]
        .as_str()
        .unwrap();
    let config = sluice::config::Config::from_toml(toml, "chart ConfigMap").unwrap();
    assert!(config.listeners.iter().all(|l| l.accept_proxy), "{toml}");
    let metrics_port = u64::from(config.metrics.listen.0.expect("metrics on").port());
    let listener_ports: BTreeSet<u64> = config
        .listeners
        .iter()
        .map(|l| u64::from(l.bind.port()))
        .collect();
    // Deployment: replicas from values, container ports, probes on /healthz of the metrics port.
    let dep = &docs["Deployment/relay"];
    assert_eq!(dep["spec"]["replicas"], values["replicaCount"]);
    let pod = &dep["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let ports: BTreeMap<String, u64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports["metrics"], metrics_port);
    let relay_ports: BTreeSet<u64> = ports
        .iter()
        .filter(|(n, _)| *n != "metrics")
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(relay_ports, listener_ports);
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some("/healthz"), "{probe}");
        assert_eq!(get["port"].as_str(), Some("metrics"), "{probe}");
        assert!(container[probe]["tcpSocket"].is_null(), "{probe}");
    }
    // Least privilege.
    let sc = &container["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert!(sc["runAsUser"].as_u64().is_some_and(|u| u > 0));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert!(
        sc["capabilities"]["add"].is_null(),
        "no port below 1024, no capability: {sc:?}"
    );
    assert!(
        listener_ports
            .iter()
            .chain([&metrics_port])
            .all(|p| *p >= 1024)
    );
    // Service: a load balancer sending PROXY, publishing 443 and 587 for the share link.
    let svc = &docs["Service/relay"];
    assert_eq!(svc["spec"]["type"].as_str(), Some("LoadBalancer"));
    assert_eq!(
        svc["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"]
            .as_str(),
        Some("*")
    );
    let published: BTreeMap<u64, u64> = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().unwrap(),
                p["targetPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        published.values().all(|t| listener_ports.contains(t)),
        "{published:?}"
    );
    assert!(published.contains_key(&443) && published.contains_key(&587));
    let msvc = &docs["Service/relay-metrics"];
    assert_eq!(msvc["spec"]["type"].as_str(), Some("ClusterIP"));
    assert_eq!(
        msvc["spec"]["ports"][0]["targetPort"].as_str(),
        Some("metrics")
    );
    // NetworkPolicy: the relay ports only from the balancer's CIDRs, metrics from Prometheus.
    let np = &docs["NetworkPolicy/relay"]["spec"];
    let rules = np["ingress"].as_sequence().unwrap();
    let proxy_rule = rules
        .iter()
        .find(|r| {
            r["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| p["port"].as_u64() == Some(8222))
        })
        .expect("a rule for the PROXY ports");
    let cidrs: Vec<&str> = proxy_rule["from"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|f| f["ipBlock"]["cidr"].as_str().unwrap())
        .collect();
    let wanted: Vec<&str> = values["networkPolicy"]["balancerCIDRs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cidrs, wanted);
    let proxy_ports: BTreeSet<u64> = proxy_rule["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(proxy_ports, listener_ports);
    assert!(rules.iter().all(|r| {
        !r["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["port"].as_u64() == Some(metrics_port))
            || !r["from"][0]["ipBlock"].is_mapping()
    }));
    // HPA scales this Deployment.
    let hpa = &docs["HorizontalPodAutoscaler/relay"];
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        dep["metadata"]["name"]
    );
    assert_eq!(
        hpa["spec"]["minReplicas"],
        values["autoscaling"]["minReplicas"]
    );
    assert!(hpa["spec"]["maxReplicas"].as_u64() > hpa["spec"]["minReplicas"].as_u64());
    // The link users get for it: the balancer's ports.
    let links = sluice::share::links(
        &config,
        "lb.example.org",
        sluice::share::PortOverrides {
            chat_port: Some(443),
            media_port: Some(587),
        },
    )
    .unwrap();
    assert_eq!(
        links[0].url,
        "https://wa.me/proxy?host=lb.example.org&chatPort=443&mediaPort=587&chatTLS=1"
    );

    // With the ServiceMonitor asked for: it selects the metrics Service's labels.
    let (_, rendered) = helm(&serde_json::json!({
        "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "kps"}}}
    }))
    .unwrap();
    let rendered = rendered.unwrap();
    let sm: serde_yaml::Value =
        serde_yaml::from_str(&rendered["sluice/templates/servicemonitor.yaml"]).unwrap();
    assert_eq!(sm["metadata"]["labels"]["release"].as_str(), Some("kps"));
    assert_eq!(sm["spec"]["endpoints"][0]["port"].as_str(), Some("metrics"));
    assert_eq!(
        sm["spec"]["endpoints"][0]["path"].as_str(),
        Some("/metrics")
    );
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&msvc["metadata"]["labels"][k], v, "{k:?}");
    }
    // Its job is `sluice`, what dist/prometheus/sluice-rules.yml and dist/grafana select.
    let job_label = sm["spec"]["jobLabel"].as_str().expect("a jobLabel");
    assert_eq!(
        msvc["metadata"]["labels"][job_label].as_str(),
        Some("sluice")
    );
    // The sockmap engine is refused with the reason, not rendered without its capabilities.
    let (_, rendered) = helm(&serde_json::json!({"engine": "sockmap"})).unwrap();
    let err = rendered.expect_err("engine: sockmap must not render");
    assert!(err.contains("CAP_BPF"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Debian package

/// What the throwaway Debian 12 root holds beyond mmdebstrap's `apt` variant: the package's
/// dependencies the variant lacks (adduser; procps for the unit's /bin/kill), so installing needs
/// no network, and systemd, as on a server: the postinst then creates the user with
/// systemd-sysusers, and `systemd-analyze verify --root` finds the units it checks against.
const ROOTFS_PACKAGES: &[&str] = &["adduser", "procps", "systemd"];

/// The host tools this test needs, installed when missing.
const DEB_TEST_TOOLS: &[&str] = &["dpkg-dev", "lintian", "mmdebstrap", "systemd"];

/// FNV-1a: a hash that stays the same across Rust versions, for the cache's file name.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cached root's tarball, made by mmdebstrap when missing (keyed by the package list).
fn bookworm_rootfs() -> PathBuf {
    let cache = repo().join("target/deb-rootfs");
    std::fs::create_dir_all(&cache).unwrap();
    let key = format!("bookworm apt {}", ROOTFS_PACKAGES.join(","));
    let tarball = cache.join(format!("bookworm-apt-{:016x}.tar", fnv1a(&key)));
    if tarball.is_file() {
        return tarball;
    }
    let partial = tarball.with_extension("tar.partial");
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new("mmdebstrap")
            .args(["--variant=apt", "--quiet"])
            .arg(format!("--include={}", ROOTFS_PACKAGES.join(",")))
            .args(["--format=tar", "bookworm"])
            .arg(&partial),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "mmdebstrap: {}", out.text());
    std::fs::rename(&partial, &tarball).unwrap();
    eprintln!(
        "deb: built the bookworm root {} in {:.1} s",
        tarball.display(),
        started.elapsed().as_secs_f64()
    );
    tarball
}

/// /proc mounted in the chroot, unmounted on drop (lazily if busy), before its TempDir goes.
struct ProcMount(PathBuf);

impl ProcMount {
    fn new(root: &Path) -> ProcMount {
        let target = root.join("proc");
        let out = run_with_timeout(
            Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(&target),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "mount proc: {}", out.text());
        ProcMount(target)
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Runs `args` in the chroot with a plain environment; returns its output.
fn in_root(root: &Path, args: &[&str]) -> sluice_tests::Output {
    run_with_timeout(
        Command::new("chroot")
            .arg(root)
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LC_ALL=C.UTF-8",
            ])
            .arg("DEBIAN_FRONTEND=noninteractive")
            .args(args),
        Duration::from_secs(300),
    )
}

/// Every path under `root` (not /proc), relative, sorted.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new("proc") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            out.insert(rel);
            if meta.is_dir() {
                walk(&path, root, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// Paths an install-and-purge may leave that are not the package's: dpkg's and apt's records
/// and logs, and the user's traces (the backups adduser and systemd-sysusers write of the
/// files they change, adduser's lock). The user itself stays, as Debian policy wants.
fn bookkeeping(rel: &Path) -> bool {
    [
        "var/lib/dpkg",
        "var/lib/apt",
        "var/cache",
        "var/log",
        "tmp",
        "run/adduser",
        "etc/passwd-",
        "etc/group-",
        "etc/shadow-",
        "etc/gshadow-",
        "etc/.pwd.lock",
    ]
    .iter()
    .any(|p| rel.starts_with(p))
}

#[test]
fn debian_package_passes_lintian_and_installs_runs_and_purges_in_bookworm() {
    init();
    if !sluice_tests::require_root() {
        return;
    }
    let started = Instant::now();
    xtask::setup::apt(DEB_TEST_TOOLS).expect("install the packaging tools");
    let dir = TempDir::new();
    let deb = xtask::deb::build(&repo(), &sluice_tests::sluice::bin_dir(), &dir.join("out"))
        .expect("build the .deb");
    let built = started.elapsed();

    // (a) lintian: no error; every tag printed.
    let report = xtask::deb::lintian(&deb).unwrap();
    eprintln!("deb: lintian {}:\n{report}", deb.display());
    let errors = xtask::deb::lintian_errors(&report);
    assert!(errors.is_empty(), "lintian errors: {errors:#?}");
    let linted = started.elapsed();

    // (b) install, run, purge in a throwaway Debian 12 root.
    let tarball = bookworm_rootfs();
    let cached = started.elapsed();
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let out = run_with_timeout(
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&root),
        Duration::from_secs(300),
    );
    assert!(out.status.success(), "untar the root: {}", out.text());
    let name = deb.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::copy(&deb, root.join("tmp").join(&name)).unwrap();
    let before = tree(&root);
    let _proc = ProcMount::new(&root);
    let deb_in_root = format!("/tmp/{name}");
    let out = in_root(
        &root,
        &[
            "apt-get",
            "install",
            "-y",
            "-o",
            "Dpkg::Use-Pty=0",
            &deb_in_root,
        ],
    );
    eprintln!("deb: apt-get install:\n{}", out.text());
    assert!(out.status.success(), "apt-get install failed");
    let installed_at = started.elapsed();

    let user = in_root(&root, &["getent", "passwd", "sluice"]);
    assert!(user.status.success(), "no user sluice: {}", user.text());
    eprintln!("deb: user {}", user.stdout.trim());
    assert!(root.join("etc/sluice/sluice.toml").is_file());
    // Enabled like Debian's services; not started, since systemd does not run in a chroot. (The
    // link is absolute, to the root's unit: read it, do not follow it from here.)
    assert!(
        std::fs::symlink_metadata(
            root.join("etc/systemd/system/multi-user.target.wants/sluice.service")
        )
        .is_ok_and(|m| m.file_type().is_symlink()),
        "the postinst did not enable sluice.service"
    );
    let check = in_root(
        &root,
        &["sluice", "check-config", "/etc/sluice/sluice.toml"],
    );
    assert!(check.status.success(), "check-config: {}", check.text());
    let help = in_root(&root, &["sluicectl", "--help"]);
    assert!(
        help.status.success() && help.stdout.contains("doctor"),
        "sluicectl --help: {}",
        help.text()
    );
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/sluice.service")).unwrap();
    let service = unit_section(&unit, "Service");
    assert!(
        service["ExecStart"].starts_with("/usr/bin/sluice run "),
        "{}",
        service["ExecStart"]
    );
    // The unit as installed, against the root's own systemd units and binaries.
    let verify = run_with_timeout(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.display()))
            .arg("/usr/lib/systemd/system/sluice.service"),
        Duration::from_secs(60),
    );
    assert!(
        verify.status.success() && verify.text().trim().is_empty(),
        "systemd-analyze verify --root: {}",
        verify.text()
    );

    // Purge: nothing the package put there stays, only the user.
    let listed = in_root(&root, &["dpkg", "-L", "sluice"]);
    assert!(listed.status.success(), "dpkg -L: {}", listed.text());
    let out = in_root(
        &root,
        &["apt-get", "purge", "-y", "-o", "Dpkg::Use-Pty=0", "sluice"],
    );
    eprintln!("deb: apt-get purge:\n{}", out.text());
    assert!(out.status.success(), "apt-get purge failed");
    let after = tree(&root);
    let mut left: Vec<String> = listed
        .stdout
        .lines()
        .map(|l| PathBuf::from(l.trim_start_matches('/')))
        .filter(|rel| !rel.as_os_str().is_empty() && !before.contains(rel) && after.contains(rel))
        .map(|rel| rel.display().to_string())
        .collect();
    left.extend(
        after
            .difference(&before)
            .filter(|rel| !bookkeeping(rel))
            .map(|rel| rel.display().to_string()),
    );
    assert!(left.is_empty(), "left after purge: {left:#?}");
    let user = in_root(&root, &["getent", "passwd", "sluice"]);
    assert!(user.status.success(), "the user is kept after purge");

    // The postinst's other way to the user, where systemd-sysusers is missing: adduser.
    let userdel = in_root(&root, &["userdel", "sluice"]);
    assert!(userdel.status.success(), "userdel: {}", userdel.text());
    let hide = in_root(
        &root,
        &["sh", "-c", "mv \"$(command -v systemd-sysusers)\" /root/"],
    );
    assert!(
        hide.status.success(),
        "hide systemd-sysusers: {}",
        hide.text()
    );
    let out = in_root(
        &root,
        &[
            "apt-get",
            "install",
            "-y",
            "-o",
            "Dpkg::Use-Pty=0",
            &deb_in_root,
        ],
    );
    assert!(
        out.status.success(),
        "apt-get install with adduser: {}",
        out.text()
    );
    let user = in_root(&root, &["getent", "passwd", "sluice"]);
    assert!(
        user.status.success() && user.stdout.contains(":/nonexistent:/usr/sbin/nologin"),
        "adduser made no system user sluice: {}",
        user.text()
    );
    eprintln!("deb: user (adduser) {}", user.stdout.trim());
    let out = in_root(
        &root,
        &["apt-get", "purge", "-y", "-o", "Dpkg::Use-Pty=0", "sluice"],
    );
    assert!(out.status.success(), "apt-get purge: {}", out.text());
    assert!(!root.join("etc/sluice").exists() && !root.join("usr/bin/sluice").exists());
    eprintln!(
        "deb: built in {:.1} s, lintian {:.1} s, root ready {:.1} s, installed {:.1} s, \
         all done in {:.1} s",
        built.as_secs_f64(),
        (linted - built).as_secs_f64(),
        (cached - linted).as_secs_f64(),
        (installed_at - cached).as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
