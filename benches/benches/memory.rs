//! memory: the resident set of an echo-server process holding 1,000 idle connections, in bytes
//! per connection. Not a criterion timing: a plain bench binary (`harness = false`) that
//! prints its numbers and records them for the report.
//!
//! For each message size, three times, a fresh `bench-echo-server` process (no Consul
//! registration) is started; after one warm-up echo its `VmRSS` is the base; then 1,000
//! connections each exchange one message and stay open, idle; the server's `VmRSS` and
//! `VmHWM` (peak) are read while it holds them, once the last has been idle for one period
//! (twice `echo_server::server::SHRINK_AFTER`: the buffers shrink after one). Per connection = (RSS holding them − base) /
//! 1,000. Kernel socket buffers are kernel memory, not the process's RSS, and are not
//! counted; the client's sockets live in this process, not the server's.
//!
//! Arguments as criterion takes them: a filter (substring of the id), `--list`, and without
//! `--bench` (as `cargo test --benches` runs it) a quick smoke run that records nothing.

// criterion_group! and criterion_main! generate public functions without docs.
#![allow(missing_docs)]

use std::time::Duration;

use benches::{
    Error, Result,
    memory::{Rss, rss_of},
    results::{self, MemoryRecord, MemoryRun},
    traffic::Message,
};
use consul_harness::signal::Signal;
use echo_rig::{Launcher, ServerProcess, ServerSpec};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const CONNECTIONS: usize = 1000;
const RUNS: usize = 3;
const SIZES: [(usize, &str); 2] = [(16, "16B"), (64 << 10, "64KiB")];
const WAIT: Duration = Duration::from_secs(20);
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ids: Vec<String> = SIZES
        .iter()
        .map(|(_, label)| format!("memory/idle_connections/{label}"))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for id in &ids {
            println!("{id}: benchmark");
        }
        return std::process::ExitCode::SUCCESS;
    }
    let filters = benches::harness::filters(&args);
    let quick = !results::measuring();
    let runtime = match benches::harness::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    for ((size, _), id) in SIZES.iter().zip(&ids) {
        if !filters.is_empty() && !filters.iter().any(|f| id.contains(f.as_str())) {
            continue;
        }
        match runtime.block_on(measure(id, *size, quick)) {
            Ok(record) => {
                if let Err(e) = record.save() {
                    eprintln!("error: saving {id}: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
            Err(e) => {
                eprintln!("error: {id}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    std::process::ExitCode::SUCCESS
}

async fn measure(id: &str, size: usize, quick: bool) -> Result<MemoryRecord> {
    let (connections, runs) = if quick { (50, 1) } else { (CONNECTIONS, RUNS) };
    raise_fd_limit(2 * connections as u64 + 256)?;
    let launcher = Launcher::testbed(env!("CARGO_BIN_EXE_bench-echo-server"));
    let message = Message::new(size);
    let mut all = Vec::with_capacity(runs);
    for _ in 0..runs {
        all.push(one_run(&launcher, &message, connections).await?);
    }
    let mut per_conn: Vec<f64> = all
        .iter()
        .map(|r| r.idle_rss_kib.saturating_sub(r.base_rss_kib) as f64 * 1024.0 / connections as f64)
        .collect();
    let record = MemoryRecord {
        id: id.to_owned(),
        connections,
        message_bytes: size,
        bytes_per_connection: lab_report::select_percentile(&mut per_conn, 50.0)
            .unwrap_or(f64::NAN),
        runs: all,
    };
    println!("{id}");
    for run in &record.runs {
        println!(
            "    RSS {} KiB before, {} KiB holding {connections} idle connections, peak {} KiB",
            run.base_rss_kib, run.idle_rss_kib, run.peak_kib
        );
    }
    println!(
        "    per connection: {:.0} bytes (median of {} runs){}",
        record.bytes_per_connection,
        record.runs.len(),
        if quick {
            " [quick check, not recorded]"
        } else {
            ""
        }
    );
    Ok(record)
}

async fn one_run(launcher: &Launcher, message: &Message, connections: usize) -> Result<MemoryRun> {
    let mut spec = ServerSpec::seed(consul_api::Config::default())?;
    spec.args.no_register = true;
    spec.args.max_connections = 2 * connections;
    let mut server = ServerProcess::spawn(launcher, spec).await?;
    let pid = server.process.pid();
    let addr = server.spec.echo_addr();
    let outcome = async {
        let mut first = TcpStream::connect(addr).await?;
        echo(&mut first, message).await?;
        let base = rss_of(pid)?;
        let mut idle = Vec::with_capacity(connections);
        for _ in 0..connections {
            let mut stream = TcpStream::connect(addr).await?;
            echo(&mut stream, message).await?;
            idle.push(stream);
        }
        // Measured once the last connection has been idle for one period (a connection
        // gives back what its buffer grew SHRINK_AFTER after its last frame): the goal's
        // definition, not a guess at how long something takes.
        tokio::time::sleep(echo_server::server::SHRINK_AFTER * 2).await;
        let holding: Rss = rss_of(pid)?;
        drop(idle);
        Ok::<_, Error>(MemoryRun {
            base_rss_kib: base.now_kib,
            idle_rss_kib: holding.now_kib,
            peak_kib: holding.peak_kib,
        })
    }
    .await;
    server.process.signal(Signal::SIGTERM)?;
    server.process.wait_exit(WAIT).await?;
    outcome
}

async fn echo(stream: &mut TcpStream, message: &Message) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.write_all(message.wire()).await?;
    let mut buf = vec![0u8; message.wire().len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .map_err(|_| Error::timeout("an echo", WAIT))??;
    if buf != message.wire() {
        return Err(Error::BadEcho("the memory bench's echo differs".into()));
    }
    Ok(())
}

/// This process holds the client end of every connection, and the server (its child)
/// inherits the limit: raise the soft limit on open files to `needed` if the hard one allows.
fn raise_fd_limit(needed: u64) -> Result<()> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| Error::Invalid(format!("getrlimit: {e}")))?;
    if soft >= needed {
        return Ok(());
    }
    if hard < needed {
        return Err(Error::Invalid(format!(
            "{needed} open files are needed; the hard limit is {hard} (raise it with ulimit -Hn)"
        )));
    }
    setrlimit(Resource::RLIMIT_NOFILE, needed, hard)
        .map_err(|e| Error::Invalid(format!("setrlimit: {e}")))
}
