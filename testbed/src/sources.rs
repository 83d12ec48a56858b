//! The sources part of `testbed discovery`: every way to discover, side by side: one SIGKILL, and each of Consul's interfaces watched
//! at once — health blocking queries, the catalog, the agent's list, a prepared query, DNS SRV
//! records of the service and of the query — plus the seed article's naive client.
//!
//! For each source the experiment records when it stopped handing out the killed instance,
//! how many requests it made to Consul (each HTTP source goes through its own counting
//! [`FaultProxy`], passing everything; a DNS source's reads are its published answers: it
//! polls at a fixed rate and publishes every answer), and what a resilient session reading
//! only that source lost while it streamed messages through the kill (it must be 0 for every
//! source: the session ejects a failing instance on its own). The naive client, which reads
//! one service ID from the agent's list and has no failover, shows the failures.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use consul_api::{Client, GoDuration};
use consul_registry::{DiscoveryConfig, Snapshot, Source, discovery};
use echo_client::{EchoClient, session::SessionConfig};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    consul::{Consul, ConsulOptions},
    error::{Error, Result},
    experiment::{Findings, OnItsOwn},
    faultproxy::FaultProxy,
    procs::{ClientProcess, Launcher, ServerProcess, ServerSpec},
    progress::Progress,
    report::{Axis, Mark, PALETTE, Plot, Series, Table},
    wait,
};

/// The service every source follows.
pub const SERVICE: &str = "servernode";
/// The prepared query the query sources execute.
pub const QUERY: &str = "servernode-passing";

/// How the side-by-side run is set up.
#[derive(Debug, Clone, Serialize)]
pub struct SourcesConfig {
    /// Echo servers registered (the first one is killed).
    pub servers: usize,
    /// Their check `Interval`.
    pub interval: GoDuration,
    /// Their check `Timeout`.
    pub timeout: GoDuration,
    /// Their `DeregisterCriticalServiceAfter` (Consul raises it to at least 1m).
    pub deregister_after: GoDuration,
    /// How often the polled sources (agent, prepared query, DNS) read.
    pub poll: GoDuration,
    /// Each session sends one message, waits for its reply, then waits this long.
    pub message_interval: GoDuration,
    /// How long after the kill to keep watching (every source has dropped the instance by
    /// then, or the table says it had not).
    pub horizon: GoDuration,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        SourcesConfig {
            servers: 3,
            interval: GoDuration::from_secs(1),
            timeout: GoDuration::from_secs(1),
            deregister_after: GoDuration::from_secs(30),
            poll: GoDuration::from_secs(1),
            message_interval: GoDuration(Duration::from_millis(50)),
            horizon: GoDuration::from_secs(110),
        }
    }
}

/// One source's row.
#[derive(Debug, Clone, Serialize)]
pub struct SourceRow {
    /// `health`, `catalog`, `agent`, `query`, `dns`, `dns-query`.
    pub source: String,
    /// What it reads, in Consul's terms.
    pub reads: String,
    /// From the kill to the first answer without the killed instance, seconds; `None`: it
    /// still listed it at the horizon.
    pub dropped_after: Option<f64>,
    /// Requests made to Consul from the kill to the drop (or to the horizon).
    pub requests_until_dropped: u64,
    /// Requests per second over the whole watch.
    pub requests_per_second: f64,
    /// Messages its session sent after the kill.
    pub sent: u64,
    /// Of them, answered byte-exact.
    pub answered: u64,
    /// Of them, failed (timeout, no instance, wrong bytes): must be 0.
    pub lost: u64,
    /// The slowest answer after the kill, milliseconds (a failover's cost).
    pub worst_latency_ms: f64,
    /// When it published a view after the kill, seconds after the kill.
    pub published_after_kill: Vec<f64>,
}

