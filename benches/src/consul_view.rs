//! An independent view of Consul: a thread following a service's passing instances by blocking
//! queries (reads at most 1 ms apart, not rate-bounded like a client's) and publishing each
//! answer that changed with the moment it arrived. Benches time a client's reaction from
//! these moments: "Consul's change, as a blocking query sees it". Also: waiting on a
//! client's own view, with a deadline.

use std::time::Duration;

use consul_api::{Backoff, Classify, Event, Follow, QueryOptions, Retry, Retrying, Watch};
use echo_client::{Instance, Snapshot};
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

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
pub fn lists_id<I: std::borrow::Borrow<Instance>>(instances: &[I], id: &str) -> bool {
    instances.iter().any(|i| i.borrow().id == id)
}

/// Whether `instances` lists an instance with ID `id` on `port`.
pub fn lists_at<I: std::borrow::Borrow<Instance>>(instances: &[I], id: &str, port: u16) -> bool {
    instances
        .iter()
        .any(|i| i.borrow().id == id && i.borrow().port == port)
}

/// The observer; see the module documentation. It runs on a thread and runtime of its own,
/// so a busy bench runtime cannot delay the moment it notes; it stops when dropped.
#[derive(Debug)]
pub struct Observer {
    seen: watch::Receiver<Seen>,
    _stop: oneshot::Sender<()>,
}

impl Observer {
    /// Follow `service`'s passing instances through the agent `consul` names.
    pub fn start(consul: consul_api::Config, service: impl Into<String>) -> Result<Observer> {
        // Its own client, so that no connection is shared with another runtime.
        let client = consul_api::Client::new(consul)?;
        let service = service.into();
        let (tx, seen) = watch::channel(Seen {
            instances: Vec::new(),
            at: Instant::now(),
            answers: 0,
        });
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("observer {service}"))
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        () = follow(client, service, tx) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Observer { seen, _stop: stop })
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

/// The observer's loop: ends when nobody listens (or is dropped with its runtime).
async fn follow(client: consul_api::Client, service: String, tx: watch::Sender<Seen>) {
    let watch = Watch::new(QueryOptions::default(), Duration::from_secs(30))
        .with_min_interval(Duration::from_millis(1));
    let fetch = |opts: QueryOptions| {
        let (client, service) = (client.clone(), service.clone());
        async move { client.health().service(&service, None, true, &opts).await }
    };
    // An observer only reports: every error is retried.
    let mut follow = Follow::new(watch, Retry::new(Classify::ALL, Backoff::consul()), fetch);
    while !tx.is_closed() {
        match follow.next().await {
            Event::Changed { value, .. } => {
                let at = Instant::now();
                tx.send_modify(|s| {
                    s.instances = value.iter().map(Instance::from_entry).collect();
                    s.at = at;
                    s.answers += 1;
                });
            }
            Event::Unreachable(Retrying {
                error, retry_in, ..
            }) => {
                tracing::warn!(%error, ?retry_in, "observer: Consul did not answer; retrying");
            }
            Event::Refused { .. } => {}
            Event::Fatal(_) => return,
        }
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
