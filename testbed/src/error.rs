//! The testbed's one error type: what stopped an experiment or a scenario, said so that a
//! person knows what to do next. The harness's own errors (Docker, the image, the agent,
//! child processes) come through as [`Error::Harness`] with their source.

use std::{path::PathBuf, time::Duration};

/// A `Result` whose error is the testbed's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop an experiment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Real Consul, its image or a child process failed (the harness says which).
    #[error(transparent)]
    Harness(#[from] consul_harness::Error),

    /// Consul's API answered with an error.
    #[error(transparent)]
    Consul(#[from] consul_api::Error),

    /// An echo client could not be started.
    #[error("cannot start an echo client")]
    Client(#[from] echo_client::Error),

    /// A flag or option of an experiment makes no sense.
    #[error("invalid setting: {0}")]
    Setting(String),

    /// A condition waited for did not happen before its deadline.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
    },

    /// Echo traffic (echo-rig's streamer) failed a wait.
    #[error(transparent)]
    Stream(#[from] echo_rig::traffic::StreamError),

    /// A watcher or task of the experiment ended before it had its answer.
    #[error("{0} stopped before it had its answer")]
    Stopped(String),

    /// A task of the experiment panicked: a bug.
    #[error("{what} failed")]
    Task {
        /// Which task.
        what: &'static str,
        /// How it ended.
        #[source]
        source: tokio::task::JoinError,
    },

    /// The scenario did not see what it must see to go on ("no reply yet").
    #[error("the scenario cannot go on: {0}")]
    Scenario(String),

    /// A report could not be written.
    #[error("cannot write the report {path}: {reason}")]
    Report {
        /// The file.
        path: PathBuf,
        /// Why (an encoder's or a plotter's message).
        reason: String,
    },

    /// A file or socket operation failed.
    #[error("I/O")]
    Io(#[from] std::io::Error),
}
