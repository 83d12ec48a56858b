//! The harness's smoke run: start real Consul, register a service whose HTTP check is served
//! by a tiny handler on the host at 127.0.0.1, see it turn passing through a blocking health
//! query, deregister it and see it gone. It proves the agent reaches the host's loopback.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use consul_api::{AgentServiceCheck, AgentServiceRegistration, GoDuration};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    time::Instant,
};

use crate::{
    consul::Consul,
    error::Result,
    experiment::{Env, Experiment, Findings, Plan, Suite},
    procs::Launcher,
    progress::Progress,
    report::Table,
    wait,
};

/// What the smoke run saw.
#[derive(Debug, Clone, Serialize)]
pub struct SmokeReport {
    /// Which backend ran Consul (`docker` or `process`).
    pub backend: &'static str,
    /// Consul's version, as the agent reports it.
    pub consul_version: String,
    /// The agent's HTTP address, `127.0.0.1:port`.
    pub consul_http: String,
    /// Milliseconds from registration to the check passing (a blocking query saw it).
    pub passing_after_ms: f64,
    /// Milliseconds from deregistration to the service gone from the health endpoint.
    pub removed_after_ms: f64,
    /// How many times the agent called the check handler.
    pub check_hits: usize,
}

/// A minimal HTTP responder for Consul's check: answers 200 to any request, counting them.
#[derive(Debug)]
pub struct CheckResponder {
    /// Where it listens (127.0.0.1, a free port).
    pub addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CheckResponder {
    /// Listen on 127.0.0.1 on a free port.
    pub async fn start() -> Result<CheckResponder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 16 << 10 {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                        .await;
                });
            }
        });
        Ok(CheckResponder { addr, hits, task })
    }

    /// Requests served so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for CheckResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Run the smoke scenario against `consul`.
pub async fn run(consul: &Consul) -> Result<SmokeReport> {
    let client = consul.client();
    let responder = CheckResponder::start().await?;
    let id = format!("smoke-{}", responder.addr.port());
    let registration = AgentServiceRegistration {
        id: Some(id.clone()),
        name: "smoke".into(),
        port: Some(responder.addr.port()),
        address: Some("127.0.0.1".into()),
        check: Some(AgentServiceCheck {
            http: Some(format!("http://{}/check", responder.addr)),
            interval: Some(GoDuration(Duration::from_secs(1))),
            timeout: Some(GoDuration(Duration::from_secs(1))),
            ..Default::default()
        }),
        ..Default::default()
    };
    let start = Instant::now();
    client.agent().service_register(&registration).await?;
    let (_, passing_at) = wait::passing(&client, "smoke", Duration::from_secs(30)).await?;
    let passing_after = passing_at - start;

    let start = Instant::now();
    client.agent().service_deregister(&id).await?;
    let gone_at = wait::deregistered(&client, "smoke", &id, Duration::from_secs(30)).await?;
    Ok(SmokeReport {
        backend: consul.backend().name(),
        consul_version: consul.version().to_owned(),
        consul_http: consul.address(),
        passing_after_ms: passing_after.as_secs_f64() * 1e3,
        removed_after_ms: (gone_at - start).as_secs_f64() * 1e3,
        check_hits: responder.hits(),
    })
}

// === the contract ===

/// `testbed smoke`: no flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

/// The smoke check, as an experiment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Smoke;

impl Suite for Args {
    fn name(&self) -> &'static str {
        "smoke"
    }

    fn title(&self) -> String {
        "Smoke: the harness end to end".into()
    }

    fn plans(&self) -> Result<Vec<Box<dyn Plan>>> {
        Ok(vec![Box::new(Smoke)])
    }
}

impl Experiment for Smoke {
    type Outcome = SmokeReport;

    fn title(&self) -> String {
        "Register a checked service, see it pass, deregister it".into()
    }

    async fn run_on(
        &self,
        _: &Launcher,
        env: &mut Env,
        progress: &Progress,
    ) -> Result<SmokeReport> {
        progress.say("registering a checked service");
        run(env.agent()?).await
    }
}

impl Findings for SmokeReport {
    fn tables(&self) -> Vec<Table> {
        vec![Table::figures([
            (
                "Consul".to_owned(),
                format!(
                    "{} ({}) at {}",
                    self.consul_version, self.backend, self.consul_http
                ),
            ),
            (
                "registered → passing".to_owned(),
                format!("{:.1} ms", self.passing_after_ms),
            ),
            (
                "deregistered → gone".to_owned(),
                format!("{:.1} ms", self.removed_after_ms),
            ),
            ("check calls".to_owned(), self.check_hits.to_string()),
        ])]
    }

    fn violations(&self) -> Vec<String> {
        if self.check_hits == 0 {
            vec!["the agent never called the check".into()]
        } else {
            Vec::new()
        }
    }
}
