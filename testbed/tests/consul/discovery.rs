//! Every discovery source against real Consul: what each lists after a SIGKILL, that a session
//! on each loses nothing through it, the clear errors of a source that cannot work, every
//! source through an agent and an instance on `::1`, and DNS while an agent's servers are gone.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use consul_api::{
    AgentServiceRegistration, Client, GoDuration, PreparedQueryDefinition, ServiceQuery,
};
use consul_registry::{ConsulState, DiscoveryConfig, Snapshot, Source, discovery, failover};
use echo_client::{EchoClient, session::SessionConfig};
use echo_server::{config::Config as ServerConfig, server::Server};
use testbed::{
    Cluster, ClusterSpec, Consul, ConsulOptions, Member,
    experiment::{Experiment, Findings},
    procs::{ServerProcess, ServerSpec},
    progress::Progress,
    wait,
};
use tokio::{net::UdpSocket, sync::watch};
use tokio_util::sync::CancellationToken;

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
    let why = match tokio::time::timeout(timeout, rx.wait_for(ok)).await {
        Ok(Ok(found)) => return found.clone(),
        Ok(Err(_)) => "discovery ended".to_owned(),
        Err(_) => format!("not within {timeout:?}"),
    };
    panic!("{what}: {why}; last: {:?}", *rx.borrow())
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
        spec.args.interval = GoDuration(Duration::from_secs(1));
        spec.args.timeout = GoDuration(Duration::from_secs(1));
        servers.push(ServerProcess::spawn(&launcher, spec).await.unwrap());
    }
    wait::health_until(&client, SERVICE, true, Duration::from_secs(30), |e| {
        e.len() == 2
    })
    .await
    .unwrap();
    testbed::discovery::create_query(&client, QUERY, SERVICE, &[])
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

/// A service without checks (passing as long as it is registered) at 127.0.0.1:`port`.
fn plain_service(name: &str, id: &str, port: u16) -> AgentServiceRegistration {
    AgentServiceRegistration {
        id: Some(id.into()),
        name: name.into(),
        port: Some(port),
        address: Some("127.0.0.1".into()),
        ..Default::default()
    }
}

fn ids(s: &Snapshot) -> Vec<&str> {
    s.instances.iter().map(|i| i.id.as_str()).collect()
}

#[tokio::test]
async fn a_prepared_query_deleted_and_created_again_keeps_the_view_and_is_followed_again() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    const NAME: &str = "requery";
    client
        .agent()
        .service_register(&plain_service(NAME, "requery-1", 1))
        .await
        .unwrap();
    let definition = PreparedQueryDefinition {
        name: format!("{NAME}-passing"),
        service: ServiceQuery {
            service: NAME.into(),
            only_passing: true,
            ..Default::default()
        },
    };
    let id = client.prepared_query().create(&definition).await.unwrap();
    let mut config = DiscoveryConfig::new(NAME);
    config.source = Source::PreparedQuery {
        name: definition.name.clone(),
        every: Duration::from_millis(200),
    };
    let mut rx = discovery::spawn(client.clone(), config);
    wait_view(
        &mut rx,
        "the query's answer",
        Duration::from_secs(10),
        |s| ids(s) == ["requery-1"],
    )
    .await;

    // An operator deletes the query to create it anew: Consul answers 404 meanwhile.
    client.prepared_query().delete(&id).await.unwrap();
    let gone = wait_view(
        &mut rx,
        "the 404 of the deleted query",
        Duration::from_secs(10),
        |s| matches!(s.consul, ConsulState::Unreachable { .. }) || s.failure().is_some(),
    )
    .await;
    assert_eq!(
        gone.failure(),
        None,
        "a 404 after the query had worked is not permanent"
    );
    let ConsulState::Unreachable { error, .. } = &gone.consul else {
        unreachable!()
    };
    assert!(error.contains("404"), "{error}");
    assert_eq!(ids(&gone), ["requery-1"], "the last view keeps serving");

    client
        .agent()
        .service_register(&plain_service(NAME, "requery-2", 2))
        .await
        .unwrap();
    client.prepared_query().create(&definition).await.unwrap();
    let back = wait_view(
        &mut rx,
        "the query created again",
        Duration::from_secs(10),
        |s| s.consul == ConsulState::Reachable && s.instances.len() == 2,
    )
    .await;
    assert_eq!(ids(&back), ["requery-1", "requery-2"]);
}

