//! Scenario c, the leader is killed (SIGKILL). Two echo servers run on a client node; two
//! resilient clients on that node stream echoes, one reading with Consul's default
//! consistency, one with `stale`. Right after the kill a third echo server starts on the node
//! and registers with its agent (accepted locally; synced once a leader exists). Measured:
//! kill → a new leader; for each client, its failed reads and how long until its view lists
//! the server registered during the election; kill → that registration visible in the
//! catalog. Every echo must be answered.

use std::time::{Duration, Instant};

use consul_api::Consistency;
use consul_harness::cluster::{ClusterSpec, Member};
use serde::Serialize;

use super::{
    LIMIT, Scenario, Settings, ViewFigures, default_reads, ms, node_server, passing_exactly,
    servers_passing, watched,
};
use crate::{
    error::Result,
    experiment::{Env, Experiment, Findings, Needs},
    procs::Launcher,
    progress::Progress,
    report::{self, Plot},
    scenario::{Basics, observers::Tally},
};

/// Settings: the cluster's servers (at least 3 for a leader to be lost and another
/// elected), the echo servers' interval, the pace of the echoes.
#[derive(Debug, Clone, Default)]
pub struct Config(pub Settings);

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The server killed.
    pub old_leader: String,
    /// The server elected after it.
    pub new_leader: String,
    /// Kill → a running server names a new leader, milliseconds.
    pub election_ms: f64,
    /// Kill → the echo server started during the election listened (its registration was
    /// accepted by its client agent), milliseconds.
    pub registered_locally_ms: f64,
    /// Kill → the catalog lists that server passing (a default read through the node's
    /// agent, retried through the election), milliseconds.
    pub registration_visible_ms: f64,
    /// Each client's discovery after the kill; "current" = lists all three servers.
    pub views: Vec<ViewFigures>,
    /// The default-consistency client's echoes.
    pub default_traffic: Tally,
    /// The stale client's echoes.
    pub stale_traffic: Tally,
    /// Every echo, and the fate of the echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Findings for Outcome {
    fn figures(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            (
                "kill → new leader".into(),
                format!(
                    "{:.1} s ({} → {})",
                    self.election_ms / 1e3,
                    self.old_leader,
                    self.new_leader
                ),
            ),
            (
                "registration during the election: accepted by the client agent".into(),
                format!("{:.2} s after the kill", self.registered_locally_ms / 1e3),
            ),
            (
                "… visible in the catalog".into(),
                format!("{:.1} s after the kill", self.registration_visible_ms / 1e3),
            ),
        ];
        for v in &self.views {
            rows.push((format!("discovery, {} reads", v.reads), v.cell()));
        }
        rows.push((
            "echoes (default / stale client), lost".into(),
            format!(
                "{} / {} sent, {} lost",
                self.default_traffic.sent, self.stale_traffic.sent, self.basics.tally.lost
            ),
        ));
        rows
    }

    fn plot(&self) -> Option<Plot> {
        Some(super::views_plot(
            format!(
                "The leader ({}) killed: each client's view",
                self.old_leader
            ),
            &self.views,
            &[
                ("a new leader", self.election_ms),
                ("registration visible", self.registration_visible_ms),
            ],
        ))
    }

    fn details(&self) -> String {
        let v = |i: usize| self.views.get(i);
        format!(
            "The leader ({}) was sent SIGKILL; {} was named leader {:.1} s later (Raft in \
             production timings: 5 s heartbeat and election timeouts with Consul's \
             `raft_multiplier` 5). The client reading with default consistency saw {} \
             unreachable episode(s) ({}); the stale one {} ({}). An echo server started right \
             after the kill was accepted by its client agent {:.2} s after the kill and \
             became visible in the catalog {:.1} s after it; the clients' views listed it \
             after {} (default) and {} (stale). Echoes: {} sent, {} lost.",
            self.old_leader,
            self.new_leader,
            self.election_ms / 1e3,
            v(0).map_or(0, |v| v.unreachable_episodes),
            v(0).and_then(|v| v.first_error.clone())
                .unwrap_or_else(|| "no error".into()),
            v(1).map_or(0, |v| v.unreachable_episodes),
            v(1).and_then(|v| v.first_error.clone())
                .unwrap_or_else(|| "no error".into()),
            self.registered_locally_ms / 1e3,
            self.registration_visible_ms / 1e3,
            report::secs_or_ms(v(0).and_then(|v| v.current_after_ms), "never"),
            report::secs_or_ms(v(1).and_then(|v| v.current_after_ms), "never"),
            self.basics.tally.sent,
            self.basics.tally.lost,
        )
    }

    fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        for view in &self.views {
            if view.current_after_ms.is_none() {
                v.push(format!("the {} client's view never recovered", view.reads));
            }
        }
        if self.old_leader == self.new_leader {
            v.push("no new leader".into());
        }
        v
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::LeaderKilled.title().into()
    }

    fn needs(&self) -> Result<Needs> {
        Ok(Needs::Cluster(ClusterSpec::new(self.0.servers, 1)))
    }

    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let cluster = env.cluster()?;
        step.say("echo servers on the client node");
        let node = Member::Client(0);
        let Settings {
            interval, every, ..
        } = self.0;
        let two = ["servernode_1", "servernode_2"];
        let (mut servers, ids) =
            servers_passing(launcher, cluster.agent(node), &two, interval).await?;
        let stale = ("stale".into(), Consistency::Stale, None);
        let clients = watched(cluster.agent(node), [default_reads(), stale], &ids, every).await?;

        let (old, _) = cluster.wait_leader(None, LIMIT).await?;
        step.say(format!("killing the leader (server-{})", old + 1));
        let killed = tokio::time::Instant::now();
        let killed_std = Instant::now();
        cluster.crash(Member::Server(old)).await?;
        let third = node_server(launcher, cluster.agent(node), "servernode_3", interval).await?;
        let registered_locally = killed.elapsed();
        servers.push(third);
        step.say("waiting for a new leader (Raft: 5 s timeouts in production)");
        let (new, elected) = cluster.wait_leader(Some(old), LIMIT).await?;
        step.say("waiting for the registration made during the election to show");
        let all: Vec<String> = servers.iter().map(|s| s.spec.args.id.clone()).collect();
        let visible = passing_exactly(cluster.agent(node), &all).await?;
        for c in &clients {
            c.log
                .wait_for("discovery to list all three", killed_std, LIMIT, |v| {
                    v.lists_all(&all)
                })
                .await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let views = clients
            .iter()
            .map(|c| ViewFigures::of(&c.reads, &c.log, killed_std, |v| v.lists_all(&all)))
            .collect();
        let [default, stale] = clients;
        let default_outcomes = default.traffic.finish().await;
        let stale_outcomes = stale.traffic.finish().await;
        let everything: Vec<_> = default_outcomes
            .iter()
            .chain(&stale_outcomes)
            .cloned()
            .collect();
        Ok(Outcome {
            old_leader: Member::Server(old).to_string(),
            new_leader: Member::Server(new).to_string(),
            election_ms: report::ms_from(killed, elected),
            registered_locally_ms: ms(registered_locally),
            registration_visible_ms: report::ms_from(killed, visible),
            views,
            default_traffic: Tally::of(&default_outcomes),
            stale_traffic: Tally::of(&stale_outcomes),
            basics: Basics::of(&everything, &mut servers),
        })
    }
}
