//! The server: a `Listener` accepts echo connections under a connection cap and hands each
//! to its own `Handler`; [`Server::run`] ties in `/check`, the Consul registration and the
//! shutdown order (`/check` 503 → deregister → stop accepting → drain with a deadline).

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};
use tokio_util::{codec::Framed, sync::CancellationToken, task::TaskTracker};

use crate::{
    codec::{CodecError, EchoCodec},
    config::Config,
    error::{Error, Result},
};
use consul_registry::{
    Registrar,
    check::{self, Health},
};

/// While draining, a connection is closed once its peer has sent nothing for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// Initial capacity of a connection's read and write buffers; they grow up to one frame.
const BUFFER_CAPACITY: usize = 2 << 10;
/// Answers are flushed at the latest when this much is waiting to be written.
const MAX_PENDING_WRITE: usize = 64 << 10;
/// After an oversized frame: how long, and how much, of what the peer still sends is read
/// and dropped before closing, so the error line reaches it instead of a reset.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 4 << 20;
/// Longest pause between failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// An echo server with its sockets bound, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    config: Config,
    echo: TcpListener,
    check: TcpListener,
    echo_addr: SocketAddr,
    check_addr: SocketAddr,
    health: Health,
    registrar: Option<Registrar>,
}

impl Server {
    /// Check `config`, bind the echo and check ports, and build the Consul client if the
    /// server registers. Nothing is served and nothing registered until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server> {
        config.validate()?;
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { what, addr, source })
        };
        let echo = bind("echo", config.echo_bind_addr()).await?;
        let check = bind("/check", config.check_bind_addr()).await?;
        let local = |what, l: &TcpListener, addr| {
            l.local_addr()
                .map_err(|source| Error::Bind { what, addr, source })
        };
        let echo_addr = local("echo", &echo, config.echo_bind_addr())?;
        let check_addr = local("/check", &check, config.check_bind_addr())?;
        let registrar = if config.register {
            let client = consul_api::Client::new(config.consul.clone())?;
            let registration = config.registration(echo_addr.port(), check_addr.port());
            Some(Registrar::new(client, registration, config.interval))
        } else {
            None
        };
        Ok(Server {
            config,
            echo,
            check,
            echo_addr,
            check_addr,
            health: Health::default(),
            registrar,
        })
    }

    /// Where the echo port listens.
    pub fn echo_addr(&self) -> SocketAddr {
        self.echo_addr
    }

    /// Where `/check` listens.
    pub fn check_addr(&self) -> SocketAddr {
        self.check_addr
    }

    /// The URL Consul's agent is told to call.
    pub fn check_url(&self) -> String {
        self.config.check_url(self.check_addr.port())
    }

    /// The settings it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A handle on `/check`: force it unhealthy and back.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serve until `shutdown` completes (or the registration fails for good), then shut
    /// down in order: `/check` answers 503, the service is deregistered, the echo port stops
    /// accepting, open connections get their in-flight frames answered until the drain
    /// deadline. Returns `Ok` after a clean shutdown, the registration's error otherwise.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Server {
            config,
            echo,
            check,
            echo_addr,
            check_addr,
            health,
            registrar,
        } = self;

        let stop_accepting = CancellationToken::new();
        let drain = CancellationToken::new();
        let cut = CancellationToken::new();
        let stop_check = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(config.max_connections));

        let listener = Listener {
            listener: echo,
            limit: limit.clone(),
            codec: EchoCodec::new(config.max_frame),
            idle_timeout: config.idle_timeout,
            tracker: tracker.clone(),
            stop: stop_accepting.clone(),
            drain: drain.clone(),
            cut: cut.clone(),
        };
        let accept_task = tokio::spawn(listener.run());
        let check_task = tokio::spawn(check::serve(
            check,
            config.check_path.clone(),
            health.clone(),
            config.log_checks,
            stop_check.clone(),
        ));
        tracing::info!(
            echo = %echo_addr,
            check = %check_addr,
            check_url = %config.check_url(check_addr.port()),
            max_frame = config.max_frame,
            max_connections = config.max_connections,
            "echo-server listening"
        );

        let stop_registration = CancellationToken::new();
        let mut registration: Option<JoinHandle<Result<()>>> = registrar.as_ref().map(|r| {
            let r = r.clone();
            let stop = stop_registration.clone();
            tokio::spawn(async move { Ok(r.maintain(stop).await?) })
        });

        let outcome = tokio::select! {
            () = shutdown => Ok(()),
            result = registration_failed(&mut registration) => result,
        };

        // 1. `/check` answers 503, so nothing new is routed here.
        health.set_draining();
        tracing::info!("shutting down: /check answers 503 from now on");

        // 2. Leave Consul's catalog: stop re-registering first, then deregister.
        stop_registration.cancel();
        if let Some(task) = registration.take() {
            join(task).await?.ok();
        }
        if let Some(registrar) = &registrar {
            registrar.deregister().await;
        }

        // 3. Stop accepting: the listening socket is closed.
        stop_accepting.cancel();
        join(accept_task).await?;

        // 4. Drain: every open connection answers what it has received, then closes.
        let open = config.max_connections - limit.available_permits();
        let started = Instant::now();
        tracker.close();
        drain.cancel();
        let drained = tokio::time::timeout(config.drain_timeout, tracker.wait())
            .await
            .is_ok();
        if drained {
            tracing::info!(
                connections = open,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "drained: in-flight frames answered, connections closed"
            );
        } else {
            let left = config.max_connections - limit.available_permits();
            cut.cancel();
            tracker.wait().await;
            tracing::warn!(
                connections = open,
                cut = left,
                deadline = ?config.drain_timeout,
                "drain deadline passed: cut the connections still busy"
            );
        }

        // 5. Last, `/check` itself stops.
        stop_check.cancel();
        join(check_task).await?;
        if outcome.is_ok() {
            tracing::info!("echo-server stopped cleanly");
        }
        outcome
    }
}

