//! Scenario 1, a hung server: the echo server the client is talking to is frozen with SIGSTOP.
//! Its port still accepts connections but nothing answers, not even `/check`. The agent's
//! check times out and marks it critical, discovery drops it, and the resilient client fails
//! over after its reply timeout, resending what was unanswered; SIGCONT brings the server back
//! into rotation. Must hold: no echo lost, the server leaves and rejoins rotation, it survives.

use std::time::{Duration, Instant};

use consul_api::HealthStatus;
use serde::Serialize;

use super::{Row, Rows, Scenario};
use crate::{
    error::{Error, Result},
    procs::Launcher,
    signal::Signal,
    wait,
};
use crate::{
    experiment::{Env, Experiment},
    progress::Progress,
    report::{self, ms_serde as ms},
    scenario::{
        self, Basics, Cast, LIMIT, SERVICE,
        observers::{Tally, sent_between},
    },
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Echo servers (at least 2, so there is somewhere to fail over to) and echoes.
    pub cast: Cast,
    /// The client's reply timeout: how long it waits on a silent instance.
    pub reply_timeout: Duration,
    /// How long the server stays frozen after discovery has dropped it.
    pub hold: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cast: Cast::default(),
            reply_timeout: Duration::from_secs(1),
            hold: Duration::from_secs(2),
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The server frozen: the one serving the client at that moment.
    pub frozen: String,
    /// How long it stayed frozen.
    #[serde(with = "ms")]
    pub frozen_for: Duration,
    /// SIGSTOP → the first reply from another instance (the client's failover).
    #[serde(with = "ms::opt")]
    pub failover: Option<Duration>,
    /// SIGSTOP → Consul reports its check critical (a blocking query on its health).
    #[serde(with = "ms::opt")]
    pub critical: Option<Duration>,
    /// The critical check's output, as Consul stores it.
    pub check_output: String,
    /// SIGSTOP → the client's discovery no longer lists it.
    #[serde(with = "ms::opt")]
    pub left_rotation: Option<Duration>,
    /// SIGCONT → the client's discovery lists it again.
    #[serde(with = "ms::opt")]
    pub rejoined_rotation: Option<Duration>,
    /// Echoes sent between SIGSTOP and the rejoin.
    pub during_fault: Tally,
    /// The frozen server still runs and echoes after SIGCONT.
    pub survived: bool,
    /// Its echoes and what became of its echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Outcome {
    /// The invariants that did not hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        if self.critical.is_none() {
            v.push("Consul never marked the frozen server critical".into());
        }
        if self.left_rotation.is_none() {
            v.push("the client's discovery kept listing the frozen server".into());
        }
        if self.rejoined_rotation.is_none() {
            v.push("the server did not rejoin rotation after SIGCONT".into());
        }
        if !self.survived {
            v.push("the server did not survive SIGSTOP/SIGCONT".into());
        }
        v
    }
}

impl Rows for Outcome {
    /// The table's row.
    fn rows(&self) -> Vec<Row> {
        vec![Row {
            scenario: Scenario::Hung.title().into(),
            injected: format!(
                "SIGSTOP of the serving instance {} for {}, then SIGCONT",
                self.frozen,
                report::secs(self.frozen_for)
            ),
            sent: self.basics.tally.sent,
            lost: self.basics.tally.lost,
            recovery: format!(
                "out of rotation {} after SIGSTOP (client failed over in {}); back {} after SIGCONT",
                report::secs_or(self.left_rotation, "never"),
                report::secs_or(self.failover, "never"),
                report::secs_or(self.rejoined_rotation, "never")
            ),
            recovery_ms: self.rejoined_rotation.map(|d| d.as_secs_f64() * 1e3),
            peak_rss_kib: self.basics.peak_rss_kib,
            violations: self.violations(),
        }]
    }

