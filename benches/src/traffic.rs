//! Load for the benches.
//!
//! * [`stream`]: echo-rig's one streamer ([`Stream`]) as the benches pace it: one message
//!   after another (back to back while armed, one per [`IDLE_PACE`] otherwise), publishing who
//!   answered each and when, so a bench can wait for the first correct reply from another
//!   instance after a fault.
//! * [`Message`]: a payload of a given size and its newline-terminated wire form.
//! * [`pipelined`] and [`lockstep`]: echo traffic on raw sockets, the same for every server
//!   (the echo-server and the raw baselines answer the same bytes): pipelined for throughput,
//!   one message at a time for latency, several servers in alternation so that their round
//!   trips compare like with like.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use echo_client::EchoClient;
use echo_rig::traffic::{Stream, StreamSpec};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Barrier, Mutex},
    task::JoinHandle,
    time::Instant,
};

use crate::error::{Error, Result};

/// Between messages of a disarmed stream (echo-rig's [`Stream`], paced
/// [`StreamSpec::back_to_back`]).
pub const IDLE_PACE: Duration = Duration::from_millis(2);

/// The benches' stream through `client`: back to back when armed, one per [`IDLE_PACE`]
/// otherwise, for at most `limit`.
pub fn stream(client: &EchoClient, limit: Duration) -> Stream {
    Stream::start(client, StreamSpec::back_to_back(IDLE_PACE, limit))
}

/// A message of `size` bytes (lowercase letters, never a newline) and its wire form.
#[derive(Debug, Clone)]
pub struct Message {
    wire: Vec<u8>,
}

impl Message {
    /// A `size`-byte payload.
    pub fn new(size: usize) -> Self {
        let mut wire: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        wire.push(b'\n');
        Message { wire }
    }

    /// The payload (no newline).
    pub fn payload(&self) -> &[u8] {
        &self.wire[..self.wire.len() - 1]
    }

    /// Payload and newline, as sent.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// Check that `chunk`, found at `offset` of a stream of repeated wire forms, is what
    /// was sent there.
    fn verify(&self, mut chunk: &[u8], offset: u64) -> Result<()> {
        let period = self.wire.len();
        let mut at = (offset % period as u64) as usize;
        while !chunk.is_empty() {
            let take = (period - at).min(chunk.len());
            if chunk[..take] != self.wire[at..at + take] {
                return Err(Error::BadEcho(format!(
                    "the echo differs from what was sent, {} bytes into the stream",
                    offset
                )));
            }
            chunk = &chunk[take..];
            at = 0;
        }
        Ok(())
    }
}

/// One connection of the bench load, with the buffers its [`pipelined`] turns write from
/// and read into. They live as long as the connection: allocated afresh for every turn (two
/// of 64 KiB per connection, 4 MiB a turn at 32 connections), the allocator handed them
/// back to the kernel at the turn's end and every turn page-faulted them in again, ~300,000
/// faults in the load's threads per run of the throughput half, charged to every server's
/// turn alike (BENCHMARKS.md at commit c5bb543, "The load's own page faults").
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    /// Copies of the last message sent, back to back: at most [`BLOCK`] bytes.
    block: Vec<u8>,
    /// Where the echoes are read into: [`BLOCK`] bytes.
    read: Vec<u8>,
}

/// A [`Conn`] that a task takes for a turn.
pub type SharedConn = Arc<Mutex<Conn>>;

/// Open `count` connections to `addr`, with `TCP_NODELAY` as the servers set it.
pub async fn connect_all(addr: SocketAddr, count: usize) -> Result<Vec<SharedConn>> {
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        conns.push(Arc::new(Mutex::new(Conn {
            stream,
            block: Vec::new(),
            read: vec![0u8; BLOCK],
        })));
    }
    Ok(conns)
}

/// Largest write of [`pipelined`] traffic.
const BLOCK: usize = 64 << 10;

/// On every connection at once, write `per_conn` copies of `message` as fast as the
/// connection takes them while reading and checking the echoes; returns when every echo is
/// back.
pub async fn pipelined(conns: &[SharedConn], message: &Arc<Message>, per_conn: u64) -> Result<()> {
    let tasks: Vec<JoinHandle<Result<()>>> = conns
        .iter()
        .map(|conn| {
            let (conn, message) = (conn.clone(), message.clone());
            tokio::spawn(async move {
                let mut conn = conn.lock_owned().await;
                pipeline_one(&mut conn, &message, per_conn).await
            })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|e| Error::Invalid(format!("traffic task: {e}")))??;
    }
    Ok(())
}

