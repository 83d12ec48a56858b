//! The echo path's sections: its goals in one table (each with its worst case; beside any
//! miss the twin, and for throughput echo-server's CPU per message against the baseline's),
//! and messages per second with the servers' CPU time per message.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{
    CPU_PREFIX, CriterionBench, ECHO_SERVERS, FAIRNESS_GOAL, LATENCY_GOAL, LATENCY_INTERVALS,
    MEDIAN_INTERVAL, MEMORY_GOAL_BYTES, Numbers, PAIRED_PREFIX, THROUGHPUT_GOAL, TWIN, TWIN_PREFIX,
    markdown::{span, spread_word, with_interval},
    numbers_of,
    spec::{echo_parts, order, short},
};
use crate::{
    results::{FairnessRecord, MEASURED, MemoryRecord, SeriesRecord, Summary},
    spread::Interval,
};
use lab_report::{Align, Table, fmt_count, fmt_ns};

/// The echo path's goals in one list, each with its worst case over the sizes and
/// connection counts, as measured in this run: what is met, and by how much what is not.
pub(crate) fn echo_goals(
    out: &mut String,
    criterion: &BTreeMap<String, CriterionBench>,
    series: &BTreeMap<String, SeriesRecord>,
    memory: &[&MemoryRecord],
    fairness: &[&FairnessRecord],
) {
    let mut table = Table::aligned([
        ("Goal", Align::Left),
        ("Measured", Align::Left),
        ("Met?", Align::Left),
    ]);
    let rows = [
        throughput_goal(criterion, series),
        latency_goal(criterion, series),
        memory_goal(memory),
    ];
    for row in rows
        .into_iter()
        .flatten()
        .chain(fairness.iter().map(|f| fairness_goal(f)))
    {
        table.row(row);
    }
    if table.is_empty() {
        return;
    }
    let _ = writeln!(out, "### The echo path's goals\n");
    let _ = writeln!(
        out,
        "Every ratio from this run, the servers measured in alternation so that the ratios \
         compare the same seconds. Throughput: each criterion sample is one pipelined turn on \
         each server, `raw-copy` last and the others in an order that puts each of them after \
         every other equally often; the ratio is the median over the samples of \
         `raw-buf`'s turn time ÷ echo-server's in the same sample. Latency: one round (a round trip on each of the \
         server's connections) on each server in turn. 95 %: the interval from this run's own \
         samples (throughput: the order statistics of the paired ratios' median; latency: a \
         bootstrap over whole samples, both servers' round trips of a sample kept together); \
         a miss whose interval reaches the goal is one this run cannot tell from its noise. \
         The twin, `raw-buf-twin`, is a second copy of the baseline measured exactly as \
         echo-server is: its ratios are what this run gives two identical servers. An \
         interval comes from the samples of one set of connections, opened once per bench; \
         the twin also shows what differs between sets of connections, which no interval \
         of one set can: a miss no further from 1 than the twin's is one the run cannot \
         tell from a copy of the baseline.\n"
    );
    let _ = writeln!(out, "{table}");
}

/// (label, echo-server's numbers, the fair baseline's) for every pair of `group` that ran.
fn pairs(
    group: &str,
    criterion: &BTreeMap<String, CriterionBench>,
    series: &BTreeMap<String, SeriesRecord>,
) -> Vec<(String, Numbers, Numbers)> {
    let prefix = format!("echo/{group}/echo-server/");
    let mut ids: Vec<&String> = criterion
        .keys()
        .chain(series.keys())
        .filter(|id| id.starts_with(&prefix))
        .collect();
    ids.sort_by_key(|id| order(id));
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| {
            let base = id.replacen("/echo-server/", "/raw-buf/", 1);
            Some((
                short(id).to_owned(),
                numbers_of(id, criterion, series)?,
                numbers_of(&base, criterion, series)?,
            ))
        })
        .collect()
}

/// "met", or "**NOT met**: " and the misses.
fn met_unless(misses: &[String]) -> String {
    if misses.is_empty() {
        "met".to_owned()
    } else {
        format!("**NOT met**: {}", misses.join("; "))
    }
}

