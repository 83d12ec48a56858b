//! `testbed`: run the project's experiments against real Consul. See `testbed --help`.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use consul_api::GoDuration;
use indicatif::{ProgressBar, ProgressStyle};
use testbed::{Consul, consul::docker, procs::Launcher, provision};

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
    /// Every way to discover (health, catalog, agent list, prepared query, DNS) side by side
    /// through one SIGKILL, with a resilient session on each and the naive client.
    Discovery(DiscoveryArgs),
    /// The echo client (the same as the `echo-client` binary).
    EchoClient(Box<echo_client::cli::Args>),
    /// Build the local Consul image (idempotent: instant when it exists).
    Image,
    /// Discovery at scale: instances × clients (CPU, memory, bytes, propagation per change),
    /// and Consul's read modes (stale, cached, filter) with many clients on one agent.
    Scale(ScaleArgs),
    /// One discovery client of `testbed scale` (prints one line per snapshot).
    #[command(hide = true)]
    ScaleClient(testbed::scale::ClientArgs),
    /// Start Consul, register a checked service, see it pass, deregister it.
    Smoke,
    /// The seed article's story, timestamped, for the naive and the resilient client.
    Timeline(TimelineArgs),
    /// Run an echo server (the same flags as the `echo-server` binary).
    EchoServer(Box<echo_server::cli::Args>),
    /// Run the reaper sidecar (the same flags as the `consul-reaper` binary).
    Reaper(Box<consul_reaper::cli::Args>),
    #[command(flatten)]
    Experiment(testbed::experiments::Experiments),
}

/// The parts of `testbed discovery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DiscoveryPart {
    /// Every discovery source through one SIGKILL.
    Sources,
    /// Scale out and in under load.
    Scale,
    /// Two datacenters: failover to dc2 and back.
    Datacenters,
}

#[derive(clap::Args, Debug)]
struct DiscoveryArgs {
    /// Echo servers to start (the first one is killed).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=20))]
    servers: u16,
    /// How often the polled sources (agent list, prepared query, DNS) read.
    #[arg(long, default_value = "1s")]
    poll: GoDuration,
    /// How long after the kill to keep watching (the agent's list needs 60-95 s).
    #[arg(long, default_value = "110s")]
    horizon: GoDuration,
    /// Parts to run (comma-separated); all by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<DiscoveryPart>,
    /// Where to write discovery.json and discovery.md.
    #[arg(long, default_value = "target/testbed")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ScaleArgs {
    /// Instance counts of the grid (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,5000")]
    instances: Vec<usize>,
    /// Client counts of the grid (comma-separated); each client is a process.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    clients: Vec<usize>,
    /// How the grid's clients read.
    #[arg(long, value_enum, default_value = "default")]
    grid_mode: testbed::scale::Mode,
    /// The read modes compared (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "default,stale,cached,filter"
    )]
    modes: Vec<testbed::scale::Mode>,
    /// Instances in the modes comparison.
    #[arg(long, default_value_t = 1000)]
    modes_instances: usize,
    /// Clients in the modes comparison.
    #[arg(long, default_value_t = 100)]
    modes_clients: usize,
    /// How long the flipper flips (5 times a second).
    #[arg(long, default_value = "20s")]
    flip_for: GoDuration,
    /// Parts to run (comma-separated); all by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<testbed::scale::Part>,
    /// Where to write scale.json, scale.md and scale.svg.
    #[arg(long, default_value = "target/testbed")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct TimelineArgs {
    /// Where to write timeline.json and timeline.md.
    #[arg(long, default_value = "target/testbed")]
    out: PathBuf,
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
            "warn,testbed=info,echo_server=info,echo_client=info,consul_registry=info".into()
        })
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Command::Experiment(experiment) = &cli.command {
        let ran = match Launcher::current_exe() {
            Ok(launcher) => testbed::experiment::run(experiment.suite(), &launcher, &cli.out).await,
            Err(e) => Err(e.into()),
        };
        return ran.unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        });
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Timeline(args) => timeline(args).await,
        Command::Discovery(args) => discovery(args).await,
        Command::Scale(args) => scale(args).await,
        Command::ScaleClient(args) => Ok(testbed::scale::client(args).await?),
        Command::EchoClient(args) => Ok(echo_client::cli::run(*args).await?),
        Command::Image => {
            let started = Instant::now();
            let built = docker::build_local_image().await?;
            println!(
                "{} {} in {:.1?}",
                provision::LOCAL_IMAGE,
                if built { "built" } else { "already present" },
                started.elapsed()
            );
            Ok(())
        }
        Command::Smoke => {
            let started = Instant::now();
            let consul = Consul::start().await?;
            let report = testbed::smoke::run(&consul).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            println!("smoke run took {:.1?}", started.elapsed());
            Ok(())
        }
        Command::EchoServer(args) => Ok(echo_server::cli::run(*args).await?),
        Command::Reaper(args) => consul_reaper::cli::run(*args).await,
        Command::Experiment(_) => Ok(()),
    }
}

