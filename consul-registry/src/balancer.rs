//! The balancer: picks which passing instance to connect to. Pure: no I/O, no clock of its
//! own (callers pass `now`), so every rule is unit-tested.
//!
//! * It chooses among the instances discovery last published, round-robin or by
//!   power-of-two-choices (the lower smoothed round-trip time of two random candidates).
//! * An instance is identified by its address (`host:port`): Consul's service IDs are unique
//!   per agent, not per cluster (two nodes may each run a `servernode_1`), and an agent that
//!   comes back under a new node name still lists the same server.
//! * An instance that failed locally (refused, reset, timed out) is ejected for a cooldown
//!   that doubles with consecutive failures (capped), and skipped until it expires; a success
//!   clears its record. Records are forgotten when an instance leaves the passing set, so an
//!   instance Consul lists again starts clean.
//! * Passive health for callers that report every outcome ([`Balancer::failed`], which
//!   [`Pool`](crate::pool::Pool) drives): an instance is ejected after `consecutive` failures
//!   in a row (default 1: a refused connect is definitive), for a hold-down that doubles with
//!   each ejection since its last success (capped at 16 × the base), and never more than
//!   `max_ejected_percent` of the passing set at once (at least one, never all) — Envoy's
//!   outlier detection and Finagle's failure accrual in small. An ejected instance Consul
//!   still lists is picked again once its hold-down ends: its next answer decides.
//! * A new balancer starts empty: nothing is picked before the first
//!   [`update`](Balancer::update).
//! * The session stays on a working connection; the balancer only says whether the current
//!   instance is still listed and whether there is somewhere else to go — and, when instances
//!   are added (a scale-out), whether this client should move to one of them
//!   ([`Balancer::update_spreading`]) so that many clients spread evenly.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use crate::discovery::Instance;

/// How to choose among usable instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Each new connection goes to the next instance in ID order, starting at a random one
    /// (so that many clients do not all start on the first).
    #[default]
    RoundRobin,
    /// Two random candidates; the one with the lower smoothed round-trip time wins (an
    /// instance never measured counts as fastest, so it gets tried).
    PowerOfTwoChoices,
}

/// The local record of one instance (keyed by its address).
#[derive(Debug, Clone, Default)]
struct Local {
    /// Ejections since the last success (the hold-down doubles with each).
    failures: u32,
    /// Failures in a row since the last success or ejection ([`Balancer::failed`]).
    streak: u32,
    ejected_until: Option<Instant>,
    rtt: Option<Duration>,
}

/// Picks instances; see the module documentation.
#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    cooldown: Duration,
    max_cooldown: Duration,
    /// Failures in a row that eject an instance ([`Balancer::failed`]).
    consecutive: u32,
    /// At most this share of the passing set is ejected at once by [`Balancer::failed`].
    max_ejected_percent: u8,
    /// The passing set, shared with the snapshot it came from (not copied).
    instances: Arc<[Arc<Instance>]>,
    /// Local records by host, then port (looked up without formatting an address).
    local: HashMap<String, HashMap<u16, Local>>,
    next: usize,
    rng: StdRng,
}

impl Balancer {
    /// A balancer ejecting failed instances for `cooldown`, doubling per consecutive failure
    /// up to 16 × `cooldown`. It starts empty: [`pick`](Self::pick) returns `None` until the
    /// first [`update`](Self::update).
    pub fn new(strategy: Strategy, cooldown: Duration) -> Self {
        Balancer {
            strategy,
            cooldown,
            max_cooldown: cooldown.saturating_mul(16),
            consecutive: 1,
            max_ejected_percent: 50,
            instances: Arc::from(Vec::new()),
            local: HashMap::new(),
            next: rand::random_range(0..usize::MAX / 2),
            rng: StdRng::from_rng(&mut rand::rng()),
        }
    }

