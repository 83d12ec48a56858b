//! Discovery: one task that follows a service's passing instances with Consul blocking queries
//! (`/v1/health/service/<name>?passing`, or another [`Source`]) and publishes each result as a
//! [`Snapshot`] on a `tokio::sync::watch` channel. It exits when every receiver is gone.
//!
//! When Consul does not answer, the last known instances stay published (marked
//! [`ConsulState::Unreachable`]), the task keeps trying with jittered backoff, and it logs once
//! per state change, not once per retry. A refusal before any answer (a refused token (403),
//! an invalid or unknown query, a TLS failure) ends it with [`ConsulState::Failed`]. A refusal
//! after Consul has answered (a token rotated or revoked, an agent restarted without it or
//! reloaded to HTTPS, a certificate rotated to a CA not trusted yet, a prepared query deleted
//! and created again) is logged as an error and retried with backoff like an outage: the last
//! known instances stay published meanwhile
//! ([`consul_api::Error::is_retryable_after_success`]).
//!
//! Reads use the [`Consistency`] mode of [`DiscoveryConfig::consistency`]. A `stale` read is
//! answered by any server, also without a leader; [`DiscoveryConfig::max_stale`] bounds how
//! old such an answer may be: one whose `X-Consul-LastContact` exceeds the bound is not
//! applied (the last known instances stay, marked unreachable with the staleness as the
//! error) and the read is retried with backoff, like an outage.
//!
//! With [`DiscoveryConfig::rate_limit`] the loop reads at most at that rate (a token bucket);
//! changes that land in between are coalesced into the next answer, never dropped.
//!
//! The loop itself (backoff, reset, which error is fatal, what is news, the rate limit) is
//! consul-api's one [`Follow`]; this module says what each of its events publishes.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use consul_api::{
    Classify, Consistency, Event, Follow, QueryMeta, QueryOptions, RateLimit, Retried, Retry,
    Retrying, ServiceEntry, error::Error as ConsulError,
};
use tokio::sync::watch;

pub use crate::source::Source;
use crate::{
    backoff::Backoff,
    damping::{Damper, Damping},
    source::Reader,
};

/// One passing instance of the service, as Consul lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Instance {
    /// The service ID (`servernode_1`).
    pub id: String,
    /// The node it is registered on.
    pub node: String,
    /// Host to dial: the service's address, or its node's when the service has none.
    pub host: String,
    /// Port to dial.
    pub port: u16,
    /// The service's tags.
    pub tags: Vec<String>,
    /// The service's metadata.
    pub meta: BTreeMap<String, String>,
    /// The service's weight while passing (Consul's `Weights.Passing`; 1 when it sets none).
    pub weight: u32,
}

impl Instance {
    /// A hand-made instance (tests, fixed sets).
    pub fn new(id: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        Instance {
            id: id.into(),
            node: String::new(),
            host: host.into(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weight: 1,
        }
    }

    /// The instance a health entry describes.
    pub fn from_entry(entry: &ServiceEntry) -> Self {
        let service = &entry.service;
        Instance {
            id: service.id.clone(),
            node: entry.node.node.clone(),
            host: entry.address().to_owned(),
            port: service.port,
            tags: service.tags().to_vec(),
            meta: service.meta.clone().unwrap_or_default(),
            weight: service.weights.unwrap_or_default().passing,
        }
    }

    /// `host:port`, with brackets around an IPv6 host.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Instance {
    /// `id@host:port`, or only `host:port` when the address is the ID (DNS answers).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = self.address();
        if self.id == address {
            f.write_str(&address)
        } else {
            write!(f, "{}@{address}", self.id)
        }
    }
}

/// How discovery stands with Consul.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsulState {
    /// No answer yet.
    #[default]
    Starting,
    /// The last query was answered.
    Reachable,
    /// Consul stopped answering (or refused a read that had worked) at `since`; the
    /// instances are the last known ones.
    Unreachable {
        /// When the first failed read ended.
        since: SystemTime,
        /// The last error, as text.
        error: String,
    },
    /// Discovery stopped for good: refused before any answer (token, invalid query, TLS).
    Failed {
        /// The error with a hint at what to check; the error itself is [`Snapshot::cause`].
        error: String,
    },
}

/// What discovery knows at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The passing instances, sorted by ID. An instance that did not change between two
    /// answers is the same `Arc` in both snapshots (its entry was not even parsed again).
    pub instances: Arc<[Arc<Instance>]>,
    /// How discovery stands with Consul.
    pub consul: ConsulState,
    /// When this snapshot was published.
    pub at: SystemTime,
    /// When the instance set last changed (or was first learned).
    pub changed_at: SystemTime,
    /// Consul's index of the answer the instances come from (0: none yet).
    pub index: u64,
    /// Counts published snapshots, from 0.
    pub version: u64,
    /// When the answer the instances come from began to arrive (its headers; for DNS, when
    /// the lookup returned).
    pub received_at: SystemTime,
    /// When that answer had arrived whole (its body read to the end; else `received_at`):
    /// `at - read_at` is what the client added to propagation once Consul's answer was in
    /// (decoding, building the view); `read_at - received_at` is the body's transfer, Consul
    /// sending and the client reading.
    pub read_at: SystemTime,
    /// Consul's error, when discovery failed for good: its kind and source chain.
    pub cause: Option<Arc<consul_api::Error>>,
    /// Instances Consul lists passing that flap damping holds out of `instances`
    /// ([`DiscoveryConfig::damping`]; always 0 without it).
    pub held_out: usize,
}

