//! The testbed: real Consul, real echo servers and clients, real faults, and measurements.
//!
//! * [`consul`], [`provision`], [`process`], [`procfs`], [`logbuf`], [`wait`], [`signal`] —
//!   the harness (the `consul-harness` crate, re-exported): real Consul, child processes,
//!   logs, waits;
//! * [`procs`] — echo servers and clients as child processes (the `echo-rig` crate,
//!   re-exported);
//! * [`cluster`] — real clusters (servers, client agents): node crash, agent crash, leader
//!   loss, quorum loss, per-agent reapers;
//! * [`experiment`] — the one contract of every experiment ([`experiment::Experiment`]) and the
//!   one runner ([`experiment::run`]: progress, timing, failures, reports, exit code);
//! * [`experiments`] — the list of experiments, one line each;
//! * [`config`] — live configuration from one KV key: echo-servers watching it beside
//!   pollers, bad, big and oversized values, Consul paused and restarted, ACLs;
//! * [`progress`] — the one progress reporter (a bar on a terminal, plain lines elsewhere);
//! * [`deregistration`] — the deregistration experiment (sweep, trials, predictions);
//! * [`datacenters`] — failover to a second datacenter (blocking queries, a prepared query,
//!   DNS);
//! * [`discovery`] — `testbed discovery`: its three parts, [`sources`], [`elastic`] and
//!   [`datacenters`];
//! * [`sources`] — every way to discover side by side (health, catalog, agent list, prepared
//!   query, DNS) through one SIGKILL;
//! * [`elastic`] — scale out and in under load: shares, propagation, nothing lost;
//! * [`faults`] — the fault and security scenarios (hung server, paused and restarted Consul,
//!   a misbehaving proxy, ACLs, hostile input, a TLS certificate rotated), with their figures;
//! * [`faultproxy`] — an HTTP proxy in front of Consul that delays, drops, cuts or corrupts;
//! * [`partitions`] — `testbed partitions`: cuts, one-way cuts, loss and delay between agents
//!   ([`network`]), what Consul and each client's view make of them;
//! * [`reaper_twins`] — the deregistration experiment's twins removed by the reaper sidecar;
//! * [`scenario`] — what every fault and cluster scenario shares: servers, clients, traffic
//!   and discovery observers;
//! * [`scale`] — discovery at scale: instances × clients, and Consul's read modes (`stale`,
//!   `cached`, `filter`) compared, with client and Consul CPU, memory, bytes and propagation;
//! * [`model`] — the timing model of Consul's deregistration (pure);
//! * [`timeline`] — the seed article's story, timestamped, naive and resilient clients;
//! * [`report`] — the `lab-report` crate, shared with benches: the header, tables, JSON, plots,
//!   dates, durations and percentiles of every report (one percentile rule: sorted ascending,
//!   rank `p/100 × (n − 1)`, linear interpolation between the two nearest ranks);
//! * [`smoke`] — the harness's own end-to-end check;
//! * [`error`] — the one error type.

pub mod cluster;
pub mod config;
pub mod datacenters;
pub mod deregistration;
pub mod discovery;
pub mod elastic;
pub mod experiment;
pub mod experiments;
pub mod faultproxy;
pub mod faults;
pub mod model;
pub mod partitions;
pub mod progress;
pub mod reaper_twins;
pub use lab_report as report;
pub mod scale;
pub mod scenario;
pub mod smoke;
pub mod sources;
pub mod timeline;

pub mod error;

pub use consul_harness::{
    BackendChoice, BackendKind, Cluster, ClusterSpec, Consul, ConsulOptions, Member, consul,
    logbuf, network, owner, process, procfs, provision, signal, wait,
};
pub use echo_rig::procs;
pub use error::{Error, Result};
