//! How far one run's ratio can be trusted. The echo goals compare echo-server with the fair
//! baseline within a few per cent, and the same bench run twice moves its ratios by about as
//! much; a verdict near its goal therefore carries a 95 % interval computed from the run's own
//! samples, so the page says whether this run could tell the two servers apart. Both
//! intervals are distribution-free: an order-statistic interval for the median of paired
//! ratios, and a bootstrap over whole criterion samples for a ratio of percentiles (the
//! samples are resampled, not single round trips, because round trips of one sample share
//! the machine's state of that moment and are not independent).

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use lab_report::select_percentile as percentile;

/// The confidence of every interval.
pub const CONFIDENCE: f64 = 0.95;

/// Bootstrap resamples per interval: enough for the 2.5th and 97.5th percentiles of the
/// resampled ratios to settle to about a per cent of their width.
pub const RESAMPLES: usize = 1_000;

/// The seed of the bootstrap: the same samples give the same interval.
const SEED: u64 = 0x5eed_0016;

/// A two-sided interval at [`CONFIDENCE`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Its lower end.
    pub low: f64,
    /// Its upper end.
    pub high: f64,
}

impl Interval {
    /// Whether `value` lies within it (ends included).
    pub fn contains(&self, value: f64) -> bool {
        self.low <= value && value <= self.high
    }
}

/// The interval for the median of `values`: the order statistics `k` and `n + 1 − k` (from
/// 1), `k` the largest with P(Binomial(n, ½) < k) ≤ (1 − [`CONFIDENCE`]) / 2. `None` for
/// fewer than 6 finite values (no such `k` at 95 %).
pub fn median_interval(values: &[f64]) -> Option<Interval> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let tail = (1.0 - CONFIDENCE) / 2.0;
    // P(X ≤ j) for X ~ Binomial(n, ½), accumulated until it passes the tail.
    let mut k = 0;
    let mut below = 0.0;
    let mut term = 0.5f64.powi(n as i32); // P(X = 0)
    for j in 0..n {
        below += term;
        if below > tail {
            break;
        }
        k = j + 1; // P(X < j + 1) ≤ tail
        term *= (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        return None;
    }
    Some(Interval {
        low: sorted[k - 1],
        high: sorted[n - k],
    })
}

/// The interval for `p`-th percentile of `ours` ÷ the same percentile of `base`, where
/// `ours[i]` and `base[i]` are the values of criterion sample `i` (taken in the same
/// seconds): each of [`RESAMPLES`] resamples draws as many samples with replacement, the
/// same draw for both, and the interval is the 2.5th to 97.5th percentile of the resampled
/// ratios (every percentile by [`percentile`], the one rule). `None` with fewer than two samples or none with values on either side.
pub fn ratio_interval(ours: &[&[f64]], base: &[&[f64]], p: f64) -> Option<Interval> {
    let samples = ours.len().min(base.len());
    if samples < 2 {
        return None;
    }
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut ratios = Vec::with_capacity(RESAMPLES);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..RESAMPLES {
        a.clear();
        b.clear();
        for _ in 0..samples {
            let i = rng.random_range(0..samples);
            a.extend(ours[i].iter().copied().filter(|v| v.is_finite()));
            b.extend(base[i].iter().copied().filter(|v| v.is_finite()));
        }
        let (Some(x), Some(y)) = (percentile(&mut a, p), percentile(&mut b, p)) else {
            continue;
        };
        if y > 0.0 {
            ratios.push(x / y);
        }
    }
    if ratios.is_empty() {
        return None;
    }
    let tail = (1.0 - CONFIDENCE) / 2.0 * 100.0;
    Some(Interval {
        low: percentile(&mut ratios, tail)?,
        high: percentile(&mut ratios, 100.0 - tail)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_is_the_binomial_order_statistics() {
        // n = 20: P(X ≤ 5) = 0.0207 ≤ 0.025 < P(X ≤ 6) = 0.0577, so the 6th and 15th values.
        let values: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(
            median_interval(&values),
            Some(Interval {
                low: 6.0,
                high: 15.0
            })
        );
        // n = 6: P(X = 0) = 1/64 ≤ 0.025 < 7/64: the smallest and the largest.
        let six = [3.0, 1.0, 2.0, 6.0, 5.0, 4.0];
        assert_eq!(
            median_interval(&six),
            Some(Interval {
                low: 1.0,
                high: 6.0
            })
        );
        // n = 5: even the extremes cover only 1 − 2/32 = 93.75 %.
        assert_eq!(median_interval(&[1.0, 2.0, 3.0, 4.0, 5.0]), None);
        assert_eq!(median_interval(&[f64::NAN; 30]), None);
    }

    /// Samples whose level moves from one to the next, as the machine's load does.
    fn drifting(samples: usize, per: usize, scale: f64) -> Vec<Vec<f64>> {
        (0..samples)
            .map(|s| {
                let level = 100.0 + 20.0 * ((s * 37) % 11) as f64;
                (0..per)
                    .map(|i| scale * (level + ((i * 13) % 17) as f64))
                    .collect()
            })
            .collect()
    }

    fn refs(samples: &[Vec<f64>]) -> Vec<&[f64]> {
        samples.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn paired_samples_cancel_the_drift_they_share() {
        let base = drifting(20, 50, 1.0);
        let ours = drifting(20, 50, 1.1);
        // Every sample of ours is 1.1× its pair: every resample's ratio is 1.1.
        let i = ratio_interval(&refs(&ours), &refs(&base), 99.0).unwrap();
        assert!(
            (i.low - 1.1).abs() < 1e-9 && (i.high - 1.1).abs() < 1e-9,
            "{i:?}"
        );
        // Paired with samples of another level, the drift shows as width around the ratio.
        let shifted: Vec<Vec<f64>> = base.iter().cycle().skip(3).take(20).cloned().collect();
        let wide = ratio_interval(&refs(&ours), &refs(&shifted), 50.0).unwrap();
        assert!(wide.high - wide.low > 0.05, "{wide:?}");
        assert!(wide.contains(1.1), "{wide:?}");
        // The same input, the same interval.
        assert_eq!(
            ratio_interval(&refs(&ours), &refs(&shifted), 50.0),
            Some(wide)
        );
        assert_eq!(
            ratio_interval(&refs(&ours[..1]), &refs(&base[..1]), 50.0),
            None
        );
    }
}
