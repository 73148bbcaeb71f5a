//! Faults and floods: the relay keeps its memory bounded and keeps serving the clients that
//! behave while others misbehave. Every loop is bounded in count and time; nothing asserts how
//! fast anything was.
//!
//! - An upstream that accepts and never reads while a client sends up to 256 MiB: the client
//!   ends up blocked (backpressure) after at most 64 MiB, and the worker's resident memory
//!   grows by less than 64 MiB (every engine; on the sockmap fast path, with
//!   `sockmap_queue_limit_mib = 16`, the verdict's flow control stops redirecting and the
//!   bytes stay charged to the client socket).
//! - An upstream that reads slowly, with pauses, gets every byte of 48 MiB in order (every
//!   engine; on the fast path, with a 2 MiB `sockmap_queue_limit_mib`, flow control holds
//!   and forwards many times).
//! - An upstream answering one byte per 10 ms: every byte arrives, in order (every engine).
//! - Slowloris on an `accept_proxy` listener (`header_ms` 2 s): 5000 clients that send nothing
//!   and a few that send a header one byte per 300 ms are all closed and counted in
//!   `refused_bad_header`, while other clients are relayed byte-exact meanwhile.
//! - SIGKILL of one of three workers while 200 connections stream: only its connections end,
//!   the others stay byte-exact, a new worker replaces it.
//! - epoll_ctl refused (ENOSPC, as at a full `fs.epoll.max_user_watches`) for later
//!   connections of the epoll engine: they are reset and counted (`relay_errors`), and
//!   `sluicectl status` counts 0 `max_connections` places once every client closed.
//! - A SYN flood (hping3) against a listener, inside a network namespace of the test's own,
//!   while 1000 established connections keep exchanging data without an error.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use sluice_tests::client::{connect, echo_many, proxy_v1, read_all};
use sluice_tests::servers::{EchoServer, SilentServer};
use sluice_tests::{
    ChildGuard, Config, HUNG, Host, Pattern, Sluice, Verifier, client, exclusive, find_program,
    init, procfs, require_netns, require_nofile, require_program, require_root, sys, wait_until,
};

use super::{engine_ok, seed};

/// How much a client tries to push into an upstream that never reads.
const FLOOD_BYTES: u64 = 256 << 20;
/// How much the worker's resident memory may grow meanwhile.
const RSS_GROWTH_KIB: u64 = 64 << 10;
/// At most this much is queued between a client and an upstream that reads nothing: the
/// client's send buffer, the relay's receive and send buffers (and the sockmap allowance), the
/// upstream's receive buffer.
const QUEUED_MAX: u64 = 64 << 20;
/// No byte accepted by the kernel for this long: the client is blocked.
const STALLED: Duration = Duration::from_secs(3);

/// Writes up to `FLOOD_BYTES` to `s` without blocking; returns how many went in before a
/// [`STALLED`] pause (or all of them), sampling the worker's memory as it goes: (written, peak
/// RSS in KiB).
fn push_until_blocked(s: &TcpStream, worker: u32) -> (u64, u64) {
    s.set_nonblocking(true).unwrap();
    let chunk = Pattern::new(seed()).bytes(0, 1 << 20);
    let mut written = 0u64;
    let mut peak = 0u64;
    let mut progress = Instant::now();
    let deadline = Instant::now() + 4 * HUNG;
    while written < FLOOD_BYTES && Instant::now() < deadline {
        let off = (written % chunk.len() as u64) as usize;
        match (&mut &*s).write(&chunk[off..]) {
            Ok(n) => {
                written += n as u64;
                progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                peak = peak.max(procfs::rss_kib(worker).unwrap_or(0));
                if progress.elapsed() >= STALLED {
                    break;
                }
                let mut pfd = [libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                }];
                let _ = sys::poll(&mut pfd, 100);
            }
            Err(e) => panic!("writing to the relay after {written} bytes: {e}"),
        }
    }
    peak = peak.max(procfs::rss_kib(worker).unwrap_or(0));
    (written, peak)
}