/// What the naive client went through.
#[derive(Debug, Clone, Serialize)]
pub struct NaiveRow {
    /// Replies it printed after the kill.
    pub replies_after_kill: usize,
    /// Failed dials and writes after the kill.
    pub failures_after_kill: usize,
    /// "not found" lookups after the kill (once Consul removed the instance).
    pub not_found_after_kill: usize,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct SourcesReport {
    /// The agent's version.
    pub consul_version: String,
    /// How the run was set up.
    pub config: SourcesConfig,
    /// When the first server got SIGKILL.
    pub killed_at: String,
    /// From the kill to its check's first critical status in a blocking query, seconds.
    pub critical_after: Option<f64>,
    /// One row per source, in the order they were started.
    pub rows: Vec<SourceRow>,
    /// The seed article's client.
    pub naive: NaiveRow,
}

/// What one source's watcher saw.
#[derive(Debug, Default)]
struct Seen {
    /// Publications after the kill: (time, still lists the dead instance, requests so far).
    after_kill: Vec<(SystemTime, bool, u64)>,
}

/// Counts a source's requests: its proxy's count, or, for DNS (which polls at a fixed rate
/// and publishes every answer), its publications.
#[derive(Debug, Clone)]
struct Counter(Option<Arc<FaultProxy>>);

impl Counter {
    fn requests(&self, snapshot: &Snapshot) -> u64 {
        match &self.0 {
            Some(proxy) => proxy.stats().requests,
            None => snapshot.version,
        }
    }
}

struct Running {
    label: &'static str,
    reads: &'static str,
    counter: Counter,
    rx: watch::Receiver<Snapshot>,
    seen: Arc<std::sync::Mutex<Seen>>,
    stream: JoinHandle<Stream>,
    watcher: JoinHandle<()>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    sent: u64,
    answered: u64,
    lost: u64,
    worst: Duration,
}

/// `config.servers` echo servers of [`SERVICE`], once Consul lists them all passing.
async fn start_servers(
    launcher: &Launcher,
    consul: &Consul,
    config: &SourcesConfig,
) -> Result<Vec<ServerProcess>> {
    let mut servers = Vec::new();
    for i in 1..=config.servers {
        let mut spec = ServerSpec::seed(consul.config())?.with_id(format!("{SERVICE}_{i}"));
        spec.args.interval = GoDuration(config.interval.0);
        spec.args.timeout = GoDuration(config.timeout.0);
        spec.args.deregister_after = GoDuration(config.deregister_after.0);
        servers.push(ServerProcess::spawn(launcher, spec).await?);
    }
    wait::health_until(
        &consul.client(),
        SERVICE,
        true,
        Duration::from_secs(30),
        |e| e.len() == config.servers,
    )
    .await?;
    Ok(servers)
}

/// Every source compared: how it reads, its label, and what it reads in words.
fn every_source(consul: &Consul, poll: Duration) -> [(Source, &'static str, &'static str); 6] {
    [
        (
            Source::Health,
            "health",
            "/v1/health/service/<name>?passing, blocking",
        ),
        (
            Source::Catalog,
            "catalog",
            "/v1/catalog/service/<name>, blocking",
        ),
        (
            Source::Agent { every: poll },
            "agent",
            "/v1/agent/services, polled (the seed's way)",
        ),
        (
            Source::PreparedQuery {
                name: QUERY.into(),
                every: poll,
            },
            "query",
            "/v1/query/<name>/execute, polled",
        ),
        (
            Source::Dns {
                server: consul.dns_addr(),
                query: None,
                every: poll,
            },
            "dns",
            "SRV <name>.service.consul over TCP, polled",
        ),
        (
            Source::Dns {
                server: consul.dns_addr(),
                query: Some(QUERY.into()),
                every: poll,
            },
            "dns-query",
            "SRV <query>.query.consul over TCP, polled",
        ),
    ]
}

/// What every source's watcher and stream share: the address of the instance to be killed,
/// when it was, and the signal to stop.
struct Watch {
    dead: String,
    killed: Arc<std::sync::OnceLock<SystemTime>>,
    stop: CancellationToken,
}

/// One source at work: its discovery (behind a counting proxy, but for DNS), a watcher of
/// what it publishes, and a session streaming echoes through it.
async fn start_source(
    consul: &Consul,
    config: &SourcesConfig,
    (source, label, reads): (Source, &'static str, &'static str),
    watch: &Watch,
) -> Result<Running> {
    let (counter, consul_config) = if matches!(source, Source::Dns { .. }) {
        (Counter(None), consul.config())
    } else {
        let proxy = FaultProxy::start(consul.http_addr()).await?;
        let config = consul.config().with_address(proxy.address());
        (Counter(Some(Arc::new(proxy))), config)
    };
    let mut discovery_config = DiscoveryConfig::new(SERVICE);
    discovery_config.source = source;
    let rx = discovery::spawn(Client::new(consul_config)?, discovery_config);
    let mut session = SessionConfig::new(SERVICE);
    session.message_timeout = Duration::from_secs(10);
    let echo = EchoClient::with_discovery(rx.clone(), session)?;
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let watcher = tokio::spawn(watch_source(
        rx.clone(),
        counter.clone(),
        watch.dead.clone(),
        watch.killed.clone(),
        seen.clone(),
        watch.stop.clone(),
    ));
    let stream = tokio::spawn(stream_messages(
        echo,
        label,
        config.message_interval.0,
        watch.killed.clone(),
        watch.stop.clone(),
    ));
    Ok(Running {
        label,
        reads,
        counter,
        rx,
        seen,
        stream,
        watcher,
    })
}

/// Until every source lists `n` instances (at most 30 s).
async fn all_listed(running: &[Running], n: usize) -> Result<()> {
    for r in running {
        let mut rx = r.rx.clone();
        tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|s| s.instances.len() == n),
        )
        .await
        .map_err(|_| Error::Timeout {
            what: format!("the {} source to list {n} instances", r.label),
            timeout: Duration::from_secs(30),
        })?
        .map_err(|_| Error::Setting(format!("the {} source stopped", r.label)))?;
    }
    Ok(())
}

