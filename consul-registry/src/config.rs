//! Live configuration from Consul's KV store: a typed configuration (`serde::Deserialize`)
//! read from one key (JSON) or from a prefix tree, followed with blocking queries, every
//! change checked by the service's own validation before it is applied.
//!
//! * An invalid change (it does not decode, or the check refuses it) is rejected: the last
//!   good configuration stays in force, the rejection is logged as an error with the key,
//!   the index and the reason, and [`Status::Rejected`] says so to whoever reads the channel.
//! * Consul unreachable: the last good configuration stays ([`Status::Unreachable`]); the
//!   read is retried with backoff.
//! * A missing key: the defaults ([`Missing::Defaults`]) or nothing until it exists
//!   ([`Missing::Wait`]: [`Status::Waiting`] before the first configuration,
//!   [`Status::KeyMissing`] with the last good kept after a deletion).
//! * A prefix is read whole at one index (`?recurse`) and applied as one snapshot: a change
//!   written as one transaction is never seen half-applied.
//! * A token that may not read the key: Consul answers 403, reported as
//!   [`Status::Unreachable`], and nothing is applied (not even the defaults). A prefix is
//!   different: Consul 1.8 filters out the keys a token may not read and answers as if the
//!   prefix were empty, which is indistinguishable from a missing prefix; with
//!   [`Missing::Defaults`] the defaults would then apply. Prefer [`Missing::Wait`] for a
//!   prefix.
//!
//! [`Applier`] is the pure state machine (an answer or an error in, what is in force out);
//! [`spawn`] is the task around it that reads Consul.
//!
//! A prefix `app/` holding `app/limit` = `10` and `app/db/url` = `postgres://...` reads as
//! `{"limit": 10, "db": {"url": "postgres://..."}}`: each key's path below the prefix is a
//! path of JSON objects, each value JSON if it parses as JSON, a string otherwise.

use std::{fmt, sync::Arc, time::Duration};

use consul_api::{
    Classify, Client, Event as FollowEvent, Follow, KVPair, QueryOptions, Retry, Watch,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::backoff::Backoff;

/// Where the configuration lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// One key whose value is the whole configuration, as JSON.
    Key(String),
    /// Every key under a prefix, one field each (see the module's doc).
    Prefix(String),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Key(key) => write!(f, "key {key:?}"),
            Location::Prefix(prefix) => write!(f, "prefix {prefix:?}"),
        }
    }
}

/// What to do while the key (or every key under the prefix) is missing.
#[derive(Debug, Clone)]
pub enum Missing<T> {
    /// These settings are in force (index 0) while the key is missing.
    Defaults(Arc<T>),
    /// Nothing before the key exists ([`Status::Waiting`]); after a deletion, the last good
    /// configuration stays ([`Status::KeyMissing`]).
    Wait,
}

/// How the configuration in force came to be, and whether the latest of Consul's answers
/// was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Nothing read yet, or ([`Missing::Wait`]) the key does not exist yet: no configuration.
    Waiting,
    /// The configuration in force is Consul's latest.
    Applied,
    /// The key is missing: the defaults are in force.
    Defaults,
    /// The key was deleted ([`Missing::Wait`]): the last good configuration stays.
    KeyMissing,
    /// Consul's latest value was refused: the last good configuration stays.
    Rejected {
        /// The key (or prefix) read.
        key: String,
        /// The index of the refused value.
        index: u64,
        /// Why: a decoding error, or what the validation said.
        reason: String,
    },
    /// Consul does not answer (or refuses the read): the last good configuration stays.
    Unreachable {
        /// The error, as the client reported it.
        error: String,
    },
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Waiting => f.write_str("waiting for the key"),
            Status::Applied => f.write_str("applied"),
            Status::Defaults => f.write_str("key missing: defaults in force"),
            Status::KeyMissing => f.write_str("key missing: last good in force"),
            Status::Rejected { key, index, reason } => {
                write!(f, "rejected {key} at index {index}: {reason}")
            }
            Status::Unreachable { error } => write!(f, "Consul unreachable: {error}"),
        }
    }
}

