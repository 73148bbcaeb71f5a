//! The eBPF chain end to end, on real sockets: the object `cargo xtask build-ebpf` built, embedded
//! by the relay, loaded with aya, verified by this kernel, attached, and moving bytes.
//!
//! Every test relays between two TCP pairs on loopback, the way the sockmap engine does:
//! `a_client -> a_server` is the client's connection to the relay, `b_client -> b_server` the
//! relay's connection to the upstream; `a_server` and `b_client` are put on the fast path as peers.
//! The XDP test runs in a network namespace of its own, so its deny list touches nothing else.
//!
//! Needs root with CAP_BPF, CAP_NET_ADMIN (and CAP_SYS_ADMIN for namespaces and bpffs). Without
//! them a test prints why and returns, or fails when `SLUICE_REQUIRE_CAPS=1` (as in CI).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use sluice::cidr::Cidr;
use sluice::ebpf::{ConnCounters, EbpfError, FastPath, Kick, Occupancy, XdpDeny, kick};

/// How long any single read or connect may take before the test fails (never a timing assert).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Whether this process has every capability in `caps` (read from /proc, no syscall needed).
fn missing_caps(caps: &[(u32, &'static str)]) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = caps
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    (!missing.is_empty()).then(|| format!("needs {}", missing.join(", ")))
}

/// The kernel-feature gate: `true` to run; otherwise prints why and returns `false`, or panics
/// under `SLUICE_REQUIRE_CAPS=1` so CI never passes a test that did not run.
fn gate(test: &str, caps: &[(u32, &'static str)]) -> bool {
    let Some(why) = missing_caps(caps) else {
        return true;
    };
    if std::env::var_os("SLUICE_REQUIRE_CAPS").is_some_and(|v| v == "1") {
        panic!("{test}: {why} (SLUICE_REQUIRE_CAPS=1)");
    }
    eprintln!("{test}: skipped: {why}");
    false
}

const BPF_CAPS: &[(u32, &str)] = &[(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")];
const NS_CAPS: &[(u32, &str)] = &[
    (CAP_BPF, "CAP_BPF"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
];

/// A connected TCP pair on 127.0.0.1: (client side, server side), both with I/O timeouts.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    for s in [&client, &server] {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    }
    (client, server)
}

/// The four sockets of one relayed connection, with `a_server`/`b_client` on the fast path.
struct Relay {
    a_client: TcpStream,
    a_server: TcpStream,
    b_client: TcpStream,
    b_server: TcpStream,
    cookies: (u64, u64),
}

fn relay(fp: &mut FastPath) -> Relay {
    let (a_client, a_server) = tcp_pair();
    let (b_client, b_server) = tcp_pair();
    let cookies = fp
        .insert_pair(a_server.as_fd(), b_client.as_fd())
        .expect("insert_pair");
    Relay {
        a_client,
        a_server,
        b_client,
        b_server,
        cookies,
    }
}

/// `len` bytes that differ per position and per `seed`, so a lost, duplicated or reordered
/// chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn read_exactly(from: &mut TcpStream, len: usize, what: &str) -> Vec<u8> {
    let mut buf = vec![0; len];
    from.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: reading {len} bytes: {e}"));
    buf
}

/// Whether `s` becomes readable (data, EOF or error) within `ms`, without reading it.
fn readable_within(s: &TcpStream, ms: i32) -> bool {
    poll(s, libc::POLLIN, ms) != 0
}

/// `poll(2)` on one socket; returns the events that fired (0 on timeout).
fn poll(s: &TcpStream, events: libc::c_short, ms: i32) -> libc::c_short {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, initialised pollfd that lives across the call; `s` keeps the fd
    // open for the duration.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    assert!(n >= 0, "poll: {}", io::Error::last_os_error());
    pfd.revents
}

/// Waits (bounded) until `cond` holds on the counters of `cookie`; returns them.
fn counters_when(
    fp: &FastPath,
    cookie: u64,
    what: &str,
    cond: impl Fn(&ConnCounters) -> bool,
) -> ConnCounters {
    for _ in 0..200 {
        let c = fp.counters(cookie).expect("counters").expect("entry");
        if cond(&c) {
            return c;
        }
        thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "{what}: counters never got there: {:?}",
        fp.counters(cookie)
    );
}

#[test]
fn sockmap_relays_both_ways_byte_exact() {
    if !gate("sockmap_relays_both_ways_byte_exact", BPF_CAPS) {
        return;
    }
    let mut fp = FastPath::load().expect("load the fast path");
    let mut r = relay(&mut fp);
    let (c, u) = r.cookies;
    assert_ne!(c, u);
    assert_eq!(
        fp.occupancy().unwrap(),
        Occupancy {
            sockets: 2,
            peers: 2,
            counters: 2
        }
    );

    // Small messages, one each way.
    r.a_client.write_all(b"hello upstream").unwrap();
    assert_eq!(
        read_exactly(&mut r.b_server, 14, "client->upstream"),
        b"hello upstream"
    );
    r.b_server.write_all(b"hello client").unwrap();
    assert_eq!(
        read_exactly(&mut r.a_client, 12, "upstream->client"),
        b"hello client"
    );

    // Bulk both ways at once: 4 MiB each, written while the other side reads.
    const BULK: usize = 4 << 20;
    let up = pattern(BULK, 1);
    let down = pattern(BULK, 2);
    let mut a_writer = r.a_client.try_clone().unwrap();
    let mut b_writer = r.b_server.try_clone().unwrap();
    let (up_w, down_w) = (up.clone(), down.clone());
    let w1 = thread::spawn(move || a_writer.write_all(&up_w));
    let w2 = thread::spawn(move || b_writer.write_all(&down_w));
    let mut b_reader = r.b_server.try_clone().unwrap();
    let reader = thread::spawn(move || read_exactly(&mut b_reader, BULK, "bulk client->upstream"));
    let got_down = read_exactly(&mut r.a_client, BULK, "bulk upstream->client");
    let got_up = reader.join().unwrap();
    w1.join().unwrap().expect("write client->upstream");
    w2.join().unwrap().expect("write upstream->client");
    assert!(got_up == up, "client->upstream bytes differ");
    assert!(got_down == down, "upstream->client bytes differ");

    // Every byte went through the verdict, none was left to user space.
    let total_up = (14 + BULK) as u64;
    let total_down = (12 + BULK) as u64;
    let cc = counters_when(&fp, c, "client side", |x| x.bytes == total_up);
    let cu = counters_when(&fp, u, "upstream side", |x| x.bytes == total_down);
    assert_eq!((cc.passed_skbs, cu.passed_skbs), (0, 0));
    assert!(cc.skbs >= 2 && cu.skbs >= 2);
    assert!(!readable_within(&r.a_server, 0) && !readable_within(&r.b_client, 0));

    // Off the fast path: the final counters come back, every map is empty, and the sockets are
    // plain sockets again.
    let (fc, fu) = fp.remove_pair((c, u)).expect("remove_pair");
    assert_eq!((fc.bytes, fu.bytes), (total_up, total_down));
    assert_eq!(fp.occupancy().unwrap(), Occupancy::default());
    assert_eq!(fp.counters(c).unwrap(), None);
    r.a_client.write_all(b"direct").unwrap();
    assert_eq!(read_exactly(&mut r.a_server, 6, "after removal"), b"direct");
    // Removing twice is not an error (closed sockets leave the sockmap by themselves, too).
    fp.remove_pair((c, u)).expect("second remove_pair");
}

#[test]
fn sockmap_fin_is_dropped_and_forwarded_by_user_space() {
    if !gate(
        "sockmap_fin_is_dropped_and_forwarded_by_user_space",
        BPF_CAPS,
    ) {
        return;
    }
    let mut fp = FastPath::load().expect("load the fast path");
    let mut r = relay(&mut fp);
    let (c, _) = r.cookies;

    r.a_client.write_all(b"last words").unwrap();
    r.a_client.shutdown(Shutdown::Write).unwrap();

    // The data arrives; the FIN does not: it reaches the verdict as a zero-length skb, which
    // gets SK_DROP (counted), and shows on the relay's socket as POLLRDHUP.
    assert_eq!(
        read_exactly(&mut r.b_server, 10, "before FIN"),
        b"last words"
    );
    let revents = poll(&r.a_server, libc::POLLRDHUP, IO_TIMEOUT.as_millis() as i32);
    assert!(revents & libc::POLLRDHUP != 0, "no POLLRDHUP: {revents:#x}");
    let cc = counters_when(&fp, c, "FIN", |x| x.empty_skbs >= 1);
    assert_eq!(cc.bytes, 10);
    assert!(
        !readable_within(&r.b_server, 200),
        "the FIN was forwarded by the kernel"
    );

    // The half-closed connection still carries bytes the other way.
    r.b_server.write_all(b"reply").unwrap();
    assert_eq!(
        read_exactly(&mut r.a_client, 5, "after half-close"),
        b"reply"
    );

    // User space forwards the FIN once every byte is delivered; the upstream then sees EOF.
    r.b_client.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    r.b_server
        .read_to_end(&mut rest)
        .expect("EOF after forwarded FIN");
    assert!(rest.is_empty(), "unexpected bytes: {rest:?}");

    // And the reverse FIN the same way: the verdict drops it, user space forwards it.
    r.b_server.shutdown(Shutdown::Write).unwrap();
    let revents = poll(&r.b_client, libc::POLLRDHUP, IO_TIMEOUT.as_millis() as i32);
    assert!(
        revents & libc::POLLRDHUP != 0,
        "no POLLRDHUP upstream: {revents:#x}"
    );
    r.a_server.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    r.a_client
        .read_to_end(&mut rest)
        .expect("EOF at the client");
    assert!(rest.is_empty());

    fp.remove_pair(r.cookies).unwrap();
    assert_eq!(fp.occupancy().unwrap(), Occupancy::default());
}

/// Observed on 6.18: bytes queued on a socket before insertion are not redirected. When they fill
/// the receive window nothing else arrives to move them, and the pair stalls. One non-blocking
/// read on the socket (the kick) returns EAGAIN, and the kernel redirects the whole queue.
#[test]
fn sockmap_bytes_queued_before_insertion_need_a_kick() {
    if !gate(
        "sockmap_bytes_queued_before_insertion_need_a_kick",
        BPF_CAPS,
    ) {
        return;
    }
    let mut fp = FastPath::load().expect("load the fast path");
    let (mut a_client, a_server) = tcp_pair();
    let (b_client, mut b_server) = tcp_pair();

    // More than the initial receive window: part sits on a_server, part in a_client's send queue.
    const EARLY: usize = 512 << 10;
    let early = pattern(EARLY, 3);
    let mut writer = a_client.try_clone().unwrap();
    let early_w = early.clone();
    let w = thread::spawn(move || writer.write_all(&early_w));
    assert!(readable_within(&a_server, IO_TIMEOUT.as_millis() as i32));
    thread::sleep(Duration::from_millis(50)); // let the window fill (not an assert)

    let (c, u) = fp
        .insert_pair(a_server.as_fd(), b_client.as_fd())
        .expect("insert_pair");
    assert_eq!(fp.counters(c).unwrap().unwrap().bytes, 0);
    assert!(
        !readable_within(&b_server, 200),
        "queued bytes moved without a kick: the kernel changed, update ebpf.rs's docs"
    );

    // The kick: the kernel takes the queue, user space gets nothing to forward.
    let mut buf = vec![0; 64 << 10];
    assert_eq!(kick(a_server.as_fd(), &mut buf).unwrap(), Kick::Empty);
    assert_eq!(kick(b_client.as_fd(), &mut buf).unwrap(), Kick::Empty);
    let got = read_exactly(&mut b_server, EARLY, "queued before insertion");
    assert!(got == early, "queued bytes differ after the kick");
    w.join().unwrap().expect("early writer");

    // From here on bytes flow by themselves.
    a_client.write_all(b"late").unwrap();
    assert_eq!(read_exactly(&mut b_server, 4, "after the kick"), b"late");
    counters_when(&fp, c, "kicked", |x| x.bytes == (EARLY + 4) as u64);
    fp.remove_pair((c, u)).unwrap();
    assert_eq!(fp.occupancy().unwrap(), Occupancy::default());
}

/// Runs `f` on a thread of its own inside a new network namespace with `lo` up, and returns what
/// it returns. The namespace dies with the thread.
pub(super) fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        // SAFETY: plain syscall on this thread only; CLONE_NEWNET moves just the calling thread
        // (network namespaces are per task), which no other code shares.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        // A child forked from this thread inherits its namespace.
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

/// Connects to `to` from source address `from`; `Ok` if the handshake completed in time.
fn connect_from(from: SocketAddr, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(to);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    s.bind(&from.into())?;
    s.connect_timeout(&to.into(), timeout)?;
    Ok(s.into())
}

/// The XDP program drops SYNs of denied sources (IPv4 and IPv6) to the ports in its port map
/// only: other ports of the host stay reachable, and a port taken out of the map is no longer
/// guarded.
#[test]
fn xdp_drops_syns_of_denied_clients_only() {
    if !gate("xdp_drops_syns_of_denied_clients_only", NS_CAPS) {
        return;
    }
    in_netns(|| {
        let mut xdp = XdpDeny::attach("lo").expect("attach XDP to lo");
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let (v4, v6) = (v4.local_addr().unwrap(), v6.local_addr().unwrap());
        // Another service on ports the relay does not listen on (SSH, say).
        let service4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let service6 = TcpListener::bind("[::1]:0").unwrap();
        let (other4, other6) = (
            service4.local_addr().unwrap(),
            service6.local_addr().unwrap(),
        );
        xdp.set_ports(&[v4.port(), v6.port(), v6.port()]).unwrap();
        let mut want = vec![v4.port(), v6.port()];
        want.sort_unstable();
        assert_eq!(xdp.ports().unwrap(), want);
        let allowed: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let denied: SocketAddr = "127.0.0.77:0".parse().unwrap();
        let six: SocketAddr = "[::1]:0".parse().unwrap();

        // Nothing denied yet: both connect.
        connect_from(denied, v4, IO_TIMEOUT).expect("before the deny rule");
        let established = connect_from(allowed, v4, IO_TIMEOUT).expect("allowed client");

        xdp.deny_add("127.0.0.64/26".parse::<Cidr>().unwrap())
            .unwrap();
        xdp.deny_add("::1".parse::<Cidr>().unwrap()).unwrap();
        let mut list = xdp.deny_list().unwrap();
        list.sort_by_key(|c| c.to_string());
        assert_eq!(
            list.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["127.0.0.64/26", "::1/128"]
        );

        // A denied source's SYN never reaches the stack (the SYN is dropped, so connect times
        // out); an allowed one still connects, and an established connection keeps working.
        let before = xdp.stats().unwrap();
        let err = connect_from(denied, v4, Duration::from_millis(1500)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        connect_from(allowed, v4, IO_TIMEOUT).expect("allowed client after the rule");
        let err = connect_from(six, v6, Duration::from_millis(1500)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        let after = xdp.stats().unwrap();
        assert!(
            after.dropped_v4 > before.dropped_v4,
            "{before:?} -> {after:?}"
        );
        assert!(
            after.dropped_v6 > before.dropped_v6,
            "{before:?} -> {after:?}"
        );
        assert!(after.syns > before.syns);
        drop(established);

        // Only SYNs to the relay's ports are dropped: other services stay reachable.
        connect_from(denied, other4, IO_TIMEOUT).expect("another port, IPv4");
        connect_from(six, other6, IO_TIMEOUT).expect("another port, IPv6");
        // The port map follows the listeners: a port taken out is no longer guarded.
        xdp.set_ports(&[v4.port()]).unwrap();
        assert_eq!(xdp.ports().unwrap(), [v4.port()]);
        connect_from(six, v6, IO_TIMEOUT).expect("a port no longer in the map");
        let err = connect_from(denied, v4, Duration::from_millis(1500)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");

        // Lifting the rule lets the client in again.
        assert!(xdp.deny_remove("127.0.0.64/26".parse().unwrap()).unwrap());
        assert!(!xdp.deny_remove("127.0.0.64/26".parse().unwrap()).unwrap());
        connect_from(denied, v4, IO_TIMEOUT).expect("after the rule is removed");
    });
}

/// The verdict's event ring full: a socket that reaches its allowance holds all the same (it used
/// to redirect past the bound when it could not say so), every later byte of it is held behind,
/// in order, until user space releases it, and the hold is counted in `FlowStats::unannounced`,
/// where user space looks for holds it was not told of.
#[test]
fn a_full_event_ring_still_holds_and_counts_what_it_could_not_announce() {
    if !gate(
        "a_full_event_ring_still_holds_and_counts_what_it_could_not_announce",
        BPF_CAPS,
    ) {
        return;
    }
    // One page: room for 170 events (16 bytes each, plus the ring's 8-byte header).
    let mut fp = FastPath::load_with_ring(4096).expect("load the fast path");
    const PAIRS: usize = 200;
    let mut relays: Vec<Relay> = (0..PAIRS)
        .map(|_| {
            let (a_client, a_server) = tcp_pair();
            let (b_client, b_server) = tcp_pair();
            // No allowance: the first byte from the client holds (and wants an event).
            let cookies = fp
                .insert_pair_with(a_server.as_fd(), b_client.as_fd(), 0, u64::MAX)
                .expect("insert_pair_with");
            Relay {
                a_client,
                a_server,
                b_client,
                b_server,
                cookies,
            }
        })
        .collect();
    for (i, r) in relays.iter_mut().enumerate() {
        r.a_client.write_all(&pattern(100, i as u8)).unwrap();
    }
    for r in &relays {
        let c = counters_when(&fp, r.cookies.0, "every pair holds", |c| c.held == 100);
        assert_eq!(c.bytes, 0, "redirected past an allowance of 0: {c:?}");
    }
    let stats = fp.flow_stats().expect("flow stats");
    let mut events = Vec::new();
    fp.held_events(&mut events);
    assert_eq!(stats.holds, PAIRS as u64, "{stats:?}");
    assert!(
        stats.unannounced > 0 && events.len() as u64 + stats.unannounced == PAIRS as u64,
        "{} events, {stats:?}: every hold is either announced or counted",
        events.len()
    );
    let announced: std::collections::HashSet<u64> = events.iter().map(|e| e.cookie).collect();
    let (i, r) = relays
        .iter_mut()
        .enumerate()
        .find(|(_, r)| !announced.contains(&r.cookies.0))
        .expect("a pair whose hold was not announced");

    // The ring has room again and the allowance is lifted, but the held bytes are not taken:
    // later bytes are held behind them, not redirected ahead.
    fp.set_flow(r.cookies.0, u64::MAX, u64::MAX, 0).unwrap();
    r.a_client.write_all(&pattern(50, 7)).unwrap();
    let c = counters_when(&fp, r.cookies.0, "held behind", |c| c.held == 150);
    assert_eq!(c.bytes, 0, "a byte overtook the held ones: {c:?}");
    assert!(!readable_within(&r.b_server, 100), "nothing may arrive yet");

    // User space takes the held bytes and forwards them itself, then releases: the verdict
    // redirects what comes after, and the destination sees it all in order.
    let mut buf = [0u8; 4096];
    let mut taken = Vec::new();
    while taken.len() < 150 {
        match kick(r.a_server.as_fd(), &mut buf).expect("kick") {
            Kick::Data(n) => taken.extend_from_slice(&buf[..n]),
            Kick::Empty => thread::sleep(Duration::from_millis(5)),
            Kick::Eof => panic!("EOF"),
        }
    }
    r.b_client.write_all(&taken).unwrap();
    fp.set_flow(r.cookies.0, u64::MAX, u64::MAX, 150).unwrap();
    r.a_client.write_all(&pattern(30, 9)).unwrap();
    let mut want = pattern(100, i as u8);
    want.extend(pattern(50, 7));
    want.extend(pattern(30, 9));
    assert_eq!(read_exactly(&mut r.b_server, 180, "in order"), want);
    let c = counters_when(&fp, r.cookies.0, "redirected after", |c| c.bytes == 30);
    assert_eq!(c.held, 150, "{c:?}");
    for r in relays {
        fp.remove_pair(r.cookies).unwrap();
    }
}

/// A bpffs mounted on a fresh directory for one test, unmounted and removed on drop.
pub(super) struct Bpffs(PathBuf);

impl Bpffs {
    pub(super) fn mount() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-bpffs-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t bpf: {status}");
        Self(dir)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn pinned_maps_are_shared_between_loaders() {
    if !gate("pinned_maps_are_shared_between_loaders", NS_CAPS) {
        return;
    }
    let bpffs = Bpffs::mount();
    let pins = bpffs.path().join("sluice");
    let mut daemon = FastPath::load_pinned(&pins).expect("first load pins the maps");
    assert!(pins.join("SLUICE_SOCKS").exists() && pins.join("SLUICE_DENY_V4").exists());
    let mut r = relay(&mut daemon);
    r.a_client.write_all(b"shared").unwrap();
    assert_eq!(read_exactly(&mut r.b_server, 6, "pinned"), b"shared");

    // An observer (sluicectl) sees the same entries and counters, and cannot insert.
    let mut ctl = FastPath::open_pinned(&pins).expect("open the pins");
    assert_eq!(ctl.occupancy().unwrap().sockets, 2);
    counters_when(&ctl, r.cookies.0, "seen by the observer", |x| x.bytes == 6);
    let (x, y) = tcp_pair();
    assert!(matches!(
        ctl.insert_pair(x.as_fd(), y.as_fd()),
        Err(EbpfError::NotAttached)
    ));
    drop(ctl);

    // The observer leaving detaches nothing: old and new pairs still relay.
    r.a_client.write_all(b"after").unwrap();
    assert_eq!(read_exactly(&mut r.b_server, 5, "old pair"), b"after");
    let mut r2 = relay(&mut daemon);
    r2.a_client.write_all(b"new pair").unwrap();
    assert_eq!(read_exactly(&mut r2.b_server, 8, "new pair"), b"new pair");
    daemon.remove_pair(r2.cookies).unwrap();

    daemon.remove_pair(r.cookies).unwrap();
    assert_eq!(daemon.occupancy().unwrap(), Occupancy::default());
    drop(daemon);
}
