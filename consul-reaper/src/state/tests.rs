//! The state machine's tests: scenes of one agent, observed at chosen instants (the
//! driver's tests borrow its builders).

use super::*;

pub(crate) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub(crate) fn service(id: &str, reap_after: Option<&str>) -> (String, AgentService) {
    let meta = reap_after.map(|v| BTreeMap::from([(META_KEY.to_owned(), v.to_owned())]));
    (
        id.to_owned(),
        AgentService {
            id: id.into(),
            service: id.into(),
            meta,
            ..Default::default()
        },
    )
}

pub(crate) fn check(service_id: &str, status: HealthStatus) -> HealthCheck {
    HealthCheck {
        node: "n1".into(),
        check_id: format!("service:{service_id}"),
        service_id: service_id.into(),
        status,
        check_type: "http".into(),
        create_index: 10,
        ..Default::default()
    }
}

/// An agent holding `services`; observations at `t0 + at` seconds.
struct Scene {
    t0: Instant,
    services: BTreeMap<String, AgentService>,
}

impl Scene {
    fn new(services: &[(&str, Option<&str>)]) -> Scene {
        Scene {
            t0: Instant::now(),
            services: services.iter().map(|(id, v)| service(id, *v)).collect(),
        }
    }

    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    fn obs(&self, at: f64, checks: Vec<HealthCheck>) -> Observation {
        Observation {
            at: self.at(at),
            node_id: "node-1".into(),
            checks,
            services: self.services.clone(),
        }
    }

    /// `id` (re)registered by a start of its process with Meta `reap-start` = `start`.
    fn started(&mut self, id: &str, start: &str) {
        let service = self.services.get_mut(id).expect("in the scene");
        service
            .meta
            .get_or_insert_default()
            .insert("reap-start".into(), start.into());
    }

    /// An observation at `at` in which the agent no longer holds `id`.
    fn without(&self, at: f64, id: &str) -> Observation {
        let mut obs = self.obs(at, Vec::new());
        obs.services.remove(id);
        obs
    }
}

fn ids(removals: &[Removal]) -> Vec<&str> {
    removals.iter().map(|r| r.service_id.as_str()).collect()
}

#[test]
fn removes_exactly_its_setting_after_the_check_turned_critical_with_no_floor() {
    let scene = Scene::new(&[("web-1", Some("5s"))]);
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Passing)]));
    assert_eq!(reaper.next_deadline(), None, "passing: nothing to do");
    reaper.observe(&scene.obs(2.5, vec![check("web-1", HealthStatus::Critical)]));
    assert_eq!(reaper.next_deadline(), Some(scene.at(7.5)), "2.5 s + 5 s");
    assert!(
        reaper.due(scene.at(7.499)).is_empty(),
        "not a millisecond early"
    );
    let due = reaper.due(scene.at(7.5));
    assert_eq!(ids(&due), ["web-1"]);
    assert_eq!(due[0].deadline(), scene.at(7.5));
    assert_eq!(due[0].after, secs(5));
    assert!(reaper.due(scene.at(8.0)).is_empty(), "handed out once");
    assert_eq!(reaper.next_deadline(), None);
}

#[test]
fn a_check_that_passes_again_before_the_deadline_resets_it() {
    let scene = Scene::new(&[("web-1", Some("10s"))]);
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
    reaper.observe(&scene.obs(9.0, vec![check("web-1", HealthStatus::Passing)]));
    assert_eq!(reaper.next_deadline(), None);
    assert!(reaper.due(scene.at(10.0)).is_empty());
    reaper.observe(&scene.obs(12.0, vec![check("web-1", HealthStatus::Warning)]));
    assert_eq!(reaper.next_deadline(), None, "warning is not critical");
    reaper.observe(&scene.obs(13.0, vec![check("web-1", HealthStatus::Critical)]));
    assert_eq!(reaper.next_deadline(), Some(scene.at(23.0)), "a new clock");
}

