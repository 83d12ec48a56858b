//! Load shedding for a listener with a connection cap: when every slot is taken and a new
//! peer is waiting, the connection that has waited longest in [`Shedder::picked`] (the one
//! idle longest) is asked to close, so idle peers cannot hold every slot until their idle
//! timeout. Used by the check endpoint (silent peers) and by any listener that caps its connections
//! (idle peers).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Requests to shed, handed to sheddable connections first come, first served (tokio's
/// semaphore is fair). Cheap to clone; every clone shares the requests.
#[derive(Debug, Clone)]
pub struct Shedder {
    requests: Arc<Semaphore>,
}

impl Default for Shedder {
    fn default() -> Self {
        Shedder {
            requests: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Shedder {
    /// Completes when this connection is picked to make room. Connections wait in line in
    /// the order they started waiting, so the first picked is the one that has waited
    /// longest. Cancel-safe: dropping the future leaves the line.
    pub async fn picked(&self) {
        match self.requests.acquire().await {
            Ok(request) => request.forget(),
            Err(_) => std::future::pending().await,
        }
    }

    /// A slot of `limit` for a new peer: at once if one is free, otherwise once a
    /// connection ends, after asking the one waiting longest in [`Shedder::picked`] to
    /// close. `None` if `limit` is closed.
    pub async fn slot(&self, limit: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        match limit.clone().try_acquire_owned() {
            Ok(permit) => return Some(permit),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        let request = Request::new(self);
        let permit = limit.clone().acquire_owned().await.ok();
        drop(request);
        permit
    }
}

/// One request to shed, withdrawn on drop if no connection has taken it yet (a slot freed
/// by itself, or the listener stopped waiting).
struct Request<'a>(&'a Shedder);

impl<'a> Request<'a> {
    fn new(shedder: &'a Shedder) -> Self {
        shedder.requests.add_permits(1);
        Request(shedder)
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if let Ok(untaken) = self.0.requests.try_acquire() {
            untaken.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_connection_waiting_longest_is_picked_and_only_one() {
        let shedder = Shedder::default();
        let limit = Arc::new(Semaphore::new(2));
        let first = limit.clone().try_acquire_owned().unwrap();
        let second = limit.clone().try_acquire_owned().unwrap();
        let (picked, mut picks) = tokio::sync::mpsc::unbounded_channel();
        for (name, permit) in [("longest", first), ("later", second)] {
            let (shedder, picked) = (shedder.clone(), picked.clone());
            tokio::spawn(async move {
                shedder.picked().await;
                picked.send(name).unwrap();
                drop(permit);
            });
            tokio::task::yield_now().await;
        }
        let slot = tokio::time::timeout(Duration::from_secs(1), shedder.slot(&limit)).await;
        assert!(slot.expect("a slot once one is shed").is_some());
        assert_eq!(picks.recv().await, Some("longest"));
        let more = tokio::time::timeout(Duration::from_secs(60), picks.recv()).await;
        assert!(more.is_err(), "only one is shed per new peer: {more:?}");
    }

    #[tokio::test]
    async fn a_request_nobody_took_is_withdrawn() {
        let shedder = Shedder::default();
        let limit = Arc::new(Semaphore::new(1));
        let held = limit.clone().try_acquire_owned().unwrap();
        let waiting = tokio::spawn({
            let (shedder, limit) = (shedder.clone(), limit.clone());
            async move { shedder.slot(&limit).await.is_some() }
        });
        tokio::task::yield_now().await;
        drop(held);
        assert!(waiting.await.unwrap());
        assert_eq!(shedder.requests.available_permits(), 0, "withdrawn");
    }
}
