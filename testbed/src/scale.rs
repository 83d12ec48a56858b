//! Discovery at scale: how the cost of following a service grows with its instance count and
//! the number of clients, measured against real Consul, and what Consul's read modes
//! (`?stale`, `?cached`, a server-side `filter`) change.
//!
//! One service of N instances with TTL checks (passing, a TTL of an hour) is registered on an
//! agent with bounded concurrency; C discovery clients run as processes of their own
//! (`testbed scale-client`, which prints one line per published snapshot), so that each one's
//! CPU time and resident set come from `/proc`. A flipper turns ONE instance's check critical
//! and passing again, 5 times a second for 20 s, and records when each PUT was sent and
//! returned. Per cell: client CPU per answer, peak client RSS, propagation from the flip's PUT
//! to each client's view (p50/p99), split into the answer's transfer (`read_at - received_at`:
//! Consul sending the body, the client reading it) and the client's own share once the answer
//! is in (`at - read_at`: decoding, building the view, updating the balancer),
//! Consul's CPU over the window (the container's cgroup, else the agent's process), and the
//! bytes served per flip (one answer's body, read through a counting [`FaultProxy`], times the
//! answers served). Every wait has a deadline: a cell that saturates (Consul cannot render the
//! answers as fast as the flips come) is reported with its missed flips, not waited on.
//!
//! * the grid: one dev agent; instances × clients;
//! * the modes: a cluster of one server and one client agent (where `?cached` is meant to
//!   be used: the clients' agent answers them from its cache), many clients on the client
//!   agent, today's query against `?stale`, `?cached` and a `filter`; the server's and the
//!   client agent's CPU apart.
//!
//! The pure parts (the client's line, matching flips to views, percentiles) are tested here.

use std::{
    collections::BTreeMap,
    io::Write,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use consul_api::{
    AgentServiceCheck, AgentServiceRegistration, Client, Consistency, GoDuration, HealthStatus,
    QueryOptions, RateLimit,
};
use consul_registry::{DiscoveryConfig, Snapshot, Source, discovery};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::{
    Cluster, ClusterSpec, ConsulOptions,
    consul::Consul,
    error::{Error, Result},
    experiment::{Findings, OnItsOwn, Plan, Suite},
    faultproxy::FaultProxy,
    process::ChildProcess,
    procfs,
    procs::Launcher,
    progress::Progress,
    report::{Axis, Mark, PALETTE, Plot, Series, Table, ms_text},
    wait,
};

/// The service every instance registers as.
pub const SERVICE: &str = "scalenode";
/// The filter the `filter` mode sends: one shard of ten (instance `i` has `Meta.shard` = i %
/// 10). Consul 1.8 cannot drop fields from an answer, only entries: a filter helps a client
/// that needs a subset (a shard, a zone, a version).
pub const SHARD_FILTER: &str = "Service.Meta.shard == \"0\"";
/// How many shards the instances are spread over.
pub const SHARDS: usize = 10;
/// The prefix of every line `testbed scale-client` prints.
pub const VIEW_PREFIX: &str = "view ";
/// The `limited` mode's read rate: 2 reads a second after a burst of 2 (Consul's
/// documentation on blocking queries suggests a burst of about 2), below the flipper's 5
/// flips a second, so that the flips are coalesced and what that saves Consul shows.
pub const LIMIT: RateLimit = RateLimit {
    per_second: 2.0,
    burst: 2,
};

/// How a client reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Today's query: `?passing`, default consistency (the leader answers).
    Default,
    /// `?passing&stale`: any server answers from its own copy.
    Stale,
    /// `?passing&cached`: the client's agent answers from its cache, one upstream blocking
    /// query shared by all its clients.
    Cached,
    /// `?passing&filter=Service.Meta.shard == "0"`: only one shard of ten, filtered by Consul.
    Filter,
    /// `?passing&cached&filter=...`: both.
    CachedFilter,
    /// Today's query, its loop rate-limited ([`DiscoveryConfig::rate_limit`] = [`LIMIT`]).
    Limited,
    /// `Source::Composed`: a blocking `/v1/catalog/services` (membership) and blocking
    /// `/v1/health/state/critical` and `/warning` (what is not passing), composed on the
    /// client.
    Composed,
    /// `Source::Composed`, its loop rate-limited as `limited`'s.
    ComposedLimited,
}

impl Mode {
    /// Every mode, in the report's order.
    pub const ALL: [Mode; 8] = [
        Mode::Default,
        Mode::Stale,
        Mode::Cached,
        Mode::Filter,
        Mode::CachedFilter,
        Mode::Limited,
        Mode::Composed,
        Mode::ComposedLimited,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::Stale => "stale",
            Mode::Cached => "cached",
            Mode::Filter => "filter",
            Mode::CachedFilter => "cached-filter",
            Mode::Limited => "limited",
            Mode::Composed => "composed",
            Mode::ComposedLimited => "composed-limited",
        }
    }

    /// The query string it adds to `/v1/health/service/<name>?passing`.
    pub fn query(self) -> &'static str {
        match self {
            Mode::Default => "(none)",
            Mode::Stale => "`stale`",
            Mode::Cached => "`cached`",
            Mode::Filter => "`filter=Service.Meta.shard == \"0\"`",
            Mode::CachedFilter => "`cached&filter=Service.Meta.shard == \"0\"`",
            Mode::Limited => "(none); the loop reads at most 2 a second after a burst of 2",
            Mode::Composed => {
                "not `?passing`: `/v1/catalog/services` + `/v1/health/state/critical` + `/warning`"
            }
            Mode::ComposedLimited => {
                "`composed`, the loop reading at most 2 a second after a burst of 2"
            }
        }
    }

    /// Whether its clients run `Source::Composed`.
    pub fn composed(self) -> bool {
        matches!(self, Mode::Composed | Mode::ComposedLimited)
    }

    fn cached(self) -> bool {
        matches!(self, Mode::Cached | Mode::CachedFilter)
    }

    fn filter(self) -> Option<String> {
        matches!(self, Mode::Filter | Mode::CachedFilter).then(|| SHARD_FILTER.to_owned())
    }

    fn consistency(self) -> Consistency {
        match self {
            Mode::Stale => Consistency::Stale,
            _ => Consistency::Default,
        }
    }

    /// The discovery configuration a client of this mode runs with.
    pub fn discovery(self, service: &str) -> DiscoveryConfig {
        let mut config = DiscoveryConfig::new(service);
        config.consistency = self.consistency();
        config.cached = self.cached();
        config.filter = self.filter();
        if self.composed() {
            config.source = Source::Composed;
        }
        if matches!(self, Mode::Limited | Mode::ComposedLimited) {
            config.rate_limit = Some(LIMIT);
        }
        config
    }

    /// The same query, once, without blocking.
    pub fn query_options(self) -> QueryOptions {
        QueryOptions {
            consistency: self.consistency(),
            cached: self.cached(),
            filter: self.filter(),
            ..Default::default()
        }
    }

    /// How many of `instances` (all passing) this mode's answer lists.
    pub fn expected(self, instances: usize) -> usize {
        if self.filter().is_some() {
            instances.div_ceil(SHARDS)
        } else {
            instances
        }
    }
}

/// The parts of `testbed scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Instances × clients on one dev agent.
    Grid,
    /// The read modes compared, many clients on one client agent of a cluster.
    Modes,
}

/// One cell of the grid: `<instances>x<clients>:<mode>` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GridCell {
    /// Instances registered.
    pub instances: usize,
    /// Client processes.
    pub clients: usize,
    /// How they read.
    pub mode: Mode,
}

impl std::str::FromStr for GridCell {
    type Err = String;

