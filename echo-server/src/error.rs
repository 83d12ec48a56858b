//! The one error type of echo-server: why the server could not start, or had to stop.

use std::net::SocketAddr;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that stops the server. Per-connection trouble (a bad frame, a peer gone) is
/// never one of these: it closes that connection only.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A listening socket could not be opened.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// Consul refused the registration for good (a 403, a rejected definition): retrying
    /// would not help.
    #[error("cannot register service {id:?} with Consul: {source}")]
    Register {
        id: String,
        #[source]
        source: consul_api::Error,
    },

    /// The Consul client could not be built (bad `CONSUL_HTTP_ADDR`, unreadable token file).
    #[error(transparent)]
    Consul(#[from] consul_api::Error),

    /// Signal handlers could not be installed.
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A task of the server panicked or was cancelled: a bug.
    #[error("internal error: {0}")]
    Internal(String),
}
