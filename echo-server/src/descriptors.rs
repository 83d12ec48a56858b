//! The descriptor table grown once, at start, so that no accept waits for it under load.
//!
//! A process's table of file descriptors starts small and, on Linux, doubles when a new
//! descriptor does not fit. In a process with more than one thread the old table may still be
//! read by another thread, so growing it waits for an RCU grace period (`expand_fdtable` calls
//! `synchronize_rcu`): several scheduler ticks during which the thread that called `accept`
//! sleeps uninterruptibly, and every connection that thread was serving waits with it. A
//! burst of connections crosses 64, 128, 256, … descriptors one doubling at a time, each a
//! stall of the server at the worst moment (BENCHMARKS.md at c5bb543, "fairness", has the
//! traces).
//!
//! The table never shrinks, so asking once for a descriptor number as high as the connection
//! limit needs (`fcntl(F_DUPFD)` of the listener, closed at once) moves every doubling to
//! the start, before anything is served. A few KiB: one pointer and two bits per slot.

use std::{io, os::fd::AsFd};

/// Descriptors beyond the connection limit the server may hold: its listeners, the runtime's
/// epoll and eventfd, connections to Consul and `/check` requests, standard streams.
pub const SPARE: usize = 64;

/// Grow this process's descriptor table so that descriptor numbers up to
/// `connections + SPARE` (at most the soft `RLIMIT_NOFILE` − 1, above which no descriptor
/// can be opened anyway) fit without growing it again. Returns the highest number reserved.
pub fn reserve(fd: impl AsFd, connections: usize) -> io::Result<usize> {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let top = highest(connections, soft);
    // The lowest free number at or above `top`: the table grows to hold it. Dropped here,
    // so closed again at once; the table keeps its size.
    let _high = rustix::io::fcntl_dupfd_cloexec(fd, top)?;
    Ok(top as usize)
}

/// The descriptor number to reserve up to: `connections + SPARE`, below the soft limit
/// (`None`: unlimited) and within a descriptor number's range.
fn highest(connections: usize, soft: Option<u64>) -> i32 {
    let wanted = u64::try_from(connections.saturating_add(SPARE)).unwrap_or(u64::MAX);
    let top = soft.map_or(wanted, |soft| wanted.min(soft.saturating_sub(1)));
    i32::try_from(top).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reservation_stays_below_the_soft_limit() {
        assert_eq!(highest(1024, Some(20_000)), 1024 + SPARE as i32);
        assert_eq!(highest(1024, Some(1024)), 1023);
        assert_eq!(highest(1024, None), 1024 + SPARE as i32);
        assert_eq!(highest(usize::MAX, None), i32::MAX);
        assert_eq!(highest(10, Some(0)), 0);
    }
}
