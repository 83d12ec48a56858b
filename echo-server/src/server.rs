//! The server: a `Listener` accepts echo connections under a connection cap and hands each
//! to its own `Handler`; [`Server::run`] ties in `/check`, the Consul registration and the
//! shutdown order (`/check` 503 → deregister → stop accepting → drain with a deadline).
//! Connections that end close in turns (the `closing` module), so that many ending at once
//! do not hold up the live ones.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::BufMut;
use futures::FutureExt;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    closing::{Closing, Turn},
    codec::{Batch, CodecError},
    config::Config,
    error::{Error, Result},
    live::{self, Cap, LiveSettings, LogLevel, Tunables},
    slice::Slice,
    stop::{Phase, Signal, Stop, Watch},
    sweep::{self, Flags},
};
use consul_registry::{
    Registrar,
    check::{self, Health},
    config::ConfigSpec,
    shed::Shedder,
};

/// While draining, a connection is closed once its peer has sent nothing for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// How much room a busy connection's reads get: the most it reads, and so echoes, per
/// system call. The fair baseline of the benches copies with a buffer of this size.
pub const READ_CHUNK: usize = 16 << 10;
/// The buffer of a connection that reads little, and of one idle for [`SHRINK_AFTER`]: a
/// large frame or a burst grows it (to [`READ_CHUNK`] of room, or a whole frame), and it
/// shrinks back once the peer is quiet.
const IDLE_CAPACITY: usize = 2 << 10;
/// Quiet this long after its last frame, a connection gives back what its buffer grew: one
/// idle period, then an idle connection costs what a fresh one does (told so by the sweeper,
/// within one more of its sweeps, 25 ms).
pub const SHRINK_AFTER: Duration = Duration::from_millis(50);
/// A buffer larger than this grew for a large frame (a busy connection's stays below it):
/// it is given back as soon as the connection waits with nothing buffered.
const LARGE_BUFFER: usize = 4 * READ_CHUNK;
/// An echoing connection's slice ([`Slice`]): after reading this much without waiting, it
/// yields, so that a peer that always has more to send cannot hold a worker thread from the
/// rest. Sixty-four full reads, each with its write: as far as tokio's own budget (128
/// socket operations per poll of a task) lets a copy loop like the benches' `raw-buf` go.
/// A yield is not free: on the multi-threaded runtime the yielding worker finds its queue
/// empty, searches, and wakes a parked one when it takes its own task back (a write to the
/// driver's eventfd, two context switches); yielding every 64 KiB cost the pipelined echo
/// ~20% of its CPU per message (measured with `echo-probe`: BENCHMARKS.md at c5bb543).
/// Slices of 1 and 4 reads were tried against it (fairness bench, paired runs, issue 37):
/// no phase of the hostile-input attack gives the echo loop more than ~80 KiB of one peer
/// per wake-up, so its well-behaved client saw no difference beyond the run-to-run spread,
/// and the 32-connection echo rows could not be told apart either (on a loaded machine);
/// the cost above stands, so the slice stays.
pub(crate) const SLICE: usize = 64 * READ_CHUNK;
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
    /// Sets the log filter, for live settings.
    log_level: Option<LogLevel>,
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
        // Every doubling of the descriptor table now, not in an accept under load.
        match crate::descriptors::reserve(&echo, config.max_connections) {
            Ok(top) => tracing::debug!(top, "descriptor table reserved"),
            Err(e) => tracing::warn!(error = %e, "could not reserve the descriptor table"),
        }
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
            log_level: None,
        })
    }

    /// Live settings may set the log level through `log_level` (without it, a `log_level`
    /// in the `--config-key` key is rejected).
    pub fn with_log_level(mut self, log_level: LogLevel) -> Self {
        self.log_level = Some(log_level);
        self
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
            log_level,
        } = self;

        let stop_accepting = CancellationToken::new();
        // The drain, then the cut, as the open connections see it.
        let connections = Stop::default();
        let stop_check = CancellationToken::new();
        let tracker = TaskTracker::new();
        let cap = Arc::new(Cap::new(config.max_connections));
        let (tunables, tunables_rx) = watch::channel(Tunables {
            max_frame: config.max_frame,
            idle_timeout: config.idle_timeout,
        });
        let live_task = follow_settings(&config, &cap, tunables, &health, &registrar, log_level)?;
        // Idle timeouts, buffer shrinks and shed eligibility, for every connection at once.
        let sweeper = tokio::spawn(sweep::run(connections.clone()));

        let listener = Listener {
            listener: echo,
            limit: cap.semaphore().clone(),
            shed: Shedder::default(),
            tunables: tunables_rx,
            tracker: tracker.clone(),
            stop: stop_accepting.clone(),
            connections: connections.clone(),
            closing: Closing::default(),
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
        if let Some(task) = live_task {
            task.abort();
        }
        let open = cap.open();
        let started = Instant::now();
        tracker.close();
        connections.set(Phase::Draining);
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
            let left = cap.open();
            connections.set(Phase::Cut);
            tracker.wait().await;
            tracing::warn!(
                connections = open,
                cut = left,
                deadline = ?config.drain_timeout,
                "drain deadline passed: cut the connections still busy"
            );
        }

        sweeper.abort();

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

