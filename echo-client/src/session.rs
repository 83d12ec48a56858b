//! The session: one task that owns the connection to the current instance and the queue of
//! un-answered messages, so that every message gets exactly one answer, in order.
//!
//! It is a state machine driven by one `select!` over events: a request, a reply frame, a
//! write that made progress, a connect that finished, a discovery update, a timer. Nothing
//! else awaits, so while a connect is pending or a large batch is being written, deadlines,
//! discovery updates, new requests and replies are all still served.
//!
//! * Messages are written in order on the current connection (pipelined, at most
//!   [`MAX_UNANSWERED_BYTES`] un-answered at a time, replies read while writing) and matched
//!   with replies first-in first-out; a reply is handed to its caller once, when it arrives.
//!   A reply that is not byte-equal to its message is [`Error::NotAnEcho`]; a server's
//!   frame-limit error line is [`Error::FrameTooLong`].
//! * A connect is an event: it may take up to the connect timeout; if it has not completed
//!   after [`RACE_DELAY`], a connect to another usable instance races it (happy-eyeballs
//!   style), and the first to complete wins. A failed connect ejects its instance in the
//!   [`Balancer`] (with the time of the failure) and another usable instance is tried at once;
//!   once every instance failed, the jittered backoff applies, even with a zero cooldown.
//! * On a reset, a close, a partial frame or no reply within the reply timeout while
//!   messages are un-answered, the instance is ejected for a cooldown and every un-answered
//!   message is written again, in order, on another instance. A close with nothing
//!   un-answered (the server's idle timeout) only drops the connection.
//! * A message still un-answered at its deadline is answered with [`Error::Timeout`]; if it
//!   was already written, its reply is still consumed in order and discarded (never given to
//!   the next message), and the instance is not ejected for it; if not, it is never written.
//! * It stays on a working connection, and leaves it only when Consul stops listing the
//!   instance's address while another one is passing: an empty passing set is "no better
//!   choice", not a reason to drop a connection that works (Consul restarting, say). Or, with
//!   [`SessionConfig::spread`], when instances are added: with probability added / total it
//!   moves to one of them at the next moment nothing is un-answered (nothing resent, nothing
//!   lost), so that many sessions spread evenly over a scaled-out service.
//! * With [`SessionConfig::standby`] (off by default), a second connection stays open to
//!   another passing instance (the balancer's next choice), verified by one probe frame
//!   echoed back; it is replaced when its instance leaves the passing set, when it closes
//!   (the server's idle timeout or shed), or when its probe is not answered in time. When
//!   the current connection fails, the un-answered messages are written again on the
//!   standby at once, in order, instead of after a connect. Its cost: one idle connection
//!   per session (on the server, an idle connection's ~4 KiB; it counts toward the server's
//!   connection cap and, idle, is among the first a full server sheds, after which it is
//!   replaced no sooner than [`STANDBY_RETRY`]).
//! * A discovery failure (a refused token before anything worked) answers every message
//!   with it while it lasts; a later snapshot without it (a merged multi-datacenter view
//!   where another datacenter lists instances) ends it.