impl Snapshot {
    /// Nothing known yet.
    pub fn starting() -> Self {
        let now = SystemTime::now();
        Snapshot {
            instances: Arc::from(Vec::new()),
            consul: ConsulState::Starting,
            at: now,
            changed_at: now,
            index: 0,
            version: 0,
            received_at: now,
            read_at: now,
            cause: None,
            held_out: 0,
        }
    }

    /// A fixed set, as if Consul had answered with it (tests, benches, static configuration).
    pub fn fixed(instances: Vec<Instance>) -> Self {
        let mut s = Snapshot::starting();
        s.instances = sorted(instances);
        s.consul = ConsulState::Reachable;
        s
    }

    /// This snapshot's successor with `instances` (a new answer from Consul, received at
    /// `received_at`).
    pub fn with_instances<I: Into<Arc<Instance>>>(
        &self,
        instances: impl IntoIterator<Item = I>,
        index: u64,
        received_at: SystemTime,
    ) -> Self {
        let now = SystemTime::now();
        let instances = sorted(instances);
        let changed = instances != self.instances || self.consul == ConsulState::Starting;
        Snapshot {
            instances,
            consul: ConsulState::Reachable,
            at: now,
            changed_at: if changed { now } else { self.changed_at },
            index,
            version: self.version + 1,
            received_at,
            read_at: received_at,
            cause: None,
            held_out: 0,
        }
    }

    /// This snapshot's successor in another Consul state, instances kept.
    pub fn with_state(&self, consul: ConsulState) -> Self {
        Snapshot {
            consul,
            at: SystemTime::now(),
            version: self.version + 1,
            ..self.clone()
        }
    }

    /// The permanent error, if discovery has failed for good.
    pub fn failure(&self) -> Option<&str> {
        match &self.consul {
            ConsulState::Failed { error } => Some(error),
            _ => None,
        }
    }

    /// A short account of why no instance may be available, for error messages.
    pub fn describe(&self, service: &str) -> String {
        match &self.consul {
            ConsulState::Starting => format!("no answer from Consul yet about {service:?}"),
            ConsulState::Failed { error } => error.clone(),
            ConsulState::Unreachable { error, .. } if self.instances.is_empty() => {
                format!("Consul is unreachable and no instance of {service:?} is known ({error})")
            }
            _ if self.instances.is_empty() => {
                format!(
                    "Consul lists no passing instance of {service:?} (with ACLs on, a token \
                     without service:read and node:read sees an empty list, not an error)"
                )
            }
            _ => format!(
                "{} passing instance(s) of {service:?}",
                self.instances.len()
            ),
        }
    }
}

fn sorted<I: Into<Arc<Instance>>>(instances: impl IntoIterator<Item = I>) -> Arc<[Arc<Instance>]> {
    let mut instances: Vec<Arc<Instance>> = instances.into_iter().map(Into::into).collect();
    // Consul lists by node, then ID: nearly sorted already, which the sort notices.
    instances.sort_by(|a, b| {
        (a.id.as_str(), a.host.as_str(), a.port).cmp(&(b.id.as_str(), b.host.as_str(), b.port))
    });
    instances.dedup();
    Arc::from(instances)
}

/// What to follow and how.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// The service name.
    pub service: String,
    /// Only instances with this tag.
    pub tag: Option<String>,
    /// Ask this datacenter instead of the agent's own.
    pub datacenter: Option<String>,
    /// How long one blocking query waits for a change (Consul caps it at 10 minutes).
    pub wait: Duration,
    /// Which of Consul's interfaces to read (default: passing-only health blocking queries).
    pub source: Source,
    /// Which server may answer (`default`: the leader; `stale`: any server, also during an
    /// election or without quorum; `consistent`: the leader after a quorum check). Stale by
    /// default: measured on a 3-server cluster (`testbed cluster`), stale reads never failed
    /// through a leader loss or a lost quorum and were never less current than default
    /// reads, which failed for the whole election (11–15 s).
    pub consistency: Consistency,
    /// The oldest answer applied: an answer whose `X-Consul-LastContact` (how long ago the
    /// answering server last heard from the leader) exceeds this is treated as an outage.
    /// `None`: any age. Only `stale` reads can be that old.
    pub max_stale: Option<Duration>,
    /// Read through the local agent's cache (`?cached`, health and catalog sources): one
    /// upstream query per agent, shared by all its clients. Off by default: the agent
    /// notices a revoked token only when its background refresh of the entry returns (the
    /// next change, or up to 10 minutes), where an uncached read sees the 403 at once.
    pub cached: bool,
    /// A server-side filter expression (`filter`, e.g. `Service.Meta.version == "2"`),
    /// applied by Consul before the answer is sent.
    pub filter: Option<String>,
    /// Client-side flap damping ([`crate::damping`]): an instance that keeps leaving and
    /// returning is held out of the published instances for a growing hold-down, never
    /// every instance. Off (`None`) by default: a held-out instance is one Consul lists
    /// passing, the view lags Consul by a hold-down after flapping stops, and where Consul
    /// records no flap (loss and partitions between agents, `testbed partitions` d) there is
    /// nothing to damp; turn it on for services whose checks flap (`testbed partitions`
    /// f measures what it removes).
    pub damping: Option<Damping>,
    /// Bound the loop's read rate, as Consul's documentation on blocking queries recommends:
    /// a token bucket ([`RateLimit`]: `burst` reads back to back after a quiet spell, about
    /// 2, then `per_second`). What it trades: while the service churns faster than the rate,
    /// the changes that land between two reads are coalesced into the next answer (the
    /// blocking read on the old index returns the latest state at once: the last change is
    /// always read, the ones in between may never be seen) and a change waits up to
    /// `1 / per_second` for its read, against Consul rendering one answer per client per
    /// read instead of per change. It bounds every source's reads: a blocking source's
    /// query, each composition of [`Source::Composed`] (whose watches are read once per
    /// composition), and a polled source's period when the limit is the slower. `None` (the
    /// default): read again as soon as an answer is in.
    pub rate_limit: Option<RateLimit>,
}

