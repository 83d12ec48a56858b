//! `testbed config`: live configuration from one Consul KV key, at scale, beside pollers.
//!
//! Per cell (10, 100, 500 echo-server processes, each `--config-key` on one key of one
//! agent): a few changes, one every `--every`; each instance's own "live settings in force"
//! log line says when it applied each one (its timestamp, the system clock the change was
//! put by: one clock), so a change's latency to an instance is that line's time minus the
//! moment its PUT began. Beside it, in the same run and on the same agent, the same number of
//! pollers in this process, Spring Cloud Consul's model: a read with a short blocking wait
//! (`--poll-wait`), one every 1 s and one every 15 s; their latency is the first read that
//! returns the change. Consul's CPU per change is its CPU rate over the phase (cgroup or
//! process, from the harness) above its idle rate, times the time between changes.
//!
//! Then, per cell: a bad value (0 instances may apply it, every one must report it); a value
//! of 512 KiB (Consul's `kv_max_value_size`, every instance applies it) and one byte more
//! (refused before the request). On the smallest cell: Consul paused (`docker pause`, or
//! SIGSTOP) then a change, and Consul restarted (a dev agent's KV is gone: every instance
//! reports the key missing) then the key put again. Last, on an agent with ACLs: instances
//! whose token cannot read the key report it and apply nothing.
//!
//! A second experiment runs one cell on a real cluster (one server, client agents; gossip and
//! Raft at production timings, not `-dev`'s): the instances and pollers spread over the client
//! agents, each instance on its agent's address and talking to it, the changes put through
//! the server; the same changes, latencies and bad value, the server's and the client agents'
//! CPU apart.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use consul_api::{AclPolicy, AclPolicyLink, AclToken, GoDuration, QueryOptions};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    Cluster, ClusterSpec, Consul, ConsulOptions,
    error::{Error, Result},
    experiment::{Env, Experiment, Findings, Needs, Plan, Suite, chosen},
    logbuf::LogLine,
    procs::{Launcher, ServerProcess, ServerSpec},
    progress::Progress,
    report::{Axis, Mark, PALETTE, Plot, Series, Table, ms_between, percentile},
};

/// The key every instance watches.
const KEY: &str = "testbed/echo-live";
/// The children's log filter, also sent in every change: `log_level` is live too.
const LOG_LEVEL: &str = "warn,echo_server=info,consul_registry=info";
/// What an instance logs once a configuration is in force.
const APPLIED: &str = "live settings in force";
/// What it logs when it refuses one.
const REJECTED: &str = "configuration change REJECTED";
/// Consul's cap on HTTP connections per client IP for this experiment's agent (every
/// process here reaches it from 127.0.0.1; Consul's default is 200).
pub const MAX_CONNS_PER_CLIENT: u32 = 4096;
/// How long any one wait may take.
const DEADLINE: Duration = Duration::from_secs(60);

// === the contract ===

/// `testbed config`: instance counts, changes and their pace.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Instance counts, one cell each (echo-server processes on one agent).
    #[arg(long, value_delimiter = ',')]
    instances: Vec<usize>,
    /// Changes per mode and cell.
    #[arg(long, default_value_t = 5)]
    changes: u32,
    /// One change every this long (a Go duration).
    #[arg(long, default_value = "2s")]
    every: GoDuration,
    /// The pollers' blocking wait per read (a Go duration).
    #[arg(long, default_value = "1s")]
    poll_wait: GoDuration,
    /// The pollers' periods (Go durations), each a mode beside the watchers.
    #[arg(long, value_delimiter = ',', default_value = "1s,15s")]
    poll_every: Vec<GoDuration>,
    /// How long Consul's idle CPU is read before each cell (a Go duration).
    #[arg(long, default_value = "5s")]
    idle: GoDuration,
    /// The smallest grid: 10 instances, 3 changes (the cluster cell too).
    #[arg(long)]
    quick: bool,
    /// Instances on the cluster's client agents, spread over them (0: no cluster cell).
    #[arg(long, default_value_t = 10)]
    cluster_instances: usize,
    /// The cluster's client agents (beside one server).
    #[arg(long, default_value_t = 2)]
    cluster_clients: usize,
    /// The pollers' periods on the cluster (Go durations; a poller's latency is bounded by
    /// its period there as on one agent, so 15 s is left to the one-agent cells by default).
    #[arg(long, value_delimiter = ',', default_value = "1s")]
    cluster_poll_every: Vec<GoDuration>,
}

impl Suite for Args {
    fn name(&self) -> &'static str {
        "config"
    }

    fn title(&self) -> String {
        "Live configuration from Consul KV: instances watching one key, beside pollers".into()
    }

    fn plans(&self) -> Result<Vec<Box<dyn Plan>>> {
        let all = if self.quick {
            vec![10]
        } else {
            vec![10, 100, 500]
        };
        let instances = chosen(&self.instances, &all);
        if instances.contains(&0) || self.changes == 0 {
            return Err(Error::Setting(
                "--instances and --changes must be at least 1".into(),
            ));
        }
        if self.every.as_duration().is_zero()
            || self
                .poll_every
                .iter()
                .chain(&self.cluster_poll_every)
                .any(|d| d.as_duration().is_zero())
        {
            return Err(Error::Setting(
                "--every, --poll-every and --cluster-poll-every must be above 0".into(),
            ));
        }
        if self.cluster_instances > 0 && self.cluster_clients == 0 {
            return Err(Error::Setting(
                "--cluster-clients must be at least 1 (or --cluster-instances 0)".into(),
            ));
        }
        let one_agent = ConfigExperiment {
            instances,
            changes: if self.quick { 3 } else { self.changes },
            every: self.every.as_duration(),
            poll_wait: self.poll_wait.as_duration(),
            poll_every: self.poll_every.iter().map(|d| d.as_duration()).collect(),
            idle: self.idle.as_duration(),
            faults: true,
            on: On::Agent,
        };
        let mut plans: Vec<Box<dyn Plan>> = Vec::new();
        if self.cluster_instances > 0 {
            plans.push(Box::new(ConfigExperiment {
                instances: vec![self.cluster_instances],
                poll_every: self
                    .cluster_poll_every
                    .iter()
                    .map(|d| d.as_duration())
                    .collect(),
                faults: false,
                on: On::Cluster {
                    servers: 1,
                    clients: self.cluster_clients,
                },
                ..one_agent.clone()
            }));
        }
        plans.insert(0, Box::new(one_agent));
        Ok(plans)
    }
}

