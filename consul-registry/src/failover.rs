//! Failover across datacenters: one discovery per datacenter, in order of preference, all
//! through the local agent (`?dc=dc2` blocking queries are forwarded over the WAN by the
//! servers), merged into one [`Snapshot`] stream: the instances of the first datacenter that
//! lists any. When the local datacenter loses its last passing instance, the next one's are
//! published at once (its blocking query was already following them); when it gets one back,
//! its own are published again, and the session moves back (it leaves instances Consul no
//! longer lists for it).
//!
//! The choice is a pure function of the snapshots ([`choose`]); the task around it only
//! waits for changes.

use tokio::sync::watch;

use crate::discovery::{self, ConsulState, DiscoveryConfig, Snapshot};

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
    loop {
        let changed =
            futures::future::select_all(sources.iter_mut().map(|s| Box::pin(s.changed())));
        tokio::select! {
            (result, _, _) = changed => if result.is_err() { return },
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

/// The snapshot to publish: the first (most preferred) datacenter's that lists an instance;
/// with none listing any, the preferred one's (its state says why: starting, unreachable,
/// failed).
pub fn choose(snapshots: &[Snapshot]) -> Snapshot {
    snapshots
        .iter()
        .find(|s| !s.instances.is_empty())
        .or_else(|| {
            // Prefer a state that says something over "starting".
            snapshots.iter().find(|s| s.consul != ConsulState::Starting)
        })
        .or(snapshots.first())
        .cloned()
        .unwrap_or_else(Snapshot::starting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Instance;

    fn listing(ids: &[&str]) -> Snapshot {
        Snapshot::fixed(
            ids.iter()
                .enumerate()
                .map(|(i, id)| Instance::new(*id, "127.0.0.1", 9000 + i as u16))
                .collect(),
        )
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
        // Nothing anywhere and the local one still starting: the other's state is shown.
        let failed = Snapshot::starting().with_state(ConsulState::Failed {
            error: "403".into(),
        });
        assert_eq!(
            choose(&[Snapshot::starting(), failed]).failure(),
            Some("403")
        );
    }
}
