//! consul-reaper: the opt-in reaper as a sidecar beside one Consul agent. It follows the
//! agent's checks by blocking query and deregisters (through the agent) each service that
//! carries Meta `reap-after` once one of its checks has been critical that long: no 1 minute
//! floor, no 30 s grid.
//!
//! * [`driver`] — [`run`] and [`Reaper`], its pure state machine;
//! * [`cli`] — the flags (Consul's own connection flags and variables) and [`cli::run`], which
//!   the `consul-reaper` binary and `testbed reaper` both call;
//! * [`error`] — the one error type.

pub mod cli;
pub mod driver;
pub mod error;

pub use consul_registry::reap_meta::{META_KEY, START_KEY, opt_in};
pub use driver::{
    Event, FOLLOWING, Notice, Observation, Outcome, REMOVED, Reaper, ReaperConfig, Removal, run,
};
pub use error::{Error, Result};
