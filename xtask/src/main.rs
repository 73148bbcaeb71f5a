//! `cargo xtask`: every chore of the project in Rust, so a fresh Debian 12 machine needs nothing
//! done by hand. Each subcommand installs what it needs first (idempotently) and says what it does.
//!
//! - `setup`      apt packages, nightly `rust-src`, `bpf-linker` (skips what is already there)
//! - `build-ebpf` builds `ebpf/programs` for `bpfel-unknown-none`
//! - `run`        builds everything and runs `sluice run` (WhatsApp preset unless told otherwise)
//! - `test`       builds and runs every test: unit, integration, eBPF, house rules
//! - `bench`      Sluice beside HAProxy, nginx, socat and a direct connection (docs/BENCHMARKS.md)
//! - `fuzz`       the libFuzzer targets of `fuzz/` (cargo-fuzz, nightly), each for `--time` seconds
//! - `vm`         the acceptance suite in Debian 12 VMs on Debian's own kernels (QEMU, systemd,
//!   the .deb installed as an operator does; `tests/tests/vm.rs`); also part of `test`
//! - `dist`       release binaries, the systemd unit, Docker and Helm files, docs: a tarball, and
//!   a Debian package (`sluice_VERSION_ARCH.deb`, checked with lintian)

mod bench;
mod fuzz;
mod testrun;
#[cfg(test)]
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xtask::{deb, dist, setup, vm};
pub use xtask::{project_root, run};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Sluice's chores: setup, build-ebpf, run, test, bench, fuzz, dist"
)]
struct Flags {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install apt packages, the nightly rust-src component and bpf-linker (idempotent).
    Setup,
    /// Build the eBPF programs (ebpf/programs) for bpfel-unknown-none.
    BuildEbpf,
    /// Build everything and run the relay; arguments after `--` go to `sluice run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run every test (unit, integration, eBPF, tidy); extra arguments go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install the peers, build in release and benchmark Sluice against HAProxy, nginx, socat.
    Bench(bench::BenchFlags),
    /// Run the fuzz targets (cargo-fuzz on nightly; installed when missing), each for --time s.
    Fuzz(fuzz::FuzzFlags),
    /// Build the .deb and a Debian 12 VM image, then run the acceptance suite in QEMU on
    /// bookworm's 6.1 and backports' 6.12 kernels (tests/tests/vm.rs); extra arguments go to it.
    Vm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build release binaries and pack them with the systemd unit, an example config, the Docker
    /// and Helm files and the docs into target/dist/sluice-VERSION-ARCH-linux.tar.gz, and build
    /// the Debian package target/dist/sluice_VERSION_ARCH.deb (checked with lintian).
    Dist {
        /// Directory the tarball and the .deb are written to.
        #[arg(long, default_value = "target/dist")]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let flags = Flags::parse();
    let root = project_root();
    std::env::set_current_dir(&root)?;
    match flags.cmd {
        Cmd::Setup => setup::all(),
        Cmd::BuildEbpf => {
            setup::ebpf_toolchain()?;
            build_ebpf(&root)
        }
        Cmd::Run { args } => {
            setup::ebpf_toolchain()?;
            build_ebpf(&root)?;
            run(cargo().args(["build", "--release", "--package", "sluice", "--bins"]))?;
            let sluice = root.join("target/release/sluice");
            let mut cmd = Command::new(sluice);
            cmd.arg("run").args(&args);
            exec(cmd)
        }
        Cmd::Test { args } => {
            setup::all()?;
            build_ebpf(&root)?;
            // Release: the suite moves gigabytes through the relay; debug builds would crawl.
            run(cargo().args(["build", "--release", "--package", "sluice", "--bins"]))?;
            let failures = testrun::run(
                cargo()
                    .args(["test", "--release", "--workspace", "--no-fail-fast"])
                    .args(&args)
                    .env("SLUICE_BIN_DIR", root.join("target/release")),
                &root,
            )?;
            // The VM suite after the host's (Debian 12 with its 6.1 and backports 6.12
            // kernels; `cargo xtask vm` runs it alone). A failure of either is named at the end.
            let vm_failures = vm_suite(&root, &[]);
            // CI (which sets `CI`) also fuzzes every target for a minute, after the tests
            // either way, so one failure does not hide the other.
            let fuzzing = if std::env::var_os("CI").is_some() {
                fuzz::fuzz(
                    &root,
                    &fuzz::FuzzFlags {
                        time: 60,
                        target: None,
                        runs: None,
                        sanitizer: "none".into(),
                    },
                )
            } else {
                Ok(())
            };
            // The failed tests are named last, after the fuzzers' report, where a log's tail
            // shows them.
            let vm_failed = match vm_failures {
                Ok(None) => false,
                Ok(Some(f)) => {
                    eprintln!("xtask: the VM suite: {}", f.summary());
                    true
                }
                Err(e) => {
                    eprintln!("xtask: the VM suite could not run: {e:#}");
                    true
                }
            };
            match failures {
                Some(f) => {
                    if let Err(e) = fuzzing {
                        eprintln!("xtask: {e:#}");
                    }
                    // Printed, not returned: an error's backtrace would push it out of the tail.
                    eprintln!("xtask: {}", f.summary());
                    std::process::exit(1)
                }
                None if vm_failed => {
                    if let Err(e) = fuzzing {
                        eprintln!("xtask: {e:#}");
                    }
                    eprintln!("xtask: the host's tests passed; the VM suite failed (above)");
                    std::process::exit(1)
                }
                None => fuzzing,
            }
        }
        Cmd::Vm { args } => {
            setup::ebpf_toolchain()?;
            build_ebpf(&root)?;
            run(cargo().args(["build", "--release", "--package", "sluice", "--bins"]))?;
            if let Some(f) = vm_suite(&root, &args)? {
                eprintln!("xtask: the VM suite: {}", f.summary());
                std::process::exit(1)
            }
            Ok(())
        }
        Cmd::Bench(flags) => bench::bench(flags),
        Cmd::Fuzz(flags) => {
            // The relay crate embeds the eBPF object, so it must exist before the targets build.
            setup::ebpf_toolchain()?;
            build_ebpf(&root)?;
            fuzz::fuzz(&root, &flags)
        }
        Cmd::Dist { out } => {
            setup::ebpf_toolchain()?;
            setup::apt(deb::TOOLS)?;
            build_ebpf(&root)?;
            run(cargo().args(["build", "--release", "--package", "sluice", "--bins"]))?;
            let bins = root.join("target/release");
            let out = root.join(out);
            let tarball = dist::package(&root, &bins, &out)?;
            let package = deb::build(&root, &bins, &out)?;
            let report = deb::lintian(&package)?;
            eprint!("xtask: lintian {}:\n{report}", package.display());
            let errors = deb::lintian_errors(&report);
            if !errors.is_empty() {
                anyhow::bail!("lintian found {} error(s) in the package", errors.len());
            }
            println!("{}", tarball.display());
            println!("{}", package.display());
            Ok(())
        }
    }
}

/// The VM acceptance suite (`tests/tests/vm.rs`) on the release binaries already built: the
/// image, the .deb, the `integration` binary the guest runs its engine checks with.
fn vm_suite(root: &Path, args: &[String]) -> Result<Option<testrun::Failures>> {
    setup::apt(vm::TOOLS)?;
    setup::apt(deb::TOOLS)?;
    let qemu = vm::qemu()?;
    let image = vm::image(root)?;
    let bins = root.join("target/release");
    let work = root.join("target/vm");
    let package = deb::build(root, &bins, &work.join("deb"))?;
    let cargo_test = |target: &str| {
        let mut cmd = cargo();
        cmd.args(["test", "--release", "-p", "sluice-tests", "--test", target]);
        cmd
    };
    let out = cargo_test("integration")
        .args(["--no-run", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot build the integration tests for the guest")?;
    if !out.status.success() {
        anyhow::bail!("building the integration tests for the guest failed");
    }
    let integration = vm::test_executable(&String::from_utf8_lossy(&out.stdout), "integration")
        .context("cargo named no `integration` test executable")?;
    let guest = work.join("guest");
    std::fs::create_dir_all(&guest)?;
    std::fs::copy(&integration, guest.join("integration"))?;
    std::fs::copy(bins.join("holder"), guest.join("holder"))?;
    eprintln!(
        "xtask: the VM suite on {} ({qemu}, TCG: minutes per kernel)",
        image.kernels.join(", ")
    );
    for old in std::fs::read_dir(&guest)?.flatten() {
        if old.file_name().to_string_lossy().starts_with("report-") {
            std::fs::remove_file(old.path())?;
        }
    }
    let failures = testrun::run(
        cargo_test("vm")
            .args(["--", "--test-threads=1"])
            .args(args)
            .env("SLUICE_VM_DIR", &image.dir)
            .env("SLUICE_VM_KERNELS", image.kernels.join(","))
            .env("SLUICE_VM_DEB", &package)
            .env("SLUICE_VM_GUEST", &guest),
        root,
    )?;
    // Each kernel's table of checks, with the seconds each took, whether it passed or not.
    let mut reports: Vec<_> = std::fs::read_dir(&guest)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("report-"))
        .map(|e| e.path())
        .collect();
    reports.sort();
    for report in reports {
        eprint!("{}", std::fs::read_to_string(report)?);
    }
    Ok(failures)
}

/// Builds the eBPF object; the relay embeds it from `target/bpfel-unknown-none/release/`.
pub fn build_ebpf(root: &Path) -> Result<()> {
    eprintln!("xtask: building eBPF programs (nightly, bpfel-unknown-none)");
    let dir = root.join("ebpf/programs");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["+nightly", "build", "--release"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"));
    run(&mut cmd)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn exec(mut cmd: Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(err).context("cannot exec sluice")
}
