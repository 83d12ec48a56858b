//! The opt-in reaper: deregisters a service of one agent once its check has been critical for
//! as long as the service asked, to the millisecond. Consul 1.8's own
//! `DeregisterCriticalServiceAfter` cannot do that: the agent raises the setting to at least
//! 1 minute and looks only every 30 s, so a `30s` setting removes a dead service 60 to 90 s
//! after its check turned critical (neither value is settable).
//!
//! * **Opting in.** A service asks with the Meta key [`META_KEY`] (`reap-after`), a Go
//!   duration above zero (`5s`, `1m30s`): [`opt_in`](consul_registry::reap_meta::opt_in) sets it. The check's own
//!   `DeregisterCriticalServiceAfter` cannot be used: Consul 1.8 does not return it (the
//!   check's `Definition` comes back empty). Keep `DeregisterCriticalServiceAfter` as well if
//!   Consul's own reaper should still remove the service (60 to 90 s later) while no reaper
//!   runs. A service without the key is never touched; one with an invalid value is reported
//!   once ([`Notice::InvalidSetting`]) and never touched. `opt_in` also sets [`START_KEY`]
//!   (`reap-start`), a value of its own to each start of the service's process
//!   ([`Registrar`](consul_registry::Registrar) and
//!   [`Registration`](consul_registry::Registration) give each of their starts a new one): how the reaper tells a process that came back from the one that
//!   died (below).
//! * **What it follows.** `GET /v1/health/node/<the agent's node>` by blocking query (the one
//!   [`Watch`]): the catalog's copy of the agent's checks, which the agent updates at every
//!   status change (`/v1/agent/checks` does not block in Consul 1.8). At each change it reads
//!   `GET /v1/agent/services` (local, not blocking) for the services the agent holds and their
//!   Meta; a Meta changed while no check changes takes effect at the next change.
//! * **The rule.** Each check of a service that opted in is dated from the answer that first
//!   shows it critical; the service is removed once one of its checks has been critical for
//!   `reap-after`, with no floor and no grid. A check that passes (or warns) before then
//!   resets its clock; a check that was never passing is dated from its first critical answer
//!   like any other, so it is not removed before the deadline either. Node checks
//!   (`serfHealth`), maintenance checks, and checks of services the agent does not hold are
//!   ignored: the agent owns its services, and a catalog deregistration would be undone by its
//!   anti-entropy sync. Removal goes through the agent: `PUT /v1/agent/service/deregister/<id>`.
//! * **Critical since when.** The agent keeps each check's `CriticalTime` but Consul 1.8 does
//!   not expose it (not in `/v1/agent/checks`, not in the catalog; `Output` carries no time).
//!   The reaper dates it from its own answers, a few milliseconds after the agent (the agent
//!   syncs a status change to the catalog at once). A reaper (re)started while a check is
//!   already critical dates it from that first answer: the service is then removed
//!   `reap-after` after the restart, never early, late by at most the time the check had
//!   already been critical (worst case: one whole `reap-after` after the restart).
//! * **Registered again.** Consul 1.8.7 keeps a service's and its checks' `CreateIndex` and
//!   `ModifyIndex` when the same ID is registered again in place, and keeps the check's status
//!   (critical until its next run): nothing the reaper can read changes but the Meta. So a new
//!   [`START_KEY`] value (a process that crashed and came back with the same ID) starts the
//!   clock over, as does a check created anew (its `CreateIndex` changed: registered again
//!   after a removal) and an agent replaced underneath (its node ID changed: a restarted dev
//!   agent). A service registered again in place without a new `reap-start` keeps its clock:
//!   to the reaper it is the same instance.
//! * **The reaper and the registrar.** A process that is alive but whose check stays critical
//!   (forced unhealthy, a hung `/check`) is removed once, at `reap-after`; its registrar then
//!   registers it again within milliseconds. Its registrar wins: the service is back with the
//!   same `reap-start`, so the process the reaper took for dead is alive, and the reaper
//!   leaves it alone ([`Notice::Yielded`], once) until its check passes (its next
//!   critical spell is reaped again) or it starts over with a new `reap-start`. One removal per
//!   critical spell, never one every `reap-after`; critical, it stays out of every passing set
//!   meanwhile. A removed service without `reap-start` that comes back is a new instance to
//!   the reaper (it cannot tell), removed again at its `reap-after`. A removal is remembered
//!   while its service is listed, and for 10 minutes after it is gone.
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
//!
//! [`Reaper`] is the pure state machine (answers and `now` in, deadlines and removals out);
//! [`run`] drives it against an agent.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use consul_api::{
    AgentService, Client, GoDuration, HealthCheck, HealthStatus, QueryMeta, QueryOptions, Watch,
};
use consul_registry::{
    backoff::Backoff,
    discovery::StateTracker,
    reap_meta::{META_KEY, START_KEY},
};
use futures::future::BoxFuture;
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The reaper's log line for a removal (tests and the testbed look for it).
pub const REMOVED: &str = "deregistered the service";

