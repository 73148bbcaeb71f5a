//! `sluice-bench`: the end-to-end benchmark run that `cargo xtask bench` starts once the peers are
//! installed and everything is built. Prints the Markdown report on stdout and progress on
//! stderr; writes `target/bench/report.json` and `target/bench/*.svg`, and with `--save` also
//! `docs/BENCHMARKS.md` and `docs/bench/*.svg`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use sluice_benches::suite::{self, Options, Workload};
use sluice_benches::{plot, report};

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    about = "Sluice against HAProxy, nginx and socat on loopback"
)]
struct Cli {
    /// Short run (under 3 minutes): fewer seconds per workload, 10 000 idle connections.
    #[arg(long)]
    quick: bool,
    /// Also write docs/BENCHMARKS.md and docs/bench/*.svg.
    #[arg(long)]
    save: bool,
    /// Run only these workloads (repeatable or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Workload>,
    /// Run only these candidates (direct, sluice-splice, sluice-copy, sluice-epoll, sluice-sockmap, haproxy,
    /// nginx, socat).
    #[arg(long, value_delimiter = ',')]
    candidates: Vec<String>,
    /// Workspace root (default: the current directory).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Where `sluice`, `sluicectl` and `loadgen` are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Do not run anything: render the report and plots again from a saved report.json.
    #[arg(long, value_name = "REPORT_JSON")]
    from_json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = match cli.root {
        Some(r) => r,
        None => std::env::current_dir()?,
    };
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("binary has a directory")?
            .to_path_buf(),
    };
    let out_dir = root.join("target/bench");
    let mut command = String::from("cargo xtask bench");
    if cli.quick {
        command.push_str(" --quick");
    }
    if cli.save {
        command.push_str(" --save");
    }
    let r: suite::Report = match &cli.from_json {
        Some(path) => serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )?,
        None => suite::run(Options {
            quick: cli.quick,
            only: cli.only.clone(),
            candidates: cli.candidates,
            bin_dir,
            out_dir: out_dir.clone(),
        })?,
    };
    let md = report::markdown(&r, &command);
    suite::write_json(&r, &out_dir.join("report.json"))?;
    plot::write_all(&r, &out_dir)?;
    println!("{md}");
    eprintln!(
        "bench: done in {:.0} s; wrote {}, {}/*.svg",
        r.duration_s,
        out_dir.join("report.json").display(),
        out_dir.display()
    );
    if cli.save {
        let docs = root.join("docs");
        std::fs::create_dir_all(docs.join("bench"))?;
        let path = docs.join("BENCHMARKS.md");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let sections = [
            (
                Workload::Scale,
                (report::SCALE_BEGIN, report::SCALE_END),
                report::scale_section(&r),
            ),
            (
                Workload::TlsFlood,
                (report::TLS_BEGIN, report::TLS_END),
                report::tls_flood_section(&r),
            ),
        ];
        // A run of sections only (scale, tls-flood) replaces just those sections of the saved
        // report; a normal run keeps the sections a section run saved before.
        let scale_only = !cli.only.is_empty()
            && cli
                .only
                .iter()
                .all(|w| sections.iter().any(|(s, _, _)| s == w));
        let mut doc = if scale_only { old.clone() } else { md.clone() };
        for (_, marks, new) in &sections {
            match (scale_only, new) {
                (true, Some(section)) => doc = report::with_section(&doc, *marks, section),
                (false, None) => {
                    if let Some(section) = report::existing_section(&old, *marks) {
                        doc = report::with_section(&doc, *marks, &section);
                    }
                }
                _ => {}
            }
        }
        std::fs::write(&path, doc)?;
        if scale_only {
            // The plots show the other workloads: a section run leaves the saved ones alone.
            eprintln!("bench: saved {} (its sections)", path.display());
        } else {
            plot::write_all(&r, &docs.join("bench"))?;
            eprintln!(
                "bench: saved {} and {}/*.svg",
                path.display(),
                docs.join("bench").display()
            );
        }
    }
    Ok(())
}
