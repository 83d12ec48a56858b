//! The one error type of consul-reaper: why the reaper cannot do what it must.

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the reaper reports or ends with. The cause is the `source()`, not part of the
/// message: print the chain (`{:#}` of an `anyhow::Error`) to see both, each once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reaper may not do what it must: `what` names the action and the permission its
    /// token lacks (Consul's 403 is the source).
    #[error("the reaper cannot {what}")]
    Reap {
        /// The action, and what the token needs for it.
        what: String,
        /// Consul's answer.
        #[source]
        source: consul_api::Error,
    },

    /// A task of the reaper ended early: a bug.
    #[error("internal error: {0}")]
    Task(String),
}

impl Error {
    /// The Consul error underneath, where there is one.
    pub fn consul(&self) -> Option<&consul_api::Error> {
        match self {
            Error::Reap { source, .. } => Some(source),
            Error::Task(_) => None,
        }
    }
}
