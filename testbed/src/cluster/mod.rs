//! `testbed cluster`: what a real Consul cluster (servers elsewhere, a client agent on every
//! node) does to echo servers and resilient clients, scenario by scenario, each against a
//! cluster of its own ([`consul_harness::cluster`]), production timings, never `-dev`.
//!
//! * [`node`] — a node dies (its client agent and its echo servers killed), and by contrast
//!   a node leaves gracefully;
//! * [`agent`] — a client agent dies but its echo servers do not; it comes back with its data
//!   and with an empty data directory;
//! * [`leader`] — the leader is killed: election time, default against stale discovery, a
//!   registration made during the election;
//! * [`quorum`] — two of three servers down for a minute: default, stale and bounded-stale
//!   discovery, traffic from the cached view, recovery;
//! * [`reaper_phases`] — services on client agents started at different times, killed together:
//!   each removal at its own agent's reaper tick.
//!
//! Every scenario is an [`Experiment`](crate::experiment::Experiment) that needs a cluster;
//! its outcome's table is `(figure, value)` rows. In every scenario a resilient client
//! streams echoes through the fault (the traffic and discovery observers of
//! [`crate::scenario::observers`]); every wait has a deadline and every loop a bound.

pub mod agent;
pub mod leader;
pub mod node;
pub mod quorum;
pub mod reaper_phases;

use std::time::{Duration, Instant};

use echo_client::EchoClient;
use serde::Serialize;

use crate::{
    Consul,
    error::{Error, Result},
    experiment::{Plan, Suite, chosen},
    procs::{Launcher, ServerProcess},
    report::{Axis, Mark, PALETTE, Plot, Series, ms},
    scenario::{
        self, SERVICE,
        observers::{DiscoveryLog, Stream, StreamSpec, View, ViewState},
    },
    wait,
};

pub use consul_harness::cluster as topology;

/// Deadline of one wait on the cluster (an election, a failure detection, a sync).
pub(crate) const LIMIT: Duration = Duration::from_secs(90);

/// A scenario, as `testbed cluster --only` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// a. A node dies: its client agent and echo servers killed; contrast: a node leaves.
    NodeDies,
    /// b. A client agent dies, its echo servers live on; it returns with and without data.
    AgentDies,
    /// c. The leader is killed.
    LeaderKilled,
    /// d. Two of three servers down (quorum lost), then back.
    QuorumLost,
    /// e. Services on three client agents started apart, killed together.
    ReaperPhases,
}

impl Scenario {
    /// All of them, in the report's order.
    pub const ALL: [Scenario; 5] = [
        Scenario::NodeDies,
        Scenario::AgentDies,
        Scenario::LeaderKilled,
        Scenario::QuorumLost,
        Scenario::ReaperPhases,
    ];

    /// The report's title for it.
    pub fn title(self) -> &'static str {
        match self {
            Scenario::NodeDies => "a. a node dies",
            Scenario::AgentDies => "b. an agent dies, its services do not",
            Scenario::LeaderKilled => "c. the leader is killed",
            Scenario::QuorumLost => "d. quorum lost",
            Scenario::ReaperPhases => "e. deregistration across agents",
        }
    }
}

impl Scenario {
    /// The scenario with its default settings.
    pub fn plan(self) -> Box<dyn Plan> {
        match self {
            Scenario::NodeDies => Box::new(node::Config::default()),
            Scenario::AgentDies => Box::new(agent::Config::default()),
            Scenario::LeaderKilled => Box::new(leader::Config::default()),
            Scenario::QuorumLost => Box::new(quorum::Config::default()),
            Scenario::ReaperPhases => Box::new(reaper_phases::Config::default()),
        }
    }
}

/// `testbed cluster`: which scenarios.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Scenarios to run (comma-separated); all by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
}

impl Suite for Args {
    fn name(&self) -> &'static str {
        "cluster"
    }

    fn title(&self) -> String {
        "A real Consul cluster".into()
    }

    fn plans(&self) -> Result<Vec<Box<dyn Plan>>> {
        let mut only = if self.only.is_empty() {
            Scenario::ALL.to_vec()
        } else {
            self.only.clone()
        };
        only.sort();
        only.dedup();
        Ok(chosen(&self.only, &Scenario::ALL)
            .into_iter()
            .map(Scenario::plan)
            .collect())
    }

    fn method(&self) -> &'static str {
        "Every agent runs in its own container (host networking) on its own loopback address \
         with Consul's default ports, production timings (not `-dev`). Messages are echoes \
         sent through resilient `EchoClient`s, each talking to the client agent of its own \
         node; lost = answered with an error or with other bytes. Times are taken by the \
         testbed when it injects a fault and when it observes the effect (a discovery \
         snapshot, a blocking query's answer, an agent's log line with Consul's own \
         timestamp)."
    }
}

