//! How the report words its judgements: ratios (next to their goal, with their interval),
//! spans, and the words of a verdict. Tables and number formatters are `lab-report`'s.

use crate::spread::Interval;

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
}
