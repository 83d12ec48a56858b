//! echo-client: finds healthy echo servers through Consul and fails over without losing a
//! message.
//!
//! * [`discovery`], [`balancer`], [`backoff`] — consul-registry's, re-exported: the passing
//!   instances as [`Snapshot`]s, which instance to use, the one backoff;
//! * [`session`] — the connection and the queue of un-answered messages: resend on failure,
//!   exactly one reply per message, in order;
//! * [`client`] — [`EchoClient`], the handle: `send(bytes) -> Reply`, and discovery changes;
//! * [`naive`] — the seed article's client, for comparison;
//! * [`cli`] — the command line shared by `echo-client` and `testbed echo-client`;
//! * [`error`] — the one [`Error`] enum.
//!
//! ```no_run
//! use echo_client::{ClientConfig, EchoClient};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let client = EchoClient::start(ClientConfig::new(consul_api::Config::from_env()?, "servernode"))?;
//! let reply = client.send("hello").await?; // fails over to another instance if need be
//! println!("{} answered in {:?}", reply.instance, reply.latency);
//! # Ok(()) }
//! ```

pub use consul_registry::{backoff, balancer, discovery};
pub mod cli;
pub mod client;
pub mod error;
pub mod naive;
pub mod session;

pub use balancer::Strategy;
pub use client::{ClientConfig, EchoClient, Reply};
pub use discovery::{ConsulState, DiscoveryConfig, Instance, Snapshot};
pub use error::{Error, Result};
pub use session::SessionConfig;