/// Completes only when the registration task ends on its own, which it does only with a
/// fatal error. Never completes without registration.
async fn registration_failed(task: &mut Option<JoinHandle<Result<()>>>) -> Result<()> {
    let Some(handle) = task.as_mut() else {
        return std::future::pending().await;
    };
    let result = handle.await;
    *task = None;
    match result {
        Ok(Ok(())) => Err(Error::Internal(
            "the registration task ended by itself".into(),
        )),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(Error::Internal(format!(
            "the registration task failed: {e}"
        ))),
    }
}

async fn join<T>(task: JoinHandle<T>) -> Result<T> {
    task.await
        .map_err(|e| Error::Internal(format!("a server task failed: {e}")))
}

/// Accepts echo connections while a permit is free, until told to stop.
#[derive(Debug)]
struct Listener {
    listener: TcpListener,
    limit: Arc<Semaphore>,
    codec: EchoCodec,
    idle_timeout: Duration,
    tracker: TaskTracker,
    stop: CancellationToken,
    drain: CancellationToken,
    cut: CancellationToken,
}

impl Listener {
    async fn run(self) {
        loop {
            // Wait for a free slot before accepting: excess peers wait in the backlog.
            let permit = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                permit = self.limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (socket, peer) = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                accepted = self.accept() => accepted,
            };
            if let Err(e) = socket.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let handler = Handler {
                framed: Framed::with_capacity(socket, self.codec.clone(), BUFFER_CAPACITY),
                peer,
                idle_timeout: self.idle_timeout,
                drain: self.drain.clone(),
                cut: self.cut.clone(),
            };
            self.tracker.spawn(handler.run(permit));
        }
        tracing::info!("echo port closed: no new connections");
    }

    /// Accept one connection. Errors (out of file descriptors, say) are logged and retried
    /// with a growing pause, so they neither kill the server nor spin it.
    async fn accept(&self) -> (TcpStream, SocketAddr) {
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.listener.accept().await {
                Ok(accepted) => return accepted,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    }
}

/// One echo connection: reads frames, writes each back byte-exact.
#[derive(Debug)]
struct Handler {
    framed: Framed<TcpStream, EchoCodec>,
    peer: SocketAddr,
    idle_timeout: Duration,
    drain: CancellationToken,
    cut: CancellationToken,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    PeerClosed,
    Idle,
    Drained,
    FrameTooLong,
    Cut,
}

/// The result of one bounded I/O step.
enum Step<T> {
    Done(T),
    TimedOut,
    Cut,
}

async fn bounded<T>(
    cut: &CancellationToken,
    limit: Duration,
    io: impl Future<Output = T>,
) -> Step<T> {
    if cut.is_cancelled() {
        return Step::Cut;
    }
    // Most steps are ready at once (a frame already buffered, room in the write buffer):
    // those need no timer. Profiles of pipelined small frames showed timers and the select
    // as a third of the server's time.
    let mut io = std::pin::pin!(io);
    if let Some(value) = io.as_mut().now_or_never() {
        return Step::Done(value);
    }
    tokio::select! {
        biased;
        _ = cut.cancelled() => Step::Cut,
        result = tokio::time::timeout(limit, io) => match result {
            Ok(value) => Step::Done(value),
            Err(_) => Step::TimedOut,
        },
    }
}

