//! echo/throughput and echo/latency: the echo-server against the raw `tokio::io::copy` echo
//! server, messages of 16 B, 1 KiB and 64 KiB, on one and on 32 connections at once. Both
//! servers run in this process on a runtime of their own (multi-threaded, one worker per CPU,
//! as the echo-server binary runs); the load runs on criterion's runtime and is the same for
//! both: raw sockets writing newline-terminated messages and checking every echoed byte.
//!
//! * `echo/throughput/<server>/<size>-<n>conn`: one iteration = one message per connection;
//!   each connection writes its messages back to back (in blocks of up to 64 KiB) while
//!   reading the echoes. Throughput counts payload bytes echoed.
//! * `echo/latency/<server>/<size>-<n>conn`: one message in flight per connection; every
//!   round trip is recorded, so the p99 is per message.

// criterion_group! and criterion_main! generate public functions without docs.
#![allow(missing_docs)]

use std::{sync::Arc, time::Duration};

use benches::{
    harness,
    results::{MEASURED, Recorder, RunInfo},
    servers::RawEcho,
    traffic::{self, Message},
};
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, measurement::WallTime,
};
use echo_server::{Config, Server};
use tokio::{
    net::TcpStream,
    sync::{Mutex, OnceCell},
    time::Instant,
};

const SIZES: [(usize, &str); 3] = [(16, "16B"), (1 << 10, "1KiB"), (64 << 10, "64KiB")];
const CONNECTIONS: [usize; 2] = [1, 32];
const SAMPLES: usize = 20;

type Conns = Vec<Arc<Mutex<TcpStream>>>;

fn echo(c: &mut Criterion) {
    harness::init_tracing();
    let run = RunInfo::start("echo");
    let rt = harness::runtime().expect("the client runtime");
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("servers")
        .build()
        .expect("the servers' runtime");
    // The largest message is exactly 64 KiB, the codec's default limit; set it explicitly so
    // a change of default cannot make the 64 KiB benches measure error lines.
    let config = Config {
        max_frame: SIZES[2].0,
        ..Config::local()
    };
    let server = server_rt
        .block_on(Server::bind(config))
        .expect("bind the echo-server");
    let echo_addr = server.echo_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = server_rt.spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let raw = server_rt
        .block_on(RawEcho::start(server_rt.handle()))
        .expect("start the raw echo server");
    let servers = [("echo-server", echo_addr), ("raw-copy", raw.addr())];

    let mut group = c.benchmark_group("echo/throughput");
    configure(&mut group);
    for (size, label) in SIZES {
        for n in CONNECTIONS {
            // Each server in turn, so both see the same background load.
            for (name, addr) in servers {
                group.throughput(Throughput::Bytes((size * n) as u64));
                let id = BenchmarkId::new(name, format!("{label}-{n}conn"));
                let conns: Arc<OnceCell<Conns>> = Arc::default();
                let message = Arc::new(Message::new(size));
                group.bench_function(id, |b| {
                    b.to_async(&rt).iter_custom(|iters| {
                        let (conns, message) = (conns.clone(), message.clone());
                        async move {
                            let conns = conns
                                .get_or_try_init(|| traffic::connect_all(addr, n))
                                .await
                                .expect("connect to the server");
                            let start = Instant::now();
                            traffic::pipelined(conns, &message, iters)
                                .await
                                .expect("pipelined echo traffic");
                            start.elapsed()
                        }
                    })
                });
            }
        }
    }
    group.finish();

    let mut group = c.benchmark_group("echo/latency");
    configure_latency(&mut group);
    for (size, label) in SIZES {
        for n in CONNECTIONS {
            for (name, addr) in servers {
                let id = BenchmarkId::new(name, format!("{label}-{n}conn"));
                let recorder = Arc::new(std::sync::Mutex::new(
                    Recorder::new(format!("echo/latency/{name}/{label}-{n}conn"), SAMPLES)
                        .describe(MEASURED, "round trip of one message, each connection's own"),
                ));
                let conns: Arc<OnceCell<Conns>> = Arc::default();
                let message = Arc::new(Message::new(size));
                group.bench_function(id, |b| {
                    b.to_async(&rt).iter_custom(|iters| {
                        let (conns, message, recorder) =
                            (conns.clone(), message.clone(), recorder.clone());
                        async move {
                            let conns = conns
                                .get_or_try_init(|| traffic::connect_all(addr, n))
                                .await
                                .expect("connect to the server");
                            let start = Instant::now();
                            let rtts = traffic::lockstep(conns, &message, iters)
                                .await
                                .expect("lockstep echo traffic");
                            // Each connection made `iters` round trips one after another,
                            // all connections at once: wall time per iteration ≈ one round
                            // trip under that concurrency.
                            let elapsed = start.elapsed();
                            let mut recorder = recorder.lock().expect("recorder lock");
                            recorder.start_call();
                            recorder.extend(MEASURED, rtts);
                            elapsed
                        }
                    })
                });
                let saved = recorder.lock().expect("recorder lock").save();
                saved.expect("save the latency recording");
            }
        }
    }
    group.finish();

    let _ = stop.send(());
    server_rt
        .block_on(running)
        .expect("the echo-server task")
        .expect("the echo-server stops cleanly");
    drop(raw);
    run.finish().expect("save the run's record");
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
}

fn configure_latency(group: &mut BenchmarkGroup<'_, WallTime>) {
    configure(group);
    // One value per message is recorded anyway; flat sampling keeps the slowest (64 KiB on
    // 32 connections) within its time.
    group.sampling_mode(SamplingMode::Flat);
}

criterion::criterion_group!(benches, echo);
criterion::criterion_main!(benches);
