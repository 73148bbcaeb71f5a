//! Privilege drop: started as root with `--user sluice`, the daemon binds, loads its eBPF
//! programs, then runs as `sluice` with only the capabilities its engine still needs (none for
//! splice; CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN for sockmap, whose workers load the fast
//! path), and its
//! control socket is 0660 to the `sluice` group. Checked in /proc/PID/status of every process.
//! A user that does not exist stops the start with a message saying how to create it.
//!
//! The same drop also runs inside the shipped systemd unit's limits: `setpriv` gives the daemon
//! the unit's `CapabilityBoundingSet` and `NoNewPrivileges`, read from
//! `dist/systemd/sluice.service` itself, so the unit and the code cannot drift apart (the drop
//! once needed CAP_SETPCAP, which the unit leaves out, and every start failed).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use sluice_tests::servers::{Mode, StreamServer, StreamSpec};
use sluice_tests::{HUNG, Host, Sluice, client, require_root, run_with_timeout};

use super::{assert_engine, engine_ok, seed};

const USER: &str = "sluice";
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The `sluice` user, created the way the install step does if this machine lacks it.
pub(super) fn sluice_user() -> (u32, u32) {
    let lookup = || {
        let out = run_with_timeout(
            Command::new("id").args(["-u", USER]),
            Duration::from_secs(10),
        );
        let uid = out.stdout.trim().parse::<u32>().ok()?;
        let out = run_with_timeout(
            Command::new("id").args(["-g", USER]),
            Duration::from_secs(10),
        );
        Some((uid, out.stdout.trim().parse::<u32>().ok()?))
    };
    if let Some(ids) = lookup() {
        return ids;
    }
    let out = run_with_timeout(
        Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            USER,
        ]),
        Duration::from_secs(30),
    );
    // Another test thread may have created it meanwhile (exit 9: already exists).
    lookup().unwrap_or_else(|| panic!("cannot create user {USER}: {}", out.text()))
}

/// (real uid, effective uid, CapEff) of a process.
fn identity(pid: u32) -> (u32, u32, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let uids = field("Uid:");
    let cap_eff = u64::from_str_radix(&field("CapEff:")[0], 16).unwrap();
    (uids[0].parse().unwrap(), uids[1].parse().unwrap(), cap_eff)
}

/// `setpriv` arguments that give a process what `dist/systemd/sluice.service` gives it: its
/// `CapabilityBoundingSet` (root's permitted set is then that, as under systemd) and
/// `NoNewPrivileges`.
fn unit_limits() -> Vec<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/sluice.service");
    let text = std::fs::read_to_string(&path).unwrap();
    let key = |k: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(k)?.strip_prefix('='))
            .next_back()
            .unwrap_or_else(|| panic!("no {k}= in {}", path.display()))
            .trim()
            .to_owned()
    };
    let mut bounding = String::from("-all");
    for cap in key("CapabilityBoundingSet").split_whitespace() {
        let name = cap.strip_prefix("CAP_").expect("CAP_ names").to_lowercase();
        bounding.push_str(&format!(",+{name}"));
    }
    let mut args = vec!["setpriv".to_owned(), format!("--bounding-set={bounding}")];
    // systemd starts the daemon as root with the unit's Group= (no supplementary groups).
    if let Some(group) = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Group="))
        .next_back()
    {
        args.push(format!("--regid={}", group.trim()));
        args.push("--clear-groups".to_owned());
    }
    if key("NoNewPrivileges") == "yes" {
        args.push("--no-new-privs".to_owned());
    }
    args.push("--".to_owned());
    args
}

fn drops_to_user(engine: &str, caps: u64) {
    drops_to_user_under(engine, caps, &[]);
}

