//! A client pool for any protocol: which instance of a discovered service to use next, shared
//! by every task of a client. It drives one [`Balancer`] with discovery's snapshots and the
//! outcomes its callers report, so that concurrent callers need no mutex of their own and
//! no loop copied from an example.
//!
//! * [`Pool::pick`] waits for a usable instance until a deadline: discovery's first answer,
//!   or the end of a hold-down when every listed instance is held out. It reads the latest
//!   snapshot on every pick (the pool keeps no `has_changed()` state that a `wait_for`
//!   elsewhere could consume), and fails at once when discovery has failed for good.
//! * The caller reports each outcome on the [`Pick`] it got: [`Pick::succeeded`] (the time
//!   taken feeds power-of-two-choices) or [`Pick::failed`] (passive health, see
//!   [`Balancer::failed`]: an instance is held out after consecutive failures, for a hold-down
//!   growing with each ejection, never more than a share of the set). A pick dropped without a
//!   report says nothing about the instance (a cancelled request).
//! * Instances are keyed by address (`host:port`), as [`Balancer`] keys them.
//! * The pool is for callers that pick per request or per connection. A client that holds
//!   one connection for its life and fails over itself (echo-client's session) drives the
//!   same [`Balancer`] directly: it needs a pick that fails at once rather than waits when
//!   every instance is excluded (its connects in flight, the round's failures), the spreading
//!   signal, and ejection without the outlier cap; the balancing and ejection stay one copy.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use consul_registry::{DiscoveryConfig, pool::{Pool, PoolConfig}};
//! use tokio::time::Instant;
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let pool = Pool::discover(consul_api::Client::from_env()?, DiscoveryConfig::new("ledger"), PoolConfig::default());
//! let pick = pool.pick(Instant::now() + Duration::from_secs(5)).await?;
//! match tokio::net::TcpStream::connect(pick.instance().address()).await {
//!     Ok(_stream) => pick.succeeded(),
//!     Err(_) => { pick.failed(); }
//! }
//! # Ok(()) }
//! ```

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::{
    balancer::{Balancer, Strategy},
    discovery::{self, DiscoveryConfig, Instance, Snapshot},
    error::{Error, Result},
};

/// How a [`Pool`] chooses and when it holds an instance out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// How to choose among usable instances (default: power of two choices).
    pub strategy: Strategy,
    /// The first hold-down of an ejected instance; it doubles with each ejection since the
    /// instance's last success, up to 16 times this (default 5 s: longer than a usual check
    /// interval, so that Consul has mostly removed a dead instance before it is tried again).
    pub hold_down: Duration,
    /// Failures in a row that eject an instance (default 1: a refused connect is definitive).
    pub consecutive_failures: u32,
    /// At most this share of the listed instances is held out at once; at least one, never
    /// all (default 50).
    pub max_ejected_percent: u8,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            strategy: Strategy::PowerOfTwoChoices,
            hold_down: Duration::from_secs(5),
            consecutive_failures: 1,
            max_ejected_percent: 50,
        }
    }
}

/// A shareable pool of a service's instances; see the module documentation. Cheap to clone:
/// every clone is the same pool.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    service: String,
    snapshots: watch::Receiver<Snapshot>,
    balancer: Mutex<Balancer>,
}

impl Pool {
    /// A pool over the instances `snapshots` publishes (discovery's, failover's, or a fixed
    /// set's); `service` names them in errors.
    pub fn new(
        service: impl Into<String>,
        snapshots: watch::Receiver<Snapshot>,
        config: PoolConfig,
    ) -> Pool {
        let balancer = Balancer::new(config.strategy, config.hold_down)
            .with_outlier_detection(config.consecutive_failures, config.max_ejected_percent);
        Pool {
            inner: Arc::new(Inner {
                service: service.into(),
                snapshots,
                balancer: Mutex::new(balancer),
            }),
        }
    }

    /// Discover `discovery.service` ([`discovery::spawn`]) and pool its passing instances.
    /// Must be called within a tokio runtime; discovery ends when the last clone is dropped.
    pub fn discover(
        client: consul_api::Client,
        discovery: DiscoveryConfig,
        config: PoolConfig,
    ) -> Pool {
        let service = discovery.service.clone();
        Pool::new(service, discovery::spawn(client, discovery), config)
    }

    /// The service's passing instances as discovery last published them.
    pub fn instances(&self) -> Arc<[Arc<Instance>]> {
        Arc::clone(&self.inner.snapshots.borrow().instances)
    }

    /// A usable instance, waiting until `deadline` for one (discovery's first answer, a
    /// hold-down's end). Fails at once when discovery has failed for good.
    pub async fn pick(&self, deadline: Instant) -> Result<Pick> {
        self.pick_except(deadline, &[]).await
    }

