//! echo-client: finds healthy echo servers through Consul and fails over without losing a
//! message.
//!
//! * [`discovery`] — a task following the service's passing instances by Consul blocking
//!   queries, publishing [`Snapshot`]s on a watch channel;
//! * [`balancer`] — which instance to use (pure: round-robin or power-of-two-choices, local
//!   ejection with cooldown);
//! * [`backoff`] — jittered exponential backoff (consul-api's, re-exported), for Consul and
//!   for reconnecting;
//! * [`session`] — the connection and the queue of un-answered messages: resend on failure,
//!   exactly one reply per message, in order;
//! * [`client`] — [`EchoClient`], the handle: `send(bytes) -> Reply`, and discovery changes;
//! * [`naive`] — the seed article's client, for comparison;
//! * [`cli`] — the command line shared by `echo-client` and `testbed echo-client`;
//! * [`error`] — the one [`Error`] enum.

pub use consul_api::backoff;
pub mod balancer;
pub mod cli;
pub mod client;
pub mod discovery;
pub mod error;
pub mod naive;
pub mod session;

pub use balancer::Strategy;
pub use client::{ClientConfig, EchoClient, Reply};
pub use discovery::{ConsulState, DiscoveryConfig, Instance, Snapshot};
pub use error::{Error, Result};
pub use session::SessionConfig;
