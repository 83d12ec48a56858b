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
use indicatif::ProgressBar;
use serde::Serialize;

use crate::{
    consul::Consul,
    error::Result,
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

/// The settings of every scenario.
#[derive(Debug, Clone, Default)]
pub struct FaultsConfig {
    pub hung: hung::Config,
    pub paused: paused::Config,
    pub restarted: restarted::Config,
    pub proxy: proxy::Config,
    pub acl: acl::Config,
    pub hostile: hostile::Config,
    pub blackholed: blackholed::Config,
    pub batch: batch::Config,
    pub stripped: stripped::Config,
    pub rotated: rotated::Config,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
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

/// Everything `testbed faults` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When the run began (RFC 3339, UTC).
    pub date: String,
    /// Consul's version and backend, as the first agent reported them.
    pub consul: String,
    pub rows: Vec<Row>,
    pub hung: Option<hung::Outcome>,
    pub paused: Option<paused::Outcome>,
    pub restarted: Option<restarted::Outcome>,
    pub proxy: Option<proxy::Outcome>,
    pub acl: Option<acl::Outcome>,
    pub hostile: Option<hostile::Outcome>,
    pub blackholed: Option<blackholed::Outcome>,
    pub batch: Option<batch::Outcome>,
    pub stripped: Option<stripped::Outcome>,
    pub rotated: Option<rotated::Outcome>,
    /// Scenarios that could not run to the end, with why.
    pub failed: Vec<(Scenario, String)>,
    /// Wall time of the whole run, seconds.
    pub wall_time: f64,
}

impl Report {
    /// True when every scenario ran and every invariant held.
    pub fn all_held(&self) -> bool {
        self.failed.is_empty() && self.rows.iter().all(|r| r.violations.is_empty())
    }
}

/// Run `scenarios` one after the other (each with its own agent), through `launcher`.
/// A scenario that fails is reported as such; the others still run.
pub async fn run(
    launcher: &Launcher,
    config: &FaultsConfig,
    scenarios: &[Scenario],
    progress: &ProgressBar,
) -> Result<Report> {
    let began = SystemTime::now();
    let started = Instant::now();
    let mut report = Report {
        date: crate::report::rfc3339(began),
        consul: String::new(),
        rows: Vec::new(),
        hung: None,
        paused: None,
        restarted: None,
        proxy: None,
        acl: None,
        hostile: None,
        blackholed: None,
        batch: None,
        stripped: None,
        rotated: None,
        failed: Vec::new(),
        wall_time: 0.0,
    };
    let mut order = scenarios.to_vec();
    order.sort();
    order.dedup();
    progress.set_length(order.len() as u64);
    for scenario in order {
        progress.set_prefix(scenario.title());
        let step = |msg: &str| progress.set_message(msg.to_owned());
        // Each scenario's outcome: its rows in the table, its Consul in the header, itself in
        // the JSON.
        macro_rules! record {
            ($module:ident, $slot:ident) => {
                $module::run(launcher, &config.$slot, &step).await.map(|o| {
                    report.rows.extend(o.rows());
                    set_consul(&mut report.consul, &o.consul);
                    report.$slot = Some(o);
                })
            };
        }
        let result = match scenario {
            Scenario::Hung => record!(hung, hung),
            Scenario::Paused => record!(paused, paused),
            Scenario::Restarted => record!(restarted, restarted),
            Scenario::Proxy => record!(proxy, proxy),
            Scenario::Acl => record!(acl, acl),
            Scenario::Hostile => record!(hostile, hostile),
            Scenario::Blackholed => record!(blackholed, blackholed),
            Scenario::Batch => record!(batch, batch),
            Scenario::Stripped => record!(stripped, stripped),
            Scenario::Rotated => record!(rotated, rotated),
        };
        if let Err(e) = result {
            tracing::error!(scenario = scenario.title(), error = %e, "scenario failed");
            report.rows.push(Row {
                scenario: scenario.title().into(),
                injected: "(did not complete)".into(),
                sent: 0,
                lost: 0,
                recovery: "–".into(),
                recovery_ms: None,
                peak_rss_kib: None,
                violations: vec![format!("error: {e}")],
            });
            report.failed.push((scenario, e.to_string()));
        }
        progress.inc(1);
    }
    report.wall_time = started.elapsed().as_secs_f64();
    Ok(report)
}

fn set_consul(slot: &mut String, consul: &str) {
    if slot.is_empty() {
        consul.clone_into(slot);
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
    for r in &report.rows {
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
    let details: [Option<String>; 10] = [
        report.hung.as_ref().map(hung::Outcome::details),
        report.paused.as_ref().map(paused::Outcome::details),
        report.restarted.as_ref().map(restarted::Outcome::details),
        report.proxy.as_ref().map(proxy::Outcome::details),
        report.acl.as_ref().map(acl::Outcome::details),
        report.hostile.as_ref().map(hostile::Outcome::details),
        report.blackholed.as_ref().map(blackholed::Outcome::details),
        report.batch.as_ref().map(batch::Outcome::details),
        report.stripped.as_ref().map(stripped::Outcome::details),
        report.rotated.as_ref().map(rotated::Outcome::details),
    ];
    for d in details.into_iter().flatten() {
        out.push_str(&d);
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

/// The service IDs of `servers`.
pub(crate) fn ids(servers: &[ServerProcess]) -> Vec<String> {
    servers.iter().map(|s| s.spec.id.clone()).collect()
}

/// A resilient client of [`SERVICE`] through `consul`, quick to give up on a silent instance.
pub(crate) fn client(consul: consul_api::Config, reply_timeout: Duration) -> Result<EchoClient> {
    let mut config = ClientConfig::new(consul, SERVICE);
    config.session.reply_timeout = reply_timeout;
    config.session.connect_timeout = Duration::from_millis(500);
    config.session.cooldown = Duration::from_secs(1);
    Ok(EchoClient::start(config)?)
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut frame = payload.to_vec();
        frame.push(b'\n');
        s.write_all(&frame).await?;
        let mut back = vec![0u8; frame.len()];
        s.read_exact(&mut back).await?;
        std::io::Result::Ok(back == frame)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Ok(true))
    )
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
            hung: None,
            paused: None,
            restarted: None,
            proxy: None,
            acl: None,
            hostile: None,
            blackholed: None,
            batch: None,
            stripped: None,
            rotated: None,
            failed: Vec::new(),
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
