//! The process backend: a local `consul` binary as a child process, for machines without a
//! Docker engine. It runs the same 1.8.7 binary the image holds (fetched into the cache), or
//! `TESTBED_CONSUL_BIN` if set. The child is killed when its handle drops.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::{
    io::AsyncReadExt,
    process::{Child, Command},
};

use super::agent::AgentSpec;
use crate::logbuf::LogBuffer;
use crate::{
    error::{Error, Result},
    provision,
};

/// The binary to run: `TESTBED_CONSUL_BIN`, else the provisioned 1.8.7.
pub async fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("TESTBED_CONSUL_BIN") {
        return Ok(PathBuf::from(path));
    }
    tokio::task::spawn_blocking(provision::ensure_consul_binary)
        .await
        .map_err(|e| Error::Process {
            what: "provisioning consul".into(),
            reason: e.to_string(),
        })?
}

/// Start one agent process; returns when it printed that it runs.
pub async fn start(spec: &AgentSpec, log: &LogBuffer, timeout: Duration) -> Result<Child> {
    let binary = binary().await?;
    let mark = log.mark();
    let mut command = Command::new(&binary);
    if let Some(uid) = spec.mode.membership().and_then(|m| m.uid) {
        command.uid(uid).gid(uid);
    }
    let mut child = command
        .args(spec.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Process {
            what: format!("start {}", binary.display()),
            reason: e.to_string(),
        })?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    {
        let sink = log.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let mut buf = vec![0u8; 16 << 10];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.push_bytes(&buf[..n]);
            }
        });
    }
    let ready = log.wait_for_after(mark, "Consul agent running!", timeout);
    tokio::select! {
        result = ready => {
            result.map_err(|_| Error::StartTimeout {
                backend: "process",
                timeout,
                reason: last_lines(log, mark),
            })?;
            Ok(child)
        }
        status = child.wait() => Err(Error::Process {
            what: format!("consul agent ({})", binary.display()),
            reason: format!(
                "exited with {} before it was ready: {}",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                last_lines(log, mark)
            ),
        }),
    }
}

fn last_lines(log: &LogBuffer, mark: usize) -> String {
    let lines = log.lines();
    let start = mark.min(lines.len()).max(lines.len().saturating_sub(5));
    lines[start..]
        .iter()
        .map(|l| l.text.trim())
        .collect::<Vec<_>>()
        .join(" | ")
}
