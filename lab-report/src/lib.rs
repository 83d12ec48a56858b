//! Everything a report is made of, for testbed and benches alike and free of either's types:
//! the header every markdown report starts with ([`Header`]: machine, date, Consul version,
//! command line; [`Machine`] for the long form), the one markdown table writer ([`Table`]),
//! the one JSON writer ([`write_json`]), the one SVG writer ([`Plot`]), the one date formatter
//! ([`rfc3339`], [`utc_minute`]), the one duration formatters ([`ms`], [`secs`], [`secs_or`],
//! [`secs_or_ms`], [`ms_from`], [`secs_since`], [`ms_serde`], [`fmt_ns`]) and the one
//! percentile rule ([`select_percentile`]).
//!
//! **The percentile rule**, the one every median, p90, p99 and interval end of every report
//! follows: with the `n` values in ascending order (indices 0 to `n − 1`), the `p`-th
//! percentile's rank is `r = p / 100 × (n − 1)`, and the percentile is the value at index
//! `⌊r⌋` plus the fraction `r − ⌊r⌋` of the way to the value at index `⌊r⌋ + 1` — linear
//! interpolation between the two closest ranks (numpy's default, Hyndman and Fan's type 7).

use std::{
    fmt::Write as _,
    io,
    path::Path,
    time::{Duration, SystemTime},
};

use plotters::prelude::*;
use serde::Serialize;

// === dates and durations ===

/// `SystemTime` as RFC 3339 UTC with seconds, e.g. `2026-11-25T13:32:04Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2025-03-14 09:26 UTC` for Unix milliseconds: [`rfc3339`]'s date and minute.
pub fn utc_minute(unix_ms: u64) -> String {
    let full = rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(unix_ms));
    format!("{} {} UTC", &full[..10], &full[11..16])
}

/// `d` in milliseconds, as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `later - earlier` in milliseconds; 0 when `later` is earlier.
pub fn ms_between(earlier: SystemTime, later: SystemTime) -> f64 {
    later.duration_since(earlier).map_or(0.0, ms)
}

/// Milliseconds from `from` to `to` (std or tokio instants); 0 when `to` is earlier.
pub fn ms_from(from: impl Into<std::time::Instant>, to: impl Into<std::time::Instant>) -> f64 {
    ms(to.into().saturating_duration_since(from.into()))
}

/// Seconds from `since` to `t`, negative when `t` is earlier (a timeline's offset).
pub fn secs_since(t: SystemTime, since: SystemTime) -> f64 {
    match t.duration_since(since) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Milliseconds with `decimals` decimals, for a table: `12.5 ms`; `–` for `None`.
pub fn ms_text(ms: Option<f64>, decimals: usize) -> String {
    ms.map_or_else(|| "–".into(), |ms| format!("{ms:.decimals$} ms"))
}

/// `d` as seconds with two decimals, for a table: `1.25 s`.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// [`secs`] of `Some(d)`, `never` (the caller's word) of `None`.
pub fn secs_or(d: Option<Duration>, never: &str) -> String {
    d.map(secs).unwrap_or_else(|| never.to_owned())
}

/// [`secs_or`] of a figure kept in milliseconds.
pub fn secs_or_ms(ms: Option<f64>, never: &str) -> String {
    secs_or(ms.map(|m| Duration::from_secs_f64(m.max(0.0) / 1e3)), never)
}

/// `812 ns`, `12.3 µs`, `1.23 ms`, `1.234 s` (signed): nanoseconds in the unit that reads.
pub fn fmt_ns(ns: f64) -> String {
    let sign = if ns < 0.0 { "-" } else { "" };
    let a = ns.abs();
    let body = if a < 1e3 {
        format!("{a:.0} ns")
    } else if a < 1e6 {
        format!("{:.1} µs", a / 1e3)
    } else if a < 1e9 {
        format!("{:.2} ms", a / 1e6)
    } else {
        format!("{:.3} s", a / 1e9)
    };
    format!("{sign}{body}")
}

/// `123 MiB/s`, `1.23 GiB/s`.
pub fn fmt_rate(bytes_per_s: f64) -> String {
    let mib = bytes_per_s / (1u64 << 20) as f64;
    if mib >= 1024.0 {
        format!("{:.2} GiB/s", mib / 1024.0)
    } else if mib >= 10.0 {
        format!("{mib:.0} MiB/s")
    } else {
        format!("{mib:.2} MiB/s")
    }
}

/// `950`, `12.3 k`, `4.56 M`.
pub fn fmt_count(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// Serialize durations as milliseconds (`#[serde(with = "report::ms_serde")]`, and
/// `report::ms_serde::opt` for an `Option<Duration>`).
pub mod ms_serde {
    use std::time::Duration;

    use serde::Serializer;

    /// A duration as its milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(super::ms(*d))
    }

    /// An optional duration as its milliseconds.
    pub mod opt {
        use super::*;

        /// `Some(d)` as its milliseconds, `None` as null.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&super::super::ms(*d)),
                None => s.serialize_none(),
            }
        }
    }
}

