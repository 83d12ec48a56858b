//! An independent view of Consul: a task following a service's passing instances by blocking
//! queries (reads at most 1 ms apart, not rate-bounded like a client's) and publishing each
//! answer that changed with the moment it arrived. Benches time a client's reaction from
//! these moments: "Consul's change, as a blocking query sees it". Also: waiting on a
//! client's own view, with a deadline.

use std::time::Duration;

use consul_api::{QueryOptions, Watch};
use echo_client::{Instance, Snapshot};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::error::{Error, Result};

/// What the observer saw last.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The passing instances.
    pub instances: Vec<Instance>,
    /// When the answer arrived.
    pub at: Instant,
    /// Answers so far.
    pub answers: u64,
}

/// Whether `instances` lists an instance with ID `id`.
pub fn lists_id(instances: &[Instance], id: &str) -> bool {
    instances.iter().any(|i| i.id == id)
}

/// Whether `instances` lists an instance with ID `id` on `port`.
pub fn lists_at(instances: &[Instance], id: &str, port: u16) -> bool {
    instances.iter().any(|i| i.id == id && i.port == port)
}

/// The observer task; see the module documentation. It ends when dropped.
#[derive(Debug)]
pub struct Observer {
    seen: watch::Receiver<Seen>,
    task: JoinHandle<()>,
}

impl Observer {
    /// Follow `service`'s passing instances through `client`.
    pub fn start(client: consul_api::Client, service: impl Into<String>) -> Observer {
        let service = service.into();
        let (tx, seen) = watch::channel(Seen {
            instances: Vec::new(),
            at: Instant::now(),
            answers: 0,
        });
        let task = tokio::spawn(async move {
            let mut watch = Watch::new(QueryOptions::default(), Duration::from_secs(30))
                .with_min_interval(Duration::from_millis(1));
            // Ends when the observer is dropped (the task is aborted) or nobody listens.
            while !tx.is_closed() {
                let answer = watch
                    .next(|opts| {
                        let (client, service) = (client.clone(), service.clone());
                        async move { client.health().service(&service, None, true, &opts).await }
                    })
                    .await;
                match answer {
                    Ok(entries) => {
                        let at = Instant::now();
                        tx.send_modify(|s| {
                            s.instances = entries.iter().map(Instance::from_entry).collect();
                            s.at = at;
                            s.answers += 1;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "observer: Consul did not answer; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Observer { seen, task }
    }

    /// Wait until what Consul lists satisfies `done`; returns that answer.
    pub async fn until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Instance]) -> bool,
    ) -> Result<Seen> {
        let mut rx = self.seen.clone();
        let waited = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| s.answers > 0 && done(&s.instances)),
        );
        match waited.await {
            Ok(Ok(seen)) => Ok(seen.clone()),
            Ok(Err(_)) => Err(Error::Invalid("the observer stopped".into())),
            Err(_) => Err(Error::timeout(format!("Consul to list {what}"), timeout)),
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Wait until a client's discovery snapshot satisfies `done`; returns when this task saw it.
pub async fn view_until(
    view: &watch::Receiver<Snapshot>,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&Snapshot) -> bool,
) -> Result<Instant> {
    let mut rx = view.clone();
    let waited = tokio::time::timeout(timeout, rx.wait_for(|s| done(s)));
    match waited.await {
        Ok(Ok(_)) => Ok(Instant::now()),
        Ok(Err(_)) => Err(Error::Invalid("the client's discovery stopped".into())),
        Err(_) => Err(Error::timeout(
            format!("the client's view to list {what}"),
            timeout,
        )),
    }
}
