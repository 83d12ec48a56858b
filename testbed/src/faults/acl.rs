//! Scenario 5, ACLs on with default deny: servers and clients started with no token, a wrong
//! token, or a token too narrow for what they do must fail with a clear "refused" error and no
//! retry loop; a server token allowing `service:write` on its own name registers that name
//! and no other; a client token with `service:read` (and the `node:read` Consul's health
//! endpoint also needs) discovers and echoes. No secret ever appears in any output.

use std::time::{Duration, Instant};

use consul_api::{AclPolicy, AclPolicyLink, AclToken, Client};
use serde::Serialize;

use super::{Row, Rows, Scenario};
use crate::{
    ConsulOptions,
    error::{Error, Result},
    process::ChildProcess,
    procs::{ClientProcess, Launcher, ServerProcess},
    wait,
};
use crate::{
    experiment::{Env, Experiment, Needs},
    progress::Progress,
    report::{self, Table, ms_serde as ms},
    scenario::{self, LIMIT, SERVICE, observers::Tally},
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Check interval of the servers.
    pub interval: Duration,
    /// Echoes the permitted client sends.
    pub messages: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interval: Duration::from_secs(1),
            messages: 20,
        }
    }
}

/// One attempt with one token.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    /// Who, with what token.
    pub who: String,
    /// What must happen.
    pub expected: String,
    /// What happened: the process's error line, or what it achieved.
    pub observed: String,
    /// Start → exit (for those expected to stop) or → success.
    #[serde(with = "ms")]
    pub took: Duration,
    /// What happened is what must happen.
    pub ok: bool,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Every attempt, each with its verdict.
    pub cases: Vec<Case>,
    /// The permitted client's echoes.
    pub client: Tally,
    /// Secrets searched for in every captured output.
    pub secrets_checked: usize,
    /// Outputs that contained a secret (which process, never the secret).
    pub tokens_printed: Vec<String>,
    /// Highest resident set (VmHWM) of the echo server, KiB.
    pub peak_rss_kib: Option<u64>,
}

impl Outcome {
    /// The invariants that did not hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .cases
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.who, c.observed))
            .collect();
        if self.client.lost > 0 || self.client.sent == 0 {
            v.push(format!(
                "the permitted client got {} of {} replies",
                self.client.sent - self.client.lost,
                self.client.sent
            ));
        }
        if !self.tokens_printed.is_empty() {
            v.push(format!("a token was printed by: {:?}", self.tokens_printed));
        }
        v
    }
}

impl Rows for Outcome {
    /// The table's row.
    fn rows(&self) -> Vec<Row> {
        let kind = |prefix: &str| {
            self.cases
                .iter()
                .filter(|c| c.expected.starts_with(prefix))
                .count()
        };
        let slowest_refusal = self
            .cases
            .iter()
            .filter(|c| c.expected.starts_with("refused"))
            .map(|c| c.took)
            .max();
        vec![Row {
            scenario: Scenario::Acl.title().into(),
            injected: format!(
                "{} tokens refused with 403 (servers: none, wrong, other name; client: wrong), \
                 {} filtered to nothing (client: none, no node:read), {} permitted",
                kind("refused"),
                kind("sees no instance"),
                kind("registers") + kind("discovers")
            ),
            sent: self.client.sent,
            lost: self.client.lost,
            recovery: format!(
                "– (refused processes exit with a clear error within {}, no retry loop; {} \
                 secrets never printed)",
                report::secs_or(slowest_refusal, "–"),
                self.secrets_checked
            ),
            recovery_ms: None,
            peak_rss_kib: self.peak_rss_kib,
            violations: self.violations(),
        }]
    }

    /// Each case as it went.
    fn details(&self) -> String {
        let mut cases = Table::new(["who", "expected", "observed", "took"]).align_right([3]);
        for c in &self.cases {
            cases.push([
                c.who.clone(),
                c.expected.clone(),
                format!(
                    "{}{}",
                    c.observed,
                    if c.ok { "" } else { " **(unexpected)**" }
                ),
                report::secs(c.took),
            ]);
        }
        format!(
            "**5. ACLs, default deny.** Every process gets its token through \
             `CONSUL_HTTP_TOKEN`; each output (and the agent's log) is searched for every secret \
             afterwards.\n\n{}",
            cases.markdown()
        )
    }
}