/// The reaper's log line once it follows the agent's checks.
pub const FOLLOWING: &str = "the reaper follows the agent's checks";

/// What the token needs to follow the agent's checks.
const READ_NEEDS: &str =
    "agent:read and node:read on the agent's node, and service:read on its services";

/// How long a removal is remembered after its service is gone from the agent (a registrar
/// brings its service back within seconds).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Reads start at least this far apart (the [`Watch`] default of 20 ms would date a change
/// that follows another closely up to 20 ms late).
const MIN_INTERVAL: Duration = Duration::from_millis(2);

/// One answer about the agent: what [`Reaper::observe`] takes.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When the checks were read (the blocking query returned).
    pub at: Instant,
    /// The agent's node ID (`/v1/agent/self`): a new one means a new agent.
    pub node_id: String,
    /// Every check of the agent's node, as `/v1/health/node/<node>` lists them.
    pub checks: Vec<HealthCheck>,
    /// The services the agent holds, by ID (`/v1/agent/services`).
    pub services: BTreeMap<String, AgentService>,
}

/// Something worth telling the operator about, from one observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A service's `reap-after` is not a Go duration above zero: it is never removed.
    InvalidSetting {
        /// The service ID.
        service_id: String,
        /// The value as registered.
        value: String,
    },
    /// The agent's node ID changed (a restarted dev agent): every clock starts over.
    AgentReplaced,
    /// A service the reaper removed is back with the same [`START_KEY`]: its own process,
    /// alive, registered it again. Left alone until its check passes or it starts over.
    Yielded {
        /// The service ID.
        service_id: String,
    },
}

/// A deregistration the reaper decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// The service to deregister.
    pub service_id: String,
    /// Its `reap-after`.
    pub after: Duration,
    /// Since when one of its checks has been critical, as the reaper dated it.
    pub critical_since: Instant,
}

impl Removal {
    /// `critical_since + after`: when it is due.
    pub fn deadline(&self) -> Instant {
        self.critical_since + self.after
    }
}

/// What became of a removal, as [`Reaper::finished`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The agent deregistered the service.
    Removed,
    /// The token may not: never again for this critical spell.
    Refused,
    /// Failed for now: try again at this instant (if still due then).
    RetryAt(Instant),
}

/// One check the reaper follows.
#[derive(Debug, Clone)]
struct Tracked {
    service_id: String,
    create_index: u64,
    /// Its service's [`START_KEY`] value.
    start: Option<String>,
    critical_since: Option<Instant>,
}

/// One service that opted in.
#[derive(Debug, Clone)]
struct Target {
    after: Duration,
    /// Its [`START_KEY`] value.
    start: Option<String>,
    /// The earliest `critical_since` among its checks: the current critical spell.
    spell: Option<Instant>,
    state: State,
}

/// A removal, remembered to recognise its service when its own process brings it back.
#[derive(Debug, Clone)]
struct Gone {
    /// The removed service's [`START_KEY`] value.
    start: String,
    /// Since when the agent has not listed it (`None` while it does).
    absent_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Armed,
    RetryAt(Instant),
    InFlight,
    Removed,
    Refused,
    /// Removed once and brought back by its own process: left alone.
    Yielded,
}

impl Target {
    /// When it should be removed next, if at all.
    fn due_at(&self) -> Option<Instant> {
        let deadline = self.spell? + self.after;
        match self.state {
            State::Armed => Some(deadline),
            State::RetryAt(at) => Some(at.max(deadline)),
            State::InFlight | State::Removed | State::Refused | State::Yielded => None,
        }
    }
}

