//! Echo servers and clients as real child processes, so the testbed can SIGKILL, SIGTERM,
//! SIGSTOP and SIGCONT them exactly as an operator or a crash would.
//!
//! Children run the same CLI users run. The testbed binary embeds it (`testbed echo-server
//! ...`, `testbed echo-client ...`), so one `cargo run -p testbed` builds everything an
//! experiment needs; a [`Launcher`] names the binary and the subcommand prefix. Consul's
//! address, token and TLS settings reach the child as Consul's variables (`CONSUL_HTTP_ADDR`,
//! `CONSUL_HTTP_TOKEN`, `CONSUL_CACERT`, ...), never on its command line.

use std::{
    ffi::OsString,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::{Duration, SystemTime},
};

use consul_api::GoDuration;
use tokio::{
    io::AsyncReadExt,
    process::{Child, Command},
};

use crate::{
    error::{Error, Result},
    logbuf::LogBuffer,
    signal::{self, Signal},
};

/// How to start the echo CLIs: a program and the arguments before the subcommand's own.
#[derive(Debug, Clone)]
pub struct Launcher {
    program: PathBuf,
    server_prefix: Vec<OsString>,
    client_prefix: Vec<OsString>,
}

impl Launcher {
    /// The testbed binary at `bin`: `bin echo-server ...`, `bin echo-client ...`. Integration
    /// tests pass `env!("CARGO_BIN_EXE_testbed")`.
    pub fn testbed(bin: impl Into<PathBuf>) -> Launcher {
        Launcher {
            program: bin.into(),
            server_prefix: vec!["echo-server".into()],
            client_prefix: vec!["echo-client".into()],
        }
    }

    /// The running testbed binary itself.
    pub fn current_exe() -> Result<Launcher> {
        Ok(Launcher::testbed(std::env::current_exe()?))
    }

    /// Start another subcommand of the binary (a sidecar: `testbed reaper ...`) with `args`,
    /// Consul's settings passed as Consul's variables.
    pub fn spawn_subcommand(
        &self,
        subcommand: &str,
        consul: &consul_api::Config,
        args: &[String],
    ) -> Result<ChildProcess> {
        let mut cmd = self.command(&[subcommand.into()], consul);
        cmd.args(args);
        ChildProcess::spawn(cmd, subcommand.to_owned())
    }

    fn command(&self, prefix: &[OsString], consul: &consul_api::Config) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(prefix);
        // Only what `consul` says: none of the testbed's own CONSUL_* settings leak in.
        for name in consul_api::client::ENV_VARS {
            cmd.env_remove(name);
        }
        cmd.envs(consul.to_env())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", child_log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

/// The children's log filter: the user's `RUST_LOG`, but never so quiet that the lines the
/// testbed waits on ("echo-server listening", ...) are hidden.
fn child_log_filter() -> String {
    match std::env::var("RUST_LOG") {
        Ok(user) if !user.trim().is_empty() => {
            let mut filter = user;
            for target in [
                "echo_server",
                "echo_client",
                "consul_registry",
                "consul_reaper",
            ] {
                if !filter.contains(target) {
                    filter.push_str(&format!(",{target}=info"));
                }
            }
            filter
        }
        _ => {
            "warn,echo_server=info,echo_client=info,consul_registry=info,consul_reaper=info".into()
        }
    }
}

/// Everything an echo server is started with.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// `--name`: the Consul service name it registers.
    pub name: String,
    /// `--id`: its Consul service ID.
    pub id: String,
    /// The loopback address it listens on and registers (its own, see [`loopback_ip`]).
    pub ip: Ipv4Addr,
    /// `--port`: the echo port.
    pub port: u16,
    /// `--check-port`: the port of its HTTP `/check`.
    pub check_port: u16,
    /// `--interval`: the check's `Interval`.
    pub interval: Duration,
    /// `--timeout`: the check's `Timeout`.
    pub timeout: Duration,
    /// `--deregister-after`: the check's `DeregisterCriticalServiceAfter` (Consul raises
    /// anything under 1 minute to 1 minute).
    pub deregister_after: Duration,
    /// Where Consul is, and the token to use.
    pub consul: consul_api::Config,
    /// More flags, passed as they are.
    pub extra_args: Vec<String>,
}

