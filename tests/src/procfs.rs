//! What the tests read from /proc: children of a process, fd counts, start times (to never
//! signal a recycled pid), and the TCP socket table (who listens, which process owns a socket).

use std::collections::HashSet;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Direct children of `pid`, over all its threads (a child may be forked from any thread).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path().join("children");
        if let Ok(text) = fs::read_to_string(path) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Number of open fds of `pid`, or None when it is gone.
pub fn fd_count(pid: u32) -> Option<usize> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// Open fds of a process (or a sum over processes) by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FdKinds {
    pub sockets: usize,
    pub pipes: usize,
    /// Everything else: io_uring and epoll instances, eventfds, timers, files.
    pub other: usize,
}

impl FdKinds {
    /// Sockets and other fds: what must come back to its baseline once connections are gone
    /// (pipes may stay in a bounded pool).
    pub fn non_pipe(&self) -> usize {
        self.sockets + self.other
    }

    pub fn total(&self) -> usize {
        self.sockets + self.pipes + self.other
    }
}

impl std::ops::Add for FdKinds {
    type Output = FdKinds;
    fn add(self, o: FdKinds) -> FdKinds {
        FdKinds {
            sockets: self.sockets + o.sockets,
            pipes: self.pipes + o.pipes,
            other: self.other + o.other,
        }
    }
}

/// `pid`'s open fds by kind, or None when it is gone.
pub fn fd_kinds(pid: u32) -> Option<FdKinds> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut k = FdKinds::default();
    for entry in dir.flatten() {
        match fs::read_link(entry.path()) {
            Ok(t) if t.to_string_lossy().starts_with("socket:") => k.sockets += 1,
            Ok(t) if t.to_string_lossy().starts_with("pipe:") => k.pipes += 1,
            _ => k.other += 1,
        }
    }
    Some(k)
}

/// Fields of /proc/PID/stat after the command name: [0] is the state, [19] the start time.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Start time of `pid` in clock ticks since boot: (pid, start time) names one process for good.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z" && s != "X"))
}

/// True when (`pid`, `start`) is still the same live process.
pub fn same_process(pid: u32, start: u64) -> bool {
    alive(pid) && start_time(pid) == Some(start)
}

/// One line of /proc/net/tcp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// Kernel TCP state: 0x01 ESTABLISHED, 0x0A LISTEN, ...
    pub state: u8,
    pub inode: u64,
    /// Send-Q: bytes written and not yet acknowledged by the peer (`tx_queue`).
    pub tx_queue: u64,
    /// Recv-Q: bytes received and not yet read by the owner (`rx_queue`).
    pub rx_queue: u64,
}

pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0a;

fn parse_addr(s: &str) -> Option<SocketAddrV4> {
    let (ip, port) = s.split_once(':')?;
    // The kernel prints the network-order u32 as a native integer.
    let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
    Some(SocketAddrV4::new(ip, u16::from_str_radix(port, 16).ok()?))
}

/// The IPv4 TCP socket table of this network namespace.
pub fn tcp_table() -> Vec<TcpEntry> {
    // The calling thread's network namespace (a test may run a relay in a namespace of its
    // own on one thread); /proc/net is the main thread's.
    let text = fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (tx, rx) = f.get(4)?.split_once(':')?;
            Some(TcpEntry {
                tx_queue: u64::from_str_radix(tx, 16).ok()?,
                rx_queue: u64::from_str_radix(rx, 16).ok()?,
                local: parse_addr(f.get(1)?)?,
                remote: parse_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Send-Q and Recv-Q summed over the IPv4 TCP sockets `pid` has open: (tx, rx).
pub fn tcp_queues(pid: u32) -> (u64, u64) {
    let mine = socket_inodes(pid);
    tcp_table()
        .iter()
        .filter(|e| mine.contains(&e.inode))
        .fold((0, 0), |(tx, rx), e| (tx + e.tx_queue, rx + e.rx_queue))
}

/// True when some socket listens on `addr` (checked without connecting to it).
pub fn is_listening(addr: SocketAddr) -> bool {
    let SocketAddr::V4(addr) = addr else {
        return false;
    };
    tcp_table()
        .iter()
        .any(|e| e.state == TCP_LISTEN && e.local == addr)
}

/// Inodes of the sockets `pid` has open.
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for entry in dir.flatten() {
        if let Ok(target) = fs::read_link(entry.path()) {
            let t = target.to_string_lossy();
            if let Some(Ok(n)) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::parse)
            {
                out.insert(n);
            }
        }
    }
    out
}

/// Which of `pids` holds the socket of the established connection `local` <-> `remote`
/// (e.g. the relay's accepted socket: local = the listen address, remote = the client).
pub fn socket_owner(local: SocketAddr, remote: SocketAddr, pids: &[u32]) -> Option<u32> {
    let (SocketAddr::V4(local), SocketAddr::V4(remote)) = (local, remote) else {
        return None;
    };
    let inode = tcp_table()
        .into_iter()
        .find(|e| e.state == TCP_ESTABLISHED && e.local == local && e.remote == remote)?
        .inode;
    pids.iter()
        .copied()
        .find(|p| socket_inodes(*p).contains(&inode))
}

/// Resident memory of `pid` in KiB (`VmRSS` in /proc/PID/status), None if it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn sees_its_own_listener_and_fds() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(is_listening(addr));
        let me = std::process::id();
        assert!(fd_count(me).unwrap() >= 3);
        assert!(alive(me));
        assert!(same_process(me, start_time(me).unwrap()));
        let inode = tcp_table()
            .into_iter()
            .find(|e| e.state == TCP_LISTEN && SocketAddr::V4(e.local) == addr);
        assert!(socket_inodes(me).contains(&inode.unwrap().inode));
    }
}
