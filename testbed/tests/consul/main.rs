//! Scenarios against real Consul, in one test binary so that they run in parallel: each test
//! starts its own agent (a container, or a local process where no Docker engine answers).
//!
//! * [`client`] — echo-client: failover, Consul down, failing checks, the naive client;
//! * [`cluster`] — real clusters: the leader killed, a node crashed, per-agent reapers;
//! * [`composed`] — `Source::Composed` against `?passing`, compared after every change
//!   (scripted and seeded random sequences): 0 differences;
//! * [`config`] — Consul's KV store (1.8.7's answers, transactions, limits) and live
//!   configuration from it: applied, rejected with the last good kept, a prefix seen whole,
//!   a deletion, Consul gone and back;
//! * [`deregistration`] — the headline experiment at the seed article's setting;
//! * [`discovery`] — every discovery source (health, catalog, agent list, prepared query,
//!   DNS) through a SIGKILL and through an agent and an instance on `::1`, DNS while an
//!   agent's servers are gone, and the clear errors of one that cannot work;
//! * [`faults`] — fault and security scenarios: hung server, paused and restarted Consul, a
//!   faulty proxy, ACLs, hostile input;
//! * [`foreign`] — foreign registrations our types cannot hold (`Port: 70000`, `-1`): left
//!   out of every list, the good instances discovered, the reaper not blinded;
//! * [`framework`] — consul-registry without echo: TTL heartbeats, maintenance mode;
//! * [`harness`] — the harness itself: backends, readiness, restarts, clear errors;
//! * [`reaper`] — the opt-in reaper sidecar: removal at `reap-after`, resets, flapping, the
//!   reaper and Consul restarted, a token without `service:write`;
//! * [`scale`] — 500 instances churning under a streaming client: nothing lost, the view
//!   follows Consul, unchanged instances are not rebuilt;
//! * [`server`] — echo-server: registration, check behaviour, shutdown, re-registration, ACLs;
//! * [`timeline`] — the seed article's story for the naive and the resilient client;
//! * [`tls`] — HTTPS and mutual TLS: the whole path, and refusals that name the setting.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client;
mod cluster;
mod common;
mod composed;
mod config;
mod deregistration;
mod discovery;
mod faults;
mod foreign;
mod framework;
mod harness;
mod partitions;
mod reaper;
mod scale;
mod server;
mod timeline;
mod tls;
