//! `cargo xtask dist`'s Debian package: `target/dist/sluice_VERSION-1_ARCH.deb`, built with
//! `dpkg-deb --build --root-owner-group` from a staging tree this module writes (debhelper is
//! not used; the maintainer scripts are written here in the style of its autoscripts).
//!
//! What it installs:
//! - `/usr/bin/sluice`, `/usr/bin/sluicectl` (the release binaries, stripped; the eBPF object
//!   is embedded, so the server needs no nightly, LLVM or bpf-linker);
//! - `/usr/lib/systemd/system/sluice.service`, made from `dist/systemd/sluice.service` by
//!   [`packaged_unit`] (ExecStart points to `/usr/bin/sluice`), so that file stays the one
//!   source of the unit;
//! - `/usr/lib/sysusers.d/sluice.conf` (the system user `sluice`, created by the postinst);
//! - `/etc/sluice/sluice.toml` (from `dist/sluice.toml`), a conffile;
//! - `/usr/share/doc/sluice/` (DEP-5 copyright, changelog.Debian.gz, README and the operator
//!   and privacy guides) and man pages generated from the binaries' `--help`.
//!
//! The postinst creates the user, enables the service and starts it where systemd runs (like
//! Debian's services); prerm stops it on removal; postrm on purge removes `/etc/sluice` and
//! `/run/sluice` and keeps the user (Debian policy).

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::dist::BINARIES;

/// Debian packages `cargo xtask dist` needs for the .deb: dpkg-deb and dpkg-shlibdeps
/// (dpkg-dev), and lintian, which checks the package it built.
pub const TOOLS: &[&str] = &["dpkg-dev", "lintian"];

/// The Debian revision of every package built from this repository.
pub const REVISION: &str = "1";

/// The package's Maintainer field.
pub const MAINTAINER: &str = "Sluice developers <sluice@example.invalid>";

/// Where the unit file says the daemon is (the tarball's layout), and where the package puts it.
const UNIT_BIN_FROM: &str = "/usr/local/bin/sluice";
const UNIT_BIN_TO: &str = "/usr/bin/sluice";

/// The config file, a conffile.
pub const CONFFILE: &str = "/etc/sluice/sluice.toml";

/// Docs from the repository installed under /usr/share/doc/sluice, when they exist.
const DOCS: &[&str] = &["README.md", "docs/OPERATIONS.md", "docs/PRIVACY.md"];

/// The version of the `sluice` crate (relay/Cargo.toml), the upstream version of the package.
pub fn upstream_version(root: &Path) -> Result<String> {
    let manifest = fs::read_to_string(root.join("relay/Cargo.toml"))
        .context("cannot read relay/Cargo.toml")?;
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package
            && let Some(v) = line.strip_prefix("version")
            && let Some(v) = v.trim_start().strip_prefix('=')
        {
            return Ok(v.trim().trim_matches('"').to_string());
        }
    }
    bail!("relay/Cargo.toml has no [package] version")
}

/// The Debian version: upstream version and revision.
pub fn version(root: &Path) -> Result<String> {
    Ok(format!("{}-{REVISION}", upstream_version(root)?))
}

