//! The service's whole life: serve `hello.Greeter` and `grpc.health.v1.Health` on one
//! listener, register with a gRPC check, and shut down in the one order that loses no call:
//!
//! 1. `hello.Greeter` reports `NOT_SERVING` (a check run from now on is critical);
//! 2. [`Registration::drain`]: the instance is deregistered (clients following Consul drop
//!    it), then lingers, still answering, while clients' views catch up ([`Options::linger`]);
//! 4. it stops accepting connections and drains calls in flight, for at most
//!    [`Options::drain`] (tonic sends HTTP/2 GOAWAY; clients reconnect elsewhere).

use std::{net::SocketAddr, time::Duration};

use consul_api::{AgentServiceCheck, AgentServiceRegistration, Client, GoDuration};
use consul_registry::Registration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::hello::{GreeterServer, SERVICE};

/// How the service registers and shuts down.
#[derive(Debug, Clone)]
pub struct Options {
    /// The service name in Consul.
    pub name: String,
    /// The instance ID. `None`: `<name>-<host>-<port>`, from the address the check probes:
    /// a process that comes back on that address takes its own entry over, instead of a
    /// killed process's entry passing again beside a new one (docs/service.md, service IDs).
    pub id: Option<String>,
    /// How often Consul runs the gRPC check (Consul raises anything under 1 s to 1 s).
    pub check_interval: Duration,
    /// How long to keep answering after deregistration
    /// ([`consul_registry::registration::DEFAULT_LINGER`] by default).
    pub linger: Duration,
    /// How long calls in flight may take to finish once the listener is closed.
    pub drain: Duration,
}

impl Options {
    /// Defaults for service `name`: a check every second, the registry's linger, a 5 s drain.
    pub fn new(name: impl Into<String>) -> Options {
        Options {
            name: name.into(),
            id: None,
            check_interval: Duration::from_secs(1),
            linger: consul_registry::registration::DEFAULT_LINGER,
            drain: Duration::from_secs(5),
        }
    }

    /// The instance ID at `addr`.
    pub fn id_at(&self, addr: SocketAddr) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("{}-{}-{}", self.name, addr.ip(), addr.port()))
    }

    /// The registration of the instance at `addr`: a gRPC check on `addr` asking for
    /// `hello.Greeter`'s status, deregistered by Consul after 1 minute critical (a killed
    /// process cannot deregister itself).
    pub fn registration(&self, addr: SocketAddr) -> AgentServiceRegistration {
        AgentServiceRegistration {
            id: Some(self.id_at(addr)),
            name: self.name.clone(),
            address: Some(addr.ip().to_string()),
            port: Some(addr.port()),
            check: Some(AgentServiceCheck {
                grpc: Some(format!("{addr}/{SERVICE}")),
                interval: Some(GoDuration(self.check_interval)),
                timeout: Some(GoDuration::from_secs(1)),
                deregister_critical_service_after: Some(GoDuration::from_secs(60)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// What stops the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener has no local address.
    #[error("the listener has no address: {0}")]
    Listener(#[source] std::io::Error),
    /// Registration failed for good (a refused token, a rejected registration).
    #[error("registration failed")]
    Registration(#[source] consul_registry::Error),
    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    /// The server's task panicked.
    #[error("the gRPC server's task panicked")]
    Panicked,
}

/// Serve on `listener` and stay registered in `consul` until `shutdown` is cancelled, then
/// shut down in order (see the module's documentation). Returns once drained.
pub async fn run(
    consul: Client,
    listener: TcpListener,
    options: Options,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let addr = listener.local_addr().map_err(Error::Listener)?;
    let id = options.id_at(addr);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<GreeterServer>().await;

    let stop_accepting = CancellationToken::new();
    let server = Server::builder()
        .add_service(health)
        .add_service(GreeterServer::new(&id))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            stop_accepting.clone().cancelled_owned(),
        );
    let mut server = tokio::spawn(server);

    let mut registration =
        Registration::start(consul, options.registration(addr), CancellationToken::new())
            .with_linger(options.linger);
    tracing::info!(%id, %addr, "serving {SERVICE} and grpc.health.v1.Health");

    tokio::select! {
        () = shutdown.cancelled() => {}
        // The server stopped by itself (it cannot accept any more): leave Consul too.
        served = &mut server => {
            let _ = registration.drain().await;
            return match served {
                Ok(result) => result.map_err(Error::Serve),
                Err(_) => Err(Error::Panicked),
            };
        }
    }

    reporter.set_not_serving::<GreeterServer>().await;
    // Deregistered, then lingering while clients' views catch up.
    let deregistered = registration.drain().await;
    stop_accepting.cancel();
    tracing::info!(%id, "stopped accepting; draining");
    match tokio::time::timeout(options.drain, &mut server).await {
        Ok(Ok(served)) => served.map_err(Error::Serve)?,
        Ok(Err(_)) => return Err(Error::Panicked),
        Err(_) => {
            server.abort();
            tracing::warn!(%id, drain = ?options.drain, "calls still in flight after the drain limit were cut");
        }
    }
    tracing::info!(%id, "stopped");
    deregistered.map_err(Error::Registration)
}
