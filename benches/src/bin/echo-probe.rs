//! `echo-probe`: a fixed amount of the `echo` bench's traffic through the bench's servers
//! ([`benches::lineup`]), without criterion, so the run can be profiled and its instructions
//! counted (`perf record`, `valgrind --tool=callgrind`): the same messages through each
//! server, the same runtimes, the same client. Prints, per server, the messages per second
//! and the CPU time per message of the servers' threads and of the client's. With
//! `--interleaved`, the latency bench's traffic instead: one message in flight per
//! connection, the servers in alternation ([`traffic::lockstep`]), and per server the median
//! and p99 of its round trips and their ratios to `raw-buf`'s.
//!
//! ```text
//! echo-probe --size 16 --conns 1 --messages 200000 [--server raw-buf] [--lockstep]
//! echo-probe --size 16 --conns 32 --messages 2000 --interleaved
//! ```

use std::{process::ExitCode, sync::Arc, time::Instant};

use anyhow::{Context, bail};
use benches::{
    harness,
    lineup::{Lineup, SERVERS},
    report,
    results::Summary,
    traffic::{self, Message},
};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "echo-probe",
    about = "A fixed amount of echo bench traffic, to profile or count instructions"
)]
struct Args {
    /// The servers to drive, one after the other (default: all of them).
    #[arg(long = "server", value_parser = clap::builder::PossibleValuesParser::new(SERVERS))]
    servers: Vec<String>,
    /// Payload bytes per message (a newline is added).
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Connections, all sending at once.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Messages per connection (after the warm-up).
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Messages per connection sent first and not counted.
    #[arg(long, default_value_t = 1_000)]
    warm_up: u64,
    /// One message in flight per connection (the latency bench's traffic) instead of
    /// pipelined.
    #[arg(long)]
    lockstep: bool,
    /// One message in flight per connection, the servers in alternation, as the latency
    /// bench runs them: prints each server's round trips instead of its CPU time.
    #[arg(long, conflicts_with = "lockstep")]
    interleaved: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// CPU time used so far by the client runtime's threads (`harness::runtime`'s).
fn client_cpu() -> benches::Result<std::time::Duration> {
    Ok(consul_harness::procfs::threads_cpu_time(
        std::process::id(),
        harness::CLIENT_THREADS,
    )?)
}

fn run(args: Args) -> anyhow::Result<()> {
    harness::init_tracing();
    if args.size == 0 || args.conns == 0 || args.messages == 0 {
        bail!("--size, --conns and --messages must be positive");
    }
    let servers: Vec<String> = if args.servers.is_empty() {
        SERVERS.iter().map(|s| s.to_string()).collect()
    } else {
        args.servers.clone()
    };
    let rig = Lineup::start(args.size.max(echo_server::codec::DEFAULT_MAX_FRAME))
        .context("start the servers")?;
    let client = harness::runtime().context("the client runtime")?;
    let message = Arc::new(Message::new(args.size));
    if args.interleaved {
        let result = interleaved(&args, &rig, &client, &servers, &message);
        drop(client);
        rig.stop().context("stop the servers")?;
        return result;
    }
    println!(
        "{:<12} {:>7} {:>5} {:>10} {:>10} {:>14} {:>14} {:>14}",
        "server",
        "size",
        "conns",
        "messages",
        "seconds",
        "messages/s",
        "cpu ns/message",
        "client ns/msg"
    );
    for name in &servers {
        let addr = rig.addr(name).context("a server of the rig")?;
        let (elapsed, cpu, client_cpu) = client.block_on(async {
            let conns = traffic::connect_all(addr, args.conns).await?;
            let traffic = |count| {
                let (conns, message) = (&conns, &message);
                async move {
                    if args.lockstep {
                        traffic::lockstep(std::slice::from_ref(conns), message, count)
                            .await
                            .map(drop)
                    } else {
                        traffic::pipelined(conns, message, count).await
                    }
                }
            };
            traffic(args.warm_up).await?;
            let cpu_before = rig.cpu_time()?;
            let client_before = client_cpu()?;
            let start = Instant::now();
            traffic(args.messages).await?;
            let elapsed = start.elapsed();
            let cpu = rig.cpu_time()?.saturating_sub(cpu_before);
            let client_cpu = client_cpu()?.saturating_sub(client_before);
            Ok::<_, benches::Error>((elapsed, cpu, client_cpu))
        })?;
        let total = (args.messages * args.conns as u64) as f64;
        println!(
            "{:<12} {:>7} {:>5} {:>10} {:>10.3} {:>14.0} {:>14.1} {:>14.1}",
            name,
            args.size,
            args.conns,
            total,
            elapsed.as_secs_f64(),
            total / elapsed.as_secs_f64(),
            cpu.as_nanos() as f64 / total,
            client_cpu.as_nanos() as f64 / total
        );
    }
    drop(client);
    rig.stop().context("stop the servers")?;
    Ok(())
}

/// The latency bench's traffic through `servers` in alternation; prints each one's round trips.
fn interleaved(
    args: &Args,
    rig: &Lineup,
    client: &tokio::runtime::Runtime,
    servers: &[String],
    message: &Arc<Message>,
) -> anyhow::Result<()> {
    let addrs = servers
        .iter()
        .map(|name| rig.addr(name).context("a server of the rig"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (elapsed, rtts) = client.block_on(async {
        let mut conns = Vec::with_capacity(addrs.len());
        for addr in &addrs {
            conns.push(traffic::connect_all(*addr, args.conns).await?);
        }
        traffic::lockstep(&conns, message, args.warm_up).await?;
        let start = Instant::now();
        let rtts = traffic::lockstep(&conns, message, args.messages).await?;
        Ok::<_, benches::Error>((start.elapsed(), rtts))
    })?;
    let summaries: Vec<Summary> = rtts
        .iter()
        .map(|r| {
            let ns: Vec<f64> = r.iter().map(|d| d.as_nanos() as f64).collect();
            Summary::of(&ns).context("no round trips")
        })
        .collect::<anyhow::Result<_>>()?;
    let base = servers
        .iter()
        .position(|s| s == SERVERS[1])
        .map(|i| summaries[i]);
    println!(
        "{:<12} {:>7} {:>5} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "server", "size", "conns", "rtts", "median", "p99", "÷ raw-buf", "p99 ÷"
    );
    for (name, s) in servers.iter().zip(&summaries) {
        let ratio =
            |f: fn(&Summary) -> f64| base.map_or("—".into(), |b| format!("{:.3}", f(s) / f(&b)));
        println!(
            "{:<12} {:>7} {:>5} {:>10} {:>12} {:>12} {:>12} {:>12}",
            name,
            args.size,
            args.conns,
            s.count,
            report::fmt_ns(s.p50),
            report::fmt_ns(s.p99),
            ratio(|s| s.p50),
            ratio(|s| s.p99),
        );
    }
    println!("{:.3} s in all", elapsed.as_secs_f64());
    Ok(())
}
