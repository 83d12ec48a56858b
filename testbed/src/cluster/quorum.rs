//! Scenario d, quorum lost: two of three servers are killed and stay down for a minute, then
//! start again with their data. Without a quorum there is no leader: nothing can change in
//! the catalog, default reads fail ("No cluster leader"), stale reads are still answered by
//! the surviving server from its copy. Three resilient clients on a client node stream
//! echoes through it all, reading with default consistency, stale, and stale bounded to
//! 10 s; traffic goes on from each client's last view. Measured: each client's failed reads
//! and when its view was current again; restart → a leader.

use std::time::{Duration, Instant};

use consul_api::Consistency;
use consul_harness::cluster::{ClusterSpec, Data, Member};
use serde::Serialize;

use super::{
    LIMIT, Scenario, ViewFigures, ms_between, node_client, node_server, passing_exactly, settled,
};
use crate::{
    error::Result,
    experiment::{Env, Experiment, Findings, Needs},
    procs::Launcher,
    progress::Progress,
    report::{Plot, Table},
    scenario::{
        Basics,
        observers::{DiscoveryLog, Tally, Traffic},
    },
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long two of the three servers stay down.
    pub down: Duration,
    /// The bound of the third client's stale reads.
    pub max_stale: Duration,
    /// Check interval of the echo servers.
    pub interval: Duration,
    /// One echo every this long, per client.
    pub every: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            down: Duration::from_secs(60),
            max_stale: Duration::from_secs(10),
            interval: Duration::from_secs(1),
            every: Duration::from_millis(100),
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// How long two servers were down, milliseconds.
    pub down_ms: f64,
    /// The servers killed.
    pub killed: Vec<String>,
    /// Each client's discovery from the kill on ("current" = reachable and listing both
    /// servers after the restart).
    pub views: Vec<ViewFigures>,
    /// Whether each client's view was reachable at the end of the outage.
    pub reachable_at_end_of_outage: Vec<(String, bool)>,
    /// Restart of the two servers → a leader, milliseconds.
    pub leader_after_restart_ms: f64,
    /// Restart → each client's view reachable and listing both servers (0: it already was),
    /// milliseconds.
    pub view_after_restart_ms: Vec<f64>,
    /// Echoes per client during the outage (kill → restart).
    pub during_outage: Vec<(String, Tally)>,
    /// Every echo, and the fate of the echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Findings for Outcome {
    fn plot(&self) -> Option<Plot> {
        Some(super::views_plot(
            format!(
                "Quorum lost ({}): each client's view",
                self.killed.join(", ")
            ),
            &self.views,
            &[
                ("servers restarted", self.down_ms),
                (
                    "a leader again",
                    self.down_ms + self.leader_after_restart_ms,
                ),
            ],
        ))
    }

    fn tables(&self) -> Vec<Table> {
        vec![Table::figures(self.figures())]
    }

    fn details(&self) -> String {
        let first = |i: usize| {
            self.views
                .get(i)
                .and_then(|v| v.first_error.clone())
                .unwrap_or_else(|| "none".into())
        };
        format!(
            "Two of the three servers were killed and kept down {:.0} s, then started again \
             with their data; a leader was back {:.1} s after the restart. Default reads \
             failed (first error: {}); unbounded stale reads, first error: {}; stale reads bounded to 10 s \
             stopped being applied once the surviving server had not heard from a leader for \
             10 s (first error: {}). Without a leader nothing changes in the catalog, so a \
             stale answer during the outage is the last committed state. Echoes went on from \
             every client's last view.",
            self.down_ms / 1e3,
            self.leader_after_restart_ms / 1e3,
            first(0),
            first(1),
            first(2),
        )
    }

    fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        for view in &self.views {
            if view.current_after_ms.is_none() {
                v.push(format!("the {} client's view never recovered", view.reads));
            }
        }
        v
    }
}

impl Outcome {
    /// `(figure, value)` rows of its table.
    pub fn figures(&self) -> Vec<(String, String)> {
        let mut rows = vec![(
            "servers down".into(),
            format!("{} for {:.0} s", self.killed.join(", "), self.down_ms / 1e3),
        )];
        for (v, (_, up)) in self.views.iter().zip(&self.reachable_at_end_of_outage) {
            rows.push((
                format!("discovery, {} reads", v.reads),
                format!(
                    "{}; at the end of the outage {}",
                    v.errors_cell(),
                    if *up { "answering" } else { "failing" }
                ),
            ));
        }
        for (reads, t) in &self.during_outage {
            rows.push((
                format!("echoes during the outage, {reads} client"),
                format!("{} sent, {} lost", t.sent, t.lost),
            ));
        }
        rows.push((
            "restart → leader".into(),
            format!("{:.1} s", self.leader_after_restart_ms / 1e3),
        ));
        for (v, ms) in self.views.iter().zip(&self.view_after_restart_ms) {
            rows.push((
                format!("restart → {} view current", v.reads),
                format!("{:.1} s", ms / 1e3),
            ));
        }
        rows
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::QuorumLost.title().into()
    }