// === helpers shared by the scenarios ===

/// An echo server of [`SERVICE`] with ID `id` on client node `agent`: registered with that
/// agent, bound to and advertising the node's loopback address, checked every `interval`.
pub(crate) async fn node_server(
    launcher: &Launcher,
    agent: &Consul,
    id: &str,
    interval: Duration,
) -> Result<ServerProcess> {
    let spec =
        scenario::server_spec(agent.config(), id, interval)?.on_address(agent.spec().address)?;
    Ok(ServerProcess::spawn(launcher, spec).await?)
}

/// The settings most cluster scenarios share: the cluster's servers, and their echo
/// servers' check interval and echo pace.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Consul servers.
    pub servers: usize,
    /// Check interval of the echo servers.
    pub interval: Duration,
    /// One echo every this long, per client.
    pub every: Duration,
}

impl Default for Settings {
    /// 3 servers; echo servers checked every second; an echo every 100 ms.
    fn default() -> Self {
        Settings {
            servers: 3,
            interval: Duration::from_secs(1),
            every: Duration::from_millis(100),
        }
    }
}

/// The echo servers `ids` on the node of `agent`.
pub(crate) async fn servers_on(
    launcher: &Launcher,
    agent: &Consul,
    ids: &[&str],
    interval: Duration,
) -> Result<Vec<ServerProcess>> {
    let mut servers = Vec::with_capacity(ids.len());
    for id in ids {
        servers.push(node_server(launcher, agent, id, interval).await?);
    }
    Ok(servers)
}

/// [`servers_on`], once `agent` lists exactly them passing; with their IDs.
pub(crate) async fn servers_passing(
    launcher: &Launcher,
    agent: &Consul,
    ids: &[&str],
    interval: Duration,
) -> Result<(Vec<ServerProcess>, Vec<String>)> {
    let servers = servers_on(launcher, agent, ids, interval).await?;
    let ids = scenario::ids(&servers);
    passing_exactly(agent, &ids).await?;
    Ok((servers, ids))
}

/// How a client reads: its label, its consistency, its bound on staleness.
pub(crate) type Reads = (String, consul_api::Consistency, Option<Duration>);

/// A resilient client on a node, streaming echoes, and every view its discovery published.
pub(crate) struct Watched {
    /// How it reads.
    pub reads: String,
    /// Its discovery's views.
    pub log: DiscoveryLog,
    /// Its echoes.
    pub traffic: Stream,
    /// The client itself, held while the others work.
    _client: EchoClient,
}

/// A client on the node of `agent` for each of `reads`, each streaming an echo every
/// `every` (for at most 20 minutes); once each one's discovery lists every one of `ids` and
/// it has 10 good echoes. Views are recorded from the start: every wait counts them all.
pub(crate) async fn watched<const N: usize>(
    agent: &Consul,
    reads: [Reads; N],
    ids: &[String],
    every: Duration,
) -> Result<[Watched; N]> {
    let configs = reads.map(|(label, consistency, max_stale)| {
        let config = scenario::client_config(agent.config(), Duration::from_secs(1))
            .with_consistency(consistency, max_stale);
        (label, config)
    });
    watched_configs(configs, ids, every).await
}

/// [`watched`], each client started from a configuration of the caller's (one reading
/// through the agent of its node).
pub(crate) async fn watched_configs<const N: usize>(
    configs: [(String, echo_client::ClientConfig); N],
    ids: &[String],
    every: Duration,
) -> Result<[Watched; N]> {
    let t0 = Instant::now();
    let max = 20 * 60 * 1000 / every.as_millis().max(1) as u64;
    let mut all = Vec::with_capacity(N);
    for (label, config) in configs {
        let client = EchoClient::start(config)?;
        let log = DiscoveryLog::start(&client);
        log.wait_for("discovery to list every server", t0, LIMIT, |v| {
            v.lists_all(ids)
        })
        .await?;
        let traffic = Stream::start(&client, StreamSpec::every(&label, every, max));
        all.push(Watched {
            reads: label,
            log,
            traffic,
            _client: client,
        });
    }
    for w in &all {
        w.traffic
            .wait_for("10 echoes", LIMIT, |o| o.seq >= 10 && !o.lost())
            .await?;
    }
    all.try_into()
        .map_err(|_| Error::Scenario("a client per read".into()))
}

