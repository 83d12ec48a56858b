//! Discovery at scale against real Consul: hundreds of instances churning under a streaming
//! client. Nothing may be lost, the client's view must end where Consul's does, and a change
//! must not rebuild the instances it did not touch.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use consul_api::{AgentServiceRegistration, Client};
use consul_registry::{DiscoveryConfig, Snapshot, discovery};
use echo_client::{EchoClient, session::SessionConfig};
use echo_server::{config::Config as ServerConfig, server::Server};
use futures::{StreamExt, stream};
use rand::{Rng, SeedableRng, rngs::StdRng};
use testbed::{
    Consul,
    scenario::observers::{Stream, StreamSpec},
    wait,
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::common::init_tracing;

const SERVICE: &str = "churn";
const FLEET: usize = 500;
/// Churn rounds (one instance replaced each), one every [`ROUND`].
const ROUNDS: usize = 120;
const ROUND: Duration = Duration::from_millis(100);

/// One in-process echo-server (the real one, not registering itself: the test registers it,
/// without a check, so that 500 of them cost the agent nothing to keep passing).
struct Member {
    port: u16,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(client: &Client, id: &str) -> Member {
    let config = ServerConfig {
        drain_timeout: Duration::from_millis(300),
        ..ServerConfig::local()
    };
    let server = Server::bind(config).await.unwrap();
    let port = server.echo_addr().port();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            server.run(stop.cancelled_owned()).await.unwrap();
        }
    });
    client
        .agent()
        .service_register(&AgentServiceRegistration {
            id: Some(id.to_owned()),
            name: SERVICE.into(),
            address: Some("127.0.0.1".into()),
            port: Some(port),
            ..Default::default()
        })
        .await
        .unwrap();
    Member { port, stop, task }
}

async fn wait_view(
    rx: &mut watch::Receiver<Snapshot>,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let timeout = Duration::from_secs(30);
    let found = tokio::time::timeout(timeout, rx.wait_for(|s| pred(s)))
        .await
        .map(|r| r.expect("discovery ended").clone());
    found.unwrap_or_else(|_| {
        panic!(
            "{what}: not within {timeout:?}; last view has {} instances",
            rx.borrow().instances.len()
        )
    })
}

