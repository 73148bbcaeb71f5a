//! Inbound and outbound protocols a worker speaks before relaying, all sans-IO: each module takes
//! the bytes received so far and says what they are, so the io_uring loop owns every buffer and
//! every socket.
//!
//! - [`proxy`]: PROXY protocol v1 and v2, parsed from a load balancer and sent to an upstream.
//! - [`tls`]: TLS termination with rustls (a Let's Encrypt certificate or a generated private CA),
//!   driven as a byte pump.
//! - [`sni`]: the server name of a TLS ClientHello, read without terminating TLS, and the Signal
//!   name allowlist.

pub mod proxy;
pub mod sni;
pub mod tls;
