//! The session against in-process TCP peers on 127.0.0.1 (no Consul: snapshots are fed by
//! hand): order, byte-exactness, resend on reset / refusal / silence / partial frames, waiting
//! for discovery, deadlines, leaving an instance Consul stops listing, permanent failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::SessionEvents;
use echo_client::{ConsulState, EchoClient, Error, Instance, SessionConfig, Snapshot};
use echo_wire::EchoCodec;
use futures::{SinkExt, StreamExt, future::join_all};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tokio_util::codec::Framed;

/// What a peer does with the messages of each connection.
#[derive(Debug, Clone)]
enum Behaviour {
    /// Echo every message.
    Echo,
    /// Echo `n` messages, then close the connection on the next one without answering.
    CloseAfter(usize),
    /// Read and never answer.
    Silent,
    /// Answer half of the first message, then close.
    Partial,
    /// Echo `n` messages, then close the idle connection (an idle timeout).
    IdleCloseAfter(usize),
    /// Answer every message with other bytes.
    Garble,
    /// Echo while the switch says so; hold every message (read, unanswered) otherwise.
    Freezable(watch::Receiver<bool>),
}

/// A TCP peer on 127.0.0.1; dropping (or killing) it closes every connection.
struct Peer {
    id: &'static str,
    addr: SocketAddr,
    /// Counts messages read, for waits.
    received: watch::Receiver<usize>,
    connections: Arc<AtomicUsize>,
    /// Counts connections the peer closed by itself, for waits.
    closed: watch::Receiver<usize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Peer {
    async fn start(id: &'static str, behaviour: Behaviour) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (received_tx, received) = watch::channel(0);
        let received_tx = Arc::new(received_tx);
        let connections = Arc::new(AtomicUsize::new(0));
        let (r, c) = (received_tx, connections.clone());
        let (closed_tx, closed) = watch::channel(0);
        let closed_tx = Arc::new(closed_tx);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (behaviour, r, closed) = (behaviour.clone(), r.clone(), closed_tx.clone());
                conns.spawn(async move {
                    serve(stream, behaviour, r).await;
                    closed.send_modify(|n| *n += 1);
                });
            }
        });
        Peer {
            id,
            addr,
            received,
            connections,
            closed,
            task: Some(task),
        }
    }

    fn instance(&self) -> Instance {
        Instance::new(self.id, "127.0.0.1", self.addr.port())
    }

    /// Stop accepting and drop every connection, like a killed process.
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    fn received(&self) -> usize {
        *self.received.borrow()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn serve(stream: TcpStream, mut behaviour: Behaviour, received: Arc<watch::Sender<usize>>) {
    let mut framed = Framed::new(stream, EchoCodec::default());
    let mut n = 0;
    while let Some(Ok(mut frame)) = framed.next().await {
        received.send_modify(|n| *n += 1);
        n += 1;
        match &mut behaviour {
            Behaviour::Echo => {}
            Behaviour::IdleCloseAfter(k) => {
                if framed.send(frame).await.is_err() || n >= *k {
                    return;
                }
                continue;
            }
            Behaviour::Garble => frame = Bytes::from(frame.to_ascii_uppercase()),
            Behaviour::Freezable(echo) => {
                let echo = echo.clone();
                return serve_freezable(framed, frame, echo, received).await;
            }
            Behaviour::CloseAfter(k) if n > *k => return,
            Behaviour::CloseAfter(_) => {}
            Behaviour::Silent => continue,
            Behaviour::Partial => {
                let mut stream = framed.into_inner();
                let _ = stream.write_all(&frame[..frame.len() / 2]).await;
                return;
            }
        }
        if framed.send(frame).await.is_err() {
            return;
        }
    }
}

/// Echo while `echo` says so; otherwise keep reading and hold the replies, in order, until
/// it does again.
async fn serve_freezable(
    mut framed: Framed<TcpStream, EchoCodec>,
    first: Bytes,
    mut echo: watch::Receiver<bool>,
    received: Arc<watch::Sender<usize>>,
) {
    let mut held = std::collections::VecDeque::from([first]);
    loop {
        if *echo.borrow_and_update() {
            while let Some(frame) = held.pop_front() {
                if framed.send(frame).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            frame = framed.next() => match frame {
                Some(Ok(frame)) => {
                    received.send_modify(|n| *n += 1);
                    held.push_back(frame);
                }
                _ => return,
            },
            changed = echo.changed() => if changed.is_err() { return },
        }
    }
}

fn config() -> SessionConfig {
    let mut c = SessionConfig::new("servernode");
    // Round-robin from the first instance: the tests name who answers.
    c.seed = Some(1);
    c.reply_timeout = Duration::from_millis(500);
    c.connect_timeout = Duration::from_millis(500);
    c.message_timeout = Duration::from_secs(10);
    c.cooldown = Duration::from_secs(5);
    c
}

/// Wait until `peer` has `connections` connections and `frames` frames (the standby's
/// probe among them).
async fn wait_for(peer: &Peer, connections: usize, frames: usize, what: &str) {
    let mut received = peer.received.clone();
    let waited = tokio::time::timeout(BOUND, async {
        loop {
            if peer.connections.load(Ordering::SeqCst) == connections
                && *received.borrow_and_update() == frames
            {
                return;
            }
            tokio::select! {
                _ = received.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{what}: {} has {} connections and {} frames",
        peer.id,
        peer.connections.load(Ordering::SeqCst),
        peer.received()
    );
}

fn client_over(
    instances: Vec<Instance>,
    config: SessionConfig,
) -> (EchoClient, watch::Sender<Snapshot>) {
    let (tx, rx) = watch::channel(Snapshot::fixed(instances));
    (EchoClient::with_discovery(rx, config).unwrap(), tx)
}

fn msg(i: usize) -> Bytes {
    Bytes::from(format!("hello world, {i:03}"))
}

/// Everything a test must not exceed: proves "no hang", not a speed.
const BOUND: Duration = Duration::from_secs(20);

#[tokio::test]
async fn concurrent_senders_get_their_own_bytes_back_in_order() {
    let a = Peer::start("a", Behaviour::Echo).await;
    let (client, _tx) = client_over(vec![a.instance()], config());
    let mut senders = Vec::new();
    for s in 0..4u8 {
        let client = client.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..50u8 {
                // Not UTF-8, and carriage returns: bytes are bytes.
                let m = Bytes::from(vec![0xff, s, 0x80 | i, b'\r', 0x00]);
                let reply = client.send(m.clone()).await.unwrap();
                assert_eq!(reply.bytes, m);
                assert_eq!(reply.attempts, 1);
                assert_eq!(reply.instance.id, "a");
            }
        }));
    }
    for sender in tokio::time::timeout(BOUND, join_all(senders))
        .await
        .unwrap()
    {
        sender.unwrap();
    }
    assert_eq!(a.received(), 200);
    assert_eq!(
        a.connections.load(Ordering::SeqCst),
        1,
        "one connection, kept"
    );
}

#[tokio::test]
async fn a_reset_mid_stream_resends_on_another_instance_and_stays_there() {
    let a = Peer::start("a", Behaviour::CloseAfter(5)).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    // Start on a (round-robin starts at a random instance): b is listed after the first
    // message, and the session does not move to it by itself.
    let mut c = config();
    c.spread = false;
    let (client, tx) = client_over(vec![a.instance()], c);
    let mut served = Vec::new();
    for i in 1..=20 {
        if i == 2 {
            tx.send(Snapshot::fixed(vec![a.instance(), b.instance()]))
                .unwrap();
        }
        let reply = tokio::time::timeout(BOUND, client.send(msg(i)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.bytes, msg(i), "byte-exact");
        served.push((reply.instance.id.clone(), reply.attempts));
    }
    assert!(served[..5].iter().all(|(id, n)| id == "a" && *n == 1));
    assert_eq!(served[5], ("b".to_owned(), 2), "resent once, on b");
    assert!(
        served[6..].iter().all(|(id, n)| id == "b" && *n == 1),
        "stays on b"
    );
    assert_eq!(a.received(), 6);
    assert_eq!(b.received(), 15);
}

#[tokio::test]
async fn pipelined_messages_survive_a_kill_exactly_once_each() {
    let (echo, frozen) = watch::channel(true);
    let a = Peer::start("a", Behaviour::Freezable(frozen)).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    let mut c = config();
    c.spread = false;
    let (client, tx) = client_over(vec![a.instance()], c);
    // Warm up on a, then freeze it: it reads the next messages and holds them.
    assert_eq!(client.send(msg(0)).await.unwrap().instance.id, "a");
    tx.send(Snapshot::fixed(vec![a.instance(), b.instance()]))
        .unwrap();
    echo.send(false).unwrap();
    let resent = kill_a_holding_messages_and_send_200(a, &client).await;
    assert!(
        resent >= 10,
        "messages written to a came back from b on their second write: {resent}"
    );
}

/// Send messages 1..=200 while `a` (frozen: it reads and holds what is written to it) is
/// killed once it holds 11 of them; every message must come back from b, in its own bytes.
/// Returns how many came back on their second write.
async fn kill_a_holding_messages_and_send_200(mut a: Peer, client: &EchoClient) -> usize {
    let sends = join_all((1..=200).map(|i| {
        let client = client.clone();
        async move { (i, client.send(msg(i)).await) }
    }));
    // Kill a once it holds messages written to it (before its reply timeout).
    let killer = async {
        let mut received = a.received.clone();
        tokio::time::timeout(Duration::from_millis(400), received.wait_for(|n| *n >= 11))
            .await
            .expect("a reads the messages written to it")
            .unwrap();
        a.kill().await;
    };
    let (results, ()) = tokio::time::timeout(BOUND, async { tokio::join!(sends, killer) })
        .await
        .unwrap();
    let mut resent = 0;
    for (i, result) in results {
        let reply = result.unwrap_or_else(|e| panic!("message {i} lost: {e}"));
        assert_eq!(reply.bytes, msg(i), "message {i}");
        assert_eq!(
            reply.instance.id, "b",
            "a answered nothing after the freeze"
        );
        resent += usize::from(reply.attempts == 2);
    }
    resent
}

#[tokio::test]
async fn a_silent_instance_times_out_and_is_skipped() {
    let a = Peer::start("a", Behaviour::Silent).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    let (client, _tx) = client_over(vec![a.instance(), b.instance()], config());
    let reply = tokio::time::timeout(BOUND, client.send(msg(1)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((reply.instance.id.as_str(), reply.attempts), ("b", 2));
    assert!(
        reply.latency >= Duration::from_millis(500),
        "waited for the reply timeout"
    );
    let reply = client.send(msg(2)).await.unwrap();
    assert_eq!((reply.instance.id.as_str(), reply.attempts), ("b", 1));
    assert_eq!(a.received(), 1, "a got the first message only");
}

/// An instance whose port refuses connections (bound, then closed).
fn refusing(id: &str) -> Instance {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Instance::new(id, "127.0.0.1", l.local_addr().unwrap().port())
}

#[tokio::test]
async fn a_refused_connection_moves_on_at_once() {
    let closed = refusing("a");
    let b = Peer::start("b", Behaviour::Echo).await;
    let (client, _tx) = client_over(vec![closed, b.instance()], config());
    let reply = tokio::time::timeout(BOUND, client.send(msg(1)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((reply.instance.id.as_str(), reply.attempts), ("b", 1));
}

#[tokio::test]
async fn half_a_reply_is_not_a_reply() {
    let a = Peer::start("a", Behaviour::Partial).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    let (client, _tx) = client_over(vec![a.instance(), b.instance()], config());
    let reply = tokio::time::timeout(BOUND, client.send(msg(1)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.bytes, msg(1));
    assert_eq!((reply.instance.id.as_str(), reply.attempts), ("b", 2));
}

/// Asserts that none of `tasks` finishes within `window`: they must be waiting (on
/// discovery, say), not failed or answered.
async fn none_finish_within<T>(tasks: &mut [tokio::task::JoinHandle<T>], window: Duration) {
    let any = futures::future::select_all(tasks.iter_mut());
    assert!(
        tokio::time::timeout(window, any).await.is_err(),
        "a task finished while it should still be waiting"
    );
}

#[tokio::test]
async fn with_no_instance_messages_wait_for_discovery() {
    let (client, tx) = client_over(vec![], config());
    let mut pending = [tokio::spawn({
        let client = client.clone();
        async move { client.send(msg(1)).await }
    })];
    // Nothing to send to: still waiting after a while.
    none_finish_within(&mut pending, Duration::from_millis(300)).await;
    let [pending] = pending;
    let b = Peer::start("b", Behaviour::Echo).await;
    tx.send(Snapshot::fixed(vec![b.instance()])).unwrap();
    let reply = tokio::time::timeout(BOUND, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((reply.instance.id.as_str(), reply.bytes), ("b", msg(1)));
}

#[tokio::test]
async fn all_down_then_one_back_resumes_by_itself() {
    let mut a = Peer::start("a", Behaviour::Echo).await;
    let (client, tx) = client_over(vec![a.instance()], config());
    client.send(msg(1)).await.unwrap();
    a.kill().await;
    let mut pending = [tokio::spawn({
        let client = client.clone();
        async move { client.send(msg(2)).await }
    })];
    // Queued, not failed.
    none_finish_within(&mut pending, Duration::from_millis(300)).await;
    let [pending] = pending;
    // A new instance appears in discovery; the dead one is still listed.
    let b = Peer::start("b", Behaviour::Echo).await;
    tx.send(Snapshot::fixed(vec![a.instance(), b.instance()]))
        .unwrap();
    let reply = tokio::time::timeout(BOUND, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((reply.instance.id.as_str(), reply.bytes), ("b", msg(2)));
}

#[tokio::test]
async fn a_message_nobody_answers_fails_clearly_at_its_deadline() {
    let mut c = config();
    c.message_timeout = Duration::from_millis(300);
    let (client, _tx) = client_over(vec![], c);
    let err = tokio::time::timeout(BOUND, client.send(msg(1)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("no passing instance of \"servernode\""),
        "{text}"
    );
    // The client is still usable afterwards.
    let err = client.send(msg(2)).await.unwrap_err();
    assert!(!err.is_permanent(), "{err}");
}

#[tokio::test]
async fn leaves_an_instance_consul_stops_listing_but_not_for_an_empty_set() {
    let a = Peer::start("a", Behaviour::Echo).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    let (client, tx) = client_over(vec![a.instance(), b.instance()], config());
    assert_eq!(client.send(msg(1)).await.unwrap().instance.id, "a");
    // Consul lists nothing (restarting, say): no better choice, stay on a.
    tx.send(Snapshot::fixed(vec![])).unwrap();
    assert_eq!(client.send(msg(2)).await.unwrap().instance.id, "a");
    // Consul lists only b: a is no longer passing, move.
    tx.send(Snapshot::fixed(vec![b.instance()])).unwrap();
    let reply = client.send(msg(3)).await.unwrap();
    assert_eq!((reply.instance.id.as_str(), reply.attempts), ("b", 1));
    assert_eq!(a.received(), 2);
}

#[tokio::test]
async fn a_permanent_discovery_failure_answers_every_message() {
    let (client, tx) = client_over(vec![], config());
    let mut pending = [tokio::spawn({
        let client = client.clone();
        async move { client.send(msg(1)).await }
    })];
    // Queued, waiting for an instance, before the failure arrives.
    none_finish_within(&mut pending, Duration::from_millis(50)).await;
    let [pending] = pending;
    let failed = Snapshot::fixed(vec![]).with_state(ConsulState::Failed {
        error: "Consul refused the ACL token (403)".into(),
    });
    tx.send(failed).unwrap();
    let err = tokio::time::timeout(BOUND, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Discovery { .. }), "{err}");
    assert!(err.to_string().contains("403"), "{err}");
    let again = client.send(msg(2)).await.unwrap_err();
    assert!(again.is_permanent());
}

#[tokio::test]
async fn a_session_recovers_when_discovery_does() {
    // A merged multi-datacenter view can show a failure (the local datacenter refused the
    // token while no other one listed an instance) and then instances again.
    let (client, tx) = client_over(vec![], config());
    tx.send(Snapshot::fixed(vec![]).with_state(ConsulState::Failed {
        error: "Consul refused the ACL token (403)".into(),
    }))
    .unwrap();
    let err = tokio::time::timeout(BOUND, client.send(msg(1)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Discovery { .. }), "{err}");
    let a = Peer::start("a", Behaviour::Echo).await;
    tx.send(Snapshot::fixed(vec![a.instance()])).unwrap();
    let reply = tokio::time::timeout(BOUND, client.send(msg(2)))
        .await
        .unwrap()
        .expect("discovery works again: so does the session");
    assert_eq!(reply.bytes, msg(2));
}

#[tokio::test]
async fn bad_messages_are_refused_before_queueing() {
    let mut c = config();
    c.max_frame = 8;
    let (client, _tx) = client_over(vec![], c);
    let err = client.send(&b"two\nlines"[..]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidMessage(_)), "{err}");
    let err = client.send(&b"123456789"[..]).await.unwrap_err();
    assert!(err.to_string().contains("largest frame"), "{err}");
    let mut bad = config();
    bad.reply_timeout = Duration::ZERO;
    let (_tx, rx) = watch::channel(Snapshot::fixed(vec![]));
    let err = EchoClient::with_discovery(rx, bad).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[tokio::test]
async fn a_small_queue_still_answers_every_waiting_sender() {
    let mut c = config();
    c.queue_capacity = 4;
    let (client, tx) = client_over(vec![], c);
    let mut sends: Vec<_> = (1..=40)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { (i, client.send(msg(i)).await) })
        })
        .collect();
    // The senders fill the queue and wait behind it; none is answered or refused.
    none_finish_within(&mut sends, Duration::from_millis(100)).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    tx.send(Snapshot::fixed(vec![b.instance()])).unwrap();
    for send in sends {
        let (i, result) = tokio::time::timeout(BOUND, send).await.unwrap().unwrap();
        assert_eq!(result.unwrap().bytes, msg(i));
    }
    assert_eq!(b.received(), 40);
}

/// A real echo-server, in process, with a handle to shut it down.
async fn real_server() -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<echo_server::Result<()>>,
) {
    let mut config = echo_server::Config::local();
    // A busy connection is cut 100 ms into the shutdown (the server's drain deadline).
    config.drain_timeout = Duration::from_millis(100);
    let server = echo_server::Server::bind(config).await.unwrap();
    let addr = server.echo_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        stopped.await.ok();
    }));
    (addr, stop, running)
}

#[tokio::test]
async fn with_real_echo_servers_a_shutdown_mid_stream_loses_nothing() {
    let (a_addr, stop_a, a) = real_server().await;
    let (b_addr, _stop_b, _b) = real_server().await;
    let instances = vec![
        Instance::new("a", "127.0.0.1", a_addr.port()),
        Instance::new("b", "127.0.0.1", b_addr.port()),
    ];
    let (client, _tx) = client_over(instances, config());
    let mut resent = 0;
    let mut stop_a = Some(stop_a);
    let mut by = std::collections::BTreeMap::<String, usize>::new();
    // Paced so the stream is still going when the drain deadline cuts it.
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..200usize {
        pace.tick().await;
        // Every byte value but the newline, shifted each message.
        let m: Vec<u8> = (0..=255u8)
            .map(|b| b.wrapping_add(i as u8))
            .filter(|b| *b != b'\n')
            .collect();
        let reply = tokio::time::timeout(BOUND, client.send(m.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.bytes, m, "message {i}");
        *by.entry(reply.instance.id).or_default() += 1;
        resent += usize::from(reply.attempts > 1);
        if i == 100 {
            stop_a.take().unwrap().send(()).unwrap();
        }
    }
    tokio::time::timeout(BOUND, a)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(by["a"] > 100 && by["b"] > 0, "{by:?}");
    assert!(
        resent <= 1,
        "at most the message in flight at the cut: {resent}"
    );
    assert_eq!(by.values().sum::<usize>(), 200);
}

#[tokio::test]
async fn waiting_for_an_instance_backs_off_instead_of_spinning() {
    // One refusing instance, then one that drops SYNs (set up on the real clock).
    let refusing = refusing("a");
    let hole = Blackhole::start().await;
    tokio::time::pause();
    // Connect timeout 2 s: longer than the longest cooldown (1.6 s).
    let cases = [
        (refusing, "refused", Duration::from_millis(500)),
        (
            hole.instance("a"),
            "no answer within",
            Duration::from_secs(2),
        ),
    ];
    for (instance, expect, connect_timeout) in cases {
        let events = SessionEvents::start();
        // Ejected after each try, and 30 s of waiting (paused clock).
        let mut c = config();
        c.message_timeout = Duration::from_secs(30);
        c.cooldown = Duration::from_millis(100);
        c.connect_timeout = connect_timeout;
        let (client, _tx) = client_over(vec![instance], c);
        let err = tokio::time::timeout(Duration::from_secs(60), client.send(msg(1)))
            .await
            .expect("the deadline fires")
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(err.to_string().contains(expect), "{err}");
        let n = events.count();
        eprintln!("{expect}: {n} session events while waiting 30 s");
        // Cooldowns double from 100 ms to 1.6 s and backoff grows to 1-2 s: a few dozen
        // tries in 30 s. A busy loop would log thousands.
        assert!(
            (2..=100).contains(&n),
            "{expect}: {n} retries logged in 30 s"
        );
    }
}

#[tokio::test]
async fn a_zero_cooldown_backs_off_instead_of_spinning() {
    let refusing = refusing("a");
    tokio::time::pause();
    let events = SessionEvents::start();
    let mut c = config();
    c.message_timeout = Duration::from_secs(10);
    c.cooldown = Duration::ZERO;
    let (client, _tx) = client_over(vec![refusing], c);
    let err = tokio::time::timeout(Duration::from_secs(60), client.send(msg(1)))
        .await
        .expect("the deadline fires")
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let n = events.count();
    eprintln!("cooldown 0: {n} session events while waiting 10 s");
    assert!((2..=60).contains(&n), "{n} retries logged in 10 s");
}

/// A listener on 127.0.0.1 that never accepts, with its accept queue full: the kernel drops
/// further SYNs, so a connect to it hangs until its timeout (a blackholed instance).
struct Blackhole {
    addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    async fn start() -> Blackhole {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        // Fill the queue: connects complete until it is full, then one hangs.
        loop {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => queued.push(stream),
                Ok(Err(e)) => panic!("filling the blackhole's queue: {e}"),
                Err(_) => break,
            }
            assert!(queued.len() < 16, "the accept queue never filled");
        }
        Blackhole {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }

    fn instance(&self, id: &str) -> Instance {
        Instance::new(id, "127.0.0.1", self.addr.port())
    }
}

#[tokio::test]
async fn a_pending_connect_still_serves_deadlines_and_discovery() {
    let hole = Blackhole::start().await;
    let mut c = config();
    c.connect_timeout = Duration::from_secs(30);
    c.message_timeout = Duration::from_millis(300);
    let (client, tx) = client_over(vec![hole.instance("a")], c);
    // The only instance drops SYNs: the deadline still answers, long before the connect
    // timeout.
    let err = tokio::time::timeout(Duration::from_secs(5), client.send(msg(1)))
        .await
        .expect("the deadline fires while a connect is pending")
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    // A healthy instance appears while the connect to a is still pending: used at once.
    let b = Peer::start("b", Behaviour::Echo).await;
    let sent = tokio::spawn({
        let client = client.clone();
        async move { client.send(msg(2)).await }
    });
    tx.send(Snapshot::fixed(vec![hole.instance("a"), b.instance()]))
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), sent)
        .await
        .expect("discovery is served while a connect is pending")
        .unwrap()
        .unwrap();
    assert_eq!((reply.instance.id.as_str(), reply.bytes), ("b", msg(2)));
}

#[tokio::test]
async fn three_blackholed_instances_cost_less_than_one_connect_timeout() {
    let holes = [
        Blackhole::start().await,
        Blackhole::start().await,
        Blackhole::start().await,
    ];
    let z = Peer::start("z", Behaviour::Echo).await;
    let mut instances: Vec<_> = holes
        .iter()
        .enumerate()
        .map(|(i, h)| h.instance(&format!("hole{i}")))
        .collect();
    instances.push(z.instance());
    let mut c = config();
    c.connect_timeout = Duration::from_secs(1);
    c.cooldown = Duration::from_secs(2);
    let (client, _tx) = client_over(instances, c.clone());
    let started = tokio::time::Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    for i in 0..20 {
        pace.tick().await;
        let reply = tokio::time::timeout(BOUND, client.send(msg(i)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((reply.instance.id.as_str(), reply.bytes), ("z", msg(i)));
    }
    let took = started.elapsed();
    let stream = Duration::from_millis(50 * 19);
    eprintln!("20 messages at 50 ms past 3 blackholed instances: {took:?}");
    // Tried one after another, the holes would cost 3 connect timeouts.
    assert!(
        took < stream + c.connect_timeout,
        "{took:?}: more than the stream plus one connect timeout"
    );
}

#[tokio::test]
async fn a_thousand_concurrent_64k_messages_through_one_real_server() {
    let (addr, _stop, _server) = real_server().await;
    let mut c = config();
    c.reply_timeout = Duration::from_secs(2);
    c.message_timeout = Duration::from_secs(60);
    // Nothing listed yet (discovery starting): the batch queues, then goes out at once.
    let (client, tx) = client_over(vec![], c);
    let size = echo_server::codec::DEFAULT_MAX_FRAME;
    let mut sends: Vec<_> = (0..1000usize)
        .map(|i| {
            let client = client.clone();
            let m = Bytes::from(vec![b'a' + (i % 26) as u8; size]);
            tokio::spawn(async move { (m.clone(), client.send(m).await) })
        })
        .collect();
    none_finish_within(&mut sends, Duration::from_millis(300)).await;
    tx.send(Snapshot::fixed(vec![Instance::new(
        "a",
        "127.0.0.1",
        addr.port(),
    )]))
    .unwrap();
    let results = tokio::time::timeout(Duration::from_secs(60), join_all(sends))
        .await
        .expect("a large batch does not deadlock");
    for result in results {
        let (m, result) = result.unwrap();
        let reply = result.unwrap();
        assert!(reply.bytes == m, "byte-exact");
        assert_eq!(
            reply.attempts, 1,
            "written once: the instance was never ejected"
        );
    }
}

#[tokio::test]
async fn a_deadline_answers_timeout_and_never_ejects_an_answering_instance() {
    let (echo, frozen) = watch::channel(true);
    let a = Peer::start("a", Behaviour::Freezable(frozen)).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    let mut c = config();
    c.message_timeout = Duration::from_millis(300);
    c.reply_timeout = Duration::from_secs(5);
    c.spread = false;
    // On a first (round-robin starts at a random instance), then b is listed too.
    let (client, tx) = client_over(vec![a.instance()], c);
    assert_eq!(client.send(msg(0)).await.unwrap().instance.id, "a");
    tx.send(Snapshot::fixed(vec![a.instance(), b.instance()]))
        .unwrap();
    echo.send(false).unwrap();
    // a holds the message past its deadline: the caller gets Timeout.
    let err = tokio::time::timeout(BOUND, client.send(msg(1)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    // a answers again (its late reply to msg 1 comes first): the next message stays on a
    // and gets its own bytes back.
    echo.send(true).unwrap();
    let reply = tokio::time::timeout(BOUND, client.send(msg(2)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (reply.instance.id.as_str(), reply.bytes, reply.attempts),
        ("a", msg(2), 1)
    );
    assert_eq!(b.received(), 0, "nothing was resent elsewhere");
}

#[tokio::test]
async fn an_expired_message_is_never_written() {
    let mut c = config();
    c.message_timeout = Duration::from_millis(200);
    let (client, tx) = client_over(vec![], c);
    let err = client.send(msg(1)).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let a = Peer::start("a", Behaviour::Echo).await;
    tx.send(Snapshot::fixed(vec![a.instance()])).unwrap();
    assert_eq!(client.send(msg(2)).await.unwrap().bytes, msg(2));
    assert_eq!(a.received(), 1, "only the live message was written");
}

#[tokio::test]
async fn a_reply_that_is_not_the_message_is_an_error_of_its_own() {
    let a = Peer::start("a", Behaviour::Garble).await;
    let (client, _tx) = client_over(vec![a.instance()], config());
    let err = tokio::time::timeout(BOUND, client.send(msg(1)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::NotAnEcho { .. }), "{err}");
    assert!(err.to_string().contains("HELLO WORLD, 001"), "{err}");
}

#[tokio::test]
async fn a_server_frame_limit_is_a_clear_error_not_an_echo() {
    let mut config_a = echo_server::Config::local();
    config_a.max_frame = 16;
    let server = echo_server::Server::bind(config_a).await.unwrap();
    let addr = server.echo_addr();
    let _server = tokio::spawn(server.run(std::future::pending::<()>()));
    let (client, _tx) = client_over(vec![Instance::new("a", "127.0.0.1", addr.port())], config());
    let long = Bytes::from(vec![b'x'; 100]);
    let err = tokio::time::timeout(BOUND, client.send(long))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::FrameTooLong { .. }), "{err}");
    assert!(
        err.to_string().contains("frame longer than 16 bytes"),
        "{err}"
    );
    // The instance is not ejected: a short message goes through at once.
    let reply = tokio::time::timeout(Duration::from_secs(2), client.send(&b"short"[..]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.bytes, &b"short"[..]);
}

#[tokio::test]
async fn same_id_on_two_nodes_are_two_instances() {
    let mut a = Peer::start("servernode_1", Behaviour::Echo).await;
    let b = Peer::start("servernode_1", Behaviour::Echo).await;
    let on = |p: &Peer, node: &str| Instance {
        node: node.into(),
        ..p.instance()
    };
    let (client, _tx) = client_over(vec![on(&a, "node-a"), on(&b, "node-b")], config());
    let first = client.send(msg(1)).await.unwrap();
    let alive = if first.instance.port == a.addr.port() {
        a.kill().await;
        b.addr.port()
    } else {
        drop(b);
        a.addr.port()
    };
    // Ejecting the dead one must not eject its namesake (cooldown 5 s).
    let reply = tokio::time::timeout(Duration::from_secs(2), client.send(msg(2)))
        .await
        .expect("the other servernode_1 is used at once")
        .unwrap();
    assert_eq!(reply.instance.port, alive);
}

#[tokio::test]
async fn an_idle_close_drops_the_connection_without_ejecting() {
    let a = Peer::start("a", Behaviour::IdleCloseAfter(1)).await;
    let (client, _tx) = client_over(vec![a.instance()], config());
    client.send(msg(1)).await.unwrap();
    let mut closed = a.closed.clone();
    closed.wait_for(|n| *n >= 1).await.unwrap();
    // Cooldown is 5 s: an ejection would hold the next message that long.
    let reply = tokio::time::timeout(Duration::from_secs(2), client.send(msg(2)))
        .await
        .expect("no ejection after an idle close")
        .unwrap();
    assert_eq!((reply.instance.id.as_str(), reply.attempts), ("a", 1));
    assert_eq!(a.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_renamed_node_keeps_the_working_connection() {
    let a = Peer::start("a", Behaviour::Echo).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    let on = |p: &Peer, node: &str| Instance {
        node: node.into(),
        ..p.instance()
    };
    let (client, tx) = client_over(vec![on(&a, "n1"), on(&b, "n1")], config());
    let first = client.send(msg(1)).await.unwrap().instance.id;
    // The agent came back under a new node name: same address, same instance (and nothing
    // new to spread to).
    tx.send(Snapshot::fixed(vec![on(&a, "n2"), on(&b, "n2")]))
        .unwrap();
    assert_eq!(client.send(msg(2)).await.unwrap().instance.id, first);
    let connections = a.connections.load(Ordering::SeqCst) + b.connections.load(Ordering::SeqCst);
    assert_eq!(connections, 1, "kept");
}

#[tokio::test(start_paused = true)]
async fn message_deadlines_do_not_skip_the_backoff() {
    let events = SessionEvents::start();
    let mut c = config();
    c.message_timeout = Duration::from_secs(1);
    let (client, _tx) = client_over(vec![], c);
    // 100 deadlines, 10 ms apart, while nothing is listed.
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    let mut sends = Vec::new();
    for i in 0..100 {
        pace.tick().await;
        let client = client.clone();
        sends.push(tokio::spawn(async move { client.send(msg(i)).await }));
    }
    for send in sends {
        assert!(matches!(send.await.unwrap(), Err(Error::Timeout { .. })));
    }
    let n = events.count();
    eprintln!("{n} session events over 2 s of 100 deadlines");
    // The backoff (50 ms doubling to 1 s) allows about 6 tries in 2 s; one per deadline
    // would be over 100.
    assert!((1..=20).contains(&n), "{n} tries");
}

#[tokio::test]
async fn a_scale_out_spreads_sessions_over_the_new_instances_and_loses_nothing() {
    let a = Peer::start("a", Behaviour::Echo).await;
    let (tx, rx) = watch::channel(Snapshot::fixed(vec![a.instance()]));
    // Unseeded: each session draws for itself.
    let unseeded = || SessionConfig {
        seed: None,
        ..config()
    };
    let sessions: Vec<EchoClient> = (0..100)
        .map(|_| EchoClient::with_discovery(rx.clone(), unseeded()).unwrap())
        .collect();
    for s in &sessions {
        let reply = tokio::time::timeout(BOUND, s.send(msg(0)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.instance.id, "a");
    }
    let b = Peer::start("b", Behaviour::Echo).await;
    let c = Peer::start("c", Behaviour::Echo).await;
    let d = Peer::start("d", Behaviour::Echo).await;
    tx.send(Snapshot::fixed(vec![
        a.instance(),
        b.instance(),
        c.instance(),
        d.instance(),
    ]))
    .unwrap();
    let mut per_instance = std::collections::BTreeMap::<String, usize>::new();
    for s in &sessions {
        let mut last = String::new();
        for i in 1..=3 {
            let reply = tokio::time::timeout(BOUND, s.send(msg(i)))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(reply.bytes, msg(i), "byte-exact, nothing lost");
            assert_eq!(reply.attempts, 1, "moved between messages: nothing resent");
            last = reply.instance.id.clone();
        }
        *per_instance.entry(last).or_default() += 1;
    }
    eprintln!("sessions per instance after the scale-out: {per_instance:?}");
    // 25 each expected; fewer than 5 is 4.6 standard deviations off. Without spreading, all
    // 100 stay on a.
    for id in ["a", "b", "c", "d"] {
        let n = per_instance.get(id).copied().unwrap_or(0);
        assert!(n >= 5, "{id}: {n} of 100 sessions ({per_instance:?})");
    }
}

#[tokio::test]
async fn many_round_robin_sessions_do_not_all_start_on_the_first_instance() {
    let peers = [
        Peer::start("a", Behaviour::Echo).await,
        Peer::start("b", Behaviour::Echo).await,
        Peer::start("c", Behaviour::Echo).await,
        Peer::start("d", Behaviour::Echo).await,
    ];
    let (_tx, rx) = watch::channel(Snapshot::fixed(peers.iter().map(Peer::instance).collect()));
    let mut per_instance = std::collections::BTreeMap::<String, usize>::new();
    let mut sessions = Vec::new();
    for _ in 0..100 {
        let session = EchoClient::with_discovery(
            rx.clone(),
            SessionConfig {
                seed: None,
                ..config()
            },
        )
        .unwrap();
        let reply = tokio::time::timeout(BOUND, session.send(msg(1)))
            .await
            .unwrap()
            .unwrap();
        *per_instance.entry(reply.instance.id).or_default() += 1;
        sessions.push(session);
    }
    eprintln!("first instance of 100 sessions: {per_instance:?}");
    // 25 each expected; fewer than 5 is 4.6 standard deviations off. A fixed start puts all
    // 100 on a.
    for id in ["a", "b", "c", "d"] {
        let n = per_instance.get(id).copied().unwrap_or(0);
        assert!(n >= 5, "{id}: {n} of 100 ({per_instance:?})");
    }
}

fn standby_config() -> SessionConfig {
    let mut c = config();
    c.standby = true;
    c.spread = false;
    c
}

#[tokio::test]
async fn a_kill_resends_on_the_standby_opened_before_it_exactly_once_and_in_order() {
    let (echo, frozen) = watch::channel(true);
    let a = Peer::start("a", Behaviour::Freezable(frozen)).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    let (client, _tx) = client_over(vec![a.instance(), b.instance()], standby_config());
    assert_eq!(client.send(msg(0)).await.unwrap().instance.id, "a");
    // The standby: one connection to b, its probe echoed.
    wait_for(&b, 1, 1, "the standby is open before the kill").await;
    echo.send(false).unwrap();
    let resent = kill_a_holding_messages_and_send_200(a, &client).await;
    assert!(resent >= 10, "resent on b: {resent}");
    assert_eq!(
        b.connections.load(Ordering::SeqCst),
        1,
        "the failover wrote on the standby: no connect after the kill"
    );
    assert_eq!(b.received(), 201, "the probe, then each message once");
}

#[tokio::test]
async fn the_standby_is_replaced_when_its_instance_leaves_and_when_it_closes() {
    let a = Peer::start("a", Behaviour::Echo).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    // c echoes the probe, then closes the connection (an idle timeout, a shed).
    let c = Peer::start("c", Behaviour::IdleCloseAfter(1)).await;
    let (client, tx) = client_over(vec![a.instance(), b.instance()], standby_config());
    assert_eq!(client.send(msg(0)).await.unwrap().instance.id, "a");
    wait_for(&b, 1, 1, "the standby on b").await;
    // Consul stops listing b and lists c: the standby moves to c.
    tx.send(Snapshot::fixed(vec![a.instance(), c.instance()]))
        .unwrap();
    wait_for(&c, 1, 1, "b left: a standby on c").await;
    // c closed it: a new one, after the retry pause.
    let closed = std::time::Instant::now();
    wait_for(&c, 2, 2, "c closed the standby: another one").await;
    assert!(closed.elapsed() >= echo_client::session::STANDBY_RETRY / 2);
    // Messages stay on a, answered once each.
    for i in 1..=5 {
        let reply = client.send(msg(i)).await.unwrap();
        assert_eq!((reply.bytes, reply.instance.id.as_str()), (msg(i), "a"));
    }
    assert_eq!(a.received(), 6);
    assert_eq!(a.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn without_the_standby_no_second_connection_is_opened() {
    let a = Peer::start("a", Behaviour::Echo).await;
    let b = Peer::start("b", Behaviour::Echo).await;
    let mut c = standby_config();
    c.standby = false;
    let (client, _tx) = client_over(vec![a.instance(), b.instance()], c);
    // The control: the same sends by a client with the standby on, over peers of its own.
    let (a2, b2) = (
        Peer::start("a", Behaviour::Echo).await,
        Peer::start("b", Behaviour::Echo).await,
    );
    let (control, _tx2) = client_over(vec![a2.instance(), b2.instance()], standby_config());
    for i in 0..20 {
        assert_eq!(client.send(msg(i)).await.unwrap().instance.id, "a");
        assert_eq!(control.send(msg(i)).await.unwrap().instance.id, "a");
    }
    // By the time the control holds its standby (opened at its first reply), this client
    // would hold one too.
    wait_for(&b2, 1, 1, "the control's standby on b").await;
    assert_eq!(b.connections.load(Ordering::SeqCst), 0);
}
