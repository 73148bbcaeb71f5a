//! What the kernel says a process tree and the machine spent: CPU times from `/proc/PID/stat`
//! and `/proc/stat`, memory from `/proc/PID/smaps_rollup`, children from
//! `/proc/PID/task/TID/children`.
//!
//! Two readings of a tree's CPU, because `/proc/PID/stat` counts in 10 ms ticks truncated per
//! process: a socat child that spent 8 ms shows 0, and a thousand of them vanish.
//! - [`tree_cpu`]: `utime + stime + cutime + cstime` from `stat` (user/system split; coarse);
//! - [`tree_runtime_s`]: the scheduler's nanosecond `sum_exec_runtime` of every live thread
//!   (`/proc/PID/task/TID/schedstat`) plus `cutime + cstime` (children that exited and were
//!   reaped, like socat's forks, move their time there). Precise, but a thread that exits
//!   mid-window (an idle io-wq worker) takes its time with it; [`crate::suite`] falls back to the
//!   `stat` reading when that one is clearly larger.
//!
//! Kernel threads a process owns (io_uring's io-wq workers) belong to its thread group, so both
//! readings include them.

use std::fs;
use std::sync::OnceLock;

/// Clock ticks per second of the `/proc` CPU fields.
pub fn ticks_per_s() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the C library and touches no memory of ours.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    })
}

/// `pid` and all its descendants (bounded: at most 100 000 processes).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 100_000 {
        let p = out[i];
        if let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let path = t.path().join("children");
                if let Ok(text) = fs::read_to_string(path) {
                    out.extend(
                        text.split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
        i += 1;
    }
    out
}

/// CPU seconds of one process, split into user and system, its reaped children included.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    pub user_s: f64,
    pub sys_s: f64,
}

impl Cpu {
    pub fn total(&self) -> f64 {
        self.user_s + self.sys_s
    }
    pub fn plus(self, o: Cpu) -> Cpu {
        Cpu {
            user_s: self.user_s + o.user_s,
            sys_s: self.sys_s + o.sys_s,
        }
    }
    pub fn minus(self, o: Cpu) -> Cpu {
        Cpu {
            user_s: self.user_s - o.user_s,
            sys_s: self.sys_s - o.sys_s,
        }
    }
}

/// CPU of one process from `/proc/PID/stat`; zero when it is gone.
pub fn process_cpu(pid: u32) -> Cpu {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .unwrap_or_default()
}

/// Fields 14–17 of `/proc/PID/stat` (utime, stime, cutime, cstime), after the `comm` field,
/// which may itself contain spaces and parentheses.
fn parse_stat(text: &str) -> Option<Cpu> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let tck = ticks_per_s();
    Some(Cpu {
        user_s: (n(11)? + n(13)?) as f64 / tck,
        sys_s: (n(12)? + n(14)?) as f64 / tck,
    })
}

/// CPU of a whole tree.
pub fn tree_cpu(pid: u32) -> Cpu {
    tree(pid)
        .into_iter()
        .map(process_cpu)
        .fold(Cpu::default(), Cpu::plus)
}

/// Scheduler runtime of a process's live threads plus its reaped children's CPU, in seconds.
pub fn process_runtime_s(pid: u32) -> f64 {
    let mut ns = 0u64;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = fs::read_to_string(t.path().join("schedstat")) {
                ns += text
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    let children = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_children(&s))
        .unwrap_or(0.0);
    ns as f64 / 1e9 + children
}

/// Fields 16–17 (cutime, cstime) in seconds.
fn parse_children(text: &str) -> Option<f64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((n(13)? + n(14)?) as f64 / ticks_per_s())
}

/// [`process_runtime_s`] over a whole tree.
pub fn tree_runtime_s(pid: u32) -> f64 {
    tree(pid).into_iter().map(process_runtime_s).sum()
}

/// Threads over a whole tree (a splice engine's io-wq workers show up here).
pub fn tree_threads(pid: u32) -> usize {
    tree(pid)
        .into_iter()
        .filter_map(|p| fs::read_dir(format!("/proc/{p}/task")).ok())
        .map(|d| d.count())
        .sum()
}

/// Resident and proportional set size, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Mem {
    pub rss_kb: u64,
    pub pss_kb: u64,
}

/// Memory of a whole tree, from `smaps_rollup`.
pub fn tree_mem(pid: u32) -> Mem {
    let mut m = Mem::default();
    for p in tree(pid) {
        let Ok(text) = fs::read_to_string(format!("/proc/{p}/smaps_rollup")) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        m.rss_kb += field("Rss:");
        m.pss_kb += field("Pss:");
    }
    m
}