use std::{
    collections::HashSet, collections::VecDeque, future::Future, io, pin::Pin, time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use echo_wire::{CodecError, DEFAULT_MAX_FRAME, ReplyCodec};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::codec::FramedRead;

use crate::{
    backoff::Backoff,
    balancer::{Balancer, Strategy},
    client::Reply,
    discovery::{Instance, Snapshot},
    error::{Error, Result},
};

/// How long a connect may stay pending before a connect to another instance races it
/// (capped at half the connect timeout).
pub const RACE_DELAY: Duration = Duration::from_millis(250);

/// Most connects in flight at once.
const MAX_CONNECTS: usize = 4;

/// Most bytes written on a connection and not yet answered (at least one message is always
/// allowed). Keeps the reply timeout about replies, not about queueing behind megabytes.
pub const MAX_UNANSWERED_BYTES: usize = 256 << 10;

/// What a server answers to a frame over its limit, before closing.
const FRAME_LIMIT_LINE: &[u8] = b"error: frame longer than ";

/// The frame a standby connection echoes once to show it works.
const STANDBY_PROBE: &[u8] = b"standby probe";

/// After a standby could not be opened, verified or kept (or no other instance was there to
/// open one to), the next try waits this long (or for a change of the passing set).
pub const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// How a session behaves.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The service's name, for messages.
    pub service: String,
    /// How to choose among passing instances.
    pub strategy: Strategy,
    /// Deadline to establish a TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for the next reply while messages are un-answered on a connection (from
    /// the oldest one's write or the last reply, whichever is later); past it the instance is
    /// treated as failed.
    pub reply_timeout: Duration,
    /// Deadline for a message to be answered by any instance, from the moment it was sent.
    pub message_timeout: Duration,
    /// First ejection cooldown of a failed instance (doubling per consecutive failure). Zero
    /// is allowed: once every instance failed, the reconnect backoff still applies.
    pub cooldown: Duration,
    /// Most messages queued un-answered; senders wait beyond it.
    pub queue_capacity: usize,
    /// Largest message and reply, in bytes.
    pub max_frame: usize,
    /// When Consul lists new instances, move to one of them with probability added / total
    /// (see [`Balancer::update_spreading`]), so that a scale-out takes load.
    pub spread: bool,
    /// Seed the balancer's random choices (round-robin's start, power-of-two candidates, the
    /// spread) for a reproducible run: round-robin then starts at the first instance by ID.
    /// `None` (the default): random, so that many clients do not all start on one instance.
    pub seed: Option<u64>,
    /// Keep a verified standby connection open to a second instance, for a failover that
    /// resends on an open connection instead of connecting first (see the module docs for
    /// its cost). Off by default: it does not reliably shorten a failover, as with or without
    /// it the client first waits for the dead instance's close (BENCHMARKS.md,
    /// `failover/kill/*_standby` beside the rows without it), and it doubles the connections
    /// every server holds, which count toward the server's cap and its shedding.
    pub standby: bool,
}

