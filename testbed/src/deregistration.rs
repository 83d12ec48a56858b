//! The deregistration experiment: how long Consul takes to remove a dead service, measured
//! and predicted.
//!
//! Real echo-server processes register with real Consul, each with its own
//! `DeregisterCriticalServiceAfter` and check interval; all trials share one agent, so a
//! whole sweep takes about the longest window. Each server is killed with SIGKILL at a
//! staggered moment (so trials fall on different phases of the reaper), and a blocking query
//! per trial timestamps "critical" and "gone" as Consul publishes them. The [`model`]
//! predicts each removal from the reaper's phase, taken from the agent's start as its log
//! dates it, and again from earlier removals; the report gives predicted against measured.
//! A SIGTERM trial shows the contrast: a clean shutdown deregisters in milliseconds.
//! With [`SweepConfig::reaper`], each trial also has a twin removed by the reaper sidecar
//! ([`crate::reaper_twins`]), measured the same way.
//!
//! [`model`]: crate::model

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use consul_api::GoDuration;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::{
    consul::Consul,
    error::{Error, Result},
    experiment::{Env, Experiment, Findings, Suite},
    logbuf::LogBuffer,
    model::{Phase, ReaperModel, Window},
    procs::{Launcher, ServerProcess, ServerSpec},
    progress::Progress,
    reaper_twins::{ReaperSection, ReaperTrial},
    report::{Axis, Mark, PALETTE, Plot, Series, Table},
    signal::Signal,
    wait,
};

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// `DeregisterCriticalServiceAfter` values.
    pub settings: Vec<Duration>,
    /// Check intervals.
    pub intervals: Vec<Duration>,
    /// Trials per (setting, interval) cell.
    pub trials: usize,
    /// Kills are spread evenly over this span.
    pub stagger: Duration,
    /// The check's timeout (capped at the interval).
    pub check_timeout: Duration,
    /// Also measure a clean shutdown (SIGTERM).
    pub contrast: bool,
    /// Give each trial a twin with Meta `reap-after` = the setting, removed by the reaper
    /// sidecar (see [`crate::reaper_twins`]).
    pub reaper: bool,
}

impl Default for SweepConfig {
    /// The full sweep: {30s, 1m, 90s, 2m} × {1s, 5s}, 2 trials each, kills over 30 s.
    fn default() -> Self {
        SweepConfig {
            settings: [30, 60, 90, 120].map(Duration::from_secs).to_vec(),
            intervals: [1, 5].map(Duration::from_secs).to_vec(),
            trials: 2,
            stagger: Duration::from_secs(30),
            check_timeout: Duration::from_secs(3),
            contrast: true,
            reaper: false,
        }
    }
}

impl SweepConfig {
    /// One trial at the seed article's settings (30s, every 5s).
    pub fn seed() -> Self {
        SweepConfig {
            settings: vec![Duration::from_secs(30)],
            intervals: vec![Duration::from_secs(5)],
            trials: 1,
            stagger: Duration::ZERO,
            check_timeout: Duration::from_secs(3),
            contrast: false,
            reaper: false,
        }
    }

    /// The trials, with their kill offsets: cells interleaved so every cell's trials spread
    /// over the whole stagger.
    fn plan(&self) -> Vec<Plan> {
        let cells: Vec<(Duration, Duration)> = self
            .settings
            .iter()
            .flat_map(|s| self.intervals.iter().map(move |i| (*s, *i)))
            .collect();
        let total = cells.len() * self.trials;
        let mut plans = Vec::with_capacity(total);
        for trial in 0..self.trials {
            for (c, (setting, interval)) in cells.iter().enumerate() {
                let slot = trial * cells.len() + c;
                let offset = if total > 1 {
                    self.stagger.mul_f64(slot as f64 / total as f64)
                } else {
                    Duration::ZERO
                };
                let plan = Plan {
                    setting: *setting,
                    interval: *interval,
                    trial: trial + 1,
                    kill_offset: offset,
                    twin: false,
                };
                plans.push(plan.clone());
                if self.reaper {
                    // Killed right after the original, at the same offset.
                    plans.push(Plan { twin: true, ..plan });
                }
            }
        }
        plans
    }

    /// How long the sweep should take after the servers pass, roughly: the stagger plus the
    /// widest kill window.
    pub fn expected_duration(&self, model: &ReaperModel) -> Duration {
        let widest = self
            .settings
            .iter()
            .flat_map(|s| self.intervals.iter().map(move |i| (s, i)))
            .map(|(s, i)| model.kill_window(*s, *i, self.check_timeout.min(*i)).hi)
            .fold(0.0, f64::max);
        self.stagger + Duration::from_secs_f64(widest)
    }
}

#[derive(Debug, Clone)]
struct Plan {
    setting: Duration,
    interval: Duration,
    trial: usize,
    kill_offset: Duration,
    /// The reaper's twin of the trial before it.
    twin: bool,
}

