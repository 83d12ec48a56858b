//! echo/throughput and echo/latency: the echo-server against two raw copiers, messages of
//! 16 B, 1 KiB and 64 KiB, on one and on 32 connections at once. `raw-buf` reads and writes
//! back with a buffer of the echo-server's read size (the fair baseline), `raw-copy` is
//! `tokio::io::copy` (8 KiB, reading ahead while a write waits), `raw-buf-twin` is a second
//! `raw-buf` (the control: its ratio to `raw-buf`, measured the same way as echo-server's, is
//! how far two identical servers read apart in this run). All four run in this
//! process on one runtime of their own ([`benches::lineup`]: threads `servers`, multi-threaded,
//! one worker per CPU, as the echo-server binary runs; `echo-probe` drives the same servers
//! without criterion, for profiles). Both measure the servers in alternation, not one
//! after the other, so a drift of the machine's load falls on all alike and the ratios
//! compare the same seconds. The load runs on criterion's runtime and is the same for all:
//! raw sockets writing newline-terminated messages and checking every echoed byte.
//!
//! * `echo/throughput/<server>/<size>-<n>conn`: one criterion bench per size and connection
//!   count, `echo/throughput/interleaved/<size>-<n>conn`, whose sample of `iters`
//!   iterations is one turn on each server in a rotating order ([`traffic::turn_order`]):
//!   in a turn each of that server's connections writes `iters` messages back to back (in
//!   blocks of up to 64 KiB) while reading the echoes ([`traffic::pipelined`]). Each turn's
//!   time per iteration is recorded under its server's id, one value per sample, with the
//!   payload bytes per iteration, so the report shows bytes per second per server. The
//!   servers' CPU time over each turn, per message, is recorded as
//!   `echo/cpu/<server>/<size>-<n>conn` (only that server has traffic in its turn).
//! * `echo/latency/<server>/<size>-<n>conn`: one message in flight per connection; every
//!   round trip is recorded, so the p99 is per message. One criterion bench per size and
//!   connection count, `echo/latency/interleaved/<size>-<n>conn`, whose iteration is one
//!   round on each server in turn (every connection of that server one round trip, all at
//!   once; the order rotating, [`traffic::lockstep`]), each server's round trips recorded
//!   under its own id.
//!
//! The interleaved benches' own times (all servers together) are no server's; the report
//! leaves them out.

// criterion_group! and criterion_main! generate public functions without docs.
#![allow(missing_docs)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use benches::{
    harness,
    lineup::{self, Lineup},
    report,
    results::{MEASURED, Recorder, RunInfo},
    spread,
    traffic::{self, Message},
};
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, measurement::WallTime};
use tokio::{runtime::Runtime, sync::OnceCell, time::Instant};

const SIZES: [(usize, &str); 3] = [(16, "16B"), (1 << 10, "1KiB"), (64 << 10, "64KiB")];
const CONNECTIONS: [usize; 2] = [1, 32];
/// Samples per bench, each one turn (throughput) or one round (latency) on each server. At 20
/// the 16B-1conn throughput ratio's 95 % interval was 0.08–0.15 wide, and six runs of the
/// same code read it at 0.94–0.97×, on either side of the 0.95× goal; at 60 its interval is
/// 0.04–0.06 wide, the other rows' up to 0.10 (runs of `echo/throughput/interleaved/…` and
/// of the whole bench, issue 37). It costs the bench about two minutes more.
const SAMPLES: usize = 60;

type Conns = Vec<traffic::SharedConn>;

/// The rig's servers and their addresses, in the rig's order.
type Servers = [(&'static str, SocketAddr); lineup::SERVERS.len()];

/// Where echo-server, the fair baseline and the twin sit in the rig's order.
#[derive(Debug, Clone, Copy)]
struct At {
    ours: usize,
    fair: usize,
    twin: usize,
}

fn echo(c: &mut Criterion) {
    harness::init_tracing();
    let run = RunInfo::start("echo");
    let rt = harness::runtime().expect("the client runtime");
    // The largest message is exactly 64 KiB, the codec's default limit; set it explicitly so
    // a change of default cannot make the 64 KiB benches measure error lines.
    let servers_rig = Lineup::start(SIZES[2].0).expect("start the servers");
    let servers = servers_rig.servers();
    let index = |name: &str| {
        servers
            .iter()
            .position(|(n, _)| *n == name)
            .expect("the rig runs this server")
    };
    let at = At {
        ours: index(report::ECHO_SERVERS[0]),
        fair: index(report::ECHO_SERVERS[1]),
        twin: index(report::TWIN),
    };

    let mut group = c.benchmark_group("echo/throughput");
    configure_interleaved(&mut group);
    for (size, label) in SIZES {
        for n in CONNECTIONS {
            throughput(
                &mut group,
                &rt,
                &servers_rig,
                at,
                size,
                &format!("{label}-{n}conn"),
                n,
            );
        }
    }
    group.finish();

    let mut group = c.benchmark_group("echo/latency");
    configure_latency(&mut group);
    for (size, label) in SIZES {
        for n in CONNECTIONS {
            latency(
                &mut group,
                &rt,
                servers,
                at,
                size,
                &format!("{label}-{n}conn"),
                n,
            );
        }
    }
    group.finish();

    servers_rig.stop().expect("the echo-server stops cleanly");
    run.finish().expect("save the run's record");
}

/// Bench `id` of `group` on `n` connections to each of `servers` (opened on first use, kept
/// for the bench), messages of `size` bytes: each call of the timed routine is `turn`.
fn bench_connected(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    id: BenchmarkId,
    (servers, n): (Servers, usize),
    size: usize,
    turn: impl AsyncFn(&[Conns], &Arc<Message>, u64) -> Duration,
) {
    let conns: OnceCell<Vec<Conns>> = OnceCell::new();
    let message = Arc::new(Message::new(size));
    let (conns, message, turn) = (&conns, &message, &turn);
    group.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let conns = conns
                .get_or_try_init(|| connect_each(servers, n))
                .await
                .expect("connect to the servers");
            turn(conns, message, iters).await
        })
    });
}

