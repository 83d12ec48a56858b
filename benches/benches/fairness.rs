//! fairness: does a well-behaved client keep its latency while others attack the same
//! echo-server? Not a criterion timing: a plain bench binary (`harness = false`) that prints
//! its numbers and records them for the report.
//!
//! A `bench-echo-server` process (no Consul registration) runs on CPU 0, started there so
//! that its runtime has the one worker a one-CPU server has; the well-behaved
//! client, a thread of its own with its own runtime, runs on CPU 0 too and sends one
//! message every [`EVERY`] on one connection, waiting for each echo; the attacker, the
//! testbed's hostile-input scenario (`echo_rig::hostile::Attack::default()`: garbage,
//! oversized frames, stalled frames, resets, short-lived connections), runs on a thread of
//! its own on CPU 1. So the attacker's own work never takes the client's or the server's
//! CPU: what the client sees is what the server gives it while it also serves the attack.
//! The client's round trips are recorded first quiet ([`QUIET`] messages), then while the
//! attack runs, [`ROUNDS`] times over. The goal: its p99 under attack at most [`GOAL`]× the quiet p99.
//!
//! Then the same again against the fair baseline of the echo benches, `raw-buf` (a plain
//! copier reading and writing with the echo-server's read size, no framing, no limits), on
//! CPU 0 with one worker as the server had: what the kernel and a tokio server with nothing
//! of its own give a well-behaved client under the same attack. A copier has no frame
//! limit, so it never answers an oversized frame: that phase is left out of its attack, and
//! echo-server's figures over the phases both ran are recorded beside it.
//!
//! With fewer than 2 CPUs nothing is pinned (and the report says so). Arguments as criterion
//! takes them: a filter, `--list`, and without `--bench` (as `cargo test --benches` runs it)
//! a quick smoke run with a smaller attack that records nothing.

