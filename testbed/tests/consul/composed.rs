//! `Source::Composed` against `?passing`, differentially: the same changes made on a real
//! agent, both sources followed by discovery, compared after each step once both have caught
//! up with Consul — several checks per instance, warning, service and node maintenance, a
//! re-registration, a deregistration while critical, an agent restart (its index going back)
//! — then a seeded random sequence (`COMPOSED_SEED` replays one; the seed is printed).

use std::time::Duration;

use consul_api::{
    AgentServiceCheck, AgentServiceRegistration, Client, GoDuration, HealthStatus, QueryOptions,
};
use consul_registry::{DiscoveryConfig, Snapshot, Source, discovery};
use rand::{Rng, SeedableRng, rngs::StdRng};
use testbed::Consul;
use tokio::sync::watch;

use crate::common::init_tracing;

const CHECKS: usize = 2;
/// How long both sources may take to show one change.
const CATCH_UP: Duration = Duration::from_secs(10);

fn check_id(service: &str, i: usize, c: usize) -> String {
    format!("{service}-{i}-check-{c}")
}

/// Instance `i` of `service` on `port`, with [`CHECKS`] TTL checks, all passing.
fn registration(service: &str, i: usize, port: u16) -> AgentServiceRegistration {
    AgentServiceRegistration {
        id: Some(format!("{service}-{i}")),
        name: service.into(),
        port: Some(port),
        address: Some("127.0.0.1".into()),
        checks: (0..CHECKS)
            .map(|c| AgentServiceCheck {
                check_id: Some(check_id(service, i, c)),
                ttl: Some(GoDuration::from_secs(600)),
                status: Some("passing".into()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Both sources followed on one agent.
struct Both {
    health: watch::Receiver<Snapshot>,
    composed: watch::Receiver<Snapshot>,
}

impl Both {
    fn follow(client: &Client, service: &str) -> Self {
        let config = |source| {
            let mut c = DiscoveryConfig::new(service);
            c.source = source;
            c.wait = Duration::from_secs(5);
            c
        };
        Both {
            health: discovery::spawn(client.clone(), config(Source::Health)),
            composed: discovery::spawn(client.clone(), config(Source::Composed)),
        }
    }
}

/// Instances as compared: every field discovery publishes.
fn listed(s: &Snapshot) -> Vec<String> {
    s.instances.iter().map(|i| format!("{i:?}")).collect()
}

/// Consul's indexes once the step's writes have landed: the agent syncs its registrations and
/// check updates to the catalog after its API call returns, so wait until `?passing` stays
/// put for a while; then `?passing`'s index, and the composed source's (the larger of the
/// services' and the checks' tables).
async fn settled(client: &Client, service: &str, step: &str) -> (u64, u64) {
    let health = client.health();
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    let index = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{step}: Consul never settled"
        );
        let (_, meta) = health
            .service(service, None, true, &QueryOptions::default())
            .await
            .unwrap();
        let quiet = QueryOptions {
            wait_index: meta.last_index,
            wait_time: Some(QUIET),
            ..Default::default()
        };
        let (_, again) = health.service(service, None, true, &quiet).await.unwrap();
        if again.last_index == meta.last_index {
            break meta.last_index;
        }
    };
    let (_, services) = client
        .catalog()
        .services(&QueryOptions::default())
        .await
        .unwrap();
    let (_, checks) = health.state("any", &QueryOptions::default()).await.unwrap();
    (index, services.last_index.max(checks.last_index))
}

/// How long `?passing` must stay put for a step to count as landed.
const QUIET: Duration = Duration::from_millis(300);

/// Once Consul has settled, wait until each source has caught up with its index, then compare
/// both views; panics past [`CATCH_UP`] with what each showed.
async fn compare(client: &Client, both: &mut Both, service: &str, step: &str) -> Vec<String> {
    let (target, composed_target) = settled(client, service, step).await;
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    let health = tokio::time::timeout_at(deadline, both.health.wait_for(|s| s.index >= target))
        .await
        .map(|s| listed(&s.unwrap()));
    let composed = tokio::time::timeout_at(
        deadline,
        both.composed.wait_for(|s| s.index >= composed_target),
    )
    .await
    .map(|s| listed(&s.unwrap()));
    let (Ok(health), Ok(composed)) = (health, composed) else {
        panic!(
            "{step}: not caught up within {CATCH_UP:?}: health at {} (Consul {target}) {:?}, \
             composed at {} (Consul {composed_target}) {:?}",
            both.health.borrow().index,
            listed(&both.health.borrow()),
            both.composed.borrow().index,
            listed(&both.composed.borrow())
        );
    };
    assert_eq!(
        composed, health,
        "{step}: the composed view differs from ?passing"
    );
    health
}

fn ids(view: &[String], service: &str) -> Vec<String> {
    let mut out: Vec<String> = view
        .iter()
        .filter_map(|line| {
            let start = line.find(&format!("id: \"{service}-"))? + 5;
            let end = start + line[start..].find('"')?;
            Some(line[start..end].to_owned())
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn composed_equals_passing_through_every_kind_of_change() {
    init_tracing();
    let mut consul = Consul::start().await.unwrap();
    let client = consul.client();
    let agent = client.agent();
    let s = "diff";
    for i in 1..=3 {
        agent
            .service_register(&registration(s, i, 9000 + i as u16))
            .await
            .unwrap();
    }
    let mut both = Both::follow(&client, s);
    let view = compare(&client, &mut both, s, "registered").await;
    assert_eq!(ids(&view, s), ["diff-1", "diff-2", "diff-3"]);

    let set = |i: usize, c: usize, status: HealthStatus| {
        let agent = client.agent();
        let id = check_id(s, i, c);
        async move {
            agent
                .check_update(&id, status, "set by the test")
                .await
                .unwrap()
        }
    };

    set(1, 0, HealthStatus::Critical).await;
    let view = compare(&client, &mut both, s, "one of two checks critical").await;
    assert_eq!(ids(&view, s), ["diff-2", "diff-3"]);

    set(1, 0, HealthStatus::Passing).await;
    set(1, 1, HealthStatus::Warning).await;
    let view = compare(&client, &mut both, s, "the other check warning").await;
    assert_eq!(
        ids(&view, s),
        ["diff-2", "diff-3"],
        "?passing leaves a warning instance out (1.8.7, by behaviour)"
    );
    set(1, 1, HealthStatus::Passing).await;
    compare(&client, &mut both, s, "both passing again").await;

    agent
        .service_maintenance("diff-2", true, Some("test"))
        .await
        .unwrap();
    let view = compare(&client, &mut both, s, "service maintenance").await;
    assert_eq!(ids(&view, s), ["diff-1", "diff-3"]);
    agent
        .service_maintenance("diff-2", false, None)
        .await
        .unwrap();
    compare(&client, &mut both, s, "service maintenance off").await;

    agent.node_maintenance(true, Some("test")).await.unwrap();
    let view = compare(&client, &mut both, s, "node maintenance").await;
    assert!(view.is_empty(), "{view:?}");
    agent.node_maintenance(false, None).await.unwrap();
    let view = compare(&client, &mut both, s, "node maintenance off").await;
    assert_eq!(view.len(), 3);

    agent
        .service_register(&registration(s, 3, 9333))
        .await
        .unwrap();
    let view = compare(&client, &mut both, s, "re-registered on another port").await;
    assert!(view.iter().any(|l| l.contains("port: 9333")), "{view:?}");

    set(2, 0, HealthStatus::Critical).await;
    compare(&client, &mut both, s, "critical before deregistration").await;
    agent.service_deregister("diff-2").await.unwrap();
    let view = compare(&client, &mut both, s, "deregistered while critical").await;
    assert_eq!(ids(&view, s), ["diff-1", "diff-3"]);

    // A -dev agent keeps everything in memory: restarted, its index starts over.
    let before = both.composed.borrow().index;
    consul.restart().await.unwrap();
    let client = consul.client();
    let agent = client.agent();
    for i in [1, 4] {
        agent
            .service_register(&registration(s, i, 9000 + i as u16))
            .await
            .unwrap();
    }
    agent
        .check_update(&check_id(s, 4, 1), HealthStatus::Critical, "after restart")
        .await
        .unwrap();
    for (name, rx) in [
        ("health", &mut both.health),
        ("composed", &mut both.composed),
    ] {
        tokio::time::timeout(CATCH_UP, rx.wait_for(|v| v.index < before))
            .await
            .unwrap_or_else(|_| panic!("{name} never read the restarted agent"))
            .unwrap();
    }
    let view = compare(&client, &mut both, s, "agent restarted").await;
    assert_eq!(ids(&view, s), ["diff-1"]);
    assert!(
        both.composed.borrow().index < before,
        "the index went back ({} then {before}): the step tested what it says",
        both.composed.borrow().index
    );
}

#[tokio::test]
async fn composed_equals_passing_through_a_random_sequence() {
    init_tracing();
    let seed: u64 = std::env::var("COMPOSED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("composed_equals_passing_through_a_random_sequence: COMPOSED_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let agent = client.agent();
    let s = "rand";
    const INSTANCES: usize = 5;
    const STEPS: usize = 40;
    let mut registered = [false; INSTANCES];
    for (i, on) in registered.iter_mut().enumerate().take(3) {
        agent
            .service_register(&registration(s, i, 9100 + i as u16))
            .await
            .unwrap();
        *on = true;
    }
    let mut both = Both::follow(&client, s);
    compare(&client, &mut both, s, "registered").await;
    let mut node_maintenance = false;
    for step in 0..STEPS {
        let i = rng.random_range(0..INSTANCES);
        let what = rng.random_range(0..10);
        let done = if !registered[i] || what == 0 {
            // Register (again, on a port of the step's: a changed registration).
            let port = 9100 + (step * INSTANCES + i) as u16;
            agent
                .service_register(&registration(s, i, port))
                .await
                .unwrap();
            registered[i] = true;
            format!("register {i} on {port}")
        } else if what == 1 {
            agent.service_deregister(&format!("{s}-{i}")).await.unwrap();
            registered[i] = false;
            format!("deregister {i}")
        } else if what == 2 {
            let on = rng.random_bool(0.5);
            agent
                .service_maintenance(&format!("{s}-{i}"), on, None)
                .await
                .unwrap();
            format!("service maintenance {i} {on}")
        } else if what == 3 {
            node_maintenance = !node_maintenance;
            agent
                .node_maintenance(node_maintenance, None)
                .await
                .unwrap();
            format!("node maintenance {node_maintenance}")
        } else {
            let c = rng.random_range(0..CHECKS);
            let status = [
                HealthStatus::Passing,
                HealthStatus::Passing,
                HealthStatus::Warning,
                HealthStatus::Critical,
            ][rng.random_range(0..4)];
            agent
                .check_update(&check_id(s, i, c), status, "random")
                .await
                .unwrap();
            format!("check {i}/{c} {status}")
        };
        compare(
            &client,
            &mut both,
            s,
            &format!("seed {seed} step {step}: {done}"),
        )
        .await;
    }
}
