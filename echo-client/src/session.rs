//! The session: one task that owns the connection to the current instance and the queue of
//! un-answered messages, so that every message gets exactly one answer, in order.
//!
//! * Messages are written in order on the current connection (pipelined) and matched with
//!   replies first-in first-out; a reply is handed to its caller once, when it arrives.
//! * On a connect error, a reset, a close, a partial frame or a reply timeout, the instance is
//!   ejected in the [`Balancer`] for a cooldown and every un-answered message is written again,
//!   in order, on another passing instance at once.
//! * With no usable instance, messages stay queued; the session waits for discovery to change
//!   or for a jittered backoff to expire (never a busy loop). A message still un-answered at
//!   its deadline is answered with [`Error::Timeout`].
//! * It stays on a working connection, and leaves it only when Consul stops listing the
//!   instance while another one is passing: an empty passing set is "no better choice", not a
//!   reason to drop a connection that works (Consul restarting, say).
//! * A permanent discovery failure (a refused token) answers every message with it.

use std::{collections::VecDeque, io, time::Duration};

use bytes::{Bytes, BytesMut};
use echo_wire::{CodecError, DEFAULT_MAX_FRAME, EchoCodec};
use futures::{SinkExt, StreamExt};
use tokio::{
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::codec::{Decoder, FramedRead, FramedWrite};

use crate::{
    backoff::Backoff,
    balancer::{Balancer, Strategy},
    client::Reply,
    discovery::{Instance, Snapshot},
    error::{Error, Result},
};

/// How a session behaves.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The service's name, for messages.
    pub service: String,
    /// How to choose among passing instances.
    pub strategy: Strategy,
    /// Deadline to establish a TCP connection.
    pub connect_timeout: Duration,
    /// Deadline for the reply to the oldest message written on a connection; past it the
    /// instance is treated as failed.
    pub reply_timeout: Duration,
    /// Deadline for a message to be answered by any instance, from the moment it was sent.
    pub message_timeout: Duration,
    /// First ejection cooldown of a failed instance (doubling per consecutive failure).
    pub cooldown: Duration,
    /// Most messages queued un-answered; senders wait beyond it.
    pub queue_capacity: usize,
    /// Largest message and reply, in bytes.
    pub max_frame: usize,
}

impl SessionConfig {
    /// Defaults: round-robin, connect 1 s, reply 2 s, message 30 s, cooldown 2 s, 1024 queued.
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
    reply: oneshot::Sender<Result<Reply>>,
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
    writer: FramedWrite<OwnedWriteHalf, EchoCodec>,
    /// How many messages at the front of the queue are written on it, un-answered.
    written: usize,
}

#[derive(Debug)]
enum Event {
    Request(Option<Request>),
    Frame(Option<std::result::Result<Bytes, CodecError>>),
    Discovery(bool),
    ReplyTimeout,
    Tick,
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
    retry_at: Option<Instant>,
    failed: Option<Error>,
    last_failure: Option<String>,
}

