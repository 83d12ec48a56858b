//! The one percentile rule of the benches: every median, p90, p99 and interval end on the
//! page ([`crate::results::Summary`], the 95 % intervals of [`crate::spread`], the memory
//! measurement's median) is [`percentile`].

/// The `p`-th percentile (`p` from 0 to 100, clamped) of `values`, by the one rule of the
/// benches: with the `n` values in ascending order (indices 0 to `n − 1`), the rank is
/// `r = p / 100 × (n − 1)`, and the percentile is the value at index `⌊r⌋` plus the fraction
/// `r − ⌊r⌋` of the way to the value at index `⌊r⌋ + 1` — linear interpolation between the
/// two nearest ranks (numpy's default, Hyndman and Fan's type 7). So the median of an even
/// count is the mean of the middle two, p0 is the smallest value and p100 the largest.
///
/// Found by selection, not a sort (the bootstrap takes thousands), so `values` is
/// reordered; values compare by [`f64::total_cmp`] (callers drop non-finite ones). `None`
/// for no values.
pub fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), Some(50.5));
        assert!((percentile(&mut v, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&mut v, 100.0), Some(100.0));
        assert_eq!(percentile(&mut v, 0.0), Some(1.0));
        assert_eq!(percentile(&mut [7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&mut [], 50.0), None);
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
                (percentile(&mut v, p).unwrap() - p * 10.0).abs() < 1e-9,
                "p{p}"
            );
            assert_eq!(
                percentile(&mut v, p),
                percentile(&mut sorted.clone(), p),
                "p{p}"
            );
        }
    }
}
