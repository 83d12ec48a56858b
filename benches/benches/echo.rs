//! echo/throughput and echo/latency: the echo-server against two raw copiers, messages of
//! 16 B, 1 KiB and 64 KiB, on one and on 32 connections at once. `raw-buf` reads and writes
//! back with a buffer of the echo-server's read size (the fair baseline), `raw-copy` is
//! `tokio::io::copy` (8 KiB, reading ahead while a write waits). All three run in this
//! process on one runtime of their own ([`benches::rig`]: threads `servers`, multi-threaded,
//! one worker per CPU, as the echo-server binary runs; `echo-probe` drives the same servers
//! without criterion, for profiles). Throughput: one server after the other for each size, so
//! its ratios come from the same minutes of the same run; latency: interleaved (below). The
//! load runs on criterion's runtime and is the same for all: raw sockets writing
//! newline-terminated messages and checking every echoed byte.
//!
//! * `echo/throughput/<server>/<size>-<n>conn`: one iteration = one message per connection;
//!   each connection writes its messages back to back (in blocks of up to 64 KiB) while
//!   reading the echoes. Throughput counts payload bytes echoed. The servers' CPU time over
//!   each measured sample, per message, is recorded as `echo/cpu/<server>/<size>-<n>conn`.
//! * `echo/latency/<server>/<size>-<n>conn`: one message in flight per connection; every
//!   round trip is recorded, so the p99 is per message. The three servers are measured in
//!   alternation, not one after the other: one criterion bench per size and connection count,
//!   `echo/latency/interleaved/<size>-<n>conn`, whose iteration is one round on each server
//!   in turn (every connection of that server one round trip, all at once; the order rotating,
//!   [`traffic::lockstep`]), each server's round trips recorded under its own id. A drift of
//!   the machine's load within the bench then falls on the three alike, and the latency
//!   ratios compare round trips of the same seconds.

// criterion_group! and criterion_main! generate public functions without docs.
#![allow(missing_docs)]

use std::{sync::Arc, time::Duration};

use benches::{
    harness, report,
    results::{MEASURED, Recorder, RunInfo},
    rig::EchoRig,
    traffic::{self, Message},
};
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, measurement::WallTime,
};
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
    // The largest message is exactly 64 KiB, the codec's default limit; set it explicitly so
    // a change of default cannot make the 64 KiB benches measure error lines.
    let servers_rig = EchoRig::start(SIZES[2].0).expect("start the servers");
    let servers = servers_rig.servers();
    let rig = &servers_rig;

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
                let cpu = Arc::new(std::sync::Mutex::new(
                    Recorder::new(format!("echo/cpu/{name}/{label}-{n}conn"), SAMPLES).describe(
                        MEASURED,
                        "the servers' CPU time per message echoed, over one sample",
                    ),
                ));
                group.bench_function(id, |b| {
                    b.to_async(&rt).iter_custom(|iters| {
                        let (conns, message, cpu) = (conns.clone(), message.clone(), cpu.clone());
                        async move {
                            let conns = conns
                                .get_or_try_init(|| traffic::connect_all(addr, n))
                                .await
                                .expect("connect to the server");
                            let cpu_before = rig.cpu_time().expect("the servers' CPU time");
                            let start = Instant::now();
                            traffic::pipelined(conns, &message, iters)
                                .await
                                .expect("pipelined echo traffic");
                            let elapsed = start.elapsed();
                            let used = rig
                                .cpu_time()
                                .expect("the servers' CPU time")
                                .saturating_sub(cpu_before);
                            let mut cpu = cpu.lock().expect("recorder lock");
                            cpu.start_call();
                            let messages = (iters * n as u64).max(1) as f64;
                            cpu.push_signed(MEASURED, used.as_nanos() as f64 / messages);
                            elapsed
                        }
                    })
                });
                let saved = cpu.lock().expect("recorder lock").save();
                saved.expect("save the CPU recording");
            }
        }
    }
    group.finish();

    let mut group = c.benchmark_group("echo/latency");
    configure_latency(&mut group);
    for (size, label) in SIZES {
        for n in CONNECTIONS {
            // One bench for all three servers: an iteration is one round on each, in turn.
            let id = BenchmarkId::new(report::INTERLEAVED, format!("{label}-{n}conn"));
            let recorders: Arc<std::sync::Mutex<Vec<Recorder>>> = Arc::new(std::sync::Mutex::new(
                servers
                    .iter()
                    .map(|(name, _)| {
                        Recorder::new(format!("echo/latency/{name}/{label}-{n}conn"), SAMPLES)
                            .describe(
                                MEASURED,
                                "round trip of one message, each connection's own, the \
                                 servers in alternation",
                            )
                    })
                    .collect(),
            ));
            let conns: Arc<OnceCell<Vec<Conns>>> = Arc::default();
            let message = Arc::new(Message::new(size));
            group.bench_function(id, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (conns, message, recorders) =
                        (conns.clone(), message.clone(), recorders.clone());
                    async move {
                        let conns = conns
                            .get_or_try_init(|| async {
                                let mut all = Vec::with_capacity(servers.len());
                                for (_, addr) in servers {
                                    all.push(traffic::connect_all(addr, n).await?);
                                }
                                Ok::<_, benches::Error>(all)
                            })
                            .await
                            .expect("connect to the servers");
                        let start = Instant::now();
                        let rtts = traffic::lockstep(conns, &message, iters)
                            .await
                            .expect("lockstep echo traffic");
                        // Each connection made `iters` round trips on each server, one
                        // server's round at a time: wall time per iteration ≈ one round
                        // trip on each server under that concurrency.
                        let elapsed = start.elapsed();
                        let mut recorders = recorders.lock().expect("recorder lock");
                        for (recorder, rtts) in recorders.iter_mut().zip(rtts) {
                            recorder.start_call();
                            recorder.extend(MEASURED, rtts);
                        }
                        elapsed
                    }
                })
            });
            for recorder in recorders.lock().expect("recorder lock").iter() {
                recorder.save().expect("save the latency recording");
            }
        }
    }
    group.finish();

    servers_rig.stop().expect("the echo-server stops cleanly");
    run.finish().expect("save the run's record");
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(SAMPLES)
        .nresamples(harness::NRESAMPLES)
        .warm_up_time(Duration::from_millis(250))
        .measurement_time(Duration::from_millis(1200));
}

fn configure_latency(group: &mut BenchmarkGroup<'_, WallTime>) {
    configure(group);
    // One bench measures the three servers: each gets the time it had alone.
    group.measurement_time(Duration::from_millis(3 * 1200));
    // One value per message is recorded anyway; flat sampling keeps the slowest (64 KiB on
    // 32 connections) within its time.
    group.sampling_mode(SamplingMode::Flat);
}

criterion::criterion_group!(benches, echo);
criterion::criterion_main!(benches);
