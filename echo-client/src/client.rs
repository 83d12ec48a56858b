//! The client handle the CLI, the testbed and the benches use: [`EchoClient::send`] a message,
//! get its [`Reply`] and the instance that served it; [`EchoClient::discovery`] follows what
//! discovery publishes, with timestamps. Cheap to clone; the tasks behind it end when the last
//! clone is dropped.

use std::{fmt::Write as _, time::Duration};

use bytes::Bytes;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{
    discovery::{self, DiscoveryConfig, Instance, Snapshot},
    error::{Error, Result},
    session::{self, Request, SessionConfig},
};

/// Everything an [`EchoClient`] is built from.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where Consul is, and the token.
    pub consul: consul_api::Config,
    /// What to discover (service, tag, datacenter).
    pub discovery: DiscoveryConfig,
    /// How to talk to instances (timeouts, cooldown, queue).
    pub session: SessionConfig,
    /// Datacenters to fail over to, in order, when the own one lists no passing instance
    /// (through the local agent; see [`consul_registry::failover`]).
    pub failover: Vec<String>,
}

impl ClientConfig {
    /// Discover `service` through the agent `consul` designates, with default settings.
    pub fn new(consul: consul_api::Config, service: impl Into<String>) -> Self {
        let service = service.into();
        ClientConfig {
            consul,
            discovery: DiscoveryConfig::new(service.clone()),
            session: SessionConfig::new(service),
            failover: Vec::new(),
        }
    }

    /// Only instances carrying `tag`.
    pub fn with_tag(mut self, tag: Option<String>) -> Self {
        self.discovery.tag = tag;
        self
    }

    /// Read with `consistency`; with `max_stale`, answers older than that are not applied.
    pub fn with_consistency(
        mut self,
        consistency: consul_api::Consistency,
        max_stale: Option<Duration>,
    ) -> Self {
        self.discovery.consistency = consistency;
        self.discovery.max_stale = max_stale;
        self
    }

    /// Ask datacenter `dc` instead of the agent's own.
    pub fn with_datacenter(mut self, dc: Option<String>) -> Self {
        self.discovery.datacenter = dc;
        self
    }

    /// Fail over to these datacenters, in order, when the own one lists no passing instance.
    pub fn with_failover(mut self, datacenters: Vec<String>) -> Self {
        self.failover = datacenters;
        self
    }
}

/// The answer to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The bytes the instance sent back (without the newline).
    pub bytes: Bytes,
    /// The instance that answered.
    pub instance: Instance,
    /// From the write that got answered to the reply.
    pub rtt: Duration,
    /// From [`EchoClient::send`] to the reply, failovers included.
    pub latency: Duration,
    /// How many times the message was written (1 unless it was resent after a failure).
    pub attempts: u32,
}

impl Reply {
    /// One stable, parseable line:
    /// `reply seq=3 instance=servernode_1 addr=127.0.0.1:9527 rtt_ms=0.213 latency_ms=0.250
    /// attempts=1 bytes="hello world, 003"` (bytes escaped like Rust's `escape_ascii`).
    pub fn line(&self, seq: u64) -> String {
        let mut line = format!(
            "reply seq={seq} instance={} addr={} rtt_ms={:.3} latency_ms={:.3} attempts={} bytes=\"",
            self.instance.id,
            self.instance.address(),
            self.rtt.as_secs_f64() * 1e3,
            self.latency.as_secs_f64() * 1e3,
            self.attempts,
        );
        let _ = write!(line, "{}\"", self.bytes.escape_ascii());
        line
    }
}

/// A handle to a discovering, failing-over echo client.
#[derive(Debug, Clone)]
pub struct EchoClient {
    requests: mpsc::Sender<Request>,
    discovery: watch::Receiver<Snapshot>,
    max_frame: usize,
}

impl EchoClient {
    /// Start discovery (Consul blocking queries) and a session. Must be called within a tokio
    /// runtime. Fails only on settings that cannot work; whether Consul answers is found out
    /// by discovery, which keeps trying.
    pub fn start(config: ClientConfig) -> Result<EchoClient> {
        config.session.validate()?;
        if config.discovery.service.trim().is_empty() {
            return Err(Error::Config("the service name is empty".into()));
        }
        let consul = consul_api::Client::new(config.consul)?;
        let rx = if config.failover.is_empty() {
            discovery::spawn(consul, config.discovery)
        } else {
            consul_registry::failover::spawn(consul, config.discovery, &config.failover)
        };
        EchoClient::with_discovery(rx, config.session)
    }

    /// A session over any source of snapshots (a fixed set, or a discovery someone else
    /// runs). Must be called within a tokio runtime.
    pub fn with_discovery(
        discovery: watch::Receiver<Snapshot>,
        config: SessionConfig,
    ) -> Result<EchoClient> {
        config.validate()?;
        let max_frame = config.max_frame;
        let requests = session::spawn(discovery.clone(), config);
        Ok(EchoClient {
            requests,
            discovery,
            max_frame,
        })
    }

    /// Send one message (any bytes but a newline) and wait for its reply. Messages sent
    /// concurrently through clones of this handle are answered in the order they were queued.
    pub async fn send(&self, message: impl Into<Bytes>) -> Result<Reply> {
        let bytes = message.into();
        if bytes.contains(&b'\n') {
            return Err(Error::InvalidMessage(
                "a message cannot contain a newline byte (the wire format is one line per message)"
                    .into(),
            ));
        }
        if bytes.len() > self.max_frame {
            return Err(Error::InvalidMessage(format!(
                "{} bytes exceed the largest frame, {} bytes",
                bytes.len(),
                self.max_frame
            )));
        }
        let (reply, answer) = oneshot::channel();
        let request = Request {
            bytes,
            reply,
            sent_at: Instant::now(),
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// What discovery publishes: the passing instances, Consul's state and timestamps. Await
    /// `changed()` on it to see each change as it comes.
    pub fn discovery(&self) -> watch::Receiver<Snapshot> {
        self.discovery.clone()
    }
}
