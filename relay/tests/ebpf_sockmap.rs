//! Interim home of the eBPF integration tests until `sluice-tests` depends on `sluice` and lists
//! `mod ebpf;` in `tests/src/tests/mod.rs`; then this file goes (the tests would run twice).

#[path = "../../tests/src/tests/ebpf.rs"]
mod ebpf;
