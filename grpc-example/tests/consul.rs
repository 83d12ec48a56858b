//! The gRPC example against real Consul 1.8.7: the gRPC check follows the standard health
//! service (passing, critical on `NOT_SERVING`, passing again, critical when the server is
//! gone); and three `grpc-hello` processes serve a stream of calls through the balancing
//! client while one is SIGKILLed and another SIGTERMed: no call is lost. The second test
//! writes its figures to `grpc.json`/`grpc.md` in `RESULTS_DIR`, relative to the workspace's
//! root (the test's own temp directory when unset).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use consul_api::{HealthStatus, ServiceEntry};
use consul_harness::{
    Consul,
    process::{ChildProcess, consul_command, free_port},
    signal::Signal,
    wait,
};
use grpc_example::{client::Greeter, hello::GreeterServer, service::Options};
use serde::Serialize;
use tokio::{net::TcpListener, time::Instant};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

/// Until the one instance of `service` has its check in `status`.
async fn check_turns(consul: &Consul, service: &str, status: HealthStatus, what: &str) -> String {
    let (entries, _) = wait::health_until(
        &consul.client(),
        service,
        false,
        Duration::from_secs(20),
        |entries: &[ServiceEntry]| {
            entries.len() == 1
                && entries[0]
                    .checks
                    .iter()
                    .any(|c| c.service_id == entries[0].service.id && c.status == status)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let check = entries[0]
        .checks
        .iter()
        .find(|c| c.service_id == entries[0].service.id)
        .unwrap();
    assert_eq!(check.check_type, "grpc", "Consul runs it as a gRPC check");
    check.output.clone()
}

#[tokio::test]
async fn a_grpc_check_follows_the_standard_health_service() {
    let consul = Consul::start().await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<GreeterServer>().await;
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        Server::builder()
            .add_service(health)
            .add_service(GreeterServer::new("checked"))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let options = Options::new("grpc-checked");
    consul
        .client()
        .agent()
        .service_register(&options.registration(addr))
        .await
        .unwrap();

    let name = "grpc-checked";
    check_turns(&consul, name, HealthStatus::Passing, "SERVING passes").await;
    reporter.set_not_serving::<GreeterServer>().await;
    // Consul 1.8.7's words for any status but SERVING.
    let unhealthy = "didn't report service healthy";
    let output = check_turns(&consul, name, HealthStatus::Critical, "NOT_SERVING fails").await;
    assert!(output.contains(unhealthy), "{output}");
    reporter.set_serving::<GreeterServer>().await;
    check_turns(&consul, name, HealthStatus::Passing, "SERVING again passes").await;
    stop.cancel();
    server.await.unwrap().unwrap();
    let output = check_turns(&consul, name, HealthStatus::Critical, "a dead server fails").await;
    assert!(
        !output.contains(unhealthy),
        "no answer, not a status: {output}"
    );
}

/// One run of the kill test, as written to `grpc.json`.
#[derive(Debug, Serialize)]
struct Figures {
    calls: usize,
    interval_ms: u64,
    instances: usize,
    lost: usize,
    /// Attempts that failed (and were retried) after the SIGKILL, before the SIGTERM.
    failed_after_kill: usize,
    /// Attempts that failed after the SIGTERM.
    failed_after_term: usize,
    /// From the SIGKILL to the last attempt that failed on the dead instance (which had
    /// answered the call just before).
    kill_last_used_ms: Option<f64>,
    /// From the SIGTERM to the last reply from the stopping instance (it lingers 2 s).
    term_last_used_ms: Option<f64>,
    /// From the SIGTERM until the stopping process exited.
    term_exit_ms: f64,
}

#[tokio::test]
async fn one_instance_killed_and_one_stopped_mid_stream_lose_no_call() {
    const CALLS: usize = 250;
    const INTERVAL: Duration = Duration::from_millis(20);
    const KILL_AT: usize = 50;
    const TERM_AT: usize = 150;
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let mut children = Vec::new();
    let mut ports = Vec::new();
    for i in 0..3 {
        let port = free_port().unwrap();
        let mut cmd = consul_command(env!("CARGO_BIN_EXE_grpc-hello"), &consul.config());
        let listen = format!("127.0.0.1:{port}");
        cmd.args([
            "--name", "hello", "--listen", &listen, "--linger", "2s", "--drain", "5s",
        ]);
        children.push(ChildProcess::spawn(cmd, format!("grpc-hello {i}")).unwrap());
        ports.push(port);
    }
    wait::health_until(&client, "hello", true, Duration::from_secs(60), |e| {
        e.len() == 3
    })
    .await
    .expect("three instances register and pass their gRPC checks");
    // The default ID ends in the port.
    let id_of = |i: usize| format!("-{}", ports[i]);
    // Each signal goes to the instance that answered the call before: one in rotation.
    let answered_last = |last: &str| {
        (0..3)
            .find(|&i| last.ends_with(&id_of(i)))
            .expect("the last reply names a running instance")
    };
    let (mut killed, mut stopped) = (usize::MAX, usize::MAX);
    let mut last = String::new();

    let greeter = Greeter::discover(client.clone(), "hello");
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut kill_at, mut term_at) = (None, None);
    let mut killed_last_used = None;
    let mut stopped_last_used = None;
    let (mut lost, mut failed_after_kill, mut failed_after_term) = (0, 0, 0);
    for n in 0..CALLS {
        ticks.tick().await;
        if n == KILL_AT {
            killed = answered_last(&last);
            children[killed].kill().await.unwrap();
            kill_at = Some(Instant::now());
        }
        if n == TERM_AT {
            stopped = answered_last(&last);
            children[stopped].signal(Signal::SIGTERM).unwrap();
            term_at = Some(Instant::now());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let (failed, reply) = match greeter.say_hello("stream", deadline).await {
            Ok(answered) => (answered.failed, Some(answered.reply)),
            Err(lost_call) => {
                eprintln!("call {n} lost: {lost_call}");
                lost += 1;
                (lost_call.failed, None)
            }
        };
        for (at, status) in &failed {
            eprintln!("call {n}: an attempt failed: {status}");
            if term_at.is_some() {
                failed_after_term += 1;
            } else if kill_at.is_some() {
                failed_after_kill += 1;
                killed_last_used = Some(*at);
            }
        }
        if let Some(reply) = reply {
            assert!(
                kill_at.is_none() || !reply.instance.ends_with(&id_of(killed)),
                "a reply from a killed process"
            );
            if term_at.is_some() && reply.instance.ends_with(&id_of(stopped)) {
                stopped_last_used = Some(Instant::now());
            }
            last = reply.instance;
        }
    }
    let status = children[stopped]
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the SIGTERMed instance stops after its linger and drain");
    let term_exit = term_at.unwrap().elapsed();
    assert!(
        status.success(),
        "the SIGTERMed instance exits cleanly: {status}"
    );

    let since = |from: Option<Instant>, to: Option<Instant>| {
        to.map(|to| lab_report::ms_from(from.unwrap(), to))
    };
    let figures = Figures {
        calls: CALLS,
        interval_ms: INTERVAL.as_millis() as u64,
        instances: 3,
        lost,
        failed_after_kill,
        failed_after_term,
        kill_last_used_ms: since(kill_at, killed_last_used),
        term_last_used_ms: since(term_at, stopped_last_used),
        term_exit_ms: lab_report::ms(term_exit),
    };
    write_results(&consul, &figures);

    assert_eq!(lost, 0, "every call is answered: {figures:?}");
    // Calls go one at a time: the one that meets the dead instance ejects it.
    assert!(
        failed_after_kill <= 1,
        "the pool holds the dead instance out after one failure: {figures:?}"
    );
    assert_eq!(
        failed_after_term, 0,
        "a SIGTERMed instance leaves Consul before it stops answering: {figures:?}"
    );
    let third = 3 - killed - stopped;
    children[third].signal(Signal::SIGTERM).unwrap();
    children[third]
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap();
}

/// `grpc.json` and `grpc.md` in `RESULTS_DIR` (relative to the workspace's root), or this
/// test's temp directory.
fn write_results(consul: &Consul, figures: &Figures) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("RESULTS_DIR")
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&dir).unwrap();
    let header = lab_report::Header {
        title: "gRPC: one instance SIGKILLed, one SIGTERMed mid-stream".into(),
        machine: lab_report::machine(),
        date: lab_report::rfc3339(SystemTime::now()),
        consul: format!("{} (docker)", consul.version()),
        command: "RESULTS_DIR=docs/results cargo test -p grpc-example --test consul".into(),
    };
    let opt = |ms: Option<f64>| lab_report::ms_text(ms, 0);
    let table = lab_report::Table::figures([
        (
            "calls (one every 20 ms, 3 instances)".into(),
            figures.calls.to_string(),
        ),
        ("lost".into(), figures.lost.to_string()),
        (
            "failed attempts after the SIGKILL (retried)".into(),
            figures.failed_after_kill.to_string(),
        ),
        (
            "SIGKILL → last attempt on the dead instance".into(),
            opt(figures.kill_last_used_ms),
        ),
        (
            "failed attempts after the SIGTERM".into(),
            figures.failed_after_term.to_string(),
        ),
        (
            "SIGTERM → last reply from the stopping instance".into(),
            opt(figures.term_last_used_ms),
        ),
        (
            "SIGTERM → the stopping process exits (2 s linger)".into(),
            lab_report::ms_text(Some(figures.term_exit_ms), 0),
        ),
    ]);
    let json = serde_json::json!({ "header": header, "figures": figures });
    lab_report::write_json(&dir.join("grpc.json"), &json).unwrap();
    std::fs::write(
        dir.join("grpc.md"),
        format!("{}{}", header.markdown(), table.markdown()),
    )
    .unwrap();
}
