//! The parts of `cargo xtask` other crates use too: installing Debian packages (`setup`) and
//! building the release tarball and the Debian package (`dist`, `deb`). The integration tests
//! (`tests/src/tests/dist.rs`) call these directly, since running cargo from inside
//! `cargo test` would wait on the build directory's lock.

pub mod deb;
pub mod dist;
pub mod setup;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `cmd`, inheriting stdio; an error when it cannot start or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The workspace's top directory.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}