// === statistics ===

/// The `p`-th percentile (`p` from 0 to 100, clamped) of `values`, by the one rule (the
/// crate's doc): `r = p / 100 × (n − 1)`, the value at index `⌊r⌋` of the ascending values
/// plus the fraction `r − ⌊r⌋` of the way to the next. So the median of an even count is the
/// mean of the middle two, p0 is the smallest value and p100 the largest.
///
/// Found by selection, not a sort (a bootstrap takes thousands), so `values` is reordered;
/// values compare by [`f64::total_cmp`] (callers drop non-finite ones, or use
/// [`percentile`]). `None` for no values.
pub fn select_percentile(values: &mut [f64], p: f64) -> Option<f64> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
    let below = rank.floor() as usize;
    let frac = rank - below as f64;
    let (_, at, above) = values.select_nth_unstable_by(below, f64::total_cmp);
    let low = *at;
    let high = above.iter().copied().min_by(f64::total_cmp).unwrap_or(low);
    Some(low + (high - low) * frac)
}

/// [`select_percentile`] of `values` (in any order, left as they are) without their NaNs.
/// `None` when there are no values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut copy: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    select_percentile(&mut copy, p)
}

/// [`percentile`] of durations.
pub fn percentile_of(durations: &[Duration], p: f64) -> Option<Duration> {
    let nanos: Vec<f64> = durations.iter().map(|d| d.as_nanos() as f64).collect();
    percentile(&nanos, p).map(|n| Duration::from_nanos(n.round() as u64))
}

// === the header ===

/// What every markdown report starts with: where, when, against what and by which command it
/// was produced.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    /// The report's title.
    pub title: String,
    /// CPU model and core count (from `/proc/cpuinfo`).
    pub machine: String,
    /// When the run began, RFC 3339 UTC.
    pub date: String,
    /// The Consul version the run talked to.
    pub consul: String,
    /// The exact command line that produced the report.
    pub command: String,
}

impl Header {
    /// The header as markdown: a title, then one line each.
    pub fn markdown(&self) -> String {
        format!(
            "## {}\n\n- Machine: {}\n- Date: {}\n- Consul: {}\n- Command: `{}`\n\n",
            self.title, self.machine, self.date, self.consul, self.command
        )
    }
}

/// This machine's CPU model and core count, e.g. `AMD EPYC 7B13, 2 cores`; `unknown CPU` parts
/// where `/proc/cpuinfo` does not say.
pub fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    machine_of(&info)
}

fn machine_of(cpuinfo: &str) -> String {
    let model = field(cpuinfo, "model name").unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
        .count();
    let cores = if cores == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        cores
    };
    format!("{model}, {cores} cores")
}

/// The value of the first `key: value` or `key=value` line of `text` (quotes trimmed).
fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once([':', '='])?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// The machine a report is written on, in full (the long form of [`machine`]).
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPUs available to this process; 0 if unknown.
    pub cpus: usize,
    /// `model name` from `/proc/cpuinfo`, or `unknown`.
    pub cpu_model: String,
    /// The kernel release, from `/proc/sys/kernel/osrelease`.
    pub kernel: String,
    /// `PRETTY_NAME` from `/etc/os-release`, or `unknown`.
    pub os: String,
    /// Total memory, for example `7.8 GiB`, or `unknown`.
    pub memory: String,
}