    /// `1000x10:limited`.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let bad =
            || format!("{text:?}: expected <instances>x<clients>:<mode>, e.g. 1000x10:default");
        let (size, mode) = text.split_once(':').ok_or_else(bad)?;
        let (instances, clients) = size.split_once('x').ok_or_else(bad)?;
        let count = |n: &str| match n.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad()),
        };
        Ok(GridCell {
            instances: count(instances)?,
            clients: count(clients)?,
            mode: <Mode as clap::ValueEnum>::from_str(mode.trim(), true)
                .map_err(|e| format!("{}: {e}", bad()))?,
        })
    }
}

/// How the experiment is set up.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleConfig {
    /// Instance counts of the grid.
    pub instances: Vec<usize>,
    /// Client counts of the grid.
    pub clients: Vec<usize>,
    /// The grid's read modes, each cell run once per mode.
    pub grid_modes: Vec<Mode>,
    /// When not empty, the grid runs exactly these cells instead of instances × clients ×
    /// modes (a run that holds only the cells a question needs).
    pub cells: Vec<GridCell>,
    /// Instances in the modes comparison.
    pub modes_instances: usize,
    /// Clients in the modes comparison.
    pub modes_clients: usize,
    /// The modes compared.
    pub modes: Vec<Mode>,
    /// Flips per second.
    pub flips_per_second: u32,
    /// How long the flipper flips.
    pub flip_for: GoDuration,
    /// Registrations in flight at once.
    pub register_concurrency: usize,
    /// How long every client may take to show every instance before the flips.
    pub ready_timeout: GoDuration,
    /// How long after the last flip the clients may take to show the final state.
    pub drain_timeout: GoDuration,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            instances: vec![10, 1_000, 5_000],
            clients: vec![1, 10, 100],
            grid_modes: vec![Mode::Default, Mode::Composed],
            cells: Vec::new(),
            modes_instances: 1_000,
            modes_clients: 100,
            modes: vec![
                Mode::Default,
                Mode::Stale,
                Mode::Cached,
                Mode::Filter,
                Mode::Composed,
            ],
            flips_per_second: 5,
            flip_for: GoDuration::from_secs(20),
            register_concurrency: 16,
            ready_timeout: GoDuration::from_secs(180),
            drain_timeout: GoDuration::from_secs(15),
        }
    }
}

impl ScaleConfig {
    /// The grid's cells, in the order they run: by instance count (registered once, in
    /// turn), then as given (or clients × modes).
    pub fn grid_cells(&self) -> Vec<GridCell> {
        let mut cells = if self.cells.is_empty() {
            let mut cells = Vec::new();
            for &instances in &self.instances {
                for &clients in &self.clients {
                    for &mode in &self.grid_modes {
                        cells.push(GridCell {
                            instances,
                            clients,
                            mode,
                        });
                    }
                }
            }
            cells
        } else {
            self.cells.clone()
        };
        cells.sort_by_key(|c| c.instances);
        let mut unique = Vec::with_capacity(cells.len());
        for cell in cells {
            if !unique.contains(&cell) {
                unique.push(cell);
            }
        }
        unique
    }

    fn flips(&self) -> usize {
        (self.flip_for.0.as_secs_f64() * f64::from(self.flips_per_second)).round() as usize
    }

    fn flip_period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / f64::from(self.flips_per_second.max(1)))
    }
}

/// One agent's CPU over a cell's window.
#[derive(Debug, Clone, Serialize)]
pub struct AgentCpu {
    /// `agent`, `server`, `client agent`.
    pub agent: String,
    /// CPU seconds used over the window.
    pub cpu_s: f64,
    /// Of one core, on average over the window.
    pub share_of_core: f64,
    /// Per flip, milliseconds.
    pub per_flip_ms: f64,
    /// Where it was read: `cgroup` or `process`.
    pub source: String,
    /// The agent process's peak resident set at the window's end, MiB.
    pub peak_rss_mib: Option<f64>,
}

/// One cell: a mode, an instance count, a client count.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// `grid` or `modes`.
    pub part: String,
    /// The read mode.
    pub mode: Mode,
    /// Instances registered (all passing but the flipped one, half the time).
    pub instances: usize,
    /// The clients' answer lists this many while all pass.
    pub listed: usize,
    /// Client processes.
    pub clients: usize,
    /// Of them, with a full first view before the flips (within the ready timeout).
    pub clients_ready: usize,
    /// Seconds from spawning the clients to the last one's full first view.
    pub ready_s: f64,
    /// Flips made (PUTs that returned 200).
    pub flips: usize,
    /// The window measured: first flip to every client's final view (or the drain deadline).
    pub window_s: f64,
    /// One answer's body, bytes (a direct GET of the same query).
    pub answer_bytes: u64,
    /// How long that direct GET took, milliseconds.
    pub answer_ms: f64,
    /// Answers the clients received in the window, all clients together.
    pub answers: u64,
    /// Answers per client per flip (1: every flip seen apart; below: coalesced).
    pub answers_per_flip: f64,
    /// Bytes served per flip, all clients together: `answer_bytes × answers / flips`.
    pub bytes_per_flip: f64,
    /// Client CPU per answer received, milliseconds (all clients' CPU / all answers).
    pub client_cpu_per_answer_ms: Option<f64>,
    /// Client CPU per flip per client, milliseconds.
    pub client_cpu_per_flip_ms: f64,
    /// The largest peak resident set of a client, MiB.
    pub client_rss_max_mib: f64,
    /// (flip, client) pairs whose change a client showed.
    pub seen: usize,
    /// (flip, client) pairs a client never showed (coalesced with the next flip, or late).
    pub missed: usize,
    /// From the flip's PUT returning to a client's view showing it, ms: p50.
    pub propagation_p50_ms: Option<f64>,
    /// The same, p99.
    pub propagation_p99_ms: Option<f64>,
    /// The answer's transfer (headers arrived → body read: Consul sending, the client
    /// reading), ms: p50.
    pub transfer_p50_ms: Option<f64>,
    /// The same, p99.
    pub transfer_p99_ms: Option<f64>,
    /// The client's share once the answer is in (body read → view published), ms: p50.
    pub client_added_p50_ms: Option<f64>,
    /// The same, p99.
    pub client_added_p99_ms: Option<f64>,
    /// Each agent's CPU over the window.
    pub consul: Vec<AgentCpu>,
    /// Whether the cell saturated: a client not ready, or under 90 % of (flip, client)
    /// pairs seen.
    pub saturated: bool,
    /// What went wrong or is worth knowing.
    pub notes: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// Consul's version.
    pub consul_version: String,
    /// How the run was set up.
    pub config: ScaleConfig,
    /// The grid's cells.
    pub grid: Vec<Cell>,
    /// The modes' cells.
    pub modes: Vec<Cell>,
    /// The cluster the modes ran on, in words.
    pub modes_setup: String,
}

// === the client process ===

/// `testbed scale-client`: follow a service and print one line per published snapshot.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The service to follow.
    #[arg(long, default_value = SERVICE)]
    pub service: String,
    /// How to read.
    #[arg(long, value_enum, default_value = "default")]
    pub mode: Mode,
    /// How long one blocking query waits (short: Consul keeps a killed client's blocking
    /// query, and its connection, until the wait ends).
    #[arg(long, default_value = "15s")]
    pub wait: GoDuration,
}

/// The clients' blocking wait; after each cell the experiment rests a little longer, so that
/// the killed clients' blocking queries have ended: Consul does not notice a client gone
/// while its query blocks, and counts its connection against `http_max_conns_per_client`
/// ([`conn_limit`] per address), which otherwise refuses the next cell's flipper.
pub const CLIENT_WAIT: Duration = Duration::from_secs(15);

/// HTTP connections one client may hold on its agent: the composed source's four blocking
/// queries, its one-off reads, and a spare (`?passing` holds one).
pub const CONNS_PER_CLIENT: u32 = 6;