/// The reaper's state: the checks it follows and the deadlines they imply. Pure: observations
/// and `now` in, [`Removal`]s out; see the module documentation for the rules.
#[derive(Debug, Clone)]
pub struct Reaper {
    meta_key: String,
    node_id: Option<String>,
    checks: BTreeMap<String, Tracked>,
    targets: BTreeMap<String, Target>,
    /// Services removed with a [`START_KEY`] value, by service ID.
    removed: BTreeMap<String, Gone>,
    /// Invalid settings already reported, by service ID.
    invalid: BTreeMap<String, String>,
    /// The last answer may be out of date (the agent stopped answering): no removal until
    /// the next one.
    stale: bool,
}

impl Default for Reaper {
    fn default() -> Self {
        Reaper::new(META_KEY)
    }
}

impl Reaper {
    /// A reaper that reads each service's setting from Meta key `meta_key` ([`META_KEY`]
    /// normally).
    pub fn new(meta_key: impl Into<String>) -> Self {
        Reaper {
            meta_key: meta_key.into(),
            node_id: None,
            checks: BTreeMap::new(),
            targets: BTreeMap::new(),
            removed: BTreeMap::new(),
            invalid: BTreeMap::new(),
            stale: false,
        }
    }

    /// The agent stopped answering (or a removal could not reach it): what the reaper knows
    /// may be out of date (a restarted agent, a service registered again), so nothing falls
    /// due until the next [`Reaper::observe`].
    pub fn lost(&mut self) {
        self.stale = true;
    }

    /// Take in one answer; returns what is worth reporting.
    pub fn observe(&mut self, obs: &Observation) -> Vec<Notice> {
        self.stale = false;
        let mut notices = Vec::new();
        if self.node_id.as_deref() != Some(obs.node_id.as_str()) {
            if self.node_id.is_some() {
                notices.push(Notice::AgentReplaced);
            }
            self.node_id = Some(obs.node_id.clone());
            self.checks.clear();
            self.targets.clear();
            self.removed.clear();
        }

        // Which services opted in, and with what.
        let mut settings = BTreeMap::new();
        for (id, service) in &obs.services {
            let Some(value) = service.meta.as_ref().and_then(|m| m.get(&self.meta_key)) else {
                continue;
            };
            match parse_setting(value) {
                Some(after) => {
                    let start = service
                        .meta
                        .as_ref()
                        .and_then(|m| m.get(START_KEY))
                        .cloned();
                    settings.insert(id.clone(), (after, start));
                }
                None if self.invalid.get(id) != Some(value) => {
                    self.invalid.insert(id.clone(), value.clone());
                    notices.push(Notice::InvalidSetting {
                        service_id: id.clone(),
                        value: value.clone(),
                    });
                }
                None => {}
            }
        }
        self.invalid
            .retain(|id, _| obs.services.contains_key(id) && !settings.contains_key(id));

        // Their checks: keep each one's critical-since while it stays critical and the same.
        let mut checks = BTreeMap::new();
        for check in &obs.checks {
            let Some((_, start)) = settings.get(&check.service_id) else {
                continue;
            };
            if is_maintenance(check) {
                continue;
            }
            // The same check of the same start (Consul keeps `CreateIndex` when a service is
            // registered again in place: only `reap-start` tells a new start).
            let same = self.checks.get(&check.check_id).filter(|t| {
                t.create_index == check.create_index
                    && t.service_id == check.service_id
                    && t.start == *start
            });
            let critical_since = (check.status == HealthStatus::Critical)
                .then(|| same.and_then(|t| t.critical_since).unwrap_or(obs.at));
            checks.insert(
                check.check_id.clone(),
                Tracked {
                    service_id: check.service_id.clone(),
                    create_index: check.create_index,
                    start: start.clone(),
                    critical_since,
                },
            );
        }
        self.checks = checks;

        // Removals remembered: forgotten 10 minutes after their service is gone.
        for (id, gone) in &mut self.removed {
            gone.absent_since = if obs.services.contains_key(id) {
                None
            } else {
                gone.absent_since.or(Some(obs.at))
            };
        }
        self.removed.retain(|_, gone| {
            gone.absent_since
                .is_none_or(|since| obs.at.saturating_duration_since(since) < FORGET_AFTER)
        });

        // Each service's critical spell; a new spell re-arms it, unless its own process
        // brought it back after a removal.
        self.targets.retain(|id, _| settings.contains_key(id));
        for (id, (after, start)) in settings {
            let spell = self
                .checks
                .values()
                .filter(|t| t.service_id == id)
                .filter_map(|t| t.critical_since)
                .min();
            let back = start.is_some()
                && self
                    .removed
                    .get(&id)
                    .is_some_and(|gone| start.as_deref() == Some(gone.start.as_str()));
            if spell.is_none() {
                // Passing (or warning): its next critical spell is reaped again.
                self.removed.remove(&id);
            }
            let target = self.targets.entry(id.clone()).or_insert(Target {
                after,
                start: None,
                spell: None,
                state: State::Armed,
            });
            if target.spell != spell || target.after != after || target.start != start {
                target.state = if back && spell.is_some() {
                    if target.state != State::Yielded {
                        notices.push(Notice::Yielded {
                            service_id: id.clone(),
                        });
                    }
                    State::Yielded
                } else {
                    State::Armed
                };
            }
            target.spell = spell;
            target.after = after;
            target.start = start;
        }
        notices
    }