impl Machine {
    /// This machine, from `/proc` and `/etc/os-release`.
    pub fn this() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let unknown = |v: Option<String>| v.unwrap_or_else(|| "unknown".into());
        let mem_kib: Option<u64> = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: unknown(field(&read("/proc/cpuinfo"), "model name")),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            os: unknown(field(&read("/etc/os-release"), "PRETTY_NAME")),
            memory: mem_kib.map_or("unknown".into(), |k| {
                format!("{:.1} GiB", k as f64 / 1048576.0)
            }),
        }
    }
}

/// The command line of this process as a person typed it: `cargo run -p testbed --
/// deregistration --seed` when cargo ran it (cargo sets `CARGO` and `CARGO_PKG_NAME`),
/// else the program's name and its arguments.
pub fn command_line() -> String {
    let mut args = std::env::args();
    let program = args.next().unwrap_or_default();
    let cargo = std::env::var("CARGO_PKG_NAME")
        .ok()
        .filter(|_| std::env::var_os("CARGO").is_some());
    let program = match cargo {
        Some(package) if program.contains("/release/") => {
            format!("cargo run --release -p {package} --")
        }
        Some(package) => format!("cargo run -p {package} --"),
        None => Path::new(&program)
            .file_name()
            .map_or(program.clone(), |n| n.to_string_lossy().into_owned()),
    };
    std::iter::once(program)
        .chain(args.map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

// === tables ===

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Figures.
    Right,
}

/// A markdown table: a caption, a header row, rows of cells and notes below; every table of
/// every report goes through [`Table::markdown`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct Table {
    /// A bold line above the table (none when empty).
    pub caption: String,
    /// The header row.
    pub columns: Vec<String>,
    /// Right-aligned columns (figures).
    #[serde(skip)]
    pub right: Vec<bool>,
    /// The rows, each as many cells as columns.
    pub rows: Vec<Vec<String>>,
    /// Lines below the table (each becomes a list item).
    pub notes: Vec<String>,
}

impl Table {
    /// A table with these columns, left-aligned (text).
    pub fn new<S: Into<String>>(columns: impl IntoIterator<Item = S>) -> Table {
        let columns: Vec<String> = columns.into_iter().map(Into::into).collect();
        Table {
            right: vec![false; columns.len()],
            columns,
            ..Table::default()
        }
    }

    /// The two-column table of `(figure, value)` pairs.
    pub fn figures(pairs: impl IntoIterator<Item = (String, String)>) -> Table {
        let mut t = Table::new(["figure", "value"]);
        for (k, v) in pairs {
            t.push([k, v]);
        }
        t
    }

    /// The same table, with a caption.
    pub fn caption(mut self, caption: impl Into<String>) -> Table {
        self.caption = caption.into();
        self
    }

    /// The same table, the columns at `indexes` right-aligned (figures).
    pub fn align_right(mut self, indexes: impl IntoIterator<Item = usize>) -> Table {
        for i in indexes {
            if let Some(r) = self.right.get_mut(i) {
                *r = true;
            }
        }
        self
    }

