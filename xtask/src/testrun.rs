//! Runs `cargo test` with its output passed through unchanged, and remembers what libtest printed
//! about failures so the end of the run can say which tests failed and why.
//!
//! CI keeps only the tail of a long log, and the tail of `cargo xtask test` is the fuzzers' report:
//! without this, a failing test shows up as "cargo test failed: exit status 101" and nothing else.
//! The whole failure text also goes to `target/xtask-test-failures.txt`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};

/// What one `cargo test` run left behind when it failed: the names of the failed tests and, for
/// each, the lines around its panic.
pub struct Failures {
    pub status: std::process::ExitStatus,
    pub names: Vec<String>,
    pub excerpts: Vec<String>,
}

impl Failures {
    /// A short account for the end of the log: names first, then at most `PER_TEST` lines of each
    /// panic.
    pub fn summary(&self) -> String {
        if self.names.is_empty() {
            // cargo failed before or outside libtest's report: a build error, or a test binary
            // that crashed or was killed. What it printed is above, on stderr.
            return format!(
                "cargo test failed ({}) without naming a failed test: a build error or a test \
                 binary that crashed; see cargo's error above",
                self.status
            );
        }
        let mut s = format!(
            "cargo test failed ({}); {} failed test(s):\n",
            self.status,
            self.names.len()
        );
        for name in &self.names {
            s.push_str(&format!("    {name}\n"));
        }
        for excerpt in &self.excerpts {
            s.push_str(excerpt);
        }
        s.push_str("(the whole failure text is in target/xtask-test-failures.txt)");
        s
    }
}

/// Lines kept of each failed test's output in the summary.
const PER_TEST: usize = 12;

/// Runs `cmd` (a `cargo test`), echoing its stdout. `Ok(None)` when it passed.
pub fn run(cmd: &mut Command, root: &Path) -> Result<Option<Failures>> {
    run_echoing(cmd, root, &mut std::io::stdout().lock())
}

fn run_echoing(cmd: &mut Command, root: &Path, out: &mut dyn Write) -> Result<Option<Failures>> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let stdout = child.stdout.take().expect("piped");
    // A reader thread, so that a process a test leaked (and which still holds the pipe) cannot
    // keep this waiting after cargo itself has exited.
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut parser = Parser::default();
    let mut exited = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
                parser.line(&line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if exited.is_none()
            && let Some(status) = child.try_wait()?
        {
            exited = Some((status, std::time::Instant::now()));
        }
        if let Some((_, at)) = exited
            && at.elapsed() > Duration::from_secs(5)
        {
            break;
        }
    }
    let status = match exited {
        Some((status, _)) => status,
        None => child.wait()?,
    };
    if status.success() {
        return Ok(None);
    }
    let full = parser.blocks.join("\n");
    let _ = std::fs::write(root.join("target/xtask-test-failures.txt"), &full);
    Ok(Some(Failures {
        status,
        names: parser.names,
        excerpts: parser.excerpts,
    }))
}

/// Follows libtest's report: between the first `failures:` and `test result:` of each test binary
/// come one `---- NAME stdout ----` section per failed test, then the list of names.
#[derive(Default)]
struct Parser {
    in_failures: bool,
    in_name_list: bool,
    block: Vec<String>,
    blocks: Vec<String>,
    names: Vec<String>,
    excerpts: Vec<String>,
    excerpt: Option<Excerpt>,
}

struct Excerpt {
    text: String,
    lines: usize,
    /// Lines are kept from the panic on; before it, a test's own output can be long.
    after_panic: bool,
}

