//! `sluicectl`: the operator's control binary. Talks to a running `sluice` over its control
//! socket (`status`, the admission lists) and loads/unloads the pinned eBPF objects.
//!
//! Exit codes: 0 on success, 1 when the daemon cannot be reached or refuses (not running,
//! permission denied, an error it answers) or the eBPF side fails, 2 for a bad command line
//! (a bad CIDR or HOST:PORT is refused here, before the daemon is asked).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::admission::{self, Command, List, Rule};
use sluice::control;

#[path = "sluicectl/operator.rs"]
mod operator;

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
    /// Clients that may connect (CIDRs). With a non-empty allow list, everyone else is refused.
    Allow {
        #[command(subcommand)]
        op: ClientOp,
    },
    /// Clients refused (CIDRs); deny wins over allow. New connections only, unless
    /// `--kill-existing`.
    Deny {
        #[command(subcommand)]
        op: DenyOp,
    },
    /// Upstream addresses the relay may connect to (HOST:PORT); empty = any.
    Dest {
        #[command(subcommand)]
        op: DestOp,
    },
    /// Reload the daemon's configuration file (like SIGHUP), waiting until every worker applied
    /// it: new connections follow it, established ones go on. Refused (exit code 1, the running
    /// configuration kept) when the file does not parse or changes what needs a restart.
    Reload {
        /// Print the daemon's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Load the eBPF programs and maps and pin them (mounts bpffs at /sys/fs/bpf if needed);
    /// a daemon started afterwards uses the pinned maps.
    Load {
        /// Pin directory.
        #[arg(long, default_value = sluice::ebpf::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Remove the pins `load` made (programs attached by a daemon stay until it stops).
    Unload {
        /// Pin directory.
        #[arg(long, default_value = sluice::ebpf::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Print the links users tap to use this relay (WhatsApp, Signal) and their QR codes.
    Share(operator::ShareArgs),
    /// Check this host for the relay: kernel features, capabilities, fd limits, ports,
    /// upstreams, clock, sysctls, the running daemon. Exit code 1 when a check fails.
    Doctor(operator::DoctorArgs),
}

#[derive(Subcommand)]
enum ClientOp {
    /// Add a CIDR (a bare address means /32 or /128).
    Add { cidr: String },
    /// Remove exactly this CIDR.
    Del { cidr: String },
    /// Print the list.
    List,
}

#[derive(Subcommand)]
enum DenyOp {
    /// Add a CIDR (a bare address means /32 or /128).
    Add {
        cidr: String,
        /// Also close the live connections of clients in the range now.
        #[arg(long)]
        kill_existing: bool,
    },
    /// Remove exactly this CIDR.
    Del { cidr: String },
    /// Print the list.
    List,
}

#[derive(Subcommand)]
enum DestOp {
    /// Add HOST:PORT (a name is resolved once, here, within 5 s; every address it has is added).
    Add { dest: String },
    /// Remove HOST:PORT (every address it resolves to).
    Del { dest: String },
    /// Print the list.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cmd = match cli.cmd {
        Cmd::Status { json } => return status(&cli.control, json),
        Cmd::Stats { json, watch, reset } => return stats(&cli.control, json, watch, reset),
        Cmd::Share(args) => return operator::share(args),
        Cmd::Reload { json } => return reload(&cli.control, json),
        Cmd::Doctor(args) => return operator::doctor(args, &cli.control),
        Cmd::Load { pin_dir } => {
            return match sluice::ebpf::pin_all(&pin_dir) {
                Ok(names) => {
                    println!("pinned under {}: {}", pin_dir.display(), names.join(" "));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &format!("load: {e}")),
            };
        }
        Cmd::Unload { pin_dir } => {
            return match sluice::ebpf::unpin_all(&pin_dir) {
                Ok(names) if names.is_empty() => {
                    println!("nothing pinned under {}", pin_dir.display());
                    ExitCode::SUCCESS
                }
                Ok(names) => {
                    println!("unpinned from {}: {}", pin_dir.display(), names.join(" "));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &format!("unload: {e}")),
            };
        }
        Cmd::Allow { op } => client_command(List::Allow, op),
        Cmd::Deny { op } => match op {
            DenyOp::Add {
                cidr,
                kill_existing,
            } => admission::parse_cidr(&cidr).map(|c| Command::Add {
                list: List::Deny,
                rule: Rule::Client(c),
                kill_existing,
            }),
            DenyOp::Del { cidr } => client_command(List::Deny, ClientOp::Del { cidr }),
            DenyOp::List => Ok(Command::List(List::Deny)),
        },
        Cmd::Dest { op } => match op {
            DestOp::Add { dest } => admission::parse_dest(&dest).map(|a| Command::Add {
                list: List::Dest,
                rule: Rule::Dest(a),
                kill_existing: false,
            }),
            DestOp::Del { dest } => admission::parse_dest(&dest).map(|a| Command::Del {
                list: List::Dest,
                rule: Rule::Dest(a),
            }),
            DestOp::List => Ok(Command::List(List::Dest)),
        },
    };
    let cmd = match cmd {
        Ok(c) => c,
        Err(e) => return fail(2, &e),
    };
    match control::request(&cli.control, &cmd.encode()) {
        Ok(v) => {
            let reply: admission::Reply = match serde_json::from_value(v.clone()) {
                Ok(r) => r,
                Err(_) => return fail(1, &format!("unexpected answer from the daemon: {v}")),
            };
            print_reply(&cmd, &reply);
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &e.to_string()),
    }
}

fn reload(path: &std::path::Path, json: bool) -> ExitCode {
    match control::request(path, "reload") {
        Ok(v) if json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            let changed: Vec<&str> = v["listeners_changed"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            println!(
                "reloaded: {} ({} of {} workers applied it)",
                match (changed.is_empty(), v["settings_changed"].as_bool()) {
                    (true, Some(true)) => "global settings changed".to_string(),
                    (true, _) => "nothing changed".to_string(),
                    (false, _) => format!("listeners changed: {}", changed.join(", ")),
                },
                v["workers_applied"],
                v["workers"]
            );
            if v["admission_lists_reset"].as_bool() == Some(true) {
                println!("the [admission] lists changed: they start over from the file");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &format!("reload: {e}")),
    }
}

fn client_command(list: List, op: ClientOp) -> Result<Command, String> {
    match op {
        ClientOp::Add { cidr } => admission::parse_cidr(&cidr).map(|c| Command::Add {
            list,
            rule: Rule::Client(c),
            kill_existing: false,
        }),
        ClientOp::Del { cidr } => admission::parse_cidr(&cidr).map(|c| Command::Del {
            list,
            rule: Rule::Client(c),
        }),
        ClientOp::List => Ok(Command::List(list)),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("sluicectl: {msg}");
    ExitCode::from(code)
}

fn print_reply(cmd: &Command, r: &admission::Reply) {
    let applied = format!("{}/{} workers applied it", r.workers_applied, r.workers);
    match cmd {
        Command::List(_) => {
            for rule in &r.rules {
                println!("{rule}");
            }
        }
        Command::Add {
            list,
            rule,
            kill_existing,
        } => {
            let what = if r.changed { "added" } else { "already listed" };
            println!("{} {}: {what}; {applied}", list.name(), describe(rule));
            if *kill_existing {
                println!("live connections from the range were closed");
            }
            if r.xdp {
                println!("SYNs from the range to the relay's ports are also dropped by XDP");
            }
        }
        Command::Del { list, rule } => {
            let what = if r.changed {
                "removed"
            } else {
                "was not listed"
            };
            println!("{} {}: {what}; {applied}", list.name(), describe(rule));
        }
    }
}

fn describe(rule: &Rule) -> String {
    match rule {
        Rule::Client(c) => c.to_string(),
        Rule::Dest(a) => admission::encode_list(a),
    }
}

fn status(path: &std::path::Path, json: bool) -> ExitCode {
    match control::request(path, "status") {
        Ok(v) => {
            if json {
                println!("{v}");
            } else {
                print_status(&v);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &e.to_string()),
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

/// Bytes as MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn print_status(v: &serde_json::Value) {
    let Ok(st) = serde_json::from_value::<control::Status>(v.clone()) else {
        println!("{v:#}");
        return;
    };
    println!(
        "engine {}   active {} / max {} ({} places taken)   capacity {} ({} workers x {})",
        st.engine,
        st.active,
        st.max_connections,
        st.places,
        st.capacity,
        st.workers.len(),
        st.per_worker_capacity
    );
    if let Some(fp) = &st.fast_path {
        println!("sockmap fast path: {fp}");
        let t = |k: &str| st.totals.get(k).copied().unwrap_or(0);
        println!(
            "  kernel queue {} (at most {} reserved), held on sockets {}; {} holds ({} found \
             without an event), {} allowances cut short by the daemon-wide budget; {} bytes \
             the kernel sent twice (their connections reset)",
            mib(t("fast_path_queued_bytes")),
            mib(t("fast_path_reserved_bytes")),
            mib(t("fast_path_held_bytes")),
            t("fast_path_holds"),
            t("fast_path_holds_unannounced"),
            t("fast_path_budget_short"),
            t("fast_path_duplicated_bytes"),
        );
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
    let a = &st.admission;
    println!(
        "admission: {} allow, {} deny, {} destination rules; XDP on {}",
        a.allow_rules,
        a.deny_rules,
        a.destinations,
        if a.xdp_interfaces.is_empty() {
            "no interface".to_string()
        } else {
            a.xdp_interfaces.join(", ")
        }
    );
    println!("\n{:<16} {:<24} {:>10}", "listener", "bind", "active");
    for l in &st.listeners {
        println!("{:<16} {:<24} {:>10}", l.name, l.bind, l.active);
    }
    println!();
    for (k, v) in &st.totals {
        println!("{k:<28} {v}");
    }
}
