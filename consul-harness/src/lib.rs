//! consul-harness: real Consul for this workspace's tests, experiments and benches, and the
//! processes that run against it.
//!
//! * [`consul`] — one Consul agent, in a container (the real backend) or as a local process
//!   (the fallback where Docker is missing, said loudly), host networking, its own loopback
//!   ports; start, stop, pause, restart;
//! * [`cluster`] — a real cluster of servers and client agents, each on its own loopback
//!   address; crash, leave, pause, restart with or without data;
//! * [`network`] — cuts, one-way cuts, delay, jitter and loss between a cluster's agents
//!   (nftables marks by the sender's uid, `tc` netem on `lo`), removed on drop, swept after
//!   a killed run;
//! * [`provision`] — fetching Consul 1.8.7 and building its `FROM scratch` image on a
//!   registry-less machine;
//! * [`process`] — child processes run against Consul (Consul's settings as its variables),
//!   their output captured, and free loopback addresses and ports;
//! * [`logbuf`] — a child's output, line by line, waitable;
//! * [`wait`] — waiting on Consul's state by blocking queries, with deadlines;
//! * [`affinity`] — pinning a thread or a process to a CPU of its own;
//! * [`procfs`] — what `/proc` says of a process: resident set, CPU time, stopped or not;
//! * [`scoped_log`] — a test's own log subscriber that sees every event of its thread (the
//!   `test-log` crate, re-exported for the harness's users);
//! * [`signal`] — the signals used to kill, stop and resume processes;
//! * [`error`] — the one error type.
//!
//! ```no_run
//! # async fn demo() -> consul_harness::Result<()> {
//! // Real Consul 1.8.7 (its image is built on first use), on free loopback ports.
//! let consul = consul_harness::Consul::start().await?;
//! let leader = consul.client().status().leader().await?;
//! println!("Consul {} at {}, leader {leader}", consul.version(), consul.address());
//! # Ok(()) } // the container is removed when `consul` is dropped
//! ```

pub mod affinity;
pub mod cluster;
pub mod consul;
pub mod error;
pub mod logbuf;
pub mod network;
pub mod owner;
pub mod process;
pub mod procfs;
pub mod provision;
pub mod signal;
pub mod wait;

pub use test_log as scoped_log;

pub use cluster::{Cluster, ClusterSpec, Member};
pub use consul::{BackendChoice, BackendKind, Consul, ConsulOptions};
pub use error::{Error, Result};
