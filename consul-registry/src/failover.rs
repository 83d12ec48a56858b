//! Failover across datacenters: one discovery per datacenter, in order of preference, all
//! through the local agent (`?dc=dc2` blocking queries are forwarded over the WAN by the
//! servers), merged into one [`Snapshot`] stream: the instances of the first datacenter that
//! lists any. When the local datacenter loses its last passing instance, the next one's are
//! published at once (its blocking query was already following them); when it gets one back,
//! its own are published again, and the session moves back (it leaves instances Consul no
//! longer lists for it).
//!
//! A fallback datacenter that fails for good (it refuses the token) only drops out of the
//! choice: the merged view never says "failed" for it, and the other datacenters go on
//! being merged. With no datacenter listing an instance, the local datacenter's state is
//! published (its own failure included: a session then answers messages with it until a
//! datacenter lists an instance again).
//!
//! The choice is a pure function of the snapshots ([`choose`]); the task around it only
//! waits for changes.

use tokio::sync::watch;

use crate::discovery::{self, DiscoveryConfig, Snapshot};

/// Follow `config.service` in the agent's own datacenter (or `config.datacenter`), then in
/// each of `fallbacks` in order; publish the first non-empty set. Must be called within a
/// tokio runtime; the tasks end when every receiver is dropped.
pub fn spawn(
    client: consul_api::Client,
    config: DiscoveryConfig,
    fallbacks: &[String],
) -> watch::Receiver<Snapshot> {
    let mut sources = vec![discovery::spawn(client.clone(), config.clone())];
    for dc in fallbacks {
        let config = DiscoveryConfig {
            datacenter: Some(dc.clone()),
            ..config.clone()
        };
        sources.push(discovery::spawn(client.clone(), config));
    }
    let first = choose(
        &sources
            .iter()
            .map(|s| s.borrow().clone())
            .collect::<Vec<_>>(),
    );
    let (tx, rx) = watch::channel(first);
    tokio::spawn(merge(sources, tx));
    rx
}

async fn merge(mut sources: Vec<watch::Receiver<Snapshot>>, tx: watch::Sender<Snapshot>) {
    // A source whose task has ended (it failed for good; its last snapshot says why) is no
    // longer waited on, but its last snapshot still counts and the others go on being
    // merged. Once every source has ended, the last merged snapshot stays.
    let mut open = vec![true; sources.len()];
    loop {
        let changed = futures::future::select_all(
            sources
                .iter_mut()
                .zip(&open)
                .enumerate()
                .filter(|(_, (_, open))| **open)
                .map(|(i, (s, _))| Box::pin(async move { (i, s.changed().await.is_ok()) })),
        );
        tokio::select! {
            ((i, still_open), _, _) = changed => if !still_open {
                open[i] = false;
                if open.contains(&true) {
                    continue;
                }
                return;
            },
            () = tx.closed() => return,
        }
        let snapshots: Vec<Snapshot> = sources
            .iter_mut()
            .map(|s| s.borrow_and_update().clone())
            .collect();
        let next = choose(&snapshots);
        tx.send_modify(|s| {
            let version = s.version + 1;
            *s = Snapshot { version, ..next };
        });
    }
}