impl Plan {
    fn service_id(&self) -> String {
        format!(
            "{}-{}-every-{}-t{}",
            if self.twin { "reap" } else { "dereg" },
            GoDuration(self.setting),
            GoDuration(self.interval),
            self.trial
        )
    }
}

/// One trial's measurements and predictions. Instants are seconds since the sweep began.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    /// The trial server's Consul service ID (also its name), for example
    /// `dereg-30s-every-5s-t1`.
    pub service_id: String,
    /// `DeregisterCriticalServiceAfter` as registered.
    pub setting: GoDuration,
    /// What the agent applies: the setting raised to `CheckDeregisterIntervalMin`.
    pub effective: GoDuration,
    /// The HTTP check's `Interval`.
    pub interval: GoDuration,
    /// The trial's number within its (setting, interval) cell, from 1.
    pub trial: usize,
    /// When the server was sent SIGKILL.
    pub killed_at: f64,
    /// When a blocking query first showed its check critical.
    pub critical_at: f64,
    /// When a blocking query first showed the service gone.
    pub removed_at: f64,
    /// `critical_at − killed_at`, seconds: waiting for the next check run.
    pub kill_to_critical: f64,
    /// `removed_at − critical_at`, seconds: the part Consul's reaper decides.
    pub critical_to_removed: f64,
    /// `removed_at − killed_at`, seconds: what a client of Consul sees.
    pub kill_to_removed: f64,
    /// Where critical → removed must fall: (max(setting, 1m), + 30 s].
    pub critical_window: Window,
    /// Where kill → removed must fall.
    pub kill_window: Window,
    /// Whether both measured spans fall in their windows (with 0.1 s of slack).
    pub in_window: bool,
    /// Predicted removal from the reaper's phase at the agent's start.
    pub predicted_from_start: f64,
    /// Measured minus predicted, in milliseconds.
    pub error_from_start_ms: f64,
    /// Predicted removal from the latest earlier removal, if there was one.
    pub predicted_from_earlier: Option<f64>,
    /// Measured minus `predicted_from_earlier`, in milliseconds; `None` without an earlier
    /// removal.
    pub error_from_earlier_ms: Option<f64>,
    /// The agent's own log time of the check's "is now critical" line; `None` if the log
    /// has no such line or no parseable time.
    pub agent_logged_critical: Option<f64>,
    /// The agent's own log time of its "critical for too long; deregistered service" line;
    /// `None` likewise.
    pub agent_logged_removed: Option<f64>,
}

/// The clean-shutdown contrast.
#[derive(Debug, Clone, Serialize)]
pub struct Contrast {
    /// The contrast server's service ID (`sigterm-contrast`).
    pub service_id: String,
    /// The signal sent (`SIGTERM`).
    pub signal: &'static str,
    /// Milliseconds from SIGTERM to the service gone from the health endpoint.
    pub removed_after_ms: f64,
    /// The server's exit code; `None` if a signal ended it.
    pub exit_code: Option<i32>,
}

/// The whole experiment's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When the sweep began (RFC 3339, UTC).
    pub date: String,
    /// Consul's version, as the agent reports it.
    pub consul_version: String,
    /// Which backend ran Consul (`docker` or `process`).
    pub backend: &'static str,
    /// Read from the agent (`/v1/agent/self`), or Consul's defaults if it would not say.
    pub model: ReaperModel,
    /// Where `model` came from, in words.
    pub model_source: &'static str,
    /// The reaper's start, seconds since the sweep began, from the agent's log.
    pub reaper_anchor: f64,
    /// Where `reaper_anchor` came from: the log line, or the harness's own start time.
    pub anchor_source: String,
    /// Every trial that was measured, in plan order.
    pub trials: Vec<Trial>,
    /// The SIGTERM contrast, if it was asked for.
    pub contrast: Option<Contrast>,
    /// The reaper's twins, with `--reaper`.
    pub reaper: Option<ReaperSection>,
    /// Largest |measured − predicted| over all trials, in milliseconds.
    pub max_error_from_start_ms: f64,
    /// Largest |measured − predicted from an earlier removal|, in milliseconds; `None` if
    /// no trial had an earlier removal.
    pub max_error_from_earlier_ms: Option<f64>,
    /// Whether every trial fell in its windows.
    pub all_in_window: bool,
    /// Wall time of the whole run, seconds.
    pub wall_time: f64,
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// SIGKILL each of `servers` at its plan's offset from now (+ 500 ms): when each was killed,
/// seconds since the epoch.
async fn kill_on_schedule(servers: &mut [ServerProcess], plans: &[Plan]) -> Result<Vec<f64>> {
    let kill_start = tokio::time::Instant::now() + Duration::from_millis(500);
    let mut order: Vec<usize> = (0..plans.len()).collect();
    order.sort_by_key(|i| plans[*i].kill_offset);
    let mut killed_at = vec![0.0; plans.len()];
    for i in order {
        tokio::time::sleep_until(kill_start + plans[i].kill_offset).await;
        let at = servers[i].process.kill().await?;
        killed_at[i] = epoch_secs(at);
    }
    Ok(killed_at)
}

