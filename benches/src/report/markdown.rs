//! How the report writes: the one markdown table writer ([`Table`]), the one duration
//! formatter ([`fmt_ns`]), rates, counts, ratios, and the words of a verdict.

use std::fmt;

use crate::spread::Interval;

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text: left (markdown's default).
    Left,
    /// Numbers: right.
    Right,
}

/// A markdown table: a header line, a rule that sets each column's alignment, one line per
/// row. Rendered by [`fmt::Display`], every line ending in a newline.
///
/// ```
/// use benches::report::{Align, Table};
/// let mut t = Table::new([("Interval", Align::Left), ("n", Align::Right)]);
/// t.row(["measured", "3"]);
/// assert_eq!(t.to_string(), "| Interval | n |\n|---|---:|\n| measured | 3 |\n");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns (header text and alignment), no rows yet.
    pub fn new<S: Into<String>>(columns: impl IntoIterator<Item = (S, Align)>) -> Table {
        let (header, align) = columns.into_iter().map(|(h, a)| (h.into(), a)).unzip();
        Table {
            header,
            align,
            rows: Vec::new(),
        }
    }

    /// Add a column at the right (header text and alignment).
    pub fn column(&mut self, header: impl Into<String>, align: Align) -> &mut Table {
        self.header.push(header.into());
        self.align.push(align);
        self
    }

    /// Add a row: one cell per column.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Table {
        self.rows.push(cells.into_iter().map(Into::into).collect());
        self
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// `| a | b |`: an empty cell is written `| |`.
fn line(f: &mut fmt::Formatter<'_>, cells: &[String]) -> fmt::Result {
    f.write_str("|")?;
    for cell in cells {
        if cell.is_empty() {
            f.write_str(" |")?;
        } else {
            write!(f, " {cell} |")?;
        }
    }
    f.write_str("\n")
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        line(f, &self.header)?;
        f.write_str("|")?;
        for align in &self.align {
            f.write_str(match align {
                Align::Left => "---|",
                Align::Right => "---:|",
            })?;
        }
        f.write_str("\n")?;
        for row in &self.rows {
            line(f, row)?;
        }
        Ok(())
    }
}

/// `812 ns`, `12.3 µs`, `1.23 ms`, `1.234 s` (signed).
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

/// A ratio to one decimal, or two below 1 (`0.03×` must not print as `0.0×`).
pub(crate) fn fmt_ratio(r: f64) -> String {
    if r >= 1.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

/// A ratio with its 95 % interval, if known: `0.94× (95 %: 0.90–0.99)`; the ratio as
/// [`near_goal`] prints it.
pub(crate) fn with_interval(ratio: f64, goal: f64, interval: Option<Interval>) -> String {
    let ratio = near_goal(ratio, goal);
    match interval {
        Some(i) => format!("{ratio}× (95 %: {:.2}–{:.2})", i.low, i.high),
        None => format!("{ratio}×"),
    }
}

/// A ratio to two decimals, or as many more (up to four) as it takes not to print the goal
/// itself (0.947 against 0.95: a miss must not read as the goal).
pub(crate) fn near_goal(ratio: f64, goal: f64) -> String {
    for places in 2..4 {
        let shown = format!("{ratio:.places$}");
        if ratio == goal || shown != format!("{goal:.places$}") {
            return shown;
        }
    }
    format!("{ratio:.4}")
}

pub(crate) fn verdict(ok: bool) -> String {
    if ok {
        "met".into()
    } else {
        "**NOT met**".into()
    }
}

/// How a missed goal reads: whether this run's own spread reaches the goal (then the run
/// cannot tell the miss from the noise) or not (a real difference).
pub(crate) fn miss(reaches_goal: bool) -> String {
    let why = if reaches_goal {
        " (the 95 % interval reaches the goal)"
    } else {
        ""
    };
    format!("**NOT met**, {}{why}", spread_word(reaches_goal))
}

/// Whether a miss lies within the run's own spread (its 95 % interval reaches the goal).
pub(crate) fn spread_word(reaches_goal: bool) -> &'static str {
    if reaches_goal {
        "within this run's spread"
    } else {
        "beyond this run's spread"
    }
}

/// The lowest and highest of `ratios` (`0.93–1.04×`), none if there are none.
pub(crate) fn span(ratios: &[f64]) -> Option<String> {
    let low = ratios.iter().copied().reduce(f64::min)?;
    let high = ratios.iter().copied().reduce(f64::max)?;
    Some(format!("{low:.2}–{high:.2}×"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_next_to_its_goal_is_not_shown_as_the_goal() {
        assert_eq!(near_goal(0.9467, 0.95), "0.947");
        assert_eq!(near_goal(1.0504, 1.05), "1.0504");
        assert_eq!(near_goal(0.94, 0.95), "0.94");
        assert_eq!(near_goal(0.95, 0.95), "0.95");
        assert_eq!(near_goal(1.07, 1.05), "1.07");
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_ns(812.0), "812 ns");
        assert_eq!(fmt_ns(12_345.0), "12.3 µs");
        assert_eq!(fmt_ns(-1_234_567.0), "-1.23 ms");
        assert_eq!(fmt_ns(2.5e9), "2.500 s");
        assert_eq!(fmt_rate(2.0 * 1073741824.0), "2.00 GiB/s");
        assert_eq!(fmt_rate(50.0 * 1048576.0), "50 MiB/s");
    }

    #[test]
    fn a_table_is_a_header_a_rule_and_its_rows() {
        let mut t = Table::new([("", Align::Left), ("", Align::Left)]);
        t.row(["CPUs", "2"]).row(["OS", "Linux"]);
        assert_eq!(
            t.to_string(),
            "| | |\n|---|---|\n| CPUs | 2 |\n| OS | Linux |\n"
        );
        let mut t = Table::new([("a", Align::Left)]);
        assert!(t.is_empty());
        t.column("n", Align::Right).row(["x", "1"]);
        assert_eq!(t.to_string(), "| a | n |\n|---|---:|\n| x | 1 |\n");
    }
}
