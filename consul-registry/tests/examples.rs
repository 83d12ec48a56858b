//! The examples, run against real Consul as a user would run them:
//!
//! * two `ttl_service` instances register themselves and pass; `failover_client` (on a
//!   [`Pool`]) is answered by both; one is stopped (Ctrl-C: its check reported critical,
//!   deregistered, a linger, then it stops accepting) and the client goes on with the other
//!   without an error; the stopped one is gone from Consul;
//! * the kill test: three `http_service` processes (the example's own binary), 200 GETs
//!   20 ms apart through a pool and through the tower stack at once, one process SIGKILLed and
//!   one SIGTERMed: nothing lost, at most one failed attempt per kill and client. With
//!   `RESULTS_DIR=docs/results` it writes its figures to `docs/results/service.md`;
//! * the drain order: one `http_service` process SIGTERMed while new connections arrive every
//!   20 ms: it answers every one of them until Consul no longer lists it as passing and the
//!   linger has passed (its check answering 503 meanwhile), then refuses every later one,
//!   and exits cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/failover_client.rs"]
mod failover_client;
#[path = "../examples/ttl_service.rs"]
mod ttl_service;

use std::{collections::BTreeSet, time::Duration};

use consul_harness::{Consul, wait};
use consul_registry::{DiscoveryConfig, Pool, PoolConfig, Strategy};
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

    let config = PoolConfig {
        strategy: Strategy::RoundRobin,
        ..PoolConfig::default()
    };
    let pool = Pool::discover(consul.client(), DiscoveryConfig::new("hello"), config);
    let http = reqwest::Client::new();
    let deadline = || Instant::now() + Duration::from_secs(20);
    let mut answered = BTreeSet::new();
    for _ in 0..4 {
        let (instance, body) = failover_client::get(&http, &pool, deadline())
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
    // Its TTL check was reported critical before it went (the agent logs each update).
    let critical = format!("Check status updated: check=service:{a} status=critical");
    consul
        .log()
        .wait_for(&critical, Duration::from_secs(5))
        .await
        .expect("the drain reports the TTL check critical before deregistering");
    for _ in 0..4 {
        let (instance, _) = failover_client::get(&http, &pool, deadline())
            .await
            .unwrap();
        assert_eq!(instance.id, b);
    }
    stop_b.cancel();
}

// === the kill test: three `http_service` processes, one SIGKILLed, one SIGTERMed ===

use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

use consul_harness::{
    process::{ChildProcess, consul_command, free_port_on, loopback_ip},
    signal::Signal,
};
use consul_registry::{
    Instance, discovery,
    tower_stack::{Balanced, TpsBudget, http_retryable},
};
use tower::Service;

/// Where the kill test writes its figures when set (`docs/results`).
const OUT: &str = "RESULTS_DIR";
const NAME: &str = "kill-hello";
const REQUESTS: usize = 200;
const APART: Duration = Duration::from_millis(20);
/// Consul checks each instance this often.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The `http_service` example's binary, which `cargo test` builds beside this test (in
/// `target/<profile>/examples/`).
fn http_service_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let binary = profile_dir.join("examples").join("http_service");
    assert!(
        binary.exists(),
        "{} is not built: run `cargo test -p consul-registry` (which builds the examples), \
         or `cargo build -p consul-registry --examples` first",
        binary.display()
    );
    binary
}

#[derive(Debug, Clone)]
struct Attempt {
    at: SystemTime,
    address: String,
    ok: bool,
}

/// What one client saw.
#[derive(Debug, Default)]
struct Run {
    attempts: Vec<Attempt>,
    lost: usize,
}

impl Run {
    fn failed_at(&self, address: &str, after: SystemTime) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.address == address && !a.ok && a.at >= after)
            .count()
    }

    /// From `since` to the last attempt at `address`, if any came after.
    fn last_use(&self, address: &str, since: SystemTime) -> Option<Duration> {
        self.attempts
            .iter()
            .filter(|a| a.address == address)
            .filter_map(|a| a.at.duration_since(since).ok())
            .max()
    }
}

