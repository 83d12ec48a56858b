//! Scenario e, deregistration across agents: one echo server on each of three client agents
//! started apart (so their reapers tick on different phases), all killed at once. Each
//! agent's reaper, anchored at that agent's own start (its first "Started DNS server" line),
//! removes its service at the first tick strictly after critical + 1 min: the
//! [`model`](crate::model) predicts each removal from its own agent's phase, and, for
//! contrast, from the first agent's phase.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use consul_harness::cluster::{ClusterSpec, Member};
use serde::Serialize;
use tokio::sync::oneshot;

use super::{LIMIT, Scenario, timeout};
use crate::{
    deregistration::{logged_time, reaper_anchor},
    error::{Error, Result},
    experiment::{Env, Experiment, Findings, Needs},
    model::{Phase, ReaperModel},
    procs::Launcher,
    progress::Progress,
    report::Table,
    wait,
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Servers.
    pub servers: usize,
    /// Client agents, one echo server each.
    pub clients: usize,
    /// Pause between two client agents' starts.
    pub stagger: Duration,
    /// `DeregisterCriticalServiceAfter` of every echo server (raised to 1 min by Consul).
    pub setting: Duration,
    /// Check interval.
    pub interval: Duration,
}

impl Default for Config {
    /// 3 servers, 3 clients started 7 s apart, 30 s (1 min) every 1 s.
    fn default() -> Self {
        Config {
            servers: 3,
            clients: 3,
            stagger: Duration::from_secs(7),
            setting: Duration::from_secs(30),
            interval: Duration::from_secs(1),
        }
    }
}

/// One agent's service. Instants in seconds since the kill.
#[derive(Debug, Clone, Serialize)]
pub struct AgentTrial {
    /// The client agent.
    pub agent: String,
    /// Its service.
    pub service_id: String,
    /// Its reaper's start, from its log, seconds since the first agent's.
    pub anchor_after_first: f64,
    /// Where its reaper ticks in the first agent's 30 s cycle, seconds.
    pub phase_lag: f64,
    /// How much earlier than the anchor the reaper may have started, milliseconds (the agent
    /// log's bracket, see [`reaper_anchor`]).
    pub anchor_span_ms: Option<f64>,
    /// A blocking query (on that agent) first showed the check critical.
    pub critical_at: f64,
    /// A blocking query first showed the service gone.
    pub removed_at: f64,
    /// Predicted from its own agent's phase and `critical_at`.
    pub predicted: f64,
    /// Measured − predicted, milliseconds.
    pub error_ms: f64,
    /// The agent's own log: "is now critical" and "deregistered service" lines.
    pub logged_critical: Option<f64>,
    /// The agent's log time of the removal.
    pub logged_removed: Option<f64>,
    /// Predicted from the logged critical time and its own phase, minus the logged removal,
    /// milliseconds: the model alone, without sync and query latency.
    pub logged_error_ms: Option<f64>,
    /// Predicted from the FIRST agent's phase instead, minus measured, milliseconds.
    pub first_phase_error_ms: f64,
}

/// How late an agent's removal line may come after the tick its own log predicts: the pass
/// itself, and the slip of the `time.After` loop on a loaded machine.
pub const LOGGED_LATE_MS: f64 = 100.0;

/// The timestamps' truncation to whole milliseconds, both ends.
const LOG_RESOLUTION_MS: f64 = 2.0;

