//! Scenario 3, Consul restarted: the agent is stopped and started again on the same ports. In
//! dev mode it keeps no state, so every registration is gone and Consul's indexes start over.
//! Every server must register again within two check intervals of the agent being back, and
//! the client must cope with the index going backwards and keep every echo answered.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Row, Rows, Scenario};
use crate::{
    experiment::{Env, Experiment},
    progress::Progress,
    report::{self, ms_serde as ms},
    scenario::{
        self, Basics, Cast, LIMIT, SERVICE,
        observers::{Tally, ViewState, sent_between},
    },
};
use consul_api::{AgentServiceCheck, AgentServiceRegistration, GoDuration, QueryOptions};

use crate::{error::Result, procs::Launcher, wait};

/// Registrations that raise the service's index before the restart.
const INDEX_BUMPS: usize = 30;

/// Settings.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Echo servers and echoes.
    pub cast: Cast,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The servers' check interval.
    #[serde(with = "ms")]
    pub interval: Duration,
    /// Stop → the new agent answers and has a leader.
    #[serde(with = "ms")]
    pub agent_down: Duration,
    /// Agent ready → every server registered again (in any state).
    #[serde(with = "ms::opt")]
    pub re_registered: Option<Duration>,
    /// Agent ready → every server passing.
    #[serde(with = "ms::opt")]
    pub passing: Option<Duration>,
    /// Agent ready → the client's discovery lists every server again.
    #[serde(with = "ms::opt")]
    pub client_view: Option<Duration>,
    /// Consul's index of the client's view before the restart.
    pub index_before: u64,
    /// The index of its first answer from the new agent (dev mode starts over).
    pub first_index_after: u64,
    /// The index once it lists every server again.
    pub index_after: u64,
    /// Servers that logged their re-registration.
    pub servers_re_registered: usize,
    /// Echoes sent from the stop until the client listed every server again.
    pub during_restart: Tally,
    /// Its echoes and what became of its echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Outcome {
    /// The invariants that did not hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        match self.re_registered {
            None => v.push("not every server registered again".into()),
            Some(d) if d >= 2 * self.interval => v.push(format!(
                "re-registration took {} (two intervals: {})",
                report::secs(d),
                report::secs(2 * self.interval)
            )),
            Some(_) => {}
        }
        if self.client_view.is_none() {
            v.push("the client's view did not recover".into());
        }
        v
    }
}

impl Rows for Outcome {
    /// The table's row.
    fn rows(&self) -> Vec<Row> {
        vec![Row {
            scenario: Scenario::Restarted.title().into(),
            injected: format!(
                "agent stopped and started again (down {}), state lost",
                report::secs(self.agent_down)
            ),
            sent: self.basics.tally.sent,
            lost: self.basics.tally.lost,
            recovery: format!(
                "all re-registered {} after the agent was back (limit {}); client view {}",
                report::secs_or(self.re_registered, "never"),
                report::secs(2 * self.interval),
                report::secs_or(self.client_view, "never")
            ),
            recovery_ms: self.re_registered.map(|d| d.as_secs_f64() * 1e3),
            peak_rss_kib: self.basics.peak_rss_kib,
            violations: self.violations(),
        }]
    }

