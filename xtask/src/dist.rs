//! `cargo xtask dist`: release binaries and everything an operator installs, in one tarball.
//!
//! Layout of `target/dist/sluice-VERSION-ARCH-linux.tar.gz` (one top directory of that name):
//! `bin/sluice`, `bin/sluicectl`, `sluice.toml` (the WhatsApp preset, commented),
//! `systemd/sluice.service`, `docker/Dockerfile`, `docker/seccomp.json`, `helm/sluice/...`,
//! `README.md`, `ARCHITECTURE.md`, `docs/*.md`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Files copied from the repository, as (source, path inside the package).
const FILES: &[(&str, &str)] = &[
    ("dist/sluice.toml", "sluice.toml"),
    ("dist/systemd/sluice.service", "systemd/sluice.service"),
    ("dist/docker/Dockerfile", "docker/Dockerfile"),
    ("dist/docker/seccomp.json", "docker/seccomp.json"),
    ("README.md", "README.md"),
    ("ARCHITECTURE.md", "ARCHITECTURE.md"),
];

/// Directories copied whole (their `.md`/`.yaml` files and subdirectories).
const DIRS: &[(&str, &str)] = &[("dist/helm/sluice", "helm/sluice")];

/// The binaries, from the release target directory.
pub const BINARIES: &[&str] = &["sluice", "sluicectl"];

/// The package's name: `sluice-VERSION-ARCH-linux`.
pub fn package_name() -> String {
    format!(
        "sluice-{}-{}-linux",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    )
}

/// Lays the package out under `out/NAME/` from `root` (the repository) and `bin_dir` (where
/// the release binaries are), then packs `out/NAME.tar.gz`. Returns the tarball's path.
pub fn package(root: &Path, bin_dir: &Path, out: &Path) -> Result<PathBuf> {
    let name = package_name();
    let stage = out.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("cannot clear {}", stage.display()))?;
    }
    for bin in BINARIES {
        let from = bin_dir.join(bin);
        if !from.is_file() {
            bail!(
                "{} is missing: build with `cargo build --release -p sluice --bins`",
                from.display()
            );
        }
        copy(&from, &stage.join("bin").join(bin))?;
    }
    for (from, to) in FILES {
        copy(&root.join(from), &stage.join(to))?;
    }
    for (from, to) in DIRS {
        copy_dir(&root.join(from), &stage.join(to))?;
    }
    for entry in fs::read_dir(root.join("docs")).context("cannot read docs/")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            let file = path.file_name().expect("a file in docs/");
            copy(&path, &stage.join("docs").join(file))?;
        }
    }
    let tarball = out.join(format!("{name}.tar.gz"));
    crate::run(
        Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(out)
            .arg("--owner=0")
            .arg("--group=0")
            .arg(&name),
    )?;
    Ok(tarball)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let path = entry?.path();
        let target = to.join(path.file_name().expect("a directory entry has a name"));
        if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            copy(&path, &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files every package must hold, relative to its top directory.
    const EXPECTED: &[&str] = &[
        "bin/sluice",
        "bin/sluicectl",
        "sluice.toml",
        "systemd/sluice.service",
        "docker/Dockerfile",
        "docker/seccomp.json",
        "helm/sluice/Chart.yaml",
        "helm/sluice/values.yaml",
        "helm/sluice/templates/deployment.yaml",
        "helm/sluice/templates/service.yaml",
        "helm/sluice/templates/hpa.yaml",
        "helm/sluice/templates/configmap.yaml",
        "README.md",
        "docs/OPERATIONS.md",
        "docs/PRIVACY.md",
    ];

    #[test]
    fn the_tarball_holds_binaries_unit_config_docker_helm_and_docs() {
        let root = crate::project_root();
        let tmp = std::env::temp_dir().join(format!("sluice-xtask-dist-{}", std::process::id()));
        let bins = tmp.join("bins");
        fs::create_dir_all(&bins).unwrap();
        for b in BINARIES {
            fs::write(bins.join(b), format!("fake {b}")).unwrap();
        }
        let out = tmp.join("out");
        let tarball = package(&root, &bins, &out).unwrap();
        let listing = Command::new("tar")
            .arg("-tzf")
            .arg(&tarball)
            .output()
            .unwrap();
        assert!(listing.status.success());
        let listing = String::from_utf8(listing.stdout).unwrap();
        let name = package_name();
        for want in EXPECTED {
            let path = format!("{name}/{want}");
            assert!(
                listing.lines().any(|l| l == path),
                "{path} missing from the tarball:\n{listing}"
            );
        }
        // What was packed is what the repository holds.
        let packed = fs::read(out.join(&name).join("systemd/sluice.service")).unwrap();
        assert_eq!(
            packed,
            fs::read(root.join("dist/systemd/sluice.service")).unwrap()
        );
        // Without the binaries, packaging refuses instead of shipping a package without them.
        fs::remove_file(bins.join("sluicectl")).unwrap();
        let err = package(&root, &bins, &out).unwrap_err().to_string();
        assert!(err.contains("sluicectl"), "{err}");
        fs::remove_dir_all(&tmp).unwrap();
    }
}