/// With `--config-key`: follow the key and apply its settings (see [`crate::live`]).
fn follow_settings(
    config: &Config,
    cap: &Arc<Cap>,
    tunables: watch::Sender<Tunables>,
    health: &Health,
    registrar: &Option<Registrar>,
    log_level: Option<LogLevel>,
) -> Result<Option<JoinHandle<()>>> {
    let Some(key) = config.config_key.clone() else {
        return Ok(None);
    };
    let client = consul_api::Client::new(config.consul.clone())?;
    let registered = registrar.is_some();
    let check_level = log_level.clone();
    let spec = ConfigSpec::key(key.clone())
        .with_defaults(LiveSettings::default())
        .with_validation(move |s| live::validate(s, registered, check_level.as_ref()));
    let settings = consul_registry::config::spawn(client, spec);
    let targets = live::Targets {
        key,
        startup: config.clone(),
        tunables,
        cap: cap.clone(),
        health: health.clone(),
        registrar: registrar.clone(),
        log_level,
    };
    Ok(Some(tokio::spawn(live::apply(settings, targets))))
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
    /// The frame limit and idle timeout of the next connection (live settings).
    tunables: watch::Receiver<Tunables>,
    tracker: TaskTracker,
    stop: CancellationToken,
    connections: Stop,
    closing: Closing,
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
            let Tunables {
                max_frame,
                idle_timeout,
            } = *self.tunables.borrow();
            let handler = Handler::new(
                socket,
                max_frame,
                peer,
                idle_timeout,
                self.connections.watch(idle_timeout),
                self.shed.clone(),
                self.closing.clone(),
            );
            self.tracker.spawn(handler.run(permit));
            // One accept per turn: a yielded task runs again only after the worker has
            // looked for I/O, so a flood of connects (tokio would hand over every one waiting,
            // 32 at a time in the hostile-input scenario, each a task queued ahead of the
            // established connections) lets the open connections' ready bytes in between
            // accepts. Measured (fairness bench, 10 runs each): the well-behaved client's p99
            // in the short-lived phase 3.8 → 1.4 ms (medians): BENCHMARKS.md at c5bb543.
            tokio::task::yield_now().await;
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

/// One echo connection. Every read is followed by one write of every complete frame it
/// completed, straight from the read buffer (frames are echoed byte-exact, so the complete
/// frames in the buffer are their own answer): no per-frame allocation, copy, write or
/// wake-up. Each frame still has to fit the limit ([`Batch`]); the first that does not ends
/// the connection with one error line, after the answers to the frames before it. Generic
/// over the socket so unit tests can drive it through an in-memory pipe.
#[derive(Debug)]
struct Handler<S> {
    socket: S,
    /// Bytes read and not yet answered: at most one unfinished frame once a batch is out.
    buf: Vec<u8>,
    /// How many bytes of `buf` are known to hold no newline.
    searched: usize,
    max_frame: usize,
    /// The last read filled all the room it had: the next gets [`READ_CHUNK`] of room.
    busy: bool,
    /// Quiet for [`sweep::IDLE_BEFORE_SHED`] (the sweeper said so, and no frame was answered
    /// since): while it waits, it may be picked to make room for a new peer.
    sheddable: bool,
    peer: SocketAddr,
    idle_timeout: Duration,
    /// The drain, the cut and the sweeper's word: looked at in every wait, for an atomic
    /// load or two. No clock and no timer per connection: the sweeper times them all.
    stop: Watch,
    shed: Shedder,
    /// Its turn to close, once it ends ([`crate::closing`]).
    closing: Closing,
    turn: Option<Turn>,
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

async fn bounded<T>(stop: &Watch, limit: Duration, io: impl Future<Output = T>) -> Step<T> {
    // Most steps are ready at once (room in the socket's send buffer): those need no timer
    // and no look at the cut: a cut stops what would wait.
    let mut io = std::pin::pin!(io);
    if let Some(value) = io.as_mut().now_or_never() {
        return Step::Done(value);
    }
    tokio::select! {
        biased;
        _ = stop.reached(Phase::Cut) => Step::Cut,
        result = tokio::time::timeout(limit, io) => match result {
            Ok(value) => Step::Done(value),
            Err(_) => Step::TimedOut,
        },
    }
}

/// What ended a wait for the peer's bytes.
enum Wake {
    Read(std::io::Result<usize>),
    /// The drain began: from now on the connection closes once its peer is quiet.
    Drain,
    /// No complete frame within the idle timeout (or, draining, within [`DRAIN_QUIET`]).
    Quiet,
    Shed,
    Cut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Handler<S> {
    fn new(
        socket: S,
        max_frame: usize,
        peer: SocketAddr,
        idle_timeout: Duration,
        stop: Watch,
        shed: Shedder,
        closing: Closing,
    ) -> Self {
        Handler {
            socket,
            buf: Vec::with_capacity(IDLE_CAPACITY),
            searched: 0,
            max_frame,
            busy: false,
            sheddable: false,
            peer,
            idle_timeout,
            stop,
            shed,
            closing,
            turn: None,
        }
    }

    async fn run(mut self, permit: OwnedSemaphorePermit) {
        let end = self.serve().await;
        match end {
            Ok(End::FrameTooLong) => self.refuse_and_linger().await,
            Ok(End::Cut) => {}
            Ok(end) => {
                self.take_turn().await;
                let _ = bounded(&self.stop, self.idle_timeout, self.socket.shutdown()).await;
                tracing::debug!(peer = %self.peer, ?end, "connection closed");
                self.close().await;
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "connection failed");
                self.close().await;
            }
        }
        drop(permit);
    }

    /// Wait for this connection's turn to close, unless it has it already (or the cut came:
    /// then it closes at once).
    async fn take_turn(&mut self) {
        if self.turn.is_none() {
            self.turn = tokio::select! {
                biased;
                _ = self.stop.reached(Phase::Cut) => None,
                turn = self.closing.turn() => Some(turn),
            };
        }
    }

    /// Close the socket, then end the turn, if it took one.
    async fn close(self) {
        let Handler { socket, turn, .. } = self;
        drop(socket);
        if let Some(turn) = turn {
            turn.end().await;
        }
    }

    async fn serve(&mut self) -> std::io::Result<End> {
        let mut draining = false;
        // Bytes read since the task last waited: its slice.
        let mut slice = Slice::new(SLICE);
        let mut slice_used = false;
        loop {
            if slice_used {
                // A peer that always has more to send gives the others a turn. The cut is
                // looked at here and in every wait, not on each read.
                if self.stop.phase() == Phase::Cut {
                    return Ok(End::Cut);
                }
                slice_used = false;
                tokio::task::yield_now().await;
            }
            self.make_room();
            // A read that did not fill its room emptied the socket, and tokio then forgets
            // the socket's readiness: another try would only return Pending (no system
            // call, but a second pass through tokio's readiness checks, ~100 instructions
            // per one-in-flight round trip). Such a connection goes straight to waiting.
            let tried = self.busy;
            let ready = if tried {
                self.socket
                    .read_buf(&mut (&mut self.buf).limit(READ_CHUNK))
                    .now_or_never()
            } else {
                None
            };
            let read = match ready {
                Some(read) => read,
                None => {
                    if tried {
                        // The socket would block: this wait gives the others their turn.
                        // (Untried, it may not: the slice keeps counting.)
                        slice.waited();
                    }
                    match self.wait(draining).await {
                        Wake::Read(read) => read,
                        Wake::Drain => {
                            draining = true;
                            continue;
                        }
                        Wake::Quiet if draining => return Ok(End::Drained),
                        Wake::Quiet => return Ok(End::Idle),
                        Wake::Shed => return Ok(End::Shed),
                        Wake::Cut => return Ok(End::Cut),
                    }
                }
            };
            let n = read?;
            if n == 0 {
                // The peer closed: its last frame is answered in the turn that closes it.
                self.take_turn().await;
                return self.answer_last().await;
            }
            self.busy = n == READ_CHUNK || self.buf.len() == self.buf.capacity();
            slice_used = slice.served(n);
            let batch = Batch::scan(&self.buf, self.searched, self.max_frame);
            if batch.complete > 0 && !self.answer(batch.complete).await? {
                return Ok(if self.stop.phase() == Phase::Cut {
                    End::Cut
                } else {
                    End::Idle
                });
            }
            if batch.too_long {
                return Ok(End::FrameTooLong);
            }
            self.searched = self.buf.len();
        }
    }

    /// Room for the next read: the unfinished frame moves to the front (it is short unless
    /// it is a large frame arriving), and a connection whose last read filled its buffer
    /// gets [`READ_CHUNK`] of room. One that reads little keeps its small buffer. A frame
    /// longer than a read is arriving: the buffer grows at once to hold it whole (up to
    /// [`LARGE_BUFFER`]) and one read more, so the frame is copied once on the way, not at
    /// every doubling (2, 18, 36, 72 KiB for a 64 KiB frame, each step copying what it held:
    /// ~4,500 instructions per 64 KiB message, most of them `memcpy`, by callgrind).
    fn make_room(&mut self) {
        let len = self.buf.len();
        let room = self.buf.capacity() - len;
        if self.busy && room < READ_CHUNK {
            let frame = (self.max_frame + 1).min(LARGE_BUFFER);
            let more = if len >= READ_CHUNK && len < frame {
                frame - len + READ_CHUNK
            } else {
                READ_CHUNK
            };
            self.buf.reserve(more);
        } else if room == 0 {
            self.buf.reserve(IDLE_CAPACITY);
        }
    }

    /// Echo the first `complete` bytes of the buffer (whole frames) with one write, and keep
    /// the rest. `false` if the peer stopped taking data.
    async fn answer(&mut self, complete: usize) -> std::io::Result<bool> {
        let Handler {
            socket, buf, stop, ..
        } = self;
        let write = async {
            // Small frames: all that are complete in one write. More than two reads' worth
            // goes out in pieces of a read's size, as the baseline copier sends it (measured,
            // one 64 KiB write took the kernel more CPU than four of 16 KiB: BENCHMARKS.md at
            // c5bb543, "Writing a large frame in pieces"); the last piece takes the remainder,
            // so a 64 KiB frame and its newline are four writes, not four and one of a byte.
            let mut rest = &buf[..complete];
            while rest.len() >= 2 * READ_CHUNK {
                let (piece, after) = rest.split_at(READ_CHUNK);
                socket.write_all(piece).await?;
                rest = after;
            }
            socket.write_all(rest).await?;
            socket.flush().await
        };
        match bounded(stop, self.idle_timeout, write).await {
            Step::Done(result) => result?,
            Step::TimedOut | Step::Cut => return Ok(false),
        }
        self.buf.drain(..complete);
        self.stop.answered(self.buf.capacity() > IDLE_CAPACITY);
        self.sheddable = false;
        Ok(true)
    }

    /// The peer closed its side: an unfinished last frame is answered as it is, newline
    /// added (as `nc` sends a last line without one).
    async fn answer_last(&mut self) -> std::io::Result<End> {
        if !self.buf.is_empty() {
            self.buf.push(b'\n');
            let complete = self.buf.len();
            if !self.answer(complete).await? {
                return Ok(End::Idle);
            }
        }
        Ok(End::PeerClosed)
    }

    /// Wait for the peer's bytes, until the sweeper finds the connection quiet past its
    /// idle timeout (or, draining, [`DRAIN_QUIET`] passes). On the way, as the sweeper says:
    /// an empty buffer goes back to its small size, and once idle for
    /// [`sweep::IDLE_BEFORE_SHED`] the connection may be picked to make room for a new peer.
    /// A buffer grown for a large frame goes at once: were it kept for a while, every
    /// connection sending one would hold one at a time and the allocator would keep their
    /// memory resident after they go; one grown for a burst of small frames stays for the
    /// next burst, for one idle period.
    async fn wait(&mut self, draining: bool) -> Wake {
        if self.buf.capacity() > LARGE_BUFFER && self.buf.is_empty() {
            self.shrink();
        }
        if draining {
            return self.wait_draining().await;
        }
        loop {
            // The drain, the cut or the sweeper's word, if any, before anything else. While
            // waiting, the peer's bytes come first: a connection woken by them (most
            // wake-ups) reads without registering for the rest again. Its next wait sees it.
            let signal = match self.stop.now(Phase::Draining) {
                Some(signal) => signal,
                None => {
                    let mut room = (&mut self.buf).limit(READ_CHUNK);
                    tokio::select! {
                        biased;
                        read = self.socket.read_buf(&mut room) => return Wake::Read(read),
                        signal = self.stop.signaled(Phase::Draining) => signal,
                        () = self.shed.picked(), if self.sheddable => return Wake::Shed,
                    }
                }
            };
            let flags = match signal {
                Signal::Phase(Phase::Cut) => return Wake::Cut,
                Signal::Phase(_) => return Wake::Drain,
                Signal::Flags(flags) => flags,
            };
            if flags.contains(Flags::IDLE) {
                return Wake::Quiet;
            }
            if flags.contains(Flags::SHRINK) && self.buf.is_empty() {
                self.shrink();
            }
            if flags.contains(Flags::SHEDDABLE) {
                self.sheddable = true;
            }
        }
    }

    /// Draining: wait for the peer's bytes for [`DRAIN_QUIET`] at most, or the cut. Once per
    /// connection's life, so a timer of its own.
    async fn wait_draining(&mut self) -> Wake {
        let mut room = (&mut self.buf).limit(READ_CHUNK);
        let read = async {
            tokio::select! {
                biased;
                _ = self.stop.reached(Phase::Cut) => Wake::Cut,
                read = self.socket.read_buf(&mut room) => Wake::Read(read),
            }
        };
        tokio::time::timeout(DRAIN_QUIET, read)
            .await
            .unwrap_or(Wake::Quiet)
    }

    /// Back to the small buffer (it holds nothing).
    fn shrink(&mut self) {
        if self.buf.capacity() > IDLE_CAPACITY {
            self.buf = Vec::with_capacity(IDLE_CAPACITY);
            self.busy = false;
        }
    }

    /// The peer sent a frame over the limit: answer one error line, close our side, and
    /// drop what it still sends for a moment, so the line is read rather than reset away.
    async fn refuse_and_linger(mut self) {
        let max = self.max_frame;
        let line = format!("error: {}\n", CodecError::FrameTooLong { max });
        tracing::info!(peer = %self.peer, max_frame = max, "frame too long: answered an error line and closed the connection");
        let stop = self.stop;
        let limit = self.idle_timeout.min(LINGER_TIME);
        // The answers to the frames before it are out already. The line is written raw:
        // with a tiny limit it may be longer than a frame may be.
        self.buf = Vec::new();
        let mut socket = self.socket;
        let write_and_close = async {
            socket.write_all(line.as_bytes()).await?;
            socket.shutdown().await
        };
        if !matches!(
            bounded(&stop, limit, write_and_close).await,
            Step::Done(Ok(()))
        ) {
            return;
        }
        let linger = async {
            // On the heap: an array here would make every connection's task this much larger.
            let mut buf = vec![0u8; READ_CHUNK];
            let mut dropped = 0;
            // What it drops counts as what it serves, and serves no one: a read, then the
            // others' turn.
            let mut slice = Slice::new(READ_CHUNK);
            while dropped < LINGER_BYTES {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        dropped += n;
                        if slice.served(n) {
                            tokio::task::yield_now().await;
                        }
                    }
                }
            }
        };
        // Not through `bounded`: its first poll, for a step ready at once, has no waker to
        // come back to, so a yield there would be undone and the first slice run on.
        tokio::select! {
            biased;
            _ = stop.reached(Phase::Cut) => {}
            _ = tokio::time::timeout(LINGER_TIME, linger) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        pin::Pin,
        sync::atomic::{AtomicUsize, Ordering::SeqCst},
        task::{Context, Poll},
    };

    use tokio::io::ReadBuf;

    use super::*;

    /// A peer whose bytes arrive in the given pieces (one read returns at most one piece,
    /// the end of input after the last) and that takes every write whole, recording the
    /// size of each read and write.
    struct Recorder {
        input: std::collections::VecDeque<Vec<u8>>,
        output: Vec<u8>,
        reads: Vec<usize>,
        writes: Vec<usize>,
        /// Bytes written so far, for other tasks to see.
        echoed: Arc<AtomicUsize>,
        /// Bytes read so far, for other tasks to see.
        taken: Arc<AtomicUsize>,
    }

    impl Recorder {
        fn new(pieces: &[&[u8]]) -> Self {
            Recorder {
                input: pieces.iter().map(|p| p.to_vec()).collect(),
                output: Vec::new(),
                reads: Vec::new(),
                writes: Vec::new(),
                echoed: Arc::default(),
                taken: Arc::default(),
            }
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut piece) = self.input.pop_front() {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece[..n]);
                self.reads.push(n);
                self.taken.fetch_add(n, SeqCst);
                if n < piece.len() {
                    self.input.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
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
            self.echoed.fetch_add(buf.len(), SeqCst);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A handler of `io` as the server builds one, with nothing else going on: no stop, no
    /// shedding, a minute's idle timeout.
    fn quiet_handler<S: AsyncRead + AsyncWrite + Unpin>(io: S, max_frame: usize) -> Handler<S> {
        Handler::new(
            io,
            max_frame,
            SocketAddr::from(([127, 0, 0, 1], 1)),
            Duration::from_secs(60),
            Stop::default().watch(Duration::from_secs(60)),
            Shedder::default(),
            Closing::default(),
        )
    }

    async fn serve(max_frame: usize, pieces: &[&[u8]]) -> (End, Recorder) {
        let mut handler = quiet_handler(Recorder::new(pieces), max_frame);
        let end = handler.serve().await.expect("served");
        (end, handler.socket)
    }

    #[tokio::test]
    async fn many_frames_in_one_read_go_out_in_one_write() {
        // 5,000 frames of 1–30 bytes, in pieces of 40 KiB: more than a read takes.
        let mut input = Vec::new();
        for i in 0..5000 {
            input.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, 1 + i % 30));
            input.push(b'\n');
        }
        let pieces: Vec<&[u8]> = input.chunks(40 << 10).collect();
        let (end, peer) = serve(64, &pieces).await;
        assert_eq!(end, End::PeerClosed);
        assert_eq!(
            peer.output, input,
            "every frame echoed, byte-exact, in order"
        );
        assert_eq!(
            peer.writes.len(),
            peer.reads.iter().filter(|&&n| n > 0).count(),
            "one write per read: reads {:?}, writes {:?}",
            peer.reads,
            peer.writes
        );
        assert!(
            peer.reads.iter().skip(1).all(|&n| n <= READ_CHUNK)
                && peer.reads.iter().filter(|&&n| n == READ_CHUNK).count() >= 3,
            "a busy connection reads {READ_CHUNK} bytes at a time: {:?}",
            peer.reads
        );
    }

    #[tokio::test]
    async fn a_large_frame_arriving_grows_the_buffer_once_to_hold_it() {
        let (_client, server) = tokio::io::duplex(1);
        let max_frame = 64 << 10;
        let mut handler = quiet_handler(server, max_frame);
        // A 64 KiB frame and its newline arrive read by read, each filling the room it has,
        // as from a peer sending faster than the server reads.
        let mut capacities = vec![handler.buf.capacity()];
        while handler.buf.len() <= max_frame {
            handler.make_room();
            let room = (handler.buf.capacity() - handler.buf.len()).min(READ_CHUNK);
            let len = handler.buf.len();
            handler.buf.resize(len + room, b'x');
            handler.busy = true;
            if capacities.last() != Some(&handler.buf.capacity()) {
                capacities.push(handler.buf.capacity());
            }
        }
        assert_eq!(
            capacities.len(),
            3,
            "2 KiB, one read's room, then the whole frame at once: {capacities:?}"
        );
        // A frame of one read or less keeps a READ_CHUNK of room, below the large size.
        handler.buf = Vec::with_capacity(IDLE_CAPACITY);
        handler.buf.resize(IDLE_CAPACITY, b'x');
        handler.make_room();
        assert!(
            handler.buf.capacity() < LARGE_BUFFER,
            "{}",
            handler.buf.capacity()
        );
    }

    #[tokio::test]
    async fn a_large_frame_goes_out_in_pieces_of_a_read() {
        let frame = [vec![b'x'; 64 << 10], b"\n".to_vec()].concat();
        let pieces: Vec<&[u8]> = frame.chunks(READ_CHUNK).collect();
        let (end, peer) = serve(128 << 10, &pieces).await;
        assert_eq!(end, End::PeerClosed);
        assert_eq!(peer.output, frame, "echoed byte for byte");
        assert!(
            peer.writes
                .iter()
                .all(|&n| (READ_CHUNK..2 * READ_CHUNK).contains(&n)),
            "a 64 KiB frame is written about {READ_CHUNK} bytes at a time, no tiny tail: {:?}",
            peer.writes
        );
        assert_eq!(peer.writes.len(), frame.len() / READ_CHUNK);
    }

    #[tokio::test]
    async fn frames_split_across_reads_are_answered_once_whole() {
        let (end, peer) = serve(16, &[b"hel", b"lo\nwor", b"ld\n\nla", b"st"]).await;
        assert_eq!(end, End::PeerClosed);
        assert_eq!(
            peer.output, b"hello\nworld\n\nlast\n",
            "an unfinished last frame is answered at the end of input, newline added"
        );
        assert_eq!(
            peer.writes,
            [6, 7, 5],
            "nothing written before a frame is whole"
        );
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_mid_batch_ends_the_batch_there() {
        // In one read: two frames, one over the limit, one more.
        let (end, peer) = serve(8, &[b"ok\nfine\n123456789\nafter\n"]).await;
        assert_eq!(end, End::FrameTooLong);
        assert_eq!(
            peer.output, b"ok\nfine\n",
            "the frames before it are answered"
        );
        // Over the limit before its newline arrives, after a whole frame in the same read.
        let (end, peer) = serve(8, &[b"ok\n123456", b"789", b"more\n"]).await;
        assert_eq!(end, End::FrameTooLong);
        assert_eq!(peer.output, b"ok\n");
        // Exactly the limit passes, split or not.
        let (end, peer) = serve(8, &[b"1234", b"5678\n12345678\n"]).await;
        assert_eq!(end, End::PeerClosed);
        assert_eq!(peer.output, b"12345678\n12345678\n");
    }

    #[tokio::test]
    async fn a_peer_that_always_has_more_lets_other_tasks_run() {
        // On one thread: a peer with 4 MiB always ready to read, and another task. Without a
        // budget per wake-up the handler would echo all of it before the task got a turn.
        let total = 4 << 20;
        let input = b"0123456789abcde\n".repeat(total / 16);
        let pieces: Vec<&[u8]> = input.chunks(1024).collect();
        let peer = Recorder::new(&pieces);
        let echoed = peer.echoed.clone();
        let seen = Arc::new(AtomicUsize::new(usize::MAX));
        let other = {
            let (seen, echoed) = (seen.clone(), echoed.clone());
            tokio::spawn(async move { seen.store(echoed.load(SeqCst), SeqCst) })
        };
        let mut handler = quiet_handler(peer, 64);
        assert_eq!(handler.serve().await.expect("served"), End::PeerClosed);
        other.await.unwrap();
        assert_eq!(echoed.load(SeqCst), total);
        let seen = seen.load(SeqCst);
        assert!(
            seen <= SLICE + READ_CHUNK,
            "the other task first ran after {seen} of {total} bytes were echoed"
        );
    }

    #[tokio::test]
    async fn a_refused_peer_that_keeps_sending_lets_other_tasks_run() {
        // On one thread: a frame over the limit, then 4 MiB more always ready to read, which
        // the linger drops; and another task. Without a slice the linger would drop all of
        // it before the task got a turn.
        let input = vec![b'x'; LINGER_BYTES];
        let pieces: Vec<&[u8]> = input.chunks(READ_CHUNK).collect();
        let peer = Recorder::new(&pieces);
        let taken = peer.taken.clone();
        let seen = Arc::new(AtomicUsize::new(usize::MAX));
        let other = {
            let (seen, taken) = (seen.clone(), taken.clone());
            tokio::spawn(async move { seen.store(taken.load(SeqCst), SeqCst) })
        };
        let handler = quiet_handler(peer, 64);
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        handler.run(permit).await;
        other.await.unwrap();
        assert_eq!(
            taken.load(SeqCst),
            LINGER_BYTES,
            "the linger dropped it all"
        );
        let seen = seen.load(SeqCst);
        // The handler's own read up to the refusal (its small buffer), then one slice of the
        // linger's (a read's size; it ends with the read that reaches that size).
        assert!(
            seen <= IDLE_CAPACITY + 2 * READ_CHUNK,
            "the other task first ran after {seen} of {LINGER_BYTES} bytes were read"
        );
    }

    /// The size of this process's descriptor table (`FDSize` in `/proc/self/status`).
    #[cfg(target_os = "linux")]
    fn descriptor_table_size() -> usize {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn binding_grows_the_descriptor_table_for_the_connection_limit() {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        // Below the soft limit, and far above the 64 or 256 slots a test process has.
        let connections = soft
            .saturating_sub(crate::descriptors::SPARE as u64 + 1)
            .min(3000);
        assert!(
            connections >= 512,
            "soft RLIMIT_NOFILE {soft} is too low to tell"
        );
        let before = descriptor_table_size();
        assert!(
            before as u64 <= connections,
            "the table is already {before} slots"
        );
        let server = Server::bind(Config {
            max_connections: connections as usize,
            ..Config::local()
        })
        .await
        .unwrap();
        let after = descriptor_table_size();
        // Every doubling done at bind: the accepts a burst of connections makes later find
        // room (no accept waits for the kernel's RCU grace period to grow the table).
        assert!(
            after as u64 > connections + crate::descriptors::SPARE as u64,
            "table {before} → {after} slots for {connections} connections"
        );
        // Nothing was left open: the next descriptor is a low number again.
        let next = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        assert!((next.as_raw_fd() as u64) < connections);
        drop(server);
    }

    #[tokio::test]
    async fn the_listener_accepts_one_connection_per_turn() {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        // A burst of connects, all waiting in the backlog before the listener runs.
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let listener = Listener {
            listener: socket,
            limit: Arc::new(Semaphore::new(64)),
            shed: Shedder::default(),
            tunables: watch::channel(Tunables {
                max_frame: 64,
                idle_timeout: Duration::from_secs(60),
            })
            .1,
            tracker: tracker.clone(),
            stop: stop.clone(),
            connections: Stop::default(),
            closing: Closing::default(),
        };
        // One thread: the listener runs when this task yields, and this one again once the
        // listener yields (or waits).
        let running = tokio::spawn(listener.run());
        tokio::task::yield_now().await;
        assert_eq!(
            tracker.len(),
            1,
            "one connection accepted, then the others' tasks get a turn"
        );
        for _ in 0..100 {
            if tracker.len() == clients.len() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(tracker.len(), clients.len(), "and every one in time");
        stop.cancel();
        running.await.unwrap();
    }

    #[tokio::test]
    async fn a_large_frame_grows_the_buffer_and_a_quiet_period_shrinks_it() {
        let frame = [vec![b'L'; 64 << 10], vec![b'\n']].concat();
        let (end, peer) = serve(64 << 10, &[&frame]).await;
        assert_eq!(end, End::PeerClosed);
        assert_eq!(peer.output, frame);

        // A peer that sends the frame, then stays quiet (a duplex pipe held open); the
        // server's sweeper running.
        tokio::time::pause();
        let (mut client, server) = tokio::io::duplex(256 << 10);
        let stop = Stop::default();
        let sweeper = tokio::spawn(sweep::run(stop.clone()));
        let mut handler = Handler::new(
            server,
            64 << 10,
            SocketAddr::from(([127, 0, 0, 1], 1)),
            Duration::from_secs(60),
            stop.watch(Duration::from_secs(60)),
            Shedder::default(),
            Closing::default(),
        );
        client.write_all(&frame).await.unwrap();
        let serving = async {
            let _ = handler.serve().await;
            handler.buf.capacity()
        };
        let checking = async {
            let mut back = vec![0u8; frame.len()];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, frame);
            tokio::time::sleep(SHRINK_AFTER * 2).await;
            client
        };
        // The handler runs until the idle timeout; look at its buffer through a second
        // frame's absence: serve's return gives it back.
        let (capacity, _client) = tokio::join!(serving, checking);
        sweeper.abort();
        assert!(
            capacity <= IDLE_CAPACITY,
            "after one quiet period the buffer is back to {IDLE_CAPACITY} bytes, not {capacity}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_closes_a_quiet_connection_at_its_idle_timeout_and_never_a_talking_one() {
        let idle_timeout = Duration::from_secs(1);
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let stop = Stop::default();
        let sweeper = tokio::spawn(sweep::run(stop.clone()));
        let mut handler = Handler::new(
            server,
            64,
            SocketAddr::from(([127, 0, 0, 1], 1)),
            idle_timeout,
            stop.watch(idle_timeout),
            Shedder::default(),
            Closing::default(),
        );
        let start = Instant::now();
        let serving = async {
            let end = handler.serve().await.expect("served");
            (end, start.elapsed())
        };
        // A frame every 400 ms for 3 s, then quiet.
        let talking = async {
            let mut back = [0u8; 6];
            while start.elapsed() < Duration::from_secs(3) {
                client.write_all(b"hello\n").await.unwrap();
                client.read_exact(&mut back).await.unwrap();
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            // Held open, quiet: only the idle timeout ends the connection.
            (start.elapsed(), client)
        };
        let ((end, ended), (last, _client)) = tokio::join!(serving, talking);
        sweeper.abort();
        assert_eq!(end, End::Idle);
        let quiet = ended - last + Duration::from_millis(400);
        assert!(
            quiet >= idle_timeout && quiet <= idle_timeout + 2 * sweep::EVERY,
            "closed {quiet:?} after the last frame, for an idle timeout of {idle_timeout:?}"
        );
    }
}