#[tokio::test]
async fn a_fallback_datacenter_refusing_the_token_leaves_the_local_view_flowing() {
    init_tracing();
    const NAME: &str = "fallback-refused";
    // dc1 runs without ACLs (any token passes); dc2 has them on and does not know the token.
    let dc1 = Cluster::start(ClusterSpec {
        datacenter: "dc1".into(),
        ..ClusterSpec::new(1, 0)
    })
    .await
    .unwrap();
    let dc2 = Cluster::start_with(
        ConsulOptions::from_env()
            .unwrap()
            .with_acl("dc2-management-token"),
        ClusterSpec {
            datacenter: "dc2".into(),
            join_wan: dc1.server_addresses(),
            ..ClusterSpec::new(1, 0)
        },
    )
    .await
    .unwrap();
    let local = dc1.agent(Member::Server(0));
    let client = Client::new(
        local
            .config()
            .with_token(Some("a-token-dc2-does-not-know".into())),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !client
        .catalog()
        .datacenters()
        .await
        .unwrap_or_default()
        .iter()
        .any(|d| d == "dc2")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dc1 never saw dc2 over the WAN"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    local
        .client()
        .agent()
        .service_register(&plain_service(NAME, "local-1", 1))
        .await
        .unwrap();

    let mut merged = failover::spawn(client.clone(), DiscoveryConfig::new(NAME), &["dc2".into()]);
    wait_view(
        &mut merged,
        "dc1's instance",
        Duration::from_secs(20),
        |s| ids(s) == ["local-1"],
    )
    .await;
    // dc2 refuses the token for good: seen through a discovery of its own, started after the
    // failover's and going the same way.
    let mut only_dc2 = discovery::spawn(
        client.clone(),
        DiscoveryConfig {
            datacenter: Some("dc2".into()),
            ..DiscoveryConfig::new(NAME)
        },
    );
    let refused = wait_view(
        &mut only_dc2,
        "dc2's refusal",
        Duration::from_secs(20),
        |s| s.failure().is_some(),
    )
    .await;
    assert!(
        refused.failure().is_some_and(|e| e.contains("403")),
        "{:?}",
        refused.consul
    );

    // dc1's later changes still reach the merged view, and it never says "failed".
    local
        .client()
        .agent()
        .service_register(&plain_service(NAME, "local-2", 2))
        .await
        .unwrap();
    wait_view(
        &mut merged,
        "dc1's second instance",
        Duration::from_secs(20),
        |s| ids(s) == ["local-1", "local-2"],
    )
    .await;
    local
        .client()
        .agent()
        .service_deregister("local-1")
        .await
        .unwrap();
    let last = wait_view(
        &mut merged,
        "dc1's first instance gone",
        Duration::from_secs(20),
        |s| ids(s) == ["local-2"],
    )
    .await;
    assert_eq!(last.consul, ConsulState::Reachable);
    drop(dc2);
}

#[tokio::test]
async fn two_datacenters_fail_over_to_dc2_and_back_losing_nothing() {
    init_tracing();
    let config = testbed::datacenters::DatacentersConfig {
        servers: 1,
        poll: Duration::from_millis(500),
    };
    let report = config.run(&launcher(), &Progress::lines()).await.unwrap();
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
    let report = config.run(&launcher(), &Progress::lines()).await.unwrap();
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

#[tokio::test]
async fn every_source_reads_an_ipv6_instance_through_an_agent_on_ipv6() {
    init_tracing();
    let consul = Consul::start_with(ConsulOptions::from_env().unwrap().with_ipv6_loopback())
        .await
        .unwrap();
    let v6 = consul.ipv6_config().expect("the agent is on ::1");
    let dns = consul.ipv6_dns_addr().expect("the agent's DNS is on ::1");
    let client = Client::new(v6.clone()).unwrap();
    const V6: &str = "v6-echo";
    const V6_QUERY: &str = "v6-echo-passing";
    const V6_AGENT: &str = "v6-echo-no-address";

    // The real echo-server, on ::1, registered through the agent's [::1] API with its
    // address `::1` and an HTTP check the agent calls on [::1].
    let server = Server::bind(ServerConfig {
        name: V6.into(),
        id: format!("{V6}_1"),
        address: "::1".into(),
        bind: IpAddr::V6(Ipv6Addr::LOCALHOST),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        register: true,
        consul: v6.clone(),
        drain_timeout: Duration::from_millis(300),
        ..ServerConfig::local()
    })
    .await
    .unwrap();
    let echo_addr = server.echo_addr().to_string();
    assert!(echo_addr.starts_with("[::1]:"), "{echo_addr}");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(server.run(stop.clone().cancelled_owned()));
    wait::health_until(&client, V6, true, Duration::from_secs(30), |e| e.len() == 1)
        .await
        .unwrap();
    // The same server under a registration without an address: the agent's list names no
    // host, and the agent source dials the agent's own host.
    client
        .agent()
        .service_register(&AgentServiceRegistration {
            id: Some(V6_AGENT.into()),
            name: V6_AGENT.into(),
            port: Some(server_port(&echo_addr)),
            ..Default::default()
        })
        .await
        .unwrap();
    testbed::discovery::create_query(&client, V6_QUERY, V6, &[])
        .await
        .unwrap();

    let every = Duration::from_millis(200);
    let cases = [
        (V6, Source::Health),
        (V6, Source::Catalog),
        (V6, Source::Agent { every }),
        (
            V6,
            Source::PreparedQuery {
                name: V6_QUERY.into(),
                every,
            },
        ),
        (
            V6,
            Source::Dns {
                server: dns,
                query: None,
                every,
            },
        ),
        (
            V6,
            Source::Dns {
                server: dns,
                query: Some(V6_QUERY.into()),
                every,
            },
        ),
        (V6_AGENT, Source::Agent { every }),
    ];
    for (service, source) in cases {
        let what = format!("{service} via {}", label(&source));
        let mut config = DiscoveryConfig::new(service);
        config.source = source;
        let mut rx = discovery::spawn(client.clone(), config);
        let view = wait_view(&mut rx, &what, Duration::from_secs(20), |s| {
            !s.instances.is_empty()
        })
        .await;
        let listed: Vec<String> = view.instances.iter().map(|i| i.address()).collect();
        assert_eq!(listed, [echo_addr.as_str()], "{what}");
        let mut session = SessionConfig::new(service);
        session.message_timeout = Duration::from_secs(10);
        let echo = EchoClient::with_discovery(rx, session).unwrap();
        let payload = bytes::Bytes::from(what.clone());
        let reply = tokio::time::timeout(Duration::from_secs(15), echo.send(payload.clone()))
            .await
            .unwrap_or_else(|_| panic!("{what}: no reply"))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(reply.bytes, payload, "{what}");
    }
    stop.cancel();
    serving.await.unwrap().unwrap();
}

fn server_port(addr: &str) -> u16 {
    addr.parse::<SocketAddr>().unwrap().port()
}

/// The response code of a UDP SRV question about `name` (`a.b.c.`) to `server`, as its
/// number (2: SERVFAIL); `None` without an answer within a second.
async fn dns_rcode(server: SocketAddr, name: &str) -> Option<u8> {
    let mut query = vec![0x2a, 0x2a, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        query.push(u8::try_from(label.len()).unwrap());
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 33, 0, 1]);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&query, server).await.unwrap();
    let mut reply = [0; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut reply))
        .await
        .ok()?
        .ok()?;
    (len >= 12 && reply[..2] == query[..2]).then_some(reply[3] & 0x0f)
}

