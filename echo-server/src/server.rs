//! The server: a `Listener` accepts echo connections under a connection cap and hands each
//! to its own `Handler`; [`Server::run`] ties in `/check`, the Consul registration and the
//! shutdown order (`/check` 503 → deregister → stop accepting → drain with a deadline).

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
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
    shed::Shedder,
};

/// While draining, a connection is closed once its peer has sent nothing for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// Initial capacity of a connection's read and write buffers. They grow to hold a frame (and
/// the answers waiting to be written), and shrink back to this when the connection waits
/// for its peer after more than this much went through.
const BUFFER_CAPACITY: usize = 2 << 10;
/// Answers are flushed at the latest when this much is waiting to be written: the write
/// buffer's back-pressure boundary.
const MAX_PENDING_WRITE: usize = 64 << 10;
/// A connection idle this long may be closed to make room when every slot is taken.
const IDLE_BEFORE_SHED: Duration = Duration::from_secs(1);
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
            shed: Shedder::default(),
            codec: EchoCodec::new(config.max_frame),
            idle_timeout: config.idle_timeout,
            tracker: tracker.clone(),
            stop: stop_accepting.clone(),
            drain: drain.clone(),
            cut: cut.clone(),
        };
        let mut accept_task = Some(tokio::spawn(listener.run()));
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
            () = ended(&mut accept_task) => Err(Error::Internal(
                "the echo listener stopped by itself".into(),
            )),
        };
        // From here on every step runs whatever an earlier one or a task did: a task that
        // panicked is reported once the shutdown is done, never skips deregistration or drain.
        let mut failed = Vec::new();

        // 1. `/check` answers 503, so nothing new is routed here.
        health.set_draining();
        tracing::info!("shutting down: /check answers 503 from now on");

        // 2. Leave Consul's catalog: stop re-registering first, then deregister.
        stop_registration.cancel();
        if let Some(task) = registration.take() {
            join("registration", task, &mut failed).await;
        }
        if let Some(registrar) = &registrar {
            registrar.deregister().await;
        }

        // 3. Stop accepting: the listening socket is closed.
        stop_accepting.cancel();
        if let Some(task) = accept_task.take() {
            join("echo listener", task, &mut failed).await;
        }

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
        join("/check", check_task, &mut failed).await;
        let outcome = match outcome {
            Ok(()) if !failed.is_empty() => Err(Error::Internal(failed.join("; "))),
            outcome => outcome,
        };
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

/// Completes when `task` ends (it then is `None`); never if it is `None`.
async fn ended(task: &mut Option<JoinHandle<()>>) {
    let Some(handle) = task.as_mut() else {
        return std::future::pending().await;
    };
    if let Err(e) = handle.await {
        tracing::error!(error = %e, "the echo listener failed");
    }
    *task = None;
}

/// Wait for `task`; if it panicked or was cancelled, log it and add it to `failed`.
async fn join<T>(what: &str, task: JoinHandle<T>, failed: &mut Vec<String>) -> Option<T> {
    match task.await {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::error!(task = what, error = %e, "a server task failed; shutting down in order all the same");
            failed.push(format!("the {what} task failed: {e}"));
            None
        }
    }
}

/// Accepts echo connections while a permit is free, until told to stop.
#[derive(Debug)]
struct Listener {
    listener: TcpListener,
    limit: Arc<Semaphore>,
    shed: Shedder,
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
            let (socket, peer) = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                accepted = self.accept() => accepted,
            };
            // Every slot taken: the peer idle longest is closed to make room (if none has
            // been idle long enough yet, the new peer waits for the first that is).
            let permit = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                permit = self.shed.slot(&self.limit) => match permit {
                    Some(permit) => permit,
                    None => break,
                },
            };
            if let Err(e) = socket.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let handler = Handler::new(
                socket,
                self.codec.clone(),
                peer,
                self.idle_timeout,
                self.drain.clone(),
                self.cut.clone(),
                self.shed.clone(),
            );
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

/// One echo connection: reads frames, writes each back byte-exact. Generic over the socket
/// so unit tests can drive it through an in-memory pipe.
#[derive(Debug)]
struct Handler<S> {
    framed: Framed<S, EchoCodec>,
    peer: SocketAddr,
    idle_timeout: Duration,
    drain: CancellationToken,
    cut: CancellationToken,
    shed: Shedder,
    /// Bytes answered since the buffers were last set back to their initial capacity.
    passed: usize,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    PeerClosed,
    Idle,
    /// Closed while idle to make room for a new peer.
    Shed,
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

impl<S: AsyncRead + AsyncWrite + Unpin> Handler<S> {
    fn new(
        socket: S,
        codec: EchoCodec,
        peer: SocketAddr,
        idle_timeout: Duration,
        drain: CancellationToken,
        cut: CancellationToken,
        shed: Shedder,
    ) -> Self {
        // `with_capacity` also sets the flush threshold to the capacity: set it apart.
        let mut framed = Framed::with_capacity(socket, codec, BUFFER_CAPACITY);
        framed.set_backpressure_boundary(MAX_PENDING_WRITE);
        Handler {
            framed,
            peer,
            idle_timeout,
            drain,
            cut,
            shed,
            passed: 0,
        }
    }

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
            let next = match self.framed.next().now_or_never() {
                Some(next) => Step::Done(next),
                None if cut.is_cancelled() => Step::Cut,
                None if draining => bounded(&cut, DRAIN_QUIET, self.framed.next()).await,
                None => {
                    // Nothing to do until the peer sends more: give back what a large frame
                    // or a burst grew.
                    self.shrink_buffers();
                    tokio::select! {
                        biased;
                        _ = drain.cancelled() => {
                            draining = true;
                            continue;
                        }
                        waited = self.wait_for_frame(&cut) => match waited {
                            Some(step) => step,
                            None => return Ok(End::Shed),
                        },
                    }
                }
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
            self.passed += frame.len() + 1;
            if !self.answer(frame).await? {
                return Ok(if cut.is_cancelled() {
                    End::Cut
                } else {
                    End::Idle
                });
            }
        }
    }