/// Each trial's critical and removal moments as its watcher (`done_rxs`) reports them,
/// counted on `progress`; all within `deadline`.
async fn removals(
    done_rxs: Vec<Followed>,
    deadline: Duration,
    progress: &Progress,
) -> Result<Vec<Option<Events>>> {
    use futures::StreamExt;
    let reaping = "waiting for Consul's reaper (it looks every 30 s)";
    let n = done_rxs.len();
    progress.count(0, n as u64, "removed", reaping);
    let mut removed = 0;
    let mut measured = vec![None; n];
    let mut pending: futures::stream::FuturesUnordered<_> = done_rxs
        .into_iter()
        .enumerate()
        .map(|(i, rx)| async move { (i, rx.await) })
        .collect();
    let collect = async {
        while let Some((i, result)) = pending.next().await {
            let lifecycle = result.map_err(|_| Error::Stopped("a trial watcher".into()))??;
            measured[i] = Some(Events {
                critical_at: epoch_secs(lifecycle.critical_at),
                removed_at: epoch_secs(lifecycle.removed_at),
            });
            removed += 1;
            progress.count(removed, n as u64, "removed", reaping);
        }
        Ok::<(), Error>(())
    };
    tokio::time::timeout(deadline, collect)
        .await
        .map_err(|_| Error::Timeout {
            what: "Consul to remove every killed service".into(),
            timeout: deadline,
        })??;
    Ok(measured)
}

/// Run the sweep against `consul`, starting servers through `launcher`. `progress` shows the
/// waits (pass [`Progress::hidden`] for none).
pub async fn run(
    consul: &Consul,
    launcher: &Launcher,
    config: &SweepConfig,
    progress: &Progress,
) -> Result<Report> {
    if config.trials == 0 || config.settings.is_empty() || config.intervals.is_empty() {
        return Err(Error::Setting("the sweep has no trials".into()));
    }
    let began = SystemTime::now();
    let t0 = epoch_secs(began);
    let client = consul.client();
    let (model, model_source) = read_model(&client).await;
    let start = reaper_anchor(consul).await;
    let (anchor, anchor_source) = (start.at, start.source);
    let phase = Phase::new(anchor, model.reap_interval);

    // The reaper sidecar first, so it follows the twins from their registration.
    let sidecar = if config.reaper {
        progress.say("starting the reaper sidecar");
        Some(crate::reaper_twins::spawn(launcher, &consul.config()).await?)
    } else {
        None
    };

    // Start every server, and wait until each passes.
    let plans = config.plan();
    progress.say(format!("starting {} echo servers", plans.len()));
    let (mut servers, done_rxs) = start_trials(consul, launcher, config, &plans).await?;

    // Kill each at its moment.
    let expected = config.expected_duration(&model);
    progress.say(format!(
        "all {} servers passing; killing them over {}; Consul should remove the last within about {}",
        servers.len(),
        GoDuration(config.stagger),
        GoDuration(Duration::from_secs(expected.as_secs()))
    ));
    let killed_at = kill_on_schedule(&mut servers, &plans).await?;
    let deadline = Duration::from_secs_f64(expected.as_secs_f64() + 60.0);
    let measured = removals(done_rxs, deadline, progress).await?;

    // The contrast: a clean shutdown.
    let contrast = if config.contrast {
        progress.say("contrast: SIGTERM");
        Some(sigterm_contrast(consul, launcher).await?)
    } else {
        None
    };

    // Predictions and report.
    let log = consul.log();
    let logged_removals: Vec<f64> = log
        .matching("critical for too long")
        .iter()
        .filter_map(|l| l.consul_time().map(epoch_secs))
        .collect();
    if let Some(p) = &sidecar {
        // Its log line for the last removal may trail the catalog by a moment; a twin whose
        // line never comes is reported as removed by Consul.
        let twins = plans.iter().filter(|p| p.twin).count();
        let removed = consul_reaper::REMOVED;
        let _ = p
            .output()
            .wait_for_count(0, removed, twins, Duration::from_secs(2))
            .await;
    }
    let figures = Figures {
        t0,
        model,
        phase,
        logged_removals,
        log,
        check_timeout: config.check_timeout,
    };
    let mut trials = Vec::with_capacity(plans.len());
    let mut twins = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        let Some(events) = measured[i] else {
            continue;
        };
        let id = &servers[i].spec.args.id;
        if plan.twin {
            let removed_by = match &sidecar {
                Some(p) if crate::reaper_twins::removed_by_reaper(p.output(), id) => "reaper",
                _ => "consul",
            };
            twins.push(figures.twin(plan, id, events, killed_at[i], removed_by));
        } else {
            trials.push(figures.trial(plan, id, events, killed_at[i]));
        }
    }
    let max_error_from_start_ms = trials
        .iter()
        .map(|t| t.error_from_start_ms.abs())
        .fold(0.0, f64::max);
    let earlier_errors: Vec<f64> = trials
        .iter()
        .filter_map(|t| t.error_from_earlier_ms.map(f64::abs))
        .collect();
    Ok(Report {
        date: crate::report::rfc3339(began),
        consul_version: consul.version().to_owned(),
        backend: consul.backend().name(),
        model,
        model_source,
        reaper_anchor: anchor - t0,
        anchor_source,
        all_in_window: trials.iter().all(|t| t.in_window),
        trials,
        contrast,
        reaper: sidecar.is_some().then(|| ReaperSection::new(twins)),
        max_error_from_start_ms,
        max_error_from_earlier_ms: (!earlier_errors.is_empty())
            .then(|| earlier_errors.iter().copied().fold(0.0, f64::max)),
        wall_time: began.elapsed().unwrap_or_default().as_secs_f64(),
    })
}