/// The pipelined throughput goal's row: the lowest paired ratio, the twin's span, each miss.
fn throughput_goal(
    criterion: &BTreeMap<String, CriterionBench>,
    series: &BTreeMap<String, SeriesRecord>,
) -> Option<[String; 3]> {
    let throughput = pairs("throughput", criterion, series);
    if throughput.is_empty() {
        return None;
    }
    let ratios: Vec<(String, f64)> = throughput
        .iter()
        .map(|(label, n, b)| {
            let id = format!("echo/throughput/echo-server/{label}");
            let r = paired_ratio(&id, series).map_or(b.p50 / n.p50, |p| p.p50);
            (label.clone(), r)
        })
        .collect();
    let twin_ratio = |label: &str| {
        paired_ratio(&format!("echo/throughput/{TWIN}/{label}"), series).map(|p| p.p50)
    };
    let misses: Vec<String> = ratios
        .iter()
        .filter(|(_, r)| *r < THROUGHPUT_GOAL)
        .map(|(label, r)| {
            let id = format!("echo/throughput/echo-server/{label}");
            let interval = paired_interval(&id, series);
            let spread = interval.map_or(String::new(), |i| {
                format!(", {}", spread_word(i.high >= THROUGHPUT_GOAL))
            });
            // Where the time went: the servers' CPU per message in the same turns, against
            // the baseline's, and the twin's beside it.
            let cpu = match (
                cpu_ratio(series, "echo-server", label),
                cpu_ratio(series, TWIN, label),
            ) {
                (Some(e), Some(t)) => format!(
                    "; its CPU per message {e:.2}× raw-buf's in the same turns (the twin's {t:.2}×)"
                ),
                (Some(e), None) => {
                    format!("; its CPU per message {e:.2}× raw-buf's in the same turns")
                }
                _ => String::new(),
            };
            format!(
                "{label} {}{spread}{}{cpu}",
                with_interval(*r, THROUGHPUT_GOAL, interval),
                twin_ratio(label).map_or(String::new(), |t| twin_said(*r, t))
            )
        })
        .collect();
    let worst = ratios.iter().map(|(_, r)| *r).fold(f64::INFINITY, f64::min);
    let twins: Vec<f64> = ratios.iter().filter_map(|(l, _)| twin_ratio(l)).collect();
    let twins = span(&twins).map_or(String::new(), |s| format!("{TWIN_OVER_ROWS} {s}"));
    Some([
        format!(
            "Pipelined throughput ≥ {THROUGHPUT_GOAL}× the fair baseline (`raw-buf`), every size, 1 and 32 connections"
        ),
        format!("lowest {worst:.2}× over {} rows{twins}", ratios.len()),
        met_unless(&misses),
    ])
}

/// The one-in-flight latency goal's row: the highest ratios, the twin's spans, each miss.
fn latency_goal(
    criterion: &BTreeMap<String, CriterionBench>,
    series: &BTreeMap<String, SeriesRecord>,
) -> Option<[String; 3]> {
    let latency = pairs("latency", criterion, series);
    if latency.is_empty() {
        return None;
    }
    // The twin's median and p99 ÷ the baseline's, by label.
    let twin_latency = |label: &str| {
        let twin = numbers_of(&format!("echo/latency/{TWIN}/{label}"), criterion, series)?;
        let base = numbers_of(&format!("echo/latency/raw-buf/{label}"), criterion, series)?;
        Some((twin.p50 / base.p50, twin.p99 / base.p99))
    };
    let misses: Vec<String> = latency
        .iter()
        .filter(|(_, n, b)| n.p50 > LATENCY_GOAL * b.p50 || n.p99 > LATENCY_GOAL * b.p99)
        .map(|(label, n, b)| {
            let twin = twin_latency(label);
            let [p50, p99] =
                latency_intervals(&format!("echo/latency/echo-server/{label}"), series);
            let over = |r: f64, i: Option<Interval>, t: Option<f64>| {
                let mut text = with_interval(r, LATENCY_GOAL, i);
                if r > LATENCY_GOAL {
                    if let Some(i) = i {
                        let _ = write!(text, ", {}", spread_word(i.low <= LATENCY_GOAL));
                    }
                    if let Some(t) = t {
                        text.push_str(&twin_said(r, t));
                    }
                }
                text
            };
            format!(
                "{label} median {}, p99 {}",
                over(n.p50 / b.p50, p50, twin.map(|t| t.0)),
                over(n.p99 / b.p99, p99, twin.map(|t| t.1))
            )
        })
        .collect();
    let worst_p50 = latency
        .iter()
        .map(|(_, n, b)| n.p50 / b.p50)
        .fold(0.0, f64::max);
    let worst_p99 = latency
        .iter()
        .map(|(_, n, b)| n.p99 / b.p99)
        .fold(0.0, f64::max);
    let (medians, p99s): (Vec<f64>, Vec<f64>) = latency
        .iter()
        .filter_map(|(label, _, _)| twin_latency(label))
        .unzip();
    let twin_text = match (span(&medians), span(&p99s)) {
        (Some(m), Some(p)) => format!("{TWIN_OVER_ROWS} {m} (median), {p} (p99)"),
        _ => String::new(),
    };
    Some([
        format!(
            "One-in-flight latency: median and p99 ≤ {LATENCY_GOAL}× the fair baseline's, every size"
        ),
        format!(
            "highest {worst_p50:.2}× (median), {worst_p99:.2}× (p99) over {} rows{twin_text}",
            latency.len()
        ),
        met_unless(&misses),
    ])
}