/// `dpkg --print-architecture`.
pub fn architecture() -> Result<String> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("cannot run dpkg --print-architecture")?;
    if !out.status.success() {
        bail!("dpkg --print-architecture failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The packaged unit: `dist/systemd/sluice.service` with the daemon at /usr/bin/sluice. Fails
/// when the unit's ExecStart no longer names /usr/local/bin/sluice, so a change there cannot
/// ship a unit pointing to a binary the package does not install.
pub fn packaged_unit(text: &str) -> Result<String> {
    let exec = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("ExecStart="))
        .context("the unit has no ExecStart")?;
    if !exec.starts_with(&format!("ExecStart={UNIT_BIN_FROM} ")) {
        bail!("the unit's ExecStart does not start {UNIT_BIN_FROM}: {exec}");
    }
    let mut out = String::from(
        "# Installed by the sluice Debian package: dist/systemd/sluice.service with the binaries\n\
         # in /usr/bin. Override settings with `systemctl edit sluice`, not by editing this file.\n",
    );
    out.push_str(&text.replace(UNIT_BIN_FROM, UNIT_BIN_TO));
    Ok(out)
}

/// `/usr/lib/sysusers.d/sluice.conf`.
pub const SYSUSERS: &str = "\
# The system user Sluice's daemon becomes after binding its ports and loading eBPF
# (`sluice run --user sluice`); members of its group may use the control socket.
u sluice - \"Sluice relay\" - -
";

/// The maintainer scripts, in the style of debhelper's autoscripts (`dh_installsystemd`,
/// `dh_installsysusers`), as (name, text).
pub const SCRIPTS: &[(&str, &str)] =
    &[("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)];

const POSTINST: &str = r#"#!/bin/sh
set -e

if [ "$1" = "configure" ]; then
	# The system user the daemon drops to (sluice run --user sluice), from sysusers.d where
	# systemd-sysusers exists, else with adduser (the same user: system, own group, no home).
	if command -v systemd-sysusers >/dev/null 2>&1; then
		systemd-sysusers sluice.conf
	else
		adduser --system --group --quiet --no-create-home --home /nonexistent \
			--gecos "Sluice relay" sluice
	fi
fi

# Like dh_installsystemd: enable on first installation, keep the admin's choice on upgrades.
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	# This will only remove masks created by d-s-h on package removal.
	deb-systemd-helper unmask 'sluice.service' >/dev/null || true

	# was-enabled defaults to true, so new installations run enable.
	if deb-systemd-helper --quiet was-enabled 'sluice.service'; then
		# Enables the unit on first installation, creates new
		# symlinks on upgrades if the unit file has changed.
		deb-systemd-helper enable 'sluice.service' >/dev/null || true
	else
		# Update the statefile to add new symlinks (if any), which need to be
		# cleaned up on purge. Also remove old symlinks.
		deb-systemd-helper update-state 'sluice.service' >/dev/null || true
	fi
fi

# Start on installation, restart on upgrade; only where systemd runs (not in a chroot).
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			_dh_action=restart
		else
			_dh_action=start
		fi
		deb-systemd-invoke $_dh_action 'sluice.service' >/dev/null || true
	fi
fi

exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e

# Stop the relay before its files go (upgrades restart it in the postinst instead).
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	deb-systemd-invoke stop 'sluice.service' >/dev/null || true
fi

exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e

if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	systemctl --system daemon-reload >/dev/null || true
fi

if [ "$1" = "remove" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper mask 'sluice.service' >/dev/null || true
	fi
fi

if [ "$1" = "purge" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper purge 'sluice.service' >/dev/null || true
		deb-systemd-helper unmask 'sluice.service' >/dev/null || true
	fi
	# dpkg purges the conffile; the directory goes too, with what the operator put there.
	rm -rf /etc/sluice
	# The control socket's directory (systemd removes it when the service stops; a daemon
	# started by hand may leave it). Sluice keeps no other state on disk.
	rm -rf /run/sluice
	# The user `sluice` stays: files it owns may remain, and a new user must not get its id.
fi

exit 0
"#;

/// The package's description: synopsis and long description.
const DESCRIPTION: &str = "\
TCP relay for WhatsApp and Signal users in internet shutdowns
 Sluice is a relay that people cut off by an internet shutdown reach
 WhatsApp or Signal through. The messenger keeps its end-to-end
 encryption: Sluice only moves bytes, and never writes a user's address
 to a log, a metric or a file.
 .
 It runs the WhatsApp proxy preset (HAProxy's ports, PROXY headers and
 timeouts) or the Signal TLS proxy preset, relays with io_uring in worker
 processes, falls back to epoll where io_uring is refused, and can move
 bytes in the kernel with an eBPF sockmap fast path. It answers probes
 with a decoy web page, keeps allow and deny lists that change live, and
 serves a stats page and Prometheus metrics on localhost.
 .
 This package holds the daemon (sluice), its control program (sluicectl:
 status, live lists, share links and QR codes, host checks), a hardened
 systemd unit and the WhatsApp preset as /etc/sluice/sluice.toml.";

/// The DEP-5 copyright file; `year` is the build's.
pub fn copyright(year: &str) -> String {
    format!(
        "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: sluice
Comment: The binaries also contain, statically linked, the Rust crates named in the
 source's Cargo.lock, each under its own license.

Files: *
Copyright: {year} The Sluice developers
License: MIT or Apache-2.0

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the \"Software\"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 THE SOFTWARE.

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the \"License\");
 you may not use this file except in compliance with the License.
 You may obtain a copy of the License at
 .
 https://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software
 distributed under the License is distributed on an \"AS IS\" BASIS,
 WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
 See the License for the specific language governing permissions and
 limitations under the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0
 can be found in \"/usr/share/common-licenses/Apache-2.0\".
"
    )
}

/// changelog.Debian: one entry for this build. `date` is RFC 2822 (`date -R`).
pub fn changelog(version: &str, commit: &str, date: &str) -> String {
    format!(
        "sluice ({version}) unstable; urgency=medium\n\n  \
         * Built by `cargo xtask dist` from the sluice repository, commit {commit}.\n\n \
         -- {MAINTAINER}  {date}\n"
    )
}

/// The control file. `depends` from dpkg-shlibdeps; `installed_kib` as dpkg-gencontrol counts.
pub fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: sluice\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\nDepends: {depends}\nSection: net\nPriority: optional\n\
         Description: {DESCRIPTION}\n"
    )
}

/// Escapes one line of text for roff, inside `.nf`.
fn roff_line(line: &str) -> String {
    let mut s = line.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        s.insert_str(0, "\\&");
    }
    s
}

/// A man page (section 1) from a program's `--help` and its subcommands' (name, `--help`).
pub fn man_page(
    name: &str,
    version: &str,
    date: &str,
    help: &str,
    subs: &[(String, String)],
) -> String {
    let summary = help
        .lines()
        .next()
        .unwrap_or(name)
        .trim()
        .trim_end_matches('.');
    let mut out = String::new();
    let _ = writeln!(
        out,
        ".TH {} 1 \"{date}\" \"sluice {version}\" \"User Commands\"",
        name.to_uppercase()
    );
    let _ = writeln!(out, ".SH NAME\n{name} \\- {}", roff_line(summary));
    let _ = writeln!(out, ".SH SYNOPSIS\n.B {name}\n.I COMMAND\n.RI [ OPTIONS ]");
    let _ = writeln!(
        out,
        ".SH DESCRIPTION\nThis page is generated from the program's \\fB\\-\\-help\\fR output."
    );
    let block = |out: &mut String, text: &str| {
        out.push_str(".PP\n.nf\n");
        for line in text.trim_end().lines() {
            out.push_str(&roff_line(line));
            out.push('\n');
        }
        out.push_str(".fi\n");
    };
    block(&mut out, help);
    if !subs.is_empty() {
        out.push_str(".SH COMMANDS\n");
        for (sub, text) in subs {
            let _ = writeln!(out, ".SS \"{name} {}\"", roff_line(sub));
            block(&mut out, text);
        }
    }
    let _ = writeln!(
        out,
        ".SH FILES\n.TP\n.I {CONFFILE}\nThe configuration the systemd unit runs with.\n\
         .TP\n.I /run/sluice/control.sock\nThe running daemon's control socket (sluicectl)."
    );
    let other = if name == "sluice" {
        "sluicectl"
    } else {
        "sluice"
    };
    let _ = writeln!(
        out,
        ".SH \"SEE ALSO\"\n.BR {other} (1),\n.BR systemctl (1);\n\
         /usr/share/doc/sluice/OPERATIONS.md and PRIVACY.md."
    );
    out
}

/// The subcommands a clap `--help` lists under `Commands:` (without `help`).
pub fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Runs `bin args` and returns its stdout (it must succeed).
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn write(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `gzip -9n` in place (no name or time stamp: the same input gives the same bytes).
fn gzip(path: &Path) -> Result<()> {
    crate::run(Command::new("gzip").arg("-9nf").arg(path))
}

/// Every file and directory under `dir`, sorted, relative to `dir`.
fn walk(dir: &Path, rel: &Path, out: &mut Vec<(PathBuf, fs::Metadata)>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let meta = fs::symlink_metadata(entry.path())?;
        let rel = rel.join(entry.file_name());
        out.push((rel.clone(), meta.clone()));
        if meta.is_dir() {
            walk(&entry.path(), &rel, out)?;
        }
    }
    Ok(())
}

/// The commit the package is built from and its time (Unix seconds): `SOURCE_DATE_EPOCH` when
/// set, else HEAD's commit time, so rebuilding the same commit gives the same changelog.
fn source_commit_and_time(root: &Path) -> (String, i64) {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let time = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| git(&["log", "-1", "--format=%ct"]))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
    (commit, time)
}

fn date(time: i64, format: &str) -> Result<String> {
    output(
        Command::new("date")
            .env("LC_ALL", "C")
            .arg("-u")
            .arg("-d")
            .arg(format!("@{time}"))
            .arg(format!("+{format}")),
    )
    .map(|s| s.trim().to_string())
}

/// Builds `out/sluice_VERSION_ARCH.deb` from `root` (the repository) and the release binaries
/// in `bin_dir`; the staging tree is `out/deb/`. Returns the package's path.
pub fn build(root: &Path, bin_dir: &Path, out: &Path) -> Result<PathBuf> {
    let version = version(root)?;
    let upstream = upstream_version(root)?;
    let arch = architecture()?;
    let (commit, time) = source_commit_and_time(root);
    let work = out.join("deb");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    // dpkg-shlibdeps wants the package's tree at debian/PACKAGE beside a debian/control.
    let pkg = work.join("debian/sluice");
    write(
        &work.join("debian/control"),
        "Source: sluice\n\nPackage: sluice\nArchitecture: any\n",
        0o644,
    )?;

    // Binaries, stripped like dh_strip does (the release profile keeps debug info).
    for bin in BINARIES {
        let from = bin_dir.join(bin);
        if !from.is_file() {
            bail!(
                "{} is missing: build with `cargo build --release -p sluice --bins`",
                from.display()
            );
        }
        let to = pkg.join("usr/bin").join(bin);
        fs::create_dir_all(to.parent().expect("usr/bin"))?;
        fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755))?;
        crate::run(
            Command::new("strip")
                .args(["--remove-section=.comment", "--remove-section=.note"])
                .arg(&to),
        )?;
    }

    let unit = fs::read_to_string(root.join("dist/systemd/sluice.service"))
        .context("cannot read dist/systemd/sluice.service")?;
    write(
        &pkg.join("usr/lib/systemd/system/sluice.service"),
        packaged_unit(&unit)?,
        0o644,
    )?;
    write(&pkg.join("usr/lib/sysusers.d/sluice.conf"), SYSUSERS, 0o644)?;
    write(
        &pkg.join(CONFFILE.trim_start_matches('/')),
        fs::read(root.join("dist/sluice.toml")).context("cannot read dist/sluice.toml")?,
        0o644,
    )?;

    let doc = pkg.join("usr/share/doc/sluice");
    let year = date(time, "%Y")?;
    write(&doc.join("copyright"), copyright(&year), 0o644)?;
    write(
        &doc.join("changelog.Debian"),
        changelog(
            &version,
            &commit,
            &date(time, "%a, %d %b %Y %H:%M:%S +0000")?,
        ),
        0o644,
    )?;
    gzip(&doc.join("changelog.Debian"))?;
    for file in DOCS {
        let from = root.join(file);
        if from.is_file() {
            let name = from.file_name().expect("a file name");
            write(&doc.join(name), fs::read(&from)?, 0o644)?;
        }
    }

    // Man pages from the binaries themselves (the staged copies: what the package runs).
    let man_date = date(time, "%B %Y")?;
    for bin in BINARIES {
        let exe = pkg.join("usr/bin").join(bin);
        let help = output(Command::new(&exe).arg("--help"))?;
        let mut subs = Vec::new();
        for sub in subcommands(&help) {
            let text = output(Command::new(&exe).args([sub.as_str(), "--help"]))?;
            subs.push((sub, text));
        }
        let page = pkg.join(format!("usr/share/man/man1/{bin}.1"));
        write(
            &page,
            man_page(bin, &upstream, &man_date, &help, &subs),
            0o644,
        )?;
        gzip(&page)?;
    }

    // Lintian overrides, each with its reason (none needed when empty).
    if !LINTIAN_OVERRIDES.trim().is_empty() {
        write(
            &pkg.join("usr/share/lintian/overrides/sluice"),
            LINTIAN_OVERRIDES,
            0o644,
        )?;
    }

    // Depends: what the binaries link (dpkg-shlibdeps), adduser for the postinst, procps for
    // the unit's `ExecReload=/bin/kill`.
    let mut shlibdeps = Command::new("dpkg-shlibdeps");
    shlibdeps.current_dir(&work).arg("-O");
    for bin in BINARIES {
        shlibdeps.arg(format!("debian/sluice/usr/bin/{bin}"));
    }
    let shlibs = output(&mut shlibdeps)?;
    let shlibs = shlibs
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?
        .trim()
        .to_string();
    let depends = format!("{shlibs}, adduser, procps");

    // Every directory 0755, every file 0644 unless made executable above; sizes and md5sums.
    let mut entries = Vec::new();
    walk(&pkg, Path::new(""), &mut entries)?;
    let mut installed_kib = 0;
    let mut md5_args = Vec::new();
    for (rel, meta) in &entries {
        let path = pkg.join(rel);
        if meta.is_dir() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
            installed_kib += 1;
        } else {
            let exec = meta.permissions().mode() & 0o111 != 0;
            fs::set_permissions(
                &path,
                fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
            )?;
            installed_kib += meta.len().div_ceil(1024);
            // Conffiles are left out of md5sums, as dh_md5sums does (dpkg keeps their sums).
            if Path::new("/").join(rel) != Path::new(CONFFILE) {
                md5_args.push(rel.clone());
            }
        }
    }
    let md5sums = output(Command::new("md5sum").current_dir(&pkg).args(&md5_args))?;

    let debian = pkg.join("DEBIAN");
    write(
        &debian.join("control"),
        control(&version, &arch, &depends, installed_kib),
        0o644,
    )?;
    write(&debian.join("conffiles"), format!("{CONFFILE}\n"), 0o644)?;
    write(&debian.join("md5sums"), md5sums, 0o644)?;
    for (name, text) in SCRIPTS {
        write(&debian.join(name), text, 0o755)?;
    }

    let deb = out.join(format!("sluice_{version}_{arch}.deb"));
    crate::run(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zxz"])
            .arg(&pkg)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// Lintian overrides installed with the package; each tag with why it does not apply.
pub const LINTIAN_OVERRIDES: &str = "";

/// Lintian's report on `deb` (every tag, info and pedantic included). Whether it found
/// errors is the caller's to decide from the `E:` lines.
pub fn lintian(deb: &Path) -> Result<String> {
    let out = Command::new("lintian")
        .args(["--display-info", "--pedantic", "--tag-display-limit", "0"])
        .arg(deb)
        .output()
        .context("cannot start lintian (apt-get install lintian)")?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// The error lines (`E:`) of a lintian report.
pub fn lintian_errors(report: &str) -> Vec<&str> {
    report.lines().filter(|l| l.starts_with("E: ")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_runs_usr_bin_sluice_and_keeps_everything_else() {
        let root = crate::project_root();
        let text = fs::read_to_string(root.join("dist/systemd/sluice.service")).unwrap();
        let unit = packaged_unit(&text).unwrap();
        let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        assert!(exec.starts_with("ExecStart=/usr/bin/sluice run "), "{exec}");
        assert!(!unit.contains("/usr/local/bin/sluice"), "{unit}");
        // Only the path changed: the unit's lines, with it rewritten, come last and whole.
        assert!(unit.ends_with(&text.replace(UNIT_BIN_FROM, UNIT_BIN_TO)));
        // A unit whose daemon moved elsewhere is refused rather than packaged broken.
        let moved = text.replace("ExecStart=/usr/local/bin/sluice", "ExecStart=/opt/sluice");
        assert!(packaged_unit(&moved).is_err());
    }

    #[test]
    fn man_pages_escape_roff_and_list_subcommands() {
        let help = "Control a relay\n\nUsage: x <COMMAND>\n\nCommands:\n  status  Show it\n  \
                    help    Print this\n\nOptions:\n  -h, --help  Print help\n";
        assert_eq!(subcommands(help), ["status"]);
        let page = man_page(
            "x",
            "1.0",
            "May 2026",
            help,
            &[("status".into(), ".dot first\n\\back".into())],
        );
        assert!(page.contains("x \\- Control a relay\n"), "{page}");
        assert!(page.contains("\\-h, \\-\\-help"), "{page}");
        assert!(page.contains("\\&.dot first\n\\eback\n"), "{page}");
        assert!(page.contains(".SS \"x status\""), "{page}");
    }

    #[test]
    fn the_version_is_the_relay_crate_s_with_a_debian_revision() {
        let root = crate::project_root();
        let v = version(&root).unwrap();
        assert!(v.ends_with(&format!("-{REVISION}")), "{v}");
        assert!(v.starts_with(|c: char| c.is_ascii_digit()), "{v}");
        let control = control(&v, "amd64", "libc6 (>= 2.34)", 10);
        for field in [
            "Package: sluice\n",
            "Section: net\n",
            "Priority: optional\n",
        ] {
            assert!(control.contains(field), "{control}");
        }
        // Every line of the long description is indented, paragraphs separated by " .".
        let long: Vec<&str> = control
            .lines()
            .skip_while(|l| !l.starts_with("Description:"))
            .skip(1)
            .collect();
        assert!(
            long.len() > 5 && long.iter().all(|l| l.starts_with(' ')),
            "{control}"
        );
    }
}
