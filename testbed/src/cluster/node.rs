//! Scenario a, a node dies: its client agent and its echo server are killed together
//! (SIGKILL: the agent does not leave). The servers notice by gossip (the node's
//! `serfHealth` turns critical), so `?passing` drops its instances and the clients' views
//! follow; the catalog keeps listing them until `reconnect_timeout` (72 h by default) has
//! passed and the node is reaped; `DeregisterCriticalServiceAfter` never fires, because the
//! reaper that would apply it ran inside the dead agent. By contrast, a node whose agent
//! gets SIGTERM leaves (`leave_on_terminate` is true for client agents) and its services
//! leave the catalog at once.

use std::time::{Duration, Instant};

use consul_api::{Consistency, HealthStatus, QueryOptions};
use consul_harness::cluster::{ClusterSpec, Member};
use serde::Serialize;

use super::{
    LIMIT, Scenario, ms, ms_between, node_client, node_server, passing_exactly, secs_or_never,
    timeout,
};
use crate::{
    error::Result,
    experiment::{Env, Experiment, Findings, Needs},
    model::ReaperModel,
    procs::Launcher,
    progress::Progress,
    report::Table,
    scenario::{
        Basics, SERVICE,
        observers::{DiscoveryLog, Traffic},
    },
    wait,
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Servers.
    pub servers: usize,
    /// `reconnect_timeout` of every agent: short here to show the catalog's removal of a
    /// dead node (Consul's default is 72 h); `None` to stop once the view dropped it.
    pub reconnect_timeout: Option<Duration>,
    /// Also make a third node leave gracefully (SIGTERM to its agent).
    pub contrast: bool,
    /// Check interval of the echo servers.
    pub interval: Duration,
    /// One echo every this long.
    pub every: Duration,
}

impl Default for Config {
    /// 3 servers, `reconnect_timeout` 2 minutes (longer than the 1 min + 30 s a
    /// `DeregisterCriticalServiceAfter` would take), the graceful contrast.
    fn default() -> Self {
        Config {
            servers: 3,
            reconnect_timeout: Some(Duration::from_secs(120)),
            contrast: true,
            interval: Duration::from_secs(1),
            every: Duration::from_millis(100),
        }
    }
}

/// What was measured. Times in milliseconds from the kill.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The dead node's instance.
    pub dead_instance: String,
    /// Kill → `?passing` (blocking query on a server) no longer lists it.
    pub passing_dropped_ms: f64,
    /// Kill → the client's discovery view no longer lists it.
    pub view_dropped_ms: f64,
    /// The view dropped it → an echo sent after that answered; `None`: none within the
    /// scenario's limit (the client stopped serving).
    pub answered_after_view_dropped_ms: Option<f64>,
    /// When it left the passing set, the catalog still listed it, with its node's
    /// `serfHealth` critical.
    pub catalog_kept: bool,
    /// The node's `serfHealth` was critical then.
    pub serf_health_critical: bool,
    /// The catalog still listed it when `DeregisterCriticalServiceAfter` (1 min, the
    /// minimum) plus a reaper period plus a check interval had passed: it never fired.
    pub dereg_after_never_fired: Option<bool>,
    /// Kill → the catalog no longer lists it (the node reaped after `reconnect_timeout`).
    pub catalog_removed_ms: Option<f64>,
    /// SIGTERM to another node's agent → its instance gone from the catalog.
    pub leave_removed_ms: Option<f64>,
    /// Every echo, and the fate of the echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Findings for Outcome {
    fn tables(&self) -> Vec<Table> {
        vec![Table::figures(self.figures())]
    }

    fn details(&self) -> String {
        format!(
            "The node's client agent and its echo server were killed (SIGKILL) together. The \
             servers' gossip marked the node failed and its `serfHealth` critical, so \
             `?passing` dropped {} after {:.1} s (production gossip: 1 s probes, suspicion \
             multiplier 4) and the client's view after {:.1} s; the catalog still listed it \
             ({}). `DeregisterCriticalServiceAfter` never applies: the reaper that would \
             apply it runs inside the dead agent. The catalog lost it only when the node was \
             reaped, {} after the kill, with `reconnect_timeout` shortened for the experiment \
             (Consul 1.8.7 does not enforce the documented 8 h minimum; the default is 72 h, \
             so in production a dead node's services stay in the catalog, critical, for three \
             days unless an operator runs `consul force-leave`). A node whose agent is sent \
             SIGTERM leaves instead: its services were gone {}.",
            self.dead_instance,
            self.passing_dropped_ms / 1e3,
            self.view_dropped_ms / 1e3,
            if self.catalog_kept {
                "with its node's serfHealth critical"
            } else {
                "**not**: it was gone"
            },
            secs_or_never(self.catalog_removed_ms),
            self.leave_removed_ms
                .map(|m| format!("{m:.0} ms after the signal"))
                .unwrap_or_else(|| "(contrast not run)".into()),
        )
    }

    fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        if !self.catalog_kept {
            v.push("the catalog dropped the dead node's instance at once".into());
        }
        if self.dereg_after_never_fired == Some(false) {
            v.push("DeregisterCriticalServiceAfter fired on a dead agent".into());
        }
        v
    }
}

