//! Reloading a changed configuration under load (`sluicectl reload` and SIGHUP), on real
//! sockets and the same daemon processes throughout:
//!
//! - 200 connections stream byte-exact data through 5 reloads that move the listener to another
//!   upstream and change timeouts, while a client keeps opening new connections: no stream
//!   errs or loses a byte, no new connection is refused during the switches, each reload
//!   reaches every worker before `sluicectl` answers, and the next new connection goes where the
//!   new configuration says (every engine).
//! - A reload that does not parse, or that changes what needs a restart (the listeners), is
//!   refused with the reason and an exit code of 1, counted in `reloads_failed`, and the
//!   running configuration keeps serving; SIGHUP reloads too; a new `max_connections` applies.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Instant;

use sluice_tests::servers::{EchoServer, TagEchoServer};
use sluice_tests::{HUNG, Host, Sluice, client, init, sys, wait_until};

use super::{engine_ok, seed};

const CONNS: usize = 200;
const THREADS: usize = 8;
const RELOADS: usize = 5;

/// Two listeners: `stream` (the load) to `up`, `probe` to `tag` (a server that names itself),
/// with the given idle timeout.
fn config_text(stream: SocketAddr, up: SocketAddr, probe: SocketAddr, tag: SocketAddr) -> String {
    config_with(stream, up, probe, tag, 200_000, "")
}

fn config_with(
    stream: SocketAddr,
    up: SocketAddr,
    probe: SocketAddr,
    tag: SocketAddr,
    idle_ms: u32,
    global: &str,
) -> String {
    format!(
        "{global}\n[timeouts]\nidle_ms = {idle_ms}\n\n\
         [[listen]]\nname = \"stream\"\nbind = \"{stream}\"\nupstream = [\"{up}\"]\n\n\
         [[listen]]\nname = \"probe\"\nbind = \"{probe}\"\nupstream = [\"{tag}\"]\n"
    )
}

/// Which tagged server a new connection to `addr` reaches (its greeting).
fn reached(addr: SocketAddr) -> Result<Vec<u8>, String> {
    let mut s = client::try_connect(addr, None).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(HUNG)).unwrap();
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).map_err(|e| format!("read: {e}"))?;
    Ok(tag.to_vec())
}

/// One echo round trip on a new connection: Err says what went wrong.
fn one_exchange(addr: SocketAddr) -> Result<(), String> {
    let mut s = client::try_connect(addr, None).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(HUNG)).unwrap();
    s.write_all(b"ping").map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    if &buf != b"ping" {
        return Err(format!("echoed {buf:?}"));
    }
    Ok(())
}

