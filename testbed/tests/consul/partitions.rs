//! Network faults between the agents of a real cluster (consul-harness's `network`): a cut
//! that Consul itself sees (the cut agent's `serfHealth` goes critical on the servers, and
//! passing again after the heal), and the partitions experiment's scenarios.
//!
//! Without root or `nft`/`tc` these tests print `skipped: <why>` and pass, unless the
//! network is required ([`network::required`]: `CI`, `TESTBED_BACKEND=docker` as `.ci/run`
//! sets it, or `TESTBED_NETWORK=required`), where they fail with the missing piece named.

use std::time::Duration;

use testbed::{
    Cluster, ClusterSpec, Member,
    experiment::{Experiment, Findings},
    network::{self, Network},
    owner::Owner,
    partitions::{self, Scenario},
    progress::Progress,
};
use tokio::time::Instant;

use crate::common::{init_tracing, launcher};

/// `Some(why)` when network faults cannot run here and may be skipped; panics when they
/// are required.
pub fn skip_without_network() -> Option<String> {
    match network::available() {
        Ok(()) => None,
        Err(e) if network::required() => panic!("{e}"),
        Err(e) => {
            eprintln!("skipped: {e}");
            Some(e.to_string())
        }
    }
}

/// The `serfHealth` status of `member`'s node as the first server's catalog has it.
async fn serf_health(cluster: &Cluster, member: Member) -> Option<String> {
    let node = &cluster.agent(member).spec().node_name;
    let (checks, _) = cluster.servers()[0]
        .client()
        .health()
        .node(node, &Default::default())
        .await
        .ok()?;
    checks
        .into_iter()
        .find(|c| c.check_id == "serfHealth")
        .map(|c| format!("{:?}", c.status).to_lowercase())
}

