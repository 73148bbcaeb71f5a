//! `sluicectl share` and `sluicectl doctor`: the operator's subcommands that need no daemon
//! (doctor asks one for its status when it runs). The work is in [`sluice::share`] and
//! [`sluice::doctor`]; this file parses arguments and prints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use sluice::config::preset::Preset;
use sluice::config::{Config, ResolveOverride};
use sluice::{doctor, share};

/// Which configuration: a file, or a preset (default: whatsapp, like `sluice run`).
#[derive(Args)]
pub struct ConfigArgs {
    /// The relay's TOML configuration file.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// A built-in deployment (`whatsapp` when neither this nor --config is given).
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// The preset's `sluice run --domain` (Signal: a certificate from Let's Encrypt for it).
    #[arg(long, value_name = "NAME", conflicts_with = "config")]
    domain: Option<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config, String> {
        match (&self.config, self.preset, &self.domain) {
            (Some(path), ..) => Config::from_file(path).map_err(|e| e.to_string()),
            (None, p, Some(d)) => p.unwrap_or_default().config_for_domain(d, None),
            (None, p, None) => Ok(p.unwrap_or_default().config()),
        }
    }
}

#[derive(Args)]
pub struct ShareArgs {
    #[command(flatten)]
    source: ConfigArgs,
    /// The relay's public DNS name or IP address (default: `public_host` in the config).
    #[arg(long)]
    host: Option<String>,
    /// The chat port users connect to, when a load balancer publishes it under another number.
    #[arg(long)]
    chat_port: Option<u16>,
    /// The media port users connect to, when a load balancer publishes it under another number.
    #[arg(long)]
    media_port: Option<u16>,
    /// Also write the first link's QR code to this PNG file.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// Print the links only, one a line (no QR code).
    #[arg(long)]
    no_qr: bool,
    /// Print JSON: `[{"messenger": ..., "url": ...}]`.
    #[arg(long)]
    json: bool,
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("sluicectl: {msg}");
    ExitCode::from(code)
}

pub fn share(args: ShareArgs) -> ExitCode {
    let config = match args.source.load() {
        Ok(c) => c,
        Err(e) => return fail(2, &e),
    };
    let Some(host) = args.host.as_ref().or(config.public_host.as_ref()) else {
        return fail(
            2,
            "share needs the relay's public address: --host HOST, or public_host in the config",
        );
    };
    let ports = share::PortOverrides {
        chat_port: args.chat_port,
        media_port: args.media_port,
    };
    let links = match share::links(&config, host, ports) {
        Ok(l) => l,
        Err(e) => return fail(2, &e),
    };
    if let Some(path) = &args.png {
        let written = share::qr_png(&links[0].url)
            .and_then(|png| std::fs::write(path, png).map_err(|e| e.to_string()));
        if let Err(e) = written {
            return fail(1, &format!("cannot write {}: {e}", path.display()));
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&links).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    for link in &links {
        println!("{}: {}", link.messenger, link.url);
        if !args.no_qr {
            match share::qr_text(&link.url) {
                Ok(qr) => println!("{qr}"),
                Err(e) => return fail(1, &e),
            }
        }
    }
    if let Some(path) = &args.png {
        eprintln!(
            "QR code of the {} link written to {}",
            links[0].messenger,
            path.display()
        );
    }
    ExitCode::SUCCESS
}

#[derive(Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    source: ConfigArgs,
    /// Point an upstream host name at an address, like `sluice run --resolve` (repeatable).
    #[arg(long, value_name = "HOST=IP")]
    resolve: Vec<ResolveOverride>,
    /// Bound on each upstream DNS lookup and TCP connect, in ms.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Print JSON: `{"passed": bool, "checks": [{"name", "level", "detail", "fix"}]}`.
    #[arg(long)]
    json: bool,
}

pub fn doctor(args: DoctorArgs, control: &Path) -> ExitCode {
    let mut config = match args.source.load() {
        Ok(c) => c,
        Err(e) => return fail(2, &e),
    };
    for r in &args.resolve {
        config.apply_resolve(&r.host, r.ip);
    }
    let opts = doctor::Options {
        config,
        control: control.to_path_buf(),
        timeout: Duration::from_millis(args.timeout_ms.clamp(100, 60_000)),
    };
    let checks = doctor::run(&opts);
    let passed = doctor::passed(&checks);
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "passed": passed, "checks": checks })
        );
    } else {
        print!("{}", doctor::render(&checks));
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
