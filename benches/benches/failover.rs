//! failover/kill and failover/unhealthy: how fast a resilient client (an `EchoClient` sending
//! one message after another) moves from instance A to a healthy instance B.
//!
//! * `failover/kill/floor_connect_echo`: a fresh loopback connect plus one echo — the least a
//!   failover can cost, measured in the same run so the ratio shows.
//! * `failover/kill/inprocess_abort`: A is an in-process echo-server whose runtime is torn
//!   down at once (every socket closed, nothing drained); the client gets its instances from
//!   a fixed list. Times the teardown → the first correct reply from B.
//! * `failover/kill/sigkill_process`: A is an echo-server process registered in Consul, and
//!   the client discovers A and B through Consul. Times SIGKILL → the first correct reply
//!   from B. Processes are this package's `bench-echo-server` binary.
//! * `failover/kill/floor_open_echo`, `…/inprocess_abort_standby`, `…/sigkill_process_standby`:
//!   the same two kills with the client's standby connection on (`SessionConfig::standby`,
//!   off by default and in the two rows above), each started once the standby to B is open, against
//!   the floor of a failover that needs no connect: one echo round trip on an open
//!   connection, measured in the same run.
//! * `failover/unhealthy/consul_to_switch`: A's `/check` turns 503; times Consul dropping A
//!   from the passing set (as an independent blocking query sees it) → the first reply from
//!   B. The whole time from the 503 is recorded alongside (it includes the check interval).
//!
//! Each iteration kills (or fails) the instance the client is on, and restores it outside
//! the timed part (a new server for the killed one, `/check` healthy again), so the roles of
//! A and B alternate. The victim is the instance of the last reply once the client has
//! streamed [`STEADY_REPLIES`] at full speed, and only a reply from B that came back after
//! the fault counts. The clients run with `SessionConfig::spread` off: spreading moves a
//! session to a restored instance once it is listed again (with probability ½ for two
//! instances), which is no failover — with it on and the victim read before the steady
//! replies, the run of 2026-12-06 timed half of its in-process kills at 0 ns (a reply from B
//! that came before the kill). One real Consul serves the group, started on first use.

// criterion_group! and criterion_main! generate public functions without docs.
#![allow(missing_docs)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use benches::{
    Error, Result,
    consul_view::{self, Observer},
    harness,
    harness::SharedConsul,
    report,
    results::{MEASURED, Recorder, RunInfo},
    servers::ServerThread,
    traffic::{self, CloseProbe, Message},
};
use consul_harness::{Consul, signal::Signal};
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, measurement::WallTime};
use echo_client::{ClientConfig, EchoClient, Instance, SessionConfig, Snapshot};
use echo_rig::traffic::Stream;
use echo_rig::{Launcher, ServerProcess, ServerSpec};
use echo_server::Config;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    runtime::Runtime,
    sync::{OnceCell, watch},
    time::Instant,
};

/// Deadline of any one wait (a reply, a view, a server start).
const WAIT: Duration = Duration::from_secs(15);
/// Safety bound of a streamer's life.
const STREAM_LIMIT: Duration = Duration::from_secs(900);
/// Replies seen at full speed before a fault, so one is in flight when it strikes.
const STEADY_REPLIES: u64 = 20;
/// Consul's floor for a check's interval (shorter ones are raised to it).
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);
/// Samples (one event each) of the SIGKILL bench: a restart costs some 20 ms.
const SIGKILL_SAMPLES: usize = 100;
/// Samples (one event each) of the unhealthy bench: each waits for Consul's checks, twice
/// up to the 1 s interval (A failing, then the previous victim passing again).
const UNHEALTHY_SAMPLES: usize = 30;
const IDS: [&str; 2] = ["a", "b"];

type Shared<T> = Arc<tokio::sync::Mutex<Option<T>>>;
type SharedRecorder = Arc<Mutex<Recorder>>;

fn failover(c: &mut Criterion) {
    harness::init_tracing();
    let mut run = RunInfo::start("failover");
    let rt = harness::runtime().expect("the bench runtime");
    let consul = SharedConsul::new();
    let mut group = c.benchmark_group("failover");
    floor(&mut group, &rt);
    floor_open(&mut group, &rt);
    inprocess_abort(&mut group, &rt, false);
    inprocess_abort(&mut group, &rt, true);
    sigkill_process(&mut group, &rt, &consul, false);
    sigkill_process(&mut group, &rt, &consul, true);
    unhealthy(&mut group, &rt, &consul);
    group.finish();
    rt.block_on(consul.finish(&mut run)).expect("stop Consul");
    run.finish().expect("save the run's record");
}

