//! The fault and security scenarios: what half-failures do to echo servers and resilient
//! clients discovering each other through real Consul, each run once here and returning a
//! typed outcome with its figures; the integration tests assert on those outcomes, and
//! `testbed faults` prints and stores them.
//!
//! * [`hung`] — an echo server frozen by SIGSTOP (port open, no answers), then resumed;
//! * [`paused`] — the Consul agent frozen (`docker pause` / SIGSTOP), then resumed;
//! * [`restarted`] — the Consul agent restarted (dev mode: every registration gone);
//! * [`proxy`] — Consul behind the [`faultproxy`](crate::faultproxy): delayed, dropped, cut
//!   and corrupted answers, then healed;
//! * [`acl`] — ACLs on with default deny: missing, wrong and too narrow tokens;
//! * [`hostile`] — garbage, oversized frames, stalled, reset and short-lived connections;
//! * [`blackholed`] — passing instances that drop SYNs, and one healthy server;
//! * [`batch`] — 1,000 concurrent 64 KiB messages to one server;
//! * [`stripped`] — Consul behind a proxy that strips `X-Consul-Index`;
//! * [`rotated`] — the agent's TLS certificate re-issued and reloaded under running mTLS
//!   processes: same CA, an unknown CA, and back;
//! * [`observe`] — the echo traffic and the discovery views the scenarios watch.
//!
//! Every scenario has one shape, [`Experiment`]: its `Config` runs it against an agent of its
//! own, its `Outcome` gives the report its rows and paragraph ([`Findings`]). [`run`] takes a
//! list of them ([`Plan`]) and records each in the [`Report`].
//!
//! Every scenario starts its own agent and processes, bounds every loop in count and time,
//! and talks only to 127.0.0.1 and the agent's container.

pub mod acl;
pub mod batch;
pub mod blackholed;
pub mod hostile;
pub mod hung;
pub mod observe;
pub mod paused;
pub mod proxy;
pub mod restarted;
pub mod rotated;
pub mod stripped;

use std::{
    fmt::Write as _,
    time::{Duration, Instant, SystemTime},
};

use echo_client::{ClientConfig, EchoClient};
use futures::future::LocalBoxFuture;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::{
    consul::{Consul, ConsulOptions},
    error::{Error, Result},
    logbuf::LogBuffer,
    procs::{Launcher, ServerProcess, ServerSpec},
    wait,
};

/// The service every scenario's servers register.
pub const SERVICE: &str = "servernode";

/// Deadline of any one wait inside a scenario: long enough to prove "no hang", no more.
pub(crate) const LIMIT: Duration = Duration::from_secs(60);

/// A scenario, as `testbed faults --only` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// An echo server frozen by SIGSTOP, then resumed.
    Hung,
    /// The Consul agent frozen, then resumed.
    Paused,
    /// The Consul agent restarted, losing its state.
    Restarted,
    /// Consul behind a proxy that delays, drops, cuts and corrupts answers.
    Proxy,
    /// ACLs on, default deny.
    Acl,
    /// Hostile input at an echo server.
    Hostile,
    /// Passing instances that drop SYNs.
    Blackholed,
    /// A large pipelined batch.
    Batch,
    /// Consul's index stripped by a proxy.
    Stripped,
    /// The agent's TLS certificate changed under running mTLS processes.
    Rotated,
}

impl Scenario {
    /// All of them, in the report's order.
    pub const ALL: [Scenario; 10] = [
        Scenario::Hung,
        Scenario::Paused,
        Scenario::Restarted,
        Scenario::Proxy,
        Scenario::Acl,
        Scenario::Hostile,
        Scenario::Blackholed,
        Scenario::Batch,
        Scenario::Stripped,
        Scenario::Rotated,
    ];

    /// The table's name for it.
    pub fn title(self) -> &'static str {
        match self {
            Scenario::Hung => "1. hung server",
            Scenario::Paused => "2. Consul paused",
            Scenario::Restarted => "3. Consul restarted",
            Scenario::Proxy => "4. fault proxy",
            Scenario::Acl => "5. ACLs, default deny",
            Scenario::Hostile => "6. hostile input",
            Scenario::Blackholed => "7. blackholed instances",
            Scenario::Batch => "8. large pipelined batch",
            Scenario::Stripped => "9. stripped X-Consul-Index",
            Scenario::Rotated => "10. TLS certificate rotated",
        }
    }
}

