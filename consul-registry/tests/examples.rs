//! The two examples, run against real Consul as a user would run them: two `ttl_service`
//! instances register themselves and pass; `failover_client` is answered by both; one is
//! stopped (Ctrl-C: drain, deregister) and the client goes on with the other without an
//! error; the stopped one is gone from Consul.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/failover_client.rs"]
mod failover_client;
#[path = "../examples/ttl_service.rs"]
mod ttl_service;

use std::{collections::BTreeSet, time::Duration};

use consul_harness::{Consul, wait};
use consul_registry::{Balancer, DiscoveryConfig, Strategy, discovery};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn the_ttl_service_registers_and_the_failover_client_survives_a_stop() {
    let consul = Consul::start().await.unwrap();
    let start = |stop: CancellationToken| {
        let client = consul.client();
        async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let task = tokio::spawn(ttl_service::run(client, listener, "hello", stop));
            (format!("hello-{port}"), task)
        }
    };
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let (a, task_a) = start(stop_a.clone()).await;
    let (b, _task_b) = start(stop_b.clone()).await;
    wait::health_until(
        &consul.client(),
        "hello",
        true,
        Duration::from_secs(30),
        |e| e.len() == 2,
    )
    .await
    .expect("both instances register and pass by their TTL heartbeats");

    let mut snapshots = discovery::spawn(consul.client(), DiscoveryConfig::new("hello"));
    let mut balancer = Balancer::new(Strategy::RoundRobin, Duration::from_secs(2));
    let http = reqwest::Client::new();
    let deadline = || Instant::now() + Duration::from_secs(20);
    let mut answered = BTreeSet::new();
    for _ in 0..4 {
        let (instance, body) =
            failover_client::get(&http, &mut balancer, &mut snapshots, deadline())
                .await
                .unwrap();
        assert_eq!(body, format!("hello from {}\n", instance.id));
        answered.insert(instance.id);
    }
    assert_eq!(
        answered,
        BTreeSet::from([a.clone(), b.clone()]),
        "round-robin over both"
    );

    // Ctrl-C on `a`: it drains and deregisters; every later request is answered by `b`.
    stop_a.cancel();
    task_a.await.unwrap().unwrap();
    wait::deregistered(&consul.client(), "hello", &a, Duration::from_secs(10))
        .await
        .expect("the stopped instance deregistered itself");
    for _ in 0..4 {
        let (instance, _) = failover_client::get(&http, &mut balancer, &mut snapshots, deadline())
            .await
            .unwrap();
        assert_eq!(instance.id, b);
    }
    stop_b.cancel();
}
