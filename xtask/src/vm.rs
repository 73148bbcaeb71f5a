//! The Debian 12 VM image of the acceptance suite (`cargo xtask vm`, `tests/tests/vm.rs`).
//!
//! `mmdebstrap` builds a bookworm root with systemd as PID 1, sshd (a key made here), systemd-
//! networkd on DHCP, and two of Debian's own kernels: bookworm's `linux-image-cloud-amd64` (6.1)
//! and bookworm-backports' (6.12). The root becomes an ext4 image (`mkfs.ext4 -d`); the kernels
//! and their initramfs are copied beside it, for QEMU's `-kernel`/`-initrd`. Nothing of Sluice is
//! in the image: the suite installs the .deb into a copy of it at every boot, as an operator does.
//!
//! Built once per recipe into `target/vm/image-HASH/` (about a minute; 3 GiB sparse), where
//! HASH covers [`PACKAGES`], the mirrors and [`RECIPE_VERSION`].

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// Host tools the suite needs besides QEMU ([`qemu`]).
pub const TOOLS: &[&str] = &["mmdebstrap", "e2fsprogs", "openssh-client"];

/// The oldest QEMU whose TCG boots bookworm-backports' 6.12 kernel: under bookworm's own 7.2
/// (single- or multi-threaded TCG, `-cpu max` or `qemu64`, with `mitigations=off` too) it dies
/// within seconds of boot (spurious #DB in `exc_debug_kernel`, double faults, list corruption);
/// under 10.0 it boots in ~30 s. bookworm's 6.1 boots under both.
pub const QEMU_MIN_MAJOR: u32 = 10;

/// QEMU for the VMs (QEMU's TCG runs Debian's stock kernels here; `/dev/kvm` on this machine
/// kind is PVM and does not): installed from bookworm-backports when the host's is older than
/// [`QEMU_MIN_MAJOR`] (the backports source added if missing). Returns its version line.
pub fn qemu() -> Result<String> {
    let version = || -> Option<(u32, String)> {
        let out = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .ok()?;
        let line = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .to_string();
        let major = line
            .split_whitespace()
            .find_map(|w| w.split('.').next()?.parse::<u32>().ok())?;
        Some((major, line))
    };
    if let Some((major, line)) = version()
        && major >= QEMU_MIN_MAJOR
    {
        return Ok(line);
    }
    let os = fs::read_to_string("/etc/os-release").unwrap_or_default();
    if !os.lines().any(|l| l == "VERSION_CODENAME=bookworm") {
        bail!(
            "the VM suite needs QEMU {QEMU_MIN_MAJOR} or later (qemu-system-x86_64 --version); \
             install it from your distribution"
        );
    }
    let list = Path::new("/etc/apt/sources.list.d/sluice-bookworm-backports.list");
    let has_backports = Command::new("sh")
        .args([
            "-c",
            "grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_backports {
        eprintln!(
            "xtask: adding bookworm-backports ({}) for QEMU {QEMU_MIN_MAJOR}",
            list.display()
        );
        fs::write(
            list,
            "deb http://deb.debian.org/debian bookworm-backports main\n",
        )
        .with_context(|| format!("cannot write {} (setup needs root)", list.display()))?;
    }
    eprintln!("xtask: installing qemu-system-x86 from bookworm-backports");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(["-t", "bookworm-backports", "qemu-system-x86"]))
    .context("apt-get install -t bookworm-backports qemu-system-x86 failed")?;
    match version() {
        Some((major, line)) if major >= QEMU_MIN_MAJOR => Ok(line),
        other => bail!(
            "after installing from bookworm-backports, qemu-system-x86_64 is {:?}, not {QEMU_MIN_MAJOR} or later",
            other.map(|o| o.1)
        ),
    }
}

/// What the guest has besides `--variant=apt`: an operator's bare Debian 12 server (adduser and
/// procps are the .deb's own dependencies), sshd for the suite, two kernels.
pub const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "openssh-server",
    "iproute2",
    "procps",
    "adduser",
    "kmod",
    "initramfs-tools",
    "linux-image-cloud-amd64",
    "ca-certificates",
];

/// The mirrors: bookworm and its updates, security and backports (the 6.12 kernel).
const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
    "deb http://deb.debian.org/debian bookworm-backports main",
];

/// Bumped whenever the recipe below changes in a way the hash does not see.
const RECIPE_VERSION: u32 = 1;