impl DiscoveryConfig {
    /// Follow `service` in the agent's datacenter, any tag, blocking up to 60 s per query,
    /// reading stale (any server answers), with no bound on staleness.
    pub fn new(service: impl Into<String>) -> Self {
        DiscoveryConfig {
            service: service.into(),
            tag: None,
            datacenter: None,
            wait: Duration::from_secs(60),
            source: Source::Health,
            consistency: Consistency::Stale,
            max_stale: None,
            cached: false,
            filter: None,
            damping: None,
            rate_limit: None,
        }
    }
}

/// Start following `config.service` through `client`; returns the receiving end. Must be
/// called within a tokio runtime. The task ends when every receiver is dropped.
pub fn spawn(client: consul_api::Client, config: DiscoveryConfig) -> watch::Receiver<Snapshot> {
    let (tx, rx) = watch::channel(Snapshot::starting());
    tokio::spawn(async move {
        let reader = Reader::new(client, config.clone());
        let fetch = move |opts: QueryOptions| {
            let reader = reader.clone();
            async move { reader.read(opts).await }
        };
        follow(fetch, tx, config, Backoff::consul()).await;
    });
    rx
}

/// Discovery's error policy: before the first answer only transient errors are retried (a
/// refusal most likely means our configuration is wrong: fail fast, say why); after it,
/// every refusal is retried (a token rotated, an agent reloaded to HTTPS, a prepared query
/// created again), all but a configuration error.
const CLASSIFY: Classify = Classify {
    before_success: Retried::Transient,
    after_success: Retried::AllButConfig,
};

