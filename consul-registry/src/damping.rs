//! Flap damping: which passing instances discovery holds out of its view because they keep
//! leaving Consul's passing set and returning to it. Pure: no I/O, no clock of its own
//! (callers pass `now`), so every rule is unit-tested; [`crate::discovery`] applies it to
//! each answer before a snapshot is published, when [`DiscoveryConfig::damping`] asks.
//!
//! Consul's check thresholds (`FailuresBeforeCritical`, `SuccessBeforePassing`) damp a
//! service check's blips shorter than a few check runs, on the registration; they do not see
//! a check that fails for longer, nor a node's `serfHealth`. This is the client's own damping,
//! in the spirit of Envoy's outlier detection and Finagle's failure accrual:
//!
//! * an instance that **returns** after leaving [`Damping::leaves`] times within
//!   [`Damping::window`] is held out of the view for a **hold-down**: [`Damping::hold_down`]
//!   the first time, doubling with each further hold-down, at most
//!   [`Damping::max_hold_down`];
//! * an instance that returns again while held out starts its hold-down over (same length):
//!   while it keeps flapping it stays out, and it comes back one hold-down after its last
//!   return;
//! * a record with no leave for [`Damping::quiet`] is forgotten (the next hold-down starts at
//!   the base again);
//! * **never every instance**: at most [`Damping::max_held_percent`] of the passing set is
//!   held out at once, at least one instance stays in the view; an instance the bound lets
//!   back in is released for good (the instances held out longest stay held);
//! * [`Damper::next_release`] says when the next hold-down ends, so that the loop driving it
//!   wakes then and publishes the view with the instance back.
//!
//! Instances are told apart by (node, service ID): a registration's flaps are its own, even
//! when another registration shares its address.
//!
//! Off by default ([`DiscoveryConfig::damping`] is `None`): an instance held out is one that
//! Consul lists passing and that answers — the view lags Consul by a hold-down after the
//! flapping stops — and the partitions experiment's figures (`docs/partitions.md`) show where
//! it pays.
//!
//! [`DiscoveryConfig::damping`]: crate::discovery::DiscoveryConfig::damping

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use crate::discovery::Instance;

/// When an instance counts as flapping, and how long it is held out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damping {
    /// An instance that returns after leaving this many times within [`window`](Self::window)
    /// is held out (at least 1).
    pub leaves: u32,
    /// How far back leaves are counted.
    pub window: Duration,
    /// The first hold-down; each further one doubles.
    pub hold_down: Duration,
    /// The longest hold-down.
    pub max_hold_down: Duration,
    /// A record with no leave for this long is forgotten.
    pub quiet: Duration,
    /// At most this share of the passing set is held out at once (at least one instance stays
    /// in the view, whatever the share).
    pub max_held_percent: u8,
}

impl Default for Damping {
    /// Held out when returning after its second leave within a minute; 10 s, doubling up to
    /// 160 s; forgotten after 10 quiet minutes; at most half of the passing set held out.
    fn default() -> Self {
        Damping {
            leaves: 2,
            window: Duration::from_secs(60),
            hold_down: Duration::from_secs(10),
            max_hold_down: Duration::from_secs(160),
            quiet: Duration::from_secs(600),
            max_held_percent: 50,
        }
    }
}

/// An instance's identity here: (node, service ID).
type Key = (String, String);

fn key(instance: &Instance) -> Key {
    (instance.node.clone(), instance.id.clone())
}

/// What is remembered of one instance that has left the passing set.
#[derive(Debug, Clone)]
struct Record {
    /// When it left, within the window.
    leaves: VecDeque<Instant>,
    /// The last leave (also outside the window): the record is forgotten `quiet` after it.
    last_leave: Instant,
    /// Hold-downs since the record began (each doubles the next).
    hold_downs: u32,
    /// The length of the current (or last) hold-down.
    hold: Duration,
    /// The current hold-down: since when, until when.
    held: Option<(Instant, Instant)>,
}

/// What one [`Damper::update`] decided.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// The passing instances minus those held out, in the order given.
    pub view: Vec<Arc<Instance>>,
    /// Instances whose hold-down began at this update, each with how long it lasts (an
    /// instance that returns while held out is not said again).
    pub held: Vec<(Arc<Instance>, Duration)>,
    /// Instances held out at the last update that are back in the view.
    pub released: Vec<Arc<Instance>>,
    /// How many passing instances are held out now.
    pub held_out: usize,
}