fn backpressure_bounds_memory(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let silent = SilentServer::start(host.addr());
    // The sockmap fast path queues up to this much in the kernel before its flow control
    // holds bytes on the client socket (the default, 256 MiB, is more than the flood).
    let config = Config {
        sockmap_queue_limit_mib: Some(16),
        ..Config::new()
    }
    .listen("flood", host.addr(), &[&silent.addr().to_string()]);
    let relay = Sluice::run_config(&config)
        .engine(engine)
        .workers(1)
        .start();
    let worker = relay.wait_workers(1, HUNG)[0];
    let base = procfs::rss_kib(worker).expect("the worker's VmRSS");
    let c = connect(relay.addr());
    assert!(
        wait_until(HUNG, || silent.accepted() == 1),
        "the upstream never saw the connection"
    );
    let (written, peak) = push_until_blocked(&c, worker);
    assert!(
        written < FLOOD_BYTES,
        "{engine}: the relay took all {written} bytes for an upstream that reads nothing"
    );
    // What the kernel queues on the way is bounded too: socket buffers (and, on the sockmap
    // fast path, its flow-control allowance), nowhere near the flood.
    assert!(
        written < QUEUED_MAX,
        "{engine}: {written} bytes went in before the client was blocked"
    );
    assert!(
        peak.saturating_sub(base) < RSS_GROWTH_KIB,
        "{engine}: worker RSS grew from {base} KiB to {peak} KiB ({written} bytes in flight)"
    );
    // Still alive and relaying: a second client gets through to the upstream.
    let _c2 = connect(relay.addr());
    assert!(wait_until(HUNG, || silent.accepted() == 2));
    assert!(procfs::alive(worker), "the worker died");
    eprintln!("{engine}: blocked after {written} bytes; RSS {base} -> {peak} KiB");
}
engines!(backpressure_bounds_memory);

/// Reads one connection's bytes slowly (256 KiB, then a 2 ms pause; once a 300 ms pause),
/// checking them against `seed`'s pattern; returns how many arrived in order before EOF.
fn slow_reader(listener: TcpListener, seed: u64) -> Result<u64, String> {
    let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    s.set_read_timeout(Some(HUNG)).unwrap();
    let mut v = Verifier::new(seed);
    let mut buf = vec![0u8; 256 << 10];
    let mut rounds = 0u32;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return Ok(v.offset()),
            Ok(n) => n,
            Err(e) => return Err(format!("read after {} bytes: {e}", v.offset())),
        };
        v.check(&buf[..n])?;
        rounds += 1;
        thread::sleep(Duration::from_millis(if rounds == 20 { 300 } else { 2 }));
    }
}

fn slow_reader_gets_every_byte(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    const LEN: u64 = 48 << 20;
    let host = Host::new();
    let listener = TcpListener::bind(host.addr()).unwrap();
    let upstream = listener.local_addr().unwrap();
    let seed = seed();
    let reader = thread::spawn(move || slow_reader(listener, seed));
    // A small fast-path allowance, so the sockmap engine holds and forwards many times.
    let config = Config {
        sockmap_queue_limit_mib: Some(2),
        ..Config::new()
    }
    .listen("slow", host.addr(), &[&upstream.to_string()]);
    let relay = Sluice::run_config(&config)
        .engine(engine)
        .workers(1)
        .start();
    let mut c = connect(relay.addr());
    c.set_write_timeout(Some(2 * HUNG)).unwrap();
    sluice_tests::servers::send_pattern(&mut c, Pattern::new(seed), LEN)
        .unwrap_or_else(|e| panic!("{engine}: sending: {e}"));
    c.shutdown(Shutdown::Write).unwrap();
    let got = reader.join().unwrap();
    assert_eq!(
        got,
        Ok(LEN),
        "{engine}: what the slow upstream read\n{}",
        relay.stderr_log()
    );
    if engine == "sockmap" {
        // The reader's 300 ms pause alone lets the client get far past the 2 MiB allowance:
        // flow control held bytes, and the worker forwarded them itself (and counted them).
        let user = relay.counter("fast_path_user_bytes").unwrap_or(0);
        assert!(
            user > 0 && user <= LEN,
            "fast_path_user_bytes {user} after a held stream of {LEN}: {}",
            relay.status()
        );
    }
}
engines!(slow_reader_gets_every_byte);

