//! A service's entry in Consul. [`Registration`] is the whole of it for a service: register,
//! keep it registered, beat its TTL check, deregister on shutdown. [`Registrar`] is the
//! registering part alone: register at start (retrying with backoff and jitter while
//! the agent is not up yet), watch the entry with a blocking query on the agent and register
//! again when it disappears (an agent restarted in dev mode, an operator's deregistration),
//! and deregister on clean shutdown. A refused token (403) before the first registration
//! worked is fatal, never retried; after it worked (the token was deleted or rotated, the
//! agent restarted without it) it is logged at error level and retried with backoff while
//! the server keeps serving.
//!
//! **Against the reaper** (the `consul-reaper` sidecar): a service that opted in (Meta
//! `reap-after`, see [`reap_meta`](crate::reap_meta)) gets a new Meta `reap-start` from each
//! [`Registrar::new`], so the reaper tells this start of the process from a crashed one with
//! the same ID, and starts its clock over. The registrar wins: a service the reaper removed
//! while the process lives (its check forced unhealthy or hung) is registered again like any
//! other loss, with the same `reap-start`; the reaper recognises it and leaves that start alone
//! until the process starts over, so there is one removal per start, not one every
//! `reap-after`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use consul_api::{
    AgentServiceRegistration, Answered, Backoff, Classify, Client, Event, Follow, QueryMeta,
    QueryOptions, Retried, Retry, Retrying, Watch,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    check::Health,
    error::{Error, Result},
    ttl::Heartbeat,
};

/// Successive reads of the watch start at least this far apart.
const MIN_READ_INTERVAL: Duration = Duration::from_millis(50);
/// The watch's pace when the registration names neither a TTL nor a check interval.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Deregistration may take this long before shutdown goes on without it.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// Registers one service and keeps it registered.
#[derive(Debug, Clone)]
pub struct Registrar {
    client: Client,
    registration: Arc<AgentServiceRegistration>,
    id: String,
    interval: Duration,
    /// Consul confirmed the registration (and nothing has said it is gone since).
    registered: Arc<AtomicBool>,
    /// A registration was sent; it may have reached the agent even if its answer did not.
    attempted: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    First,
    Again,
}

impl Registrar {
    /// Keep `registration` registered through `client`'s agent; `interval` paces the watch
    /// (one blocking read waits about that long) and bounds the retry delays, so that a
    /// lost entry is back within two intervals.
    /// A registration that opted in to the reaper gets a new `reap-start` here (see the
    /// module documentation).
    pub fn new(
        client: Client,
        mut registration: AgentServiceRegistration,
        interval: Duration,
    ) -> Self {
        crate::reap_meta::restart(&mut registration);
        let id = registration
            .id
            .clone()
            .unwrap_or_else(|| registration.name.clone());
        Registrar {
            client,
            registration: Arc::new(registration),
            id,
            interval,
            registered: Arc::new(AtomicBool::new(false)),
            attempted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The service ID it registers.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Put the service in maintenance mode, or take it out; see
    /// [`Registration::maintenance`].
    pub async fn maintenance(&self, enable: bool, reason: Option<&str>) -> Result<()> {
        self.client
            .agent()
            .service_maintenance(&self.id, enable, reason)
            .await
            .map_err(|source| Error::Maintenance {
                id: self.id.clone(),
                source,
            })
    }

    /// Register, then keep the registration in place until `stop`. Returns `Ok` when
    /// stopped, an error when Consul refuses for good.
    pub async fn maintain(&self, stop: CancellationToken) -> Result<()> {
        if !self.register(&stop, Attempt::First).await? {
            return Ok(());
        }
        // The agent's endpoints block on a content hash: the one blocking-query driver, in
        // hash mode. A 404 (the entry is gone) is an answer without a hash: delivered.
        let watch = Watch::hash(QueryOptions::default(), self.watch_wait())
            .with_min_interval(MIN_READ_INTERVAL);
        // The registration has worked: a 403 now is a late one, retried.
        let retry = Retry::new(CLASSIFY, self.backoff()).answered_before();
        let mut follow = Follow::new(watch, retry, |opts: QueryOptions| {
            let (client, id) = (self.client.clone(), self.id.clone());
            async move {
                Ok(match client.agent().service(&id, &opts).await? {
                    Some((service, meta)) => (Some(service), meta),
                    None => (None, QueryMeta::default()),
                })
            }
        });
        const WHAT: &str = "watch its registration";
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                event = follow.next() => event,
            };
            match event {
                Event::Changed {
                    value, answered, ..
                } => {
                    log_recovered(WHAT, answered);
                    if value.is_some() {
                        continue;
                    }
                    follow.watch_mut().reset();
                    self.registered.store(false, Ordering::SeqCst);
                    tracing::warn!(
                        id = %self.id,
                        "the agent no longer has this service (agent restarted, or deregistered by an operator): registering again"
                    );
                    if !self.register(&stop, Attempt::Again).await? {
                        return Ok(());
                    }
                }
                // Never refused: no answer is checked for staleness here.
                Event::Refused { .. } => {}
                // A retryable error, or a 403 now that the registration has worked.
                Event::Unreachable(retrying) => log_retrying(WHAT, &retrying),
                Event::Fatal(e) => return Err(self.fatal(e)),
            }
        }
    }