/// The reaper's start as the agent's log dates it.
#[derive(Debug, Clone)]
pub struct ReaperStart {
    /// The anchor, seconds since the UNIX epoch: the first line logged after the reaper's
    /// goroutine was started, so at most `span` late.
    pub at: f64,
    /// How much earlier the reaper may have started, seconds: back to the last line the
    /// agent logs before it, when the log has both.
    pub span: Option<f64>,
    /// Where `at` came from, in words.
    pub source: String,
}

/// The reaper's start. `Agent::Start` (agent/agent.go in 1.8.7) builds its RPC layer, which
/// logs "Initializing LAN area manager", then runs `go a.reapServices()`, then starts the DNS
/// servers ("Started DNS server") and only then the HTTP server ("Started HTTP server"). The
/// first DNS line is the anchor: the reaper started between the two lines (at most 13 ms
/// apart in the runs here; in one loaded CI run the reaper started at least 143 ms before the
/// HTTP line); the HTTP line, later still, is the fallback for an agent without DNS.
pub async fn reaper_anchor(consul: &Consul) -> ReaperStart {
    let log = consul.log();
    let mut line = None;
    for (marker, wait) in [
        ("Started DNS server", Duration::from_secs(5)),
        ("Started HTTP server", Duration::from_secs(1)),
    ] {
        line = log
            .wait_for(marker, wait)
            .await
            .ok()
            .and_then(|l| l.consul_time().map(|t| (epoch_secs(t), l.text)));
        if line.is_some() {
            break;
        }
    }
    let Some((at, text)) = line else {
        return ReaperStart {
            at: epoch_secs(consul.started_at()),
            span: None,
            source:
                "the harness's start of the agent (the agent log has no \"Started DNS server\" \
                     or \"Started HTTP server\" line)"
                    .into(),
        };
    };
    let before = log
        .lines()
        .iter()
        .find(|l| l.text.contains("Initializing LAN area manager"))
        .and_then(|l| l.consul_time())
        .map(epoch_secs)
        .filter(|b| *b <= at);
    let span = before.map(|b| at - b);
    let source = match span {
        Some(s) => format!(
            "agent log: {} (the reaper started at most {:.0} ms before it)",
            text.trim(),
            s * 1e3
        ),
        None => format!("agent log: {}", text.trim()),
    };
    ReaperStart { at, span, source }
}

/// The agent-log time of the first line containing `kind` and the exact token `token`.
pub fn logged_time(log: &LogBuffer, kind: &str, token: &str) -> Option<f64> {
    log.lines()
        .iter()
        .find(|l| l.text.contains(kind) && l.text.split_whitespace().any(|w| w == token))
        .and_then(|l| l.consul_time())
        .map(epoch_secs)
}

#[derive(Debug, Clone, Copy)]
struct Events {
    critical_at: f64,
    removed_at: f64,
}

/// A trial's watcher: it says when its server passed, then how it ended.
type Followed = oneshot::Receiver<consul_harness::Result<consul_harness::wait::Lifecycle>>;

