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
//! * [`decode`] — [`decode::Decoder`]: a service's health answers decoded by what changed
//!   (unchanged entries are not parsed again; their instances are reused);
//! * [`source`] — which of Consul's interfaces discovery reads: health or catalog blocking
//!   queries, the agent's list, a prepared query, or DNS SRV records;
//! * [`compose`] — the passing set composed on the client from the instance list (read
//!   when membership changes) and the checks that are not passing, so that Consul's cost per
//!   change does not grow with instances × clients ([`Source::Composed`]);
//! * [`failover`] — failover across datacenters: one discovery per datacenter, the first
//!   that lists an instance wins;
//! * [`tower_discover`] — the edge to tower: snapshots as a `tower::discover::Discover`;
//! * [`balancer`] — which instance to use (pure: round-robin or power-of-two-choices, local
//!   ejection with a cooldown);
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
//! A service that registers itself with an HTTP check, and a client that follows the passing
//! instances of another service and picks one:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use consul_api::{AgentServiceCheck, AgentServiceRegistration, Client, GoDuration};
//! use consul_registry::{
//!     Balancer, DiscoveryConfig, Registration, Strategy, check, discovery,
//! };
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let consul = Client::from_env()?;
//! let shutdown = CancellationToken::new();
//!
//! // 1. Serve the check on a port of its own, then register with it.
//! let checks = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let service = AgentServiceRegistration {
//!     id: Some("billing-1".into()),
//!     name: "billing".into(),
//!     address: Some("127.0.0.1".into()),
//!     port: Some(7000),
//!     check: Some(AgentServiceCheck {
//!         http: Some("http://127.0.0.1:8080/check".into()),
//!         interval: Some(GoDuration::from_secs(5)),
//!         timeout: Some(GoDuration::from_secs(3)),
//!         ..Default::default()
//!     }),
//!     ..Default::default()
//! };
//! let mut registration = Registration::start(consul.clone(), service, shutdown.clone());
//! let health = registration.health().clone();
//! tokio::spawn(check::serve(checks, "/check".into(), health, false, shutdown.clone()));
//!
//! // 2. Discover another service and choose among its passing instances.
//! let mut ledger = discovery::spawn(consul, DiscoveryConfig::new("ledger"));
//! let mut balancer = Balancer::new(Strategy::PowerOfTwoChoices, Duration::from_secs(2));
//! ledger.changed().await?;
//! balancer.update(&ledger.borrow_and_update().instances);
//! if let Some(instance) = balancer.pick(tokio::time::Instant::now()) {
//!     println!("ledger at {}", instance.address());
//! }
//!
//! // 3. On shutdown: the check turns critical, then the service is deregistered.
//! shutdown.cancel();
//! registration.wait().await?;
//! # Ok(()) }
//! ```

pub use consul_api::backoff;
pub mod balancer;
pub mod check;
pub mod compose;
#[cfg(feature = "config")]
pub mod config;
pub mod decode;
pub mod discovery;
pub mod error;
pub mod failover;
pub mod reap_meta;
pub mod registration;
pub mod shed;
pub mod source;
pub mod tower_discover;
pub mod ttl;

pub use balancer::{Balancer, Strategy};
pub use check::{CheckStatus, Health};
pub use discovery::{ConsulState, DiscoveryConfig, Instance, Snapshot};
pub use error::{Error, Result};
pub use registration::{Registrar, Registration};
pub use source::Source;
pub use ttl::Heartbeat;