// A bench binary: its items need no docs.
#![allow(missing_docs)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use benches::{
    Error, Result,
    report::fmt_ns,
    results::{self, FairnessBaseline, FairnessRecord, LessOwnWait, Summary},
    servers::{Copier, RawEcho},
    traffic::Message,
};
use consul_harness::{affinity, process::raise_fd_limit, procfs, signal::Signal};
use echo_rig::{Launcher, ServerProcess, ServerSpec, hostile::Attack};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const ID: &str = "fairness/hostile_input";
/// Between the well-behaved client's messages.
const EVERY: Duration = Duration::from_millis(2);
/// The well-behaved client's messages before the attack.
const QUIET: usize = 1000;
/// The attack, every phase, this many times over: its heavy phases last ~0.1 s each, so one
/// round gives the well-behaved client only a few hundred echoes under attack and a p99 that
/// is its third or fourth slowest.
const ROUNDS: usize = 5;
/// A round trip longer than this is an error: the server is not merely slow.
const REPLY_LIMIT: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(20);
/// Well-behaved p99 under attack at most this multiple of the quiet p99 (the report's goal).
pub const GOAL: f64 = benches::report::FAIRNESS_GOAL;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{ID}: benchmark");
        return std::process::ExitCode::SUCCESS;
    }
    let filters = benches::harness::filters(&args);
    if !filters.is_empty() && !filters.iter().any(|f| ID.contains(f.as_str())) {
        return std::process::ExitCode::SUCCESS;
    }
    let quick = !results::measuring();
    let outcome = benches::harness::runtime().and_then(|rt| rt.block_on(measure(quick)));
    match outcome.and_then(|record| record.save().map(|_| ())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {ID}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn measure(quick: bool) -> Result<FairnessRecord> {
    raise_fd_limit();
    let attack = if quick {
        Attack {
            garbage_conns: 10,
            oversize_conns: 4,
            stalled_conns: 50,
            resets: 50,
            short_lived: 200,
            ..Attack::default()
        }
    } else {
        Attack::default()
    };
    let quiet_messages = if quick { 100 } else { QUIET };
    let rounds = if quick { 1 } else { ROUNDS };
    let pinned = affinity::cpus() >= 2;
    let launcher = Launcher::testbed(env!("CARGO_BIN_EXE_bench-echo-server"));
    let mut spec = ServerSpec::seed(consul_api::Config::default())?;
    spec.args.no_register = true;
    spec.args.max_connections = 4096;
    // Started on CPU 0, as `taskset -c 0` would start it: its runtime sizes its pool for
    // the one CPU it has (one worker), not for every CPU of the machine (two workers that
    // would then take turns on CPU 0).
    let mut server = {
        let _on_cpu0 = pinned.then(|| affinity::PinnedHere::to(0)).transpose()?;
        ServerProcess::spawn(&launcher, spec).await?
    };
    let pid = server.process.pid();
    let addr = server.spec.echo_addr();
    let outcome = async {
        if pinned {
            affinity::pin_process(pid, 0)?;
        }
        let run = Run {
            attack: &attack,
            rounds,
            quiet_messages,
            pinned,
        };
        let echo = run.against(addr, pid, &attack).await?;
        let baseline = run.against_baseline().await?;
        Ok::<_, Error>((echo, baseline))
    }
    .await;
    server.process.signal(Signal::SIGTERM)?;
    server.process.wait_exit(WAIT).await?;
    let (echo, baseline) = outcome?;
    let record = FairnessRecord {
        id: ID.into(),
        placement: if pinned {
            "server and well-behaved client on CPU 0, attacker on CPU 1 (sched_setaffinity)".into()
        } else {
            "unpinned: fewer than 2 CPUs".into()
        },
        attack: format!(
            "{rounds} rounds of: {} × {} KiB garbage, {} × {} KiB frames (limit 64 KiB), {} stalled frames, {} \
             resets, {} short-lived connections, {} at once",
            attack.garbage_conns,
            attack.garbage_bytes >> 10,
            attack.oversize_conns,
            attack.oversize_bytes >> 10,
            attack.stalled_conns,
            attack.resets,
            attack.short_lived,
            attack.concurrency
        ),
        quiet: summary(&echo.quiet, "before the attack")?,
        attacked: summary(echo.attacked(None), "during the attack")?,
        phases: echo
            .phases
            .iter()
            .filter_map(|p| {
                Some((
                    p.name.to_owned(),
                    p.cpu / p.lasted.max(1e-3),
                    Summary::of(&nanos(&p.rtts))?,
                ))
            })
            .collect(),
        less_own_wait: echo.less_own_wait().map(Box::new),
        baseline: baseline
            .as_ref()
            .map(|b| -> Result<Box<FairnessBaseline>> {
                Ok(Box::new(FairnessBaseline {
                    server: format!(
                        "raw-buf (a copier with {} KiB reads, one worker on CPU 0)",
                        echo_server::server::READ_CHUNK >> 10
                    ),
                    left_out: OVERSIZED.into(),
                    quiet: summary(&b.quiet, "before the attack on the baseline")?,
                    attacked: summary(
                        b.attacked(Some(OVERSIZED)),
                        "during the attack on the baseline",
                    )?,
                    phases: b
                        .phases
                        .iter()
                        .filter(|p| p.name != OVERSIZED)
                        .filter_map(|p| Some((p.name.to_owned(), Summary::of(&nanos(&p.rtts))?)))
                        .collect(),
                    echo_server_same_phases: summary(
                        echo.attacked(Some(OVERSIZED)),
                        "in the phases both ran",
                    )?,
                }))
            })
            .transpose()?,
    };
    println!("{ID} ({})", record.placement);
    println!(
        "    quiet: p50 {}, p99 {} ({} echoes)",
        fmt_ns(record.quiet.p50),
        fmt_ns(record.quiet.p99),
        record.quiet.count
    );
    println!(
        "    under attack: p50 {}, p99 {} ({} echoes): p99 {:.2}× quiet (goal ≤ {GOAL}×){}",
        fmt_ns(record.attacked.p50),
        fmt_ns(record.attacked.p99),
        record.attacked.count,
        record.attacked.p99 / record.quiet.p99,
        if quick {
            " [quick check, not recorded]"
        } else {
            ""
        }
    );
    for (phase, cpu, s) in &record.phases {
        println!(
            "    {phase}: server CPU {:.0}%, p50 {}, p99 {} ({} echoes)",
            cpu * 100.0,
            fmt_ns(s.p50),
            fmt_ns(s.p99),
            s.count
        );
    }
    if let Some(b) = &record.baseline {
        println!(
            "    the fair baseline, {}, without {}: quiet p99 {}, under attack p99 {}: {:.2}× \
             (echo-server over the same phases: {:.2}×)",
            b.server,
            b.left_out,
            fmt_ns(b.quiet.p99),
            fmt_ns(b.attacked.p99),
            b.attacked.p99 / b.quiet.p99,
            b.echo_server_same_phases.p99 / record.quiet.p99
        );
    }
    Ok(record)
}

/// The attack phase a copier cannot end: it has no frame limit, so it never answers.
const OVERSIZED: &str = "oversized frames";

fn nanos<'a>(v: impl IntoIterator<Item = &'a RoundTrip>) -> Vec<f64> {
    v.into_iter().map(|r| r.rtt.as_nanos() as f64).collect()
}