fn drops_to_user_under(engine: &str, caps: u64, wrapper: &[String]) {
    if !engine_ok(engine) || !require_root() {
        return;
    }
    let (uid, gid) = sluice_user();
    let host = Host::new();
    let server = StreamServer::start(host.addr());
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let relay = Sluice::forward(Host::new().addr(), server.addr())
        .engine(engine)
        .workers(2)
        .wrap(&wrapper)
        .arg("--user")
        .arg(USER)
        .start();
    assert_engine(&relay, engine);
    let mut pids = vec![relay.pid()];
    pids.extend(relay.worker_pids());
    assert_eq!(pids.len(), 3, "supervisor and two workers: {pids:?}");
    for (i, pid) in pids.iter().enumerate() {
        let (ruid, euid, cap_eff) = identity(*pid);
        assert_eq!((ruid, euid), (uid, uid), "process {pid} runs as {USER}");
        // The supervisor keeps what it hands its workers (ambient), nothing more.
        assert_eq!(
            cap_eff,
            caps,
            "{} {pid}: CapEff {cap_eff:#x}, expected {caps:#x}",
            if i == 0 { "supervisor" } else { "worker" }
        );
    }
    let meta = std::fs::metadata(relay.control_path()).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o660, gid),
        "the control socket is 0660 to the {USER} group"
    );
    // Still relays, and a restarted worker comes back the same way.
    let spec = StreamSpec::new(seed(), 1 << 20, 1 << 20, Mode::Concurrent);
    let client = client::run_stream(relay.addr(), spec);
    let result = server.result(spec.seed, HUNG);
    assert!(
        client.is_ok() && result.is_ok(),
        "{engine}: client {client:?}, server {result:?}"
    );
    let victim = pids[1];
    sluice_tests::sys::kill(victim, libc::SIGKILL);
    let mut fresh = Vec::new();
    let replaced = sluice_tests::wait_until(HUNG, || {
        fresh = relay.worker_pids();
        fresh.len() == 2 && !fresh.contains(&victim)
    });
    assert!(replaced, "the killed worker was not replaced: {fresh:?}");
    for pid in fresh {
        assert_eq!(identity(pid), (uid, uid, caps), "restarted worker {pid}");
    }
    let spec = StreamSpec::new(seed(), 1 << 16, 1 << 16, Mode::ReplyAfterEof);
    let client = client::run_stream(relay.addr(), spec);
    let result = server.result(spec.seed, HUNG);
    assert!(
        client.is_ok() && result.is_ok(),
        "after the restart: client {client:?}, server {result:?}"
    );
}

#[test]
fn splice_runs_as_sluice_with_no_capability() {
    drops_to_user("splice", 0);
}

#[test]
fn sockmap_keeps_only_bpf_perfmon_and_net_admin() {
    drops_to_user(
        "sockmap",
        (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN),
    );
}

#[test]
fn splice_drops_to_sluice_inside_the_units_bounding_set() {
    if !sluice_tests::require_program("setpriv") {
        return;
    }
    drops_to_user_under("splice", 0, &unit_limits());
}

#[test]
fn sockmap_drops_to_sluice_inside_the_units_bounding_set() {
    if !sluice_tests::require_program("setpriv") {
        return;
    }
    drops_to_user_under(
        "sockmap",
        (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN),
        &unit_limits(),
    );
}

/// `systemctl reload` runs the unit's `ExecReload` as root under the unit's own limits (unless
/// it is prefixed `+`), and the daemon it signals runs as `sluice` by then: root without CAP_KILL
/// may not signal it. Run exactly as systemd would, it must reload the daemon (it failed with
/// `kill: Operation not permitted` in a Debian 12 VM until the command got its `+`).
#[test]
fn the_units_reload_command_reloads_the_dropped_daemon() {
    if !engine_ok("splice") || !require_root() || !sluice_tests::require_program("setpriv") {
        return;
    }
    sluice_user();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/sluice.service");
    let text = std::fs::read_to_string(&path).unwrap();
    let reload = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ExecReload="))
        .next_back()
        .expect("the unit has an ExecReload")
        .to_owned();
    let up = StreamServer::start(Host::new().addr());
    let limits = unit_limits();
    let wrapper: Vec<&str> = limits.iter().map(String::as_str).collect();
    let relay = Sluice::forward(Host::new().addr(), up.addr())
        .engine("splice")
        .workers(1)
        .wrap(&wrapper)
        .arg("--user")
        .arg(USER)
        .start();
    // systemd's prefixes: `+` runs the command with full privileges, none under the unit's.
    let (privileged, command) = match reload.strip_prefix('+') {
        Some(c) => (true, c),
        None => (false, reload.as_str()),
    };
    let words: Vec<String> = command
        .split_whitespace()
        .map(|w| w.replace("$MAINPID", &relay.pid().to_string()))
        .collect();
    let mut cmd = if privileged {
        Command::new(&words[0])
    } else {
        let mut c = Command::new(&limits[0]);
        c.args(&limits[1..]).arg(&words[0]);
        c
    };
    cmd.args(&words[1..]);
    let out = run_with_timeout(&mut cmd, HUNG);
    assert!(
        out.status.success(),
        "ExecReload={reload}: {:?}\n{}",
        out.status,
        out.stderr
    );
    // Started from the command line, the daemon refreshes names and says the rest cannot change
    // (`reloads_failed`); what matters here is that the signal arrived.
    assert!(
        sluice_tests::wait_until(HUNG, || relay.stderr_log().contains("SIGHUP: reloading")),
        "ExecReload={reload} did not reach the daemon:\n{}",
        relay.stderr_log()
    );
    relay.stop();
}