fn reload_under_load(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    init();
    let host = Host::new();
    let (stream_addr, probe_addr) = (host.addr(), host.addr());
    let up = [
        EchoServer::start(host.addr()),
        EchoServer::start(host.addr()),
    ];
    let tags = [
        TagEchoServer::start(host.addr(), b"A"),
        TagEchoServer::start(host.addr(), b"B"),
    ];
    let text = |i: usize, idle: u32| {
        config_with(
            stream_addr,
            up[i].addr(),
            probe_addr,
            tags[i].addr(),
            idle,
            "",
        )
    };
    let relay = Sluice::run_config_text(&text(0, 200_000), vec![stream_addr, probe_addr])
        .engine(engine)
        .workers(2)
        .start();
    let pid = relay.pid();
    let mut workers = relay.wait_workers(2, HUNG);
    workers.sort_unstable();
    assert_eq!(reached(probe_addr).unwrap(), b"A");

    let conns = client::open_many(stream_addr, None, CONNS).unwrap();
    let streams = super::faults::Streams::start(conns, THREADS, seed());
    let (stop, rounds) = (streams.stop.clone(), streams.rounds.clone());
    // New connections all through the reloads (bounded in count and time): none may fail.
    let connector = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let deadline = Instant::now() + 4 * HUNG;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && ok < 100_000 {
                match one_exchange(stream_addr) {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    assert!(wait_until(HUNG, || rounds.load(Ordering::Relaxed)
        >= 3 * THREADS as u64));
    let path = relay.dir().join("sluice.toml");
    for n in 1..=RELOADS {
        let to = n % 2;
        std::fs::write(&path, text(to, 200_000 + n as u32 * 1000)).unwrap();
        let out = relay.ctl(&["reload"]);
        assert!(
            out.status.success(),
            "reload {n}: {}\n{}",
            out.text(),
            relay.stderr_log()
        );
        assert!(
            out.stdout.contains("2 of 2 workers"),
            "reload {n}: {}",
            out.stdout
        );
        // Applied by every worker before the answer: the next new connection follows it.
        let want = if to == 0 { b"A" } else { b"B" };
        for _ in 0..4 {
            assert_eq!(reached(probe_addr).unwrap(), want, "after reload {n}");
        }
        let before = rounds.load(Ordering::Relaxed);
        assert!(wait_until(HUNG, || rounds.load(Ordering::Relaxed)
            >= before + THREADS as u64));
    }
    stop.store(true, Ordering::Relaxed);
    for (i, result) in streams.finish() {
        let bytes = result.unwrap_or_else(|e| {
            panic!(
                "stream {i} through the reloads: {e}\n{}",
                relay.stderr_log()
            )
        });
        assert!(bytes > 0, "stream {i} moved nothing");
    }
    let (ok, failed) = connector.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed during the reloads, e.g. {:?}",
        failed.len(),
        ok + failed.len() as u64,
        failed.first()
    );
    assert!(ok > 0);
    // The new connections of the load went to both upstreams, as the reloads said.
    assert!(
        up[1].accepted() > 0,
        "no connection reached the second upstream"
    );
    assert_eq!(relay.counter("reloads"), Some(RELOADS as u64));
    assert_eq!(relay.counter("reloads_failed"), Some(0));
    assert_eq!(relay.counter("relay_errors"), Some(0));
    // Same processes: nothing was restarted.
    let mut now = relay.worker_pids();
    now.sort_unstable();
    assert_eq!(now, workers, "workers were replaced");
    assert_eq!(relay.pid(), pid);
}

engines!(reload_under_load);

#[test]
fn a_refused_reload_keeps_the_running_configuration() {
    init();
    let host = Host::new();
    let (stream_addr, probe_addr) = (host.addr(), host.addr());
    let up = EchoServer::start(host.addr());
    let tags = [
        TagEchoServer::start(host.addr(), b"A"),
        TagEchoServer::start(host.addr(), b"B"),
    ];
    let good = config_text(stream_addr, up.addr(), probe_addr, tags[0].addr());
    let relay = Sluice::run_config_text(&good, vec![stream_addr, probe_addr])
        .workers(2)
        .start();
    relay.wait_workers(2, HUNG);
    let path = relay.dir().join("sluice.toml");

    // Not TOML: refused with the file's line, the relay serves on.
    std::fs::write(&path, "[[listen]\nname = ").unwrap();
    let out = relay.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.text());
    assert!(out.text().contains("line 1"), "{}", out.text());
    assert!(
        out.text().contains("running configuration is kept"),
        "{}",
        out.text()
    );
    // A key no one knows: refused, naming it.
    std::fs::write(&path, format!("{good}\nmax_conections = 3\n")).unwrap();
    let out = relay.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.text());
    assert!(out.text().contains("max_conections"), "{}", out.text());
    // Another listener address needs a restart: refused, saying so.
    let moved = config_text(host.addr(), up.addr(), probe_addr, tags[1].addr());
    std::fs::write(&path, moved).unwrap();
    let out = relay.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.text());
    assert!(out.text().contains("restart"), "{}", out.text());
    assert_eq!(relay.counter("reloads_failed"), Some(3));
    assert_eq!(relay.counter("reloads"), Some(0));
    assert_eq!(
        reached(probe_addr).unwrap(),
        b"A",
        "the old configuration serves"
    );
    one_exchange(stream_addr).unwrap();

    // SIGHUP reloads too: the probe listener moves to B, and max_connections 3 applies.
    let next = config_with(
        stream_addr,
        up.addr(),
        probe_addr,
        tags[1].addr(),
        200_000,
        "max_connections = 3",
    );
    std::fs::write(&path, next).unwrap();
    assert!(sys::kill(relay.pid(), libc::SIGHUP));
    relay.wait_counter("reloads", 1, HUNG);
    assert!(
        wait_until(HUNG, || reached(probe_addr).ok().as_deref()
            == Some(b"B".as_slice())),
        "after SIGHUP new connections should reach B\n{}",
        relay.stderr_log()
    );
    // The probes above count against max_connections until the relay has closed them.
    assert!(
        wait_until(HUNG, || relay.counter("active") == Some(0)),
        "probe connections still open: {}",
        relay.status()
    );
    let held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = client::connect(stream_addr);
            s.set_read_timeout(Some(HUNG)).unwrap();
            s.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            s
        })
        .collect();
    let refused_before = relay.counter("refused_full").unwrap();
    assert!(
        one_exchange(stream_addr).is_err(),
        "a fourth connection passed max_connections = 3"
    );
    relay.wait_counter("refused_full", refused_before + 1, HUNG);
    drop(held);
    assert!(
        wait_until(HUNG, || one_exchange(stream_addr).is_ok()),
        "closing the three should make room"
    );
}