async fn pipeline_one(conn: &mut Conn, message: &Message, count: u64) -> Result<()> {
    let wire = message.wire();
    let per_block = (BLOCK / wire.len()).max(1);
    let Conn {
        stream,
        block,
        read: buf,
    } = conn;
    if block.len() != per_block * wire.len() || !block.starts_with(wire) {
        *block = wire.repeat(per_block);
    }
    let total = count * wire.len() as u64;
    let (mut read, mut write) = stream.split();
    let writer = async {
        let mut left = count;
        while left > 0 {
            let n = left.min(per_block as u64) as usize;
            write.write_all(&block[..n * wire.len()]).await?;
            left -= n as u64;
        }
        Ok::<_, Error>(())
    };
    let reader = async {
        let mut seen = 0u64;
        while seen < total {
            let want = (total - seen).min(buf.len() as u64) as usize;
            let n = read.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(Error::BadEcho(format!(
                    "connection closed after {seen} of {total} bytes"
                )));
            }
            message.verify(&buf[..n], seen)?;
            seen += n as u64;
        }
        Ok(())
    };
    tokio::try_join!(writer, reader)?;
    Ok(())
}

/// One message in flight per connection, on one server or several in alternation, so that
/// their round trips come from the same seconds: `servers[s]` holds server `s`'s connections
/// (every server as many). `rounds` times, each server in turn gets one round: each of its
/// connections writes `message` and waits for its echo, all its connections at once; the
/// next server's round starts once every echo of this one is back. The order of the servers
/// goes through every rotation forwards, then backwards (for three servers, all six orders),
/// so each server comes first, last and after each other server equally often. Each server
/// so carries the same load as alone (one message in flight on each of its connections,
/// nothing on the others'), and a change of the machine's load falls on all of them alike.
/// Returns every round trip, per server.
pub async fn lockstep(
    servers: &[Vec<SharedConn>],
    message: &Arc<Message>,
    rounds: u64,
) -> Result<Vec<Vec<Duration>>> {
    let per_server = servers.first().map_or(0, Vec::len);
    if servers.iter().any(|conns| conns.len() != per_server) {
        return Err(Error::Invalid(
            "lockstep: every server needs as many connections".into(),
        ));
    }
    // One task per connection slot, holding that slot's connection to every server.
    let barrier = Arc::new(Barrier::new(per_server.max(1)));
    let tasks: Vec<JoinHandle<Result<Vec<Vec<Duration>>>>> = (0..per_server)
        .map(|slot| {
            let conns: Vec<_> = servers.iter().map(|c| c[slot].clone()).collect();
            let (message, barrier) = (message.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut streams = Vec::with_capacity(conns.len());
                for conn in conns {
                    streams.push(conn.lock_owned().await);
                }
                let wire = message.wire();
                let mut buf = vec![0u8; wire.len()];
                let mut rtts = vec![Vec::with_capacity(rounds as usize); streams.len()];
                for round in 0..rounds {
                    for server in round_order(round, streams.len()) {
                        // Every connection of the slot's servers is idle here: the round
                        // starts on all of this server's connections together.
                        barrier.wait().await;
                        let stream = &mut streams[server].stream;
                        let start = Instant::now();
                        stream.write_all(wire).await?;
                        stream.read_exact(&mut buf).await?;
                        rtts[server].push(start.elapsed());
                        if buf != wire {
                            return Err(Error::BadEcho("a lockstep echo differs".into()));
                        }
                    }
                }
                Ok(rtts)
            })
        })
        .collect();
    let mut all = vec![Vec::new(); servers.len()];
    for task in tasks {
        let rtts = task
            .await
            .map_err(|e| Error::Invalid(format!("traffic task: {e}")))??;
        for (all, rtts) in all.iter_mut().zip(rtts) {
            all.extend(rtts);
        }
    }
    Ok(all)
}

/// The order of `servers` servers in round `round` of [`lockstep`] (and in each sample of the
/// interleaved throughput bench): rotations forwards, then the same rotations backwards, so
/// in every `2 × servers` rounds each server comes first and last equally often, and directly
/// before and directly after each of its two neighbours in the list equally often (for three
/// servers, all six orders).
pub fn round_order(round: u64, servers: usize) -> impl Iterator<Item = usize> {
    let m = servers.max(1) as u64;
    let start = round % m;
    let forwards = (round / m).is_multiple_of(2);
    (0..m).map(move |j| {
        let at = if forwards { start + j } else { start + m - j };
        (at % m) as usize
    })
}

