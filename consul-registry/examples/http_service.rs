//! A small HTTP service that registers itself with an HTTP check served by its own router
//! (the check's path given once), and on SIGTERM or Ctrl-C shuts down in the order that loses
//! no request: the check fails and the service is deregistered, it lingers while clients'
//! views catch up (still accepting: a client that has not caught up is answered), then it
//! stops accepting and finishes the requests in flight.
//!
//!     cargo run -p consul-registry --example http_service -- 127.0.0.1:8083 hello 5s
//!
//! (bind address, service name and check interval, each optional).
//!
//! `GET /` answers `hello from <id>`; `GET /check` is Consul's check. The agent is found as
//! Consul's own tools find it (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`).

use std::{convert::Infallible, future::Future, time::Duration};

use consul_api::{AgentServiceRegistration, Client, GoDuration};
use consul_registry::{Health, Registration, check::CheckService};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::Service;

/// Requests in flight get this long to finish once the service stops accepting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve on `listener` as an instance of `name`, checked every `interval`, until `shutdown`
/// completes; then drain (lingering `linger` after the deregistration).
pub async fn run(
    consul: Client,
    listener: TcpListener,
    name: &str,
    interval: Duration,
    linger: Duration,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    // One ID per address: a process that reuses the port takes the entry over instead of
    // reviving a dead one's next to its own.
    let id = format!("{name}-{}-{}", addr.ip(), addr.port());
    let health = Health::default();
    let check = CheckService::new("/check", health.clone());
    let service = AgentServiceRegistration {
        id: Some(id.clone()),
        name: name.into(),
        address: Some(addr.ip().to_string()),
        port: Some(addr.port()),
        check: Some(consul_api::AgentServiceCheck {
            deregister_critical_service_after: Some(GoDuration::from_secs(60)),
            ..check.consul_check(addr, interval)
        }),
        ..Default::default()
    };
    let mut registration =
        Registration::start_with_health(consul, service, health, CancellationToken::new())
            .with_linger(linger);

    // 1-2. On `shutdown`, out of rotation: the check fails, the service is deregistered and
    // clients' views catch up (the linger), while the loop below goes on accepting: a client
    // that has not caught up yet still gets its answer.
    let out_of_rotation = async move {
        tokio::select! {
            () = shutdown => {}
            // Consul refused the registration for good (a 403 before it ever worked).
            ended = registration.wait() => return ended,
        }
        registration.drain().await
    };
    let mut out_of_rotation = std::pin::pin!(out_of_rotation);

    let hello = format!("hello from {id}\n");
    let connections = TaskTracker::new();
    let stop_connections = CancellationToken::new();
    let deregistered = loop {
        let (stream, _) = tokio::select! {
            deregistered = &mut out_of_rotation => break deregistered,
            accepted = listener.accept() => accepted?,
        };
        let (check, hello, stop) = (check.clone(), hello.clone(), stop_connections.clone());
        connections.spawn(async move {
            let router = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (mut check, hello) = (check.clone(), hello.clone());
                async move {
                    let response: Response<BoxBody<Bytes, Infallible>> =
                        if req.uri().path() == check.path() {
                            check.call(req).await?.map(BodyExt::boxed)
                        } else {
                            Response::new(Full::new(Bytes::from(hello)).boxed())
                        };
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), router);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    // Finish the request in flight, then close the kept-alive connection.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    };
    // 3. Stop accepting, 4. finish what is in flight.
    drop(listener);
    stop_connections.cancel();
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        eprintln!("requests still in flight after {DRAIN_TIMEOUT:?}: closing them");
    }
    Ok(deregistered?)
}

/// SIGTERM or Ctrl-C.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[allow(dead_code)] // a test includes this file and calls `run` itself
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| "127.0.0.1:8083".into());
    let name = args.next().unwrap_or_else(|| "hello".into());
    let listener = TcpListener::bind(&bind).await?;
    println!("{name} on http://{bind}/, check on /check");
    let interval = match args.next() {
        Some(text) => text.parse::<GoDuration>()?.as_duration(),
        None => Duration::from_secs(5),
    };
    let linger = consul_registry::registration::DEFAULT_LINGER;
    run(
        Client::from_env()?,
        listener,
        &name,
        interval,
        linger,
        terminated(),
    )
    .await
}
