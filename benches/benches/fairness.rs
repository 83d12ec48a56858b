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
//! With fewer than 2 CPUs nothing is pinned (and the report says so). Arguments as criterion
//! takes them: a filter, `--list`, and without `--bench` (as `cargo test --benches` runs it)
//! a quick smoke run with a smaller attack that records nothing.

// A bench binary: its items need no docs.
#![allow(missing_docs)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use benches::{
    Error, Result,
    report::fmt_ns,
    results::{self, FairnessRecord, LessOwnWait, Summary},
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
        let client = Client::start(addr, pinned.then_some(0))?;
        client.wait_for(quiet_messages, WAIT).await?;
        let quiet_until = Instant::now();
        let mut phases = Vec::new();
        for _ in 0..rounds {
            let attacked = attack
                .run_on_thread(addr, pid, pinned.then_some(1), Arc::default())
                .await?;
            phases.extend(attacked.phases);
        }
        let rtts = client.stop().await?;
        let quiet: Vec<&RoundTrip> = rtts.iter().filter(|r| r.at < quiet_until).collect();
        let during = |from: Instant, to: Instant| -> Vec<&RoundTrip> {
            rtts.iter().filter(|r| r.at >= from && r.at < to).collect()
        };
        let nanos = |v: &[&RoundTrip]| -> Vec<f64> {
            v.iter().map(|r| r.rtt.as_nanos() as f64).collect()
        };
        let less_wait = |v: &[&RoundTrip]| -> Option<Summary> {
            Summary::of(&v.iter().map(|r| r.less_own_wait()).collect::<Option<Vec<f64>>>()?)
        };
        if phases.is_empty() {
            return Err(Error::Invalid("the attack ran no phase".into()));
        }
        let summary = |v: &[&RoundTrip], what: &str| {
            Summary::of(&nanos(v)).ok_or_else(|| Error::Invalid(format!("no round trip {what}")))
        };
        // Each phase over all rounds: its round trips, its CPU over its time.
        let mut by_phase: Vec<(&str, Vec<&RoundTrip>, f64, f64)> = Vec::new();
        for p in &phases {
            let at = match by_phase.iter().position(|(name, ..)| *name == p.name) {
                Some(at) => at,
                None => {
                    by_phase.push((p.name, Vec::new(), 0.0, 0.0));
                    by_phase.len() - 1
                }
            };
            let entry = &mut by_phase[at];
            entry.1.extend(during(p.from, p.to));
            entry.2 += p.server_cpu.as_secs_f64();
            entry.3 += (p.to - p.from).as_secs_f64();
        }
        let attacked: Vec<&RoundTrip> = phases.iter().flat_map(|p| during(p.from, p.to)).collect();
        let less_own_wait = less_wait(&quiet)
            .zip(less_wait(&attacked))
            .map(|(quiet, attacked)| {
                Box::new(LessOwnWait {
                quiet,
                attacked,
                phases: by_phase
                    .iter()
                    .filter_map(|(name, rtts, ..)| Some(((*name).to_owned(), less_wait(rtts)?)))
                    .collect(),
                })
            });
        let phases = by_phase
            .iter()
            .filter_map(|(name, rtts, cpu, lasted)| {
                Some((
                    (*name).to_owned(),
                    cpu / lasted.max(1e-3),
                    Summary::of(&nanos(rtts))?,
                ))
            })
            .collect();
        Ok(FairnessRecord {
            id: ID.into(),
            placement: if pinned {
                "server and well-behaved client on CPU 0, attacker on CPU 1 (sched_setaffinity)"
                    .into()
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
            quiet: summary(&quiet, "before the attack")?,
            attacked: summary(&attacked, "during the attack")?,
            phases,
            less_own_wait,
        })
    }
    .await;
    server.process.signal(Signal::SIGTERM)?;
    server.process.wait_exit(WAIT).await?;
    let record = outcome?;
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
    Ok(record)
}

/// The well-behaved client: on a thread of its own (pinned to `cpu` when given) with its own
/// runtime, one message every [`EVERY`] on one connection, each echo awaited and checked.
struct Client {
    stop: Arc<AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicUsize>,
    done: tokio::sync::oneshot::Receiver<Result<Vec<RoundTrip>>>,
}

impl Client {
    fn start(addr: std::net::SocketAddr, cpu: Option<usize>) -> Result<Client> {
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
    addr: std::net::SocketAddr,
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
