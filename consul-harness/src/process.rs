//! Child processes run against Consul, so that tests and experiments can SIGKILL, SIGTERM,
//! SIGSTOP and SIGCONT them exactly as an operator or a crash would: the command (Consul's
//! settings passed as Consul's variables, never on the command line), the running child with
//! its output captured line by line, and free loopback addresses and ports to give it.

use std::{
    ffi::OsStr,
    net::{IpAddr, Ipv4Addr},
    process::{ExitStatus, Stdio},
    time::{Duration, SystemTime},
};

use tokio::{
    io::AsyncReadExt,
    process::{Child, Command},
};

use crate::{
    error::{Error, Result},
    logbuf::{LogBuffer, LogLine},
    signal::{self, Signal},
};

/// A command for `program` whose only Consul settings are `consul`'s, passed as Consul's
/// variables (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`, `CONSUL_CACERT`, ...): none of this
/// process's own `CONSUL_*` variables leak in. No colours, stdin closed, stdout and stderr
/// piped (for [`ChildProcess::spawn`]), killed when dropped.
pub fn consul_command(program: impl AsRef<OsStr>, consul: &consul_api::Config) -> Command {
    let mut cmd = Command::new(program);
    for name in consul_api::client::ENV_VARS {
        cmd.env_remove(name);
    }
    cmd.envs(consul.to_env())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A free TCP port on 127.0.0.1, right now.
pub fn free_port() -> Result<u16> {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A free TCP port on `ip`, right now.
pub fn free_port_on(ip: impl Into<IpAddr>) -> Result<u16> {
    Ok(std::net::TcpListener::bind((ip.into(), 0))?
        .local_addr()?
        .port())
}

/// Two different free TCP ports on `ip`, right now: both held while the second is picked,
/// because two [`free_port_on`] in a row may return the same port (the first is released
/// before the second is asked for; a failover bench got `--port` = `--check-port` so).
pub fn two_free_ports_on(ip: impl Into<IpAddr>) -> Result<(u16, u16)> {
    let ip = ip.into();
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

/// Raise this process's open-file limit to its hard limit (children inherit it): an attack
/// or a crowd of clients holds over a thousand sockets at once. Best effort.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Why a child did not print the line waited for ([`ChildProcess::wait_for_line`]).
#[derive(Debug)]
pub enum NotSaid {
    /// It exited first, with this status (or the error of waiting for it).
    Exited(String),
    /// It was still running at the deadline.
    TimedOut(Duration),
}

impl std::fmt::Display for NotSaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotSaid::Exited(status) => write!(f, "exited ({status})"),
            NotSaid::TimedOut(after) => write!(f, "said nothing of it within {after:?}"),
        }
    }
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
    /// Start `cmd` (its stdout and stderr piped, as [`consul_command`] makes them), called
    /// `what` in errors.
    pub fn spawn(mut cmd: Command, what: String) -> Result<ChildProcess> {
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

    /// Wait until it prints a line holding `needle`, at most `timeout`; if it exits first,
    /// its last output lines are read by the time this returns.
    pub async fn wait_for_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> std::result::Result<LogLine, NotSaid> {
        let said = self.output.wait_for(needle, timeout);
        let exited = self.child.wait();
        let not_said = tokio::select! {
            line = said => match line {
                Ok(line) => return Ok(line),
                Err(_) => NotSaid::TimedOut(timeout),
            },
            status = exited => NotSaid::Exited(
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            ),
        };
        // Its last words (the reason it exited) are read by then, or soon after.
        if self.has_exited() {
            self.drain_output().await;
        }
        Err(not_said)
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