/// Start a server per plan, each followed by a watcher; return once every one passes.
async fn start_trials(
    consul: &Consul,
    launcher: &Launcher,
    config: &SweepConfig,
    plans: &[Plan],
) -> Result<(Vec<ServerProcess>, Vec<Followed>)> {
    let mut servers = Vec::with_capacity(plans.len());
    for plan in plans {
        let id = plan.service_id();
        let mut spec = ServerSpec::seed(consul.config())?
            .named(id.clone(), id)
            .with_check(
                plan.interval,
                config.check_timeout.min(plan.interval),
                plan.setting,
            );
        if plan.twin {
            spec.args.reap_after = Some(GoDuration(plan.setting));
        }
        servers.push(ServerProcess::spawn(launcher, spec).await?);
    }
    let mut watchers = Vec::with_capacity(servers.len());
    for server in &servers {
        let (passing_tx, passing_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let client = consul.client();
        let id = server.spec.args.id.clone();
        tokio::spawn(async move {
            let result = wait::follow_instance(&client, &id, &id, passing_tx).await;
            let _ = done_tx.send(result);
        });
        watchers.push((passing_rx, done_rx));
    }
    let mut done_rxs = Vec::new();
    for (passing_rx, done_rx) in watchers {
        tokio::time::timeout(Duration::from_secs(60), passing_rx)
            .await
            .map_err(|_| Error::Timeout {
                what: "every trial server to pass its check".into(),
                timeout: Duration::from_secs(60),
            })?
            .map_err(|_| Error::Stopped("a trial watcher".into()))?;
        done_rxs.push(done_rx);
    }
    Ok((servers, done_rxs))
}

/// The reaper's settings as the agent reports them (`/v1/agent/self`), or Consul's defaults;
/// and where they came from.
async fn read_model(client: &consul_api::Client) -> (ReaperModel, &'static str) {
    match client.agent().agent_self().await {
        Ok(me) => match (
            me.debug_duration("CheckReapInterval"),
            me.debug_duration("CheckDeregisterIntervalMin"),
        ) {
            (Some(reap_interval), Some(min_deregister)) => (
                ReaperModel {
                    reap_interval,
                    min_deregister,
                },
                "agent /v1/agent/self DebugConfig",
            ),
            _ => (
                ReaperModel::CONSUL,
                "Consul defaults (the agent did not say)",
            ),
        },
        Err(_) => (ReaperModel::CONSUL, "Consul defaults (agent/self refused)"),
    }
}

/// What every trial's figures are computed against: the sweep's start, the model and the
/// reaper's phase, and the agent's log.
struct Figures<'a> {
    t0: f64,
    model: ReaperModel,
    phase: Phase,
    /// Every removal the agent logged, seconds since the UNIX epoch.
    logged_removals: Vec<f64>,
    log: &'a LogBuffer,
    check_timeout: Duration,
}

impl Figures<'_> {
    /// A trial removed by Consul, measured against its windows and predictions.
    fn trial(&self, plan: &Plan, id: &str, events: Events, killed_at: f64) -> Trial {
        let (model, t0) = (&self.model, self.t0);
        let predicted = model.predict_removal(plan.setting, events.critical_at, &self.phase);
        // The latest removal (any trial's, as the agent logged it) before this one's.
        let earlier = self
            .logged_removals
            .iter()
            .copied()
            .filter(|t| *t < events.removed_at - self.phase.interval / 2.0)
            .fold(None, |acc: Option<f64>, t| {
                Some(acc.map_or(t, |a| a.max(t)))
            });
        let predicted_earlier = earlier.map(|anchor| {
            model.predict_removal(
                plan.setting,
                events.critical_at,
                &Phase::new(anchor, model.reap_interval),
            )
        });
        let critical_window = model.critical_window(plan.setting);
        let kill_window = model.kill_window(
            plan.setting,
            plan.interval,
            self.check_timeout.min(plan.interval),
        );
        let kill_to_removed = events.removed_at - killed_at;
        Trial {
            service_id: id.to_owned(),
            setting: GoDuration(plan.setting),
            effective: GoDuration(model.effective(plan.setting)),
            interval: GoDuration(plan.interval),
            trial: plan.trial,
            killed_at: killed_at - t0,
            critical_at: events.critical_at - t0,
            removed_at: events.removed_at - t0,
            kill_to_critical: events.critical_at - killed_at,
            critical_to_removed: events.removed_at - events.critical_at,
            kill_to_removed,
            critical_window,
            kill_window,
            in_window: critical_window.contains(events.removed_at - events.critical_at, 0.1)
                && kill_window.contains(kill_to_removed, 0.1),
            predicted_from_start: predicted - t0,
            error_from_start_ms: (events.removed_at - predicted) * 1e3,
            predicted_from_earlier: predicted_earlier.map(|p| p - t0),
            error_from_earlier_ms: predicted_earlier.map(|p| (events.removed_at - p) * 1e3),
            agent_logged_critical: logged_time(
                self.log,
                "is now critical",
                &format!("check=service:{id}"),
            )
            .map(|t| t - t0),
            agent_logged_removed: logged_time(
                self.log,
                "critical for too long",
                &format!("service={id}"),
            )
            .map(|t| t - t0),
        }
    }

    /// A twin opted in to the reaper sidecar, measured against its setting.
    fn twin(
        &self,
        plan: &Plan,
        id: &str,
        events: Events,
        killed_at: f64,
        removed_by: &'static str,
    ) -> ReaperTrial {
        let t0 = self.t0;
        let critical_to_removed = events.removed_at - events.critical_at;
        ReaperTrial {
            service_id: id.to_owned(),
            twin_of: Plan {
                twin: false,
                ..plan.clone()
            }
            .service_id(),
            setting: GoDuration(plan.setting),
            interval: GoDuration(plan.interval),
            trial: plan.trial,
            killed_at: killed_at - t0,
            critical_at: events.critical_at - t0,
            removed_at: events.removed_at - t0,
            critical_to_removed,
            error_ms: (critical_to_removed - plan.setting.as_secs_f64()) * 1e3,
            removed_by,
        }
    }
}

