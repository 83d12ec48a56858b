//! Sending POSIX signals to child processes (SIGKILL, SIGTERM, SIGSTOP, SIGCONT): the faults
//! the testbed injects into servers, clients and a process-backend Consul.

pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Send `sig` to process `pid`.
pub fn send(pid: u32, sig: Signal) -> Result<()> {
    let raw = i32::try_from(pid).map_err(|_| Error::Invalid(format!("pid {pid} out of range")))?;
    nix::sys::signal::kill(Pid::from_raw(raw), sig).map_err(|e| Error::Process {
        what: format!("send {sig} to {pid}"),
        reason: e.to_string(),
    })
}