#[tokio::test]
async fn dns_servfail_from_an_agent_whose_servers_are_gone_is_an_outage_not_an_empty_list() {
    init_tracing();
    let mut cluster = Cluster::start(ClusterSpec::new(1, 1)).await.unwrap();
    const SERVICE: &str = "dns-outage";
    let agent = cluster.clients()[0].client();
    let dns = cluster.clients()[0].dns_addr();
    agent
        .agent()
        .service_register(&AgentServiceRegistration {
            id: Some(format!("{SERVICE}_1")),
            name: SERVICE.into(),
            address: Some("127.0.0.1".into()),
            port: Some(9),
            ..Default::default()
        })
        .await
        .unwrap();
    let source = Source::Dns {
        server: dns,
        query: None,
        every: Duration::from_millis(200),
    };
    let mut config = DiscoveryConfig::new(SERVICE);
    config.source = source;
    let mut before = discovery::spawn(agent.clone(), config.clone());
    wait_view(&mut before, "the instance", Duration::from_secs(30), |s| {
        s.instances.len() == 1
    })
    .await;
    // Every snapshot from here on: the view must never go empty.
    let emptied = Arc::new(Mutex::new(None::<Snapshot>));
    let watcher = {
        let mut rx = before.clone();
        let emptied = emptied.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let s = rx.borrow_and_update().clone();
                let mut first = emptied.lock().unwrap();
                if s.instances.is_empty() && first.is_none() {
                    *first = Some(s);
                }
            }
        })
    };

    cluster.crash(Member::Server(0)).await.unwrap();
    // The client agent answers SERVFAIL once it no longer tries the dead server (after its
    // RPC hold timeout, and fast once gossip has marked the server failed).
    let name = format!("{SERVICE}.service.consul.");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if dns_rcode(dns, &name).await == Some(2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never answered SERVFAIL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A discovery started now hears only SERVFAIL: an outage, never "no instances".
    let mut after = discovery::spawn(agent, config);
    let first = wait_view(&mut after, "an answer", Duration::from_secs(20), |s| {
        s.consul != ConsulState::Starting
    })
    .await;
    let ConsulState::Unreachable { error, .. } = &first.consul else {
        panic!("SERVFAIL read as an answer: {first:?}");
    };
    assert!(error.contains("rcode 2"), "{error}");
    // The one started before reads the same: an outage, its instance kept.
    let still = wait_view(&mut before, "the outage", Duration::from_secs(20), |s| {
        matches!(s.consul, ConsulState::Unreachable { .. }) || s.instances.is_empty()
    })
    .await;
    assert!(
        matches!(still.consul, ConsulState::Unreachable { .. }) && still.instances.len() == 1,
        "{still:?}"
    );
    watcher.abort();
    let emptied = emptied.lock().unwrap().take();
    assert!(emptied.is_none(), "the view went empty: {emptied:?}");
}