#[test]
fn a_flapping_check_is_never_removed() {
    let scene = Scene::new(&[("web-1", Some("5s"))]);
    let mut reaper = Reaper::default();
    for second in 0..120u32 {
        let status = if second % 2 == 0 {
            HealthStatus::Critical
        } else {
            HealthStatus::Passing
        };
        let t = f64::from(second);
        reaper.observe(&scene.obs(t, vec![check("web-1", status)]));
        assert!(reaper.due(scene.at(t + 0.999)).is_empty(), "at {t}");
    }
}

#[test]
fn a_check_never_passing_is_dated_from_its_first_critical_answer() {
    let scene = Scene::new(&[("web-1", Some("30s"))]);
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(1.0, vec![check("web-1", HealthStatus::Critical)]));
    reaper.observe(&scene.obs(20.0, vec![check("web-1", HealthStatus::Critical)]));
    assert!(reaper.due(scene.at(30.9)).is_empty());
    assert_eq!(ids(&reaper.due(scene.at(31.0))), ["web-1"]);
}

#[test]
fn only_services_of_the_agent_that_opted_in_are_touched() {
    let scene = Scene::new(&[("mine", Some("5s")), ("no-meta", None)]);
    let mut reaper = Reaper::default();
    let serf = HealthCheck {
        check_id: "serfHealth".into(),
        status: HealthStatus::Critical,
        ..Default::default()
    };
    let maintenance = HealthCheck {
        check_id: "_service_maintenance:mine".into(),
        service_id: "mine".into(),
        check_type: "maintenance".into(),
        status: HealthStatus::Critical,
        ..Default::default()
    };
    reaper.observe(&scene.obs(
        0.0,
        vec![
            serf,
            maintenance,
            check("mine", HealthStatus::Passing),
            check("no-meta", HealthStatus::Critical),
            // In the catalog on this node, but not held by the agent.
            check("catalog-only", HealthStatus::Critical),
        ],
    ));
    assert_eq!(reaper.next_deadline(), None, "nothing of these is a reason");
    assert!(reaper.due(scene.at(3600.0)).is_empty());
    assert_eq!(reaper.counts(), (1, 0));
}

#[test]
fn an_invalid_setting_is_reported_once_and_never_acted_on() {
    let scene = Scene::new(&[("a", Some("soon")), ("b", Some("0s")), ("c", Some("90"))]);
    let mut reaper = Reaper::default();
    let checks = || {
        ["a", "b", "c"]
            .map(|id| check(id, HealthStatus::Critical))
            .to_vec()
    };
    let notices = reaper.observe(&scene.obs(0.0, checks()));
    assert_eq!(notices.len(), 3, "{notices:?}");
    assert!(notices.contains(&Notice::InvalidSetting {
        service_id: "a".into(),
        value: "soon".into()
    }));
    assert!(reaper.observe(&scene.obs(1.0, checks())).is_empty(), "once");
    assert!(reaper.due(scene.at(3600.0)).is_empty());
    assert_eq!(parse_setting("1m30s"), Some(secs(90)));
    assert_eq!(parse_setting(" 250ms "), Some(Duration::from_millis(250)));
}

#[test]
fn a_refused_removal_is_not_handed_out_again_until_the_check_recovers() {
    let scene = Scene::new(&[("web-1", Some("5s"))]);
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
    assert_eq!(ids(&reaper.due(scene.at(5.0))), ["web-1"]);
    reaper.finished("web-1", Outcome::Refused);
    reaper.observe(&scene.obs(6.0, vec![check("web-1", HealthStatus::Critical)]));
    assert_eq!(reaper.next_deadline(), None);
    assert!(
        reaper.due(scene.at(600.0)).is_empty(),
        "no loop of removals"
    );
    // Recovered, then critical again: a new spell, a new try.
    reaper.observe(&scene.obs(601.0, vec![check("web-1", HealthStatus::Passing)]));
    reaper.observe(&scene.obs(602.0, vec![check("web-1", HealthStatus::Critical)]));
    assert_eq!(ids(&reaper.due(scene.at(607.0))), ["web-1"]);
}