    /// Add a row (cells beyond the columns are dropped, missing ones left empty).
    pub fn push<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.columns.len(), String::new());
        self.rows.push(row);
    }

    /// A table with these columns (header text and alignment), no rows yet.
    ///
    /// ```
    /// use lab_report::{Align, Table};
    /// let mut t = Table::aligned([("Interval", Align::Left), ("n", Align::Right)]);
    /// t.row(["measured", "3"]);
    /// assert_eq!(t.to_string(), "| Interval | n |\n|---|---:|\n| measured | 3 |\n");
    /// ```
    pub fn aligned<S: Into<String>>(columns: impl IntoIterator<Item = (S, Align)>) -> Table {
        let mut t = Table::default();
        for (header, align) in columns {
            t.column(header, align);
        }
        t
    }

    /// Add a column at the right (header text and alignment).
    pub fn column(&mut self, header: impl Into<String>, align: Align) -> &mut Table {
        self.columns.push(header.into());
        self.right.push(align == Align::Right);
        self
    }

    /// Add a row, as [`Table::push`] does, and return the table for the next.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Table {
        self.push(cells);
        self
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Add a note below the table.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The table in GitHub markdown (`|` in cells escaped; an empty cell written `| |`), with
    /// its caption and notes.
    pub fn markdown(&self) -> String {
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        let mut out = String::new();
        if !self.caption.is_empty() {
            let _ = writeln!(out, "**{}**\n", self.caption);
        }
        let line = |cells: &mut dyn Iterator<Item = String>| {
            let mut l = String::from("|");
            for c in cells {
                let _ = if c.is_empty() {
                    write!(l, " |")
                } else {
                    write!(l, " {c} |")
                };
            }
            l.push('\n');
            l
        };
        out.push_str(&line(&mut self.columns.iter().map(|c| cell(c))));
        out.push_str(&format!(
            "|{}|\n",
            self.right
                .iter()
                .map(|&r| if r { "---:" } else { "---" })
                .collect::<Vec<_>>()
                .join("|")
        ));
        for row in &self.rows {
            out.push_str(&line(&mut row.iter().map(|c| cell(c))));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.markdown())
    }
}

// === JSON ===

/// Write `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
    std::fs::write(path, text)
}

// === plots ===

/// An axis of a [`Plot`].
#[derive(Debug, Clone, Default)]
pub struct Axis {
    /// What it measures.
    pub label: String,
    /// Its range (`None`: from the data, with a margin).
    pub range: Option<(f64, f64)>,
    /// Logarithmic (values ≤ 0 are left out).
    pub log: bool,
    /// Names of the integer positions 0, 1, … (categories), instead of numbers.
    pub categories: Vec<String>,
}

impl Axis {
    /// A linear axis.
    pub fn linear(label: impl Into<String>) -> Axis {
        Axis {
            label: label.into(),
            ..Axis::default()
        }
    }

    /// A logarithmic axis.
    pub fn log(label: impl Into<String>) -> Axis {
        Axis {
            log: true,
            ..Axis::linear(label)
        }
    }

    /// An axis of named positions 0, 1, ….
    pub fn categories(label: impl Into<String>, names: Vec<String>) -> Axis {
        let n = names.len() as f64;
        Axis {
            range: Some((-0.5, n - 0.5)),
            categories: names,
            ..Axis::linear(label)
        }
    }

    /// The same axis with a fixed range.
    pub fn range(mut self, lo: f64, hi: f64) -> Axis {
        self.range = Some((lo, hi));
        self
    }

    fn at(&self, v: f64) -> Option<f64> {
        if self.log {
            (v > 0.0).then(|| v.log10())
        } else {
            Some(v)
        }
    }

    /// The drawn range: the given one, or the data's with a margin.
    fn span(&self, values: impl Iterator<Item = f64>) -> (f64, f64) {
        if let Some((lo, hi)) = self.range {
            return (self.at(lo).unwrap_or(0.0), self.at(hi).unwrap_or(1.0));
        }
        let (lo, hi) = values
            .filter_map(|v| self.at(v))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if !lo.is_finite() {
            return (0.0, 1.0);
        }
        let pad = if hi > lo { (hi - lo) * 0.08 } else { 1.0 };
        let lo = if !self.log && lo >= 0.0 {
            0.0
        } else {
            lo - pad
        };
        (lo, hi + pad)
    }

    fn tick(&self, v: f64) -> String {
        if !self.categories.is_empty() {
            let i = v.round();
            return if (v - i).abs() < 0.01 && i >= 0.0 && (i as usize) < self.categories.len() {
                self.categories[i as usize].clone()
            } else {
                String::new()
            };
        }
        let v = if self.log { 10f64.powf(v) } else { v };
        if v.abs() >= 100.0 || (v - v.round()).abs() < 1e-9 {
            format!("{v:.0}")
        } else if v.abs() >= 1.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.3}")
        }
    }
}