/// One run: every cell on one agent, then the ACL case on an agent of its own; or every cell
/// on a cluster's client agents.
#[derive(Debug, Clone)]
pub struct ConfigExperiment {
    /// Instance counts, one cell each.
    pub instances: Vec<usize>,
    /// Changes per mode and cell.
    pub changes: u32,
    /// Time between changes.
    pub every: Duration,
    /// The pollers' blocking wait.
    pub poll_wait: Duration,
    /// The pollers' periods, a mode each.
    pub poll_every: Vec<Duration>,
    /// How long Consul's idle CPU is read before each cell.
    pub idle: Duration,
    /// Consul paused and restarted (smallest cell), and the ACL case (one agent only).
    pub faults: bool,
    /// Where the instances run.
    pub on: On,
}

/// Where a [`ConfigExperiment`]'s instances run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// One dev agent: every instance and poller talks to it, changes are put through it.
    Agent,
    /// A cluster (production timings, not `-dev`): instances and pollers spread round robin
    /// over its client agents, each instance on its agent's address; changes are put through
    /// the first server.
    Cluster {
        /// Servers.
        servers: usize,
        /// Client agents.
        clients: usize,
    },
}

impl Experiment for ConfigExperiment {
    type Outcome = ConfigReport;

    fn title(&self) -> String {
        let instances = self
            .instances
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let on = match self.on {
            On::Agent => "watching one key".to_owned(),
            On::Cluster { servers, clients } => format!(
                "on the {clients} client agents of a {servers}-server cluster watching one key"
            ),
        };
        format!(
            "{instances} instances {on}, a change every {}",
            GoDuration(self.every)
        )
    }

    fn needs(&self) -> Result<Needs> {
        Ok(match self.on {
            On::Agent => Needs::Agent(options()?),
            // It starts its cluster itself: every member with the raised connection cap.
            On::Cluster { .. } => Needs::Nothing,
        })
    }

    async fn run_on(
        &self,
        launcher: &Launcher,
        env: &mut Env,
        progress: &Progress,
    ) -> Result<ConfigReport> {
        crate::process::raise_fd_limit();
        let mut cells = Vec::new();
        let mut acl = None;
        let mut cluster = None;
        let mut consul = None;
        match self.on {
            On::Agent => {
                let consul = env.agent()?;
                let smallest = self.instances.first().copied();
                for &n in &self.instances {
                    let mut next = Values(1000 + 1000 * n as u32);
                    let (mut cell, servers) = self
                        .cell(launcher, &Site::agent(consul), n, &mut next, progress)
                        .await?;
                    if self.faults && Some(n) == smallest {
                        cell.outage =
                            Some(self.outage(consul, &servers, &mut next, progress).await?);
                    }
                    progress.say(format!("{n} instances: stopping the echo-servers"));
                    stop_all(servers).await;
                    cells.push(cell);
                }
                if self.faults {
                    acl = Some(acl_case(launcher, progress).await?);
                }
            }
            On::Cluster { servers, clients } => {
                progress.say(format!(
                    "starting {servers} server(s) and {clients} client agents, waiting for a \
                     leader and every member alive (at most {}s)",
                    DEADLINE.as_secs()
                ));
                let spec = ClusterSpec {
                    startup_timeout: DEADLINE,
                    ..ClusterSpec::new(servers, clients)
                };
                let started = Cluster::start_with(options()?, spec).await?;
                consul = started
                    .servers()
                    .first()
                    .map(|s| format!("{} ({})", s.version(), s.backend().name()));
                let site = Site::cluster(&started)?;
                for &n in &self.instances {
                    let mut next = Values(1000 + 1000 * n as u32);
                    let (mut cell, processes) =
                        self.cell(launcher, &site, n, &mut next, progress).await?;
                    progress.say(format!("{n} instances: stopping the echo-servers"));
                    stop_all(processes).await;
                    // A fresh cluster's first seconds (joins, first syncs) are busier than
                    // its idle: the idle that counts is read once the cell is over.
                    progress.say(format!(
                        "{n} instances: the settled cluster's idle CPU, {}",
                        GoDuration(self.idle)
                    ));
                    let (idle, by_role) = site.rates(site.cpu_over(self.idle).await?);
                    cell.idle_cpu_ms_per_s = idle;
                    cell.idle_by_role = by_role;
                    for m in &mut cell.modes {
                        m.cpu_ms_per_change = (m.cpu_ms_per_s - idle) * self.every.as_secs_f64();
                    }
                    cells.push(cell);
                }
                cluster = Some(ClusterShape { servers, clients });
            }
        }
        Ok(ConfigReport {
            every_s: self.every.as_secs_f64(),
            changes: self.changes,
            poll_wait_s: self.poll_wait.as_secs_f64(),
            max_conns_per_client: MAX_CONNS_PER_CLIENT,
            cluster,
            consul,
            cells,
            acl,
        })
    }
}

// === what it measures ===

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    /// Seconds between changes.
    pub every_s: f64,
    /// Changes per mode and cell.
    pub changes: u32,
    /// The pollers' blocking wait, seconds.
    pub poll_wait_s: f64,
    /// Every agent's `http_max_conns_per_client`.
    pub max_conns_per_client: u32,
    /// The cluster the instances ran on (`None`: one dev agent).
    pub cluster: Option<ClusterShape>,
    /// `1.8.7 (docker)` of the cluster's server (one agent: the runner knows it).
    #[serde(skip)]
    pub consul: Option<String>,
    /// One per instance count.
    pub cells: Vec<Cell>,
    /// Instances whose token cannot read the key.
    pub acl: Option<AclCase>,
}

