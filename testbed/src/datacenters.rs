//! Failover to a second datacenter: dc1 and dc2 (each a server and a client agent on their
//! own loopback addresses, WAN-joined), echo servers in both. Clients on dc1's client node
//! stream through the loss of every dc1 instance and their return, each finding instances its
//! own way: blocking health queries on dc1 then dc2 through the local agent
//! ([`consul_registry::failover`]), a prepared query with `Failover.Datacenters` (polled over
//! HTTP), and the same query through DNS (`<query>.query.consul`).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use consul_api::{Client, GoDuration, QueryOptions};
use consul_harness::cluster::{Cluster, ClusterSpec, Member};
use consul_registry::{DiscoveryConfig, Snapshot, Source, discovery, failover};
use echo_client::{EchoClient, session::SessionConfig};
use futures::future::try_join_all;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    experiment::{Findings, OnItsOwn},
    procs::{Launcher, ServerProcess, ServerSpec},
    progress::Progress,
    report::Table,
    wait,
};

/// The service in both datacenters.
pub const SERVICE: &str = "echo-dc";
/// The prepared query (in dc1) that fails over to dc2.
pub const QUERY: &str = "echo-dc-failover";

/// What the prepared query answered.
#[derive(Debug, Clone, Serialize)]
pub struct QueryAnswer {
    /// `Datacenter`.
    pub datacenter: String,
    /// `Failovers`.
    pub failovers: u32,
    /// Instances listed.
    pub instances: usize,
}