/// What a service reads: the configuration in force, the index it was read at, and the
/// status of the latest answer.
#[derive(Debug)]
pub struct Live<T> {
    /// The configuration in force; `None` only while waiting for the first one.
    pub config: Option<Arc<T>>,
    /// The Consul index of the configuration in force (`X-Consul-Index` of the read that
    /// brought it; 0 for defaults).
    pub index: u64,
    /// The latest answer's fate.
    pub status: Status,
}

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live {
            config: self.config.clone(),
            index: self.index,
            status: self.status.clone(),
        }
    }
}

/// What one read returned, before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raw {
    /// No key (or no key under the prefix).
    Missing,
    /// The configuration as JSON text (a key's value, or a prefix's tree).
    Json(Vec<u8>),
}

impl Raw {
    /// A key's answer.
    pub fn from_key(pair: Option<KVPair>) -> Raw {
        match pair {
            Some(pair) => Raw::Json(pair.value.unwrap_or_default()),
            None => Raw::Missing,
        }
    }

    /// A prefix's answer: its keys as one JSON tree (see the module's doc).
    pub fn from_prefix(prefix: &str, pairs: &[KVPair]) -> Raw {
        let mut root = Map::new();
        for pair in pairs {
            let path = pair.key.strip_prefix(prefix).unwrap_or(&pair.key);
            let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
            let Some((leaf, parents)) = parts.split_last() else {
                continue; // the prefix itself, or a "folder" key
            };
            let text = String::from_utf8_lossy(pair.value());
            let value = serde_json::from_str(&text).unwrap_or(Value::String(text.into_owned()));
            insert(&mut root, parents, leaf, value);
        }
        if root.is_empty() {
            return Raw::Missing;
        }
        Raw::Json(Value::Object(root).to_string().into_bytes())
    }
}

/// Put `value` at `parents/leaf` under `node`, making the objects on the way (a value
/// where an object is needed gives way to it).
fn insert(node: &mut Map<String, Value>, parents: &[&str], leaf: &str, value: Value) {
    match parents.split_first() {
        None => {
            node.insert(leaf.to_owned(), value);
        }
        Some((first, rest)) => {
            let entry = node
                .entry(first.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(child) = entry {
                insert(child, rest, leaf, value);
            }
        }
    }
}

/// What one answer or error did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new configuration was applied.
    Applied,
    /// A change was rejected (first time this value is seen).
    Rejected,
    /// The key is missing; the defaults took over, or the last good stays.
    Missing,
    /// Consul stopped answering (first error of an outage).
    Unreachable,
    /// The status changed with the configuration in force unchanged: Consul answers again,
    /// or a rejected change was reverted to the value in force.
    Recovered,
    /// Nothing to report.
    Nothing,
}

/// A user's check of a decoded configuration: `Err(reason)` refuses it.
pub type Validate<T> = Box<dyn Fn(&T) -> Result<(), String> + Send + Sync>;

/// The pure state machine: each answer is decoded, validated and applied or rejected; each
/// error keeps the last good configuration.
pub struct Applier<T> {
    location: Location,
    missing: Missing<T>,
    validate: Validate<T>,
    live: Live<T>,
    /// The raw form of the configuration in force (None: defaults or nothing).
    applied: Option<Vec<u8>>,
    /// The raw form of the last rejected value, so that it is logged once.
    rejected: Option<Vec<u8>>,
}