/// A cluster's shape.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ClusterShape {
    /// Servers.
    pub servers: usize,
    /// Client agents, where the instances and pollers ran.
    pub clients: usize,
}

/// CPU rates of a cluster's servers and client agents apart, milliseconds per second.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ByRole {
    /// The servers', summed.
    pub servers_ms_per_s: f64,
    /// The client agents', summed.
    pub clients_ms_per_s: f64,
}

/// One instance count.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Instances (and pollers of each kind).
    pub instances: usize,
    /// The agents' idle CPU (all of them), milliseconds per second, read before the cell.
    pub idle_cpu_ms_per_s: f64,
    /// The same by role, on a cluster.
    pub idle_by_role: Option<ByRole>,
    /// The watchers, the 1 s pollers, the 15 s pollers.
    pub modes: Vec<Mode>,
    /// The bad value.
    pub bad: BadValue,
    /// A 512 KiB value, to every instance.
    pub big: Spread,
    /// What the client said of a value one byte over the limit.
    pub oversized: String,
    /// Consul paused, then restarted (smallest cell only).
    pub outage: Option<Outage>,
}

/// One way of following the key: its latencies and Consul's CPU.
#[derive(Debug, Clone, Serialize)]
pub struct Mode {
    /// `watch (echo-server --config-key)`, `poll every 1s`, ...
    pub mode: String,
    /// Changes seen, summed over the instances.
    pub seen: usize,
    /// Changes that should have been seen (instances × changes).
    pub expected: usize,
    /// Every sighting's latency, milliseconds, sorted.
    pub latencies_ms: Vec<f64>,
    /// Their median, 99th percentile and largest.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Consul's CPU over the phase (every agent), milliseconds per second.
    pub cpu_ms_per_s: f64,
    /// The same by role, on a cluster.
    pub cpu_by_role: Option<ByRole>,
    /// Consul's CPU per change above its idle rate: (rate − idle) × time between changes.
    pub cpu_ms_per_change: f64,
}

/// A value that fails the instances' validation.
#[derive(Debug, Clone, Serialize)]
pub struct BadValue {
    /// Its index.
    pub index: u64,
    /// Instances that logged its rejection.
    pub reported: usize,
    /// Instances that applied it (must be 0).
    pub applied: usize,
}

/// One change's spread to every instance.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    /// The value's size, bytes.
    pub bytes: usize,
    /// Instances that applied it.
    pub applied: usize,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// Consul paused, and restarted.
#[derive(Debug, Clone, Serialize)]
pub struct Outage {
    /// How long it was paused, seconds.
    pub paused_s: f64,
    /// A change put right after the pause: its spread.
    pub after_pause: Spread,
    /// Instances that reported the key missing once the restarted agent (no KV) answered.
    pub missing_reported: usize,
    /// The key put again on the restarted agent: its spread.
    pub after_restart: Spread,
}

/// Instances whose token may not read the key.
#[derive(Debug, Clone, Serialize)]
pub struct AclCase {
    /// Instances started.
    pub instances: usize,
    /// Instances that reported the refusal.
    pub reported: usize,
    /// Instances that applied a configuration (must be 0).
    pub applied: usize,
    /// What the first one said.
    pub message: String,
}

/// Every agent's options: the environment's, with the connection cap raised.
fn options() -> Result<ConsulOptions> {
    Ok(ConsulOptions::from_env()?.with_http_max_conns_per_client(MAX_CONNS_PER_CLIENT))
}

// === the cell ===

impl ConfigExperiment {
    /// One cell on `site`, from the first value to the oversized one; its instances still
    /// running (the caller may go on with them, then stops them).
    async fn cell(
        &self,
        launcher: &Launcher,
        site: &Site<'_>,
        n: usize,
        next: &mut Values,
        progress: &Progress,
    ) -> Result<(Cell, Vec<ServerProcess>)> {
        let client = site.writer.client();
        client.kv().put(KEY, &next.value()).await?;
        progress.say(format!(
            "{n} instances: Consul's idle CPU, {}",
            GoDuration(self.idle)
        ));
        let idle = site.rates(site.cpu_over(self.idle).await?);

        let mut modes = Vec::new();
        for &period in &self.poll_every {
            progress.say(format!(
                "{n} instances: {n} pollers every {}",
                GoDuration(period)
            ));
            modes.push(self.pollers(site, n, period, next, idle.0).await?);
        }

        progress.say(format!("{n} instances: starting {n} echo-servers"));
        let servers = start_servers(launcher, site, n, progress).await?;
        let watch = self
            .watchers(site, &servers, next, idle.0, progress)
            .await?;
        modes.insert(0, watch);

        progress.say(format!("{n} instances: a bad value"));
        let bad = bad_value(site.writer, &servers).await?;
        progress.say(format!("{n} instances: a 512 KiB value"));
        let big_value = next.padded(consul_api::kv::MAX_VALUE_BYTES);
        let big = spread(site.writer, &servers, &big_value, &next.needle()).await?;
        next.0 += 1;
        let over = next.padded(consul_api::kv::MAX_VALUE_BYTES + 1);
        let oversized = match client.kv().put(KEY, &over).await {
            Ok(()) => "accepted (expected a refusal)".to_owned(),
            Err(e) => e.to_string(),
        };
        let cell = Cell {
            instances: n,
            idle_cpu_ms_per_s: idle.0,
            idle_by_role: idle.1,
            modes,
            bad,
            big,
            oversized,
            outage: None,
        };
        Ok((cell, servers))
    }