/// 200 GETs 20 ms apart through a pool; each request tries up to 4 instances in 5 s.
async fn through_the_pool(pool: Pool, done: Progress) -> Run {
    let http = reqwest::Client::new();
    let mut run = Run::default();
    let mut tick = tokio::time::interval(APART);
    for _ in 0..REQUESTS {
        tick.tick().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut tried = Vec::new();
        let mut answered = false;
        while !answered && tried.len() < 4 {
            let Ok(pick) = pool.pick_except(deadline, &tried).await else {
                break;
            };
            let address = pick.instance().address();
            let get = http
                .get(format!("http://{address}/"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            answered = get.is_ok();
            run.attempts.push(Attempt {
                at: SystemTime::now(),
                address: address.clone(),
                ok: answered,
            });
            if answered {
                pick.succeeded();
            } else {
                tried.push(address);
                pick.failed();
            }
        }
        run.lost += usize::from(!answered);
        done.send_modify(|n| *n += 1);
    }
    run
}

/// Requests both clients have finished, answered or not.
type Progress = Arc<tokio::sync::watch::Sender<usize>>;

/// Until both clients have finished `n` requests between them (at most 30 s).
async fn until_done(progress: &mut tokio::sync::watch::Receiver<usize>, n: usize) {
    tokio::time::timeout(
        Duration::from_secs(30),
        progress.wait_for(|done| *done >= n),
    )
    .await
    .unwrap_or_else(|_| panic!("the clients did not finish {n} requests within 30 s"))
    .unwrap();
}

/// The same requests through the tower stack, retrying idempotent requests within a budget.
async fn through_the_tower_stack(pool: Pool, done: Progress) -> Run {
    let http = reqwest::Client::new();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let make = {
        let attempts = attempts.clone();
        move |instance: &Instance| {
            let (http, address, attempts) = (http.clone(), instance.address(), attempts.clone());
            tower::service_fn(move |req: hyper::Request<String>| {
                let (http, address, attempts) = (http.clone(), address.clone(), attempts.clone());
                async move {
                    let get = http
                        .get(format!("http://{address}{}", req.uri()))
                        .timeout(Duration::from_secs(1))
                        .send()
                        .await
                        .and_then(reqwest::Response::error_for_status);
                    attempts.lock().unwrap().push(Attempt {
                        at: SystemTime::now(),
                        address,
                        ok: get.is_ok(),
                    });
                    get?.text().await
                }
            })
        }
    };
    let mut stack = Balanced::new(pool, make).retry(TpsBudget::default(), http_retryable);
    let mut lost = 0;
    let mut tick = tokio::time::interval(APART);
    for _ in 0..REQUESTS {
        tick.tick().await;
        let req = hyper::Request::get("/").body(String::new()).unwrap();
        lost += usize::from(stack.call(req).await.is_err());
        done.send_modify(|n| *n += 1);
    }
    let attempts = attempts.lock().unwrap().clone();
    Run { attempts, lost }
}

/// When `address` left the passing set (after it was first listed).
async fn left_the_view(
    mut view: tokio::sync::watch::Receiver<consul_registry::Snapshot>,
    address: String,
) -> SystemTime {
    let listed = |s: &consul_registry::Snapshot| s.instances.iter().any(|i| i.address() == address);
    view.wait_for(listed).await.unwrap();
    view.wait_for(|s| !listed(s)).await.unwrap();
    SystemTime::now()
}

#[tokio::test]
async fn a_kill_and_a_term_lose_nothing_through_the_pool_and_the_tower_stack() {
    let consul = Consul::start().await.unwrap();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let ip = loopback_ip();
        let address = format!("{ip}:{}", free_port_on(ip).unwrap());
        let mut cmd = consul_command(http_service_binary(), &consul.config());
        let interval = consul_api::GoDuration(CHECK_INTERVAL).to_string();
        cmd.args([address.as_str(), NAME, interval.as_str()]);
        let child = ChildProcess::spawn(cmd, format!("http_service on {address}")).unwrap();
        servers.push((address, child));
    }
    wait::health_until(&consul.client(), NAME, true, Duration::from_secs(30), |e| {
        e.len() == 3
    })
    .await
    .expect("three http_service processes register and pass");

    // Round-robin, so that every instance takes its share and each kill is met (with two
    // instances, power of two choices always prefers the faster one).
    let config = PoolConfig {
        strategy: Strategy::RoundRobin,
        ..PoolConfig::default()
    };
    let discover = || discovery::spawn(consul.client(), DiscoveryConfig::new(NAME));
    let (pool, tower_pool) = (
        Pool::new(NAME, discover(), config),
        Pool::new(NAME, discover(), config),
    );
    let view = discover();
    let (done, mut progress) = tokio::sync::watch::channel(0);
    let done = Arc::new(done);
    let clients = tokio::spawn(async move {
        tokio::join!(
            through_the_pool(pool, done.clone()),
            through_the_tower_stack(tower_pool, done)
        )
    });
    let (killed, termed) = (servers[0].0.clone(), servers[1].0.clone());
    let killed_left = tokio::spawn(left_the_view(view.clone(), killed.clone()));
    let termed_left = tokio::spawn(left_the_view(view, termed.clone()));

    // Mid-stream: each client 40 requests in before the kill, 40 more before the SIGTERM.
    until_done(&mut progress, 2 * 40).await;
    let kill_at = servers[0].1.kill().await.unwrap();
    until_done(&mut progress, 2 * 80).await;
    let term_at = SystemTime::now();
    servers[1].1.signal(Signal::SIGTERM).unwrap();

    let (pool_run, tower_run) = clients.await.unwrap();
    let exit = servers[1]
        .1
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        exit.success(),
        "the SIGTERMed instance drains and exits cleanly: {exit}"
    );
    let killed_left = tokio::time::timeout(Duration::from_secs(30), killed_left)
        .await
        .expect("Consul's check drops the killed instance")
        .unwrap();
    let termed_left = termed_left.await.unwrap();

    let mut rows = Vec::new();
    for (client, run) in [("pool", &pool_run), ("tower stack", &tower_run)] {
        let (failed_kill, failed_term) = (
            run.failed_at(&killed, kill_at),
            run.failed_at(&termed, term_at),
        );
        let others = run.attempts.iter().filter(|a| !a.ok).count() - failed_kill - failed_term;
        assert_eq!(run.lost, 0, "{client}: no request lost");
        assert!(
            failed_kill <= 1,
            "{client}: {failed_kill} failed attempts at the SIGKILLed instance"
        );
        assert!(
            failed_term <= 1,
            "{client}: {failed_term} failed attempts at the SIGTERMed instance"
        );
        assert_eq!(others, 0, "{client}: no other attempt failed");
        let ms = |d: Option<Duration>| {
            d.map_or("never used after".into(), |d| {
                format!("{} ms", d.as_millis())
            })
        };
        rows.push(vec![
            client.to_string(),
            format!("{} / {}", REQUESTS - run.lost, REQUESTS),
            run.lost.to_string(),
            failed_kill.to_string(),
            failed_term.to_string(),
            ms(run.last_use(&killed, kill_at)),
            ms(run.last_use(&termed, term_at)),
        ]);
    }
    let since = |t: SystemTime, from: SystemTime| t.duration_since(from).unwrap_or_default();
    let (kill_to_view, term_to_view) = (since(killed_left, kill_at), since(termed_left, term_at));
    eprintln!(
        "kill test: {rows:?}; kill → out of view {kill_to_view:?}, SIGTERM → out of view {term_to_view:?}"
    );
    if let Ok(dir) = std::env::var(OUT) {
        write_report(&dir, &consul, &rows, kill_to_view, term_to_view);
    }
}

