//! The one error type of the benchmark kit.

use std::time::Duration;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a bench setup, a measurement or the report failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
    },

    /// An echo came back different from what was sent, or not at all.
    #[error("bad echo: {0}")]
    BadEcho(String),

    /// A setting or a file that makes no sense.
    #[error("{0}")]
    Invalid(String),

    /// An in-process echo-server failed.
    #[error(transparent)]
    Server(#[from] echo_server::Error),

    /// The echo client failed.
    #[error(transparent)]
    Client(#[from] echo_client::Error),

    /// Echo traffic (echo-rig's streamer) failed a wait.
    #[error(transparent)]
    Stream(#[from] echo_rig::traffic::StreamError),

    /// The harness (Consul, processes) failed.
    #[error(transparent)]
    Harness(#[from] consul_harness::Error),

    /// Consul's API failed.
    #[error(transparent)]
    Consul(#[from] consul_api::Error),

    /// A results file could not be read or written.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: String,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },

    /// A socket or a file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A [`Error::Timeout`] for `what`.
    pub fn timeout(what: impl Into<String>, timeout: Duration) -> Self {
        Error::Timeout {
            what: what.into(),
            timeout,
        }
    }
}
