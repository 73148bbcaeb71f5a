//! Privilege drop: started as root with `--user sluice`, the daemon binds, loads and attaches
//! its eBPF programs, then runs as `sluice` holding no capability, whatever the engine: in every
//! thread of the supervisor and of every worker (a restarted one too), CapEff, CapPrm, CapInh
//! and CapAmb are 0 (/proc/PID/task/TID/status), and the sockmap engine still relays on the
//! fast path (its maps private to the daemon, or pinned by `sluicectl load`). Its control
//! socket is 0660 to the `sluice` group. A user that does not exist stops the start with a
//! message saying how to create it.
//!
//! The same drop also runs inside the shipped systemd unit's limits: `setpriv` gives the daemon
//! the unit's `CapabilityBoundingSet` and `NoNewPrivileges`, read from
//! `dist/systemd/sluice.service` itself, so the unit and the code cannot drift apart (the drop
//! once needed CAP_SETPCAP, which the unit leaves out, and every start failed).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use sluice_tests::servers::{EchoServer, StreamServer};
use sluice_tests::{HUNG, Host, Sluice, client, require_root, run_with_timeout};

use super::{assert_engine, engine_ok, seed};

const USER: &str = "sluice";

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

/// What one thread holds: CapEff, CapPrm, CapInh, CapAmb of /proc/PID/task/TID/status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    eff: u64,
    prm: u64,
    inh: u64,
    amb: u64,
}

impl Held {
    const NOTHING: Held = Held {
        eff: 0,
        prm: 0,
        inh: 0,
        amb: 0,
    };
}

/// Every thread of process `pid`: (tid, name, what it holds). Threads that end meanwhile are
/// left out.
fn threads_held(pid: u32) -> Vec<(u32, String, Held)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {}", task.path().display()))
                .trim()
                .to_owned()
        };
        let hex = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        let tid = task.file_name().to_string_lossy().parse().unwrap();
        let held = Held {
            eff: hex("CapEff:"),
            prm: hex("CapPrm:"),
            inh: hex("CapInh:"),
            amb: hex("CapAmb:"),
        };
        out.push((tid, field("Name:"), held));
    }
    out
}

