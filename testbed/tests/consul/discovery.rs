//! Every discovery source against real Consul: what each lists after a SIGKILL, that a session
//! on each loses nothing through it, and the clear errors of a source that cannot work.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use consul_api::{Client, PreparedQueryDefinition, ServiceQuery};
use consul_registry::{ConsulState, DiscoveryConfig, Snapshot, Source, discovery};
use echo_client::{EchoClient, session::SessionConfig};
use testbed::{
    Consul,
    experiment::Findings,
    procs::{ServerProcess, ServerSpec},
    progress::Progress,
    wait,
};
use tokio::sync::watch;

use crate::common::{init_tracing, launcher};

const SERVICE: &str = "sources";
const QUERY: &str = "sources-passing";

fn sources(dns: SocketAddr) -> Vec<Source> {
    let every = Duration::from_millis(300);
    vec![
        Source::Health,
        Source::Catalog,
        Source::Agent { every },
        Source::PreparedQuery {
            name: QUERY.into(),
            every,
        },
        Source::Dns {
            server: dns,
            query: None,
            every,
        },
        Source::Dns {
            server: dns,
            query: Some(QUERY.into()),
            every,
        },
    ]
}

fn label(source: &Source) -> String {
    match source {
        Source::Dns { query: Some(_), .. } => "dns-query".into(),
        other => other.name().into(),
    }
}

async fn wait_view(
    rx: &mut watch::Receiver<Snapshot>,
    what: &str,
    timeout: Duration,
    ok: impl FnMut(&Snapshot) -> bool,
) -> Snapshot {
    let found = tokio::time::timeout(timeout, rx.wait_for(ok))
        .await
        .map(|r| r.expect("discovery ended").clone());
    found.unwrap_or_else(|_| panic!("{what}: not within {timeout:?}; last: {:?}", *rx.borrow()))
}

/// An experiment's tables and paragraph, on the test's output.
fn show(report: &impl Findings) {
    for table in report.tables() {
        eprintln!("{}", table.markdown());
    }
    eprintln!("{}", report.details());
}

fn lists(s: &Snapshot, addr: &str) -> bool {
    s.instances.iter().any(|i| i.address() == addr)
}

