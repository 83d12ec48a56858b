//! The command line, and [`run`]: follow the agent until SIGINT or SIGTERM.

use anyhow::{Context, Result};
use clap::Parser;
use consul_api::{Client, GoDuration};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{Event, META_KEY, ReaperConfig, driver};

/// Deregister this agent's services once their check has been critical for as long as each
/// asks in its Meta `reap-after` (a Go duration: 5s, 1m30s), to the millisecond. Consul's own
/// DeregisterCriticalServiceAfter waits at least 1m and acts on a 30s grid; services without
/// the Meta key are left to it.
///
/// The agent's address and TLS settings come from the flags below or Consul's own variables
/// (CONSUL_HTTP_ADDR, CONSUL_CACERT, ...); the ACL token from CONSUL_HTTP_TOKEN or
/// CONSUL_HTTP_TOKEN_FILE. The token needs node:read and service:read to follow the checks,
/// and service:write on every service it may remove. Exits 0 on SIGINT/SIGTERM, 1 if the
/// token may not read the agent's checks.
#[derive(Debug, Clone, Parser)]
#[command(name = "consul-reaper", version)]
pub struct Args {
    /// The Meta key services opt in with.
    #[arg(long, env = "REAPER_META_KEY", default_value = META_KEY)]
    pub meta_key: String,

    /// The longest a blocking query on the agent's checks waits.
    #[arg(long, env = "REAPER_WAIT", default_value = "5m")]
    pub wait: GoDuration,

    /// Where the Consul agent is and how to speak TLS to it.
    #[command(flatten)]
    pub consul: consul_api::ConsulArgs,
}

/// Run the reaper until SIGINT or SIGTERM:
///
/// 1. read the configuration and install the signal handlers;
/// 2. follow the agent's checks and deregister what falls due;
/// 3. on a signal, stop following (a removal in flight is abandoned: the agent either did it or
///    did not) and return.
pub async fn run(args: Args) -> Result<()> {
    if args.meta_key.trim().is_empty() {
        anyhow::bail!("--meta-key must not be empty");
    }
    let client = Client::new(args.consul.config()?).context("Consul client")?;
    let stop = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let on_signal = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("signal received: stopping");
        on_signal.cancel();
    });
    let config = ReaperConfig {
        wait: args.wait.as_duration(),
        meta_key: args.meta_key,
    };
    tracing::info!(meta_key = %config.meta_key, "consul-reaper starting");
    driver::run(client, config, stop, |event| {
        if let Event::Observed { tracked, critical } = event {
            tracing::debug!(tracked, critical, "agent's checks changed");
        }
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_flags() {
        let args = Args::try_parse_from(["consul-reaper"]).expect("defaults");
        assert_eq!(args.meta_key, "reap-after");
        assert_eq!(args.wait.as_duration().as_secs(), 300);
        let args = Args::try_parse_from(["consul-reaper", "--wait", "30s", "--meta-key", "gc"])
            .expect("flags");
        assert_eq!(args.meta_key, "gc");
        assert_eq!(args.wait.as_duration().as_secs(), 30);
        assert!(Args::try_parse_from(["consul-reaper", "--wait", "soon"]).is_err());
    }
}