impl<T> fmt::Debug for Applier<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Applier")
            .field("location", &self.location)
            .field("index", &self.live.index)
            .field("status", &self.live.status)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> Applier<T> {
    /// A machine for `location`; nothing is in force until the first answer.
    pub fn new(location: Location, missing: Missing<T>, validate: Validate<T>) -> Self {
        Applier {
            location,
            missing,
            validate,
            live: Live {
                config: None,
                index: 0,
                status: Status::Waiting,
            },
            applied: None,
            rejected: None,
        }
    }

    /// What is in force now.
    pub fn live(&self) -> &Live<T> {
        &self.live
    }

    /// Account for an answer read at `index`.
    pub fn on_answer(&mut self, raw: Raw, index: u64) -> Event {
        let was_unreachable = matches!(self.live.status, Status::Unreachable { .. });
        let recovered = |event: Event| match event {
            Event::Nothing if was_unreachable => Event::Recovered,
            other => other,
        };
        let bytes = match raw {
            Raw::Missing => return recovered(self.on_missing()),
            Raw::Json(bytes) => bytes,
        };
        if self.applied.as_deref() == Some(bytes.as_slice()) {
            // The value in force, again (a rejected change reverted, Consul back).
            self.rejected = None;
            let back = self.live.status != Status::Applied;
            self.live.status = Status::Applied;
            return if back {
                Event::Recovered
            } else {
                Event::Nothing
            };
        }
        match self.check(&bytes) {
            Ok(config) => {
                self.live = Live {
                    config: Some(Arc::new(config)),
                    index,
                    status: Status::Applied,
                };
                self.applied = Some(bytes);
                self.rejected = None;
                Event::Applied
            }
            Err(reason) => {
                let again = self.rejected.as_deref() == Some(bytes.as_slice());
                let key = match &self.location {
                    Location::Key(key) | Location::Prefix(key) => key.clone(),
                };
                self.live.status = Status::Rejected { key, index, reason };
                self.rejected = Some(bytes);
                if again {
                    recovered(Event::Nothing)
                } else {
                    Event::Rejected
                }
            }
        }
    }

    /// Account for a failed read: the configuration in force stays. [`Event::Unreachable`]
    /// only for the first error of an outage.
    pub fn on_error(&mut self, error: &consul_api::Error) -> Event {
        let first = !matches!(self.live.status, Status::Unreachable { .. });
        self.live.status = Status::Unreachable {
            error: error.to_string(),
        };
        if first {
            Event::Unreachable
        } else {
            Event::Nothing
        }
    }

    fn on_missing(&mut self) -> Event {
        self.rejected = None;
        let status = match &self.missing {
            Missing::Defaults(defaults) => {
                self.applied = None;
                self.live.config = Some(defaults.clone());
                self.live.index = 0;
                Status::Defaults
            }
            Missing::Wait if self.live.config.is_none() => Status::Waiting,
            Missing::Wait => Status::KeyMissing,
        };
        if self.live.status == status {
            return Event::Nothing;
        }
        self.live.status = status;
        Event::Missing
    }

    /// Decode and validate.
    fn check(&self, bytes: &[u8]) -> Result<T, String> {
        let config: T = serde_json::from_slice(bytes).map_err(|e| format!("not valid: {e}"))?;
        (self.validate)(&config)?;
        Ok(config)
    }
}

/// Everything [`spawn`] needs: where, what while missing, the check, and Consul's options.
pub struct ConfigSpec<T> {
    /// Where the configuration lives.
    pub location: Location,
    /// What while it is missing.
    pub missing: Missing<T>,
    /// The service's check of every change.
    pub validate: Validate<T>,
    /// Options of every read (datacenter, consistency).
    pub query: QueryOptions,
    /// How long one blocking read waits at most (5 minutes by default).
    pub wait: Duration,
}

impl<T> fmt::Debug for ConfigSpec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpec")
            .field("location", &self.location)
            .field("query", &self.query)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl<T> ConfigSpec<T> {
    /// The configuration in `key` (JSON), waiting for the key while it is missing, every
    /// change accepted once it decodes.
    pub fn key(key: impl Into<String>) -> Self {
        ConfigSpec::at(Location::Key(key.into()))
    }

    /// The configuration under `prefix`, one key per field (see the module's doc).
    pub fn prefix(prefix: impl Into<String>) -> Self {
        ConfigSpec::at(Location::Prefix(prefix.into()))
    }

    fn at(location: Location) -> Self {
        ConfigSpec {
            location,
            missing: Missing::Wait,
            validate: Box::new(|_| Ok(())),
            query: QueryOptions::default(),
            wait: Duration::from_secs(300),
        }
    }

    /// While the key is missing, `defaults` are in force.
    pub fn with_defaults(mut self, defaults: T) -> Self {
        self.missing = Missing::Defaults(Arc::new(defaults));
        self
    }

    /// Every change must pass `check` (`Err(reason)` refuses it) before it is applied.
    pub fn with_validation(
        mut self,
        check: impl Fn(&T) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validate = Box::new(check);
        self
    }

    /// Blocking reads wait at most `wait`.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

/// Follow the configuration `spec` designates through `client`; returns the receiving end,
/// which changes whenever what is in force or its status changes. Must be called within a
/// tokio runtime; the task ends when every receiver is dropped.
pub fn spawn<T>(client: Client, spec: ConfigSpec<T>) -> watch::Receiver<Live<T>>
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    let location = spec.location.clone();
    let fetch = move |opts: QueryOptions| {
        let client = client.clone();
        let location = location.clone();
        async move {
            match &location {
                Location::Key(key) => {
                    let (pair, meta) = client.kv().get(key, &opts).await?;
                    Ok((Raw::from_key(pair), meta))
                }
                Location::Prefix(prefix) => {
                    let (pairs, meta) = client.kv().list(prefix, &opts).await?;
                    Ok((Raw::from_prefix(prefix, &pairs), meta))
                }
            }
        }
    };
    let applier = Applier::new(spec.location, spec.missing, spec.validate);
    let (tx, rx) = watch::channel(applier.live().clone());
    let watch = Watch::new(spec.query, spec.wait);
    tokio::spawn(follow(fetch, applier, watch, tx, Backoff::consul()));
    rx
}

