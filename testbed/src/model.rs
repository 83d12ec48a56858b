//! The timing model of Consul's deregistration of a dead service: pure arithmetic, no I/O.
//!
//! Consul's agent keeps, for each check with `DeregisterCriticalServiceAfter`, the moment the
//! check turned critical. A reaper goroutine, started with the agent, wakes every
//! `CheckReapInterval` (30 s, not user-settable) and removes every service whose check has
//! been critical for *strictly more* than the setting, which the agent first clamps to at
//! least `CheckDeregisterIntervalMin` (1 min, logged as "has deregister interval below
//! minimum"). Hence:
//!
//! * coarse: critical → removed lies in `(max(setting, 1m), max(setting, 1m) + 30s]`, and
//!   kill → removed adds the wait for the next check run (at most one interval, plus the
//!   check's timeout for a hung rather than dead server);
//! * exact: removal happens at the first reaper tick strictly after
//!   `critical + max(setting, 1m)`, where ticks fall at `anchor + k × 30s`. The anchor is
//!   the reaper's start, which the agent's log dates to the millisecond on an idle machine
//!   (the reaper starts between the agent's "Initializing LAN area manager" and "Started DNS
//!   server" lines, at most 13 ms apart in the runs here), or any earlier observed removal,
//!   which is itself a tick. Strictly, each tick comes 30 s after the previous pass *ended*
//!   (`reapServices` waits on `time.After` in a loop, agent/agent.go in 1.8.7), so a pass
//!   slowed by a loaded machine pushes the later ticks; an anchor at a recent removal keeps
//!   that slip to the passes since.
//!
//! All instants are seconds (f64) on one clock, for example since the UNIX epoch.

use std::time::Duration;

use serde::Serialize;

/// Consul's fixed reaper settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReaperModel {
    /// `CheckReapInterval`: how often the reaper looks.
    pub reap_interval: Duration,
    /// `CheckDeregisterIntervalMin`: the smallest deregistration delay the agent accepts.
    pub min_deregister: Duration,
}

/// A half-open interval `(lo, hi]` of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    /// The open lower bound, seconds.
    pub lo: f64,
    /// The closed upper bound, seconds.
    pub hi: f64,
}

impl Window {
    /// Whether `x` lies in `(lo, hi]`, allowing `slack` seconds of measurement error.
    pub fn contains(&self, x: f64, slack: f64) -> bool {
        x > self.lo - slack && x <= self.hi + slack
    }
}

impl Default for ReaperModel {
    fn default() -> Self {
        ReaperModel::CONSUL
    }
}

impl ReaperModel {
    /// Consul's values since 0.7 (still current): 30 s and 1 min.
    pub const CONSUL: ReaperModel = ReaperModel {
        reap_interval: Duration::from_secs(30),
        min_deregister: Duration::from_secs(60),
    };

    /// The delay the agent actually applies to a `DeregisterCriticalServiceAfter` setting.
    pub fn effective(&self, setting: Duration) -> Duration {
        setting.max(self.min_deregister)
    }

    /// Whether the agent raises `setting` (and logs that it does).
    pub fn is_clamped(&self, setting: Duration) -> bool {
        setting < self.min_deregister
    }

    /// Where critical → removed must fall.
    pub fn critical_window(&self, setting: Duration) -> Window {
        let eff = self.effective(setting).as_secs_f64();
        Window {
            lo: eff,
            hi: eff + self.reap_interval.as_secs_f64(),
        }
    }

    /// Where kill → removed must fall, for a server killed outright (its check fails at the
    /// next run, at most `interval` later) or hung (add the check's `timeout`).
    pub fn kill_window(&self, setting: Duration, interval: Duration, timeout: Duration) -> Window {
        let w = self.critical_window(setting);
        Window {
            lo: w.lo,
            hi: w.hi + interval.as_secs_f64() + timeout.as_secs_f64(),
        }
    }

    /// The reaper tick that removes a service critical since `critical_at`.
    pub fn predict_removal(&self, setting: Duration, critical_at: f64, phase: &Phase) -> f64 {
        phase.next_tick_after(critical_at + self.effective(setting).as_secs_f64())
    }
}

/// The reaper's schedule: ticks at `anchor + k × interval`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Phase {
    /// A known tick (or the reaper's start).
    pub anchor: f64,
    /// Seconds between ticks.
    pub interval: f64,
}

impl Phase {
    /// A schedule through `anchor` every `interval`.
    pub fn new(anchor: f64, interval: Duration) -> Phase {
        Phase {
            anchor,
            interval: interval.as_secs_f64(),
        }
    }

    /// The first tick strictly after `t`.
    pub fn next_tick_after(&self, t: f64) -> f64 {
        let k = ((t - self.anchor) / self.interval).floor() + 1.0;
        self.anchor + k * self.interval
    }

