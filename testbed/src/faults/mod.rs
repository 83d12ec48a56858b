//! The fault and security scenarios: what half-failures do to echo servers and resilient
//! clients discovering each other through real Consul, each run once here and returning a
//! typed outcome with its figures; the integration tests assert on those outcomes, and
//! `testbed faults` prints and stores them.
//!
//! * [`hung`] — an echo server frozen by SIGSTOP (port open, no answers), then resumed;
//! * [`paused`] — the Consul agent frozen (`docker pause` / SIGSTOP), then resumed;
//! * [`restarted`] — the Consul agent restarted (dev mode: every registration gone);
//! * [`proxy`] — Consul behind the [`faultproxy`](crate::faultproxy): delayed, dropped, cut
//!   and corrupted answers, then healed;
//! * [`acl`] — ACLs on with default deny: missing, wrong and too narrow tokens;
//! * [`hostile`] — garbage, oversized frames, stalled, reset and short-lived connections;
//! * [`blackholed`] — passing instances that drop SYNs, and one healthy server;
//! * [`batch`] — 1,000 concurrent 64 KiB messages to one server;
//! * [`stripped`] — Consul behind a proxy that strips `X-Consul-Index`;
//! * [`rotated`] — the agent's TLS certificate re-issued and reloaded under running mTLS
//!   processes: same CA, an unknown CA, and back.
//!
//! Every scenario is an [`Experiment`](crate::experiment::Experiment) that needs one agent:
//! its `Config` runs it, its `Outcome` gives the common table its [`Rows`] and a paragraph.
//! A new scenario is its module, its variant of [`Scenario`] and its line in
//! [`Scenario::plan`]. The helpers scenarios share are in [`crate::scenario`].
//!
//! Every scenario starts its own agent and processes, bounds every loop in count and time,
//! and talks only to 127.0.0.1 and the agent's container.

pub mod acl;
pub mod batch;
pub mod blackholed;
pub mod hostile;
pub mod hung;
pub mod paused;
pub mod proxy;
pub mod restarted;
pub mod rotated;
pub mod stripped;

use std::time::Duration;

use serde::Serialize;

use crate::{
    error::Result,
    experiment::{Findings, Plan, Suite, chosen},
    report::Table,
};

/// A scenario, as `testbed faults --only` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// An echo server frozen by SIGSTOP, then resumed.
    Hung,
    /// The Consul agent frozen, then resumed.
    Paused,
    /// The Consul agent restarted, losing its state.
    Restarted,
    /// Consul behind a proxy that delays, drops, cuts and corrupts answers.
    Proxy,
    /// ACLs on, default deny.
    Acl,
    /// Hostile input at an echo server.
    Hostile,
    /// Passing instances that drop SYNs.
    Blackholed,
    /// A large pipelined batch.
    Batch,
    /// Consul's index stripped by a proxy.
    Stripped,
    /// The agent's TLS certificate changed under running mTLS processes.
    Rotated,
}

impl Scenario {
    /// All of them, in the report's order.
    pub const ALL: [Scenario; 10] = [
        Scenario::Hung,
        Scenario::Paused,
        Scenario::Restarted,
        Scenario::Proxy,
        Scenario::Acl,
        Scenario::Hostile,
        Scenario::Blackholed,
        Scenario::Batch,
        Scenario::Stripped,
        Scenario::Rotated,
    ];

    /// The table's name for it.
    pub fn title(self) -> &'static str {
        match self {
            Scenario::Hung => "1. hung server",
            Scenario::Paused => "2. Consul paused",
            Scenario::Restarted => "3. Consul restarted",
            Scenario::Proxy => "4. fault proxy",
            Scenario::Acl => "5. ACLs, default deny",
            Scenario::Hostile => "6. hostile input",
            Scenario::Blackholed => "7. blackholed instances",
            Scenario::Batch => "8. large pipelined batch",
            Scenario::Stripped => "9. stripped X-Consul-Index",
            Scenario::Rotated => "10. TLS certificate rotated",
        }
    }
}

