//! `testbed partitions`: real network faults between the agents of a cluster (consul-harness's
//! [`network`](mod@crate::network): cuts and loss by the sender's uid in nftables, delay by
//! `tc` netem on `lo`), with resilient clients streaming echoes through each, and what Consul
//! and every client's view make of it.
//!
//! * a. a client agent cut from the servers and the other agents, while its echo servers stay
//!   reachable to clients (echo traffic is not Consul's: it is never cut);
//! * b. the leader cut off (a minority of one): time to a new leader, default against stale
//!   reads, a registration made during the cut, the heal;
//! * c. a one-way cut: the client agent's packets to the servers dropped, theirs to it not;
//! * d. lossy and slow links between every pair of agents: 5 %, 20 %, 40 % loss, then
//!   200 ms ± 100 ms, each for a while — flaps as Consul records them and as each view sees
//!   them;
//! * e. (in every scenario) after each heal, every client's view equals Consul's passing set:
//!   how long after Consul's own set is whole again each view is;
//! * f. a flapping check: where Consul itself records flaps (loss between agents did not make
//!   it record any), an echo server's `/check` flipped (SIGUSR1) at an irregular rhythm:
//!   its flaps as Consul records them, as an undamped client's view shows them, as a client
//!   with flap damping ([`consul_registry::damping`]) shows them, and — the same check under
//!   `FailuresBeforeCritical`/`SuccessBeforePassing` 3, a second registration of the same
//!   server — as the undamped view shows those. No network fault: it needs no root.
//!
//! Two echo servers run on the node of client agent 1 (the one cut in a and c), one on client
//! agent 2; a resilient client on each node (and a stale-reading one on node 2) streams
//! echoes throughout. Consul's passing set is sampled every 250 ms from a server the fault
//! leaves in the majority. Every wait has a deadline; every fault is healed, and the
//! [`Network`] handle removes its rules when dropped.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use consul_api::{
    AgentServiceCheck, AgentServiceRegistration, Consistency, GoDuration, QueryOptions,
};
use consul_registry::Damping;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    Cluster, ClusterSpec, Member,
    cluster::{
        LIMIT, ViewFigures, Watched, default_reads, node_server, passing_exactly, servers_on,
        settled, views_plot, watched, watched_configs,
    },
    error::{Error, Result},
    experiment::{Env, Experiment, Findings, Needs, Plan, Suite, chosen},
    network::{self, Netem, Network},
    procs::Launcher,
    progress::Progress,
    report::{Mark, PALETTE, Plot, Series, ms},
    scenario::{self, Basics, SERVICE, observers::sent_between},
};

/// A scenario, as `testbed partitions --only` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// a. A client agent cut from the servers and the other agents.
    AgentCut,
    /// b. The leader cut off from the other servers and agents.
    LeaderCut,
    /// c. A one-way cut: the client agent's packets to the servers dropped.
    OneWay,
    /// d. Lossy and slow links between every pair of agents.
    Lossy,
    /// f. A flapping check: damping and thresholds against Consul's own flaps.
    Flapping,
}

impl Scenario {
    /// All of them, in the report's order.
    pub const ALL: [Scenario; 5] = [
        Scenario::AgentCut,
        Scenario::LeaderCut,
        Scenario::OneWay,
        Scenario::Lossy,
        Scenario::Flapping,
    ];

    /// The report's title.
    pub fn title(self) -> &'static str {
        match self {
            Scenario::AgentCut => "a. a client agent cut off",
            Scenario::LeaderCut => "b. the leader cut off",
            Scenario::OneWay => "c. a one-way cut",
            Scenario::Lossy => "d. lossy and slow links",
            Scenario::Flapping => "f. a flapping check",
        }
    }
}

/// The settings of one scenario.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which scenario.
    pub scenario: Scenario,
    /// Consul servers (b needs 3).
    pub servers: usize,
    /// How long each cut lasts.
    pub cut_for: Duration,
    /// How long each degradation of d lasts.
    pub degrade_for: Duration,
    /// d's loss levels, percent.
    pub losses: Vec<f64>,
    /// d's delay and jitter (none when the delay is zero).
    pub delay: (Duration, Duration),
    /// Check interval of the echo servers.
    pub interval: Duration,
    /// One echo every this long, per client.
    pub every: Duration,
    /// f: how long the check flaps.
    pub flap_for: Duration,
    /// f: each phase of the flapping check (failing, then passing, ...) lasts a random time
    /// in this range (seeded: every run flips at the same moments).
    pub flap_phase: (Duration, Duration),
}

/// f: the echo server whose check flaps (its own registration, no thresholds).
pub const FLAPPY: &str = "flappy";
/// f: a second registration of the same server, its check the same `/check` under
/// `FailuresBeforeCritical` and `SuccessBeforePassing` [`THRESHOLD`].
pub const FLAPPY_THRESHOLDS: &str = "flappy_thresholds";
/// f: the thresholds of [`FLAPPY_THRESHOLDS`]'s check.
pub const THRESHOLD: u32 = 3;

