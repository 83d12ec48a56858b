//! The testbed: real Consul, real echo servers and clients, real faults, and measurements.
//!
//! * [`consul`] — the harness around one Consul agent (container or local process);
//! * [`provision`] — fetching Consul 1.8.7 and building its image on a registry-less machine;
//! * [`logbuf`] — a child's output, line by line, waitable;
//! * [`deregistration`] — the deregistration experiment (sweep, trials, predictions);
//! * [`faults`] — the fault and security scenarios (hung server, paused and restarted Consul,
//!   a misbehaving proxy, ACLs, hostile input, a TLS certificate rotated), with their figures;
//! * [`faultproxy`] — an HTTP proxy in front of Consul that delays, drops, cuts or corrupts;
//! * [`model`] — the timing model of Consul's deregistration (pure);
//! * [`procs`] — echo servers and clients as child processes;
//! * [`timeline`] — the seed article's story, timestamped, naive and resilient clients;
//! * [`wait`] — waiting on Consul's state by blocking queries, with deadlines;
//! * [`signal`] — the signals used to kill, stop and resume processes;
//! * [`report`] — markdown, JSON and SVG output;
//! * [`smoke`] — the harness's own end-to-end check;
//! * [`error`] — the one error type.

pub mod consul;
pub mod deregistration;
pub mod error;
pub mod faultproxy;
pub mod faults;
pub mod logbuf;
pub mod model;
pub mod procs;
pub mod provision;
pub mod report;
pub mod signal;
pub mod smoke;
pub mod timeline;
pub mod wait;

pub use consul::{BackendChoice, BackendKind, Consul, ConsulOptions};
pub use error::{Error, Result};