    fn needs(&self) -> Result<Needs> {
        Ok(Needs::Cluster(ClusterSpec::new(3, 1)))
    }

    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let cluster = env.cluster()?;
        step.say("echo servers on the client node");
        let node = Member::Client(0);
        let mut servers = Vec::new();
        for id in ["servernode_1", "servernode_2"] {
            servers.push(node_server(launcher, cluster.agent(node), id, self.interval).await?);
        }
        let ids: Vec<String> = servers.iter().map(|s| s.spec.args.id.clone()).collect();
        passing_exactly(cluster.agent(node), &ids).await?;
        let reads = [
            ("default".to_owned(), Consistency::Default, None),
            ("stale".to_owned(), Consistency::Stale, None),
            (
                format!("stale ≤ {}", consul_api::GoDuration(self.max_stale)),
                Consistency::Stale,
                Some(self.max_stale),
            ),
        ];
        let mut clients = Vec::new();
        // Views are recorded from here on: every wait below counts them all.
        let t0 = Instant::now();
        for (_, consistency, max_stale) in &reads {
            clients.push(node_client(cluster.agent(node), *consistency, *max_stale)?);
        }
        let logs: Vec<DiscoveryLog> = clients.iter().map(DiscoveryLog::start).collect();
        for log in &logs {
            log.wait_for("discovery to list both servers", t0, LIMIT, |v| {
                v.lists_all(&ids)
            })
            .await?;
        }
        let max = 20 * 60 * 1000 / self.every.as_millis().max(1) as u64;
        let traffic: Vec<Traffic> = clients
            .iter()
            .zip(&reads)
            .map(|(c, (label, _, _))| Traffic::start(c, label, self.every, max))
            .collect();
        for t in &traffic {
            t.wait_for("10 echoes", LIMIT, |o| o.seq >= 10 && !o.lost())
                .await?;
        }

        let (leader, _) = cluster.wait_leader(None, LIMIT).await?;
        let victims = [leader, (leader + 1) % 3];
        step.say("killing two of the three servers (the leader and one more)");
        let killed = Instant::now();
        for v in victims {
            cluster.crash(Member::Server(v)).await?;
        }
        step.say(format!("quorum lost: holding {} s", self.down.as_secs()));
        tokio::time::sleep(self.down).await;
        let reachable_at_end: Vec<(String, bool)> = logs
            .iter()
            .zip(&reads)
            .map(|(log, (label, _, _))| {
                let up = log
                    .latest()
                    .is_some_and(|v| v.state == crate::scenario::observers::ViewState::Reachable);
                (label.clone(), up)
            })
            .collect();
        step.say("starting both servers again, with their data");
        let restarted = tokio::time::Instant::now();
        let restarted_std = Instant::now();
        for v in victims {
            cluster.start_again(Member::Server(v), Data::Keep).await?;
        }
        let (_, elected) = cluster.wait_leader(None, LIMIT).await?;
        let mut recovered = Vec::new();
        for log in &logs {
            let since = settled(log, "discovery to recover", restarted_std, |v| {
                v.lists_all(&ids)
            })
            .await?;
            recovered.push(super::ms(since - restarted_std));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let views = logs
            .iter()
            .zip(&reads)
            .map(|(log, (label, _, _))| ViewFigures::of(label, log, killed, |v| v.lists_all(&ids)))
            .collect();
        let mut during = Vec::new();
        let mut everything = Vec::new();
        for (t, (label, _, _)) in traffic.into_iter().zip(&reads) {
            let outcomes = t.finish().await;
            let outage = crate::scenario::observers::sent_between(&outcomes, killed, restarted_std);
            during.push((label.clone(), Tally::of(&outage)));
            everything.extend(outcomes);
        }
        Ok(Outcome {
            down_ms: super::ms(restarted_std - killed),
            killed: victims
                .iter()
                .map(|v| Member::Server(*v).to_string())
                .collect(),
            views,
            reachable_at_end_of_outage: reachable_at_end,
            leader_after_restart_ms: ms_between(restarted, elected),
            view_after_restart_ms: recovered,
            during_outage: during,
            basics: Basics::of(&everything, &mut servers),
        })
    }
}
