//! Scenario 2, Consul paused: the agent is frozen (`docker pause`, or SIGSTOP for a local
//! process) — its port accepts connections that are never answered. Servers keep serving,
//! the client keeps echoing from its last view of the service; after the agent resumes, Consul
//! lists every server passing again (no registration lost) and the client's view agrees.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::{Row, Rows, Scenario};
use crate::{error::Result, procs::Launcher, wait};
use crate::{
    experiment::{Env, Experiment},
    progress::Progress,
    report::{self, ms_serde as ms},
    scenario::{
        self, Basics, Cast, LIMIT, SERVICE,
        observers::{Tally, View, ViewState, sent_between},
    },
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Echo servers and echoes.
    pub cast: Cast,
    /// How long the agent stays frozen.
    pub pause: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cast: Cast::default().servers(2),
            pause: Duration::from_secs(20),
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// How long the agent stayed frozen.
    #[serde(with = "ms")]
    pub paused_for: Duration,
    /// Echoes sent while the agent was frozen.
    pub during_pause: Tally,
    /// Echoes straight to each server's port during the pause, answered / tried.
    pub direct_echoes: (u32, u32),
    /// At the end of the pause the client still listed every server.
    pub view_kept: bool,
    /// Servers that logged a Consul error during the pause.
    pub servers_noticed: usize,
    /// Resume → the last server that had logged an error logs that Consul answers again.
    #[serde(with = "ms::opt")]
    pub servers_recovered: Option<Duration>,
    /// Resume → Consul lists every server passing, and keeps doing so for two intervals.
    #[serde(with = "ms::opt")]
    pub consul_converged: Option<Duration>,
    /// Resume → the client's discovery lists every server, reachable (0 if it never
    /// stopped doing so).
    #[serde(with = "ms::opt")]
    pub client_converged: Option<Duration>,
    /// The latest of the three.
    #[serde(with = "ms::opt")]
    pub converged: Option<Duration>,
    /// Servers missing from Consul after the pause.
    pub registrations_lost: Vec<String>,
    /// How many times a server had to register again.
    pub re_registrations: usize,
    /// Its echoes and what became of its echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Outcome {
    /// The invariants that did not hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        if self.direct_echoes.0 != self.direct_echoes.1 {
            v.push(format!(
                "servers answered {} of {} direct echoes during the pause",
                self.direct_echoes.0, self.direct_echoes.1
            ));
        }
        if !self.view_kept {
            v.push("the client lost its view during the pause".into());
        }
        if self.converged.is_none() {
            v.push("no convergence after the resume".into());
        }
        if !self.registrations_lost.is_empty() {
            v.push(format!("registrations lost: {:?}", self.registrations_lost));
        }
        v
    }
}

impl Rows for Outcome {
    /// The table's row.
    fn rows(&self) -> Vec<Row> {
        vec![Row {
            scenario: Scenario::Paused.title().into(),
            injected: format!("agent frozen for {}", report::secs(self.paused_for)),
            sent: self.basics.tally.sent,
            lost: self.basics.tally.lost,
            recovery: format!(
                "converged {} after resume ({} failed echoes during the pause)",
                report::secs_or(self.converged, "never"),
                self.during_pause.lost
            ),
            recovery_ms: self.converged.map(|d| d.as_secs_f64() * 1e3),
            peak_rss_kib: self.basics.peak_rss_kib,
            violations: self.violations(),
        }]
    }

    /// How each figure was measured, with the figures.
    fn details(&self) -> String {
        format!(
            "**2. Consul paused.** The agent was frozen for {}. {} echoes went through the \
             client meanwhile ({} failed), and the servers answered {} of {} echoes sent straight \
             to their ports; {} of the servers logged that Consul did not answer. After the \
             resume, Consul listed every server passing (stable for two check intervals) after \
             {}, the servers logged that Consul answered again after {}, and the client's view \
             listed every server after {}. Registrations lost: {}; re-registrations: {}.\n",
            report::secs(self.paused_for),
            self.during_pause.sent,
            self.during_pause.lost,
            self.direct_echoes.0,
            self.direct_echoes.1,
            self.servers_noticed,
            report::secs_or(self.consul_converged, "never"),
            report::secs_or(self.servers_recovered, "– (none had noticed)"),
            report::secs_or(self.client_converged, "never"),
            self.registrations_lost.len(),
            self.re_registrations,
        )
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::Paused.title().into()
    }
    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let consul = env.agent()?;
        step.say("starting echo servers");
        let stage = self.cast.opening("paused").set_up(launcher, consul).await?;
        let marks = stage.marks();
        let scenario::Stage {
            servers,
            ids,
            discovery,
            ..
        } = &stage;

