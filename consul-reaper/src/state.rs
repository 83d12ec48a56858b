//! The reaper's pure state machine, [`Reaper`]: answers about the agent and `now` in,
//! deadlines and [`Removal`]s out. Its rules:
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
//!   [`Registration`](consul_registry::Registration) give each of
//!   their starts a new one): how the reaper tells a process that came back from the one that
//!   died (below).
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
//!   leaves that start alone ([`Notice::Yielded`], once per critical spell) for as long as it
//!   is listed, until it starts over with a new `reap-start`: removing a live process's entry
//!   again would only be undone again. One removal per start of the process, never one every
//!   `reap-after`; critical, it stays out of every passing set meanwhile, and a check passing
//!   for a moment (Consul showed a re-registered check non-critical for a moment under load)
//!   changes nothing. A removed service without `reap-start` that comes back is a new instance to
//!   the reaper (it cannot tell), removed again at its `reap-after`. A removal is remembered
//!   while its service is listed, and for 10 minutes after it is gone.

use std::{collections::BTreeMap, time::Duration};

use consul_api::{AgentService, GoDuration, HealthCheck, HealthStatus};
use consul_registry::reap_meta::{META_KEY, START_KEY};
use tokio::time::Instant;

/// How long a removal is remembered after its service is gone from the agent (a registrar
/// brings its service back within seconds).
const FORGET_AFTER: Duration = Duration::from_secs(600);

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
    /// alive, registered it again. That start is left alone until it starts over.
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

#[cfg(test)]
pub(crate) mod tests;
