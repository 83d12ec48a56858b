//! A tonic client balancing over a service's passing instances through the registry's tower
//! stack ([`consul_registry::tower_stack::Balanced`]): a [`Pool`] fed by discovery picks an
//! instance (power of two choices), one lazily connected tonic `Channel` per address carries
//! the call, and a call that fails at the transport holds its instance out at once (passive
//! ejection), so a SIGKILLed instance costs about one failed attempt, not one per call until
//! Consul's check turns critical.
//!
//! A request's body is a stream that cannot be cloned, so the stack does not resend it: a
//! call that failed with a transport-level status is sent again by [`Greeter::say_hello`]
//! from the message, on a new pick, until its deadline.

use std::time::Duration;

use consul_api::Client;
use consul_registry::{DiscoveryConfig, Instance, Pool, PoolConfig, tower_stack::Balanced};
use tokio::time::Instant;
use tonic::{
    Code, Status,
    body::Body,
    codegen::http,
    transport::{Channel, Endpoint},
};

use crate::hello::{HelloReply, HelloRequest, SAY_HELLO};

type Stack = Balanced<http::Request<Body>, Channel, fn(&Instance) -> Channel>;

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
#[error("no reply before the deadline after {} attempt(s); last: {last}", failed.len() + 1)]
pub struct Lost {
    /// When each earlier attempt failed, and why.
    pub failed: Vec<(Instant, Status)>,
    /// The last attempt's status.
    pub last: Status,
}

/// `hello.Greeter`'s client over every passing instance of a service. Clone it freely.
#[derive(Debug, Clone)]
pub struct Greeter {
    grpc: tonic::client::Grpc<Stack>,
    /// The pause between a failed attempt and the next.
    pub retry_pause: Duration,
}

impl Greeter {
    /// A client over `service`'s passing instances, discovered through `consul`. Must be
    /// called within a tokio runtime (discovery is spawned).
    pub fn discover(consul: Client, service: &str) -> Greeter {
        let pool = Pool::discover(consul, DiscoveryConfig::new(service), PoolConfig::default());
        Greeter::over(pool)
    }

    /// A client over `pool`'s instances.
    pub fn over(pool: Pool) -> Greeter {
        let stack: Stack = Balanced::new(pool, channel_to);
        Greeter {
            grpc: tonic::client::Grpc::new(stack),
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
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let mut request = tonic::Request::new(HelloRequest { name: name.into() });
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        let path = http::uri::PathAndQuery::from_static(SAY_HELLO);
        let reply = grpc
            .unary(request, path, tonic_prost::ProstCodec::default())
            .await?;
        Ok(reply.into_inner())
    }
}

/// The channel to one instance: connected on first use, reconnected after a failure.
fn channel_to(instance: &Instance) -> Channel {
    // `ip:port` or `[ip]:port`, as discovery writes an address: always a valid authority.
    let uri = http::Uri::try_from(format!("http://{}", instance.address()))
        .unwrap_or_else(|_| http::Uri::from_static("http://invalid.invalid"));
    Endpoint::from(uri)
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

/// Whether a failed call may be sent again: the call never reached a handler (refused,
/// reset, cancelled by a closing connection, no instance yet). `SayHello` is idempotent, so
/// a reply lost on the way back is safe to ask for again too.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
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
