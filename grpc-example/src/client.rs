//! A tonic client balancing over a service's passing instances: discovery's snapshots become
//! tower `Change`s ([`consul_registry::tower_discover`]), one lazily connected tonic
//! `Channel` per instance, weighed by calls in flight and chosen by tower's
//! power-of-two-choices `Balance`, behind a `Buffer` so that the client is a cheap clone.
//!
//! A call that fails with a transport-level status (`UNAVAILABLE`, `UNKNOWN` from a reset
//! connection, `CANCELLED`) is sent again, on a new pick, until its deadline; the `Balance`
//! keeps a dead instance until Consul stops listing it, so every call it is picked for
//! fails once and is retried.

use std::time::Duration;

use consul_registry::{Instance, Snapshot, tower_discover};
use tokio::{sync::watch, time::Instant};
use tonic::{
    Code, Status,
    body::Body,
    codegen::http,
    transport::{Channel, Endpoint},
};
use tower::{
    balance::p2c::Balance,
    buffer::Buffer,
    load::{CompleteOnResponse, PendingRequestsDiscover},
};

use crate::hello::{HelloReply, HelloRequest, SAY_HELLO};

type Stack = Buffer<http::Request<Body>, <Balanced as tower::Service<http::Request<Body>>>::Future>;
type Balanced = Balance<
    PendingRequestsDiscover<
        std::pin::Pin<
            Box<
                dyn futures::Stream<
                        Item = Result<
                            tower::discover::Change<Instance, Channel>,
                            consul_registry::Error,
                        >,
                    > + Send,
            >,
        >,
        CompleteOnResponse,
    >,
    http::Request<Body>,
>;

/// The outcome of one [`Greeter::say_hello`]: the reply, and the attempts that failed before
/// it (each with the moment it failed).
#[derive(Debug)]
pub struct Answered {
    /// The reply.
    pub reply: HelloReply,
    /// When each failed attempt failed, and why.
    pub failed: Vec<(Instant, Status)>,
}

/// A call that got no reply before its deadline.
#[derive(Debug, thiserror::Error)]
#[error("no reply before the deadline after {} attempt(s); last: {last}", failed.len())]
pub struct Lost {
    /// When each attempt failed, and why.
    pub failed: Vec<(Instant, Status)>,
    /// The last attempt's status.
    pub last: Status,
}

/// `hello.Greeter`'s client over every passing instance discovery lists. Clone it freely.
#[derive(Debug, Clone)]
pub struct Greeter {
    grpc: tonic::client::Grpc<Stack>,
    /// The pause between a failed attempt and the next.
    pub retry_pause: Duration,
}

impl Greeter {
    /// A client over the instances `snapshots` lists (from [`consul_registry::discovery::spawn`]).
    /// Must be called within a tokio runtime (the buffer's worker is spawned).
    pub fn new(snapshots: watch::Receiver<Snapshot>) -> Greeter {
        let changes = tower_discover::changes(snapshots, |instance: &Instance| {
            // An instance's address is `ip:port` (or `[ip]:port`): always a valid authority.
            Endpoint::from_shared(format!("http://{}", instance.address()))
                .map(|e| e.connect_timeout(Duration::from_secs(1)).connect_lazy())
                .unwrap_or_else(|_| Endpoint::from_static("http://0.0.0.0:1").connect_lazy())
        });
        let changes: std::pin::Pin<Box<dyn futures::Stream<Item = _> + Send>> = Box::pin(changes);
        let balance = Balance::new(PendingRequestsDiscover::new(
            changes,
            CompleteOnResponse::default(),
        ));
        Greeter {
            grpc: tonic::client::Grpc::new(Buffer::new(balance, 64)),
            retry_pause: Duration::from_millis(5),
        }
    }

    /// `SayHello(name)`, sent again on a transport failure until `deadline`.
    pub async fn say_hello(&self, name: &str, deadline: Instant) -> Result<Answered, Lost> {
        let mut failed = Vec::new();
        loop {
            let status = match self.once(name, deadline).await {
                Ok(reply) => return Ok(Answered { reply, failed }),
                Err(status) => status,
            };
            let now = Instant::now();
            if !retryable(&status) || now + self.retry_pause >= deadline {
                return Err(Lost {
                    failed,
                    last: status,
                });
            }
            failed.push((now, status));
            tokio::time::sleep(self.retry_pause).await;
        }
    }

    async fn once(&self, name: &str, deadline: Instant) -> Result<HelloReply, Status> {
        let mut grpc = self.grpc.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, grpc.ready())
            .await
            .map_err(|_| Status::deadline_exceeded("no instance ready before the deadline"))?
            .map_err(|e| Status::unavailable(format!("no instance: {}", chain(&*e))))?;
        let mut request = tonic::Request::new(HelloRequest { name: name.into() });
        request.set_timeout(left);
        let path = http::uri::PathAndQuery::from_static(SAY_HELLO);
        let reply = grpc
            .unary(request, path, tonic_prost::ProstCodec::default())
            .await?;
        Ok(reply.into_inner())
    }
}

/// Whether a failed call may be sent again: the call never reached a handler (refused,
/// reset, cancelled by a closing connection). `SayHello` is idempotent, so a reply lost
/// on the way back is safe to ask for again too.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// An error and its sources, `: `-separated.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transport_failures_are_retried() {
        assert!(retryable(&Status::unavailable("connection refused")));
        assert!(retryable(&Status::unknown("connection reset")));
        assert!(retryable(&Status::cancelled("GOAWAY")));
        assert!(!retryable(&Status::invalid_argument("bad name")));
        assert!(!retryable(&Status::unimplemented("no method")));
        assert!(!retryable(&Status::deadline_exceeded("late")));
    }
}
