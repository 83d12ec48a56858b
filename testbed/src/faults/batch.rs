//! Scenario 8, a large pipelined batch: a client starts and at once sends 1,000 messages of
//! 64 KiB (the largest frame) concurrently, ~64 MiB un-answered, to one echo server. They
//! queue while discovery starts, then go out on one connection; the client reads replies
//! while it writes and keeps at most 256 KiB un-answered, so neither side's socket buffers
//! fill up. Must hold: every message answered byte-exact, each written once (no reply
//! timeout, no ejection of the healthy server).

use std::time::{Duration, Instant};

use bytes::Bytes;
use echo_client::EchoClient;
use futures::future::join_all;
use serde::Serialize;

use super::{Row, Rows, Scenario};
use crate::{
    error::{Error, Result},
    procs::{Launcher, ServerProcess},
};
use crate::{
    experiment::{Env, Experiment},
    progress::Progress,
    report::{self, ms_serde as ms},
    scenario::{self, Basics, LIMIT, observers::Tally},
};

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Messages sent at once.
    pub messages: usize,
    /// Bytes per message.
    pub size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            messages: 1000,
            size: echo_server::codec::DEFAULT_MAX_FRAME,
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Bytes per message.
    pub size: usize,
    /// Messages answered byte-exact.
    pub exact: u64,
    /// First send to last reply.
    #[serde(with = "ms")]
    pub took: Duration,
    /// Its echoes and what became of its echo servers.
    #[serde(flatten)]
    pub basics: Basics,
}

impl Outcome {
    /// The invariants that did not hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.basics.violations();
        if self.basics.tally.resent > 0 {
            v.push(format!(
                "{} messages written twice: the healthy server was dropped",
                self.basics.tally.resent
            ));
        }
        v
    }
}

impl Rows for Outcome {
    /// The table's row.
    fn rows(&self) -> Vec<Row> {
        let mib = self.basics.tally.sent as f64 * self.size as f64 / f64::from(1 << 20);
        vec![Row {
            scenario: Scenario::Batch.title().into(),
            injected: format!(
                "{} concurrent messages of {} KiB ({mib:.0} MiB) to one server",
                self.basics.tally.sent,
                self.size >> 10
            ),
            sent: self.basics.tally.sent,
            lost: self.basics.tally.lost,
            recovery: format!(
                "all answered in {}, {} resent",
                report::secs(self.took),
                self.basics.tally.resent
            ),
            recovery_ms: Some(self.took.as_secs_f64() * 1e3),
            peak_rss_kib: self.basics.peak_rss_kib,
            violations: self.violations(),
        }]
    }

    /// How each figure was measured, with the figures.
    fn details(&self) -> String {
        format!(
            "**8. Large pipelined batch.** {} messages of {} bytes sent at once through a \
             client just started (queued while its discovery started, then written on one \
             connection): {} answered byte-exact in {}, {} written more than once, {} lost.\n",
            self.basics.tally.sent,
            self.size,
            self.exact,
            report::secs(self.took),
            self.basics.tally.resent,
            self.basics.tally.lost,
        )
    }
}

impl Experiment for Config {
    type Outcome = Outcome;

    fn title(&self) -> String {
        Scenario::Batch.title().into()
    }
    async fn run_on(&self, launcher: &Launcher, env: &mut Env, step: &Progress) -> Result<Outcome> {
        let consul = env.agent()?;
        step.say("starting one echo server");
        let servers =
            scenario::start_servers(launcher, consul, consul.config(), 1, Duration::from_secs(1))
                .await?;
        let mut servers: Vec<ServerProcess> = servers;
        // Every message is queued at once, so the last one's time includes the whole batch
        // before it: it gets the batch's own limit, not the default 30 s, which a loaded
        // machine's debug build has been seen to need (951 of 1,000 answered in 30 s).
        let mut config = scenario::client_config(consul.config(), Duration::from_secs(2));
        config.session.message_timeout = LIMIT;
        let client = EchoClient::start(config)?;
        step.say("sending the batch");
        let started = Instant::now();
        let sends = (0..self.messages).map(|i| {
            let client = client.clone();
            let message = Bytes::from(vec![b'a' + (i % 26) as u8; self.size]);
            async move {
                let result = client.send(message.clone()).await;
                (message, result)
            }
        });
        let results = tokio::time::timeout(LIMIT, join_all(sends))
            .await
            .map_err(|_| Error::Timeout {
                what: "the batch's replies".into(),
                timeout: LIMIT,
            })?;
        let took = started.elapsed();
        let mut tally = Tally::default();
        let mut exact = 0;
        let mut errors = Vec::new();
        for (message, result) in results {
            tally.sent += 1;
            match result {
                Ok(reply) if reply.bytes == message => {
                    exact += 1;
                    tally.resent += u64::from(reply.attempts > 1);
                }
                Ok(_) => tally.lost += 1,
                Err(e) => {
                    tally.lost += 1;
                    if errors.len() < 5 {
                        errors.push(e.to_string());
                    }
                }
            }
        }
        Ok(Outcome {
            size: self.size,
            exact,
            took,
            basics: Basics::new(tally, errors, &mut servers),
        })
    }
}
