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
    if let Some(fp) = &st.fast_path {
        println!("sockmap fast path: {fp}");
    }
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