/// A built image: the disk, the kernels (`vmlinuz-RELEASE` + `initrd.img-RELEASE`), the ssh key.
pub struct Image {
    pub dir: PathBuf,
    pub kernels: Vec<String>,
}

/// Builds the image unless `target/vm/image-HASH/` holds one already.
pub fn image(root: &Path) -> Result<Image> {
    let mut h = DefaultHasher::new();
    (PACKAGES, MIRRORS, RECIPE_VERSION).hash(&mut h);
    let dir = root.join(format!("target/vm/image-{:016x}", h.finish()));
    let done = dir.join("complete");
    if !done.exists() {
        build(&dir).with_context(|| format!("building the VM image in {}", dir.display()))?;
        fs::write(&done, "")?;
    }
    let mut kernels: Vec<String> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .collect();
    kernels.sort();
    if kernels.len() != 2 {
        bail!(
            "the VM image in {} has kernels {kernels:?}, expected bookworm's and backports'",
            dir.display()
        );
    }
    Ok(Image { dir, kernels })
}

fn build(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    let rootfs = dir.join("root");
    eprintln!("xtask: building the Debian 12 VM image with mmdebstrap (about a minute)");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=apt", "--mode=root", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        // The backports kernel beside bookworm's: the meta package moves to 6.12, the 6.1 image
        // package stays installed.
        .arg(
            "--customize-hook=chroot \"$1\" apt-get install -y -q -t bookworm-backports \
             linux-image-cloud-amd64",
        )
        .arg("bookworm")
        .arg(&rootfs)
        .args(MIRRORS);
    run(&mut cmd).context("mmdebstrap failed (it needs root and deb.debian.org)")?;

    // Log in as root with a key made for this image only; DHCP on QEMU's user network.
    let key = dir.join("key");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "sluice-vm", "-f"])
        .arg(&key))?;
    let ssh = rootfs.join("root/.ssh");
    fs::create_dir_all(&ssh)?;
    fs::copy(dir.join("key.pub"), ssh.join("authorized_keys"))?;
    run(Command::new("chmod").arg("-R").arg("go-rwx").arg(&ssh))?;
    fs::create_dir_all(rootfs.join("etc/systemd/network"))?;
    fs::write(
        rootfs.join("etc/systemd/network/10-dhcp.network"),
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
    )?;
    run(Command::new("chroot").arg(&rootfs).args([
        "systemctl",
        "enable",
        "--quiet",
        "systemd-networkd",
    ]))?;
    fs::write(
        rootfs.join("etc/fstab"),
        "/dev/vda / ext4 rw,relatime 0 1\n",
    )?;
    fs::write(rootfs.join("etc/hostname"), "sluice-vm\n")?;
    fs::write(
        rootfs.join("etc/hosts"),
        "127.0.0.1 localhost\n127.0.1.1 sluice-vm\n",
    )?;

    for entry in fs::read_dir(rootfs.join("boot"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("vmlinuz-") || name.starts_with("initrd.img-") {
            fs::copy(entry.path(), dir.join(&name))?;
        }
    }
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&rootfs)
        .arg(dir.join("disk.img"))
        .arg("3G"))
    .context("mkfs.ext4 -d (e2fsprogs 1.43 or later)")?;
    fs::remove_dir_all(&rootfs)?;
    Ok(())
}

/// The path of the `integration` test binary cargo just built, from `--message-format=json`.
pub fn test_executable(cargo_json: &str, name: &str) -> Option<PathBuf> {
    cargo_json
        .lines()
        .filter(|l| l.contains(&format!("\"name\":\"{name}\"")))
        .filter_map(|l| {
            let rest = &l[l.find("\"executable\":\"")? + 14..];
            Some(PathBuf::from(&rest[..rest.find('"')?]))
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_test_executable() {
        let json = "{\"reason\":\"compiler-artifact\",\"target\":{\"kind\":[\"lib\"],\"name\":\"x\"},\"executable\":null}\n\
            {\"reason\":\"compiler-artifact\",\"target\":{\"kind\":[\"test\"],\"name\":\"integration\",\"test\":true},\"executable\":\"/t/integration-abc\",\"fresh\":true}\n";
        assert_eq!(
            super::test_executable(json, "integration").as_deref(),
            Some(std::path::Path::new("/t/integration-abc"))
        );
        assert_eq!(super::test_executable(json, "vm"), None);
    }
}