    /// Wait for the peer's next frame, up to the idle timeout; `None` if, once idle for
    /// [`IDLE_BEFORE_SHED`], this connection was picked to make room for a new peer.
    async fn wait_for_frame(
        &mut self,
        cut: &CancellationToken,
    ) -> Option<Step<Option<std::result::Result<Bytes, CodecError>>>> {
        let before_shed = self.idle_timeout.min(IDLE_BEFORE_SHED);
        match bounded(cut, before_shed, self.framed.next()).await {
            Step::TimedOut if self.idle_timeout > before_shed => {}
            step => return Some(step),
        }
        tokio::select! {
            biased;
            step = bounded(cut, self.idle_timeout - before_shed, self.framed.next()) => Some(step),
            () = self.shed.picked() => None,
        }
    }

    /// Once more than the initial capacity has gone through, set empty buffers back to it,
    /// so that a connection idle after a large frame holds kilobytes, not the frame's size.
    fn shrink_buffers(&mut self) {
        if self.passed <= BUFFER_CAPACITY
            || !self.framed.read_buffer().is_empty()
            || !self.framed.write_buffer().is_empty()
        {
            return;
        }
        *self.framed.read_buffer_mut() = BytesMut::with_capacity(BUFFER_CAPACITY);
        *self.framed.write_buffer_mut() = BytesMut::with_capacity(BUFFER_CAPACITY);
        self.passed = 0;
    }

    /// Queue the echo of `frame`; flush unless another whole frame is already buffered (so
    /// pipelined frames go out in one write). `false` if the peer stopped taking data.
    async fn answer(&mut self, frame: Bytes) -> std::result::Result<bool, CodecError> {
        let (cut, idle) = (self.cut.clone(), self.idle_timeout);
        match bounded(&cut, idle, self.framed.feed(frame)).await {
            Step::Done(result) => result?,
            Step::TimedOut | Step::Cut => return Ok(false),
        }
        // Past MAX_PENDING_WRITE, `feed` itself flushes first (the back-pressure boundary).
        let more = memchr::memchr(b'\n', self.framed.read_buffer()).is_some();
        if !more {
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
            // On the heap: an array here would make every connection's task this much larger.
            let mut buf = vec![0u8; 4096];
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

#[cfg(test)]
mod tests {
    use std::{
        io,
        pin::Pin,
        task::{Context, Poll},
    };

    use tokio::io::ReadBuf;

    use super::*;

    /// A peer that has sent all of `input` at once and takes every write whole, recording
    /// the size of each.
    struct Recorder {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
        writes: Vec<usize>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.input).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.output.extend_from_slice(buf);
            self.writes.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn pipelined_answers_are_flushed_at_max_pending_write() {
        // One frame at the limit (the read buffer grows to hold it), then 200 KiB of small
        // frames already there: their answers may gather up to MAX_PENDING_WRITE per write.
        let max_frame = 64 << 10;
        let mut input = vec![b'L'; max_frame];
        input.push(b'\n');
        for i in 0..2000 {
            input.extend_from_slice(format!("{i:099}\n").as_bytes());
        }
        let peer = Recorder {
            input: std::io::Cursor::new(input.clone()),
            output: Vec::new(),
            writes: Vec::new(),
        };
        let mut handler = Handler::new(
            peer,
            EchoCodec::new(max_frame),
            SocketAddr::from(([127, 0, 0, 1], 1)),
            Duration::from_secs(60),
            CancellationToken::new(),
            CancellationToken::new(),
            Shedder::default(),
        );
        let end = handler.serve().await.expect("served");
        assert_eq!(end, End::PeerClosed);
        let peer = handler.framed.get_ref();
        assert_eq!(peer.output, input, "every frame echoed, in order");
        let largest_small = peer.writes[1..].iter().copied().max().unwrap_or(0);
        assert!(
            largest_small >= MAX_PENDING_WRITE,
            "small answers are gathered up to {MAX_PENDING_WRITE} bytes per write, not \
             flushed earlier: writes {:?}",
            peer.writes
        );
        assert!(
            peer.writes
                .iter()
                .all(|&w| w <= MAX_PENDING_WRITE + max_frame + 1),
            "no more than the limit and one frame waits: {:?}",
            peer.writes
        );
    }
}
