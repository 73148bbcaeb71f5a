//! `cargo xtask bench`: installs the peers it compares against (HAProxy, nginx with the stream
//! module, socat, iperf3; idempotent, checked with `dpkg-query`), builds the relay and the
//! benchmark binaries in release, then runs `sluice-bench` (benches/src/bin/sluice-bench.rs),
//! which starts every candidate on loopback, drives the load generators and writes the report.
//!
//! The orchestration lives in the `sluice-benches` crate rather than here because it needs
//! serde, hdrhistogram and plotters, which this crate does not depend on.

use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;

use crate::{cargo, project_root, run};

/// The programs the benchmark runs next to Sluice.
const PEER_PACKAGES: &[&str] = &[
    "haproxy",
    "nginx-light",
    "libnginx-mod-stream",
    "socat",
    "iperf3",
];

#[derive(Args)]
pub struct BenchFlags {
    /// Short run: under 3 minutes, 10 000 idle connections.
    #[arg(long)]
    quick: bool,
    /// Write docs/BENCHMARKS.md and docs/bench/*.svg too.
    #[arg(long)]
    save: bool,
    /// Only these workloads: bulk, rr, connrate, idle, scale, tls-flood (comma-separated; scale
    /// — 100 000 idle connections — and tls-flood — one host's TLS handshake flood against
    /// Sluice's WhatsApp TLS port and nginx — run only when named).
    #[arg(long)]
    only: Option<String>,
    /// Only these candidates: direct, sluice-splice, sluice-copy, sluice-epoll, sluice-sockmap,
    /// haproxy, nginx, socat, and (only when named) sluice-splice-nohist (histograms off) and
    /// baseline-{splice,copy,epoll,sockmap} (the `sluice` in $SLUICE_BENCH_BASELINE: another
    /// build, to measure a change against the code before it in one run)
    /// (comma-separated). For tls-flood: sluice-tls, sluice-tls-nolimit, sluice-tls-rsa4096,
    /// nginx-tls-rsa4096, nginx-tls-ecdsa.
    #[arg(long)]
    candidates: Option<String>,
}

pub fn bench(flags: BenchFlags) -> Result<()> {
    let root = project_root();
    install_peers()?;
    crate::setup::ebpf_toolchain()?;
    crate::build_ebpf(&root)?;
    eprintln!("xtask: building sluice and the benchmark binaries (release)");
    run(cargo().args(["build", "--release", "--package", "sluice", "--bins"]))?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "sluice-benches",
        "--bins",
    ]))?;
    let bin_dir = root.join("target/release");
    let mut cmd = Command::new(bin_dir.join("sluice-bench"));
    cmd.arg("--root").arg(&root).arg("--bin-dir").arg(&bin_dir);
    if flags.quick {
        cmd.arg("--quick");
    }
    if flags.save {
        cmd.arg("--save");
    }
    if let Some(only) = &flags.only {
        cmd.args(["--only", only]);
    }
    if let Some(c) = &flags.candidates {
        cmd.args(["--candidates", c]);
    }
    run(&mut cmd).context("the benchmark run failed")
}

/// apt-get installs whichever peer package is missing; nothing when all are there.
fn install_peers() -> Result<()> {
    crate::setup::apt(PEER_PACKAGES)
}
