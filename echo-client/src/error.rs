//! The one error type of echo-client: why a message could not be answered, or why the client
//! could not start.

use std::time::Duration;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong for a caller of echo-client. Cloneable, so one permanent
/// failure can answer every queued message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The settings cannot work (bad Consul address, zero capacity, ...).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The message cannot be sent as one frame.
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// Discovery stopped for good: Consul refused the token (403) or the query is invalid.
    #[error("service discovery of {service:?} failed permanently: {reason}")]
    Discovery { service: String, reason: String },

    /// No passing instance answered the message before its deadline.
    #[error("no instance of {service:?} answered within {waited:?}: {last}")]
    Timeout {
        service: String,
        waited: Duration,
        /// The last thing that went wrong (no passing instance, connection refused, ...).
        last: String,
    },

    /// The instance answered with bytes that are not the message: an echo must be byte-exact.
    #[error("{instance} answered {got:?} to a {sent}-byte message: not an echo")]
    NotAnEcho {
        instance: String,
        sent: usize,
        /// The start of the reply, escaped.
        got: String,
    },

    /// The instance refused the message as longer than its frame limit (its `--max-frame`
    /// is smaller than this client's) and closed the connection.
    #[error(
        "{instance} refused the message: {line:?} (its --max-frame is smaller than this \
         {sent}-byte message)"
    )]
    FrameTooLong {
        instance: String,
        sent: usize,
        /// The server's error line.
        line: String,
    },

    /// Replies differed from their messages (an echo must be byte-exact).
    #[error("{mismatched} of {replies} replies differed from their message")]
    Mismatch { mismatched: u64, replies: u64 },

    /// The client was shut down before the message was answered.
    #[error("the client has shut down")]
    Closed,
}

impl Error {
    /// True when waiting and trying again cannot help (bad input, refused token, shut down).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Error::Timeout { .. })
    }
}
