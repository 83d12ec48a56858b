//! The one error type of this crate: what went wrong talking to Consul, with the HTTP status
//! and Consul's own message where there is one.

use std::fmt;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between us and a Consul agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (bad `CONSUL_HTTP_ADDR`, unreadable token file, ...).
    #[error("invalid Consul configuration: {0}")]
    Config(String),

    /// A request exceeds one of Consul's limits (a KV value over 512 KiB, a transaction of
    /// more than 64 operations or over 512 KiB): refused before it is sent, since Consul
    /// would answer 413. Not retryable.
    #[error("{what} is {size} {unit}, over Consul's limit of {limit}: not sent")]
    TooLarge {
        /// What is too large (`the value of key "app/config"`, ...).
        what: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
        /// The unit of both (`bytes`, `operations`).
        unit: &'static str,
    },

    /// No HTTP answer: connection refused, reset, timed out, DNS failure.
    #[error("Consul at {url} did not answer {method} {path}: {reason}")]
    Transport {
        /// The HTTP method (`GET`, `PUT`).
        method: &'static str,
        /// The agent's base URL.
        url: String,
        /// The request's path (`/v1/...`), without the query.
        path: String,
        /// What went wrong, in a few words.
        reason: String,
        /// Whether the request timed out (rather than being refused or reset).
        timeout: bool,
    },

    /// The TLS exchange with the agent failed: its certificate was refused, it refused ours
    /// (or the lack of one), or one side does not speak TLS. `problem` names the setting to
    /// look at. Not retried: it takes a change of configuration on one side.
    #[error("TLS with Consul at {url} failed for {method} {path}: {problem}")]
    Tls {
        /// The HTTP method (`GET`, `PUT`).
        method: &'static str,
        /// The agent's base URL.
        url: String,
        /// The request's path (`/v1/...`), without the query.
        path: String,
        /// What failed, naming the setting to look at.
        problem: String,
    },

    /// Consul answered 403: the ACL token was refused or lacks the permission.
    #[error(
        "Consul refused the ACL token for {method} {path} (403 {message}): \
         check CONSUL_HTTP_TOKEN and the token's policy"
    )]
    PermissionDenied {
        /// The HTTP method (`GET`, `PUT`).
        method: &'static str,
        /// The request's path (`/v1/...`), without the query.
        path: String,
        /// Consul's own message (the body of its answer).
        message: String,
    },

    /// Consul answered with another non-success status.
    #[error("Consul answered {status} to {method} {path}: {message}")]
    Status {
        /// The HTTP method (`GET`, `PUT`).
        method: &'static str,
        /// The request's path (`/v1/...`), without the query.
        path: String,
        /// The HTTP status.
        status: u16,
        /// Consul's own message (the body of its answer).
        message: String,
    },

    /// Consul answered 2xx with a body we could not decode.
    #[error(
        "Consul sent a malformed answer to {method} {path}: {reason} (body starts {snippet:?})"
    )]
    Decode {
        /// The HTTP method (`GET`, `PUT`).
        method: &'static str,
        /// The request's path (`/v1/...`), without the query.
        path: String,
        /// What went wrong, in a few words.
        reason: String,
        /// The first bytes of the body.
        snippet: String,
    },

    /// The answer was larger than the configured cap.
    #[error("Consul's answer to {method} {path} exceeds {limit} bytes")]
    BodyTooLarge {
        /// The HTTP method (`GET`, `PUT`).
        method: &'static str,
        /// The request's path (`/v1/...`), without the query.
        path: String,
        /// The cap, in bytes.
        limit: usize,
    },
}

impl Error {
    /// The HTTP status Consul answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::PermissionDenied { .. } => Some(403),
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when trying the same request again later may succeed: no answer, a 5xx, a 429, or
    /// a garbled body. False for configuration errors, 403 and other 4xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { .. } | Error::Decode { .. } | Error::BodyTooLarge { .. } => true,
            Error::Status { status, .. } => *status >= 500 || *status == 429,
            Error::Config(_)
            | Error::TooLarge { .. }
            | Error::Tls { .. }
            | Error::PermissionDenied { .. } => false,
        }
    }

    /// True when a read that Consul has answered before may succeed again if retried:
    /// everything [`Error::is_retryable`] says, and also a refusal (403, another 4xx, a TLS
    /// failure). Once a read has worked, a refusal means something changed on the other side
    /// (a token rotated or revoked, an agent reloaded to HTTPS, its certificate rotated to a
    /// CA not trusted yet, a prepared query deleted and created again) and may change back.
    /// Only a configuration error stays permanent. Before the first answer, use
    /// [`Error::is_retryable`]: a refusal then is most likely our own configuration.
    pub fn is_retryable_after_success(&self) -> bool {
        !matches!(self, Error::Config(_) | Error::TooLarge { .. })
    }

    /// True for a refused ACL token (HTTP 403).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, Error::PermissionDenied { .. })
    }

    /// True when Consul answered 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// A short, stable label of the error's kind, for "log once per state change".
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) | Error::TooLarge { .. } => ErrorKind::Config,
            Error::Transport { .. } => ErrorKind::Unreachable,
            Error::Tls { .. } => ErrorKind::Tls,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Error::Status { status, .. } => ErrorKind::Status(*status),
            Error::Decode { .. } | Error::BodyTooLarge { .. } => ErrorKind::Malformed,
        }
    }
}

/// The kind of an [`Error`], without its details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// [`Error::Config`].
    Config,
    /// [`Error::Transport`].
    Unreachable,
    /// [`Error::Tls`].
    Tls,
    /// [`Error::PermissionDenied`].
    PermissionDenied,
    /// [`Error::Status`], with its status.
    Status(u16),
    /// [`Error::Decode`] or [`Error::BodyTooLarge`].
    Malformed,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Config => f.write_str("configuration error"),
            ErrorKind::Unreachable => f.write_str("unreachable"),
            ErrorKind::Tls => f.write_str("TLS refused"),
            ErrorKind::PermissionDenied => f.write_str("permission denied"),
            ErrorKind::Status(s) => write!(f, "HTTP {s}"),
            ErrorKind::Malformed => f.write_str("malformed answer"),
        }
    }
}
