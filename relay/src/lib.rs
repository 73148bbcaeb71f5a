//! Sluice: a relay that people in an internet shutdown reach their messenger through.
//!
//! The library does the work; `src/bin/{sluice,sluicectl}.rs` only parse arguments and call it.
//! Start at [`supervisor`] (binds listeners, forks workers) and [`worker`] (one io_uring ring per
//! process); ARCHITECTURE.md is the map.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub(crate) mod acme;
pub mod admission;
pub mod cidr;
pub mod config;
pub mod control;
pub mod decoy;
pub mod doctor;
pub mod ebpf;
pub(crate) mod engine;
pub(crate) mod error;
pub(crate) mod health;
pub mod histo;
pub(crate) mod http;
pub(crate) mod limits;
pub(crate) mod metrics;
pub mod proto;
pub mod share;
pub mod supervisor;
pub mod sys;
pub(crate) mod upstream;
pub mod wire;
pub mod worker;
