//! Scale out and in under load, the seed article's use case: a gateway (a fleet of resilient
//! sessions sharing one discovery) streams at a steady rate over 2 echo servers; 4 more start
//! and each should take its share; then those 4 get SIGTERM and none of their messages may
//! be lost. Measured with round-robin and with power-of-two-choices sessions.
//!
//! Figures: for each new server, from its start to Consul listing it passing (its first
//! check), and from there to its first reply through the fleet (propagation to discovery plus
//! the sessions' move, [`SessionConfig::spread`]); how even the spread is over the steady
//! window that follows; after the SIGTERMs, messages lost (must be 0) and how long until no
//! reply came from a stopped server.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use consul_api::GoDuration;
use consul_registry::{DiscoveryConfig, Strategy, discovery};
use echo_client::{EchoClient, session::SessionConfig};
use futures::future::try_join_all;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    consul::{Consul, ConsulOptions},
    error::{Error, Result},
    experiment::{Findings, OnItsOwn},
    procs::{Launcher, ServerProcess, ServerSpec},
    progress::Progress,
    report::{Table, ms_between},
    signal::Signal,
    wait,
};

const SERVICE: &str = "elastic";

/// How a scale-out-and-in run is set up.
#[derive(Debug, Clone, Serialize)]
pub struct ElasticConfig {
    /// Servers before the scale-out.
    pub initial: usize,
    /// Servers added, then stopped.
    pub added: usize,
    /// Sessions in the gateway's fleet (each one connection).
    pub sessions: usize,
    /// Each session sends one message, waits for its reply, then waits this long.
    pub message_interval: GoDuration,
    /// The servers' check interval (and timeout).
    pub interval: GoDuration,
    /// How long the steady window after the scale-out lasts, where shares are counted.
    pub steady: GoDuration,
}

impl Default for ElasticConfig {
    fn default() -> Self {
        ElasticConfig {
            initial: 2,
            added: 4,
            sessions: 48,
            message_interval: GoDuration(Duration::from_millis(80)),
            interval: GoDuration::from_secs(1),
            steady: GoDuration::from_secs(5),
        }
    }
}

/// One new server's figures.
#[derive(Debug, Clone, Serialize)]
pub struct NewServer {
    /// Its service ID.
    pub id: String,
    /// From its start (it listens) to the gateway's discovery listing it passing, seconds
    /// (its first check, Consul's blocking query answering, discovery publishing).
    pub in_view_after: Option<f64>,
    /// From the gateway's view listing it to its first reply through the fleet, seconds (the
    /// sessions' move).
    pub first_reply_after_view: Option<f64>,
}

/// One strategy's run.
#[derive(Debug, Clone, Serialize)]
pub struct ElasticRun {
    /// `round-robin` or `p2c`.
    pub strategy: String,
    /// Every new server's figures.
    pub new_servers: Vec<NewServer>,
    /// Share of the steady window's replies, per server ID (sums to 1).
    pub shares: BTreeMap<String, f64>,
    /// The largest share divided by the smallest.
    pub max_over_min: f64,
    /// Sessions per server at the end of the steady window (each session is one connection).
    pub sessions_per_server: BTreeMap<String, usize>,
    /// What independent random choices give: the standard deviation of one server's share
    /// of sessions, sqrt(p(1-p)/sessions) with p = 1/servers.
    pub expected_share_sd: f64,
    /// Messages sent over the whole run.
    pub sent: u64,
    /// Of them, lost (failed or not byte-exact): must be 0.
    pub lost: u64,
    /// From the SIGTERMs to the last reply from a stopped server, seconds.
    pub drained_after: f64,
    /// Messages answered after the SIGTERMs that had been written to a stopped server and
    /// were resent (`attempts` > 1).
    pub resent_after_stop: u64,
}

/// Both runs.
#[derive(Debug, Clone, Serialize)]
pub struct ElasticReport {
    /// The agent's version.
    pub consul_version: String,
    /// How the runs were set up.
    pub config: ElasticConfig,
    /// Round-robin, then power-of-two-choices.
    pub runs: Vec<ElasticRun>,
}

#[derive(Debug, Clone)]
struct Served {
    at: SystemTime,
    id: String,
    attempts: u32,
    session: usize,
}

