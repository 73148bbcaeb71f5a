//! Finds the eBPF object that `cargo xtask build-ebpf` built and hands its path to the crate
//! (`SLUICE_EBPF_OBJECT`), which embeds it with `include_bytes_aligned!`.
//!
//! The object is built by a separate nightly cargo invocation (bpfel-unknown-none, build-std), not
//! from here: a build script that runs cargo would lock the target directory it runs in and hide
//! the eBPF compiler's output. So this script only checks, and says what to run when it is missing
//! (then the crate embeds an empty object, see below).

use std::env;
use std::path::PathBuf;

/// Overrides where the object is looked for (an absolute path).
const OVERRIDE: &str = "SLUICE_EBPF_OBJECT";

fn main() {
    println!("cargo:rerun-if-env-changed={OVERRIDE}");
    let object = match env::var_os(OVERRIDE) {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest_dir =
                PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest_dir.join("../target/ebpf/bpfel-unknown-none/release/sluice-ebpf")
        }
    };
    if !object.is_file() {
        // As aya-build does under `AYA_BUILD_SKIP`: an empty object, so `cargo check`, clippy and
        // rust-analyzer work on a fresh clone. Such a binary says at load time that it has no
        // eBPF programs (`EbpfError::NotBuilt`: the sockmap engine splices, XDP and `sluicectl
        // load` refuse), and the unit test `ebpf::tests::the_object_is_built_in` fails on it, so
        // `cargo xtask test` and `cargo xtask dist` (which build the object first) never ship one.
        println!(
            "cargo:warning=the eBPF object {} is missing (run `cargo xtask build-ebpf`): this \
             build has no eBPF programs",
            object.display()
        );
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("no-ebpf");
        std::fs::write(&out, b"").expect("OUT_DIR is writable");
        println!("cargo:rerun-if-changed={}", object.display());
        println!("cargo:rustc-env={OVERRIDE}={}", out.display());
        return;
    }
    let object = object.canonicalize().expect("the object exists");
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env={OVERRIDE}={}", object.display());
}