/// The agents' `http_max_conns_per_client` for `clients` clients. Every client reaches its
/// agent from 127.0.0.1, and Consul 1.8.7 closes any connection past the cap (200 per address
/// by default) without an answer: at 100 composed clients it closed the flipper's. Six per
/// client, plus the default 200 for the flipper, the holder and the counting proxy.
pub fn conn_limit(clients: usize) -> u32 {
    u32::try_from(clients)
        .unwrap_or(u32::MAX)
        .saturating_mul(CONNS_PER_CLIENT)
        .saturating_add(200)
}

/// Run discovery only (Consul's address from `CONSUL_HTTP_ADDR` and friends) and print each
/// snapshot as a [`View`] line until stdout closes.
pub async fn client(args: ClientArgs) -> Result<()> {
    let client = Client::new(consul_api::Config::from_env()?)?;
    let mut config = args.mode.discovery(&args.service);
    config.wait = args.wait.0;
    let mut rx = discovery::spawn(client, config);
    let mut out = std::io::stdout();
    while rx.changed().await.is_ok() {
        let line = view_line(&rx.borrow_and_update());
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    Ok(())
}

fn unix_ns(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// The line a client prints for `snapshot`.
pub fn view_line(snapshot: &Snapshot) -> String {
    format!(
        "{VIEW_PREFIX}version={} instances={} index={} at={} received_at={} read_at={}",
        snapshot.version,
        snapshot.instances.len(),
        snapshot.index,
        unix_ns(snapshot.at),
        unix_ns(snapshot.received_at),
        unix_ns(snapshot.read_at)
    )
}

/// One published snapshot, as a client printed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The snapshot's version.
    pub version: u64,
    /// How many instances it lists.
    pub instances: usize,
    /// Consul's index of the answer.
    pub index: u64,
    /// When it was published.
    pub at: SystemTime,
    /// When its answer's headers arrived.
    pub received_at: SystemTime,
    /// When its answer's body had been read.
    pub read_at: SystemTime,
}

/// A client's line, parsed; `None` for any other line (logs).
pub fn parse_view(line: &str) -> Option<View> {
    let rest = line.trim().strip_prefix(VIEW_PREFIX)?;
    let mut fields = BTreeMap::new();
    for pair in rest.split_whitespace() {
        let (k, v) = pair.split_once('=')?;
        fields.insert(k, v);
    }
    let num = |k: &str| fields.get(k)?.parse::<u64>().ok();
    let time = |k: &str| {
        let ns: u64 = fields.get(k)?.parse().ok()?;
        Some(UNIX_EPOCH + Duration::from_nanos(ns))
    };
    Some(View {
        version: num("version")?,
        instances: usize::try_from(num("instances")?).ok()?,
        index: num("index")?,
        at: time("at")?,
        received_at: time("received_at")?,
        read_at: time("read_at")?,
    })
}

// === matching and statistics (pure) ===

/// One flip of the flipped instance's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flip {
    /// When its PUT was sent.
    pub sent: SystemTime,
    /// When its PUT returned: the change time.
    pub returned: SystemTime,
    /// How many instances an answer lists once it shows this flip.
    pub expect: usize,
}

/// For each flip, the index in `views` of the first view that shows it: its answer's headers
/// arrived after the flip was sent, it lists the flip's count, it comes after the view matched
/// to the previous flip, and it was published before the flip after next was sent (by then
/// the same count may be that flip's: a later view is counted as missed). `horizon` stands
/// in for the flip after next of the last two flips.
pub fn match_flips(flips: &[Flip], views: &[View], horizon: SystemTime) -> Vec<Option<usize>> {
    let mut cursor = 0;
    let mut matched = Vec::with_capacity(flips.len());
    for (k, flip) in flips.iter().enumerate() {
        let upper = flips.get(k + 2).map_or(horizon, |f| f.sent);
        let found = views
            .iter()
            .enumerate()
            .skip(cursor)
            .take_while(|(_, v)| v.at < upper)
            .find(|(_, v)| v.received_at >= flip.sent && v.instances == flip.expect)
            .map(|(j, _)| j);
        if let Some(j) = found {
            cursor = j + 1;
        }
        matched.push(found);
    }
    matched
}

/// How many missed flips a cell's note names (those missed by the most clients).
const MISSED_FLIPS_SHOWN: usize = 8;

/// Why a client missed a flip ([`match_flips`] found no view for it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Missed {
    /// An answer that shows the flip arrived in time (before the flip after next was sent),
    /// but the client published its view only after that: the client's own delay, from the
    /// answer's headers to the view, in milliseconds.
    PublishedLate(f64),
    /// No answer that shows the flip arrived in time: the client's first answer after the
    /// flip was sent (if any) came this many milliseconds after its PUT returned, and
    /// showed another count (a later flip's when it came late and coalesced them).
    NotAnswered(Option<f64>),
}

/// For each flip `matched` (from [`match_flips`] with the same `horizon`) has no view for,
/// its index and why: the first view after the previous flip's that shows it and whose
/// answer arrived before the flip after next was sent, if any, was published late.
pub fn why_missed(
    flips: &[Flip],
    views: &[View],
    matched: &[Option<usize>],
    horizon: SystemTime,
) -> Vec<(usize, Missed)> {
    let mut cursor = 0;
    let mut missed = Vec::new();
    for (k, (flip, m)) in flips.iter().zip(matched).enumerate() {
        if let Some(j) = m {
            cursor = j + 1;
            continue;
        }
        let upper = flips.get(k + 2).map_or(horizon, |f| f.sent);
        let late = views.iter().skip(cursor).find(|v| {
            v.received_at >= flip.sent && v.received_at < upper && v.instances == flip.expect
        });
        let first_answer = || {
            let v = views
                .iter()
                .skip(cursor)
                .find(|v| v.received_at >= flip.sent)?;
            Some(ms_between(flip.returned, v.received_at))
        };
        missed.push((
            k,
            match late {
                Some(v) => Missed::PublishedLate(ms_between(v.received_at, v.at)),
                None => Missed::NotAnswered(first_answer()),
            },
        ));
    }
    missed
}

pub use crate::report::{ms_between, percentile};

// === the experiment ===