/// The seed's naive client, sending every 250 ms, once it has its first reply.
async fn start_naive(launcher: &Launcher, consul: &Consul) -> Result<ClientProcess> {
    let naive_args = echo_client::cli::Args {
        mode: echo_client::cli::Mode::Naive,
        service: SERVICE.into(),
        count: 1_000_000,
        interval: GoDuration(Duration::from_millis(250)),
        timeout: GoDuration::from_secs(600),
        ..crate::procs::client_args()?
    };
    let naive = ClientProcess::spawn(launcher, &consul.config(), &naive_args)?;
    naive
        .process
        .output()
        .wait_for("reply ", Duration::from_secs(30))
        .await?;
    Ok(naive)
}

/// In the background: when Consul first reports `id`'s check critical (at most 30 s).
fn when_critical(client: &Client, id: &str) -> JoinHandle<Option<SystemTime>> {
    let client = client.clone();
    let id = id.to_owned();
    tokio::spawn(async move {
        wait::health_until(&client, SERVICE, false, Duration::from_secs(30), move |e| {
            e.iter().any(|e| {
                e.service.id == id && e.aggregated_status() == consul_api::HealthStatus::Critical
            })
        })
        .await
        .ok()
        .map(|(_, at)| SystemTime::now() - at.elapsed())
    })
}

