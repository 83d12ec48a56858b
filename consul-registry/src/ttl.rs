//! The TTL heartbeat: for a service that cannot expose an HTTP endpoint to its agent, a TTL
//! check (`AgentServiceCheck { ttl: Some(..), .. }`) that the service itself keeps passing by
//! reporting in (`PUT /v1/agent/check/update/:id`, Go's `UpdateTTL`) well within the TTL.
//!
//! * Each beat reports what the [`Health`] handle says: passing while serving, critical with
//!   the reason while draining or forced unhealthy. The same handle drives the HTTP check, so
//!   a service can switch between the two without changing how it reports its health.
//! * A beat goes out every `ttl / 3` (at least every 100 ms), so two lost beats in a row
//!   still leave the check passing; a failed beat is retried with the one [`Backoff`], by
//!   consul-api's [`Retry`] (the policy below).
//! * If the process stops beating (frozen, crashed, cut off from its agent), the agent turns
//!   the check critical once the TTL has passed since the last beat, with the output
//!   `TTL expired`; `DeregisterCriticalServiceAfter` then applies as for any check.
//! * A refused token (403) before any beat was accepted is fatal, as for registration; after
//!   a success it is logged loudly and retried (a rotated token, a restarted agent). A 404
//!   (the agent lost the check) is retried too: the [`Registrar`](crate::Registrar)
//!   registers the service and its check again.

use std::time::Duration;

use consul_api::{Classify, Client, HealthStatus, Retried, Retry, Retrying};
use tokio_util::sync::CancellationToken;

use crate::{
    backoff::Backoff,
    check::{CheckStatus, Health},
    error::{Error, Result},
};

/// The shortest pause between beats.
const MIN_BEAT: Duration = Duration::from_millis(100);

/// Keeps one TTL check up to date; see the module documentation.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    client: Client,
    check_id: String,
    every: Duration,
    health: Health,
}

impl Heartbeat {
    /// Report `health` to the TTL check `check_id` (a service's check registered with it is
    /// named `service:<service ID>` unless the registration names it), often enough for
    /// `ttl`.
    pub fn new(client: Client, check_id: impl Into<String>, ttl: Duration, health: Health) -> Self {
        Heartbeat {
            client,
            check_id: check_id.into(),
            every: (ttl / 3).max(MIN_BEAT),
            health,
        }
    }

    /// How often a beat goes out.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Beat until `stop`; a last beat then reports the state `health` is in (critical while
    /// draining), so the check does not stay passing for a TTL after shutdown. Returns an
    /// error only when Consul refuses the token before any beat was accepted.
    pub async fn run(&self, stop: CancellationToken) -> Result<()> {
        // The one retry policy of the workspace: a 403 before any beat was accepted is
        // fatal, everything else is retried.
        let classify = Classify {
            before_success: Retried::AllButDenied,
            after_success: Retried::All,
        };
        let mut retry = Retry::new(classify, Backoff::consul());
        loop {
            let status = self.health.status();
            let beat = tokio::select! {
                () = stop.cancelled() => break,
                beat = self.beat(status) => beat,
            };
            let pause = match beat.map_err(|e| retry.failure(e)) {
                Ok(()) => {
                    if retry.success().failures > 0 {
                        tracing::info!(check = %self.check_id, "TTL check updated again");
                    }
                    self.every
                }
                Err(Err(source)) => {
                    return Err(Error::Heartbeat {
                        check_id: self.check_id.clone(),
                        source,
                    });
                }
                Err(Ok(Retrying {
                    error,
                    retry_in,
                    failures,
                    ..
                })) => {
                    let delay = retry_in.min(self.every);
                    if error.is_permission_denied() {
                        tracing::error!(check = %self.check_id, %error, retry_in = ?delay, "the token that updated this TTL check is refused now; retrying");
                    } else if failures == 1 {
                        tracing::warn!(check = %self.check_id, %error, retry_in = ?delay, "cannot update the TTL check; retrying");
                    }
                    delay
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        // The last word: not passing any more if the service is going away.
        let last = self.health.status();
        if last != CheckStatus::Serving {
            let _ = tokio::time::timeout(self.every, self.beat(last)).await;
        }
        Ok(())
    }

    async fn beat(&self, status: CheckStatus) -> consul_api::Result<()> {
        let (consul, output) = ttl_status(status);
        self.client
            .agent()
            .check_update(&self.check_id, consul, output)
            .await
    }
}

/// What a TTL check reports for each state of `/check`.
fn ttl_status(status: CheckStatus) -> (HealthStatus, &'static str) {
    match status {
        CheckStatus::Serving => (HealthStatus::Passing, "ok: serving"),
        CheckStatus::ForcedUnhealthy => (HealthStatus::Critical, "unhealthy: forced by operator"),
        CheckStatus::Draining => (HealthStatus::Critical, "unhealthy: draining"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_three_times_per_ttl_and_never_spin() {
        let client = Client::new(consul_api::Config::default()).unwrap();
        let h = Heartbeat::new(
            client.clone(),
            "c",
            Duration::from_secs(15),
            Health::default(),
        );
        assert_eq!(h.every(), Duration::from_secs(5));
        let h = Heartbeat::new(client, "c", Duration::ZERO, Health::default());
        assert_eq!(h.every(), MIN_BEAT);
    }

    #[test]
    fn reports_what_the_health_handle_says() {
        assert_eq!(ttl_status(CheckStatus::Serving).0, HealthStatus::Passing);
        assert_eq!(
            ttl_status(CheckStatus::ForcedUnhealthy).0,
            HealthStatus::Critical
        );
        assert_eq!(ttl_status(CheckStatus::Draining).0, HealthStatus::Critical);
    }
}