/// The one shape of a scenario: its settings run it once against a fresh agent and return
/// what it measured. Adding a scenario is a module implementing this (on its `Config`) and
/// its variant of [`Scenario`]: name, title, and a line in [`Scenario::plan`].
pub trait Experiment: Default {
    /// Which scenario these settings run.
    const SCENARIO: Scenario;
    /// What one run measured.
    type Outcome: Findings;

    /// How to start its agent: the environment's backend and image, no ACLs, plain HTTP.
    fn consul_options(&self) -> Result<ConsulOptions> {
        Ok(ConsulOptions::from_env()?)
    }

    /// Run the scenario once against `consul`, just started from
    /// [`consul_options`](Self::consul_options), with its own processes; `step` hears each
    /// stage.
    fn run_on(
        &self,
        launcher: &Launcher,
        consul: &mut Consul,
        step: &dyn Fn(&str),
    ) -> impl Future<Output = Result<Self::Outcome>>;

    /// Start its agent, then run the scenario once against it.
    fn run(
        &self,
        launcher: &Launcher,
        step: &dyn Fn(&str),
    ) -> impl Future<Output = Result<Self::Outcome>> {
        async move {
            let mut consul = start(self, step).await?;
            self.run_on(launcher, &mut consul, step).await
        }
    }
}

/// The agent of `experiment`, started.
async fn start(experiment: &impl Experiment, step: &dyn Fn(&str)) -> Result<Consul> {
    step("starting Consul");
    Ok(Consul::start_with(experiment.consul_options()?).await?)
}

/// What a scenario's outcome gives the report.
pub trait Findings: Serialize {
    /// Its rows of the table.
    fn rows(&self) -> Vec<Row>;
    /// How each figure was measured, with the figures: one markdown paragraph.
    fn details(&self) -> String;
}

/// A scenario with its settings, ready for [`run`]: any [`Experiment`], behind a pointer.
pub trait Plan {
    /// Which scenario it runs.
    fn scenario(&self) -> Scenario;
    /// Run it and record what it measured, or why it did not complete.
    fn record<'a>(
        &'a self,
        launcher: &'a Launcher,
        step: &'a dyn Fn(&str),
    ) -> LocalBoxFuture<'a, Recorded>;
}

impl<E: Experiment> Plan for E {
    fn scenario(&self) -> Scenario {
        E::SCENARIO
    }

    fn record<'a>(
        &'a self,
        launcher: &'a Launcher,
        step: &'a dyn Fn(&str),
    ) -> LocalBoxFuture<'a, Recorded> {
        Box::pin(async move {
            let scenario = E::SCENARIO;
            let recorded = async {
                let mut consul = start(self, step).await?;
                let outcome = self.run_on(launcher, &mut consul, step).await?;
                // Derived `Serialize` on plain data cannot fail; should it, the report says so.
                let json = serde_json::to_value(&outcome).unwrap_or_else(|e| {
                    serde_json::Value::String(format!("(the outcome as JSON failed: {e})"))
                });
                Ok::<_, Error>(Recorded {
                    scenario,
                    consul: consul_label(&consul),
                    rows: outcome.rows(),
                    details: outcome.details(),
                    outcome: Some(json),
                    error: None,
                })
            };
            recorded
                .await
                .unwrap_or_else(|e| Recorded::failed(scenario, &e))
        })
    }
}

