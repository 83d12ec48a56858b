//! echo-server: a TCP echo service that registers itself with the local Consul agent.
//!
//! * [`codec`] — the newline-delimited wire format, shared with echo-client;
//! * [`config`] — the settings of one server and the registration they imply;
//! * [`server`] — [`Server`]: the listener (connection cap, accept backoff), one handler per
//!   connection (idle timeout, bounded buffers, oversized frames refused), the shutdown order;
//! * [`check`] — the HTTP `/check` Consul calls, and the [`Health`] handle that forces it 503;
//! * `registration` — register with retries, re-register when the entry disappears,
//!   deregister on shutdown;
//! * `shed` — when every slot is taken, the connection idle longest makes room;
//! * [`shutdown`] — SIGINT/SIGTERM (and SIGHUP) start the shutdown, SIGUSR1 flips `/check`;
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

pub mod check;
pub mod cli;
pub mod codec;
pub mod config;
pub mod error;
mod registration;
pub mod server;
mod shed;
pub mod shutdown;

pub use check::{CheckStatus, Health};
pub use config::Config;
pub use error::{Error, Result};
pub use server::Server;

/// This crate's version, sent to Consul as `Meta.version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