/// Reading with Consul's default consistency.
pub(crate) fn default_reads() -> Reads {
    ("default".into(), consul_api::Consistency::Default, None)
}

/// Until `agent` lists exactly the passing instances `ids` (in any order).
pub(crate) async fn passing_exactly(
    agent: &Consul,
    ids: &[String],
) -> Result<tokio::time::Instant> {
    let mut want = ids.to_vec();
    want.sort();
    let (_, at) = wait::health_until(&agent.client(), SERVICE, true, LIMIT, |entries| {
        let mut got: Vec<String> = entries.iter().map(|e| e.service.id.clone()).collect();
        got.sort();
        got == want
    })
    .await?;
    Ok(at)
}

/// What a client's discovery went through after `from`: how often and how long it could not
/// read, its first error, and when it first showed what `current` asks for.
#[derive(Debug, Clone, Serialize)]
pub struct ViewFigures {
    /// The client's read consistency (`default`, `stale`, `stale ≤ 10s`).
    pub reads: String,
    /// Times discovery turned unreachable (each a run of failed or refused reads).
    pub unreachable_episodes: usize,
    /// Total time discovery was unreachable, milliseconds.
    pub unreachable_ms: f64,
    /// The first error it published.
    pub first_error: Option<String>,
    /// `from` → the first reachable view satisfying the scenario's condition, milliseconds.
    pub current_after_ms: Option<f64>,
    /// The views from `from` on: (milliseconds after `from`, reachable, instances listed),
    /// the one in force at `from` first, the state at the end last.
    pub timeline: Vec<(f64, bool, usize)>,
}

impl ViewFigures {
    /// The figures of `log` after `from`, until now; `current` names the view awaited.
    pub(crate) fn of(
        reads: &str,
        log: &DiscoveryLog,
        from: Instant,
        current: impl Fn(&View) -> bool,
    ) -> ViewFigures {
        let views: Vec<View> = log.views();
        let mut episodes = 0;
        let mut total = Duration::ZERO;
        let mut down_since: Option<Instant> = None;
        let mut first_error = None;
        let mut current_after = None;
        // The view in force at `from` counts: already unreachable, or already current (a
        // view that never broke publishes nothing new).
        let before = views.iter().rev().find(|v| v.at < from);
        match before.map(|v| &v.state) {
            Some(ViewState::Unreachable(e)) => {
                down_since = Some(from);
                episodes += 1;
                first_error = Some(e.clone());
            }
            Some(ViewState::Reachable) if before.is_some_and(&current) => {
                current_after = Some(Duration::ZERO);
            }
            _ => {}
        }
        for v in views.iter().filter(|v| v.at >= from) {
            match (&v.state, down_since) {
                (ViewState::Unreachable(e), None) => {
                    down_since = Some(v.at);
                    episodes += 1;
                    first_error.get_or_insert_with(|| e.clone());
                }
                (ViewState::Reachable, Some(since)) => {
                    total += v.at - since;
                    down_since = None;
                }
                _ => {}
            }
            if current_after.is_none() && v.state == ViewState::Reachable && current(v) {
                current_after = Some(v.at - from);
            }
        }
        if let Some(since) = down_since {
            total += since.elapsed();
        }
        let point = |v: &View, at: Instant| {
            (
                ms(at.saturating_duration_since(from)),
                v.state == ViewState::Reachable,
                v.ids.len(),
            )
        };
        let mut timeline: Vec<(f64, bool, usize)> = before
            .map(|v| point(v, from))
            .into_iter()
            .chain(
                views
                    .iter()
                    .filter(|v| v.at >= from)
                    .map(|v| point(v, v.at)),
            )
            .collect();
        if let Some(last) = views.last() {
            timeline.push(point(last, Instant::now()));
        }
        ViewFigures {
            reads: reads.to_owned(),
            unreachable_episodes: episodes,
            unreachable_ms: ms(total),
            first_error,
            current_after_ms: current_after.map(ms),
            timeline,
        }
    }