#[test]
fn a_removed_service_still_listed_is_not_removed_twice() {
    let scene = Scene::new(&[("web-1", Some("5s"))]);
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
    assert_eq!(reaper.due(scene.at(5.0)).len(), 1);
    reaper.finished("web-1", Outcome::Removed);
    // The catalog lags the agent by a moment.
    reaper.observe(&scene.obs(5.001, vec![check("web-1", HealthStatus::Critical)]));
    assert!(reaper.due(scene.at(60.0)).is_empty());
    // Registered again by a new start of its process: after a removal Consul creates the
    // check anew (a new CreateIndex), and the start is a new one: a new clock.
    reaper.observe(&scene.without(65.0, "web-1"));
    let again = HealthCheck {
        create_index: 99,
        ..check("web-1", HealthStatus::Critical)
    };
    let mut scene = scene;
    scene.started("web-1", "second");
    reaper.observe(&scene.obs(70.0, vec![again]));
    assert_eq!(reaper.next_deadline(), Some(scene.at(75.0)));
}

#[test]
fn a_failed_removal_waits_for_a_fresh_answer_and_its_retry_time() {
    let scene = Scene::new(&[("web-1", Some("5s"))]);
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
    assert_eq!(reaper.due(scene.at(5.0)).len(), 1);
    reaper.finished("web-1", Outcome::RetryAt(scene.at(5.4)));
    reaper.lost();
    assert_eq!(reaper.next_deadline(), None, "not while the agent is away");
    assert!(reaper.due(scene.at(9.0)).is_empty());
    reaper.observe(&scene.obs(5.2, vec![check("web-1", HealthStatus::Critical)]));
    assert_eq!(reaper.next_deadline(), Some(scene.at(5.4)));
    assert!(reaper.due(scene.at(5.3)).is_empty());
    assert_eq!(reaper.due(scene.at(5.4)).len(), 1);
}

#[test]
fn a_new_agent_or_a_new_start_registered_in_place_starts_the_clock_over() {
    let mut scene = Scene::new(&[("web-1", Some("10s"))]);
    scene.started("web-1", "first");
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
    let mut replaced = scene.obs(4.0, vec![check("web-1", HealthStatus::Critical)]);
    replaced.node_id = "node-2".into();
    assert_eq!(reaper.observe(&replaced), vec![Notice::AgentReplaced]);
    assert_eq!(reaper.next_deadline(), Some(scene.at(14.0)));
    // Registered again in place, as Consul 1.8.7 keeps it: the same CreateIndex, still
    // critical; only Meta reap-start is new.
    scene.started("web-1", "second");
    let mut obs = scene.obs(6.0, vec![check("web-1", HealthStatus::Critical)]);
    obs.node_id = "node-2".into();
    reaper.observe(&obs);
    assert_eq!(reaper.next_deadline(), Some(scene.at(16.0)));
}

#[test]
fn a_process_that_came_back_with_the_same_id_is_not_removed_on_the_old_deadline() {
    // The run behind issue 31: reap-after 6 s, registered again in place 4 s into the
    // critical spell; Consul keeps CreateIndex and the critical status.
    let mut scene = Scene::new(&[("web-1", Some("6s"))]);
    scene.started("web-1", "crashed");
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
    scene.started("web-1", "came-back");
    reaper.observe(&scene.obs(4.0, vec![check("web-1", HealthStatus::Critical)]));
    assert!(
        reaper.due(scene.at(6.0)).is_empty(),
        "the crashed start's deadline"
    );
    assert_eq!(reaper.next_deadline(), Some(scene.at(10.0)));
    // Its check runs and passes: never removed.
    reaper.observe(&scene.obs(5.0, vec![check("web-1", HealthStatus::Passing)]));
    assert!(reaper.due(scene.at(3600.0)).is_empty());
}

