//! The sections every bench has: the results table (one row per bench: median, p99, ratio
//! to its baseline, goal, verdict), where the time goes (each recorded interval), memory,
//! and fairness under hostile input.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{
    CPU_PREFIX, CriterionBench, DETECTION, LATENCY_GOAL, MEMORY_GOAL_BYTES, Numbers, PAIRED_PREFIX,
    THROUGHPUT_GOAL, TWIN_PREFIX,
    echo::{latency_intervals, paired_interval, paired_ratio},
    markdown::{fmt_ratio, miss, near_goal, verdict, with_interval},
    numbers_of,
    spec::{Goal, Spec, echo_parts, interleaved, order, server_of, short, spec},
};
use crate::results::{self, FairnessRecord, MemoryRecord, SeriesRecord, Summary};
use lab_report::{Align, Table, fmt_ns, fmt_rate};

/// One row per bench: what it times, its median and p99, its ratio to its baseline(s), its
/// goal and whether this run met it; a bench's extra series as rows of their own.
pub(crate) fn results_table(
    out: &mut String,
    criterion: &BTreeMap<String, CriterionBench>,
    series: &BTreeMap<String, SeriesRecord>,
) {
    let mut ids: Vec<&String> = criterion
        .keys()
        .chain(series.keys())
        .filter(|id| {
            !id.starts_with(CPU_PREFIX)
                && !id.starts_with(PAIRED_PREFIX)
                && !id.starts_with(TWIN_PREFIX)
                && !interleaved(id)
        })
        .collect();
    ids.sort_by_key(|id| order(id));
    ids.dedup();
    let mut table = Table::aligned([
        ("Benchmark", Align::Left),
        ("What is timed", Align::Left),
        ("n", Align::Right),
        ("Median", Align::Right),
        ("p99", Align::Right),
        ("vs baseline", Align::Left),
        ("Goal", Align::Left),
        ("Met?", Align::Left),
    ]);
    for id in ids {
        let spec = spec(id);
        let Some(n) = numbers_of(id, criterion, series) else {
            continue;
        };
        let base = spec
            .baseline
            .as_deref()
            .and_then(|b| numbers_of(b, criterion, series));
        let (median, p99) = match n.bytes {
            Some(_) => (
                format!(
                    "{} ({}/iter)",
                    n.throughput(n.p50).map_or("?".into(), fmt_rate),
                    fmt_ns(n.p50)
                ),
                format!(
                    "{} (slowest 1% of samples)",
                    n.throughput(n.p99).map_or("?".into(), fmt_rate)
                ),
            ),
            None => (fmt_ns(n.p50), fmt_ns(n.p99)),
        };
        let ratio = vs_baseline(id, &spec, &n, base.as_ref(), criterion, series);
        let (goal, met) = goal_and_verdict(id, &spec, &n, base.as_ref(), series);
        table.row([
            format!("`{id}`"),
            spec.times.clone(),
            n.count.to_string(),
            median,
            p99,
            ratio,
            goal,
            met,
        ]);
        for (name, row, times) in &spec.extra_rows {
            if let Some(s) = series.get(id).and_then(|r| r.series.get(*name)) {
                table.row([
                    format!("`{row}`"),
                    (*times).to_owned(),
                    s.count.to_string(),
                    fmt_ns(s.p50),
                    fmt_ns(s.p99),
                    "—".into(),
                    "—".into(),
                    "—".into(),
                ]);
            }
        }
    }
    let _ = writeln!(out, "### Results\n\n{table}");
}