/// Flap damping over a sequence of passing sets; see the module documentation.
#[derive(Debug, Clone)]
pub struct Damper {
    config: Damping,
    records: HashMap<Key, Record>,
    /// The passing set at the last update.
    listed: HashSet<Key>,
    /// Those in a hold-down at the last update (listed or not).
    held: HashSet<Key>,
}

impl Damper {
    /// A damper that has seen nothing yet.
    pub fn new(mut config: Damping) -> Self {
        config.leaves = config.leaves.max(1);
        config.max_held_percent = config.max_held_percent.min(100);
        Damper {
            config,
            records: HashMap::new(),
            listed: HashSet::new(),
            held: HashSet::new(),
        }
    }

    /// The next passing set (Consul's answer, or the last one again when a hold-down ends):
    /// records leaves and returns, starts and ends hold-downs, and says which instances the
    /// view shows.
    pub fn update(&mut self, passing: &[Arc<Instance>], now: Instant) -> Verdict {
        let c = &self.config;
        let current: HashSet<Key> = passing.iter().map(|i| key(i)).collect();
        for gone in self.listed.difference(&current) {
            let r = self.records.entry(gone.clone()).or_insert_with(|| Record {
                leaves: VecDeque::new(),
                last_leave: now,
                hold_downs: 0,
                hold: c.hold_down,
                held: None,
            });
            r.leaves.push_back(now);
            r.last_leave = now;
        }
        for (k, r) in &mut self.records {
            while r
                .leaves
                .front()
                .is_some_and(|at| now.saturating_duration_since(*at) > c.window)
            {
                r.leaves.pop_front();
            }
            if r.held.is_some_and(|(_, until)| until <= now) {
                r.held = None;
            }
            let returned = current.contains(k) && !self.listed.contains(k);
            if !returned {
                continue;
            }
            if let Some((since, _)) = r.held {
                // Back while held out: the hold-down starts over.
                r.held = Some((since, now + r.hold));
            } else if r.leaves.len() >= c.leaves as usize {
                let doubling = 2u32.saturating_pow(r.hold_downs);
                r.hold = c.hold_down.saturating_mul(doubling).min(c.max_hold_down);
                r.hold_downs = r.hold_downs.saturating_add(1);
                r.held = Some((now, now + r.hold));
            }
        }
        self.records.retain(|_, r| {
            r.held.is_some() || now.saturating_duration_since(r.last_leave) < c.quiet
        });
        self.listed = current;

        // The bound: the instances held out longest stay held; the others are released.
        let n = passing.len();
        let limit = (n * usize::from(c.max_held_percent) / 100)
            .max(1)
            .min(n.saturating_sub(1));
        let mut candidates: Vec<(Instant, Key)> = passing
            .iter()
            .filter_map(|i| {
                let k = key(i);
                let (since, _) = self.records.get(&k)?.held?;
                Some((since, k))
            })
            .collect();
        candidates.sort();
        for (_, k) in candidates.iter().skip(limit) {
            if let Some(r) = self.records.get_mut(k) {
                r.held = None;
            }
        }
        let mut verdict = Verdict {
            held_out: candidates.len().min(limit),
            ..Verdict::default()
        };
        for i in passing {
            let k = key(i);
            match self.records.get(&k).and_then(|r| r.held) {
                Some((_, until)) => {
                    if !self.held.contains(&k) {
                        verdict.held.push((Arc::clone(i), until - now));
                    }
                }
                None => {
                    if self.held.contains(&k) {
                        verdict.released.push(Arc::clone(i));
                    }
                    verdict.view.push(Arc::clone(i));
                }
            }
        }
        self.held = self
            .records
            .iter()
            .filter(|(_, r)| r.held.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        verdict
    }

    /// When the next hold-down of an instance held out of the view ends (the loop driving
    /// this should [`update`](Self::update) then), if any is.
    pub fn next_release(&self) -> Option<Instant> {
        self.held
            .iter()
            .filter(|k| self.listed.contains(*k))
            .filter_map(|k| self.records.get(k)?.held.map(|(_, until)| until))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> Vec<Arc<Instance>> {
        ids.iter()
            .enumerate()
            .map(|(n, id)| Arc::new(Instance::new(*id, "127.0.0.1", 1000 + n as u16)))
            .collect()
    }

    fn ids(instances: &[Arc<Instance>]) -> Vec<&str> {
        instances.iter().map(|i| i.id.as_str()).collect()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// `a` leaves and returns at `at`, `at + 1 s`: one flap.
    fn flap(d: &mut Damper, at: Instant) -> Verdict {
        d.update(&set(&["b", "c"]), at);
        d.update(&set(&["a", "b", "c"]), at + secs(1))
    }

    #[test]
    fn an_instance_is_held_out_when_it_returns_after_its_second_leave() {
        let t0 = Instant::now();
        let mut d = Damper::new(Damping::default());
        let all = set(&["a", "b", "c"]);
        assert_eq!(ids(&d.update(&all, t0).view), ["a", "b", "c"]);
        assert_eq!(d.next_release(), None);
        // First leave and return: shown again (a restart is not flapping).
        let v = flap(&mut d, t0 + secs(5));
        assert_eq!(ids(&v.view), ["a", "b", "c"]);
        assert!(v.held.is_empty());
        // Second within the window: held out for the base hold-down.
        let v = flap(&mut d, t0 + secs(10));
        assert_eq!(ids(&v.view), ["b", "c"]);
        assert_eq!(v.held.len(), 1);
        assert_eq!((v.held[0].0.id.as_str(), v.held[0].1), ("a", secs(10)));
        assert_eq!(v.held_out, 1);
        assert_eq!(d.next_release(), Some(t0 + secs(21)));
        // Still held just before, released at the end of the hold-down.
        let v = d.update(&all, t0 + secs(20));
        assert_eq!(ids(&v.view), ["b", "c"]);
        assert!(v.held.is_empty(), "said once, when held out");
        let v = d.update(&all, t0 + secs(21));
        assert_eq!(ids(&v.view), ["a", "b", "c"]);
        assert_eq!(ids(&v.released), ["a"]);
        assert_eq!(d.next_release(), None);
    }

    #[test]
    fn leaves_outside_the_window_do_not_count() {
        let t0 = Instant::now();
        let mut d = Damper::new(Damping::default());
        d.update(&set(&["a", "b", "c"]), t0);
        flap(&mut d, t0);
        let v = flap(&mut d, t0 + secs(62));
        assert_eq!(ids(&v.view), ["a", "b", "c"], "the first leave is 62 s old");
        let v = flap(&mut d, t0 + secs(70));
        assert_eq!(ids(&v.view), ["b", "c"]);
    }

    #[test]
    fn flapping_while_held_keeps_it_out_and_hold_downs_double_up_to_the_cap() {
        let t0 = Instant::now();
        let mut d = Damper::new(Damping::default());
        d.update(&set(&["a", "b", "c"]), t0);
        flap(&mut d, t0);
        flap(&mut d, t0 + secs(2));
        assert_eq!(d.next_release(), Some(t0 + secs(13)));
        // Returns while held: the same hold-down starts over from the return.
        let v = flap(&mut d, t0 + secs(8));
        assert_eq!(ids(&v.view), ["b", "c"]);
        assert!(v.held.is_empty(), "held out all along: nothing new to say");
        assert_eq!(d.next_release(), Some(t0 + secs(19)));
        // Released; each further hold-down doubles: 20, 40, 80, then 160 s and no more.
        let mut at = t0 + secs(19);
        assert_eq!(
            ids(&d.update(&set(&["a", "b", "c"]), at).view),
            ["a", "b", "c"]
        );
        for expected in [20, 40, 80, 160, 160] {
            // Its leave before the hold-down may be out of the window by now: two flaps.
            at += secs(5);
            let mut v = flap(&mut d, at);
            if v.held.is_empty() {
                v = flap(&mut d, at + secs(2));
            }
            assert_eq!(
                v.held.len(),
                1,
                "held again by its second return at the latest"
            );
            assert_eq!(v.held[0].1, secs(expected));
            at = d.next_release().unwrap();
            let v = d.update(&set(&["a", "b", "c"]), at);
            assert_eq!(ids(&v.released), ["a"]);
        }
    }

    #[test]
    fn a_quiet_instance_is_forgotten() {
        let t0 = Instant::now();
        let mut d = Damper::new(Damping::default());
        d.update(&set(&["a", "b", "c"]), t0);
        flap(&mut d, t0);
        flap(&mut d, t0 + secs(2));
        let release = d.next_release().unwrap();
        d.update(&set(&["a", "b", "c"]), release);
        // Ten quiet minutes later, two flaps hold it out for the base hold-down again.
        let later = t0 + secs(700);
        d.update(&set(&["a", "b", "c"]), later);
        assert!(d.records.is_empty(), "forgotten");
        flap(&mut d, later);
        let v = flap(&mut d, later + secs(2));
        assert_eq!(v.held[0].1, secs(10));
    }

    #[test]
    fn never_every_instance_nor_more_than_the_share() {
        let t0 = Instant::now();
        let mut d = Damper::new(Damping::default());
        let all = set(&["a", "b", "c", "d"]);
        d.update(&all, t0);
        // Every instance flaps twice: at most half of four are held out, the first two held.
        for round in 0..2 {
            let at = t0 + secs(10 * round);
            d.update(&[], at);
            let v = d.update(&all, at + secs(1));
            if round == 1 {
                assert_eq!(v.held_out, 2);
                assert_eq!(v.view.len(), 2);
            }
        }
        // Alone in the passing set, a flapping instance is never held out.
        let mut d = Damper::new(Damping::default());
        let a = set(&["a"]);
        d.update(&a, t0);
        for round in 0..5 {
            d.update(&[], t0 + secs(2 * round));
            let v = d.update(&a, t0 + secs(2 * round + 1));
            assert_eq!(ids(&v.view), ["a"], "the only instance stays in the view");
            assert_eq!(v.held_out, 0);
        }
        assert_eq!(d.next_release(), None);
        // Held out while others pass; when the others leave, it is let back in.
        let mut d = Damper::new(Damping::default());
        let two = set(&["a", "b"]);
        d.update(&two, t0);
        for round in 0..2 {
            d.update(&two[1..], t0 + secs(2 * round));
            d.update(&two, t0 + secs(2 * round + 1));
        }
        assert_eq!(ids(&d.update(&two, t0 + secs(4)).view), ["b"]);
        let v = d.update(&two[..1], t0 + secs(5));
        assert_eq!(ids(&v.view), ["a"], "b left: a is all there is");
        assert_eq!(ids(&v.released), ["a"]);
        assert_eq!(
            ids(&d.update(&two, t0 + secs(6)).view),
            ["a", "b"],
            "released for good, not held out again when b is back"
        );
    }

    #[test]
    fn a_stricter_share_and_a_threshold_of_one() {
        let t0 = Instant::now();
        let mut d = Damper::new(Damping {
            leaves: 0,
            max_held_percent: 0,
            ..Damping::default()
        });
        let all = set(&["a", "b", "c"]);
        d.update(&all, t0);
        let v = flap(&mut d, t0);
        assert_eq!(
            ids(&v.view),
            ["b", "c"],
            "leaves 0 counts as 1; a share of 0 still holds one out"
        );
    }

    #[test]
    fn instances_are_told_apart_by_node_and_id() {
        let t0 = Instant::now();
        let mut d = Damper::new(Damping::default());
        let on = |node: &str| {
            let mut i = Instance::new("web_1", "127.0.0.1", 1);
            i.node = node.into();
            Arc::new(i)
        };
        let (x, y, z) = (on("x"), on("y"), on("z"));
        d.update(&[x.clone(), y.clone(), z.clone()], t0);
        for round in 0..2 {
            d.update(&[y.clone(), z.clone()], t0 + secs(2 * round));
            d.update(&[x.clone(), y.clone(), z.clone()], t0 + secs(2 * round + 1));
        }
        let v = d.update(&[x.clone(), y.clone(), z.clone()], t0 + secs(4));
        assert_eq!(v.view.len(), 2);
        assert!(!v.view.contains(&x), "only web_1 on x flapped");
    }
}
