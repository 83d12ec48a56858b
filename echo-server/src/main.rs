//! `echo-server`: parse the flags, run the server, exit non-zero with the error on failure.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use echo_server::cli::{self, Args};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let log_level = cli::init_logging(filter, std::io::stderr().is_terminal());
    match cli::run_with(args, Some(log_level)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