impl Parser {
    fn line(&mut self, line: &str) {
        if line.starts_with("test result:") {
            if self.in_failures {
                self.finish_excerpt();
                self.block.push(line.to_string());
                self.blocks.push(std::mem::take(&mut self.block).join("\n"));
            }
            self.in_failures = false;
            self.in_name_list = false;
            return;
        }
        if !self.in_failures {
            if line == "failures:" {
                self.in_failures = true;
                self.block.push(line.to_string());
            }
            return;
        }
        self.block.push(line.to_string());
        if line == "failures:" {
            // The second `failures:` of a binary starts the list of names.
            self.finish_excerpt();
            self.in_name_list = true;
            return;
        }
        if self.in_name_list {
            let name = line.trim();
            if !name.is_empty() {
                self.names.push(name.to_string());
            }
            return;
        }
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            self.finish_excerpt();
            self.excerpt = Some(Excerpt {
                text: format!("---- {name}\n"),
                lines: 0,
                after_panic: false,
            });
            return;
        }
        if let Some(e) = &mut self.excerpt {
            if line.contains("panicked at") {
                e.after_panic = true;
            }
            if e.after_panic && e.lines < PER_TEST && !line.is_empty() {
                e.text.push_str(line);
                e.text.push('\n');
                e.lines += 1;
            }
        }
    }

    fn finish_excerpt(&mut self) {
        if let Some(e) = self.excerpt.take() {
            self.excerpts.push(e.text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_keeps_names_and_panics_of_failed_tests_only() {
        let log = "\
running 3 tests
test a::ok ... ok
test a::bad ... FAILED
test b::worse ... FAILED

failures:

---- a::bad stdout ----
relay log line 1
relay log line 2
thread 'a::bad' panicked at tests/src/a.rs:10:5:
assertion `left == right` failed
  left: 1
 right: 2

---- b::worse stdout ----
thread 'b::worse' panicked at tests/src/b.rs:3:1:
no reply within 5 s

failures:
    a::bad
    b::worse

test result: FAILED. 1 passed; 2 failed; 0 ignored
running 1 test
test c::fine ... ok

test result: ok. 1 passed; 0 failed
";
        let mut p = Parser::default();
        for line in log.lines() {
            p.line(line);
        }
        assert_eq!(p.names, ["a::bad", "b::worse"]);
        assert_eq!(p.excerpts.len(), 2);
        assert!(p.excerpts[0].starts_with("---- a::bad\nthread 'a::bad' panicked"));
        assert!(p.excerpts[0].contains("right: 2"));
        assert!(!p.excerpts[0].contains("relay log line"));
        assert!(p.excerpts[1].contains("no reply within 5 s"));
        assert_eq!(p.blocks.len(), 1);
        assert!(p.blocks[0].ends_with("test result: FAILED. 1 passed; 2 failed; 0 ignored"));
    }

    #[test]
    fn a_failed_run_is_summarised_and_saved_and_a_leaked_pipe_does_not_hold_it() {
        let root = std::env::temp_dir().join(format!("xtask-testrun-{}", std::process::id()));
        std::fs::create_dir_all(root.join("target")).unwrap();
        // The background `sleep` keeps the pipe open after the shell exits, like a leaked child.
        let script = concat!(
            r"printf 'failures:\n\n---- t::x stdout ----\nthread panicked at x.rs:1:1:\nboom\n\n",
            r"failures:\n    t::x\n\ntest result: FAILED. 0 passed; 1 failed\n'; ",
            r#"sleep 120 & echo "sleeper $!"; exit 101"#
        );
        let started = std::time::Instant::now();
        // Echoed into a buffer, not stdout: this test runs inside `cargo xtask test`, whose
        // parser reads stdout.
        let mut echoed = Vec::new();
        let f = run_echoing(Command::new("sh").args(["-c", script]), &root, &mut echoed)
            .unwrap()
            .expect("a failure");
        let waited = started.elapsed();
        let echoed = String::from_utf8(echoed).unwrap();
        let sleeper = echoed
            .lines()
            .find_map(|l| l.strip_prefix("sleeper "))
            .expect("the sleeper's pid");
        Command::new("kill").arg(sleeper).status().unwrap();
        assert!(waited < Duration::from_secs(60), "waited {waited:?}");
        assert_eq!(f.names, ["t::x"], "{echoed}");
        let summary = f.summary();
        assert!(
            summary.contains("1 failed test(s):\n    t::x\n"),
            "{summary}"
        );
        assert!(summary.contains("boom"), "{summary}");
        let unnamed = Failures {
            status: f.status,
            names: Vec::new(),
            excerpts: Vec::new(),
        };
        assert!(
            unnamed.summary().contains("without naming a failed test"),
            "{}",
            unnamed.summary()
        );
        let saved = std::fs::read_to_string(root.join("target/xtask-test-failures.txt")).unwrap();
        assert!(saved.contains("---- t::x stdout ----"));
        std::fs::remove_dir_all(&root).unwrap();

        let ok = run_echoing(
            Command::new("sh").args(["-c", "echo fine"]),
            &root,
            &mut std::io::sink(),
        )
        .unwrap();
        assert!(ok.is_none());
    }
}
