//! The echo path's servers side by side, as the `echo` bench measures them and the
//! `echo-probe` binary profiles them: the echo-server (default settings, the frame limit set
//! to the largest message), the two raw copiers (`raw-buf`, the fair baseline, and
//! `raw-copy`) and a second `raw-buf` (`raw-buf-twin`, the control: the same code as the
//! baseline, so its ratio to the baseline shows how far two identical servers read apart in
//! one run), all on one multi-threaded runtime of their own whose threads are named
//! [`SERVER_THREADS`], so the servers' CPU time is those threads' and every server runs under
//! the same scheduler. One place, so the bench and the profile measure the same thing.

use std::{net::SocketAddr, time::Duration};

use echo_server::{Config, Server};
use tokio::{runtime::Runtime, sync::oneshot, task::JoinHandle};

use crate::{
    error::{Error, Result},
    servers::{Copier, RawEcho},
};

/// The name of the servers' runtime threads.
pub const SERVER_THREADS: &str = "servers";

/// The servers, in the order the bench measures them: this project's, the fair baseline
/// (reads and writes with the echo-server's read size), the fair baseline's twin (the
/// control), `tokio::io::copy`. `raw-copy` is last: in the throughput bench's turns
/// ([`crate::traffic::turn_order`]) it always goes last, and the other three each come after
/// every other server, `raw-copy` included, equally often; in the latency bench's rounds
/// ([`crate::traffic::round_order`]) the baseline sits between echo-server and the twin, so
/// each of the two is next to it as often as the other.
pub const SERVERS: [&str; 4] = ["echo-server", "raw-buf", "raw-buf-twin", "raw-copy"];

/// The servers running; see the module documentation. Dropping it stops them.
#[derive(Debug)]
pub struct Lineup {
    runtime: Runtime,
    echo_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    running: Option<JoinHandle<echo_server::Result<()>>>,
    fair: RawEcho,
    copy: RawEcho,
    twin: RawEcho,
}

impl Lineup {
    /// Start the servers; the echo-server takes frames of up to `max_frame` bytes.
    /// Call it outside any runtime (it builds and blocks on its own).
    pub fn start(max_frame: usize) -> Result<Lineup> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name(SERVER_THREADS)
            .build()?;
        let config = Config {
            max_frame,
            ..Config::local()
        };
        let server = runtime.block_on(Server::bind(config))?;
        let echo_addr = server.echo_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = runtime.spawn(server.run(async move {
            let _ = stopped.await;
        }));
        let fair = runtime.block_on(RawEcho::start_with(
            runtime.handle(),
            Copier::Buffer(echo_server::server::READ_CHUNK),
        ))?;
        let copy = runtime.block_on(RawEcho::start_with(runtime.handle(), Copier::IoCopy))?;
        let twin = runtime.block_on(RawEcho::start_with(
            runtime.handle(),
            Copier::Buffer(echo_server::server::READ_CHUNK),
        ))?;
        Ok(Lineup {
            runtime,
            echo_addr,
            stop: Some(stop),
            running: Some(running),
            fair,
            copy,
            twin,
        })
    }

    /// Each server's name (as in [`SERVERS`]) and echo address, in that order.
    pub fn servers(&self) -> [(&'static str, SocketAddr); SERVERS.len()] {
        [
            (SERVERS[0], self.echo_addr),
            (SERVERS[1], self.fair.addr()),
            (SERVERS[2], self.twin.addr()),
            (SERVERS[3], self.copy.addr()),
        ]
    }

    /// The echo address of the server called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.servers()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, addr)| addr)
    }

    /// CPU time used so far by the servers' runtime threads (user and system).
    pub fn cpu_time(&self) -> Result<Duration> {
        Ok(consul_harness::procfs::threads_cpu_time(
            std::process::id(),
            SERVER_THREADS,
        )?)
    }

    /// Stop the echo-server cleanly (drain included) and the copiers; an error if the
    /// echo-server did not stop cleanly.
    pub fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        match self.runtime.block_on(running) {
            Ok(result) => Ok(result?),
            Err(e) => Err(Error::Invalid(format!("the echo-server task: {e}"))),
        }
    }
}
