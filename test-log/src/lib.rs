//! test-log: a test's own log subscriber that sees every event its thread logs, however the
//! test's siblings run. One function, [`scoped`].
//!
//! `tracing` decides once per log line, for the whole process, whether anyone listens, on
//! whichever thread reaches the line first, and while one subscriber is registered it asks
//! only that thread's. In a parallel `cargo test`, a sibling test with no subscriber that
//! reaches a line first makes it silent for every thread: a test counting the client's
//! retries saw 0 events (seen once), and a test injecting a panic at a log line would miss
//! it. [`scoped`] gives the process a global subscriber that listens to every line (it
//! records nothing), has every line already decided decided again, and then installs the
//! test's subscriber for its thread.

use std::sync::Once;

use tracing::{Subscriber, subscriber::DefaultGuard};

/// Install `subscriber` for this thread until the guard drops, with every log line of the
/// process listened to (see the module documentation).
pub fn scoped<S>(subscriber: S) -> DefaultGuard
where
    S: Subscriber + Send + Sync + 'static,
{
    static LISTEN_EVERYWHERE: Once = Once::new();
    LISTEN_EVERYWHERE.call_once(|| {
        // Fails only if the program set a global subscriber already: then one listens.
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
    tracing::callsite::rebuild_interest_cache();
    tracing::subscriber::set_default(subscriber)
}