/// Until every source dropped the killed instance, or `horizon`, saying every 10 s which
/// still list it.
async fn until_all_dropped(
    running: &[Running],
    killed_at: SystemTime,
    horizon: Duration,
    progress: &Progress,
) {
    let deadline = tokio::time::Instant::now() + horizon;
    let mut last_report = tokio::time::Instant::now();
    loop {
        let pending: Vec<&str> = running
            .iter()
            .filter(|r| dropped_at(&r.seen).is_none())
            .map(|r| r.label)
            .collect();
        if pending.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = tokio::time::Instant::now();
            progress.say(format!(
                "{:.0} s after the kill, still listing it: {}",
                killed_at.elapsed().unwrap_or_default().as_secs_f64(),
                pending.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A source's row: when it dropped the instance, its requests (`before`: its count at the
/// kill) over the `watched` time, its session's echoes.
async fn source_row(
    r: Running,
    before: u64,
    killed_at: SystemTime,
    watched: Duration,
) -> SourceRow {
    let stream = r.stream.await.unwrap_or_default();
    r.watcher.abort();
    let total = r.counter.requests(&r.rx.borrow()).saturating_sub(before);
    let dropped = dropped_at(&r.seen);
    let published_after_kill = r
        .seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .after_kill
        .iter()
        .filter_map(|(at, _, _)| at.duration_since(killed_at).ok())
        .map(|d| d.as_secs_f64())
        .collect();
    SourceRow {
        source: r.label.into(),
        reads: r.reads.into(),
        dropped_after: dropped
            .and_then(|(at, _)| at.duration_since(killed_at).ok())
            .map(|d| d.as_secs_f64()),
        requests_until_dropped: dropped.map_or(total, |(_, n)| n.saturating_sub(before)),
        requests_per_second: total as f64 / watched.as_secs_f64().max(1e-3),
        sent: stream.sent,
        answered: stream.answered,
        lost: stream.lost,
        worst_latency_ms: stream.worst.as_secs_f64() * 1e3,
        published_after_kill,
    }
}

/// What the naive client printed after the kill.
fn naive_row(naive: &ClientProcess, killed_at: SystemTime) -> NaiveRow {
    let lines = naive.process.output().lines();
    let after: Vec<_> = lines.iter().filter(|l| l.received >= killed_at).collect();
    let count = |pred: &dyn Fn(&str) -> bool| after.iter().filter(|l| pred(&l.text)).count();
    NaiveRow {
        replies_after_kill: count(&|t| t.starts_with("reply ")),
        failures_after_kill: count(&|t| t.contains("dial tcp") || t.contains("buffer error")),
        not_found_after_kill: count(&|t| t.contains("not found")),
    }
}

/// When a source first published a view without the killed instance, and its request count
/// then.
fn dropped_at(seen: &std::sync::Mutex<Seen>) -> Option<(SystemTime, u64)> {
    let seen = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    seen.after_kill
        .iter()
        .find(|(_, listed, _)| !listed)
        .map(|(t, _, n)| (*t, *n))
}

async fn watch_source(
    mut rx: watch::Receiver<Snapshot>,
    counter: Counter,
    dead: String,
    killed: Arc<std::sync::OnceLock<SystemTime>>,
    seen: Arc<std::sync::Mutex<Seen>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
        let now = SystemTime::now();
        if killed.get().is_none_or(|k| now < *k) {
            continue;
        }
        let (listed, requests) = {
            let snapshot = rx.borrow();
            let listed = snapshot.instances.iter().any(|i| i.address() == dead);
            (listed, counter.requests(&snapshot))
        };
        seen.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .after_kill
            .push((now, listed, requests));
    }
}

async fn stream_messages(
    echo: EchoClient,
    label: &'static str,
    every: Duration,
    killed: Arc<std::sync::OnceLock<SystemTime>>,
    stop: CancellationToken,
) -> Stream {
    let mut stream = Stream::default();
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        seq += 1;
        let payload = Bytes::from(format!("{label} message {seq}"));
        let after_kill = killed.get().is_some();
        let result = echo.send(payload.clone()).await;
        if after_kill {
            stream.sent += 1;
            match result {
                Ok(reply) if reply.bytes == payload => {
                    stream.answered += 1;
                    stream.worst = stream.worst.max(reply.latency);
                }
                Ok(reply) => {
                    tracing::error!(label, seq, got = ?reply.bytes, "a wrong reply");
                    stream.lost += 1;
                }
                Err(e) => {
                    tracing::error!(label, seq, "message lost: {e}");
                    stream.lost += 1;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => {}
        }
    }
    stream
}

// === the contract ===

impl OnItsOwn for SourcesConfig {
    type Outcome = SourcesReport;

    fn title(&self) -> String {
        "Sources: every way to discover, one SIGKILL".into()
    }

    /// Every source side by side, and the naive client, through the SIGKILL of one server;
    /// `progress` is told what happens on the long waits.
    async fn run_alone(&self, launcher: &Launcher, progress: &Progress) -> Result<SourcesReport> {
        if self.servers < 2 {
            return Err(Error::Setting(
                "the sources experiment needs at least 2 servers (one is killed)".into(),
            ));
        }
        let consul = Consul::start_with(ConsulOptions::from_env()?).await?;
        let client = consul.client();
        progress.say(format!(
            "Consul {} up; starting {} echo servers",
            consul.version(),
            self.servers
        ));
        let mut servers = start_servers(launcher, &consul, self).await?;
        crate::discovery::create_query(&client, QUERY, SERVICE, &[]).await?;
        let watch = Watch {
            dead: servers[0].spec.echo_addr().to_string(),
            killed: Arc::new(std::sync::OnceLock::new()),
            stop: CancellationToken::new(),
        };
        let mut running = Vec::new();
        for source in every_source(&consul, self.poll.0) {
            running.push(start_source(&consul, self, source, &watch).await?);
        }
        // Every source lists every server before the kill.
        all_listed(&running, self.servers).await?;
        let naive = start_naive(launcher, &consul).await?;
        // Let every session send for a moment before the kill.
        tokio::time::sleep(Duration::from_secs(2)).await;

        let requests_before: Vec<u64> = running
            .iter()
            .map(|r| r.counter.requests(&r.rx.borrow()))
            .collect();
        progress.say(format!(
            "SIGKILL to {} ({}); watching every source for up to {}",
            servers[0].spec.args.id, watch.dead, self.horizon
        ));
        let killed_at = servers[0].process.kill().await?;
        let _ = watch.killed.set(killed_at);
        let critical = when_critical(&client, &servers[0].spec.args.id);
        until_all_dropped(&running, killed_at, self.horizon.0, progress).await;
        let watched = killed_at.elapsed().unwrap_or_default();
        watch.stop.cancel();
        let critical_after = critical
            .await
            .ok()
            .flatten()
            .and_then(|at| at.duration_since(killed_at).ok())
            .map(|d| d.as_secs_f64());

        let mut rows = Vec::new();
        for (r, before) in running.into_iter().zip(requests_before) {
            rows.push(source_row(r, before, killed_at, watched).await);
        }
        Ok(SourcesReport {
            consul_version: consul.version().to_owned(),
            config: self.clone(),
            killed_at: crate::report::rfc3339(killed_at),
            critical_after,
            rows,
            naive: naive_row(&naive, killed_at),
        })
    }
}

impl Findings for SourcesReport {
    fn consul(&self) -> Option<String> {
        Some(self.consul_version.clone())
    }

    fn tables(&self) -> Vec<Table> {
        let c = &self.config;
        let mut t = Table::new([
            "source",
            "reads",
            "stopped handing it out after",
            "requests until then",
            "requests/s",
            "session: sent / answered / lost",
            "slowest reply",
        ])
        .align_right([3, 4, 6]);
        for r in &self.rows {
            t.push([
                r.source.clone(),
                r.reads.to_string(),
                r.dropped_after
                    .map_or(format!("not within {}", c.horizon), |s| format!("{s:.2} s")),
                r.requests_until_dropped.to_string(),
                format!("{:.2}", r.requests_per_second),
                format!("{} / {} / {}", r.sent, r.answered, r.lost),
                format!("{:.1} ms", r.worst_latency_ms),
            ]);
        }
        vec![t]
    }

    fn details(&self) -> String {
        let c = &self.config;
        let n = &self.naive;
        format!(
            "Consul {}, one agent; {} echo servers checked every {} (timeout {}), \
             `DeregisterCriticalServiceAfter` {}; the polled sources read every {}; each source \
             feeds its own resilient session sending one message every {}. The first server was \
             killed at {}; its check turned critical {}.\n\n\
             The naive client (one service ID from the agent's list, no failover) after the kill: \
             {} replies, {} failed dials or writes, {} \"not found\".\n",
            self.consul_version,
            c.servers,
            c.interval,
            c.timeout,
            c.deregister_after,
            c.poll,
            c.message_interval,
            self.killed_at,
            self.critical_after
                .map_or("(not seen)".into(), |s| format!("{s:.2} s after the kill")),
            n.replies_after_kill,
            n.failures_after_kill,
            n.not_found_after_kill
        )
    }

    fn violations(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| r.lost > 0)
            .map(|r| format!("{}: {} message(s) lost", r.source, r.lost))
            .collect()
    }

    fn plot(&self) -> Option<Plot> {
        Some(self.views_plot())
    }
}

impl SourcesReport {
    /// Each source's view after the kill against Consul's events: a lane per source, a bar
    /// while it still listed the killed instance, a dot per view it published.
    pub fn views_plot(&self) -> Plot {
        let horizon = self.config.horizon.0.as_secs_f64();
        let lanes = self.rows.len() as f64;
        let mut series = Vec::new();
        for (i, r) in self.rows.iter().enumerate() {
            let y = i as f64;
            let color = PALETTE[i % PALETTE.len()];
            series.push(Series {
                label: if i == 0 {
                    "still lists the killed instance".into()
                } else {
                    String::new()
                },
                color,
                mark: Mark::Boxes(vec![(
                    (0.0, y - 0.12),
                    (r.dropped_after.unwrap_or(horizon), y + 0.12),
                )]),
            });
            series.push(Series {
                label: if i == 0 {
                    "a view published".into()
                } else {
                    String::new()
                },
                color,
                mark: Mark::Dots(r.published_after_kill.iter().map(|&t| (t, y)).collect()),
            });
        }
        if let Some(critical) = self.critical_after {
            series.push(Series {
                label: format!("Consul: check critical ({critical:.1} s)"),
                color: PALETTE[4],
                mark: Mark::Segments(vec![((critical, -0.5), (critical, lanes - 0.5))]),
            });
        }
        Plot {
            title: format!(
                "Consul {}: what each source hands out after a SIGKILL",
                self.consul_version
            ),
            x: Axis::linear("seconds after the kill").range(0.0, horizon),
            y: Axis::categories(
                "source",
                self.rows.iter().map(|r| r.source.clone()).collect(),
            ),
            series,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(source: &str, dropped_after: Option<f64>, lost: u64) -> SourceRow {
        SourceRow {
            source: source.into(),
            reads: "test".into(),
            dropped_after,
            requests_until_dropped: 3,
            requests_per_second: 1.5,
            sent: 10,
            answered: 10 - lost,
            lost,
            worst_latency_ms: 12.0,
            published_after_kill: vec![0.5, 4.0],
        }
    }

    #[test]
    fn the_report_has_a_row_per_source_its_losses_and_a_lane_per_source() {
        let report = SourcesReport {
            consul_version: "1.8.7".into(),
            config: SourcesConfig::default(),
            killed_at: "2026-12-06T00:00:00Z".into(),
            critical_after: Some(3.2),
            rows: vec![row("health", Some(4.0), 0), row("catalog", None, 1)],
            naive: NaiveRow {
                replies_after_kill: 0,
                failures_after_kill: 5,
                not_found_after_kill: 2,
            },
        };
        let md = report.tables()[0].markdown();
        assert!(
            md.contains("| health | test | 4.00 s | 3 | 1.50 | 10 / 10 / 0 | 12.0 ms |"),
            "{md}"
        );
        assert!(md.contains("| catalog | test | not within 1m50s |"), "{md}");
        assert_eq!(report.violations(), ["catalog: 1 message(s) lost"]);
        let dir = std::env::temp_dir().join(format!("testbed-sources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sources.svg");
        report.views_plot().svg(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("catalog") && svg.contains("check critical (3.2 s)"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
