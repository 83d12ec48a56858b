//! Shared by the client's test binaries: counting the session's log events.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tracing::subscriber::DefaultGuard;
use tracing_subscriber::layer::SubscriberExt;

/// Counts the `echo_client::session` events logged on this thread while it lives: how
/// often the client tried, for tests that a wait backs off instead of spinning. Through
/// [`test_log`], so a sibling test cannot silence the lines it counts.
pub struct SessionEvents {
    count: Arc<AtomicUsize>,
    _scope: DefaultGuard,
}

struct Count(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "echo_client::session" {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl SessionEvents {
    /// Start counting on this thread.
    pub fn start() -> SessionEvents {
        let count = Arc::new(AtomicUsize::new(0));
        let scope = test_log::scoped(tracing_subscriber::registry().with(Count(count.clone())));
        SessionEvents {
            count,
            _scope: scope,
        }
    }

    /// The session's events logged on this thread so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}
