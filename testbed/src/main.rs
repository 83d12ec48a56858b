//! `testbed`: run the project's experiments against real Consul. See `testbed --help`.

use std::{process::ExitCode, time::Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use testbed::{Consul, consul::docker, provision};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Real Consul, real echo services, real faults, measured"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The echo client (the same as the `echo-client` binary).
    EchoClient(Box<echo_client::cli::Args>),
    /// Build the local Consul image (idempotent: instant when it exists).
    Image,
    /// Start Consul, register a checked service, see it pass, deregister it.
    Smoke,
    /// Run an echo server (the same flags as the `echo-server` binary).
    EchoServer(Box<echo_server::cli::Args>),
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,testbed=info,echo_server=info,echo_client=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::EchoClient(args) => echo_client::cli::run(*args).await?,
        Command::Image => {
            let started = Instant::now();
            let engine = docker::connect().await?;
            let built = provision::ensure_local_image(&engine).await?;
            println!(
                "{} {} in {:.1?}",
                provision::LOCAL_IMAGE,
                if built { "built" } else { "already present" },
                started.elapsed()
            );
        }
        Command::Smoke => {
            let started = Instant::now();
            let consul = Consul::start().await?;
            let report = testbed::smoke::run(&consul).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            println!("smoke run took {:.1?}", started.elapsed());
        }
        Command::EchoServer(args) => echo_server::cli::run(*args).await?,
    }
    Ok(())
}
