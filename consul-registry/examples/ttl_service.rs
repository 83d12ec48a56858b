//! A small HTTP service that registers itself with its Consul agent, keeps a TTL check
//! passing (no check endpoint to expose), and deregisters on Ctrl-C.
//!
//!     cargo run -p consul-registry --example ttl_service -- 127.0.0.1:8081
//!
//! The agent is found as Consul's own tools find it (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`).

use std::{convert::Infallible, time::Duration};

use consul_api::{AgentServiceCheck, AgentServiceRegistration, Client, GoDuration};
use consul_registry::{Health, Heartbeat, Registrar};
use hyper::{Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(10);

/// Serve `hello from <id>` on `listener`, registered as an instance of `name`, until `stop`.
pub async fn run(
    consul: Client,
    listener: TcpListener,
    name: &str,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let id = format!("{name}-{}", addr.port());
    let registration = AgentServiceRegistration {
        id: Some(id.clone()),
        name: name.into(),
        address: Some(addr.ip().to_string()),
        port: Some(addr.port()),
        check: Some(AgentServiceCheck {
            ttl: Some(GoDuration(TTL)),
            deregister_critical_service_after: Some(GoDuration(Duration::from_secs(60))),
            ..Default::default()
        }),
        ..Default::default()
    };
    let registrar = Registrar::new(consul.clone(), registration, TTL);
    let health = Health::default();
    let heartbeat = Heartbeat::new(consul, format!("service:{id}"), TTL, health.clone());
    let registered = tokio::spawn({
        let (registrar, stop) = (registrar.clone(), stop.clone());
        async move { registrar.maintain(stop).await }
    });
    let beating = tokio::spawn({
        let stop = stop.clone();
        async move { heartbeat.run(stop).await }
    });

    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted?,
        };
        let (body, stop) = (format!("hello from {id}\n"), stop.clone());
        tokio::spawn(async move {
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
    }
    // Out of rotation first, then out of the catalog.
    health.set_draining();
    beating.await??;
    registered.await??;
    registrar.deregister().await;
    Ok(())
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