fn ids(s: &Snapshot) -> BTreeSet<String> {
    s.instances.iter().map(|i| i.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_churning_instances_lose_no_message_and_the_view_follows_consul() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();

    // 1. The fleet, registered 16 at a time.
    let mut fleet: HashMap<String, Member> = stream::iter(0..FLEET)
        .map(|i| {
            let client = client.clone();
            async move {
                let id = format!("{SERVICE}-{i:04}");
                let member = start(&client, &id).await;
                (id, member)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    wait::health_until(&client, SERVICE, true, Duration::from_secs(60), |e| {
        e.len() == FLEET
    })
    .await
    .unwrap();

    // 2. One client, streaming, on the default discovery.
    let mut rx = discovery::spawn(client.clone(), DiscoveryConfig::new(SERVICE));
    let before = wait_view(&mut rx, "the whole fleet listed", |s| {
        s.instances.len() == FLEET
    })
    .await;
    let mut session = SessionConfig::new(SERVICE);
    session.message_timeout = Duration::from_secs(15);
    session.seed = Some(1);
    let echo = EchoClient::with_discovery(rx.clone(), session).unwrap();
    let traffic = Stream::start(
        &echo,
        StreamSpec::every("churn", Duration::from_millis(20), 5_000),
    );
    traffic
        .wait_for("a first reply", Duration::from_secs(20), |o| {
            o.result.is_ok()
        })
        .await
        .unwrap();

    // One change (one instance leaves) rebuilds nothing else: the other 499 are the same
    // allocations in both views.
    let (first_id, first) = fleet
        .iter()
        .next()
        .map(|(id, m)| (id.clone(), m.port))
        .unwrap();
    client.agent().service_deregister(&first_id).await.unwrap();
    let after = wait_view(&mut rx, "one deregistration seen", |s| {
        s.instances.len() == FLEET - 1
    })
    .await;
    let shared = after
        .instances
        .iter()
        .filter(|i| before.instances.iter().any(|b| Arc::ptr_eq(b, i)))
        .count();
    assert_eq!(shared, FLEET - 1, "unchanged instances reused, not rebuilt");
    let member = fleet.remove(&first_id).unwrap();
    member.stop.cancel();
    member.task.await.unwrap();
    fleet.insert(first_id.clone(), start(&client, &first_id).await);
    assert_ne!(fleet[&first_id].port, first);

    // 3. Churn: each round one instance leaves and a new one joins. Every fourth round the
    // instance the client is on leaves; the others are random. Half leave gracefully
    // (deregistered, then stopped), half abruptly (stopped while still listed, deregistered
    // after): the client must resend what was un-answered on it, elsewhere.
    let mut rng = StdRng::seed_from_u64(19);
    let mut served_by = BTreeSet::new();
    for round in 0..ROUNDS {
        let current = traffic.last_instance();
        if let Some(id) = &current {
            served_by.insert(id.clone());
        }
        let victim = match current.filter(|id| round.is_multiple_of(4) && fleet.contains_key(id)) {
            Some(id) => id,
            None => {
                let k = rng.random_range(0..fleet.len());
                fleet.keys().nth(k).unwrap().clone()
            }
        };
        let member = fleet.remove(&victim).unwrap();
        if round.is_multiple_of(2) {
            client.agent().service_deregister(&victim).await.unwrap();
            member.stop.cancel();
        } else {
            member.stop.cancel();
            client.agent().service_deregister(&victim).await.unwrap();
        }
        member.task.await.unwrap();
        let id = format!("{SERVICE}-{:04}", FLEET + round);
        fleet.insert(id.clone(), start(&client, &id).await);
        tokio::time::sleep(ROUND).await;
    }

    // 4. The view ends where Consul is, and every message was answered, exactly.
    let live: BTreeSet<String> = fleet.keys().cloned().collect();
    wait::health_until(&client, SERVICE, true, Duration::from_secs(30), |e| {
        e.len() == FLEET
    })
    .await
    .unwrap();
    let view = wait_view(&mut rx, "the view equal to the live fleet", |s| {
        ids(s) == live
    })
    .await;
    assert_eq!(view.instances.len(), FLEET);

    let outcomes = traffic.finish().await;
    let resent = outcomes
        .iter()
        .filter(|o| o.result.as_ref().is_ok_and(|s| s.attempts > 1))
        .count();
    eprintln!(
        "churn: {} messages, {resent} answered after a resend, served by {} instances, {ROUNDS} \
         instances replaced",
        outcomes.len(),
        served_by.len()
    );
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "lost: {} of {}: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    let inexact = outcomes
        .iter()
        .filter(|o| o.result.as_ref().is_ok_and(|s| !s.exact))
        .count();
    assert_eq!(inexact, 0, "every reply byte-exact");
    assert!(
        outcomes.len() >= 300,
        "streamed through the churn: {}",
        outcomes.len()
    );
    // The client was moved off its instance every fourth round: it must have been served by
    // many instances, not one that happened to survive.
    assert!(served_by.len() >= 10, "served by {served_by:?}");

    for (_, member) in fleet {
        member.stop.cancel();
        member.task.await.unwrap();
    }
}

/// Consul 1.8.7's `?passing` filter removes a critical entry by moving the last entry into its
/// place (`filterNonPassing`), so one check flipping changes the list in two places. The client
/// decodes each answer by what changed: this must cost it one or two entries parsed, with the
/// others kept as the same instances — not a parse of everything after the flipped entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipping_check_under_the_passing_filter_is_decoded_by_what_changed() {
    use consul_api::{AgentServiceCheck, GoDuration, HealthStatus, QueryOptions};
    use consul_registry::decode::Decoder;

    init_tracing();
    const N: usize = 60;
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let check = |i: usize| format!("flip-ttl-{i:02}");
    stream::iter(0..N)
        .for_each_concurrent(8, |i| {
            let client = &client;
            async move {
                client
                    .agent()
                    .service_register(&AgentServiceRegistration {
                        id: Some(format!("flip-{i:02}")),
                        name: "flip".into(),
                        address: Some("127.0.0.1".into()),
                        port: Some(20_000 + i as u16),
                        check: Some(AgentServiceCheck {
                            check_id: Some(check(i)),
                            ttl: Some(GoDuration::from_secs(3600)),
                            status: Some("passing".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        })
        .await;
    // Wait (blocking queries) until the answer lists `want` instances (their IDs in Consul's
    // order), then read it again the way discovery does: decoded as it arrives, in the
    // chunks the socket gives (a 150 KB answer from this `-dev` agent).
    let ids = |want: usize| {
        let client = &client;
        async move {
            wait::health_until(client, "flip", true, Duration::from_secs(20), |e| {
                e.len() == want
            })
            .await
            .unwrap()
            .0
            .iter()
            .map(|e| e.service.id.clone())
            .collect::<Vec<String>>()
        }
    };
    async fn read(
        client: &consul_api::Client,
        decoder: &mut Decoder,
    ) -> Vec<Arc<consul_registry::Instance>> {
        let mut decoding = decoder.start();
        let (_, path) = client
            .health()
            .service_answer_to("flip", None, true, &QueryOptions::default(), &mut decoding)
            .await
            .unwrap();
        decoding.finish(&path).unwrap()
    }
    let mut decoder = Decoder::new();
    assert_eq!(ids(N).await.len(), N);
    let mut listed = read(&client, &mut decoder).await;
    assert_eq!(listed.len(), N);

    // The first entry's check turns critical (the last entry takes its place), then passes.
    for (status, want) in [(HealthStatus::Critical, N - 1), (HealthStatus::Passing, N)] {
        client
            .agent()
            .check_update(&check(0), status, "flipped by the test")
            .await
            .unwrap();
        let ids = ids(want).await;
        let next = read(&client, &mut decoder).await;
        assert_eq!(
            next.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
            ids,
            "the decoded instances are the answer's, in its order"
        );
        assert!(
            decoder.parsed_last() <= 2,
            "{status:?}: {} of {want} entries parsed",
            decoder.parsed_last()
        );
        let kept = next
            .iter()
            .filter(|i| listed.iter().any(|l| Arc::ptr_eq(l, i)))
            .count();
        assert!(
            kept >= want - 1,
            "{status:?}: {kept} of {want} instances kept"
        );
        listed = next;
    }

    // An answer over the client's size cap is refused while it arrives, and the decoder is
    // left as it was: the next answer (read with the cap lifted) reuses every entry.
    let capped = consul_api::Client::new(consul_api::Config {
        max_body_bytes: 10_000,
        ..consul.config()
    })
    .unwrap();
    let mut decoding = decoder.start();
    let refused = capped
        .health()
        .service_answer_to("flip", None, true, &QueryOptions::default(), &mut decoding)
        .await
        .expect_err("a 150 KB answer over a 10 KB cap");
    drop(decoding);
    assert!(
        matches!(
            refused,
            consul_api::Error::BodyTooLarge { limit: 10_000, .. }
        ),
        "{refused}"
    );
    let again = read(&client, &mut decoder).await;
    assert_eq!(decoder.parsed_last(), 0, "the last whole answer was kept");
    assert!(again.iter().zip(&listed).all(|(a, b)| Arc::ptr_eq(a, b)));
}