    /// `n` pollers every `period` while `changes` changes are put.
    async fn pollers(
        &self,
        site: &Site<'_>,
        n: usize,
        period: Duration,
        next: &mut Values,
        idle: f64,
    ) -> Result<Mode> {
        let stop = CancellationToken::new();
        let seen: Vec<Sightings> = (0..n).map(|_| Sightings::default()).collect();
        let mut tasks = Vec::new();
        for (i, seen) in seen.iter().enumerate() {
            let client = consul_api::Client::new(site.reader(i).config())?;
            let (seen, stop, wait) = (seen.clone(), stop.clone(), self.poll_wait);
            // Spread over the period, as independent services would be.
            let offset = period.mul_f64(i as f64 / n as f64);
            tasks.push(tokio::spawn(async move {
                poll(client, period, wait, offset, seen, stop).await
            }));
        }
        // Every poller has read the key once.
        let deadline = tokio::time::Instant::now() + period + DEADLINE;
        while seen.iter().any(|s| s.lock().map_or(true, |s| s.is_empty())) {
            if tokio::time::Instant::now() > deadline {
                stop.cancel();
                return Err(Error::Timeout {
                    what: "every poller's first read".into(),
                    timeout: period + DEADLINE,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let changes = self.put_changes(site, next).await?;
        // Wait a whole period after the last change: the slowest poller reads it by then.
        let last = changes.last().map(|c| c.index).unwrap_or_default();
        let deadline = tokio::time::Instant::now() + period + self.poll_wait + DEADLINE;
        while tokio::time::Instant::now() < deadline
            && !seen.iter().all(|s| {
                s.lock()
                    .is_ok_and(|s| s.iter().any(|(index, _)| *index >= last))
            })
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (cpu_end, window_end) = (site.cpu().await?, SystemTime::now());
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        let mut latencies = Vec::new();
        for s in &seen {
            let s = s.lock().map(|s| s.clone()).unwrap_or_default();
            for change in &changes {
                if let Some((_, at)) = s.iter().find(|(index, _)| *index >= change.index) {
                    latencies.push(ms_between(change.at, *at));
                }
            }
        }
        let (cpu, window) = spent(&changes, cpu_end, window_end);
        Ok(self.mode(
            site,
            format!(
                "poll every {} (wait {})",
                GoDuration(period),
                GoDuration(self.poll_wait)
            ),
            latencies,
            n * changes.len(),
            cpu,
            window,
            idle,
        ))
    }

    /// The echo-servers while `changes` changes are put.
    async fn watchers(
        &self,
        site: &Site<'_>,
        servers: &[ServerProcess],
        next: &mut Values,
        idle: f64,
        progress: &Progress,
    ) -> Result<Mode> {
        let marks: Vec<usize> = servers.iter().map(|s| s.process.output().mark()).collect();
        let changes = self.put_changes(site, next).await?;
        let mut latencies = Vec::new();
        for change in &changes {
            let lines = wait_all(servers, &marks, &change.needle, DEADLINE, progress).await;
            latencies.extend(
                lines
                    .iter()
                    .flatten()
                    .map(|l| ms_between(change.at, line_time(l))),
            );
        }
        let (cpu_end, window_end) = (site.cpu().await?, SystemTime::now());
        let (cpu, window) = spent(&changes, cpu_end, window_end);
        Ok(self.mode(
            site,
            "watch (echo-server --config-key)".into(),
            latencies,
            servers.len() * changes.len(),
            cpu,
            window,
            idle,
        ))
    }

    /// Put `changes` values, one every `every`; the CPU reading before the first.
    async fn put_changes(&self, site: &Site<'_>, next: &mut Values) -> Result<Vec<Change>> {
        let client = site.writer.client();
        let cpu_from = (site.cpu().await?, SystemTime::now());
        let mut changes = Vec::new();
        let mut tick = tokio::time::interval(self.every);
        for _ in 0..self.changes {
            tick.tick().await;
            next.0 += 1;
            let at = SystemTime::now();
            client.kv().put(KEY, &next.value()).await?;
            let index = key_index(&client).await?;
            changes.push(Change {
                at,
                index,
                needle: next.needle(),
                cpu_from,
            });
        }
        // The last change has its interval too.
        tick.tick().await;
        Ok(changes)
    }

    #[allow(clippy::too_many_arguments)]
    fn mode(
        &self,
        site: &Site<'_>,
        mode: String,
        mut latencies: Vec<f64>,
        expected: usize,
        cpu: Cpu,
        window: Duration,
        idle: f64,
    ) -> Mode {
        latencies.sort_by(f64::total_cmp);
        let (rate, cpu_by_role) = site.rates((cpu, window));
        Mode {
            mode,
            seen: latencies.len(),
            expected,
            p50_ms: percentile(&latencies, 50.0).unwrap_or(f64::NAN),
            p99_ms: percentile(&latencies, 99.0).unwrap_or(f64::NAN),
            max_ms: latencies.last().copied().unwrap_or(f64::NAN),
            latencies_ms: latencies,
            cpu_ms_per_s: rate,
            cpu_by_role,
            cpu_ms_per_change: (rate - idle) * self.every.as_secs_f64(),
        }
    }

    /// Consul paused then a change; Consul restarted (its KV gone) then the key put again.
    async fn outage(
        &self,
        consul: &mut Consul,
        servers: &[ServerProcess],
        next: &mut Values,
        progress: &Progress,
    ) -> Result<Outage> {
        let paused = Duration::from_secs(5);
        progress.say(format!("Consul paused for {paused:?}"));
        consul.pause().await?;
        tokio::time::sleep(paused).await;
        consul.resume().await?;
        next.0 += 1;
        let after_pause = spread(consul, servers, &next.value(), &next.needle()).await?;

        progress.say("Consul restarted (a dev agent: its KV is gone)");
        let marks: Vec<usize> = servers.iter().map(|s| s.process.output().mark()).collect();
        consul.restart().await?;
        let missing = wait_all(servers, &marks, "key missing", DEADLINE, progress).await;
        next.0 += 1;
        let after_restart = spread(consul, servers, &next.value(), &next.needle()).await?;
        Ok(Outage {
            paused_s: paused.as_secs_f64(),
            after_pause,
            missing_reported: missing.iter().flatten().count(),
            after_restart,
        })
    }
}

/// The values put, each one unique by its `max_connections`.
struct Values(u32);

impl Values {
    fn value(&self) -> Vec<u8> {
        format!(
            r#"{{"max_connections": {}, "log_level": "{LOG_LEVEL}"}}"#,
            self.0
        )
        .into_bytes()
    }

    /// The value padded with spaces (still JSON) to `bytes`.
    fn padded(&self, bytes: usize) -> Vec<u8> {
        let mut value = self.value();
        value.resize(bytes.max(value.len()), b' ');
        value
    }

    /// What an instance's log line says once it applied this value.
    fn needle(&self) -> String {
        format!("max_connections={} ", self.0)
    }
}

/// Consul's CPU and the wall time from before the first of `changes` to `cpu_end`/`window_end`.
fn spent(changes: &[Change], cpu_end: Cpu, window_end: SystemTime) -> (Cpu, Duration) {
    let window = window_end
        .duration_since(changes.first().map_or(window_end, |c| c.cpu_from.1))
        .unwrap_or_default();
    let cpu = cpu_end.since(changes.first().map_or(cpu_end, |c| c.cpu_from.0));
    (cpu, window)
}

/// One change put.
struct Change {
    /// When its PUT began.
    at: SystemTime,
    /// The key's index after it.
    index: u64,
    /// What an instance logs once it applied it.
    needle: String,
    /// Consul's CPU and the time before the first change of its phase.
    cpu_from: (Cpu, SystemTime),
}

/// What a poller saw: each new index and when.
type Sightings = Arc<Mutex<Vec<(u64, SystemTime)>>>;

/// One poller: after `offset`, every `period` a read of the key blocking at most `wait`.
async fn poll(
    client: consul_api::Client,
    period: Duration,
    wait: Duration,
    offset: Duration,
    seen: Sightings,
    stop: CancellationToken,
) {
    tokio::select! {
        () = tokio::time::sleep(offset) => {}
        () = stop.cancelled() => return,
    }
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = 0;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        let opts = QueryOptions {
            wait_index: last,
            wait_time: Some(wait),
            ..Default::default()
        };
        let kv = client.kv();
        let read = tokio::select! {
            read = kv.get(KEY, &opts) => read,
            () = stop.cancelled() => return,
        };
        if let Ok((Some(pair), _)) = read
            && pair.modify_index != last
        {
            last = pair.modify_index;
            if let Ok(mut seen) = seen.lock() {
                seen.push((last, SystemTime::now()));
            }
        }
    }
}

/// The key's modify index now.
async fn key_index(client: &consul_api::Client) -> Result<u64> {
    let (pair, meta) = client.kv().get(KEY, &QueryOptions::default()).await?;
    Ok(pair.map_or(meta.last_index, |p| p.modify_index))
}

/// Where a cell runs: the agent changes are put through, the agents instances and pollers
/// talk to (round robin), and the agents whose CPU is read, by role.
struct Site<'a> {
    /// Changes are put (and their index read) through it.
    writer: &'a Consul,
    /// Instance and poller `i` talk to `readers[i % len]` (never empty).
    readers: Vec<&'a Consul>,
    /// Each instance binds its reader's address (a cluster node's), else one of its own.
    on_nodes: bool,
    /// The servers (one agent: it).
    servers: Vec<&'a Consul>,
    /// The client agents (one agent: none; then no split by role is reported).
    clients: Vec<&'a Consul>,
}

impl<'a> Site<'a> {
    fn agent(agent: &'a Consul) -> Site<'a> {
        Site {
            writer: agent,
            readers: vec![agent],
            on_nodes: false,
            servers: vec![agent],
            clients: Vec::new(),
        }
    }

    fn cluster(cluster: &'a Cluster) -> Result<Site<'a>> {
        let writer = cluster
            .servers()
            .first()
            .ok_or_else(|| Error::Setting("the cluster has no server".into()))?;
        let clients: Vec<&Consul> = cluster.clients().iter().collect();
        if clients.is_empty() {
            return Err(Error::Setting("the cluster has no client agent".into()));
        }
        Ok(Site {
            writer,
            readers: clients.clone(),
            on_nodes: true,
            servers: cluster.servers().iter().collect(),
            clients,
        })
    }

    /// The agent instance or poller `i` talks to.
    fn reader(&self, i: usize) -> &'a Consul {
        self.readers
            .get(i % self.readers.len().max(1))
            .copied()
            .unwrap_or(self.writer)
    }

    /// The CPU every agent has used so far, by role.
    async fn cpu(&self) -> Result<Cpu> {
        let mut cpu = Cpu::default();
        for s in &self.servers {
            cpu.servers += s.cpu_time().await?.0;
        }
        for c in &self.clients {
            cpu.clients += c.cpu_time().await?.0;
        }
        Ok(cpu)
    }

    /// The CPU used over `window` from now, and the window as it was.
    async fn cpu_over(&self, window: Duration) -> Result<(Cpu, Duration)> {
        let (before, at) = (self.cpu().await?, std::time::Instant::now());
        tokio::time::sleep(window).await;
        Ok((self.cpu().await?.since(before), at.elapsed()))
    }

    /// `used` over a window as rates, milliseconds per second: every agent's, and by role
    /// when there are client agents.
    fn rates(&self, (used, window): (Cpu, Duration)) -> (f64, Option<ByRole>) {
        let rate = |d: Duration| d.as_secs_f64() * 1e3 / window.as_secs_f64().max(1e-3);
        let by_role = (!self.clients.is_empty()).then(|| ByRole {
            servers_ms_per_s: rate(used.servers),
            clients_ms_per_s: rate(used.clients),
        });
        (rate(used.servers + used.clients), by_role)
    }
}

/// CPU time used by the servers and by the client agents.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    servers: Duration,
    clients: Duration,
}

impl Cpu {
    /// What was used since `before`.
    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            servers: self.servers.saturating_sub(before.servers),
            clients: self.clients.saturating_sub(before.clients),
        }
    }
}

