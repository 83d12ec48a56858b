//! What Linux's `/proc` says of a process, parsed in one place: its resident set
//! (`/proc/<pid>/status`: `VmRSS` now, `VmHWM` at its peak), the CPU time it has used
//! (`/proc/<pid>/stat`; per thread name, to the nanosecond: `/proc/<pid>/task/*/schedstat`)
//! and whether every thread is stopped (`/proc/<pid>/task/*/stat`); and what a container's
//! cgroup says of the CPU time its processes used (cgroup v1 `cpuacct.usage`, v2 `cpu.stat`).

use std::time::Duration;

use crate::error::{Error, Result};

/// A process's resident set now and at its peak, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    /// `VmRSS`.
    pub now_kib: u64,
    /// `VmHWM`.
    pub peak_kib: u64,
}

/// The resident set of process `pid` (`std::process::id()` for this one).
pub fn rss(pid: u32) -> Result<Rss> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)?;
    parse_rss(&status).ok_or_else(|| Error::Process {
        what: format!("read the resident set of {pid}"),
        reason: format!("no VmRSS/VmHWM in {path}"),
    })
}

/// One `kB` field (`VmRSS`, `VmHWM`, ...) of process `pid`'s status; `None` if the process
/// is gone or has no such field.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&status, field)
}

/// One `kB` field of a `/proc/<pid>/status` text.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text.
pub fn parse_rss(status: &str) -> Option<Rss> {
    Some(Rss {
        now_kib: parse_status_kib(status, "VmRSS")?,
        peak_kib: parse_status_kib(status, "VmHWM")?,
    })
}

/// The fields of a `/proc/<pid>/stat` line after the command name (which is in
/// parentheses and may hold anything), starting with the state (field 3).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    Some(rest.split_whitespace().collect())
}

/// The CPU time (user + system) process `pid` has used.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_time(&stat)
}

/// utime + stime of a `/proc/<pid>/stat` line (fields 14 and 15, in USER_HZ: 100 per second
/// on Linux).
pub fn parse_cpu_time(stat: &str) -> Option<Duration> {
    let fields = stat_fields(stat)?;
    let ticks = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    Some(Duration::from_millis((ticks(14)? + ticks(15)?) * 10))
}

/// The CPU time used so far by the threads of process `pid` named `name` (their `comm`, which
/// Linux cuts to 15 bytes), to the nanosecond: the first field of each thread's
/// `/proc/<pid>/task/<tid>/schedstat`. Threads that ended are not counted.
pub fn threads_cpu_time(pid: u32, name: &str) -> Result<Duration> {
    tasks_cpu_time(pid, Some(name))
}

/// The CPU time used so far by every live thread of process `pid`, to the nanosecond (see
/// [`threads_cpu_time`]; [`cpu_time`] also counts ended threads, in 10 ms ticks).
pub fn process_cpu_time_ns(pid: u32) -> Result<Duration> {
    tasks_cpu_time(pid, None)
}

fn tasks_cpu_time(pid: u32, name: Option<&str>) -> Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        if let Some(name) = name {
            // A thread may end between the listing and the reads: skip it.
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue;
            };
            if comm.trim_end_matches('\n') != name {
                continue;
            }
        }
        if let Ok(schedstat) = std::fs::read_to_string(dir.join("schedstat")) {
            total += parse_schedstat_ns(&schedstat).ok_or_else(|| Error::Process {
                what: format!("read the CPU time of {pid}'s threads"),
                reason: format!("unexpected schedstat {schedstat:?}"),
            })?;
        }
    }
    Ok(Duration::from_nanos(total))
}

/// Nanoseconds on CPU, the first field of a `schedstat` line.
pub fn parse_schedstat_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// How long the calling thread has waited, runnable, for a CPU so far (its run queue
/// delay): `/proc/thread-self/schedstat`'s second field. `None` without schedstats.
pub fn own_run_delay() -> Option<Duration> {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    parse_schedstat_wait_ns(&schedstat).map(Duration::from_nanos)
}

/// Nanoseconds waited on a run queue, the second field of a `schedstat` line.
pub fn parse_schedstat_wait_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(1)?.parse().ok()
}

