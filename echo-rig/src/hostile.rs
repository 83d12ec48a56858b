//! Hostile input at an echo server, the one attack of the testbed's hostile-input scenario and
//! of the fairness bench: random garbage, frames over the limit, connections that never
//! finish a frame, abrupt resets (SO_LINGER 0 mid-frame) and short-lived connections, one
//! phase after another (the unfinished frames' connections closed last, a phase too), with
//! the server's memory and CPU time per phase. The attacker can run on a CPU of its own
//! ([`Attack::run_on_thread`], pinned by [`consul_harness::affinity`]), so the attacked
//! server's fairness is measured apart from the attacker's own use of the CPU.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::RngCore;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};

use consul_harness::{Error, Result, affinity::pin_thread, procfs};

/// Deadline of one hostile connection's whole exchange.
const CONN_LIMIT: Duration = Duration::from_secs(20);
/// Deadline of the stalled phase's connects, all of them.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// What the attacker sends.
#[derive(Debug, Clone)]
pub struct Attack {
    /// Connections sending random bytes.
    pub garbage_conns: usize,
    /// Random bytes each of them sends.
    pub garbage_bytes: usize,
    /// Connections sending one frame over the limit.
    pub oversize_conns: usize,
    /// The size of that frame, bytes.
    pub oversize_bytes: usize,
    /// Connections left holding an unfinished frame for the rest of the attack.
    pub stalled_conns: usize,
    /// Connections reset (SO_LINGER 0) in the middle of a frame.
    pub resets: usize,
    /// Connections that each echo one frame and close.
    pub short_lived: usize,
    /// Hostile connections at once.
    pub concurrency: usize,
}

impl Default for Attack {
    /// The testbed's hostile-input scenario: 200 × 32 KiB of garbage, 50 × 256 KiB frames,
    /// 1,000 stalled frames, 1,000 resets, 10,000 short-lived connections, 32 at once.
    fn default() -> Self {
        Attack {
            garbage_conns: 200,
            garbage_bytes: 32 << 10,
            oversize_conns: 50,
            oversize_bytes: 256 << 10,
            stalled_conns: 1000,
            resets: 1000,
            short_lived: 10_000,
            concurrency: 32,
        }
    }
}

/// One phase of an [`Attack`]: its name, when it ran, the server's CPU time in it.
#[derive(Debug, Clone)]
pub struct Phase {
    /// `garbage`, `oversized frames`, `stalled frames`, `resets`, `short-lived`, `stalled
    /// closed`.
    pub name: &'static str,
    /// When it began.
    pub from: Instant,
    /// When it ended.
    pub to: Instant,
    /// The server process's CPU time over it.
    pub server_cpu: Duration,
}

/// What the attacker did and saw.
#[derive(Debug, Clone)]
pub struct Attacked {
    /// Random bytes sent.
    pub garbage_sent: u64,
    /// Of those, bytes the server echoed back.
    pub garbage_echoed: u64,
    /// Oversized frames answered with the error line.
    pub oversize_refused: u64,
    /// Stalled connections held open at once.
    pub stalled: usize,
    /// The server's RSS before the stalled connections, KiB.
    pub rss_before_stalled_kib: u64,
    /// Its RSS with the stalled connections open, KiB.
    pub rss_with_stalled_kib: u64,
    /// Connections reset in the middle of a frame.
    pub resets: u64,
    /// Short-lived connections answered correctly.
    pub short_lived_ok: u64,
    /// First short-lived connection to the last one's end.
    pub short_lived_took: Duration,
    /// Each phase, in order.
    pub phases: Vec<Phase>,
}

/// Run `n` copies of `job` (given its index), at most `concurrency` at once.
async fn bounded<F, Fut>(n: usize, concurrency: usize, job: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..n {
        if set.len() >= concurrency.max(1) {
            set.join_next().await;
        }
        set.spawn(job(i));
    }
    while set.join_next().await.is_some() {}
}

/// Random bytes (newlines included, at random), then EOF; read whatever comes back.
async fn garbage(addr: SocketAddr, bytes: usize, sent: Arc<AtomicU64>, echoed: Arc<AtomicU64>) {
    let mut data = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut data);
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut rd, mut wr) = stream.into_split();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            let mut n = 0u64;
            while let Ok(k @ 1..) = rd.read(&mut buf).await {
                n += k as u64;
            }
            n
        });
        wr.write_all(&data).await?;
        sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        wr.shutdown().await?;
        echoed.fetch_add(reader.await.unwrap_or(0), Ordering::Relaxed);
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(CONN_LIMIT, exchange).await;
}

/// One frame over the limit; true if the server answered with its error line.
async fn oversize(addr: SocketAddr, bytes: usize) -> bool {
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut rd, mut wr) = stream.into_split();
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut buf = [0u8; 1024];
            while let Ok(k @ 1..) = rd.read(&mut buf).await {
                if out.len() < 4096 {
                    out.extend_from_slice(&buf[..k]);
                }
            }
            out
        });
        // The server may close before all of it is written: that is its answer.
        let _ = wr.write_all(&vec![b'x'; bytes]).await;
        let answer = reader.await.unwrap_or_default();
        std::io::Result::Ok(answer.starts_with(b"error: frame longer than"))
    };
    matches!(
        tokio::time::timeout(CONN_LIMIT, exchange).await,
        Ok(Ok(true))
    )
}

/// Half a frame, then a reset (SO_LINGER 0).
async fn reset(addr: SocketAddr) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"half a frame, then a reset").await?;
        stream.set_zero_linger()?;
        drop(stream);
        std::io::Result::Ok(())
    };
    matches!(tokio::time::timeout(CONN_LIMIT, exchange).await, Ok(Ok(())))
}