/// When a child logged `line`: its own timestamp (the system clock), else when it came.
fn line_time(line: &LogLine) -> SystemTime {
    line.consul_time().unwrap_or(line.received)
}

/// `n` echo-servers watching [`KEY`], unregistered (the experiment is about the key), each
/// talking to its agent of `site` and on its own loopback address (on a cluster, its
/// agent's); returns once each has applied the key's value.
async fn start_servers(
    launcher: &Launcher,
    site: &Site<'_>,
    n: usize,
    progress: &Progress,
) -> Result<Vec<ServerProcess>> {
    let mut servers = Vec::with_capacity(n);
    for i in 0..n {
        let agent = site.reader(i);
        let mut spec = ServerSpec::seed(agent.config())?;
        if site.on_nodes {
            spec = spec.on_address(agent.spec().address)?;
        }
        let mut spec = spec.named("config-echo", format!("cfg-{i}"));
        spec.args.no_register = true;
        spec.args.config_key = Some(KEY.into());
        servers.push(ServerProcess::start(launcher, spec)?);
        if i % 25 == 0 {
            progress.count(i as u64, n as u64, "started", "starting echo-servers");
        }
    }
    // Hundreds of processes start on a couple of cores: time to start grows with them.
    let startup = DEADLINE + Duration::from_millis(200) * n as u32;
    let marks = vec![0; n];
    let lines = wait_all(&servers, &marks, APPLIED, startup, progress).await;
    let missing = lines.iter().filter(|l| l.is_none()).count();
    if let Some(at) = lines.iter().position(Option::is_none) {
        let said: Vec<String> = servers[at]
            .process
            .output()
            .lines()
            .iter()
            .rev()
            .take(3)
            .map(|l| l.text.clone())
            .collect();
        stop_all(servers).await;
        return Err(Error::Timeout {
            what: format!(
                "{missing} of {n} echo-servers to apply the key (cfg-{at} said last: {})",
                said.join(" | ")
            ),
            timeout: startup,
        });
    }
    Ok(servers)
}