/// Criterion settings for benches whose every iteration is one event with a setup around it:
/// one event per sample (criterion warns that it cannot fit more in the target time: that is
/// by design) and a single warm-up iteration.
fn one_event_per_sample(group: &mut BenchmarkGroup<'_, WallTime>, samples: usize) {
    let tiny = Duration::from_millis(1);
    settings(group, samples, SamplingMode::Flat, tiny, tiny);
}

/// Criterion settings of a bench: `samples` samples (the kit's resamples), `mode`, and its
/// warm-up and measurement times.
fn settings(
    group: &mut BenchmarkGroup<'_, WallTime>,
    samples: usize,
    mode: SamplingMode,
    warm_up: Duration,
    measurement: Duration,
) {
    group
        .sample_size(samples)
        .nresamples(benches::harness::NRESAMPLES)
        .sampling_mode(mode)
        .warm_up_time(warm_up)
        .measurement_time(measurement);
}

fn recorder(id: &str, keep: usize, parts: &[(&str, &str)]) -> SharedRecorder {
    let mut r = Recorder::new(id, keep);
    for (series, text) in parts {
        r = r.describe(series, text);
    }
    Arc::new(Mutex::new(r))
}

/// One criterion call's timed intervals, recorded as a call of their own; returns their sum.
fn record_call(recorder: &SharedRecorder, times: Vec<Duration>) -> Duration {
    let total = times.iter().sum();
    let mut rec = recorder.lock().expect("recorder lock");
    rec.start_call();
    rec.extend(MEASURED, times);
    total
}

fn save(recorder: &SharedRecorder) {
    let saved = recorder.lock().expect("recorder lock").save();
    saved.expect("save the recording");
}

/// The length of a streamer's message (`stream 000000000001`), used by the floor too.
const MESSAGE_LEN: usize = 19;

// === failover/kill/floor_connect_echo ===

fn floor(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime) {
    const SAMPLES: usize = 30;
    let rec = recorder(
        "failover/kill/floor_connect_echo",
        SAMPLES,
        &[(MEASURED, "connect + one echo")],
    );
    let server: Arc<OnceCell<ServerThread>> = Arc::default();
    let (warm_up, measure) = (Duration::from_millis(300), Duration::from_secs(2));
    settings(group, SAMPLES, SamplingMode::Auto, warm_up, measure);
    group.bench_function(BenchmarkId::new("kill", "floor_connect_echo"), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (server, rec) = (server.clone(), rec.clone());
            async move {
                let server = server
                    .get_or_try_init(|| ServerThread::start(Config::local()))
                    .await
                    .expect("start the echo-server");
                let message = Message::new(MESSAGE_LEN);
                let mut times = Vec::with_capacity(iters as usize);
                for _ in 0..iters {
                    let start = Instant::now();
                    traffic::connect_and_echo(server.echo_addr(), &message)
                        .await
                        .expect("connect and echo");
                    times.push(start.elapsed());
                }
                record_call(&rec, times)
            }
        })
    });
    save(&rec);
    if let Some(server) = Arc::into_inner(server).and_then(OnceCell::into_inner) {
        rt.block_on(server.shutdown())
            .expect("stop the echo-server");
    }
}

// === failover/kill/floor_open_echo ===