impl Session {
    fn new(
        requests: mpsc::Receiver<Request>,
        discovery: watch::Receiver<Snapshot>,
        config: SessionConfig,
    ) -> Self {
        let balancer = Balancer::new(config.strategy, config.cooldown);
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
            retry_at: None,
            failed: None,
            last_failure: None,
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
            self.expire(Instant::now());
            if let Some(error) = self.failed.clone() {
                self.conn = None;
                for p in self.pending.drain(..) {
                    let _ = p.reply.send(Err(error.clone()));
                }
            } else {
                // Callers that gave up need no write.
                self.pending
                    .retain(|p| p.written_at.is_some() || !p.reply.is_closed());
                let retry_due = self.retry_at.is_none_or(|t| t <= Instant::now());
                if self.conn.is_none() && !self.pending.is_empty() && retry_due {
                    self.connect().await;
                }
                if self.conn.is_some() && !self.write().await {
                    continue; // the connection failed: reconnect at once
                }
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
                reply: r.reply,
                sent_at: r.sent_at,
                written_at: None,
                attempts: 0,
            }),
            Event::Frame(Some(Ok(frame))) => self.on_reply(frame),
            Event::Frame(Some(Err(e))) => self.fail_conn(&e.to_string()),
            Event::Frame(None) => self.fail_conn("connection closed by the instance"),
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
            Event::Tick => self.retry_at = None,
        }
    }

    async fn next_event(&mut self) -> Event {
        let reply_deadline = match &self.conn {
            Some(c) if c.written > 0 => self
                .pending
                .front()
                .and_then(|p| p.written_at)
                .map(|t| t + self.config.reply_timeout),
            _ => None,
        };
        let retry_at = if self.conn.is_none() && !self.pending.is_empty() {
            self.retry_at
        } else {
            None
        };
        let message_deadline = self.pending.front().map(|p| p.deadline);
        let wake_at = [retry_at, message_deadline].into_iter().flatten().min();
        let accept = self.requests_open && self.pending.len() < self.config.queue_capacity;
        tokio::select! {
            biased;
            frame = read_frame(&mut self.conn) => Event::Frame(frame),
            changed = self.discovery.changed(), if self.discovery_open => {
                Event::Discovery(changed.is_ok())
            }
            () = sleep_until(reply_deadline) => Event::ReplyTimeout,
            () = sleep_until(wake_at) => Event::Tick,
            request = self.requests.recv(), if accept => Event::Request(request),
        }
    }

    /// Take in a new snapshot from discovery.
    fn apply(&mut self, snapshot: Snapshot) {
        if let Some(error) = snapshot.failure() {
            self.failed = Some(Error::Discovery {
                service: self.config.service.clone(),
                reason: error.to_owned(),
            });
        }
        self.balancer.update(&snapshot.instances);
        self.snapshot = snapshot;
        self.retry_at = None; // news: try at once
        let now = Instant::now();
        let leave = match &self.conn {
            Some(c) => {
                !self.balancer.contains(&c.instance)
                    && self.balancer.has_alternative(&c.instance, now)
            }
            None => false,
        };
        if leave && let Some(conn) = self.conn.take() {
            tracing::info!(
                instance = %conn.instance,
                resend = conn.written,
                "Consul no longer lists the instance as passing; moving to another one"
            );
            self.unwrite();
        }
    }

    /// Answer, with a timeout error, messages past their deadline.
    fn expire(&mut self, now: Instant) {
        while self.pending.front().is_some_and(|p| p.deadline <= now) {
            if self.conn.as_ref().is_some_and(|c| c.written > 0) {
                // Its reply may still come on this connection: it must not answer the next
                // message. Drop the connection (and resend the rest elsewhere).
                self.fail_conn("a message passed its deadline on this connection");
            }
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let _ = p.reply.send(Err(Error::Timeout {
                service: self.config.service.clone(),
                waited: self.config.message_timeout,
                last: self.why_unanswered(),
            }));
        }
    }

    fn why_unanswered(&self) -> String {
        let listed = self.snapshot.describe(&self.config.service);
        match &self.last_failure {
            Some(f) => format!("{listed}; last failure: {f}"),
            None => listed,
        }
    }

    /// Connect to a usable instance, trying each in turn; with none, schedule a retry.
    async fn connect(&mut self) {
        loop {
            let now = Instant::now();
            let Some(instance) = self.balancer.pick(now) else {
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
                return;
            };
            let address = instance.address();
            let attempt = tokio::time::timeout(
                self.config.connect_timeout,
                TcpStream::connect((instance.host.as_str(), instance.port)),
            )
            .await;
            let reason = match attempt {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let (read, write) = stream.into_split();
                    tracing::info!(instance = %instance, "connected");
                    self.conn = Some(Conn {
                        reader: FramedRead::new(read, ReplyCodec::new(self.config.max_frame)),
                        writer: FramedWrite::new(write, EchoCodec::new(self.config.max_frame)),
                        instance,
                        written: 0,
                    });
                    return;
                }
                Ok(Err(e)) => format!("connect to {address}: {e}"),
                Err(_) => format!(
                    "connect to {address}: no answer within {:?}",
                    self.config.connect_timeout
                ),
            };
            let cooldown = self.balancer.eject(&instance, now);
            tracing::warn!(
                instance = %instance,
                ?cooldown,
                "{reason}; ejected, trying another instance"
            );
            self.last_failure = Some(format!("{}: {reason}", instance.id));
        }
    }

    /// Write the messages not yet written on the connection. False if the connection failed.
    async fn write(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        if conn.written == self.pending.len() {
            return true;
        }
        let now = Instant::now();
        let start = conn.written;
        let pending = &self.pending;
        let result = tokio::time::timeout(self.config.reply_timeout, async {
            for p in pending.iter().skip(start) {
                conn.writer.feed(p.bytes.clone()).await?;
            }
            SinkExt::<Bytes>::flush(&mut conn.writer).await
        })
        .await;
        match result {
            Ok(Ok(())) => {
                for p in self.pending.iter_mut().skip(start) {
                    p.written_at = Some(now);
                    p.attempts += 1;
                }
                conn.written = self.pending.len();
                true
            }
            Ok(Err(e)) => {
                self.fail_conn(&format!("write: {e}"));
                false
            }
            Err(_) => {
                let timeout = self.config.reply_timeout;
                self.fail_conn(&format!("write blocked for {timeout:?}"));
                false
            }
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
        let now = Instant::now();
        let rtt = now - p.written_at.unwrap_or(now);
        self.balancer.succeeded(&conn.instance, rtt);
        self.backoff.reset();
        let _ = p.reply.send(Ok(Reply {
            bytes: frame,
            instance: conn.instance.clone(),
            rtt,
            latency: now - p.sent_at,
            attempts: p.attempts,
        }));
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
        self.last_failure = Some(format!("{}: {reason}", conn.instance.id));
        self.unwrite();
        self.retry_at = None;
    }

    fn unwrite(&mut self) {
        for p in &mut self.pending {
            p.written_at = None;
        }
    }
}

async fn read_frame(conn: &mut Option<Conn>) -> Option<std::result::Result<Bytes, CodecError>> {
    match conn {
        Some(c) => c.reader.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// [`EchoCodec`] for replies, except that a connection closed in the middle of a frame is an
/// error: the partial bytes are not a reply (`EchoCodec` at end of input yields them).
#[derive(Debug)]
struct ReplyCodec(EchoCodec);

impl ReplyCodec {
    fn new(max_frame: usize) -> Self {
        ReplyCodec(EchoCodec::new(max_frame))
    }
}

impl Decoder for ReplyCodec {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> std::result::Result<Option<Bytes>, CodecError> {
        self.0.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> std::result::Result<Option<Bytes>, CodecError> {
        match self.0.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {} bytes of a reply", src.len()),
            ))),
        }
    }
}