/// Register a seed-style server, SIGTERM it, time until Consul no longer lists it.
async fn sigterm_contrast(consul: &Consul, launcher: &Launcher) -> Result<Contrast> {
    let mut spec = ServerSpec::seed(consul.config())?.named("sigterm-contrast", "sigterm-contrast");
    spec.args.interval = GoDuration::from_secs(1);
    let mut server = ServerProcess::spawn(launcher, spec).await?;
    let client = consul.client();
    wait::passing(&client, "sigterm-contrast", Duration::from_secs(30)).await?;
    let start = tokio::time::Instant::now();
    server.process.signal(Signal::SIGTERM)?;
    let gone = wait::deregistered(
        &client,
        "sigterm-contrast",
        "sigterm-contrast",
        Duration::from_secs(30),
    )
    .await?;
    let status = server.process.wait_exit(Duration::from_secs(30)).await?;
    Ok(Contrast {
        service_id: "sigterm-contrast".into(),
        signal: "SIGTERM",
        removed_after_ms: (gone - start).as_secs_f64() * 1e3,
        exit_code: status.code(),
    })
}

/// Group trials by (setting, interval), for summaries.
pub fn by_cell(trials: &[Trial]) -> BTreeMap<(GoDuration, GoDuration), Vec<&Trial>> {
    let mut cells: BTreeMap<(GoDuration, GoDuration), Vec<&Trial>> = BTreeMap::new();
    for t in trials {
        cells.entry((t.setting, t.interval)).or_default().push(t);
    }
    cells
}

// === the contract ===

/// `testbed deregistration`: the sweep's flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// DeregisterCriticalServiceAfter values to sweep (Go durations, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "30s,1m,90s,2m")]
    settings: Vec<GoDuration>,
    /// Check intervals to sweep (Go durations, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1s,5s")]
    intervals: Vec<GoDuration>,
    /// Trials per (setting, interval) cell; kills are staggered over --stagger.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=20))]
    trials: u16,
    /// Spread of the kills, so trials land on different phases of Consul's reaper.
    #[arg(long, default_value = "30s")]
    stagger: GoDuration,
    /// Only the seed article's case: one trial at 30s, checked every 5s.
    #[arg(long, conflicts_with_all = ["settings", "intervals", "trials"])]
    seed: bool,
    /// Skip the SIGTERM contrast.
    #[arg(long)]
    no_contrast: bool,
    /// Also run the reaper sidecar, with a twin of every trial server opted in to it
    /// (Meta reap-after = the setting): both removals side by side.
    #[arg(long)]
    reaper: bool,
}

impl Args {
    /// The sweep these flags ask for.
    pub fn config(&self) -> SweepConfig {
        let base = if self.seed {
            SweepConfig::seed()
        } else {
            SweepConfig {
                settings: self.settings.iter().map(|d| d.as_duration()).collect(),
                intervals: self.intervals.iter().map(|d| d.as_duration()).collect(),
                trials: usize::from(self.trials),
                stagger: self.stagger.as_duration(),
                ..SweepConfig::default()
            }
        };
        SweepConfig {
            contrast: !self.no_contrast,
            reaper: self.reaper,
            ..base
        }
    }
}

impl Suite for Args {
    fn name(&self) -> &'static str {
        "deregistration"
    }

    fn title(&self) -> String {
        "Deregistration of a SIGKILLed service".into()
    }

    fn plans(&self) -> Result<Vec<Box<dyn crate::experiment::Plan>>> {
        Ok(vec![Box::new(self.config())])
    }
}

impl Experiment for SweepConfig {
    type Outcome = Report;

    fn title(&self) -> String {
        let list = |ds: &[Duration]| {
            ds.iter()
                .map(|d| GoDuration(*d).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{} trial(s) each: DeregisterCriticalServiceAfter {} × check interval {}",
            self.trials,
            list(&self.settings),
            list(&self.intervals)
        )
    }

    async fn run_on(
        &self,
        launcher: &Launcher,
        env: &mut Env,
        progress: &Progress,
    ) -> Result<Report> {
        run(env.agent()?, launcher, self, progress).await
    }
}

fn signed_ms(x: f64) -> String {
    format!("{x:+.1}")
}

impl Report {
    /// Every trial with its window and predictions.
    pub fn table(&self) -> Table {
        let mut t = Table::new([
            "DeregisterCriticalServiceAfter",
            "applied",
            "check interval",
            "trial",
            "kill→critical (s)",
            "critical→removed (s)",
            "kill→removed (s)",
            "model window, critical→removed (s)",
            "prediction error (ms): from agent start / from earlier removals",
        ])
        .align_right([4, 5, 6, 8]);
        for (_, trials) in by_cell(&self.trials) {
            for tr in trials {
                t.push([
                    tr.setting.to_string(),
                    tr.effective.to_string(),
                    tr.interval.to_string(),
                    tr.trial.to_string(),
                    format!("{:.2}", tr.kill_to_critical),
                    format!("{:.2}", tr.critical_to_removed),
                    format!("{:.2}", tr.kill_to_removed),
                    format!(
                        "({:.0}, {:.0}]{}",
                        tr.critical_window.lo,
                        tr.critical_window.hi,
                        if tr.in_window { "" } else { " **outside**" }
                    ),
                    format!(
                        "{} / {}",
                        signed_ms(tr.error_from_start_ms),
                        tr.error_from_earlier_ms
                            .map(signed_ms)
                            .unwrap_or_else(|| "–".into())
                    ),
                ]);
            }
        }
        t
    }