/// The order of the servers' turns in round `round` of the interleaved throughput bench: the
/// list's last server always last, the others in [`round_order`]. A pipelined turn right after
/// another server's pays for what that server's connections still leave to do (measured with
/// `raw-copy` last in the list: BENCHMARKS.md at commit c5bb543, "Found: the rotation gives
/// the baseline different neighbours"), so each compared server must come after every other one equally
/// often. With the last fixed, the others run in every order (for three, all six in six
/// rounds), and the next round's first server, the one after the last, is each of them
/// equally often. With two servers or fewer, [`round_order`].
pub fn turn_order(round: u64, servers: usize) -> Vec<usize> {
    if servers <= 2 {
        return round_order(round, servers).collect();
    }
    let last = servers - 1;
    round_order(round, last).chain([last]).collect()
}

/// One fresh connection to `addr`, one echo of `message`, closed: the floor of a failover.
pub async fn connect_and_echo(addr: SocketAddr, message: &Message) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(message.wire()).await?;
    let mut buf = vec![0u8; message.wire().len()];
    stream.read_exact(&mut buf).await?;
    if buf != message.wire() {
        return Err(Error::BadEcho("the floor's echo differs".into()));
    }
    Ok(())
}

/// An idle connection that notes when its peer closes it: when a crash becomes visible on
/// the wire, to split a failover's time into detection and the rest.
#[derive(Debug)]
pub struct CloseProbe {
    closed: JoinHandle<Instant>,
}

impl CloseProbe {
    /// Connect to `addr` and watch for the close.
    pub async fn connect(addr: SocketAddr) -> Result<CloseProbe> {
        let mut stream = TcpStream::connect(addr).await?;
        let closed = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            // An echo server sends nothing unasked: the first read ends at the close.
            let _ = stream.read(&mut buf).await;
            Instant::now()
        });
        Ok(CloseProbe { closed })
    }

    /// When the peer closed the connection (end of stream or reset).
    pub async fn closed(mut self, timeout: Duration) -> Result<Instant> {
        match tokio::time::timeout(timeout, &mut self.closed).await {
            Ok(Ok(at)) => Ok(at),
            Ok(Err(e)) => Err(Error::Invalid(format!("close probe: {e}"))),
            Err(_) => Err(Error::timeout("the probe connection to close", timeout)),
        }
    }
}

impl Drop for CloseProbe {
    fn drop(&mut self) {
        self.closed.abort();
    }
}

#[cfg(test)]
mod tests {
    use tokio::runtime::Handle;

    use super::*;
    use crate::servers::{Copier, RawEcho, ServerThread};

