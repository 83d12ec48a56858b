//! Foreign registrations our types cannot hold, against real Consul 1.8.7: it accepts and
//! returns `Port: 70000` and `Port: -1` (a Go `int`). Such an entry is left out of every
//! list and logged; it never takes the rest down: the good instances of the same service
//! are discovered through every source, and the reaper still sees (and removes) a dead
//! opted-in service registered next to it, and survives a `reap-after` beyond Go's range.

use std::{collections::BTreeMap, time::Duration};

use consul_api::{
    AgentServiceCheck, AgentServiceRegistration, Client, GoDuration, HealthStatus, QueryOptions,
};
use consul_reaper::{META_KEY, ReaperConfig};
use consul_registry::{ConsulState, DiscoveryConfig, Source, discovery};
use testbed::{Consul, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::common::init_tracing;

const LIMIT: Duration = Duration::from_secs(30);
const SERVICE: &str = "mixed";

/// `PUT` `body` to the agent as is (our own types cannot even write a port of 70000): the
/// HTTP status it answered.
async fn put_raw(client: &Client, path: &str, body: &str) -> u16 {
    let base = client.base_url();
    let addr = format!(
        "{}:{}",
        base.host_str().unwrap(),
        base.port_or_known_default().unwrap()
    );
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// A fresh agent, its client, and on it `mixed-70000` and `mixed-minus-1` registered as a
/// foreign tool could (Consul says 200).
async fn agent_with_foreign_data() -> (Consul, Client) {
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    register_foreign(&client).await;
    (consul, client)
}

/// Consul's answer to a health query on [`SERVICE`] (every instance), as text.
async fn raw_health(client: &Client) -> String {
    let (raw, _) = client
        .health()
        .service_answer(SERVICE, None, false, &QueryOptions::default())
        .await
        .unwrap();
    String::from_utf8_lossy(raw.body()).into_owned()
}

/// Register `mixed-70000` and `mixed-minus-1` as a foreign tool could; Consul says 200.
async fn register_foreign(client: &Client) {
    for (id, port) in [("mixed-70000", "70000"), ("mixed-minus-1", "-1")] {
        let body = format!(
            r#"{{"ID": "{id}", "Name": "{SERVICE}", "Port": {port}, "Address": "127.0.0.1"}}"#
        );
        let status = put_raw(client, "/v1/agent/service/register", &body).await;
        assert_eq!(status, 200, "Consul 1.8.7 accepts a port of {port}");
    }
}

#[tokio::test]
async fn a_port_out_of_range_is_left_out_and_the_good_instances_are_discovered() {
    init_tracing();
    let (_consul, client) = agent_with_foreign_data().await;
    client
        .agent()
        .service_register(&AgentServiceRegistration {
            id: Some("mixed-good".into()),
            name: SERVICE.into(),
            port: Some(8080),
            address: Some("127.0.0.1".into()),
            ..Default::default()
        })
        .await
        .unwrap();

    // Consul returns the bad ports as they were given.
    let raw = raw_health(&client).await;
    assert!(raw.contains("70000") && raw.contains("-1"), "{raw}");

    // The typed lists: the good one, and only it.
    let ids = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    let (entries, _) = client
        .health()
        .service(SERVICE, None, false, &QueryOptions::default())
        .await
        .expect("the health answer decodes");
    assert_eq!(
        ids(entries.into_iter().map(|e| e.service.id).collect()),
        ["mixed-good"]
    );
    let services = client
        .agent()
        .services()
        .await
        .expect("/v1/agent/services decodes");
    assert_eq!(
        ids(services.into_keys().collect()),
        ["mixed-good"],
        "the agent's own list"
    );
    let (entries, _) = client
        .catalog()
        .service(SERVICE, None, &QueryOptions::default())
        .await
        .expect("the catalog answer decodes");
    assert_eq!(
        ids(entries.into_iter().map(|e| e.service_id).collect()),
        ["mixed-good"]
    );

    // Discovery through the health, catalog and agent sources: reachable, the good one.
    for source in [
        Source::Health,
        Source::Catalog,
        Source::Agent {
            every: Duration::from_millis(300),
        },
    ] {
        let name = source.name();
        let mut rx = discovery::spawn(
            client.clone(),
            DiscoveryConfig {
                source,
                ..DiscoveryConfig::new(SERVICE)
            },
        );
        let found = tokio::time::timeout(
            LIMIT,
            rx.wait_for(|s| s.consul == ConsulState::Reachable && !s.instances.is_empty()),
        )
        .await
        .map(|r| r.expect("discovery runs").clone());
        let seen = found
            .unwrap_or_else(|_| panic!("{name}: not reachable with instances: {:?}", *rx.borrow()));
        let listed: Vec<_> = seen.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(listed, ["mixed-good"], "{name}");
        assert_eq!(seen.instances[0].port, 8080, "{name}");
    }
}

#[tokio::test]
async fn the_reaper_survives_foreign_data_and_removes_a_dead_service() {
    init_tracing();
    let (_consul, client) = agent_with_foreign_data().await;
    // Opted in, critical from its registration on; one whose `reap-after` is beyond Go's
    // range (it once overflowed the parser: a panic in the reaper), one at Go's limit.
    for (id, reap_after) in [
        ("dead", "2s"),
        ("beyond-range", "340282366920938463463374607431768211.999us"),
        // Go's largest duration: a deadline 292 years away, never due.
        ("at-the-limit", "2562047h47m16.854775807s"),
    ] {
        client
            .agent()
            .service_register(&AgentServiceRegistration {
                id: Some(id.into()),
                name: id.into(),
                meta: BTreeMap::from([(META_KEY.to_owned(), reap_after.to_owned())]),
                check: Some(AgentServiceCheck {
                    ttl: Some(GoDuration::from_secs(3600)),
                    status: Some(HealthStatus::Critical.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let stop = CancellationToken::new();
    let task = tokio::spawn(consul_reaper::run(
        client.clone(),
        ReaperConfig::default(),
        stop.clone(),
        |_| {},
    ));
    wait::deregistered(&client, "dead", "dead", LIMIT)
        .await
        .expect("the reaper removed the dead service");
    // The foreign ones are left alone (they did not opt in).
    let raw = raw_health(&client).await;
    assert!(
        raw.contains("mixed-70000") && raw.contains("mixed-minus-1"),
        "{raw}"
    );
    // The one beyond range is left alone (not a valid setting), and the reaper still runs.
    let services = client.agent().services().await.unwrap();
    assert!(services.contains_key("beyond-range"), "{services:?}");
    assert!(services.contains_key("at-the-limit"), "{services:?}");
    assert!(!task.is_finished(), "the reaper runs");
    stop.cancel();
    task.await.unwrap().unwrap();
}