/// A box's corners, or a segment's ends.
pub type Span = ((f64, f64), (f64, f64));

/// How a [`Series`] is drawn.
#[derive(Debug, Clone)]
pub enum Mark {
    /// Filled dots.
    Dots(Vec<(f64, f64)>),
    /// Filled triangles.
    Triangles(Vec<(f64, f64)>),
    /// A line through the points, with dots on them.
    Line(Vec<(f64, f64)>),
    /// A line through the points, faded, with triangles on them.
    FadedLine(Vec<(f64, f64)>),
    /// A step line: each value holds until the next point's x.
    Steps(Vec<(f64, f64)>),
    /// Filled boxes from one corner to the other.
    Boxes(Vec<Span>),
    /// Straight segments from one end to the other.
    Segments(Vec<Span>),
}

impl Mark {
    fn points(&self) -> Vec<(f64, f64)> {
        match self {
            Mark::Dots(p)
            | Mark::Triangles(p)
            | Mark::Line(p)
            | Mark::FadedLine(p)
            | Mark::Steps(p) => p.clone(),
            Mark::Boxes(b) | Mark::Segments(b) => b.iter().flat_map(|(a, b)| [*a, *b]).collect(),
        }
    }
}

/// One thing drawn, with its legend.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its legend (none when empty).
    pub label: String,
    /// Its colour, as RGB.
    pub color: (u8, u8, u8),
    /// What is drawn.
    pub mark: Mark,
}

/// The colours of successive series.
pub const PALETTE: [(u8, u8, u8); 6] = [
    (31, 90, 200),
    (200, 40, 40),
    (30, 150, 60),
    (170, 40, 170),
    (20, 20, 20),
    (230, 140, 20),
];

/// A plot: two axes and the series drawn on them; [`Plot::svg`] is the one SVG writer.
#[derive(Debug, Clone)]
pub struct Plot {
    /// Its caption.
    pub title: String,
    /// The horizontal axis.
    pub x: Axis,
    /// The vertical axis.
    pub y: Axis,
    /// What is drawn, in order (later on top).
    pub series: Vec<Series>,
}

