//! Scenario 7, the agent's certificate changes under running processes: an agent serving
//! HTTPS only with `verify_incoming`, echo servers and a resilient client talking to it over
//! mutual TLS, and steady echo traffic. The agent's certificate files are replaced and the
//! agent reloaded (SIGHUP) three times: an ordinary rotation (same CA), a rotation gone wrong
//! (a CA nobody trusts), and back (same CA). Each phase measures how long until a new
//! connection is served the new certificate, what a fresh client gets, and whether the running
//! processes notice at all (errors, re-registrations, the client's discovery view, echoes).

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::{Row, Rows, Scenario};
use crate::{
    ConsulOptions,
    consul::{Issuer, TestPki, pki::AGENT_NAMES},
    error::Result,
    procs::{Launcher, ServerProcess},
};
use crate::{
    experiment::{Env, Experiment, Needs},
    progress::Progress,
    report::{self, ms_serde as ms},
    scenario::{
        self, Basics, Cast, LIMIT,
        observers::{Tally, ViewState, sent_between},
    },
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Echo servers and echoes.
    pub cast: Cast,
    /// How long each phase is watched after the agent serves the new certificate.
    pub window: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cast: Cast::default().servers(2),
            window: Duration::from_secs(5),
        }
    }
}

/// One rotation and what followed it.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// `same CA`, `unknown CA`, `same CA again`.
    pub rotation: String,
    /// New files written → a new connection is served the new certificate (SIGHUP included).
    #[serde(with = "ms")]
    pub reload: Duration,
    /// What a new client with the running processes' settings got: `None` when it was
    /// answered, else its error.
    pub fresh_client_error: Option<String>,
    /// How long that client took for its answer or its error.
    #[serde(with = "ms")]
    pub fresh_client_took: Duration,
    /// Echoes during the window.
    pub tally: Tally,
    /// Lines of the servers' output during the window that speak of TLS.
    pub server_tls_lines: Vec<String>,
    /// Servers' "re-registered" lines during the window: a dev-mode agent keeps no data
    /// directory, so its reload drops every service registered through the API.
    pub re_registrations: usize,
    /// New files written → the last of those lines.
    #[serde(with = "ms::opt")]
    pub re_registered_after: Option<Duration>,
    /// Whether the client's discovery stayed reachable through the window.
    pub client_view_reachable: bool,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// How long each phase was watched after the agent served the new certificate.
    #[serde(with = "ms")]
    pub window: Duration,
    /// Each rotation, in turn.
    pub phases: Vec<Phase>,
    /// Its echoes and what became of its echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Outcome {
    /// The invariants that did not hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        for phase in &self.phases {
            let trusted = !phase.rotation.starts_with("unknown");
            match (&phase.fresh_client_error, trusted) {
                (Some(e), true) => {
                    v.push(format!("{}: a new client was refused: {e}", phase.rotation))
                }
                (None, false) => v.push(format!(
                    "{}: a new client accepted a certificate from an unknown CA",
                    phase.rotation
                )),
                (Some(e), false) if !e.contains("CONSUL_CACERT") => v.push(format!(
                    "{}: the refusal does not name CONSUL_CACERT: {e}",
                    phase.rotation
                )),
                _ => {}
            }
        }
        v
    }
}

impl Rows for Outcome {
    /// The table's row.
    fn rows(&self) -> Vec<Row> {
        let noticed = |p: &Phase| {
            let mut what = Vec::new();
            if !p.server_tls_lines.is_empty() {
                what.push(format!("{} server TLS errors", p.server_tls_lines.len()));
            }
            if p.re_registrations > 0 {
                what.push(format!(
                    "services dropped by the reload, {} re-registered by the servers after {}",
                    p.re_registrations,
                    report::secs_or(p.re_registered_after, "–")
                ));
            }
            if !p.client_view_reachable {
                what.push("client discovery unreachable".into());
            }
            if what.is_empty() {
                "running processes noticed nothing".to_owned()
            } else {
                what.join(", ")
            }
        };
        let phase = |p: &Phase| {
            format!(
                "{}: served after {}, new client {} in {}, {}",
                p.rotation,
                report::secs(p.reload),
                if p.fresh_client_error.is_some() {
                    "refused"
                } else {
                    "answered"
                },
                report::secs(p.fresh_client_took),
                noticed(p)
            )
        };
        vec![Row {
            scenario: Scenario::Rotated.title().into(),
            injected: "the agent's certificate re-issued and reloaded (SIGHUP) under running \
                       mTLS servers and client: same CA, then an unknown CA, then back"
                .into(),
            sent: self.basics.tally.sent,
            lost: self.basics.tally.lost,
            recovery: self.phases.iter().map(phase).collect::<Vec<_>>().join("; "),
            recovery_ms: self.phases.first().map(|p| p.reload.as_secs_f64() * 1e3),
            peak_rss_kib: self.basics.peak_rss_kib,
            violations: self.violations(),
        }]
    }