/// Serves one connection at a time: reads 8 bytes (the seed), then writes `len` bytes of that
/// pattern one byte per `gap`, then closes.
fn trickle_server(listener: TcpListener, len: usize, gap: Duration, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut s, _)) = listener.accept() else {
            thread::sleep(Duration::from_millis(20));
            continue;
        };
        thread::spawn(move || {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(HUNG)).unwrap();
            let mut seed = [0u8; 8];
            if s.read_exact(&mut seed).is_err() {
                return;
            }
            let bytes = Pattern::new(u64::from_be_bytes(seed)).bytes(0, len);
            for b in bytes {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                thread::sleep(gap);
            }
            let _ = s.shutdown(Shutdown::Write);
        });
    }
}

fn slow_upstream_data_intact(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    const LEN: usize = 300;
    let host = Host::new();
    let listener = TcpListener::bind(host.addr()).unwrap();
    let upstream = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        thread::spawn(move || trickle_server(listener, LEN, Duration::from_millis(10), stop))
    };
    let relay = Sluice::forward(host.addr(), upstream)
        .engine(engine)
        .start();
    // Two clients at once, each with its own pattern.
    let results: Vec<_> = (0..2)
        .map(|_| {
            let addr = relay.addr();
            let seed = seed();
            thread::spawn(move || {
                let mut c = connect(addr);
                c.write_all(&seed.to_be_bytes()).unwrap();
                let (got, ended) = read_all(&mut c, 2 * HUNG);
                (seed, got, ended)
            })
        })
        .collect();
    for r in results {
        let (seed, got, ended) = r.join().unwrap();
        assert!(ended.is_some(), "{engine}: the stream did not end");
        assert_eq!(got.len(), LEN, "{engine}: bytes that came back");
        let mut v = Verifier::new(seed);
        v.check(&got)
            .unwrap_or_else(|e| panic!("{engine}: the slow bytes: {e}"));
    }
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}
engines!(slow_upstream_data_intact);

/// `true` once `s` is closed by the peer (EOF or reset), without blocking.
fn closed(s: &TcpStream) -> bool {
    let mut pfd = [libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    }];
    if sys::poll(&mut pfd, 0).unwrap_or(0) == 0 {
        return false;
    }
    let mut buf = [0u8; 64];
    s.set_nonblocking(true).unwrap();
    let r = (&mut &*s).read(&mut buf);
    s.set_nonblocking(false).unwrap();
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

#[test]
fn slowloris_is_cut_at_the_header_timeout() {
    init();
    const IDLE: usize = 5000;
    const TRICKLE: usize = 5;
    const GOOD: usize = 20;
    if !require_nofile(2 * IDLE as u64 + 1000) {
        return;
    }
    let _machine = exclusive();
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let mut config = Config::new()
        .listen("proxied", host.addr(), &[&echo.addr().to_string()])
        .accept_proxy();
    config.header_ms = Some(2_000);
    config.workers = Some(2);
    let relay = Sluice::run_config(&config).start();
    relay.wait_workers(2, HUNG);

    let idle = client::open_many(relay.addr(), None, IDLE).expect("open the idle clients");
    // A few send a valid header one byte per 300 ms: never done before the 2 s are up.
    let tricklers: Vec<_> = (0..TRICKLE)
        .map(|i| {
            let addr = relay.addr();
            thread::spawn(move || {
                let src: SocketAddr = format!("192.0.2.{}:4000{i}", i + 1).parse().unwrap();
                let header = proxy_v1(src, "198.51.100.1:443".parse().unwrap());
                let mut c = connect(addr);
                for (sent, b) in header.iter().enumerate() {
                    if closed(&c) || c.write_all(&[*b]).is_err() {
                        return (sent, header.len());
                    }
                    thread::sleep(Duration::from_millis(300));
                }
                (header.len(), header.len())
            })
        })
        .collect();
    // Meanwhile well-behaved clients are relayed byte-exact.
    let good: Vec<TcpStream> = (0..GOOD)
        .map(|i| {
            let mut c = connect(relay.addr());
            let src: SocketAddr = format!("203.0.113.{}:5000", i + 1).parse().unwrap();
            c.write_all(&proxy_v1(src, relay.addr())).unwrap();
            c
        })
        .collect();
    echo_many(&good, seed(), 256 * 1024, true, 2 * HUNG)
        .unwrap_or_else(|e| panic!("clients with a header, during the slowloris: {e}"));

    for t in tricklers {
        let (sent, len) = t.join().unwrap();
        assert!(
            sent < len,
            "a trickling client sent its whole header ({len} bytes)"
        );
    }
    let want = (IDLE + TRICKLE) as u64;
    assert_eq!(
        relay.wait_counter("refused_bad_header", want, 2 * HUNG),
        want,
        "refused_bad_header"
    );
    let open = idle.iter().filter(|c| !closed(c)).count();
    assert_eq!(open, 0, "idle clients still open after the header timeout");
    assert!(
        wait_until(HUNG, || relay.counter("active") == Some(0)),
        "connections left: {:?}",
        relay.counter("active")
    );
}

