//! `grpc-hello`: the `hello.Greeter` gRPC service, registered in Consul with a gRPC check,
//! stopped in order by SIGTERM or Ctrl-C. Consul is found as Consul's CLI finds it
//! (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`, ...).

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use consul_api::{Client, GoDuration};
use grpc_example::service::{self, Options};
use tokio_util::sync::CancellationToken;

/// Serve hello.Greeter and grpc.health.v1.Health, registered in Consul.
#[derive(Debug, Parser)]
struct Args {
    /// The address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The service name in Consul.
    #[arg(long, default_value = "hello")]
    name: String,
    /// The instance ID (default: NAME-HOST-PORT, from the address the check probes).
    #[arg(long)]
    id: Option<String>,
    /// How long to keep answering after deregistration (Go duration).
    #[arg(long, default_value = "2s")]
    linger: GoDuration,
    /// How long calls in flight may take once the listener is closed (Go duration).
    #[arg(long, default_value = "5s")]
    drain: GoDuration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let consul = Client::from_env().context("Consul's settings")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let options = Options {
        id: args.id,
        linger: args.linger.0,
        drain: args.drain.0,
        ..Options::new(args.name)
    };
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            stop_signal().await;
            shutdown.cancel();
        }
    });
    service::run(consul, listener, options, shutdown).await?;
    Ok(())
}

/// SIGTERM or SIGINT; if the handlers cannot be installed, never (kill still works).
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install the SIGTERM/SIGINT handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