impl Scenario {
    /// The scenario with its default settings.
    pub fn plan(self) -> Box<dyn Plan> {
        match self {
            Scenario::Hung => Box::new(hung::Config::default()),
            Scenario::Paused => Box::new(paused::Config::default()),
            Scenario::Restarted => Box::new(restarted::Config::default()),
            Scenario::Proxy => Box::new(proxy::Config::default()),
            Scenario::Acl => Box::new(acl::Config::default()),
            Scenario::Hostile => Box::new(hostile::Config::default()),
            Scenario::Blackholed => Box::new(blackholed::Config::default()),
            Scenario::Batch => Box::new(batch::Config::default()),
            Scenario::Stripped => Box::new(stripped::Config::default()),
            Scenario::Rotated => Box::new(rotated::Config::default()),
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The scenario's title ([`Scenario::title`]), with the case when it has several rows.
    pub scenario: String,
    /// What was injected, and for how long.
    pub injected: String,
    /// Echo messages sent through a resilient client during the scenario.
    pub sent: u64,
    /// Of those, answered with an error or with other bytes.
    pub lost: u64,
    /// The recovery figure, in words with its value (`–` when the scenario has none).
    pub recovery: String,
    /// The recovery figure in milliseconds, when there is one.
    pub recovery_ms: Option<f64>,
    /// Highest resident set (VmHWM) of the scenario's echo-server processes, KiB.
    pub peak_rss_kib: Option<u64>,
    /// The scenario's invariants that did not hold (empty: all held).
    pub violations: Vec<String>,
}

/// One scenario as run: its rows, its paragraph and its outcome, or why it failed.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    /// Which scenario.
    pub scenario: Scenario,
    /// The `Consul x.y.z (backend)` label of its agent (empty if it failed).
    pub consul: String,
    /// Its rows of the table.
    pub rows: Vec<Row>,
    /// How each figure was measured (empty if it failed).
    pub details: String,
    /// Everything it measured, as JSON (`None` if it failed).
    pub outcome: Option<serde_json::Value>,
    /// Why it could not run to the end.
    pub error: Option<String>,
}

impl Recorded {
    /// A scenario that could not run to the end: one row saying so.
    fn failed(scenario: Scenario, e: &Error) -> Recorded {
        tracing::error!(scenario = scenario.title(), error = %e, "scenario failed");
        Recorded {
            scenario,
            consul: String::new(),
            rows: vec![Row {
                scenario: scenario.title().into(),
                injected: "(did not complete)".into(),
                sent: 0,
                lost: 0,
                recovery: "–".into(),
                recovery_ms: None,
                peak_rss_kib: None,
                violations: vec![format!("error: {e}")],
            }],
            details: String::new(),
            outcome: None,
            error: Some(e.to_string()),
        }
    }
}

/// Everything `testbed faults` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When the run began (RFC 3339, UTC).
    pub date: String,
    /// Consul's version and backend, as the first agent reported them.
    pub consul: String,
    /// The scenarios, in the report's order.
    pub scenarios: Vec<Recorded>,
    /// Wall time of the whole run, seconds.
    pub wall_time: f64,
}

impl Report {
    /// True when every scenario ran and every invariant held.
    pub fn all_held(&self) -> bool {
        self.scenarios
            .iter()
            .all(|s| s.error.is_none() && s.rows.iter().all(|r| r.violations.is_empty()))
    }

    /// Every row of the table, in order.
    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.scenarios.iter().flat_map(|s| &s.rows)
    }
}

/// Run `plans` one after the other (each with its own agent), in the report's order and once
/// per scenario, through `launcher`. A scenario that fails is reported as such; the others
/// still run.
pub async fn run(launcher: &Launcher, plans: &[Box<dyn Plan>], progress: &ProgressBar) -> Report {
    let began = SystemTime::now();
    let started = Instant::now();
    let mut order: Vec<&dyn Plan> = plans.iter().map(|p| &**p).collect();
    order.sort_by_key(|p| p.scenario());
    order.dedup_by_key(|p| p.scenario());
    progress.set_length(order.len() as u64);
    let mut scenarios = Vec::with_capacity(order.len());
    for plan in order {
        progress.set_prefix(plan.scenario().title());
        let step = |msg: &str| progress.set_message(msg.to_owned());
        scenarios.push(plan.record(launcher, &step).await);
        progress.inc(1);
    }
    Report {
        date: crate::report::rfc3339(began),
        consul: scenarios
            .iter()
            .map(|s| s.consul.clone())
            .find(|c| !c.is_empty())
            .unwrap_or_default(),
        scenarios,
        wall_time: started.elapsed().as_secs_f64(),
    }
}

/// The report as markdown: the table, then how each figure was measured.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Fault and security scenarios: Consul {}, {}\n",
        report.consul, report.date
    );
    out.push_str(
        "| scenario | injected | messages sent / lost | recovery | peak RSS (echo-server) | invariants |\n",
    );
    out.push_str("|---|---|---:|---|---:|---|\n");
    for r in report.rows() {
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} | {} | {} | {} |",
            r.scenario,
            r.injected,
            r.sent,
            r.lost,
            r.recovery,
            r.peak_rss_kib
                .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "–".into()),
            if r.violations.is_empty() {
                "held".to_owned()
            } else {
                format!("**broken**: {}", r.violations.join("; "))
            }
        );
    }
    out.push('\n');
    for s in report.scenarios.iter().filter(|s| !s.details.is_empty()) {
        out.push_str(&s.details);
        out.push('\n');
    }
    out.push_str(
        "Messages are echoes sent through a resilient `EchoClient` at a steady rate; lost = \
         answered with an error or with other bytes. Peak RSS is `VmHWM` from \
         `/proc/<pid>/status` of each echo-server process, read before it is stopped. Times \
         are taken by the testbed when it injects a fault and when it observes the effect \
         (a discovery snapshot, a blocking query's answer, a line of a server's output).\n",
    );
    let _ = writeln!(out, "\nRun wall time: {:.0} s.", report.wall_time);
    out
}

