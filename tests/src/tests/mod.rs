//! Integration tests of the `sluice` binary, one module per area. Each test starts its own
//! relay on its own 127.0.0.x address with real servers behind it (see the harness in
//! `sluice_tests`), so tests run in parallel threads without colliding.
//!
//! Engine-independent behaviour is checked for every engine with [`engines!`]: a test named
//! `half_close::client_shuts_first::splice` is `client_shuts_first("splice")`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Expands `engines!(check)` to a module `check` with one test per engine: `splice`, `copy`,
/// `epoll`, `sockmap`, each calling `check(engine)` from the enclosing module.
macro_rules! engines {
    ($check:ident) => {
        mod $check {
            #[test]
            fn splice() {
                super::$check("splice")
            }
            #[test]
            fn copy() {
                super::$check("copy")
            }
            #[test]
            fn epoll() {
                super::$check("epoll")
            }
            #[test]
            fn sockmap() {
                super::$check("sockmap")
            }
        }
    };
}

mod acme;
mod admission;
mod bulk;
mod capacity;
mod concurrency;
mod config;
mod decoy;
mod destination_safety;
mod dist;
mod ebpf;
mod failures;
mod fallback;
mod faults;
mod half_close;
mod health;
mod limits;
mod metrics_http;
mod monitoring;
mod observability;
mod operator;
mod peers;
mod presets;
mod privileges;
mod proxy_protocol;
mod reload;
mod scanner;
mod sni;
mod sockmap;
mod supervisor;
mod tls;
mod trust;

/// The `holder` helper binary built with this test: where cargo built it, or beside the binaries
/// under test when it is not there (a copy of the test binary run elsewhere, as in the VMs).
pub fn holder_exe() -> &'static Path {
    static EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let built = Path::new(env!("CARGO_BIN_EXE_holder"));
        if built.is_file() {
            built.to_path_buf()
        } else {
            sluice_tests::sluice::bin_dir().join("holder")
        }
    })
}

static SEED: AtomicU64 = AtomicU64::new(1);

/// A seed no other stream in this run uses (spaced so `seed + i` ranges never overlap).
pub fn seed() -> u64 {
    SEED.fetch_add(1 << 20, Ordering::Relaxed)
}

/// Common start of a test for `engine`: per-process init, and the io_uring gate for the
/// io_uring engines (a skip prints why; under `SLUICE_REQUIRE_CAPS=1` it fails).
pub fn engine_ok(engine: &str) -> bool {
    sluice_tests::init();
    match engine {
        "splice" | "copy" => sluice_tests::require_io_uring(),
        "sockmap" => sluice_tests::require_io_uring() && sluice_tests::require_bpf(),
        _ => true,
    }
}

/// Asserts that every worker in `sluicectl status --json` reports `engine`.
pub fn assert_engine(relay: &sluice_tests::Sluice, engine: &str) {
    let status = relay.status();
    let workers = status["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no `workers` array in status: {status}"));
    assert!(!workers.is_empty(), "status lists no worker: {status}");
    for w in workers {
        assert_eq!(
            w["engine"].as_str(),
            Some(engine),
            "worker engine in status: {status}"
        );
    }
}
