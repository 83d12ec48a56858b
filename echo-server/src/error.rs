//! The one error type of echo-server: why the server could not start, or had to stop.

use std::net::SocketAddr;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that stops the server. The cause of a wrapped error is its `source()`, not part
/// of its message: print the chain (`{:#}` of an `anyhow::Error`, as the binaries do) to see
/// both, each once. Per-connection trouble (a bad frame, a peer gone) is
/// never one of these: it closes that connection only.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A listening socket could not be opened.
    #[error("cannot listen for {what} on {addr}")]
    Bind {
        /// `echo` or `/check`.
        what: &'static str,
        /// The address it was to listen on.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },

    /// Consul refused the registration for good (a 403, a rejected definition): retrying
    /// would not help.
    #[error(transparent)]
    Registration(Box<consul_registry::Error>),

    /// The Consul client could not be built (bad `CONSUL_HTTP_ADDR`, unreadable token file).
    #[error(transparent)]
    Consul(#[from] consul_api::Error),

    /// Signal handlers could not be installed.
    #[error("cannot listen for {signal}")]
    Signal {
        /// The signal (`SIGTERM`, ...).
        signal: &'static str,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },

    /// A task of the server panicked or was cancelled: a bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<consul_registry::Error> for Error {
    fn from(e: consul_registry::Error) -> Self {
        Error::Registration(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_error_prints_as_consul_registry_says_it() {
        let inner = || consul_registry::Error::Task("boom".into());
        let ours = format!("{:#}", anyhow::Error::from(Error::from(inner())));
        assert_eq!(ours, format!("{:#}", anyhow::Error::from(inner())));
    }
}