async fn discovery(args: DiscoveryArgs) -> Result<()> {
    if args.poll.as_duration().is_zero() {
        anyhow::bail!("--poll must be above zero");
    }
    let parts = if args.only.is_empty() {
        vec![
            DiscoveryPart::Sources,
            DiscoveryPart::Scale,
            DiscoveryPart::Datacenters,
        ]
    } else {
        args.only.clone()
    };
    let progress = ProgressBar::new_spinner();
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .context("progress template")?,
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(200));
    progress.set_message("starting Consul");
    let tell = |msg: String| progress.set_message(msg);
    let launcher = Launcher::current_exe()?;
    let mut markdown = String::new();
    let mut json = serde_json::Map::new();
    let mut lost = 0;
    if parts.contains(&DiscoveryPart::Sources) {
        let config = testbed::discovery::SourcesConfig {
            servers: usize::from(args.servers),
            poll: args.poll,
            horizon: args.horizon,
            ..Default::default()
        };
        let report = testbed::discovery::run_sources(&launcher, &config, &tell).await?;
        lost += report.rows.iter().map(|r| r.lost).sum::<u64>();
        markdown.push_str(&testbed::discovery::sources_markdown(&report));
        json.insert("sources".into(), serde_json::to_value(&report)?);
    }
    if parts.contains(&DiscoveryPart::Scale) {
        let report = testbed::elastic::run(&launcher, &Default::default(), &tell).await?;
        lost += report.runs.iter().map(|r| r.lost).sum::<u64>();
        markdown.push('\n');
        markdown.push_str(&testbed::elastic::markdown(&report));
        json.insert("scale".into(), serde_json::to_value(&report)?);
    }
    if parts.contains(&DiscoveryPart::Datacenters) {
        let report =
            testbed::datacenters::run(&launcher, 2, args.poll.as_duration(), &tell).await?;
        lost += report.rows.iter().map(|r| r.lost).sum::<u64>();
        markdown.push('\n');
        markdown.push_str(&testbed::datacenters::markdown(&report));
        json.insert("datacenters".into(), serde_json::to_value(&report)?);
    }
    progress.finish_and_clear();
    println!("{markdown}");
    let (json, md) = write_json_and_markdown(&args.out, "discovery", &json, &markdown)?;
    println!("Report: {}\nTable:  {}", json.display(), md.display());
    if lost > 0 {
        anyhow::bail!("{lost} message(s) lost (see the tables): every source must lose none");
    }
    Ok(())
}

async fn scale(args: ScaleArgs) -> Result<()> {
    let parts = if args.only.is_empty() {
        vec![testbed::scale::Part::Grid, testbed::scale::Part::Modes]
    } else {
        args.only.clone()
    };
    let config = testbed::scale::ScaleConfig {
        instances: args.instances,
        clients: args.clients,
        grid_mode: args.grid_mode,
        modes: args.modes,
        modes_instances: args.modes_instances,
        modes_clients: args.modes_clients,
        flip_for: args.flip_for,
        ..Default::default()
    };
    if config.instances.contains(&0) || config.clients.contains(&0) || config.modes_clients == 0 {
        anyhow::bail!("instance and client counts must be above zero");
    }
    let progress = ProgressBar::new_spinner();
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .context("progress template")?,
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(200));
    let tell = |msg: String| progress.set_message(msg);
    let report = testbed::scale::run(&Launcher::current_exe()?, &config, &parts, &tell).await?;
    progress.finish_and_clear();
    let markdown = testbed::scale::markdown(&report);
    println!("{markdown}");
    let (json, md) = write_json_and_markdown(&args.out, "scale", &report, &markdown)?;
    println!("Report: {}\nTable:  {}", json.display(), md.display());
    if !report.grid.is_empty() {
        let svg = args.out.join("scale.svg");
        testbed::scale::svg(&report, &svg)?;
        println!("Plot:   {}", svg.display());
    }
    Ok(())
}

async fn timeline(args: TimelineArgs) -> Result<()> {
    let progress = ProgressBar::new_spinner();
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .context("progress template")?,
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(200));
    progress.set_message(
        "two stories at once (naive, resilient): client first, server, SIGKILL, then Consul's \
         reaper removes the dead server (60 to 95 s)",
    );
    let report = testbed::timeline::run(&Launcher::current_exe()?, &Default::default()).await?;
    progress.finish_and_clear();
    let markdown = testbed::timeline::markdown(&report);
    println!("{markdown}");
    let (json, md) = write_json_and_markdown(&args.out, "timeline", &report, &markdown)?;
    println!("Report: {}\nTable:  {}", json.display(), md.display());
    Ok(())
}

/// Write `name.json` and `name.md` into `dir`; returns their paths.
fn write_json_and_markdown(
    dir: &std::path::Path,
    name: &str,
    value: &impl serde::Serialize,
    markdown: &str,
) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join(format!("{name}.json"));
    testbed::report::write_json(&json, value)?;
    let md = dir.join(format!("{name}.md"));
    std::fs::write(&md, markdown)?;
    Ok((json, md))
}
