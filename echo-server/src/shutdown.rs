//! Process signals: SIGINT or SIGTERM start the clean shutdown (as the shutdown future given
//! to [`Server::run`](crate::Server::run)), and so does SIGHUP (its terminal went away), so
//! that none of them leaves a stale registration behind; SIGUSR1 flips `/check` between
//! healthy and a forced 503 while the echo port keeps answering, for fault drills.

use std::future::Future;

use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};

use crate::{
    check::Health,
    error::{Error, Result},
};

/// Install the SIGINT, SIGTERM and SIGHUP handlers now (so none kills the process from here
/// on) and return a future that completes at the first of them.
pub fn terminate() -> Result<impl Future<Output = ()> + Send + 'static> {
    let install = |kind, name| {
        signal(kind).map_err(|source| Error::Signal {
            signal: name,
            source,
        })
    };
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut hup = install(SignalKind::hangup(), "SIGHUP")?;
    Ok(async move {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}

/// Install the SIGUSR1 handler now; each SIGUSR1 flips `/check` between healthy and forced
/// unhealthy, logging the new state. The task runs until aborted.
pub fn toggle_health_on_sigusr1(health: Health) -> Result<JoinHandle<()>> {
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(|source| Error::Signal {
        signal: "SIGUSR1",
        source,
    })?;
    Ok(tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            if health.toggle() {
                tracing::info!("SIGUSR1: /check is healthy again (200)");
            } else {
                tracing::warn!("SIGUSR1: /check forced unhealthy (503); echo keeps answering");
            }
        }
    }))
}
