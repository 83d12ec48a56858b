//! `testbed`: run the project's experiments against real Consul. See `testbed --help`.
//!
//! Experiments are listed in [`testbed::experiments`] and run by the one runner
//! ([`testbed::experiment::run`]); the other subcommands are process entry points (echo
//! server and client, the reaper sidecar, a scale client) and the image build.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use testbed::{consul::docker, experiments::Experiments, procs::Launcher, provision};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Real Consul, real echo services, real faults, measured"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where experiments write their reports (`<name>.md`, `<name>.json`, `<name>.svg`).
    #[arg(long, global = true, default_value = "target/testbed")]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Experiment(Experiments),
    /// The echo client (the same as the `echo-client` binary).
    EchoClient(Box<echo_client::cli::Args>),
    /// Run an echo server (the same flags as the `echo-server` binary).
    EchoServer(Box<echo_server::cli::Args>),
    /// Build the local Consul image (idempotent: instant when it exists).
    Image,
    /// Run the reaper sidecar (the same flags as the `consul-reaper` binary).
    Reaper(Box<consul_reaper::cli::Args>),
    /// One discovery client of `testbed scale` (prints one line per snapshot).
    #[command(hide = true)]
    ScaleClient(testbed::scale::ClientArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // A scale client logs warnings only: its cost is discovery's, not the log's (the info
    // line lists every instance on each change).
    let filter = if matches!(cli.command, Command::ScaleClient(_)) {
        tracing_subscriber::EnvFilter::new("warn")
    } else {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            "warn,testbed=info,echo_server=info,echo_client=info,consul_registry=info,consul_reaper=info"
                .into()
        })
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // An echo server's filter is reloadable, as the `echo-server` binary's is: a `log_level`
    // from its `--config-key` is applied, not rejected.
    let log_level = if matches!(cli.command, Command::EchoServer(_)) {
        Some(echo_server::cli::init_logging(filter, ansi))
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .init();
        None
    };
    match run(cli, log_level).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, log_level: Option<echo_server::live::LogLevel>) -> Result<ExitCode> {
    match cli.command {
        Command::Experiment(experiment) => {
            let launcher = Launcher::current_exe()?;
            return testbed::experiment::run(experiment.suite(), &launcher, &cli.out).await;
        }
        Command::ScaleClient(args) => testbed::scale::client(args).await?,
        Command::EchoClient(args) => echo_client::cli::run(*args).await?,
        Command::EchoServer(args) => echo_server::cli::run_with(*args, log_level).await?,
        Command::Reaper(args) => consul_reaper::cli::run(*args).await?,
        Command::Image => {
            let started = Instant::now();
            let built = docker::build_local_image().await?;
            println!(
                "{} {} in {:.1?}",
                provision::LOCAL_IMAGE,
                if built { "built" } else { "already present" },
                started.elapsed()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