/// Streams on `conns` until `stop`: each round writes 16 KiB of the connection's pattern and
/// reads its echo back. A connection that errs or ends is dropped from the loop. Returns each
/// connection's index with `Ok(bytes verified)` or `Err(what happened)`.
/// A connection's index and `Ok(bytes verified)` or `Err(what happened)`.
pub(super) type StreamOutcome = (usize, Result<u64, String>);

/// Connections streaming [`stream_rounds`] on threads of their own until [`Streams::finish`].
pub(super) struct Streams {
    pub stop: Arc<AtomicBool>,
    /// Rounds done, summed over the threads.
    pub rounds: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<Vec<StreamOutcome>>>,
}

impl Streams {
    /// Starts `conns` streaming on `threads` threads (connection `i` on thread `i % threads`),
    /// each with the pattern of `seed_base + i`.
    pub(super) fn start(conns: Vec<TcpStream>, threads: usize, seed_base: u64) -> Streams {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let mut groups: Vec<Vec<(usize, TcpStream)>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, c) in conns.into_iter().enumerate() {
            groups[i % threads].push((i, c));
        }
        let threads = groups
            .into_iter()
            .map(|g| {
                let (stop, rounds) = (stop.clone(), rounds.clone());
                thread::spawn(move || stream_rounds(g, seed_base, stop, rounds))
            })
            .collect();
        Streams {
            stop,
            rounds,
            threads,
        }
    }

    /// Stops the streams; each connection's index with `Ok(bytes verified)` or `Err(what)`.
    pub(super) fn finish(self) -> Vec<StreamOutcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