fn floor_open(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime) {
    const SAMPLES: usize = 30;
    let rec = recorder(
        "failover/kill/floor_open_echo",
        SAMPLES,
        &[(MEASURED, "one echo on an open connection")],
    );
    let open: Arc<OnceCell<(ServerThread, tokio::sync::Mutex<TcpStream>)>> = Arc::default();
    let (warm_up, measure) = (Duration::from_millis(300), Duration::from_secs(2));
    settings(group, SAMPLES, SamplingMode::Auto, warm_up, measure);
    group.bench_function(BenchmarkId::new("kill", "floor_open_echo"), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (open, rec) = (open.clone(), rec.clone());
            async move {
                let (_, stream) = open
                    .get_or_try_init(|| async {
                        let server = ServerThread::start(Config::local()).await?;
                        let stream = TcpStream::connect(server.echo_addr()).await?;
                        stream.set_nodelay(true)?;
                        Ok::<_, Error>((server, tokio::sync::Mutex::new(stream)))
                    })
                    .await
                    .expect("start the echo-server and connect");
                let mut stream = stream.lock().await;
                let message = Message::new(MESSAGE_LEN);
                let mut buf = vec![0u8; message.wire().len()];
                let mut times = Vec::with_capacity(iters as usize);
                for _ in 0..iters {
                    let start = Instant::now();
                    stream.write_all(message.wire()).await.expect("write");
                    stream.read_exact(&mut buf).await.expect("read the echo");
                    times.push(start.elapsed());
                    assert_eq!(buf, message.wire(), "an echo");
                }
                record_call(&rec, times)
            }
        })
    });
    save(&rec);
    if let Some((server, stream)) = Arc::into_inner(open).and_then(OnceCell::into_inner) {
        drop(stream);
        rt.block_on(server.shutdown())
            .expect("stop the echo-server");
    }
}

/// With the standby on: wait until the client holds an open connection to the echo port
/// `port` of the instance it is not on (its standby), so that the kill tests the failover
/// onto it. Read from the kernel's socket tables (`/proc/net/tcp`, `tcp6`): an established
/// connection whose remote end is `port` on loopback (the client's side).
async fn standby_open(port: u16) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if established_to(port)? > 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Invalid(format!(
                "no standby connection to port {port} within {WAIT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Established TCP connections whose remote port is `port`.
fn established_to(port: u16) -> Result<usize> {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        n += text
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let remote_port = fields
                    .get(2)
                    .and_then(|r| r.rsplit(':').next())
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                remote_port == Some(port) && fields.get(3) == Some(&"01")
            })
            .count();
    }
    Ok(n)
}

// === failover/kill/inprocess_abort ===

/// A, B in process; the client's instances come from a list this rig feeds.
struct InProcessRig {
    servers: BTreeMap<String, ServerThread>,
    feed: watch::Sender<Snapshot>,
    streamer: Stream,
    standby: bool,
}

impl InProcessRig {
    async fn start(standby: bool) -> Result<Self> {
        let mut servers = BTreeMap::new();
        for id in IDS {
            servers.insert(id.to_owned(), ServerThread::start(Config::local()).await?);
        }
        let (feed, view) = watch::channel(Snapshot::fixed(Self::instances(&servers)));
        let mut session = SessionConfig::new("inprocess");
        session.standby = standby;
        session.spread = false;
        let client = EchoClient::with_discovery(view, session)?;
        let streamer = traffic::stream(&client, STREAM_LIMIT);
        streamer.replies(3, WAIT).await?;
        Ok(InProcessRig {
            servers,
            feed,
            streamer,
            standby,
        })
    }

    fn instances(servers: &BTreeMap<String, ServerThread>) -> Vec<Instance> {
        servers
            .iter()
            .map(|(id, s)| Instance::new(id.clone(), "127.0.0.1", s.echo_addr().port()))
            .collect()
    }
}

impl Rig for InProcessRig {
    async fn stop(self) -> Result<()> {
        stop_threads(self.streamer, self.servers).await
    }

    async fn once(&mut self, rec: &SharedRecorder) -> Result<Duration> {
        if self.standby {
            let on = current(&self.streamer)?;
            for (id, other) in &self.servers {
                if *id != on.id {
                    standby_open(other.echo_addr().port()).await?;
                }
            }
        }
        let (victim, measured) = timed_kill(
            &self.streamer,
            &mut self.servers,
            ServerThread::echo_addr,
            rec,
            |server| {
                server.abort();
                Ok(())
            },
        )
        .await?;

        // Restore, untimed: a new server in the killed one's place (a new port).
        if let Some(mut dead) = self.servers.remove(&victim) {
            dead.join().await?;
        }
        let fresh = ServerThread::start(Config::local()).await?;
        self.servers.insert(victim, fresh);
        let instances = Self::instances(&self.servers);
        self.feed.send_modify(|s| {
            *s = s.with_instances(instances, s.index + 1, std::time::SystemTime::now())
        });
        Ok(measured)
    }
}