    /// Like [`pick`](Self::pick), avoiding the addresses in `except` (instances this request
    /// already tried) while another is usable.
    pub async fn pick_except(&self, deadline: Instant, except: &[String]) -> Result<Pick> {
        let started = Instant::now();
        let mut snapshots = self.inner.snapshots.clone();
        let mut open = true;
        loop {
            let now = Instant::now();
            let (next, reason) = {
                let snapshot = snapshots.borrow_and_update();
                let mut balancer = self.balancer(&snapshot);
                let picked = balancer
                    .pick_except(now, except)
                    .or_else(|| balancer.pick(now));
                if let Some(instance) = picked {
                    return Ok(self.hand_out(instance));
                }
                if let Some(failure) = snapshot.failure() {
                    return Err(Error::NoInstance {
                        waited: started.elapsed(),
                        reason: format!("discovery failed: {failure}"),
                    });
                }
                let reason = if snapshot.instances.is_empty() {
                    snapshot.describe(&self.inner.service)
                } else {
                    format!(
                        "every one of the {} passing instance(s) of {:?} is held out after failures",
                        snapshot.instances.len(),
                        self.inner.service
                    )
                };
                (balancer.next_unejection(now), reason)
            };
            if now >= deadline {
                return Err(Error::NoInstance {
                    waited: started.elapsed(),
                    reason,
                });
            }
            let until = next.unwrap_or(deadline).min(deadline);
            tokio::select! {
                changed = snapshots.changed(), if open => open = changed.is_ok(),
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// A usable instance now, if there is one (never waits).
    pub fn try_pick(&self) -> Option<Pick> {
        let now = Instant::now();
        let snapshot = self.inner.snapshots.borrow();
        let instance = self.balancer(&snapshot).pick(now)?;
        drop(snapshot);
        Some(self.hand_out(instance))
    }

    /// The balancer, brought up to date with `snapshot` (only when its set changed).
    fn balancer(&self, snapshot: &Snapshot) -> MutexGuard<'_, Balancer> {
        let mut balancer = self
            .inner
            .balancer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !std::ptr::eq(balancer.instances(), &*snapshot.instances) {
            balancer.update(&snapshot.instances);
        }
        balancer
    }

    fn lock(&self) -> MutexGuard<'_, Balancer> {
        self.inner
            .balancer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn hand_out(&self, instance: Instance) -> Pick {
        Pick {
            instance,
            started: Instant::now(),
            pool: self.clone(),
        }
    }
}

/// An instance handed out by a [`Pool`]; report how it went with [`succeeded`](Self::succeeded)
/// or [`failed`](Self::failed). Dropped without a report, it says nothing about the instance.
#[derive(Debug)]
#[must_use = "report the outcome with succeeded() or failed()"]
pub struct Pick {
    instance: Instance,
    started: Instant,
    pool: Pool,
}

impl Pick {
    /// The instance to use.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// It answered: its failures are cleared and the time since the pick feeds its average.
    pub fn succeeded(self) {
        let rtt = self.started.elapsed();
        self.pool.lock().succeeded(&self.instance, rtt);
    }

    /// It failed (refused, reset, timed out, or an answer the caller counts as a failure).
    /// Returns the hold-down when this failure ejected it.
    pub fn failed(self) -> Option<Duration> {
        let held = self.pool.lock().failed(&self.instance, Instant::now());
        if let Some(hold_down) = held {
            tracing::info!(instance = %self.instance, ?hold_down, "held out after failures");
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(ports: &[u16]) -> Snapshot {
        Snapshot::fixed(
            ports
                .iter()
                .map(|p| Instance::new(format!("s{p}"), "127.0.0.1", *p))
                .collect(),
        )
    }

    fn config() -> PoolConfig {
        PoolConfig {
            strategy: Strategy::RoundRobin,
            hold_down: Duration::from_secs(1),
            ..PoolConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pick_waits_for_discoverys_first_answer_then_for_a_hold_down() {
        let (tx, rx) = watch::channel(Snapshot::starting());
        let pool = Pool::new("svc", rx, config());
        let deadline = Instant::now() + Duration::from_secs(10);
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.pick(deadline).await.map(|p| p.instance().port) }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "nothing listed yet: it waits");
        tx.send_replace(fixed(&[1]));
        assert_eq!(waiting.await.unwrap().unwrap(), 1);

        // The only instance is never held out; with two, one failing is.
        let pick = pool.pick(deadline).await.unwrap();
        assert_eq!(pick.failed(), None, "never every instance");
        tx.send_replace(fixed(&[1, 2]));
        let first = pool.pick(deadline).await.unwrap();
        let failed_port = first.instance().port;
        assert_eq!(first.failed(), Some(Duration::from_secs(1)));
        for _ in 0..4 {
            let p = pool.pick(deadline).await.unwrap();
            assert_ne!(p.instance().port, failed_port, "held out");
            p.succeeded();
        }
        // Back after its hold-down while still listed.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ports: std::collections::BTreeSet<u16> = (0..4)
            .map(|_| {
                let p = pool.try_pick().unwrap();
                let port = p.instance().port;
                p.succeeded();
                port
            })
            .collect();
        assert_eq!(ports, [1, 2].into());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pick_gives_up_at_its_deadline_or_at_once_when_discovery_failed() {
        let (tx, rx) = watch::channel(fixed(&[]));
        let pool = Pool::new("svc", rx, config());
        let started = Instant::now();
        let err = pool
            .pick(started + Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert!(
            err.to_string().contains("no passing instance of \"svc\""),
            "{err}"
        );
        tx.send_replace(
            fixed(&[]).with_state(crate::discovery::ConsulState::Failed {
                error: "403".into(),
            }),
        );
        let started = Instant::now();
        let err = pool
            .pick(started + Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(err.to_string().contains("403"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn pick_except_avoids_what_was_tried_while_another_is_usable() {
        let (_tx, rx) = watch::channel(fixed(&[1, 2]));
        let pool = Pool::new("svc", rx, config());
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..4 {
            let p = pool
                .pick_except(deadline, &["127.0.0.1:1".into()])
                .await
                .unwrap();
            assert_eq!(p.instance().port, 2);
        }
        let both = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        assert!(
            pool.pick_except(deadline, &both).await.is_ok(),
            "with every instance tried, any usable one"
        );
    }
}
