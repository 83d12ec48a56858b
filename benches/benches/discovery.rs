//! discovery/propagation: a new echo-server instance registers with Consul and turns passing;
//! how long until a client's discovery view lists it.
//!
//! * `discovery/propagation/consul_to_client_view`: times Consul listing the new instance as
//!   passing (as an independent blocking query sees it) → the client's view
//!   (`EchoClient::discovery()`) listing it. The whole time from the server's start
//!   (registration, then Consul's first check of it, which Consul staggers randomly within
//!   the 1 s interval) is recorded alongside.
//!
//! Each iteration starts a fresh in-process echo-server with a new service ID; outside the
//! timed part it shuts down cleanly (deregisters) and both views are waited on to drop it.
//! One real Consul serves the group, started on first use.

// criterion_group! and criterion_main! generate public functions without docs.
#![allow(missing_docs)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use benches::{
    Result,
    consul_view::{self, Observer},
    harness,
    harness::SharedConsul,
    results::{MEASURED, Recorder, RunInfo},
    servers::ServerThread,
};
use consul_harness::Consul;
use criterion::{BenchmarkId, Criterion, SamplingMode};
use echo_client::{ClientConfig, ConsulState, EchoClient, Snapshot};
use echo_server::Config;
use tokio::{sync::watch, time::Instant};

const SERVICE: &str = "discovery-propagation";
/// Deadline of any one wait.
const WAIT: Duration = Duration::from_secs(15);
/// Samples, one new instance each (each waits up to the 1 s check interval).
const SAMPLES: usize = 40;

struct Rig {
    consul: consul_api::Config,
    client: EchoClient,
    view: watch::Receiver<Snapshot>,
    observer: Observer,
    next: u32,
}

impl Rig {
    async fn start(consul: &Consul) -> Result<Rig> {
        let client = EchoClient::start(ClientConfig::new(consul.config(), SERVICE))?;
        let view = client.discovery();
        consul_view::view_until(&view, "Consul's first answer", WAIT, |s| {
            s.consul == ConsulState::Reachable
        })
        .await?;
        let observer = Observer::start(consul.config(), SERVICE)?;
        observer.until("its first answer", WAIT, |_| true).await?;
        Ok(Rig {
            consul: consul.config(),
            client,
            view,
            observer,
            next: 0,
        })
    }

    async fn once(&mut self, rec: &Mutex<Recorder>) -> Result<Duration> {
        self.next += 1;
        let id = format!("new-{:04}", self.next);
        let config = Config {
            name: SERVICE.into(),
            id: id.clone(),
            register: true,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            deregister_after: Duration::from_secs(60),
            consul: self.consul.clone(),
            ..Config::local()
        };
        let listed = |instances: &[echo_client::Instance]| consul_view::lists_id(instances, &id);
        let started = Instant::now();
        let (server, seen, viewed) = tokio::join!(
            ServerThread::start(config),
            self.observer.until(&id, WAIT, listed),
            consul_view::view_until(&self.view, &id, WAIT, |s| {
                consul_view::lists_id(&s.instances, &id)
            }),
        );
        let (server, seen, viewed) = (server?, seen?.at, viewed?);
        // Both are woken by the same change; Consul answers the two blocking queries one
        // after the other, in either order. The recording keeps the sign; criterion, which
        // needs a positive time, gets at least 1 ns.
        let measured = if viewed >= seen {
            (viewed - seen).as_nanos() as f64
        } else {
            -((seen - viewed).as_nanos() as f64)
        };
        {
            let mut rec = rec.lock().expect("recorder lock");
            rec.push_signed(MEASURED, measured);
            rec.push("from_start", viewed - started);
            rec.push("start_to_consul", seen - started);
        }

        // Untimed: deregister, and wait until neither view lists it.
        server.shutdown().await?;
        let gone = |instances: &[echo_client::Instance]| !consul_view::lists_id(instances, &id);
        self.observer
            .until(&format!("{id} gone"), WAIT, gone)
            .await?;
        consul_view::view_until(&self.view, &format!("{id} gone"), WAIT, |s| {
            !consul_view::lists_id(&s.instances, &id)
        })
        .await?;
        Ok(Duration::from_nanos(measured.max(1.0) as u64))
    }
}

fn discovery(c: &mut Criterion) {
    harness::init_tracing();
    let mut run = RunInfo::start("discovery");
    let rt = harness::runtime().expect("the bench runtime");
    let consul = SharedConsul::new();
    let rec = Arc::new(Mutex::new(
        Recorder::new("discovery/propagation/consul_to_client_view", SAMPLES)
            .describe(
                MEASURED,
                "Consul lists the new instance as passing (independent blocking query) → the client's view lists it (negative: the client heard first)",
            )
            .describe(
                "start_to_consul",
                "server starts → Consul lists it as passing (registration, then the first check, staggered within the 1 s interval)",
            )
            .describe("from_start", "server starts → the client's view lists it (the whole time)"),
    ));
    let rig: Arc<tokio::sync::Mutex<Option<Rig>>> = Arc::default();
    let mut group = c.benchmark_group("discovery");
    // One event per sample (criterion warns that it cannot fit more in the target time:
    // that is by design) and a single warm-up event.
    group
        .sample_size(SAMPLES)
        .nresamples(benches::harness::NRESAMPLES)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
    group.bench_function(
        BenchmarkId::new("propagation", "consul_to_client_view"),
        |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (rig, rec, consul) = (rig.clone(), rec.clone(), consul.clone());
                async move {
                    let mut guard = rig.lock().await;
                    if guard.is_none() {
                        let consul = consul.get().await.expect("start Consul");
                        *guard = Some(Rig::start(consul).await.expect("set up the bench"));
                        harness::note_one_event_per_sample(rec.lock().expect("recorder lock").id());
                    }
                    let Some(rig) = guard.as_mut() else {
                        unreachable!("set up just above");
                    };
                    rec.lock().expect("recorder lock").start_call();
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += rig.once(&rec).await.expect("one new instance");
                    }
                    total
                }
            })
        },
    );
    group.finish();
    let saved = rec.lock().expect("recorder lock").save();
    saved.expect("save the recording");
    rt.block_on(async {
        if let Some(rig) = rig.lock().await.take() {
            drop(rig.client);
        }
        consul.finish(&mut run).await
    })
    .expect("stop Consul");
    run.finish().expect("save the run's record");
}

criterion::criterion_group!(benches, discovery);
criterion::criterion_main!(benches);
