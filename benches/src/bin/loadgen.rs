//! `loadgen`: the benchmark's load generators and echo upstream, one per process. Driven by
//! `sluice-bench`; prints `MARK`/`RESULT` lines on stdout (see `sluice_benches::wire`), progress
//! on stderr.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice_benches::{connrate, echo, idle, media, rr, tlsflood};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generators and echo upstream for Sluice's benchmark"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server: SO_REUSEPORT listener and epoll per thread.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Exit after this long at the latest.
        #[arg(long, default_value_t = 3600)]
        max_secs: u64,
    },
    /// Open-loop request/response over persistent connections.
    Rr {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Offered rates, messages per second, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "5000,20000")]
        rates: Vec<u32>,
        #[arg(long, default_value_t = 500)]
        warmup_ms: u64,
        #[arg(long, default_value_t = 2500)]
        measure_ms: u64,
        #[arg(long, default_value_t = 2000)]
        drain_ms: u64,
    },
    /// Connect, exchange 64 bytes, close; `concurrency` at a time.
    Connrate {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        #[arg(long, default_value_t = 300)]
        warmup_ms: u64,
        #[arg(long, default_value_t = 2000)]
        measure_ms: u64,
    },
    /// One attacking host: full TLS handshakes as fast as `threads` blocking clients go.
    TlsFlood {
        #[arg(long)]
        target: SocketAddr,
        /// The attacking host's address.
        #[arg(long)]
        source: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 16)]
        threads: usize,
        #[arg(long, default_value_t = 8000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1_000_000)]
        max_attempts: u64,
        #[arg(long, default_value_t = 0)]
        nice: i32,
    },
    /// A legitimate TLS client: connect, handshake, 64-byte echo, close, every `interval_ms`.
    TlsProbe {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        source: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 40)]
        interval_ms: u64,
        /// Phases as LABEL=MS, comma-separated, run in order.
        #[arg(long, value_delimiter = ',', default_value = "base=4000,flood=8000")]
        phases: Vec<String>,
        /// Resume sessions with tickets from earlier connections.
        #[arg(long)]
        resume: bool,
    },
    /// A few connections moving paced blocks both ways (through the echo server) until stdin
    /// closes: the media beside the chat in the mixed workload.
    Media {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 4)]
        conns: usize,
        /// Offered rate of each connection, one way, Mbit/s.
        #[arg(long, default_value_t = 200)]
        mbps: u32,
        #[arg(long, default_value_t = 65536)]
        block: usize,
        #[arg(long, default_value_t = 120_000)]
        max_ms: u64,
    },
    /// Open idle connections, check each with one echoed byte, hold them until stdin closes.
    Idle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: usize,
        /// First client source address index (127.77.1.1 + index).
        #[arg(long, default_value_t = 0)]
        source_base: usize,
        #[arg(long, default_value_t = 25_000)]
        setup_max_ms: u64,
        #[arg(long, default_value_t = 90_000)]
        hold_max_ms: u64,
        /// Give up when connections failed and none became held for this long.
        #[arg(long, default_value_t = 4_000)]
        patience_ms: u64,
        /// A connection not proven relayed by then failed.
        #[arg(long, default_value_t = 3_000)]
        conn_timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let ms = Duration::from_millis;
    let result = match Cli::parse().cmd {
        Cmd::Echo {
            listen,
            threads,
            max_secs,
        } => {
            sluice_benches::net::raise_nofile().and_then(|_| echo::serve(listen, threads, max_secs))
        }
        Cmd::Rr {
            target,
            conns,
            rates,
            warmup_ms,
            measure_ms,
            drain_ms,
        } => sluice_benches::net::raise_nofile().and_then(|_| {
            rr::run(&rr::Params {
                target,
                conns,
                rates,
                warmup: ms(warmup_ms),
                measure: ms(measure_ms),
                drain: ms(drain_ms),
            })
        }),
        Cmd::Connrate {
            target,
            concurrency,
            warmup_ms,
            measure_ms,
        } => connrate::run(&connrate::Params {
            target,
            concurrency,
            warmup: ms(warmup_ms),
            measure: ms(measure_ms),
        }),
        Cmd::TlsFlood {
            target,
            source,
            threads,
            duration_ms,
            max_attempts,
            nice,
        } => tlsflood::flood(&tlsflood::FloodParams {
            target,
            source,
            threads,
            duration: ms(duration_ms),
            max_attempts,
            nice,
        }),
        Cmd::TlsProbe {
            target,
            source,
            interval_ms,
            phases,
            resume,
        } => phases
            .iter()
            .map(|p| {
                let (label, v) = p
                    .split_once('=')
                    .ok_or_else(|| std::io::Error::other(format!("phase {p:?} is not LABEL=MS")))?;
                let v: u64 = v
                    .parse()
                    .map_err(|e| std::io::Error::other(format!("phase {p:?}: {e}")))?;
                Ok((label.to_owned(), ms(v)))
            })
            .collect::<std::io::Result<Vec<_>>>()
            .and_then(|phases| {
                tlsflood::probe(&tlsflood::ProbeParams {
                    target,
                    source,
                    interval: ms(interval_ms),
                    phases,
                    resume,
                })
            }),
        Cmd::Media {
            target,
            conns,
            mbps,
            block,
            max_ms,
        } => media::run(&media::Params {
            target,
            conns,
            mbps,
            block,
            max: ms(max_ms),
        }),
        Cmd::Idle {
            target,
            count,
            source_base,
            setup_max_ms,
            hold_max_ms,
            patience_ms,
            conn_timeout_ms,
        } => idle::run(&idle::Params {
            target,
            count,
            source_base,
            setup_max: ms(setup_max_ms),
            hold_max: ms(hold_max_ms),
            patience: ms(patience_ms),
            conn_timeout: ms(conn_timeout_ms),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}