/// Every thread of the supervisor holds `supervisor`, every thread of each worker in `workers`
/// holds nothing: panics with each offending thread's four sets otherwise.
fn assert_held(supervisor_pid: u32, supervisor: Held, workers: &[u32], when: &str) {
    let mut wrong = Vec::new();
    let mut threads = 0;
    for (pid, want) in std::iter::once((supervisor_pid, supervisor))
        .chain(workers.iter().map(|&w| (w, Held::NOTHING)))
    {
        let role = if pid == supervisor_pid {
            "supervisor"
        } else {
            "worker"
        };
        let held = threads_held(pid);
        assert!(!held.is_empty(), "{when}: no threads of {role} {pid}");
        for (tid, name, h) in held {
            threads += 1;
            if h != want {
                wrong.push(format!(
                    "{role} {pid} thread {tid} ({name}): CapEff {:#x} CapPrm {:#x} CapInh {:#x} \
                     CapAmb {:#x}",
                    h.eff, h.prm, h.inh, h.amb
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{when}: threads holding capabilities they should not ({} of {threads}):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// What the supervisor keeps after its start-up, whatever the engine: nothing. It loads and
/// attaches the fast path (private or pinned maps) and XDP before the drop, hands the maps to
/// its workers by fd, and uses them (map updates, the event ring) only through those fds,
/// which needs no capability (ARCHITECTURE.md, "Capabilities").
const SUPERVISOR_KEEPS: Held = Held::NOTHING;

/// Where the drop runs: plain root, or inside a wrapper (`setpriv` with the unit's limits); with
/// the sockmap engine's maps private to the daemon, or pinned by `sluicectl load` under `pins`.
fn drops_to_user(engine: &str) {
    drops_to_user_under(engine, &[], None);
}

fn drops_to_user_under(engine: &str, wrapper: &[String], pins: Option<&std::path::Path>) {
    if !engine_ok(engine) || !require_root() {
        return;
    }
    let (uid, gid) = sluice_user();
    let host = Host::new();
    let server = EchoServer::start(host.addr());
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut cmd = Sluice::forward(Host::new().addr(), server.addr())
        .engine(engine)
        .workers(2)
        .wrap(&wrapper)
        .arg("--user")
        .arg(USER);
    if let Some(dir) = pins {
        let mut ctl = Command::new(sluice_tests::sluice::sluicectl_bin());
        ctl.arg("load").arg("--pin-dir").arg(dir);
        let out = run_with_timeout(&mut ctl, HUNG);
        assert!(out.status.success(), "sluicectl load: {}", out.text());
        cmd = cmd
            .arg("--bpf-pin-dir")
            .arg(dir.to_string_lossy().into_owned());
    }
    let relay = cmd.start();
    let workers = relay.wait_workers(2, HUNG);
    assert_engine(&relay, engine);
    if pins.is_some() {
        let status = relay.status();
        assert!(
            status["fast_path"]
                .as_str()
                .is_some_and(|s| s.contains("pinned under")),
            "the daemon does not use the pinned maps: {status}"
        );
    }
    let mut pids = vec![relay.pid()];
    pids.extend(&workers);
    for pid in &pids {
        let (ruid, euid, _) = identity(*pid);
        assert_eq!((ruid, euid), (uid, uid), "process {pid} runs as {USER}");
    }
    let meta = std::fs::metadata(relay.control_path()).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o660, gid),
        "the control socket is 0660 to the {USER} group"
    );
    // Relays (threads started for it included: io-wq, the resolver, the held-event relay)...
    let fast = engine == "sockmap";
    let pairs = || relay.counter("fast_path_pairs").unwrap_or(0);
    let conns = client::open_many(relay.addr(), None, 8).unwrap();
    client::echo_many(&conns, seed(), 1 << 20, false, HUNG)
        .unwrap_or_else(|e| panic!("{engine}: {e}\n{}", relay.stderr_log()));
    if fast {
        assert_eq!(
            pairs(),
            8,
            "every connection on the fast path: {}",
            relay.status()
        );
    }
    // ... and every thread holds what it should, with connections open.
    assert_held(relay.pid(), SUPERVISOR_KEEPS, &workers, "running");
    drop(conns);

    // A restarted worker comes back the same way, and relays on the fast path too.
    let victim = workers[0];
    let slot = relay.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"].as_u64() == Some(u64::from(victim)))
        .and_then(|w| w["index"].as_u64())
        .expect("the victim's slot in status") as usize;
    sluice_tests::sys::kill(victim, libc::SIGKILL);
    let mut fresh = Vec::new();
    let replaced = sluice_tests::wait_until(HUNG, || {
        fresh = relay.worker_pids();
        fresh.len() == 2 && !fresh.contains(&victim)
    });
    assert!(replaced, "the killed worker was not replaced: {fresh:?}");
    for pid in &fresh {
        let (ruid, euid, _) = identity(*pid);
        assert_eq!((ruid, euid), (uid, uid), "restarted worker {pid}");
    }
    let accepted = |i: usize| {
        relay.status()["workers"][i]["accepted"]
            .as_u64()
            .unwrap_or(0)
    };
    let total_accepted = || relay.counter("accepted").unwrap_or(0);
    let (slot_before, accepted_before, pairs_before) = (accepted(slot), total_accepted(), pairs());
    // One connection at a time until the restarted worker took one (the kernel spreads them).
    for _ in 0..64 {
        let conns = client::open_many(relay.addr(), None, 1).unwrap();
        client::echo_many(&conns, seed(), 1 << 16, false, HUNG)
            .unwrap_or_else(|e| panic!("after the restart: {e}\n{}", relay.stderr_log()));
        if accepted(slot) > slot_before {
            break;
        }
    }
    assert!(
        accepted(slot) > slot_before,
        "the restarted worker took no connection: {}",
        relay.status()
    );
    if fast {
        assert_eq!(
            pairs() - pairs_before,
            total_accepted() - accepted_before,
            "every connection after the restart on the fast path: {}",
            relay.status()
        );
    }
    assert_held(
        relay.pid(),
        SUPERVISOR_KEEPS,
        &fresh,
        "after a worker's restart",
    );
}

#[test]
fn splice_runs_as_sluice_with_no_capability() {
    drops_to_user("splice");
}

/// The sockmap engine's processes hold no capability once started: the supervisor loaded and
/// attached the fast path before the drop and hands its maps to the workers by fd. Before, the
/// supervisor's spawning thread, every thread it started later and every thread of every worker
/// kept CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (effective, permitted, inheritable, ambient).
#[test]
fn sockmap_runs_as_sluice_with_no_capability() {
    drops_to_user("sockmap");
}

/// The same with the maps pinned by `sluicectl load` (on a bpffs of the test's own), started
/// with an inheritable set as a container runtime may give one (Docker did before
/// CVE-2022-24769): threads started before the drop do not keep it either.
#[test]
fn sockmap_with_pinned_maps_runs_as_sluice_with_no_capability() {
    if !engine_ok("sockmap") || !require_root() || !sluice_tests::require_program("setpriv") {
        return;
    }
    let bpffs = super::ebpf::Bpffs::mount();
    let wrapper = ["setpriv", "--inh-caps=+net_admin,+bpf", "--"].map(str::to_owned);
    drops_to_user_under("sockmap", &wrapper, Some(&bpffs.path().join("sluice")));
}

#[test]
fn splice_drops_to_sluice_inside_the_units_bounding_set() {
    if !sluice_tests::require_program("setpriv") {
        return;
    }
    drops_to_user_under("splice", &unit_limits(), None);
}

#[test]
fn sockmap_drops_to_sluice_inside_the_units_bounding_set() {
    if !sluice_tests::require_program("setpriv") {
        return;
    }
    drops_to_user_under("sockmap", &unit_limits(), None);
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

/// Without CAP_NET_ADMIN in the bounding set (nor CAP_SYS_ADMIN, which the kernel takes in its
/// place, and which the unit leaves out) the supervisor cannot load the fast path: it says so
/// once, naming the capability, and its workers splice; the drop to `sluice` still happens
/// (no process keeps anything, so none can be missing for it). Before, workers kept the fast
/// path's capabilities and the drop itself stopped the start.
#[test]
fn sockmap_without_net_admin_names_it_and_splices() {
    if !engine_ok("sockmap") || !require_root() || !sluice_tests::require_program("setpriv") {
        return;
    }
    let (uid, _) = sluice_user();
    let server = EchoServer::start(Host::new().addr());
    let relay = Sluice::forward(Host::new().addr(), server.addr())
        .engine("sockmap")
        .workers(1)
        .wrap(&["setpriv", "--bounding-set=-net_admin,-sys_admin", "--"])
        .arg("--user")
        .arg(USER)
        .start();
    let workers = relay.wait_workers(1, HUNG);
    assert_engine(&relay, "splice");
    let status = relay.status();
    assert!(
        status["fast_path"]
            .as_str()
            .is_some_and(|s| s.starts_with("unavailable") && s.contains("CAP_NET_ADMIN")),
        "status does not say why the fast path is off: {status}"
    );
    assert!(
        relay.stderr_log().contains("CAP_NET_ADMIN"),
        "the log does not name CAP_NET_ADMIN: {}",
        relay.stderr_log()
    );
    let (ruid, euid, _) = identity(workers[0]);
    assert_eq!((ruid, euid), (uid, uid), "the worker runs as {USER}");
    assert_held(relay.pid(), SUPERVISOR_KEEPS, &workers, "splicing instead");
    let conns = client::open_many(relay.addr(), None, 2).unwrap();
    client::echo_many(&conns, seed(), 1 << 16, false, HUNG).unwrap();
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
