//! The edge to tower: discovery's [`Snapshot`]s as a [`tower::discover::Discover`], so a
//! tower stack (`tower::balance`, a `ReadyCache`, ...) can balance over the passing instances
//! Consul lists. Each new snapshot is compared with the last one: an instance that left is a
//! [`Change::Remove`], a new one a [`Change::Insert`] with the service `make` builds for it.
//! An instance is keyed by all it is (node, ID, address): one that moved to another address
//! is removed and inserted again, since the service built for it dialled the old one.
//!
//! The stream ends when discovery ends; a discovery that failed for good (a refused token)
//! yields its error once, then ends.
//!
//! ```
//! use consul_registry::{Instance, Snapshot, tower_discover};
//! use futures::StreamExt;
//! use tower::discover::Change;
//!
//! # tokio_test_block_on(async {
//! let (publish, snapshots) = tokio::sync::watch::channel(Snapshot::starting());
//! // The "service" of each instance is just its address here; a real stack builds a client.
//! let mut changes = tower_discover::changes(snapshots, |i: &Instance| i.address());
//! publish.send(Snapshot::fixed(vec![Instance::new("web-1", "127.0.0.1", 8080)])).unwrap();
//! match changes.next().await {
//!     Some(Ok(Change::Insert(key, address))) => assert_eq!((key.id.as_str(), address.as_str()), ("web-1", "127.0.0.1:8080")),
//!     other => panic!("{other:?}"),
//! }
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
};

use futures::Stream;
use tokio::sync::watch;
use tower::discover::Change;

use crate::{
    discovery::{Instance, Snapshot},
    error::Error,
};

/// The changes between successive snapshots of `snapshots`, as tower's `Discover` wants
/// them (any `Stream` of `Result<Change<K, S>, E>` is a `Discover`). `make` builds the
/// service for each inserted instance.
pub fn changes<S, M>(
    snapshots: watch::Receiver<Snapshot>,
    make: M,
) -> impl Stream<Item = Result<Change<Instance, S>, Error>> + Unpin
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
    current: HashSet<Arc<Instance>>,
    queued: VecDeque<Change<Instance, S>>,
    first: bool,
    failed: bool,
}

impl<S, M: FnMut(&Instance) -> S> Diff<S, M> {
    async fn next(&mut self) -> Option<Result<Change<Instance, S>, Error>> {
        loop {
            if let Some(change) = self.queued.pop_front() {
                return Some(Ok(change));
            }
            if self.failed {
                return None;
            }
            if self.first {
                self.first = false;
                self.snapshots.borrow_and_update();
            } else {
                self.snapshots.changed().await.ok()?;
            }
            let snapshot = self.snapshots.borrow_and_update().clone();
            if let Some(reason) = snapshot.failure() {
                self.failed = true;
                return Some(Err(Error::Discovery {
                    reason: reason.to_owned(),
                }));
            }
            self.apply(&snapshot.instances);
        }
    }

    fn apply(&mut self, instances: &[Arc<Instance>]) {
        let next: HashSet<Arc<Instance>> = instances.iter().cloned().collect();
        for gone in self.current.difference(&next) {
            self.queued.push_back(Change::Remove((**gone).clone()));
        }
        for new in instances.iter().filter(|i| !self.current.contains(*i)) {
            let service = (self.make)(new);
            self.queued
                .push_back(Change::Insert((**new).clone(), service));
        }
        self.current = next;
    }
}

#[cfg(test)]
mod tests {
    use futures::{FutureExt, StreamExt};

    use super::*;
    use crate::discovery::ConsulState;

    fn keys(changes: &[Change<Instance, String>]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Insert(k, s) => format!("+{}={s}", k.id),
                Change::Remove(k) => format!("-{}", k.id),
            })
            .collect()
    }

    async fn take(
        stream: &mut (impl Stream<Item = Result<Change<Instance, String>, Error>> + Unpin),
        n: usize,
    ) -> Vec<Change<Instance, String>> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(stream.next().await.unwrap().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn inserts_and_removes_follow_the_passing_set() {
        let a = Instance::new("a", "127.0.0.1", 1);
        let b = Instance::new("b", "127.0.0.1", 2);
        let (tx, rx) = watch::channel(Snapshot::fixed(vec![a.clone()]));
        let mut changes = changes(rx, |i: &Instance| i.address());
        assert_eq!(keys(&take(&mut changes, 1).await), ["+a=127.0.0.1:1"]);

        tx.send(Snapshot::fixed(vec![a.clone(), b.clone()]))
            .unwrap();
        assert_eq!(keys(&take(&mut changes, 1).await), ["+b=127.0.0.1:2"]);

        // The same set again (a blocking query that timed out): nothing.
        tx.send(Snapshot::fixed(vec![b.clone(), a.clone()]))
            .unwrap();
        let nothing = changes.next().now_or_never();
        assert!(
            nothing.is_none(),
            "the same set again is no change: {:?}",
            nothing.map(|c| c.map(|c| c.map(|c| keys(&[c]))))
        );
        // b moves to another port: removed, then inserted with a service for the new address.
        let moved = Instance::new("b", "127.0.0.1", 3);
        tx.send(Snapshot::fixed(vec![moved])).unwrap();
        let got = keys(&take(&mut changes, 3).await);
        assert_eq!(got.len(), 3);
        assert!(got.contains(&"-a".to_string()), "{got:?}");
        assert!(got.contains(&"-b".to_string()), "{got:?}");
        assert_eq!(got[2], "+b=127.0.0.1:3");
    }

    #[tokio::test]
    async fn a_failed_discovery_is_an_error_then_the_end() {
        let (tx, rx) = watch::channel(Snapshot::fixed(vec![]));
        let mut changes = changes(rx, |i: &Instance| i.address());
        let failed = Snapshot::fixed(vec![]).with_state(ConsulState::Failed {
            error: "403".into(),
        });
        tx.send(failed).unwrap();
        assert!(matches!(
            changes.next().await,
            Some(Err(Error::Discovery { .. }))
        ));
        assert!(changes.next().await.is_none());
        drop(tx);
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