impl AgentTrial {
    /// Whether the logged removal fell inside `[predicted − span, predicted + LOGGED_LATE_MS]`.
    pub fn logged_within_span(&self) -> bool {
        match self.logged_error_ms {
            Some(e) => {
                let early = self.anchor_span_ms.unwrap_or(0.0) + LOG_RESOLUTION_MS;
                e >= -early && e <= LOGGED_LATE_MS
            }
            None => false,
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The reaper model used (Consul's fixed 30 s and 1 min).
    pub model: ReaperModel,
    /// One row per agent.
    pub trials: Vec<AgentTrial>,
    /// Largest |measured − predicted| (blocking queries), milliseconds.
    pub max_error_ms: f64,
    /// Largest |logged − predicted from the log|, milliseconds.
    pub max_logged_error_ms: Option<f64>,
    /// Whether every logged removal fell where the log's bracket of the reaper's start
    /// allows: no earlier than the span before the prediction, at most
    /// [`LOGGED_LATE_MS`] after it.
    pub logged_within_span: bool,
    /// Largest |measured − predicted from the first agent's phase|, milliseconds.
    pub max_first_phase_error_ms: f64,
}

impl Findings for Outcome {
    fn tables(&self) -> Vec<Table> {
        vec![Table::figures(self.figures())]
    }

    fn details(&self) -> String {
        format!(
            "All echo servers were killed at once (t = 0). Each removal happened at its own \
             agent's reaper tick: predicted from that agent's phase (its start, as its log \
             dates it) and the moment a blocking query showed the check critical, the largest \
             error was {:.0} ms; from the agents' own log lines ({}), {}. Predicting every \
             removal from the first agent's phase instead misses by up to {:.1} s: there is \
             no cluster-wide reaper, each client agent runs its own.",
            self.max_error_ms,
            "\"is now critical\", \"critical for too long; deregistered service\"",
            self.max_logged_error_ms
                .map(|e| format!("{e:.0} ms"))
                .unwrap_or_else(|| "not in the log".into()),
            self.max_first_phase_error_ms / 1e3
        )
    }

    fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.max_error_ms > 500.0 {
            v.push(format!(
                "a removal missed its own agent's predicted tick by {:.0} ms",
                self.max_error_ms
            ));
        }
        for t in self.trials.iter().filter(|t| !t.logged_within_span()) {
            v.push(format!(
                "{}: the agent-log prediction missed by {} (allowed: {} ms early, the log's \
                 bracket of the reaper's start, to {LOGGED_LATE_MS:.0} ms late)",
                t.agent,
                t.logged_error_ms
                    .map(|e| format!("{e:+.0} ms"))
                    .unwrap_or_else(|| "– (not in the log)".into()),
                t.anchor_span_ms.unwrap_or(0.0).round()
            ));
        }
        v
    }
}

impl Outcome {
    /// `(figure, value)` rows of its table.
    pub fn figures(&self) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = self
            .trials
            .iter()
            .map(|t| {
                (
                    format!(
                        "{} ({}), reaper +{:.2} s in the cycle{}",
                        t.agent,
                        t.service_id,
                        t.phase_lag,
                        t.anchor_span_ms
                            .map(|s| format!(" (start dated to {s:.0} ms)"))
                            .unwrap_or_default()
                    ),
                    format!(
                        "critical {:.2} s, removed {:.2} s, predicted {:.2} s: {:+.0} ms \
                         (agent log: {}); first agent's phase would say {:+.0} ms",
                        t.critical_at,
                        t.removed_at,
                        t.predicted,
                        t.error_ms,
                        t.logged_error_ms
                            .map(|e| format!("{e:+.0} ms"))
                            .unwrap_or_else(|| "–".into()),
                        t.first_phase_error_ms
                    ),
                )
            })
            .collect();
        rows.push((
            "max |error|: own phase / agent log / first agent's phase".into(),
            format!(
                "{:.0} ms / {} / {:.0} ms",
                self.max_error_ms,
                self.max_logged_error_ms
                    .map(|e| format!("{e:.0} ms"))
                    .unwrap_or_else(|| "–".into()),
                self.max_first_phase_error_ms
            ),
        ));
        rows
    }
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::ReaperPhases.title().into()
    }

