//! Scenario 4, a misbehaving path to Consul: echo servers and a resilient client reach the
//! agent only through the [`FaultProxy`], which in turn delays, drops, cuts and corrupts
//! Consul's answers (bad JSON, truncated body, 500, 429), one fault at a time, then heals.
//! Each must log a clear error, back off (no request storm), never panic or exit, keep every
//! echo answered, and recover once the proxy heals.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::{Row, Rows, Scenario};
use crate::{
    error::Result,
    faultproxy::{Fault, FaultProxy},
    procs::Launcher,
    wait,
};
use crate::{
    experiment::{Env, Experiment},
    progress::Progress,
    report::{self, ms_serde as ms},
    scenario::{
        self, Basics, Cast, LIMIT, SERVICE, Stage,
        observers::{DiscoveryLog, Tally, View, ViewState, sent_between},
    },
};

/// Most requests per second the servers and the client together may send to a failing
/// Consul: well above what backoff gives, far below a retry loop without one.
const MAX_RETRY_RATE: f64 = 100.0;

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Echo servers (their registration watch blocks a check interval) and echoes.
    pub cast: Cast,
    /// The faults, in order.
    pub faults: Vec<Fault>,
    /// How long each fault lasts once both sides have met it.
    pub hold: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cast: Cast::default().servers(2),
            faults: every_fault(Duration::from_secs(2)),
            hold: Duration::from_secs(3),
        }
    }
}

/// Every fault the proxy injects, in order, the delay being `delay`.
pub fn every_fault(delay: Duration) -> Vec<Fault> {
    vec![
        Fault::Delay(delay),
        Fault::Drop,
        Fault::Cut,
        Fault::BadJson,
        Fault::Truncated,
        Fault::Status(500),
        Fault::Status(429),
    ]
}

/// One fault, from injection to recovery.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// The fault the proxy injected.
    pub fault: Fault,
    /// From injection to healing.
    #[serde(with = "ms")]
    pub lasted: Duration,
    /// The first error each server logged (its `error=` field).
    pub server_errors: Vec<String>,
    /// The error the client's discovery reported.
    pub client_error: Option<String>,
    /// Every error names what went wrong (the status, "malformed", "did not answer").
    pub clear: bool,
    /// Healing → the last server logs that Consul answers again.
    #[serde(with = "ms::opt")]
    pub servers_recovered: Option<Duration>,
    /// Healing → the client's discovery is answered again.
    #[serde(with = "ms::opt")]
    pub client_recovered: Option<Duration>,
    /// The later of the two.
    #[serde(with = "ms::opt")]
    pub recovered: Option<Duration>,
    /// Requests that reached the proxy per second while the fault lasted.
    pub requests_per_sec: f64,
    /// Echoes sent from injection to recovery.
    pub echoes: Tally,
}

impl Phase {
    fn violations(&self, servers: usize) -> Vec<String> {
        let mut v = Vec::new();
        let f = self.fault;
        if self.echoes.lost > 0 {
            v.push(format!("{f}: {} echoes lost", self.echoes.lost));
        }
        if f.is_failure() {
            if self.server_errors.len() < servers || self.client_error.is_none() {
                v.push(format!(
                    "{f}: {} of {servers} servers and {} client logged an error",
                    self.server_errors.len(),
                    u8::from(self.client_error.is_some())
                ));
            }
            if !self.clear {
                v.push(format!("{f}: an error does not say what went wrong"));
            }
            if self.recovered.is_none() {
                v.push(format!("{f}: no recovery after healing"));
            }
        } else if !self.server_errors.is_empty() || self.client_error.is_some() {
            v.push(format!("{f}: a slow answer was treated as an error"));
        }
        if self.requests_per_sec > MAX_RETRY_RATE {
            v.push(format!(
                "{f}: {:.0} requests/s to Consul: no backoff",
                self.requests_per_sec
            ));
        }
        v
    }
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Echo servers started.
    pub servers: usize,
    /// Each fault, in turn.
    pub phases: Vec<Phase>,
    /// After the last fault, Consul lists every server passing.
    pub all_registered: bool,
    /// Its echoes and what became of its echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Outcome {
    /// The invariants that did not hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .phases
            .iter()
            .flat_map(|p| p.violations(self.servers))
            .collect();
        v.extend(self.basics.violations());
        if !self.all_registered {
            v.push("a server is no longer registered and passing".into());
        }
        v
    }
}