    /// How each figure was measured, with the figures.
    fn details(&self) -> String {
        format!(
            "**1. Hung server.** {} was frozen while it served the client. Consul marked its check \
             critical {} after SIGSTOP (check output: \"{}\"); the client's discovery dropped it \
             {} after SIGSTOP; the client itself gave up on it after its reply timeout and got \
             its first reply from another instance {} after SIGSTOP, resending {} messages. \
             After SIGCONT discovery listed it again in {}. {} echoes during the fault, {} lost.\n",
            self.frozen,
            report::secs_or(self.critical, "never"),
            self.check_output.trim(),
            report::secs_or(self.left_rotation, "never"),
            report::secs_or(self.failover, "never"),
            self.basics.tally.resent,
            report::secs_or(self.rejoined_rotation, "never"),
            self.during_fault.sent,
            self.during_fault.lost,
        )
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::Hung.title().into()
    }
    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let consul = env.agent()?;
        if self.cast.servers < 2 {
            return Err(Error::Setting(
                "the hung-server scenario needs at least 2 servers".into(),
            ));
        }
        let direct = consul.client();
        step.say("starting echo servers");
        let mut stage = self
            .cast
            .opening("hung")
            .reply_timeout(self.reply_timeout)
            .set_up(launcher, consul)
            .await?;
        let scenario::Stage {
            servers,
            discovery,
            traffic,
            ..
        } = &mut stage;

        // Freeze the instance the client is connected to.
        let frozen = traffic
            .last_instance()
            .ok_or_else(|| Error::Scenario("no reply yet".into()))?;
        let victim = servers
            .iter()
            .position(|s| s.spec.args.id == frozen)
            .ok_or_else(|| Error::Scenario(format!("{frozen} is not one of ours")))?;
        step.say(format!(
            "SIGSTOP {frozen}; waiting for Consul and the client to notice"
        ));
        let t0 = Instant::now();
        let victim = &mut servers[victim];
        victim.process.freeze().await?;

        let check_id = format!("service:{frozen}");
        let critical = async {
            wait::health_until(&direct, SERVICE, false, LIMIT, |entries| {
                entries.iter().any(|e| {
                    e.service.id == frozen
                        && e.checks
                            .iter()
                            .any(|c| c.check_id == check_id && c.status == HealthStatus::Critical)
                })
            })
            .await
            .map(|(entries, _)| {
                let output = entries
                    .iter()
                    .flat_map(|e| e.checks.iter())
                    .find(|c| c.check_id == check_id)
                    .map(|c| c.output.clone())
                    .unwrap_or_default();
                (Instant::now(), output)
            })
        };
        let left = discovery.wait_for("discovery to drop the frozen server", t0, LIMIT, |v| {
            v.state == scenario::observers::ViewState::Reachable && !v.lists(&frozen)
        });
        let failover = traffic.wait_for("a reply from another instance", LIMIT, |o| {
            o.done >= t0 && o.result.as_ref().is_ok_and(|s| s.instance != frozen)
        });
        let (critical, left, failover) = tokio::join!(critical, left, failover);
        let (critical_at, check_output) = match critical {
            Ok((at, output)) => (Some(at), output),
            Err(e) => (None, e.to_string()),
        };
        let left_at = left.ok().map(|v| v.at);
        let failover_at = failover.ok().map(|o| o.done);

        step.say(format!("{frozen} out of rotation; holding it frozen"));
        tokio::time::sleep(self.hold).await;
        let t1 = Instant::now();
        victim.process.signal(Signal::SIGCONT)?;
        step.say(format!(
            "SIGCONT {frozen}; waiting for it to rejoin rotation"
        ));
        let rejoined = discovery
            .wait_for("discovery to list the server again", t1, LIMIT, |v| {
                v.lists(&frozen)
            })
            .await
            .ok()
            .map(|v| v.at);
        let fault_end = rejoined.unwrap_or_else(Instant::now);

        // A little more traffic after the rejoin, then the tally.
        tokio::time::sleep(self.cast.interval).await;
        let survived = scenario::echo_direct(victim.spec.echo_addr(), b"still alive").await
            && !victim.process.has_exited();
        let (outcomes, basics) = stage.finish().await;
        let during = sent_between(&outcomes, t0, fault_end);
        Ok(Outcome {
            frozen,
            frozen_for: t1 - t0,
            failover: failover_at.map(|t| t - t0),
            critical: critical_at.map(|t| t - t0),
            check_output,
            left_rotation: left_at.map(|t| t - t0),
            rejoined_rotation: rejoined.map(|t| t - t1),
            during_fault: Tally::of(&during),
            survived,
            basics,
        })
    }
}
