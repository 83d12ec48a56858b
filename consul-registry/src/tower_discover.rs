//! The edge to tower's own balancers: discovery's [`Snapshot`]s as a
//! [`tower::discover::Discover`], so a tower stack (`tower::balance`, a `ReadyCache`, ...) can
//! balance over the passing instances Consul lists. For failover before Consul notices (a
//! failed request holds its instance out, and lets it back after a hold-down), use
//! [`tower_stack`](crate::tower_stack) instead: tower's `Balance` drops an endpoint only on a
//! `Remove` or a `poll_ready` error, the latter for good.
//!
//! * The first changes are the current snapshot's instances, all inserted (nothing is
//!   waited for when discovery has answered already); then each new snapshot is compared with
//!   the last: an address that left is a [`Change::Remove`], a new one a [`Change::Insert`]
//!   with the service `make` builds for it.
//! * An instance is keyed by its address (`host:port`), as [`Balancer`](crate::Balancer) keys
//!   it: two entries at one address (one registered twice under two IDs, or on two nodes) are
//!   one endpoint, and a change of tags or metadata is none.
//! * A discovery that fails for good (a refused token) yields its error once; the stream goes
//!   on following the snapshots, so a view that recovers (failover to another datacenter)
//!   flows again. The stream ends when discovery ends.
//!
//! ```
//! use consul_registry::{Instance, Snapshot, tower_discover};
//! use futures::StreamExt;
//! use tower::discover::Change;
//!
//! # tokio_test_block_on(async {
//! let (publish, snapshots) = tokio::sync::watch::channel(Snapshot::starting());
//! // The "service" of each instance is just its ID here; a real stack builds a client.
//! let mut changes = tower_discover::changes(snapshots, |i: &Instance| i.id.clone());
//! publish.send(Snapshot::fixed(vec![Instance::new("web-1", "127.0.0.1", 8080)])).unwrap();
//! match changes.next().await {
//!     Some(Ok(Change::Insert(key, id))) => assert_eq!((key.as_str(), id.as_str()), ("127.0.0.1:8080", "web-1")),
//!     other => panic!("{other:?}"),
//! }
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::collections::{HashSet, VecDeque};

use futures::Stream;
use tokio::sync::watch;
use tower::discover::Change;

use crate::{
    discovery::{Instance, Snapshot},
    error::Error,
};

/// The changes between successive snapshots of `snapshots`, keyed by address (`host:port`),
/// as tower's `Discover` wants them (any `Stream` of `Result<Change<K, S>, E>` is a
/// `Discover`). `make` builds the service for each inserted address.
pub fn changes<S, M>(
    snapshots: watch::Receiver<Snapshot>,
    make: M,
) -> impl Stream<Item = Result<Change<String, S>, Error>> + Unpin
where
    M: FnMut(&Instance) -> S,
{
    let state = Diff {
        snapshots,
        make,
        current: HashSet::new(),
        queued: VecDeque::new(),
        first: true,
        failed: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        let next = state.next().await?;
        Some((next, state))
    }))
}

struct Diff<S, M> {
    snapshots: watch::Receiver<Snapshot>,
    make: M,
    /// The addresses inserted.
    current: HashSet<String>,
    queued: VecDeque<Change<String, S>>,
    first: bool,
    /// The last snapshot was a failure (its error already yielded).
    failed: bool,
}

impl<S, M: FnMut(&Instance) -> S> Diff<S, M> {
    async fn next(&mut self) -> Option<Result<Change<String, S>, Error>> {
        loop {
            if let Some(change) = self.queued.pop_front() {
                return Some(Ok(change));
            }
            if self.first {
                self.first = false;
            } else {
                self.snapshots.changed().await.ok()?;
            }
            let snapshot = self.snapshots.borrow_and_update().clone();
            if let Some(reason) = snapshot.failure() {
                if self.failed {
                    continue;
                }
                self.failed = true;
                return Some(Err(Error::Discovery {
                    reason: reason.to_owned(),
                }));
            }
            self.failed = false;
            self.apply(&snapshot.instances);
        }
    }

    fn apply(&mut self, instances: &[std::sync::Arc<Instance>]) {
        let mut next = HashSet::with_capacity(instances.len());
        for instance in instances {
            let address = instance.address();
            if next.contains(&address) {
                continue;
            }
            if !self.current.contains(&address) {
                let service = (self.make)(instance);
                self.queued
                    .push_back(Change::Insert(address.clone(), service));
            }
            next.insert(address);
        }
        for gone in self.current.iter().filter(|a| !next.contains(*a)) {
            self.queued.push_front(Change::Remove(gone.clone()));
        }
        self.current = next;
    }
}