    /// Make random choices reproducible; round-robin then starts at the first instance.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = StdRng::seed_from_u64(seed);
        self.next = 0;
        self
    }

    /// Passive health for [`failed`](Self::failed): eject after `consecutive` failures in a
    /// row (at least 1), with at most `max_ejected_percent` of the passing set ejected at once
    /// (at least one instance, never all of them). Defaults: 1 and 50.
    pub fn with_outlier_detection(mut self, consecutive: u32, max_ejected_percent: u8) -> Self {
        self.consecutive = consecutive.max(1);
        self.max_ejected_percent = max_ejected_percent.min(100);
        self
    }

    /// Replace the passing set (a snapshot's, shared: nothing is copied). Records of
    /// addresses that left it are forgotten.
    ///
    /// Feed it every snapshot, not only those `has_changed()` reports: after
    /// `receiver.wait_for(..)` (or `borrow_and_update`) the receiver has seen the snapshot and
    /// `has_changed()` is `false`, so a loop that updates only on `has_changed()` never hands
    /// it that one. Update with what `wait_for` returned, or use a [`Pool`](crate::Pool),
    /// which reads the latest snapshot on every pick.
    pub fn update(&mut self, instances: &Arc<[Arc<Instance>]>) {
        self.instances = Arc::clone(instances);
        if self.local.is_empty() {
            return;
        }
        let keep: HashSet<(&str, u16)> = instances
            .iter()
            .map(|i| (i.host.as_str(), i.port))
            .collect();
        self.local.retain(|host, ports| {
            ports.retain(|port, _| keep.contains(&(host.as_str(), *port)));
            !ports.is_empty()
        });
    }

    /// Replace the passing set (like [`update`](Self::update)), and say whether a client
    /// connected to one of the instances listed before should move to one just added: with
    /// probability added / total, to an added usable instance chosen uniformly. Many clients
    /// each deciding so end up evenly spread in expectation, the old instances keeping
    /// 1 / total each. `None` when nothing was added, or on the first set.
    pub fn update_spreading(
        &mut self,
        instances: &Arc<[Arc<Instance>]>,
        now: Instant,
    ) -> Option<Instance> {
        let before = Arc::clone(&self.instances);
        self.update(instances);
        if before.is_empty() || Arc::ptr_eq(&before, instances) {
            return None;
        }
        let listed: HashSet<(&str, u16)> =
            before.iter().map(|i| (i.host.as_str(), i.port)).collect();
        let added: Vec<usize> = (0..self.instances.len())
            .filter(|&i| {
                let instance = &self.instances[i];
                !listed.contains(&(instance.host.as_str(), instance.port))
                    && self.usable(instance, now)
            })
            .collect();
        if added.is_empty() {
            return None;
        }
        let p = added.len() as f64 / self.instances.len() as f64;
        if !self.rng.random_bool(p.clamp(0.0, 1.0)) {
            return None;
        }
        let pick = added[self.rng.random_range(0..added.len())];
        Some((*self.instances[pick]).clone())
    }

    /// The passing set.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }

    /// Whether `instance`'s address is in the passing set.
    pub fn contains(&self, instance: &Instance) -> bool {
        self.instances
            .iter()
            .any(|i| i.port == instance.port && i.host == instance.host)
    }

    fn local(&self, instance: &Instance) -> Option<&Local> {
        self.local.get(instance.host.as_str())?.get(&instance.port)
    }

    fn usable(&self, instance: &Instance, now: Instant) -> bool {
        self.local(instance)
            .and_then(|l| l.ejected_until)
            .is_none_or(|until| until <= now)
    }

    /// Whether some usable instance other than `current` exists.
    pub fn has_alternative(&self, current: &Instance, now: Instant) -> bool {
        self.instances
            .iter()
            .any(|i| (i.port != current.port || i.host != current.host) && self.usable(i, now))
    }

    /// Choose an instance to connect to, or `None` when every passing instance is ejected
    /// (or there is none).
    pub fn pick(&mut self, now: Instant) -> Option<Instance> {
        self.pick_except(now, &[])
    }

    /// Like [`pick`](Self::pick), skipping the addresses in `except` (connects in flight,
    /// instances that just failed).
    pub fn pick_except(&mut self, now: Instant, except: &[String]) -> Option<Instance> {
        let usable: Vec<usize> = (0..self.instances.len())
            .filter(|&i| {
                let instance = &self.instances[i];
                self.usable(instance, now)
                    && (except.is_empty() || !except.contains(&instance.address()))
            })
            .collect();
        if usable.is_empty() {
            return None;
        }
        let chosen = match self.strategy {
            Strategy::RoundRobin => {
                let n = self.instances.len();
                let start = self.next % n;
                let pos = (0..n)
                    .map(|k| (start + k) % n)
                    .find(|i| usable.contains(i))?;
                self.next = pos + 1;
                pos
            }
            Strategy::PowerOfTwoChoices => {
                if usable.len() == 1 {
                    usable[0]
                } else {
                    let a = self.rng.random_range(0..usable.len());
                    let mut b = self.rng.random_range(0..usable.len() - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (a, b) = (usable[a], usable[b]);
                    let rtt = |i: usize| {
                        self.local(&self.instances[i])
                            .and_then(|l| l.rtt)
                            .unwrap_or(Duration::ZERO)
                    };
                    if rtt(b) < rtt(a) { b } else { a }
                }
            }
        };
        Some((*self.instances[chosen]).clone())
    }

    fn record(&mut self, instance: &Instance) -> &mut Local {
        self.local
            .entry(instance.host.clone())
            .or_default()
            .entry(instance.port)
            .or_default()
    }

    /// `instance` failed: skip it until its cooldown expires. Returns the cooldown applied.
    pub fn eject(&mut self, instance: &Instance, now: Instant) -> Duration {
        let (base, max) = (self.cooldown, self.max_cooldown);
        let local = self.record(instance);
        let doublings = local.failures.min(16);
        local.failures = local.failures.saturating_add(1);
        let cooldown = base.saturating_mul(1 << doublings).min(max);
        local.ejected_until = Some(now + cooldown);
        cooldown
    }

    /// `instance` failed one request (refused, reset, timed out, or an answer the caller
    /// counts as a failure): after `consecutive` failures in a row it is ejected like
    /// [`eject`](Self::eject) does, unless that would hold out more than the allowed share of
    /// the passing set (see [`with_outlier_detection`](Self::with_outlier_detection)).
    /// Returns the hold-down applied, `None` when the instance stays in.
    pub fn failed(&mut self, instance: &Instance, now: Instant) -> Option<Duration> {
        let consecutive = self.consecutive;
        let local = self.record(instance);
        local.streak = local.streak.saturating_add(1);
        if local.streak < consecutive || local.ejected_until.is_some_and(|until| until > now) {
            return None;
        }
        let n = self.instances.len();
        let cap = (n * usize::from(self.max_ejected_percent) / 100)
            .max(1)
            .min(n.saturating_sub(1));
        let ejected = self
            .instances
            .iter()
            .filter(|i| !self.usable(i, now))
            .count();
        if ejected >= cap || !self.contains(instance) {
            return None;
        }
        let cooldown = self.eject(instance, now);
        self.record(instance).streak = 0;
        Some(cooldown)
    }

    /// `instance` answered in `rtt`: clear its failures and fold the time into its average.
    pub fn succeeded(&mut self, instance: &Instance, rtt: Duration) {
        let local = self.record(instance);
        local.failures = 0;
        local.streak = 0;
        local.ejected_until = None;
        local.rtt = Some(match local.rtt {
            None => rtt,
            Some(avg) => (avg * 4 + rtt) / 5,
        });
    }

    /// When the earliest ejection among passing instances ends, if any is ejected.
    pub fn next_unejection(&self, now: Instant) -> Option<Instant> {
        self.instances
            .iter()
            .filter_map(|i| self.local(i)?.ejected_until)
            .filter(|until| *until > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arcs(instances: &[Instance]) -> Arc<[Arc<Instance>]> {
        instances.iter().cloned().map(Arc::new).collect()
    }

    fn set(n: u16) -> Vec<Instance> {
        (1..=n)
            .map(|i| Instance::new(format!("s{i}"), "127.0.0.1", 9000 + i))
            .collect()
    }

    fn ids(picks: &[Option<Instance>]) -> Vec<&str> {
        picks
            .iter()
            .map(|p| p.as_ref().map_or("-", |i| i.id.as_str()))
            .collect()
    }

    #[test]
    fn round_robin_cycles_and_skips_ejected() {
        let mut b = Balancer::new(Strategy::RoundRobin, Duration::from_secs(1)).with_seed(1);
        let now = Instant::now();
        assert_eq!(b.pick(now), None, "nothing to pick from");
        b.update(&arcs(&set(3)));
        let picks: Vec<_> = (0..4).map(|_| b.pick(now)).collect();
        assert_eq!(ids(&picks), ["s1", "s2", "s3", "s1"]);
        b.eject(&set(3)[1], now);
        let picks: Vec<_> = (0..3).map(|_| b.pick(now)).collect();
        assert_eq!(ids(&picks), ["s3", "s1", "s3"]);
    }

    #[test]
    fn cooldown_expires_and_doubles_per_consecutive_failure() {
        let mut b = Balancer::new(Strategy::RoundRobin, Duration::from_secs(1));
        let s1 = Instance::new("s1", "127.0.0.1", 1);
        b.update(&arcs(std::slice::from_ref(&s1)));
        let t0 = Instant::now();
        assert_eq!(b.eject(&s1, t0), Duration::from_secs(1));
        assert_eq!(b.pick(t0), None);
        assert_eq!(b.next_unejection(t0), Some(t0 + Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.pick(t1), Some(s1.clone()), "cooldown over");
        assert_eq!(b.eject(&s1, t1), Duration::from_secs(2));
        assert_eq!(b.eject(&s1, t1), Duration::from_secs(4));
        for _ in 0..40 {
            b.eject(&s1, t1);
        }
        assert_eq!(b.eject(&s1, t1), Duration::from_secs(16), "capped");
        b.succeeded(&s1, Duration::from_millis(1));
        assert_eq!(b.pick(t1), Some(s1.clone()), "a success clears the record");
        assert_eq!(b.eject(&s1, t1), Duration::from_secs(1));
    }

    #[test]
    fn leaving_the_set_forgets_the_record() {
        let mut b = Balancer::new(Strategy::RoundRobin, Duration::from_secs(10));
        let now = Instant::now();
        let all = set(2);
        b.update(&arcs(&all));
        b.eject(&all[0], now);
        assert!(!b.has_alternative(&all[1], now), "s1 is ejected");
        assert!(b.has_alternative(&all[0], now));
        b.update(&arcs(&all[1..]));
        assert!(!b.contains(&all[0]));
        b.update(&arcs(&all));
        assert!(b.has_alternative(&all[1], now), "s1 is listed again: clean");
        // Same ID, new address (restarted elsewhere): a new instance.
        b.eject(&all[0], now);
        let moved = Instance::new("s1", "127.0.0.1", 1234);
        b.update(&arcs(&[moved.clone(), all[1].clone()]));
        assert!(b.contains(&moved) && !b.contains(&all[0]));
        assert!(b.has_alternative(&all[1], now));
    }

    #[test]
    fn same_id_on_two_nodes_are_two_instances_and_a_renamed_node_is_the_same() {
        let mut b = Balancer::new(Strategy::RoundRobin, Duration::from_secs(10));
        let now = Instant::now();
        let on = |node: &str, port| Instance {
            node: node.into(),
            ..Instance::new("servernode_1", "127.0.0.1", port)
        };
        let (x, y) = (on("node-a", 1), on("node-b", 2));
        b.update(&arcs(&[x.clone(), y.clone()]));
        b.eject(&x, now);
        assert_eq!(b.pick(now), Some(y.clone()), "its namesake is not ejected");
        assert_eq!(b.pick(now), Some(y.clone()));
        b.update(&arcs(&[x.clone(), y.clone()]));
        assert_eq!(b.pick(now), Some(y.clone()), "an update keeps the ejection");
        // node-b's agent came back as node-c: same address, same instance.
        let renamed = on("node-c", 2);
        b.update(&arcs(&[x.clone(), renamed.clone()]));
        assert!(b.contains(&y));
        assert!(!b.has_alternative(&renamed, now));
        assert_eq!(b.pick_except(now, &[renamed.address()]), None);
    }

    #[test]
    fn power_of_two_choices_prefers_the_faster_and_spreads() {
        let mut b = Balancer::new(Strategy::PowerOfTwoChoices, Duration::from_secs(1)).with_seed(7);
        let all = set(2);
        b.update(&arcs(&all));
        b.succeeded(&all[0], Duration::from_millis(50));
        b.succeeded(&all[1], Duration::from_millis(1));
        let now = Instant::now();
        for _ in 0..20 {
            assert_eq!(b.pick(now).unwrap().id, "s2", "of two, the faster");
        }
        b.eject(&all[1], now);
        assert_eq!(b.pick(now).unwrap().id, "s1", "the only usable one");

        let mut b = Balancer::new(Strategy::PowerOfTwoChoices, Duration::from_secs(1)).with_seed(1);
        b.update(&arcs(&set(4)));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(b.pick(now).unwrap().id);
        }
        assert!(
            seen.len() >= 3,
            "unmeasured instances all get tried: {seen:?}"
        );
    }

    #[test]
    fn a_scale_out_moves_the_share_of_clients_the_new_instances_should_take() {
        let now = Instant::now();
        let old = vec![
            Instance::new("a", "127.0.0.1", 1),
            Instance::new("b", "127.0.0.1", 2),
        ];
        let mut grown = old.clone();
        grown.extend((3..=6).map(|p| Instance::new(format!("n{p}"), "127.0.0.1", p)));
        let clients = 6_000;
        let mut per_instance: HashMap<String, u32> = HashMap::new();
        for seed in 0..clients {
            let mut b = Balancer::new(Strategy::RoundRobin, Duration::from_secs(1)).with_seed(seed);
            assert!(
                b.update_spreading(&arcs(&old), now).is_none(),
                "the first set moves nobody"
            );
            // Each client sits on one of the old instances.
            let current = old[(seed % 2) as usize].address();
            let target = b.update_spreading(&arcs(&grown), now).map(|i| i.address());
            *per_instance.entry(target.unwrap_or(current)).or_default() += 1;
            assert!(
                b.update_spreading(&arcs(&grown), now).is_none(),
                "the same set again moves nobody"
            );
        }
        // 1,000 each expected; 5 standard deviations (~29 each) of slack.
        for instance in &grown {
            let n = per_instance.get(&instance.address()).copied().unwrap_or(0);
            assert!((850..=1150).contains(&n), "{instance}: {n} of {clients}");
        }
    }

    #[test]
    fn unseeded_round_robin_starts_anywhere() {
        let now = Instant::now();
        let firsts: HashSet<String> = (0..200)
            .map(|_| {
                let mut b = Balancer::new(Strategy::RoundRobin, Duration::from_secs(1));
                b.update(&arcs(&set(4)));
                b.pick(now).unwrap().id
            })
            .collect();
        // Each of the 4 is missed by 200 independent draws with probability (3/4)^200.
        assert_eq!(firsts.len(), 4, "{firsts:?}");
    }

    #[test]
    fn failures_eject_after_the_streak_never_all_and_longer_each_time() {
        let now = Instant::now();
        let all = set(3);
        let mut b = Balancer::new(Strategy::RoundRobin, Duration::from_secs(1))
            .with_outlier_detection(2, 50)
            .with_seed(1);
        b.update(&arcs(&all));
        assert_eq!(b.failed(&all[0], now), None, "one failure of two");
        assert_eq!(b.failed(&all[0], now), Some(Duration::from_secs(1)));
        // 50 % of 3 is one: the second failing instance stays in.
        b.failed(&all[1], now);
        assert_eq!(b.failed(&all[1], now), None, "the cap holds");
        assert_eq!(b.next_unejection(now), Some(now + Duration::from_secs(1)));
        // Back after its hold-down while still listed; failing again doubles it.
        let later = now + Duration::from_secs(1);
        assert!(b.usable(&all[0], later));
        b.failed(&all[0], later);
        assert_eq!(b.failed(&all[0], later), Some(Duration::from_secs(2)));
        // A success clears the record: the next ejection is the base again.
        b.succeeded(&all[0], Duration::from_millis(1));
        b.failed(&all[0], later);
        assert_eq!(b.failed(&all[0], later), Some(Duration::from_secs(1)));

        // A single instance is never held out.
        let mut one = Balancer::new(Strategy::RoundRobin, Duration::from_secs(1));
        one.update(&arcs(&all[..1]));
        for _ in 0..5 {
            assert_eq!(one.failed(&all[0], now), None);
        }
        assert!(one.pick(now).is_some());
    }
}
