//! Scenario 7, blackholed instances: three instances Consul lists as passing drop every SYN
//! (on loopback: a listener that never accepts, its accept queue full), one healthy server
//! answers. A client at its defaults (connect timeout 1 s, cooldown 2 s, round-robin, the
//! blackholed ones first) sends 20 echoes 50 ms apart. A connect is one event of the
//! client's session and a second connect races it after 250 ms, so the stream must take
//! about its own length plus at most one connect timeout. Must hold: no echo lost, every
//! echo answered by the healthy server, at most one connect timeout (and a tenth of one for the timer) over the stream — beyond
//! what a reply takes on this machine at that moment, measured in the same stream (the
//! slowest reply to a message sent once the first reply had come: a connection was up),
//! so a loaded machine's scheduling is not counted as the client's.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use consul_api::{AgentServiceCheck, AgentServiceRegistration, GoDuration};
use echo_client::{ClientConfig, EchoClient};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

use super::{Row, Rows, Scenario};
use crate::{
    error::{Error, Result},
    procs::{Launcher, ServerProcess},
};
use crate::{
    experiment::{Env, Experiment},
    progress::Progress,
    report::{self, ms_serde as ms},
    scenario::{
        self, Basics, LIMIT, SERVICE,
        observers::{DiscoveryLog, Stream, StreamSpec},
    },
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Blackholed instances listed as passing.
    pub holes: usize,
    /// Echoes in the stream.
    pub messages: u64,
    /// One every this long.
    pub every: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            holes: 3,
            messages: 20,
            every: Duration::from_millis(50),
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Blackholed instances listed as passing.
    pub holes: usize,
    /// The client's connect timeout.
    #[serde(with = "ms")]
    pub connect_timeout: Duration,
    /// The stream's own length (first to last send, at its pace).
    #[serde(with = "ms")]
    pub stream: Duration,
    /// First send to last reply.
    #[serde(with = "ms")]
    pub took: Duration,
    /// The longest a message waited for its reply (the first ones wait for the connect).
    #[serde(with = "ms")]
    pub slowest: Duration,
    /// The longest reply to a message sent after the first reply came (a connection was up):
    /// what a reply costs on this machine at the time, no connect in it.
    #[serde(with = "ms")]
    pub connected_slowest: Duration,
    /// The instances that answered.
    pub served_by: Vec<String>,
    /// The one healthy server's ID.
    pub healthy: String,
    /// Its echoes and what became of its echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Outcome {
    /// `took` beyond the stream's own length.
    pub fn extra(&self) -> Duration {
        self.took.saturating_sub(self.stream)
    }

    /// The invariants that did not hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        if self.basics.tally.sent == 0 {
            v.push("no echo was sent".into());
        }
        // A tenth of a timeout for the timer's own wake-up on a loaded machine (20 ms seen at
        // a load of 10 on 2 cores): still far from the second timeout this tells apart.
        let allowed = self.connect_timeout + self.connect_timeout / 10 + self.connected_slowest;
        if self.extra() > allowed || self.slowest > allowed {
            v.push(format!(
                "the stream took {} beyond its length, its slowest reply {}: more than one \
                 connect timeout ({}, and a tenth for the timer) beyond a reply on an open \
                 connection ({})",
                report::secs(self.extra()),
                report::secs(self.slowest),
                report::secs(self.connect_timeout),
                report::secs(self.connected_slowest)
            ));
        }
        if self.served_by.iter().any(|id| *id != self.healthy) {
            v.push(format!("answered by {:?}", self.served_by));
        }
        v
    }
}

impl Rows for Outcome {
    /// The table's row.
    fn rows(&self) -> Vec<Row> {
        vec![Row {
            scenario: Scenario::Blackholed.title().into(),
            injected: format!(
                "{} passing instances that drop SYNs, 1 healthy; {} echoes 50 ms apart",
                self.holes, self.basics.tally.sent
            ),
            sent: self.basics.tally.sent,
            lost: self.basics.tally.lost,
            recovery: format!(
                "stream of {} answered in {} ({} extra; slowest reply {}, on an open connection {}; connect timeout {})",
                report::secs(self.stream),
                report::secs(self.took),
                report::secs(self.extra()),
                report::secs(self.slowest),
                report::secs(self.connected_slowest),
                report::secs(self.connect_timeout)
            ),
            recovery_ms: Some(self.extra().as_secs_f64() * 1e3),
            peak_rss_kib: None,
            violations: self.violations(),
        }]
    }

