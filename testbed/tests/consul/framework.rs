//! consul-registry used as a framework, without echo: a TTL heartbeat that keeps its check
//! passing and what happens when it stops, and a whole `Registration` (heartbeat,
//! maintenance mode, deregistration on shutdown).

use std::time::Duration;

use consul_api::{AgentServiceCheck, AgentServiceRegistration, GoDuration, HealthStatus};
use consul_registry::{Health, Heartbeat, Registration};
use testbed::{Consul, wait};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::common::init_tracing;

const TTL: Duration = Duration::from_secs(2);

/// A service with only a TTL check, as a service without an HTTP endpoint registers it.
fn ttl_service(name: &str) -> AgentServiceRegistration {
    AgentServiceRegistration {
        id: Some(format!("{name}-1")),
        name: name.into(),
        port: Some(1),
        address: Some("127.0.0.1".into()),
        check: Some(AgentServiceCheck {
            ttl: Some(GoDuration(TTL)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Register [`ttl_service`] directly; returns its check's ID.
async fn register_ttl_service(consul: &Consul, name: &str) -> String {
    let registration = ttl_service(name);
    consul
        .client()
        .agent()
        .service_register(&registration)
        .await
        .unwrap();
    format!("service:{name}-1")
}

/// The status and output of `check_id`, once it satisfies `done`; `None` past `timeout`.
async fn check_until(
    consul: &Consul,
    service: &str,
    check_id: &str,
    timeout: Duration,
    mut done: impl FnMut(HealthStatus) -> bool,
) -> Option<(HealthStatus, String, Instant)> {
    let mut seen = None;
    let result = wait::health_until(&consul.client(), service, false, timeout, |entries| {
        let check = entries
            .iter()
            .flat_map(|e| &e.checks)
            .find(|c| c.check_id == check_id);
        match check {
            Some(c) if done(c.status) => {
                seen = Some((c.status, c.output.clone()));
                true
            }
            _ => false,
        }
    })
    .await;
    let (_, at) = result.ok()?;
    seen.map(|(status, output)| (status, output, at))
}

#[tokio::test]
async fn a_ttl_heartbeat_keeps_its_check_passing_and_the_check_expires_when_it_stops() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let check_id = register_ttl_service(&consul, "ttl-beat").await;
    let stop = CancellationToken::new();
    let heartbeat = Heartbeat::new(consul.client(), &check_id, TTL, Health::default());
    let beating = tokio::spawn({
        let stop = stop.clone();
        async move { heartbeat.run(stop).await }
    });

    let (status, output, _) = check_until(&consul, "ttl-beat", &check_id, TTL * 5, |s| {
        s == HealthStatus::Passing
    })
    .await
    .expect("the first beat makes the check pass");
    assert_eq!(status, HealthStatus::Passing);
    assert_eq!(output, "ok: serving");

    // Three whole TTLs: without the beats the check would have expired twice over.
    let expired = check_until(&consul, "ttl-beat", &check_id, TTL * 3, |s| {
        s != HealthStatus::Passing
    })
    .await;
    assert!(
        expired.is_none(),
        "the check left passing while beating: {expired:?}"
    );

    // The process stops beating (as a crashed or frozen service would). One last beat of
    // the test's own, timed, so the expiry has a known start: when the heartbeat's own last
    // beat went out is not known here (every TTL/3 plus however long each beat took: on a
    // loaded machine the check once expired 1.0 s after the stop, not the 1.33 s at least
    // that a beat exactly every TTL/3 would give).
    stop.cancel();
    beating.await.unwrap().unwrap();
    let sent = Instant::now();
    consul
        .client()
        .agent()
        .check_update(&check_id, HealthStatus::Passing, "ok: the last beat")
        .await
        .unwrap();
    let answered = Instant::now();
    let (status, output, at) = check_until(&consul, "ttl-beat", &check_id, TTL * 5, |s| {
        s == HealthStatus::Critical
    })
    .await
    .expect("the check expires: nothing beats any more");
    let after = at - sent;
    eprintln!(
        "TTL {TTL:?}: critical {after:?} after the last beat was sent ({:?} to answer; {output:?})",
        answered - sent
    );
    assert_eq!(status, HealthStatus::Critical);
    assert!(output.contains("TTL expired"), "{output}");
    assert!(output.contains("ok: the last beat"), "{output}");
    // The agent expires the check one TTL after it takes the last beat, which it did
    // between the send and the answer; seen here a little later.
    assert!(after >= TTL, "{after:?}");
    assert!(
        at - answered <= TTL + Duration::from_secs(1),
        "{:?}",
        at - answered
    );
}

#[tokio::test]
async fn a_draining_service_reports_critical_at_once_instead_of_waiting_for_the_ttl() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let check_id = register_ttl_service(&consul, "ttl-drain").await;
    let health = Health::default();
    let stop = CancellationToken::new();
    let heartbeat = Heartbeat::new(consul.client(), &check_id, TTL, health.clone());
    let beating = tokio::spawn({
        let stop = stop.clone();
        async move { heartbeat.run(stop).await }
    });
    check_until(&consul, "ttl-drain", &check_id, TTL * 5, |s| {
        s == HealthStatus::Passing
    })
    .await
    .expect("passing");

    health.set_draining();
    stop.cancel();
    let stopped = Instant::now();
    beating.await.unwrap().unwrap();
    let (_, output, at) = check_until(&consul, "ttl-drain", &check_id, TTL * 5, |s| {
        s == HealthStatus::Critical
    })
    .await
    .expect("critical");
    eprintln!("draining: critical {:?} after the stop", at - stopped);
    assert_eq!(output, "unhealthy: draining");
    assert!(
        at - stopped < TTL / 2,
        "reported by the last beat, not by the TTL running out: {:?}",
        at - stopped
    );
}

#[tokio::test]
async fn a_registration_registers_beats_goes_into_maintenance_and_deregisters_on_shutdown() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let service = ttl_service("maint");
    let shutdown = CancellationToken::new();
    let mut registration = Registration::start(client.clone(), service, shutdown.clone());
    wait::passing(&client, "maint", Duration::from_secs(30))
        .await
        .expect("registered, and passing by its heartbeat");

    registration
        .maintenance(true, Some("deploying v2"))
        .await
        .unwrap();
    wait::health_until(&client, "maint", true, Duration::from_secs(30), |e| {
        e.is_empty()
    })
    .await
    .expect("out of the passing set");
    let (all, _) = wait::health_until(&client, "maint", false, Duration::from_secs(30), |e| {
        !e.is_empty()
    })
    .await
    .unwrap();
    let maintenance = all[0]
        .checks
        .iter()
        .find(|c| {
            c.status == HealthStatus::Critical && c.check_id.starts_with("_service_maintenance")
        })
        .expect("the agent adds a critical maintenance check");
    assert!(
        maintenance.notes.contains("deploying v2"),
        "{maintenance:?}"
    );

    registration.maintenance(false, None).await.unwrap();
    wait::passing(&client, "maint", Duration::from_secs(30))
        .await
        .expect("back in the passing set");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), registration.wait())
        .await
        .expect("the registration ends after shutdown")
        .unwrap();
    let services = client.agent().services().await.unwrap();
    assert!(
        !services.contains_key("maint-1"),
        "deregistered: {services:?}"
    );
}