    /// The next instant a removal falls due, to sleep until.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.stale {
            return None;
        }
        self.targets.values().filter_map(Target::due_at).min()
    }

    /// The removals due at `now`, each handed out once (until [`Reaper::finished`] says it
    /// must be retried).
    pub fn due(&mut self, now: Instant) -> Vec<Removal> {
        let mut due = Vec::new();
        if self.stale {
            return due;
        }
        for (id, target) in &mut self.targets {
            let (Some(at), Some(spell)) = (target.due_at(), target.spell) else {
                continue;
            };
            if at <= now {
                target.state = State::InFlight;
                due.push(Removal {
                    service_id: id.clone(),
                    after: target.after,
                    critical_since: spell,
                });
            }
        }
        due
    }

    /// What became of a removal handed out by [`Reaper::due`].
    pub fn finished(&mut self, service_id: &str, outcome: Outcome) {
        if let Some(target) = self.targets.get_mut(service_id)
            && target.state == State::InFlight
        {
            if let (Outcome::Removed, Some(start)) = (outcome, &target.start) {
                self.removed.insert(
                    service_id.to_owned(),
                    Gone {
                        start: start.clone(),
                        absent_since: None,
                    },
                );
            }
            target.state = match outcome {
                Outcome::Removed => State::Removed,
                Outcome::Refused => State::Refused,
                Outcome::RetryAt(at) => State::RetryAt(at),
            };
        }
    }

    /// How many services opted in, and how many of them are critical now.
    pub fn counts(&self) -> (usize, usize) {
        let critical = self.targets.values().filter(|t| t.spell.is_some()).count();
        (self.targets.len(), critical)
    }
}

/// A `reap-after` value: a Go duration above zero.
fn parse_setting(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<GoDuration>()
        .ok()
        .map(GoDuration::as_duration)
        .filter(|d| !d.is_zero())
}

