//! `sluice`: the relay daemon. Parses the command line and calls the library.
//!
//! Exit codes: 0 after SIGTERM/SIGINT, 1 when it cannot start (a port in use, io_uring refused
//! with `--engine splice|copy`), 2 for a bad configuration or command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sluice::config::{Config, EngineChoice, HostPort, ResolveOverride};
use sluice::control;
use sluice::supervisor::{self, Options};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A relay for WhatsApp and Signal users in internet shutdowns: moves bytes, keeps no addresses"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay from a config file or a preset (default: the WhatsApp preset).
    Run {
        /// TOML configuration file (README.md's example names every key; `sluice check-config
        /// --preset whatsapp` prints a complete one to start from).
        #[arg(long, conflicts_with = "preset")]
        config: Option<PathBuf>,
        /// A built-in deployment: `whatsapp` (the WhatsApp proxy) or `signal` (Signal-TLS-Proxy).
        #[arg(long, value_enum)]
        preset: Option<sluice::config::preset::Preset>,
        /// The name users reach the relay at: with `--preset signal`, port 443's certificate
        /// comes from Let's Encrypt for it (ACME, TLS-ALPN-01; stored under /var/lib/sluice).
        #[arg(long, value_name = "NAME", conflicts_with = "config")]
        domain: Option<String>,
        /// The Let's Encrypt account's contact address, for its expiry warnings (with --domain).
        #[arg(long, value_name = "ADDR", requires = "domain")]
        email: Option<String>,
        /// Point an upstream host name at an address, like /etc/hosts (repeatable).
        #[arg(long, value_name = "HOST=IP")]
        resolve: Vec<ResolveOverride>,
        #[command(flatten)]
        common: Common,
    },
    /// Relay one port to one upstream (ad-hoc use and benchmarks).
    Forward {
        /// Address to listen on, e.g. 127.0.0.1:8080.
        listen: SocketAddr,
        /// Upstream HOST:PORT.
        upstream: HostPort,
        /// Connect timeout per upstream address, in ms.
        #[arg(long, default_value_t = 5000)]
        connect_timeout_ms: u32,
        /// Close a connection idle this long, in ms.
        #[arg(long, default_value_t = 200_000)]
        idle_timeout_ms: u32,
        /// After one side half-closed, close when idle this long, in ms.
        #[arg(long, default_value_t = 1000)]
        fin_timeout_ms: u32,
        /// Local address upstream connections leave from (repeatable; used in turn).
        #[arg(long = "source-address", value_name = "IP")]
        source_addresses: Vec<std::net::IpAddr>,
        #[command(flatten)]
        common: Common,
    },
    /// Validate a configuration file and print the effective configuration as TOML.
    CheckConfig {
        /// TOML configuration file.
        file: Option<PathBuf>,
        /// Print a preset's effective configuration instead.
        #[arg(long, value_enum, conflicts_with = "file")]
        preset: Option<sluice::config::preset::Preset>,
    },
    /// Internal: a worker process (started by the supervisor only).
    #[command(name = "__worker", hide = true)]
    Worker,
}

/// Options shared by `run` and `forward`; they override the config file.
#[derive(Args, Clone)]
struct Common {
    /// Relay engine: auto (io_uring if allowed, else epoll), splice, copy, epoll or sockmap.
    #[arg(long, value_enum)]
    engine: Option<EngineChoice>,
    /// Worker processes (default: cores, or more if max-connections needs more fds).
    #[arg(long)]
    workers: Option<u32>,
    /// Relayed connections held at most; more clients are refused.
    #[arg(long)]
    max_connections: Option<u32>,
    /// Control socket path for sluicectl.
    #[arg(long, default_value = control::DEFAULT_PATH)]
    control: PathBuf,
    /// Attach the XDP program that drops SYNs of denied clients to this interface (repeatable;
    /// adds to `[admission] xdp_interfaces`). If it cannot attach, the workers still refuse them.
    #[arg(long = "xdp", value_name = "IFACE")]
    xdp: Vec<String>,
    /// Where `sluicectl load` pins the eBPF maps; pinned maps found there are used.
    #[arg(long, value_name = "DIR", default_value = sluice::ebpf::PIN_DIR)]
    bpf_pin_dir: PathBuf,
    /// After binding and loading eBPF, run as this user with only the capabilities still needed
    /// (overrides `user` in the config).
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Metrics and stats page listener, IP:PORT or `off` (default 127.0.0.1:9199, or the
    /// config's `[metrics] listen`).
    #[arg(long, value_name = "ADDR|off")]
    metrics: Option<sluice::config::MetricsListen>,
    /// Allow a non-loopback --metrics address (anyone reaching it sees usage numbers).
    #[arg(long)]
    metrics_public: bool,
    /// Do not record latency/size histograms in the workers (`sluicectl stats` stays empty).
    #[arg(long)]
    no_histograms: bool,
}

impl Common {
    fn options(self) -> Options {
        Options {
            control: Some(self.control),
            xdp: self.xdp,
            pin_dir: Some(self.bpf_pin_dir),
            reload: None,
            preset: None,
        }
    }