/// `echo/throughput/interleaved/<label>`: one bench for all the servers; an iteration is one
/// message per connection on each server, the servers one after the other in a rotating
/// order. Records each server's time and CPU per turn and the paired ratios.
fn throughput(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    rig: &Lineup,
    at: At,
    size: usize,
    label: &str,
    n: usize,
) {
    let servers = rig.servers();
    let id = BenchmarkId::new(report::INTERLEAVED, label);
    let bytes = (size * n) as u64;
    let recorders = Mutex::new(Turns {
        calls: 0,
        time: servers
            .iter()
            .map(|(name, _)| {
                Recorder::new(format!("echo/throughput/{name}/{label}"), SAMPLES)
                    .describe(
                        MEASURED,
                        "time per iteration (one message per connection) of this \
                         server's turn in one sample, the servers in alternation",
                    )
                    .throughput(bytes)
            })
            .collect(),
        cpu: servers
            .iter()
            .map(|(name, _)| {
                Recorder::new(format!("echo/cpu/{name}/{label}"), SAMPLES).describe(
                    MEASURED,
                    "the servers' CPU time per message echoed, over this \
                         server's turn in one sample",
                )
            })
            .collect(),
        paired: Recorder::new(format!("{}{label}", report::PAIRED_PREFIX), SAMPLES).describe(
            MEASURED,
            "the fair baseline's time ÷ echo-server's in the same sample (their \
             turns adjacent, the same iterations): echo-server's throughput as a \
             multiple of the baseline's, one value per sample",
        ),
        twin: Recorder::new(format!("{}{label}", report::TWIN_PREFIX), SAMPLES).describe(
            MEASURED,
            "the fair baseline's time ÷ its twin's in the same sample: the \
             control, the ratio two identical servers give, one value per sample",
        ),
    });
    let turn = async |conns: &[Conns], message: &Arc<Message>, iters: u64| {
        let call = {
            let mut turns = recorders.lock().expect("recorder lock");
            turns.calls += 1;
            turns.calls - 1
        };
        // Each server's (wall time, servers' CPU time) of its turn. Only that server has
        // traffic in its turn, so the runtime's CPU time is its.
        let mut took = vec![(Duration::ZERO, Duration::ZERO); conns.len()];
        let start = Instant::now();
        for s in traffic::turn_order(call, conns.len()) {
            let cpu_before = rig.cpu_time().expect("the servers' CPU time");
            let turn = Instant::now();
            traffic::pipelined(&conns[s], message, iters)
                .await
                .expect("pipelined echo traffic");
            let elapsed = turn.elapsed();
            let used = rig
                .cpu_time()
                .expect("the servers' CPU time")
                .saturating_sub(cpu_before);
            took[s] = (elapsed, used);
        }
        let elapsed = start.elapsed();
        recorders
            .lock()
            .expect("recorder lock")
            .record(&took, at, iters, n);
        elapsed
    };
    bench_connected(group, rt, id, (servers, n), size, turn);
    let mut turns = recorders.into_inner().expect("recorder lock");
    for recorder in [&mut turns.paired, &mut turns.twin] {
        let ratios: Vec<f64> = recorder.per_call(MEASURED).concat();
        recorder.bound(report::MEDIAN_INTERVAL, spread::median_interval(&ratios));
    }
    for recorder in turns
        .time
        .iter()
        .chain(&turns.cpu)
        .chain([&turns.paired, &turns.twin])
    {
        recorder.save().expect("save the throughput recording");
    }
}