/// Row `id`'s "vs baseline" cell: its ratio to its baseline (throughput: by the paired
/// samples where recorded; echo latency: with its 95 % intervals), then to its second one.
fn vs_baseline(
    id: &str,
    spec: &Spec,
    n: &Numbers,
    base: Option<&Numbers>,
    criterion: &BTreeMap<String, CriterionBench>,
    series: &BTreeMap<String, SeriesRecord>,
) -> String {
    let base_name = server_of(spec.baseline.as_deref().unwrap_or(""));
    let mut ratio = match (base, n.bytes) {
        (Some(b), Some(_)) => match paired_ratio(id, series) {
            Some(p) => format!(
                "{}{base_name}'s throughput (median of {} samples' pairs{}; ratio of the medians {:.2}×)",
                format_args!("{}× ", near_goal(p.p50, THROUGHPUT_GOAL)),
                p.count,
                paired_interval(id, series).map_or(String::new(), |i| format!(
                    ", 95 % interval {:.2}–{:.2}",
                    i.low, i.high
                )),
                b.p50 / n.p50
            ),
            None => format!("{:.2}× {base_name}'s throughput", b.p50 / n.p50),
        },
        (Some(b), None) if echo_parts(id).is_some() => {
            let [p50, p99] = latency_intervals(id, series);
            format!(
                "{} (median), {} (p99) of {base_name}",
                with_interval(n.p50 / b.p50, LATENCY_GOAL, p50),
                with_interval(n.p99 / b.p99, LATENCY_GOAL, p99),
            )
        }
        (Some(b), None) => format!(
            "{}× (median), {}× (p99) of {}",
            fmt_ratio(n.p50 / b.p50),
            fmt_ratio(n.p99 / b.p99),
            short(spec.baseline.as_deref().unwrap_or(""))
        ),
        (None, _) if spec.baseline.is_some() => "baseline not run".into(),
        (None, _) => "—".into(),
    };
    let also = spec
        .also
        .as_deref()
        .and_then(|b| Some((server_of(b), numbers_of(b, criterion, series)?)));
    match (also, n.bytes) {
        (Some((name, a)), Some(_)) => {
            let _ = write!(ratio, "; {:.2}× {name}'s", a.p50 / n.p50);
        }
        (Some((name, a)), None) => {
            let _ = write!(
                ratio,
                "; {:.2}×, {:.2}× of {name}",
                n.p50 / a.p50,
                n.p99 / a.p99
            );
        }
        (None, _) => {}
    }
    ratio
}

/// Row `id`'s goal and verdict cells; a miss says whether the run's own spread reaches the
/// goal, where the bench recorded its intervals.
fn goal_and_verdict(
    id: &str,
    spec: &Spec,
    n: &Numbers,
    base: Option<&Numbers>,
    series: &BTreeMap<String, SeriesRecord>,
) -> (String, String) {
    let base_name = server_of(spec.baseline.as_deref().unwrap_or(""));
    match spec.goal {
        Some(Goal::P99AtMost(max)) => (
            format!("p99 ≤ {}", fmt_ns(max.as_nanos() as f64)),
            verdict(n.p99 <= max.as_nanos() as f64),
        ),
        Some(Goal::ThroughputAtLeast(r)) => (
            format!("≥ {r}× {base_name}"),
            match base {
                Some(b) if paired_ratio(id, series).map_or(b.p50 / n.p50, |p| p.p50) >= r => {
                    verdict(true)
                }
                Some(_) => match paired_interval(id, series) {
                    Some(i) => miss(i.high >= r),
                    None => verdict(false),
                },
                None => "no baseline".into(),
            },
        ),
        Some(Goal::LatencyWithin(r)) => (
            format!("median and p99 ≤ {r}× {base_name}"),
            match base {
                Some(b) if n.p50 <= r * b.p50 && n.p99 <= r * b.p99 => verdict(true),
                Some(b) => match latency_intervals(id, series) {
                    [Some(p50), Some(p99)] => miss(
                        (n.p50 <= r * b.p50 || p50.low <= r)
                            && (n.p99 <= r * b.p99 || p99.low <= r),
                    ),
                    _ => verdict(false),
                },
                None => "no baseline".into(),
            },
        ),
        Some(Goal::P99Within(r)) => (
            format!(
                "p99 ≤ {r}× {}'s",
                short(spec.baseline.as_deref().unwrap_or(""))
            ),
            match base {
                Some(b) if n.p99 <= r * b.p99 => verdict(true),
                Some(b) => within_miss(id, n.p99, r * b.p99, series),
                None => "no baseline".into(),
            },
        ),
        None => ("—".into(), "—".into()),
    }
}