    /// How each figure was measured, with the figures.
    fn details(&self) -> String {
        format!(
            "**3. Consul restarted.** The agent was down (stop → new agent ready) for {}. \
             Counting from the moment it was ready again: every server was registered after {} \
             (a blocking query on the service's health), passing after {}, and the client's \
             discovery listed them all after {}, its index going from {} to {} (the new \
             agent's first answer) and then {}. {} \
             servers logged their re-registration. {} echoes from the stop to the client's \
             recovery, {} failed.\n",
            report::secs(self.agent_down),
            report::secs_or(self.re_registered, "never"),
            report::secs_or(self.passing, "never"),
            report::secs_or(self.client_view, "never"),
            self.index_before,
            self.first_index_after,
            self.index_after,
            self.servers_re_registered,
            self.during_restart.sent,
            self.during_restart.lost,
        )
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::Restarted.title().into()
    }
    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let consul = env.agent()?;
        step.say("starting echo servers");
        let stage = self
            .cast
            .opening("restarted")
            .set_up(launcher, consul)
            .await?;
        let scenario::Stage {
            servers,
            ids,
            discovery,
            listed: before,
            ..
        } = &stage;
        // Raise the service's index on the old agent well above where the new one's will be
        // once the servers are back, so that the client visibly sees it go backwards: without
        // this the new agent's index can be back at the old value by the time the client's
        // first read after the outage arrives. A namesake whose TTL check never passes is
        // re-registered with a new tag each time: never in the passing set, never dialled.
        step.say("raising the service's index on the old agent");
        let bumped_from = Instant::now();
        let direct = consul.client();
        let mut bump = AgentServiceRegistration {
            id: Some(format!("{SERVICE}_index_bump")),
            name: SERVICE.into(),
            address: Some("127.0.0.1".into()),
            port: Some(1),
            check: Some(AgentServiceCheck {
                ttl: Some(GoDuration::from_secs(600)),
                ..Default::default()
            }),
            ..Default::default()
        };
        for i in 0..INDEX_BUMPS {
            bump.tags = vec![format!("bump-{i}")];
            direct.agent().service_register(&bump).await?;
        }
        let bump_id = bump.id.clone().unwrap_or_default();
        direct.agent().service_deregister(&bump_id).await?;
        let (_, meta) = direct
            .health()
            .service(SERVICE, None, true, &QueryOptions::default())
            .await?;
        let raised = discovery
            .wait_for(
                "the client's view to reach the raised index",
                bumped_from,
                LIMIT,
                |v| v.index >= meta.last_index,
            )
            .await?;
        let index_before = raised.index.max(before.index);

        step.say("restarting Consul");
        let t0 = Instant::now();
        consul.restart().await?;
        let ready = Instant::now();
        step.say("Consul is back; waiting for every server to register again");
        let registered = wait::health_until(&direct, SERVICE, false, LIMIT, |entries| {
            ids.iter()
                .all(|id| entries.iter().any(|e| &e.service.id == id))
        })
        .await
        .ok()
        .map(|(_, at)| at.into_std().saturating_duration_since(ready));
        let passing = wait::health_until(&direct, SERVICE, true, LIMIT, |entries| {
            ids.iter()
                .all(|id| entries.iter().any(|e| &e.service.id == id))
        })
        .await
        .ok()
        .map(|(_, at)| at.into_std().saturating_duration_since(ready));
        let after = discovery
            .wait_for(
                "the client's view to list every server",
                ready,
                LIMIT,
                |v| v.lists_all(ids) && v.state == ViewState::Reachable,
            )
            .await
            .ok();
        let client_view = after
            .as_ref()
            .map(|v| v.at.saturating_duration_since(ready));
        let first_index_after = discovery
            .views()
            .iter()
            .find(|v| v.at >= t0 && v.state == ViewState::Reachable)
            .map_or(0, |v| v.index);
        let view_end = after.as_ref().map_or_else(Instant::now, |v| v.at);
        let servers_re_registered = servers
            .iter()
            .filter(|s| {
                !s.process
                    .output()
                    .matching("re-registered with Consul")
                    .is_empty()
            })
            .count();

        let interval = self.cast.interval;
        tokio::time::sleep(interval).await;
        let (outcomes, basics) = stage.finish().await;
        let during = sent_between(&outcomes, t0, view_end);
        Ok(Outcome {
            interval,
            agent_down: ready - t0,
            re_registered: registered,
            passing,
            client_view,
            index_before,
            first_index_after,
            index_after: after.map_or(0, |v| v.index),
            servers_re_registered,
            during_restart: Tally::of(&during),
            basics,
        })
    }
}