impl Handler {
    async fn run(mut self, permit: OwnedSemaphorePermit) {
        let end = self.serve().await;
        match end {
            Ok(End::FrameTooLong) => self.refuse_and_linger().await,
            Ok(End::Cut) => {}
            Ok(end) => {
                let (cut, idle) = (self.cut.clone(), self.idle_timeout);
                if let Step::Done(Ok(())) =
                    bounded(&cut, idle, SinkExt::<Bytes>::flush(&mut self.framed)).await
                {
                    let _ = bounded(&cut, idle, self.framed.get_mut().shutdown()).await;
                }
                tracing::debug!(peer = %self.peer, ?end, "connection closed");
            }
            Err(e) => tracing::debug!(peer = %self.peer, error = %e, "connection failed"),
        }
        drop(permit);
    }

    async fn serve(&mut self) -> std::result::Result<End, CodecError> {
        let mut draining = false;
        let cut = self.cut.clone();
        let drain = self.drain.clone();
        loop {
            let wait = if draining {
                DRAIN_QUIET
            } else {
                self.idle_timeout
            };
            let next = tokio::select! {
                biased;
                _ = drain.cancelled(), if !draining => {
                    draining = true;
                    continue;
                }
                step = bounded(&cut, wait, self.framed.next()) => step,
            };
            let frame = match next {
                Step::Cut => return Ok(End::Cut),
                Step::TimedOut if draining => return Ok(End::Drained),
                Step::TimedOut => return Ok(End::Idle),
                Step::Done(None) => return Ok(End::PeerClosed),
                Step::Done(Some(Err(CodecError::FrameTooLong { .. }))) => {
                    return Ok(End::FrameTooLong);
                }
                Step::Done(Some(Err(e))) => return Err(e),
                Step::Done(Some(Ok(frame))) => frame,
            };
            if !self.answer(frame).await? {
                return Ok(if cut.is_cancelled() {
                    End::Cut
                } else {
                    End::Idle
                });
            }
        }
    }

    /// Queue the echo of `frame`; flush unless another whole frame is already buffered (so
    /// pipelined frames go out in one write). `false` if the peer stopped taking data.
    async fn answer(&mut self, frame: Bytes) -> std::result::Result<bool, CodecError> {
        let (cut, idle) = (self.cut.clone(), self.idle_timeout);
        match bounded(&cut, idle, self.framed.feed(frame)).await {
            Step::Done(result) => result?,
            Step::TimedOut | Step::Cut => return Ok(false),
        }
        let more = memchr::memchr(b'\n', self.framed.read_buffer()).is_some();
        if !more || self.framed.write_buffer().len() >= MAX_PENDING_WRITE {
            match bounded(&cut, idle, SinkExt::<Bytes>::flush(&mut self.framed)).await {
                Step::Done(result) => result?,
                Step::TimedOut | Step::Cut => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The peer sent a frame over the limit: answer one error line, close our side, and
    /// drop what it still sends for a moment, so the line is read rather than reset away.
    async fn refuse_and_linger(mut self) {
        let max = self.framed.codec().max_frame();
        let line = format!("error: {}", CodecError::FrameTooLong { max });
        tracing::info!(peer = %self.peer, max_frame = max, "frame too long: answered an error line and closed the connection");
        let cut = self.cut.clone();
        let limit = self.idle_timeout.min(LINGER_TIME);
        // Answers to the frames before go out first. The line is written raw: with a tiny
        // limit it may be longer than a frame may be.
        if !matches!(
            bounded(&cut, limit, SinkExt::<Bytes>::flush(&mut self.framed)).await,
            Step::Done(Ok(()))
        ) {
            return;
        }
        let mut socket = self.framed.into_inner();
        let write_and_close = async {
            socket.write_all(line.as_bytes()).await?;
            socket.write_all(b"\n").await?;
            socket.shutdown().await
        };
        if !matches!(
            bounded(&cut, limit, write_and_close).await,
            Step::Done(Ok(()))
        ) {
            return;
        }
        let linger = async {
            let mut buf = [0u8; 4096];
            let mut dropped = 0;
            while dropped < LINGER_BYTES {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => dropped += n,
                }
            }
        };
        let _ = bounded(&cut, LINGER_TIME, linger).await;
    }
}
