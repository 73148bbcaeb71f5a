//! Sluice's end-to-end benchmark against HAProxy, nginx and socat on loopback, and the pieces it
//! is made of. The criterion micro-benchmarks of the library's hot parsers live in `benches/`.
//!
//! Two binaries: `loadgen` (the load generators and the echo upstream, each its own process so
//! its CPU is counted apart from the relay's) and `sluice-bench` (the orchestrator that
//! `cargo xtask bench` runs: starts every candidate, drives `loadgen` and `iperf3`, reads `/proc`,
//! writes the report). Code map:
//!
//! - [`net`]: the 127.77.0.0/16 address plan, client sockets bound to a source address;
//! - [`echo`], [`rr`], [`connrate`], [`idle`]: the upstream and the three socket workloads (bulk
//!   is `iperf3`);
//! - [`media`]: a few connections moving paced blocks through the relay beside the chat (the
//!   mixed workload);
//! - [`tlsflood`]: a TLS handshake flood from one host and a legitimate client's handshake
//!   latency meanwhile;
//! - [`wire`]: the `MARK`/`RESULT` lines a load generator prints;
//! - [`procstat`]: CPU and memory of process trees and the machine, from `/proc`;
//! - [`peers`]: the candidates, their configurations, and the guard that stops them;
//! - [`suite`]: the run; [`report`] and [`plot`]: Markdown and SVG.
//!
//! Invariants: traffic only on 127.0.0.0/8; every loop is bounded in count and time; every
//! process started is stopped by pid when its guard drops (and by `PR_SET_PDEATHSIG` if the
//! orchestrator dies).

pub mod connrate;
pub mod echo;
pub mod idle;
pub mod media;
pub mod net;
pub mod peers;
pub mod plot;
pub mod procstat;
pub mod report;
pub mod rr;
pub mod suite;
pub mod tlsflood;
pub mod wire;
