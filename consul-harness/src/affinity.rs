//! Where a thread or a process runs: pinning to one CPU (`sched_setaffinity`), so that a load
//! generator and the process it measures do not share a CPU, and the CPUs this process may
//! use.

use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

use crate::error::{Error, Result};

fn cpu_set(cpu: usize) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .map_err(|e| Error::Setting(format!("CPU {cpu}: {e}")))?;
    Ok(set)
}

/// Run the calling thread on CPU `cpu` only from now on (threads it spawns inherit it).
pub fn pin_thread(cpu: usize) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), &cpu_set(cpu)?).map_err(|e| Error::Process {
        what: format!("pin this thread to CPU {cpu}"),
        reason: e.to_string(),
    })
}

/// This thread pinned to one CPU until the guard is dropped, then back on the CPUs it had:
/// a process started meanwhile inherits the one CPU from its first instruction, as under
/// `taskset -c <cpu>`, so a runtime that sizes its thread pool by the CPUs it may use
/// (tokio's default: `available_parallelism`, which reads the affinity) starts one worker.
/// Pinning a process after it started ([`pin_process`]) leaves it with the pool it sized
/// for every CPU, its workers then taking turns on the one.
///
/// Not `Send`: the guard gives back the CPUs of the thread that dropped it, so it must not
/// move to another thread (held across an `.await` of a task that a multi-threaded runtime
/// may resume elsewhere, it would not compile).
#[derive(Debug)]
#[must_use = "the thread is pinned only while the guard lives"]
pub struct PinnedHere {
    before: CpuSet,
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl PinnedHere {
    /// Pin the calling thread to `cpu`.
    pub fn to(cpu: usize) -> Result<PinnedHere> {
        let before = sched_getaffinity(Pid::from_raw(0)).map_err(|e| Error::Process {
            what: "read this thread's CPUs".into(),
            reason: e.to_string(),
        })?;
        pin_thread(cpu)?;
        Ok(PinnedHere {
            before,
            _this_thread: std::marker::PhantomData,
        })
    }
}

impl Drop for PinnedHere {
    fn drop(&mut self) {
        if let Err(e) = sched_setaffinity(Pid::from_raw(0), &self.before) {
            tracing::warn!(error = %e, "could not give this thread its CPUs back");
        }
    }
}

/// Run every thread of process `pid` on CPU `cpu` only (threads it starts later inherit it
/// from the thread that starts them). Returns how many threads were pinned.
pub fn pin_process(pid: u32, cpu: usize) -> Result<usize> {
    let set = cpu_set(cpu)?;
    let mut pinned = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
            .ok_or_else(|| Error::Process {
                what: format!("pin process {pid}"),
                reason: "a task id that is not a number".into(),
            })?;
        match sched_setaffinity(Pid::from_raw(tid), &set) {
            Ok(()) => pinned += 1,
            // The thread ended in between.
            Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                return Err(Error::Process {
                    what: format!("pin thread {tid} of {pid} to CPU {cpu}"),
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(pinned)
}

/// The CPUs this process may run on (`sched_getaffinity`), or 0 if unknown.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_runs_on_its_cpu_only() {
        let pinned = std::thread::spawn(|| {
            pin_thread(0).unwrap();
            nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap()
        })
        .join()
        .unwrap();
        assert!(pinned.is_set(0).unwrap());
        assert!(cpus() < 2 || !pinned.is_set(1).unwrap());
        assert!(cpu_set(CpuSet::count()).is_err(), "no such CPU");
    }

    #[tokio::test]
    async fn a_child_process_is_pinned_thread_by_thread() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        assert_eq!(pin_process(pid, 0).unwrap(), 1);
        let set = nix::sched::sched_getaffinity(Pid::from_raw(pid as i32)).unwrap();
        assert!(set.is_set(0).unwrap());
        assert!(cpus() < 2 || !set.is_set(1).unwrap());
        child.kill().await.unwrap();
    }

    #[test]
    fn a_process_started_while_pinned_starts_on_that_cpu_alone() {
        // A thread of its own: the pin must not leak into other tests' threads.
        std::thread::spawn(|| {
            let before = sched_getaffinity(Pid::from_raw(0)).unwrap();
            let mut child = {
                let _pinned = PinnedHere::to(0).unwrap();
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap()
            };
            let set = sched_getaffinity(Pid::from_raw(child.id() as i32)).unwrap();
            let after = sched_getaffinity(Pid::from_raw(0)).unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
            assert!(set.is_set(0).unwrap());
            assert!(cpus() < 2 || !set.is_set(1).unwrap(), "the child has CPU 1");
            assert_eq!(after, before, "the thread has its CPUs back");
        })
        .join()
        .unwrap();
    }
}