/// The snapshot to publish: the first (most preferred) datacenter's that lists an instance
/// and has not failed; with none listing any, the local (first) datacenter's, whatever its
/// state (starting, reachable, unreachable, failed). A fallback datacenter's state never
/// stands for the whole: its failure (a token it refuses) only means it has no instances
/// to offer, while the local datacenter's view goes on being published.
pub fn choose(snapshots: &[Snapshot]) -> Snapshot {
    snapshots
        .iter()
        .find(|s| s.failure().is_none() && !s.instances.is_empty())
        .or(snapshots.first())
        .cloned()
        .unwrap_or_else(Snapshot::starting)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::discovery::{ConsulState, Instance};

    fn listing(ids: &[&str]) -> Snapshot {
        Snapshot::fixed(
            ids.iter()
                .enumerate()
                .map(|(i, id)| Instance::new(*id, "127.0.0.1", 9000 + i as u16))
                .collect(),
        )
    }

    fn refused() -> Snapshot {
        Snapshot::starting().with_state(ConsulState::Failed {
            error: "403".into(),
        })
    }

    #[test]
    fn the_first_datacenter_with_an_instance_wins() {
        let dc1 = listing(&["a1"]);
        let dc2 = listing(&["b1", "b2"]);
        assert_eq!(choose(&[dc1.clone(), dc2.clone()]).instances[0].id, "a1");
        let empty = listing(&[]);
        assert_eq!(choose(&[empty.clone(), dc2.clone()]).instances.len(), 2);
        assert!(choose(&[empty.clone(), empty.clone()]).instances.is_empty());
        assert_eq!(choose(&[]).consul, ConsulState::Starting);
    }

    #[test]
    fn a_fallbacks_failure_never_stands_for_the_local_datacenter() {
        let dc1 = listing(&["a1"]);
        let empty = listing(&[]);
        // The local datacenter still starting, the fallback refusing the token: starting,
        // not failed (messages wait for the local answer instead of failing for good).
        assert_eq!(
            choose(&[Snapshot::starting(), refused()]).consul,
            ConsulState::Starting
        );
        assert_eq!(
            choose(&[empty.clone(), refused()]).consul,
            ConsulState::Reachable
        );
        assert_eq!(choose(&[dc1.clone(), refused()]).instances[0].id, "a1");
        // The local datacenter's own failure shows while nothing else lists an instance, and
        // a fallback that lists one serves meanwhile.
        assert_eq!(choose(&[refused(), empty.clone()]).failure(), Some("403"));
        let dc2 = listing(&["b1", "b2"]);
        assert_eq!(choose(&[refused(), dc2.clone()]).instances.len(), 2);
        // A failed source's last instances are followed no more: skipped.
        let failed_with_some = listing(&["stale"]).with_state(ConsulState::Failed {
            error: "403".into(),
        });
        assert_eq!(
            choose(&[empty, failed_with_some, dc2]).instances[0].id,
            "b1"
        );
    }

    async fn wait_for(
        merged: &mut watch::Receiver<Snapshot>,
        what: &str,
        f: impl FnMut(&Snapshot) -> bool,
    ) -> Snapshot {
        tokio::time::timeout(Duration::from_secs(60), merged.wait_for(f))
            .await
            .unwrap_or_else(|_| panic!("{what}: not within 60 s"))
            .unwrap_or_else(|_| panic!("{what}: the merged view closed"))
            .clone()
    }

    /// Two sources as discovery tasks publish them; a failed one publishes its failure and
    /// ends (its sender is dropped).
    fn merged() -> (
        watch::Sender<Snapshot>,
        watch::Sender<Snapshot>,
        watch::Receiver<Snapshot>,
    ) {
        let (dc1, dc1_rx) = watch::channel(Snapshot::starting());
        let (dc2, dc2_rx) = watch::channel(Snapshot::starting());
        let (tx, rx) = watch::channel(Snapshot::starting());
        tokio::spawn(merge(vec![dc1_rx, dc2_rx], tx));
        (dc1, dc2, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_fallback_refused_before_the_local_answer_does_not_fail_the_view() {
        let (dc1, dc2, mut rx) = merged();
        dc2.send_replace(refused());
        let s = wait_for(&mut rx, "the fallback's refusal merged", |s| s.version >= 1).await;
        assert_eq!(
            s.consul,
            ConsulState::Starting,
            "not failed: dc1 may answer yet"
        );
        drop(dc2);
        tokio::task::yield_now().await;
        dc1.send_replace(listing(&["a1"]));
        let s = wait_for(&mut rx, "the local answer", |s| !s.instances.is_empty()).await;
        assert_eq!(s.failure(), None);
        assert_eq!(s.instances[0].id, "a1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fallback_refused_after_the_local_answer_does_not_freeze_the_view() {
        let (dc1, dc2, mut rx) = merged();
        dc1.send_replace(listing(&["a1"]));
        wait_for(&mut rx, "the local answer", |s| s.instances.len() == 1).await;
        dc2.send_replace(refused());
        drop(dc2);
        tokio::task::yield_now().await;
        // The local datacenter's later changes still flow.
        dc1.send_replace(listing(&["a1", "a2"]));
        let s = wait_for(&mut rx, "the local change", |s| s.instances.len() == 2).await;
        assert_eq!(s.failure(), None);
        // Its loss of every instance too, and its recovery.
        dc1.send_replace(listing(&[]));
        wait_for(&mut rx, "the local loss", |s| s.instances.is_empty()).await;
        dc1.send_replace(listing(&["a3"]));
        let s = wait_for(&mut rx, "the local recovery", |s| !s.instances.is_empty()).await;
        assert_eq!(s.instances[0].id, "a3");
        // Every source ended: the merged view ends, its last snapshot kept.
        drop(dc1);
        tokio::time::timeout(Duration::from_secs(60), async {
            while rx.changed().await.is_ok() {}
        })
        .await
        .expect("the merged view ends with its sources");
        assert_eq!(rx.borrow().instances[0].id, "a3");
    }
}