impl Outcome {
    /// `(figure, value)` rows of its table.
    pub fn figures(&self) -> Vec<(String, String)> {
        let s = |m: f64| format!("{:.1} s", m / 1e3);
        vec![
            (
                "kill → out of `?passing`".into(),
                s(self.passing_dropped_ms),
            ),
            (
                "kill → out of the client's view".into(),
                s(self.view_dropped_ms),
            ),
            (
                "out of the view → an echo sent after it answered".into(),
                self.answered_after_view_dropped_ms
                    .map(|m| format!("{m:.0} ms"))
                    .unwrap_or_else(|| "**none**".into()),
            ),
            (
                "catalog still lists it then (serfHealth critical)".into(),
                format!("{} ({})", self.catalog_kept, self.serf_health_critical),
            ),
            (
                "DeregisterCriticalServiceAfter fired".into(),
                match self.dereg_after_never_fired {
                    Some(true) => "never (still listed after 1m + 30 s + 1 interval)".into(),
                    Some(false) => "**yes**".into(),
                    None => "not waited for".into(),
                },
            ),
            (
                "kill → gone from the catalog (node reaped)".into(),
                secs_or_never(self.catalog_removed_ms),
            ),
            (
                "contrast: SIGTERM (leave) → gone from the catalog".into(),
                self.leave_removed_ms
                    .map(|m| format!("{m:.0} ms"))
                    .unwrap_or_else(|| "not run".into()),
            ),
            (
                "echoes sent / lost".into(),
                format!("{} / {}", self.basics.tally.sent, self.basics.tally.lost),
            ),
        ]
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::NodeDies.title().into()
    }

    fn needs(&self) -> Result<Needs> {
        Ok(Needs::Cluster(ClusterSpec {
            reconnect_timeout: self.reconnect_timeout,
            ..ClusterSpec::new(self.servers, if self.contrast { 3 } else { 2 })
        }))
    }

    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let cluster = env.cluster()?;
        step.say("an echo server on every client node");
        let nodes = cluster.clients().len();
        let mut servers = Vec::new();
        for n in 0..nodes {
            let id = format!("servernode_{}", n + 1);
            servers.push(
                node_server(
                    launcher,
                    cluster.agent(Member::Client(n)),
                    &id,
                    self.interval,
                )
                .await?,
            );
        }
        let ids: Vec<String> = servers.iter().map(|s| s.spec.args.id.clone()).collect();
        // The client lives on node 2, which survives.
        let home = Member::Client(1);
        passing_exactly(cluster.agent(home), &ids).await?;
        // Views are recorded from here on: every wait below counts them all.
        let t0 = Instant::now();
        let client = node_client(cluster.agent(home), Consistency::Default, None)?;
        let log = DiscoveryLog::start(&client);
        log.wait_for("discovery to list every server", t0, LIMIT, |v| {
            v.lists_all(&ids)
        })
        .await?;
        let traffic = Traffic::start(&client, "node", self.every, 20 * 60 * 10);
        traffic
            .wait_for("10 echoes", LIMIT, |o| o.seq >= 10 && !o.lost())
            .await?;