/// A p99 over its limit: by how much, and how much of the limit the detection alone took
/// where the bench timed it (the kill until an idle probe saw the close: no client can
/// answer before it knows).
fn within_miss(id: &str, p99: f64, limit: f64, series: &BTreeMap<String, SeriesRecord>) -> String {
    let mut cell = format!("**NOT met**: {:.2}× the goal", p99 / limit);
    if let Some(detection) = series.get(id).and_then(|s| s.series.get(DETECTION)) {
        let _ = write!(
            cell,
            "; the detection alone (kill → an idle probe sees the close) has p99 {}, {:.2}× the goal",
            fmt_ns(detection.p99),
            detection.p99 / limit
        );
    }
    cell
}

/// Every recorded interval of each bench that recorded parts, described first.
pub(crate) fn breakdowns(out: &mut String, series: &BTreeMap<String, SeriesRecord>) {
    let with_parts: Vec<&SeriesRecord> = series
        .values()
        .filter(|r| r.series.len() > 1 && !r.descriptions.is_empty())
        .collect();
    if with_parts.is_empty() {
        return;
    }
    let _ = writeln!(out, "### Where the time goes\n");
    let _ = writeln!(
        out,
        "Every interval recorded in the same measured iterations (negative: the second event was seen first).\n"
    );
    for record in with_parts {
        let mut table = Table::aligned([("Interval", Align::Left)]);
        for column in ["n", "Median", "p90", "p99", "max"] {
            table.column(column, Align::Right);
        }
        // As described (the measured interval first), then any other series.
        let mut rows: Vec<(&str, &str)> = record
            .descriptions
            .iter()
            .map(|(name, text)| (name.as_str(), text.as_str()))
            .collect();
        for name in record.series.keys() {
            if !rows.iter().any(|(n, _)| n == name) {
                rows.push((name, name));
            }
        }
        for (name, label) in rows {
            let Some(s) = record.series.get(name) else {
                continue;
            };
            table.row([
                label.to_owned(),
                s.count.to_string(),
                fmt_ns(s.p50),
                fmt_ns(s.p90),
                fmt_ns(s.p99),
                fmt_ns(s.max),
            ]);
        }
        let _ = writeln!(
            out,
            "`{}` ({} samples)\n\n{table}",
            record.id, record.samples
        );
    }
}

/// The resident set per idle connection, against the goal.
pub(crate) fn memory_section(out: &mut String, memory: &[&MemoryRecord]) {
    if memory.is_empty() {
        return;
    }
    let mut table = Table::aligned([("Benchmark", Align::Left)]);
    for column in [
        "Idle connections",
        "Message before idling",
        "RSS before",
        "RSS holding them",
        "Peak RSS (VmHWM)",
        "Per connection",
    ] {
        table.column(column, Align::Right);
    }
    table.column(
        format!("Goal ≤ {:.0} KiB", MEMORY_GOAL_BYTES / 1024.0),
        Align::Left,
    );
    for m in memory {
        let mib = |f: fn(&results::MemoryRun) -> u64| {
            let mut v: Vec<f64> = m.runs.iter().map(|r| f(r) as f64).collect();
            let median = lab_report::select_percentile(&mut v, 50.0).unwrap_or(0.0);
            format!("{:.1} MiB", median / 1024.0)
        };
        table.row([
            format!("`{}`", m.id),
            m.connections.to_string(),
            format!("{} B", m.message_bytes),
            mib(|r| r.base_rss_kib),
            mib(|r| r.idle_rss_kib),
            mib(|r| r.peak_kib),
            format!(
                "{:.0} B ({:.1} KiB)",
                m.bytes_per_connection,
                m.bytes_per_connection / 1024.0
            ),
            verdict(m.bytes_per_connection <= MEMORY_GOAL_BYTES),
        ]);
    }
    let _ = writeln!(
        out,
        "### Memory\n\n{table}\nMedians over {} fresh server processes each.\n",
        memory.first().map_or(0, |m| m.runs.len())
    );
}

