//! The session's log events are counted on a test's thread even when another thread, with
//! no subscriber of its own, is the first to reach the lines that log them — as a sibling
//! test does in a parallel `cargo test`. Its own binary: the order of the threads is the
//! point, and no other test may reach those lines first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::SessionEvents;
use echo_client::{EchoClient, Error, Instance, SessionConfig, Snapshot};
use tokio::sync::watch;

/// One message to an instance that refuses connections, until its deadline: the session
/// logs each refused try.
fn send_to_a_refusing_instance() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = SessionConfig::new("servernode");
        config.message_timeout = Duration::from_millis(300);
        config.cooldown = Duration::from_millis(50);
        let (_tx, rx) =
            watch::channel(Snapshot::fixed(vec![Instance::new("a", "127.0.0.1", port)]));
        let client = EchoClient::with_discovery(rx, config).unwrap();
        let sent = client.send(Bytes::from_static(b"hello")).await;
        assert!(matches!(sent, Err(Error::Timeout { .. })), "{sent:?}");
    });
}

#[test]
fn events_are_counted_when_a_thread_without_a_subscriber_reaches_their_lines_first() {
    let events = SessionEvents::start();
    std::thread::spawn(send_to_a_refusing_instance)
        .join()
        .expect("the thread without a subscriber");
    send_to_a_refusing_instance();
    assert!(
        events.count() >= 1,
        "no session event counted on this thread"
    );
}
