//! What every bench binary does the same way: its tokio runtime, logging only when asked
//! (`RUST_LOG`), and one real Consul per bench group, started through the testbed harness
//! on first use (so a filtered-out group starts none) and stopped at the end.

use std::sync::Arc;

use consul_harness::Consul;
use tokio::{runtime::Runtime, sync::OnceCell};

use crate::{error::Result, results::RunInfo};

/// Bootstrap resamples for criterion's analysis of every criterion bench here (its default
/// is 100,000). The report takes its medians and p99s from the samples themselves, not from
/// criterion's bootstrap; the resamples feed only criterion's own confidence intervals and
/// plots, whose density estimates over 100,000 points took ~6 s of CPU per benchmark
/// (measured: 7.8 s → 2.1 s for one echo bench with 10,000), most of the echo bench's time.
pub const NRESAMPLES: usize = 10_000;

/// The name of the threads of [`runtime`].
pub const CLIENT_THREADS: &str = "bench";

/// The runtime the benches drive their clients on: multi-threaded, one worker per CPU, its
/// threads named [`CLIENT_THREADS`].
pub fn runtime() -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(CLIENT_THREADS)
        .build()?)
}

/// Log to stderr when `RUST_LOG` is set; stay silent (and cost nothing) otherwise.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Say, once per bench, why criterion is about to warn that it "cannot complete N samples":
/// benches that time one event per sample (a kill, a check turning 503, a new instance) set a
/// tiny target time on purpose, and criterion's estimate includes the first event's setup.
pub fn note_one_event_per_sample(bench: &str) {
    eprintln!(
        "note: {bench} times one event per sample by design; criterion's warning that it cannot \
         complete the samples in the target time is expected"
    );
}

/// Criterion's options that take a value: their values are not filters.
const VALUED: [&str; 16] = [
    "--save-baseline",
    "--baseline",
    "--baseline-lenient",
    "--load-baseline",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--profile-time",
    "--color",
    "--output-format",
    "--plotting-backend",
    "--format",
];

/// The filters in a bench binary's arguments (as criterion takes them: every argument that is
/// neither an option nor an option's value), for benches that do not run under criterion.
pub fn filters(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if skip_value {
            skip_value = false;
        } else if arg.starts_with('-') {
            skip_value = VALUED.contains(&arg.as_str());
        } else {
            out.push(arg.clone());
        }
    }
    out
}

/// One Consul agent for a bench group, started on first use.
#[derive(Debug, Default)]
pub struct SharedConsul {
    cell: OnceCell<Consul>,
}

impl SharedConsul {
    /// Nothing started yet.
    pub fn new() -> Arc<SharedConsul> {
        Arc::new(SharedConsul::default())
    }

    /// The agent, started now if it is not yet (real Consul 1.8.7 in Docker, as the testbed
    /// starts it; `TESTBED_BACKEND` and `CONSUL_IMAGE` apply).
    pub async fn get(&self) -> Result<&Consul> {
        self.cell
            .get_or_try_init(|| async {
                eprintln!("starting Consul for this bench group (testbed harness) ...");
                let consul = Consul::start().await?;
                eprintln!(
                    "Consul {} ready on {} ({})",
                    consul.version(),
                    consul.address(),
                    consul.backend().name()
                );
                Ok::<_, crate::Error>(consul)
            })
            .await
    }

    /// Note what ran in `run` (Consul's version and backend, the Docker engine's version) and
    /// stop the agent, if one was started. Call once the benches holding clones are done.
    pub async fn finish(self: Arc<Self>, run: &mut RunInfo) -> Result<()> {
        let consul = match Arc::try_unwrap(self) {
            Ok(shared) => shared.cell.into_inner(),
            Err(_) => None, // still shared: it is removed when the last holder drops it
        };
        let Some(mut consul) = consul else {
            return Ok(());
        };
        run.consul_version = Some(consul.version().to_owned());
        run.consul_backend = Some(consul.backend().name().to_owned());
        if consul.backend() == consul_harness::BackendKind::Docker
            && let Some(version) = consul_harness::consul::docker::engine_version().await
        {
            run.docker_version = Some(version);
        }
        consul.stop().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_skip_options_and_their_values() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(filters(&args(&["--bench"])).is_empty());
        assert_eq!(
            filters(&args(&[
                "--bench",
                "--save-baseline",
                "x",
                "memory",
                "--noplot"
            ])),
            ["memory"]
        );
    }
}