/// A fairness table's row: what the round trips are, their count and percentiles, and their
/// p99 against the quiet one's.
fn round_trip_cells(what: &str, s: &Summary, quiet_p99: f64) -> Vec<String> {
    vec![
        what.to_owned(),
        s.count.to_string(),
        fmt_ns(s.p50),
        fmt_ns(s.p90),
        fmt_ns(s.p99),
        fmt_ns(s.max),
        format!("{:.2}×", s.p99 / quiet_p99),
    ]
}

/// A fairness table with the columns of [`round_trip_cells`], titled `title`.
fn round_trip_table(title: &str) -> Table {
    let mut table = Table::aligned([(title, Align::Left)]);
    for column in ["n", "Median", "p90", "p99", "max", "p99 ÷ quiet p99"] {
        table.column(column, Align::Right);
    }
    table
}

/// The well-behaved client's round trips, quiet and under each phase of the attack.
pub(crate) fn fairness_section(out: &mut String, fairness: &[&FairnessRecord]) {
    for f in fairness {
        let mut table = round_trip_table("Well-behaved client's round trips");
        table.column("server CPU", Align::Right);
        let mut row = |what: &str, s: &Summary, cpu: Option<f64>| {
            let mut cells = round_trip_cells(what, s, f.quiet.p99);
            cells.push(cpu.map_or("—".into(), |c| format!("{:.0}%", c * 100.0)));
            table.row(cells);
        };
        row("quiet", &f.quiet, None);
        row("**under attack (all phases)**", &f.attacked, None);
        for (phase, cpu, s) in &f.phases {
            row(&format!("… during {phase}"), s, Some(*cpu));
        }
        let _ = writeln!(
            out,
            "### Fairness under hostile input\n\n`{}`: {}. Attack: {}. The well-behaved client \
             sends one 16-byte message every 2 ms on one connection and waits for each echo.\n\n\
             {table}",
            f.id, f.placement, f.attack
        );
        if let Some(w) = &f.less_own_wait {
            let mut table = round_trip_table("The same, less the client's own wait");
            let mut row = |what: &str, s: &Summary| {
                table.row(round_trip_cells(what, s, w.quiet.p99));
            };
            row("quiet", &w.quiet);
            row("**under attack (all phases)**", &w.attacked);
            for (phase, s) in &w.phases {
                row(&format!("… during {phase}"), s);
            }
            let _ = writeln!(
                out,
                "Each round trip less the time the client's thread waited, runnable, for its CPU \
                 meanwhile (its run-queue delay from `/proc/thread-self/schedstat`, read before \
                 and after each round trip, outside the timed interval): what is left is the \
                 server's and the kernel's loopback path's. The client shares its CPU with the \
                 server, so part of what an attack adds is the client waiting for the server's \
                 thread to give the CPU back, a wait no serving order inside the server removes.\n\n\
                 {table}"
            );
        }
        if let Some(b) = &f.baseline {
            let mut table = round_trip_table("The fair baseline's round trips");
            let mut row = |what: &str, s: &Summary, quiet_p99: f64| {
                table.row(round_trip_cells(what, s, quiet_p99));
            };
            row("quiet", &b.quiet, b.quiet.p99);
            row("**under attack (its phases)**", &b.attacked, b.quiet.p99);
            for (phase, s) in &b.phases {
                row(&format!("… during {phase}"), s, b.quiet.p99);
            }
            row(
                "echo-server, under attack in the same phases",
                &b.echo_server_same_phases,
                f.quiet.p99,
            );
            let _ = writeln!(
                out,
                "The same client, then the same attack without its {}, against the fair \
                 baseline: {}. It has no framing and no frame limit, so it never answers an \
                 oversized frame (that phase is left out). What it shows is what the kernel's \
                 loopback path and a tokio server with nothing of its own give the well-behaved \
                 client on a CPU it shares with the attacked server; the last row is echo-server \
                 over the same phases (its ratio to its own quiet p99).\n\n{table}",
                b.left_out, b.server
            );
        }
    }
}
