//! Options every read takes (`dc`, `index`, `wait`, ...) and the metadata every read returns
//! (`X-Consul-Index`, ...), as Consul's Go `api` names them.

use std::time::Duration;

use reqwest::header::HeaderMap;

use crate::duration::GoDuration;

/// The longest `wait` Consul honours for a blocking query.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// Options of a read request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryOptions {
    /// Datacenter to ask (`dc`); the agent's own when `None`.
    pub datacenter: Option<String>,
    /// Block until the result's index exceeds this (`index`); 0 means do not block.
    pub wait_index: u64,
    /// How long to block at most (`wait`); capped at [`MAX_WAIT`].
    pub wait_time: Option<Duration>,
    /// Content hash for the agent endpoints that block on hashes (`hash`).
    pub wait_hash: Option<String>,
    /// Allow any server to answer, possibly stale (`stale`).
    pub allow_stale: bool,
}

impl QueryOptions {
    /// The query-string pairs these options add.
    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        if let Some(dc) = &self.datacenter {
            pairs.push(("dc", dc.clone()));
        }
        let blocking = self.wait_index > 0 || self.wait_hash.is_some();
        if self.wait_index > 0 {
            pairs.push(("index", self.wait_index.to_string()));
        }
        if let Some(hash) = &self.wait_hash {
            pairs.push(("hash", hash.clone()));
        }
        if blocking && let Some(wait) = self.wait_time {
            pairs.push(("wait", GoDuration(wait.min(MAX_WAIT)).to_string()));
        }
        if self.allow_stale {
            pairs.push(("stale", String::new()));
        }
        pairs
    }

    /// How long a request with these options may legitimately take before Consul answers:
    /// Consul adds up to wait/16 of jitter to a blocking query.
    pub(crate) fn blocking_budget(&self) -> Option<Duration> {
        let blocking = self.wait_index > 0 || self.wait_hash.is_some();
        if !blocking {
            return None;
        }
        let wait = self
            .wait_time
            .unwrap_or(Duration::from_secs(300))
            .min(MAX_WAIT);
        Some(wait + wait / 16)
    }
}

/// Metadata of a read's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryMeta {
    /// `X-Consul-Index`: the index to pass as `wait_index` to block for the next change.
    pub last_index: u64,
    /// `X-Consul-KnownLeader`.
    pub known_leader: bool,
    /// `X-Consul-LastContact`, in milliseconds.
    pub last_contact_ms: u64,
    /// `X-Consul-ContentHash`, for the agent's hash-blocking endpoints.
    pub content_hash: Option<String>,
}

impl QueryMeta {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Self {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        QueryMeta {
            last_index: get("X-Consul-Index")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            known_leader: get("X-Consul-KnownLeader") == Some("true"),
            last_contact_ms: get("X-Consul-LastContact")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            content_hash: get("X-Consul-ContentHash").map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_blocking_query_sends_no_wait() {
        let q = QueryOptions {
            wait_time: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        assert!(q.pairs().iter().all(|(k, _)| *k != "wait" && *k != "index"));
        assert_eq!(q.blocking_budget(), None);
    }

    #[test]
    fn blocking_query_caps_wait_and_budgets_jitter() {
        let q = QueryOptions {
            wait_index: 42,
            wait_time: Some(Duration::from_secs(3600)),
            datacenter: Some("dc2".into()),
            ..Default::default()
        };
        let pairs = q.pairs();
        assert!(pairs.contains(&("index", "42".into())));
        assert!(pairs.contains(&("wait", "10m".into())));
        assert!(pairs.contains(&("dc", "dc2".into())));
        assert_eq!(
            q.blocking_budget(),
            Some(Duration::from_secs(600) + Duration::from_millis(37_500))
        );
    }
}