/// One client's figures.
#[derive(Debug, Clone, Serialize)]
pub struct DcRow {
    /// `health dc1→dc2`, `prepared query`, `prepared query over DNS`.
    pub client: String,
    /// From the kill of every dc1 instance to the first reply from dc2, ms.
    pub first_dc2_reply_ms: Option<f64>,
    /// From dc1's instances passing again to the first reply from dc1 again, seconds.
    pub back_to_dc1_s: Option<f64>,
    /// Messages sent from the kill on.
    pub sent: u64,
    /// Of them, lost: must be 0.
    pub lost: u64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct DatacentersReport {
    /// The agents' version.
    pub consul_version: String,
    /// Echo servers per datacenter.
    pub servers_per_dc: usize,
    /// How often the polled clients read.
    pub poll: GoDuration,
    /// The prepared query's answer with dc1 healthy.
    pub query_before: QueryAnswer,
    /// Its answer with every dc1 instance dead.
    pub query_during: QueryAnswer,
    /// One row per client.
    pub rows: Vec<DcRow>,
    /// From the restart of dc1's servers to Consul listing them passing, seconds.
    pub dc1_passing_again_s: f64,
}

#[derive(Debug, Default)]
struct Tally {
    /// (when, the answering instance's host).
    replies: Vec<(SystemTime, String)>,
    sent_after_kill: u64,
    lost_after_kill: u64,
}

async fn dc_servers(
    launcher: &Launcher,
    cluster: &Cluster,
    dc: &str,
    n: usize,
) -> Result<Vec<ServerProcess>> {
    let agent = cluster.agent(Member::Client(0));
    try_join_all((1..=n).map(|i| async move {
        let mut spec = ServerSpec::seed(agent.config())?
            .named(SERVICE, format!("{SERVICE}_{dc}_{i}"))
            .on_address(agent.spec().address)?;
        spec.args.interval = GoDuration(Duration::from_secs(1));
        spec.args.timeout = GoDuration(Duration::from_secs(1));
        Ok::<_, Error>(ServerProcess::spawn(launcher, spec).await?)
    }))
    .await
}

async fn query_answer(client: &Client) -> Result<QueryAnswer> {
    let (answer, _) = client
        .prepared_query()
        .execute(QUERY, &QueryOptions::default())
        .await?;
    Ok(QueryAnswer {
        datacenter: answer.datacenter,
        failovers: answer.failovers,
        instances: answer.nodes.len(),
    })
}

/// dc1 and dc2, one server and one client agent each, WAN-joined; once dc1 sees dc2.
async fn start_datacenters(progress: &Progress) -> Result<(Cluster, Cluster)> {
    progress.say("starting dc1 (1 server, 1 client agent)");
    let dc1 = Cluster::start(ClusterSpec {
        datacenter: "dc1".into(),
        ..ClusterSpec::new(1, 1)
    })
    .await?;
    progress.say("starting dc2 (1 server, 1 client agent), WAN-joined to dc1");
    let dc2 = Cluster::start(ClusterSpec {
        datacenter: "dc2".into(),
        join_wan: dc1.server_addresses(),
        ..ClusterSpec::new(1, 1)
    })
    .await?;
    let client = dc1.agent(Member::Client(0)).client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let dcs = client.catalog().datacenters().await.unwrap_or_default();
        if dcs.iter().any(|d| d == "dc2") {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: "dc1 to see dc2 over the WAN".into(),
                timeout: Duration::from_secs(60),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((dc1, dc2))
}

/// Until `servers` instances of [`SERVICE`] pass in the datacenter `client` reads.
async fn all_passing(client: &Client, dc: &str, servers: usize) -> Result<()> {
    wait::health_until(client, SERVICE, true, Duration::from_secs(30), |e| {
        e.len() == servers
    })
    .await
    .map_err(|e| Error::Scenario(format!("{dc}'s servers never passed: {e}")))?;
    Ok(())
}

/// The three ways dc1's client node finds instances: blocking health on dc1 then dc2, the
/// prepared query polled over HTTP, and the same query over DNS.
fn discoveries(
    local: &crate::Consul,
    poll: Duration,
) -> Vec<(&'static str, watch::Receiver<Snapshot>)> {
    let client = local.client();
    let polled = |source: Source| {
        let mut c = DiscoveryConfig::new(SERVICE);
        c.source = source;
        discovery::spawn(client.clone(), c)
    };
    vec![
        (
            "health dc1→dc2 (blocking, local agent)",
            failover::spawn(
                client.clone(),
                DiscoveryConfig::new(SERVICE),
                &["dc2".into()],
            ),
        ),
        (
            "prepared query (polled)",
            polled(Source::PreparedQuery {
                name: QUERY.into(),
                every: poll,
            }),
        ),
        (
            "prepared query over DNS (polled)",
            polled(Source::Dns {
                server: local.dns_addr(),
                query: Some(QUERY.into()),
                every: poll,
            }),
        ),
    ]
}

/// A client streaming echoes through its own discovery: its name, its tally, its task.
type Streaming = (&'static str, Arc<Mutex<Tally>>, tokio::task::JoinHandle<()>);

/// Once each discovery lists `servers` instances, an echo session on it streaming until
/// `stop`, counting from `killed` on.
async fn start_streams(
    discoveries: Vec<(&'static str, watch::Receiver<Snapshot>)>,
    servers: usize,
    killed: &Arc<std::sync::OnceLock<SystemTime>>,
    stop: &CancellationToken,
) -> Result<Vec<Streaming>> {
    let mut running = Vec::new();
    for (name, mut rx) in discoveries {
        tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|s| s.instances.len() == servers),
        )
        .await
        .map_err(|_| Error::Timeout {
            what: format!("the {name} client to list dc1's instances"),
            timeout: Duration::from_secs(20),
        })?
        .map_err(|_| Error::Stopped(name.into()))?;
        let mut session = SessionConfig::new(SERVICE);
        session.message_timeout = Duration::from_secs(20);
        let echo = EchoClient::with_discovery(rx, session)?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let task = tokio::spawn(stream(
            echo,
            name,
            tally.clone(),
            killed.clone(),
            stop.clone(),
        ));
        running.push((name, tally, task));
    }
    Ok(running)
}

/// Until every client has a reply from `host` at or after `since` (at most 30 s).
async fn all_served_by(running: &[Streaming], host: &str, since: SystemTime) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let all = running.iter().all(|(_, t, _)| {
            let t = t.lock().unwrap_or_else(PoisonError::into_inner);
            t.replies.iter().any(|(at, h)| *at >= since && h == host)
        });
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stop the clients; one row each: when dc2 first answered after `killed_at`, when dc1 did
/// again after `passing_again`.
async fn rows(
    running: Vec<Streaming>,
    stop: &CancellationToken,
    (killed_at, dc2_host): (SystemTime, &str),
    (passing_again, dc1_host): (SystemTime, &str),
) -> Result<Vec<DcRow>> {
    stop.cancel();
    let mut rows = Vec::new();
    for (name, tally, task) in running {
        task.await.map_err(|source| Error::Task {
            what: "a datacenter client's sender",
            source,
        })?;
        let t = tally.lock().unwrap_or_else(PoisonError::into_inner);
        let first_after = |from: SystemTime, dc: &str| {
            t.replies
                .iter()
                .filter(|(at, host)| *at >= from && host == dc)
                .map(|(at, _)| *at)
                .min()
                .and_then(|at| at.duration_since(from).ok())
        };
        rows.push(DcRow {
            client: name.into(),
            first_dc2_reply_ms: first_after(killed_at, dc2_host).map(|d| d.as_secs_f64() * 1e3),
            back_to_dc1_s: first_after(passing_again, dc1_host).map(|d| d.as_secs_f64()),
            sent: t.sent_after_kill,
            lost: t.lost_after_kill,
        });
    }
    Ok(rows)
}

async fn stream(
    echo: EchoClient,
    name: &'static str,
    tally: Arc<Mutex<Tally>>,
    killed: Arc<std::sync::OnceLock<SystemTime>>,
    stop: CancellationToken,
) {
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        seq += 1;
        let payload = Bytes::from(format!("{name} {seq}"));
        let after_kill = killed.get().is_some();
        let result = echo.send(payload.clone()).await;
        {
            let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
            let ok = match result {
                // Every server of a datacenter runs on its client node's address; DNS
                // answers carry no service ID, so the address tells the datacenter.
                Ok(reply) if reply.bytes == payload => {
                    t.replies.push((SystemTime::now(), reply.instance.host));
                    true
                }
                Ok(_) => false,
                Err(e) => {
                    tracing::error!(name, seq, "message lost: {e}");
                    false
                }
            };
            if after_kill {
                t.sent_after_kill += 1;
                t.lost_after_kill += u64::from(!ok);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = stop.cancelled() => {}
        }
    }
}

// === the contract ===

/// How the two-datacenter run is set up.
#[derive(Debug, Clone)]
pub struct DatacentersConfig {
    /// Echo servers per datacenter.
    pub servers: usize,
    /// How often the polled clients read.
    pub poll: Duration,
}

impl OnItsOwn for DatacentersConfig {
    type Outcome = DatacentersReport;

    fn title(&self) -> String {
        "Datacenters: failover to a second datacenter and back".into()
    }

    /// Two datacenters, echo servers in both; clients on dc1 stream while every dc1 server is
    /// killed (they fail over to dc2) and started again (they come back).
    async fn run_alone(
        &self,
        launcher: &Launcher,
        progress: &Progress,
    ) -> Result<DatacentersReport> {
        let servers = self.servers;
        if servers == 0 || self.poll.is_zero() {
            return Err(Error::Setting(
                "two datacenters need at least one server each and a poll above zero".into(),
            ));
        }
        let (dc1, dc2) = start_datacenters(progress).await?;
        let local = dc1.agent(Member::Client(0));
        let client = local.client();
        let dc1_host = local.spec().address.to_string();
        let dc2_host = dc2.agent(Member::Client(0)).spec().address.to_string();
        progress.say("echo servers in both datacenters");
        let mut dc1_servers = dc_servers(launcher, &dc1, "dc1", servers).await?;
        let _dc2_servers = dc_servers(launcher, &dc2, "dc2", servers).await?;
        all_passing(&client, "dc1", servers).await?;
        all_passing(&dc2.agent(Member::Client(0)).client(), "dc2", servers).await?;
        crate::discovery::create_query(&client, QUERY, SERVICE, &["dc2"]).await?;
        let query_before = query_answer(&client).await?;

        let killed: Arc<std::sync::OnceLock<SystemTime>> = Arc::default();
        let stop = CancellationToken::new();
        let running = start_streams(discoveries(local, self.poll), servers, &killed, &stop).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;

        progress.say("SIGKILL to every dc1 echo server");
        let killed_at = SystemTime::now();
        let _ = killed.set(killed_at);
        for server in &mut dc1_servers {
            server.process.kill().await?;
        }
        all_served_by(&running, &dc2_host, killed_at).await;
        let query_during = query_answer(&client).await?;

        progress.say("dc1's echo servers start again");
        let back_at = SystemTime::now();
        let _dc1_again = dc_servers(launcher, &dc1, "dc1", servers).await?;
        all_passing(&client, "dc1", servers).await?;
        let passing_again = SystemTime::now();
        all_served_by(&running, &dc1_host, passing_again).await;
        let rows = rows(
            running,
            &stop,
            (killed_at, &dc2_host),
            (passing_again, &dc1_host),
        )
        .await?;
        Ok(DatacentersReport {
            consul_version: local.version().to_owned(),
            servers_per_dc: servers,
            poll: GoDuration(self.poll),
            query_before,
            query_during,
            rows,
            dc1_passing_again_s: passing_again
                .duration_since(back_at)
                .map_or(0.0, |d| d.as_secs_f64()),
        })
    }
}

impl Findings for DatacentersReport {
    fn consul(&self) -> Option<String> {
        Some(self.consul_version.clone())
    }

    fn tables(&self) -> Vec<Table> {
        let mut t = Table::new([
            "client",
            "kill → first reply from dc2",
            "dc1 passing again → first reply from dc1",
            "sent from the kill on",
            "lost",
        ])
        .align_right([1, 2, 3, 4]);
        for row in &self.rows {
            t.push([
                row.client.clone(),
                row.first_dc2_reply_ms
                    .map_or("never".into(), |ms| format!("{ms:.0} ms")),
                row.back_to_dc1_s
                    .map_or("never".into(), |s| format!("{s:.2} s")),
                row.sent.to_string(),
                row.lost.to_string(),
            ]);
        }
        vec![t]
    }

    fn details(&self) -> String {
        let r = self;
        format!(
            "Consul {}: dc1 and dc2, each one server and one client agent on their own loopback \
             addresses, WAN-joined; {} echo servers in each (checked every 1s), registered with \
             their datacenter's client agent. The clients run on dc1's client node, each sending \
             one message every 50 ms; every dc1 instance is killed, then dc1's servers start \
             again (passing {:.2} s after their start). Polled clients read every {}.\n\n\
             The prepared query `{QUERY}` (`Failover.Datacenters = [\"dc2\"]`) answered \
             Datacenter `{}`, Failovers {} ({} instances) with dc1 healthy, and Datacenter `{}`, \
             Failovers {} ({} instances) with every dc1 instance dead.\n",
            r.consul_version,
            r.servers_per_dc,
            r.dc1_passing_again_s,
            r.poll,
            r.query_before.datacenter,
            r.query_before.failovers,
            r.query_before.instances,
            r.query_during.datacenter,
            r.query_during.failovers,
            r.query_during.instances,
        )
    }

    fn violations(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.lost > 0)
            .map(|r| format!("{}: {} message(s) lost", r.client, r.lost))
            .collect();
        if self.query_during.datacenter != "dc2" {
            v.push("the prepared query did not fail over to dc2".into());
        }
        v
    }
}