impl SessionConfig {
    /// Defaults: round-robin, connect 1 s, reply 2 s, message 30 s, cooldown 2 s, 1024 queued,
    /// spreading over new instances, no standby connection.
    pub fn new(service: impl Into<String>) -> Self {
        SessionConfig {
            service: service.into(),
            strategy: Strategy::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            reply_timeout: Duration::from_secs(2),
            message_timeout: Duration::from_secs(30),
            cooldown: Duration::from_secs(2),
            queue_capacity: 1024,
            max_frame: DEFAULT_MAX_FRAME,
            spread: true,
            seed: None,
            standby: false,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let zero = [
            ("connect timeout", self.connect_timeout),
            ("reply timeout", self.reply_timeout),
            ("message timeout", self.message_timeout),
        ]
        .into_iter()
        .find(|(_, d)| d.is_zero());
        if let Some((what, _)) = zero {
            return Err(Error::Config(format!("the {what} must be above zero")));
        }
        if self.queue_capacity == 0 || self.max_frame == 0 {
            return Err(Error::Config(
                "the queue capacity and the frame size must be above zero".into(),
            ));
        }
        Ok(())
    }
}

/// A message on its way into the session.
#[derive(Debug)]
pub(crate) struct Request {
    pub bytes: Bytes,
    pub reply: oneshot::Sender<Result<Reply>>,
    pub sent_at: Instant,
}

/// Start a session over `discovery`; returns where to send requests. The task ends when
/// every sender is dropped and the queue is empty.
pub(crate) fn spawn(
    discovery: watch::Receiver<Snapshot>,
    config: SessionConfig,
) -> mpsc::Sender<Request> {
    let (tx, rx) = mpsc::channel(config.queue_capacity.min(256));
    let session = Session::new(rx, discovery, config);
    tokio::spawn(session.run());
    tx
}

/// An un-answered message.
#[derive(Debug)]
struct Pending {
    bytes: Bytes,
    /// `None`: answered already (its deadline passed after it was written); its reply is
    /// still to be read and discarded.
    reply: Option<oneshot::Sender<Result<Reply>>>,
    sent_at: Instant,
    deadline: Instant,
    /// When it was written on the current connection; `None`: not written there yet.
    written_at: Option<Instant>,
    attempts: u32,
}

/// The connection to the current instance.
#[derive(Debug)]
struct Conn {
    instance: Instance,
    reader: FramedRead<OwnedReadHalf, ReplyCodec>,
    writer: OwnedWriteHalf,
    /// Encoded messages not yet taken by the socket.
    out: BytesMut,
    /// How many messages at the front of the queue are written on it, un-answered.
    written: usize,
    /// Their size on the wire.
    unanswered_bytes: usize,
    /// When the last reply came.
    last_reply: Option<Instant>,
}

/// A second open connection, to another instance than the current one's.
#[derive(Debug)]
struct Standby {
    conn: Conn,
    /// Its probe's echo came back: usable. Until then, the probe must come back by this.
    verified: bool,
    probe_deadline: Instant,
}

type Connecting =
    Pin<Box<dyn Future<Output = (Instance, std::result::Result<TcpStream, String>)> + Send>>;

#[derive(Debug)]
enum Event {
    Request(Option<Request>),
    Frame(Option<std::result::Result<Bytes, CodecError>>),
    Wrote(io::Result<usize>),
    Connected(Instance, std::result::Result<TcpStream, String>),
    Discovery(bool),
    ReplyTimeout,
    Race,
    Tick,
    StandbyConnected(Instance, std::result::Result<TcpStream, String>),
    StandbyFrame(Option<std::result::Result<Bytes, CodecError>>),
    StandbyWrote(io::Result<usize>),
}

#[derive(Debug)]
struct Session {
    config: SessionConfig,
    requests: mpsc::Receiver<Request>,
    requests_open: bool,
    discovery: watch::Receiver<Snapshot>,
    discovery_open: bool,
    snapshot: Snapshot,
    balancer: Balancer,
    backoff: Backoff,
    pending: VecDeque<Pending>,
    conn: Option<Conn>,
    /// Connects in flight, and to which instances.
    connecting: FuturesUnordered<Connecting>,
    connecting_to: Vec<Instance>,
    /// When to start a racing connect, while one is pending.
    race_at: Option<Instant>,
    /// Addresses that failed since the last reply: not tried again before the backoff.
    failed_round: Vec<String>,
    /// When a new round of connects may start (backoff); `None`: at once.
    retry_at: Option<Instant>,
    failed: Option<Error>,
    last_failure: Option<String>,
    /// Addresses whose frame limit was reported already.
    frame_limit_reported: HashSet<String>,
    /// A new instance to move to once nothing is un-answered (spreading a scale-out).
    move_to: Option<Instance>,
    standby: Option<Standby>,
    /// The standby's connect in flight (at most one).
    standby_connecting: FuturesUnordered<Connecting>,
    /// When the next standby may be tried; `None`: at once.
    standby_retry_at: Option<Instant>,
}

impl Session {
    fn new(
        requests: mpsc::Receiver<Request>,
        discovery: watch::Receiver<Snapshot>,
        config: SessionConfig,
    ) -> Self {
        let mut balancer = Balancer::new(config.strategy, config.cooldown);
        if let Some(seed) = config.seed {
            balancer = balancer.with_seed(seed);
        }
        let snapshot = discovery.borrow().clone();
        Session {
            requests,
            requests_open: true,
            snapshot,
            discovery,
            discovery_open: true,
            balancer,
            backoff: Backoff::reconnect(),
            pending: VecDeque::new(),
            conn: None,
            connecting: FuturesUnordered::new(),
            connecting_to: Vec::new(),
            race_at: None,
            failed_round: Vec::new(),
            retry_at: None,
            failed: None,
            last_failure: None,
            frame_limit_reported: HashSet::new(),
            move_to: None,
            standby: None,
            standby_connecting: FuturesUnordered::new(),
            standby_retry_at: None,
            config,
        }
    }

