//! The backoff policy: how long to wait before trying again when nothing works (Consul
//! unreachable, no usable instance, no index to block on), growing exponentially with jitter (backon's exponential
//! backoff) and never giving up by itself — callers bound their loops with deadlines.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// An endless, jittered exponential backoff that can be reset after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    min: Duration,
    max: Duration,
    current: ExponentialBackoff,
}

impl Backoff {
    /// Delays start at `min`, double up to `max`, and each gets up to 100% random jitter
    /// added (so a delay lies in `[d, 2d)`), spreading retries of many clients apart.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            builder,
            min,
            max,
            current: builder.build(),
        }
    }

    /// The policy discovery uses while Consul does not answer: 100 ms doubling to 2 s.
    pub fn consul() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// The policy a session uses while no instance is usable: 50 ms doubling to 1 s.
    pub fn reconnect() -> Self {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// The policy a [`Watch`](crate::Watch) polls with when answers carry no usable index:
    /// 200 ms doubling to 2 s.
    pub fn poll() -> Self {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(2))
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        // Endless by construction; the fallback only guards against a change in backon.
        self.current.next().unwrap_or(self.max * 2)
    }

    /// Start over from the smallest delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }

    /// The smallest delay (before jitter).
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The largest delay (before jitter; jitter can double it).
    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_jittered_bounds_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let expected_base = [100u64, 200, 400, 800, 1000, 1000, 1000];
        for base in expected_base {
            let d = b.next_delay();
            let base = Duration::from_millis(base);
            assert!(d >= base && d <= base * 2, "{d:?} not in [{base:?}, 2x]");
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let delays: Vec<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).next_delay())
            .collect();
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 1,
            "20 fresh backoffs all gave {:?}",
            delays[0]
        );
    }

    #[test]
    fn never_ends_and_resets() {
        let mut b = Backoff::reconnect();
        for _ in 0..10_000 {
            assert!(b.next_delay() <= b.max() * 2);
        }
        b.reset();
        assert!(b.next_delay() < b.min() * 2);
    }

    #[test]
    fn degenerate_settings_are_made_sane() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(
            b.next_delay() >= Duration::from_millis(1),
            "never a zero-delay spin"
        );
    }
}