/// Scheduler runtime (s) of every kernel thread (a child of `kthreadd`, pid 2): the kworkers
/// that forward the sockmap path's redirected bytes, ksoftirqd, and the like. Threads that
/// exit between two readings take their time with them.
pub fn kernel_threads_s() -> f64 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ns = 0u64;
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, then the parent's pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(2) {
            continue;
        }
        if let Ok(sched) = fs::read_to_string(format!("/proc/{pid}/schedstat")) {
            ns += sched
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}

/// TCP counters of the benchmark's network namespace (`/proc/net/snmp`, `/proc/net/netstat`):
/// every socket of the run (clients, relay, upstream) counts in them, so a window's difference
/// tells what a workload cost in segments, and how many of them were sent again.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tcp {
    pub out_segs: u64,
    pub retrans_segs: u64,
    /// Retransmissions the receiver reported as already received (`TCPDSACKRecvSegs`):
    /// spurious, sent again because of reordering rather than loss.
    pub dsack_segs: u64,
}

impl Tcp {
    pub fn minus(&self, earlier: &Tcp) -> Tcp {
        Tcp {
            out_segs: self.out_segs.saturating_sub(earlier.out_segs),
            retrans_segs: self.retrans_segs.saturating_sub(earlier.retrans_segs),
            dsack_segs: self.dsack_segs.saturating_sub(earlier.dsack_segs),
        }
    }
}

/// The named fields of a `/proc/net/{snmp,netstat}` section: a header line and a value line,
/// both starting with `prefix`.
fn snmp_fields(text: &str, prefix: &str) -> Vec<(String, u64)> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

pub fn tcp() -> Tcp {
    let snmp = fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let netstat = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut fields = snmp_fields(&snmp, "Tcp:");
    fields.extend(snmp_fields(&netstat, "TcpExt:"));
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    };
    Tcp {
        out_segs: get("OutSegs"),
        retrans_segs: get("RetransSegs"),
        dsack_segs: get("TCPDSACKRecvSegs"),
    }
}

/// The machine's CPU time from the first line of `/proc/stat`, in seconds over all cores.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Machine {
    /// user + nice + system + irq + softirq + steal: sampled at the tick (see
    /// [`crate::suite::Window::machine_busy_s`] for why the benchmark uses `idle_s` instead).
    pub busy_s: f64,
    /// irq + softirq alone (not charged to any process here).
    pub irq_s: f64,
    pub idle_s: f64,
}

pub fn machine() -> Machine {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = text.lines().next().unwrap_or("");
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse::<u64>().ok())
        .map(|v| v as f64 / ticks_per_s())
        .collect();
    let g = |i: usize| f.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal guest guest_nice
    Machine {
        busy_s: g(0) + g(1) + g(2) + g(5) + g(6) + g(7),
        irq_s: g(5) + g(6),
        idle_s: g(3) + g(4),
    }
}

/// Cores online.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// CPU of this process's waited-for children (and theirs), user and system.
pub fn children_cpu() -> Cpu {
    rusage(libc::RUSAGE_CHILDREN)
}

/// CPU of this process.
pub fn self_cpu() -> Cpu {
    rusage(libc::RUSAGE_SELF)
}

fn rusage(who: libc::c_int) -> Cpu {
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Cpu::default();
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Cpu {
        user_s: s(ru.ru_utime),
        sys_s: s(ru.ru_stime),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_sections() {
        let text = "Tcp: RtoAlgorithm OutSegs RetransSegs\nTcp: 1 77862297 67866\n\
                    Udp: InDatagrams\nUdp: 5\n";
        assert_eq!(
            snmp_fields(text, "Tcp:"),
            vec![
                ("RtoAlgorithm".to_owned(), 1),
                ("OutSegs".to_owned(), 77_862_297),
                ("RetransSegs".to_owned(), 67_866)
            ]
        );
        assert!(snmp_fields(text, "TcpExt:").is_empty());
    }

    #[test]
    fn stat_with_odd_comm() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 5 0 0";
        let cpu = parse_stat(line).unwrap();
        let tck = ticks_per_s();
        assert_eq!(cpu.user_s, 257.0 / tck);
        assert_eq!(cpu.sys_s, 53.0 / tck);
    }

    #[test]
    fn own_tree_is_found() {
        let me = std::process::id();
        assert_eq!(tree(me)[0], me);
        assert!(tree_mem(me).rss_kb > 0);
        assert!(machine().busy_s > 0.0);
        // ksoftirqd, rcu and kworkers have run since boot.
        assert!(kernel_threads_s() > 0.0);
        // Whatever ran before this test sent segments (the orchestrator's own checks, apt).
        let t = tcp();
        assert!(t.out_segs >= t.retrans_segs);
    }
}
