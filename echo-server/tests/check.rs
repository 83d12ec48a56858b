//! `/check`, in process and without Consul: 200 while serving, 503 when forced unhealthy
//! (echo still answering) and while draining, 404 on any other path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{LIMIT, Running, connect, echo, get};
use echo_server::{CheckStatus, Config};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::test]
async fn check_is_200_and_other_paths_are_404() {
    let server = Running::local().await;
    assert_eq!(get(&server.url("/check")).await.0, 200);
    for path in ["/", "/checks", "/check/x", "/health", "/CHECK"] {
        assert_eq!(get(&server.url(path)).await.0, 404, "{path}");
    }
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = client.post(server.url("/check")).send().await.unwrap();
    assert_eq!(post.status().as_u16(), 405);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_check_path_is_configurable() {
    let server = Running::start(Config {
        check_path: "/v1/alive".into(),
        ..Config::local()
    })
    .await;
    assert_eq!(get(&server.url("/v1/alive")).await.0, 200);
    assert_eq!(get(&server.url("/check")).await.0, 404);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn forced_unhealthy_is_503_while_echo_keeps_answering() {
    let server = Running::local().await;
    let mut conn = connect(server.echo).await;
    server.health.set_healthy(false);
    assert_eq!(server.health.status(), CheckStatus::ForcedUnhealthy);
    let (status, body) = get(&server.url("/check")).await;
    assert_eq!(status, 503);
    assert!(body.contains("forced"), "{body}");
    assert_eq!(echo(&mut conn, b"still echoing").await, b"still echoing");
    server.health.set_healthy(true);
    assert_eq!(get(&server.url("/check")).await.0, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn check_is_503_while_draining_and_gone_after() {
    let mut server = Running::start(Config {
        drain_timeout: Duration::from_secs(30),
        ..Config::local()
    })
    .await;
    // A peer with answers it has not read yet keeps the drain going until it reads them:
    // more than every socket buffer on the way holds, so the server's writes block.
    let client = tokio::net::TcpSocket::new_v4().unwrap();
    client.set_recv_buffer_size(4096).unwrap();
    let mut socket = client.connect(server.echo).await.unwrap();
    socket.write_all(b"pending\n").await.unwrap();
    let mut first = [0u8; 8];
    socket.read_exact(&mut first).await.unwrap();
    let mut burst = Vec::new();
    for i in 0..2048 {
        burst.extend_from_slice(format!("{i:08}").as_bytes());
        burst.extend_from_slice(&[b'.'; 8183]);
        burst.push(b'\n');
    }
    let (mut reader, mut writer) = socket.into_split();
    let sent = burst.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer
    });

    server.begin_shutdown();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (status, body) = get(&server.url("/check")).await;
        if status == 503 {
            assert!(body.contains("draining"), "{body}");
            break;
        }
        assert_eq!(status, 200, "before the shutdown is seen");
        assert!(tokio::time::Instant::now() < deadline, "never turned 503");
        tokio::task::yield_now().await;
    }
    // Other paths still 404 while draining.
    assert_eq!(get(&server.url("/other")).await.0, 404);

    // Now read: every frame is answered, then the connection closes and the server stops.
    let mut answers = Vec::new();
    tokio::time::timeout(LIMIT, reader.read_to_end(&mut answers))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answers, burst);
    drop(writing.await.unwrap());
    let check = server.check;
    server.stopped().await.unwrap();
    assert!(
        TcpStream::connect(check).await.is_err(),
        "/check stops last, after the drain"
    );
}

#[tokio::test]
async fn silent_connections_cannot_starve_the_check() {
    let server = Running::local().await;
    // Far more connections than /check serves at once, connected and silent: each would
    // hold a slot until the header timeout.
    let mut silent = Vec::new();
    for _ in 0..256 {
        silent.push(TcpStream::connect(server.check).await.unwrap());
    }
    // The agent's request is still answered within the check's timeout (3 s by default).
    let timeout = Config::default().timeout;
    let (status, _) = tokio::time::timeout(timeout, get(&server.url("/check")))
        .await
        .expect("answered within the check timeout");
    assert_eq!(status, 200);
    drop(silent);
    server.shutdown().await.unwrap();
}
