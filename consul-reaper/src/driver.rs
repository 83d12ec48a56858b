//! The driver: [`run`] follows one agent's checks and drives the [`Reaper`] state machine
//! against it, deregistering what falls due.
//!
//! * **What it follows.** `GET /v1/health/node/<the agent's node>` by blocking query (the one
//!   [`Watch`]): the catalog's copy of the agent's checks, which the agent updates at every
//!   status change (`/v1/agent/checks` does not block in Consul 1.8). At each change it reads
//!   `GET /v1/agent/services` (local, not blocking) for the services the agent holds and their
//!   Meta; a Meta changed while no check changes takes effect at the next change.
//! * **Outages.** While the agent does not answer, nothing is removed and every clock is kept.
//!   Once the reaper has had an answer, every failure to read is retried with the one
//!   [`Backoff`] (a 400 after the agent was reloaded to HTTPS, a certificate from a CA not
//!   trusted yet, a deleted token's 403): refusals are logged at error level once, then
//!   retried quietly. Before the first answer, a refusal ends [`run`] with its error.
//! * **ACLs.** The token needs `agent:read`, `node:read` and `service:read` to follow, and
//!   `service:write` on every service it may remove. A refused removal (403) is reported once
//!   ([`Event::Refused`], an [`Error::Reap`] naming what the token lacks) and not attempted
//!   again for that service until its check recovers or it is registered again; a token
//!   refused before the first answer ends [`run`] with that error (one refused later is
//!   retried, as above). Other failures of a removal are retried with the one [`Backoff`],
//!   once the agent answers again.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use consul_api::{
    AgentService, Backoff, Classify, Client, Follow, GoDuration, HealthCheck, QueryMeta,
    QueryOptions, Retried, Retry, Retrying, Watch,
};
use consul_registry::reap_meta::{META_KEY, START_KEY};
use futures::future::BoxFuture;
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    state::{Notice, Observation, Outcome, Reaper, Removal},
};

/// The reaper's log line for a removal (tests and the testbed look for it).
pub const REMOVED: &str = "deregistered the service";

/// The reaper's log line once it follows the agent's checks.
pub const FOLLOWING: &str = "the reaper follows the agent's checks";

/// What the token needs to follow the agent's checks.
const READ_NEEDS: &str =
    "agent:read and node:read on the agent's node, and service:read on its services";

/// Reads start at least this far apart (the [`Watch`] default of 20 ms would date a change
/// that follows another closely up to 20 ms late).
const MIN_INTERVAL: Duration = Duration::from_millis(2);

/// How the reaper runs.
#[derive(Debug, Clone)]
pub struct ReaperConfig {
    /// The longest a blocking query waits (default 5 minutes).
    pub wait: Duration,
    /// The Meta key services opt in with (default [`META_KEY`]).
    pub meta_key: String,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        ReaperConfig {
            wait: Duration::from_secs(300),
            meta_key: META_KEY.to_owned(),
        }
    }
}

/// What the running reaper did, for its caller to log or count.
#[derive(Debug)]
pub enum Event {
    /// An answer came in: services that opted in, and how many of them are critical.
    Observed {
        /// Services of the agent that opted in.
        tracked: usize,
        /// Those with a critical check.
        critical: usize,
    },
    /// Something worth telling the operator (also logged).
    Notice(Notice),
    /// The agent stopped answering: no removal until it answers again.
    Lost {
        /// Why.
        error: consul_api::Error,
    },
    /// The agent deregistered a service.
    Removed {
        /// What was decided.
        removal: Removal,
        /// How long after its deadline the deregistration was answered.
        late: Duration,
    },
    /// The token may not deregister the service: not attempted again for this critical spell.
    Refused {
        /// What was decided.
        removal: Removal,
        /// [`Error::Reap`], with Consul's 403 as its source.
        error: Error,
    },
    /// A deregistration failed for now; it is tried again after `retry_in`, once the agent
    /// has answered again.
    Failed {
        /// What was decided.
        removal: Removal,
        /// Consul's answer.
        error: consul_api::Error,
        /// The pause before the next try.
        retry_in: Duration,
    },
}

