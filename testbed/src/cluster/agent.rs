//! Scenario b, an agent dies but its services do not: the client agent of a node with two
//! healthy echo servers is killed. Its node fails in gossip, so its services drop out of
//! discovery although they still echo; they notice their agent is gone (their registration
//! watch fails) and register again once it is back. Done twice: the agent restarted with its
//! data (it restores its services itself), then killed again and replaced by one with an
//! empty data directory (the servers must register again). A resilient client on another
//! node streams echoes throughout.

use std::time::{Duration, Instant};

use consul_api::Consistency;
use consul_harness::cluster::{ClusterSpec, Data, Member};
use serde::Serialize;

use super::{LIMIT, Scenario, ms, ms_between, node_client, node_server, passing_exactly};
use crate::{
    error::Result,
    experiment::{Env, Experiment, Findings, Needs},
    procs::{Launcher, ServerProcess},
    progress::Progress,
    report::Table,
    scenario::{
        Basics, echo_direct,
        observers::{DiscoveryLog, Traffic},
    },
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Servers.
    pub servers: usize,
    /// Check interval of the echo servers.
    pub interval: Duration,
    /// One echo every this long.
    pub every: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            servers: 3,
            interval: Duration::from_secs(1),
            every: Duration::from_millis(100),
        }
    }
}

/// One kill of the agent and its return.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// `with its data` or `with an empty data directory`.
    pub restart: String,
    /// Kill → the client's view no longer lists the node's servers, milliseconds.
    pub dropped_ms: f64,
    /// Direct echoes to the node's servers while the agent was down: answered / tried.
    pub direct_echoes: (u32, u32),
    /// Echo servers that logged a Consul error while the agent was down.
    pub servers_noticed: usize,
    /// The agent's API answers again → both its servers listed passing, milliseconds.
    pub back_ms: f64,
    /// `back_ms` in check intervals.
    pub back_in_intervals: f64,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The echo servers' check interval, milliseconds.
    pub interval_ms: f64,
    /// The two rounds.
    pub rounds: Vec<Round>,
    /// Every echo, and the fate of the echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Findings for Outcome {
    fn tables(&self) -> Vec<Table> {
        vec![Table::figures(self.figures())]
    }

    fn details(&self) -> String {
        let r = |i: usize| self.rounds.get(i);
        format!(
            "The client agent of a node with two healthy echo servers was killed. The servers \
             kept echoing ({} direct echoes answered) but dropped out of discovery after \
             {:.1} s, when gossip marked the node failed. Restarted with its data, the agent \
             restored their registrations itself and they passed {:.2} s after its API \
             answered; replaced by an agent with an empty data directory, the servers \
             registered again on their own and passed after {:.2} s ({:.1} check intervals).",
            self.rounds.iter().map(|r| r.direct_echoes.0).sum::<u32>(),
            r(0).map_or(0.0, |r| r.dropped_ms / 1e3),
            r(0).map_or(0.0, |r| r.back_ms / 1e3),
            r(1).map_or(0.0, |r| r.back_ms / 1e3),
            r(1).map_or(0.0, |r| r.back_in_intervals),
        )
    }

    fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        for r in &self.rounds {
            if r.direct_echoes.0 != r.direct_echoes.1 {
                v.push(format!(
                    "{}: servers stopped echoing while their agent was down",
                    r.restart
                ));
            }
            if r.back_in_intervals > 2.0 {
                v.push(format!(
                    "{}: registered again after {:.1} check intervals (> 2)",
                    r.restart, r.back_in_intervals
                ));
            }
        }
        v
    }
}