impl ServerSpec {
    /// The seed article's service (`servernode` / `servernode_1`, check every 5s with a 3s
    /// timeout, deregister after 30s), on free ports of its own loopback address.
    pub fn seed(consul: consul_api::Config) -> Result<ServerSpec> {
        let ip = loopback_ip();
        let (port, check_port) = two_free_ports_on(ip)?;
        Ok(ServerSpec {
            name: "servernode".into(),
            id: "servernode_1".into(),
            ip,
            port,
            check_port,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
            deregister_after: Duration::from_secs(30),
            consul,
            extra_args: Vec::new(),
        })
    }

    /// This spec on another loopback address (a cluster node's, so that the server binds
    /// and advertises its node's address), with free ports there.
    pub fn on_address(mut self, ip: Ipv4Addr) -> Result<Self> {
        self.ip = ip;
        (self.port, self.check_port) = two_free_ports_on(ip)?;
        Ok(self)
    }

    /// This spec with another service ID.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// This spec under another service name and ID.
    pub fn named(mut self, name: impl Into<String>, id: impl Into<String>) -> Self {
        self.name = name.into();
        self.id = id.into();
        self
    }

    /// The echo-server command line.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--bind".into(),
            self.ip.to_string(),
            "--address".into(),
            self.ip.to_string(),
            "--name".into(),
            self.name.clone(),
            "--id".into(),
            self.id.clone(),
            "--port".into(),
            self.port.to_string(),
            "--check-port".into(),
            self.check_port.to_string(),
            "--interval".into(),
            GoDuration(self.interval).to_string(),
            "--timeout".into(),
            GoDuration(self.timeout).to_string(),
            "--deregister-after".into(),
            GoDuration(self.deregister_after).to_string(),
        ];
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Where the server echoes.
    pub fn echo_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    /// The URL of its `/check`.
    pub fn check_url(&self) -> String {
        format!("http://{}:{}/check", self.ip, self.check_port)
    }
}

/// A free TCP port on 127.0.0.1, right now.
pub fn free_port() -> Result<u16> {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A free TCP port on `ip`, right now.
pub fn free_port_on(ip: Ipv4Addr) -> Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// Two different free TCP ports on `ip`, right now: both held while the second is picked,
/// because two [`free_port_on`] in a row may return the same port (the first is released
/// before the second is asked for; a failover bench got `--port` = `--check-port` so).
pub fn two_free_ports_on(ip: Ipv4Addr) -> Result<(u16, u16)> {
    let first = std::net::TcpListener::bind((ip, 0))?;
    let second = std::net::TcpListener::bind((ip, 0))?;
    Ok((first.local_addr()?.port(), second.local_addr()?.port()))
}

/// A random address in 127.0.0.0/8 other than 127.0.0.1. Each server gets its own, so that
/// when one is killed no other process started meanwhile can take over its address and
/// answer in its place (ports alone are reused quickly when many tests run at once).
pub fn loopback_ip() -> Ipv4Addr {
    let [a, b] = rand::random::<[u8; 2]>();
    Ipv4Addr::new(127, a.max(1), b, rand::random_range(2..=254))
}

/// A running child with its output captured.
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    pid: u32,
    what: String,
    output: LogBuffer,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl ChildProcess {
    fn spawn(mut cmd: Command, what: String) -> Result<ChildProcess> {
        let mut child = cmd.spawn().map_err(|e| Error::Process {
            what: format!("start {what}"),
            reason: e.to_string(),
        })?;
        let pid = child.id().ok_or_else(|| Error::Process {
            what: what.clone(),
            reason: "exited at once".into(),
        })?;
        let output = LogBuffer::new();
        let streams: [Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        let mut readers = Vec::new();
        for mut stream in streams.into_iter().flatten() {
            let sink = output.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.push_bytes(&buf[..n]);
                }
            }));
        }
        Ok(ChildProcess {
            child,
            pid,
            what,
            output,
            readers,
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its stdout and stderr, line by line.
    pub fn output(&self) -> &LogBuffer {
        &self.output
    }

    /// Send a signal.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        signal::send(self.pid, sig)
    }

    /// SIGSTOP it and wait until every thread has stopped (see [`signal::freeze`]).
    pub async fn freeze(&self) -> Result<()> {
        signal::freeze(self.pid, Duration::from_secs(5)).await
    }

    /// SIGKILL it and reap it; returns the moment the signal was sent.
    pub async fn kill(&mut self) -> Result<SystemTime> {
        let at = SystemTime::now();
        self.signal(Signal::SIGKILL)?;
        self.child.wait().await?;
        self.drain_output().await;
        Ok(at)
    }

    /// Wait for it to exit, at most `timeout`; its last output lines are read by then.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| Error::Timeout {
                what: format!("{} to exit", self.what),
                timeout,
            })??;
        self.drain_output().await;
        Ok(status)
    }

    /// After exit: wait (briefly) until its stdout and stderr are read to the end.
    async fn drain_output(&mut self) {
        for reader in std::mem::take(&mut self.readers) {
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        }
    }

    /// Whether it has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// An echo server process.
