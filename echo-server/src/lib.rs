//! echo-server: a TCP echo service that registers itself with the local Consul agent.
//!
//! * [`codec`] — the newline-delimited wire format (the `echo-wire` crate, re-exported);
//! * [`config`] — the settings of one server and the registration they imply;
//! * [`server`] — [`Server`]: the listener (connection cap, accept backoff), one handler per
//!   connection (idle timeout, bounded buffers, oversized frames refused), the shutdown order;
//! * [`check`] — the HTTP `/check` Consul calls, and the [`Health`] handle that forces it 503
//!   (consul-registry's, re-exported); registration is consul-registry's
//!   [`Registrar`](consul_registry::Registrar);
//! * [`live`] — live settings from a Consul KV key (`--config-key`): frame limit, idle
//!   timeout, connection cap, maintenance, log level; what cannot change live is rejected;
//! * [`shutdown`] — SIGINT/SIGTERM (and SIGHUP) start the shutdown, SIGUSR1 flips `/check`;
//! * `descriptors` (private) — the descriptor table grown once at start, so that no accept
//!   under load waits for the kernel to grow it;
//! * `slice` (private) — the cooperative slice: how much one connection reads per wake-up
//!   before the others get a turn (a light connection waits for a slice, not a flood);
//! * `stop` (private) — the drain, the cut and the sweeper's word as the open connections
//!   see them, for an atomic load or two per wait;
//! * `sweep` (private) — the one sweeper per server: idle timeout, buffer shrink and shed
//!   eligibility of every connection, off the connections' hot path;
//! * [`cli`] — the command line ([`cli::Args`]) and [`cli::run`];
//! * [`error`] — the one error type.
//!
//! In-process use, as tests and benches do:
//!
//! ```no_run
//! # async fn demo() -> echo_server::Result<()> {
//! let server = echo_server::Server::bind(echo_server::Config::local()).await?;
//! println!("echo on {}, check on {}", server.echo_addr(), server.check_addr());
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let running = tokio::spawn(server.run(async move { stopped.await.ok(); }));
//! // ... talk to it ...
//! stop.send(()).ok();
//! running.await.expect("server task")?;
//! # Ok(()) }
//! ```

pub use consul_registry::check;
pub mod cli;
pub use echo_wire as codec;
mod closing;
pub mod config;
mod descriptors;
pub mod error;
pub mod live;
pub mod server;
pub mod shutdown;
mod slice;
mod stop;
mod sweep;

pub use check::{CheckStatus, Health};
pub use config::Config;
pub use error::{Error, Result};
pub use server::Server;

/// This crate's version, sent to Consul as `Meta.version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