/// Wait (at most `timeout`) until every server has logged `needle` after its mark; each
/// server's line, `None` where it never came.
async fn wait_all(
    servers: &[ServerProcess],
    marks: &[usize],
    needle: &str,
    timeout: Duration,
    progress: &Progress,
) -> Vec<Option<LogLine>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut found: Vec<Option<LogLine>> = vec![None; servers.len()];
    loop {
        for ((server, mark), slot) in servers.iter().zip(marks).zip(found.iter_mut()) {
            if slot.is_none() {
                *slot = server.process.output().find_after(*mark, needle);
            }
        }
        let done = found.iter().filter(|l| l.is_some()).count();
        if done == servers.len() || tokio::time::Instant::now() > deadline {
            return found;
        }
        progress.count(
            done as u64,
            servers.len() as u64,
            "instances",
            format!("waiting for {needle:?}"),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Put `value` and measure its spread: instances whose log line has `needle`.
async fn spread(
    consul: &Consul,
    servers: &[ServerProcess],
    value: &[u8],
    needle: &str,
) -> Result<Spread> {
    let marks: Vec<usize> = servers.iter().map(|s| s.process.output().mark()).collect();
    let at = SystemTime::now();
    consul.client().kv().put(KEY, value).await?;
    let lines = wait_all(servers, &marks, needle, DEADLINE, &Progress::hidden()).await;
    let mut ms: Vec<f64> = lines
        .iter()
        .flatten()
        .map(|l| ms_between(at, line_time(l)))
        .collect();
    ms.sort_by(f64::total_cmp);
    Ok(Spread {
        bytes: value.len(),
        applied: ms.len(),
        p50_ms: percentile(&ms, 50.0).unwrap_or(f64::NAN),
        p99_ms: percentile(&ms, 99.0).unwrap_or(f64::NAN),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
    })
}

/// A value the instances must refuse (`max_connections` 0): who reported it, who applied it.
async fn bad_value(consul: &Consul, servers: &[ServerProcess]) -> Result<BadValue> {
    let client = consul.client();
    let marks: Vec<usize> = servers.iter().map(|s| s.process.output().mark()).collect();
    client.kv().put(KEY, br#"{"max_connections": 0}"#).await?;
    let index = key_index(&client).await?;
    let reported = wait_all(
        servers,
        &marks,
        &format!("index={index} "),
        DEADLINE,
        &Progress::hidden(),
    )
    .await
    .iter()
    .flatten()
    .filter(|l| l.text.contains(REJECTED))
    .count();
    let applied = servers
        .iter()
        .zip(&marks)
        .filter(|(s, mark)| {
            s.process
                .output()
                .find_after(**mark, "max_connections=0 ")
                .is_some()
        })
        .count();
    Ok(BadValue {
        index,
        reported,
        applied,
    })
}

/// SIGTERM every server, then wait for each (at most a few seconds each, together).
async fn stop_all(servers: Vec<ServerProcess>) {
    for s in &servers {
        let _ = s.process.signal(crate::signal::Signal::SIGTERM);
    }
    let waits = servers.into_iter().map(|mut s| async move {
        if s.process.wait_exit(Duration::from_secs(10)).await.is_err() {
            let _ = s.process.kill().await;
        }
    });
    futures::future::join_all(waits).await;
}

/// Three instances with a token that may read only another prefix, on an agent with ACLs.
async fn acl_case(launcher: &Launcher, progress: &Progress) -> Result<AclCase> {
    progress.say("ACLs: an agent of its own, a token that cannot read the key");
    let root = "config-experiment-root";
    let consul = Consul::start_with(ConsulOptions::from_env()?.with_acl(root)).await?;
    let admin = consul.client();
    admin.kv().put(KEY, &Values(7).value()).await?;
    let policy = admin
        .acl()
        .policy_create(&AclPolicy {
            name: "other-prefix-reader".into(),
            rules: r#"key_prefix "other/" { policy = "read" }"#.into(),
            ..Default::default()
        })
        .await?;
    let token = admin
        .acl()
        .token_create(&AclToken {
            description: "cannot read the key".into(),
            policies: vec![AclPolicyLink {
                id: policy.id.clone(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?;
    let config = consul.config().with_token(Some(token.secret_id.clone()));
    let n = 3;
    let mut servers = Vec::new();
    for i in 0..n {
        let mut spec = ServerSpec::seed(config.clone())?.named("config-echo", format!("acl-{i}"));
        spec.args.no_register = true;
        spec.args.config_key = Some(KEY.into());
        servers.push(ServerProcess::start(launcher, spec)?);
    }
    let marks = vec![0; n];
    let lines = wait_all(&servers, &marks, "Consul unreachable", DEADLINE, progress).await;
    let reported = lines.iter().flatten().count();
    let message = lines
        .iter()
        .flatten()
        .next()
        .map(|l| l.text.clone())
        .unwrap_or_default();
    let applied = servers
        .iter()
        .filter(|s| s.process.output().find_after(0, APPLIED).is_some())
        .count();
    stop_all(servers).await;
    Ok(AclCase {
        instances: n,
        reported,
        applied,
        message,
    })
}

// === the report ===

impl ConfigReport {
    /// How it was measured, without the notes on figures below idle.
    fn details_text(&self) -> String {
        let acl = self
            .acl
            .as_ref()
            .map(|a| {
                format!(
                    "\n\nWhat an instance with that token logged: `{}`",
                    a.message
                )
            })
            .unwrap_or_default();
        if let Some(c) = &self.cluster {
            let idle = self
                .cells
                .iter()
                .filter_map(|cell| {
                    cell.idle_by_role.map(|r| {
                        format!(
                            "{} instances: server {:.1} ms/s, client agents {:.1} ms/s",
                            cell.instances, r.servers_ms_per_s, r.clients_ms_per_s
                        )
                    })
                })
                .collect::<Vec<_>>()
                .join("; ");
            return format!(
                "A cluster of {} server(s) and {} client agents (real gossip and Raft, not \
                 `-dev`; every agent `limits {{ http_max_conns_per_client = {} }}`). Each \
                 instance is an `echo-server --config-key {KEY} --no-register` process bound to \
                 its client agent's address and talking to that agent, the instances spread \
                 round robin over the client agents; the pollers (in the testbed process, \
                 blocking at most {} s per read, Spring Cloud Consul's model) likewise. Changes \
                 are put through the server. A change's latency to an instance is the \
                 timestamp of its own \"{APPLIED}\" log line minus the moment the change's PUT \
                 began (one clock). CPU is read from each agent's cgroup (or process), the \
                 server's and the client agents' apart; per change above idle = (the rate of \
                 every agent − their idle rate, read after the cell once the echo-servers \
                 stopped: a fresh cluster's first seconds are busier) × {} s between changes. Idle: \
                 {idle}. No plot: one cell; the one-agent experiment's plot has the curve.",
                c.servers, c.clients, self.max_conns_per_client, self.poll_wait_s, self.every_s
            );
        }
        format!(
            "Each instance is an `echo-server --config-key {KEY} --no-register` process, all on \
             one dev agent (`limits {{ http_max_conns_per_client = {} }}`: every process \
             reaches it from 127.0.0.1). A change's latency to an instance is the timestamp of \
             its own \"{APPLIED}\" log line minus the moment the change's PUT began (one clock). \
             The pollers run in the testbed process, one HTTP client each, spread over their \
             period: every 1 s or 15 s a read of the key blocking at most {} s on the last index \
             (Spring Cloud Consul's model); a change's latency is the first read that returns \
             it. Consul's CPU is read from its cgroup (or process) before the first change and \
             after the last was seen; per change above idle = (CPU rate − the agent's idle rate \
             before the cell) × {} s between changes.{acl}",
            self.max_conns_per_client, self.poll_wait_s, self.every_s
        )
    }
}

impl Findings for ConfigReport {
    fn tables(&self) -> Vec<Table> {
        let mut columns = vec![
            "instances",
            "mode",
            "seen",
            "p50 (ms)",
            "p99 (ms)",
            "max (ms)",
        ];
        if self.cluster.is_some() {
            columns.extend([
                "CPU, every agent (ms/s)",
                "server (ms/s)",
                "client agents (ms/s)",
                "CPU per change above idle, every agent (ms)",
            ]);
        } else {
            columns.extend(["Consul CPU (ms/s)", "Consul CPU per change above idle (ms)"]);
        }
        let right: Vec<usize> = (0..columns.len()).filter(|&i| i != 1).collect();
        let mut modes = Table::new(columns)
            .caption(format!(
                "A change reaches every instance: {} changes one every {} s, per mode",
                self.changes, self.every_s
            ))
            .align_right(right);
        for cell in &self.cells {
            for m in &cell.modes {
                let mut row = vec![
                    cell.instances.to_string(),
                    m.mode.clone(),
                    format!("{}/{}", m.seen, m.expected),
                    format!("{:.1}", m.p50_ms),
                    format!("{:.1}", m.p99_ms),
                    format!("{:.1}", m.max_ms),
                    format!("{:.1}", m.cpu_ms_per_s),
                ];
                if let Some(r) = &m.cpu_by_role {
                    row.push(format!("{:.1}", r.servers_ms_per_s));
                    row.push(format!("{:.1}", r.clients_ms_per_s));
                }
                row.push(format!("{:.1}", m.cpu_ms_per_change));
                modes.push(row);
            }
        }
        let mut cases = Table::new(["instances", "case", "result"])
            .caption(if self.cluster.is_some() {
                "Bad, big and oversized values"
            } else {
                "Bad, big and oversized values; Consul paused and restarted; ACLs"
            })
            .align_right([0]);
        for cell in &self.cells {
            let n = cell.instances.to_string();
            cases.push([
                n.clone(),
                "bad value (max_connections 0)".into(),
                format!(
                    "{}/{} reported it, {} applied it",
                    cell.bad.reported, cell.instances, cell.bad.applied
                ),
            ]);
            cases.push([
                n.clone(),
                format!("{} byte value", cell.big.bytes),
                spread_text(&cell.big, cell.instances),
            ]);
            cases.push([n.clone(), "one byte more".into(), cell.oversized.clone()]);
            if let Some(o) = &cell.outage {
                cases.push([
                    n.clone(),
                    format!("Consul paused {} s, then a change", o.paused_s),
                    spread_text(&o.after_pause, cell.instances),
                ]);
                cases.push([
                    n.clone(),
                    "Consul restarted (KV gone)".into(),
                    format!(
                        "{}/{} reported the key missing",
                        o.missing_reported, cell.instances
                    ),
                ]);
                cases.push([
                    n,
                    "then the key put again".into(),
                    spread_text(&o.after_restart, cell.instances),
                ]);
            }
        }
        if let Some(acl) = &self.acl {
            cases.push([
                acl.instances.to_string(),
                "a token that cannot read the key".into(),
                format!(
                    "{}/{} reported it, {} applied anything",
                    acl.reported, acl.instances, acl.applied
                ),
            ]);
        }
        vec![modes, cases]
    }

    fn details(&self) -> String {
        let below: Vec<String> = self
            .cells
            .iter()
            .flat_map(|c| c.modes.iter().map(move |m| (c.instances, m)))
            .filter(|(_, m)| m.cpu_ms_per_change < 0.0)
            .map(|(n, m)| format!("{n} instances, {}", m.mode))
            .collect();
        let noise = if below.is_empty() {
            String::new()
        } else {
            format!(
                "\n\nBelow idle (a negative CPU per change: that load is within the agents' own \
                 variation between the idle reading and the phase, on a shared machine): {}.",
                below.join("; ")
            )
        };
        self.details_text() + &noise
    }

    fn consul(&self) -> Option<String> {
        self.consul.clone()
    }

    fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        for cell in &self.cells {
            let n = cell.instances;
            if let Some(watch) = cell.modes.first()
                && watch.seen != watch.expected
            {
                v.push(format!(
                    "{n} instances: {} of {} changes applied",
                    watch.seen, watch.expected
                ));
            }
            if cell.bad.applied > 0 || cell.bad.reported != n {
                v.push(format!(
                    "{n} instances: bad value applied by {}, reported by {}",
                    cell.bad.applied, cell.bad.reported
                ));
            }
            if cell.big.applied != n {
                v.push(format!(
                    "{n} instances: 512 KiB value applied by {}",
                    cell.big.applied
                ));
            }
            if !cell.oversized.contains("limit") && !cell.oversized.contains("large") {
                v.push(format!(
                    "{n} instances: oversized value: {}",
                    cell.oversized
                ));
            }
            if let Some(o) = &cell.outage
                && (o.after_pause.applied != n
                    || o.after_restart.applied != n
                    || o.missing_reported != n)
            {
                v.push(format!("{n} instances: outage: {o:?}"));
            }
        }
        if let Some(acl) = &self.acl
            && (acl.applied > 0 || acl.reported != acl.instances)
        {
            v.push(format!(
                "ACL: {} applied, {} of {} reported",
                acl.applied, acl.reported, acl.instances
            ));
        }
        v
    }

    fn plot(&self) -> Option<Plot> {
        // A cluster's one cell is a point, not a curve: its table says it.
        if self.cluster.is_some() {
            return None;
        }
        let names: Vec<String> = self.cells.iter().map(|c| c.instances.to_string()).collect();
        let mut series = Vec::new();
        let kinds = self.cells.first().map_or(0, |c| c.modes.len());
        for k in 0..kinds {
            let mut p50 = Vec::new();
            let mut p99 = Vec::new();
            let mut label = String::new();
            for (x, cell) in self.cells.iter().enumerate() {
                if let Some(m) = cell.modes.get(k) {
                    label.clone_from(&m.mode);
                    p50.push((x as f64, m.p50_ms));
                    p99.push((x as f64, m.p99_ms));
                }
            }
            series.push(Series {
                label: format!("{label}: p99"),
                color: PALETTE[k % PALETTE.len()],
                mark: Mark::Line(p99),
            });
            series.push(Series {
                label: format!("{label}: p50"),
                color: PALETTE[k % PALETTE.len()],
                mark: Mark::FadedLine(p50),
            });
        }
        Some(Plot {
            title: "A change reaches every instance: latency by mode".into(),
            x: Axis::categories("instances watching one key on one agent", names),
            y: Axis::log("milliseconds from the PUT (log scale)"),
            series,
        })
    }
}

fn spread_text(s: &Spread, n: usize) -> String {
    format!(
        "{}/{n} applied it; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        s.applied, s.p50_ms, s.p99_ms, s.max_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_unique_json_and_padded_to_the_byte() {
        let v = Values(1234);
        let parsed: serde_json::Value = serde_json::from_slice(&v.value()).unwrap();
        assert_eq!(parsed["max_connections"], 1234);
        assert_eq!(parsed["log_level"], LOG_LEVEL);
        let big = v.padded(consul_api::kv::MAX_VALUE_BYTES);
        assert_eq!(big.len(), consul_api::kv::MAX_VALUE_BYTES);
        let parsed: serde_json::Value = serde_json::from_slice(&big).unwrap();
        assert_eq!(parsed["max_connections"], 1234, "spaces are still JSON");
        let line = "2026-12-06T17:00:00.000001Z  INFO echo_server::live: live settings in force \
                    key=k index=9 max_frame=1 idle_timeout=1s max_connections=1234 maintenance=false";
        assert!(line.contains(&v.needle()));
        assert!(!line.contains(&Values(123).needle()), "no prefix match");
    }
}