impl Scenario {
    /// The scenario with its default settings (`pause`: how long the paused one freezes Consul).
    pub fn plan(self, pause: Duration) -> Box<dyn Plan> {
        match self {
            Scenario::Hung => Box::new(hung::Config::default()),
            Scenario::Paused => Box::new(paused::Config {
                pause,
                ..Default::default()
            }),
            Scenario::Restarted => Box::new(restarted::Config::default()),
            Scenario::Proxy => Box::new(proxy::Config::default()),
            Scenario::Acl => Box::new(acl::Config::default()),
            Scenario::Hostile => Box::new(hostile::Config::default()),
            Scenario::Blackholed => Box::new(blackholed::Config::default()),
            Scenario::Batch => Box::new(batch::Config::default()),
            Scenario::Stripped => Box::new(stripped::Config::default()),
            Scenario::Rotated => Box::new(rotated::Config::default()),
        }
    }
}

/// What a fault scenario's outcome gives: its rows of the common table (whose invariants
/// are its [`Findings::violations`]) and its paragraph.
pub trait Rows: Serialize {
    /// Its rows of the table.
    fn rows(&self) -> Vec<Row>;
    /// How each figure was measured, with the figures: one markdown paragraph.
    fn details(&self) -> String;
}

impl<T: Rows> Findings for T {
    fn tables(&self) -> Vec<Table> {
        vec![table(&self.rows())]
    }

    fn details(&self) -> String {
        Rows::details(self)
    }

    fn violations(&self) -> Vec<String> {
        self.rows().into_iter().flat_map(|r| r.violations).collect()
    }
}

/// The table of fault scenarios: one line per row.
pub fn table(rows: &[Row]) -> Table {
    let mut t = Table::new([
        "scenario",
        "injected",
        "messages sent / lost",
        "recovery",
        "peak RSS (echo-server)",
        "invariants",
    ])
    .align_right([2, 4]);
    for r in rows {
        t.push([
            r.scenario.clone(),
            r.injected.clone(),
            format!("{} / {}", r.sent, r.lost),
            r.recovery.clone(),
            r.peak_rss_kib
                .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "–".into()),
            if r.violations.is_empty() {
                "held".to_owned()
            } else {
                format!("**broken**: {}", r.violations.join("; "))
            },
        ]);
    }
    t
}

/// `testbed faults`: which scenarios, and the paused one's pause.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Scenarios to run (comma-separated); all by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
    /// How long Consul stays frozen in the paused scenario.
    #[arg(long, default_value = "20s")]
    pause: consul_api::GoDuration,
}

impl Suite for Args {
    fn name(&self) -> &'static str {
        "faults"
    }

    fn title(&self) -> String {
        "Fault and security scenarios".into()
    }

    fn plans(&self) -> Result<Vec<Box<dyn Plan>>> {
        Ok(chosen(&self.only, &Scenario::ALL)
            .into_iter()
            .map(|s| s.plan(self.pause.as_duration()))
            .collect())
    }

    fn method(&self) -> &'static str {
        "Messages are echoes sent through a resilient `EchoClient` at a steady rate; lost = \
         answered with an error or with other bytes. Peak RSS is `VmHWM` from \
         `/proc/<pid>/status` of each echo-server process, read before it is stopped. Times \
         are taken by the testbed when it injects a fault and when it observes the effect \
         (a discovery snapshot, a blocking query's answer, a line of a server's output)."
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The scenario's title ([`Scenario::title`]), with the case when it has several rows.
    pub scenario: String,
    /// What was injected, and for how long.
    pub injected: String,
    /// Echo messages sent through a resilient client during the scenario.
    pub sent: u64,
    /// Of those, answered with an error or with other bytes.
    pub lost: u64,
    /// The recovery figure, in words with its value (`–` when the scenario has none).
    pub recovery: String,
    /// The recovery figure in milliseconds, when there is one.
    pub recovery_ms: Option<f64>,
    /// Highest resident set (VmHWM) of the scenario's echo-server processes, KiB.
    pub peak_rss_kib: Option<u64>,
    /// The scenario's invariants that did not hold (empty: all held).
    pub violations: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_what_broke() {
        let rows = vec![Row {
            scenario: Scenario::Hung.title().into(),
            injected: "SIGSTOP".into(),
            sent: 10,
            lost: 1,
            recovery: "1.00 s".into(),
            recovery_ms: Some(1000.0),
            peak_rss_kib: Some(2048),
            violations: vec!["1 echo lost".into()],
        }];
        let md = table(&rows).markdown();
        assert!(
            md.contains(
                "| 1. hung server | SIGSTOP | 10 / 1 | 1.00 s | 2.0 MiB | **broken**: 1 echo lost |"
            ),
            "{md}"
        );
        assert!(!rows[0].violations.is_empty());
    }
}