    /// Where, in `[0, interval)`, `t` falls in the cycle.
    pub fn offset_of(&self, t: f64) -> f64 {
        (t - self.anchor).rem_euclid(self.interval)
    }

    /// How far this schedule's ticks fall after `other`'s, in `[0, interval)`. Every agent
    /// runs its own reaper, anchored at its own start: two agents started `d` apart reap
    /// `d mod interval` apart, and a removal on one is predicted from its own phase only.
    pub fn lag_behind(&self, other: &Phase) -> f64 {
        other.offset_of(self.anchor)
    }

    /// How close `t` is to a tick boundary, in seconds: predictions of instants this close
    /// to a tick may land one tick off from measurement noise alone.
    pub fn distance_to_tick(&self, t: f64) -> f64 {
        let off = self.offset_of(t);
        off.min(self.interval - off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: ReaperModel = ReaperModel::CONSUL;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_setting_is_clamped_to_one_minute() {
        assert_eq!(M.effective(secs(30)), secs(60));
        assert!(M.is_clamped(secs(30)));
        assert_eq!(M.effective(secs(60)), secs(60));
        assert!(!M.is_clamped(secs(60)));
        assert_eq!(M.effective(secs(90)), secs(90));
        assert_eq!(M.effective(secs(120)), secs(120));
    }

    #[test]
    fn windows_add_one_reap_interval() {
        assert_eq!(M.critical_window(secs(30)), Window { lo: 60.0, hi: 90.0 });
        assert_eq!(
            M.critical_window(secs(90)),
            Window {
                lo: 90.0,
                hi: 120.0
            }
        );
        let w = M.kill_window(secs(30), secs(5), secs(3));
        assert_eq!(w, Window { lo: 60.0, hi: 98.0 });
        assert!(w.contains(81.2, 0.0), "the seed article's ~80 s");
        assert!(!w.contains(60.0, 0.0), "strictly more than the setting");
        assert!(w.contains(98.0, 0.0));
    }

    #[test]
    fn removal_is_the_first_tick_strictly_after_critical_plus_setting() {
        let phase = Phase::new(100.0, secs(30));
        // Critical at 105: 105 + 60 = 165; ticks at 130, 160, 190: removed at 190.
        assert_eq!(M.predict_removal(secs(30), 105.0, &phase), 190.0);
        // Critical exactly 60 s before a tick: not yet "more than" 60 s, so the next one.
        assert_eq!(M.predict_removal(secs(30), 100.0, &phase), 190.0);
        assert_eq!(M.predict_removal(secs(30), 99.999, &phase), 160.0);
        // 90 s setting, not clamped.
        assert_eq!(M.predict_removal(secs(90), 105.0, &phase), 220.0);
    }

    #[test]
    fn every_prediction_lies_in_the_coarse_window() {
        let phase = Phase::new(0.08, secs(30));
        for setting in [30, 60, 90, 120] {
            let w = M.critical_window(secs(setting));
            for i in 0..300 {
                let critical = 10.0 + f64::from(i) * 0.37;
                let removed = M.predict_removal(secs(setting), critical, &phase);
                assert!(
                    w.contains(removed - critical, 1e-9),
                    "{setting}s {critical}: {}",
                    removed - critical
                );
            }
        }
    }

    #[test]
    fn each_agent_predicts_from_its_own_phase() {
        // Three agents started 0 s, 7.2 s and 44.5 s after the first: their reapers tick
        // 0, 7.2 and 14.5 s into the first one's cycle.
        let first = Phase::new(1000.0, secs(30));
        let second = Phase::new(1007.2, secs(30));
        let third = Phase::new(1044.5, secs(30));
        assert!((second.lag_behind(&first) - 7.2).abs() < 1e-9);
        assert!((third.lag_behind(&first) - 14.5).abs() < 1e-9);
        assert!((first.lag_behind(&second) - 22.8).abs() < 1e-9);
        // One kill, critical at 1100 on every agent: each removes at its own next tick.
        let critical = 1100.0;
        let removals: Vec<f64> = [first, second, third]
            .iter()
            .map(|p| M.predict_removal(secs(30), critical, p))
            .collect();
        assert_eq!(removals[0], 1180.0);
        assert!((removals[1] - 1187.2).abs() < 1e-9);
        assert!((removals[2] - 1164.5).abs() < 1e-9);
    }

    #[test]
    fn phase_arithmetic() {
        let phase = Phase::new(0.08, secs(30));
        assert!((phase.next_tick_after(0.0) - 0.08).abs() < 1e-12);
        assert!((phase.next_tick_after(0.08) - 30.08).abs() < 1e-12);
        assert!((phase.offset_of(60.58) - 0.5).abs() < 1e-9);
        assert!(
            (phase.offset_of(-0.42) - 29.5).abs() < 1e-9,
            "before the anchor too"
        );
        assert!((phase.distance_to_tick(59.98) - 0.1).abs() < 1e-9);
    }
}
