//! A small HTTP greeter whose settings live in Consul's KV store, under a prefix, and change
//! while it runs: `GET /hello?name=ana` answers `Hello, ana!`; `GET /config` says which
//! settings are in force (their index) and whether the latest change was rejected.
//!
//!     consul kv put greeter/greeting Hello
//!     consul kv put greeter/punctuation '!'
//!     cargo run -p consul-registry --example config_service -- 127.0.0.1:8082 greeter/
//!
//! Each key under the prefix is one field. A change of several fields at once is written as
//! one transaction (`consul kv import`, or [`consul_api::Kv::txn`]) and applied whole; a
//! change the service's check refuses (an empty greeting, a greeting over 64 characters) is
//! rejected, and the greeting in force stays. The agent is found as Consul's own tools find
//! it (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`).

use std::{convert::Infallible, sync::Arc};

use consul_api::Client;
use consul_registry::config::{self, ConfigSpec, Live};
use hyper::{Request, Response, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

/// The greeter's settings, one KV key each under the prefix.
#[derive(Debug, Clone, Deserialize)]
pub struct Greeter {
    /// `<prefix>greeting`: the word before the name.
    pub greeting: String,
    /// `<prefix>punctuation`: after the name (`!` by default).
    #[serde(default = "exclamation")]
    pub punctuation: String,
}

fn exclamation() -> String {
    "!".into()
}

/// The service's own check of every change.
pub fn check(greeter: &Greeter) -> Result<(), String> {
    match greeter.greeting.chars().count() {
        0 => Err("greeting must not be empty".into()),
        n if n > 64 => Err(format!("greeting is {n} characters, more than 64")),
        _ => Ok(()),
    }
}

/// Serve the greeter on `listener` with the settings under `prefix`, until `stop`.
pub async fn run(
    consul: Client,
    listener: TcpListener,
    prefix: &str,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let spec = ConfigSpec::prefix(prefix).with_validation(check);
    let settings = config::spawn(consul, spec);
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let settings = settings.clone();
        tokio::spawn(async move {
            let answer = service_fn(move |req| {
                let response = respond(&req, &settings);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), answer)
                .await;
        });
    }
}

/// `/hello?name=` with the settings in force; `/config`: the index and status.
fn respond<B>(req: &Request<B>, settings: &watch::Receiver<Live<Greeter>>) -> Response<String> {
    let live = settings.borrow().clone();
    let (status, body) = match (req.uri().path(), live.config) {
        ("/config", _) => (
            StatusCode::OK,
            format!("index {} ({})\n", live.index, live.status),
        ),
        ("/hello", Some(greeter)) => (StatusCode::OK, greet(&greeter, req.uri().query())),
        ("/hello", None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no settings yet: {}\n", live.status),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

fn greet(greeter: &Arc<Greeter>, query: Option<&str>) -> String {
    let name = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("name="))
        .unwrap_or("world");
    format!("{}, {name}{}\n", greeter.greeting, greeter.punctuation)
}

#[allow(dead_code)] // a test includes this file and calls `run` itself
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A rejected change is logged as an error, with the key, the index and the reason.
    tracing_subscriber::fmt().init();
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| "127.0.0.1:8082".into());
    let prefix = args.next().unwrap_or_else(|| "greeter/".into());
    let listener = TcpListener::bind(&bind).await?;
    let stop = CancellationToken::new();
    let ctrl_c = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        ctrl_c.cancel();
    });
    println!("greeter on http://{bind}/hello, settings under {prefix:?}");
    run(Client::from_env()?, listener, &prefix, stop).await
}
