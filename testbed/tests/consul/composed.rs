//! `Source::Composed` against `?passing`, differentially: the same changes made on a real
//! agent, both sources followed by discovery, compared after each step once both have caught
//! up with Consul — several checks per instance, warning, a check straight from critical to
//! warning, service and node maintenance, an external node's check in a status Consul does
//! not know, a re-registration, a deregistration while critical, an agent restart (its index going back)
//! — then a seeded random sequence (`COMPOSED_SEED` replays one; the seed is printed).

use std::time::Duration;

use consul_api::{
    AgentServiceCheck, AgentServiceRegistration, CatalogCheckRegistration, CatalogRegistration,
    CatalogServiceRegistration, Client, GoDuration, HealthStatus, QueryOptions,
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

/// Once Consul has settled, wait until each source has caught up with its index and both show
/// the same instances, and those satisfy `expect`: one source may show a change a moment
/// before the other (they read different tables), and an agent may sync a write to the catalog
/// only after `settled` looked, so only a difference that lasts [`CATCH_UP`] fails, with what
/// each source showed.
async fn compare(
    client: &Client,
    both: &mut Both,
    service: &str,
    step: &str,
    expect: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let (target, composed_target) = settled(client, service, step).await;
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let (health_index, health) = {
            let s = both.health.borrow_and_update();
            (s.index, listed(&s))
        };
        let (composed_index, composed) = {
            let s = both.composed.borrow_and_update();
            (s.index, listed(&s))
        };
        let caught_up = health_index >= target && composed_index >= composed_target;
        if caught_up && health == composed && expect(&health) {
            return health;
        }
        let changed = async {
            tokio::select! {
                r = both.health.changed() => r,
                r = both.composed.changed() => r,
            }
            .expect("discovery runs as long as its receiver")
        };
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            panic!(
                "{step}: after {CATCH_UP:?}, {}: health at {health_index} (Consul {target}) \
                 {health:?}, composed at {composed_index} (Consul {composed_target}) {composed:?}",
                if !caught_up {
                    "not caught up"
                } else if health != composed {
                    "the composed view differs from ?passing"
                } else {
                    "both agree but not as the step expects"
                }
            );
        }
    }
}

/// Any view: the step checks only that both sources agree.
fn any(_: &[String]) -> bool {
    true
}

/// A view of exactly these instances of `service`.
fn exactly<'a>(service: &'a str, want: &'a [&'a str]) -> impl Fn(&[String]) -> bool + 'a {
    move |view| ids(view, service) == want
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
    let all = ["diff-1", "diff-2", "diff-3"];
    compare(&client, &mut both, s, "registered", exactly(s, &all)).await;

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
    let step = "one of two checks critical";
    compare(
        &client,
        &mut both,
        s,
        step,
        exactly(s, &["diff-2", "diff-3"]),
    )
    .await;

    // One write that wakes the critical and the warning reads, in either order.
    set(1, 0, HealthStatus::Warning).await;
    let (step, held_out) = ("a critical check straight to warning", ["diff-2", "diff-3"]);
    compare(&client, &mut both, s, step, exactly(s, &held_out)).await;

    set(1, 0, HealthStatus::Passing).await;
    set(1, 1, HealthStatus::Warning).await;
    // ?passing leaves a warning instance out (1.8.7, by behaviour).
    let step = "the other check warning: out of ?passing";
    compare(
        &client,
        &mut both,
        s,
        step,
        exactly(s, &["diff-2", "diff-3"]),
    )
    .await;
    set(1, 1, HealthStatus::Passing).await;
    compare(
        &client,
        &mut both,
        s,
        "both passing again",
        exactly(s, &all),
    )
    .await;

    agent
        .service_maintenance("diff-2", true, Some("test"))
        .await
        .unwrap();
    let step = "service maintenance";
    compare(
        &client,
        &mut both,
        s,
        step,
        exactly(s, &["diff-1", "diff-3"]),
    )
    .await;
    agent
        .service_maintenance("diff-2", false, None)
        .await
        .unwrap();
    compare(
        &client,
        &mut both,
        s,
        "service maintenance off",
        exactly(s, &all),
    )
    .await;

    agent.node_maintenance(true, Some("test")).await.unwrap();
    compare(&client, &mut both, s, "node maintenance", exactly(s, &[])).await;
    agent.node_maintenance(false, None).await.unwrap();
    compare(
        &client,
        &mut both,
        s,
        "node maintenance off",
        exactly(s, &all),
    )
    .await;

    // An external monitor's registration (as consul-esm makes): a node of its own, with a
    // check whose status the catalog endpoint stores without knowing it.
    let foreign = |status: &str| CatalogRegistration {
        node: "diff-foreign".into(),
        address: "127.0.0.1".into(),
        service: Some(CatalogServiceRegistration {
            id: "diff-9".into(),
            service: s.into(),
            address: "127.0.0.1".into(),
            port: 9009,
            ..Default::default()
        }),
        check: Some(CatalogCheckRegistration {
            check_id: "diff-9-monitor".into(),
            name: "external monitor".into(),
            status: status.into(),
            service_id: "diff-9".into(),
            output: String::new(),
        }),
    };
    let with_foreign = ["diff-1", "diff-2", "diff-3", "diff-9"];
    let catalog = client.catalog();
    catalog.register(&foreign("passing")).await.unwrap();
    let step = "an external node's instance, passing";
    compare(&client, &mut both, s, step, exactly(s, &with_foreign)).await;
    catalog.register(&foreign("degraded")).await.unwrap();
    let step = "its check in a status Consul does not know: out of ?passing";
    compare(&client, &mut both, s, step, exactly(s, &all)).await;
    catalog.register(&foreign("passing")).await.unwrap();
    let step = "its check passing again";
    compare(&client, &mut both, s, step, exactly(s, &with_foreign)).await;
    catalog.deregister_node("diff-foreign").await.unwrap();
    compare(
        &client,
        &mut both,
        s,
        "the external node removed",
        exactly(s, &all),
    )
    .await;

    agent
        .service_register(&registration(s, 3, 9333))
        .await
        .unwrap();
    let moved = |view: &[String]| view.iter().any(|l| l.contains("port: 9333"));
    compare(
        &client,
        &mut both,
        s,
        "re-registered on another port",
        moved,
    )
    .await;

    set(2, 0, HealthStatus::Critical).await;
    let step = "critical before deregistration";
    compare(
        &client,
        &mut both,
        s,
        step,
        exactly(s, &["diff-1", "diff-3"]),
    )
    .await;
    agent.service_deregister("diff-2").await.unwrap();
    let step = "deregistered while critical";
    compare(
        &client,
        &mut both,
        s,
        step,
        exactly(s, &["diff-1", "diff-3"]),
    )
    .await;

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
    compare(
        &client,
        &mut both,
        s,
        "agent restarted",
        exactly(s, &["diff-1"]),
    )
    .await;
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
    compare(&client, &mut both, s, "registered", any).await;
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
            any,
        )
        .await;
    }
    // A write the agent synced only after the last step's look is compared here.
    let step = format!("seed {seed}: once the last step has landed");
    compare(&client, &mut both, s, &step, any).await;
}