impl Outcome {
    /// `(figure, value)` rows of its table.
    pub fn figures(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        for r in &self.rounds {
            rows.push((
                format!("agent killed, back {}", r.restart),
                format!(
                    "view dropped its servers after {:.1} s; direct echoes {}/{}; {} server(s) \
                     noticed; passing again {:.2} s after the agent's return ({:.1} intervals)",
                    r.dropped_ms / 1e3,
                    r.direct_echoes.0,
                    r.direct_echoes.1,
                    r.servers_noticed,
                    r.back_ms / 1e3,
                    r.back_in_intervals
                ),
            ));
        }
        rows.push((
            "echoes sent / lost".into(),
            format!("{} / {}", self.basics.tally.sent, self.basics.tally.lost),
        ));
        rows
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::AgentDies.title().into()
    }

    fn needs(&self) -> Result<Needs> {
        Ok(Needs::Cluster(ClusterSpec::new(self.servers, 2)))
    }

    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let cluster = env.cluster()?;
        step.say("two echo servers on node 1, one on node 2");
        let node = Member::Client(0);
        let home = Member::Client(1);
        let mut servers: Vec<ServerProcess> = Vec::new();
        for id in ["servernode_1", "servernode_2"] {
            servers.push(node_server(launcher, cluster.agent(node), id, self.interval).await?);
        }
        servers
            .push(node_server(launcher, cluster.agent(home), "servernode_3", self.interval).await?);
        let ids: Vec<String> = servers.iter().map(|s| s.spec.args.id.clone()).collect();
        passing_exactly(cluster.agent(home), &ids).await?;
        // Views are recorded from here on: every wait below counts them all.
        let t0 = Instant::now();
        let client = node_client(cluster.agent(home), Consistency::Default, None)?;
        let log = DiscoveryLog::start(&client);
        log.wait_for("discovery to list every server", t0, LIMIT, |v| {
            v.lists_all(&ids)
        })
        .await?;
        let traffic = Traffic::start(&client, "agent", self.every, 20 * 60 * 10);
        traffic
            .wait_for("10 echoes", LIMIT, |o| o.seq >= 10 && !o.lost())
            .await?;

        let mut rounds = Vec::new();
        for data in [Data::Keep, Data::Wipe] {
            let label = match data {
                Data::Keep => "with its data",
                Data::Wipe => "with an empty data directory",
            };
            step.say(format!("killing node 1's agent (it comes back {label})"));
            let marks: Vec<usize> = servers.iter().map(|s| s.process.output().mark()).collect();
            let killed = Instant::now();
            cluster.crash(node).await?;
            let dropped = log
                .wait_for("the view to drop node 1's servers", killed, LIMIT, |v| {
                    !v.lists(&ids[0]) && !v.lists(&ids[1])
                })
                .await?;
            let mut direct = (0u32, 0u32);
            for s in &servers[..2] {
                direct.1 += 1;
                direct.0 += u32::from(echo_direct(s.spec.echo_addr(), b"still here").await);
            }
            let noticed = servers[..2]
                .iter()
                .zip(&marks)
                .filter(|(s, m)| {
                    s.process
                        .output()
                        .lines()
                        .iter()
                        .skip(**m)
                        .any(|l| l.text.contains("WARN") || l.text.contains("ERROR"))
                })
                .count();
            step.say(format!("starting node 1's agent again {label}"));
            let restarted = Instant::now();
            cluster.start_again(node, data).await?;
            let back_at = tokio::time::Instant::now();
            let passing = passing_exactly(cluster.agent(home), &ids).await?;
            let back_ms = ms_between(back_at, passing);
            rounds.push(Round {
                restart: label.into(),
                dropped_ms: ms(dropped.at - killed),
                direct_echoes: direct,
                servers_noticed: noticed,
                back_ms,
                back_in_intervals: back_ms / ms(self.interval),
            });
            log.wait_for("the view to list every server", restarted, LIMIT, |v| {
                v.lists_all(&ids)
            })
            .await?;
        }
        let outcomes = traffic.finish().await;
        Ok(Outcome {
            interval_ms: ms(self.interval),
            rounds,
            basics: Basics::of(&outcomes, &mut servers),
        })
    }
}
