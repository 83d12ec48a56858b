//! consul-registry: self-registration, health checks, discovery and failover over Consul,
//! for any tokio service. It knows nothing of the service it registers or discovers.
//!
//! * [`registration`] — [`Registration`], a service's whole life in Consul (register, keep
//!   registered, TTL heartbeat, maintenance, deregister on shutdown), built on
//!   [`Registrar`]: register (retrying while the agent is not up yet),
//!   watch the entry and register again when it is lost, deregister on shutdown; a refused
//!   token is fatal, never retried in a loop;
//! * [`check`] — the HTTP check endpoint Consul's agent calls, and the [`Health`] handle that
//!   turns it 503 (draining, or forced by an operator);
//! * [`shed`] — when every connection slot is taken, the connection idle longest makes room
//!   (the check endpoint's, and any capped listener's);
//! * [`ttl`] — [`Heartbeat`]: a TTL check kept passing by the service itself, for services
//!   that cannot expose an HTTP endpoint;
//! * [`discovery`] — a task following a service's passing instances with blocking queries,
//!   publishing [`Snapshot`]s on a watch channel;
//! * [`damping`] — [`Damping`]: client-side flap damping (opt-in): an instance that keeps
//!   leaving and returning is held out of the view for a growing hold-down, never every
//!   instance (pure: [`damping::Damper`] takes `now`);
//! * [`decode`] — [`decode::Decoder`]: a service's health answers decoded by what changed
//!   (unchanged entries are not parsed again; their instances are reused);
//! * [`source`] — which of Consul's interfaces discovery reads: health or catalog blocking
//!   queries, the agent's list, a prepared query, or DNS SRV records (feature `dns`, on by default);
//! * [`compose`] — the passing set composed on the client from the instance list (read
//!   when membership changes) and the checks that are not passing, so that Consul's cost per
//!   change does not grow with instances × clients ([`Source::Composed`]);
//! * [`failover`] — failover across datacenters: one discovery per datacenter, the first
//!   that lists an instance wins;
//! * [`pool`] — [`Pool`]: a shareable client pool for any protocol: `pick` waits for a usable
//!   instance until a deadline, the caller reports each outcome (passive ejection);
//! * [`tower_stack`] — [`tower_stack::Balanced`]: a tower `Service` over a pool (balance,
//!   passive ejection, retries within a budget), for hyper, reqwest or tonic clients;
//! * [`tower_discover`] — the edge to tower's own balancers: snapshots as a
//!   `tower::discover::Discover`;
//! * [`balancer`] — which instance to use (pure: round-robin or power-of-two-choices, passive
//!   ejection with a growing hold-down, never every instance);
//! * [`reap_meta`] — the Meta keys (`reap-after`, `reap-start`) a service opts in to the
//!   `consul-reaper` sidecar with, and [`reap_meta::opt_in`], which sets them (the registrar
//!   gives each start of an opted-in registration a new `reap-start`);
//! * [`config`] (feature `config`, on by default) — live configuration from Consul's KV
//!   store: a typed configuration from a key or a prefix, followed with blocking queries,
//!   each change validated before it is applied, the last good kept otherwise;
//! * [`backoff`] — the one jittered exponential backoff (consul-api's, re-exported);
//! * [`error`] — the one error type.
//!
//! Everything speaks to Consul through [`consul_api::Client`], configured the way Consul's
//! own tools are (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`).
//!
//! A service that registers itself with an HTTP check served by its own router (the path
//! given once), and a client that picks among the passing instances of another service:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use consul_api::{AgentServiceRegistration, Client};
//! use consul_registry::{
//!     DiscoveryConfig, Health, Pool, PoolConfig, Registration, check::CheckService,
//! };
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let consul = Client::from_env()?;
//!
//! // 1. The check exists before the registration: mount `check` at `check.path()` in the
//! //    service's router (axum: `.route_service(check.path(), check.clone())`).
//! let health = Health::default();
//! let check = CheckService::new("/check", health.clone());
//! let addr = "127.0.0.1:7000".parse()?;
//! let service = AgentServiceRegistration {
//!     id: Some("billing-127.0.0.1-7000".into()),
//!     name: "billing".into(),
//!     address: Some("127.0.0.1".into()),
//!     port: Some(7000),
//!     check: Some(check.consul_check(addr, Duration::from_secs(5))),
//!     ..Default::default()
//! };
//! let mut registration =
//!     Registration::start_with_health(consul.clone(), service, health, CancellationToken::new());
//!
//! // 2. Discover another service; each call picks an instance and reports how it went.
//! let ledger = Pool::discover(consul, DiscoveryConfig::new("ledger"), PoolConfig::default());
//! let pick = ledger.pick(tokio::time::Instant::now() + Duration::from_secs(5)).await?;
//! println!("ledger at {}", pick.instance().address());
//! pick.succeeded();
//!
//! // 3. On SIGTERM: the check fails, the service is deregistered, it lingers while clients'
//! //    views catch up; then stop accepting and drain (axum's `with_graceful_shutdown`).
//! registration.drain().await?;
//! # Ok(()) }
//! ```

pub use consul_api::backoff;
pub mod balancer;
pub mod check;
pub mod compose;
#[cfg(feature = "config")]
pub mod config;
pub mod damping;
pub mod decode;
pub mod discovery;
pub mod error;
pub mod failover;
pub mod pool;
pub mod reap_meta;
pub mod registration;
pub mod shed;
pub mod source;
pub mod tower_discover;
pub mod tower_stack;
pub mod ttl;

pub use balancer::{Balancer, Strategy};
pub use check::{CheckStatus, Health};
pub use damping::Damping;
pub use discovery::{ConsulState, DiscoveryConfig, Instance, Snapshot};
pub use error::{Error, Result};
pub use pool::{Pick, Pool, PoolConfig};
pub use registration::{Registrar, Registration};
pub use source::Source;
pub use ttl::Heartbeat;

/// The workspace's page "Use it in your service" (`docs/service.md`), whose snippets are
/// compiled by `cargo test` as this crate's doctests, so that the page cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../docs/service.md")]
pub struct ServiceDoc;