/// The summary of some round trips; an error if there were none.
fn summary<'a>(rtts: impl IntoIterator<Item = &'a RoundTrip>, what: &str) -> Result<Summary> {
    Summary::of(&nanos(rtts)).ok_or_else(|| Error::Invalid(format!("no round trip {what}")))
}

/// One server's measurement: the attack, its rounds, the quiet echoes before it.
struct Run<'a> {
    attack: &'a Attack,
    rounds: usize,
    quiet_messages: usize,
    pinned: bool,
}

/// What the well-behaved client saw of one server: its round trips before the attack, and
/// during each phase over all rounds.
struct Measured {
    quiet: Vec<RoundTrip>,
    phases: Vec<PhaseTrips>,
}

/// One phase over all rounds: its round trips, the server's CPU time and the phase's
/// length, in seconds.
struct PhaseTrips {
    name: &'static str,
    rtts: Vec<RoundTrip>,
    cpu: f64,
    lasted: f64,
}

impl Measured {
    /// The round trips during the attack, in every phase but `except`.
    fn attacked(&self, except: Option<&str>) -> Vec<&RoundTrip> {
        self.phases
            .iter()
            .filter(|p| Some(p.name) != except)
            .flat_map(|p| &p.rtts)
            .collect()
    }

    /// The same round trips less the client's own wait for its CPU; `None` without
    /// schedstats.
    fn less_own_wait(&self) -> Option<LessOwnWait> {
        let less = |v: Vec<&RoundTrip>| -> Option<Summary> {
            Summary::of(
                &v.iter()
                    .map(|r| r.less_own_wait())
                    .collect::<Option<Vec<f64>>>()?,
            )
        };
        Some(LessOwnWait {
            quiet: less(self.quiet.iter().collect())?,
            attacked: less(self.attacked(None))?,
            phases: self
                .phases
                .iter()
                .filter_map(|p| Some((p.name.to_owned(), less(p.rtts.iter().collect())?)))
                .collect(),
        })
    }
}

impl Run<'_> {
    /// The same against the fair baseline on CPU 0, its attack without the phase a copier
    /// cannot end; `None` where nothing is pinned (the baseline would not have the server's
    /// one worker).
    async fn against_baseline(&self) -> Result<Option<Measured>> {
        if !self.pinned {
            return Ok(None);
        }
        // Its worker starts on CPU 0 and stays there, as the server's does.
        let runtime = {
            let _on_cpu0 = affinity::PinnedHere::to(0)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("raw-buf")
                .enable_all()
                .build()?
        };
        let copier = Copier::Buffer(echo_server::server::READ_CHUNK);
        let measured = match RawEcho::start_with(runtime.handle(), copier).await {
            Ok(raw) => {
                let attack = Attack {
                    oversize_conns: 0,
                    ..self.attack.clone()
                };
                let measured = self.against(raw.addr(), std::process::id(), &attack).await;
                drop(raw);
                measured
            }
            Err(e) => Err(e),
        };
        runtime.shutdown_background();
        measured.map(Some)
    }

    /// The quiet echoes, then `attack`'s rounds, against the server at `addr` (process
    /// `pid`, whose CPU time each phase reads).
    async fn against(&self, addr: SocketAddr, pid: u32, attack: &Attack) -> Result<Measured> {
        let client = Client::start(addr, self.pinned.then_some(0))?;
        client.wait_for(self.quiet_messages, WAIT).await?;
        let quiet_until = Instant::now();
        let mut phases = Vec::new();
        for _ in 0..self.rounds {
            let attacked = attack
                .run_on_thread(addr, pid, self.pinned.then_some(1), Arc::default())
                .await?;
            phases.extend(attacked.phases);
        }
        let mut rtts = client.stop().await?;
        if phases.is_empty() {
            return Err(Error::Invalid("the attack ran no phase".into()));
        }
        let quiet = rtts.iter().take_while(|r| r.at < quiet_until).count();
        let quiet: Vec<RoundTrip> = rtts.drain(..quiet).collect();
        // Each phase over all rounds: its round trips, its CPU over its time. A phase that
        // sent nothing (the baseline's oversized frames) has no round trip and no row.
        let mut by_phase: Vec<PhaseTrips> = Vec::new();
        for p in &phases {
            let at = match by_phase.iter().position(|b| b.name == p.name) {
                Some(at) => at,
                None => {
                    by_phase.push(PhaseTrips {
                        name: p.name,
                        rtts: Vec::new(),
                        cpu: 0.0,
                        lasted: 0.0,
                    });
                    by_phase.len() - 1
                }
            };
            let entry = &mut by_phase[at];
            entry
                .rtts
                .extend(rtts.extract_if(.., |r| r.at >= p.from && r.at < p.to));
            entry.cpu += p.server_cpu.as_secs_f64();
            entry.lasted += (p.to - p.from).as_secs_f64();
        }
        by_phase.retain(|p| !p.rtts.is_empty());
        Ok(Measured {
            quiet,
            phases: by_phase,
        })
    }
}