    /// Deregister if registered; failures are logged, never fatal (Consul drops the service
    /// by itself once its check has failed for `DeregisterCriticalServiceAfter`).
    pub async fn deregister(&self) {
        let confirmed = self.registered.swap(false, Ordering::SeqCst);
        if !confirmed && !self.attempted.load(Ordering::SeqCst) {
            tracing::info!(id = %self.id, "never registered: nothing to deregister");
            return;
        }
        let started = Instant::now();
        let result = tokio::time::timeout(
            DEREGISTER_TIMEOUT,
            self.client.agent().service_deregister(&self.id),
        )
        .await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(Ok(())) => tracing::info!(id = %self.id, elapsed_ms, "deregistered from Consul"),
            // A registration was in flight at shutdown and its answer never came: deregister
            // in case it landed, quietly if it did not.
            Ok(Err(e)) if !confirmed => {
                tracing::debug!(id = %self.id, error = %e, "nothing to deregister");
            }
            Err(_) if !confirmed => {
                tracing::debug!(id = %self.id, "deregistration of an unconfirmed registration timed out");
            }
            Ok(Err(e)) => tracing::warn!(
                id = %self.id,
                error = %e,
                "could not deregister: Consul drops the service once its check has failed long enough"
            ),
            Err(_) => tracing::warn!(
                id = %self.id,
                timeout = ?DEREGISTER_TIMEOUT,
                "deregistration timed out: Consul drops the service once its check has failed long enough"
            ),
        }
    }

    /// Register, retrying transient failures with backoff and jitter until it works, Consul
    /// refuses for good (an error), or `stop` (`Ok(false)`). Registering again, a 403 is
    /// retried too: the first registration worked, so the token may come back.
    async fn register(&self, stop: &CancellationToken, attempt: Attempt) -> Result<bool> {
        let what = match attempt {
            Attempt::First => "register (is the agent up yet?)",
            Attempt::Again => "register again",
        };
        let started = Instant::now();
        let mut retry = Retry::new(CLASSIFY, self.backoff());
        if attempt == Attempt::Again {
            retry = retry.answered_before();
        }
        loop {
            self.attempted.store(true, Ordering::SeqCst);
            let agent = self.client.agent();
            let result = tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                result = agent.service_register(&self.registration) => result,
            };
            match result.map_err(|e| retry.failure(e)) {
                Ok(()) => break,
                Err(Ok(retrying)) => {
                    log_retrying(what, &retrying);
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(false),
                        () = tokio::time::sleep(retrying.retry_in) => {}
                    }
                }
                Err(Err(e)) => return Err(self.fatal(e)),
            }
        }
        self.registered.store(true, Ordering::SeqCst);
        let r = &self.registration;
        let check = r.check.as_ref();
        let fields = (
            r.address.as_deref().unwrap_or_default(),
            r.port.unwrap_or_default(),
            check.and_then(|c| c.http.as_deref()).unwrap_or_default(),
        );
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match attempt {
            Attempt::First => tracing::info!(
                id = %self.id,
                name = %r.name,
                address = fields.0,
                port = fields.1,
                check = fields.2,
                interval = %consul_api::GoDuration(self.interval),
                elapsed_ms,
                "registered with Consul"
            ),
            Attempt::Again => tracing::info!(
                id = %self.id,
                name = %r.name,
                elapsed_ms,
                "re-registered with Consul"
            ),
        }
        Ok(true)
    }

    fn fatal(&self, source: consul_api::Error) -> Error {
        Error::Register {
            id: self.id.clone(),
            source,
        }
    }

    /// How long one blocking read waits: an interval, so that even a missed wake-up is
    /// noticed within two intervals.
    fn watch_wait(&self) -> Duration {
        self.interval
            .clamp(Duration::from_secs(1), Duration::from_secs(300))
    }

    /// Retries back off from 50 ms to a quarter interval (jitter adds up to as much again),
    /// so a registration lost while the agent restarts is back within two intervals.
    fn backoff(&self) -> Backoff {
        backoff_for(self.interval)
    }
}

