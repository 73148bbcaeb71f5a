//! `cargo xtask fuzz`: runs the libFuzzer targets of `fuzz/` (cargo-fuzz, nightly), each for a
//! bounded time, and says how many inputs each one executed.
//!
//! cargo-fuzz is installed from crates.io when missing. Before a run the committed seeds
//! (`fuzz/seeds/TARGET/`) are copied into the working corpus (`fuzz/corpus/TARGET/`, not
//! committed), which keeps what libFuzzer finds between runs. A crash stops the run with the
//! failing input saved under `fuzz/artifacts/TARGET/`; rerun it with
//! `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-…` from `fuzz/`.
//!
//! The targets are safe Rust, so the default sanitizer is `none` (several times the executions
//! of AddressSanitizer in the same time); `--sanitizer address` is there for a deeper look.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run;

/// Every target in `fuzz/fuzz_targets/`.
pub const TARGETS: &[&str] = &["proxy", "sni", "config", "control"];

#[derive(clap::Args)]
pub struct FuzzFlags {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    pub time: u64,
    /// Only this target (proxy, sni, config, control); all of them otherwise.
    #[arg(long)]
    pub target: Option<String>,
    /// Stop a target after this many executions, even before `--time` is up.
    #[arg(long)]
    pub runs: Option<u64>,
    /// The sanitizer cargo-fuzz builds with: none, address, ...
    #[arg(long, default_value = "none")]
    pub sanitizer: String,
}

pub fn fuzz(root: &Path, flags: &FuzzFlags) -> Result<()> {
    let targets: Vec<&str> = match &flags.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!(
            "no fuzz target `{t}`; the targets are {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    install_cargo_fuzz()?;
    let dir = root.join("fuzz");
    let mut summary = Vec::new();
    for target in targets {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        for seed in std::fs::read_dir(dir.join("seeds").join(target))
            .with_context(|| format!("fuzz/seeds/{target} is missing"))?
        {
            let seed = seed?.path();
            std::fs::copy(&seed, corpus.join(seed.file_name().expect("a file")))?;
        }
        eprintln!("xtask: fuzzing `{target}` for {} s", flags.time);
        let mut cmd = nightly_cargo();
        cmd.current_dir(&dir)
            .args(["fuzz", "run", "--sanitizer", &flags.sanitizer, target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={}", flags.time))
            .arg("-print_final_stats=1")
            .stderr(Stdio::piped());
        if let Some(runs) = flags.runs {
            cmd.arg(format!("-runs={runs}"));
        }
        let mut child = cmd.spawn().context("cannot start cargo fuzz")?;
        let stderr = child.stderr.take().expect("piped");
        let (mut executions, mut seconds) = (None, None);
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            if !is_progress(&line) {
                eprintln!("{line}");
            }
            if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                executions = n.trim().parse::<u64>().ok();
            }
            // "Done 10500000 runs in 47 second(s)": the time taken, when `-runs` ended it early.
            if let Some(rest) = line.strip_prefix("Done ") {
                seconds = rest
                    .split_whitespace()
                    .nth(3)
                    .and_then(|s| s.parse::<u64>().ok());
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!(
                "fuzz target `{target}` failed ({status}); the input is under fuzz/artifacts/{target}/"
            );
        }
        let executions = executions.context("libFuzzer printed no final stats")?;
        summary.push(format!(
            "{target}: {executions} executions in {} s, no crash",
            seconds.unwrap_or(flags.time)
        ));
    }
    for line in summary {
        eprintln!("xtask: fuzz {line}");
    }
    Ok(())
}

/// libFuzzer's progress lines (`#123 NEW cov: …`) and its recommended dictionary (`"\001" # Uses: 9`):
/// thousands of lines a minute that would push everything else out of a CI log's tail. What it
/// prints about a crash is neither.
fn is_progress(line: &str) -> bool {
    let counter = line
        .strip_prefix('#')
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    counter || (line.starts_with('"') && line.contains("# Uses:"))
}

/// `cargo +nightly …` with the toolchain variables of the outer cargo removed.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .arg("+nightly");
    cmd
}

fn install_cargo_fuzz() -> Result<()> {
    let present = nightly_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (crates.io, a minute or two)");
    run(nightly_cargo().args(["install", "cargo-fuzz", "--locked"]))
}

#[cfg(test)]
mod tests {
    use super::is_progress;

    #[test]
    fn progress_lines_are_dropped_and_crash_reports_kept() {
        assert!(is_progress(
            "#12010543\tREDUCE cov: 704 ft: 2153 corp: 681/60Kb lim: 4096 exec/s: 230971"
        ));
        assert!(is_progress(r#""\001\000\000\000" # Uses: 14730"#));
        assert!(!is_progress("==1234== ERROR: libFuzzer: deadly signal"));
        assert!(!is_progress("###### Recommended dictionary. ######"));
        assert!(!is_progress("stat::number_of_executed_units: 12617073"));
        assert!(!is_progress("Done 12617073 runs in 61 second(s)"));
    }
}