    #[test]
    fn messages_verify_at_any_offset() {
        let m = Message::new(3);
        assert_eq!(m.wire(), b"abc\n");
        assert_eq!(m.payload(), b"abc");
        assert!(m.verify(b"c\nabc\na", 2).is_ok());
        assert!(m.verify(b"c\nabd", 2).is_err());
        assert_eq!(Message::new(30).payload()[26], b'a');
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn traffic_runs_against_both_servers() {
        let echo = ServerThread::start(echo_server::Config::local())
            .await
            .unwrap();
        let raw = RawEcho::start(&Handle::current()).await.unwrap();
        for addr in [echo.echo_addr(), raw.addr()] {
            for size in [16, 64 << 10] {
                let message = Arc::new(Message::new(size));
                let conns = connect_all(addr, 3).await.unwrap();
                pipelined(&conns, &message, 50).await.unwrap();
                let rtts = lockstep(&[conns], &message, 5).await.unwrap();
                assert_eq!(rtts[0].len(), 15);
                connect_and_echo(addr, &message).await.unwrap();
            }
        }
        echo.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_keeps_its_buffers_from_turn_to_turn() {
        let raw = RawEcho::start_with(&Handle::current(), Copier::Buffer(16 << 10))
            .await
            .unwrap();
        let conns = connect_all(raw.addr(), 1).await.unwrap();
        let addresses = |conn: &Conn| (conn.block.as_ptr(), conn.read.as_ptr());
        let small = Arc::new(Message::new(16));
        pipelined(&conns, &small, 100).await.unwrap();
        let first = addresses(&*conns[0].lock().await);
        pipelined(&conns, &small, 100).await.unwrap();
        assert_eq!(
            addresses(&*conns[0].lock().await),
            first,
            "the same buffers"
        );
        // Another message gets its own block; the echoes are still checked against it.
        let large = Arc::new(Message::new(1000));
        pipelined(&conns, &large, 100).await.unwrap();
        let conn = conns[0].lock().await;
        assert!(conn.block.starts_with(large.wire()));
        assert_eq!(
            conn.block.len(),
            (BLOCK / large.wire().len()) * large.wire().len()
        );
    }

    #[test]
    fn lockstep_orders_go_through_every_permutation() {
        let orders: Vec<Vec<usize>> = (0..6).map(|r| round_order(r, 3).collect()).collect();
        let mut distinct = orders.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 6, "all six orders of three: {orders:?}");
        assert_eq!(orders[0], [0, 1, 2]);
        assert_eq!(
            round_order(6, 3).collect::<Vec<_>>(),
            orders[0],
            "then again"
        );
        assert_eq!(round_order(7, 1).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn four_servers_take_each_place_and_meet_their_neighbours_equally_often() {
        let orders: Vec<Vec<usize>> = (0..8).map(|r| round_order(r, 4).collect()).collect();
        for server in 0..4 {
            let first = orders.iter().filter(|o| o[0] == server).count();
            let last = orders.iter().filter(|o| o[3] == server).count();
            assert_eq!((first, last), (2, 2), "server {server} in {orders:?}");
        }
        // How often `a` runs directly before `b`.
        let before = |a: usize, b: usize| {
            orders
                .iter()
                .filter(|o| o.windows(2).any(|w| w == [a, b]))
                .count()
        };
        // The bench's baseline (1) between echo-server (0) and the twin (2): each of them
        // next to it, on either side, as often as the other.
        assert_eq!(before(0, 1), before(2, 1), "{orders:?}");
        assert_eq!(before(1, 0), before(1, 2), "{orders:?}");
        assert_eq!(before(0, 1), before(1, 0), "{orders:?}");
        assert!(before(0, 1) > 0, "{orders:?}");
    }

    #[test]
    fn in_the_throughput_turns_every_compared_server_follows_each_other_equally_often() {
        // Six rounds of four turns, one after the other and around again (criterion's
        // samples follow each other): who comes directly before whom.
        let turns: Vec<usize> = (0..6).flat_map(|r| turn_order(r, 4)).collect();
        let before = |a: usize, b: usize| {
            (0..turns.len())
                .filter(|&i| turns[i] == a && turns[(i + 1) % turns.len()] == b)
                .count()
        };
        for server in 0..3 {
            let counts: Vec<usize> = (0..4)
                .filter(|&p| p != server)
                .map(|p| before(p, server))
                .collect();
            assert_eq!(counts, [2, 2, 2], "before {server}: {turns:?}");
        }
        // Each round holds every server once, the last always last.
        for r in 0..6 {
            let mut order = turn_order(r, 4);
            assert_eq!(order[3], 3);
            order.sort_unstable();
            assert_eq!(order, [0, 1, 2, 3]);
        }
        assert_eq!(turn_order(3, 2), round_order(3, 2).collect::<Vec<_>>());
        assert_eq!(turn_order(0, 1), [0]);
        assert!(turn_order(0, 0).len() <= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lockstep_alternates_servers_and_keeps_their_round_trips_apart() {
        let a = RawEcho::start(&Handle::current()).await.unwrap();
        let b = RawEcho::start_with(&Handle::current(), Copier::Buffer(64))
            .await
            .unwrap();
        let message = Arc::new(Message::new(100));
        let servers = vec![
            connect_all(a.addr(), 4).await.unwrap(),
            connect_all(b.addr(), 4).await.unwrap(),
        ];
        let rtts = lockstep(&servers, &message, 7).await.unwrap();
        assert_eq!(rtts.len(), 2);
        assert!(rtts.iter().all(|r| r.len() == 4 * 7), "{rtts:?}");
        let uneven = vec![servers[0].clone(), servers[1][..3].to_vec()];
        assert!(lockstep(&uneven, &message, 1).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_streamer_sees_the_failover() {
        let mut a = ServerThread::start(echo_server::Config::local())
            .await
            .unwrap();
        let b = ServerThread::start(echo_server::Config::local())
            .await
            .unwrap();
        let set = vec![
            echo_client::Instance::new("a", "127.0.0.1", a.echo_addr().port()),
            echo_client::Instance::new("b", "127.0.0.1", b.echo_addr().port()),
        ];
        let (_feed, rx) = tokio::sync::watch::channel(echo_client::Snapshot::fixed(set));
        let mut session = echo_client::SessionConfig::new("t");
        // Seeded: round-robin then starts at the first instance by ID (unseeded, anywhere).
        session.seed = Some(1);
        let client = EchoClient::with_discovery(rx, session).unwrap();
        let streamer = stream(&client, Duration::from_secs(60));
        let first = streamer.replies(3, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            first.instance.unwrap().id,
            "a",
            "round-robin starts in ID order"
        );
        let probe = CloseProbe::connect(a.echo_addr()).await.unwrap();
        streamer.arm(true);
        let killed = Instant::now();
        a.abort();
        let at = streamer
            .reply_from_other_than("a", killed, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(at > killed);
        assert!(probe.closed(Duration::from_secs(5)).await.unwrap() > killed);
        assert_eq!(streamer.last().errors, 0, "nothing lost");
        streamer.finish().await;
        b.shutdown().await.unwrap();
    }
}