/// The discovery loop, over any `fetch` of instances (tests pass a scripted one).
pub(crate) async fn follow<F, Fut>(
    fetch: F,
    tx: watch::Sender<Snapshot>,
    config: DiscoveryConfig,
    backoff: Backoff,
) where
    F: FnMut(QueryOptions) -> Fut,
    Fut: Future<Output = consul_api::Result<(Vec<Arc<Instance>>, QueryMeta)>>,
{
    let base = QueryOptions {
        datacenter: config.datacenter.clone(),
        consistency: config.consistency,
        cached: config.cached,
        filter: config.filter.clone(),
        ..Default::default()
    };
    // With a bound on staleness, block at most that long: a server cut off from its leader
    // sees no change, and its answer's age is only known when it answers.
    let wait = config.max_stale.map_or(config.wait, |bound| {
        config.wait.min(bound.max(MIN_STALE_WAIT))
    });
    let max_stale = config.max_stale;
    let mut follow = Follow::new(
        config.source.watch(base, wait),
        Retry::new(CLASSIFY, backoff),
        fetch,
    )
    .refusing(move |meta| too_stale(meta, max_stale).is_some());
    if let Some(limit) = config.rate_limit {
        follow = follow.limited(limit);
    }
    let service = config.service.as_str();
    let mut damper = config.damping.clone().map(Damper::new);
    // Consul's last passing set, before damping (applied again when a hold-down ends).
    let mut passing: Vec<Arc<Instance>> = Vec::new();
    loop {
        let release = damper.as_ref().and_then(Damper::next_release);
        let event = tokio::select! {
            event = follow.next() => event,
            () = tx.closed() => return,
            () = until(release) => {
                if let Some(damper) = damper.as_mut() {
                    let verdict = damper.update(&passing, tokio::time::Instant::now());
                    log_damping(service, &verdict);
                    publish(&tx, |s| Snapshot {
                        held_out: verdict.held_out,
                        read_at: s.read_at,
                        ..s.with_instances(verdict.view, s.index, s.received_at)
                    });
                }
                continue;
            }
        };
        match event {
            // Not applied: the last known instances stay, and the read is retried.
            Event::Refused { meta, news, .. } => {
                let Some((age_ms, bound)) = too_stale(&meta, max_stale) else {
                    continue;
                };
                if news {
                    let error = format!(
                        "the answering server last heard from a leader {age_ms} ms ago, more \
                         than max_stale {bound:?}; answer not applied"
                    );
                    tracing::warn!(service, "{error}; keeping the last known instances");
                    publish(&tx, |s| {
                        s.with_state(ConsulState::Unreachable {
                            since: SystemTime::now(),
                            error,
                        })
                    });
                }
            }
            Event::Changed {
                value: instances,
                meta,
                answered,
            } => {
                if answered.news {
                    tracing::info!(service, passing = instances.len(), "Consul answers");
                }
                let received_at = meta.received_at.unwrap_or_else(SystemTime::now);
                let read_at = meta.read_at.unwrap_or(received_at);
                let (instances, held_out) = match damper.as_mut() {
                    Some(damper) => {
                        let verdict = damper.update(&instances, tokio::time::Instant::now());
                        log_damping(service, &verdict);
                        passing = instances;
                        (verdict.view, verdict.held_out)
                    }
                    None => (instances, 0),
                };
                publish(&tx, |s| Snapshot {
                    read_at,
                    held_out,
                    ..s.with_instances(instances, meta.last_index, received_at)
                });
                let now = tx.borrow();
                if now.changed_at == now.at {
                    tracing::info!(service, "passing: {}", listing(&now.instances));
                }
            }
            // Retried with backoff (a refusal only once Consul has answered: a token
            // rotated, an agent reloaded to HTTPS, a prepared query created again); each new
            // kind of failure is published once.
            Event::Unreachable(Retrying {
                error: e,
                news: true,
                ..
            }) => {
                if !e.is_retryable() {
                    tracing::error!(
                        service,
                        state = %e.kind(),
                        "Consul refused a read that had worked ({}); keeping the last known \
                         instances and retrying with backoff",
                        permanent_message(&e)
                    );
                } else {
                    tracing::warn!(
                        service,
                        state = %e.kind(),
                        "Consul does not answer ({e}); keeping the last known instances and \
                         retrying with backoff"
                    );
                }
                let error = e.to_string();
                publish(&tx, |s| {
                    s.with_state(ConsulState::Unreachable {
                        since: SystemTime::now(),
                        error,
                    })
                });
            }
            Event::Unreachable(_) => {}
            Event::Fatal(e) => {
                let error = permanent_message(&e);
                tracing::error!(service, "{error}");
                let cause = Arc::new(e);
                publish(&tx, |s| Snapshot {
                    cause: Some(cause),
                    ..s.with_state(ConsulState::Failed { error })
                });
                return;
            }
        }
    }
}

/// Until `at`; never without it.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Each instance damping held out or let back in, at info.
fn log_damping(service: &str, verdict: &crate::damping::Verdict) {
    for (instance, hold_down) in &verdict.held {
        tracing::info!(
            service,
            instance = %instance,
            ?hold_down,
            held_out = verdict.held_out,
            "flapping: held out of the view"
        );
    }
    for instance in &verdict.released {
        tracing::info!(service, instance = %instance, "flap hold-down over: back in the view");
    }
}

/// The instances for a log line: every one up to [`LISTED`], then how many more (a line per
/// change must not grow with thousands of instances).
fn listing(instances: &[Arc<Instance>]) -> String {
    let mut listed: Vec<String> = instances
        .iter()
        .take(LISTED)
        .map(|i| i.to_string())
        .collect();
    if instances.len() > LISTED {
        listed.push(format!("... {} more", instances.len() - LISTED));
    }
    format!("[{}] ({})", listed.join(", "), instances.len())
}

/// How many instances a log line names.
const LISTED: usize = 8;

/// The shortest blocking wait used to check staleness.
const MIN_STALE_WAIT: Duration = Duration::from_secs(1);

/// `Some((age in ms, bound))` when `meta` says the answer is older than `max_stale`.
fn too_stale(meta: &QueryMeta, max_stale: Option<Duration>) -> Option<(u64, Duration)> {
    let bound = max_stale?;
    (u128::from(meta.last_contact_ms) > bound.as_millis()).then_some((meta.last_contact_ms, bound))
}

fn publish(tx: &watch::Sender<Snapshot>, next: impl FnOnce(&Snapshot) -> Snapshot) {
    tx.send_modify(|s| *s = next(s));
}

