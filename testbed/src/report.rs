//! Everything a report is made of, free of any experiment's types: the header every markdown
//! report starts with ([`Header`]: machine, date, Consul version, command line), the one
//! markdown table writer ([`Table`]), the one JSON writer ([`write_json`]), the one SVG writer
//! ([`Plot`]), the one date formatter ([`rfc3339`]), the one duration formatters ([`ms`],
//! [`secs`], [`secs_or`], [`secs_or_ms`], [`ms_from`], [`secs_since`], [`ms_serde`]) and the one percentile rule ([`percentile`]).

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

/// The `p`-th percentile (0 to 100) of `values` (in any order), interpolating linearly
/// between the two closest ranks: with the values sorted, rank `r = p / 100 × (n − 1)` lies
/// between index `⌊r⌋` and the next, and the percentile is the value at `⌊r⌋` plus the
/// fraction `r − ⌊r⌋` of the way to the next (numpy's default, and benches' rule). `None`
/// when there are no values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    Some(sorted[below] + (sorted[above] - sorted[below]) * (rank - below as f64))
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
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
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

    /// Add a note below the table.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The table in GitHub markdown (`|` in cells escaped), with its caption and notes.
    pub fn markdown(&self) -> String {
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        let mut out = String::new();
        if !self.caption.is_empty() {
            let _ = writeln!(out, "**{}**\n", self.caption);
        }
        let line = |cells: &mut dyn Iterator<Item = String>| {
            format!("| {} |\n", cells.collect::<Vec<_>>().join(" | "))
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
            "**Cap**\n\n| a | b\\|c |\n|---|---:|\n| x | 1 |\n| y\\|z |  |\n\n- a note\n"
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
