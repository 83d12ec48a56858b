//! The benchmark kit: what the criterion benches in `benches/benches/` share, and the report
//! that turns their results into `BENCHMARKS.md`.
//!
//! * [`servers`] — echo servers to bench against: an in-process echo-server on its own runtime
//!   thread that can be shut down cleanly or torn down at once (the in-process "crash"), and
//!   the raw `tokio::io::copy` echo server that is the throughput baseline;
//! * [`lineup`] — the echo path's servers (echo-server, two baselines, a control) side by side
//!   on one runtime, as the `echo` bench and `echo-probe` run them;
//! * [`traffic`] — load: a client streaming messages through a failover (and noticing the
//!   first reply from another instance), pipelined and lockstep echo traffic on raw sockets;
//! * [`consul_view`] — an independent view of Consul by blocking queries, with the moment each
//!   change was seen, and waiting on a client's view;
//! * [`results`] — where results go, per-iteration recordings and their percentiles, the run's
//!   environment, the memory measurement's record;
//! * [`memory`] — the resident set of a process, from `/proc`;
//! * [`spread`] — 95 % intervals from one run's own samples, for the ratios the echo goals
//!   judge;
//! * [`report`] — reading criterion's data and ours back, and writing the generated section
//!   (tables, formatters, dates, the machine and the one percentile rule from `lab-report`);
//! * [`harness`] — the runtime, logging, and the one Consul a bench group shares;
//! * [`error`] — the one error type.
//!
//! Binaries: `bench-echo-server` (the echo-server CLI, so benches can spawn and SIGKILL real
//! server processes), `bench-report` (rewrites the table in `BENCHMARKS.md`) and `echo-probe`
//! (a fixed amount of the echo bench's traffic, to profile or count instructions).

pub mod consul_view;
pub mod error;
pub mod harness;
pub mod lineup;
pub mod memory;
pub mod report;
pub mod results;
pub mod servers;
pub mod spread;
pub mod traffic;

pub use error::{Error, Result};
