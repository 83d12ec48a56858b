//! The testbed: real Consul, real echo servers and clients, real faults, and measurements.
//!
//! * [`consul`] — the harness around one Consul agent (container or local process);
//! * [`provision`] — fetching Consul 1.8.7 and building its image on a registry-less machine;
//! * [`logbuf`] — a child's output, line by line, waitable;
//! * [`procs`] — echo servers and clients as child processes;
//! * [`wait`] — waiting on Consul's state by blocking queries, with deadlines;
//! * [`signal`] — the signals used to kill, stop and resume processes;
//! * [`smoke`] — the harness's own end-to-end check;
//! * [`error`] — the one error type.

pub mod consul;
pub mod error;
pub mod logbuf;
pub mod procs;
pub mod provision;
pub mod signal;
pub mod smoke;
pub mod wait;

pub use consul::{BackendChoice, BackendKind, Consul, ConsulOptions};
pub use error::{Error, Result};