impl Config {
    /// `scenario` with the report's settings: 3 servers, cuts of 20 s (30 s for the
    /// leader), 60 s per degradation at 5, 20, 40 % loss then 200 ms ± 100 ms.
    pub fn new(scenario: Scenario) -> Config {
        Config {
            scenario,
            servers: 3,
            cut_for: Duration::from_secs(if scenario == Scenario::LeaderCut {
                30
            } else {
                20
            }),
            degrade_for: Duration::from_secs(60),
            losses: vec![5.0, 20.0, 40.0],
            delay: (Duration::from_millis(200), Duration::from_millis(100)),
            interval: Duration::from_secs(1),
            every: Duration::from_millis(100),
            flap_for: Duration::from_secs(120),
            flap_phase: (Duration::from_secs(1), Duration::from_secs(5)),
        }
    }
}

/// One resilient client's figures in one step.
#[derive(Debug, Clone, Serialize)]
pub struct ClientStep {
    /// `node 1 default`, `node 2 stale`, ...
    pub client: String,
    /// Echoes sent during the step (fault to healed) and lost.
    pub sent: u64,
    /// Echoes lost.
    pub lost: u64,
    /// Fault → the first view missing an instance listed at the fault, milliseconds.
    pub dropped_ms: Option<f64>,
    /// Instances leaving the view during the step (a flap each).
    pub flaps: usize,
    /// Views published during the step that were errors (discovery unreachable).
    pub unreachable_views: usize,
    /// Consul's set whole again → this view equal to it, milliseconds (scenario e).
    pub behind_consul_ms: Option<f64>,
    /// f: flaps of each instance counted alone.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub flaps_by_instance: BTreeMap<String, usize>,
    /// The fewest instances a reachable view listed during the step.
    pub fewest_listed: Option<usize>,
    /// The most passing instances flap damping held out of one view at once.
    pub most_held_out: usize,
    /// Views damping left empty while Consul listed some instance (must be 0).
    pub emptied_by_damping: usize,
}

/// One fault and its heal.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What was done: `isolate client-1`, `loss 20 %`.
    pub fault: String,
    /// Seconds after the scenario's first fault that this one began and was healed.
    pub at_s: (f64, f64),
    /// Fault → Consul's passing set first missing an instance, milliseconds.
    pub consul_dropped_ms: Option<f64>,
    /// Instances leaving Consul's passing set during the step.
    pub consul_flaps: usize,
    /// Heal → Consul's passing set whole again, milliseconds.
    pub consul_whole_ms: Option<f64>,
    /// Each client.
    pub clients: Vec<ClientStep>,
    /// b: cut → a new leader among the others, milliseconds.
    pub new_leader_ms: Option<f64>,
    /// b: a registration made on node 2 during the cut → listed passing by the majority's
    /// server, milliseconds.
    pub registered_visible_ms: Option<f64>,
    /// Why this fault could not be injected here (then nothing else was measured).
    pub skipped: Option<String>,
    /// Packets of Consul's the fault dropped (the kernel's counters): proof it was real.
    pub packets_dropped: u64,
    /// b: whether the cut-off old leader still named itself leader once the majority had
    /// elected another.
    pub old_leader_claims: Option<bool>,
    /// f: flaps of each instance in Consul's passing set, counted alone.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub consul_flaps_by_instance: BTreeMap<String, usize>,
}

/// f: the flaps of [`FLAPPY`] as Consul recorded them and as each client showed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapGoal {
    /// [`FLAPPY`]'s flaps in Consul's passing set.
    pub consul: usize,
    /// [`FLAPPY`]'s flaps in the undamped view.
    pub undamped: usize,
    /// [`FLAPPY`]'s flaps in the damped view.
    pub damped: usize,
    /// [`FLAPPY_THRESHOLDS`]'s flaps in the undamped view (thresholds alone).
    pub thresholds: usize,
}

impl Step {
    /// f's figures, when this step is f's.
    pub fn flap_goal(&self) -> Option<FlapGoal> {
        let client = |label: &str, id: &str| {
            self.clients
                .iter()
                .find(|c| c.client.ends_with(label))?
                .flaps_by_instance
                .get(id)
                .copied()
        };
        Some(FlapGoal {
            consul: *self.consul_flaps_by_instance.get(FLAPPY)?,
            undamped: client(" undamped", FLAPPY)?,
            damped: client(" damped", FLAPPY)?,
            thresholds: client(" undamped", FLAPPY_THRESHOLDS)?,
        })
    }

