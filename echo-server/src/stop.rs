//! The server's word to its open connections during the shutdown: first "drain" (answer
//! what you have, close once the peer is quiet), then, past the drain deadline, "cut" (stop
//! now). Every connection looks at it in every wait for its peer's bytes, so the look must
//! cost next to nothing: here it is one atomic load and one registration of the task's
//! waker in a slot of the connection's own. A `CancellationToken` per phase cost each wait
//! two lock round trips on each token (its state and its waiters are behind locks shared by
//! every connection): ~800 instructions of the echo-server's ~5,400 per one-in-flight round
//! trip, measured with callgrind (`echo-probe --lockstep`). A connection's slot is added to
//! the server's list when it opens and taken out when it closes: the one lock per
//! connection, not per wait.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use futures::task::AtomicWaker;

/// Where the shutdown is, as the connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Serving = 0,
    Draining = 1,
    Cut = 2,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Cut,
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    phase: AtomicU8,
    next_id: AtomicU64,
    /// Every open connection's waker slot.
    watchers: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
}

/// The server's side: moves every connection to a later [`Phase`]. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop {
    shared: Arc<Shared>,
}

impl Stop {
    /// Move to `phase` (never back) and wake every connection waiting.
    pub(crate) fn set(&self, phase: Phase) {
        self.shared.phase.fetch_max(phase as u8, Ordering::SeqCst);
        let watchers = self
            .shared
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for waker in watchers.values() {
            waker.wake();
        }
    }

    /// A connection's view, registered until it is dropped.
    pub(crate) fn watch(&self) -> Watch {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        self.shared
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, waker.clone());
        Watch {
            shared: self.shared.clone(),
            id,
            waker,
        }
    }
}

/// One connection's view of the [`Stop`]; see the module documentation.
#[derive(Debug)]
pub(crate) struct Watch {
    shared: Arc<Shared>,
    id: u64,
    waker: Arc<AtomicWaker>,
}

impl Watch {
    /// The phase now.
    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.shared.phase.load(Ordering::SeqCst))
    }

    /// Ready with the phase once it is at least `at`; until then the task is woken when it
    /// changes. Only one task may poll a watch (it keeps one waker).
    pub(crate) fn poll_reached(&self, cx: &mut Context<'_>, at: Phase) -> Poll<Phase> {
        let now = self.phase();
        if now >= at {
            return Poll::Ready(now);
        }
        self.waker.register(cx.waker());
        // A change made between the first look and the registration has woken nobody:
        // look again.
        match self.phase() {
            now if now >= at => Poll::Ready(now),
            _ => Poll::Pending,
        }
    }

    /// Completes once the phase is at least `at`.
    pub(crate) async fn reached(&self, at: Phase) -> Phase {
        std::future::poll_fn(|cx| self.poll_reached(cx, at)).await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn waiting_connections_wake_at_each_phase_and_leave_the_list() {
        let stop = Stop::default();
        let watch = stop.watch();
        assert_eq!(watch.phase(), Phase::Serving);
        let waiting = tokio::spawn(async move {
            let drained = watch.reached(Phase::Draining).await;
            let cut = watch.reached(Phase::Cut).await;
            (drained, cut)
        });
        tokio::task::yield_now().await;
        stop.set(Phase::Draining);
        tokio::task::yield_now().await;
        stop.set(Phase::Cut);
        let phases = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert!(matches!(phases, (Phase::Draining | Phase::Cut, Phase::Cut)));
        stop.set(Phase::Draining);
        assert_eq!(stop.watch().phase(), Phase::Cut, "never back");
        assert!(
            stop.shared.watchers.lock().unwrap().is_empty(),
            "a dropped watch leaves the list"
        );
    }
}