fn write_report(
    dir: &str,
    consul: &Consul,
    rows: &[Vec<String>],
    kill_to_view: Duration,
    term_to_view: Duration,
) {
    let header = lab_report::Header {
        title: "Use it in your service: one SIGKILL and one SIGTERM under load".into(),
        machine: lab_report::machine(),
        date: lab_report::rfc3339(SystemTime::now()),
        consul: consul.version().to_string(),
        command: format!(
            "{OUT}={dir} cargo test -p consul-registry --test examples a_kill_and_a_term"
        ),
    };
    let mut table = lab_report::Table::new([
        "client",
        "answered",
        "lost",
        "failed attempts, SIGKILL",
        "failed attempts, SIGTERM",
        "SIGKILL → last use",
        "SIGTERM → last use",
    ])
    .align_right([1, 2, 3, 4, 5, 6]);
    for row in rows {
        table.push(row.iter().cloned());
    }
    table.note(format!(
        "Three `http_service` processes (HTTP check every {}s, drain linger {}s); each client (round-robin, hold-down {}s) sends {REQUESTS} GETs {} ms apart, one at a time; the first instance is SIGKILLed after 40 intervals, the second SIGTERMed 40 intervals later.",
        CHECK_INTERVAL.as_secs(),
        consul_registry::registration::DEFAULT_LINGER.as_secs(),
        PoolConfig::default().hold_down.as_secs(),
        APART.as_millis()
    ));
    table.note(format!(
        "Out of discovery's view (blocking health query): the SIGKILLed instance {} ms after the kill (Consul's check), the SIGTERMed one {} ms after the signal (its own deregistration).",
        kill_to_view.as_millis(),
        term_to_view.as_millis()
    ));
    let text = format!("{}{}", header.markdown(), table.markdown());
    // Relative to the workspace root, where the command is run (cargo runs tests in the
    // package's directory).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir);
    std::fs::write(dir.join("service.md"), text).unwrap();
}

// === the drain order: a SIGTERMed `http_service` serves until Consul dropped it and lingers ===

/// One request of the drain test's prober, each on a connection of its own.
#[derive(Debug)]
struct Probe {
    sent: Instant,
    path: &'static str,
    /// `None`: no answer (refused, reset, or none within 1 s).
    status: Option<u16>,
}