/// The agent, as the reaper needs it (tests script it).
pub(crate) trait AgentApi: Send + Sync + 'static {
    /// The agent's node name and ID (`/v1/agent/self`).
    fn whoami(&self) -> BoxFuture<'_, consul_api::Result<(String, String)>>;
    /// `/v1/health/node/<node>`.
    fn node_checks<'a>(
        &'a self,
        node: &'a str,
        opts: QueryOptions,
    ) -> BoxFuture<'a, consul_api::Result<(Vec<HealthCheck>, QueryMeta)>>;
    /// `/v1/agent/services`.
    fn services(&self) -> BoxFuture<'_, consul_api::Result<BTreeMap<String, AgentService>>>;
    /// `PUT /v1/agent/service/deregister/<id>`.
    fn deregister<'a>(&'a self, service_id: &'a str) -> BoxFuture<'a, consul_api::Result<()>>;
}

/// The real agent, through the one client.
#[derive(Debug)]
struct ConsulAgent(Client);

impl AgentApi for ConsulAgent {
    fn whoami(&self) -> BoxFuture<'_, consul_api::Result<(String, String)>> {
        Box::pin(async move {
            let me = self.0.agent().agent_self().await?;
            Ok((me.config.node_name, me.config.node_id))
        })
    }

    fn node_checks<'a>(
        &'a self,
        node: &'a str,
        opts: QueryOptions,
    ) -> BoxFuture<'a, consul_api::Result<(Vec<HealthCheck>, QueryMeta)>> {
        Box::pin(async move { self.0.health().node(node, &opts).await })
    }

    fn services(&self) -> BoxFuture<'_, consul_api::Result<BTreeMap<String, AgentService>>> {
        Box::pin(async move { self.0.agent().services().await })
    }

    fn deregister<'a>(&'a self, service_id: &'a str) -> BoxFuture<'a, consul_api::Result<()>> {
        Box::pin(async move { self.0.agent().service_deregister(service_id).await })
    }
}

/// Run the reaper against the agent `client` speaks to, until `stop`; each [`Event`] goes to
/// `report`. Returns an error only if the agent refuses to let it follow its checks before the
/// first answer (a 403, a 400, a TLS failure: [`Error::Reap`]); everything else, and any
/// refusal after the first answer, is retried with backoff.
pub async fn run(
    client: Client,
    config: ReaperConfig,
    stop: CancellationToken,
    report: impl FnMut(Event) + Send,
) -> Result<()> {
    drive(Arc::new(ConsulAgent(client)), config, stop, report).await
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the follower tells the driver.
enum Msg {
    Answer(Observation),
    Lost(consul_api::Error),
    Fatal(Error),
}

/// [`run`] over any [`AgentApi`].
pub(crate) async fn drive(
    api: Arc<dyn AgentApi>,
    config: ReaperConfig,
    stop: CancellationToken,
    mut report: impl FnMut(Event) + Send,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel(1);
    let refresh = Arc::new(Notify::new());
    let _follower = AbortOnDrop(tokio::spawn(follow(
        api.clone(),
        config.wait,
        tx,
        refresh.clone(),
    )));
    let mut reaper = Reaper::new(config.meta_key);
    let mut backoff = Backoff::consul();
    loop {
        let deadline = reaper.next_deadline();
        tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            msg = rx.recv() => match msg {
                Some(Msg::Answer(obs)) => {
                    for notice in reaper.observe(&obs) {
                        log_notice(&notice);
                        report(Event::Notice(notice));
                    }
                    let (tracked, critical) = reaper.counts();
                    report(Event::Observed { tracked, critical });
                }
                Some(Msg::Lost(error)) => {
                    reaper.lost();
                    report(Event::Lost { error });
                }
                Some(Msg::Fatal(e)) => return Err(e),
                None => return Err(Error::Task("the reaper's watch ended".into())),
            },
            () = sleep_until(deadline) => {}
        }
        for removal in reaper.due(Instant::now()) {
            let id = removal.service_id.clone();
            let answer = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                answer = api.deregister(&id) => answer,
            };
            match answer {
                Ok(()) => {
                    backoff.reset();
                    reaper.finished(&id, Outcome::Removed);
                    let late = Instant::now().saturating_duration_since(removal.deadline());
                    tracing::info!(
                        service = %id,
                        after = %GoDuration(removal.after),
                        late_ms = late.as_millis() as u64,
                        "check critical for its reap-after; {REMOVED}"
                    );
                    report(Event::Removed { removal, late });
                }
                Err(e) if e.is_permission_denied() => {
                    reaper.finished(&id, Outcome::Refused);
                    let error = Error::Reap {
                        what: format!(
                            "deregister service {id:?} (its token needs service:write on it; \
                             not tried again until the service's check recovers)"
                        ),
                        source: e,
                    };
                    log_refusal(&error);
                    report(Event::Refused { removal, error });
                }
                Err(e) => {
                    // Retried once the agent has answered again (it may be a new one) and
                    // the backoff has passed.
                    let retry_in = backoff.next_delay();
                    reaper.finished(&id, Outcome::RetryAt(Instant::now() + retry_in));
                    reaper.lost();
                    refresh.notify_one();
                    tracing::warn!(
                        service = %id,
                        "cannot deregister for now ({e}); retrying in {retry_in:?}"
                    );
                    report(Event::Failed {
                        removal,
                        error: e,
                        retry_in,
                    });
                }
            }
        }
    }
}

