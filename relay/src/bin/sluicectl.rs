//! `sluicectl`: the operator's control binary. Talks to a running `sluice` over its control
//! socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::control;

#[derive(Parser)]
#[command(name = "sluicectl", version, about = "Control a running sluice relay")]
struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, default_value = control::DEFAULT_PATH)]
    control: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Engines, workers, connections per worker and listener, counters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Latency and size histograms per listener: p50 p90 p99 p99.9 p99.99 max count.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print again every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// Clear the merged histograms (prints what they held).
        #[arg(long)]
        reset: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Status { json } => match control::request(&cli.control, "status") {
            Ok(v) => {
                if json {
                    println!("{v}");
                } else {
                    print_status(&v);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluicectl: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Stats { json, watch, reset } => stats(&cli.control, json, watch, reset),
    }
}

fn stats(path: &std::path::Path, json: bool, watch: bool, reset: bool) -> ExitCode {
    let mut first = true;
    loop {
        let cmd = if reset && first {
            "stats-reset"
        } else {
            "stats"
        };
        first = false;
        match control::request(path, cmd) {
            Ok(v) => {
                if watch && !json {
                    // Clear the screen and go home, like watch(1).
                    print!("\x1b[2J\x1b[H");
                }
                if json {
                    println!("{v}");
                } else {
                    print_stats(&v);
                }
            }
            Err(e) => {
                eprintln!("sluicectl: {e}");
                return ExitCode::from(1);
            }
        }
        if !watch {
            return ExitCode::SUCCESS;
        }
        // Ctrl-C ends the loop (SIGINT's default action).
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn print_stats(v: &serde_json::Value) {
    let Ok(r) = serde_json::from_value::<sluice::histo::Report>(v.clone()) else {
        println!("{v:#}");
        return;
    };
    println!(
        "{:<14} {:<26} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "listener", "histogram", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    for l in &r.listeners {
        for h in &l.histograms {
            let f = |x: f64| {
                if h.count == 0 {
                    "-".to_string()
                } else if h.unit == "ms" {
                    format!("{x:.2}ms")
                } else {
                    format!("{x:.0}B")
                }
            };
            println!(
                "{:<14} {:<26} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                l.name,
                h.name,
                h.count,
                f(h.p50),
                f(h.p90),
                f(h.p99),
                f(h.p999),
                f(h.p9999),
                f(h.max)
            );
        }
    }
}

fn print_status(v: &serde_json::Value) {
    let Ok(st) = serde_json::from_value::<control::Status>(v.clone()) else {
        println!("{v:#}");
        return;
    };
    println!(
        "engine {}   active {} / max {}   capacity {} ({} workers x {})",
        st.engine,
        st.active,
        st.max_connections,
        st.capacity,
        st.workers.len(),
        st.per_worker_capacity
    );
    println!(
        "\n{:<8} {:>8} {:<8} {:>10} {:>12}",
        "worker", "pid", "engine", "active", "accepted"
    );
    for w in &st.workers {
        println!(
            "{:<8} {:>8} {:<8} {:>10} {:>12}",
            w.index, w.pid, w.engine, w.active, w.accepted
        );
    }
    println!("\n{:<16} {:<24} {:>10}", "listener", "bind", "active");
    for l in &st.listeners {
        println!("{:<16} {:<24} {:>10}", l.name, l.bind, l.active);
    }
    println!();
    for (k, v) in &st.totals {
        println!("{k:<28} {v}");
    }
}
