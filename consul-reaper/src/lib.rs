//! The opt-in reaper: deregisters a service of one agent once its check has been critical for
//! as long as the service asked, to the millisecond. Consul 1.8's own
//! `DeregisterCriticalServiceAfter` cannot do that: the agent raises the setting to at least
//! 1 minute and looks only every 30 s, so a `30s` setting removes a dead service 60 to 90 s
//! after its check turned critical (neither value is settable).
//!
//! consul-reaper fixes that as a sidecar beside one Consul agent: it follows the agent's checks
//! by blocking query and deregisters (through the agent) each service that carries Meta
//! `reap-after` once one of its checks has been critical that long: no 1 minute floor, no
//! 30 s grid. A service opts in with [`opt_in`] (the Meta keys live in
//! [`consul_registry::reap_meta`], whose registrar gives each start a new `reap-start`).
//!
//! * [`state`] — [`Reaper`], the pure state machine (answers about the agent and `now` in,
//!   deadlines and removals out), and the rules it keeps;
//! * [`driver`] — [`run`]: follows the agent's checks, drives the [`Reaper`] and
//!   deregisters what falls due, reporting each [`Event`];
//! * [`cli`] — the flags (Consul's own connection flags and variables) and [`cli::run`], which
//!   the `consul-reaper` binary and `testbed reaper` both call;
//! * [`error`] — the one error type.

pub mod cli;
pub mod driver;
pub mod error;
pub mod state;

pub use consul_registry::reap_meta::{META_KEY, START_KEY, opt_in};
pub use driver::{Event, FOLLOWING, REMOVED, ReaperConfig, run};
pub use error::{Error, Result};
pub use state::{Notice, Observation, Outcome, Reaper, Removal};
