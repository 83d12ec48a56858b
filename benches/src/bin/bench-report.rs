//! `bench-report`: rewrite the generated section of `BENCHMARKS.md` from the last
//! `cargo bench` run (criterion's data and the benches' own results under
//! `target/criterion`); with `--run`, run `cargo bench` first and record its wall time.

use std::{path::PathBuf, process::Command, time::SystemTime};

use anyhow::{Context, Result, bail};
use benches::{report, results};
use clap::Parser;

/// Rewrite the results table in BENCHMARKS.md from the last `cargo bench` run.
#[derive(Debug, Parser)]
#[command(name = "bench-report", version)]
struct Args {
    /// Run `cargo bench` in the workspace first (every bench, build included) and record
    /// its wall time: regenerating the table is then this one command.
    #[arg(long)]
    run: bool,
    /// The markdown file to update (only the text between its bench-report markers changes).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md"))]
    out: PathBuf,
    /// Criterion's output directory (default: found as criterion finds it).
    #[arg(long)]
    criterion_home: Option<PathBuf>,
    /// Print the generated section instead of writing the file.
    #[arg(long)]
    print: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let home = args
        .criterion_home
        .clone()
        .unwrap_or_else(results::criterion_home);
    if args.run {
        run_benches(&home)?;
    }
    if args.print {
        let criterion = report::load_criterion(&home)?;
        let files = results::load_all(&home.join("bench-results"))?;
        print!(
            "{}",
            report::render(&criterion, &files, &report::Machine::this())
        );
        return Ok(());
    }
    let path = report::write(&home, &args.out)?;
    println!("updated {} from {}", path.display(), home.display());
    Ok(())
}

/// Whether `cargo run` sets `key` for the program it runs.
fn set_by_cargo_run(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_MANIFEST_")
        || matches!(
            key,
            "CARGO" | "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
        )
}

/// `cargo bench` in the workspace root, timed; the time is recorded as the run `total`.
fn run_benches(home: &std::path::Path) -> Result<()> {
    let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut info = results::RunInfo {
        bench: report::TOTAL_RUN.into(),
        started_unix_ms: lab_report::unix_ms(SystemTime::now()),
        ..Default::default()
    };
    eprintln!("running `cargo bench` in {workspace} ...");
    let mut command = Command::new(cargo);
    command.arg("bench").current_dir(workspace);
    // Run as from a shell: without the variables `cargo run` set for this binary. Build
    // scripts that depend on one (ring's reads CARGO_PKG_NAME and CARGO_MANIFEST_DIR) would
    // otherwise see a change and rebuild half the workspace.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_run) {
            command.env_remove(key);
        }
    }
    let status = command.status().context("run cargo bench")?;
    if !status.success() {
        bail!("cargo bench failed ({status}); the table is left as it was");
    }
    info.finished_unix_ms = lab_report::unix_ms(SystemTime::now());
    let path = home.join("bench-results").join("run.total.json");
    results::write_json(&path, &results::ResultFile::Run(info))?;
    Ok(())
}