/// Connect, echo one frame, close.
async fn short_lived(addr: SocketAddr, i: usize) -> bool {
    echo_direct(addr, format!("short-lived {i}").as_bytes()).await
}

/// One echo of `payload` (newline added) on a fresh connection straight to `addr`; `true`
/// if it came back whole within 5 s.
pub async fn echo_direct(addr: SocketAddr, payload: &[u8]) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut frame = payload.to_vec();
        frame.push(b'\n');
        s.write_all(&frame).await?;
        let mut back = vec![0u8; frame.len()];
        s.read_exact(&mut back).await?;
        std::io::Result::Ok(back == frame)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Ok(true))
    )
}

impl Attack {
    /// Every phase in turn against the server at `addr` (process `pid`, whose memory and CPU
    /// time are read from `/proc`); `progress` is told which phase runs.
    pub async fn run(&self, addr: SocketAddr, pid: u32, progress: &dyn Fn(String)) -> Attacked {
        let rss = || procfs::status_kib(pid, "VmRSS").unwrap_or(0);
        let cpu = || procfs::cpu_time(pid).unwrap_or_default();
        let mut phases = Vec::new();
        let mut began = (Instant::now(), cpu());
        let mut phase_done = |name: &'static str| {
            let now = (Instant::now(), cpu());
            phases.push(Phase {
                name,
                from: began.0,
                to: now.0,
                server_cpu: now.1.saturating_sub(began.1),
            });
            began = now;
        };

        progress(format!("{} garbage connections", self.garbage_conns));
        let (sent, echoed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        bounded(self.garbage_conns, self.concurrency, |_| {
            garbage(addr, self.garbage_bytes, sent.clone(), echoed.clone())
        })
        .await;
        phase_done("garbage");

        progress(format!("{} oversized frames", self.oversize_conns));
        let refused = Arc::new(AtomicU64::new(0));
        bounded(self.oversize_conns, self.concurrency, |_| {
            let refused = refused.clone();
            let bytes = self.oversize_bytes;
            async move {
                if oversize(addr, bytes).await {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
        phase_done("oversized frames");

        progress(format!(
            "{} connections holding an unfinished frame",
            self.stalled_conns
        ));
        let rss_before_stalled_kib = rss();
        let mut stalled = Vec::with_capacity(self.stalled_conns);
        let started = Instant::now();
        while stalled.len() < self.stalled_conns && started.elapsed() < STALL_LIMIT {
            let Ok(Ok(mut s)) = tokio::time::timeout(CONN_LIMIT, TcpStream::connect(addr)).await
            else {
                continue;
            };
            if s.write_all(b"a frame that never ends ").await.is_ok() {
                stalled.push(s);
            }
        }
        // Accepts are first come, first served: once a later connection is answered, every
        // stalled one has been accepted and has read its bytes.
        echo_direct(addr, b"after the stalled ones").await;
        let rss_with_stalled_kib = rss();
        phase_done("stalled frames");

        progress(format!("{} resets mid-frame", self.resets));
        let resets = Arc::new(AtomicU64::new(0));
        bounded(self.resets, self.concurrency, |_| {
            let resets = resets.clone();
            async move {
                if reset(addr).await {
                    resets.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
        phase_done("resets");

        progress(format!(
            "{} short-lived connections (with {} stalled)",
            self.short_lived,
            stalled.len()
        ));
        let ok = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        bounded(self.short_lived, self.concurrency, |i| {
            let ok = ok.clone();
            async move {
                if short_lived(addr, i).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
        let short_lived_took = started.elapsed();
        phase_done("short-lived");

        // Closed together, the stalled connections are a burst of their own: the server
        // answers each one's unfinished frame and closes it. A phase of its own, so that the
        // burst is not counted in the next round's first phase; it ends once a connection
        // opened after the closes is answered.
        let stalled_count = stalled.len();
        progress(format!(
            "closing {stalled_count} connections holding an unfinished frame"
        ));
        drop(stalled);
        echo_direct(addr, b"after the stalled ones closed").await;
        phase_done("stalled closed");
        Attacked {
            garbage_sent: sent.load(Ordering::Relaxed),
            garbage_echoed: echoed.load(Ordering::Relaxed),
            oversize_refused: refused.load(Ordering::Relaxed),
            stalled: stalled_count,
            rss_before_stalled_kib,
            rss_with_stalled_kib,
            resets: resets.load(Ordering::Relaxed),
            short_lived_ok: ok.load(Ordering::Relaxed),
            short_lived_took,
            phases,
        }
    }

    /// [`Attack::run`] on a thread of its own, pinned to `cpu` when given (so the attack's
    /// own work stays off the other CPUs), with a current-thread runtime; `progress` is
    /// updated with the phase that runs.
    pub async fn run_on_thread(
        &self,
        addr: SocketAddr,
        pid: u32,
        cpu: Option<usize>,
        progress: Arc<std::sync::Mutex<String>>,
    ) -> Result<Attacked> {
        let attack = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("attacker".into())
            .spawn(move || {
                let outcome = (|| {
                    if let Some(cpu) = cpu {
                        pin_thread(cpu)?;
                    }
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let say = |msg: String| {
                        *progress
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = msg;
                    };
                    Ok(rt.block_on(attack.run(addr, pid, &say)))
                })();
                let _ = tx.send(outcome);
            })?;
        rx.await.map_err(|_| Error::Process {
            what: "attack".into(),
            reason: "the attacker thread died".into(),
        })?
    }
}
