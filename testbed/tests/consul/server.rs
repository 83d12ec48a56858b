//! echo-server against real Consul, as a child process (`testbed echo-server ...`): the
//! registration as Consul stores it, the check settings proved by the agent's behaviour,
//! SIGTERM, re-registration after an agent restart or an operator's deregistration, start
//! before Consul, SIGUSR1, and ACLs.

use std::{
    process::Stdio,
    time::{Duration, Instant, SystemTime},
};

use consul_api::{
    AclPolicy, AclPolicyLink, AclToken, Client, GoDuration, HealthStatus, ServiceEntry,
};
use testbed::{
    Consul, ConsulOptions,
    logbuf::LogLine,
    procs::{ServerProcess, ServerSpec},
    signal::Signal,
    wait,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::common::{init_tracing, launcher, printed};

/// Deadlines that only prove "no hang".
const LIMIT: Duration = Duration::from_secs(30);

/// The seed service with a 1 s check interval (short tests), logging each /check request.
fn fast_spec(consul: &Consul) -> ServerSpec {
    let mut spec = ServerSpec::seed(consul.config()).unwrap();
    spec.args.interval = GoDuration(Duration::from_secs(1));
    spec.args.timeout = GoDuration(Duration::from_secs(1));
    spec.args.log_checks = true;
    spec
}

fn check_id(spec: &ServerSpec) -> String {
    format!("service:{}", spec.args.id)
}

/// The entry of `spec`'s instance among `entries`.
fn ours<'a>(entries: &'a [ServiceEntry], spec: &ServerSpec) -> Option<&'a ServiceEntry> {
    entries.iter().find(|e| e.service.id == spec.args.id)
}

/// Until `spec`'s own check has `status`; returns the entry and when it was seen.
async fn check_status(
    client: &Client,
    spec: &ServerSpec,
    status: HealthStatus,
) -> (ServiceEntry, tokio::time::Instant) {
    let id = check_id(spec);
    let (entries, at) = wait::health_until(client, &spec.args.name, false, LIMIT, |entries| {
        ours(entries, spec).is_some_and(|e| {
            e.checks
                .iter()
                .any(|c| c.check_id == id && c.status == status)
        })
    })
    .await
    .unwrap();
    (ours(&entries, spec).unwrap().clone(), at)
}

/// Until `spec`'s instance is registered in the catalog (in any state).
async fn registered(client: &Client, spec: &ServerSpec) -> tokio::time::Instant {
    wait::health_until(client, &spec.args.name, false, LIMIT, |entries| {
        ours(entries, spec).is_some()
    })
    .await
    .unwrap()
    .1
}

/// A fresh Consul with one server (the fast spec, adjusted by `adjust`) registered and
/// passing in it.
struct Fixture {
    consul: Consul,
    client: Client,
    spec: ServerSpec,
    server: ServerProcess,
}

async fn passing_server(adjust: impl FnOnce(&mut ServerSpec)) -> Fixture {
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let mut spec = fast_spec(&consul);
    adjust(&mut spec);
    let server = ServerProcess::spawn(&launcher(), spec.clone())
        .await
        .unwrap();
    check_status(&client, &spec, HealthStatus::Passing).await;
    Fixture {
        consul,
        client,
        spec,
        server,
    }
}