    /// Why removal takes what it takes, in three sentences.
    pub fn explanation(&self) -> String {
        let m = &self.model;
        format!(
            "Why: the agent raises any DeregisterCriticalServiceAfter below {min} to {min} (its log \
             says \"has deregister interval below minimum\"), and removes a service only when its \
             reaper, which wakes every {reap} from the agent's start, finds the check critical for \
             longer than that. So a 30s setting removes a dead service between 60 and 90 s after \
             its check turns critical, which itself happens up to one check interval after the \
             crash: the seed article's \"about 80 seconds\". Knowing the reaper's phase, the exact \
             tick is predictable.",
            min = GoDuration(m.min_deregister),
            reap = GoDuration(m.reap_interval),
        )
    }
}

impl Findings for Report {
    fn tables(&self) -> Vec<Table> {
        let mut tables = vec![self.table()];
        if let Some(section) = &self.reaper {
            tables.extend(crate::reaper_twins::tables(section, &self.trials));
        }
        tables
    }

    fn details(&self) -> String {
        let m = &self.model;
        let mut out = format!(
            "Consul {} ({}). Reaper every {} (`CheckReapInterval`), minimum delay {} \
             (`CheckDeregisterIntervalMin`), from {}. Reaper phase from {}.\n\n",
            self.consul_version,
            self.backend,
            GoDuration(m.reap_interval),
            GoDuration(m.min_deregister),
            self.model_source,
            self.anchor_source
        );
        out.push_str(&format!(
            "{} trials, {} inside their window. Largest prediction error: {:.1} ms from the \
             agent's start{}.\n",
            self.trials.len(),
            if self.all_in_window { "all" } else { "NOT all" },
            self.max_error_from_start_ms,
            self.max_error_from_earlier_ms
                .map(|e| format!(", {e:.1} ms from earlier removals"))
                .unwrap_or_default()
        ));
        if let Some(c) = &self.contrast {
            out.push_str(&format!(
                "Contrast: on {} the server deregistered itself and Consul no longer listed it \
                 after {:.1} ms (exit code {}).\n",
                c.signal,
                c.removed_after_ms,
                c.exit_code.map_or("none".into(), |c| c.to_string())
            ));
        }
        if let Some(section) = &self.reaper {
            out.push_str(&crate::reaper_twins::summary(section));
        }
        out.push('\n');
        out.push_str(&self.explanation());
        out
    }

    fn violations(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .trials
            .iter()
            .filter(|t| !t.in_window)
            .map(|t| format!("{} removed outside its window", t.service_id))
            .collect();
        if let Some(section) = &self.reaper
            && !section.all_within
        {
            v.push(format!(
                "not every twin was removed by the reaper within ±{:.0} ms",
                section.tolerance_ms
            ));
        }
        v
    }

