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
//! * [`discover`] — the edge to tower: snapshots as a `tower::discover::Discover`;
//! * [`balancer`] — which instance to use (pure: round-robin or power-of-two-choices, local
//!   ejection with a cooldown);
//! * [`backoff`] — the one jittered exponential backoff (consul-api's, re-exported);
//! * [`error`] — the one error type.
//!
//! Everything speaks to Consul through [`consul_api::Client`], configured the way Consul's
//! own tools are (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`).

pub use consul_api::backoff;
pub mod balancer;
pub mod check;
pub mod discover;
pub mod discovery;
pub mod error;
pub mod registration;
pub mod shed;
pub mod ttl;

pub use balancer::{Balancer, Strategy};
pub use check::{CheckStatus, Health};
pub use discovery::{ConsulState, DiscoveryConfig, Instance, Snapshot};
pub use error::{Error, Result};
pub use registration::{Registrar, Registration};
pub use ttl::Heartbeat;