/// A service in maintenance mode has a critical check of its own: never a reason to reap.
fn is_maintenance(check: &HealthCheck) -> bool {
    check.check_type == "maintenance" || check.check_id.starts_with("_service_maintenance:")
}

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
             it: the process is alive and its registrar wins; left alone until its check passes \
             or it starts over"
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
    let mut watch = Watch::new(QueryOptions::default(), wait).with_min_interval(MIN_INTERVAL);
    let mut me: Option<(String, String)> = None;
    let mut backoff = Backoff::consul();
    let mut tracker = StateTracker::default();
    let mut answered = false;
    loop {
        let answer = tokio::select! {
            answer = read(&*api, &mut watch, &mut me) => answer,
            () = refresh.notified() => {
                watch.reset();
                continue;
            }
            () = tx.closed() => return,
        };
        match answer {
            Ok(obs) => {
                backoff.reset();
                answered = true;
                if tracker.on_answer() {
                    let node = me.as_ref().map_or("", |(node, _)| node.as_str());
                    tracing::info!(node, "{FOLLOWING}");
                }
                if tx.send(Msg::Answer(obs)).await.is_err() {
                    return;
                }
            }
            // Before the first answer a refusal is a setting to fix: fatal. After it (a token
            // rotated, an agent reloaded to HTTPS, a CA rotated) it is retried below.
            Err(e) if !answered && !e.is_retryable() => {
                let error = Error::Reap {
                    what: format!("follow the agent's checks (its token needs {READ_NEEDS})"),
                    source: e,
                };
                log_refusal(&error);
                let _ = tx.send(Msg::Fatal(error)).await;
                return;
            }
            Err(e) => {
                // The agent may be a new one, with a new node ID and indexes that start over.
                me = None;
                watch.reset();
                if let Some(kind) = tracker.on_error(&e) {
                    if e.is_retryable() {
                        tracing::warn!(
                            state = %kind,
                            "the reaper cannot read the agent's checks ({e}); no removal until \
                             it can, retrying with backoff"
                        );
                    } else {
                        tracing::error!(
                            state = %kind,
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
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = tx.closed() => return,
                }
            }
        }
    }
}

/// One answer: who the agent is (once), its node's checks (blocking), its services.
async fn read(
    api: &dyn AgentApi,
    watch: &mut Watch,
    me: &mut Option<(String, String)>,
) -> consul_api::Result<Observation> {
    let (node, node_id) = match me {
        Some(known) => known.clone(),
        None => me.insert(api.whoami().await?).clone(),
    };
    let checks = watch.next(|opts| api.node_checks(&node, opts)).await?;
    let at = Instant::now();
    let services = api.services().await?;
    Ok(Observation {
        at,
        node_id,
        checks,
        services,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn service(id: &str, reap_after: Option<&str>) -> (String, AgentService) {
        let meta = reap_after.map(|v| BTreeMap::from([(META_KEY.to_owned(), v.to_owned())]));
        (
            id.to_owned(),
            AgentService {
                id: id.into(),
                service: id.into(),
                meta,
                ..Default::default()
            },
        )
    }

    fn check(service_id: &str, status: HealthStatus) -> HealthCheck {
        HealthCheck {
            node: "n1".into(),
            check_id: format!("service:{service_id}"),
            service_id: service_id.into(),
            status,
            check_type: "http".into(),
            create_index: 10,
            ..Default::default()
        }
    }

    /// An agent holding `services`; observations at `t0 + at` seconds.
    struct Scene {
        t0: Instant,
        services: BTreeMap<String, AgentService>,
    }

    impl Scene {
        fn new(services: &[(&str, Option<&str>)]) -> Scene {
            Scene {
                t0: Instant::now(),
                services: services.iter().map(|(id, v)| service(id, *v)).collect(),
            }
        }

        fn at(&self, secs: f64) -> Instant {
            self.t0 + Duration::from_secs_f64(secs)
        }

        fn obs(&self, at: f64, checks: Vec<HealthCheck>) -> Observation {
            Observation {
                at: self.at(at),
                node_id: "node-1".into(),
                checks,
                services: self.services.clone(),
            }
        }

        /// `id` (re)registered by a start of its process with Meta `reap-start` = `start`.
        fn started(&mut self, id: &str, start: &str) {
            let service = self.services.get_mut(id).expect("in the scene");
            service
                .meta
                .get_or_insert_default()
                .insert("reap-start".into(), start.into());
        }

        /// An observation at `at` in which the agent no longer holds `id`.
        fn without(&self, at: f64, id: &str) -> Observation {
            let mut obs = self.obs(at, Vec::new());
            obs.services.remove(id);
            obs
        }
    }

    fn ids(removals: &[Removal]) -> Vec<&str> {
        removals.iter().map(|r| r.service_id.as_str()).collect()
    }

    #[test]
    fn removes_exactly_its_setting_after_the_check_turned_critical_with_no_floor() {
        let scene = Scene::new(&[("web-1", Some("5s"))]);
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Passing)]));
        assert_eq!(reaper.next_deadline(), None, "passing: nothing to do");
        reaper.observe(&scene.obs(2.5, vec![check("web-1", HealthStatus::Critical)]));
        assert_eq!(reaper.next_deadline(), Some(scene.at(7.5)), "2.5 s + 5 s");
        assert!(
            reaper.due(scene.at(7.499)).is_empty(),
            "not a millisecond early"
        );
        let due = reaper.due(scene.at(7.5));
        assert_eq!(ids(&due), ["web-1"]);
        assert_eq!(due[0].deadline(), scene.at(7.5));
        assert_eq!(due[0].after, secs(5));
        assert!(reaper.due(scene.at(8.0)).is_empty(), "handed out once");
        assert_eq!(reaper.next_deadline(), None);
    }

    #[test]
    fn a_check_that_passes_again_before_the_deadline_resets_it() {
        let scene = Scene::new(&[("web-1", Some("10s"))]);
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
        reaper.observe(&scene.obs(9.0, vec![check("web-1", HealthStatus::Passing)]));
        assert_eq!(reaper.next_deadline(), None);
        assert!(reaper.due(scene.at(10.0)).is_empty());
        reaper.observe(&scene.obs(12.0, vec![check("web-1", HealthStatus::Warning)]));
        assert_eq!(reaper.next_deadline(), None, "warning is not critical");
        reaper.observe(&scene.obs(13.0, vec![check("web-1", HealthStatus::Critical)]));
        assert_eq!(reaper.next_deadline(), Some(scene.at(23.0)), "a new clock");
    }

    #[test]
    fn a_flapping_check_is_never_removed() {
        let scene = Scene::new(&[("web-1", Some("5s"))]);
        let mut reaper = Reaper::default();
        for second in 0..120u32 {
            let status = if second % 2 == 0 {
                HealthStatus::Critical
            } else {
                HealthStatus::Passing
            };
            let t = f64::from(second);
            reaper.observe(&scene.obs(t, vec![check("web-1", status)]));
            assert!(reaper.due(scene.at(t + 0.999)).is_empty(), "at {t}");
        }
    }

    #[test]
    fn a_check_never_passing_is_dated_from_its_first_critical_answer() {
        let scene = Scene::new(&[("web-1", Some("30s"))]);
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(1.0, vec![check("web-1", HealthStatus::Critical)]));
        reaper.observe(&scene.obs(20.0, vec![check("web-1", HealthStatus::Critical)]));
        assert!(reaper.due(scene.at(30.9)).is_empty());
        assert_eq!(ids(&reaper.due(scene.at(31.0))), ["web-1"]);
    }

    #[test]
    fn only_services_of_the_agent_that_opted_in_are_touched() {
        let scene = Scene::new(&[("mine", Some("5s")), ("no-meta", None)]);
        let mut reaper = Reaper::default();
        let serf = HealthCheck {
            check_id: "serfHealth".into(),
            status: HealthStatus::Critical,
            ..Default::default()
        };
        let maintenance = HealthCheck {
            check_id: "_service_maintenance:mine".into(),
            service_id: "mine".into(),
            check_type: "maintenance".into(),
            status: HealthStatus::Critical,
            ..Default::default()
        };
        reaper.observe(&scene.obs(
            0.0,
            vec![
                serf,
                maintenance,
                check("mine", HealthStatus::Passing),
                check("no-meta", HealthStatus::Critical),
                // In the catalog on this node, but not held by the agent.
                check("catalog-only", HealthStatus::Critical),
            ],
        ));
        assert_eq!(reaper.next_deadline(), None, "nothing of these is a reason");
        assert!(reaper.due(scene.at(3600.0)).is_empty());
        assert_eq!(reaper.counts(), (1, 0));
    }

    #[test]
    fn an_invalid_setting_is_reported_once_and_never_acted_on() {
        let scene = Scene::new(&[("a", Some("soon")), ("b", Some("0s")), ("c", Some("90"))]);
        let mut reaper = Reaper::default();
        let checks = || {
            ["a", "b", "c"]
                .map(|id| check(id, HealthStatus::Critical))
                .to_vec()
        };
        let notices = reaper.observe(&scene.obs(0.0, checks()));
        assert_eq!(notices.len(), 3, "{notices:?}");
        assert!(notices.contains(&Notice::InvalidSetting {
            service_id: "a".into(),
            value: "soon".into()
        }));
        assert!(reaper.observe(&scene.obs(1.0, checks())).is_empty(), "once");
        assert!(reaper.due(scene.at(3600.0)).is_empty());
        assert_eq!(parse_setting("1m30s"), Some(secs(90)));
        assert_eq!(parse_setting(" 250ms "), Some(Duration::from_millis(250)));
    }

    #[test]
    fn a_refused_removal_is_not_handed_out_again_until_the_check_recovers() {
        let scene = Scene::new(&[("web-1", Some("5s"))]);
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
        assert_eq!(ids(&reaper.due(scene.at(5.0))), ["web-1"]);
        reaper.finished("web-1", Outcome::Refused);
        reaper.observe(&scene.obs(6.0, vec![check("web-1", HealthStatus::Critical)]));
        assert_eq!(reaper.next_deadline(), None);
        assert!(
            reaper.due(scene.at(600.0)).is_empty(),
            "no loop of removals"
        );
        // Recovered, then critical again: a new spell, a new try.
        reaper.observe(&scene.obs(601.0, vec![check("web-1", HealthStatus::Passing)]));
        reaper.observe(&scene.obs(602.0, vec![check("web-1", HealthStatus::Critical)]));
        assert_eq!(ids(&reaper.due(scene.at(607.0))), ["web-1"]);
    }

    #[test]
    fn a_removed_service_still_listed_is_not_removed_twice() {
        let scene = Scene::new(&[("web-1", Some("5s"))]);
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
        assert_eq!(reaper.due(scene.at(5.0)).len(), 1);
        reaper.finished("web-1", Outcome::Removed);
        // The catalog lags the agent by a moment.
        reaper.observe(&scene.obs(5.001, vec![check("web-1", HealthStatus::Critical)]));
        assert!(reaper.due(scene.at(60.0)).is_empty());
        // Registered again by a new start of its process: after a removal Consul creates the
        // check anew (a new CreateIndex), and the start is a new one: a new clock.
        reaper.observe(&scene.without(65.0, "web-1"));
        let again = HealthCheck {
            create_index: 99,
            ..check("web-1", HealthStatus::Critical)
        };
        let mut scene = scene;
        scene.started("web-1", "second");
        reaper.observe(&scene.obs(70.0, vec![again]));
        assert_eq!(reaper.next_deadline(), Some(scene.at(75.0)));
    }

    #[test]
    fn a_failed_removal_waits_for_a_fresh_answer_and_its_retry_time() {
        let scene = Scene::new(&[("web-1", Some("5s"))]);
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
        assert_eq!(reaper.due(scene.at(5.0)).len(), 1);
        reaper.finished("web-1", Outcome::RetryAt(scene.at(5.4)));
        reaper.lost();
        assert_eq!(reaper.next_deadline(), None, "not while the agent is away");
        assert!(reaper.due(scene.at(9.0)).is_empty());
        reaper.observe(&scene.obs(5.2, vec![check("web-1", HealthStatus::Critical)]));
        assert_eq!(reaper.next_deadline(), Some(scene.at(5.4)));
        assert!(reaper.due(scene.at(5.3)).is_empty());
        assert_eq!(reaper.due(scene.at(5.4)).len(), 1);
    }

    #[test]
    fn a_new_agent_or_a_new_start_registered_in_place_starts_the_clock_over() {
        let mut scene = Scene::new(&[("web-1", Some("10s"))]);
        scene.started("web-1", "first");
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
        let mut replaced = scene.obs(4.0, vec![check("web-1", HealthStatus::Critical)]);
        replaced.node_id = "node-2".into();
        assert_eq!(reaper.observe(&replaced), vec![Notice::AgentReplaced]);
        assert_eq!(reaper.next_deadline(), Some(scene.at(14.0)));
        // Registered again in place, as Consul 1.8.7 keeps it: the same CreateIndex, still
        // critical; only Meta reap-start is new.
        scene.started("web-1", "second");
        let mut obs = scene.obs(6.0, vec![check("web-1", HealthStatus::Critical)]);
        obs.node_id = "node-2".into();
        reaper.observe(&obs);
        assert_eq!(reaper.next_deadline(), Some(scene.at(16.0)));
    }

    #[test]
    fn a_process_that_came_back_with_the_same_id_is_not_removed_on_the_old_deadline() {
        // The run behind issue 31: reap-after 6 s, registered again in place 4 s into the
        // critical spell; Consul keeps CreateIndex and the critical status.
        let mut scene = Scene::new(&[("web-1", Some("6s"))]);
        scene.started("web-1", "crashed");
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
        scene.started("web-1", "came-back");
        reaper.observe(&scene.obs(4.0, vec![check("web-1", HealthStatus::Critical)]));
        assert!(
            reaper.due(scene.at(6.0)).is_empty(),
            "the crashed start's deadline"
        );
        assert_eq!(reaper.next_deadline(), Some(scene.at(10.0)));
        // Its check runs and passes: never removed.
        reaper.observe(&scene.obs(5.0, vec![check("web-1", HealthStatus::Passing)]));
        assert!(reaper.due(scene.at(3600.0)).is_empty());
    }

    #[test]
    fn a_service_its_own_process_brings_back_is_removed_once_per_critical_spell() {
        let mut scene = Scene::new(&[("web-1", Some("5s"))]);
        scene.started("web-1", "alive");
        let mut reaper = Reaper::default();
        let critical = |create_index| HealthCheck {
            create_index,
            ..check("web-1", HealthStatus::Critical)
        };
        reaper.observe(&scene.obs(0.0, vec![critical(10)]));
        assert_eq!(ids(&reaper.due(scene.at(5.0))), ["web-1"]);
        reaper.finished("web-1", Outcome::Removed);
        // Its registrar registers it again at once: a new check, the same start.
        reaper.observe(&scene.without(5.01, "web-1"));
        let notices = reaper.observe(&scene.obs(5.05, vec![critical(20)]));
        assert_eq!(
            notices,
            [Notice::Yielded {
                service_id: "web-1".into()
            }]
        );
        assert_eq!(reaper.next_deadline(), None);
        // Still critical, registered again and again: left alone, nothing to report.
        for (n, t) in [(21, 30.0), (22, 60.0), (23, 600.0)] {
            assert!(reaper.observe(&scene.obs(t, vec![critical(n)])).is_empty());
            assert!(reaper.due(scene.at(t + 5.0)).is_empty(), "at {t}");
        }
        // Passing, then critical again: a new spell, removed once more.
        reaper.observe(&scene.obs(700.0, vec![check("web-1", HealthStatus::Passing)]));
        reaper.observe(&scene.obs(701.0, vec![critical(23)]));
        assert_eq!(ids(&reaper.due(scene.at(706.0))), ["web-1"]);
        reaper.finished("web-1", Outcome::Removed);
        reaper.observe(&scene.obs(706.1, vec![critical(30)]));
        assert_eq!(reaper.next_deadline(), None, "yielded again");
        // A new start of the process is a new instance: a new clock.
        scene.started("web-1", "restarted");
        reaper.observe(&scene.obs(710.0, vec![critical(30)]));
        assert_eq!(reaper.next_deadline(), Some(scene.at(715.0)));
    }

    #[test]
    fn a_removal_is_forgotten_ten_minutes_after_its_service_is_gone() {
        let mut scene = Scene::new(&[("web-1", Some("5s"))]);
        scene.started("web-1", "alive");
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
        assert_eq!(reaper.due(scene.at(5.0)).len(), 1);
        reaper.finished("web-1", Outcome::Removed);
        reaper.observe(&scene.without(6.0, "web-1"));
        reaper.observe(&scene.without(605.0, "web-1"));
        assert_eq!(reaper.removed.len(), 1, "kept for 10 minutes");
        reaper.observe(&scene.without(606.0, "web-1"));
        assert!(reaper.removed.is_empty(), "then forgotten");
    }

    #[test]
    fn the_earliest_critical_check_of_a_service_sets_its_deadline() {
        let scene = Scene::new(&[("web-1", Some("10s"))]);
        let second = |status| HealthCheck {
            check_id: "service:web-1:2".into(),
            ..check("web-1", status)
        };
        let mut reaper = Reaper::default();
        reaper.observe(&scene.obs(
            0.0,
            vec![
                check("web-1", HealthStatus::Critical),
                second(HealthStatus::Passing),
            ],
        ));
        reaper.observe(&scene.obs(
            3.0,
            vec![
                check("web-1", HealthStatus::Critical),
                second(HealthStatus::Critical),
            ],
        ));
        assert_eq!(reaper.next_deadline(), Some(scene.at(10.0)));
        reaper.observe(&scene.obs(
            5.0,
            vec![
                check("web-1", HealthStatus::Passing),
                second(HealthStatus::Critical),
            ],
        ));
        assert_eq!(reaper.next_deadline(), Some(scene.at(13.0)));
    }

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