    async fn run(mut self) {
        let first = self.discovery.borrow_and_update().clone();
        self.apply(first);
        loop {
            if !self.requests_open && self.pending.is_empty() {
                return;
            }
            let now = Instant::now();
            self.expire(now);
            if let Some(error) = self.failed.clone() {
                self.conn = None;
                self.drop_standby();
                self.stop_connecting();
                for p in self.pending.drain(..) {
                    if let Some(reply) = p.reply {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            } else {
                // Callers that gave up need no write.
                self.pending.retain(|p| {
                    p.written_at.is_some() || p.reply.as_ref().is_some_and(|r| !r.is_closed())
                });
                self.check_idle_close();
                self.check_move();
                if self.conn.is_none() && !self.pending.is_empty() {
                    self.promote_standby();
                }
                self.check_standby(now);
                let retry_due = self.retry_at.is_none_or(|t| t <= now);
                if self.conn.is_none()
                    && self.connecting.is_empty()
                    && !self.pending.is_empty()
                    && retry_due
                {
                    self.connect_more(now);
                }
                self.fill(now);
            }
            let event = self.next_event().await;
            self.handle(event);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Request(None) => self.requests_open = false,
            Event::Request(Some(r)) => self.pending.push_back(Pending {
                deadline: r.sent_at + self.config.message_timeout,
                bytes: r.bytes,
                reply: Some(r.reply),
                sent_at: r.sent_at,
                written_at: None,
                attempts: 0,
            }),
            Event::Frame(Some(Ok(frame))) => self.on_reply(frame),
            Event::Frame(Some(Err(e))) => self.conn_ended(&e.to_string()),
            Event::Frame(None) => self.conn_ended("connection closed by the instance"),
            Event::Wrote(Ok(0)) => self.fail_conn("write: the connection took no more bytes"),
            Event::Wrote(Ok(_)) => {}
            Event::Wrote(Err(e)) => self.fail_conn(&format!("write: {e}")),
            Event::Connected(instance, result) => self.on_connected(instance, result),
            Event::ReplyTimeout => {
                let timeout = self.config.reply_timeout;
                self.fail_conn(&format!("no reply within {timeout:?}"));
            }
            Event::Discovery(true) => {
                let snapshot = self.discovery.borrow_and_update().clone();
                self.apply(snapshot);
            }
            // No more updates: keep using the last set.
            Event::Discovery(false) => self.discovery_open = false,
            Event::Race => {
                self.race_at = None;
                if self.conn.is_none() {
                    self.connect_more(Instant::now());
                }
            }
            // The loop re-checks deadlines and the backoff; a timer firing changes nothing
            // by itself (a message deadline must not cut the backoff short).
            Event::Tick => {}
            Event::StandbyConnected(instance, result) => {
                self.on_standby_connected(instance, result)
            }
            Event::StandbyFrame(Some(Ok(frame))) => self.on_standby_frame(&frame),
            Event::StandbyFrame(Some(Err(e))) => self.standby_lost(&e.to_string()),
            Event::StandbyFrame(None) => self.standby_lost("closed by the instance"),
            Event::StandbyWrote(Ok(0)) => self.standby_lost("write: no more bytes taken"),
            Event::StandbyWrote(Ok(_)) => {}
            Event::StandbyWrote(Err(e)) => self.standby_lost(&format!("write: {e}")),
        }
    }

    async fn next_event(&mut self) -> Event {
        let reply_deadline = match &self.conn {
            Some(c) if c.written > 0 => self
                .pending
                .front()
                .and_then(|p| p.written_at)
                .map(|t| c.last_reply.map_or(t, |r| r.max(t)) + self.config.reply_timeout),
            _ => None,
        };
        let idle = self.conn.is_none() && self.connecting.is_empty();
        let retry_at = if idle && !self.pending.is_empty() {
            self.retry_at
        } else {
            None
        };
        let race_at = if self.conn.is_none() && !self.connecting.is_empty() {
            self.race_at
        } else {
            None
        };
        let message_deadline = self.first_deadline();
        let standby_at = match &self.standby {
            Some(s) if !s.verified => Some(s.probe_deadline),
            Some(_) => None,
            None if self.config.standby && self.conn.is_some() => self.standby_retry_at,
            None => None,
        };
        let wake_at = [retry_at, message_deadline, standby_at]
            .into_iter()
            .flatten()
            .min();
        let accept = self.requests_open && self.pending.len() < self.config.queue_capacity;
        let (reader, writer) = match &mut self.conn {
            Some(Conn {
                reader,
                writer,
                out,
                ..
            }) => (Some(reader), Some((writer, out))),
            None => (None, None),
        };
        let connecting = !self.connecting.is_empty();
        let (standby_reader, standby_writer) = match &mut self.standby {
            Some(Standby {
                conn:
                    Conn {
                        reader,
                        writer,
                        out,
                        ..
                    },
                ..
            }) => (Some(reader), Some((writer, out))),
            None => (None, None),
        };
        let standby_connecting = !self.standby_connecting.is_empty();
        tokio::select! {
            biased;
            frame = read_frame(reader) => Event::Frame(frame),
            wrote = write_some(writer) => Event::Wrote(wrote),
            Some((instance, result)) = self.connecting.next(), if connecting => {
                Event::Connected(instance, result)
            }
            changed = self.discovery.changed(), if self.discovery_open => {
                Event::Discovery(changed.is_ok())
            }
            () = sleep_until(reply_deadline) => Event::ReplyTimeout,
            () = sleep_until(race_at) => Event::Race,
            () = sleep_until(wake_at) => Event::Tick,
            // The standby before new requests: a flood of them must not keep its probe's
            // echo unread (an unverified standby is not used).
            frame = read_frame(standby_reader) => Event::StandbyFrame(frame),
            wrote = write_some(standby_writer) => Event::StandbyWrote(wrote),
            Some((instance, result)) = self.standby_connecting.next(), if standby_connecting => {
                Event::StandbyConnected(instance, result)
            }
            request = self.requests.recv(), if accept => Event::Request(request),
        }
    }

    /// The earliest deadline of a message not answered yet.
    fn first_deadline(&self) -> Option<Instant> {
        self.pending
            .iter()
            .filter(|p| p.reply.is_some())
            .map(|p| p.deadline)
            .min()
    }

    /// Take in a new snapshot from discovery.
    fn apply(&mut self, snapshot: Snapshot) {
        let failed = snapshot.failure().map(|error| Error::Discovery {
            service: self.config.service.clone(),
            reason: error.to_owned(),
            cause: snapshot.cause.clone(),
        });
        if self.failed.is_some() && failed.is_none() {
            tracing::info!(
                service = %self.config.service,
                "discovery works again: sending messages again"
            );
        }
        self.failed = failed;
        let news = snapshot.instances != self.snapshot.instances;
        let now = Instant::now();
        let spread_to = self.balancer.update_spreading(&snapshot.instances, now);
        if self.config.spread && self.conn.is_some() && spread_to.is_some() {
            self.move_to = spread_to;
        }
        self.snapshot = snapshot;
        if news {
            // Try at once: a new instance may work.
            self.retry_at = None;
            if !self.connecting.is_empty() {
                self.race_at = Some(now);
            }
        }
        let leave = match &self.conn {
            Some(c) => {
                !self.balancer.contains(&c.instance)
                    && self.balancer.has_alternative(&c.instance, now)
            }
            None => false,
        };
        if let Some(standby) = &self.standby
            && !self.balancer.contains(&standby.conn.instance)
        {
            tracing::debug!(
                instance = %standby.conn.instance,
                "Consul no longer lists the standby's instance as passing; replacing it"
            );
            self.drop_standby();
        }
        if news {
            self.standby_retry_at = None;
        }
        if leave && let Some(conn) = self.conn.take() {
            tracing::info!(
                instance = %conn.instance,
                resend = conn.written,
                "Consul no longer lists the instance as passing; moving to another one"
            );
            self.unwrite();
        }
    }

    /// Answer, with a timeout error, messages past their deadline. One not written yet is
    /// dropped; one written stays queued, answered, so that its reply is read and discarded.
    fn expire(&mut self, now: Instant) {
        if self.first_deadline().is_none_or(|d| d > now) {
            return;
        }
        let error = Error::Timeout {
            service: self.config.service.clone(),
            waited: self.config.message_timeout,
            last: self.why_unanswered(),
        };
        for p in self.pending.iter_mut().filter(|p| p.deadline <= now) {
            if let Some(reply) = p.reply.take() {
                let _ = reply.send(Err(error.clone()));
            }
        }
        self.pending
            .retain(|p| p.reply.is_some() || p.written_at.is_some());
    }

    fn why_unanswered(&self) -> String {
        let listed = self.snapshot.describe(&self.config.service);
        match &self.last_failure {
            Some(f) => format!("{listed}; last failure: {f}"),
            None => listed,
        }
    }

    /// Spreading a scale-out: leave the connection for the chosen new instance once nothing
    /// on it is un-answered (so nothing is resent); the next message connects there.
    fn check_move(&mut self) {
        let Some(target) = &self.move_to else {
            return;
        };
        let Some(conn) = &self.conn else {
            return;
        };
        if conn.written > 0 || !conn.out.is_empty() {
            return;
        }
        if conn.instance.address() == target.address() || !self.balancer.contains(target) {
            self.move_to = None;
            return;
        }
        tracing::info!(
            from = %conn.instance,
            to = %target,
            "new instances listed; moving to one of them to spread the load"
        );
        self.conn = None;
    }

    /// Start a connect to a usable instance not tried in this round; with none (and none in
    /// flight), schedule the next round after the backoff.
    fn connect_more(&mut self, now: Instant) {
        if self.conn.is_some() || self.connecting.len() >= MAX_CONNECTS {
            return;
        }
        let except: Vec<String> = self
            .connecting_to
            .iter()
            .map(Instance::address)
            .chain(self.failed_round.iter().cloned())
            .collect();
        let preferred = self.move_to.take().and_then(|target| {
            let others: Vec<String> = self
                .balancer
                .instances()
                .iter()
                .map(|i| i.address())
                .filter(|a| *a != target.address())
                .chain(except.iter().cloned())
                .collect();
            self.balancer.pick_except(now, &others)
        });
        let Some(instance) = preferred.or_else(|| self.balancer.pick_except(now, &except)) else {
            if self.connecting.is_empty() {
                let delay = self.backoff.next_delay();
                let unejected = self.balancer.next_unejection(now).unwrap_or(now);
                let at = (now + delay).max(unejected);
                tracing::debug!(
                    service = %self.config.service,
                    waiting = self.pending.len(),
                    retry_in = ?(at - now),
                    "no usable instance: {}", self.why_unanswered()
                );
                self.retry_at = Some(at);
                self.failed_round.clear();
            }
            self.race_at = None;
            return;
        };
        self.retry_at = None;
        let timeout = self.config.connect_timeout;
        self.race_at = Some(now + RACE_DELAY.min(timeout / 2));
        self.connecting_to.push(instance.clone());
        self.connecting.push(connect(instance, timeout));
    }

    // === the standby ===

    /// With a current connection and no standby, open one to the balancer's next choice
    /// among the other instances; drop a standby that is late with its probe's echo or on
    /// the current connection's instance.
    fn check_standby(&mut self, now: Instant) {
        if let Some(standby) = &self.standby {
            let same = self
                .conn
                .as_ref()
                .is_some_and(|c| c.instance.address() == standby.conn.instance.address());
            if same {
                self.drop_standby();
            } else if !standby.verified && standby.probe_deadline <= now {
                let instance = standby.conn.instance.clone();
                self.standby = None;
                let cooldown = self.balancer.eject(&instance, now);
                tracing::warn!(
                    %instance,
                    ?cooldown,
                    "the standby's probe was not echoed within the reply timeout; ejected"
                );
                self.standby_retry_at = Some(now + STANDBY_RETRY);
            }
        }
        if !self.config.standby
            || self.standby.is_some()
            || !self.standby_connecting.is_empty()
            || self.standby_retry_at.is_some_and(|t| t > now)
        {
            return;
        }
        let Some(current) = &self.conn else {
            return;
        };
        let except: Vec<String> = [current.instance.address()]
            .into_iter()
            .chain(self.connecting_to.iter().map(Instance::address))
            .chain(self.failed_round.iter().cloned())
            .collect();
        let Some(instance) = self.balancer.pick_except(now, &except) else {
            // One instance only, or none usable: look again later or at the next change.
            self.standby_retry_at = Some(now + STANDBY_RETRY);
            return;
        };
        self.standby_retry_at = None;
        self.standby_connecting
            .push(connect(instance, self.config.connect_timeout));
    }

    fn on_standby_connected(
        &mut self,
        instance: Instance,
        result: std::result::Result<TcpStream, String>,
    ) {
        let now = Instant::now();
        match result {
            Ok(stream) => {
                let mut conn = self.new_conn(instance, stream);
                conn.out.put_slice(STANDBY_PROBE);
                conn.out.put_u8(b'\n');
                self.standby = Some(Standby {
                    conn,
                    verified: false,
                    probe_deadline: now + self.config.reply_timeout,
                });
            }
            Err(reason) => {
                let cooldown = self.balancer.eject(&instance, now);
                tracing::warn!(%instance, ?cooldown, "standby: {reason}; ejected");
                self.standby_retry_at = Some(now + STANDBY_RETRY);
            }
        }
    }

    fn on_standby_frame(&mut self, frame: &[u8]) {
        match &mut self.standby {
            Some(standby) if !standby.verified && frame == STANDBY_PROBE => {
                standby.verified = true;
                tracing::debug!(instance = %standby.conn.instance, "standby connection ready");
            }
            _ => self.standby_lost("a frame it was not sent"),
        }
    }

    /// The standby closed or misbehaved: drop it; the next one waits [`STANDBY_RETRY`] (a
    /// server at its connection cap sheds an idle connection: no reconnect at once).
    fn standby_lost(&mut self, reason: &str) {
        if let Some(standby) = self.standby.take() {
            tracing::debug!(instance = %standby.conn.instance, "standby connection lost ({reason})");
            self.standby_retry_at = Some(Instant::now() + STANDBY_RETRY);
        }
    }

    fn drop_standby(&mut self) {
        self.standby = None;
        self.standby_connecting = FuturesUnordered::new();
    }

    /// No current connection and messages to write: the verified standby becomes the
    /// current connection (unless spreading wants another instance), so that they are
    /// written on it at once.
    fn promote_standby(&mut self) {
        let usable = self.standby.as_ref().is_some_and(|s| {
            s.verified
                && self.balancer.contains(&s.conn.instance)
                && self
                    .move_to
                    .as_ref()
                    .is_none_or(|t| t.address() == s.conn.instance.address())
        });
        if !usable {
            return;
        }
        let Some(standby) = self.standby.take() else {
            return;
        };
        tracing::info!(
            instance = %standby.conn.instance,
            resend = self.pending.len(),
            "writing on the standby connection"
        );
        self.move_to = None;
        self.stop_connecting();
        self.retry_at = None;
        self.conn = Some(standby.conn);
    }

    fn new_conn(&self, instance: Instance, stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        Conn {
            reader: FramedRead::new(read, ReplyCodec::new(self.config.max_frame)),
            writer: write,
            out: BytesMut::new(),
            instance,
            written: 0,
            unanswered_bytes: 0,
            last_reply: None,
        }
    }

    fn stop_connecting(&mut self) {
        self.connecting = FuturesUnordered::new();
        self.connecting_to.clear();
        self.race_at = None;
    }

    fn on_connected(&mut self, instance: Instance, result: std::result::Result<TcpStream, String>) {
        self.connecting_to.retain(|i| *i != instance);
        let now = Instant::now();
        match result {
            Ok(stream) if self.conn.is_none() => {
                tracing::info!(instance = %instance, "connected");
                self.conn = Some(self.new_conn(instance, stream));
                // The others lose the race.
                self.stop_connecting();
            }
            Ok(_) => {}
            Err(reason) => {
                let cooldown = self.balancer.eject(&instance, now);
                tracing::warn!(
                    instance = %instance,
                    ?cooldown,
                    "{reason}; ejected, trying another instance"
                );
                self.last_failure = Some(format!("{instance}: {reason}"));
                self.failed_round.push(instance.address());
                if self.conn.is_none() && !self.pending.is_empty() {
                    self.connect_more(now);
                }
            }
        }
    }

    /// Encode the messages not yet written on the connection, up to the un-answered cap.
    fn fill(&mut self, now: Instant) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        for p in self.pending.iter_mut().skip(conn.written) {
            let size = p.bytes.len() + 1;
            if conn.unanswered_bytes > 0 && conn.unanswered_bytes + size > MAX_UNANSWERED_BYTES {
                break;
            }
            conn.out.reserve(size);
            conn.out.put_slice(&p.bytes);
            conn.out.put_u8(b'\n');
            p.written_at = Some(now);
            p.attempts += 1;
            conn.written += 1;
            conn.unanswered_bytes += size;
        }
    }

    /// A connection with nothing un-answered may have been closed by the server meanwhile
    /// (its idle timeout): find out before writing on it, and drop it quietly.
    fn check_idle_close(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.written > 0 || self.pending.is_empty() {
            return;
        }
        match conn.reader.next().now_or_never() {
            None => {}
            Some(Some(Ok(frame))) => self.on_reply(frame),
            Some(Some(Err(e))) => self.conn_ended(&e.to_string()),
            Some(None) => self.conn_ended("connection closed by the instance"),
        }
    }

    fn on_reply(&mut self, frame: Bytes) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.written == 0 {
            self.fail_conn("a reply to no message");
            return;
        }
        let Some(p) = self.pending.pop_front() else {
            return;
        };
        conn.written -= 1;
        conn.unanswered_bytes = conn.unanswered_bytes.saturating_sub(p.bytes.len() + 1);
        let now = Instant::now();
        conn.last_reply = Some(now);
        let rtt = now - p.written_at.unwrap_or(now);
        let instance = conn.instance.clone();
        self.balancer.succeeded(&instance, rtt);
        self.backoff.reset();
        self.failed_round.clear();
        let outcome = if frame == p.bytes {
            Ok(Reply {
                bytes: frame,
                instance,
                rtt,
                latency: now - p.sent_at,
                attempts: p.attempts,
            })
        } else if frame.starts_with(FRAME_LIMIT_LINE) {
            let line = String::from_utf8_lossy(&frame).into_owned();
            if self.frame_limit_reported.insert(instance.address()) {
                tracing::error!(
                    instance = %instance,
                    client_max_frame = self.config.max_frame,
                    "the instance refuses frames this client may send ({line}); such messages \
                     are answered with an error"
                );
            }
            // The server closes after that line: leave without ejecting it; the messages
            // after this one are written again on a new connection.
            self.drop_conn();
            Err(Error::FrameTooLong {
                instance: instance.to_string(),
                sent: p.bytes.len(),
                line,
            })
        } else {
            Err(Error::NotAnEcho {
                instance: instance.to_string(),
                sent: p.bytes.len(),
                got: frame
                    .slice(..frame.len().min(64))
                    .escape_ascii()
                    .to_string(),
            })
        };
        if let Some(reply) = p.reply {
            let _ = reply.send(outcome);
        }
    }