#[test]
fn a_service_its_own_process_brings_back_is_removed_once_per_start() {
    let mut scene = Scene::new(&[("web-1", Some("5s"))]);
    scene.started("web-1", "alive");
    let mut reaper = Reaper::default();
    let critical = |create_index| HealthCheck {
        create_index,
        ..check("web-1", HealthStatus::Critical)
    };
    reaper.observe(&scene.obs(0.0, vec![critical(10)]));
    assert_eq!(ids(&reaper.due(scene.at(5.0))), ["web-1"]);
    reaper.finished("web-1", Outcome::Removed);
    // Its registrar registers it again at once: a new check, the same start.
    reaper.observe(&scene.without(5.01, "web-1"));
    let notices = reaper.observe(&scene.obs(5.05, vec![critical(20)]));
    assert_eq!(
        notices,
        [Notice::Yielded {
            service_id: "web-1".into()
        }]
    );
    assert_eq!(reaper.next_deadline(), None);
    // Still critical, registered again and again: left alone, nothing to report.
    for (n, t) in [(21, 30.0), (22, 60.0), (23, 600.0)] {
        assert!(reaper.observe(&scene.obs(t, vec![critical(n)])).is_empty());
        assert!(reaper.due(scene.at(t + 5.0)).is_empty(), "at {t}");
    }
    // Passing for a moment, then critical again: the same start, still left alone.
    reaper.observe(&scene.obs(700.0, vec![check("web-1", HealthStatus::Passing)]));
    reaper.observe(&scene.obs(701.0, vec![critical(23)]));
    assert!(
        reaper.due(scene.at(706.0)).is_empty(),
        "the same start again"
    );
    assert_eq!(reaper.next_deadline(), None, "yielded again");
    // A new start of the process is a new instance: a new clock.
    scene.started("web-1", "restarted");
    reaper.observe(&scene.obs(710.0, vec![critical(30)]));
    assert_eq!(reaper.next_deadline(), Some(scene.at(715.0)));
}

#[test]
fn a_service_brought_back_and_listed_before_its_check_is_still_yielded() {
    // The registrar registers it again; the reaper's next read lists the service in the
    // agent before its check reached the catalog (seen on a loaded machine): no check is no
    // proof of health, so the removal is not forgotten and the service is not removed again.
    let mut scene = Scene::new(&[("web-1", Some("2s"))]);
    scene.started("web-1", "alive");
    let mut reaper = Reaper::default();
    let critical = |create_index| HealthCheck {
        create_index,
        ..check("web-1", HealthStatus::Critical)
    };
    reaper.observe(&scene.obs(0.0, vec![critical(10)]));
    assert_eq!(ids(&reaper.due(scene.at(2.0))), ["web-1"]);
    reaper.finished("web-1", Outcome::Removed);
    reaper.observe(&scene.obs(2.01, vec![]));
    let notices = reaper.observe(&scene.obs(2.05, vec![critical(20)]));
    assert_eq!(
        notices,
        [Notice::Yielded {
            service_id: "web-1".into()
        }]
    );
    assert!(reaper.due(scene.at(10.0)).is_empty(), "removed again");
}

#[test]
fn a_removal_is_forgotten_ten_minutes_after_its_service_is_gone() {
    let mut scene = Scene::new(&[("web-1", Some("5s"))]);
    scene.started("web-1", "alive");
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(0.0, vec![check("web-1", HealthStatus::Critical)]));
    assert_eq!(reaper.due(scene.at(5.0)).len(), 1);
    reaper.finished("web-1", Outcome::Removed);
    reaper.observe(&scene.without(6.0, "web-1"));
    reaper.observe(&scene.without(605.0, "web-1"));
    assert_eq!(reaper.removed.len(), 1, "kept for 10 minutes");
    reaper.observe(&scene.without(606.0, "web-1"));
    assert!(reaper.removed.is_empty(), "then forgotten");
}

#[test]
fn the_earliest_critical_check_of_a_service_sets_its_deadline() {
    let scene = Scene::new(&[("web-1", Some("10s"))]);
    let second = |status| HealthCheck {
        check_id: "service:web-1:2".into(),
        ..check("web-1", status)
    };
    let mut reaper = Reaper::default();
    reaper.observe(&scene.obs(
        0.0,
        vec![
            check("web-1", HealthStatus::Critical),
            second(HealthStatus::Passing),
        ],
    ));
    reaper.observe(&scene.obs(
        3.0,
        vec![
            check("web-1", HealthStatus::Critical),
            second(HealthStatus::Critical),
        ],
    ));
    assert_eq!(reaper.next_deadline(), Some(scene.at(10.0)));
    reaper.observe(&scene.obs(
        5.0,
        vec![
            check("web-1", HealthStatus::Passing),
            second(HealthStatus::Critical),
        ],
    ));
    assert_eq!(reaper.next_deadline(), Some(scene.at(13.0)));
}
