//! Waiting on Consul's state by blocking queries, with a deadline: "until the service has a
//! passing instance", "until it is gone". No polling loops, no sleeps.

use std::time::Duration;

use consul_api::{Client, QueryOptions, ServiceEntry, Watch};
use tokio::time::Instant;

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
    let mut watch = Watch::new(
        QueryOptions::default(),
        timeout.min(Duration::from_secs(60)),
    );
    let mut last_error = None;
    loop {
        let next = watch.next(|opts| {
            let client = client.clone();
            async move {
                client
                    .health()
                    .service(service, None, passing_only, &opts)
                    .await
            }
        });
        match tokio::time::timeout_at(deadline, next).await {
            Ok(Ok(entries)) => {
                if done(&entries) {
                    return Ok((entries, Instant::now()));
                }
            }
            Ok(Err(e)) if e.is_retryable() => {
                last_error = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(100).min(deadline - Instant::now())).await;
            }
            Ok(Err(e)) => return Err(e.into()),
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