/// The instance the client is on, and its server among `servers`: the next victim.
fn victim<'a, S>(
    streamer: &Stream,
    servers: &'a mut BTreeMap<String, S>,
) -> Result<(Instance, &'a mut S)> {
    let victim = current(streamer)?;
    let server = servers
        .get_mut(&victim.id)
        .ok_or_else(|| Error::Invalid(format!("no server {}", victim.id)))?;
    Ok((victim, server))
}

fn current(streamer: &Stream) -> Result<Instance> {
    streamer
        .last()
        .instance
        .ok_or_else(|| Error::Invalid("the streamer has no reply yet".into()))
}

/// One timed kill: the streamer in its steady state, then the instance of its last reply
/// (the one it is on) is the victim: an idle probe connection opened to it (at `addr`), then
/// `kill` → the first correct reply from another instance that came back after the kill; the
/// interval and its parts recorded in `rec`. Returns the victim's ID and the timed interval.
async fn timed_kill<S>(
    streamer: &Stream,
    servers: &mut BTreeMap<String, S>,
    addr: impl Fn(&S) -> SocketAddr,
    rec: &SharedRecorder,
    kill: impl FnOnce(&mut S) -> Result<()>,
) -> Result<(String, Duration)> {
    streamer.arm(true);
    streamer.replies(STEADY_REPLIES, WAIT).await?;
    let (victim, server) = victim(streamer, servers)?;
    let probe = CloseProbe::connect(addr(server)).await?;

    let killed = Instant::now();
    kill(server)?;
    let replied = streamer
        .reply_from_other_than(&victim.id, killed, WAIT)
        .await;
    streamer.arm(false);
    let replied = replied?;
    let closed = probe.closed(WAIT).await?;
    let measured = replied - killed;
    record_kill(rec, measured, closed.saturating_duration_since(killed));
    Ok((victim.id, measured))
}

const KILL_PARTS: [(&str, &str); 3] = [
    (MEASURED, "kill → first correct reply from B"),
    (
        report::DETECTION,
        "kill → an idle probe connection to A sees the close (detection on the wire)",
    ),
    (
        "after_eof",
        "the close seen → first correct reply from B (client: notice, eject, connect to B, resend, echo)",
    ),
];

const STANDBY_PARTS: [(&str, &str); 3] = [
    (
        MEASURED,
        "kill → first correct reply on the standby connection to B",
    ),
    (
        report::DETECTION,
        "kill → an idle probe connection to A sees the close (detection on the wire)",
    ),
    (
        "after_eof",
        "the close seen → first correct reply on the standby (client: notice, eject, resend on the standby, echo)",
    ),
];

fn record_kill(rec: &SharedRecorder, measured: Duration, probe_eof: Duration) {
    let mut rec = rec.lock().expect("recorder lock");
    rec.push(MEASURED, measured);
    rec.push(report::DETECTION, probe_eof);
    rec.push_signed(
        "after_eof",
        measured.as_nanos() as f64 - probe_eof.as_nanos() as f64,
    );
}

/// Stop the streamer, then shut each in-process server down cleanly.
async fn stop_threads(streamer: Stream, servers: BTreeMap<String, ServerThread>) -> Result<()> {
    streamer.finish().await;
    for server in servers.into_values() {
        server.shutdown().await?;
    }
    Ok(())
}

/// A set-up bench: servers, a client, a streamer.
trait Rig {
    /// One timed event and its restore; returns the timed interval.
    async fn once(&mut self, rec: &SharedRecorder) -> Result<Duration>;
    /// Stop the servers and the streamer, cleanly.
    async fn stop(self) -> Result<()>;
}

/// Run `iters` events on the rig in `rig` (set up by `start` on first use: the first call is
/// criterion's warm-up); returns the sum of the timed intervals.
async fn run_iterations<R: Rig, F: Future<Output = Result<R>>>(
    rig: &Shared<R>,
    rec: &SharedRecorder,
    iters: u64,
    start: impl FnOnce() -> F,
) -> Duration {
    let mut guard = rig.lock().await;
    if guard.is_none() {
        *guard = Some(start().await.expect("set up the bench"));
    }
    let Some(rig) = guard.as_mut() else {
        unreachable!("set up just above");
    };
    rec.lock().expect("recorder lock").start_call();
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        total += rig.once(rec).await.expect("one iteration");
    }
    total
}