    /// How each figure was measured, with the figures.
    fn details(&self) -> String {
        format!(
            "**7. Blackholed instances.** {} instances registered passing (TTL check) on \
             listeners whose accept queue is full, so their SYNs are dropped, sorted before the \
             one healthy server. A client at its defaults sent {} echoes {} apart from the \
             moment its discovery listed all of them: the last reply came {} after the first \
             send, {} beyond the stream's own length; the slowest reply (the first message's, \
             waiting for a connect) took {}, the slowest once a connection was up {} (connect \
             timeout {}). {} lost.\n",
            self.holes,
            self.basics.tally.sent,
            report::secs(self.stream / (self.basics.tally.sent.max(2) as u32 - 1)),
            report::secs(self.took),
            report::secs(self.extra()),
            report::secs(self.slowest),
            report::secs(self.connected_slowest),
            report::secs(self.connect_timeout),
            self.basics.tally.lost,
        )
    }
}

/// A listener on 127.0.0.1 that never accepts, with its accept queue full: the kernel drops
/// further SYNs, so a connect to it hangs until the caller's timeout.
#[derive(Debug)]
pub struct Blackhole {
    addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    /// Listen with the smallest backlog and fill it.
    pub async fn start() -> Result<Blackhole> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(0)?;
        let addr = listener.local_addr()?;
        let mut queued = Vec::new();
        // Connects complete until the queue is full; then one hangs.
        while let Ok(stream) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            queued.push(stream?);
            if queued.len() > 16 {
                return Err(Error::Scenario(
                    "the blackhole's accept queue never filled".into(),
                ));
            }
        }
        Ok(Blackhole {
            addr,
            _listener: listener,
            _queued: queued,
        })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::Blackholed.title().into()
    }
    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let consul = env.agent()?;
        step.say("registering blackholed instances and a healthy server");
        let mut holes = Vec::new();
        let mut ids = Vec::new();
        for i in 1..=self.holes {
            let hole = Blackhole::start().await?;
            let id = format!("{SERVICE}_{i}");
            let registration = AgentServiceRegistration {
                id: Some(id.clone()),
                name: SERVICE.into(),
                address: Some(hole.addr().ip().to_string()),
                port: Some(hole.addr().port()),
                check: Some(AgentServiceCheck {
                    ttl: Some(GoDuration::from_secs(600)),
                    status: Some("passing".into()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            consul
                .client()
                .agent()
                .service_register(&registration)
                .await?;
            holes.push(hole);
            ids.push(id);
        }
        let healthy = format!("{SERVICE}_{}", self.holes + 1);
        let spec = scenario::server_spec(consul.config(), &healthy, Duration::from_secs(1))?;
        let mut servers = vec![ServerProcess::spawn(launcher, spec).await?];
        ids.push(healthy.clone());

        let client_config = ClientConfig::new(consul.config(), SERVICE);
        let connect_timeout = client_config.session.connect_timeout;
        let client = EchoClient::start(client_config)?;
        let discovery = DiscoveryLog::start(&client);
        discovery
            .wait_for(
                "discovery to list every instance",
                Instant::now(),
                LIMIT,
                |v| v.lists_all(&ids),
            )
            .await?;
        step.say("sending the stream");
        let traffic = Stream::start(
            &client,
            StreamSpec::every("blackholed", self.every, self.messages),
        );
        traffic
            .wait_for("the last echo", LIMIT, |o| o.seq == self.messages)
            .await?;
        let outcomes = traffic.finish().await;
        let first = outcomes.iter().map(|o| o.sent).min();
        let last_sent = outcomes.iter().map(|o| o.sent).max();
        let last = outcomes.iter().map(|o| o.done).max();
        let took = match (first, last) {
            (Some(f), Some(l)) => l.saturating_duration_since(f),
            _ => Duration::ZERO,
        };
        let slowest = outcomes
            .iter()
            .map(|o| o.done.saturating_duration_since(o.sent))
            .max()
            .unwrap_or_default();
        let first_reply = outcomes.iter().map(|o| o.done).min();
        let connected_slowest = outcomes
            .iter()
            .filter(|o| first_reply.is_some_and(|f| o.sent >= f))
            .map(|o| o.done.saturating_duration_since(o.sent))
            .max()
            .unwrap_or_default();
        let mut served_by: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().ok().map(|s| s.instance.clone()))
            .collect();
        served_by.sort();
        served_by.dedup();
        Ok(Outcome {
            holes: self.holes,
            connect_timeout,
            // As the sends went: on a loaded machine the pacing itself runs late, which is
            // the machine's, not the client's.
            stream: match (first, last_sent) {
                (Some(f), Some(l)) => l.saturating_duration_since(f),
                _ => Duration::ZERO,
            },
            took,
            slowest,
            connected_slowest,
            served_by,
            healthy,
            basics: Basics::of(&outcomes, &mut servers),
        })
    }
}
