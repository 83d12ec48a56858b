//! Scenario 9, a stripped index: the client reaches Consul through a proxy that removes
//! `X-Consul-Index` from every answer. Without an index there is nothing to block on nor to
//! compare, so the client's watch delivers every answer and polls with backoff (200 ms
//! doubling to 2 s). A second server starts during steady traffic. Must hold: no echo lost,
//! the client's discovery lists the new server, and the proxy sees a bounded rate of
//! requests (not a read every 20 ms).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Row, Rows, Scenario};
use crate::{
    error::Result,
    faultproxy::{Fault, FaultProxy},
    procs::{Launcher, ServerProcess},
};
use crate::{
    experiment::{Env, Experiment},
    progress::Progress,
    report::{self, ms_serde as ms},
    scenario::{
        self, Basics, LIMIT,
        observers::{DiscoveryLog, Stream, StreamSpec},
    },
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// One echo every this long.
    pub every: Duration,
    /// How long the proxy's request rate is measured, in steady state.
    pub window: Duration,
    /// Most requests per second allowed through the proxy.
    pub max_rate: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            every: Duration::from_millis(50),
            window: Duration::from_secs(6),
            max_rate: 5.0,
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Second server started → the client's discovery lists it.
    #[serde(with = "ms::opt")]
    pub new_server_seen: Option<Duration>,
    /// Requests per second through the proxy over the window.
    pub request_rate: f64,
    /// Most requests per second allowed.
    pub max_rate: f64,
    /// The highest Consul index among the client's discovery snapshots (0: every index was
    /// stripped).
    pub max_index_seen: u64,
    /// Its echoes and what became of its echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Outcome {
    /// The invariants that did not hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        if self.new_server_seen.is_none() {
            v.push("the client never saw the new server".into());
        }
        if self.request_rate > self.max_rate {
            v.push(format!(
                "{:.1} requests/s through the proxy (at most {:.1} allowed)",
                self.request_rate, self.max_rate
            ));
        }
        v
    }
}

impl Rows for Outcome {
    /// The table's row.
    fn rows(&self) -> Vec<Row> {
        vec![Row {
            scenario: Scenario::Stripped.title().into(),
            injected: "X-Consul-Index stripped from every answer; a second server started".into(),
            sent: self.basics.tally.sent,
            lost: self.basics.tally.lost,
            recovery: format!(
                "new server seen in {}; {:.1} Consul requests/s",
                report::secs_or(self.new_server_seen, "never"),
                self.request_rate
            ),
            recovery_ms: self.new_server_seen.map(|d| d.as_secs_f64() * 1e3),
            peak_rss_kib: None,
            violations: self.violations(),
        }]
    }

    /// How each figure was measured, with the figures.
    fn details(&self) -> String {
        format!(
            "**9. Stripped index.** The client's Consul requests went through a proxy removing \
             `X-Consul-Index` (highest index the client saw: {}). A second server started \
             during steady traffic; the client's discovery listed it {} later. Over a steady \
             window the proxy counted {:.1} requests/s. {} echoes, {} lost.\n",
            self.max_index_seen,
            report::secs_or(self.new_server_seen, "never"),
            self.request_rate,
            self.basics.tally.sent,
            self.basics.tally.lost,
        )
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::Stripped.title().into()
    }
    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let consul = env.agent()?;
        step.say("starting the proxy");
        let proxy = FaultProxy::start(consul.http_addr()).await?;
        proxy.set(Fault::StripIndex);
        let via = consul.config().with_address(proxy.address());
        step.say("starting one server; the client behind the proxy");
        let mut servers =
            scenario::start_servers(launcher, consul, consul.config(), 1, Duration::from_secs(1))
                .await?;
        let ids = scenario::ids(&servers);
        let client = scenario::client(via, Duration::from_secs(1))?;
        let discovery = DiscoveryLog::start(&client);
        discovery
            .wait_for("discovery to list the server", Instant::now(), LIMIT, |v| {
                v.lists_all(&ids)
            })
            .await?;
        let traffic = Stream::start(&client, StreamSpec::every("stripped", self.every, 100_000));
        traffic
            .wait_for("20 echoes", LIMIT, |o| o.seq >= 20 && !o.lost())
            .await?;
        step.say("measuring the request rate");
        let before = proxy.stats().requests;
        let window = Instant::now();
        traffic
            .wait_for("the window to pass", self.window + LIMIT, |o| {
                o.sent >= window + self.window
            })
            .await?;
        let requests = proxy.stats().requests - before;
        let request_rate = requests as f64 / window.elapsed().as_secs_f64();
        step.say("starting a second server");
        let spec = scenario::server_spec(
            consul.config(),
            &format!("{}_2", scenario::SERVICE),
            Duration::from_secs(1),
        )?;
        let t0 = Instant::now();
        servers.push(ServerProcess::spawn(launcher, spec.clone()).await?);
        let new_server_seen = discovery
            .wait_for("the client to list the new server", t0, LIMIT, |v| {
                v.lists(&spec.args.id)
            })
            .await
            .ok()
            .map(|v| v.at.saturating_duration_since(t0));
        let max_index_seen = discovery.views().iter().map(|v| v.index).max().unwrap_or(0);
        let outcomes = traffic.finish().await;
        Ok(Outcome {
            new_server_seen,
            request_rate,
            max_rate: self.max_rate,
            max_index_seen,
            basics: Basics::of(&outcomes, &mut servers),
        })
    }
}
