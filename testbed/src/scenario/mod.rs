//! What every scenario (of `testbed faults` and `testbed cluster`) shares: its service and
//! deadline, its echo servers and resilient clients, the opening of a traffic scenario
//! (`Stage`), and what every scenario reports the same way ([`Basics`]: echoes, panics,
//! memory).
//!
//! * [`observers`] — the echo traffic and the discovery views a scenario watches.

pub mod observers;

use std::time::{Duration, Instant, SystemTime};

use echo_client::{ClientConfig, EchoClient};
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

/// An echo server of [`SERVICE`] with ID `id`, checked every `interval`.
pub(crate) fn server_spec(
    consul: consul_api::Config,
    id: &str,
    interval: Duration,
) -> Result<ServerSpec> {
    // Nothing is reaped during a scenario (Consul raises this to 1m anyway).
    Ok(ServerSpec::seed(consul)?.with_id(id).with_check(
        interval,
        interval,
        Duration::from_secs(60),
    ))
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

/// The cast of a traffic scenario: how many echo servers, how often Consul checks them, and
/// how often the client sends an echo.
#[derive(Debug, Clone, Copy)]
pub struct Cast {
    /// Echo servers started.
    pub servers: usize,
    /// Their check interval (the timeout is the same).
    pub interval: Duration,
    /// One echo every this long.
    pub every: Duration,
}

impl Default for Cast {
    /// 3 servers checked every second, an echo every 50 ms.
    fn default() -> Self {
        Cast {
            servers: 3,
            interval: Duration::from_secs(1),
            every: Duration::from_millis(50),
        }
    }
}

impl Cast {
    /// The same cast with `n` servers.
    pub fn servers(self, n: usize) -> Cast {
        Cast { servers: n, ..self }
    }

    /// The opening of a scenario with this cast, its traffic named `label`: the servers
    /// and the client talk to the agent itself, the client gives up on a silent instance
    /// after 2 s, and the traffic stops at 100,000 echoes.
    pub(crate) fn opening(self, label: &'static str) -> Opening {
        Opening {
            cast: self,
            label,
            via: None,
            reply_timeout: Duration::from_secs(2),
            max: 100_000,
        }
    }
}

/// How a scenario opens ([`Cast::opening`]); [`Opening::set_up`] sets the [`Stage`].
pub(crate) struct Opening {
    cast: Cast,
    label: &'static str,
    via: Option<consul_api::Config>,
    reply_timeout: Duration,
    max: u64,
}

impl Opening {
    /// Servers and client reach Consul through `via` (a proxy) instead.
    pub(crate) fn via(self, via: consul_api::Config) -> Opening {
        Opening {
            via: Some(via),
            ..self
        }
    }

    /// The client gives up on a silent instance after `timeout`.
    pub(crate) fn reply_timeout(self, timeout: Duration) -> Opening {
        Opening {
            reply_timeout: timeout,
            ..self
        }
    }

    /// The traffic stops at `max` echoes.
    pub(crate) fn max(self, max: u64) -> Opening {
        Opening { max, ..self }
    }

    /// Set the stage: the servers registered and passing, a resilient client whose
    /// discovery lists them all, and steady traffic with 20 good echoes behind it.
    pub(crate) async fn set_up(self, launcher: &Launcher, consul: &Consul) -> Result<Stage> {
        let via = self.via.unwrap_or_else(|| consul.config());
        let Cast {
            servers: n,
            interval,
            every,
        } = self.cast;
        let servers = start_servers(launcher, consul, via.clone(), n, interval).await?;
        let ids = ids(&servers);
        let client = client(via, self.reply_timeout)?;
        let discovery = observers::DiscoveryLog::start(&client);
        let listed = discovery
            .wait_for(
                "discovery to list every server",
                Instant::now(),
                LIMIT,
                |v| v.lists_all(&ids),
            )
            .await?;
        let traffic = observers::Stream::start(
            &client,
            observers::StreamSpec::every(self.label, every, self.max),
        );
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

/// The opening every traffic scenario shares: its servers registered, a resilient client
/// whose discovery lists them all, and steady traffic with 20 good echoes behind it.
pub(crate) struct Stage {
    pub servers: Vec<ServerProcess>,
    pub ids: Vec<String>,
    /// The client, held for the scenario's length (the traffic and discovery run on it).
    #[allow(dead_code)]
    pub client: EchoClient,
    pub discovery: observers::DiscoveryLog,
    /// The discovery view that first listed every server.
    pub listed: observers::View,
    pub traffic: observers::Stream,
}

impl Stage {
    /// Marks in every server's output, to read what each logs from here on.
    pub(crate) fn marks(&self) -> Vec<usize> {
        self.servers
            .iter()
            .map(|s| s.process.output().mark())
            .collect()
    }

    /// Stop the traffic; its echoes and what became of the servers.
    pub(crate) async fn finish(mut self) -> (Vec<observers::Outcome>, Basics) {
        let outcomes = self.traffic.finish().await;
        let basics = Basics::of(&outcomes, &mut self.servers);
        (outcomes, basics)
    }
}

/// Since `from` (a wall-clock moment), until the last of the `servers` that logged a Consul
/// error after its mark logs that Consul answers again: how many had, and the time (`None`
/// when one never did, or none had).
pub(crate) async fn servers_back(
    servers: &[ServerProcess],
    marks: &[usize],
    from: SystemTime,
) -> (usize, Option<Duration>) {
    let mut noticed = 0;
    let mut back = Some(Duration::ZERO);
    for (s, mark) in servers.iter().zip(marks) {
        let output = s.process.output();
        if output.find_after(*mark, "retrying with backoff").is_none() {
            continue;
        }
        noticed += 1;
        let at = output
            .wait_for_after(*mark, "Consul answers again", LIMIT)
            .await
            .ok()
            .map(|l| since_wall(from, l.received));
        back = back.zip(at).map(|(a, b)| a.max(b));
    }
    (noticed, back.filter(|_| noticed > 0))
}

/// What every traffic scenario reports the same way: its echoes, and what became of its echo
/// servers. A scenario's outcome holds it (flattened into the outcome's JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Basics {
    /// Every echo of the run.
    pub tally: observers::Tally,
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
        tally: observers::Tally,
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
    pub(crate) fn of(outcomes: &[observers::Outcome], servers: &mut [ServerProcess]) -> Basics {
        Basics::new(
            observers::Tally::of(outcomes),
            observers::errors(outcomes),
            servers,
        )
    }

    /// The invariants every scenario shares that did not hold: no echo lost, no panic.
    pub fn violations(&self) -> Vec<String> {
        observers::shared_violations(&self.tally, &self.panics)
    }
}

/// The service IDs of `servers`.
pub(crate) fn ids(servers: &[ServerProcess]) -> Vec<String> {
    servers.iter().map(|s| s.spec.args.id.clone()).collect()
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
            .then(|| format!("{} exited", s.spec.args.id))
    }));
    found
}

/// One echo straight to a server's port (not through discovery).
pub(crate) async fn echo_direct(addr: std::net::SocketAddr, payload: &[u8]) -> bool {
    echo_rig::hostile::echo_direct(addr, payload).await
}

/// The time from `from` to a wall-clock moment (a log line's arrival), zero if before.
pub(crate) fn since_wall(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or_default()
}
