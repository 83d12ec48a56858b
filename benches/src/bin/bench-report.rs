//! `bench-report`: rewrite the generated section of `BENCHMARKS.md` from the last
//! `cargo bench` run (criterion's data and the benches' own results under
//! `target/criterion`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

/// Rewrite the results table in BENCHMARKS.md from the last `cargo bench` run.
#[derive(Debug, Parser)]
#[command(name = "bench-report", version)]
struct Args {
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
        .unwrap_or_else(benches::results::criterion_home);
    if args.print {
        let criterion = benches::report::load_criterion(&home)?;
        let files = benches::results::load_all(&home.join("bench-results"))?;
        let machine = benches::report::Machine::this();
        print!("{}", benches::report::render(&criterion, &files, &machine));
        return Ok(());
    }
    let path = benches::report::write(&home, &args.out)?;
    println!("updated {} from {}", path.display(), home.display());
    Ok(())
}
