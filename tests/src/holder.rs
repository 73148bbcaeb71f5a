//! Drives the `holder` helper binary (src/bin/holder.rs) from a test: one process per few
//! thousand connections, because one process may hold at most 20000 fds here. Commands go in
//! on stdin, one per line; the holder answers one line each on stdout.
//!
//! Protocol (each answer is a line; `error ...` means it failed and exits):
//! - `holder echo ADDR [--reuseport]`: prints `ready`; then `count` -> `count ACTIVE ACCEPTED ERRORS`.
//! - `holder client ADDR SOURCE_IP N`: opens N connections from SOURCE_IP, echoes 8 bytes on
//!   each (all held at once), prints `held N`; then `sample EVERY LEN` -> `sampled K` (LEN
//!   bytes echoed byte-exact on every EVERY-th connection), `close` -> `closed`.
//! - `holder probe-io-uring`: prints `ok` or `error ...` (is io_uring_setup allowed here?).
//!
//! `quit` or the end of stdin ends every mode.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::Duration;

use crate::ChildGuard;

/// A running holder process; killed by pid when dropped.
pub struct Holder {
    name: String,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    guard: ChildGuard,
}

impl Holder {
    /// Starts `exe` (the holder binary: `env!("CARGO_BIN_EXE_holder")` in a test) with `args`.
    pub fn spawn(exe: &Path, args: &[String]) -> Holder {
        let name = format!("holder {}", args.join(" "));
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut guard = ChildGuard::spawn(&name, &mut cmd);
        let stdin = guard.child().stdin.take();
        let stdout = guard.child().stdout.take().unwrap();
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Holder {
            name,
            stdin,
            lines,
            guard,
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Sends one command line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}")
            .unwrap_or_else(|e| panic!("{}: cannot send `{line}`: {e}", self.name));
        stdin.flush().unwrap();
    }

    /// The next line, which must start with `prefix`; returns the rest of it. Panics on an
    /// `error` line, on exit, or after `timeout`.
    pub fn expect(&mut self, prefix: &str, timeout: Duration) -> String {
        self.try_expect(prefix, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Holder::expect`] that returns the failure instead of panicking.
    pub fn try_expect(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => match line.strip_prefix(prefix) {
                Some(rest) => Ok(rest.trim().to_owned()),
                None => Err(format!(
                    "{}: expected `{prefix}...`, got `{line}`",
                    self.name
                )),
            },
            Err(_) => Err(format!(
                "{}: no `{prefix}` line within {timeout:?} (exited: {:?})",
                self.name,
                self.guard.try_wait()
            )),
        }
    }

    /// `quit`, then waits (up to 10 s) for a clean exit.
    pub fn quit(mut self) {
        self.send("quit");
        self.stdin = None;
        let status = self.guard.wait_timeout(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{}: exit status {status:?}",
            self.name
        );
    }
}