impl Rows for Outcome {
    /// One row per fault.
    fn rows(&self) -> Vec<Row> {
        let common = {
            let mut v = Vec::new();
            if !self.all_registered {
                v.push("a server is no longer registered and passing".to_owned());
            }
            if !self.basics.panics.is_empty() {
                v.push(format!("panics: {:?}", self.basics.panics));
            }
            v
        };
        self.phases
            .iter()
            .map(|p| {
                let mut violations = p.violations(self.servers);
                violations.extend(common.iter().cloned());
                Row {
                    scenario: format!("{}: {}", Scenario::Proxy.title(), p.fault),
                    injected: format!(
                        "{} on every answer to {} servers and the client, {}",
                        p.fault,
                        self.servers,
                        report::secs(p.lasted)
                    ),
                    sent: p.echoes.sent,
                    lost: p.echoes.lost,
                    recovery: if p.fault.is_failure() {
                        format!(
                            "servers {}, client {} after healing ({:.1} req/s while failing)",
                            report::secs_or(p.servers_recovered, "never"),
                            report::secs_or(p.client_recovered, "never"),
                            p.requests_per_sec
                        )
                    } else {
                        format!(
                            "– (no error: slow is not failed; {:.1} req/s)",
                            p.requests_per_sec
                        )
                    },
                    recovery_ms: p.recovered.map(|d| d.as_secs_f64() * 1e3),
                    peak_rss_kib: self.basics.peak_rss_kib,
                    violations,
                }
            })
            .collect()
    }

    /// How each figure was measured, with the errors as logged.
    fn details(&self) -> String {
        let mut out = format!(
            "**4. Fault proxy.** {} servers and the client reach Consul only through the proxy \
             (the agent still checks the servers directly). For each fault: the time from \
             healing until each server's log says \"Consul answers again\" and until the \
             client's discovery publishes an answered snapshot; the request rate is the \
             proxy's count over the fault's duration. Errors as logged:\n\n",
            self.servers
        );
        for p in &self.phases {
            out.push_str(&format!(
                "- {}: server: {}; client: {}\n",
                p.fault,
                p.server_errors
                    .first()
                    .map_or("(none)".into(), |e| format!("`{e}`")),
                p.client_error
                    .as_ref()
                    .map_or("(none)".into(), |e| format!("`{e}`")),
            ));
        }
        out
    }
}

/// What an error caused by `fault` should say.
fn hint(fault: Fault) -> &'static str {
    match fault {
        Fault::Pass | Fault::Delay(_) | Fault::StripIndex => "",
        Fault::Drop | Fault::Cut => "did not answer",
        Fault::BadJson | Fault::Truncated => "malformed answer",
        Fault::Status(500) => "answered 500",
        Fault::Status(429) => "answered 429",
        Fault::Status(_) => "answered",
    }
}

/// The `error=...` field of a server's log line.
fn error_field(line: &str) -> String {
    let Some(start) = line.find("error=") else {
        return line.to_owned();
    };
    let rest = &line[start + "error=".len()..];
    let end = rest.find(" retry_in=").unwrap_or(rest.len());
    rest[..end].to_owned()
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::Proxy.title().into()
    }

    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let consul = env.agent()?;
        step.say("starting the fault proxy");
        let proxy = FaultProxy::start(consul.http_addr()).await?;
        let via = consul.config().with_address(proxy.address());
        step.say("starting echo servers behind the proxy");
        let stage = self
            .cast
            .opening("proxy")
            .via(via)
            .max(1_000_000)
            .set_up(launcher, consul)
            .await?;
        let mut phases = Vec::new();
        for &fault in &self.faults {
            phases.push(self.phase(&proxy, &stage, fault, step).await);
        }
        step.say("all faults done; checking the servers");
        let all_registered = tokio::time::timeout(
            Duration::from_secs(10),
            wait::health_until(&consul.client(), SERVICE, true, LIMIT, |entries| {
                stage
                    .ids
                    .iter()
                    .all(|id| entries.iter().any(|e| &e.service.id == id))
            }),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        let (_, basics) = stage.finish().await;
        Ok(Outcome {
            servers: self.cast.servers,
            phases,
            all_registered,
            basics,
        })
    }
}

impl Config {
    /// One fault: injected until every party has met it, held, healed; who logged what,
    /// and how each came back.
    async fn phase(
        &self,
        proxy: &FaultProxy,
        stage: &Stage,
        fault: Fault,
        step: &Progress,
    ) -> Phase {
        step.say(format!("proxy: {fault}"));
        let marks = stage.marks();
        let before = proxy.stats();
        let t0 = Instant::now();
        proxy.set(fault);
        self.until_met(proxy, stage, fault, &marks, t0).await;
        tokio::time::sleep(self.hold).await;
        let lasted = t0.elapsed();
        let requests = proxy.stats().requests - before.requests;
        let t1 = Instant::now();
        let t1_wall = SystemTime::now();
        proxy.heal();
        step.say(format!("proxy healed after {fault}; waiting for recovery"));
        let (server_errors, servers_recovered) = servers_met(stage, fault, &marks, t1_wall).await;
        let (client_error, client_recovered) = client_met(&stage.discovery, fault, t0, t1).await;
        let (servers_recovered, client_recovered) = if fault.is_failure() {
            (
                servers_recovered.filter(|_| !server_errors.is_empty()),
                client_recovered,
            )
        } else {
            (None, None)
        };
        let want = hint(fault);
        let clear = server_errors
            .iter()
            .chain(client_error.iter())
            .all(|e| e.contains(want));
        let echoes = sent_between(&stage.traffic.outcomes(), t0, Instant::now());
        Phase {
            fault,
            lasted,
            server_errors,
            client_error,
            clear,
            servers_recovered,
            client_recovered,
            recovered: servers_recovered
                .zip(client_recovered)
                .map(|(a, b)| a.max(b)),
            requests_per_sec: requests as f64 / lasted.as_secs_f64(),
            echoes: Tally::of(&echoes),
        }
    }