impl Plot {
    /// Draw the plot as an SVG file at `path`.
    pub fn svg(&self, path: &Path) -> io::Result<()> {
        let err = |e: &dyn std::fmt::Display| io::Error::other(format!("cannot draw: {e}"));
        let points: Vec<(f64, f64)> = self.series.iter().flat_map(|s| s.mark.points()).collect();
        let (x0, x1) = self.x.span(points.iter().map(|p| p.0));
        let (y0, y1) = self.y.span(points.iter().map(|p| p.1));
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        let x_tick = |v: &f64| self.x.tick(*v);
        let y_tick = |v: &f64| self.y.tick(*v);
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(&self.x.label)
            .y_desc(&self.y.label)
            .x_label_formatter(&x_tick)
            .y_label_formatter(&y_tick);
        if !self.x.categories.is_empty() {
            mesh.x_labels(self.x.categories.len()).disable_x_mesh();
        }
        if !self.y.categories.is_empty() {
            mesh.y_labels(self.y.categories.len()).disable_y_mesh();
        }
        mesh.draw().map_err(|e| err(&e))?;
        let mut labelled = false;
        for s in &self.series {
            let color = RGBColor(s.color.0, s.color.1, s.color.2);
            let to = |p: &(f64, f64)| Some((self.x.at(p.0)?, self.y.at(p.1)?));
            let pts = |p: &[(f64, f64)]| p.iter().filter_map(to).collect::<Vec<_>>();
            let pair = |(a, b): &((f64, f64), (f64, f64))| Some((to(a)?, to(b)?));
            let drawn = match &s.mark {
                Mark::Dots(p) => chart.draw_series(
                    pts(p)
                        .into_iter()
                        .map(|p| Circle::new(p, 5, color.filled()).into_dyn()),
                ),
                Mark::Triangles(p) => chart.draw_series(
                    pts(p)
                        .into_iter()
                        .map(|p| TriangleMarker::new(p, 5, color.filled()).into_dyn()),
                ),
                Mark::Line(p) | Mark::FadedLine(p) => {
                    let faded = matches!(s.mark, Mark::FadedLine(_));
                    let style = if faded {
                        color.mix(0.5).stroke_width(2)
                    } else {
                        color.stroke_width(2)
                    };
                    chart
                        .draw_series(std::iter::once(PathElement::new(pts(p), style).into_dyn()))
                        .map_err(|e| err(&e))?;
                    chart.draw_series(pts(p).into_iter().map(|p| {
                        if faded {
                            TriangleMarker::new(p, 5, color.filled()).into_dyn()
                        } else {
                            Circle::new(p, 4, color.filled()).into_dyn()
                        }
                    }))
                }
                Mark::Steps(p) => {
                    let p = pts(p);
                    let mut path = Vec::with_capacity(p.len() * 2);
                    for (i, &(x, y)) in p.iter().enumerate() {
                        if i > 0 {
                            path.push((x, p[i - 1].1));
                        }
                        path.push((x, y));
                    }
                    chart.draw_series(std::iter::once(
                        PathElement::new(path, color.stroke_width(2)).into_dyn(),
                    ))
                }
                Mark::Boxes(b) => chart.draw_series(
                    b.iter()
                        .filter_map(pair)
                        .map(|(a, b)| Rectangle::new([a, b], color.mix(0.6).filled()).into_dyn()),
                ),
                Mark::Segments(b) => {
                    chart.draw_series(b.iter().filter_map(pair).map(|(a, b)| {
                        PathElement::new(vec![a, b], color.stroke_width(2)).into_dyn()
                    }))
                }
            }
            .map_err(|e| err(&e))?;
            if !s.label.is_empty() {
                labelled = true;
                drawn.label(&s.label).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 4), (x + 14, y + 4)], color.filled())
                });
            }
        }
        if labelled {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_613_524)),
            "2026-11-25T13:32:04Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn percentiles_interpolate_between_closest_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.5));
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.5));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(
            percentile_of(
                &[Duration::from_millis(10), Duration::from_millis(20)],
                50.0
            ),
            Some(Duration::from_millis(15))
        );
    }

    #[test]
    fn the_order_of_the_values_does_not_matter() {
        let values: Vec<f64> = (0..1001).map(|i| f64::from((i * 7919) % 1001)).collect();
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        for p in [0.0, 2.5, 50.0, 99.0, 99.9, 100.0] {
            let mut v = values.clone();
            // Sorted, the 1001 values 0..=1000 have the rank p/100 × 1000 as their value.
            assert!(
                (select_percentile(&mut v, p).unwrap() - p * 10.0).abs() < 1e-9,
                "p{p}"
            );
            assert_eq!(
                select_percentile(&mut v, p),
                select_percentile(&mut sorted.clone(), p),
                "p{p}"
            );
        }
    }

    #[test]
    fn selection_interpolates_between_ranks() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(select_percentile(&mut v, 50.0), Some(50.5));
        assert!((select_percentile(&mut v, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(select_percentile(&mut v, 100.0), Some(100.0));
        assert_eq!(select_percentile(&mut v, 0.0), Some(1.0));
        assert_eq!(select_percentile(&mut [7.0], 99.0), Some(7.0));
        assert_eq!(select_percentile(&mut [], 50.0), None);
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_minute(0), "1970-01-01 00:00 UTC");
        assert_eq!(
            utc_minute(951_782_400_000 + 3_660_000),
            "2000-02-29 01:01 UTC"
        );
        assert_eq!(utc_minute(1_735_689_599_000), "2024-12-31 23:59 UTC");
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    #[test]
    fn nanoseconds_and_rates_read_in_their_unit() {
        assert_eq!(fmt_ns(812.0), "812 ns");
        assert_eq!(fmt_ns(12_345.0), "12.3 µs");
        assert_eq!(fmt_ns(-1_234_567.0), "-1.23 ms");
        assert_eq!(fmt_ns(2.5e9), "2.500 s");
        assert_eq!(fmt_rate(2.0 * 1073741824.0), "2.00 GiB/s");
        assert_eq!(fmt_rate(50.0 * 1048576.0), "50 MiB/s");
        assert_eq!(fmt_count(950.0), "950");
        assert_eq!(fmt_count(12_345.0), "12.3 k");
        assert_eq!(fmt_count(4_560_000.0), "4.56 M");
    }

    #[test]
    fn a_table_is_a_header_a_rule_and_its_rows() {
        let mut t = Table::aligned([("", Align::Left), ("", Align::Left)]);
        t.row(["CPUs", "2"]).row(["OS", "Linux"]);
        assert_eq!(
            t.to_string(),
            "| | |\n|---|---|\n| CPUs | 2 |\n| OS | Linux |\n"
        );
        let mut t = Table::aligned([("a", Align::Left)]);
        assert!(t.is_empty());
        t.column("n", Align::Right).row(["x", "1"]);
        assert_eq!(t.to_string(), "| a | n |\n|---|---:|\n| x | 1 |\n");
    }

    #[test]
    fn durations_read_as_a_person_writes_them() {
        assert_eq!(ms_text(Some(12.345), 1), "12.3 ms");
        assert_eq!(ms_text(None, 2), "–");
        assert_eq!(secs(Duration::from_millis(1250)), "1.25 s");
        assert_eq!(secs_or(None, "never"), "never");
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
    }

    #[test]
    fn tables_escape_align_and_note() {
        let mut t = Table::new(["a", "b|c"]).caption("Cap").align_right([1]);
        t.push(["x", "1"]);
        t.push(["y|z"]);
        t.note("a note");
        assert_eq!(
            t.markdown(),
            "**Cap**\n\n| a | b\\|c |\n|---|---:|\n| x | 1 |\n| y\\|z | |\n\n- a note\n"
        );
        let f = Table::figures([("k".to_owned(), "v".to_owned())]);
        assert_eq!(f.markdown(), "| figure | value |\n|---|---|\n| k | v |\n");
    }

    #[test]
    fn the_machine_is_named_from_cpuinfo() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(machine_of(info), "AMD EPYC 7B13, 2 cores");
        assert!(machine_of("").starts_with("unknown CPU, "));
        let h = Header {
            title: "t".into(),
            machine: "m".into(),
            date: "d".into(),
            consul: "1.8.7".into(),
            command: "testbed smoke".into(),
        };
        assert!(h.markdown().contains("- Command: `testbed smoke`"));
    }

    #[test]
    fn plots_are_written_as_svg() {
        let dir = std::env::temp_dir().join(format!("testbed-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.svg");
        let plot = Plot {
            title: "t".into(),
            x: Axis::categories("setting", vec!["30s".into(), "1m30s".into()]),
            y: Axis::log("ms"),
            series: vec![
                Series {
                    label: "window".into(),
                    color: PALETTE[0],
                    mark: Mark::Boxes(vec![((-0.3, 60.0), (0.3, 90.0))]),
                },
                Series {
                    label: "measured".into(),
                    color: PALETTE[1],
                    mark: Mark::Dots(vec![(0.0, 81.0), (1.0, 100.0)]),
                },
                Series {
                    label: String::new(),
                    color: PALETTE[2],
                    mark: Mark::Steps(vec![(0.0, 1.0), (1.0, 2.0)]),
                },
            ],
        };
        plot.svg(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("<circle"), "points are drawn");
        assert!(svg.contains("1m30s"), "categories label the axis");
        std::fs::remove_dir_all(&dir).unwrap();
        let x = Axis::linear("x");
        let ticks: Vec<String> = [0.0, 2.0, 0.5, 12.25, 250.0].map(|v| x.tick(v)).into();
        assert_eq!(ticks, ["0", "2", "0.500", "12.2", "250"]);
    }
}
