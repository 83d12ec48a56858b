//! Shutdown goes on in order whatever a task of the server did: a panicking task skips
//! neither the drain nor the rest. Its own test binary, because the panic is injected through
//! a thread-local tracing subscriber, which other tests running at the same time would race.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Running, answers_across_shutdown};

/// A tracing layer that panics at the first event whose message contains its needle: a
/// way to make one of the server's own tasks panic, in process, without a hook in the server.
struct PanicAt(&'static str);

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PanicAt {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        if message.0.contains(self.0) {
            panic!("injected panic at {:?}", self.0);
        }
    }
}

#[tokio::test]
async fn a_task_that_panics_does_not_skip_the_drain() {
    use tracing_subscriber::layer::SubscriberExt;
    // The accept task panics as it stops accepting, between deregistration and the drain.
    // The test runtime has one thread, so every task of the server logs through this layer.
    let _panics =
        test_log::scoped(tracing_subscriber::registry().with(PanicAt("echo port closed")));
    let mut server = Running::local().await;
    let (burst, answers) = answers_across_shutdown(&mut server).await;
    assert_eq!(answers, burst, "every in-flight frame answered");
    let result = server.stopped().await;
    assert!(
        matches!(&result, Err(echo_server::Error::Internal(e)) if e.contains("panic")),
        "the panic is reported once the shutdown is done: {result:?}"
    );
}
