//! House rules, checked under `cargo test` (rust-analyzer's tidy): every module says what it is
//! for, and every `unsafe` block says why it is sound.

use std::fs;
use std::path::{Path, PathBuf};

use crate::project_root;

fn rust_files() -> Vec<PathBuf> {
    let root = project_root();
    let mut out = Vec::new();
    for dir in [
        "relay/src",
        "xtask/src",
        "tests/src",
        "ebpf/common/src",
        "ebpf/programs/src",
        "benches",
        "fuzz/fuzz_targets",
    ] {
        walk(&root.join(dir), &mut out);
    }
    assert!(out.len() > 10, "tidy found too few Rust files: {out:?}");
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_has_docs() {
    let missing: Vec<_> = rust_files()
        .into_iter()
        .filter(|p| {
            let text = fs::read_to_string(p).unwrap();
            !text.trim_start().starts_with("//!")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a `//!` doc comment: {missing:#?}"
    );
}

#[test]
fn every_unsafe_block_has_a_safety_comment() {
    let mut bad = Vec::new();
    for path in rust_files() {
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if !code.contains(concat!("unsafe", " {")) {
                continue;
            }
            let window = &lines[i.saturating_sub(6)..=i];
            if !window.iter().any(|l| l.contains("SAFETY:")) {
                bad.push(format!("{}:{}", path.display(), i + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "`unsafe` blocks without `// SAFETY:` just above: {bad:#?}"
    );
}

#[test]
fn readme_first_two_commands_are_run_and_test() {
    let readme = fs::read_to_string(project_root().join("README.md")).unwrap();
    let cmds: Vec<&str> = readme
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cargo "))
        .take(2)
        .collect();
    assert_eq!(cmds, ["cargo xtask run", "cargo xtask test"]);
}

#[test]
fn ci_runs_the_readme_test_command_and_requires_capabilities() {
    let ci = fs::read_to_string(project_root().join(".ci/run")).unwrap();
    assert!(ci.contains("cargo xtask test"));
    assert!(ci.contains("SLUICE_REQUIRE_CAPS=1"));
}
