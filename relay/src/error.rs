//! Errors of one relayed connection, tagged by the side that caused them.
//!
//! A connection error closes that connection and counts a metric; it never ends a worker.
//! Messages are lowercase, with no trailing period, and never contain an IP address.

use std::io;

/// Who caused an error: the client, the upstream, or this relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Local,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{side:?} reset the connection")]
    Reset { side: Side },
    #[error("{side:?} i/o failed: {source}")]
    Io { side: Side, source: io::Error },
    #[error("no upstream address is known yet (resolution pending or failed)")]
    NoUpstream,
    #[error("every upstream address refused or timed out")]
    UpstreamUnreachable,
    #[error("malformed or missing PROXY header")]
    BadProxyHeader,
}

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
