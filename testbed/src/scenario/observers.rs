//! What the scenarios watch while they inject faults: a steady stream of echoes through a
//! resilient [`EchoClient`] (echo-rig's one streamer, [`Stream`]: every message's outcome,
//! with timestamps), and every snapshot the client's discovery publishes ([`DiscoveryLog`]);
//! both run as background tasks, bounded in count and time. Here: what is counted over them.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use echo_client::{ConsulState, EchoClient, Snapshot};
pub use echo_rig::traffic::{Outcome, Served, Stream, StreamSpec};
use tokio::sync::Notify;

use crate::error::{Error, Result};

/// Longest a background observer runs, whatever happens.
const MAX_RUN: Duration = echo_rig::traffic::MAX_RUN;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug)]
struct Shared<T> {
    items: Mutex<Vec<T>>,
    notify: Notify,
}

impl<T: Clone> Shared<T> {
    fn new() -> Self {
        Shared {
            items: Mutex::new(Vec::new()),
            notify: Notify::new(),
        }
    }

    fn push(&self, item: T) {
        lock(&self.items).push(item);
        self.notify.notify_waiters();
    }

    fn all(&self) -> Vec<T> {
        lock(&self.items).clone()
    }

    /// Wait until an item satisfies `pred`, at most `timeout`.
    async fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&T) -> bool) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = lock(&self.items).iter().find(|i| pred(i)) {
                return Ok(found.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::Timeout {
                    what: what.to_owned(),
                    timeout,
                });
            }
        }
    }
}

/// Counts over a set of outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Messages sent.
    pub sent: u64,
    /// Of those, answered with an error or with other bytes.
    pub lost: u64,
    /// Answered after being written more than once (failover).
    pub resent: u64,
}

impl Tally {
    /// Count `outcomes`.
    pub fn of<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Tally {
        let mut t = Tally::default();
        for o in outcomes {
            t.sent += 1;
            if o.lost() {
                t.lost += 1;
            }
            if matches!(&o.result, Ok(s) if s.attempts > 1) {
                t.resent += 1;
            }
        }
        t
    }
}

/// The invariants every scenario shares, as violations: no echo lost, no process panicked.
/// A scenario adds its own to these.
pub fn shared_violations(tally: &Tally, panics: &[String]) -> Vec<String> {
    let mut v = Vec::new();
    if tally.lost > 0 {
        v.push(format!("{} echoes lost", tally.lost));
    }
    if !panics.is_empty() {
        v.push(format!("panics: {panics:?}"));
    }
    v
}

/// The echoes among `outcomes` sent between `from` and `to` (inclusive): those a fault could
/// have touched.
pub fn sent_between(outcomes: &[Outcome], from: Instant, to: Instant) -> Vec<Outcome> {
    outcomes
        .iter()
        .filter(|o| o.sent >= from && o.sent <= to)
        .cloned()
        .collect()
}

/// The first few errors among `outcomes`, for the report.
pub fn errors(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|o| match &o.result {
            Err(e) => Some(format!("message {}: {e}", o.seq)),
            Ok(s) if !s.exact => Some(format!("message {}: reply differs", o.seq)),
            Ok(_) => None,
        })
        .take(5)
        .collect()
}

/// The `q`-quantile (0..=1) of the latencies of the answered `outcomes`, by the one
/// percentile rule ([`crate::report::percentile`]).
pub fn latency_quantile(outcomes: &[Outcome], q: f64) -> Option<Duration> {
    let l: Vec<Duration> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|s| s.latency))
        .collect();
    crate::report::percentile_of(&l, q * 100.0)
}

/// One snapshot of discovery, as seen when it was published.
#[derive(Debug, Clone)]
pub struct View {
    /// When the observer saw it.
    pub at: Instant,
    /// The passing instances' IDs, sorted.
    pub ids: Vec<String>,
    /// How discovery stood with Consul.
    pub state: ViewState,
    /// Consul's index of the answer.
    pub index: u64,
    /// Passing instances flap damping held out of `ids` (0 without damping).
    pub held_out: usize,
}

/// Discovery's standing with Consul, without timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewState {
    /// No answer yet.
    Starting,
    /// The last query was answered.
    Reachable,
    /// Consul stopped answering, with the error; the instances are the last known ones.
    Unreachable(String),
    /// Discovery stopped for good, with the error.
    Failed(String),
}

