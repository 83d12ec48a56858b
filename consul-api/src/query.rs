//! Options every read takes (`dc`, `index`, `wait`, ...) and the metadata every read returns
//! (`X-Consul-Index`, ...), as Consul's Go `api` names them.

use std::time::{Duration, SystemTime};

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
    /// Which server may answer and how fresh the answer must be (`stale`, `consistent`).
    pub consistency: Consistency,
    /// Answer from the local agent's cache (`cached`): one upstream query shared by every
    /// client of that agent; blocking queries block on the cache's index. Health and catalog
    /// service reads support it in Consul 1.8.
    pub cached: bool,
    /// A server-side filter expression (`filter`, Consul ≥ 1.5), e.g.
    /// `Service.Meta.version == "2"`.
    pub filter: Option<String>,
}

/// The consistency mode of a read, as Consul's HTTP API names them.
///
/// * `Default`: the leader answers, unless it lost contact with a quorum for a moment (a
///   rare stale read, for speed);
/// * `Stale`: any server answers from its own copy (`X-Consul-LastContact` says how old);
///   the read keeps working without a leader, even without quorum;
/// * `Consistent`: the leader confirms its leadership with a quorum before answering
///   (an extra round trip per read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Consistency {
    /// Consul's default mode.
    #[default]
    Default,
    /// `?stale`: any server answers.
    Stale,
    /// `?consistent`: the leader, after a quorum check.
    Consistent,
}

impl Consistency {
    /// The query-string key, if any.
    fn key(self) -> Option<&'static str> {
        match self {
            Consistency::Default => None,
            Consistency::Stale => Some("stale"),
            Consistency::Consistent => Some("consistent"),
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Consistency::Default => "default",
            Consistency::Stale => "stale",
            Consistency::Consistent => "consistent",
        })
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => Ok(Consistency::Default),
            "stale" => Ok(Consistency::Stale),
            "consistent" => Ok(Consistency::Consistent),
            other => Err(format!(
                "unknown consistency mode {other:?}: use default, stale or consistent"
            )),
        }
    }
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
        if let Some(key) = self.consistency.key() {
            pairs.push((key, String::new()));
        }
        if self.cached {
            pairs.push(("cached", String::new()));
        }
        if let Some(filter) = &self.filter {
            pairs.push(("filter", filter.clone()));
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
    /// `X-Cache` of a `cached` read: `Some(true)` for `HIT`, `Some(false)` for `MISS`.
    pub cache_hit: Option<bool>,
    /// When the answer's headers arrived (before its body was read and decoded): where
    /// Consul's share of a read ends and the client's begins. `None` when not read over HTTP.
    pub received_at: Option<SystemTime>,
    /// When the answer's body had been read to its end: the whole answer has arrived (from
    /// `received_at` to here, Consul sends and the client reads). `None` when not read over
    /// HTTP.
    pub read_at: Option<SystemTime>,
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
            cache_hit: get("X-Cache").map(|v| v == "HIT"),
            received_at: Some(SystemTime::now()),
            read_at: None,
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

    #[test]
    fn consistency_cache_and_filter_pairs() {
        let q = QueryOptions {
            consistency: Consistency::Stale,
            cached: true,
            filter: Some("Service.Port == 1".into()),
            ..Default::default()
        };
        let pairs = q.pairs();
        assert!(pairs.contains(&("stale", String::new())));
        assert!(pairs.contains(&("cached", String::new())));
        assert!(pairs.contains(&("filter", "Service.Port == 1".into())));
        let consistent = QueryOptions {
            consistency: Consistency::Consistent,
            ..Default::default()
        };
        assert_eq!(consistent.pairs(), vec![("consistent", String::new())]);
        assert!(QueryOptions::default().pairs().is_empty());
        assert_eq!("stale".parse::<Consistency>(), Ok(Consistency::Stale));
        assert!("eventual".parse::<Consistency>().is_err());
        for mode in [
            Consistency::Default,
            Consistency::Stale,
            Consistency::Consistent,
        ] {
            assert_eq!(mode.to_string().parse::<Consistency>(), Ok(mode));
        }
    }
}