/// Take the rig out of `rig` and stop it.
fn stop_rig<R>(rt: &Runtime, rig: &Shared<R>, stop: impl AsyncFnOnce(R) -> Result<()>) {
    let taken = rt.block_on(async { rig.lock().await.take() });
    if let Some(r) = taken {
        rt.block_on(stop(r)).expect("stop the bench's servers");
    }
}

/// A rig set up against the bench group's shared Consul.
trait ConsulRig: Rig + Sized {
    /// Start the rig's servers, client and observer against `consul`.
    async fn start(consul: &Consul) -> Result<Self>;
}

/// Bench `function/parameter` of the group: one event per sample on an `R`, set up against
/// the shared Consul on first use (criterion's warm-up) and torn down after; the recording
/// saved.
fn consul_bench<R: ConsulRig>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    consul: &Arc<SharedConsul>,
    rec: &SharedRecorder,
    samples: usize,
    (function, parameter): (&str, &str),
) {
    let rig: Shared<R> = Arc::default();
    let id = rec.lock().expect("recorder lock").id().to_owned();
    one_event_per_sample(group, samples);
    group.bench_function(BenchmarkId::new(function, parameter), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (rig, rec, consul, id) = (rig.clone(), rec.clone(), consul.clone(), id.clone());
            async move {
                let start = || async move {
                    let rig = R::start(consul.get().await?).await;
                    harness::note_one_event_per_sample(&id);
                    rig
                };
                run_iterations(&rig, &rec, iters, start).await
            }
        })
    });
    save(rec);
    stop_rig(rt, &rig, R::stop);
}

fn inprocess_abort(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, standby: bool) {
    const SAMPLES: usize = 40;
    let name = if standby {
        "inprocess_abort_standby"
    } else {
        "inprocess_abort"
    };
    let parts = if standby { &STANDBY_PARTS } else { &KILL_PARTS };
    let rec = recorder(&format!("failover/kill/{name}"), SAMPLES, parts);
    let rig: Shared<InProcessRig> = Arc::default();
    // Cheap iterations: several per sample.
    let (warm_up, measure) = (Duration::from_millis(300), Duration::from_secs(4));
    settings(group, SAMPLES, SamplingMode::Flat, warm_up, measure);
    group.bench_function(BenchmarkId::new("kill", name), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (rig, rec) = (rig.clone(), rec.clone());
            let start = move || InProcessRig::start(standby);
            async move { run_iterations(&rig, &rec, iters, start).await }
        })
    });
    save(&rec);
    stop_rig(rt, &rig, InProcessRig::stop);
}

// === failover/kill/sigkill_process ===

/// A, B as processes registered in Consul; the client discovers them through Consul; with
/// `STANDBY`, the client keeps its standby connection.
struct ProcessRig<const STANDBY: bool> {
    launcher: Launcher,
    consul: consul_api::Config,
    servers: BTreeMap<String, ServerProcess>,
    view: watch::Receiver<Snapshot>,
    streamer: Stream,
}

const KILL_SERVICE: &str = "failover-kill";

impl<const STANDBY: bool> ProcessRig<STANDBY> {
    fn spec(consul: &consul_api::Config, id: &str) -> Result<ServerSpec> {
        Ok(ServerSpec::seed(consul.clone())?
            .named(KILL_SERVICE, id)
            .with_check(CHECK_INTERVAL, CHECK_TIMEOUT, Duration::from_secs(60)))
    }

    async fn listed(view: &watch::Receiver<Snapshot>, server: &ServerProcess) -> Result<Instant> {
        let (id, port) = (server.spec.args.id.clone(), server.spec.args.port);
        consul_view::view_until(view, &format!("{id} on port {port}"), WAIT, |s| {
            consul_view::lists_at(&s.instances, &id, port)
        })
        .await
    }
}