    fn skipped(fault: String, why: String) -> Step {
        Step {
            fault,
            at_s: (0.0, 0.0),
            consul_dropped_ms: None,
            consul_flaps: 0,
            consul_whole_ms: None,
            clients: Vec::new(),
            new_leader_ms: None,
            registered_visible_ms: None,
            skipped: Some(why),
            packets_dropped: 0,
            old_leader_claims: None,
            consul_flaps_by_instance: BTreeMap::new(),
        }
    }
}

/// What one scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The scenario.
    pub scenario: Scenario,
    /// Each fault.
    pub steps: Vec<Step>,
    /// Every echo, and the echo servers' fate.
    #[serde(flatten)]
    pub basics: Basics,
    /// Each client's view over the whole scenario (for the plot).
    pub views: Vec<ViewFigures>,
    /// Consul's passing count over the scenario: (ms after the first fault, count).
    pub consul: Vec<(f64, usize)>,
    /// (event, ms after the first fault) for the plot.
    pub events: Vec<(String, f64)>,
}

impl Outcome {
    /// What a scenario's run comes to once its faults are over: every client's view and traffic,
    /// Consul's passing count from `t0`, the echo servers' fate.
    async fn of(
        scenario: Scenario,
        steps: Vec<Step>,
        clients: Vec<(String, Watched)>,
        samples: &Samples,
        t0: Instant,
        servers: &mut [crate::procs::ServerProcess],
        events: Vec<(String, f64)>,
    ) -> Outcome {
        let views = clients
            .iter()
            .map(|(label, w)| ViewFigures::of(label, &w.log, t0, |_| true))
            .collect();
        let consul = snapshot(samples)
            .iter()
            .filter(|(at, _)| *at >= t0)
            .map(|(at, s)| (ms(*at - t0), s.len()))
            .collect();
        let mut outcomes = Vec::new();
        for (_, w) in clients {
            outcomes.extend(w.traffic.finish().await);
        }
        Outcome {
            scenario,
            steps,
            basics: Basics::of(&outcomes, servers),
            views,
            consul,
            events,
        }
    }
}

impl Findings for Outcome {
    fn figures(&self) -> Vec<(String, String)> {
        let opt = |v: Option<f64>| v.map_or("never".into(), |m| format!("{:.1} s", m / 1e3));
        let mut rows = Vec::new();
        for s in &self.steps {
            if let Some(why) = &s.skipped {
                rows.push((s.fault.clone(), format!("skipped: {why}")));
                continue;
            }
            rows.push((
                format!("{}: Consul", s.fault),
                format!(
                    "{} packets dropped; passing set missed an instance after {}; {} flap(s); \
                     whole {} after the heal{}{}",
                    s.packets_dropped,
                    opt(s.consul_dropped_ms),
                    s.consul_flaps,
                    opt(s.consul_whole_ms),
                    match (self.scenario, s.new_leader_ms) {
                        (Scenario::LeaderCut, Some(m)) => format!(
                            "; the majority named a new leader after {:.1} s{}",
                            m / 1e3,
                            if s.old_leader_claims == Some(true) {
                                " (the old one still named itself)"
                            } else {
                                ""
                            }
                        ),
                        (Scenario::LeaderCut, None) => {
                            "; the majority named no new leader during the cut".into()
                        }
                        _ => String::new(),
                    },
                    s.registered_visible_ms
                        .map(|m| format!(
                            "; registration during the cut visible after {:.1} s",
                            m / 1e3
                        ))
                        .unwrap_or_default(),
                ),
            ));
            if !s.consul_flaps_by_instance.is_empty() {
                rows.push((
                    format!("{}: Consul, by instance", s.fault),
                    by_instance(&s.consul_flaps_by_instance),
                ));
            }
            for c in &s.clients {
                rows.push((
                    format!("{}: client {}", s.fault, c.client),
                    format!(
                        "{} sent / {} lost; view dropped an instance after {}; {} flap(s); {} \
                         unreachable view(s); equal to Consul {} after it was whole",
                        c.sent,
                        c.lost,
                        opt(c.dropped_ms),
                        c.flaps,
                        c.unreachable_views,
                        c.behind_consul_ms
                            .map_or("never".into(), |m| format!("{:.2} s", m / 1e3)),
                    ),
                ));
                if !c.flaps_by_instance.is_empty() {
                    rows.push((
                        format!("{}: client {}, by instance", s.fault, c.client),
                        format!(
                            "{}; fewest instances listed {}; at most {} held out at once",
                            by_instance(&c.flaps_by_instance),
                            c.fewest_listed.map_or("-".into(), |n| n.to_string()),
                            c.most_held_out,
                        ),
                    ));
                }
            }
            if let Some(g) = s.flap_goal() {
                rows.push((
                    format!(
                        "{}: flaps of {FLAPPY} a view shows / Consul records (goal ≤ 1/5)",
                        s.fault
                    ),
                    format!(
                        "undamped {} / {c}; damped {} / {c}; with thresholds {THRESHOLD} \
                         ({FLAPPY_THRESHOLDS} in the undamped view) {} / {c}",
                        g.undamped,
                        g.damped,
                        g.thresholds,
                        c = g.consul,
                    ),
                ));
            }
        }
        rows.push((
            "echoes sent / lost".into(),
            format!("{} / {}", self.basics.tally.sent, self.basics.tally.lost),
        ));
        rows
    }

    fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        for s in &self.steps {
            for c in &s.clients {
                if c.emptied_by_damping > 0 {
                    v.push(format!(
                        "{}: client {}'s damping held out every instance",
                        s.fault, c.client
                    ));
                }
            }
            for c in &s.clients {
                if c.behind_consul_ms.is_none() {
                    v.push(format!(
                        "{}: client {}'s view never equalled Consul's after the heal (stuck watch)",
                        s.fault, c.client
                    ));
                }
            }
        }
        v
    }

    fn plot(&self) -> Option<Plot> {
        let events: Vec<(&str, f64)> = self.events.iter().map(|(n, a)| (n.as_str(), *a)).collect();
        let mut plot = views_plot(
            format!(
                "{}: passing instances in each view and in Consul",
                self.scenario.title()
            ),
            &self.views,
            &events,
        );
        plot.series.insert(
            0,
            Series {
                label: "Consul (a majority server's catalog)".into(),
                color: PALETTE[PALETTE.len() - 1],
                mark: Mark::Steps(
                    self.consul
                        .iter()
                        .map(|&(at, n)| (at / 1e3, n as f64))
                        .collect(),
                ),
            },
        );
        plot.x = crate::report::Axis::linear("seconds after the first fault");
        Some(plot)
    }
}

/// `flappy 12, flappy_thresholds 3`.
fn by_instance(flaps: &BTreeMap<String, usize>) -> String {
    let each: Vec<String> = flaps
        .iter()
        .map(|(id, n)| format!("{id} {n} flap(s)"))
        .collect();
    each.join(", ")
}