/// The CPU time used by the processes of Docker container `id` (its full ID), from its
/// cgroup: v1 `cpuacct.usage` (nanoseconds) or v2 `cpu.stat`'s `usage_usec`, under the
/// layouts of the `cgroupfs` and `systemd` drivers. `None` when no such cgroup is visible
/// here (a rootless or nested engine): read the container's main process instead.
pub fn container_cpu_time(id: &str) -> Option<Duration> {
    let v1 = [
        format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage"),
        format!("/sys/fs/cgroup/cpu,cpuacct/docker/{id}/cpuacct.usage"),
        format!("/sys/fs/cgroup/cpuacct/system.slice/docker-{id}.scope/cpuacct.usage"),
    ];
    for path in v1 {
        if let Some(ns) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            return Some(Duration::from_nanos(ns));
        }
    }
    let v2 = [
        format!("/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat"),
        format!("/sys/fs/cgroup/docker/{id}/cpu.stat"),
    ];
    v2.iter()
        .find_map(|path| parse_cpu_stat(&std::fs::read_to_string(path).ok()?))
}

/// `usage_usec` of a cgroup v2 `cpu.stat` text.
pub fn parse_cpu_stat(stat: &str) -> Option<Duration> {
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_micros)
}

/// Whether every thread of process `pid` is stopped (state `T` or `t`).
pub fn is_stopped(pid: u32) -> Result<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
    for task in tasks {
        let stat = std::fs::read_to_string(task?.path().join("stat"))?;
        let state = stat_fields(&stat).and_then(|f| f.first().copied());
        if !matches!(state, Some("T" | "t")) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_peak() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    4321 kB\nVmRSS:\t    1234 kB\n";
        assert_eq!(
            parse_rss(status),
            Some(Rss {
                now_kib: 1234,
                peak_kib: 4321
            })
        );
        assert_eq!(parse_status_kib(status, "VmPeak"), Some(9000));
        assert!(status_kib(std::process::id(), "VmRSS").is_some());
        assert_eq!(status_kib(std::process::id(), "NoSuchField"), None);
        assert_eq!(parse_rss("Name:\tkthread\n"), None);
        let me = rss(std::process::id()).unwrap();
        assert!(me.now_kib > 0 && me.peak_kib >= me.now_kib);
    }

    #[test]
    fn reads_cpu_time_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_cpu_time(stat), Some(Duration::from_secs(3)));
        assert_eq!(parse_cpu_time("garbage"), None);
        assert!(cpu_time(std::process::id()).is_some());
        assert!(
            !is_stopped(std::process::id()).unwrap(),
            "this process runs"
        );
    }

    #[test]
    fn reads_a_cgroup_v2_cpu_stat() {
        let stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n";
        assert_eq!(parse_cpu_stat(stat), Some(Duration::from_micros(1_234_567)));
        assert_eq!(parse_cpu_stat("user_usec 5\n"), None);
        assert_eq!(container_cpu_time("no-such-container"), None);
    }

    #[test]
    fn thread_cpu_time_counts_the_named_threads_only() {
        assert_eq!(
            parse_schedstat_ns("134959952 904615856 259\n"),
            Some(134_959_952)
        );
        assert_eq!(parse_schedstat_ns(""), None);
        assert_eq!(
            parse_schedstat_wait_ns("134959952 904615856 259\n"),
            Some(904_615_856)
        );
        assert_eq!(parse_schedstat_wait_ns("134959952"), None);
        let pid = std::process::id();
        let spinner = std::thread::Builder::new()
            .name("procfs-spin".into())
            .spawn(move || {
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while threads_cpu_time(pid, "procfs-spin").unwrap() < Duration::from_millis(20) {
                    assert!(start.elapsed() < Duration::from_secs(10), "never counted");
                    for _ in 0..100_000 {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
                // While this thread lives: a thread that has ended is no longer listed.
                assert!(process_cpu_time_ns(pid).unwrap() >= Duration::from_millis(20));
            })
            .unwrap();
        spinner.join().unwrap();
        assert_eq!(
            threads_cpu_time(pid, "no-such-thread").unwrap(),
            Duration::ZERO
        );
    }

    #[test]
    fn cpu_time_grows_while_spinning() {
        let pid = std::process::id();
        let before = cpu_time(pid).unwrap();
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_time(pid).unwrap() < before + Duration::from_millis(50) {
            assert!(
                spin.elapsed() < Duration::from_secs(10),
                "CPU time never grew"
            );
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    }
}