impl<const STANDBY: bool> ConsulRig for ProcessRig<STANDBY> {
    async fn start(consul: &Consul) -> Result<Self> {
        let launcher = Launcher::testbed(env!("CARGO_BIN_EXE_bench-echo-server"));
        let config = consul.config();
        let mut servers = BTreeMap::new();
        for id in IDS {
            let spec = Self::spec(&config, id)?;
            servers.insert(id.to_owned(), ServerProcess::spawn(&launcher, spec).await?);
        }
        let mut client_config = ClientConfig::new(config.clone(), KILL_SERVICE);
        client_config.session.standby = STANDBY;
        client_config.session.spread = false;
        let client = EchoClient::start(client_config)?;
        let view = client.discovery();
        for server in servers.values() {
            Self::listed(&view, server).await?;
        }
        let streamer = traffic::stream(&client, STREAM_LIMIT);
        streamer.replies(3, WAIT).await?;
        Ok(ProcessRig {
            launcher,
            consul: config,
            servers,
            view,
            streamer,
        })
    }
}

impl<const STANDBY: bool> Rig for ProcessRig<STANDBY> {
    async fn stop(self) -> Result<()> {
        self.streamer.finish().await;
        for mut server in self.servers.into_values() {
            // SIGTERM: a clean shutdown deregisters.
            server.process.signal(Signal::SIGTERM)?;
            server.process.wait_exit(WAIT).await?;
        }
        Ok(())
    }

    async fn once(&mut self, rec: &SharedRecorder) -> Result<Duration> {
        if STANDBY {
            let on = current(&self.streamer)?;
            for (id, other) in &self.servers {
                if *id != on.id {
                    standby_open(other.spec.echo_addr().port()).await?;
                }
            }
        }
        let (victim, measured) = timed_kill(
            &self.streamer,
            &mut self.servers,
            |server| server.spec.echo_addr(),
            rec,
            |server| Ok(server.process.signal(Signal::SIGKILL)?),
        )
        .await?;

        // Restore, untimed: reap the dead process, start another with the same ID on new
        // ports, and wait until the client's view lists it.
        if let Some(mut dead) = self.servers.remove(&victim) {
            dead.process.wait_exit(WAIT).await?;
        }
        let spec = Self::spec(&self.consul, &victim)?;
        let fresh = ServerProcess::spawn(&self.launcher, spec).await?;
        Self::listed(&self.view, &fresh).await?;
        self.servers.insert(victim, fresh);
        Ok(measured)
    }
}

fn sigkill_process(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    consul: &Arc<SharedConsul>,
    standby: bool,
) {
    let (name, parts) = if standby {
        ("sigkill_process_standby", &STANDBY_PARTS)
    } else {
        ("sigkill_process", &KILL_PARTS)
    };
    let rec = recorder(&format!("failover/kill/{name}"), SIGKILL_SAMPLES, parts);
    let id = ("kill", name);
    if standby {
        consul_bench::<ProcessRig<true>>(group, rt, consul, &rec, SIGKILL_SAMPLES, id);
    } else {
        consul_bench::<ProcessRig<false>>(group, rt, consul, &rec, SIGKILL_SAMPLES, id);
    }
}

// === failover/unhealthy/consul_to_switch ===

const UNHEALTHY_SERVICE: &str = "failover-unhealthy";

/// A, B in process, registered in Consul; the client discovers them through Consul; an
/// observer follows Consul independently.
struct UnhealthyRig {
    servers: BTreeMap<String, ServerThread>,
    view: watch::Receiver<Snapshot>,
    observer: Observer,
    streamer: Stream,
}

impl UnhealthyRig {
    /// Until Consul and the client's view list both instances.
    async fn both_listed(&self) -> Result<()> {
        let both =
            |instances: &[Instance]| IDS.iter().all(|id| consul_view::lists_id(instances, id));
        self.observer.until("a and b", WAIT, both).await?;
        consul_view::view_until(&self.view, "a and b", WAIT, |s| {
            IDS.iter().all(|id| consul_view::lists_id(&s.instances, id))
        })
        .await?;
        Ok(())
    }
}

