//! The server's word to its open connections, one slot per connection: for all of them the
//! shutdown's phase, first "drain" (answer what you have, close once the peer is quiet),
//! then, past the drain deadline, "cut" (stop now); and for one of them what the sweeper
//! ([`crate::sweep`]) found: it has been idle past its timeout, its buffer may shrink, it
//! may be shed. Every connection looks here in every wait for its peer's bytes, so the look
//! must cost next to nothing: one atomic load of the phase, one swap of its own flags and
//! one registration of the task's waker in its own slot. No clock, no timer: the sweeper
//! reads the clock for every connection at once. (A `CancellationToken` per phase cost each
//! wait two lock round trips on each token: ~800 instructions of the echo-server's ~5,400
//! per one-in-flight round trip, measured with callgrind (`echo-probe --lockstep`).) A
//! connection's slot is added to the server's list when it opens and taken out when it
//! closes: the one lock per connection, not per wait.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::task::AtomicWaker;
use tokio::time::Instant;

use crate::sweep::{Flags, Seen};

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

/// What a connection shares with the server: written by the connection (its activity) and
/// by the sweeper (its flags).
#[derive(Debug, Default)]
struct Slot {
    /// [`Flags`] raised by the sweeper and not yet taken by the connection.
    flags: AtomicU8,
    /// The connection's count of answered batches, shifted left by one, its lowest bit set
    /// while its buffer is larger than the small size: a changed value is activity.
    activity: AtomicU64,
    waker: AtomicWaker,
}

/// One connection as the sweeper keeps it.
#[derive(Debug)]
struct Entry {
    slot: Arc<Slot>,
    idle_timeout: Duration,
    seen: Seen,
}

#[derive(Debug, Default)]
struct Shared {
    phase: AtomicU8,
    next_id: AtomicU64,
    /// Every open connection.
    entries: Mutex<HashMap<u64, Entry>>,
}

/// The server's side: moves every connection to a later [`Phase`], and sweeps. Cheap to
/// clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop {
    shared: Arc<Shared>,
}

impl Stop {
    /// Move to `phase` (never back) and wake every connection waiting.
    pub(crate) fn set(&self, phase: Phase) {
        self.shared.phase.fetch_max(phase as u8, Ordering::SeqCst);
        for entry in self.entries().values() {
            entry.slot.waker.wake();
        }
    }

    /// A connection's view, registered until it is dropped; the sweeper counts its quiet
    /// time from now.
    pub(crate) fn watch(&self, idle_timeout: Duration) -> Watch {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        let entry = Entry {
            slot: slot.clone(),
            idle_timeout,
            seen: Seen::new(0, Instant::now()),
        };
        self.entries().insert(id, entry);
        Watch {
            shared: self.shared.clone(),
            id,
            slot,
            answered: 0,
        }
    }

    /// One pass of the sweeper at `now`: every connection's activity compared with what the
    /// last pass saw, and the flags the quiet ones earned raised (each one woken once).
    pub(crate) fn sweep(&self, now: Instant) {
        let mut raised = Vec::new();
        for (id, entry) in self.entries().iter_mut() {
            let activity = entry.slot.activity.load(Ordering::Relaxed);
            let raise = entry.seen.visit(activity, now, entry.idle_timeout);
            if !raise.is_empty() {
                entry.slot.flags.fetch_or(raise.bits(), Ordering::SeqCst);
                raised.push((entry.seen.quiet_since(), *id, entry.slot.clone()));
            }
        }
        // Woken quiet longest first (then oldest connection first): a connection joins the
        // shed line when it wakes, so the line keeps the order of idleness the sweeps saw.
        raised.sort_by_key(|(since, id, _)| (*since, *id));
        for (_, _, slot) in raised {
            slot.waker.wake();
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.shared
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// What woke a connection waiting in [`Watch::signaled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Phase(Phase),
    Flags(Flags),
}

/// One connection's view of the [`Stop`]; see the module documentation.
#[derive(Debug)]
pub(crate) struct Watch {
    shared: Arc<Shared>,
    id: u64,
    slot: Arc<Slot>,
    /// Batches answered so far (the activity the sweeper sees).
    answered: u64,
}

impl Watch {
    /// The phase now.
    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.shared.phase.load(Ordering::SeqCst))
    }