// === helpers shared by the scenarios ===

/// The `Consul x.y.z (backend)` label of an agent.
pub(crate) fn consul_label(consul: &Consul) -> String {
    format!("{} ({})", consul.version(), consul.backend().name())
}

/// An echo server of [`SERVICE`] with ID `id`, checked every `interval`.
pub(crate) fn server_spec(
    consul: consul_api::Config,
    id: &str,
    interval: Duration,
) -> Result<ServerSpec> {
    let mut spec = ServerSpec::seed(consul)?.with_id(id);
    spec.interval = interval;
    spec.timeout = interval;
    // Nothing is reaped during a scenario (Consul raises this to 1m anyway).
    spec.deregister_after = Duration::from_secs(60);
    Ok(spec)
}

/// Start `n` servers (`servernode_1` ...) and wait until Consul lists them all passing.
pub(crate) async fn start_servers(
    launcher: &Launcher,
    consul: &Consul,
    via: consul_api::Config,
    n: usize,
    interval: Duration,
) -> Result<Vec<ServerProcess>> {
    let mut servers = Vec::with_capacity(n);
    for i in 1..=n {
        let spec = server_spec(via.clone(), &format!("{SERVICE}_{i}"), interval)?;
        servers.push(ServerProcess::spawn(launcher, spec).await?);
    }
    let ids = ids(&servers);
    wait::health_until(&consul.client(), SERVICE, true, LIMIT, |entries| {
        ids.iter()
            .all(|id| entries.iter().any(|e| &e.service.id == id))
    })
    .await?;
    Ok(servers)
}

/// The opening every traffic scenario shares: `n` servers registered through `via`, a
/// resilient client (through `via` too) whose discovery lists them all, and steady traffic
/// with 20 good echoes behind it.
pub(crate) struct Stage {
    pub servers: Vec<ServerProcess>,
    pub ids: Vec<String>,
    pub client: EchoClient,
    pub discovery: observe::DiscoveryLog,
    /// The discovery view that first listed every server.
    pub listed: observe::View,
    pub traffic: observe::Traffic,
}

impl Stage {
    /// Set the stage; `label` names the traffic, `max` bounds how many echoes it sends.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn set_up(
        launcher: &Launcher,
        consul: &Consul,
        via: consul_api::Config,
        n: usize,
        interval: Duration,
        reply_timeout: Duration,
        (label, every, max): (&'static str, Duration, u64),
    ) -> Result<Stage> {
        let servers = start_servers(launcher, consul, via.clone(), n, interval).await?;
        let ids = ids(&servers);
        let client = client(via, reply_timeout)?;
        let discovery = observe::DiscoveryLog::start(&client);
        let listed = discovery
            .wait_for(
                "discovery to list every server",
                Instant::now(),
                LIMIT,
                |v| v.lists_all(&ids),
            )
            .await?;
        let traffic = observe::Traffic::start(&client, label, every, max);
        traffic
            .wait_for("20 echoes", LIMIT, |o| o.seq >= 20 && !o.lost())
            .await?;
        Ok(Stage {
            servers,
            ids,
            client,
            discovery,
            listed,
            traffic,
        })
    }
}

/// What every traffic scenario reports the same way: its echoes, and what became of its echo
/// servers. A scenario's outcome holds it (flattened into the outcome's JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Basics {
    /// Every echo of the run.
    pub tally: observe::Tally,
    /// The first errors of the client's echoes (at most 5).
    pub errors: Vec<String>,
    /// Panics in the echo servers' output, and servers that exited (none should).
    pub panics: Vec<String>,
    /// Highest resident set (VmHWM) of the scenario's echo-server processes, KiB.
    pub peak_rss_kib: Option<u64>,
}

impl Basics {
    /// The echoes counted in `tally` (first errors: `errors`), and the fate of `servers`.
    pub(crate) fn new(
        tally: observe::Tally,
        errors: Vec<String>,
        servers: &mut [ServerProcess],
    ) -> Basics {
        Basics {
            tally,
            errors,
            panics: casualties(servers),
            peak_rss_kib: peak_rss(servers),
        }
    }

