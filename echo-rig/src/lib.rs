//! echo-rig: the echo service as the testbed and the benches drive it, above the echo crates
//! and [`consul_harness`] (which knows Consul and processes only).
//!
//! * [`procs`] — echo servers and clients as child processes, their command lines written
//!   from `echo_server::cli::Args` and `echo_client::cli::Args`, and the [`Launcher`] that
//!   names the binary embedding both CLIs;
//! * [`traffic`] — the one traffic streamer: a resilient client sending paced or back to
//!   back, every message's outcome or just the last reply, waits on what it sees;
//! * [`hostile`] — the one hostile-input attack on an echo server (garbage, oversized,
//!   stalled, resets, short-lived connections), with the server's memory and CPU per phase.
//!
//! Its errors are the harness's ([`consul_harness::Error`]): starting and controlling
//! processes; the streamer's waits have their own ([`traffic::StreamError`]).
//!
//! ```no_run
//! # async fn demo() -> consul_harness::Result<()> {
//! use echo_rig::{Launcher, ServerProcess, ServerSpec};
//! let consul = consul_harness::Consul::start().await?;
//! let mut spec = ServerSpec::seed(consul.config())?;
//! spec.args.interval = consul_api::GoDuration::from_secs(1);
//! let server = ServerProcess::spawn(&Launcher::current_exe()?, spec).await?;
//! println!("echo-server {} at {}", server.spec.args.id, server.spec.echo_addr());
//! # Ok(()) }
//! ```

pub mod hostile;
pub mod procs;
pub mod traffic;

pub use consul_harness::{Error, Result};
pub use procs::{ClientProcess, Launcher, ServerProcess, ServerSpec};