#[derive(Debug, Default)]
struct Tally {
    served: Vec<Served>,
    sent: u64,
    lost: u64,
}

async fn start_servers(
    launcher: &Launcher,
    consul: &Consul,
    config: &ElasticConfig,
    ids: impl Iterator<Item = usize>,
) -> Result<Vec<(ServerProcess, SystemTime)>> {
    try_join_all(ids.map(|i| async move {
        let mut spec = ServerSpec::seed(consul.config())?.named(SERVICE, format!("{SERVICE}_{i}"));
        spec.args.interval = GoDuration(config.interval.0);
        spec.args.timeout = GoDuration(config.interval.0);
        let server = ServerProcess::spawn(launcher, spec).await?;
        Ok::<_, Error>((server, SystemTime::now()))
    }))
    .await
}

async fn run_one(
    launcher: &Launcher,
    config: &ElasticConfig,
    strategy: Strategy,
    name: &str,
) -> Result<(ElasticRun, String)> {
    let consul = Consul::start_with(ConsulOptions::from_env()?).await?;
    let client = consul.client();
    let initial = start_servers(launcher, &consul, config, 1..=config.initial).await?;
    wait::health_until(&client, SERVICE, true, Duration::from_secs(30), |e| {
        e.len() == config.initial
    })
    .await?;
    let gateway = Gateway::start(&client, config, strategy)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Scale out.
    let total = config.initial + config.added;
    let added = start_servers(launcher, &consul, config, config.initial + 1..=total).await?;
    wait::health_until(&client, SERVICE, true, Duration::from_secs(30), |e| {
        e.len() == total
    })
    .await?;
    gateway.until_answered(&added).await;
    let steady_from = SystemTime::now();
    tokio::time::sleep(config.steady.0).await;
    let steady_to = SystemTime::now();

    // Scale in: SIGTERM to every added server at once.
    let stopped_at = SystemTime::now();
    for (server, _) in &added {
        server.process.signal(Signal::SIGTERM)?;
    }
    for (server, _) in &added {
        let id = server.spec.args.id.clone();
        wait::deregistered(&client, SERVICE, &id, Duration::from_secs(15)).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (tally, in_view) = gateway.stop().await?;
    let run = measure(
        name,
        config,
        &tally,
        &in_view,
        &added,
        (steady_from, steady_to, stopped_at),
    );
    drop(initial);
    Ok((run, consul.version().to_owned()))
}

/// The gateway: sessions over one discovery, each streaming echoes, and a watch of when each
/// instance first entered the discovery's view.
struct Gateway {
    in_view: Arc<Mutex<BTreeMap<String, SystemTime>>>,
    viewer: tokio::task::JoinHandle<()>,
    tally: Arc<Mutex<Tally>>,
    stop: CancellationToken,
    senders: Vec<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// `config.sessions` sessions of `strategy` over one discovery through `client`.
    fn start(
        client: &consul_api::Client,
        config: &ElasticConfig,
        strategy: Strategy,
    ) -> Result<Gateway> {
        let rx = discovery::spawn(client.clone(), DiscoveryConfig::new(SERVICE));
        let in_view: Arc<Mutex<BTreeMap<String, SystemTime>>> = Arc::default();
        let viewer = tokio::spawn({
            let mut rx = rx.clone();
            let in_view = in_view.clone();
            async move {
                while rx.changed().await.is_ok() {
                    let now = SystemTime::now();
                    let ids: Vec<String> =
                        rx.borrow().instances.iter().map(|i| i.id.clone()).collect();
                    let mut seen = in_view.lock().unwrap_or_else(PoisonError::into_inner);
                    for id in ids {
                        seen.entry(id).or_insert(now);
                    }
                }
            }
        });
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = CancellationToken::new();
        let mut senders = Vec::new();
        for s in 0..config.sessions {
            let mut session = SessionConfig::new(SERVICE);
            session.strategy = strategy;
            session.message_timeout = Duration::from_secs(10);
            let echo = EchoClient::with_discovery(rx.clone(), session)?;
            senders.push(tokio::spawn(stream(
                echo,
                s,
                config.message_interval.0,
                tally.clone(),
                stop.clone(),
            )));
        }
        Ok(Gateway {
            in_view,
            viewer,
            tally,
            stop,
            senders,
        })
    }

    /// Until every one of `added` has answered, at most 10 s.
    async fn until_answered(&self, added: &[(ServerProcess, SystemTime)]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            let answered = {
                let t = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
                added
                    .iter()
                    .all(|(s, _)| t.served.iter().any(|r| r.id == s.spec.args.id))
            };
            if answered {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop every session; what they counted, and when each instance entered the view.
    async fn stop(self) -> Result<(Tally, BTreeMap<String, SystemTime>)> {
        self.stop.cancel();
        for sender in self.senders {
            sender.await.map_err(|source| Error::Task {
                what: "a session's sender",
                source,
            })?;
        }
        self.viewer.abort();
        let tally = std::mem::take(&mut *self.tally.lock().unwrap_or_else(PoisonError::into_inner));
        let in_view =
            std::mem::take(&mut *self.in_view.lock().unwrap_or_else(PoisonError::into_inner));
        Ok((tally, in_view))
    }
}

/// The run's figures from what the sessions counted (`t`): how fast each of `added` took
/// load, the shares in the steady window, and the drain after the scale-in at `stopped_at`.
fn measure(
    name: &str,
    config: &ElasticConfig,
    t: &Tally,
    in_view: &BTreeMap<String, SystemTime>,
    added: &[(ServerProcess, SystemTime)],
    (steady_from, steady_to, stopped_at): (SystemTime, SystemTime, SystemTime),
) -> ElasticRun {
    let total = config.initial + config.added;
    let new_servers = added
        .iter()
        .map(|(server, started)| {
            let id = server.spec.args.id.clone();
            let first = t.served.iter().filter(|r| r.id == id).map(|r| r.at).min();
            let viewed = in_view.get(&id).copied();
            NewServer {
                in_view_after: viewed.map(|v| ms_between(*started, v) / 1e3),
                first_reply_after_view: first.zip(viewed).map(|(f, v)| ms_between(v, f) / 1e3),
                id,
            }
        })
        .collect();
    let mut last_server: BTreeMap<usize, (SystemTime, String)> = BTreeMap::new();
    for r in t.served.iter().filter(|r| r.at < steady_to) {
        last_server.insert(r.session, (r.at, r.id.clone()));
    }
    let mut sessions_per_server: BTreeMap<String, usize> = BTreeMap::new();
    for (_, id) in last_server.values() {
        *sessions_per_server.entry(id.clone()).or_default() += 1;
    }
    let p = 1.0 / total as f64;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for r in t
        .served
        .iter()
        .filter(|r| r.at >= steady_from && r.at < steady_to)
    {
        *counts.entry(r.id.clone()).or_default() += 1;
    }
    let window: u64 = counts.values().sum();
    let shares: BTreeMap<String, f64> = counts
        .iter()
        .map(|(id, n)| (id.clone(), *n as f64 / window.max(1) as f64))
        .collect();
    let max = shares.values().copied().fold(0.0, f64::max);
    let min = if shares.len() == total {
        shares.values().copied().fold(1.0, f64::min)
    } else {
        0.0
    };
    let stopped: Vec<&str> = added.iter().map(|(s, _)| s.spec.args.id.as_str()).collect();
    let after_stop: Vec<&Served> = t.served.iter().filter(|r| r.at >= stopped_at).collect();
    let drained = after_stop
        .iter()
        .filter(|r| stopped.contains(&r.id.as_str()))
        .map(|r| r.at)
        .max()
        .map_or(0.0, |last| ms_between(stopped_at, last) / 1e3);
    ElasticRun {
        strategy: name.into(),
        new_servers,
        shares,
        max_over_min: if min > 0.0 { max / min } else { f64::INFINITY },
        sessions_per_server,
        expected_share_sd: (p * (1.0 - p) / config.sessions as f64).sqrt(),
        sent: t.sent,
        lost: t.lost,
        drained_after: drained,
        resent_after_stop: after_stop.iter().filter(|r| r.attempts > 1).count() as u64,
    }
}

async fn stream(
    echo: EchoClient,
    session: usize,
    every: Duration,
    tally: Arc<Mutex<Tally>>,
    stop: CancellationToken,
) {
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        seq += 1;
        let payload = Bytes::from(format!("session {session} message {seq}"));
        let result = echo.send(payload.clone()).await;
        {
            let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
            t.sent += 1;
            match result {
                Ok(reply) if reply.bytes == payload => t.served.push(Served {
                    at: SystemTime::now(),
                    id: reply.instance.id,
                    attempts: reply.attempts,
                    session,
                }),
                Ok(_) => t.lost += 1,
                Err(e) => {
                    tracing::error!(session, seq, "message lost: {e}");
                    t.lost += 1;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => {}
        }
    }
}

// === the contract ===

impl OnItsOwn for ElasticConfig {
    type Outcome = ElasticReport;

    fn title(&self) -> String {
        "Elastic: scale out and in under load".into()
    }

    /// Run the experiment with both strategies, each on its own Consul.
    async fn run_alone(&self, launcher: &Launcher, progress: &Progress) -> Result<ElasticReport> {
        if self.initial == 0 || self.added == 0 || self.sessions == 0 {
            return Err(Error::Setting(
                "scale out and in needs initial, added and sessions above 0".into(),
            ));
        }
        let mut runs = Vec::new();
        let mut version = String::new();
        for (strategy, name) in [
            (Strategy::RoundRobin, "round-robin"),
            (Strategy::PowerOfTwoChoices, "p2c"),
        ] {
            progress.say(format!("scale out and in, {name} sessions"));
            let (run, v) = run_one(launcher, self, strategy, name).await?;
            version = v;
            runs.push(run);
        }
        Ok(ElasticReport {
            consul_version: version,
            config: self.clone(),
            runs,
        })
    }
}

impl Findings for ElasticReport {
    fn consul(&self) -> Option<String> {
        Some(self.consul_version.clone())
    }

    fn tables(&self) -> Vec<Table> {
        let mut moved = Table::new([
            "sessions",
            "new server",
            "start → in the gateway's view",
            "in view → first reply",
        ]);
        for run in &self.runs {
            for s in &run.new_servers {
                moved.push([
                    run.strategy.clone(),
                    s.id.clone(),
                    s.in_view_after
                        .map_or("never".into(), |v| format!("{v:.2} s")),
                    s.first_reply_after_view
                        .map_or("never".into(), |f| format!("{:.0} ms", f * 1e3)),
                ]);
            }
        }
        let mut shares = Table::new([
            "sessions".to_owned(),
            format!("shares over the {} steady window", self.config.steady),
            "largest / smallest".into(),
            "sessions per server".into(),
            "sent".into(),
            "lost".into(),
            "SIGTERM → last reply from a stopped server".into(),
            "resent after the SIGTERMs".into(),
        ])
        .align_right([2, 4, 5, 6, 7]);
        for run in &self.runs {
            let of = |parts: Vec<String>| parts.join(", ");
            shares.push([
                run.strategy.clone(),
                of(run
                    .shares
                    .iter()
                    .map(|(id, s)| format!("{id} {:.0}%", s * 100.0))
                    .collect()),
                format!("{:.2}", run.max_over_min),
                of(run
                    .sessions_per_server
                    .iter()
                    .map(|(id, n)| format!("{id} {n}"))
                    .collect()),
                run.sent.to_string(),
                run.lost.to_string(),
                format!("{:.0} ms", run.drained_after * 1e3),
                run.resent_after_stop.to_string(),
            ]);
        }
        vec![moved, shares]
    }

    fn details(&self) -> String {
        let c = &self.config;
        let mut md = format!(
            "Consul {}, one agent. A gateway of {} resilient sessions (one discovery, health \
             blocking queries) streams, each session one message every {} after the last reply, \
             over {} echo servers checked every {}; {} more start, then get SIGTERM.\n",
            self.consul_version, c.sessions, c.message_interval, c.initial, c.interval, c.added
        );
        if let Some(run) = self.runs.first() {
            md.push_str(&format!(
                "\nEach session is one connection and chooses on its own: a new server takes the \
                 sessions that draw it (probability added/total each), so shares follow \
                 independent random choices, with a standard deviation of {:.1} points per server \
                 at {} sessions — the unevenness above is that, not a lag.\n",
                run.expected_share_sd * 100.0,
                c.sessions
            ));
        }
        md
    }

    fn violations(&self) -> Vec<String> {
        self.runs
            .iter()
            .filter(|r| r.lost > 0)
            .map(|r| format!("{}: {} message(s) lost", r.strategy, r.lost))
            .collect()
    }
}
