//! The machine the report is written on, and the section's header table: machine, the
//! run's UTC date, the exact command, the wall times.

use std::fmt::Write as _;

use lab_report::{Align, Machine, Table, utc_minute};

use super::TOTAL_RUN;
use crate::results::RunInfo;

/// The command that made the report's numbers, as the run's records say it: `bench-report
/// --run` records the whole `cargo bench` ([`TOTAL_RUN`]); without that record the benches
/// ran by a `cargo bench` of their own (its filter not recorded).
pub(crate) fn command(whole_run: bool) -> &'static str {
    if whole_run {
        "`cargo run -p benches --bin bench-report -- --run` (in the workspace root)"
    } else {
        "`cargo bench` (any filter not recorded), then `cargo run -p benches --bin bench-report`"
    }
}

/// The section's header table: the machine, the run's UTC date, the command, the wall times.
pub(crate) fn machine_section(out: &mut String, m: &Machine, all_runs: &[&RunInfo]) {
    let first = |f: fn(&RunInfo) -> Option<&String>| {
        all_runs
            .iter()
            .find_map(|r| f(r).cloned())
            .unwrap_or_else(|| "not recorded".into())
    };
    let whole_run = all_runs.iter().find(|r| r.bench == TOTAL_RUN);
    let mut runs: Vec<&RunInfo> = all_runs
        .iter()
        .copied()
        .filter(|r| r.bench != TOTAL_RUN)
        .collect();
    runs.sort_by_key(|r| r.started_unix_ms);
    let secs = |r: &RunInfo| r.finished_unix_ms.saturating_sub(r.started_unix_ms) as f64 / 1e3;
    let parts: Vec<String> = runs
        .iter()
        .map(|r| format!("{} {:.0} s", r.bench, secs(r)))
        .collect();
    // From 0.0: an empty float sum is -0.0, which prints as "-0 s".
    let total = runs.iter().fold(0.0, |sum, r| sum + secs(r));
    let started = runs.first().map(|r| r.started_unix_ms);
    let mut table = Table::aligned([("", Align::Left), ("", Align::Left)]);
    table
        .row(["CPUs (`nproc`)".into(), m.cpus.to_string()])
        .row(["CPU model", m.cpu_model.as_str()])
        .row(["Memory", m.memory.as_str()])
        .row(["Kernel", m.kernel.as_str()])
        .row(["OS", m.os.as_str()])
        .row(["Docker engine".into(), first(|r| r.docker_version.as_ref())])
        .row([
            "Consul".into(),
            format!(
                "{} ({})",
                first(|r| r.consul_version.as_ref()),
                first(|r| r.consul_backend.as_ref())
            ),
        ])
        .row([
            "Run".into(),
            started.map_or("not recorded".into(), utc_minute),
        ])
        .row(["Command", command(whole_run.is_some())])
        .row([
            "Bench binaries' wall time".into(),
            format!(
                "{total:.0} s ({})",
                if parts.is_empty() {
                    "not recorded".into()
                } else {
                    parts.join(", ")
                }
            ),
        ])
        .row([
            "Whole `cargo bench`, build included".into(),
            whole_run.map_or("not recorded (run `bench-report --run`)".into(), |t| {
                format!("{:.0} s ({:.1} min)", secs(t), secs(t) / 60.0)
            }),
        ]);
    let _ = writeln!(out, "### Machine and run\n\n{table}");
}
