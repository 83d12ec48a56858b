//! The one sweeper of a server: every [`EVERY`] it looks at each open connection's activity
//! and raises, once per quiet period, what the connection's quiet time calls for: shrink its
//! buffer ([`SHRINK_AFTER`]), may be shed to make room ([`IDLE_BEFORE_SHED`]), close (its
//! idle timeout). This is what each connection did in each wait before (a clock read, a
//! timer to compare and re-arm, a shed queue to join), moved off the connections' hot path:
//! a busy connection now only stores a counter per answer (see [`crate::stop`], which
//! carries the flags). [`Seen`] is the pure state machine; [`run`] drives it.

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use crate::{server::SHRINK_AFTER, stop::Stop};

/// Between two sweeps. An idle timeout fires within two sweeps past its time; a buffer is
/// given back within [`SHRINK_AFTER`] and one sweep of the connection's last answer.
pub(crate) const EVERY: Duration = Duration::from_millis(25);
/// A connection idle this long may be closed to make room when every slot is taken.
pub(crate) const IDLE_BEFORE_SHED: Duration = Duration::from_secs(1);

/// What the sweeper tells a connection: a small set of bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Flags(u8);

impl Flags {
    /// Quiet past its idle timeout: close.
    pub(crate) const IDLE: Flags = Flags(1);
    /// Quiet for [`SHRINK_AFTER`] with a grown buffer: give it back.
    pub(crate) const SHRINK: Flags = Flags(2);
    /// Quiet for [`IDLE_BEFORE_SHED`]: may be closed to make room for a new peer.
    pub(crate) const SHEDDABLE: Flags = Flags(4);

    pub(crate) fn from_bits(bits: u8) -> Flags {
        Flags(bits & 7)
    }

    pub(crate) fn bits(self) -> u8 {
        self.0
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    fn with(self, other: Flags, on: bool) -> Flags {
        if on { Flags(self.0 | other.0) } else { self }
    }
}

/// What the sweeper knows of one connection.
#[derive(Debug)]
pub(crate) struct Seen {
    /// The activity word last seen (see `stop::Watch::answered`; lowest bit: buffer grown).
    activity: u64,
    /// The sweep that first saw it: quiet since at least then (the idle timeout counts from
    /// here, so it never fires early).
    since: Instant,
    /// The sweep before that: quiet since at most then (a shrink may count from here).
    after: Instant,
    /// The sweep before this one.
    last: Instant,
    /// Raised in this quiet period already.
    raised: Flags,
}

impl Seen {
    /// A connection opened at `now` with `activity`.
    pub(crate) fn new(activity: u64, now: Instant) -> Seen {
        Seen {
            activity,
            since: now,
            after: now,
            last: now,
            raised: Flags::default(),
        }
    }

    /// The sweep that first saw the current quiet period.
    pub(crate) fn quiet_since(&self) -> Instant {
        self.since
    }

    /// One sweep at `now`: the flags newly due (each raised once per quiet period).
    pub(crate) fn visit(&mut self, activity: u64, now: Instant, idle_timeout: Duration) -> Flags {
        let last = std::mem::replace(&mut self.last, now);
        if activity != self.activity {
            self.activity = activity;
            self.since = now;
            self.after = last;
            self.raised = Flags::default();
            return Flags::default();
        }
        let quiet = now.saturating_duration_since(self.since);
        let grown = activity & 1 == 1;
        let due = Flags::default()
            .with(
                Flags::SHRINK,
                grown && now.saturating_duration_since(self.after) >= SHRINK_AFTER,
            )
            .with(
                Flags::SHEDDABLE,
                idle_timeout > IDLE_BEFORE_SHED && quiet >= IDLE_BEFORE_SHED,
            )
            .with(Flags::IDLE, quiet >= idle_timeout);
        let new = Flags(due.0 & !self.raised.0);
        self.raised = Flags(self.raised.0 | due.0);
        new
    }
}

/// Sweep `stop`'s connections every [`EVERY`], until the task is dropped.
pub(crate) async fn run(stop: Stop) {
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let now = ticks.tick().await;
        stop.sweep(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The flags raised at each sweep, every `EVERY`, for a connection answering at the
    /// given sweeps (activity changes there).
    fn sweeps(idle_timeout: Duration, grown: bool, answers: &[usize], n: usize) -> Vec<Flags> {
        let start = Instant::now();
        let mut seen = Seen::new(0, start);
        let mut activity = 0;
        (1..=n)
            .map(|i| {
                if answers.contains(&i) {
                    activity = ((i as u64) << 1) | u64::from(grown);
                }
                seen.visit(activity, start + EVERY * i as u32, idle_timeout)
            })
            .collect()
    }

    fn first(flags: &[Flags], flag: Flags) -> Option<usize> {
        flags.iter().position(|f| f.contains(flag)).map(|i| i + 1)
    }

    #[test]
    fn the_idle_timeout_fires_once_never_early_and_within_two_sweeps() {
        let idle = ms(500);
        let flags = sweeps(idle, false, &[4], 80);
        // The answer was seen at sweep 4: quiet from then, 20 sweeps of 25 ms.
        assert_eq!(first(&flags, Flags::IDLE), Some(24));
        assert_eq!(flags.iter().filter(|f| f.contains(Flags::IDLE)).count(), 1);
        // A connection that never answers counts from its opening.
        assert_eq!(first(&sweeps(idle, false, &[], 40), Flags::IDLE), Some(20));
    }

    #[test]
    fn activity_starts_a_new_quiet_period() {
        let flags = sweeps(ms(500), false, &[10, 20, 30], 60);
        assert_eq!(first(&flags, Flags::IDLE), Some(50));
    }

    #[test]
    fn only_a_grown_buffer_is_told_to_shrink_and_within_three_sweeps_of_its_answer() {
        let grown = sweeps(ms(60_000), true, &[4], 20);
        let at = first(&grown, Flags::SHRINK).expect("told to shrink");
        // Answered between sweeps 3 and 4; SHRINK_AFTER is two sweeps.
        assert!(
            (EVERY * (at as u32 - 3)) >= SHRINK_AFTER && at <= 4 + 2,
            "sweep {at}"
        );
        assert_eq!(
            first(&sweeps(ms(60_000), false, &[4], 20), Flags::SHRINK),
            None
        );
    }

    #[test]
    fn sheddable_after_a_second_quiet_unless_the_idle_timeout_is_shorter() {
        let flags = sweeps(ms(60_000), false, &[], 60);
        assert_eq!(first(&flags, Flags::SHEDDABLE), Some(40));
        let short = sweeps(ms(800), false, &[], 60);
        assert_eq!(first(&short, Flags::SHEDDABLE), None);
        assert_eq!(first(&short, Flags::IDLE), Some(32));
    }
}