fn backoff_for(interval: Duration) -> Backoff {
    let max = (interval / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    Backoff::new(Duration::from_millis(50), max)
}

/// The error policy of registration and of its watch: transient errors are retried; a 403
/// is fatal until a registration has worked, retried after (the token deleted or rotated, the
/// agent restarted without it).
const CLASSIFY: Classify = Classify {
    before_success: Retried::Transient,
    after_success: Retried::TransientAndDenied,
};

/// Log a failure to `what` that is retried: when its kind changes at warn (a late 403 at
/// error), repeats at debug.
fn log_retrying(what: &str, r: &Retrying) {
    let (e, delay) = (&r.error, r.retry_in);
    if r.news && e.is_permission_denied() {
        tracing::error!(error = %e, retry_in = ?delay, "Consul refused the ACL token after it had worked (token deleted or rotated? agent restarted?): still serving; cannot {what}, retrying with backoff until the token works again");
    } else if !r.news {
        tracing::debug!(error = %e, retry_in = ?delay, failures = r.failures, "Consul: cannot {what} yet, retrying");
    } else {
        tracing::warn!(error = %e, retry_in = ?delay, "Consul: cannot {what}, retrying with backoff");
    }
}

/// Log the recovery once, after failures to `what`.
fn log_recovered(what: &str, answered: Answered) {
    if answered.failures > 0 {
        tracing::info!(
            failures = answered.failures,
            "Consul answers again ({what})"
        );
    }
}

/// A service registered for as long as it runs, with the pieces wired together the way a
/// service needs them: [`Registration::start`] registers it (a [`Registrar`]), keeps a TTL
/// check passing if the registration has one (a [`Heartbeat`]), and at shutdown takes it out
/// of rotation. Its [`Health`] is the one to serve on an HTTP check
/// ([`check::serve`](crate::check::serve) or [`CheckService`](crate::check::CheckService));
/// [`start_with_health`](Self::start_with_health) takes one made before, so the router that
/// serves the check can exist first.
///
/// **Service IDs**: give each instance an ID derived from the address its check probes
/// (`billing-10.0.0.5-7000`), unique in the cluster. A process that restarts on the same
/// address then takes its own entry over; an ID unique per process start instead leaves the
/// dead one's entry behind, and if a new process reuses that port, the old entry's check
/// passes again: two passing entries for one process (until `DeregisterCriticalServiceAfter`
/// never comes, since the check passes). [`Balancer`](crate::Balancer) and [`Pool`](crate::Pool)
/// key by address, so they still count it once.
///
/// **Shutdown, exactly**: [`drain`](Self::drain) (or `shutdown` being cancelled, without the
/// linger) does, in order:
///
/// 1. the [`Health`] turns draining: the check answers 503 from now on;
/// 2. with a TTL check, a last beat reports it critical to the agent at once; with an HTTP
///    check nothing critical reaches Consul before step 3: the agent only sees the 503 at its
///    next check run, an interval later, and by then the service is deregistered;
/// 3. the service is deregistered (capped at 3 s; if that fails Consul removes it once the
///    check has been critical for `DeregisterCriticalServiceAfter`): discovery's blocking
///    queries wake and clients drop the instance;
/// 4. it lingers ([`with_linger`](Self::with_linger), default [`DEFAULT_LINGER`]) while
///    clients' views catch up, still serving whoever has not caught up;
/// 5. [`drain`](Self::drain) returns: now stop accepting and finish the requests in flight
///    (axum's `with_graceful_shutdown`, hyper's `graceful_shutdown`).
///
/// ```no_run
/// use consul_api::{AgentServiceCheck, AgentServiceRegistration, Client, GoDuration};
/// use consul_registry::Registration;
/// use tokio_util::sync::CancellationToken;
///
/// # async fn demo() -> anyhow::Result<()> {
/// let service = AgentServiceRegistration {
///     id: Some("billing-1".into()),
///     name: "billing".into(),
///     port: Some(7000),
///     check: Some(AgentServiceCheck {
///         ttl: Some(GoDuration::from_secs(10)),
///         ..Default::default()
///     }),
///     ..Default::default()
/// };
/// let mut registration = Registration::start(Client::from_env()?, service, CancellationToken::new());
/// // ... serve; on SIGTERM:
/// registration.drain().await?; // critical, deregistered, lingered
/// // ... now stop accepting and drain the connections
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Registration {
    registrar: Registrar,
    health: Health,
    stop: CancellationToken,
    linger: Duration,
    task: Option<JoinHandle<Result<()>>>,
}

/// How long [`Registration::drain`] lingers after deregistering by default: a client
/// following the service with blocking queries learns of the deregistration within
/// milliseconds on one agent (measured by the kill test, `docs/results/service.md`), but
/// sources that poll (the agent's list, prepared queries, DNS) only at their next read, one
/// second apart by default (`docs/results/discovery.md`: 0.98 s); 2 s covers them with room.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(2);

impl Registration {
    /// Register `service` through `client`'s agent and keep it registered until `shutdown`
    /// is cancelled or [`drain`](Self::drain) is called; then take it out of rotation (see
    /// the type's documentation). Must be called within a tokio runtime.
    pub fn start(
        client: Client,
        service: AgentServiceRegistration,
        shutdown: CancellationToken,
    ) -> Registration {
        Registration::start_with_health(client, service, Health::default(), shutdown)
    }

    /// Like [`start`](Self::start), with a [`Health`] made before (already served by the
    /// service's router, say).
    pub fn start_with_health(
        client: Client,
        service: AgentServiceRegistration,
        health: Health,
        shutdown: CancellationToken,
    ) -> Registration {
        let stop = shutdown.child_token();
        let ttl = service.check.as_ref().and_then(|c| Some((c.ttl?.0, c)));
        let interval = ttl.map(|(ttl, _)| ttl).or_else(|| {
            let check = service.check.as_ref()?;
            check.interval.map(|i| i.0)
        });
        let registrar = Registrar::new(
            client.clone(),
            service.clone(),
            interval.unwrap_or(DEFAULT_INTERVAL),
        );
        let heartbeat = ttl.map(|(ttl, check)| {
            let check_id = check
                .check_id
                .clone()
                .unwrap_or_else(|| format!("service:{}", registrar.id()));
            Heartbeat::new(client, check_id, ttl, health.clone())
        });
        let task = tokio::spawn({
            let (registrar, health, stop) = (registrar.clone(), health.clone(), stop.clone());
            async move {
                // The heartbeat stops only once the health is draining, so that its last
                // beat reports critical.
                let beats_stop = CancellationToken::new();
                let out_of_rotation = async {
                    stop.cancelled().await;
                    health.set_draining();
                    beats_stop.cancel();
                    Ok(())
                };
                let beat = async {
                    match heartbeat {
                        Some(h) => h.run(beats_stop.clone()).await,
                        None => Ok(()),
                    }
                };
                let kept =
                    tokio::try_join!(registrar.maintain(stop.clone()), beat, out_of_rotation);
                // Shutdown (or a fatal error): out of rotation, then out of the catalog.
                health.set_draining();
                registrar.deregister().await;
                kept.map(drop)
            }
        });
        Registration {
            registrar,
            health,
            stop,
            linger: DEFAULT_LINGER,
            task: Some(task),
        }
    }

    /// How long [`drain`](Self::drain) lingers after deregistering ([`DEFAULT_LINGER`]).
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Take the service out of rotation and return once clients have had time to stop using
    /// it: the check turns critical, the service is deregistered, then it lingers (see the
    /// type's documentation). Call it first in a graceful shutdown; stop accepting after it
    /// returns. The error is a registration that had already failed for good.
    pub async fn drain(&mut self) -> Result<()> {
        self.stop.cancel();
        let ended = self.wait().await;
        tracing::info!(id = %self.registrar.id(), linger = ?self.linger, "out of rotation: lingering while clients' views catch up");
        tokio::time::sleep(self.linger).await;
        ended
    }

    /// The service's health: what its HTTP check answers and its TTL check reports.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Put the service in maintenance mode (out of every passing set, still registered) or
    /// take it out, with `reason` shown by Consul.
    pub async fn maintenance(&self, enable: bool, reason: Option<&str>) -> Result<()> {
        self.registrar.maintenance(enable, reason).await
    }

    /// Deregister now, before shutdown (it stays deregistered only if shutdown follows: the
    /// registration is kept in place until then).
    pub async fn deregister(&self) {
        self.registrar.deregister().await;
    }

    /// Until the registration has ended: after shutdown, once it is deregistered (`Ok`), or
    /// at once when Consul refused it for good (a 403 before it ever worked). Cancel-safe;
    /// after it returned, it returns `Ok` at once.
    pub async fn wait(&mut self) -> Result<()> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let result = task.await;
        self.task = None;
        match result {
            Ok(result) => result,
            Err(e) => Err(Error::Task(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_half_an_interval() {
        for secs in [1, 5, 30] {
            let interval = Duration::from_secs(secs);
            let mut backoff = backoff_for(interval);
            let delays: Vec<_> = (0..50).map(|_| backoff.next_delay()).collect();
            assert!(delays[0] <= Duration::from_millis(100));
            for d in &delays {
                assert!(
                    *d <= (interval / 2).max(Duration::from_millis(200)),
                    "{d:?}"
                );
            }
        }
    }

    #[test]
    fn retries_are_jittered() {
        let delays = || {
            let mut backoff = backoff_for(Duration::from_secs(5));
            (0..8).map(|_| backoff.next_delay()).collect::<Vec<_>>()
        };
        let (a, b) = (delays(), delays());
        assert_ne!(a, b, "two servers do not retry in lockstep");
    }
}