/// A round trip on the echo port.
async fn echo_once(spec: &ServerSpec, frame: &[u8]) -> Vec<u8> {
    let mut socket = TcpStream::connect(spec.echo_addr()).await.unwrap();
    socket.write_all(frame).await.unwrap();
    socket.write_all(b"\n").await.unwrap();
    let mut answer = vec![0u8; frame.len() + 1];
    tokio::time::timeout(LIMIT, socket.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    answer.pop();
    answer
}

fn when(line: &LogLine) -> SystemTime {
    line.consul_time().unwrap_or(line.received)
}

#[tokio::test]
async fn registration_is_stored_as_configured_and_the_agent_checks_at_the_interval() {
    init_tracing();
    let Fixture {
        consul,
        client,
        spec,
        server,
    } = passing_server(|_| {}).await;

    // Stored as configured, and passing.
    let (entry, _) = check_status(&client, &spec, HealthStatus::Passing).await;
    let service = &entry.service;
    assert_eq!(service.id, "servernode_1");
    assert_eq!(service.service, "servernode");
    assert_eq!(service.address, spec.ip().to_string());
    assert_eq!(service.port, spec.args.port);
    assert_eq!(service.tags(), ["servernode"]);
    let meta = service.meta.clone().unwrap_or_default();
    assert_eq!(
        meta.get("version").map(String::as_str),
        Some(echo_server::VERSION)
    );
    let check = entry
        .checks
        .iter()
        .find(|c| c.check_id == check_id(&spec))
        .unwrap();
    assert_eq!(check.service_id, spec.args.id);
    assert_eq!(check.check_type, "http");

    // DeregisterCriticalServiceAfter = 30s reached the agent: it says it raised it to 1m.
    let raised = consul
        .log()
        .wait_for("has deregister interval below minimum", LIMIT)
        .await
        .unwrap();
    assert!(raised.text.contains(&check_id(&spec)), "{}", raised.text);

    // The agent calls exactly the configured URL, once per interval.
    let output = server.process.output();
    let needle = "user_agent=\"Consul Health Check\"";
    let mut mark = 0;
    let mut hits = Vec::new();
    while hits.len() < 6 {
        let line = output.wait_for_after(mark, needle, LIMIT).await.unwrap();
        mark = output
            .lines()
            .iter()
            .position(|l| l.text == line.text)
            .unwrap()
            + 1;
        hits.push(line);
    }
    let host = format!("host=\"{}:{}\"", spec.ip(), spec.args.check_port);
    for hit in &hits {
        assert!(hit.text.contains("method=\"GET\""), "{}", hit.text);
        assert!(hit.text.contains("path=\"/check\""), "{}", hit.text);
        assert!(hit.text.contains(&host), "{}", hit.text);
        assert!(hit.text.contains("status=200"), "{}", hit.text);
    }
    let mut gaps: Vec<f64> = hits
        .windows(2)
        .map(|w| {
            when(&w[1])
                .duration_since(when(&w[0]))
                .unwrap_or_default()
                .as_secs_f64()
        })
        .collect();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    eprintln!("gaps between the agent's /check calls (interval 1s): {gaps:?}");
    assert!(
        (0.8..1.5).contains(&median),
        "median gap {median:.3}s for an interval of 1s: {gaps:?}"
    );
    assert!(
        gaps[0] > 0.5,
        "no call much sooner than the interval: {gaps:?}"
    );
}

#[tokio::test]
async fn the_check_timeout_is_the_configured_one() {
    init_tracing();
    // `_consul` keeps the container up (`..` would drop it here).
    let Fixture {
        consul: _consul,
        client,
        spec,
        server,
    } = passing_server(|spec| spec.args.timeout = GoDuration::from_secs(2)).await;

    // A frozen server accepts the agent's connection but never answers: the agent gives up
    // after the timeout, not before.
    let frozen_at = tokio::time::Instant::now();
    server.process.signal(Signal::SIGSTOP).unwrap();
    let (entry, critical_at) = check_status(&client, &spec, HealthStatus::Critical).await;
    server.process.signal(Signal::SIGCONT).unwrap();
    let took = critical_at - frozen_at;
    let check = entry
        .checks
        .iter()
        .find(|c| c.check_id == check_id(&spec))
        .unwrap();
    eprintln!(
        "critical {:.2}s after SIGSTOP (timeout 2s, interval 1s): {}",
        took.as_secs_f64(),
        check.output
    );
    assert!(
        check.output.contains("Timeout exceeded"),
        "{}",
        check.output
    );
    assert!(
        took >= Duration::from_millis(1900),
        "critical before the 2s timeout could pass: {took:?}"
    );
    assert!(
        took < Duration::from_secs(2 + 1 + 2),
        "timeout + interval + slack: {took:?}"
    );
    check_status(&client, &spec, HealthStatus::Passing).await;
}

#[tokio::test]
async fn sigterm_deregisters_at_once_answers_in_flight_frames_and_exits_0() {
    init_tracing();
    // A drain deadline far beyond what the burst below takes even on a loaded machine: this
    // test is about the drain answering every frame, and a deadline passed cuts the
    // connection (the peer then reads a reset). With the default 5 s it failed once with a
    // reset while 60 real-Consul tests shared 2 cores.
    let Fixture {
        consul: _consul,
        client,
        spec,
        mut server,
    } = passing_server(|s| s.args.drain_timeout = GoDuration::from_secs(60)).await;

    // 2,048 frames of 8 KiB (16 MiB) written at once to a peer with a 4 KiB receive buffer
    // that reads nothing until the server is gone from the catalog: far more than every
    // socket buffer on the way holds, so at SIGTERM the server still has frames to read and
    // answer, and does so in its drain.
    let peer = tokio::net::TcpSocket::new_v4().unwrap();
    peer.set_recv_buffer_size(4096).unwrap();
    let socket = peer.connect(spec.echo_addr()).await.unwrap();
    let (mut reader, mut writer) = socket.into_split();
    let mut burst = Vec::new();
    for i in 0..2048 {
        burst.extend_from_slice(format!("in-flight frame {i:08} ").as_bytes());
        burst.extend_from_slice(&[b'.'; 8166]);
        burst.push(b'\n');
    }
    let frame_len = burst.len() / 2048;
    let sent = burst.clone();
    let writing = tokio::spawn(async move { writer.write_all(&sent).await });
    let mut answers = vec![0u8; frame_len];
    reader.read_exact(&mut answers).await.unwrap();
    assert!(
        !writing.is_finished(),
        "the server has not even read every frame when SIGTERM comes"
    );

    let signalled = tokio::time::Instant::now();
    server.process.signal(Signal::SIGTERM).unwrap();
    let gone = wait::deregistered(&client, &spec.args.name, &spec.args.id, LIMIT)
        .await
        .unwrap();
    let to_gone = gone - signalled;

    let read = tokio::time::timeout(LIMIT, reader.read_to_end(&mut answers))
        .await
        .expect("the answers end within the limit");
    if let Err(e) = read {
        panic!(
            "reading the answers: {e} after {} of {} bytes; the server said:\n{}",
            answers.len(),
            burst.len(),
            printed(&server.process)
        );
    }
    writing.await.unwrap().unwrap();
    let status = server.process.wait_exit(LIMIT).await.unwrap();
    eprintln!("SIGTERM to gone from the catalog: {to_gone:?}");
    // The server deregistered itself: gone at once, not after Consul's reaper (>= 60 s). How
    // fast "at once" is (tens of ms) is measured by `testbed deregistration`'s contrast; here
    // the bound leaves room for a loaded 2-core CI machine.
    assert!(to_gone < Duration::from_secs(5), "{to_gone:?}");
    assert_eq!(answers.len(), burst.len(), "every in-flight frame answered");
    assert_eq!(answers, burst);
    assert_eq!(status.code(), Some(0), "{status:?}");

    // The shutdown happened in order, one line each.
    let lines: Vec<String> = server
        .process
        .output()
        .lines()
        .into_iter()
        .map(|l| l.text)
        .collect();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {lines:#?}"))
    };
    let order = [
        at("/check answers 503"),
        at("deregistered from Consul"),
        at("echo port closed"),
        at("drained"),
    ];
    assert!(order.is_sorted(), "{order:?}: {lines:#?}");
}

#[tokio::test]
async fn a_restarted_agent_gets_the_registration_back_within_two_intervals() {
    init_tracing();
    let Fixture {
        mut consul,
        client,
        spec,
        server,
    } = passing_server(|_| {}).await;
    let mark = server.process.output().mark();

    consul.restart().await.unwrap();
    let up = tokio::time::Instant::now();
    let back = registered(&client, &spec).await;
    let took = back.saturating_duration_since(up);
    eprintln!("registered again {took:?} after the restarted agent was ready");
    assert!(took < 2 * spec.interval(), "{took:?}");
    server
        .process
        .output()
        .wait_for_after(mark, "re-registered with Consul", LIMIT)
        .await
        .unwrap();
    // And the agent checks it again: passing without restarting the server.
    check_status(&client, &spec, HealthStatus::Passing).await;
}

#[tokio::test]
async fn an_operators_deregistration_is_undone_within_two_intervals() {
    init_tracing();
    let Fixture {
        consul: _consul,
        client,
        spec,
        server,
    } = passing_server(|_| {}).await;

    let started = tokio::time::Instant::now();
    client
        .agent()
        .service_deregister(&spec.args.id)
        .await
        .unwrap();
    server
        .process
        .output()
        .wait_for("re-registered with Consul", LIMIT)
        .await
        .unwrap();
    let back = registered(&client, &spec).await;
    let took = back - started;
    eprintln!("back {took:?} after an operator deregistered it");
    assert!(took < 2 * spec.interval(), "{took:?}");
}

#[tokio::test]
async fn started_before_consul_it_retries_then_registers() {
    init_tracing();
    let mut consul = Consul::start().await.unwrap();
    consul.stop().await.unwrap();
    let spec = fast_spec(&consul);
    let server = ServerProcess::spawn(&launcher(), spec.clone())
        .await
        .unwrap();
    let output = server.process.output();
    let retrying = output
        .wait_for("retrying with backoff", LIMIT)
        .await
        .unwrap();
    assert!(
        retrying.text.contains("is the agent up yet"),
        "{}",
        retrying.text
    );
    assert_eq!(
        echo_once(&spec, b"served meanwhile").await,
        b"served meanwhile"
    );

    consul.start_again().await.unwrap();
    output
        .wait_for("registered with Consul", LIMIT)
        .await
        .unwrap();
    check_status(&consul.client(), &spec, HealthStatus::Passing).await;
}

#[tokio::test]
async fn sigterm_while_consul_is_unreachable_still_exits_0_promptly() {
    init_tracing();
    // Nothing listens at this address: the registration is still being retried at SIGTERM.
    let nowhere = format!("127.0.0.1:{}", testbed::process::free_port().unwrap());
    let mut spec = ServerSpec::seed(consul_api::Config::default().with_address(nowhere)).unwrap();
    spec.args.interval = GoDuration(Duration::from_secs(1));
    let mut server = ServerProcess::spawn(&launcher(), spec.clone())
        .await
        .unwrap();
    server
        .process
        .output()
        .wait_for("retrying with backoff", LIMIT)
        .await
        .unwrap();
    let signalled = Instant::now();
    server.process.signal(Signal::SIGTERM).unwrap();
    let status = server.process.wait_exit(LIMIT).await.unwrap();
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn sigusr1_flips_the_check_while_echo_keeps_answering() {
    init_tracing();
    let Fixture {
        consul: _consul,
        client,
        spec,
        server,
    } = passing_server(|_| {}).await;

    server.process.signal(Signal::SIGUSR1).unwrap();
    let (entry, _) = check_status(&client, &spec, HealthStatus::Critical).await;
    assert_eq!(entry.aggregated_status(), HealthStatus::Critical);
    assert_eq!(echo_once(&spec, b"still here").await, b"still here");
    server
        .process
        .output()
        .wait_for("/check forced unhealthy", LIMIT)
        .await
        .unwrap();

    server.process.signal(Signal::SIGUSR1).unwrap();
    check_status(&client, &spec, HealthStatus::Passing).await;
    server
        .process
        .output()
        .wait_for("/check is healthy again", LIMIT)
        .await
        .unwrap();
}

/// Consul with ACLs (default deny), the fast spec, and a policy and token that may write
/// the spec's service.
struct AclFixture {
    consul: Consul,
    admin: Client,
    spec: ServerSpec,
    policy: AclPolicy,
    token: AclToken,
}

async fn acl_fixture(management_token: &str) -> AclFixture {
    let options = ConsulOptions::from_env()
        .unwrap()
        .with_acl(management_token);
    let consul = Consul::start_with(options).await.unwrap();
    let admin = consul.client();
    let spec = fast_spec(&consul);
    let policy = admin
        .acl()
        .policy_create(&AclPolicy {
            name: "echo-server".into(),
            rules: format!("service \"{}\" {{ policy = \"write\" }}", spec.args.name),
            ..Default::default()
        })
        .await
        .unwrap();
    let token = admin
        .acl()
        .token_create(&AclToken {
            description: "echo-server".into(),
            policies: vec![AclPolicyLink {
                id: policy.id.clone(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    AclFixture {
        consul,
        admin,
        spec,
        policy,
        token,
    }
}

#[tokio::test]
async fn with_acls_a_wrong_token_is_fatal_and_the_right_one_registers() {
    init_tracing();
    let AclFixture {
        consul,
        admin,
        spec,
        token,
        ..
    } = acl_fixture("server-test-management").await;

    // A wrong token: a clear error, a non-zero exit, no retry loop, the token never printed.
    let wrong = "0b5c6d2e-wrong-token";
    let started = Instant::now();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_testbed"))
        .arg("echo-server")
        .args(spec.args.to_argv())
        .env("CONSUL_HTTP_ADDR", consul.address())
        .env("CONSUL_HTTP_TOKEN", wrong)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LIMIT, run).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "wrong token: {:?} after {:?}",
        out.status,
        started.elapsed()
    );
    assert!(!out.status.success(), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
    assert!(last.contains("refused the ACL token"), "{last}");
    assert!(last.contains("CONSUL_HTTP_TOKEN"), "{last}");
    assert!(
        !stderr.contains(wrong),
        "the token is never printed: {stderr}"
    );
    assert!(
        !stderr.contains("retrying"),
        "a 403 is not retried: {stderr}"
    );

    // The right token: registered, passing, and deregistered on SIGTERM.
    let mut spec = spec;
    spec.consul = consul.config().with_token(Some(token.secret_id.clone()));
    let mut server = ServerProcess::spawn(&launcher(), spec.clone())
        .await
        .unwrap();
    check_status(&admin, &spec, HealthStatus::Passing).await;
    server.process.signal(Signal::SIGTERM).unwrap();
    wait::deregistered(&admin, &spec.args.name, &spec.args.id, LIMIT)
        .await
        .unwrap();
    let status = server.process.wait_exit(LIMIT).await.unwrap();
    assert_eq!(status.code(), Some(0));
    let output: Vec<String> = server
        .process
        .output()
        .lines()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert!(
        output.iter().all(|l| !l.contains(&token.secret_id)),
        "the token is never printed"
    );
}

#[tokio::test]
async fn with_acls_a_403_after_registering_is_retried_while_the_server_keeps_serving() {
    init_tracing();
    let AclFixture {
        consul,
        admin,
        mut spec,
        policy,
        token,
    } = acl_fixture("server-test-403-management").await;
    spec.consul = consul.config().with_token(Some(token.secret_id.clone()));
    let mut server = ServerProcess::spawn(&launcher(), spec.clone())
        .await
        .unwrap();
    check_status(&admin, &spec, HealthStatus::Passing).await;
    let output = server.process.output().clone();
    let mark = output.mark();

    // The token loses its rights, as a rotated one would: every call of the server's now
    // gets a 403. Logged loudly, not fatal.
    admin
        .acl()
        .policy_update(&AclPolicy {
            rules: "service \"other\" { policy = \"write\" }".into(),
            ..policy.clone()
        })
        .await
        .unwrap();
    let refused = output
        .wait_for_after(mark, "refused the ACL token after it had worked", LIMIT)
        .await
        .unwrap();
    assert!(refused.text.contains("ERROR"), "{}", refused.text);
    assert!(
        !server.process.has_exited(),
        "a 403 after success is not fatal"
    );
    assert_eq!(echo_once(&spec, b"still serving").await, b"still serving");

    // Meanwhile the agent loses its entry (an operator, or an agent restarted without it).
    // The catalog keeps a stale copy: the agent syncs the removal with the service's own
    // token, refused too, so the agent's own list is what tells.
    admin
        .agent()
        .service_deregister(&spec.args.id)
        .await
        .unwrap();
    let on_agent = admin.agent().services().await.unwrap();
    assert!(!on_agent.contains_key(&spec.args.id), "{on_agent:?}");
    assert!(!server.process.has_exited());

    // The token works again: the server registers again by itself and passes.
    admin.acl().policy_update(&policy).await.unwrap();
    output
        .wait_for_after(mark, "re-registered with Consul", LIMIT)
        .await
        .unwrap();
    let on_agent = admin.agent().services().await.unwrap();
    assert!(on_agent.contains_key(&spec.args.id), "{on_agent:?}");
    check_status(&admin, &spec, HealthStatus::Passing).await;
    assert!(!server.process.has_exited());
    assert!(
        output
            .lines()
            .iter()
            .all(|l| !l.text.contains(&token.secret_id)),
        "the token is never printed"
    );
}
