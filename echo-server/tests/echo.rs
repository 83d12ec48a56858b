//! The echo port, in process and without Consul: byte-exact echo of arbitrary bytes, one
//! error line and a close for an oversized frame (others untouched), the connection cap, the
//! idle timeout, and a shutdown that answers in-flight frames before closing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{LIMIT, Running, answers_across_shutdown, connect, echo};
use echo_server::{Config, codec::DEFAULT_MAX_FRAME};
use futures::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Random bytes of every value but the newline (0x00, 0xff, `\r`, invalid UTF-8...).
fn payload(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| match rng.random::<u8>() {
            b'\n' => 0xff,
            b => b,
        })
        .collect()
}

#[tokio::test]
async fn random_binary_payloads_come_back_byte_exact() {
    let server = Running::local().await;
    let mut tasks = Vec::new();
    for seed in 0..8u64 {
        let addr = server.echo;
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut frames: Vec<Vec<u8>> = vec![
                Vec::new(),
                payload(&mut rng, DEFAULT_MAX_FRAME),
                vec![0x00, 0xff, 0xfe, b'\r', 0xc3, 0x28],
            ];
            for _ in 0..150 {
                let len = match rng.random_range(0..10) {
                    0 => rng.random_range(0..=DEFAULT_MAX_FRAME),
                    _ => rng.random_range(0..512),
                };
                frames.push(payload(&mut rng, len));
            }
            // Pipelined: everything is written while answers are read.
            let (mut sink, mut stream) = connect(addr).await.split();
            let sent = frames.clone();
            let writer = tokio::spawn(async move {
                for frame in sent {
                    sink.feed(frame).await.unwrap();
                }
                sink.flush().await.unwrap();
                sink
            });
            for (i, frame) in frames.iter().enumerate() {
                let got = tokio::time::timeout(LIMIT, stream.next())
                    .await
                    .expect("answer in time")
                    .expect("connection open")
                    .expect("valid frame");
                assert_eq!(&got[..], &frame[..], "frame {i} of connection {seed}");
            }
            drop(writer.await.unwrap());
            frames.len()
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 8 * 153);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn raw_bytes_without_the_codec_are_echoed_as_they_are() {
    let server = Running::local().await;
    let mut socket = TcpStream::connect(server.echo).await.unwrap();
    // Split across writes, mid-frame, with `\r\n`: the newline alone ends a frame.
    socket.write_all(b"hel").await.unwrap();
    socket.flush().await.unwrap();
    socket.write_all(b"lo\r\n\xff\x00\n").await.unwrap();
    socket.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, socket.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, b"hello\r\n\xff\x00\n");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_oversized_frame_closes_only_its_connection() {
    let server = Running::start(Config {
        max_frame: 1024,
        ..Config::local()
    })
    .await;
    let mut bystander = connect(server.echo).await;
    assert_eq!(echo(&mut bystander, b"before").await, b"before");

    let mut offender = TcpStream::connect(server.echo).await.unwrap();
    offender.write_all(b"fine\n").await.unwrap();
    offender.write_all(&[b'x'; 5000]).await.unwrap();
    offender.write_all(b"\nafter\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, offender.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .expect("closed cleanly, not reset");
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "fine\nerror: frame longer than 1024 bytes\n",
        "the frames before are answered, then exactly one error line, then EOF"
    );

    // Exactly the limit is fine, on the untouched connection and on a new one.
    let max = vec![b'm'; 1024];
    assert_eq!(echo(&mut bystander, &max).await, max);
    let mut newcomer = connect(server.echo).await;
    assert_eq!(echo(&mut newcomer, b"new").await, b"new");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_megabyte_of_frames_in_one_write_is_answered_up_to_the_frame_over_the_limit() {
    // 1 MiB of frames of every length up to the limit, written at once (the server reads it
    // in batches that end anywhere, mid-frame included), then one frame over the limit,
    // then more: everything before it comes back byte-exact, then the error line, then EOF.
    let max = 100;
    let server = Running::start(Config {
        max_frame: max,
        ..Config::local()
    })
    .await;
    let mut rng = StdRng::seed_from_u64(16);
    let mut before = Vec::new();
    while before.len() < 1 << 20 {
        let len = rng.random_range(0..=max);
        before.extend(payload(&mut rng, len));
        before.push(b'\n');
    }
    let mut wire = before.clone();
    wire.extend(payload(&mut rng, max + 1));
    wire.extend_from_slice(b"\nnever answered\n");
    let (mut read, mut write) = TcpStream::connect(server.echo).await.unwrap().into_split();
    let writer = tokio::spawn(async move {
        // The server may close before taking the rest: that is its answer.
        let _ = write.write_all(&wire).await;
        write
    });
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, read.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .expect("closed cleanly, not reset");
    let error = format!("error: frame longer than {max} bytes\n");
    assert_eq!(answer.len(), before.len() + error.len());
    assert!(
        answer[..before.len()] == before[..],
        "the frames before, byte-exact"
    );
    assert_eq!(String::from_utf8_lossy(&answer[before.len()..]), error);
    drop(writer.await.unwrap());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_tiny_frame_limit_still_gets_the_whole_error_line() {
    let server = Running::start(Config {
        max_frame: 4,
        ..Config::local()
    })
    .await;
    let mut socket = TcpStream::connect(server.echo).await.unwrap();
    socket.write_all(b"1234\n12345\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, socket.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "1234\nerror: frame longer than 4 bytes\n"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_connection_cap_holds_excess_peers_until_a_slot_frees() {
    let server = Running::start(Config {
        max_connections: 2,
        ..Config::local()
    })
    .await;
    let mut a = connect(server.echo).await;
    let mut b = connect(server.echo).await;
    assert_eq!(echo(&mut a, b"a").await, b"a");
    assert_eq!(echo(&mut b, b"b").await, b"b");

    // The third peer's handshake completes in the backlog, but nobody serves it.
    let mut c = connect(server.echo).await;
    c.send(&b"c"[..]).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), c.next()).await;
    assert!(early.is_err(), "served beyond the cap: {early:?}");

    drop(a);
    let answer = tokio::time::timeout(LIMIT, c.next())
        .await
        .expect("served once a slot is free")
        .unwrap()
        .unwrap();
    assert_eq!(&answer[..], b"c");
    assert_eq!(echo(&mut b, b"still").await, b"still");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn idle_peers_are_closed_and_busy_ones_are_not() {
    let idle_timeout = Duration::from_millis(400);
    let server = Running::start(Config {
        idle_timeout,
        ..Config::local()
    })
    .await;
    let mut idle = TcpStream::connect(server.echo).await.unwrap();
    let connected = Instant::now();
    let mut busy = connect(server.echo).await;
    // The idle peer's close is timed as it happens, while the busy peer talks.
    let closed = tokio::spawn(async move {
        let mut rest = Vec::new();
        let n = idle.read_to_end(&mut rest).await.unwrap();
        (n, connected.elapsed())
    });

    // The busy peer talks every 100 ms for well past the idle timeout.
    let mut rounds = 0;
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while connected.elapsed() < idle_timeout * 3 {
        pace.tick().await;
        assert_eq!(echo(&mut busy, b"ping").await, b"ping");
        rounds += 1;
    }
    assert!(rounds >= 5);

    let (n, after) = tokio::time::timeout(LIMIT, closed)
        .await
        .expect("the idle peer is closed")
        .unwrap();
    assert_eq!(n, 0, "closed without a word");
    // Not before the timeout; after it by no more than timer and scheduling delays.
    assert!(after >= idle_timeout, "closed after {after:?}");
    assert!(
        after < idle_timeout + Duration::from_millis(500),
        "closed {after:?} after connecting, for an idle timeout of {idle_timeout:?}"
    );
    assert_eq!(echo(&mut busy, b"still here").await, b"still here");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn when_every_slot_is_taken_the_longest_idle_peer_makes_room() {
    // The default idle timeout (300 s): without shedding, the newcomer would wait that long.
    let server = Running::start(Config {
        max_connections: 2,
        ..Config::local()
    })
    .await;
    let mut oldest = connect(server.echo).await;
    assert_eq!(echo(&mut oldest, b"a").await, b"a");
    let mut newer = connect(server.echo).await;
    assert_eq!(echo(&mut newer, b"b").await, b"b");

    let mut newcomer = connect(server.echo).await;
    newcomer.send(&b"c"[..]).await.unwrap();
    let answer = tokio::time::timeout(LIMIT, newcomer.next())
        .await
        .expect("served within seconds: an idle peer was closed to make room")
        .unwrap()
        .unwrap();
    assert_eq!(&answer[..], b"c");
    let shed = tokio::time::timeout(LIMIT, oldest.next())
        .await
        .expect("the longest idle peer is closed");
    assert!(shed.is_none(), "closed without a word: {shed:?}");
    assert_eq!(echo(&mut newer, b"still").await, b"still");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_answers_in_flight_frames_then_stops_accepting() {
    let mut server = Running::local().await;
    let addr = server.echo;
    // Everything is sent, then the shutdown starts before a single answer is read.
    let (burst, answers) = answers_across_shutdown(&mut server).await;
    assert_eq!(answers.len(), burst.len(), "every in-flight frame answered");
    assert_eq!(answers, burst);
    server.stopped().await.unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the echo port no longer accepts"
    );
}

#[tokio::test]
async fn the_drain_deadline_cuts_a_peer_that_never_reads() {
    let mut server = Running::start(Config {
        drain_timeout: Duration::from_millis(500),
        ..Config::local()
    })
    .await;
    let mut socket = TcpStream::connect(server.echo).await.unwrap();
    // One round trip: the connection is accepted and has its handler.
    socket.write_all(b"hi\n").await.unwrap();
    let mut hi = [0u8; 3];
    socket.read_exact(&mut hi).await.unwrap();
    let (_reader, mut writer) = socket.into_split();
    // Frames keep coming and the answers are never read: the server's writes block.
    let flood = tokio::spawn(async move {
        let frame = [b'f'; 1023];
        for _ in 0..64 * 1024 {
            if writer.write_all(&frame).await.is_err() || writer.write_all(b"\n").await.is_err() {
                break;
            }
        }
    });
    let drain_timeout = Duration::from_millis(500);
    let started = Instant::now();
    server.begin_shutdown();
    server.stopped().await.unwrap();
    let took = started.elapsed();
    // The deadline is waited out in full, and the cut follows it at once.
    assert!(took >= drain_timeout, "waited for the drain: {took:?}");
    assert!(
        took < drain_timeout + Duration::from_millis(500),
        "cut {took:?} after the shutdown began, for a drain deadline of {drain_timeout:?}"
    );
    tokio::time::timeout(LIMIT, flood).await.unwrap().unwrap();
}