fn stream_rounds(
    conns: Vec<(usize, TcpStream)>,
    seed_base: u64,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> Vec<(usize, Result<u64, String>)> {
    struct Conn {
        index: usize,
        s: TcpStream,
        pattern: Pattern,
        verifier: Verifier,
        offset: u64,
        result: Option<Result<u64, String>>,
    }
    let mut conns: Vec<Conn> = conns
        .into_iter()
        .map(|(index, s)| {
            s.set_read_timeout(Some(HUNG)).unwrap();
            s.set_write_timeout(Some(HUNG)).unwrap();
            Conn {
                index,
                s,
                pattern: Pattern::new(seed_base + index as u64),
                verifier: Verifier::new(seed_base + index as u64),
                offset: 0,
                result: None,
            }
        })
        .collect();
    const ROUND: usize = 16 * 1024;
    let mut buf = vec![0u8; ROUND];
    let deadline = Instant::now() + 4 * HUNG;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for c in conns.iter_mut().filter(|c| c.result.is_none()) {
            let out = c.pattern.bytes(c.offset, ROUND);
            if let Err(e) = c.s.write_all(&out) {
                c.result = Some(Err(format!("write: {e}")));
                continue;
            }
            let mut got = 0;
            while got < ROUND {
                match c.s.read(&mut buf[..ROUND - got]) {
                    Ok(0) => {
                        c.result = Some(Err("EOF".into()));
                        break;
                    }
                    Ok(n) => {
                        if let Err(e) = c.verifier.check(&buf[..n]) {
                            c.result = Some(Err(format!("corrupt: {e}")));
                            break;
                        }
                        got += n;
                    }
                    Err(e) => {
                        c.result = Some(Err(format!("read: {e}")));
                        break;
                    }
                }
            }
            c.offset += ROUND as u64;
        }
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    conns
        .into_iter()
        .map(|c| (c.index, c.result.unwrap_or(Ok(c.verifier.offset()))))
        .collect()
}

#[test]
fn sigkill_of_a_worker_under_load_ends_only_its_connections() {
    init();
    const CONNS: usize = 200;
    const THREADS: usize = 8;
    let host = Host::new();
    let echo = EchoServer::start(host.addr());
    let relay = Sluice::forward(host.addr(), echo.addr()).workers(3).start();
    let workers = relay.wait_workers(3, HUNG);
    let conns = client::open_many(relay.addr(), None, CONNS).unwrap();
    // Who holds which connection (the relay's accepted socket, found in /proc).
    let owners: Vec<u32> = conns
        .iter()
        .map(|c| {
            let local = c.local_addr().unwrap();
            let mut owner = None;
            wait_until(HUNG, || {
                owner = procfs::socket_owner(relay.addr(), local, &workers);
                owner.is_some()
            });
            owner.expect("a worker holds every accepted socket")
        })
        .collect();
    // The victim: the worker with the most connections (the kernel spreads them).
    let victim = *workers
        .iter()
        .max_by_key(|w| owners.iter().filter(|o| o == w).count())
        .unwrap();
    assert!(
        owners.iter().any(|o| *o != victim),
        "every connection on one worker: {owners:?}"
    );
    let streams = Streams::start(conns, THREADS, seed());
    let rounds = streams.rounds.clone();
    // Kill it mid-stream: every thread has done a few rounds.
    assert!(wait_until(HUNG, || rounds.load(Ordering::Relaxed)
        >= 3 * THREADS as u64));
    assert!(sys::kill(victim, libc::SIGKILL), "cannot signal {victim}");
    let mut now = Vec::new();
    assert!(
        wait_until(HUNG, || {
            now = relay.worker_pids();
            now.len() == 3 && !now.contains(&victim)
        }),
        "no worker replaced {victim}: {now:?}"
    );
    // Some more rounds on the survivors after the kill, then stop.
    let after = rounds.load(Ordering::Relaxed);
    assert!(wait_until(HUNG, || {
        rounds.load(Ordering::Relaxed) >= after + 3 * THREADS as u64
    }));
    let mut ended = 0;
    {
        for (i, result) in streams.finish() {
            if owners[i] == victim {
                assert!(
                    result.is_err(),
                    "connection {i} of the killed worker still streams: {result:?}"
                );
                ended += 1;
            } else {
                let bytes = result.unwrap_or_else(|e| {
                    panic!("connection {i} on surviving worker {}: {e}", owners[i])
                });
                assert!(bytes > 0);
            }
        }
    }
    assert!(ended > 0);
    // The new worker relays.
    let fresh = client::open_many(relay.addr(), None, 10).unwrap();
    echo_many(&fresh, seed(), 64 * 1024, true, HUNG).unwrap();
}

#[test]
fn syn_flood_leaves_established_connections_alone() {
    init();
    const CONNS: usize = 1000;
    if !require_root() || !require_netns() || !require_program("hping3") {
        return;
    }
    let hping3 = find_program("hping3").unwrap();
    // Everything in a network namespace of this test's own: the flood never touches the
    // host's loopback. The relay and the echo server are forked from the namespaced thread.
    super::ebpf::in_netns(move || {
        // Taken on the thread that starts the relay (the hold is per thread); the flood takes
        // a core, so nothing else runs meanwhile.
        let _machine = exclusive();
        let relay_addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let echo = EchoServer::start("127.0.0.2:7001".parse().unwrap());
        let relay = Sluice::forward(relay_addr, echo.addr()).workers(2).start();
        relay.wait_workers(2, HUNG);
        let conns = client::open_many(relay_addr, None, CONNS).unwrap();
        echo_many(&conns, seed(), 4096, false, HUNG).unwrap();
        let mut flood = ChildGuard::spawn(
            "hping3",
            Command::new(&hping3)
                .args(["-q", "-S", "-p", "7000", "--flood", "-a", "127.0.0.3"])
                .arg("127.0.0.1")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        // The flood is real: at least 50 000 segments more than before arrive in the
        // namespace (a bounded wait) before the data rounds start.
        let start = tcp_in_segments();
        let flooding = wait_until(HUNG, || tcp_in_segments() >= start + 50_000);
        assert!(
            flooding,
            "hping3 sent next to nothing: {} segments",
            tcp_in_segments() - start
        );
        // Data keeps flowing on every established connection while the flood runs (rounds
        // bounded in count; the flood is stopped after them).
        for round in 0..5 {
            echo_many(&conns, seed(), 16 * 1024, false, 2 * HUNG)
                .unwrap_or_else(|e| panic!("round {round} during the SYN flood: {e}"));
            assert!(flood.try_wait().is_none(), "hping3 stopped by itself");
        }
        flood.stop(Duration::from_secs(2));
        echo_many(&conns, seed(), 16 * 1024, true, HUNG).unwrap();
        // New clients are served again once it is over.
        let fresh = client::open_many(relay_addr, None, 10).unwrap();
        echo_many(&fresh, seed(), 4096, true, HUNG).unwrap();
    });
}

/// TCP segments received so far in the calling thread's network namespace (`Tcp: InSegs` in
/// /proc/thread-self/net/snmp).
fn tcp_in_segments() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read net/snmp");
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InSegs")
        .expect("an InSegs column");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// The epoll engine gives a connection's daemon-wide `max_connections` place back on every
/// error path after admission took it. epoll_ctl(EPOLL_CTL_ADD) fails for real, with ENOSPC as
/// at a full `fs.epoll.max_user_watches` (a seccomp filter refuses fds numbered `from_fd` and
/// up), so the first connections are relayed and the later ones are refused with a reset.
/// Clients and upstreams take fds in turn, so one of the two thresholds (16, 17) makes the
/// client socket the one that cannot be watched (refused at accept, never in the slab) and the
/// other the upstream socket (ended after admission). Once every client closed, `sluicectl
/// status` counts 0 places taken; before the fix, each connection refused at accept kept its
/// place for the worker's life (`max_connections` slowly filled up).
#[test]
fn epoll_gives_back_the_place_when_epoll_ctl_fails() {
    init();
    const CONNS: u64 = 12;
    let mut at_accept = 0;
    for from_fd in [16, 17] {
        let host = Host::new();
        let echo = EchoServer::start(host.addr());
        let relay = Sluice::forward(host.addr(), echo.addr())
            .engine("epoll")
            .workers(1)
            .refuse_epoll_watches(from_fd)
            .start();
        let (mut relayed, mut refused) = (Vec::new(), 0u64);
        for i in 0..CONNS {
            let msg = format!("ping {i}\n");
            let mut got = vec![0u8; msg.len()];
            // A refused connection may be reset before the client's connect returns, or writes.
            let answer = client::try_connect(relay.addr(), None).and_then(|mut c| {
                c.set_read_timeout(Some(HUNG))?;
                c.write_all(msg.as_bytes())?;
                c.read_exact(&mut got)?;
                Ok(c)
            });
            match answer {
                Ok(c) => {
                    assert_eq!(
                        got,
                        msg.as_bytes(),
                        "fd {from_fd}, connection {i}: the echo"
                    );
                    relayed.push(c); // held open, so later connections get higher fds
                }
                Err(e) => {
                    assert!(
                        matches!(
                            e.kind(),
                            ErrorKind::ConnectionReset
                                | ErrorKind::UnexpectedEof
                                | ErrorKind::BrokenPipe
                        ),
                        "fd {from_fd}, connection {i}: refused, not hung: {e}"
                    );
                    refused += 1;
                }
            }
        }
        assert!(
            !relayed.is_empty() && refused > 0,
            "fd {from_fd}: the filter lets the first connections through and refuses later \
             ones: {} relayed, {refused} refused",
            relayed.len()
        );
        drop(relayed);
        let mut st = serde_json::Value::Null;
        let settled = wait_until(HUNG, || {
            st = relay.status();
            st["totals"]["accepted"].as_u64() == Some(CONNS) && st["active"].as_u64() == Some(0)
        });
        assert!(
            settled,
            "fd {from_fd}: every connection accepted and closed: {st:#}"
        );
        assert_eq!(
            st["places"].as_u64(),
            Some(0),
            "fd {from_fd}: no max_connections place left taken: {st:#}"
        );
        assert_eq!(
            st["totals"]["relay_errors"].as_u64(),
            Some(refused),
            "fd {from_fd}: each refusal is counted: {st:#}"
        );
        // Refused at accept: accepted, never in the slab, so never `closed`.
        at_accept += CONNS - st["totals"]["closed"].as_u64().unwrap_or(CONNS);
    }
    assert!(
        at_accept > 0,
        "one threshold refused client sockets at accept"
    );
}
