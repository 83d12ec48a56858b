//! Echo servers to bench against.
//!
//! * [`ServerThread`]: an echo-server on its own thread and current-thread runtime. It stops
//!   either cleanly (`/check` 503, deregister, drain: [`ServerThread::shutdown`]) or at once
//!   ([`ServerThread::abort`]): the runtime is torn down with every task in it, so every socket
//!   closes without a goodbye, as when the process dies — the in-process crash.
//! * [`RawEcho`]: the baselines, copiers of each connection onto itself: no framing, no
//!   limits, nothing but the bytes. [`Copier::Buffer`] reads and writes back with a buffer
//!   of a given size (the fair baseline: the echo-server's read size,
//!   [`echo_server::server::READ_CHUNK`]); [`Copier::IoCopy`] is `tokio::io::copy` (its own
//!   8 KiB buffer, reading ahead while a write waits).

use std::{net::SocketAddr, thread::JoinHandle};

use echo_server::{Config, Health, Server};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    runtime::{Builder, Handle},
    sync::oneshot,
};

use crate::error::{Error, Result};

enum Stop {
    Clean,
    Abort,
}

/// An echo-server running on its own thread; see the module documentation.
#[derive(Debug)]
pub struct ServerThread {
    echo_addr: SocketAddr,
    check_addr: SocketAddr,
    health: Health,
    control: Option<oneshot::Sender<Stop>>,
    thread: Option<JoinHandle<echo_server::Result<()>>>,
}

impl std::fmt::Debug for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::Clean => "Clean",
            Stop::Abort => "Abort",
        })
    }
}

impl ServerThread {
    /// Bind a server with `config` on a new thread and start serving.
    pub async fn start(config: Config) -> Result<ServerThread> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (control, control_rx) = oneshot::channel();
        let name = format!("echo-server {}", config.id);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(config, ready_tx, control_rx))?;
        match ready_rx.await {
            Ok(Ok((echo_addr, check_addr, health))) => Ok(ServerThread {
                echo_addr,
                check_addr,
                health,
                control: Some(control),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::Invalid(
                "the echo-server thread died while starting".into(),
            )),
        }
    }

    /// Where it echoes.
    pub fn echo_addr(&self) -> SocketAddr {
        self.echo_addr
    }

    /// Where its `/check` listens.
    pub fn check_addr(&self) -> SocketAddr {
        self.check_addr
    }

    /// The handle that forces `/check` to 503.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Tear it down at once: its runtime is dropped with every task, so every socket closes
    /// now; nothing is drained and nothing deregistered. Returns without waiting.
    pub fn abort(&mut self) {
        if let Some(control) = self.control.take() {
            let _ = control.send(Stop::Abort);
        }
    }

    /// Shut it down in order (`/check` 503, deregister, stop accepting, drain) and wait.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(control) = self.control.take() {
            let _ = control.send(Stop::Clean);
        }
        self.join().await
    }

    /// Wait for the thread to end (after [`abort`](Self::abort) or [`shutdown`](Self::shutdown)).
    pub async fn join(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(_)) | Err(_) => Err(Error::Invalid("the echo-server thread panicked".into())),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        // Never leave a thread serving: a dropped handle tears its server down.
        self.abort();
    }
}

type Ready = echo_server::Result<(SocketAddr, SocketAddr, Health)>;

fn serve(
    config: Config,
    ready: oneshot::Sender<Ready>,
    control: oneshot::Receiver<Stop>,
) -> echo_server::Result<()> {
    let runtime = Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| echo_server::Error::Internal(format!("runtime: {e}")))?;
    let server = match runtime.block_on(Server::bind(config)) {
        Ok(server) => server,
        Err(e) => {
            let message = e.to_string();
            let _ = ready.send(Err(e));
            return Err(echo_server::Error::Internal(message));
        }
    };
    let _ = ready.send(Ok((
        server.echo_addr(),
        server.check_addr(),
        server.health(),
    )));
    let outcome = runtime.block_on(async move {
        let (clean_tx, clean_rx) = oneshot::channel::<()>();
        let run = server.run(async move {
            let _ = clean_rx.await;
        });
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => Some(result),
            stop = control => match stop {
                Ok(Stop::Clean) => {
                    let _ = clean_tx.send(());
                    Some(run.await)
                }
                Ok(Stop::Abort) | Err(_) => None,
            },
        }
    });
    // Drops every task still in the runtime (after an abort: all of them), closing their
    // sockets here and now.
    runtime.shutdown_background();
    outcome.unwrap_or(Ok(()))
}

/// How a [`RawEcho`] copies each connection onto itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copier {
    /// Read up to this many bytes, write them all back, repeat: one buffer per connection.
    Buffer(usize),
    /// `tokio::io::copy` of the read half onto the write half.
    IoCopy,
}

/// A baseline echo server: each connection copied onto itself (see [`Copier`]).
#[derive(Debug)]
pub struct RawEcho {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RawEcho {
    /// The `tokio::io::copy` server on a free loopback port, served on `runtime`.
    pub async fn start(runtime: &Handle) -> Result<RawEcho> {
        Self::start_with(runtime, Copier::IoCopy).await
    }

    /// A server copying as `copier` says, on a free loopback port, served on `runtime`: its
    /// listener too is bound there, so that `runtime` alone drives it.
    pub async fn start_with(runtime: &Handle, copier: Copier) -> Result<RawEcho> {
        let listener = runtime
            .spawn(TcpListener::bind("127.0.0.1:0"))
            .await
            .map_err(|e| Error::Invalid(format!("binding the raw echo server: {e}")))??;
        let addr = listener.local_addr()?;
        let task = runtime.spawn(async move {
            // Ends when the runtime shuts down or the task is aborted (on drop).
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    match copier {
                        Copier::IoCopy => {
                            let (mut read, mut write) = stream.split();
                            let _ = tokio::io::copy(&mut read, &mut write).await;
                        }
                        Copier::Buffer(size) => {
                            let mut buf = vec![0u8; size.max(1)];
                            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        Ok(RawEcho { addr, task })
    }

    /// Where it echoes.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for RawEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_once(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"hello\n").await?;
        let mut buf = vec![0u8; 6];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn abort_closes_connections_at_once_and_shutdown_is_clean() {
        let mut a = ServerThread::start(Config::local()).await.unwrap();
        assert_eq!(echo_once(a.echo_addr()).await.unwrap(), b"hello\n");
        let mut idle = tokio::net::TcpStream::connect(a.echo_addr()).await.unwrap();
        a.abort();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("the peer sees the close");
        assert!(matches!(read, Ok(0) | Err(_)));
        a.join().await.unwrap();
        assert!(echo_once(a.echo_addr()).await.is_err(), "nothing listens");

        let b = ServerThread::start(Config::local()).await.unwrap();
        b.health().set_healthy(false);
        assert_eq!(echo_once(b.echo_addr()).await.unwrap(), b"hello\n");
        b.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn the_raw_servers_echo_bytes() {
        for copier in [Copier::IoCopy, Copier::Buffer(4)] {
            let raw = RawEcho::start_with(&Handle::current(), copier)
                .await
                .unwrap();
            assert_eq!(
                echo_once(raw.addr()).await.unwrap(),
                b"hello\n",
                "{copier:?}"
            );
        }
    }
}
