//! When the upstream fails (refuses, resets mid-stream, stays silent, never answers the SYN) or
//! the client resets, the other side is closed promptly, and the workers hold no more fds than
//! before once the dust settles.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sluice_tests::pattern::Verifier;
use sluice_tests::servers::{
    BlackHole, Ended, Mode, RefusingPort, SilentServer, StreamServer, StreamSpec, read_until_end,
};
use sluice_tests::{HUNG, Host, Sluice, SluiceCmd, client};
use socket2::SockRef;

use super::{engine_ok, seed};

/// Connections per round of a leak check.
const ROUND: usize = 24;
/// fds the workers may hold above the baseline after a round (lazily made pools, timers).
const FD_SLACK: usize = 4;

/// Runs `round` twice (the first warms up pools), then checks the workers' fds came back to
/// what they were before the second round.
fn without_fd_leak(relay: &Sluice, what: &str, mut round: impl FnMut()) {
    round();
    let baseline = relay.fd_baseline();
    round();
    if let Err(e) = relay.settle_fds(baseline, FD_SLACK, Duration::from_secs(15)) {
        panic!("{what}, {ROUND} connections: {e}");
    }
}

/// Opens `n` client connections; each must end (FIN or reset) within [`HUNG`]. Returns how
/// each ended (a refused connect counts as a reset).
fn clients_see_close(relay: &Sluice, n: usize, greet: &[u8]) -> Vec<Ended> {
    let conns: Vec<Option<TcpStream>> = (0..n)
        .map(|_| client::try_connect(relay.addr(), None).ok())
        .map(|c| {
            c.and_then(|mut c| {
                // A write may fail if the relay already closed: that is a close too.
                c.write_all(greet).ok().map(|()| c)
            })
        })
        .collect();
    conns
        .iter()
        .enumerate()
        .map(|(i, c)| match c {
            None => Ended::Reset,
            Some(c) => match read_until_end(c, HUNG) {
                (_, Some(end)) => end,
                (n, None) => panic!("client {i} still open {HUNG:?} later ({n} bytes read)"),
            },
        })
        .collect()
}

fn relay(
    engine: &str,
    upstream: std::net::SocketAddr,
    host: Host,
    f: impl FnOnce(SluiceCmd) -> SluiceCmd,
) -> Sluice {
    f(Sluice::forward(host.addr(), upstream)
        .engine(engine)
        .workers(2))
    .start()
}

/// Nothing listens on the upstream port: each client is closed.
fn upstream_refused(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let refusing = RefusingPort::new(host.addr());
    let relay = relay(engine, refusing.addr(), host, |c| c);
    without_fd_leak(&relay, "refused upstream", || {
        clients_see_close(&relay, ROUND, b"hello");
    });
}
engines!(upstream_refused);

/// The upstream sends 1 MiB, then resets: the client gets a correct prefix of those bytes, then
/// the reset (RST is propagated, not turned into a FIN).
fn upstream_reset_mid_stream(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let server = StreamServer::start(host.addr());
    let relay = relay(engine, server.addr(), host, |c| c);
    let mut endings = Vec::new();
    without_fd_leak(&relay, "upstream reset", || {
        let specs: Vec<StreamSpec> = (0..ROUND)
            .map(|_| StreamSpec::new(seed(), 0, 1 << 20, Mode::ResetAfterSend))
            .collect();
        let conns: Vec<TcpStream> = specs
            .iter()
            .map(|spec| {
                let mut c = client::connect(relay.addr());
                c.write_all(&spec.header()).unwrap();
                c
            })
            .collect();
        for (spec, c) in specs.iter().zip(&conns) {
            let (n, end) = read_prefix_until_end(c, spec);
            assert!(n <= spec.down_len, "more bytes than the upstream sent");
            endings.push(end);
            let _ = server.result(spec.seed, HUNG);
        }
    });
    // "Reset (RST) propagated": the client sees a reset, not a clean end.
    let clean = endings.iter().filter(|e| **e == Ended::Eof).count();
    assert_eq!(
        clean,
        0,
        "{engine}: {clean} of {} clients saw a FIN, not the upstream's reset",
        endings.len()
    );
}
engines!(upstream_reset_mid_stream);

/// Reads what arrives, checking it is a prefix of the spec's down stream, until the
/// connection ends (which must happen within [`HUNG`]).
fn read_prefix_until_end(c: &TcpStream, spec: &StreamSpec) -> (u64, Ended) {
    let mut v = Verifier::for_pattern(spec.down());
    let deadline = Instant::now() + HUNG;
    let mut buf = vec![0u8; 64 * 1024];
    let mut r = c;
    loop {
        assert!(
            Instant::now() < deadline,
            "client still open {HUNG:?} after the upstream reset"
        );
        match r.read(&mut buf) {
            Ok(0) => return (v.offset(), Ended::Eof),
            Ok(n) => v.check(&buf[..n]).unwrap(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("client still open {HUNG:?} after the upstream reset")
            }
            Err(_) => return (v.offset(), Ended::Reset),
        }
    }
}

/// The client resets (SO_LINGER 0): the upstream sees its connection reset too.
fn client_reset_reaches_upstream(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let server = StreamServer::start(host.addr());
    let relay = relay(engine, server.addr(), host, |c| c);
    let mut endings = Vec::new();
    without_fd_leak(&relay, "client reset", || {
        let specs: Vec<StreamSpec> = (0..ROUND)
            .map(|_| StreamSpec::new(seed(), 0, 0, Mode::Watch))
            .collect();
        for spec in &specs {
            let mut c = client::connect(relay.addr());
            c.write_all(&spec.header()).unwrap();
            let mut w = [0u8; 1];
            c.read_exact(&mut w).expect("the upstream's greeting");
            SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
            drop(c);
        }
        for spec in &specs {
            match server.result(spec.seed, HUNG + HUNG) {
                Ok(end) => endings.push(end),
                Err(e) => panic!("{engine}: upstream after a client reset: {e}"),
            }
        }
    });
    let clean = endings.iter().filter(|e| **e == Ended::Eof).count();
    assert_eq!(
        clean,
        0,
        "{engine}: the upstream saw a FIN, not the client's reset, {clean} of {} times",
        endings.len()
    );
}
engines!(client_reset_reaches_upstream);

/// The upstream accepts and never says a word: past `--idle-timeout-ms 1000` the relay closes
/// the client.
fn silent_upstream_idle_timeout(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let silent = SilentServer::start(host.addr());
    let relay = relay(engine, silent.addr(), host, |c| c.idle_timeout_ms(1000));
    without_fd_leak(&relay, "idle timeout", || {
        clients_see_close(&relay, ROUND, b"anyone there?");
    });
    assert!(
        silent.accepted() > 0,
        "the relay never connected to the silent upstream"
    );
}
engines!(silent_upstream_idle_timeout);

/// The upstream never answers the SYN: past `--connect-timeout-ms 1000` the client is closed.
fn upstream_connect_timeout(engine: &str) {
    if !engine_ok(engine) {
        return;
    }
    let host = Host::new();
    let hole = BlackHole::new(host.addr());
    assert!(
        hole.swallows_syns(Duration::from_millis(300)),
        "the black hole accepted a connection"
    );
    let relay = relay(engine, hole.addr(), host, |c| c.connect_timeout_ms(1000));
    without_fd_leak(&relay, "connect timeout", || {
        clients_see_close(&relay, ROUND, b"");
    });
}
engines!(upstream_connect_timeout);
