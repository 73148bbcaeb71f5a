//! `holder`: a helper process for tests that need more sockets than one process may open
//! (RLIMIT_NOFILE is capped at 20000 here). It runs an echo server or a set of client
//! connections and is driven over stdin/stdout; the protocol is documented in
//! `sluice_tests::holder`.

use std::io::{self, BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use sluice_tests::client::{echo_many, open_many};
use sluice_tests::servers::EchoServer;
use sluice_tests::sys;

fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn fail(msg: &str) -> ExitCode {
    say(&format!("error {msg}"));
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    sys::raise_nofile_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["echo", addr, rest @ ..] => {
            let Ok(addr) = addr.parse::<SocketAddr>() else {
                return fail("bad address");
            };
            let server = if rest.contains(&"--reuseport") {
                EchoServer::start_reuseport(addr)
            } else {
                EchoServer::start(addr)
            };
            say("ready");
            for line in io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match line.trim() {
                    "count" => {
                        let s = server.stats();
                        let load = |a: &std::sync::atomic::AtomicUsize| {
                            a.load(std::sync::atomic::Ordering::Relaxed)
                        };
                        say(&format!(
                            "count {} {} {}",
                            load(&s.active),
                            load(&s.accepted),
                            load(&s.errors)
                        ));
                    }
                    "quit" => break,
                    other => return fail(&format!("unknown command `{other}`")),
                }
            }
            ExitCode::SUCCESS
        }
        ["client", addr, source, n] => {
            let (Ok(addr), Ok(source), Ok(n)) = (
                addr.parse::<SocketAddr>(),
                source.parse::<IpAddr>(),
                n.parse::<usize>(),
            ) else {
                return fail("usage: client ADDR SOURCE_IP N");
            };
            let conns = match open_many(addr, Some(source), n) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            // Every connection carries bytes both ways while all are held.
            if let Err(e) = echo_many(&conns, 1 << 32, 8, false, Duration::from_secs(120)) {
                return fail(&format!("ping: {e}"));
            }
            say(&format!("held {}", conns.len()));
            let mut conns = Some(conns);
            for line in io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["sample", every, len] => {
                        let (Ok(every), Ok(len)) = (every.parse::<usize>(), len.parse::<usize>())
                        else {
                            return fail("usage: sample EVERY LEN");
                        };
                        let Some(all) = conns.as_ref() else {
                            return fail("already closed");
                        };
                        let sample: Vec<_> = all
                            .iter()
                            .step_by(every.max(1))
                            .filter_map(|c| c.try_clone().ok())
                            .collect();
                        if let Err(e) =
                            echo_many(&sample, 2 << 32, len, false, Duration::from_secs(120))
                        {
                            return fail(&format!("sample: {e}"));
                        }
                        say(&format!("sampled {}", sample.len()));
                    }
                    ["close"] => {
                        conns = None;
                        say("closed");
                    }
                    ["quit"] => break,
                    _ => return fail(&format!("unknown command `{line}`")),
                }
            }
            drop(conns);
            ExitCode::SUCCESS
        }
        ["probe-io-uring"] => match sys::probe_io_uring() {
            Ok(()) => {
                say("ok");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
        _ => {
            fail("usage: holder echo ADDR [--reuseport] | client ADDR SOURCE_IP N | probe-io-uring")
        }
    }
}
