//! Waiting on Consul's state by blocking queries, with a deadline: "until the service has a
//! passing instance", "until it is gone". No polling loops, no sleeps.

use std::time::{Duration, SystemTime};

use consul_api::{
    Backoff, Classify, Client, Event, Follow, HealthStatus, QueryOptions, Retry, Retrying,
    ServiceEntry, Watch,
};
use tokio::{sync::oneshot, time::Instant};

use crate::error::{Error, Result};

/// Block on `/v1/health/service/:service` until `done(entries)` holds; returns those entries
/// and the moment they arrived. Transient errors are retried until the deadline.
pub async fn health_until<F>(
    client: &Client,
    service: &str,
    passing_only: bool,
    timeout: Duration,
    mut done: F,
) -> Result<(Vec<ServiceEntry>, Instant)>
where
    F: FnMut(&[ServiceEntry]) -> bool,
{
    let deadline = Instant::now() + timeout;
    let watch = Watch::new(
        QueryOptions::default(),
        timeout.min(Duration::from_secs(60)),
    );
    let fetch = |opts: QueryOptions| async move {
        client
            .health()
            .service(service, None, passing_only, &opts)
            .await
    };
    let mut follow = Follow::new(
        watch,
        Retry::new(Classify::TRANSIENT, Backoff::consul()),
        fetch,
    );
    let mut last_error = None;
    loop {
        match tokio::time::timeout_at(deadline, follow.next()).await {
            Ok(Event::Changed { value, .. }) if done(&value) => {
                return Ok((value, Instant::now()));
            }
            Ok(Event::Changed { .. } | Event::Refused { .. }) => {}
            Ok(Event::Unreachable(retrying)) => last_error = Some(retrying.error.to_string()),
            Ok(Event::Fatal(e)) => return Err(e.into()),
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!(
                        "service {service:?} to reach the expected state{}",
                        last_error
                            .map(|e| format!(" (last error: {e})"))
                            .unwrap_or_default()
                    ),
                    timeout,
                });
            }
        }
    }
}

/// Until `service` has at least one passing instance.
pub async fn passing(
    client: &Client,
    service: &str,
    timeout: Duration,
) -> Result<(Vec<ServiceEntry>, Instant)> {
    health_until(client, service, true, timeout, |e| !e.is_empty()).await
}

/// Until no instance of `service` with ID `service_id` is registered at all.
pub async fn deregistered(
    client: &Client,
    service: &str,
    service_id: &str,
    timeout: Duration,
) -> Result<Instant> {
    health_until(client, service, false, timeout, |entries| {
        entries.iter().all(|e| e.service.id != service_id)
    })
    .await
    .map(|(_, at)| at)
}

/// When one instance turned critical and when it disappeared, as Consul published them (the
/// moments the blocking queries returned).
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    /// When a blocking query first showed one of its checks critical after it had passed;
    /// `removed_at` if it disappeared before being seen critical.
    pub critical_at: SystemTime,
    /// When a blocking query first showed the instance gone.
    pub removed_at: SystemTime,
}

/// Follow instance `service_id` of `service` by blocking queries: signal `passing` when it
/// first passes, then return when it turned critical and when it disappeared. Waits as long as
/// that takes (Consul's reaper may need minutes): bound it with a timeout at the call site.
pub async fn follow_instance(
    client: &Client,
    service: &str,
    service_id: &str,
    passing: oneshot::Sender<()>,
) -> Result<Lifecycle> {
    let watch = Watch::new(QueryOptions::default(), Duration::from_secs(300))
        .with_min_interval(Duration::from_millis(1));
    let fetch = |opts: QueryOptions| async move {
        client.health().service(service, None, false, &opts).await
    };
    let mut follow = Follow::new(
        watch,
        Retry::new(Classify::TRANSIENT, Backoff::consul()),
        fetch,
    );
    let mut passing = Some(passing);
    let mut critical_at = None;
    let mut errors = 0u32;
    loop {
        let entries = match follow.next().await {
            Event::Changed { value, .. } => value,
            Event::Refused { .. } => continue,
            // Transient errors are retried with backoff, up to 50 in all.
            Event::Unreachable(_) if errors < 50 => {
                errors += 1;
                continue;
            }
            Event::Unreachable(Retrying { error, .. }) | Event::Fatal(error) => {
                return Err(error.into());
            }
        };
        let now = SystemTime::now();
        match entries.iter().find(|e| e.service.id == service_id) {
            None if passing.is_none() => {
                return Ok(Lifecycle {
                    critical_at: critical_at.unwrap_or(now),
                    removed_at: now,
                });
            }
            None => {}
            Some(entry) => {
                let status = entry
                    .checks
                    .iter()
                    .filter(|c| c.service_id == service_id)
                    .map(|c| c.status)
                    .find(|s| *s != HealthStatus::Passing)
                    .unwrap_or(HealthStatus::Passing);
                if status == HealthStatus::Passing {
                    if let Some(tx) = passing.take() {
                        let _ = tx.send(());
                    }
                } else if passing.is_none() && status == HealthStatus::Critical {
                    critical_at.get_or_insert(now);
                }
            }
        }
    }
}