    /// The connection answered frames: it is not quiet. `grown`: its buffer is larger than
    /// the small size (worth a shrink once quiet). One relaxed store, no clock.
    pub(crate) fn answered(&mut self, grown: bool) {
        self.answered = self.answered.wrapping_add(1);
        let value = (self.answered << 1) | u64::from(grown);
        self.slot.activity.store(value, Ordering::Relaxed);
    }

    /// Ready once the phase is at least `at` (the phase first) or the sweeper raised flags
    /// (taken); until then the task is woken when either changes. Only one task may poll a
    /// watch (it keeps one waker).
    pub(crate) fn poll_signaled(&self, cx: &mut Context<'_>, at: Phase) -> Poll<Signal> {
        if let Some(signal) = self.now(at) {
            return Poll::Ready(signal);
        }
        self.slot.waker.register(cx.waker());
        // A change made between the first look and the registration has woken nobody:
        // look again.
        match self.now(at) {
            Some(signal) => Poll::Ready(signal),
            None => Poll::Pending,
        }
    }

    /// The phase if it is at least `at`, else the flags the sweeper raised (taken), if any.
    pub(crate) fn now(&self, at: Phase) -> Option<Signal> {
        let phase = self.phase();
        if phase >= at {
            return Some(Signal::Phase(phase));
        }
        if self.slot.flags.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let flags = Flags::from_bits(self.slot.flags.swap(0, Ordering::SeqCst));
        (!flags.is_empty()).then_some(Signal::Flags(flags))
    }

    /// Completes once the phase is at least `at` or the sweeper raised flags.
    pub(crate) async fn signaled(&self, at: Phase) -> Signal {
        std::future::poll_fn(|cx| self.poll_signaled(cx, at)).await
    }

    /// Completes once the phase is at least `at`; flags raised meanwhile are left for the
    /// next [`Watch::signaled`].
    pub(crate) async fn reached(&self, at: Phase) -> Phase {
        std::future::poll_fn(|cx| {
            let now = self.phase();
            if now >= at {
                return Poll::Ready(now);
            }
            self.slot.waker.register(cx.waker());
            match self.phase() {
                now if now >= at => Poll::Ready(now),
                _ => Poll::Pending,
            }
        })
        .await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared
            .entries
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
        let watch = stop.watch(Duration::from_secs(60));
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
        assert_eq!(
            stop.watch(Duration::from_secs(60)).phase(),
            Phase::Cut,
            "never back"
        );
        assert!(stop.entries().is_empty(), "a dropped watch leaves the list");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_wakes_the_quiet_connection_alone_and_active_ones_stay_asleep() {
        let stop = Stop::default();
        let timeout = Duration::from_secs(2);
        let quiet = stop.watch(timeout);
        let mut busy = stop.watch(timeout);
        let start = Instant::now();
        let waiting = tokio::spawn(async move { quiet.signaled(Phase::Draining).await });
        // Ticks of 50 ms, the busy one answering between them.
        let mut tick = start;
        while tick < start + timeout + Duration::from_millis(200) {
            tick += Duration::from_millis(50);
            tokio::time::sleep_until(tick).await;
            busy.answered(false);
            stop.sweep(tick);
        }
        let Signal::Flags(flags) = waiting.await.unwrap() else {
            panic!("woken by a phase");
        };
        assert!(flags.contains(Flags::IDLE) || flags.contains(Flags::SHEDDABLE));
        let busy_flags = busy.slot.flags.load(Ordering::SeqCst);
        assert_eq!(busy_flags, 0, "an active connection is never flagged");
    }
}