fn registration(i: usize) -> AgentServiceRegistration {
    AgentServiceRegistration {
        id: Some(instance_id(i)),
        name: SERVICE.into(),
        address: Some("127.0.0.1".into()),
        port: Some(10_000 + (i % 50_000) as u16),
        meta: BTreeMap::from([("shard".to_owned(), (i % SHARDS).to_string())]),
        check: Some(AgentServiceCheck {
            check_id: Some(check_id(i)),
            ttl: Some(GoDuration::from_secs(3600)),
            status: Some("passing".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn instance_id(i: usize) -> String {
    format!("{SERVICE}-{i:05}")
}

fn check_id(i: usize) -> String {
    format!("scale-ttl-{i:05}")
}

/// Register instances `from..to` on `client`'s agent, `concurrency` at a time, and wait until
/// the health endpoint lists `to` passing.
async fn register(
    client: &Client,
    from: usize,
    to: usize,
    concurrency: usize,
    progress: &Progress,
) -> Result<()> {
    let done = AtomicUsize::new(from);
    futures::stream::iter(from..to)
        .map(Ok::<usize, Error>)
        .try_for_each_concurrent(concurrency.max(1), |i| {
            let done = &done;
            async move {
                client.agent().service_register(&registration(i)).await?;
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(250) {
                    progress.say(format!("registered {n}/{to} instances"));
                }
                Ok(())
            }
        })
        .await?;
    progress.say(format!("waiting until Consul lists {to} passing instances"));
    let timeout = Duration::from_secs(120 + to as u64 / 20);
    wait::health_until(client, SERVICE, true, timeout, |e| e.len() == to).await?;
    Ok(())
}

/// Where a cell's clients read, who holds the registrations, and whose CPU counts.
struct Setup<'a> {
    part: &'static str,
    mode: Mode,
    instances: usize,
    clients: usize,
    read_from: &'a Consul,
    holder: Client,
    agents: Vec<(&'static str, &'a Consul)>,
}

/// The flipper: `count` flips of instance 0's check, one every `period`; returns the flips
/// whose PUT succeeded. Ends passing (an even count).
async fn flip(
    holder: &Client,
    listed: usize,
    count: usize,
    period: Duration,
    notes: &mut Vec<String>,
) -> Vec<Flip> {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flips = Vec::with_capacity(count);
    let mut failed = 0;
    let id = check_id(0);
    for k in 0..count {
        ticker.tick().await;
        let (status, expect) = if k % 2 == 0 {
            (HealthStatus::Critical, listed - 1)
        } else {
            (HealthStatus::Passing, listed)
        };
        let sent = SystemTime::now();
        let agent = holder.agent();
        let put = agent.check_update(&id, status, "testbed scale flip");
        match tokio::time::timeout(Duration::from_secs(2), put).await {
            Ok(Ok(())) => flips.push(Flip {
                sent,
                returned: SystemTime::now(),
                expect,
            }),
            _ => failed += 1,
        }
    }
    if failed > 0 {
        notes.push(format!("{failed} flip PUT(s) failed or took over 2 s"));
        // Whatever happened, leave the instance passing for the next cell.
        let _ = holder
            .agent()
            .check_update(&id, HealthStatus::Passing, "testbed scale end")
            .await;
    }
    flips
}

/// A client's CPU time: every live thread's, to the nanosecond (a client's threads live as
/// long as it does), else `/proc/<pid>/stat`'s 10 ms ticks.
fn client_cpu(pid: u32) -> Option<Duration> {
    procfs::process_cpu_time_ns(pid)
        .ok()
        .or_else(|| procfs::cpu_time(pid))
}

fn views_of(process: &ChildProcess) -> Vec<View> {
    process
        .output()
        .lines()
        .iter()
        .filter_map(|l| parse_view(&l.text))
        .collect()
}

/// Each agent's CPU time so far, where it was read, and its peak resident set (KiB).
async fn agents_cpu(
    agents: &[(&'static str, &Consul)],
) -> Result<Vec<(Duration, &'static str, Option<u64>)>> {
    let mut out = Vec::new();
    for (_, agent) in agents {
        let (used, source) = agent.cpu_time().await?;
        let rss = agent
            .pid()
            .await
            .ok()
            .and_then(|pid| procfs::status_kib(pid, "VmHWM"));
        out.push((used, source, rss));
    }
    Ok(out)
}

/// Run one cell.
async fn run_cell(
    launcher: &Launcher,
    config: &ScaleConfig,
    setup: Setup<'_>,
    progress: &Progress,
) -> Result<Cell> {
    let Setup {
        part,
        mode,
        instances,
        clients,
        read_from,
        holder,
        agents,
    } = setup;
    let label = format!(
        "{part} {}: {instances} instances × {clients} clients",
        mode.name()
    );
    let listed = mode.expected(instances);
    let mut notes = Vec::new();
    let (answer_bytes, answer_ms) = one_answer(read_from, mode, listed, &mut notes).await?;

    progress.say(format!("{label}: starting the clients"));
    let spawned = std::time::Instant::now();
    let mut procs = start_clients(launcher, read_from, mode, clients)?;
    let ready = until_ready(&procs, config, listed, &label, progress).await;
    let ready_s = spawned.elapsed().as_secs_f64();
    if ready < clients {
        notes.push(format!(
            "only {ready}/{clients} clients listed all {listed} instances within {}",
            config.ready_timeout
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pids: Vec<u32> = procs.iter().map(ChildProcess::pid).collect();
    let cpu_before: Vec<Option<Duration>> = pids.iter().map(|p| client_cpu(*p)).collect();
    let consul_before = agents_cpu(&agents).await?;
    let t0 = SystemTime::now();
    let started = std::time::Instant::now();
    progress.say(format!(
        "{label}: flipping one check {} times a second for {}",
        config.flips_per_second, config.flip_for
    ));
    let flips = flip(
        &holder,
        listed,
        config.flips(),
        config.flip_period(),
        &mut notes,
    )
    .await;
    let last_sent = flips.last().map_or(t0, |f| f.sent);
    if let Some(note) = until_final(&procs, config, listed, last_sent, &label, progress).await {
        notes.push(note);
    }
    let t1 = SystemTime::now();
    let window = started.elapsed();
    let consul_after = agents_cpu(&agents).await?;
    let cpu_after: Vec<Option<Duration>> = pids.iter().map(|p| client_cpu(*p)).collect();
    let rss_max_kib = pids
        .iter()
        .filter_map(|p| procfs::status_kib(*p, "VmHWM"))
        .max()
        .unwrap_or(0);
    for p in &mut procs {
        let _ = p.kill().await;
    }
    progress.say(format!(
        "{label}: resting until the killed clients' blocking queries have ended"
    ));
    tokio::time::sleep(CLIENT_WAIT + CLIENT_WAIT / 16 + Duration::from_secs(2)).await;

    let seen = Seen::of(&procs, &flips, (t0, t1), (&cpu_before, &cpu_after));
    let pairs = flips.len() * clients;
    let n_flips = flips.len().max(1) as f64;
    let consul = agents
        .iter()
        .zip(consul_before.iter().zip(&consul_after))
        .map(|((name, _), ((a, source, _), (b, _, rss)))| {
            let used = b.saturating_sub(*a).as_secs_f64();
            AgentCpu {
                agent: (*name).to_owned(),
                cpu_s: used,
                share_of_core: used / window.as_secs_f64().max(1e-3),
                per_flip_ms: used * 1e3 / n_flips,
                source: (*source).to_owned(),
                peak_rss_mib: rss.map(|kib| kib as f64 / 1024.0),
            }
        })
        .collect();
    let answers = seen.answers;
    if let Some(note) = seen.why_missed_note() {
        notes.push(note);
    }
    Ok(Cell {
        part: part.to_owned(),
        mode,
        instances,
        listed,
        clients,
        clients_ready: ready,
        ready_s,
        flips: flips.len(),
        window_s: window.as_secs_f64(),
        answer_bytes,
        answer_ms,
        answers,
        answers_per_flip: answers as f64 / (n_flips * clients as f64),
        bytes_per_flip: answer_bytes as f64 * answers as f64 / n_flips,
        client_cpu_per_answer_ms: (answers > 0)
            .then(|| seen.client_cpu.as_secs_f64() * 1e3 / answers as f64),
        client_cpu_per_flip_ms: seen.client_cpu.as_secs_f64() * 1e3 / (n_flips * clients as f64),
        client_rss_max_mib: rss_max_kib as f64 / 1024.0,
        seen: seen.matched,
        missed: pairs - seen.matched,
        propagation_p50_ms: percentile(&seen.propagation, 50.0),
        propagation_p99_ms: percentile(&seen.propagation, 99.0),
        transfer_p50_ms: percentile(&seen.transfer, 50.0),
        transfer_p99_ms: percentile(&seen.transfer, 99.0),
        client_added_p50_ms: percentile(&seen.client_added, 50.0),
        client_added_p99_ms: percentile(&seen.client_added, 99.0),
        consul,
        saturated: ready < clients || (seen.matched as f64) < 0.9 * pairs as f64,
        notes,
    })
}

/// One answer of `read_from` read as `mode` reads, through a counting proxy: its size in
/// bytes and its time in milliseconds (a note when it lists other than `listed`).
async fn one_answer(
    read_from: &Consul,
    mode: Mode,
    listed: usize,
    notes: &mut Vec<String>,
) -> Result<(u64, f64)> {
    let proxy = FaultProxy::start(read_from.http_addr()).await?;
    let direct = Client::new(read_from.config().with_address(proxy.address()))?;
    let asked = std::time::Instant::now();
    if mode.composed() {
        // What a flip costs this mode: the critical checks' answer (the list is read only
        // when membership changes).
        direct
            .health()
            .state("critical", &QueryOptions::default())
            .await?;
        let answer_ms = asked.elapsed().as_secs_f64() * 1e3;
        return Ok((proxy.stats().upstream_bytes, answer_ms));
    }
    let (entries, _) = direct
        .health()
        .service(SERVICE, None, true, &mode.query_options())
        .await?;
    let answer_ms = asked.elapsed().as_secs_f64() * 1e3;
    let answer_bytes = proxy.stats().upstream_bytes;
    if entries.len() != listed {
        notes.push(format!(
            "the direct GET listed {} instances, expected {listed}",
            entries.len()
        ));
    }
    Ok((answer_bytes, answer_ms))
}

/// `clients` scale-client processes reading from `read_from` as `mode` reads.
fn start_clients(
    launcher: &Launcher,
    read_from: &Consul,
    mode: Mode,
    clients: usize,
) -> Result<Vec<ChildProcess>> {
    let args = vec![
        "--service".to_owned(),
        SERVICE.to_owned(),
        "--mode".to_owned(),
        mode.name().to_owned(),
        "--wait".to_owned(),
        GoDuration(CLIENT_WAIT).to_string(),
    ];
    let mut procs = Vec::with_capacity(clients);
    for _ in 0..clients {
        procs.push(launcher.spawn_subcommand("scale-client", &read_from.config(), &args)?);
    }
    Ok(procs)
}

/// Until every client lists `listed` instances, or the ready timeout: how many do.
async fn until_ready(
    procs: &[ChildProcess],
    config: &ScaleConfig,
    listed: usize,
    label: &str,
    progress: &Progress,
) -> usize {
    let spawned = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + config.ready_timeout.0;
    let full = |p: &ChildProcess| views_of(p).iter().any(|v| v.instances == listed);
    loop {
        let ready = procs.iter().filter(|p| full(p)).count();
        if ready == procs.len() || tokio::time::Instant::now() >= deadline {
            return ready;
        }
        progress.say(format!(
            "{label}: {ready}/{} clients list {listed} instances ({:.0} s)",
            procs.len(),
            spawned.elapsed().as_secs_f64()
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Until every client shows the final state (all `listed` passing) after the last flip
/// (`last_sent`), or the drain timeout: a note if some never did.
async fn until_final(
    procs: &[ChildProcess],
    config: &ScaleConfig,
    listed: usize,
    last_sent: SystemTime,
    label: &str,
    progress: &Progress,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + config.drain_timeout.0;
    loop {
        let behind = procs
            .iter()
            .filter(|p| {
                views_of(p)
                    .last()
                    .is_none_or(|v| v.received_at < last_sent || v.instances != listed)
            })
            .count();
        if behind == 0 {
            return None;
        }
        if tokio::time::Instant::now() >= deadline {
            return Some(format!(
                "{behind} client(s) had not shown the final state {} after the last flip",
                config.drain_timeout
            ));
        }
        progress.say(format!(
            "{label}: {behind}/{} clients still behind the last flip",
            procs.len()
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the clients saw of the flips: answers in the window, flips matched, and the
/// times of each match.
struct Seen {
    answers: u64,
    matched: usize,
    propagation: Vec<f64>,
    transfer: Vec<f64>,
    client_added: Vec<f64>,
    client_cpu: Duration,
    /// The client's delay (answer in → view) of each missed flip an answer showed in time.
    published_late: Vec<f64>,
    /// Missed flips no answer showed in time.
    not_answered: usize,
    /// For the missed flips no answer showed in time: the client's first answer after the
    /// flip, ms after its PUT returned.
    first_answers: Vec<f64>,
    /// Each flip missed, by flip number: when its PUT returned, and by how many clients.
    missed_flips: BTreeMap<usize, (SystemTime, usize)>,
}

impl Seen {
    /// Per client of `procs`: its answers between `t0` and `t1`, each flip matched to the
    /// view that showed it, and its CPU time between the two readings `cpu`.
    fn of(
        procs: &[ChildProcess],
        flips: &[Flip],
        (t0, t1): (SystemTime, SystemTime),
        cpu: (&[Option<Duration>], &[Option<Duration>]),
    ) -> Seen {
        let mut seen = Seen {
            answers: 0,
            matched: 0,
            propagation: Vec::new(),
            transfer: Vec::new(),
            client_added: Vec::new(),
            client_cpu: Duration::ZERO,
            published_late: Vec::new(),
            not_answered: 0,
            first_answers: Vec::new(),
            missed_flips: BTreeMap::new(),
        };
        for (i, p) in procs.iter().enumerate() {
            let views = views_of(p);
            seen.answers += views.iter().filter(|v| v.at >= t0 && v.at <= t1).count() as u64;
            let matched = match_flips(flips, &views, t1);
            for (k, why) in why_missed(flips, &views, &matched, t1) {
                if let Some(flip) = flips.get(k) {
                    seen.missed_flips.entry(k).or_insert((flip.returned, 0)).1 += 1;
                }
                match why {
                    Missed::PublishedLate(ms) => seen.published_late.push(ms),
                    Missed::NotAnswered(first) => {
                        seen.not_answered += 1;
                        seen.first_answers.extend(first);
                    }
                }
            }
            for (flip, m) in flips.iter().zip(matched) {
                if let Some(j) = m {
                    seen.matched += 1;
                    seen.propagation
                        .push(ms_between(flip.returned, views[j].at));
                    seen.transfer
                        .push(ms_between(views[j].received_at, views[j].read_at));
                    seen.client_added
                        .push(ms_between(views[j].read_at, views[j].at));
                }
            }
            if let (Some(Some(a)), Some(Some(b))) = (cpu.0.get(i), cpu.1.get(i)) {
                seen.client_cpu += b.saturating_sub(*a);
            }
        }
        seen
    }

    /// What the missed flips were, when any was: shown by an answer in time but published
    /// late (the client process's own delay), or not answered in time.
    fn why_missed_note(&self) -> Option<String> {
        let late = self.published_late.len();
        if late + self.not_answered == 0 {
            return None;
        }
        let late_text = match (
            percentile(&self.published_late, 50.0),
            self.published_late.iter().copied().reduce(f64::max),
        ) {
            (Some(p50), Some(max)) => format!(
                "{late} shown by an answer in time but published late (the client's own \
                 delay from the answer to its view: p50 {p50:.1} ms, max {max:.1} ms)"
            ),
            _ => format!("{late} shown by an answer in time but published late"),
        };
        // The flips missed by the most clients, in flip order; the rest counted.
        let mut worst: Vec<(usize, SystemTime, usize)> = self
            .missed_flips
            .iter()
            .map(|(&k, &(at, n))| (k, at, n))
            .collect();
        worst.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        let rest = worst.len().saturating_sub(MISSED_FLIPS_SHOWN);
        worst.truncate(MISSED_FLIPS_SHOWN);
        worst.sort_unstable();
        let mut by_flip: Vec<String> = worst
            .iter()
            .map(|(k, at, n)| format!("#{k} ({}) by {n}", humantime::format_rfc3339_millis(*at)))
            .collect();
        if rest > 0 {
            by_flip.push(format!("and {rest} more flips"));
        }
        let first = match (
            percentile(&self.first_answers, 50.0),
            self.first_answers.iter().copied().reduce(f64::max),
        ) {
            (Some(p50), Some(max)) => format!(
                " (the client's first answer after the flip came p50 {p50:.1} ms, max \
                 {max:.1} ms after it, and showed another count)"
            ),
            _ => String::new(),
        };
        Some(format!(
            "missed: {late_text}; {} not shown by any answer before the flip after next was \
             sent{first}; by flip: {}",
            self.not_answered,
            by_flip.join(", ")
        ))
    }
}

/// The grid: one dev agent, every count of instances × every count of clients.
async fn run_grid(
    launcher: &Launcher,
    config: &ScaleConfig,
    progress: &Progress,
    report: &mut ScaleReport,
) -> Result<()> {
    progress.say("grid: starting Consul (one dev agent)");
    let cells = config.grid_cells();
    let most = cells.iter().map(|c| c.clients).max().unwrap_or(1);
    // At INFO, as agents run in production: a `-dev` agent's DEBUG logs a line per local
    // service and check on every sync, ~2,000 lines a flip at 1,000 instances, stored by
    // the engine outside the agent's cgroup.
    let options = ConsulOptions::from_env()?
        .with_http_max_conns_per_client(conn_limit(most))
        .with_log_level("info");
    let consul = Consul::start_with(options).await?;
    report.consul_version = consul.version().to_owned();
    let holder = consul.client();
    let mut registered = 0;
    let mut cached_before = false;
    for GridCell {
        instances: n,
        clients: c,
        mode,
    } in cells
    {
        if n > registered {
            register(
                &holder,
                registered,
                n,
                config.register_concurrency,
                progress,
            )
            .await?;
            registered = n;
        }
        let setup = Setup {
            part: "grid",
            mode,
            instances: n,
            clients: c,
            read_from: &consul,
            holder: holder.clone(),
            agents: vec![("agent", &consul)],
        };
        let mut cell = run_cell(launcher, config, setup, progress).await?;
        if cached_before {
            cell.notes.push(AFTER_CACHED.to_owned());
        }
        cached_before |= mode.cached();
        tracing::info!(instances = n, clients = c, mode = mode.name(), "cell done");
        report.grid.push(cell);
    }
    Ok(())
}

/// A cell's note when it ran after a cached one on the same agent.
const AFTER_CACHED: &str = "ran after a cached cell: the agent's cache still refreshes the \
                            service's entry in the background, on every change, and its cost \
                            is counted here too";

/// `modes` in the order they run: as given, but those that read through the agent's cache
/// last. A cached read leaves the agent refreshing the entry in the background (one blocking
/// query to the servers, re-run on every change of the service) long after its clients are
/// gone, so a mode run after it would be charged that refresh too.
fn run_order(modes: &[Mode]) -> Vec<Mode> {
    let mut order = modes.to_vec();
    order.sort_by_key(|m| m.cached());
    order
}

/// The read modes: a cluster of one server and one client agent, many clients on the agent,
/// each mode in turn (those through the agent's cache last: [`run_order`]).
async fn run_modes(
    launcher: &Launcher,
    config: &ScaleConfig,
    progress: &Progress,
    report: &mut ScaleReport,
) -> Result<()> {
    progress.say("modes: starting a cluster (1 server, 1 client agent)");
    let options =
        ConsulOptions::from_env()?.with_http_max_conns_per_client(conn_limit(config.modes_clients));
    let cluster = Cluster::start_with(options, ClusterSpec::new(1, 1)).await?;
    let server = &cluster.servers()[0];
    let agent = &cluster.clients()[0];
    if report.consul_version.is_empty() {
        report.consul_version = agent.version().to_owned();
    }
    report.modes_setup = format!(
        "a cluster of 1 server ({}) and 1 client agent ({}); the instances are registered \
         on the client agent and every client reads from it",
        server.spec().address,
        agent.spec().address
    );
    let holder = agent.client();
    register(
        &holder,
        0,
        config.modes_instances,
        config.register_concurrency,
        progress,
    )
    .await?;
    for mode in run_order(&config.modes) {
        let setup = Setup {
            part: "modes",
            mode,
            instances: config.modes_instances,
            clients: config.modes_clients,
            read_from: agent,
            holder: holder.clone(),
            agents: vec![("server", server), ("client agent", agent)],
        };
        report
            .modes
            .push(run_cell(launcher, config, setup, progress).await?);
    }
    Ok(())
}

// === report ===

fn bytes(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} KB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn consul_cpu(cell: &Cell) -> String {
    cell.consul
        .iter()
        .map(|a| {
            format!(
                "{}: {:.2} s ({:.0} % of a core, {:.1} ms/flip{})",
                a.agent,
                a.cpu_s,
                a.share_of_core * 100.0,
                a.per_flip_ms,
                a.peak_rss_mib
                    .map_or(String::new(), |m| format!(", peak RSS {m:.0} MiB"))
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn table(cells: &[Cell], first: &str, key: impl Fn(&Cell) -> String) -> Table {
    let mut t = Table::new([
        first,
        "listed",
        "answer",
        "Consul's answer time",
        "answers/client/flip",
        "bytes served/flip",
        "client CPU/answer",
        "client CPU/flip",
        "client RSS max",
        "seen / missed",
        "propagation p50 / p99",
        "transfer p50 / p99",
        "client's share p50 / p99",
        "Consul CPU over the window",
    ]);
    for c in cells {
        let mark = if c.saturated { " **saturated**" } else { "" };
        t.push([
            format!("{}{mark}", key(c)),
            c.listed.to_string(),
            bytes(c.answer_bytes as f64),
            format!("{:.0} ms", c.answer_ms),
            format!("{:.2}", c.answers_per_flip),
            bytes(c.bytes_per_flip),
            ms_text(c.client_cpu_per_answer_ms, 1),
            format!("{:.2} ms", c.client_cpu_per_flip_ms),
            format!("{:.1} MiB", c.client_rss_max_mib),
            format!("{} / {}", c.seen, c.missed),
            format!(
                "{} / {}",
                ms_text(c.propagation_p50_ms, 1),
                ms_text(c.propagation_p99_ms, 1)
            ),
            format!(
                "{} / {}",
                ms_text(c.transfer_p50_ms, 1),
                ms_text(c.transfer_p99_ms, 1)
            ),
            format!(
                "{} / {}",
                ms_text(c.client_added_p50_ms, 1),
                ms_text(c.client_added_p99_ms, 1)
            ),
            consul_cpu(c),
        ]);
        for n in &c.notes {
            t.note(format!("{}: {n}", key(c)));
        }
    }
    t
}

// === the contract ===

/// `testbed scale`: the grid, the modes, and their settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Instance counts of the grid (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,5000")]
    instances: Vec<usize>,
    /// Client counts of the grid (comma-separated); each client is a process.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    clients: Vec<usize>,
    /// How the grid's clients read (comma-separated): each cell once per mode.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "default,composed"
    )]
    grid_modes: Vec<Mode>,
    /// The read modes compared (comma-separated; those through the agent's cache run last,
    /// as the agent goes on refreshing a cached entry after its clients are gone).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "default,stale,cached,filter,composed"
    )]
    modes: Vec<Mode>,
    /// Instances in the modes comparison.
    #[arg(long, default_value_t = 1000)]
    modes_instances: usize,
    /// Clients in the modes comparison.
    #[arg(long, default_value_t = 100)]
    modes_clients: usize,
    /// How long the flipper flips (5 times a second).
    #[arg(long, default_value = "20s")]
    flip_for: GoDuration,
    /// Parts to run (comma-separated); all by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Part>,
    /// Run exactly these grid cells instead of instances × clients × grid modes
    /// (comma-separated `<instances>x<clients>:<mode>`, e.g. `1000x10:default,1000x10:limited`).
    #[arg(long, value_delimiter = ',')]
    cells: Vec<GridCell>,
}

/// The scale experiment: its settings and the parts to run.
#[derive(Debug, Clone)]
pub struct Scale {
    /// The settings.
    pub config: ScaleConfig,
    /// The parts, in order.
    pub parts: Vec<Part>,
}

impl Suite for Args {
    fn name(&self) -> &'static str {
        "scale"
    }

    fn title(&self) -> String {
        "Discovery at scale".into()
    }

    fn plans(&self) -> Result<Vec<Box<dyn Plan>>> {
        let config = ScaleConfig {
            instances: self.instances.clone(),
            clients: self.clients.clone(),
            grid_modes: self.grid_modes.clone(),
            cells: self.cells.clone(),
            modes: self.modes.clone(),
            modes_instances: self.modes_instances,
            modes_clients: self.modes_clients,
            flip_for: self.flip_for,
            ..Default::default()
        };
        if config.instances.contains(&0) || config.clients.contains(&0) || config.modes_clients == 0
        {
            return Err(Error::Setting(
                "instance and client counts must be above zero".into(),
            ));
        }
        let parts = if self.only.is_empty() {
            vec![Part::Grid, Part::Modes]
        } else {
            self.only.clone()
        };
        Ok(vec![Box::new(Scale { config, parts })])
    }
}

impl OnItsOwn for Scale {
    type Outcome = ScaleReport;

    fn title(&self) -> String {
        "Instances × clients, and Consul's read modes".into()
    }

    /// Run the parts asked for; `progress` is told what happens on the long waits.
    async fn run_alone(&self, launcher: &Launcher, progress: &Progress) -> Result<ScaleReport> {
        let config = &self.config;
        if config.flips_per_second == 0 || config.flips() < 2 {
            return Err(Error::Setting(
                "at least 2 flips are needed (--flips-per-second × --flip-for)".into(),
            ));
        }
        let mut report = ScaleReport {
            consul_version: String::new(),
            config: config.clone(),
            grid: Vec::new(),
            modes: Vec::new(),
            modes_setup: String::new(),
        };
        if self.parts.contains(&Part::Grid) {
            run_grid(launcher, config, progress, &mut report).await?;
        }
        if self.parts.contains(&Part::Modes) {
            run_modes(launcher, config, progress, &mut report).await?;
        }
        Ok(report)
    }
}

impl Findings for ScaleReport {
    fn consul(&self) -> Option<String> {
        Some(self.consul_version.clone())
    }

    fn tables(&self) -> Vec<Table> {
        let c = &self.config;
        let mut tables = Vec::new();
        if !self.grid.is_empty() {
            tables.push(
                table(&self.grid, "instances × clients (mode)", |c| {
                    format!("{} × {} ({})", c.instances, c.clients, c.mode.name())
                })
                .caption(format!(
                    "Instances × clients: one dev agent; modes: {}",
                    grid_modes(&self.grid)
                        .iter()
                        .map(|m| format!("`{}` ({})", m.name(), m.query()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            );
        }
        if !self.modes.is_empty() {
            tables.push(
                table(&self.modes, "mode (query)", |c| {
                    format!("{} ({})", c.mode.name(), c.mode.query())
                })
                .caption(format!(
                    "Read modes: {} instances, {} clients on one client agent; {}",
                    c.modes_instances, c.modes_clients, self.modes_setup
                )),
            );
        }
        tables
    }

    fn details(&self) -> String {
        let c = &self.config;
        format!(
            "Consul {}. One instance's TTL check flipped critical/passing {} times a second for \
             {} ({} flips); each client is a process of its own running discovery only \
             (`testbed scale-client`, logging at warn). *answers/client/flip*: 1 means every \
             flip reached every client as an answer of its own; below 1 flips were coalesced. \
             *propagation*: from the flip's PUT returning to a client's view showing it (0 when \
             the view came first); a flip not shown before the flip after next was sent counts \
             as missed. *transfer*: from the answer's headers arriving to its body read (Consul \
             sending, the client reading). *client's share*: from the body read to the view \
             being published (decoding, building the view, updating the balancer). Percentiles \
             interpolate between the closest ranks. CPU from `/proc` (clients) and the agent's \
             container (cgroup, else its process). Every client reaches its agent from \
             127.0.0.1, so the agents run with `limits {{ http_max_conns_per_client = N }}` \
             raised to {} per client + 200 (grid: {}; modes: {}); at 1.8.7's default of 200 \
             the agent closed connections past the cap, the flipper's included.",
            self.consul_version,
            c.flips_per_second,
            c.flip_for,
            c.flips(),
            CONNS_PER_CLIENT,
            conn_limit(c.grid_cells().iter().map(|g| g.clients).max().unwrap_or(1)),
            conn_limit(c.modes_clients)
        )
    }

    fn plot(&self) -> Option<Plot> {
        (!self.grid.is_empty()).then(|| self.cost_plot())
    }
}

/// The modes of `cells`, in [`Mode`]'s order.
fn grid_modes(cells: &[Cell]) -> Vec<Mode> {
    let mut modes: Vec<Mode> = cells.iter().map(|c| c.mode).collect();
    modes.sort_unstable();
    modes.dedup();
    modes
}

impl ScaleReport {
    /// The grid: client CPU per answer and Consul CPU per flip against the instance count,
    /// one line per client count, both axes logarithmic.
    pub fn cost_plot(&self) -> Plot {
        let cells = &self.grid;
        let mut lines: Vec<(Mode, usize)> = cells.iter().map(|c| (c.mode, c.clients)).collect();
        lines.sort_unstable();
        lines.dedup();
        let mut series = Vec::new();
        for (k, &(mode, n)) in lines.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let mut row: Vec<&Cell> = cells
                .iter()
                .filter(|c| c.clients == n && c.mode == mode)
                .collect();
            row.sort_by_key(|c| c.instances);
            let mode = mode.name();
            series.push(Series {
                label: format!("client CPU per answer, {n} client(s), {mode}"),
                color,
                mark: Mark::Line(
                    row.iter()
                        .filter_map(|c| Some((c.instances as f64, c.client_cpu_per_answer_ms?)))
                        .collect(),
                ),
            });
            series.push(Series {
                label: format!("Consul CPU per flip, {n} client(s), {mode}"),
                color,
                mark: Mark::FadedLine(
                    row.iter()
                        .filter_map(|c| Some((c.instances as f64, c.consul.first()?.per_flip_ms)))
                        .collect(),
                ),
            });
        }
        Plot {
            title: format!(
                "Consul {}: the cost of one change against the instance count",
                self.consul_version
            ),
            x: Axis::log("instances of the service"),
            y: Axis::log("CPU milliseconds"),
            series,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    fn view(received: u64, at: u64, instances: usize) -> View {
        View {
            version: 0,
            instances,
            index: 0,
            at: t(at),
            received_at: t(received),
            read_at: t(received),
        }
    }

    fn flips(n: usize, listed: usize) -> Vec<Flip> {
        (0..n)
            .map(|k| Flip {
                sent: t(200 * k as u64),
                returned: t(200 * k as u64 + 2),
                expect: if k % 2 == 0 { listed - 1 } else { listed },
            })
            .collect()
    }

    #[test]
    fn a_view_line_round_trips() {
        let mut snapshot = Snapshot::starting();
        snapshot.index = 42;
        snapshot.version = 3;
        snapshot.received_at = t(5);
        snapshot.read_at = t(6);
        snapshot.at = t(7);
        let line = view_line(&snapshot);
        let parsed = parse_view(&line).unwrap();
        assert_eq!(parsed.instances, 0);
        assert_eq!(parsed.index, 42);
        assert_eq!(parsed.version, 3);
        assert_eq!(parsed.at, t(7));
        assert_eq!(parsed.received_at, t(5));
        assert_eq!(parsed.read_at, t(6));
        assert_eq!(parse_view("2026-01-01 INFO consul answers"), None);
        assert_eq!(
            parse_view("view version=1 instances=x index=1 at=1 received_at=1"),
            None
        );
        assert_eq!(parse_view("view version=1 instances=3 index=1 at=1"), None);
    }

    #[test]
    fn every_flip_is_matched_to_the_first_view_showing_it() {
        let f = flips(4, 10);
        let views = [
            view(0, 1, 10), // before the first flip's effect: the old count
            view(5, 6, 9),  // flip 0
            view(205, 207, 10),
            view(405, 409, 9),
            view(605, 612, 10),
        ];
        assert_eq!(
            match_flips(&f, &views, t(2_000)),
            vec![Some(1), Some(2), Some(3), Some(4)]
        );
        assert_eq!(ms_between(f[3].returned, views[4].at), 10.0);
        assert_eq!(
            ms_between(views[4].at, f[3].returned),
            0.0,
            "never negative"
        );
    }

    #[test]
    fn a_coalesced_flip_is_missed_and_the_next_one_still_matches() {
        let f = flips(4, 10);
        // Flips 0 and 1 land in one answer (it shows 10 again), flip 2 is seen, flip 3 late
        // but before the horizon.
        let views = [view(250, 255, 10), view(410, 420, 9), view(900, 905, 10)];
        assert_eq!(
            match_flips(&f, &views, t(2_000)),
            vec![None, Some(0), Some(1), Some(2)]
        );
        // An answer received before the flip was sent does not show it.
        let early = [view(590, 650, 10)];
        assert_eq!(match_flips(&f[3..], &early, t(2_000)), vec![None]);
        // A view published after the flip after next was sent is not this flip's.
        let late = [view(10, 450, 9)];
        assert_eq!(match_flips(&f, &late, t(2_000))[0], None);
    }

    #[test]
    fn a_missed_flip_is_told_late_from_unanswered() {
        let f = flips(3, 10);
        // Flip 0's answer arrives at 250 (before flip 2 is sent at 400) but its view is
        // published at 450: late by 200 ms. Flip 1 (10) is never shown: the next answer
        // already shows flip 2.
        let views = [view(250, 450, 9), view(500, 505, 9)];
        let horizon = t(2_000);
        let matched = match_flips(&f, &views, horizon);
        assert_eq!(matched, vec![None, None, Some(1)]);
        assert_eq!(
            why_missed(&f, &views, &matched, horizon),
            vec![
                (0, Missed::PublishedLate(200.0)),
                (1, Missed::NotAnswered(Some(48.0)))
            ]
        );
        // An answer arriving only after the flip after next was sent is not this flip's.
        let views = [view(450, 460, 9)];
        let matched = match_flips(&f, &views, horizon);
        assert_eq!(
            why_missed(&f, &views, &matched, horizon)[0],
            (0, Missed::NotAnswered(Some(448.0)))
        );
    }

    #[test]
    fn cached_modes_run_last_and_the_rest_keep_their_order() {
        use Mode::*;
        assert_eq!(
            run_order(&[Default, Cached, Filter, CachedFilter, Composed]),
            vec![Default, Filter, Composed, Cached, CachedFilter]
        );
    }

    #[test]
    fn one_view_never_shows_two_flips() {
        let f = flips(3, 10);
        // One view with the count of flips 0 and 2: it is flip 0's; flip 2 needs a later one.
        let views = [view(5, 6, 9)];
        assert_eq!(match_flips(&f, &views, t(2_000)), vec![Some(0), None, None]);
    }

    #[test]
    fn modes_ask_what_they_say() {
        let q = Mode::CachedFilter.query_options();
        assert!(q.cached);
        assert_eq!(q.filter.as_deref(), Some(SHARD_FILTER));
        assert_eq!(Mode::Stale.query_options().consistency, Consistency::Stale);
        assert_eq!(
            Mode::Default.discovery(SERVICE).consistency,
            Consistency::Default
        );
        assert!(!Mode::Default.discovery(SERVICE).cached);
        assert_eq!(Mode::Filter.expected(1_000), 100);
        assert_eq!(Mode::Filter.expected(5), 1);
        assert_eq!(Mode::Cached.expected(5_000), 5_000);
        let shard0 = (0..1_000)
            .filter(|i| registration(*i).meta["shard"] == "0")
            .count();
        assert_eq!(shard0, Mode::Filter.expected(1_000));
        assert_eq!(
            registration(0).meta["shard"],
            "0",
            "the flipped instance is in shard 0"
        );
    }

    #[test]
    fn cells_given_replace_the_product_and_run_by_instance_count() {
        let cell: GridCell = "1000x10:limited".parse().unwrap();
        assert_eq!(
            cell,
            GridCell {
                instances: 1000,
                clients: 10,
                mode: Mode::Limited
            }
        );
        for bad in ["1000x10", "1000:default", "0x10:default", "1000x10:nope"] {
            assert!(bad.parse::<GridCell>().is_err(), "{bad}");
        }
        let mut config = ScaleConfig {
            instances: vec![10, 1000],
            clients: vec![1, 10],
            grid_modes: vec![Mode::Default],
            ..Default::default()
        };
        assert_eq!(config.grid_cells().len(), 4, "the product");
        config.cells = ["1000x100:composed", "10x1:default", "1000x100:composed"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let cells = config.grid_cells();
        assert_eq!(cells.len(), 2, "{cells:?}");
        assert_eq!((cells[0].instances, cells[1].instances), (10, 1000));
        assert!(Mode::Limited.discovery(SERVICE).rate_limit == Some(LIMIT));
        let both = Mode::ComposedLimited.discovery(SERVICE);
        assert!(both.rate_limit == Some(LIMIT) && both.source == Source::Composed);
        assert_eq!(Mode::Default.discovery(SERVICE).rate_limit, None);
    }

    #[test]
    fn the_plot_is_written() {
        let dir = std::env::temp_dir().join(format!("scale-svg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cell = |instances, clients, cpu| Cell {
            part: "grid".into(),
            mode: Mode::Default,
            instances,
            listed: instances,
            clients,
            clients_ready: clients,
            ready_s: 1.0,
            flips: 100,
            window_s: 20.0,
            answer_bytes: 24_000,
            answer_ms: 1.0,
            answers: 100,
            answers_per_flip: 1.0,
            bytes_per_flip: 24_000.0,
            client_cpu_per_answer_ms: Some(cpu),
            client_cpu_per_flip_ms: cpu,
            client_rss_max_mib: 10.0,
            seen: 100,
            missed: 0,
            propagation_p50_ms: Some(1.0),
            propagation_p99_ms: Some(2.0),
            transfer_p50_ms: Some(0.2),
            transfer_p99_ms: None,
            client_added_p50_ms: Some(0.5),
            client_added_p99_ms: None,
            consul: vec![AgentCpu {
                agent: "agent".into(),
                cpu_s: 1.0,
                share_of_core: 0.05,
                per_flip_ms: cpu * 2.0,
                source: "cgroup".into(),
                peak_rss_mib: Some(50.0),
            }],
            saturated: false,
            notes: vec!["a note".into()],
        };
        let report = ScaleReport {
            consul_version: "1.8.7".into(),
            config: ScaleConfig::default(),
            grid: vec![cell(10, 1, 0.5), cell(1000, 1, 15.0), cell(10, 10, 0.6)],
            modes: vec![],
            modes_setup: String::new(),
        };
        let path = dir.join("scale.svg");
        report.plot().unwrap().svg(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("<svg"));
        assert!(text.contains("client CPU per answer, 10 client(s)"));
        let md: String = report.tables().iter().map(Table::markdown).collect();
        assert!(
            md.contains("| 1000 × 1 (default) | 1000 | 24.0 KB |"),
            "{md}"
        );
        assert!(md.contains("- 10 × 1 (default): a note"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
