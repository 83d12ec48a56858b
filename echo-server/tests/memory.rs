//! Memory stays bounded under idle and hostile peers, measured on the server alone: the
//! `echo-server` binary runs as a child process and its `VmRSS` is read from `/proc`.
//! 1,000 idle connections, connections idle after a frame at the limit, a peer that floods
//! bytes without a newline and one that parks a partial frame, while other clients are
//! served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::SocketAddr, process::Stdio};

use common::LIMIT;
use echo_server::{codec::DEFAULT_MAX_FRAME, server::SHRINK_AFTER};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
};

/// What README.md states an idle connection costs the server, in KiB: after a small frame
/// and after one at the 64 KiB limit alike.
const README_KIB_PER_IDLE_CONNECTION: f64 = 8.0;

/// An `echo-server` process without registration, on free ports.
struct ServerProcess {
    child: Child,
    echo: SocketAddr,
}

impl ServerProcess {
    async fn start(max_connections: usize) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_echo-server"))
            .args(["--no-register", "--port", "0", "--check-port", "0"])
            .args(["--max-connections", &max_connections.to_string()])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let listening = tokio::time::timeout(LIMIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("echo-server listening") {
                    return line;
                }
            }
            panic!("echo-server exited before listening");
        })
        .await
        .expect("echo-server listens in time");
        let echo = listening
            .split_whitespace()
            .find_map(|field| field.strip_prefix("echo="))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no echo address in {listening:?}"));
        // Keep reading its log, so that a full pipe never blocks it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServerProcess { child, echo }
    }

    /// The server's resident set, in KiB.
    fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("still running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

/// Send `frame` on a raw connection (no client-side framing) and check its echo.
async fn round_trip(socket: &mut TcpStream, frame: &[u8]) {
    socket.write_all(frame).await.unwrap();
    socket.write_all(b"\n").await.unwrap();
    let mut answer = vec![0u8; frame.len() + 1];
    tokio::time::timeout(LIMIT, socket.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(&answer[..frame.len()], frame);
}

/// A raw connection that has echoed `frame` once.
async fn echoed_once(addr: SocketAddr, frame: &[u8]) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut socket, frame).await;
    socket
}

/// Open `n` connections that each echo `frame` once and then stay idle; returns them and
/// the server's RSS growth per connection, in KiB.
async fn idle_connections(server: &ServerProcess, n: usize, frame: &[u8]) -> (Vec<TcpStream>, f64) {
    let before = server.rss_kib();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(echoed_once(server.echo, frame).await);
    }
    // The goal is what a connection costs once idle for one period: a connection gives back
    // what its buffer grew SHRINK_AFTER after its last frame. This wait is the definition
    // being tested, not a guess at how long something takes.
    tokio::time::sleep(SHRINK_AFTER * 2).await;
    let with = server.rss_kib();
    (held, with.saturating_sub(before) as f64 / n as f64)
}

#[tokio::test]
async fn an_idle_connection_costs_what_the_readme_says_even_after_a_large_frame() {
    let server = ServerProcess::start(4096).await;
    echoed_once(server.echo, b"warm up").await;

    let (small, after_small) = idle_connections(&server, 1000, b"a small frame").await;
    let large_frame = vec![b'L'; DEFAULT_MAX_FRAME];
    let (large, after_large) = idle_connections(&server, 500, &large_frame).await;
    eprintln!(
        "echo-server RSS per idle connection: {after_small:.1} KiB after a 13-byte frame \
         (1,000 connections), {after_large:.1} KiB after a {DEFAULT_MAX_FRAME}-byte frame \
         (500 connections); README states {README_KIB_PER_IDLE_CONNECTION} KiB"
    );
    assert!(
        after_small <= README_KIB_PER_IDLE_CONNECTION,
        "{after_small:.1} KiB per idle connection"
    );
    assert!(
        after_large <= README_KIB_PER_IDLE_CONNECTION,
        "{after_large:.1} KiB per connection idle after a frame at the limit: its buffers \
         did not shrink back"
    );
    // Still served, each of them.
    for mut socket in small
        .into_iter()
        .step_by(97)
        .chain(large.into_iter().step_by(47))
    {
        round_trip(&mut socket, b"wake up").await;
    }
}

#[tokio::test]
async fn a_parked_frame_and_a_newline_less_flood_leave_memory_bounded() {
    let server = ServerProcess::start(64).await;
    let mut probe = echoed_once(server.echo, b"warm up").await;
    let before = server.rss_kib();

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

    // Everyone else is still served.
    round_trip(&mut probe, b"still served").await;
    echoed_once(server.echo, b"newcomer").await;
    let after = server.rss_kib();
    eprintln!(
        "echo-server RSS: {before} KiB before, {after} KiB after a parked 60 KiB frame and a \
         {} KiB flood",
        sent >> 10
    );
    // The parked frame's buffer (up to 128 KiB as it grows) and the flood's, at most 128 KiB
    // again before it is refused: nothing near the 16 MiB sent.
    assert!(
        after.saturating_sub(before) < 1024,
        "a parked frame and a 16 MiB flood cost {} KiB",
        after.saturating_sub(before)
    );
    drop(parked);
}
