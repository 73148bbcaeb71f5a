//! Idempotent installation of everything the build and the tests need on Debian 12.
//!
//! Each step checks first and does nothing when its tool is already there, so `cargo xtask run`
//! and `cargo xtask test` can call it every time.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run;

/// Debian packages: the eBPF linker's LLVM, and the real peers the tests run against.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "clang",
    "iperf3",
    "haproxy",
    "nginx-light",
    "libnginx-mod-stream",
    "socat",
    "curl",
    "openssl",
    "iproute2",
    "procps",
    // promtool checks /metrics and the alert rules, the prometheus server scrapes a relay and
    // evaluates the dashboard and the rules (monitoring.rs); headless Chromium loads the stats
    // page and draws the dashboard.
    "prometheus",
    "chromium",
    // The SYN flood in tests/src/tests/faults.rs.
    "hping3",
    // Let's Encrypt's test CA and its DNS server: the ACME tests (tests/src/tests/acme.rs).
    "pebble",
    // dist tests: strace traces the relay's system calls against the Docker seccomp profile,
    // systemd-analyze verifies the unit.
    "strace",
    "systemd",
    // The Helm chart's check runs Helm's own lint and template engine from PyPI (below).
    "python3-venv",
];

/// Where [`helm_sdk`] installs `helm-python-sdk`: Helm 4's Go code (lint, template rendering)
/// as a shared library, from PyPI. Helm's binary is in no registry this project uses.
pub const HELM_SDK_DIR: &str = "/opt/sluice-tools/helm-sdk";
const HELM_SDK: &str = "helm-python-sdk==0.2.2";

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn all() -> Result<()> {
    apt(APT_PACKAGES)?;
    helm_sdk()?;
    ebpf_toolchain()
}

/// A virtualenv at [`HELM_SDK_DIR`] with `helm-python-sdk` (tests/src/tests/dist.rs lints and
/// renders the Helm chart with it).
pub fn helm_sdk() -> Result<()> {
    let python = format!("{HELM_SDK_DIR}/bin/python3");
    let installed = Command::new(&python)
        .args(["-c", "import helm_python"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing {HELM_SDK} into {HELM_SDK_DIR}");
    run(Command::new("python3").args(["-m", "venv", HELM_SDK_DIR]))?;
    run(Command::new(format!("{HELM_SDK_DIR}/bin/pip")).args(["install", "-q", HELM_SDK]))
        .context("pip install helm-python-sdk failed")
}

/// The eBPF build chain: LLVM 22, nightly with rust-src, bpf-linker built against LLVM 22.
pub fn ebpf_toolchain() -> Result<()> {
    apt(&["llvm-22-dev", "clang"])?;
    nightly_rust_src()?;
    bpf_linker()
}

/// Installs whichever of `packages` is missing (apt-get); nothing when all are there.
pub fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
    .context("apt-get install failed (setup needs root)")
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn nightly_rust_src() -> Result<()> {
    let has_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_nightly {
        eprintln!("xtask: installing the nightly toolchain (minimal)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup is needed")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output()
        && out.status.success()
    {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    let status = Command::new("cargo")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .status()?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}
