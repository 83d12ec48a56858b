//! consul-reaper: the opt-in reaper of [`consul_registry::reaper`] as a sidecar beside one
//! Consul agent. It follows the agent's checks by blocking query and deregisters (through the
//! agent) each service that carries Meta `reap-after` once one of its checks has been critical
//! that long: no 1 minute floor, no 30 s grid.
//!
//! * [`cli`] — the flags (Consul's own connection flags and variables) and [`cli::run`], which
//!   the `consul-reaper` binary and `testbed reaper` both call.

pub mod cli;