impl View {
    fn of(s: &Snapshot) -> View {
        View {
            at: Instant::now(),
            ids: s.instances.iter().map(|i| i.id.clone()).collect(),
            state: match &s.consul {
                ConsulState::Starting => ViewState::Starting,
                ConsulState::Reachable => ViewState::Reachable,
                ConsulState::Unreachable { error, .. } => ViewState::Unreachable(error.clone()),
                ConsulState::Failed { error } => ViewState::Failed(error.clone()),
            },
            index: s.index,
            held_out: s.held_out,
        }
    }

    /// Whether `id` is listed as passing.
    pub fn lists(&self, id: &str) -> bool {
        self.ids.iter().any(|i| i == id)
    }

    /// Reachable, and listing every one of `ids`.
    pub fn lists_all(&self, ids: &[String]) -> bool {
        self.state == ViewState::Reachable && ids.iter().all(|id| self.lists(id))
    }
}

/// Every snapshot a client's discovery publishes, recorded as it comes.
#[derive(Debug)]
pub struct DiscoveryLog {
    shared: Arc<Shared<View>>,
    task: tokio::task::JoinHandle<()>,
}

impl DiscoveryLog {
    /// Follow `client`'s discovery (its current snapshot included).
    pub fn start(client: &EchoClient) -> DiscoveryLog {
        let mut rx = client.discovery();
        let shared = Arc::new(Shared::new());
        let sink = shared.clone();
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            loop {
                let view = View::of(&rx.borrow_and_update());
                sink.push(view);
                let next = tokio::time::timeout_at(started + MAX_RUN, rx.changed()).await;
                if !matches!(next, Ok(Ok(()))) {
                    return;
                }
            }
        });
        DiscoveryLog { shared, task }
    }

    /// Every view so far.
    pub fn views(&self) -> Vec<View> {
        self.shared.all()
    }

    /// The latest view.
    pub fn latest(&self) -> Option<View> {
        lock(&self.shared.items).last().cloned()
    }

    /// Wait for a view published at or after `after` that satisfies `pred`.
    pub async fn wait_for(
        &self,
        what: &str,
        after: Instant,
        timeout: Duration,
        pred: impl Fn(&View) -> bool,
    ) -> Result<View> {
        self.shared
            .wait(what, timeout, |v| v.at >= after && pred(v))
            .await
    }

    /// The moment from which the views have satisfied `pred` without a break, if the latest
    /// does: the start of the current run of good views (not before `after`).
    pub fn holds_since(&self, after: Instant, pred: impl Fn(&View) -> bool) -> Option<Instant> {
        let views = lock(&self.shared.items);
        let mut since = None;
        for v in views.iter() {
            match (pred(v), since) {
                (true, None) => since = Some(v.at.max(after)),
                (false, _) => since = None,
                _ => {}
            }
        }
        since
    }
}

impl Drop for DiscoveryLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_violations_name_losses_and_panics() {
        let clean = Tally {
            sent: 10,
            lost: 0,
            resent: 2,
        };
        assert!(shared_violations(&clean, &[]).is_empty());
        let bad = Tally {
            sent: 10,
            lost: 3,
            resent: 0,
        };
        let v = shared_violations(&bad, &["servernode_1: panicked at main.rs".into()]);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0], "3 echoes lost");
        assert!(v[1].contains("panicked at main.rs"), "{v:?}");
    }

    fn outcome(seq: u64, latency_ms: u64, ok: bool) -> Outcome {
        let now = Instant::now();
        Outcome {
            seq,
            sent: now,
            done: now,
            result: if ok {
                Ok(Served {
                    instance: "a".into(),
                    latency: Duration::from_millis(latency_ms),
                    attempts: 1 + u32::from(seq.is_multiple_of(2)),
                    exact: true,
                })
            } else {
                Err("no instance".into())
            },
        }
    }

    #[test]
    fn tallies_and_quantiles() {
        let outcomes: Vec<_> = (1..=100).map(|i| outcome(i, i, i != 7)).collect();
        let t = Tally::of(&outcomes);
        assert_eq!((t.sent, t.lost, t.resent), (100, 1, 50));
        // 99 answered (message 7 was not): 1..=6 and 8..=100 ms, interpolated.
        let p99 = latency_quantile(&outcomes, 0.99).unwrap().as_secs_f64() * 1e3;
        assert!((p99 - 99.02).abs() < 1e-6, "{p99}");
        assert_eq!(
            latency_quantile(&outcomes, 0.5),
            Some(Duration::from_millis(51))
        );
        assert_eq!(latency_quantile(&[], 0.5), None);
        assert_eq!(errors(&outcomes), ["message 7: no instance"]);
    }
}
