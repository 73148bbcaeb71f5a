//! The errors that stop a worker or the daemon from starting.
//! Messages are lowercase, with no trailing period, and never contain an IP address.

use std::io;

/// Errors that stop a worker or the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
    /// Why ([`crate::engine::features::Unusable`], as text: this module is below the engines).
    #[error("io_uring is refused by this host ({0}); use --engine epoll or auto")]
    UringRefused(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}