/// The memory goal's row: the highest cost per idle connection over the message sizes.
fn memory_goal(memory: &[&MemoryRecord]) -> Option<[String; 3]> {
    if memory.is_empty() {
        return None;
    }
    let worst = memory
        .iter()
        .map(|m| m.bytes_per_connection)
        .fold(0.0, f64::max);
    Some([
        format!(
            "Memory: ≤ {:.0} KiB per idle connection at 1,000 connections, also after a 64 KiB frame",
            MEMORY_GOAL_BYTES / 1024.0
        ),
        format!(
            "highest {:.1} KiB ({})",
            worst / 1024.0,
            memory
                .iter()
                .map(|m| format!(
                    "{}: {:.1} KiB",
                    short(&m.id),
                    m.bytes_per_connection / 1024.0
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        if worst <= MEMORY_GOAL_BYTES {
            "met".to_owned()
        } else {
            format!("**NOT met**: {:.2}× the goal", worst / MEMORY_GOAL_BYTES)
        },
    ])
}

/// The fairness goal's row for one placement.
fn fairness_goal(f: &FairnessRecord) -> [String; 3] {
    let ratio = f.attacked.p99 / f.quiet.p99;
    [
        format!(
            "Fairness: a well-behaved client's p99 under the hostile-input attack ≤ {FAIRNESS_GOAL}× its quiet p99 ({})",
            f.placement
        ),
        format!(
            "{} quiet, {} under attack: {ratio:.2}×",
            fmt_ns(f.quiet.p99),
            fmt_ns(f.attacked.p99)
        ),
        if ratio <= FAIRNESS_GOAL {
            "met".to_owned()
        } else {
            let cause = f.less_own_wait.as_ref().map_or(String::new(), |w| {
                format!(
                    "; less the client's own wait for its CPU (run-queue delay, shared with \
                     the server): {} quiet, {} under attack, {:.2}×",
                    fmt_ns(w.quiet.p99),
                    fmt_ns(w.attacked.p99),
                    w.attacked.p99 / w.quiet.p99
                )
            });
            let baseline = f.baseline.as_ref().map_or(String::new(), |b| {
                format!(
                    "; the fair baseline, {}, under the same attack without its {}: {:.2}×, \
                     where echo-server over the same phases is {:.2}×",
                    b.server,
                    b.left_out,
                    b.attacked.p99 / b.quiet.p99,
                    b.echo_server_same_phases.p99 / f.quiet.p99
                )
            });
            format!(
                "**NOT met**: {:.2}× the goal{cause}{baseline}",
                ratio / FAIRNESS_GOAL
            )
        },
    ]
}

/// Messages per second (from the pipelined throughput's median) and the servers' CPU time
/// per message, for every size and connection count, every server side by side.
pub(crate) fn echo_rates(
    out: &mut String,
    criterion: &BTreeMap<String, CriterionBench>,
    series: &BTreeMap<String, SeriesRecord>,
) {
    let mut labels: Vec<(usize, usize, String)> = criterion
        .keys()
        .chain(series.keys())
        .filter_map(|id| {
            let (group, _, size, conns) = echo_parts(id)?;
            (group == "throughput").then(|| (size, conns, short(id).to_owned()))
        })
        .collect();
    labels.sort();
    labels.dedup();
    if labels.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "### Echo: messages per second and CPU time per message\n"
    );
    let _ = writeln!(
        out,
        "Pipelined, all connections at once. Messages/s: connections ÷ the median time per \
         iteration. CPU: the servers' runtime threads' CPU time (`/proc/self/task/*/schedstat`) \
         over each server's turn in each measured sample ÷ the messages it echoed, median over \
         the samples; all the servers share that runtime and take turns, in alternation. \
         The twin's column is the control: the same copier as `raw-buf`, so how far it reads \
         from 1 is how far two identical servers read apart in this run.\n"
    );
    let mut table = Table::aligned([("Messages", Align::Left)]);
    for server in ECHO_SERVERS {
        table.column(format!("{server} msg/s"), Align::Right);
    }
    for server in ECHO_SERVERS {
        table.column(format!("{server} CPU/msg"), Align::Right);
    }
    table
        .column("echo-server CPU/msg ÷ raw-buf's", Align::Right)
        .column("the twin's ÷ raw-buf's", Align::Right);
    for (_, conns, label) in labels {
        let mut row = vec![label.clone()];
        for server in ECHO_SERVERS {
            let id = format!("echo/throughput/{server}/{label}");
            row.push(
                numbers_of(&id, criterion, series)
                    .map_or("—".into(), |n| fmt_count(conns as f64 / (n.p50 / 1e9))),
            );
        }
        for server in ECHO_SERVERS {
            row.push(cpu_per_message(series, server, &label).map_or("—".into(), fmt_ns));
        }
        let ratio = |server: &str| {
            cpu_ratio(series, server, &label).map_or("—".into(), |r| format!("{r:.2}×"))
        };
        row.extend([ratio("echo-server"), ratio(TWIN)]);
        table.row(row);
    }
    let _ = writeln!(out, "{table}");
}

/// The median CPU time per message of `server`'s pipelined turns at `label`, in ns.
fn cpu_per_message(
    series: &BTreeMap<String, SeriesRecord>,
    server: &str,
    label: &str,
) -> Option<f64> {
    series
        .get(&format!("{CPU_PREFIX}{server}/{label}"))
        .and_then(|r| r.series.get(MEASURED))
        .map(|s| s.p50)
}

/// [`cpu_per_message`] of `server` ÷ the fair baseline's.
fn cpu_ratio(series: &BTreeMap<String, SeriesRecord>, server: &str, label: &str) -> Option<f64> {
    let base = cpu_per_message(series, "raw-buf", label).filter(|b| *b > 0.0)?;
    Some(cpu_per_message(series, server, label)? / base)
}

/// Where the per-sample ratios of throughput row `id` are recorded: echo-server's
/// ([`PAIRED_PREFIX`]) or the twin's ([`TWIN_PREFIX`]); none for other rows.
pub(crate) fn paired_id(id: &str) -> Option<String> {
    let (group, server, _, _) = echo_parts(id)?;
    let prefix = match (group, server) {
        ("throughput", "echo-server") => PAIRED_PREFIX,
        ("throughput", TWIN) => TWIN_PREFIX,
        _ => return None,
    };
    Some(format!("{prefix}{}", short(id)))
}

/// For throughput row `id` (echo-server's or the twin's), the per-sample ratios `raw-buf`'s
/// time ÷ its own, when the bench recorded them.
pub(crate) fn paired_ratio(id: &str, series: &BTreeMap<String, SeriesRecord>) -> Option<Summary> {
    series
        .get(&paired_id(id)?)
        .and_then(|r| r.series.get(MEASURED))
        .copied()
}

/// The 95 % interval of [`paired_ratio`]'s median, when the bench recorded one.
pub(crate) fn paired_interval(
    id: &str,
    series: &BTreeMap<String, SeriesRecord>,
) -> Option<Interval> {
    series
        .get(&paired_id(id)?)
        .and_then(|r| r.intervals.get(MEDIAN_INTERVAL))
        .copied()
}

/// The 95 % intervals of echo-server's latency median and p99 ÷ the fair baseline's
/// ([`LATENCY_INTERVALS`]), when the bench recorded them.
pub(crate) fn latency_intervals(
    id: &str,
    series: &BTreeMap<String, SeriesRecord>,
) -> [Option<Interval>; 2] {
    LATENCY_INTERVALS.map(|(what, _)| series.get(id).and_then(|r| r.intervals.get(what)).copied())
}

/// What the twin read beside a miss of ratio `r`: ` — the twin 0.93×, as far from 1` when the
/// twin (the same code as the baseline) is at least as far from 1 as `r` (this run cannot
/// tell echo-server from a copy of the baseline), else ` — the twin 0.99×`.
pub(crate) fn twin_said(r: f64, twin: f64) -> String {
    let as_far = if (1.0 - twin).abs() >= (1.0 - r).abs() {
        ", as far from 1"
    } else {
        ""
    };
    format!(" — the twin {twin:.2}×{as_far}")
}

/// How the goals table introduces the twin's ratios over the rows.
pub(crate) const TWIN_OVER_ROWS: &str = "; the twin (`raw-buf` against itself)";