    /// Episodes and time unreachable.
    pub fn errors_cell(&self) -> String {
        format!(
            "{} unreachable episode(s), {:.1} s unreachable",
            self.unreachable_episodes,
            self.unreachable_ms / 1e3
        )
    }

    /// One table cell: episodes, time unreachable, time to a current view.
    pub fn cell(&self) -> String {
        format!(
            "{} unreachable episode(s), {:.1} s unreachable; current after {}",
            self.unreachable_episodes,
            self.unreachable_ms / 1e3,
            self.current_after_ms
                .map(|m| format!("{:.1} s", m / 1e3))
                .unwrap_or_else(|| "never".into())
        )
    }
}

/// Each client's view against Consul's `events` (name, milliseconds after the fault): the
/// instances it listed over time (a step line per client), a triangle at each unreachable
/// view, a vertical line per event.
pub fn views_plot(title: String, views: &[ViewFigures], events: &[(&str, f64)]) -> Plot {
    let most = views
        .iter()
        .flat_map(|v| v.timeline.iter().map(|p| p.2))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut series = Vec::new();
    for (i, v) in views.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        series.push(Series {
            label: format!("{} reads: instances listed", v.reads),
            color,
            mark: Mark::Steps(
                v.timeline
                    .iter()
                    .map(|&(at, _, n)| (at / 1e3, n as f64))
                    .collect(),
            ),
        });
        let down: Vec<(f64, f64)> = v
            .timeline
            .iter()
            .filter(|p| !p.1)
            .map(|&(at, _, _)| (at / 1e3, 0.0))
            .collect();
        if !down.is_empty() {
            series.push(Series {
                label: format!("{} reads: unreachable", v.reads),
                color,
                mark: Mark::Triangles(down),
            });
        }
    }
    for (k, (name, at)) in events.iter().enumerate() {
        series.push(Series {
            label: format!("{name} ({:.1} s)", at / 1e3),
            color: PALETTE[(views.len() + k) % PALETTE.len()],
            mark: Mark::Segments(vec![((at / 1e3, 0.0), (at / 1e3, most + 0.5))]),
        });
    }
    Plot {
        title,
        x: Axis::linear("seconds after the fault"),
        y: Axis::linear("instances listed").range(0.0, most + 1.0),
        series,
    }
}

/// Until the latest view of `log` satisfies `pred` (it may have for a while: a view that does
/// not change publishes nothing new); returns since when it has, not before `after`.
pub(crate) async fn settled(
    log: &DiscoveryLog,
    what: &str,
    after: Instant,
    pred: impl Fn(&View) -> bool,
) -> Result<Instant> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if log.latest().is_some_and(|v| pred(&v))
            && let Some(since) = log.holds_since(after, &pred)
        {
            return Ok(since);
        }
        if Instant::now() >= deadline {
            return Err(timeout(what, LIMIT));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A deadline error for a scenario step.
pub(crate) fn timeout(what: &str, after: Duration) -> Error {
    Error::Timeout {
        what: what.to_owned(),
        timeout: after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consul_harness::cluster::ClusterSpec;

    #[test]
    fn clusters_describe_themselves() {
        use crate::experiment::describe_cluster as describe;
        let mut spec = ClusterSpec::new(3, 3);
        assert_eq!(
            describe(&spec),
            "3 servers + 3 client agents, reconnect_timeout 72h (Consul's default)"
        );
        spec.reconnect_timeout = Some(Duration::from_secs(120));
        assert!(
            describe(&spec).ends_with("reconnect_timeout 2m"),
            "{}",
            describe(&spec)
        );
    }

    #[test]
    fn views_are_drawn_against_the_events() {
        let view = |reads: &str, timeline| ViewFigures {
            reads: reads.into(),
            unreachable_episodes: 1,
            unreachable_ms: 500.0,
            first_error: None,
            current_after_ms: Some(1500.0),
            timeline,
        };
        let views = [
            view(
                "default",
                vec![(0.0, true, 2), (200.0, false, 2), (1500.0, true, 3)],
            ),
            view("stale", vec![(0.0, true, 2), (900.0, true, 3)]),
        ];
        let plot = views_plot("t".into(), &views, &[("a new leader", 1200.0)]);
        assert_eq!(
            plot.series.len(),
            4,
            "two step lines, one unreachable, one event"
        );
        let dir = std::env::temp_dir().join(format!("testbed-views-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("views.svg");
        plot.svg(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("a new leader (1.2 s)"), "{svg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