#[derive(Debug)]
pub struct ServerProcess {
    /// What it was started with (after [`ServerProcess::spawn`], the ports it bound).
    pub spec: ServerSpec,
    /// The child itself: signals, output, exit.
    pub process: ChildProcess,
}

impl ServerProcess {
    /// Start a server without waiting for anything (for servers expected to exit at once).
    pub fn start(launcher: &Launcher, spec: ServerSpec) -> Result<ServerProcess> {
        let mut cmd = launcher.command(&launcher.server_prefix, &spec.consul);
        cmd.args(spec.args());
        let process = ChildProcess::spawn(cmd, format!("echo-server {}", spec.id))?;
        Ok(ServerProcess { spec, process })
    }

    /// Start a server and wait until it says it listens. Ports are picked free but another
    /// process may take one before the server binds it: then the server exits saying so, and
    /// it is started again on fresh ports (at most three times).
    pub async fn spawn(launcher: &Launcher, mut spec: ServerSpec) -> Result<ServerProcess> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ServerProcess {
                spec: started,
                mut process,
            } = ServerProcess::start(launcher, spec.clone())?;
            let listening = process
                .output
                .wait_for("echo-server listening", Duration::from_secs(30));
            let exited = process.child.wait();
            let failure = tokio::select! {
                line = listening => match line {
                    Ok(_) => return Ok(ServerProcess { spec: started, process }),
                    Err(_) => "did not say it listens within 30s".to_owned(),
                },
                status = exited => format!(
                    "exited ({}) before listening",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
                ),
            };
            // Its last words (the reason it exited) are read by then, or soon after.
            if process.has_exited() {
                process.drain_output().await;
            }
            let tail: Vec<String> = process
                .output
                .lines()
                .iter()
                .rev()
                .take(5)
                .rev()
                .map(|l| l.text.clone())
                .collect();
            let clash = tail.iter().any(|l| l.contains("cannot listen"));
            if clash && attempt < 3 {
                tracing::info!(id = %spec.id, "a port was taken before the server bound it; new ports");
                (spec.port, spec.check_port) = two_free_ports_on(spec.ip)?;
                continue;
            }
            return Err(Error::Process {
                what: format!("echo-server {}", spec.id),
                reason: format!("{failure} on {}: {}", spec.echo_addr(), tail.join(" | ")),
            });
        }
    }
}

/// An echo client process.
#[derive(Debug)]
pub struct ClientProcess {
    /// The child itself: signals, output, exit.
    pub process: ChildProcess,
}

impl ClientProcess {
    /// Start `echo-client` with `args`.
    pub fn spawn(
        launcher: &Launcher,
        consul: &consul_api::Config,
        args: &[String],
    ) -> Result<ClientProcess> {
        let mut cmd = launcher.command(&launcher.client_prefix, consul);
        cmd.args(args);
        Ok(ClientProcess {
            process: ChildProcess::spawn(cmd, "echo-client".into())?,
        })
    }
}