/// A random ACL secret, UUID-shaped as Consul wants it.
pub fn secret() -> String {
    let r: u128 = rand::random();
    let h = format!("{r:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A token (its secret) with one new policy named `name` holding `rules`, made by `admin`.
pub async fn token_for(admin: &Client, name: &str, rules: &str) -> Result<String> {
    let policy = admin
        .acl()
        .policy_create(&AclPolicy {
            name: name.into(),
            rules: rules.into(),
            ..Default::default()
        })
        .await?;
    let token = admin
        .acl()
        .token_create(&AclToken {
            description: name.into(),
            policies: vec![AclPolicyLink {
                id: policy.id,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?;
    Ok(token.secret_id)
}

/// The last line of a process's output that starts with `error:`, or its last line.
fn last_error(p: &ChildProcess) -> String {
    let lines = p.output().lines();
    lines
        .iter()
        .rev()
        .find(|l| l.text.starts_with("error:"))
        .or(lines.last())
        .map(|l| l.text.clone())
        .unwrap_or_else(|| "(no output)".into())
}

/// Wait for a process expected to stop; its error line, exit code and run time.
async fn stopped(p: &mut ChildProcess, started: Instant) -> (String, Option<i32>, Duration) {
    let status = p.wait_exit(LIMIT).await;
    let took = started.elapsed();
    let code = status.as_ref().ok().and_then(|s| s.code());
    let line = match status {
        Ok(_) => last_error(p),
        Err(e) => format!("still running: {e}"),
    };
    (line, code, took)
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::Acl.title().into()
    }
    fn needs(&self) -> Result<Needs> {
        Ok(Needs::Agent(ConsulOptions::from_env()?.with_acl(secret())))
    }

    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let consul = env.agent()?;
        let management = consul
            .spec()
            .acl_management_token
            .clone()
            .ok_or_else(|| Error::Scenario("the agent has no management token".into()))?;
        let admin = consul.client();
        let tokens = Tokens::create(&admin).await?;
        let secrets = [
            &management,
            &tokens.server,
            &tokens.client,
            &tokens.narrow,
            &tokens.wrong,
        ];
        let mut trial = Trial {
            launcher,
            base: consul.config().with_token(None),
            step,
            cases: Vec::new(),
            outputs: Vec::new(),
        };
        trial.refused_servers(&tokens, self.interval).await?;
        let mut server = trial
            .permitted_server(&admin, &tokens, self.interval)
            .await?;
        let client = trial.permitted_client(&tokens, self.messages).await?;
        trial.refused_clients(&tokens).await?;

        trial
            .outputs
            .push(("the Consul agent".into(), consul.log().clone()));
        let peak_rss_kib = crate::procfs::status_kib(server.process.pid(), "VmHWM");
        server.process.kill().await?;
        let tokens_printed: Vec<String> = trial
            .outputs
            .iter()
            .filter(|(_, out)| {
                out.lines()
                    .iter()
                    .any(|l| secrets.iter().any(|s| l.text.contains(s.as_str())))
            })
            .map(|(who, _)| who.clone())
            .collect();
        if trial.outputs.iter().all(|(_, o)| o.lines().is_empty()) {
            return Err(Error::Scenario("no output captured at all".into()));
        }
        Ok(Outcome {
            cases: trial.cases,
            client,
            secrets_checked: secrets.len(),
            tokens_printed,
            peak_rss_kib,
        })
    }
}

/// The tokens tried: the servers', the clients', one too narrow, and one Consul never issued.
struct Tokens {
    server: String,
    client: String,
    narrow: String,
    wrong: String,
}

impl Tokens {
    /// Create them with the management client `admin`.
    async fn create(admin: &Client) -> Result<Tokens> {
        let read = format!("service \"{SERVICE}\" {{ policy = \"read\" }}");
        Ok(Tokens {
            server: token_for(
                admin,
                "echo-server-servernode",
                &format!("service \"{SERVICE}\" {{ policy = \"write\" }}"),
            )
            .await?,
            client: token_for(
                admin,
                "echo-client-servernode",
                &format!("{read}\nnode_prefix \"\" {{ policy = \"read\" }}"),
            )
            .await?,
            narrow: token_for(admin, "echo-client-no-node-read", &read).await?,
            wrong: secret(),
        })
    }
}

/// The processes tried so far: each case, and each process's output (searched for tokens).
struct Trial<'a> {
    launcher: &'a Launcher,
    /// The agent's configuration, without a token.
    base: consul_api::Config,
    step: &'a Progress,
    cases: Vec<Case>,
    outputs: Vec<(String, crate::logbuf::LogBuffer)>,
}

impl Trial<'_> {
    /// Servers with no token, a wrong one, or one for another service: each must be refused.
    async fn refused_servers(&mut self, tokens: &Tokens, interval: Duration) -> Result<()> {
        let refused = |observed: &str, code: Option<i32>| {
            code.is_some_and(|c| c != 0)
                && observed.contains("refused the ACL token")
                && observed.contains("403")
        };
        for (who, id, name, token) in [
            ("echo-server, no token", "servernode_1", SERVICE, None),
            (
                "echo-server, wrong token",
                "servernode_1",
                SERVICE,
                Some(tokens.wrong.clone()),
            ),
            (
                "echo-server, token for servernode, registering \"intruder\"",
                "intruder_1",
                "intruder",
                Some(tokens.server.clone()),
            ),
        ] {
            self.step.say(format!("{who}: expecting a refusal"));
            let mut spec =
                scenario::server_spec(self.base.clone().with_token(token), id, interval)?;
            spec.args.name = name.into();
            let started = Instant::now();
            let mut server = ServerProcess::start(self.launcher, spec)?;
            let (observed, code, took) = stopped(&mut server.process, started).await;
            self.cases.push(Case {
                who: who.into(),
                expected: "refused: clear 403 error, non-zero exit, no retry".into(),
                ok: refused(&observed, code)
                    && server.process.output().matching("retrying").is_empty(),
                observed,
                took,
            });
            self.outputs
                .push((who.into(), server.process.output().clone()));
        }
        Ok(())
    }

    /// The server with its own token: it registers and passes.
    async fn permitted_server(
        &mut self,
        admin: &Client,
        tokens: &Tokens,
        interval: Duration,
    ) -> Result<ServerProcess> {
        self.step.say("echo-server with its token: registering");
        let started = Instant::now();
        let spec = scenario::server_spec(
            self.base.clone().with_token(Some(tokens.server.clone())),
            "servernode_1",
            interval,
        )?;
        let server = ServerProcess::spawn(self.launcher, spec).await?;
        let passing = wait::passing(admin, SERVICE, LIMIT).await;
        self.cases.push(Case {
            who: "echo-server, token with service:write on servernode".into(),
            expected: "registers and passes".into(),
            observed: match &passing {
                Ok(_) => "registered, check passing".into(),
                Err(e) => e.to_string(),
            },
            took: started.elapsed(),
            ok: passing.is_ok(),
        });
        self.outputs.push((
            "echo-server with its token".into(),
            server.process.output().clone(),
        ));
        Ok(server)
    }

    /// The client with service:read and node:read: it discovers and echoes `messages`.
    async fn permitted_client(&mut self, tokens: &Tokens, messages: u64) -> Result<Tally> {
        self.step.say("echo-client with service:read and node:read");
        let started = Instant::now();
        let mut good = ClientProcess::spawn(
            self.launcher,
            &self.base.clone().with_token(Some(tokens.client.clone())),
            &client_args(messages, Duration::from_secs(10))?,
        )?;
        let status = good.process.wait_exit(LIMIT).await;
        let done = good.process.output().matching("done mode=resilient");
        let field = |line: &str, key: &str| -> Option<u64> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        };
        let client = match done.first() {
            Some(l) => Tally {
                sent: field(&l.text, "sent").unwrap_or(0),
                lost: field(&l.text, "lost").unwrap_or(0),
                resent: field(&l.text, "resent").unwrap_or(0),
            },
            None => Tally {
                sent: messages,
                lost: messages,
                resent: 0,
            },
        };
        self.cases.push(Case {
            who: "echo-client, token with service:read + node:read".into(),
            expected: "discovers and echoes".into(),
            observed: done
                .first()
                .map(|l| l.text.clone())
                .unwrap_or_else(|| last_error(&good.process)),
            took: started.elapsed(),
            ok: status.as_ref().is_ok_and(|s| s.success()) && client.lost == 0,
        });
        self.outputs.push((
            "echo-client, permitted".into(),
            good.process.output().clone(),
        ));
        Ok(client)
    }

    /// Clients with a wrong token, none, or one without node:read: each gets no service.
    async fn refused_clients(&mut self, tokens: &Tokens) -> Result<()> {
        for (who, token, expected) in [
            (
                "echo-client, wrong token",
                Some(tokens.wrong.clone()),
                "refused: clear 403 error, non-zero exit",
            ),
            (
                "echo-client, no token",
                None,
                "sees no instance: clear error, non-zero exit",
            ),
            (
                "echo-client, service:read without node:read",
                Some(tokens.narrow.clone()),
                "sees no instance: clear error, non-zero exit",
            ),
        ] {
            self.step.say(format!("{who}: expecting no service"));
            let started = Instant::now();
            let mut c = ClientProcess::spawn(
                self.launcher,
                &self.base.clone().with_token(token),
                &client_args(3, Duration::from_secs(3))?,
            )?;
            let (observed, code, took) = stopped(&mut c.process, started).await;
            let failed = code.is_some_and(|c| c != 0) && observed.starts_with("error:");
            let ok = if expected.starts_with("refused") {
                failed && observed.contains("refused the ACL token")
            } else {
                // Consul filters what a token may not read instead of refusing the query.
                failed
                    && (observed.contains("no passing instance")
                        || observed.contains("refused the ACL token"))
            };
            self.cases.push(Case {
                who: who.into(),
                expected: expected.into(),
                observed,
                took,
                ok,
            });
            self.outputs.push((who.into(), c.process.output().clone()));
        }
        Ok(())
    }
}

/// An echo client's arguments: `count` echoes every 100 ms, each within `timeout`.
fn client_args(count: u64, timeout: Duration) -> Result<echo_client::cli::Args> {
    Ok(echo_client::cli::Args {
        service: SERVICE.into(),
        count,
        interval: consul_api::GoDuration(Duration::from_millis(100)),
        timeout: consul_api::GoDuration(timeout),
        ..crate::procs::client_args()?
    })
}