    /// The echoes of `outcomes`, and the fate of `servers`.
    pub(crate) fn of(outcomes: &[observe::Outcome], servers: &mut [ServerProcess]) -> Basics {
        Basics::new(
            observe::Tally::of(outcomes),
            observe::errors(outcomes),
            servers,
        )
    }

    /// The invariants every scenario shares that did not hold: no echo lost, no panic.
    pub fn violations(&self) -> Vec<String> {
        observe::shared_violations(&self.tally, &self.panics)
    }
}

/// The service IDs of `servers`.
pub(crate) fn ids(servers: &[ServerProcess]) -> Vec<String> {
    servers.iter().map(|s| s.spec.id.clone()).collect()
}

/// A resilient client of [`SERVICE`] through `consul`, quick to give up on a silent instance.
pub(crate) fn client(consul: consul_api::Config, reply_timeout: Duration) -> Result<EchoClient> {
    client_reading(
        consul,
        reply_timeout,
        consul_api::Consistency::Default,
        None,
    )
}

/// [`client`], its discovery reading with `consistency` (and `max_stale` for stale reads).
pub(crate) fn client_reading(
    consul: consul_api::Config,
    reply_timeout: Duration,
    consistency: consul_api::Consistency,
    max_stale: Option<Duration>,
) -> Result<EchoClient> {
    let config = client_config(consul, reply_timeout).with_consistency(consistency, max_stale);
    Ok(EchoClient::start(config)?)
}

/// The configuration of [`client`].
pub(crate) fn client_config(consul: consul_api::Config, reply_timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new(consul, SERVICE);
    config.session.reply_timeout = reply_timeout;
    config.session.connect_timeout = Duration::from_millis(500);
    config.session.cooldown = Duration::from_secs(1);
    config
}

/// The highest VmHWM among `servers`.
pub(crate) fn peak_rss(servers: &[ServerProcess]) -> Option<u64> {
    servers
        .iter()
        .filter_map(|s| crate::procfs::status_kib(s.process.pid(), "VmHWM"))
        .max()
}

/// Lines of `outputs` reporting a panic.
fn panics<'a>(outputs: impl IntoIterator<Item = &'a LogBuffer>) -> Vec<String> {
    outputs
        .into_iter()
        .flat_map(|o| o.matching("panicked"))
        .map(|l| l.text)
        .take(5)
        .collect()
}

/// What went wrong with the servers themselves: panics in their output, and exits (they never
/// should exit in these scenarios).
pub(crate) fn casualties(servers: &mut [ServerProcess]) -> Vec<String> {
    let mut found = panics(servers.iter().map(|s| s.process.output()));
    found.extend(servers.iter_mut().filter_map(|s| {
        s.process
            .has_exited()
            .then(|| format!("{} exited", s.spec.id))
    }));
    found
}

/// One echo straight to a server's port (not through discovery).
pub(crate) async fn echo_direct(addr: std::net::SocketAddr, payload: &[u8]) -> bool {
    consul_harness::hostile::echo_direct(addr, payload).await
}

/// `d` as seconds with two decimals, for the table.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// `Some(d)` as seconds, `None` as "never".
pub(crate) fn secs_or(d: Option<Duration>, never: &str) -> String {
    d.map(secs).unwrap_or_else(|| never.to_owned())
}

/// The time from `from` to a wall-clock moment (a log line's arrival), zero if before.
pub(crate) fn since_wall(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or_default()
}

/// Serialize durations as milliseconds.
pub(crate) mod ms {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }

    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&(d.as_secs_f64() * 1e3)),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_what_broke() {
        let report = Report {
            date: "2026-11-25T13:32:04Z".into(),
            consul: "1.8.7 (docker)".into(),
            scenarios: vec![Recorded {
                scenario: Scenario::Hung,
                consul: "1.8.7 (docker)".into(),
                rows: vec![Row {
                    scenario: Scenario::Hung.title().into(),
                    injected: "SIGSTOP".into(),
                    sent: 10,
                    lost: 1,
                    recovery: "1.00 s".into(),
                    recovery_ms: Some(1000.0),
                    peak_rss_kib: Some(2048),
                    violations: vec!["1 echo lost".into()],
                }],
                details: String::new(),
                outcome: None,
                error: None,
            }],
            wall_time: 1.0,
        };
        let md = markdown(&report);
        assert!(
            md.contains(
                "| 1. hung server | SIGSTOP | 10 / 1 | 1.00 s | 2.0 MiB | **broken**: 1 echo lost |"
            ),
            "{md}"
        );
        assert!(!report.all_held());
    }
}