        step.say(format!(
            "Consul frozen for {}",
            consul_api::GoDuration(self.pause)
        ));
        let t0 = Instant::now();
        consul.pause().await?;
        // The fault lasts `pause`; half-way and at the end, every server is asked directly.
        let mut direct = (0, 0);
        for _ in 0..2 {
            tokio::time::sleep(self.pause / 2).await;
            for s in servers {
                direct.1 += 1;
                if scenario::echo_direct(s.spec.echo_addr(), b"during the pause").await {
                    direct.0 += 1;
                }
            }
        }
        let view_kept = discovery.latest().is_some_and(|v| {
            ids.iter().all(|id| v.lists(id)) && !matches!(v.state, ViewState::Failed(_))
        });
        let t1 = Instant::now();
        let t1_wall = SystemTime::now();
        consul.resume().await?;
        step.say("Consul resumed; waiting for everything to converge");

        let interval = self.cast.interval;
        let consul_converged = stable_all_passing(consul, ids, 3 * interval)
            .await
            .ok()
            .map(|at| at.into_std().saturating_duration_since(t1));
        // The client's view converged when its current run of complete views began (at the
        // resume if it never broke).
        let complete = |v: &View| v.lists_all(ids);
        let client_at = match discovery.latest() {
            Some(v) if complete(&v) => discovery.holds_since(t1, complete),
            _ => discovery
                .wait_for(
                    "the client's view to list every server",
                    t1,
                    LIMIT,
                    complete,
                )
                .await
                .ok()
                .and_then(|_| discovery.holds_since(t1, complete)),
        };
        let client_converged = client_at.map(|at| at.saturating_duration_since(t1));

        let (noticed, servers_recovered) = scenario::servers_back(servers, &marks, t1_wall).await;
        let converged = match (consul_converged, client_converged) {
            (Some(a), Some(b)) => Some(a.max(b).max(servers_recovered.unwrap_or_default())),
            _ => None,
        };

        let (entries, _) = consul
            .client()
            .health()
            .service(SERVICE, None, false, &Default::default())
            .await?;
        let registrations_lost: Vec<String> = ids
            .iter()
            .filter(|id| !entries.iter().any(|e| &&e.service.id == id))
            .cloned()
            .collect();
        let re_registrations = servers
            .iter()
            .map(|s| {
                s.process
                    .output()
                    .matching("re-registered with Consul")
                    .len()
            })
            .sum();

        tokio::time::sleep(interval).await;
        let (outcomes, basics) = stage.finish().await;
        let during = sent_between(&outcomes, t0, t1);
        Ok(Outcome {
            paused_for: t1 - t0,
            during_pause: Tally::of(&during),
            direct_echoes: direct,
            view_kept,
            servers_noticed: noticed,
            servers_recovered,
            consul_converged,
            client_converged,
            converged,
            registrations_lost,
            re_registrations,
            basics,
        })
    }
}

/// The moment Consul first listed every one of `ids` passing and then kept doing so for
/// `settle` (a check that flips critical right after the resume restarts the count).
async fn stable_all_passing(
    consul: &crate::Consul,
    ids: &[String],
    settle: Duration,
) -> Result<tokio::time::Instant> {
    let client = consul.client();
    let deadline = tokio::time::Instant::now() + LIMIT;
    let all = |entries: &[consul_api::ServiceEntry]| {
        ids.iter()
            .all(|id| entries.iter().any(|e| &e.service.id == id))
    };
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (_, at) = wait::health_until(&client, SERVICE, true, left, all).await?;
        let broke = tokio::time::timeout(
            settle,
            wait::health_until(&client, SERVICE, true, LIMIT, |e| !all(e)),
        )
        .await;
        match broke {
            Err(_) => return Ok(at),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}