    fn apply(&self, c: &mut Config) {
        if let Some(e) = self.engine {
            c.engine = e;
        }
        if let Some(w) = self.workers {
            c.workers = w;
        }
        if let Some(m) = self.max_connections {
            c.max_connections = m;
        }
        if let Some(u) = &self.user {
            c.user = Some(u.clone());
        }
        if let Some(m) = self.metrics {
            c.metrics.listen = m;
        }
        if self.metrics_public {
            c.metrics.public = true;
        }
        if self.no_histograms {
            c.metrics.histograms = false;
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Worker) {
        init_logs();
        return match sluice::worker::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("worker: {e}");
                ExitCode::from(1)
            }
        };
    }
    init_logs();
    let (config, options) = match build(cli.cmd) {
        Ok(Some(x)) => x,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(2);
        }
    };
    match supervisor::run(config, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::from(1)
        }
    }
}

/// The configuration to run, or None when the command was only to print something.
fn build(cmd: Cmd) -> Result<Option<(Config, Options)>, String> {
    let validate = |c: Config, origin: &str| -> Result<Config, String> {
        c.validate()
            .map_err(|(key, msg)| format!("{origin}: `{key}`: {msg}"))?;
        Ok(c)
    };
    match cmd {
        Cmd::Run {
            config,
            preset,
            domain,
            email,
            resolve,
            common,
        } => {
            let mut c = match (&config, preset, &domain) {
                (Some(path), ..) => Config::from_file(path).map_err(|e| e.to_string())?,
                (None, p, Some(d)) => p
                    .unwrap_or_default()
                    .config_for_domain(d, email.as_deref())?,
                (None, p, None) => p.unwrap_or_default().config(),
            };
            for r in &resolve {
                c.apply_resolve(&r.host, r.ip);
            }
            common.apply(&mut c);
            let c = validate(c, "command line")?;
            let preset_name = config.is_none().then(|| {
                clap::ValueEnum::to_possible_value(&preset.unwrap_or_default())
                    .map_or_else(|| "whatsapp".into(), |v| v.get_name().to_string())
            });
            // A reload reads the file again and applies the same command-line overrides.
            let overrides = common.clone();
            let reload = config.map(|path| {
                supervisor::ReloadFrom(std::sync::Arc::new(move || {
                    let mut c = Config::from_file(&path).map_err(|e| e.to_string())?;
                    for r in &resolve {
                        c.apply_resolve(&r.host, r.ip);
                    }
                    overrides.apply(&mut c);
                    validate(c, &path.display().to_string())
                }))
            });
            let mut options = common.options();
            options.reload = reload;
            options.preset = preset_name;
            Ok(Some((c, options)))
        }
        Cmd::Forward {
            listen,
            upstream,
            connect_timeout_ms,
            idle_timeout_ms,
            fin_timeout_ms,
            source_addresses,
            common,
        } => {
            let mut c = Config::forward(listen, upstream);
            c.listeners[0].source_addresses = source_addresses;
            c.timeouts.connect_ms = connect_timeout_ms;
            c.timeouts.idle_ms = idle_timeout_ms;
            c.timeouts.fin_ms = fin_timeout_ms;
            common.apply(&mut c);
            Ok(Some((validate(c, "command line")?, common.options())))
        }
        Cmd::CheckConfig { file, preset } => {
            let c = match (file, preset) {
                (Some(path), _) => Config::from_file(&path).map_err(|e| e.to_string())?,
                (None, Some(p)) => p.config(),
                (None, None) => return Err("check-config needs a FILE or --preset".into()),
            };
            print!("{}", c.to_toml());
            Ok(None)
        }
        Cmd::Worker => unreachable!("handled in main"),
    }
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