    /// The connection ended (closed, reset, bad frame): a failure of the instance if messages
    /// were un-answered on it, otherwise (an idle timeout, say) just the end of it.
    fn conn_ended(&mut self, reason: &str) {
        match &self.conn {
            Some(c) if c.written == 0 => {
                tracing::debug!(instance = %c.instance, "idle connection ended ({reason})");
                self.drop_conn();
            }
            _ => self.fail_conn(reason),
        }
    }

    /// Leave the connection without blaming the instance.
    fn drop_conn(&mut self) {
        if self.conn.take().is_some() {
            self.unwrite();
            self.retry_at = None;
        }
    }

    /// The current instance failed: eject it and make every un-answered message unwritten.
    fn fail_conn(&mut self, reason: &str) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let cooldown = self.balancer.eject(&conn.instance, Instant::now());
        tracing::warn!(
            instance = %conn.instance,
            ?cooldown,
            resend = conn.written,
            "instance failed ({reason}); ejected, resending un-answered messages elsewhere"
        );
        self.last_failure = Some(format!("{}: {reason}", conn.instance));
        self.failed_round.push(conn.instance.address());
        self.unwrite();
        self.retry_at = None;
    }

    /// Every message is to be written again; those answered already (past their deadline)
    /// are dropped.
    fn unwrite(&mut self) {
        self.pending.retain(|p| p.reply.is_some());
        for p in &mut self.pending {
            p.written_at = None;
        }
    }
}

async fn read_frame(
    reader: Option<&mut FramedRead<OwnedReadHalf, ReplyCodec>>,
) -> Option<std::result::Result<Bytes, CodecError>> {
    match reader {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

/// Hand encoded bytes to the socket; pending while there are none.
async fn write_some(writer: Option<(&mut OwnedWriteHalf, &mut BytesMut)>) -> io::Result<usize> {
    match writer {
        Some((w, out)) if !out.is_empty() => w.write_buf(out).await,
        _ => std::future::pending().await,
    }
}

/// Connect to `instance` within `timeout`.
fn connect(instance: Instance, timeout: Duration) -> Connecting {
    Box::pin(async move {
        let address = instance.address();
        let attempt = tokio::time::timeout(
            timeout,
            TcpStream::connect((instance.host.as_str(), instance.port)),
        )
        .await;
        let result = match attempt {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(format!("connect to {address}: {e}")),
            Err(_) => Err(format!(
                "connect to {address}: no answer within {timeout:?}"
            )),
        };
        (instance, result)
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