/// The well-behaved client: on a thread of its own (pinned to `cpu` when given) with its own
/// runtime, one message every [`EVERY`] on one connection, each echo awaited and checked.
struct Client {
    stop: Arc<AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicUsize>,
    done: tokio::sync::oneshot::Receiver<Result<Vec<RoundTrip>>>,
}

impl Client {
    fn start(addr: SocketAddr, cpu: Option<usize>) -> Result<Client> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, done) = tokio::sync::oneshot::channel();
        let (stop2, sent2) = (stop.clone(), sent.clone());
        std::thread::Builder::new()
            .name("well-behaved".into())
            .spawn(move || {
                let run = || -> Result<Vec<RoundTrip>> {
                    if let Some(cpu) = cpu {
                        affinity::pin_thread(cpu)?;
                    }
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(send_loop(addr, &stop2, &sent2))
                };
                let _ = tx.send(run());
            })?;
        Ok(Client { stop, sent, done })
    }

    /// Wait until `n` echoes have come back.
    async fn wait_for(&self, n: usize, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        while self.sent.load(Ordering::SeqCst) < n {
            if started.elapsed() > timeout {
                return Err(Error::timeout("the quiet echoes", timeout));
            }
            tokio::time::sleep(EVERY).await;
        }
        Ok(())
    }

    /// Stop and return every round trip.
    async fn stop(self) -> Result<Vec<RoundTrip>> {
        self.stop.store(true, Ordering::SeqCst);
        self.done
            .await
            .map_err(|_| Error::Invalid("the well-behaved client's thread died".into()))?
    }
}

/// One of the well-behaved client's round trips.
struct RoundTrip {
    /// When its message was sent.
    at: Instant,
    /// The round trip.
    rtt: Duration,
    /// How long the client's thread waited, runnable, for its CPU meanwhile (its run-queue
    /// delay, read before and after, outside the timed interval); `None` without schedstats.
    own_wait: Option<Duration>,
}

impl RoundTrip {
    /// The round trip less the client's own wait for its CPU: what the server (and the
    /// kernel's loopback path) took.
    fn less_own_wait(&self) -> Option<f64> {
        Some(self.rtt.saturating_sub(self.own_wait?).as_nanos() as f64)
    }
}

async fn send_loop(
    addr: SocketAddr,
    stop: &AtomicBool,
    sent: &std::sync::atomic::AtomicUsize,
) -> Result<Vec<RoundTrip>> {
    let message = Message::new(16);
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut back = vec![0u8; message.wire().len()];
    let mut rtts = Vec::new();
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let waited_before = procfs::own_run_delay();
        let at = Instant::now();
        stream.write_all(message.wire()).await?;
        tokio::time::timeout(REPLY_LIMIT, stream.read_exact(&mut back))
            .await
            .map_err(|_| Error::timeout("a well-behaved echo", REPLY_LIMIT))??;
        let rtt = at.elapsed();
        let own_wait = waited_before
            .zip(procfs::own_run_delay())
            .map(|(before, after)| after.saturating_sub(before));
        rtts.push(RoundTrip { at, rtt, own_wait });
        if back != message.wire() {
            return Err(Error::BadEcho(
                "the well-behaved client's echo differs".into(),
            ));
        }
        sent.fetch_add(1, Ordering::SeqCst);
        next += EVERY;
        tokio::time::sleep_until(next).await;
    }
    Ok(rtts)
}