/// Sleep until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn log_notice(notice: &Notice) {
    match notice {
        Notice::InvalidSetting { service_id, value } => tracing::warn!(
            service = %service_id,
            "Meta {META_KEY}={value:?} is not a Go duration above zero (like 30s or 1m30s); \
             the reaper leaves this service alone"
        ),
        Notice::AgentReplaced => tracing::warn!(
            "the agent's node ID changed (a new agent): every check's critical time starts over"
        ),
        Notice::Yielded { service_id } => tracing::warn!(
            service = %service_id,
            "registered again by its own process (the same {START_KEY}) after the reaper removed \
             it: the process is alive and its registrar wins; this start is left alone until it \
             starts over"
        ),
    }
}

/// Log a refusal with its cause (Consul's 403, which names `CONSUL_HTTP_TOKEN`).
fn log_refusal(error: &Error) {
    let cause = error.consul().map(ToString::to_string).unwrap_or_default();
    tracing::error!("{error}: {cause}");
}

/// Follow the agent's checks and send each answer; on failure say so once, retry with
/// backoff, and re-read who the agent is (it may have been replaced). `refresh` abandons a
/// blocking query for an immediate read.
async fn follow(
    api: Arc<dyn AgentApi>,
    wait: Duration,
    tx: mpsc::Sender<Msg>,
    refresh: Arc<Notify>,
) {
    let watch = Watch::new(QueryOptions::default(), wait).with_min_interval(MIN_INTERVAL);
    // Before the first answer a refusal is a setting to fix: fatal. After it (a token
    // rotated, an agent reloaded to HTTPS, a CA rotated) everything is retried.
    let classify = Classify {
        before_success: Retried::Transient,
        after_success: Retried::All,
    };
    // Who the agent is: read once, again after a failure (it may be a new agent).
    let me: Arc<Mutex<Option<(String, String)>>> = Arc::default();
    let fetch = {
        let me = me.clone();
        move |opts: QueryOptions| read(api.clone(), me.clone(), opts)
    };
    let mut follow = Follow::new(watch, Retry::new(classify, Backoff::consul()), fetch);
    loop {
        let event = tokio::select! {
            event = follow.next() => event,
            () = refresh.notified() => {
                follow.watch_mut().reset();
                continue;
            }
            () = tx.closed() => return,
        };
        match event {
            consul_api::Event::Changed {
                value, answered, ..
            } => {
                if answered.news {
                    let me = lock(&me).clone();
                    let node = me.as_ref().map_or("", |(node, _)| node.as_str());
                    tracing::info!(node, "{FOLLOWING}");
                }
                if tx.send(Msg::Answer(value)).await.is_err() {
                    return;
                }
            }
            // Never: no answer is refused here.
            consul_api::Event::Refused { .. } => {}
            consul_api::Event::Unreachable(Retrying { error: e, news, .. }) => {
                // The agent may be a new one, with a new node ID (its indexes start over:
                // the watch is reset).
                *lock(&me) = None;
                if !news {
                    continue;
                }
                if e.is_retryable() {
                    tracing::warn!(
                        state = %e.kind(),
                        "the reaper cannot read the agent's checks ({e}); no removal until \
                         it can, retrying with backoff"
                    );
                } else {
                    tracing::error!(
                        state = %e.kind(),
                        "the agent refuses the reaper's reads after they had worked ({e}; \
                         a token deleted, the agent reloaded to HTTPS, a CA rotated?): no \
                         removal until it answers again, every clock kept; retrying with \
                         backoff"
                    );
                }
                if tx.send(Msg::Lost(e)).await.is_err() {
                    return;
                }
            }
            consul_api::Event::Fatal(e) => {
                let error = Error::Reap {
                    what: format!("follow the agent's checks (its token needs {READ_NEEDS})"),
                    source: e,
                };
                log_refusal(&error);
                let _ = tx.send(Msg::Fatal(error)).await;
                return;
            }
        }
    }
}