        step.say("killing node 1: its client agent and its echo server");
        let dead = ids[0].clone();
        let killed = tokio::time::Instant::now();
        let killed_std = Instant::now();
        // The agent first: were the echo server first, the agent might run its check and
        // report it critical before dying, and the node would leave `?passing` by that
        // check rather than by gossip.
        cluster.crash(Member::Client(0)).await?;
        servers[0].process.kill().await?;
        let server_api = cluster.agent(Member::Server(0)).client();
        step.say("waiting for gossip to mark the node failed (4 to 24 s)");
        let (_, passing_dropped) =
            wait::health_until(&server_api, SERVICE, true, LIMIT, |entries| {
                entries.iter().all(|e| e.service.id != dead)
            })
            .await?;
        let view = log
            .wait_for("the view to drop the dead node", killed_std, LIMIT, |v| {
                !v.lists(&dead)
            })
            .await?;
        // Whether the traffic went on through the crash: the first echo sent after the view
        // dropped the node and answered (by the survivor), waited for rather than counted,
        // so a loaded machine's slower pace is not taken for a stalled client.
        let dropped = Instant::now();
        let answered_after_view_dropped_ms = traffic
            .wait_for("an echo sent after the view dropped the node", LIMIT, |o| {
                o.sent >= dropped && !o.lost()
            })
            .await
            .ok()
            .map(|_| ms(dropped.elapsed()));
        let (entries, _) = server_api
            .health()
            .service(SERVICE, None, false, &QueryOptions::default())
            .await?;
        let entry = entries.iter().find(|e| e.service.id == dead);
        let catalog_kept = entry.is_some();
        let serf_health_critical = entry.is_some_and(|e| {
            e.checks
                .iter()
                .any(|c| c.check_id == "serfHealth" && c.status == HealthStatus::Critical)
        });

        let mut dereg_after_never_fired = None;
        let mut catalog_removed_ms = None;
        if let Some(reconnect) = self.reconnect_timeout {
            // DeregisterCriticalServiceAfter would have removed it by now: 1 min (the
            // minimum) after its check turned critical (within an interval of the kill),
            // plus a reaper period.
            let model = ReaperModel::CONSUL;
            let would_have = killed
                + model.min_deregister
                + model.reap_interval
                + self.interval
                + Duration::from_secs(2);
            step.say("waiting past DeregisterCriticalServiceAfter + a reaper period (about 95 s)");
            tokio::time::sleep_until(would_have).await;
            let (listed, _) = server_api
                .catalog()
                .service(SERVICE, None, &QueryOptions::default())
                .await?;
            dereg_after_never_fired = Some(listed.iter().any(|s| s.service_id == dead));
            step.say("waiting for the node to be reaped (reconnect_timeout + up to 15 s)");
            let limit = reconnect + LIMIT;
            let deadline = killed + limit;
            loop {
                let (listed, _) = server_api
                    .catalog()
                    .service(SERVICE, None, &QueryOptions::default())
                    .await?;
                if listed.iter().all(|s| s.service_id != dead) {
                    catalog_removed_ms = Some(ms(killed.elapsed()));
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(timeout("the dead node to be reaped", limit));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }

        let mut leave_removed_ms = None;
        if self.contrast && nodes >= 3 {
            step.say("contrast: SIGTERM to node 3's agent (it leaves)");
            let leaving = ids[2].clone();
            // Watch the catalog while the agent leaves: its exit takes longer than the leave.
            let signalled = tokio::time::Instant::now();
            let gone = wait::health_until(&server_api, SERVICE, false, LIMIT, |entries| {
                entries.iter().all(|e| e.service.id != leaving)
            });
            let (stopped, gone) = tokio::join!(cluster.stop(Member::Client(2)), gone);
            stopped?;
            let (_, gone) = gone?;
            leave_removed_ms = Some(ms_between(signalled, gone));
            servers[2].process.kill().await?;
        }

        let outcomes = traffic.finish().await;
        // The killed servers are accounted for: only the survivor's fate counts.
        let mut survivor = vec![servers.swap_remove(1)];
        Ok(Outcome {
            dead_instance: dead,
            passing_dropped_ms: ms_between(killed, passing_dropped),
            view_dropped_ms: ms(view.at - killed_std),
            answered_after_view_dropped_ms,
            catalog_kept,
            serf_health_critical,
            dereg_after_never_fired,
            catalog_removed_ms,
            leave_removed_ms,
            basics: Basics::of(&outcomes, &mut survivor),
        })
    }
}