fn permanent_message(e: &ConsulError) -> String {
    if e.is_permission_denied() {
        format!("{e}; the token needs service:read on the service and node:read")
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use consul_api::{AgentService, Node, error::ErrorKind};

    use super::*;

    fn entry(id: &str, service_addr: &str, node_addr: &str, port: u16) -> ServiceEntry {
        ServiceEntry {
            node: Node {
                node: "vm".into(),
                address: node_addr.into(),
                ..Default::default()
            },
            service: AgentService {
                id: id.into(),
                service: "servernode".into(),
                address: service_addr.into(),
                port,
                ..Default::default()
            },
            checks: Vec::new(),
        }
    }

    fn unreachable() -> ConsulError {
        ConsulError::Transport {
            method: "GET",
            url: "http://127.0.0.1:1".into(),
            path: "/v1/health/service/servernode".into(),
            reason: "cannot connect".into(),
            timeout: false,
        }
    }

    fn status(code: u16) -> ConsulError {
        ConsulError::Status {
            method: "GET",
            path: "/v1/health/service/servernode".into(),
            status: code,
            message: "x".into(),
        }
    }

    fn denied() -> ConsulError {
        ConsulError::PermissionDenied {
            method: "GET",
            path: "/v1/health/service/servernode".into(),
            message: "ACL not found".into(),
        }
    }

    fn meta(index: u64) -> QueryMeta {
        QueryMeta {
            last_index: index,
            ..Default::default()
        }
    }

    #[test]
    fn instances_come_from_entries() {
        let a = Instance::from_entry(&entry("a", "", "10.0.0.9", 1));
        assert_eq!(
            a.address(),
            "10.0.0.9:1",
            "node address when the service has none"
        );
        let b = Instance::from_entry(&entry("b", "127.0.0.1", "10.0.0.9", 2));
        assert_eq!(b.address(), "127.0.0.1:2");
        assert_eq!(Instance::new("c", "::1", 3).address(), "[::1]:3");
        assert_eq!(b.to_string(), "b@127.0.0.1:2");
        let mut by_dns = Instance::new("", "127.0.0.1", 3);
        by_dns.id = by_dns.address();
        assert_eq!(
            by_dns.to_string(),
            "127.0.0.1:3",
            "no ID of its own: the address once"
        );
        assert_eq!(b.weight, 1, "Consul's default weight when it sends none");

        let mut tagged = entry("t", "127.0.0.1", "", 4);
        tagged.service.tags = Some(vec!["v2".into()]);
        tagged.service.meta = Some(BTreeMap::from([("zone".into(), "a".into())]));
        tagged.service.weights = Some(consul_api::AgentWeights {
            passing: 10,
            warning: 1,
        });
        let t = Instance::from_entry(&tagged);
        assert_eq!((t.tags.as_slice(), t.weight), (&["v2".to_string()][..], 10));
        assert_eq!(t.meta.get("zone").map(String::as_str), Some("a"));
    }

    #[test]
    fn snapshots_sort_and_remember_when_the_set_changed() {
        let first = Snapshot::starting().with_instances(
            vec![
                Instance::new("b", "127.0.0.1", 2),
                Instance::new("a", "127.0.0.1", 1),
            ],
            5,
            SystemTime::now(),
        );
        assert_eq!(first.instances[0].id, "a");
        assert_eq!(first.version, 1);
        assert_eq!(first.changed_at, first.at);
        let same = first.with_instances(
            vec![
                Instance::new("a", "127.0.0.1", 1),
                Instance::new("b", "127.0.0.1", 2),
            ],
            6,
            SystemTime::now(),
        );
        assert_eq!(same.changed_at, first.changed_at, "same set: not a change");
        let down = same.with_state(ConsulState::Unreachable {
            since: SystemTime::now(),
            error: "x".into(),
        });
        assert_eq!(
            down.instances.len(),
            2,
            "instances survive Consul going away"
        );
        assert!(down.describe("servernode").contains("2 passing"));
        assert!(
            Snapshot::fixed(vec![])
                .describe("servernode")
                .contains("no passing instance")
        );
    }

    #[test]
    fn state_changes_are_reported_once() {
        let mut t = Retry::new(CLASSIFY, Backoff::consul());
        // A failure's kind when it is news.
        fn on_error(t: &mut Retry, e: ConsulError) -> Option<ErrorKind> {
            let r = t.failure(e).expect("retried");
            r.news.then(|| r.error.kind())
        }
        assert!(t.success().news, "the first answer is a change");
        assert!(!t.success().news);
        assert_eq!(
            on_error(&mut t, unreachable()),
            Some(ErrorKind::Unreachable)
        );
        for _ in 0..100 {
            assert_eq!(on_error(&mut t, unreachable()), None, "not once per retry");
        }
        assert_eq!(
            on_error(&mut t, status(500)),
            Some(ErrorKind::Status(500)),
            "another kind of failure is another state"
        );
        assert!(t.success().news);
        assert!(!t.success().news);
        assert!(t.refused().1, "a too-stale answer is a change of state");
        assert!(!t.refused().1, "and repeats are not");
        assert!(t.success().news);
    }

    type Script = Arc<Mutex<VecDeque<consul_api::Result<(Vec<ServiceEntry>, QueryMeta)>>>>;

    /// Runs `follow` over a scripted fetch for `servernode` in dc1; when the script runs
    /// out, fetch never answers.
    fn scripted(
        answers: Vec<consul_api::Result<(Vec<ServiceEntry>, QueryMeta)>>,
    ) -> (
        watch::Receiver<Snapshot>,
        watch::Receiver<Vec<QueryOptions>>,
        tokio::task::JoinHandle<()>,
    ) {
        let mut config = DiscoveryConfig::new("servernode");
        config.datacenter = Some("dc1".into());
        scripted_with(answers, config)
    }

    /// [`scripted`] with a configuration of the test's own.
    fn scripted_with(
        answers: Vec<consul_api::Result<(Vec<ServiceEntry>, QueryMeta)>>,
        config: DiscoveryConfig,
    ) -> (
        watch::Receiver<Snapshot>,
        watch::Receiver<Vec<QueryOptions>>,
        tokio::task::JoinHandle<()>,
    ) {
        let script: Script = Arc::new(Mutex::new(answers.into()));
        let (seen_tx, seen) = watch::channel(Vec::new());
        let (tx, rx) = watch::channel(Snapshot::starting());
        let fetch = move |opts: QueryOptions| {
            seen_tx.send_modify(|seen| seen.push(opts));
            let next = script.lock().unwrap().pop_front();
            async move {
                match next {
                    Some(answer) => answer.map(|(entries, meta)| {
                        (
                            entries
                                .iter()
                                .map(|e| Arc::new(Instance::from_entry(e)))
                                .collect(),
                            meta,
                        )
                    }),
                    None => std::future::pending().await,
                }
            }
        };
        let task = tokio::spawn(follow(fetch, tx, config, Backoff::consul()));
        (rx, seen, task)
    }

    async fn wait_version(rx: &mut watch::Receiver<Snapshot>, version: u64) -> Snapshot {
        rx.wait_for(|s| s.version >= version).await.unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_last_set_while_consul_is_down_and_recovers() {
        let (mut rx, mut seen, _task) = scripted(vec![
            Ok((vec![entry("a", "127.0.0.1", "", 1)], meta(10))),
            Err(unreachable()),
            Err(unreachable()),
            Err(unreachable()),
            Ok((
                vec![
                    entry("a", "127.0.0.1", "", 1),
                    entry("b", "127.0.0.1", "", 2),
                ],
                meta(3),
            )),
        ]);
        let s = wait_version(&mut rx, 1).await;
        assert_eq!(s.instances.len(), 1);
        assert_eq!(s.consul, ConsulState::Reachable);
        let s = wait_version(&mut rx, 2).await;
        assert!(matches!(s.consul, ConsulState::Unreachable { .. }));
        assert_eq!(s.instances.len(), 1, "last known set kept");
        let s = wait_version(&mut rx, 3).await;
        assert_eq!(s.consul, ConsulState::Reachable);
        assert_eq!(s.instances.len(), 2);
        assert_eq!(
            s.version, 3,
            "three failures in a row published one state change, not three"
        );
        // The task goes on to a blocking read on the new index.
        let seen = tokio::time::timeout(Duration::from_secs(1), seen.wait_for(|s| s.len() >= 6))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(seen.len(), 6, "5 scripted answers, then a blocking read");
        assert!(seen.iter().all(|o| o.datacenter.as_deref() == Some("dc1")));
        assert_eq!(seen[1].wait_index, 10, "blocks on the last index");
        assert_eq!(
            seen[4].wait_index, 0,
            "after an outage the first read does not block on an old index"
        );
        assert_eq!(seen[5].wait_index, 3);
    }

    fn stale_meta(index: u64, last_contact_ms: u64) -> QueryMeta {
        QueryMeta {
            last_index: index,
            last_contact_ms,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_older_than_max_stale_are_not_applied() {
        let mut config = DiscoveryConfig::new("servernode");
        config.consistency = Consistency::Stale;
        config.max_stale = Some(Duration::from_secs(10));
        let (mut rx, seen, _task) = scripted_with(
            vec![
                Ok((vec![entry("a", "127.0.0.1", "", 1)], stale_meta(10, 50))),
                // No leader for 12 s: the server's copy may be missing changes (its index
                // has not moved: a blocking query on it returned at the end of its wait).
                Ok((vec![], stale_meta(10, 12_000))),
                Ok((vec![], stale_meta(11, 13_000))),
                // A leader again: applied.
                Ok((vec![entry("b", "127.0.0.1", "", 2)], stale_meta(12, 20))),
            ],
            config,
        );
        let s = wait_version(&mut rx, 1).await;
        assert_eq!(s.instances[0].id, "a");
        let s = wait_version(&mut rx, 2).await;
        assert_eq!(
            s.instances[0].id, "a",
            "the too-stale empty answer is not applied"
        );
        assert!(
            matches!(&s.consul, ConsulState::Unreachable { error, .. } if error.contains("12000 ms")),
            "{:?}",
            s.consul
        );
        let s = wait_version(&mut rx, 3).await;
        assert_eq!(s.instances[0].id, "b");
        assert_eq!(s.version, 3, "two stale answers published one state change");
        let seen = seen.borrow().clone();
        assert!(seen.iter().all(|o| o.consistency == Consistency::Stale));
        assert_eq!(
            seen[2].wait_index, 0,
            "retried without blocking after a stale answer"
        );
        assert_eq!(
            seen[1].wait_time,
            Some(Duration::from_secs(10)),
            "blocks at most max_stale, so staleness is checked that often"
        );
        assert_eq!(
            too_stale(&stale_meta(1, 10_000), Some(Duration::from_secs(10))),
            None
        );
        assert_eq!(
            too_stale(&stale_meta(1, 99_999), None),
            None,
            "no bound, any age"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn damping_holds_a_flapping_instance_out_until_its_hold_down_ends() {
        let all = || {
            vec![
                entry("a", "127.0.0.1", "", 1),
                entry("b", "127.0.0.1", "", 2),
                entry("c", "127.0.0.1", "", 3),
            ]
        };
        let some = || all().into_iter().skip(1).collect::<Vec<_>>();
        let mut config = DiscoveryConfig::new("servernode");
        config.damping = Some(Damping::default());
        let (mut rx, _seen, _task) = scripted_with(
            vec![
                Ok((all(), meta(1))),
                Ok((some(), meta(2))),
                Ok((all(), meta(3))),
                Ok((some(), meta(4))),
                Ok((all(), meta(5))),
            ],
            config,
        );
        let s = wait_version(&mut rx, 5).await;
        let ids: Vec<&str> = s.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"], "back after its second leave: held out");
        assert_eq!((s.held_out, s.index), (1, 5));
        let held_at = tokio::time::Instant::now();
        let s = wait_version(&mut rx, 6).await;
        assert_eq!(
            s.instances.len(),
            3,
            "released without a new answer from Consul"
        );
        assert_eq!((s.held_out, s.index), (0, 5));
        assert_eq!(
            tokio::time::Instant::now() - held_at,
            Damping::default().hold_down,
            "woken when the hold-down ends"
        );
        // Without damping the same answers publish every flap.
        let (mut rx, _seen, _task) = scripted(vec![
            Ok((all(), meta(1))),
            Ok((some(), meta(2))),
            Ok((all(), meta(3))),
            Ok((some(), meta(4))),
            Ok((all(), meta(5))),
        ]);
        let s = wait_version(&mut rx, 5).await;
        assert_eq!((s.instances.len(), s.held_out), (3, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_token_is_permanent() {
        let (mut rx, _seen, task) = scripted(vec![Err(denied())]);
        let s = wait_version(&mut rx, 1).await;
        let error = s.failure().unwrap();
        assert!(error.contains("403"), "{error}");
        assert!(error.contains("CONSUL_HTTP_TOKEN"), "{error}");
        let cause = s.cause.as_deref().expect("Consul's error itself is kept");
        assert!(cause.is_permission_denied() && !cause.is_retryable());
        task.await.unwrap();
        assert!(rx.has_changed().is_err(), "the task ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_token_after_success_keeps_the_last_view_and_retries() {
        let (mut rx, mut seen, _task) = scripted(vec![
            Ok((vec![entry("a", "127.0.0.1", "", 1)], meta(10))),
            Err(denied()),
            Err(denied()),
            Err(denied()),
            Ok((
                vec![
                    entry("a", "127.0.0.1", "", 1),
                    entry("b", "127.0.0.1", "", 2),
                ],
                meta(11),
            )),
        ]);
        let s = wait_version(&mut rx, 2).await;
        assert_eq!(s.failure(), None, "not permanent after a success");
        assert!(
            matches!(&s.consul, ConsulState::Unreachable { error, .. } if error.contains("403")),
            "{:?}",
            s.consul
        );
        assert_eq!(s.instances.len(), 1, "the last view is kept");
        let s = tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|s| s.instances.len() == 2),
        )
        .await
        .expect("retried with backoff until the token works again")
        .unwrap()
        .clone();
        assert_eq!(s.consul, ConsulState::Reachable);
        let seen = tokio::time::timeout(Duration::from_secs(1), seen.wait_for(|s| s.len() >= 6))
            .await
            .expect("then a blocking read")
            .unwrap()
            .clone();
        assert_eq!(
            seen[5].wait_index, 11,
            "3 refusals retried, then a blocking read"
        );
    }

    fn tls_refused() -> ConsulError {
        ConsulError::Tls {
            method: "GET",
            url: "https://127.0.0.1:8501".into(),
            path: "/v1/health/service/servernode".into(),
            problem: "the agent's certificate is not signed by a trusted CA".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn any_refusal_after_success_keeps_the_last_view_and_retries() {
        // An agent reloaded to HTTPS (400), its certificate rotated to a CA not trusted yet,
        // a prepared query deleted and created again (404): none of them is permanent once
        // a read has worked.
        let (mut rx, mut seen, task) = scripted(vec![
            Ok((vec![entry("a", "127.0.0.1", "", 1)], meta(10))),
            Err(status(400)),
            Err(tls_refused()),
            Err(status(404)),
            Err(status(404)),
            Ok((
                vec![
                    entry("a", "127.0.0.1", "", 1),
                    entry("b", "127.0.0.1", "", 2),
                ],
                meta(11),
            )),
        ]);
        let s = wait_version(&mut rx, 2).await;
        assert_eq!(s.failure(), None, "a 400 after a success is not permanent");
        assert!(
            matches!(&s.consul, ConsulState::Unreachable { error, .. } if error.contains("400")),
            "{:?}",
            s.consul
        );
        assert_eq!(s.instances.len(), 1, "the last view is kept");
        let s = tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|s| s.failure().is_some() || s.instances.len() == 2),
        )
        .await
        .expect("retried with backoff until the reads work again")
        .unwrap()
        .clone();
        assert_eq!(s.consul, ConsulState::Reachable, "{:?}", s.consul);
        assert_eq!(
            s.version, 5,
            "three kinds of refusal, each published once (404 twice: once), then the answer"
        );
        let seen = tokio::time::timeout(Duration::from_secs(1), seen.wait_for(|s| s.len() >= 7))
            .await
            .expect("then a blocking read")
            .unwrap()
            .clone();
        assert_eq!(seen[6].wait_index, 11);
        assert!(!task.is_finished());

        // Before any success the same refusals stay permanent, with their own error.
        for refusal in [status(400), tls_refused(), status(404)] {
            let expected = refusal.to_string();
            let (mut rx, _seen, task) = scripted(vec![Err(refusal)]);
            let s = wait_version(&mut rx, 1).await;
            assert_eq!(s.failure(), Some(expected.as_str()));
            task.await.unwrap();
        }
    }

    /// One read of [`churning`]'s service.
    type ChurningRead = std::pin::Pin<Box<dyn Future<Output = crate::source::Read> + Send>>;

    /// A service whose index moves every 10 ms for `churn_for` from `start`, then stays:
    /// a read answers at once when the index is past the one it waits on, else blocks until
    /// it moves or its wait ends, as Consul does. The instance's port is the index the answer
    /// shows; every read's start is recorded.
    fn churning(
        start: tokio::time::Instant,
        churn_for: Duration,
    ) -> (
        Arc<Mutex<Vec<tokio::time::Instant>>>,
        impl FnMut(QueryOptions) -> ChurningRead,
    ) {
        const TICK: Duration = Duration::from_millis(10);
        let index_at = move |now: tokio::time::Instant| {
            let moved = now.saturating_duration_since(start).min(churn_for);
            1 + (moved.as_millis() / TICK.as_millis()) as u64
        };
        let reads = Arc::new(Mutex::new(Vec::new()));
        let log = reads.clone();
        let fetch = move |opts: QueryOptions| {
            let now = tokio::time::Instant::now();
            log.lock().unwrap().push(now);
            Box::pin(async move {
                let deadline = now + opts.wait_time.unwrap_or_default();
                let mut index = index_at(tokio::time::Instant::now());
                while index <= opts.wait_index && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(TICK.min(deadline - tokio::time::Instant::now())).await;
                    index = index_at(tokio::time::Instant::now());
                }
                let port = u16::try_from(index).unwrap();
                Ok((
                    vec![Arc::new(Instance::new("a", "127.0.0.1", port))],
                    meta(index),
                ))
            }) as ChurningRead
        };
        (reads, fetch)
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_bounds_the_reads_of_a_churning_service_and_coalesces_to_the_last() {
        let churn_for = Duration::from_secs(3);
        let start = tokio::time::Instant::now();
        let (reads, fetch) = churning(start, churn_for);
        let mut config = DiscoveryConfig::new("servernode");
        config.rate_limit = Some(RateLimit::new(5.0, 2));
        let (tx, mut rx) = watch::channel(Snapshot::starting());
        let _task = tokio::spawn(follow(fetch, tx, config, Backoff::consul()));
        let mut ports = Vec::new();
        // Every snapshot published until the last change shows (and a second more: nothing
        // after it).
        let last = u16::try_from(1 + churn_for.as_millis() / 10).unwrap();
        let until = start + churn_for + Duration::from_secs(1);
        while let Ok(Ok(())) = tokio::time::timeout_at(until, rx.changed()).await {
            ports.extend(rx.borrow_and_update().instances.first().map(|i| i.port));
        }
        let reads = reads.lock().unwrap().clone();
        let churning = reads.iter().filter(|at| **at < start + churn_for).count();
        // A burst of 2, then 5 a second: 2 + 5 × 3 s.
        assert!(
            churning <= 2 + 15,
            "{churning} reads while the service churned for {churn_for:?}"
        );
        assert!(churning >= 15, "it kept reading at the rate: {churning}");
        // The burst's two reads (the watch's own 20 ms floor between them), then one token
        // every 200 ms from the first.
        assert!(
            reads[1] - reads[0] <= Duration::from_millis(20),
            "{reads:?}"
        );
        for (k, at) in reads.iter().enumerate().skip(2) {
            assert!(
                *at - reads[0] >= Duration::from_millis(200 * (k as u64 - 1) - 1),
                "read {k} before its token: {reads:?}"
            );
        }
        // Coalesced, not dropped: each answer the latest state, and the last change is read.
        assert!(ports.windows(2).all(|p| p[0] < p[1]), "{ports:?}");
        assert!(ports.len() < usize::from(last) / 10, "coalesced: {ports:?}");
        assert_eq!(ports.last(), Some(&last), "the last change is published");
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_ends_when_the_receiver_is_dropped() {
        let (rx, _seen, task) = scripted(vec![Ok((vec![], meta(1)))]);
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends")
            .unwrap();
        let (rx, _seen, task) = scripted((0..50).map(|_| Err(unreachable())).collect());
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends while backing off")
            .unwrap();
    }
}
