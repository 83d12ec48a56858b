//! A small HTTP service that registers itself with its Consul agent, keeps a TTL check
//! passing (no check endpoint to expose), and deregisters on Ctrl-C.
//!
//!     cargo run -p consul-registry --example ttl_service -- 127.0.0.1:8081
//!
//! The agent is found as Consul's own tools find it (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`).

use std::convert::Infallible;

use consul_api::{AgentServiceCheck, AgentServiceRegistration, Client, GoDuration};
use consul_registry::Registration;
use hyper::{Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
    // Registers, beats the TTL check, and on `stop` reports critical and deregisters.
    let mut registration = Registration::start(consul, service, stop.clone());
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => break,
            failed = registration.wait() => return Ok(failed?),
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
    Ok(registration.wait().await?)
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