    /// Until every server and the client have met `fault` (a request held, for a drop; an
    /// error logged, for a failure; nothing, for a delay), at most a quarter of the limit.
    async fn until_met(
        &self,
        proxy: &FaultProxy,
        stage: &Stage,
        fault: Fault,
        marks: &[usize],
        t0: Instant,
    ) {
        match fault {
            Fault::Drop => {
                // Nothing comes back, so nothing can fail yet: wait until every server and
                // the client have a request held.
                let held = (self.cast.servers + 1) as u64;
                if let Err(e) = proxy.wait_held(held, LIMIT / 4).await {
                    tracing::warn!(error = %e, "not every party had a request held");
                }
            }
            f if f.is_failure() => {
                for (s, mark) in stage.servers.iter().zip(marks) {
                    let _ = s
                        .process
                        .output()
                        .wait_for_after(*mark, "retrying with backoff", LIMIT / 4)
                        .await;
                }
                let _ = stage
                    .discovery
                    .wait_for("the client to see the fault", t0, LIMIT / 4, |v| {
                        matches!(v.state, ViewState::Unreachable(_))
                    })
                    .await;
            }
            _ => {}
        }
    }
}

/// The first error each server logged for `fault` since its mark (its `error=` field), and
/// since `healed` until the last of them logged that Consul answers again.
async fn servers_met(
    stage: &Stage,
    fault: Fault,
    marks: &[usize],
    healed: SystemTime,
) -> (Vec<String>, Option<Duration>) {
    let mut errors = Vec::new();
    let mut recovered = Some(Duration::ZERO);
    for (s, mark) in stage.servers.iter().zip(marks) {
        let output = s.process.output();
        let error = if fault.is_failure() {
            // A dropped request fails only when the proxy lets go of it, at healing.
            output
                .wait_for_after(*mark, "retrying with backoff", LIMIT / 4)
                .await
                .ok()
        } else {
            output.find_after(*mark, "retrying with backoff")
        };
        let Some(error) = error else {
            continue;
        };
        errors.push(error_field(&error.text));
        let back = output
            .wait_for_after(*mark, "Consul answers again", LIMIT)
            .await
            .ok()
            .map(|l| scenario::since_wall(healed, l.received));
        recovered = recovered.zip(back).map(|(a, b)| a.max(b));
    }
    (errors, recovered)
}

/// The error the client's discovery published for `fault` (injected at `t0`), and from
/// `healed` until it was answered again.
async fn client_met(
    discovery: &DiscoveryLog,
    fault: Fault,
    t0: Instant,
    healed: Instant,
) -> (Option<String>, Option<Duration>) {
    let unreachable = |v: &View| match &v.state {
        ViewState::Unreachable(e) => Some(e.clone()),
        _ => None,
    };
    let failed = if fault.is_failure() {
        discovery
            .wait_for("the client to see the fault", t0, LIMIT / 4, |v| {
                unreachable(v).is_some()
            })
            .await
            .ok()
    } else {
        discovery
            .views()
            .into_iter()
            .find(|v| v.at >= t0 && unreachable(v).is_some())
    };
    let error = failed.as_ref().and_then(unreachable);
    let recovered = match &failed {
        Some(failed) => discovery
            .wait_for("the client to be answered again", failed.at, LIMIT, |v| {
                v.state == ViewState::Reachable
            })
            .await
            .ok()
            .map(|v| v.at.saturating_duration_since(healed)),
        None => None,
    };
    (error, recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_error_field_of_a_log_line() {
        let line = "2026-11-25T13:32:04Z  WARN consul_registry::registration: Consul: cannot watch \
                    its registration, retrying with backoff error=Consul answered 500 to GET \
                    /v1/agent/service/x: injected 500 retry_in=61ms";
        assert_eq!(
            error_field(line),
            "Consul answered 500 to GET /v1/agent/service/x: injected 500"
        );
        assert_eq!(error_field("no field"), "no field");
        assert_eq!(hint(Fault::Truncated), "malformed answer");
    }
}