/// Configuration's error policy: every error is retried, always. A refusal (a 403: a token
/// that may not read the key) is reported as [`Status::Unreachable`] like an outage, and the
/// last good configuration stays until the token is fixed; nothing ends the loop but its
/// receivers going away.
const CLASSIFY: Classify = Classify::ALL;

/// The loop, on the one watch loop [`Follow`]: read, apply or reject, publish; on an error,
/// keep what is in force (the [`Follow`] resets the watch and backs off). Ends when every
/// receiver is gone.
async fn follow<T, F, Fut>(
    fetch: F,
    mut applier: Applier<T>,
    watch: Watch,
    tx: watch::Sender<Live<T>>,
    backoff: Backoff,
) where
    T: DeserializeOwned,
    F: FnMut(QueryOptions) -> Fut,
    Fut: Future<Output = consul_api::Result<(Raw, consul_api::QueryMeta)>>,
{
    let location = applier.location.to_string();
    let mut follow = Follow::new(watch, Retry::new(CLASSIFY, backoff), fetch);
    loop {
        let step = tokio::select! {
            step = follow.next() => step,
            () = tx.closed() => return,
        };
        let (event, fatal) = match step {
            FollowEvent::Changed { value, meta, .. } => {
                (applier.on_answer(value, meta.last_index), false)
            }
            FollowEvent::Unreachable(retrying) => (applier.on_error(&retrying.error), false),
            // Not with this policy; kept for the day it changes: say so, and stop.
            FollowEvent::Fatal(error) => (applier.on_error(&error), true),
            // No refusal check is set.
            FollowEvent::Refused { .. } => (Event::Nothing, false),
        };
        log(&location, &applier.live, &event);
        if event != Event::Nothing {
            tx.send_replace(applier.live.clone());
        }
        if fatal {
            tracing::error!(%location, "configuration watch stopped; the last good stays");
            return;
        }
    }
}

