//! A small HTTP service that registers itself with its Consul agent, keeps a TTL check
//! passing (no check endpoint to expose), and on Ctrl-C shuts down in the order that loses
//! no request: its check reported critical and the service deregistered, a linger while
//! clients' views catch up (still accepting), then it stops accepting and finishes the
//! requests in flight.
//!
//!     cargo run -p consul-registry --example ttl_service -- 127.0.0.1:8081
//!
//! The agent is found as Consul's own tools find it (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`).

use std::{convert::Infallible, time::Duration};

use consul_api::{AgentServiceCheck, AgentServiceRegistration, Client, GoDuration};
use consul_registry::Registration;
use hyper::{Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Serve `hello from <id>` on `listener`, registered as an instance of `name`, until `stop`.
pub async fn run(
    consul: Client,
    listener: TcpListener,
    name: &str,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let id = format!("{name}-{}", addr.port());
    let service = AgentServiceRegistration {
        id: Some(id.clone()),
        name: name.into(),
        address: Some(addr.ip().to_string()),
        port: Some(addr.port()),
        check: Some(AgentServiceCheck {
            ttl: Some(GoDuration::from_secs(10)),
            deregister_critical_service_after: Some(GoDuration::from_secs(60)),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Registers and beats the TTL check; `drain` below takes it out of rotation.
    let mut registration = Registration::start(consul, service, CancellationToken::new());
    // On `stop`: critical, deregistered, lingered, while the loop below goes on accepting.
    let out_of_rotation = async move {
        tokio::select! {
            () = stop.cancelled() => {}
            // Consul refused the registration for good (a 403 before it ever worked).
            ended = registration.wait() => return ended,
        }
        registration.drain().await
    };
    let mut out_of_rotation = std::pin::pin!(out_of_rotation);
    let (connections, stop_connections) = (TaskTracker::new(), CancellationToken::new());
    let deregistered = loop {
        let (stream, _) = tokio::select! {
            deregistered = &mut out_of_rotation => break deregistered,
            accepted = listener.accept() => accepted?,
        };
        let (body, stop) = (format!("hello from {id}\n"), stop_connections.clone());
        connections.spawn(async move {
            let hello = service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(body)) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), hello);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // Finish the request in flight, then close the kept-alive connection.
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    };
    // Only then stop accepting and finish what is in flight.
    drop(listener);
    stop_connections.cancel();
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), connections.wait()).await;
    Ok(deregistered?)
}

#[allow(dead_code)] // a test includes this file and calls `run` itself
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bind = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".into());
    let listener = TcpListener::bind(&bind).await?;
    let stop = CancellationToken::new();
    let ctrl_c = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        ctrl_c.cancel();
    });
    run(Client::from_env()?, listener, "hello", stop).await
}
