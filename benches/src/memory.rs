//! The resident set of a process, from `/proc/<pid>/status`: `VmRSS` (now) and `VmHWM` (the
//! peak since it started), in KiB.

use crate::error::{Error, Result};

/// A process's resident set now and at its peak, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    pub now_kib: u64,
    pub peak_kib: u64,
}

/// Read `/proc/<pid>/status`.
pub fn rss_of(pid: u32) -> Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status(&status)
        .ok_or_else(|| Error::Invalid(format!("no VmRSS/VmHWM in /proc/{pid}/status")))
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text.
pub fn parse_status(status: &str) -> Option<Rss> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some(Rss {
        now_kib: field("VmRSS:")?,
        peak_kib: field("VmHWM:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_peak() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    4321 kB\nVmRSS:\t    1234 kB\n";
        assert_eq!(
            parse_status(status),
            Some(Rss {
                now_kib: 1234,
                peak_kib: 4321
            })
        );
        assert_eq!(parse_status("Name:\tkthread\n"), None);
        let me = rss_of(std::process::id()).unwrap();
        assert!(me.now_kib > 0 && me.peak_kib >= me.now_kib);
    }
}