    fn plot(&self) -> Option<Plot> {
        Some(self.removal_plot())
    }
}

impl Report {
    /// critical→removed of every trial against its window, by setting.
    pub fn removal_plot(&self) -> Plot {
        let cells = by_cell(&self.trials);
        let mut settings: Vec<GoDuration> = cells.keys().map(|(s, _)| *s).collect();
        settings.dedup();
        let mut intervals: Vec<GoDuration> = cells.keys().map(|(_, i)| *i).collect();
        intervals.sort();
        intervals.dedup();
        let y_max = self
            .trials
            .iter()
            .map(|t| t.critical_window.hi.max(t.critical_to_removed))
            .fold(60.0, f64::max)
            + 10.0;
        let mut windows = Vec::new();
        let mut naive = Vec::new();
        for (i, setting) in settings.iter().enumerate() {
            let Some(t) = self.trials.iter().find(|t| t.setting == *setting) else {
                continue;
            };
            let x = i as f64;
            let w = &t.critical_window;
            windows.push(((x - 0.35, w.lo), (x + 0.35, w.hi)));
            let s = setting.as_duration().as_secs_f64();
            naive.push(((x - 0.4, s), (x + 0.4, s)));
        }
        let mut series = vec![
            Series {
                label: "model window (max(setting, 1m), +30 s]".into(),
                color: (180, 205, 240),
                mark: Mark::Boxes(windows),
            },
            Series {
                label: "the setting itself (what one expects)".into(),
                color: PALETTE[1],
                mark: Mark::Segments(naive),
            },
        ];
        let colors = [PALETTE[0], PALETTE[4], PALETTE[2], PALETTE[3]];
        for (k, interval) in intervals.iter().enumerate() {
            let spread = (k as f64 - (intervals.len() as f64 - 1.0) / 2.0) * 0.15;
            let points = self
                .trials
                .iter()
                .filter(|t| t.interval == *interval)
                .filter_map(|t| {
                    let i = settings.iter().position(|s| *s == t.setting)?;
                    Some((i as f64 + spread, t.critical_to_removed))
                })
                .collect();
            series.push(Series {
                label: format!("measured, check every {interval}"),
                color: colors[k % colors.len()],
                mark: Mark::Dots(points),
            });
        }
        Plot {
            title: format!(
                "Consul {}: check critical -> service removed, by DeregisterCriticalServiceAfter",
                self.consul_version
            ),
            x: Axis::categories(
                "DeregisterCriticalServiceAfter (as registered)",
                settings.iter().map(ToString::to_string).collect(),
            ),
            y: Axis::linear("seconds from critical to removed").range(0.0, y_max),
            series,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_plan_interleaves_cells_over_the_stagger() {
        let config = SweepConfig::default();
        let plan = config.plan();
        assert_eq!(plan.len(), 16);
        let offsets: Vec<f64> = plan.iter().map(|p| p.kill_offset.as_secs_f64()).collect();
        assert_eq!(offsets[0], 0.0);
        assert!((offsets[15] - 28.125).abs() < 1e-9);
        // Each cell's two trials are half the stagger apart.
        assert!((offsets[8] - offsets[0] - 15.0).abs() < 1e-9);
        // The longest window: 2m + 30 s + a 5 s interval + 3 s timeout, after a 30 s stagger.
        assert_eq!(
            config.expected_duration(&ReaperModel::CONSUL),
            Duration::from_secs(30 + 120 + 30 + 5 + 3)
        );
    }

    #[test]
    fn the_seed_plan_is_one_trial() {
        let plan = SweepConfig::seed().plan();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].setting, Duration::from_secs(30));
        assert_eq!(plan[0].interval, Duration::from_secs(5));
    }

    fn synthetic() -> Report {
        let model = ReaperModel::CONSUL;
        let trials = [
            (30, 1, 81.2),
            (30, 5, 66.0),
            (90, 1, 104.3),
            (120, 5, 140.0),
        ]
        .iter()
        .enumerate()
        .map(|(i, (setting, interval, c2r))| {
            let setting = Duration::from_secs(*setting);
            Trial {
                service_id: format!("t{i}"),
                setting: GoDuration(setting),
                effective: GoDuration(model.effective(setting)),
                interval: GoDuration::from_secs(*interval),
                trial: 1,
                killed_at: 1.0,
                critical_at: 1.5,
                removed_at: 1.5 + c2r,
                kill_to_critical: 0.5,
                critical_to_removed: *c2r,
                kill_to_removed: 0.5 + c2r,
                critical_window: model.critical_window(setting),
                kill_window: model.kill_window(
                    setting,
                    Duration::from_secs(*interval),
                    Duration::from_secs(1),
                ),
                in_window: true,
                predicted_from_start: 1.5 + c2r - 0.007,
                error_from_start_ms: 7.0,
                predicted_from_earlier: None,
                error_from_earlier_ms: None,
                agent_logged_critical: None,
                agent_logged_removed: None,
            }
        })
        .collect();
        Report {
            date: "2026-11-25T00:00:00Z".into(),
            consul_version: "1.8.7".into(),
            backend: "docker",
            model,
            model_source: "test",
            reaper_anchor: 0.0,
            anchor_source: "test".into(),
            trials,
            contrast: None,
            reaper: None,
            max_error_from_start_ms: 7.0,
            max_error_from_earlier_ms: None,
            all_in_window: true,
            wall_time: 1.0,
        }
    }

    #[test]
    fn markdown_lists_every_trial_with_its_window() {
        let report = synthetic();
        let md = format!("{}\n{}", report.details(), report.table().markdown());
        assert_eq!(md.matches("\n| ").count(), 5, "header + 4 trials:\n{md}");
        assert!(
            md.contains("| 30s | 1m | 1s | 1 | 0.50 | 81.20 | 81.70 | (60, 90] | +7.0 / – |"),
            "{md}"
        );
        assert!(md.contains("all inside their window"));
        assert!(report.violations().is_empty());
    }

    #[test]
    fn svg_plot_is_written() {
        let dir = std::env::temp_dir().join(format!("testbed-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.svg");
        synthetic().removal_plot().svg(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("<circle"), "trials are drawn");
        assert!(svg.contains("1m30s"), "settings label the axis");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