/// GET `/` and `/check` in turn at `address`, `APART` apart, each on a new connection (as a
/// client that has not caught up with Consul would connect), until five requests after
/// `exited`.
async fn probe(address: String, exited: CancellationToken) -> Vec<Probe> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut probes = Vec::new();
    let mut after_exit = 0;
    let mut tick = tokio::time::interval(APART);
    for path in ["/", "/check"].into_iter().cycle() {
        tick.tick().await;
        if exited.is_cancelled() {
            after_exit += 1;
            if after_exit > 5 {
                break;
            }
        }
        let sent = Instant::now();
        let status = http
            .get(format!("http://{address}{path}"))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16());
        probes.push(Probe { sent, path, status });
    }
    probes
}

#[tokio::test]
async fn a_sigtermed_http_service_answers_until_consul_dropped_it_and_the_linger_passed() {
    const DRAINED: &str = "drain-hello";
    let linger = consul_registry::registration::DEFAULT_LINGER;
    let consul = Consul::start().await.unwrap();
    let ip = loopback_ip();
    let address = format!("{ip}:{}", free_port_on(ip).unwrap());
    let mut cmd = consul_command(http_service_binary(), &consul.config());
    let interval = consul_api::GoDuration(CHECK_INTERVAL).to_string();
    cmd.args([address.as_str(), DRAINED, interval.as_str()]);
    let mut server = ChildProcess::spawn(cmd, format!("http_service on {address}")).unwrap();
    wait::passing(&consul.client(), DRAINED, Duration::from_secs(30))
        .await
        .expect("the http_service process registers and passes");

    // When Consul's passing set no longer lists it, by blocking queries begun before the
    // signal (a later first read only makes the moment later: the test stricter).
    let left = {
        let client = consul.client();
        tokio::spawn(async move {
            wait::health_until(&client, DRAINED, true, Duration::from_secs(30), |e| {
                e.is_empty()
            })
            .await
            .map(|(_, at)| at)
        })
    };
    let exited = CancellationToken::new();
    let prober = tokio::spawn(probe(address.clone(), exited.clone()));
    let first = reqwest::get(format!("http://{address}/")).await.unwrap();
    assert_eq!(first.status(), 200, "it serves before the signal");

    let signalled = Instant::now();
    server.signal(Signal::SIGTERM).unwrap();
    let exit = server.wait_exit(Duration::from_secs(20)).await.unwrap();
    exited.cancel();
    assert!(exit.success(), "it drains and exits cleanly: {exit}");
    let left = left
        .await
        .unwrap()
        .expect("Consul stops listing it as passing");
    let probes = prober.await.unwrap();

    let after: Vec<&Probe> = probes.iter().filter(|p| p.sent >= signalled).collect();
    let refused = after
        .iter()
        .position(|p| p.status.is_none())
        .expect("it stops accepting before it exits");
    let stopped = after[refused].sent;
    let since = |t: Instant| t.saturating_duration_since(signalled).as_millis();
    eprintln!(
        "drain order: SIGTERM → out of Consul's passing set {} ms, → first refused connection {} ms ({} ms after Consul dropped it; linger {} ms); {} requests after the signal",
        since(left),
        since(stopped),
        stopped.saturating_duration_since(left).as_millis(),
        linger.as_millis(),
        after.len()
    );
    let table = || {
        after
            .iter()
            .map(|p| format!("{:>5} ms {:<6} {:?}", since(p.sent), p.path, p.status))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Until it stops accepting, every new connection is answered: `/` as ever, `/check` with
    // 503 once Consul has dropped it (the check failed before the deregistration).
    for p in &after[..refused] {
        let expected = match p.path {
            "/" => 200,
            _ if p.sent >= left => 503,
            _ => continue,
        };
        assert_eq!(p.status, Some(expected), "{p:?}:\n{}", table());
    }
    let served_after_left = after[..refused]
        .iter()
        .filter(|p| p.path == "/" && p.sent >= left)
        .count();
    assert!(
        served_after_left > 0,
        "answered no request after Consul dropped it:\n{}",
        table()
    );
    // It stopped accepting only after Consul dropped it and most of the linger had passed
    // (the deregistration returns a little before the blocking query sees it), and for good.
    assert!(
        stopped >= left + linger / 2,
        "stopped accepting {} ms after the signal, Consul dropped it at {} ms, linger {} ms:\n{}",
        since(stopped),
        since(left),
        linger.as_millis(),
        table()
    );
    assert!(
        after[refused..].iter().all(|p| p.status.is_none()),
        "answered again after it stopped accepting:\n{}",
        table()
    );
}