    /// How each figure was measured, with the figures.
    fn details(&self) -> String {
        let mut out = format!(
            "**7. TLS certificate rotated.** The agent serves HTTPS only, with \
             `verify_incoming`; servers and client use mutual TLS. For each rotation the \
             agent's certificate and key files were replaced (atomically) and the agent sent \
             SIGHUP; `served after` runs from the new files to a new connection being served \
             the new certificate. A new client with the running processes' settings then asked \
             the agent, and the running processes were watched for {}.\n\n",
            report::secs(self.window)
        );
        for p in &self.phases {
            out.push_str(&format!(
                "* {}: served after {}; new client: {} ({}); echoes {} sent / {} lost; server \
                 lines about TLS: {}; re-registrations: {} (last {} after the new files); client \
                 discovery {}.\n",
                p.rotation,
                report::secs(p.reload),
                p.fresh_client_error.as_deref().unwrap_or("answered"),
                report::secs(p.fresh_client_took),
                p.tally.sent,
                p.tally.lost,
                p.server_tls_lines.len(),
                p.re_registrations,
                report::secs_or(p.re_registered_after, "–"),
                if p.client_view_reachable {
                    "stayed reachable"
                } else {
                    "became unreachable"
                },
            ));
        }
        out.push_str(
            "\nOpen connections keep the session they began with: Consul applies new files to \
             new handshakes only, so the running processes, whose pooled connections stay \
             open, go on as before even under a certificate they would refuse; a process that \
             connects anew is refused at once with an error naming CONSUL_CACERT. The \
             re-registrations are not TLS's doing: a reload makes Consul 1.8.7 unload every \
             service and load back only those of its configuration and data directory, and a \
             dev-mode agent has none (an agent with a `data_dir` restores API registrations); \
             the servers' watch of their own entry puts them back.\n",
        );
        out
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::Rotated.title().into()
    }
    fn needs(&self) -> Result<Needs> {
        let pki = std::sync::Arc::new(TestPki::new()?);
        Ok(Needs::Agent(ConsulOptions::from_env()?.with_tls(pki, true)))
    }

    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let consul = env.agent()?;
        step.say("starting echo servers and a client over mutual TLS");
        let stage = self
            .cast
            .opening("rotated")
            .set_up(launcher, consul)
            .await?;

        let mut phases = Vec::new();
        for (rotation, issuer) in [
            ("same CA", Issuer::SameCa),
            ("unknown CA", Issuer::UnknownCa),
            ("same CA again", Issuer::SameCa),
        ] {
            step.say(format!("rotating the agent's certificate: {rotation}"));
            let marks = stage.marks();
            let t0 = Instant::now();
            let t0_wall = SystemTime::now();
            consul.rotate_certificate(AGENT_NAMES, issuer).await?;
            let reload = t0.elapsed();
            let asked = Instant::now();
            let fresh = consul_api::Client::new(consul.config())?;
            let answer = tokio::time::timeout(LIMIT, fresh.agent().agent_self()).await;
            let fresh_client_took = asked.elapsed();
            let fresh_client_error = match answer {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {}", report::secs(LIMIT))),
            };
            let window_start = Instant::now();
            tokio::time::sleep(self.window).await;
            let window_end = Instant::now();
            let (server_tls_lines, re_registered) = since(&stage.servers, &marks);
            let client_view_reachable = stage
                .discovery
                .views()
                .iter()
                .filter(|v| v.at >= t0)
                .all(|v| v.state == ViewState::Reachable);
            phases.push(Phase {
                rotation: rotation.into(),
                reload,
                fresh_client_error,
                fresh_client_took,
                tally: Tally::of(&sent_between(
                    &stage.traffic.outcomes(),
                    window_start,
                    window_end,
                )),
                server_tls_lines,
                re_registrations: re_registered.len(),
                re_registered_after: re_registered
                    .iter()
                    .max()
                    .map(|at| scenario::since_wall(t0_wall, *at)),
                client_view_reachable,
            });
        }

        let (_, basics) = stage.finish().await;
        Ok(Outcome {
            window: self.window,
            phases,
            basics,
        })
    }
}

/// The servers' lines since `marks` that speak of TLS, and when each "re-registered" line
/// arrived.
fn since(servers: &[ServerProcess], marks: &[usize]) -> (Vec<String>, Vec<SystemTime>) {
    let mut tls = Vec::new();
    let mut re_registered = Vec::new();
    for (server, &mark) in servers.iter().zip(marks) {
        for line in server.process.output().lines().into_iter().skip(mark) {
            if line.text.contains("TLS") {
                tls.push(line.text.clone());
            }
            if line.text.contains("re-registered") {
                re_registered.push(line.received);
            }
        }
    }
    (tls, re_registered)
}