impl ConsulRig for UnhealthyRig {
    async fn start(consul: &Consul) -> Result<Self> {
        let mut servers = BTreeMap::new();
        for id in IDS {
            let config = Config {
                name: UNHEALTHY_SERVICE.into(),
                id: id.into(),
                register: true,
                interval: CHECK_INTERVAL,
                timeout: CHECK_TIMEOUT,
                deregister_after: Duration::from_secs(60),
                consul: consul.config(),
                ..Config::local()
            };
            servers.insert(id.to_owned(), ServerThread::start(config).await?);
        }
        let observer = Observer::start(consul.config(), UNHEALTHY_SERVICE)?;
        let mut client_config = ClientConfig::new(consul.config(), UNHEALTHY_SERVICE);
        client_config.session.spread = false;
        let client = EchoClient::start(client_config)?;
        let view = client.discovery();
        let streamer = traffic::stream(&client, STREAM_LIMIT);
        let rig = UnhealthyRig {
            servers,
            view,
            observer,
            streamer,
        };
        rig.both_listed().await?;
        rig.streamer.replies(3, WAIT).await?;
        Ok(rig)
    }
}

impl Rig for UnhealthyRig {
    async fn stop(self) -> Result<()> {
        stop_threads(self.streamer, self.servers).await
    }

    async fn once(&mut self, rec: &SharedRecorder) -> Result<Duration> {
        // Restore from the previous iteration (untimed): both passing again.
        self.both_listed().await?;
        // Consul checks each instance on a fixed schedule, and the restore just ended at the
        // other one's check: fail A at a random phase of its schedule instead, so the whole
        // time from the 503 samples the interval evenly rather than one offset between the two.
        let phase = rand::random_range(0..CHECK_INTERVAL.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let victim = current(&self.streamer)?;
        let health = self
            .servers
            .get(&victim.id)
            .ok_or_else(|| Error::Invalid(format!("no server {}", victim.id)))?
            .health();
        self.streamer.arm(true);
        self.streamer.replies(STEADY_REPLIES, WAIT).await?;

        let failed = Instant::now();
        health.set_healthy(false);
        let gone = |instances: &[Instance]| !consul_view::lists_id(instances, &victim.id);
        let what = format!("{} gone", victim.id);
        let (seen, viewed, replied) = tokio::join!(
            self.observer.until(&what, WAIT, gone),
            consul_view::view_until(&self.view, &what, WAIT, |s| {
                !consul_view::lists_id(&s.instances, &victim.id)
            }),
            self.streamer
                .reply_from_other_than(&victim.id, failed, WAIT),
        );
        self.streamer.arm(false);
        health.set_healthy(true);
        let (seen, viewed, replied) = (seen?.at, viewed?, replied?);
        let signed = |later: Instant, earlier: Instant| {
            if later >= earlier {
                (later - earlier).as_nanos() as f64
            } else {
                -((earlier - later).as_nanos() as f64)
            }
        };
        // Consul answers the client's own blocking query and the observer's one after the
        // other, in either order: the client may switch before the observer hears of it.
        // The recording keeps the sign; criterion, which needs a positive time, gets 1 ns.
        let measured = signed(replied, seen);
        let mut rec = rec.lock().expect("recorder lock");
        rec.push_signed(MEASURED, measured);
        rec.push("from_503", replied - failed);
        rec.push("check_to_consul", seen.saturating_duration_since(failed));
        rec.push_signed("consul_to_view", signed(viewed, seen));
        rec.push_signed("view_to_switch", signed(replied, viewed));
        Ok(Duration::from_nanos(measured.max(1.0) as u64))
    }
}

fn unhealthy(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, consul: &Arc<SharedConsul>) {
    let rec = recorder(
        "failover/unhealthy/consul_to_switch",
        UNHEALTHY_SAMPLES,
        &[
            (
                MEASURED,
                "Consul drops A (independent blocking query) → first reply from B (negative: the client heard first)",
            ),
            (
                "from_503",
                "/check turns 503 → first reply from B (the whole time)",
            ),
            (
                "check_to_consul",
                "/check turns 503 → Consul drops A (waits for the next check, interval 1 s)",
            ),
            (
                "consul_to_view",
                "Consul drops A → the client's discovery publishes a view without A",
            ),
            (
                "view_to_switch",
                "the client's view without A → first reply from B (leave A, connect to B, resend, echo)",
            ),
        ],
    );
    consul_bench::<UnhealthyRig>(
        group,
        rt,
        consul,
        &rec,
        UNHEALTHY_SAMPLES,
        ("unhealthy", "consul_to_switch"),
    );
}

criterion::criterion_group!(benches, failover);
criterion::criterion_main!(benches);
