//! The one error type of echo-client: why a message could not be answered, or why the client
//! could not start.

use std::{sync::Arc, time::Duration};

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong for a caller of echo-client. Cloneable, so one permanent
/// failure can answer every queued message; Consul's errors are kept as the source (shared),
/// so [`consul_api::Error::is_retryable`] and the whole chain reach the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The settings cannot work (zero capacity, empty service name, ...).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The Consul client could not be built (bad `CONSUL_HTTP_ADDR`, unreadable CA or token
    /// file, ...).
    #[error("cannot set up the Consul client")]
    Consul(#[source] Arc<consul_api::Error>),

    /// The message cannot be sent as one frame.
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// Discovery stopped for good: Consul refused the token (403) or the query is invalid.
    #[error("service discovery of {service:?} failed permanently: {reason}")]
    Discovery {
        /// The service.
        service: String,
        /// What discovery said: Consul's message and a hint at what to check.
        reason: String,
        /// Consul's error itself (its message is already in `reason`, so it is not the
        /// `source()`: a printed chain would say it twice); see [`Error::consul`].
        cause: Option<Arc<consul_api::Error>>,
    },

    /// No passing instance answered the message before its deadline.
    #[error("no instance of {service:?} answered within {waited:?}: {last}")]
    Timeout {
        /// The service.
        service: String,
        /// How long the message waited (the message timeout).
        waited: Duration,
        /// The last thing that went wrong (no passing instance, connection refused, ...).
        last: String,
    },

    /// The instance answered with bytes that are not the message: an echo must be byte-exact.
    #[error("{instance} answered {got:?} to a {sent}-byte message: not an echo")]
    NotAnEcho {
        /// The instance that answered.
        instance: String,
        /// The message's length, in bytes.
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
        /// The instance that refused it.
        instance: String,
        /// The message's length, in bytes.
        sent: usize,
        /// The server's error line.
        line: String,
    },

    /// Replies differed from their messages (an echo must be byte-exact).
    #[error("{mismatched} of {replies} replies differed from their message")]
    Mismatch {
        /// Replies that were not their message.
        mismatched: u64,
        /// Replies in all.
        replies: u64,
    },

    /// The client was shut down before the message was answered.
    #[error("the client has shut down")]
    Closed,
}

impl From<consul_api::Error> for Error {
    fn from(e: consul_api::Error) -> Self {
        Error::Consul(Arc::new(e))
    }
}

impl Error {
    /// The Consul error behind this one, if any: its status, kind and
    /// [`is_retryable`](consul_api::Error::is_retryable).
    pub fn consul(&self) -> Option<&consul_api::Error> {
        match self {
            Error::Consul(e) => Some(e),
            Error::Discovery { cause, .. } => cause.as_deref(),
            _ => None,
        }
    }

    /// True when waiting and trying again cannot help (bad input, refused token, shut down).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Error::Timeout { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> consul_api::Error {
        consul_api::Error::Transport {
            method: "GET",
            url: "http://127.0.0.1:1".into(),
            path: "/v1/health/service/web".into(),
            reason: "connection refused".into(),
            timeout: false,
        }
    }

    #[test]
    fn consuls_error_is_the_source_and_reaches_the_caller() {
        let e = Error::from(unreachable());
        assert!(e.consul().is_some_and(consul_api::Error::is_retryable));
        let printed = format!("{:#}", anyhow::Error::from(e.clone()));
        assert!(
            printed.starts_with("cannot set up the Consul client: "),
            "{printed}"
        );
        assert_eq!(
            printed.matches("connection refused").count(),
            1,
            "{printed}"
        );
        let copy = e.clone();
        assert!(
            std::ptr::eq(e.consul().unwrap(), copy.consul().unwrap()),
            "shared, not copied"
        );
    }

    #[test]
    fn a_discovery_failure_keeps_consuls_error_without_printing_it_twice() {
        let e = Error::Discovery {
            service: "web".into(),
            reason: unreachable().to_string(),
            cause: Some(Arc::new(unreachable())),
        };
        assert!(e.consul().is_some_and(|c| c.status().is_none()));
        let printed = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            printed.matches("connection refused").count(),
            1,
            "{printed}"
        );
    }
}
