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
        self, Basics, LIMIT, SERVICE,
        observers::{Tally, ViewState},
    },
};

/// Most requests per second the servers and the client together may send to a failing
/// Consul: well above what backoff gives, far below a retry loop without one.
const MAX_RETRY_RATE: f64 = 100.0;

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Echo servers started.
    pub servers: usize,
    /// Check interval of the servers (their registration watch blocks this long).
    pub interval: Duration,
    /// One echo every this long.
    pub every: Duration,
    /// The faults, in order.
    pub faults: Vec<Fault>,
    /// How long each fault lasts once both sides have met it.
    pub hold: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            servers: 2,
            interval: Duration::from_secs(1),
            every: Duration::from_millis(50),
            faults: vec![
                Fault::Delay(Duration::from_secs(2)),
                Fault::Drop,
                Fault::Cut,
                Fault::BadJson,
                Fault::Truncated,
                Fault::Status(500),
                Fault::Status(429),
            ],
            hold: Duration::from_secs(3),
        }
    }
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
        let scenario::Stage {
            mut servers,
            ids,
            client: _client,
            discovery,
            traffic,
            ..
        } = scenario::Stage::set_up(
            launcher,
            consul,
            via,
            self.servers,
            self.interval,
            Duration::from_secs(2),
            ("proxy", self.every, 1_000_000),
        )
        .await?;

        let mut phases = Vec::new();
        for &fault in &self.faults {
            step.say(format!("proxy: {fault}"));
            let marks: Vec<usize> = servers.iter().map(|s| s.process.output().mark()).collect();
            let before = proxy.stats();
            let t0 = Instant::now();
            proxy.set(fault);
            match fault {
                Fault::Drop => {
                    // Nothing comes back, so nothing can fail yet: wait until every server and
                    // the client have a request held.
                    let held = (self.servers + 1) as u64;
                    if let Err(e) = proxy.wait_held(held, LIMIT / 4).await {
                        tracing::warn!(error = %e, "not every party had a request held");
                    }
                }
                f if f.is_failure() => {
                    for (s, mark) in servers.iter().zip(&marks) {
                        let _ = s
                            .process
                            .output()
                            .wait_for_after(*mark, "retrying with backoff", LIMIT / 4)
                            .await;
                    }
                    let _ = discovery
                        .wait_for("the client to see the fault", t0, LIMIT / 4, |v| {
                            matches!(v.state, ViewState::Unreachable(_))
                        })
                        .await;
                }
                _ => {}
            }
            tokio::time::sleep(self.hold).await;
            let lasted = t0.elapsed();
            let requests = proxy.stats().requests - before.requests;
            let t1 = Instant::now();
            let t1_wall = SystemTime::now();
            proxy.heal();
            step.say(format!("proxy healed after {fault}; waiting for recovery"));

            // Who met the fault, and how they came back.
            let mut server_errors = Vec::new();
            let mut servers_recovered = Some(Duration::ZERO);
            for (s, mark) in servers.iter().zip(&marks) {
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
                server_errors.push(error_field(&error.text));
                let back = output
                    .wait_for_after(*mark, "Consul answers again", LIMIT)
                    .await
                    .ok()
                    .map(|l| scenario::since_wall(t1_wall, l.received));
                servers_recovered = match (servers_recovered, back) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            let unreachable = |v: &scenario::observers::View| match &v.state {
                ViewState::Unreachable(e) => Some(e.clone()),
                _ => None,
            };
            let client_failed = if fault.is_failure() {
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
            let client_error = client_failed.as_ref().and_then(unreachable);
            let client_recovered = match &client_failed {
                Some(failed) => discovery
                    .wait_for("the client to be answered again", failed.at, LIMIT, |v| {
                        v.state == ViewState::Reachable
                    })
                    .await
                    .ok()
                    .map(|v| v.at.saturating_duration_since(t1)),
                None => None,
            };
            let (servers_recovered, client_recovered) = if fault.is_failure() {
                (
                    servers_recovered.filter(|_| !server_errors.is_empty()),
                    client_recovered,
                )
            } else {
                (None, None)
            };
            let recovered = match (servers_recovered, client_recovered) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            let want = hint(fault);
            let clear = server_errors
                .iter()
                .chain(client_error.iter())
                .all(|e| e.contains(want));
            let end = Instant::now();
            let echoes: Vec<_> = traffic
                .outcomes()
                .into_iter()
                .filter(|o| o.sent >= t0 && o.sent <= end)
                .collect();
            phases.push(Phase {
                fault,
                lasted,
                server_errors,
                client_error,
                clear,
                servers_recovered,
                client_recovered,
                recovered,
                requests_per_sec: requests as f64 / lasted.as_secs_f64(),
                echoes: Tally::of(&echoes),
            });
        }

        step.say("all faults done; checking the servers");
        let direct = consul.client();
        let all_registered = tokio::time::timeout(
            Duration::from_secs(10),
            wait::health_until(&direct, SERVICE, true, LIMIT, |entries| {
                ids.iter()
                    .all(|id| entries.iter().any(|e| &e.service.id == id))
            }),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        let outcomes = traffic.finish().await;
        Ok(Outcome {
            servers: self.servers,
            phases,
            all_registered,
            basics: Basics::of(&outcomes, &mut servers),
        })
    }
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
