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
    cluster.agent(cut).client().agent().agent_self().await.unwrap();
    // The other client agent is untouched.
    assert_eq!(
        serf_health(&cluster, Member::Client(1)).await.as_deref(),
        Some("passing")
    );
    net.heal().unwrap();
    let back = wait_serf(&cluster, cut, "passing", Duration::from_secs(60)).await;
    eprintln!("MEASURED cut → serfHealth critical {failed:?}; heal → passing {back:?}");

    // Dropping the handle removes its table.
    let table = net.table().to_owned();
    drop(net);
    let tables = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains(&table),
        "{table} left behind"
    );
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
    assert!(outcome.basics.panics.is_empty(), "{:?}", outcome.basics.panics);
    assert!(!outcome.steps.is_empty());
    for step in &outcome.steps {
        // The fault is real: the kernel dropped Consul's packets.
        assert!(step.packets_dropped > 0, "{}: nothing dropped", step.fault);
        assert!(step.consul_whole_ms.is_some(), "{}: Consul never whole again", step.fault);
        for c in &step.clients {
            assert!(c.sent > 20, "{}: {} sent only {}", step.fault, c.client, c.sent);
            assert!(
                c.behind_consul_ms.is_some(),
                "{}: {}'s view never equalled Consul's",
                step.fault,
                c.client
            );
        }
    }
    assert!(outcome.violations().is_empty(), "{:?}", outcome.violations());
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
    let home = step.clients.iter().find(|c| c.client == "node 2 default").unwrap();
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
