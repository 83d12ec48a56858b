//! The opt-in reaper (the `consul_reaper` library and sidecar) against real
//! Consul: removal at the service's `reap-after`, never before it and at most 1 s after here,
//! where every test runs in parallel on a loaded machine (the experiment measures the 50 ms);
//! a check that recovers resets its clock, a flapping check is never removed, the reaper
//! killed and restarted mid-deadline, Consul restarted, a token without `service:write`, a
//! service registered again in place by a new start of its process, and an echo-server whose
//! check is forced unhealthy (the reaper and its registrar do not fight). TTL checks set by
//! the test make "critical" an instant the test knows. Each test takes 12 to 20 s.

use std::{collections::BTreeMap, time::Duration};

use consul_api::{
    AgentServiceCheck, AgentServiceRegistration, Client, GoDuration, HealthCheck, HealthStatus,
    QueryOptions, health::HealthCheckDefinition,
};
use consul_reaper::{Event, FOLLOWING, META_KEY, Notice, REMOVED, ReaperConfig, START_KEY};
use testbed::{
    Consul, ConsulOptions,
    faults::acl,
    procs::{ServerProcess, ServerSpec},
    signal::Signal,
    wait,
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::common::{init_tracing, launcher};

const LIMIT: Duration = Duration::from_secs(30);

/// A service with a TTL check (an hour: only the test changes its status), opted in with
/// `reap_after` if given.
fn ttl_service(
    id: &str,
    reap_after: Option<&str>,
    status: HealthStatus,
) -> AgentServiceRegistration {
    AgentServiceRegistration {
        id: Some(id.into()),
        name: id.into(),
        meta: reap_after
            .map(|v| BTreeMap::from([(META_KEY.to_owned(), v.to_owned())]))
            .unwrap_or_default(),
        check: Some(AgentServiceCheck {
            ttl: Some(GoDuration::from_secs(3600)),
            status: Some(status.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Set `id`'s check; returns the instant just before the request, which the change cannot
/// precede (under load the answer may reach the test well after the reaper saw the change).
async fn set(client: &Client, id: &str, status: HealthStatus) -> Instant {
    let before = Instant::now();
    client
        .agent()
        .check_update(&format!("service:{id}"), status, "set by the test")
        .await
        .unwrap();
    before
}

/// Register `registration`; returns the instant just before the request.
async fn register(client: &Client, registration: &AgentServiceRegistration) -> Instant {
    let before = Instant::now();
    client.agent().service_register(registration).await.unwrap();
    before
}

/// Follow `id` until it is gone from the catalog, in the background: the instant it went.
fn gone(client: &Client, id: &str, timeout: Duration) -> JoinHandle<Instant> {
    let client = client.clone();
    let id = id.to_owned();
    tokio::spawn(async move {
        wait::deregistered(&client, &id, &id, timeout)
            .await
            .unwrap()
    })
}

/// `took` (from just before the change) is `setting`: never less, at most 1 s more (the
/// request's own latency included, on a machine running every test at once).
fn assert_on_time(what: &str, took: Duration, setting: Duration) {
    assert!(
        took >= setting && took <= setting + Duration::from_secs(1),
        "{what}: removed {took:?} after turning critical, for a setting of {setting:?}"
    );
}

/// The reaper as a task of the test, its events on a channel.
struct InProcess {
    events: mpsc::UnboundedReceiver<Event>,
    seen: Vec<Event>,
    stop: CancellationToken,
    task: JoinHandle<consul_reaper::Result<()>>,
}

impl InProcess {
    fn start(client: Client) -> InProcess {
        let (tx, events) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(consul_reaper::run(
            client,
            ReaperConfig::default(),
            stop.clone(),
            move |e| {
                let _ = tx.send(e);
            },
        ));
        InProcess {
            events,
            seen: Vec::new(),
            stop,
            task,
        }
    }

    /// Until an event matching `what` (kept, like every event, in `seen`).
    async fn until(&mut self, what: impl Fn(&Event) -> bool) {
        tokio::time::timeout(LIMIT, async {
            loop {
                let e = self.events.recv().await.expect("the reaper runs");
                let hit = what(&e);
                self.seen.push(e);
                if hit {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no such event within {LIMIT:?}; saw {:#?}", self.seen));
    }

    /// Every event so far.
    fn drain(&mut self) -> &[Event] {
        while let Ok(e) = self.events.try_recv() {
            self.seen.push(e);
        }
        &self.seen
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn tracking(n: usize) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Observed { tracked, .. } if *tracked == n)
}

#[tokio::test]
async fn removes_each_opted_in_service_at_its_setting_and_nothing_else() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let mut reaper = InProcess::start(client.clone());
    reaper.until(tracking(0)).await;
    let five = Duration::from_secs(5);
    for registration in [
        ttl_service("dies", Some("5s"), HealthStatus::Passing),
        ttl_service("recovers", Some("5s"), HealthStatus::Passing),
        ttl_service("not-opted-in", None, HealthStatus::Critical),
        ttl_service("misconfigured", Some("soon"), HealthStatus::Critical),
    ] {
        client
            .agent()
            .service_register(&registration)
            .await
            .unwrap();
    }
    reaper.until(tracking(2)).await;
    let dies = gone(&client, "dies", LIMIT);
    let recovers = gone(&client, "recovers", LIMIT);

    // Never passing: critical from its registration on.
    let never_registration = ttl_service("never-passing", Some("5s"), HealthStatus::Critical);
    let never_at = register(&client, &never_registration).await;
    let never = gone(&client, "never-passing", LIMIT);
    let dies_at = set(&client, "dies", HealthStatus::Critical).await;
    // Critical for 3 s, passing for 1 s, critical again: the clock starts over.
    set(&client, "recovers", HealthStatus::Critical).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    set(&client, "recovers", HealthStatus::Passing).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let recovers_at = set(&client, "recovers", HealthStatus::Critical).await;

    assert_on_time("dies", dies.await.unwrap() - dies_at, five);
    assert_on_time("never-passing", never.await.unwrap() - never_at, five);
    assert_on_time("recovers", recovers.await.unwrap() - recovers_at, five);

    // Critical for longer than any setting here, and still registered.
    let services = client.agent().services().await.unwrap();
    assert!(services.contains_key("not-opted-in"), "{services:?}");
    assert!(services.contains_key("misconfigured"), "{services:?}");
    // The watcher above can see a removal before the reaper reports it (the report follows
    // Consul's answer to the removal): wait for each report, then count them.
    for id in ["dies", "never-passing", "recovers"] {
        let removed =
            |e: &Event| matches!(e, Event::Removed { removal, .. } if removal.service_id == id);
        if !reaper.drain().iter().any(removed) {
            reaper.until(removed).await;
        }
    }
    let seen = reaper.drain();
    assert!(
        seen.iter().any(|e| matches!(e,
            Event::Notice(Notice::InvalidSetting { service_id, value })
                if service_id == "misconfigured" && value == "soon")),
        "{seen:#?}"
    );
    let removed: Vec<&str> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Removed { removal, .. } => Some(removal.service_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(removed.len(), 3, "each once: {removed:?}");
    reaper.stop().await;
}

#[tokio::test]
async fn a_check_flapping_every_second_is_never_removed() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let mut reaper = InProcess::start(client.clone());
    client
        .agent()
        .service_register(&ttl_service("flapping", Some("5s"), HealthStatus::Passing))
        .await
        .unwrap();
    reaper.until(tracking(1)).await;
    // Critical for 1 s, passing for 1 s, six times: 6 s critical in all, never 5 s in a row.
    for _ in 0..6 {
        set(&client, "flapping", HealthStatus::Critical).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        set(&client, "flapping", HealthStatus::Passing).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let services = client.agent().services().await.unwrap();
    assert!(services.contains_key("flapping"), "removed while flapping");
    // The reaper saw every critical spell (it was watching, not asleep).
    let mut spells = 0;
    let mut was_critical = false;
    for e in reaper.drain() {
        if let Event::Observed { critical, .. } = e {
            let critical = *critical > 0;
            spells += usize::from(critical && !was_critical);
            was_critical = critical;
        }
    }
    assert_eq!(spells, 6, "{:#?}", reaper.seen);
    // Left critical, it goes at its setting.
    let flapping = gone(&client, "flapping", LIMIT);
    let at = set(&client, "flapping", HealthStatus::Critical).await;
    assert_on_time(
        "flapping",
        flapping.await.unwrap() - at,
        Duration::from_secs(5),
    );
    reaper.stop().await;
}

#[tokio::test]
async fn a_reaper_killed_mid_deadline_never_removes_early_and_catches_up_after_restart() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let launcher = launcher();
    let mut first = launcher
        .spawn_subcommand("reaper", &consul.config(), &[])
        .unwrap();
    first.output().wait_for(FOLLOWING, LIMIT).await.unwrap();
    client
        .agent()
        .service_register(&ttl_service("survivor", Some("10s"), HealthStatus::Passing))
        .await
        .unwrap();
    let survivor = gone(&client, "survivor", Duration::from_secs(60));
    let critical_at = set(&client, "survivor", HealthStatus::Critical).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    first.kill().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spawned_at = Instant::now();
    let second = launcher
        .spawn_subcommand("reaper", &consul.config(), &[])
        .unwrap();
    second.output().wait_for(FOLLOWING, LIMIT).await.unwrap();
    let following_at = Instant::now();
    let removed_at = survivor.await.unwrap();

    // Never early: not at critical + 10 s (the first reaper's deadline, while none ran)...
    assert!(removed_at - critical_at > Duration::from_secs(16));
    // ... but 10 s after the restarted reaper first saw the check critical (the worst case
    // the module states: it cannot know since when).
    assert!(
        removed_at - spawned_at >= Duration::from_secs(10)
            && removed_at - following_at <= Duration::from_millis(10_500),
        "removed {:?} after the restart, {:?} after it followed",
        removed_at - spawned_at,
        removed_at - following_at
    );
    // The restarted one removed it (its log line may trail the catalog a moment).
    let line = second
        .output()
        .wait_for(REMOVED, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(line.text.contains("service=survivor"), "{}", line.text);
    assert!(first.output().matching(REMOVED).is_empty());
}

#[tokio::test]
async fn a_consul_restart_starts_the_clocks_over() {
    init_tracing();
    let mut consul = Consul::start().await.unwrap();
    let client = consul.client();
    let mut reaper = InProcess::start(client.clone());
    reaper.until(tracking(0)).await;
    let phoenix = ttl_service("phoenix", Some("10s"), HealthStatus::Critical);
    client.agent().service_register(&phoenix).await.unwrap();
    reaper.until(tracking(1)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A dev agent keeps nothing: a new node ID, indexes from scratch, no services.
    consul.restart().await.unwrap();
    reaper
        .until(|e| matches!(e, Event::Notice(Notice::AgentReplaced)))
        .await;
    // Its owner registers it again, still failing: a new clock, not the old one's.
    let registered_at = register(&client, &phoenix).await;
    let phoenix_gone = gone(&client, "phoenix", LIMIT);
    assert_on_time(
        "phoenix after the restart",
        phoenix_gone.await.unwrap() - registered_at,
        Duration::from_secs(10),
    );
    let seen = reaper.drain();
    assert!(
        seen.iter().any(|e| matches!(e, Event::Lost { .. })),
        "{seen:#?}"
    );
    reaper.stop().await;
}

#[tokio::test]
async fn with_acls_a_token_without_service_write_is_refused_once_with_the_hint() {
    init_tracing();
    let consul = Consul::start_with(ConsulOptions::from_env().unwrap().with_acl(acl::secret()))
        .await
        .unwrap();
    let admin = consul.client();
    let reader = acl::token_for(
        &admin,
        "reaper-read-only",
        r#"agent_prefix "" { policy = "read" }
           node_prefix "" { policy = "read" }
           service_prefix "" { policy = "read" }"#,
    )
    .await
    .unwrap();
    let writer = acl::token_for(
        &admin,
        "reaper",
        r#"agent_prefix "" { policy = "read" }
           node_prefix "" { policy = "read" }
           service_prefix "" { policy = "write" }"#,
    )
    .await
    .unwrap();
    let with_token =
        |token: Option<String>| Client::new(consul.config().with_token(token)).unwrap();

    // No token at all: it cannot even follow, and says what the token needs.
    let anonymous = consul_reaper::run(
        with_token(None),
        ReaperConfig::default(),
        CancellationToken::new(),
        |_| {},
    );
    let error = tokio::time::timeout(LIMIT, anonymous)
        .await
        .expect("ends at once")
        .unwrap_err();
    let printed = format!("{:#}", anyhow::Error::from(error));
    assert!(
        printed.contains("node:read") && printed.contains("403"),
        "{printed}"
    );

    // Read-only: the removal is refused once, with the permission named.
    client_register(&admin, "guarded").await;
    let mut read_only = InProcess::start(with_token(Some(reader)));
    read_only
        .until(|e| matches!(e, Event::Refused { .. }))
        .await;
    let Some(Event::Refused { error, .. }) = read_only.seen.pop() else {
        unreachable!("until() keeps the event it waited for last")
    };
    let printed = format!("{:#}", anyhow::Error::from(error));
    assert!(
        printed.contains("service:write") && printed.contains("CONSUL_HTTP_TOKEN"),
        "{printed}"
    );
    // A token that may: removed 5 s after that reaper first saw it critical. Meanwhile the
    // read-only reaper, whose deadline passed 5 s before, tried nothing more.
    let guarded = gone(&admin, "guarded", LIMIT);
    let mut writing = InProcess::start(with_token(Some(writer)));
    writing.until(tracking(1)).await;
    let following_at = Instant::now();
    let removed_at = guarded.await.unwrap();
    assert!(removed_at - following_at <= Duration::from_millis(5_500));
    let seen = read_only.drain();
    let tries = seen
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Refused { .. } | Event::Failed { .. } | Event::Removed { .. }
            )
        })
        .count();
    assert_eq!(
        tries, 0,
        "a try after the refusal (taken out above): {seen:#?}"
    );
    read_only.stop().await;
    writing.stop().await;
}

/// Register `id`, critical, opted in with 5 s.
async fn client_register(admin: &Client, id: &str) {
    admin
        .agent()
        .service_register(&ttl_service(id, Some("5s"), HealthStatus::Critical))
        .await
        .unwrap();
}

/// The agent's own check of service `id`, as the catalog has it.
async fn node_check(client: &Client, id: &str) -> HealthCheck {
    let me = client.agent().agent_self().await.unwrap();
    let (checks, _) = client
        .health()
        .node(&me.config.node_name, &QueryOptions::default())
        .await
        .unwrap();
    checks
        .into_iter()
        .find(|c| c.service_id == id)
        .unwrap_or_else(|| panic!("no check of {id}"))
}

#[tokio::test]
async fn a_process_that_comes_back_with_the_same_id_gets_a_new_clock() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let mut reaper = InProcess::start(client.clone());
    reaper.until(tracking(0)).await;
    // The run behind issue 31: reap-after 6 s; the process crashes (critical), and comes back
    // with the same ID 4 s later, still critical until its check next runs.
    let mut crashed = ttl_service("phoenix", None, HealthStatus::Critical);
    consul_reaper::opt_in(&mut crashed, Duration::from_secs(6));
    register(&client, &crashed).await;
    reaper.until(tracking(1)).await;
    let before = node_check(&client, "phoenix").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut came_back = crashed.clone();
    consul_reaper::opt_in(&mut came_back, Duration::from_secs(6));
    assert_ne!(came_back.meta.get(START_KEY), crashed.meta.get(START_KEY));
    let phoenix = gone(&client, "phoenix", LIMIT);
    let again_at = register(&client, &came_back).await;

    // What Consul 1.8.7 does with it: the same check, the same indexes, still critical, and
    // no definition to tell anything by. Only the Meta changed.
    let after = node_check(&client, "phoenix").await;
    assert_eq!(
        (after.create_index, after.modify_index, after.status),
        (
            before.create_index,
            before.modify_index,
            HealthStatus::Critical
        )
    );
    assert_eq!(after.definition, HealthCheckDefinition::default());
    let services = client.agent().services().await.unwrap();
    assert_eq!(
        services["phoenix"]
            .meta
            .as_ref()
            .and_then(|m| m.get(START_KEY)),
        came_back.meta.get(START_KEY)
    );

    // Never on the crashed start's deadline: 6 s after it came back.
    assert_on_time(
        "phoenix after it came back",
        phoenix.await.unwrap() - again_at,
        Duration::from_secs(6),
    );
    reaper.stop().await;
}

/// Collect every event for `window` (into `seen`); returns where in `seen` they start.
async fn events_for(reaper: &mut InProcess, window: Duration) -> usize {
    let from = reaper.seen.len();
    let _ = tokio::time::timeout(window, async {
        while let Some(e) = reaper.events.recv().await {
            reaper.seen.push(e);
        }
    })
    .await;
    from
}

#[tokio::test]
async fn an_alive_server_forced_unhealthy_is_removed_once_and_its_registrar_wins() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let mut reaper = InProcess::start(client.clone());
    reaper.until(tracking(0)).await;
    let reap_after = Duration::from_secs(2);
    let mut spec = ServerSpec::seed(consul.config()).unwrap();
    spec.args.interval = GoDuration(Duration::from_secs(1));
    spec.args.timeout = GoDuration(Duration::from_secs(1));
    spec.args.reap_after = Some(GoDuration(reap_after));
    let server = ServerProcess::spawn(&launcher(), spec.clone())
        .await
        .unwrap();
    wait::passing(&client, &spec.args.name, LIMIT)
        .await
        .unwrap();
    reaper.until(tracking(1)).await;

    // /check answers 503 from now on: removed at reap-after, registered again by its
    // registrar at once.
    server.process.signal(Signal::SIGUSR1).unwrap();
    let id = spec.args.id.clone();
    reaper
        .until(|e| matches!(e, Event::Removed { removal, .. } if removal.service_id == id))
        .await;
    let again = "re-registered with Consul";
    server
        .process
        .output()
        .wait_for(again, LIMIT)
        .await
        .unwrap();

    // Then no fight: over three more reap-afters (and a check interval), no removal, no
    // registration; the service stays registered, critical.
    let from = events_for(&mut reaper, 3 * reap_after + spec.interval()).await;
    let removals = reaper.seen[from..]
        .iter()
        .filter(|e| matches!(e, Event::Removed { .. }))
        .count();
    let registrations = server.process.output().matching(again).len();
    assert_eq!(
        (removals, registrations),
        (0, 1),
        "removals after the first, registrations by the registrar: {:#?}",
        reaper.seen
    );
    assert!(
        reaper.seen.iter().any(|e| matches!(e,
            Event::Notice(Notice::Yielded { service_id }) if *service_id == spec.args.id)),
        "{:#?}",
        reaper.seen
    );
    let services = client.agent().services().await.unwrap();
    assert!(services.contains_key(&spec.args.id), "{services:?}");
    let check = node_check(&client, &spec.args.id).await;
    assert_eq!(check.status, HealthStatus::Critical);
    reaper.stop().await;
}