/// One line per event: an error for a rejection, a warning for an outage.
fn log<T>(location: &str, live: &Live<T>, event: &Event) {
    let index = live.index;
    match (event, &live.status) {
        (Event::Applied, _) => tracing::info!(%location, index, "configuration applied"),
        (
            Event::Rejected,
            Status::Rejected {
                key,
                index: at,
                reason,
            },
        ) => tracing::error!(
            key = %key,
            index = at,
            in_force = index,
            %reason,
            "configuration change REJECTED: the last good configuration stays in force"
        ),
        (Event::Missing, status) => tracing::warn!(%location, index, "{status}"),
        (Event::Unreachable, status) => {
            tracing::warn!(%location, index, "{status}; the configuration in force stays")
        }
        (Event::Recovered, status) => tracing::info!(%location, index, "{status}"),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Settings {
        limit: u32,
        #[serde(default)]
        name: String,
    }

    fn positive() -> Validate<Settings> {
        Box::new(|s: &Settings| {
            if s.limit == 0 {
                Err("limit must be at least 1".into())
            } else {
                Ok(())
            }
        })
    }

    fn json(text: &str) -> Raw {
        Raw::Json(text.as_bytes().to_vec())
    }

    fn limit(a: &Applier<Settings>) -> Option<u32> {
        a.live().config.as_ref().map(|c| c.limit)
    }

    fn unreachable() -> consul_api::Error {
        consul_api::Error::Transport {
            method: "GET",
            url: "http://127.0.0.1:8500".into(),
            path: "/v1/kv/app".into(),
            reason: "cannot connect".into(),
            timeout: false,
        }
    }

    #[test]
    fn a_valid_change_is_applied_and_an_invalid_one_rejected_keeping_the_last_good() {
        let mut a = Applier::new(Location::Key("app".into()), Missing::Wait, positive());
        assert_eq!(a.live().status, Status::Waiting);
        assert_eq!(a.on_answer(json(r#"{"limit": 5}"#), 10), Event::Applied);
        assert_eq!((limit(&a), a.live().index), (Some(5), 10));

        assert_eq!(a.on_answer(json(r#"{"limit": 0}"#), 11), Event::Rejected);
        assert_eq!(
            (limit(&a), a.live().index),
            (Some(5), 10),
            "last good stays"
        );
        let Status::Rejected { key, index, reason } = &a.live().status else {
            panic!("{:?}", a.live().status);
        };
        assert_eq!((key.as_str(), *index), ("app", 11));
        assert!(reason.contains("at least 1"), "{reason}");

        // The same bad value again (an index moved elsewhere): still rejected, logged once.
        assert_eq!(a.on_answer(json(r#"{"limit": 0}"#), 12), Event::Nothing);
        assert!(matches!(
            a.live().status,
            Status::Rejected { index: 12, .. }
        ));

        assert_eq!(a.on_answer(json("not json"), 13), Event::Rejected);
        assert!(
            matches!(&a.live().status, Status::Rejected { reason, .. } if reason.contains("not valid"))
        );

        // Reverted to the value in force: applied again, nothing new applied.
        assert_eq!(a.on_answer(json(r#"{"limit": 5}"#), 14), Event::Recovered);
        assert_eq!(
            (a.live().status.clone(), a.live().index),
            (Status::Applied, 10)
        );
        assert_eq!(a.on_answer(json(r#"{"limit": 7}"#), 15), Event::Applied);
        assert_eq!((limit(&a), a.live().index), (Some(7), 15));
    }

    #[test]
    fn consul_unreachable_keeps_the_last_good_and_says_so_once() {
        let mut a = Applier::new(Location::Key("app".into()), Missing::Wait, positive());
        a.on_answer(json(r#"{"limit": 5}"#), 10);
        assert_eq!(a.on_error(&unreachable()), Event::Unreachable);
        assert_eq!(a.on_error(&unreachable()), Event::Nothing);
        assert_eq!(limit(&a), Some(5));
        assert!(matches!(a.live().status, Status::Unreachable { .. }));
        assert_eq!(a.on_answer(json(r#"{"limit": 5}"#), 3), Event::Recovered);
        assert_eq!(a.live().status, Status::Applied);
    }

    #[test]
    fn a_missing_key_means_waiting_or_defaults_as_chosen() {
        let mut wait = Applier::new(Location::Key("app".into()), Missing::Wait, positive());
        assert_eq!(
            wait.on_answer(Raw::Missing, 3),
            Event::Nothing,
            "still waiting"
        );
        assert_eq!(
            (wait.live().status.clone(), limit(&wait)),
            (Status::Waiting, None)
        );
        wait.on_answer(json(r#"{"limit": 5}"#), 4);
        assert_eq!(wait.on_answer(Raw::Missing, 5), Event::Missing, "deleted");
        assert_eq!(
            (wait.live().status.clone(), limit(&wait)),
            (Status::KeyMissing, Some(5))
        );

        let defaults = Missing::Defaults(Arc::new(Settings {
            limit: 1,
            name: "default".into(),
        }));
        let mut d = Applier::new(Location::Key("app".into()), defaults, positive());
        assert_eq!(d.on_answer(Raw::Missing, 3), Event::Missing);
        assert_eq!(
            (d.live().status.clone(), limit(&d), d.live().index),
            (Status::Defaults, Some(1), 0)
        );
        assert_eq!(d.on_answer(Raw::Missing, 4), Event::Nothing);
        d.on_answer(json(r#"{"limit": 9}"#), 5);
        assert_eq!(limit(&d), Some(9));
        assert_eq!(
            d.on_answer(Raw::Missing, 6),
            Event::Missing,
            "deleted: defaults again"
        );
        assert_eq!(
            (d.live().status.clone(), limit(&d)),
            (Status::Defaults, Some(1))
        );
        // The value that was in force comes back: applied again (the defaults replaced it).
        assert_eq!(d.on_answer(json(r#"{"limit": 9}"#), 7), Event::Applied);
    }

    #[test]
    fn a_prefix_reads_as_one_tree() {
        let pair = |key: &str, value: &str| KVPair {
            key: key.into(),
            value: Some(value.as_bytes().to_vec()),
            ..Default::default()
        };
        let raw = Raw::from_prefix(
            "app/",
            &[
                pair("app/", ""),
                pair("app/limit", "10"),
                pair("app/name", "billing"),
                pair("app/db/url", "postgres://db"),
                pair("app/db/pool", "4"),
            ],
        );
        let Raw::Json(bytes) = raw else {
            panic!("a tree");
        };
        let tree: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            tree,
            serde_json::json!({"limit": 10, "name": "billing",
                               "db": {"url": "postgres://db", "pool": 4}})
        );
        assert_eq!(Raw::from_prefix("app/", &[pair("app/", "")]), Raw::Missing);
        assert_eq!(Raw::from_prefix("app/", &[]), Raw::Missing);

        let mut a = Applier::new(Location::Prefix("app/".into()), Missing::Wait, positive());
        assert_eq!(a.on_answer(Raw::Json(bytes), 20), Event::Applied);
        assert_eq!(
            a.live().config.as_deref(),
            Some(&Settings {
                limit: 10,
                name: "billing".into()
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_publishes_changes_keeps_the_last_good_through_errors_and_ends_with_its_receivers()
     {
        let answers = std::sync::Arc::new(std::sync::Mutex::new(
            vec![
                Ok((json(r#"{"limit": 5}"#), 10)),
                Err(unreachable()),
                Ok((json(r#"{"limit": 0}"#), 11)),
                Ok((json(r#"{"limit": 6}"#), 12)),
            ]
            .into_iter(),
        ));
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let fetch = {
            let answers = answers.clone();
            let asked = asked.clone();
            move |opts: QueryOptions| {
                if let Ok(mut asked) = asked.lock() {
                    asked.push((opts.wait_index, tokio::time::Instant::now()));
                }
                let next = answers.lock().ok().and_then(|mut a| a.next());
                async move {
                    match next {
                        Some(Ok((raw, index))) => Ok((
                            raw,
                            consul_api::QueryMeta {
                                last_index: index,
                                ..Default::default()
                            },
                        )),
                        Some(Err(e)) => Err(e),
                        None => std::future::pending().await,
                    }
                }
            }
        };
        let applier = Applier::new(Location::Key("app".into()), Missing::Wait, positive());
        let (tx, mut rx) = watch::channel(applier.live().clone());
        let watch = Watch::new(QueryOptions::default(), Duration::from_secs(60));
        let task = tokio::spawn(follow(fetch, applier, watch, tx, Backoff::consul()));
        let mut seen = Vec::new();
        while seen.len() < 4 {
            rx.changed().await.unwrap();
            let live = rx.borrow_and_update().clone();
            seen.push((live.config.map(|c| c.limit), live.index, live.status));
        }
        assert_eq!(seen[0], (Some(5), 10, Status::Applied));
        assert!(matches!(seen[1], (Some(5), 10, Status::Unreachable { .. })));
        assert!(matches!(
            seen[2],
            (Some(5), 10, Status::Rejected { index: 11, .. })
        ));
        assert_eq!(seen[3], (Some(6), 12, Status::Applied));
        {
            // The one loop's rules: after the outage the watch starts over (index 0) and the
            // read waits a backoff delay first.
            let asked = asked.lock().unwrap();
            let indexes: Vec<u64> = asked.iter().map(|(index, _)| *index).collect();
            assert_eq!(indexes[..4], [0, 10, 0, 11], "{indexes:?}");
            let gap = asked[2].1 - asked[1].1;
            assert!(gap >= Duration::from_millis(100), "backed off: {gap:?}");
        }
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ends with its receivers")
            .unwrap();
    }
}