#[tokio::test]
async fn every_source_drops_or_keeps_a_killed_instance_as_consul_says_and_no_session_loses_a_message()
 {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let launcher = launcher();
    let mut servers = Vec::new();
    for i in 1..=2 {
        let mut spec = ServerSpec::seed(consul.config())
            .unwrap()
            .named(SERVICE, format!("{SERVICE}_{i}"));
        spec.interval = Duration::from_secs(1);
        spec.timeout = Duration::from_secs(1);
        servers.push(ServerProcess::spawn(&launcher, spec).await.unwrap());
    }
    wait::health_until(&client, SERVICE, true, Duration::from_secs(30), |e| {
        e.len() == 2
    })
    .await
    .unwrap();
    client
        .prepared_query()
        .create(&PreparedQueryDefinition {
            name: QUERY.into(),
            service: ServiceQuery {
                service: SERVICE.into(),
                only_passing: true,
                ..Default::default()
            },
        })
        .await
        .unwrap();

    // Each source feeds its own discovery and session; all list both servers.
    let mut running = Vec::new();
    for source in sources(consul.dns_addr()) {
        let mut config = DiscoveryConfig::new(SERVICE);
        config.source = source.clone();
        let mut rx = discovery::spawn(client.clone(), config);
        let first = wait_view(&mut rx, &label(&source), Duration::from_secs(20), |s| {
            s.instances.len() == 2
        })
        .await;
        let addrs: Vec<String> = first.instances.iter().map(|i| i.address()).collect();
        for server in &servers {
            let addr = server.spec.echo_addr().to_string();
            assert!(addrs.contains(&addr), "{}: {addrs:?}", label(&source));
        }
        let mut session = SessionConfig::new(SERVICE);
        session.message_timeout = Duration::from_secs(10);
        let echo = EchoClient::with_discovery(rx.clone(), session).unwrap();
        running.push((source, rx, echo));
    }

    // Stream through every session while the first server dies.
    let dead = servers[0].spec.echo_addr().to_string();
    let streams: Vec<_> = running
        .iter()
        .map(|(source, _, echo)| {
            let echo = echo.clone();
            let name = label(source);
            tokio::spawn(async move {
                let mut lost = Vec::new();
                for seq in 0..60u32 {
                    let payload = Bytes::from(format!("{name} {seq}"));
                    match echo.send(payload.clone()).await {
                        Ok(reply) if reply.bytes == payload => {}
                        other => lost.push(format!("{seq}: {other:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (name, lost)
            })
        })
        .collect();
    // Every session is streaming (a message answered) before the kill.
    for (source, _, echo) in &running {
        let probe = Bytes::from(format!("{} before the kill", label(source)));
        let reply = tokio::time::timeout(Duration::from_secs(10), echo.send(probe.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.bytes, probe);
    }
    servers[0].process.kill().await.unwrap();

    // Sources that know health drop it within a few check intervals...
    for (source, rx, _) in running.iter_mut() {
        if matches!(source, Source::Catalog | Source::Agent { .. }) {
            continue;
        }
        wait_view(rx, &label(source), Duration::from_secs(15), |s| {
            s.instances.len() == 1 && !lists(s, &dead)
        })
        .await;
    }
    // ...while the catalog and the agent's list still hand it out: only Consul's reaper
    // (60-90 s here) or an operator removes it from them.
    for (source, rx, _) in &running {
        if matches!(source, Source::Catalog | Source::Agent { .. }) {
            assert!(
                lists(&rx.borrow(), &dead),
                "{} dropped the dead instance before its deregistration",
                label(source)
            );
        }
    }
    for stream in streams {
        let (name, lost) = stream.await.unwrap();
        assert!(lost.is_empty(), "{name} lost messages: {lost:?}");
    }

    // An operator deregisters it: the catalog and the agent's list follow.
    client
        .agent()
        .service_deregister(&format!("{SERVICE}_1"))
        .await
        .unwrap();
    for (source, rx, _) in running.iter_mut() {
        wait_view(rx, &label(source), Duration::from_secs(10), |s| {
            !lists(s, &dead)
        })
        .await;
    }
}

#[tokio::test]
async fn a_source_that_cannot_work_says_why() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client: Client = consul.client();

    // An unknown prepared query: Consul's 404, for good.
    let mut config = DiscoveryConfig::new(SERVICE);
    config.source = Source::PreparedQuery {
        name: "no-such-query".into(),
        every: Duration::from_millis(200),
    };
    let mut rx = discovery::spawn(client.clone(), config);
    let failed = wait_view(&mut rx, "unknown query", Duration::from_secs(10), |s| {
        s.failure().is_some()
    })
    .await;
    let error = failed.failure().unwrap();
    assert!(
        error.contains("404") && error.contains("no-such-query"),
        "{error}"
    );

    // No DNS interface at that address: unreachable, retried, and the message says where to
    // look.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut config = DiscoveryConfig::new(SERVICE);
    config.source = Source::Dns {
        server: addr,
        query: None,
        every: Duration::from_millis(200),
    };
    let mut rx = discovery::spawn(client.clone(), config);
    let down = wait_view(&mut rx, "no DNS port", Duration::from_secs(10), |s| {
        matches!(s.consul, ConsulState::Unreachable { .. })
    })
    .await;
    let ConsulState::Unreachable { error, .. } = &down.consul else {
        unreachable!()
    };
    assert!(
        error.contains(&addr.to_string()) && error.contains("DNS interface"),
        "{error}"
    );

    // A service nobody registered: an empty list from DNS (NXDOMAIN), not an error.
    let mut config = DiscoveryConfig::new("nobody-registered-this");
    config.source = Source::Dns {
        server: consul.dns_addr(),
        query: None,
        every: Duration::from_millis(200),
    };
    let mut rx = discovery::spawn(client, config);
    let empty = wait_view(
        &mut rx,
        "an unknown service",
        Duration::from_secs(10),
        |s| s.consul == ConsulState::Reachable,
    )
    .await;
    assert!(empty.instances.is_empty());
}

#[tokio::test]
async fn two_datacenters_fail_over_to_dc2_and_back_losing_nothing() {
    init_tracing();
    let report = testbed::datacenters::run(
        &launcher(),
        1,
        Duration::from_millis(500),
        &Progress::lines(),
    )
    .await
    .unwrap();
    show(&report);
    assert_eq!(
        (
            report.query_before.datacenter.as_str(),
            report.query_before.failovers
        ),
        ("dc1", 0)
    );
    assert_eq!(
        (
            report.query_during.datacenter.as_str(),
            report.query_during.failovers
        ),
        ("dc2", 1),
        "the prepared query failed over"
    );
    assert_eq!(report.rows.len(), 3);
    for row in &report.rows {
        assert_eq!(row.lost, 0, "{}", row.client);
        assert!(
            row.first_dc2_reply_ms.is_some(),
            "{}: never served by dc2",
            row.client
        );
        assert!(
            row.back_to_dc1_s.is_some(),
            "{}: never back on dc1",
            row.client
        );
        assert!(row.sent > 0, "{}", row.client);
    }
}

#[tokio::test]
async fn a_scale_out_takes_load_and_a_scale_in_loses_nothing() {
    init_tracing();
    let config = testbed::elastic::ElasticConfig {
        sessions: 96,
        message_interval: consul_api::GoDuration(Duration::from_millis(200)),
        steady: consul_api::GoDuration::from_secs(2),
        ..Default::default()
    };
    let report = testbed::elastic::run(&launcher(), &config, &Progress::lines())
        .await
        .unwrap();
    show(&report);
    for run in &report.runs {
        assert_eq!(run.lost, 0, "{}", run.strategy);
        assert!(run.sent > 0);
        for s in &run.new_servers {
            // Each of 96 sessions moves to a given new server with probability 1/6: none
            // doing so has probability (5/6)^96 ≈ 2.5e-8. Without spreading, none moves.
            assert!(
                s.first_reply_after_view.is_some(),
                "{}: {} never served",
                run.strategy,
                s.id
            );
        }
        assert_eq!(run.shares.len(), 6, "{}: {:?}", run.strategy, run.shares);
    }
}
