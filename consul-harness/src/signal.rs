//! Sending POSIX signals to child processes (SIGKILL, SIGTERM, SIGSTOP, SIGCONT): the faults
//! the testbed injects into servers, clients and a process-backend Consul.
//!
//! `kill(2)` returns before a SIGSTOP has stopped every thread of a process: a thread that is
//! running, or runnable, goes on until it next returns to user mode, and an echo server has
//! been seen answering a frame sent after the signal (4 times in 50 on an idle machine, 11 in
//! 50 under load). [`freeze`] waits until the kernel reports every thread stopped.

use std::time::Duration;

pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Send `sig` to process `pid`.
pub fn send(pid: u32, sig: Signal) -> Result<()> {
    let raw = i32::try_from(pid).map_err(|_| Error::Process {
        what: format!("send {sig} to {pid}"),
        reason: "no such process id (out of range)".into(),
    })?;
    nix::sys::signal::kill(Pid::from_raw(raw), sig).map_err(|e| Error::Process {
        what: format!("send {sig} to {pid}"),
        reason: e.to_string(),
    })
}

pub use crate::procfs::is_stopped;

/// SIGSTOP process `pid` and wait, at most `timeout`, until every one of its threads is
/// stopped: from then on it handles nothing at all.
pub async fn freeze(pid: u32, timeout: Duration) -> Result<()> {
    send(pid, Signal::SIGSTOP)?;
    let deadline = tokio::time::Instant::now() + timeout;
    // The kernel gives no notice of the stop: look every millisecond (it takes a few).
    while !is_stopped(pid)? {
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("every thread of process {pid} to stop"),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn freeze_returns_once_every_thread_is_stopped() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        assert!(!is_stopped(pid).unwrap());
        freeze(pid, Duration::from_secs(5)).await.unwrap();
        assert!(is_stopped(pid).unwrap());
        send(pid, Signal::SIGCONT).unwrap();
        child.kill().await.unwrap();
        assert!(is_stopped(u32::MAX >> 1).is_err(), "no such process");
    }
}