#[cfg(test)]
mod tests {
    use futures::{FutureExt, StreamExt};

    use super::*;
    use crate::discovery::ConsulState;

    fn keys(changes: &[Change<String, String>]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Insert(k, s) => format!("+{k}={s}"),
                Change::Remove(k) => format!("-{k}"),
            })
            .collect()
    }

    async fn take(
        stream: &mut (impl Stream<Item = Result<Change<String, String>, Error>> + Unpin),
        n: usize,
    ) -> Vec<Change<String, String>> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(stream.next().await.unwrap().unwrap());
        }
        out
    }

    fn nothing_pending(
        changes: &mut (impl Stream<Item = Result<Change<String, String>, Error>> + Unpin),
    ) {
        let next = changes.next().now_or_never();
        assert!(
            next.is_none(),
            "no change: {:?}",
            next.map(|c| c.map(|c| c.map(|c| keys(&[c]))))
        );
    }

    #[tokio::test]
    async fn inserts_and_removes_follow_the_passing_set() {
        let a = Instance::new("a", "127.0.0.1", 1);
        let b = Instance::new("b", "127.0.0.1", 2);
        let (tx, rx) = watch::channel(Snapshot::fixed(vec![a.clone()]));
        let mut changes = changes(rx, |i: &Instance| i.id.clone());
        assert_eq!(keys(&take(&mut changes, 1).await), ["+127.0.0.1:1=a"]);

        tx.send(Snapshot::fixed(vec![a.clone(), b.clone()]))
            .unwrap();
        assert_eq!(keys(&take(&mut changes, 1).await), ["+127.0.0.1:2=b"]);

        // The same set again (a blocking query that timed out): nothing.
        tx.send(Snapshot::fixed(vec![b.clone(), a.clone()]))
            .unwrap();
        nothing_pending(&mut changes);
        // b moves to another port: removed, then inserted with a service for the new address.
        let moved = Instance::new("b", "127.0.0.1", 3);
        tx.send(Snapshot::fixed(vec![moved])).unwrap();
        let got = keys(&take(&mut changes, 3).await);
        assert!(got[..2].contains(&"-127.0.0.1:1".to_string()), "{got:?}");
        assert!(got[..2].contains(&"-127.0.0.1:2".to_string()), "{got:?}");
        assert_eq!(got[2], "+127.0.0.1:3=b");
    }

    #[tokio::test]
    async fn one_address_is_one_endpoint_whatever_its_entries_say() {
        let a = Instance::new("a", "127.0.0.1", 1);
        let mut twin = Instance::new("a-again", "127.0.0.1", 1);
        twin.node = "other-node".into();
        let (tx, rx) = watch::channel(Snapshot::fixed(vec![a.clone(), twin.clone()]));
        let mut changes = changes(rx, |i: &Instance| i.id.clone());
        assert_eq!(keys(&take(&mut changes, 1).await), ["+127.0.0.1:1=a"]);
        nothing_pending(&mut changes);
        // New tags on the same address: no change (the endpoint's client still dials it).
        let mut tagged = a.clone();
        tagged.tags = vec!["v2".into()];
        tx.send(Snapshot::fixed(vec![tagged])).unwrap();
        nothing_pending(&mut changes);
    }

    #[tokio::test]
    async fn a_failed_discovery_is_an_error_once_and_a_recovered_view_flows_again() {
        let (tx, rx) = watch::channel(Snapshot::fixed(vec![]));
        let mut changes = changes(rx, |i: &Instance| i.id.clone());
        let failed = Snapshot::fixed(vec![]).with_state(ConsulState::Failed {
            error: "403".into(),
        });
        tx.send(failed.clone()).unwrap();
        assert!(matches!(
            changes.next().await,
            Some(Err(Error::Discovery { .. }))
        ));
        tx.send(failed.with_state(ConsulState::Failed {
            error: "403".into(),
        }))
        .unwrap();
        nothing_pending(&mut changes);
        tx.send(Snapshot::fixed(vec![Instance::new("a", "127.0.0.1", 1)]))
            .unwrap();
        assert_eq!(keys(&take(&mut changes, 1).await), ["+127.0.0.1:1=a"]);
        drop(tx);
        assert!(changes.next().await.is_none(), "ends with discovery");
    }

    #[tokio::test]
    async fn the_stream_ends_with_discovery_and_is_a_tower_discover() {
        fn is_discover<D: tower::discover::Discover>(_: &D) {}
        let (tx, rx) = watch::channel(Snapshot::fixed(vec![]));
        let mut changes = changes(rx, |i: &Instance| i.address());
        is_discover(&changes);
        drop(tx);
        assert!(changes.next().await.is_none());
    }
}