    fn needs(&self) -> Result<Needs> {
        Ok(Needs::Cluster(ClusterSpec {
            client_stagger: self.stagger,
            ..ClusterSpec::new(self.servers, self.clients)
        }))
    }

    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let cluster = env.cluster()?;
        let model = ReaperModel::CONSUL;
        let n = cluster.clients().len();
        if n == 0 {
            return Err(Error::Setting(
                "the reaper scenario needs client agents".into(),
            ));
        }
        let mut phases = Vec::with_capacity(n);
        let mut spans = Vec::with_capacity(n);
        for i in 0..n {
            let start = reaper_anchor(cluster.agent(Member::Client(i))).await;
            phases.push(Phase::new(start.at, model.reap_interval));
            spans.push(start.span.map(|s| s * 1e3));
        }
        step.say("an echo server on every client agent");
        let mut servers = Vec::with_capacity(n);
        let mut done = Vec::with_capacity(n);
        for i in 0..n {
            let agent = cluster.agent(Member::Client(i));
            let id = format!("reaper_{}", i + 1);
            let mut spec = crate::scenario::server_spec(agent.config(), &id, self.interval)?
                .on_address(agent.spec().address)?
                .named(id.clone(), id.clone());
            spec.args.deregister_after = consul_api::GoDuration(self.setting);
            servers.push(crate::procs::ServerProcess::spawn(launcher, spec).await?);
            let (passing_tx, passing_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            let client = agent.client();
            tokio::spawn(async move {
                let result = wait::follow_instance(&client, &id, &id, passing_tx).await;
                let _ = done_tx.send(result);
            });
            tokio::time::timeout(LIMIT, passing_rx)
                .await
                .map_err(|_| timeout("an echo server to pass", LIMIT))?
                .map_err(|_| Error::Stopped("a reaper watcher".into()))?;
            done.push(done_rx);
        }

        step.say("killing every echo server at once; each agent's reaper removes its own");
        let killed = epoch(SystemTime::now());
        for s in &mut servers {
            s.process.kill().await?;
        }
        let limit = model.effective(self.setting) + model.reap_interval + LIMIT;
        let mut trials = Vec::with_capacity(n);
        for (i, rx) in done.into_iter().enumerate() {
            let life = tokio::time::timeout(limit, rx)
                .await
                .map_err(|_| timeout("every service to be reaped", limit))?
                .map_err(|_| Error::Stopped("a reaper watcher".into()))??;
            let agent = cluster.agent(Member::Client(i));
            let id = &servers[i].spec.args.id;
            let critical = epoch(life.critical_at);
            let removed = epoch(life.removed_at);
            let predicted = model.predict_removal(self.setting, critical, &phases[i]);
            let from_first = model.predict_removal(self.setting, critical, &phases[0]);
            let log = agent.log();
            let logged_critical =
                logged_time(log, "is now critical", &format!("check=service:{id}"));
            // The container's log stream may deliver the removal line after the blocking
            // query saw the removal: wait for it a little.
            let mut logged_removed = None;
            for _ in 0..50 {
                logged_removed =
                    logged_time(log, "critical for too long", &format!("service={id}"));
                if logged_removed.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let logged_error_ms = match (logged_critical, logged_removed) {
                (Some(c), Some(r)) => {
                    Some((r - model.predict_removal(self.setting, c, &phases[i])) * 1e3)
                }
                _ => None,
            };
            trials.push(AgentTrial {
                agent: Member::Client(i).to_string(),
                service_id: id.clone(),
                anchor_after_first: phases[i].anchor - phases[0].anchor,
                phase_lag: phases[i].lag_behind(&phases[0]),
                anchor_span_ms: spans[i],
                critical_at: critical - killed,
                removed_at: removed - killed,
                predicted: predicted - killed,
                error_ms: (removed - predicted) * 1e3,
                logged_critical: logged_critical.map(|t| t - killed),
                logged_removed: logged_removed.map(|t| t - killed),
                logged_error_ms,
                first_phase_error_ms: (removed - from_first) * 1e3,
            });
        }
        let max = |f: &dyn Fn(&AgentTrial) -> f64| trials.iter().map(f).fold(0.0, f64::max);
        let logged: Vec<f64> = trials
            .iter()
            .filter_map(|t| t.logged_error_ms.map(f64::abs))
            .collect();
        Ok(Outcome {
            model,
            max_error_ms: max(&|t| t.error_ms.abs()),
            max_logged_error_ms: (logged.len() == trials.len())
                .then(|| logged.iter().copied().fold(0.0, f64::max)),
            max_first_phase_error_ms: max(&|t| t.first_phase_error_ms.abs()),
            logged_within_span: trials.iter().all(AgentTrial::logged_within_span),
            trials,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(logged_error_ms: Option<f64>, anchor_span_ms: Option<f64>) -> AgentTrial {
        AgentTrial {
            agent: "client-3".into(),
            service_id: "reaper_3".into(),
            anchor_after_first: 21.197,
            phase_lag: 21.197,
            anchor_span_ms,
            critical_at: 1.04,
            removed_at: 86.53,
            predicted: 86.67,
            error_ms: -141.0,
            logged_critical: Some(1.0),
            logged_removed: Some(86.53),
            logged_error_ms,
            first_phase_error_ms: 21_056.0,
        }
    }

    #[test]
    fn an_early_removal_is_allowed_only_as_far_as_the_log_dates_the_reapers_start() {
        // A CI run on a loaded machine: the removal 143 ms before the tick predicted from
        // the log line after the reaper's start.
        assert!(trial(Some(-143.0), Some(150.0)).logged_within_span());
        assert!(!trial(Some(-143.0), Some(1.0)).logged_within_span());
        assert!(!trial(Some(-143.0), None).logged_within_span());
        assert!(trial(Some(-2.0), None).logged_within_span());
    }

    #[test]
    fn a_late_removal_is_allowed_one_loaded_pass() {
        assert!(trial(Some(LOGGED_LATE_MS), Some(0.0)).logged_within_span());
        assert!(!trial(Some(LOGGED_LATE_MS + 1.0), Some(500.0)).logged_within_span());
        assert!(!trial(None, Some(500.0)).logged_within_span());
    }
}