/// Until a server other than `old` names a leader other than `old` (the majority's new
/// leader), at most until `deadline`; when it did.
async fn majority_leader(cluster: &Cluster, old: usize, deadline: Instant) -> Option<Instant> {
    loop {
        for i in (0..cluster.servers().len()).filter(|i| *i != old) {
            if cluster.leader_named_by(i).await.is_some_and(|l| l != old) {
                return Some(Instant::now());
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Instances leaving a set, summed over a timeline of sets (a flap each: passing → not).
pub fn flaps<'a>(sets: impl IntoIterator<Item = &'a BTreeSet<String>>) -> usize {
    let mut previous: Option<&BTreeSet<String>> = None;
    let mut count = 0;
    for set in sets {
        if let Some(p) = previous {
            count += p.difference(set).count();
        }
        previous = Some(set);
    }
    count
}

/// The flaps of instance `id` alone over a timeline of sets: how often it left.
pub fn flaps_of<'a>(sets: impl IntoIterator<Item = &'a BTreeSet<String>>, id: &str) -> usize {
    let mut listed: Option<bool> = None;
    let mut count = 0;
    for set in sets {
        let now = set.contains(id);
        if listed == Some(true) && !now {
            count += 1;
        }
        listed = Some(now);
    }
    count
}

/// Consul's passing set of [`SERVICE`], sampled.
type Samples = Arc<Mutex<Vec<(Instant, BTreeSet<String>)>>>;

/// Sample `client`'s passing set (stale reads: a server without a leader still answers)
/// every 250 ms until `stop`.
fn sample(
    client: consul_api::Client,
    stop: CancellationToken,
) -> (Samples, tokio::task::JoinHandle<()>) {
    let samples: Samples = Arc::default();
    let out = samples.clone();
    let task = tokio::spawn(async move {
        let opts = QueryOptions {
            consistency: Consistency::Stale,
            ..Default::default()
        };
        loop {
            let read = tokio::time::timeout(
                Duration::from_secs(2),
                client.health().service(SERVICE, None, true, &opts),
            )
            .await;
            if let Ok(Ok((entries, _))) = read {
                let set = entries.into_iter().map(|e| e.service.id).collect();
                out.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((Instant::now(), set));
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    });
    (samples, task)
}

fn snapshot(samples: &Samples) -> Vec<(Instant, BTreeSet<String>)> {
    samples
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Until Consul's sampled set is `all`, after `after`; when it first was.
async fn consul_whole(
    samples: &Samples,
    all: &BTreeSet<String>,
    after: Instant,
) -> Option<Instant> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let s = snapshot(samples);
        if s.last().is_some_and(|(_, set)| set == all) {
            // The start of the last run of whole samples after `after`.
            let mut since = None;
            for (at, set) in s.iter().rev() {
                if *at < after || set != all {
                    break;
                }
                since = Some(*at);
            }
            return since.or(Some(after));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One fault, from its start to its heal: what it is measured against.
struct Span<'a> {
    began: Instant,
    healed: Instant,
    /// The instances listed when it began.
    all: &'a BTreeSet<String>,
    /// The instances Consul should list once healed.
    want: &'a BTreeSet<String>,
    /// Instances whose flaps are also counted alone (f).
    by_instance: &'a [&'a str],
}

impl Span<'_> {
    /// Consul's and each client's figures for this fault, once every view equals Consul's
    /// after the heal (or the wait's deadline passed).
    async fn measure(
        &self,
        fault: String,
        t0: Instant,
        samples: &Samples,
        clients: &[(String, Watched)],
        packets_dropped: u64,
    ) -> Step {
        let (began, healed, all, want) = (self.began, self.healed, self.all, self.want);
        let whole = consul_whole(samples, want, healed).await;
        let mut per_client = Vec::new();
        for (label, w) in clients {
            let current = match whole {
                Some(at) => settled(&w.log, "the view to equal Consul's", healed, |v| {
                    v.ids.iter().cloned().collect::<BTreeSet<_>>() == *want
                })
                .await
                .ok()
                .map(|since| ms(since.max(at) - at)),
                None => None,
            };
            per_client.push((label.clone(), current));
        }
        let ended = Instant::now();
        let consul_sets = snapshot(samples);
        // The set in force at the fault, then every one after it.
        let during: Vec<&BTreeSet<String>> = consul_sets
            .iter()
            .rev()
            .find(|(at, _)| *at < began)
            .into_iter()
            .chain(
                consul_sets
                    .iter()
                    .filter(|(at, _)| *at >= began && *at <= ended),
            )
            .map(|(_, s)| s)
            .collect();
        let consul_dropped_ms = consul_sets
            .iter()
            .find(|(at, s)| *at >= began && !all.is_subset(s))
            .map(|(at, _)| ms(*at - began));
        let by_instance = |sets: &[&BTreeSet<String>]| -> BTreeMap<String, usize> {
            self.by_instance
                .iter()
                .map(|id| ((*id).to_owned(), flaps_of(sets.iter().copied(), id)))
                .collect()
        };
        let outcomes_now: Vec<_> = clients.iter().map(|(_, w)| w.traffic.outcomes()).collect();
        let clients_step = clients
            .iter()
            .zip(per_client)
            .zip(outcomes_now)
            .map(|(((label, w), (_, behind)), outcomes)| {
                let views = w.log.views();
                // The view in force at the fault, then every reachable one after it
                // (an unreachable view keeps the instances it had: not a flap).
                let reachable = |v: &&scenario::observers::View| {
                    v.state == scenario::observers::ViewState::Reachable
                };
                let in_step: Vec<&scenario::observers::View> = views
                    .iter()
                    .filter(reachable)
                    .rev()
                    .find(|v| v.at < began)
                    .into_iter()
                    .chain(
                        views
                            .iter()
                            .filter(reachable)
                            .filter(|v| v.at >= began && v.at <= ended),
                    )
                    .collect();
                let sets: Vec<BTreeSet<String>> = in_step
                    .iter()
                    .map(|v| v.ids.iter().cloned().collect())
                    .collect();
                let tally = scenario::observers::Tally::of(&sent_between(&outcomes, began, ended));
                ClientStep {
                    client: label.clone(),
                    sent: tally.sent,
                    lost: tally.lost,
                    dropped_ms: views
                        .iter()
                        .find(|v| {
                            v.at >= began
                                && !all.iter().all(|id| v.lists(id))
                                && v.state == scenario::observers::ViewState::Reachable
                        })
                        .map(|v| ms(v.at - began)),
                    flaps: flaps(&sets),
                    unreachable_views: views
                        .iter()
                        .filter(|v| {
                            v.at >= began
                                && v.at <= ended
                                && v.state != scenario::observers::ViewState::Reachable
                        })
                        .count(),
                    behind_consul_ms: behind,
                    flaps_by_instance: by_instance(&sets.iter().collect::<Vec<_>>()),
                    fewest_listed: in_step.iter().map(|v| v.ids.len()).min(),
                    most_held_out: in_step.iter().map(|v| v.held_out).max().unwrap_or(0),
                    emptied_by_damping: in_step
                        .iter()
                        .filter(|v| v.ids.is_empty() && v.held_out > 0)
                        .count(),
                }
            })
            .collect();
        Step {
            fault,
            at_s: (ms(began - t0) / 1e3, ms(healed - t0) / 1e3),
            consul_dropped_ms,
            consul_flaps: flaps(during.iter().copied()),
            consul_whole_ms: whole.map(|at| ms(at.saturating_duration_since(healed))),
            clients: clients_step,
            new_leader_ms: None,
            registered_visible_ms: None,
            skipped: None,
            packets_dropped,
            old_leader_claims: None,
            consul_flaps_by_instance: by_instance(&during),
        }
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        self.scenario.title().into()
    }

    fn needs(&self) -> Result<Needs> {
        if self.scenario == Scenario::Flapping {
            // No network fault: no root, no own uids.
            return Ok(Needs::Cluster(ClusterSpec::new(self.servers, 2)));
        }
        // Before any cluster is started: without root or the tools, say so and stop.
        network::available()?;
        if self.scenario == Scenario::LeaderCut && self.servers < 3 {
            return Err(Error::Setting(
                "cutting the leader off needs 3 servers (a majority left)".into(),
            ));
        }
        Ok(Needs::Cluster(ClusterSpec {
            own_uids: true,
            ..ClusterSpec::new(self.servers, 2)
        }))
    }

    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let cluster: &Cluster = env.cluster()?;
        if self.scenario == Scenario::Flapping {
            return self.flapping(launcher, cluster, step).await;
        }
        let mut net = Network::new(cluster)?;
        let (cut_node, home) = (Member::Client(0), Member::Client(1));
        step.say("two echo servers on node 1, one on node 2");
        let mut servers = servers_on(
            launcher,
            cluster.agent(cut_node),
            &["cutnode_1", "cutnode_2"],
            self.interval,
        )
        .await?;
        servers.extend(
            servers_on(
                launcher,
                cluster.agent(home),
                &["homenode_1"],
                self.interval,
            )
            .await?,
        );
        let ids = scenario::ids(&servers);
        passing_exactly(cluster.agent(home), &ids).await?;
        step.say("a resilient client on each node, streaming");
        let [node1] = watched(cluster.agent(cut_node), [default_reads()], &ids, self.every).await?;
        let [home_default, home_stale] = watched(
            cluster.agent(home),
            [default_reads(), ("stale".into(), Consistency::Stale, None)],
            &ids,
            self.every,
        )
        .await?;
        let clients: Vec<(String, Watched)> = vec![
            ("node 1 default".into(), node1),
            ("node 2 default".into(), home_default),
            ("node 2 stale".into(), home_stale),
        ];

        // The reference server: one the fault leaves in the majority.
        let leader = cluster.wait_leader(None, LIMIT).await?.0;
        let reference = (0..cluster.servers().len())
            .find(|i| self.scenario != Scenario::LeaderCut || *i != leader)
            .unwrap_or(0);
        let stop = CancellationToken::new();
        let (samples, sampler) = sample(cluster.servers()[reference].client(), stop.clone());

        let faults: Vec<(String, Fault)> = match self.scenario {
            Scenario::AgentCut => vec![(format!("isolate {cut_node}"), Fault::Isolate(cut_node))],
            Scenario::LeaderCut => vec![(
                format!("isolate the leader (server-{})", leader + 1),
                Fault::Isolate(Member::Server(leader)),
            )],
            Scenario::OneWay => vec![(
                format!("cut {cut_node} → servers, one way"),
                Fault::OneWay(cut_node),
            )],
            Scenario::Lossy => {
                let mut f: Vec<(String, Fault)> = self
                    .losses
                    .iter()
                    .map(|l| (format!("loss {l} %"), Fault::Degrade(Netem::loss(*l))))
                    .collect();
                if !self.delay.0.is_zero() {
                    f.push((
                        format!("delay {:?} ± {:?}", self.delay.0, self.delay.1),
                        Fault::Degrade(Netem::delay(self.delay.0, self.delay.1)),
                    ));
                }
                f
            }
            Scenario::Flapping => {
                return Err(Error::Setting("f runs without network faults".into()));
            }
        };

        let all: BTreeSet<String> = ids.iter().cloned().collect();
        let t0 = Instant::now();
        let mut events = Vec::new();
        let mut plan = Vec::new();
        for (name, fault) in faults {
            step.say(format!("{name} for {:?}", self.hold(&fault)));
            if let Fault::Degrade(n) = fault
                && !n.in_nftables()
                && let Err(e) = network::netem_available()
            {
                step.say(format!("skipped {name}: {e}"));
                plan.push(Step::skipped(name, e.to_string()));
                continue;
            }
            let began = Instant::now();
            fault.apply(&mut net, cluster)?;
            events.push((name.clone(), ms(began - t0)));
            let mut new_leader_ms = None;
            let mut registered_visible_ms = None;
            let mut old_leader_claims = None;
            if self.scenario == Scenario::LeaderCut {
                if let Some(at) = majority_leader(cluster, leader, began + self.cut_for).await {
                    new_leader_ms = Some(ms(at - began));
                }
                old_leader_claims = Some(cluster.leader_named_by(leader).await == Some(leader));
                step.say("registering an echo server on node 2 during the cut");
                let registered = Instant::now();
                let extra =
                    node_server(launcher, cluster.agent(home), "during_cut", self.interval).await?;
                let extra_id = extra.spec.args.id.clone();
                servers.push(extra);
                let deadline = Instant::now() + LIMIT;
                while Instant::now() < deadline {
                    if snapshot(&samples)
                        .last()
                        .is_some_and(|(_, s)| s.contains(&extra_id))
                    {
                        registered_visible_ms = Some(ms(registered.elapsed()));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let until = began + self.hold(&fault);
            tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
            step.say(format!("healing {name}"));
            let packets_dropped = net.dropped()?;
            let healed = Instant::now();
            net.heal()?;
            events.push((format!("healed {name}"), ms(healed - t0)));
            let want: BTreeSet<String> = scenario::ids(&servers).into_iter().collect();
            let span = Span {
                began,
                healed,
                all: &all,
                want: &want,
                by_instance: &[],
            };
            plan.push(Step {
                new_leader_ms,
                registered_visible_ms,
                old_leader_claims,
                ..span
                    .measure(name, t0, &samples, &clients, packets_dropped)
                    .await
            });
        }
        stop.cancel();
        let _ = sampler.await;
        drop(net);
        Ok(Outcome::of(
            self.scenario,
            plan,
            clients,
            &samples,
            t0,
            &mut servers,
            events,
        )
        .await)
    }
}

/// One fault of a scenario.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Cut a member from every other, both ways.
    Isolate(Member),
    /// Drop what a client agent sends to the servers.
    OneWay(Member),
    /// Every link between two agents through netem.
    Degrade(Netem),
}

impl Fault {
    fn apply(self, net: &mut Network, cluster: &Cluster) -> Result<()> {
        match self {
            Fault::Isolate(m) => net.isolate(m, &cluster.members())?,
            Fault::OneWay(m) => {
                for s in 0..cluster.servers().len() {
                    net.cut_one_way(m, Member::Server(s))?;
                }
            }
            Fault::Degrade(netem) => net.degrade_all(&cluster.members(), netem)?,
        }
        Ok(())
    }
}

impl Config {
    /// f: an echo server whose check flaps, registered twice (plain, and under thresholds),
    /// a steady server on each node; an undamped and a damped client on node 2.
    async fn flapping(
        &self,
        launcher: &Launcher,
        cluster: &Cluster,
        step: &Progress,
    ) -> Result<Outcome> {
        let (node1, node2) = (Member::Client(0), Member::Client(1));
        step.say("a flapping and a steady echo server on node 1, a steady one on node 2");
        let mut servers = servers_on(
            launcher,
            cluster.agent(node1),
            &[FLAPPY, "steady_1"],
            self.interval,
        )
        .await?;
        servers.extend(
            servers_on(launcher, cluster.agent(node2), &["steady_2"], self.interval).await?,
        );
        let flappy = &servers[0].spec;
        let interval = GoDuration(self.interval);
        let thresholds = AgentServiceRegistration {
            id: Some(FLAPPY_THRESHOLDS.into()),
            name: SERVICE.into(),
            address: Some(flappy.args.address.clone()),
            port: Some(flappy.args.port),
            check: Some(AgentServiceCheck {
                check_id: Some(format!("check-{FLAPPY_THRESHOLDS}")),
                http: Some(flappy.check_url()),
                interval: Some(interval),
                timeout: Some(interval),
                failures_before_critical: Some(THRESHOLD),
                success_before_passing: Some(THRESHOLD),
                ..Default::default()
            }),
            ..Default::default()
        };
        cluster
            .agent(node1)
            .client()
            .agent()
            .service_register(&thresholds)
            .await
            .map_err(|e| Error::Scenario(format!("registering {FLAPPY_THRESHOLDS}: {e}")))?;
        let mut ids = scenario::ids(&servers);
        ids.push(FLAPPY_THRESHOLDS.into());
        passing_exactly(cluster.agent(node2), &ids).await?;

        step.say("an undamped and a damped client on node 2, streaming");
        let agent = cluster.agent(node2);
        let reads = |damping: Option<Damping>| {
            let mut config = scenario::client_config(agent.config(), Duration::from_secs(1))
                .with_consistency(Consistency::Default, None);
            config.discovery.damping = damping;
            config
        };
        let [undamped, damped] = watched_configs(
            [
                ("undamped".into(), reads(None)),
                ("damped".into(), reads(Some(Damping::default()))),
            ],
            &ids,
            self.every,
        )
        .await?;
        let clients: Vec<(String, Watched)> = vec![
            ("node 2 undamped".into(), undamped),
            ("node 2 damped".into(), damped),
        ];
        let stop = CancellationToken::new();
        let (samples, sampler) = sample(cluster.servers()[0].client(), stop.clone());

        let all: BTreeSet<String> = ids.iter().cloned().collect();
        let name = format!(
            "{FLAPPY}'s check flips every {:?}–{:?} for {:?}",
            self.flap_phase.0, self.flap_phase.1, self.flap_for
        );
        step.say(&name);
        let t0 = Instant::now();
        let began = t0;
        let mut rng = StdRng::seed_from_u64(33);
        let mut healthy = true;
        let mut flips = 0u64;
        let (shortest, longest) = self.flap_phase;
        while began.elapsed() < self.flap_for {
            let phase = rng.random_range(shortest..=longest.max(shortest));
            tokio::time::sleep(phase.min(self.flap_for.saturating_sub(began.elapsed()))).await;
            if began.elapsed() >= self.flap_for {
                break;
            }
            servers[0].process.signal(crate::signal::Signal::SIGUSR1)?;
            healthy = !healthy;
            flips += 1;
        }
        if !healthy {
            servers[0].process.signal(crate::signal::Signal::SIGUSR1)?;
        }
        let healed = Instant::now();
        step.say(format!("{flips} flips; {FLAPPY}'s check healthy again"));
        let events = vec![
            ("flapping began".to_owned(), 0.0),
            ("flapping stopped".to_owned(), ms(healed - t0)),
        ];
        let span = Span {
            began,
            healed,
            all: &all,
            want: &all,
            by_instance: &[FLAPPY, FLAPPY_THRESHOLDS],
        };
        let plan = vec![span.measure(name, t0, &samples, &clients, 0).await];
        stop.cancel();
        let _ = sampler.await;
        Ok(Outcome::of(
            self.scenario,
            plan,
            clients,
            &samples,
            t0,
            &mut servers,
            events,
        )
        .await)
    }

    fn hold(&self, fault: &Fault) -> Duration {
        match fault {
            Fault::Degrade(_) => self.degrade_for,
            _ => self.cut_for,
        }
    }
}

/// `testbed partitions`: which scenarios, how long.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Scenarios to run (comma-separated); all by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
    /// How long each degradation of d lasts (Go duration).
    #[arg(long, default_value = "60s")]
    degrade_for: consul_api::GoDuration,
    /// d's loss levels, percent (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "5,20,40")]
    losses: Vec<f64>,
    /// How long f's check flaps (Go duration).
    #[arg(long, default_value = "2m")]
    flap_for: consul_api::GoDuration,
}

impl Suite for Args {
    fn name(&self) -> &'static str {
        "partitions"
    }

    fn title(&self) -> String {
        "Partitions, one-way cuts, lossy and slow links between Consul agents".into()
    }

    fn plans(&self) -> Result<Vec<Box<dyn Plan>>> {
        Ok(chosen(&self.only, &Scenario::ALL)
            .into_iter()
            .map(|s| {
                let mut c = Config::new(s);
                c.degrade_for = self.degrade_for.0;
                c.losses = self.losses.clone();
                c.flap_for = self.flap_for.0;
                Box::new(c) as Box<dyn Plan>
            })
            .collect())
    }

    fn method(&self) -> &'static str {
        "Every agent runs in its own container (host networking) on its own loopback address, \
         under a uid of its own. A cut marks the agent's packets on OUTPUT by (sending uid, \
         destination address) and drops marked packets on INPUT, silently, as a real network \
         would; loss drops a random share of the marked packets there (nftables numgen), and \
         delay puts them through a tc netem band on lo where the kernel has netem. Echo \
         traffic and the clients' reads of their agents are never touched: only Consul's own \
         traffic between agents is. Consul's passing set is sampled every 250 ms (stale reads) \
         from a server the fault leaves in the majority; each client's view is what its \
         discovery published. A flap is an instance leaving a set. In f no packet is touched: \
         one echo server's /check is flipped (SIGUSR1) at a seeded irregular rhythm, and the \
         same server is registered a second time with FailuresBeforeCritical and \
         SuccessBeforePassing set; one client's discovery damps flaps, the other's does not. \
         Lost = an echo answered with an error or with other bytes."
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_flap_is_an_instance_leaving() {
        let timeline = [
            set(&["a", "b", "c"]),
            set(&["a", "b"]),
            set(&["a", "b", "c"]),
            set(&["a"]),
            set(&["a"]),
            set(&["a", "b", "c"]),
        ];
        assert_eq!(flaps(&timeline), 3);
        assert_eq!(flaps_of(&timeline, "c"), 2);
        assert_eq!(flaps_of(&timeline, "b"), 1);
        assert_eq!(flaps_of(&timeline, "a"), 0);
        assert_eq!(
            flaps_of(&timeline[3..], "b"),
            0,
            "absent from the start: no flap"
        );
        assert_eq!(flaps(&timeline[..1]), 0);
        assert_eq!(flaps(std::iter::empty()), 0);
    }
}
