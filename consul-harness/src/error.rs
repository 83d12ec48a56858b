//! The testbed's one error type: what stopped a harness or an experiment, said so that a
//! person knows what to do next.

use std::time::Duration;

/// A `Result` whose error is the testbed's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop the testbed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Docker was asked for but does not answer.
    #[error(
        "no Docker engine answers at {endpoint}: {reason} (start Docker, or set TESTBED_BACKEND=process to run a local consul binary instead)"
    )]
    DockerUnavailable {
        /// Where the engine was looked for (`DOCKER_HOST`).
        endpoint: String,
        /// What the engine (or its absence) said.
        reason: String,
    },

    /// The Consul image is neither present nor obtainable.
    #[error("image {image} is not available: {reason}")]
    ImageUnavailable {
        /// The image reference.
        image: String,
        /// Why it cannot be had.
        reason: String,
    },

    /// Fetching or unpacking Consul, or building its image, failed.
    #[error("cannot provision Consul {version} ({step}): {reason}")]
    Provision {
        /// The Consul version being provisioned.
        version: &'static str,
        /// The step that failed (download, unpack, build).
        step: &'static str,
        /// What the step said.
        reason: String,
    },

    /// The agent did not come up in time.
    #[error("Consul ({backend}) did not become ready within {timeout:?}: {reason}")]
    StartTimeout {
        /// `docker` or `process`.
        backend: &'static str,
        /// How long it was given.
        timeout: Duration,
        /// The last thing seen (its log, the leader query's error).
        reason: String,
    },

    /// A condition waited for did not happen before its deadline.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
    },

    /// A child process could not be run or controlled.
    #[error("process {what}: {reason}")]
    Process {
        /// What was being done to which process.
        what: String,
        /// What the system said.
        reason: String,
    },

    /// Network faults cannot be injected here: what is missing.
    #[error("network faults need {0} (set TESTBED_NETWORK=optional to let tests skip them)")]
    NetworkUnavailable(String),

    /// Changing the kernel's packet filter or qdiscs failed.
    #[error("network: {what}: {reason}")]
    Network {
        /// The command run.
        what: String,
        /// What it said.
        reason: String,
    },

    /// An option or flag makes no sense.
    #[error("invalid setting: {0}")]
    Setting(String),

    /// The agent is not in the state the call needs ("is not running", "is already
    /// running", "does not serve HTTPS").
    #[error("the Consul agent {0}")]
    AgentState(&'static str),

    /// No free loopback port below the kernel's ephemeral range.
    #[error("cannot find a free loopback port below {below}")]
    NoFreePort {
        /// The start of the kernel's ephemeral range.
        below: u16,
    },

    /// rcgen could not make the test certificates.
    #[error("cannot make test certificates")]
    Certificates(#[source] rcgen::Error),

    /// The Docker engine or testcontainers reported an error.
    #[error("container: {0}")]
    Container(#[from] testcontainers::TestcontainersError),

    /// Consul's API answered with an error.
    #[error(transparent)]
    Consul(#[from] consul_api::Error),

    /// A file or socket operation failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