/// One read: who the agent is (once, cached in `me`), its node's checks (blocking on
/// `opts`), its services.
async fn read(
    api: Arc<dyn AgentApi>,
    me: Arc<Mutex<Option<(String, String)>>>,
    opts: QueryOptions,
) -> consul_api::Result<(Observation, QueryMeta)> {
    let known = lock(&me).clone();
    let (node, node_id) = match known {
        Some(known) => known,
        None => {
            let known = api.whoami().await?;
            lock(&me).insert(known).clone()
        }
    };
    let (checks, meta) = api.node_checks(&node, opts).await?;
    let at = Instant::now();
    let services = api.services().await?;
    let obs = Observation {
        at,
        node_id,
        checks,
        services,
    };
    Ok((obs, meta))
}

/// The lock on who the agent is (a panic while it was held cannot leave it half written).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use consul_api::HealthStatus;

    use super::*;
    use crate::state::tests::{check, secs, service};

    // The driver, over a scripted agent, in paused time.

    #[derive(Debug, Default)]
    struct Agent {
        index: u64,
        node_id: String,
        checks: Vec<HealthCheck>,
        services: BTreeMap<String, AgentService>,
        /// Answers to deregistrations, in order; `Ok` once they run out.
        deregister_answers: Vec<consul_api::Result<()>>,
        deregister_calls: usize,
        deregistered: Vec<(String, Instant)>,
        whoami_denied: bool,
        /// Answers to the next reads of the checks, in order, before the agent answers again.
        read_errors: Vec<consul_api::Error>,
    }

    #[derive(Debug, Clone)]
    struct Fake(Arc<tokio::sync::watch::Sender<Agent>>);

    impl Fake {
        fn new(services: &[(&str, Option<&str>)], checks: Vec<HealthCheck>) -> Fake {
            let (tx, _) = tokio::sync::watch::channel(Agent {
                index: 1,
                node_id: "node-1".into(),
                checks,
                services: services.iter().map(|(id, v)| service(id, *v)).collect(),
                ..Default::default()
            });
            Fake(Arc::new(tx))
        }

        fn set_status(&self, service_id: &str, status: HealthStatus) {
            self.0.send_modify(|a| {
                a.index += 1;
                for c in &mut a.checks {
                    if c.service_id == service_id {
                        c.status = status;
                    }
                }
            });
        }

        fn deregistered(&self) -> Vec<(String, Instant)> {
            self.0.borrow().deregistered.clone()
        }
    }

    fn denied(path: &str) -> consul_api::Error {
        consul_api::Error::PermissionDenied {
            method: "PUT",
            path: path.into(),
            message: "Permission denied".into(),
        }
    }

    impl AgentApi for Fake {
        fn whoami(&self) -> BoxFuture<'_, consul_api::Result<(String, String)>> {
            let answer = {
                let a = self.0.borrow();
                if a.whoami_denied {
                    Err(denied("/v1/agent/self"))
                } else {
                    Ok(("n1".to_owned(), a.node_id.clone()))
                }
            };
            Box::pin(async move { answer })
        }

        fn node_checks<'a>(
            &'a self,
            _node: &'a str,
            opts: QueryOptions,
        ) -> BoxFuture<'a, consul_api::Result<(Vec<HealthCheck>, QueryMeta)>> {
            Box::pin(async move {
                let mut refused = None;
                self.0.send_if_modified(|a| {
                    if !a.read_errors.is_empty() {
                        refused = Some(a.read_errors.remove(0));
                    }
                    false
                });
                if let Some(e) = refused {
                    return Err(e);
                }
                let mut rx = self.0.subscribe();
                let a = rx
                    .wait_for(|a| a.index > opts.wait_index)
                    .await
                    .expect("the fake lives");
                let meta = QueryMeta {
                    last_index: a.index,
                    ..Default::default()
                };
                Ok((a.checks.clone(), meta))
            })
        }

        fn services(&self) -> BoxFuture<'_, consul_api::Result<BTreeMap<String, AgentService>>> {
            let services = self.0.borrow().services.clone();
            Box::pin(async move { Ok(services) })
        }

        fn deregister<'a>(&'a self, service_id: &'a str) -> BoxFuture<'a, consul_api::Result<()>> {
            let mut answer = Ok(());
            self.0.send_modify(|a| {
                a.deregister_calls += 1;
                if !a.deregister_answers.is_empty() {
                    answer = a.deregister_answers.remove(0);
                }
                if answer.is_ok() {
                    a.index += 1;
                    a.services.remove(service_id);
                    a.checks.retain(|c| c.service_id != service_id);
                    a.deregistered.push((service_id.to_owned(), Instant::now()));
                }
            });
            Box::pin(async move { answer })
        }
    }

    type Events = Arc<Mutex<Vec<Event>>>;

    fn start(
        fake: &Fake,
    ) -> (
        Events,
        CancellationToken,
        tokio::task::JoinHandle<Result<()>>,
    ) {
        let events: Events = Arc::default();
        let stop = CancellationToken::new();
        let sink = events.clone();
        let task = tokio::spawn(drive(
            Arc::new(fake.clone()),
            ReaperConfig::default(),
            stop.clone(),
            move |e| sink.lock().unwrap().push(e),
        ));
        (events, stop, task)
    }

    #[tokio::test(start_paused = true)]
    async fn the_driver_removes_at_the_deadline_to_the_millisecond() {
        let fake = Fake::new(
            &[("web-1", Some("5s")), ("other", None)],
            vec![
                check("web-1", HealthStatus::Passing),
                check("other", HealthStatus::Critical),
            ],
        );
        let (events, stop, task) = start(&fake);
        tokio::time::sleep(secs(1)).await;
        fake.set_status("web-1", HealthStatus::Critical);
        let critical_at = Instant::now();
        tokio::time::sleep(secs(30)).await;
        let removed = fake.deregistered();
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert_eq!(removed[0].0, "web-1");
        let took = removed[0].1 - critical_at;
        assert!(
            took >= secs(5) && took <= secs(5) + Duration::from_millis(5),
            "{took:?}"
        );
        assert!(events.lock().unwrap().iter().any(|e| matches!(
            e,
            Event::Removed { removal, .. } if removal.service_id == "web-1"
        )));
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_removal_is_tried_once_and_names_the_permission() {
        let fake = Fake::new(
            &[("web-1", Some("5s"))],
            vec![check("web-1", HealthStatus::Critical)],
        );
        fake.0.send_modify(|a| {
            a.deregister_answers = vec![
                Err(denied("/v1/agent/service/deregister/web-1")),
                Err(denied("/v1/agent/service/deregister/web-1")),
            ];
        });
        let (events, stop, task) = start(&fake);
        tokio::time::sleep(secs(600)).await;
        let refused: Vec<Error> = std::mem::take(&mut *events.lock().unwrap())
            .into_iter()
            .filter_map(|e| match e {
                Event::Refused { error, .. } => Some(error),
                _ => None,
            })
            .collect();
        assert_eq!(refused.len(), 1, "one try in 10 minutes");
        let printed = format!(
            "{:#}",
            anyhow::Error::from(refused.into_iter().next().expect("one"))
        );
        assert!(printed.contains("service:write"), "{printed}");
        assert!(printed.contains("CONSUL_HTTP_TOKEN"), "{printed}");
        assert_eq!(fake.0.borrow().deregister_calls, 1);
        // The check recovers and fails again: one more try (refused again).
        fake.set_status("web-1", HealthStatus::Passing);
        tokio::time::sleep(secs(1)).await;
        fake.set_status("web-1", HealthStatus::Critical);
        tokio::time::sleep(secs(60)).await;
        assert_eq!(fake.0.borrow().deregister_calls, 2);
        assert!(fake.deregistered().is_empty());
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_removal_is_retried_with_backoff_until_it_works() {
        let fake = Fake::new(
            &[("web-1", Some("5s"))],
            vec![check("web-1", HealthStatus::Critical)],
        );
        let unreachable = || consul_api::Error::Transport {
            method: "PUT",
            url: "http://127.0.0.1:8500".into(),
            path: "/v1/agent/service/deregister/web-1".into(),
            reason: "connection refused".into(),
            timeout: false,
        };
        fake.0
            .send_modify(|a| a.deregister_answers = vec![Err(unreachable()), Err(unreachable())]);
        let (events, stop, task) = start(&fake);
        tokio::time::sleep(secs(30)).await;
        assert_eq!(fake.deregistered().len(), 1);
        assert_eq!(fake.0.borrow().deregister_calls, 3);
        let failed = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, Event::Failed { .. }))
            .count();
        assert_eq!(failed, 2);
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    /// A 400 (an agent reloaded to HTTPS) and a TLS failure (a CA rotated).
    fn refusals() -> Vec<consul_api::Error> {
        vec![
            consul_api::Error::Status {
                method: "GET",
                path: "/v1/health/node/n1".into(),
                status: 400,
                message: "Client sent an HTTP request to an HTTPS server.".into(),
            },
            consul_api::Error::Tls {
                method: "GET",
                url: "https://127.0.0.1:8501".into(),
                path: "/v1/health/node/n1".into(),
                problem: "invalid peer certificate: UnknownIssuer".into(),
            },
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_after_the_first_answer_are_retried_and_every_clock_kept() {
        let fake = Fake::new(
            &[("web-1", Some("10s"))],
            vec![check("web-1", HealthStatus::Passing)],
        );
        let (events, stop, task) = start(&fake);
        tokio::time::sleep(secs(1)).await;
        // Critical; the next 4 reads are refused (under 3 s of backoff, within the deadline).
        let critical_at = Instant::now();
        fake.0.send_modify(|a| {
            a.read_errors = (0..2).flat_map(|_| refusals()).collect();
        });
        fake.set_status("web-1", HealthStatus::Critical);
        tokio::time::sleep(secs(30)).await;
        assert!(!task.is_finished(), "the reaper ended: {:?}", task.await);
        let lost: Vec<Option<u16>> = events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Lost { error } => Some(error.status()),
                _ => None,
            })
            .collect();
        assert_eq!(lost, [Some(400), None, Some(400), None]);
        assert!(fake.0.borrow().read_errors.is_empty(), "all read");
        // The clock ran on through the refusals: removed 10 s after it turned critical.
        let removed = fake.deregistered();
        assert_eq!(removed.len(), 1, "{removed:?}");
        let took = removed[0].1 - critical_at;
        assert!(
            took >= secs(10) && took <= secs(10) + Duration::from_millis(5),
            "{took:?}"
        );
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_before_the_first_answer_end_the_reaper_with_their_error() {
        for refusal in refusals() {
            let fake = Fake::new(&[], vec![]);
            let status = refusal.status();
            fake.0.send_modify(|a| a.read_errors = vec![refusal]);
            let (_events, _stop, task) = start(&fake);
            let error = tokio::time::timeout(secs(5), task)
                .await
                .expect("ends at once")
                .unwrap()
                .unwrap_err();
            assert_eq!(error.consul().and_then(consul_api::Error::status), status);
            let printed = format!("{:#}", anyhow::Error::from(error));
            assert!(printed.contains("follow the agent's checks"), "{printed}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_that_cannot_read_ends_the_reaper_with_the_hint() {
        let fake = Fake::new(&[], vec![]);
        fake.0.send_modify(|a| a.whoami_denied = true);
        let (_events, _stop, task) = start(&fake);
        let error = tokio::time::timeout(secs(5), task)
            .await
            .expect("ends at once")
            .unwrap()
            .unwrap_err();
        assert!(
            error
                .consul()
                .is_some_and(consul_api::Error::is_permission_denied)
        );
        let printed = format!("{:#}", anyhow::Error::from(error));
        assert!(printed.contains("node:read"), "{printed}");
    }
}
