//! The resident set of a process, from the harness's one `/proc` reader: `VmRSS` (now) and
//! `VmHWM` (the peak since it started), in KiB.

pub use consul_harness::procfs::Rss;

use crate::error::Result;

/// Read `/proc/<pid>/status`.
pub fn rss_of(pid: u32) -> Result<Rss> {
    Ok(consul_harness::procfs::rss(pid)?)
}