/// Without CAP_SETUID in the bounding set the drop cannot happen: the start stops with the step
/// and the missing capability named, not a bare `Operation not permitted`.
#[test]
fn a_drop_without_setuid_names_the_missing_capability() {
    if !require_root() || !sluice_tests::require_program("setpriv") {
        return;
    }
    sluice_user();
    let out = Sluice::forward(Host::new().addr(), Host::new().addr())
        .engine("splice")
        .wrap(&["setpriv", "--bounding-set=-setuid", "--no-new-privs", "--"])
        .arg("--user")
        .arg(USER)
        .run_to_exit(Duration::from_secs(30));
    assert!(
        !out.status.success()
            && out.stderr.contains("dropping privileges to user `sluice`")
            && out.stderr.contains("CAP_SETUID is not in the bounding set"),
        "start without CAP_SETUID: {}",
        out.text()
    );
}

/// A relay that drops to `sluice` keeps the capability its engine needs only if the bounding set
/// has it; without CAP_NET_ADMIN the sockmap engine's drop says which one is missing.
#[test]
fn a_drop_that_cannot_keep_a_needed_capability_names_it() {
    if !engine_ok("sockmap") || !require_root() || !sluice_tests::require_program("setpriv") {
        return;
    }
    sluice_user();
    let out = Sluice::forward(Host::new().addr(), Host::new().addr())
        .engine("sockmap")
        .wrap(&["setpriv", "--bounding-set=-net_admin", "--"])
        .arg("--user")
        .arg(USER)
        .run_to_exit(Duration::from_secs(30));
    assert!(
        !out.status.success() && out.stderr.contains("CAP_NET_ADMIN"),
        "sockmap start without CAP_NET_ADMIN: {}",
        out.text()
    );
}

/// No process of the relay can leave a core dump (it would hold client addresses and the TLS
/// key): RLIMIT_CORE is 0 in the supervisor and every worker, which are not dumpable either
/// (their /proc entries then belong to root).
#[test]
fn no_process_of_the_relay_dumps_core() {
    if !require_root() {
        return;
    }
    let (uid, _) = sluice_user();
    let server = StreamServer::start(Host::new().addr());
    let relay = Sluice::forward(Host::new().addr(), server.addr())
        .workers(2)
        .arg("--user")
        .arg(USER)
        .start();
    let mut pids = vec![relay.pid()];
    pids.extend(relay.worker_pids());
    for pid in pids {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        let fields: Vec<&str> = core.split_whitespace().collect();
        assert_eq!(
            &fields[4..6],
            &["0", "0"],
            "process {pid}: soft and hard core limits: {core}"
        );
        // A non-dumpable process's private /proc files are root's, whatever its uid (the
        // directory itself keeps the euid, for ps).
        let owner = std::fs::metadata(format!("/proc/{pid}/environ"))
            .unwrap()
            .uid();
        let (ruid, _, _) = identity(pid);
        assert_eq!((ruid, owner), (uid, 0), "process {pid} is not dumpable");
    }
}

#[test]
fn a_missing_user_stops_the_start() {
    sluice_tests::init();
    let out = Sluice::forward(Host::new().addr(), Host::new().addr())
        .arg("--user")
        .arg("no-such-sluice-user")
        .run_to_exit(Duration::from_secs(20));
    assert!(
        !out.status.success() && out.stderr.contains("useradd"),
        "start with a missing user: {}",
        out.text()
    );
}

/// A compromised worker cannot reach the control plane: `sluicectl deny add` run with a
/// worker's credentials (its uid and gid, read from /proc; the socket is 0660 to that group)
/// is refused by the daemon (SO_PEERCRED: the daemon's own user), and the lists stay as they
/// were; root still gets in. Before, the group's permission let it change the lists.
#[test]
fn a_worker_cannot_use_the_control_socket() {
    if !engine_ok("epoll") || !require_root() || !sluice_tests::require_program("setpriv") {
        return;
    }
    let (uid, gid) = sluice_user();
    let server = StreamServer::start(Host::new().addr());
    let relay = Sluice::forward(Host::new().addr(), server.addr())
        .engine("epoll")
        .workers(1)
        .arg("--user")
        .arg(USER)
        .start();
    let worker = relay.wait_workers(1, HUNG)[0];
    let (ruid, euid, _) = identity(worker);
    assert_eq!((ruid, euid), (uid, uid), "the worker runs as {USER}");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={gid}"),
        "--clear-groups",
    ])
    .arg(sluice_tests::sluice::sluicectl_bin())
    .arg("--control")
    .arg(relay.control_path())
    .args(["deny", "add", "127.0.0.3/32"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(
        !out.status.success() && out.stderr.contains("refused"),
        "with a worker's credentials: {}",
        out.text()
    );
    let list = relay.ctl(&["deny", "list"]);
    assert!(list.status.success(), "root still gets in: {}", list.text());
    assert_eq!(list.stdout.trim(), "", "nothing was denied");
}
