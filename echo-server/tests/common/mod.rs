//! Helpers shared by the in-process tests: start a server with registration off, talk to it,
//! stop it.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use echo_server::{Config, Health, Server, codec::EchoCodec};
use futures::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
    task::JoinHandle,
};
use tokio_util::codec::Framed;

/// A generous bound that only proves "no hang".
pub const LIMIT: Duration = Duration::from_secs(10);

/// A server running in this process.
pub struct Running {
    pub echo: SocketAddr,
    pub check: SocketAddr,
    pub health: Health,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<echo_server::Result<()>>,
}

impl Running {
    /// Bind `config` (registration must be off) and run it until [`Running::shutdown`].
    pub async fn start(config: Config) -> Running {
        assert!(!config.register, "in-process tests run without Consul");
        let server = Server::bind(config).await.unwrap();
        let (echo, check, health) = (server.echo_addr(), server.check_addr(), server.health());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            stopped.await.ok();
        }));
        Running {
            echo,
            check,
            health,
            stop: Some(stop),
            task,
        }
    }

    /// A server with the defaults, on free ports.
    pub async fn local() -> Running {
        Running::start(Config::local()).await
    }

    /// `http://{check}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.check)
    }

    /// Start the shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Wait for `run` to return, at most [`LIMIT`].
    pub async fn stopped(self) -> echo_server::Result<()> {
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("the server stops in time")
            .expect("the server task does not panic")
    }

    /// Shut down and wait.
    pub async fn shutdown(mut self) -> echo_server::Result<()> {
        self.begin_shutdown();
        self.stopped().await
    }
}

/// An echo connection speaking the shared codec (64 KiB frames).
pub async fn connect(addr: SocketAddr) -> Framed<TcpStream, EchoCodec> {
    Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        EchoCodec::default(),
    )
}

/// Send one frame and return the answer, within [`LIMIT`].
pub async fn echo(conn: &mut Framed<TcpStream, EchoCodec>, frame: &[u8]) -> Vec<u8> {
    conn.send(frame).await.unwrap();
    tokio::time::timeout(LIMIT, conn.next())
        .await
        .expect("an answer in time")
        .expect("the connection stays open")
        .expect("a well-formed answer")
        .to_vec()
}

/// `GET url`: status and body.
pub async fn get(url: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(LIMIT)
        .build()
        .unwrap();
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Write 2,000 short frames to a new connection, start the shutdown before reading a single
/// answer, and read until the server closes the connection (within [`LIMIT`]). Returns the
/// frames sent and the answers read.
pub async fn answers_across_shutdown(server: &mut Running) -> (Vec<u8>, Vec<u8>) {
    let mut socket = TcpStream::connect(server.echo).await.unwrap();
    let mut burst = Vec::new();
    for i in 0..2000 {
        burst.extend_from_slice(format!("frame {i}\n").as_bytes());
    }
    socket.write_all(&burst).await.unwrap();
    server.begin_shutdown();
    let mut answers = Vec::new();
    tokio::time::timeout(LIMIT, socket.read_to_end(&mut answers))
        .await
        .expect("closed by the drain")
        .expect("closed cleanly");
    (burst, answers)
}
