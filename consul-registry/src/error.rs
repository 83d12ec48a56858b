//! The one error type of consul-registry: why a registration had to stop.

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What ends a registration for good. The cause is the `source()`, not part of the message:
/// print the chain (`{:#}` of an `anyhow::Error`) to see both, each once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Consul refused the registration for good (a 403, a rejected definition): retrying
    /// would not help.
    #[error("cannot register service {id:?} with Consul")]
    Register {
        /// The service ID.
        id: String,
        /// Consul's answer.
        #[source]
        source: consul_api::Error,
    },

    /// Consul refused to put a service in or out of maintenance mode.
    #[error("cannot change maintenance mode of service {id:?}")]
    Maintenance {
        /// The service ID.
        id: String,
        /// Consul's answer.
        #[source]
        source: consul_api::Error,
    },

    /// A task of the registration panicked or was cancelled: a bug.
    #[error("internal error: {0}")]
    Task(String),

    /// Discovery stopped for good (a refused token, an invalid query).
    #[error("service discovery failed: {reason}")]
    Discovery {
        /// What Consul said.
        reason: String,
    },

    /// A [`Pool`](crate::pool::Pool) had no instance to offer before the caller's deadline.
    #[error("no instance to use after waiting {waited:?}: {reason}")]
    NoInstance {
        /// How long the pick waited.
        waited: std::time::Duration,
        /// Why: what discovery knows (nothing listed, Consul unreachable, every listed
        /// instance held out after failures, discovery failed for good).
        reason: String,
    },

    /// Consul refused the token a TTL heartbeat updates its check with, before any update
    /// was accepted.
    #[error("cannot update TTL check {check_id:?}")]
    Heartbeat {
        /// The check ID.
        check_id: String,
        /// Consul's answer.
        #[source]
        source: consul_api::Error,
    },
}

impl Error {
    /// The Consul error underneath, where there is one.
    pub fn consul(&self) -> Option<&consul_api::Error> {
        match self {
            Error::Register { source, .. }
            | Error::Heartbeat { source, .. }
            | Error::Maintenance { source, .. } => Some(source),
            Error::Discovery { .. } | Error::NoInstance { .. } | Error::Task(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_chain_names_the_cause_once() {
        let e = Error::Register {
            id: "servernode_1".into(),
            source: consul_api::Error::PermissionDenied {
                method: "PUT",
                path: "/v1/agent/service/register".into(),
                message: "Permission denied".into(),
            },
        };
        let printed = format!("{:#}", anyhow::Error::from(e));
        assert!(printed.starts_with("cannot register service \"servernode_1\" with Consul: "));
        assert_eq!(
            printed.matches("refused the ACL token").count(),
            1,
            "{printed}"
        );
    }
}