async fn wait_serf(cluster: &Cluster, member: Member, status: &str, limit: Duration) -> Duration {
    let from = Instant::now();
    loop {
        let now = serf_health(cluster, member).await;
        if now.as_deref() == Some(status) {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < limit,
            "{member}'s serfHealth still {now:?} after {limit:?}, waiting for {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_cut_agent_fails_in_consul_and_a_heal_restores_it() {
    init_tracing();
    if skip_without_network().is_some() {
        return;
    }
    let cluster = Cluster::start(ClusterSpec {
        own_uids: true,
        ..ClusterSpec::new(1, 2)
    })
    .await
    .unwrap();
    let mut net = Network::new(&cluster).unwrap();
    let cut = Member::Client(0);
    wait_serf(&cluster, cut, "passing", Duration::from_secs(5)).await;

    net.isolate(cut, &cluster.members()).unwrap();
    let failed = wait_serf(&cluster, cut, "critical", Duration::from_secs(30)).await;
    // The agent itself still runs and answers its API: only the network is cut.
    cluster
        .agent(cut)
        .client()
        .agent()
        .agent_self()
        .await
        .unwrap();
    // The other client agent is untouched.
    assert_eq!(
        serf_health(&cluster, Member::Client(1)).await.as_deref(),
        Some("passing")
    );
    net.heal().unwrap();
    let back = wait_serf(&cluster, cut, "passing", Duration::from_secs(60)).await;
    eprintln!("MEASURED cut → serfHealth critical {failed:?}; heal → passing {back:?}");

    // A panic while rules are in force removes them (the handle drops on unwinding).
    let left = std::sync::Mutex::new(String::new());
    let panicked = std::thread::scope(|s| {
        s.spawn(|| {
            let mut net = Network::new(&cluster).unwrap();
            net.isolate(cut, &cluster.members()).unwrap();
            *left.lock().unwrap() = net.table().to_owned();
            panic!("on purpose, with {cut} cut off");
        })
        .join()
    });
    assert!(panicked.is_err());
    let table = left.into_inner().unwrap();
    assert!(!tables().contains(&table), "{table} left behind by a panic");

    // Dropping the handle removes its table.
    let table = net.table().to_owned();
    drop(net);
    assert!(!tables().contains(&table), "{table} left behind");
}

fn tables() -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tables_of_dead_owners_are_swept_and_live_ones_kept() {
    if skip_without_network().is_some() {
        return;
    }
    // pid_max is at most 2^22: this pid never lives. A live pid with another start time is
    // a reused pid: its table is swept too. This process's own table stays.
    let me = Owner::me().unwrap();
    let dead = network::table_name(
        Owner {
            pid: 4_194_305,
            start: 12,
        },
        0,
    );
    let reused = network::table_name(Owner { start: 1, ..me }, 0);
    let live = network::table_name(me, 9_999);
    for t in [&dead, &reused, &live] {
        let ok = std::process::Command::new("nft")
            .args(["add", "table", "ip", t])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    network::sweep();
    let now = tables();
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "ip", &live])
        .status();
    assert!(!now.contains(&dead), "{now}");
    assert!(!now.contains(&reused), "{now}");
    assert!(now.contains(&live), "a live owner's table was swept: {now}");
}

/// A scenario of `testbed partitions` on one server, shortened.
fn short(scenario: Scenario) -> partitions::Config {
    partitions::Config {
        servers: 1,
        cut_for: Duration::from_secs(12),
        degrade_for: Duration::from_secs(15),
        losses: vec![20.0],
        delay: (Duration::ZERO, Duration::ZERO),
        ..partitions::Config::new(scenario)
    }
}

fn print(outcome: &partitions::Outcome) {
    for table in outcome.tables() {
        eprintln!("MEASURED {:?}:\n{}", outcome.scenario, table.markdown());
    }
}

/// What every scenario must show: nothing lost, no panic, and after each heal every view
/// equal to Consul's passing set (no stuck watch).
fn common_invariants(outcome: &partitions::Outcome) {
    assert_eq!(outcome.basics.tally.lost, 0, "{:?}", outcome.basics.errors);
    assert!(
        outcome.basics.panics.is_empty(),
        "{:?}",
        outcome.basics.panics
    );
    assert!(!outcome.steps.is_empty());
    for step in &outcome.steps {
        // The fault is real: the kernel dropped Consul's packets.
        assert!(step.packets_dropped > 0, "{}: nothing dropped", step.fault);
        assert!(
            step.consul_whole_ms.is_some(),
            "{}: Consul never whole again",
            step.fault
        );
        for c in &step.clients {
            assert!(
                c.sent > 20,
                "{}: {} sent only {}",
                step.fault,
                c.client,
                c.sent
            );
            assert!(
                c.behind_consul_ms.is_some(),
                "{}: {}'s view never equalled Consul's",
                step.fault,
                c.client
            );
        }
    }
    assert!(
        outcome.violations().is_empty(),
        "{:?}",
        outcome.violations()
    );
}

#[tokio::test]
async fn a_client_agent_cut_off_drops_its_instances_and_nothing_is_lost() {
    init_tracing();
    if skip_without_network().is_some() {
        return;
    }
    let outcome = short(Scenario::AgentCut)
        .run(&launcher(), &Progress::hidden())
        .await
        .unwrap();
    print(&outcome);
    common_invariants(&outcome);
    let step = &outcome.steps[0];
    // The cut is real: Consul drops the cut node's two instances while it lasts.
    let dropped = step.consul_dropped_ms.expect("Consul saw the cut");
    assert!(dropped < 12_000.0, "{dropped} ms");
    assert!(step.consul_flaps >= 2, "{step:?}");
    let home = step
        .clients
        .iter()
        .find(|c| c.client == "node 2 default")
        .unwrap();
    assert!(home.dropped_ms.is_some(), "{home:?}");
}

#[tokio::test]
async fn a_one_way_cut_loses_nothing_and_every_view_recovers() {
    init_tracing();
    if skip_without_network().is_some() {
        return;
    }
    let outcome = short(Scenario::OneWay)
        .run(&launcher(), &Progress::hidden())
        .await
        .unwrap();
    print(&outcome);
    common_invariants(&outcome);
}

#[tokio::test]
async fn lossy_links_lose_no_echo_and_every_view_recovers() {
    init_tracing();
    if skip_without_network().is_some() {
        return;
    }
    let outcome = short(Scenario::Lossy)
        .run(&launcher(), &Progress::hidden())
        .await
        .unwrap();
    print(&outcome);
    common_invariants(&outcome);
    assert_eq!(outcome.steps.len(), 1);
    assert_eq!(outcome.steps[0].fault, "loss 20 %");
}

/// An HTTP check target: 200 while `healthy`, 500 otherwise; counts the failing answers.
struct Target {
    addr: std::net::SocketAddr,
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Target {
    async fn start() -> Target {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (h, f) = (healthy.clone(), failed.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let _ = conn.read(&mut buf).await;
                let status = if h.load(Ordering::SeqCst) {
                    "200 OK"
                } else {
                    f.fetch_add(1, Ordering::SeqCst);
                    "500 Internal Server Error"
                };
                let _ = conn
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        Target {
            addr,
            healthy,
            failed,
        }
    }
}

/// `FailuresBeforeCritical` as Consul 1.8.7 applies it (its API returns an empty check
/// `Definition`, so only behaviour shows it): with 3, a check turns critical at its third
/// consecutive failed run, not before; without, at the first.
#[tokio::test]
async fn failures_before_critical_holds_a_check_passing_through_two_failures() {
    use std::sync::atomic::Ordering;
    use testbed::Consul;
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let mut targets = Vec::new();
    for (id, threshold) in [("damped", Some(3)), ("plain", None)] {
        let target = Target::start().await;
        let registration = consul_api::AgentServiceRegistration {
            id: Some(id.into()),
            name: "thresholds".into(),
            port: Some(target.addr.port()),
            check: Some(consul_api::AgentServiceCheck {
                check_id: Some(format!("check-{id}")),
                http: Some(format!("http://{}/", target.addr)),
                interval: Some(consul_api::GoDuration::from_secs(1)),
                failures_before_critical: threshold,
                ..Default::default()
            }),
            ..Default::default()
        };
        client
            .agent()
            .service_register(&registration)
            .await
            .unwrap();
        targets.push((id, target));
    }
    let status = |id: &'static str| {
        let client = client.clone();
        async move {
            let (checks, _) = client
                .health()
                .checks("thresholds", &Default::default())
                .await
                .unwrap();
            checks
                .into_iter()
                .find(|c| c.check_id == format!("check-{id}"))
                .map(|c| format!("{:?}", c.status).to_lowercase())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status("damped").await.as_deref() != Some("passing")
        || status("plain").await.as_deref() != Some("passing")
    {
        assert!(Instant::now() < deadline, "the checks never passed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (_, t) in &targets {
        t.healthy.store(false, Ordering::SeqCst);
    }
    let mut critical_after = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while critical_after.len() < 2 {
        for (id, t) in &targets {
            if !critical_after.contains_key(id) && status(id).await.as_deref() == Some("critical") {
                critical_after.insert(*id, t.failed.load(Ordering::SeqCst));
            }
        }
        assert!(Instant::now() < deadline, "critical: {critical_after:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("MEASURED failing runs before critical: {critical_after:?}");
    assert!(critical_after["plain"] <= 2, "{critical_after:?}");
    assert!(critical_after["damped"] >= 3, "{critical_after:?}");
}

/// f, shortened: a check flipping every 1–1.5 s for 30 s. Consul records each flap; the
/// undamped view shows them all; the damped view at most a fifth of them, and never holds
/// out every instance. With damping off (the damped client built without it) the damped
/// view shows them all and this fails.
#[tokio::test]
async fn damping_shows_at_most_a_fifth_of_the_flaps_consul_records() {
    init_tracing();
    let outcome = partitions::Config {
        servers: 1,
        flap_for: Duration::from_secs(30),
        flap_phase: (Duration::from_millis(1000), Duration::from_millis(1500)),
        ..partitions::Config::new(Scenario::Flapping)
    }
    .run(&launcher(), &Progress::hidden())
    .await
    .unwrap();
    print(&outcome);
    assert_eq!(outcome.basics.tally.lost, 0, "{:?}", outcome.basics.errors);
    assert!(
        outcome.violations().is_empty(),
        "{:?}",
        outcome.violations()
    );
    let step = &outcome.steps[0];
    let goal = step.flap_goal().expect("f's figures");
    eprintln!("MEASURED flaps: {goal:?}");
    // The check really flapped in Consul, and a view without damping follows every flap.
    assert!(goal.consul >= 10, "{goal:?}");
    assert!(goal.undamped + 1 >= goal.consul, "{goal:?}");
    assert!(goal.damped * 5 <= goal.consul, "{goal:?}");
    let damped = step
        .clients
        .iter()
        .find(|c| c.client.ends_with(" damped"))
        .unwrap();
    // Four instances listed: damping held out one (at most half), never all.
    assert!(
        (1..=2).contains(&damped.most_held_out),
        "{}",
        damped.most_held_out
    );
    assert_eq!(damped.emptied_by_damping, 0);
    assert!(damped.fewest_listed.is_some_and(|n| n >= 2), "{damped:?}");
    // Once the flapping stops, the damped view catches up with Consul: one hold-down.
    assert!(damped.behind_consul_ms.is_some(), "{damped:?}");
}
