//! `bench-echo-server echo-server [flags]`: the echo-server command line, built in this
//! package so that benches can spawn (and SIGKILL) real server processes by
//! `env!("CARGO_BIN_EXE_bench-echo-server")` — Cargo sets that only for binaries of the
//! bench's own package. The `echo-server` subcommand is what `echo_rig::Launcher`
//! puts before the flags, as for `testbed echo-server`.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "bench-echo-server",
    version,
    about = "The echo-server CLI, for the benches"
)]
enum Cli {
    /// Run an echo server (the same flags as the `echo-server` binary).
    EchoServer(Box<echo_server::cli::Args>),
}

#[tokio::main]
async fn main() -> ExitCode {
    let Cli::EchoServer(args) = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match echo_server::cli::run(*args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
