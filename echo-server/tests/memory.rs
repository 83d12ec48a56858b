//! Memory stays bounded under idle and hostile peers: 1,000 idle connections, a peer that
//! floods bytes without a newline and one that parks a partial frame, while other clients are
//! served. Its own test binary, so that no other test's allocations move the process RSS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{LIMIT, Running, connect, echo};
use echo_server::{Config, codec::EchoCodec};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::codec::Framed;

/// The resident set of this process, in KiB, from `/proc/self/status`.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

const IDLE: usize = 1000;

#[tokio::test]
async fn idle_connections_and_newline_less_peers_leave_memory_bounded() {
    let server = Running::start(Config {
        max_connections: 2 * IDLE,
        ..Config::local()
    })
    .await;
    let mut probe = connect(server.echo).await;
    assert_eq!(echo(&mut probe, b"warm up").await, b"warm up");
    let before = rss_kib();

    // 1,000 peers, each answered once (so each handler has used its buffers), then idle.
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        // Client-side buffers kept tiny, so the growth measured is mostly the server's.
        let stream = TcpStream::connect(server.echo).await.unwrap();
        let mut conn = Framed::with_capacity(stream, EchoCodec::default(), 64);
        let frame = format!("idle peer {i}");
        assert_eq!(echo(&mut conn, frame.as_bytes()).await, frame.as_bytes());
        idle.push(conn);
    }
    let with_idle = rss_kib();

    // A peer parks 60 KiB of a frame (under the 64 KiB limit) and never ends it.
    let mut parked = TcpStream::connect(server.echo).await.unwrap();
    parked.write_all(&[b'p'; 60 << 10]).await.unwrap();

    // A peer floods 16 MiB without a newline: one error line after 64 KiB, then closed.
    let mut flood = TcpStream::connect(server.echo).await.unwrap();
    let chunk = vec![0xabu8; 64 << 10];
    let mut sent = 0usize;
    while sent < 16 << 20 {
        match tokio::time::timeout(LIMIT, flood.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(_)) => break, // the server closed it
            Err(_) => panic!("the flood neither went through nor was refused"),
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(LIMIT, flood.read_to_end(&mut answer))
        .await
        .expect("the flooding peer is closed");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("error: frame longer than 65536 bytes\n"),
        "{:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(100)])
    );

    // Everyone else is still served, fast.
    assert_eq!(echo(&mut probe, b"still served").await, b"still served");
    let mut late = connect(server.echo).await;
    assert_eq!(echo(&mut late, b"newcomer").await, b"newcomer");
    for conn in idle.iter_mut().step_by(97) {
        assert_eq!(echo(conn, b"wake up").await, b"wake up");
    }
    let after = rss_kib();

    let per_idle = (with_idle.saturating_sub(before)) as f64 / IDLE as f64;
    eprintln!(
        "RSS: {before} KiB before, {with_idle} KiB with {IDLE} idle connections \
         ({per_idle:.1} KiB each, both ends in this process), {after} KiB after the \
         parked and flooding peers ({} KiB flooded)",
        sent >> 10
    );
    // Generous: 64 KiB per connection would be a buffer per peer at the frame limit.
    assert!(
        with_idle.saturating_sub(before) < 64 * 1024,
        "{IDLE} idle connections cost {} KiB",
        with_idle - before
    );
    assert!(
        after.saturating_sub(with_idle) < 32 * 1024,
        "a parked frame and a 16 MiB flood cost {} KiB",
        after - with_idle
    );
    drop(idle);
    drop(parked);
    server.shutdown().await.unwrap();
}