/// `echo/latency/interleaved/<label>`: one bench for all the servers; an iteration is one
/// round on each, in turn. Records every round trip under its server's id, and the 95 %
/// intervals of echo-server's and the twin's ratios to the fair baseline.
fn latency(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    servers: Servers,
    at: At,
    size: usize,
    label: &str,
    n: usize,
) {
    let id = BenchmarkId::new(report::INTERLEAVED, label);
    let recorders: Mutex<Vec<Recorder>> = Mutex::new(
        servers
            .iter()
            .map(|(name, _)| {
                Recorder::new(format!("echo/latency/{name}/{label}"), SAMPLES).describe(
                    MEASURED,
                    "round trip of one message, each connection's own, the \
                     servers in alternation",
                )
            })
            .collect(),
    );
    let turn = async |conns: &[Conns], message: &Arc<Message>, iters: u64| {
        let start = Instant::now();
        let rtts = traffic::lockstep(conns, message, iters)
            .await
            .expect("lockstep echo traffic");
        // Each connection made `iters` round trips on each server, one server's round at a
        // time: wall time per iteration ≈ one round trip on each server under that
        // concurrency.
        let elapsed = start.elapsed();
        let mut recorders = recorders.lock().expect("recorder lock");
        for (recorder, rtts) in recorders.iter_mut().zip(rtts) {
            recorder.start_call();
            recorder.extend(MEASURED, rtts);
        }
        elapsed
    };
    bench_connected(group, rt, id, (servers, n), size, turn);
    let mut recorders = recorders.into_inner().expect("recorder lock");
    // How sure the latency ratios are: a bootstrap over the samples, each sample's round
    // trips on both servers kept together (they share its seconds). The twin's too: how far
    // an identical server reads from the baseline.
    for ours in [at.ours, at.twin] {
        let bounds: Vec<_> = report::LATENCY_INTERVALS
            .iter()
            .map(|&(what, p)| {
                let interval = spread::ratio_interval(
                    &recorders[ours].per_call(MEASURED),
                    &recorders[at.fair].per_call(MEASURED),
                    p,
                );
                (what, interval)
            })
            .collect();
        for (what, interval) in bounds {
            recorders[ours].bound(what, interval);
        }
    }
    for recorder in &recorders {
        recorder.save().expect("save the latency recording");
    }
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(SAMPLES)
        .nresamples(harness::NRESAMPLES)
        .warm_up_time(Duration::from_millis(250))
        .measurement_time(Duration::from_millis(1200));
}

/// One bench measures all the servers: each gets the time it had alone. Flat sampling:
/// every sample the same number of iterations, so no server's turn is the few milliseconds
/// the first samples of a linear sampling get (turns that short are as much the machine's
/// noise as the server's time).
fn configure_interleaved(group: &mut BenchmarkGroup<'_, WallTime>) {
    configure(group);
    group
        // Three times the samples in three times the time: each sample's turns as long as
        // at 20 samples in 4.8 s.
        .measurement_time(Duration::from_millis(lineup::SERVERS.len() as u64 * 3600))
        .sampling_mode(SamplingMode::Flat);
}

fn configure_latency(group: &mut BenchmarkGroup<'_, WallTime>) {
    // One value per message is recorded anyway; flat sampling also keeps the slowest (64 KiB
    // on 32 connections) within its time.
    configure_interleaved(group);
}

/// Each server's per-server recordings of the interleaved throughput bench, in the order of
/// the rig's servers, and how many times the timed routine has been called (the rotation).
struct Turns {
    calls: u64,
    time: Vec<Recorder>,
    cpu: Vec<Recorder>,
    /// Per sample, `raw-buf`'s turn time ÷ echo-server's: the throughput ratio of two
    /// turns run back to back, so a drift of the machine's load between samples cancels.
    paired: Recorder,
    /// The same for `raw-buf`'s twin: the ratio of two identical servers.
    twin: Recorder,
}

impl Turns {
    /// Record one sample: each server's (wall time, servers' CPU time) of its turn of
    /// `iters` messages on each of `n` connections, and the paired ratios.
    fn record(&mut self, took: &[(Duration, Duration)], at: At, iters: u64, n: usize) {
        let fair = took[at.fair].0;
        for (recorder, other) in [(&mut self.paired, at.ours), (&mut self.twin, at.twin)] {
            recorder.start_call();
            let other = took[other].0;
            if !other.is_zero() {
                recorder.push_signed(MEASURED, fair.as_secs_f64() / other.as_secs_f64());
            }
        }
        let messages = (iters * n as u64).max(1) as f64;
        for ((time, cpu), (elapsed, used)) in self.time.iter_mut().zip(&mut self.cpu).zip(took) {
            time.start_call();
            time.push_signed(MEASURED, elapsed.as_nanos() as f64 / iters.max(1) as f64);
            cpu.start_call();
            cpu.push_signed(MEASURED, used.as_nanos() as f64 / messages);
        }
    }
}

/// `n` connections to each of `servers`, in their order.
async fn connect_each(servers: Servers, n: usize) -> benches::Result<Vec<Conns>> {
    let mut all = Vec::with_capacity(servers.len());
    for (_, addr) in servers {
        all.push(traffic::connect_all(addr, n).await?);
    }
    Ok(all)
}

criterion::criterion_group!(benches, echo);
criterion::criterion_main!(benches);
