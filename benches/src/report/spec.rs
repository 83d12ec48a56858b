//! What the report knows of each bench, by its id: what it times, its baseline, the
//! issue's goal, where its row goes; and how an id reads (`echo/<group>/<server>/<size>-<n>conn`).

use std::time::Duration;

use super::{CPU_PREFIX, ECHO_SERVERS, INTERLEAVED, LATENCY_GOAL, THROUGHPUT_GOAL};

/// A failover on the standby: its p99 at most this multiple of one echo round trip's p99 on
/// an open connection, measured in the same run (issue 37).
pub const STANDBY_GOAL: f64 = 2.0;

/// A goal from the issue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// The p99 of the timed interval is at most this.
    P99AtMost(Duration),
    /// The median throughput is at least this fraction of the baseline's.
    ThroughputAtLeast(f64),
    /// Median and p99 are each at most this multiple of the baseline's.
    LatencyWithin(f64),
    /// The p99 is at most this multiple of the baseline's p99 (the same run).
    P99Within(f64),
}

/// What the report knows of a bench: what it times, its baseline, its goal.
#[derive(Debug, Clone)]
pub struct Spec {
    /// What the bench times, in words, for the table.
    pub times: String,
    /// The id of the bench it is compared with, if any.
    pub baseline: Option<String>,
    /// A second baseline, shown next to the first (no goal attached).
    pub also: Option<String>,
    /// The goal for it, if it has one.
    pub goal: Option<Goal>,
    /// Other series of the same record shown as rows of their own: (series, row id, times).
    pub extra_rows: Vec<(&'static str, &'static str, &'static str)>,
    rank: u8,
}

/// The spec of bench `id` (a plain row for an unknown one).
pub fn spec(id: &str) -> Spec {
    let plain = |rank, times: &str| Spec {
        times: times.to_owned(),
        baseline: None,
        also: None,
        goal: None,
        extra_rows: Vec::new(),
        rank,
    };
    let floor = Some("failover/kill/floor_connect_echo".to_owned());
    let open_floor = Some("failover/kill/floor_open_echo".to_owned());
    let ms = |n| Some(Goal::P99AtMost(Duration::from_millis(n)));
    match id {
        "failover/kill/floor_connect_echo" => plain(
            0,
            "fresh loopback connect + one echo (the floor of a failover)",
        ),
        "failover/kill/inprocess_abort" => Spec {
            baseline: floor,
            goal: ms(2),
            ..plain(
                1,
                "in-process server torn down (runtime dropped) → first correct reply from B",
            )
        },
        "failover/kill/sigkill_process" => Spec {
            baseline: floor,
            goal: ms(2),
            ..plain(
                2,
                "SIGKILL of a server process → first correct reply from B",
            )
        },
        "failover/kill/floor_open_echo" => plain(
            0,
            "one echo round trip on an open loopback connection (the floor of a failover on a standby)",
        ),
        "failover/kill/inprocess_abort_standby" => Spec {
            baseline: open_floor.clone(),
            goal: Some(Goal::P99Within(STANDBY_GOAL)),
            ..plain(
                1,
                "in-process server torn down (runtime dropped) → first correct reply on the standby connection to B",
            )
        },
        "failover/kill/sigkill_process_standby" => Spec {
            baseline: open_floor,
            goal: Some(Goal::P99Within(STANDBY_GOAL)),
            ..plain(
                2,
                "SIGKILL of a server process → first correct reply on the standby connection to B",
            )
        },
        "failover/unhealthy/consul_to_switch" => Spec {
            goal: ms(50),
            extra_rows: vec![(
                "from_503",
                "failover/unhealthy/503_to_switch",
                "/check turns 503 → first reply from B (includes Consul's check interval)",
            )],
            ..plain(
                3,
                "Consul drops A from the passing set (seen by a blocking query) → first reply from B",
            )
        },
        "discovery/propagation/consul_to_client_view" => Spec {
            goal: ms(50),
            extra_rows: vec![(
                "from_start",
                "discovery/propagation/start_to_client_view",
                "new server starts (registers) → client's view lists it (includes the first check)",
            )],
            ..plain(
                4,
                "Consul lists the new instance as passing (seen by a blocking query) → client's view lists it",
            )
        },
        _ if id.starts_with("echo/throughput/echo-server/") => Spec {
            baseline: Some(id.replacen("/echo-server/", "/raw-buf/", 1)),
            also: Some(id.replacen("/echo-server/", "/raw-copy/", 1)),
            goal: Some(Goal::ThroughputAtLeast(THROUGHPUT_GOAL)),
            ..plain(
                5,
                "pipelined echo through echo-server; payload bytes echoed per second",
            )
        },
        _ if id.starts_with("echo/throughput/raw-buf/") => plain(
            5,
            "pipelined echo through a raw copier reading and writing with the echo-server's read size (the fair baseline)",
        ),
        _ if id.starts_with("echo/throughput/raw-buf-twin/") => Spec {
            baseline: Some(id.replacen("/raw-buf-twin/", "/raw-buf/", 1)),
            ..plain(
                5,
                "pipelined echo through a second copy of the fair baseline (the control: its ratio to the baseline is what two identical servers give in this run)",
            )
        },
        _ if id.starts_with("echo/throughput/raw-copy/") => plain(
            5,
            "pipelined echo through the raw `tokio::io::copy` server (second baseline)",
        ),
        _ if id.starts_with("echo/latency/echo-server/") => Spec {
            baseline: Some(id.replacen("/echo-server/", "/raw-buf/", 1)),
            also: Some(id.replacen("/echo-server/", "/raw-copy/", 1)),
            goal: Some(Goal::LatencyWithin(LATENCY_GOAL)),
            ..plain(
                6,
                "one message's round trip through echo-server (one in flight per connection; the servers in alternation)",
            )
        },
        _ if id.starts_with("echo/latency/raw-buf/") => {
            plain(6, "one message's round trip through the fair baseline")
        }
        _ if id.starts_with("echo/latency/raw-buf-twin/") => Spec {
            baseline: Some(id.replacen("/raw-buf-twin/", "/raw-buf/", 1)),
            ..plain(
                6,
                "one message's round trip through the fair baseline's twin (the control)",
            )
        },
        _ if id.starts_with("echo/latency/raw-copy/") => plain(
            6,
            "one message's round trip through `tokio::io::copy` (second baseline)",
        ),
        _ if id.starts_with("scale/change/") => Spec {
            baseline: Some(id.replacen("/change/", "/change_full/", 1)),
            // Issue 19's goal: at most 10 ms of client CPU per change at 5,000 instances.
            goal: if id.contains("/5000/") { ms(10) } else { None },
            ..plain(
                8,
                "one change (one check flips) at `<n>` instances: the answer decoded by what changed, the view and the balancer updated (client CPU)",
            )
        },
        _ if id.starts_with("scale/change_full/") => plain(
            8,
            "the same change with every entry decoded in full and every instance rebuilt (the client before)",
        ),
        _ if id.starts_with("scale/first/") => plain(
            8,
            "the first answer at `<n>` instances (nothing to reuse), decoded by the views",
        ),
        _ if id.starts_with(CPU_PREFIX) => plain(
            7,
            "the servers' CPU time per message echoed (pipelined), one value per sample",
        ),
        _ => plain(9, ""),
    }
}

/// Where a row goes: by rank; echo rows by size, then connections, then server, so that
/// echo-server sits right above its baselines.
pub(crate) fn order(id: &str) -> (u8, String, usize, usize, usize, String) {
    let rank = spec(id).rank;
    match echo_parts(id) {
        Some((group, server, size, conns)) => (
            rank,
            group.to_owned(),
            size,
            conns,
            ECHO_SERVERS
                .iter()
                .position(|s| *s == server)
                .unwrap_or(ECHO_SERVERS.len()),
            id.to_owned(),
        ),
        None => (rank, id.to_owned(), 0, 0, 0, String::new()),
    }
}

/// Criterion's time for all the servers' rounds together (see [`INTERLEAVED`]).
pub(crate) fn interleaved(id: &str) -> bool {
    echo_parts(id).is_some_and(|(_, server, _, _)| server == INTERLEAVED)
}

/// `echo/<group>/<server>/<size>-<n>conn` → (group, server, size in bytes, n).
pub(crate) fn echo_parts(id: &str) -> Option<(&str, &str, usize, usize)> {
    let mut parts = id.split('/');
    if parts.next()? != "echo" {
        return None;
    }
    let (group, server, label) = (parts.next()?, parts.next()?, parts.next()?);
    let (size, conns) = label.split_once('-')?;
    let size = match size {
        s if s.ends_with("KiB") => s.trim_end_matches("KiB").parse::<usize>().ok()? << 10,
        s if s.ends_with('B') => s.trim_end_matches('B').parse().ok()?,
        _ => return None,
    };
    let conns = conns.strip_suffix("conn")?.parse().ok()?;
    Some((group, server, size, conns))
}

pub(crate) fn short(id: &str) -> &str {
    // `scale/change_full/5000/dev` → `change_full`: the scale rows differ by their function.
    if let Some(rest) = id.strip_prefix("scale/") {
        return rest.split('/').next().unwrap_or(rest);
    }
    id.rsplit('/').next().unwrap_or(id)
}

/// `echo/throughput/raw-buf/16B-1conn` → `raw-buf`.
pub(crate) fn server_of(id: &str) -> &str {
    echo_parts(id).map_or_else(|| short(id), |(_, server, _, _)| server)
}
