//! The harness: real Consul comes up with a leader, reaches HTTP checks on the host's
//! loopback, runs several at once, restarts, and fails with clear errors instead of hanging.

use std::time::{Duration, Instant};

use consul_api::{AgentServiceRegistration, Client, Config, Error as ApiError};
use testbed::{BackendChoice, BackendKind, Consul, ConsulOptions, smoke};

use crate::common::init_tracing;

async fn smoke_on(choice: Option<BackendChoice>) -> (smoke::SmokeReport, BackendKind) {
    init_tracing();
    let mut options = ConsulOptions::from_env().unwrap();
    if let Some(choice) = choice {
        options = options.with_backend(choice);
    }
    let consul = Consul::start_with(options).await.unwrap();
    let report = smoke::run(&consul).await.unwrap();
    (report, consul.backend())
}

#[tokio::test]
async fn checked_service_turns_passing_then_is_removed() {
    let (report, _) = smoke_on(None).await;
    // The agent called our handler on 127.0.0.1 of the host, and the check passed on it.
    assert!(report.check_hits >= 1, "{report:?}");
    assert!(report.passing_after_ms < 30_000.0, "{report:?}");
    assert!(report.removed_after_ms < 30_000.0, "{report:?}");
}

#[tokio::test]
async fn the_process_backend_does_the_same() {
    let (report, backend) = smoke_on(Some(BackendChoice::Process)).await;
    assert_eq!(backend, BackendKind::Process);
    assert_eq!(report.consul_version, "1.8.7");
    assert!(report.check_hits >= 1, "{report:?}");
}

#[tokio::test]
async fn ci_runs_on_docker_when_told_to() {
    // With TESTBED_BACKEND=docker (as .ci/run sets it) a missing engine is an error, never a
    // silent fallback. Without it, report what auto chose.
    init_tracing();
    let consul = Consul::start().await.unwrap();
    match std::env::var("TESTBED_BACKEND").as_deref() {
        Ok("docker") => assert_eq!(consul.backend(), BackendKind::Docker),
        Ok("process") => assert_eq!(consul.backend(), BackendKind::Process),
        _ => eprintln!("auto backend chose {}", consul.backend().name()),
    }
    assert!(!consul.client().status().leader().await.unwrap().is_empty());
}

#[tokio::test]
async fn several_agents_run_side_by_side() {
    init_tracing();
    let (a, b, c) = tokio::join!(Consul::start(), Consul::start(), Consul::start());
    let agents = [a.unwrap(), b.unwrap(), c.unwrap()];
    let mut addrs: Vec<_> = agents.iter().map(|c| c.http_addr()).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 3);
    // Each is its own cluster: a service registered on one is unknown to the others.
    let reg = AgentServiceRegistration {
        id: Some("only-on-a".into()),
        name: "only-on-a".into(),
        ..Default::default()
    };
    agents[0]
        .client()
        .agent()
        .service_register(&reg)
        .await
        .unwrap();
    for (i, agent) in agents.iter().enumerate() {
        let services = agent.client().agent().services().await.unwrap();
        assert_eq!(services.contains_key("only-on-a"), i == 0);
    }
}

#[tokio::test]
async fn a_bad_address_is_a_clear_error_not_a_hang() {
    let started = Instant::now();
    let port = testbed::process::free_port().unwrap();
    let client = Client::new(Config::default().with_address(format!("127.0.0.1:{port}"))).unwrap();
    let err = client.status().leader().await.unwrap_err();
    assert!(matches!(err, ApiError::Transport { .. }), "{err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5));

    let err = Client::new(Config::default().with_address("unix:///tmp/consul.sock")).unwrap_err();
    assert!(err.to_string().contains("CONSUL_HTTP_ADDR"), "{err}");
}

#[tokio::test]
async fn a_stopped_agent_is_a_clear_error_and_comes_back_empty() {
    init_tracing();
    let mut consul = Consul::start().await.unwrap();
    let client = consul.client();
    let reg = AgentServiceRegistration {
        id: Some("before-restart".into()),
        name: "before-restart".into(),
        ..Default::default()
    };
    client.agent().service_register(&reg).await.unwrap();

    consul.stop().await.unwrap();
    let started = Instant::now();
    let err = client.agent().services().await.unwrap_err();
    assert!(matches!(err, ApiError::Transport { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "no hang");
    let err = consul
        .wait_ready(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("did not become ready"), "{err}");

    // Same address again, and dev mode has forgotten the registration.
    consul.start_again().await.unwrap();
    let services = client.agent().services().await.unwrap();
    assert!(!services.contains_key("before-restart"), "{services:?}");
}

#[tokio::test]
async fn acls_deny_anonymous_writes_with_a_clear_error() {
    init_tracing();
    let options = ConsulOptions::from_env()
        .unwrap()
        .with_acl("harness-root-token");
    let consul = Consul::start_with(options).await.unwrap();
    let reg = AgentServiceRegistration {
        id: Some("acl-svc".into()),
        name: "acl-svc".into(),
        ..Default::default()
    };
    let anonymous = Client::new(consul.config().with_token(None)).unwrap();
    let err = anonymous.agent().service_register(&reg).await.unwrap_err();
    assert!(err.is_permission_denied(), "{err}");
    assert!(!err.is_retryable());
    let wrong = Client::new(consul.config().with_token(Some("wrong-token".into()))).unwrap();
    let err = wrong.agent().service_register(&reg).await.unwrap_err();
    assert!(err.is_permission_denied(), "{err}");
    assert!(err.to_string().contains("CONSUL_HTTP_TOKEN"), "{err}");
    assert!(
        !err.to_string().contains("wrong-token"),
        "never print a token: {err}"
    );
    consul
        .client()
        .agent()
        .service_register(&reg)
        .await
        .unwrap();
}
