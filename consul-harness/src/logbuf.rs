//! A child's output as the testbed sees it (a Consul agent's log, an echo server's or client's
//! output): every line with the moment it arrived, so tests and experiments can wait on a line
//! (with a deadline) and read the timestamps the child printed.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;

use crate::error::{Error, Result};

/// Lines kept at most; older ones are dropped first.
const MAX_LINES: usize = 200_000;

/// One line of output.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// When the testbed received it.
    pub received: SystemTime,
    /// The line, without its newline.
    pub text: String,
}

impl LogLine {
    /// The timestamp Consul printed at the start of the line (`2026-11-25T13:32:04.915Z`, or
    /// with a zone offset), if any.
    pub fn consul_time(&self) -> Option<SystemTime> {
        let first = self.text.split_whitespace().next()?;
        parse_rfc3339(first)
    }
}

/// A shared, append-only, bounded view of a child's output.
#[derive(Debug, Clone, Default)]
pub struct LogBuffer {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    lines: Mutex<Lines>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct Lines {
    kept: std::collections::VecDeque<LogLine>,
    dropped: usize,
    partial: Vec<u8>,
}

impl LogBuffer {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append raw output; complete lines become visible, a trailing partial line waits.
    pub fn push_bytes(&self, bytes: &[u8]) {
        let now = SystemTime::now();
        let mut lines = self.lock();
        lines.partial.extend_from_slice(bytes);
        while let Some(pos) = lines.partial.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = lines.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&raw[..raw.len() - 1])
                .trim_end_matches('\r')
                .to_owned();
            lines.kept.push_back(LogLine {
                received: now,
                text,
            });
            if lines.kept.len() > MAX_LINES {
                lines.kept.pop_front();
                lines.dropped += 1;
            }
        }
        // A line longer than 64 KiB is cut, so garbage cannot grow the buffer unbounded.
        if lines.partial.len() > 64 << 10 {
            let text = String::from_utf8_lossy(&lines.partial).into_owned();
            lines.partial.clear();
            lines.kept.push_back(LogLine {
                received: now,
                text,
            });
        }
        drop(lines);
        self.inner.notify.notify_waiters();
    }

    /// Append one whole line.
    pub fn push_line(&self, line: &str) {
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        self.push_bytes(&bytes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.inner
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The position after the last line so far, for [`LogBuffer::wait_for_after`].
    pub fn mark(&self) -> usize {
        let lines = self.lock();
        lines.dropped + lines.kept.len()
    }

    /// Every line kept so far.
    pub fn lines(&self) -> Vec<LogLine> {
        self.lock().kept.iter().cloned().collect()
    }

    /// Lines containing `needle`.
    pub fn matching(&self, needle: &str) -> Vec<LogLine> {
        self.lock()
            .kept
            .iter()
            .filter(|l| l.text.contains(needle))
            .cloned()
            .collect()
    }

    /// The first line after position `mark` containing `needle`, if there is one yet.
    pub fn find_after(&self, mark: usize, needle: &str) -> Option<LogLine> {
        self.nth_after(mark, needle, 1)
    }

    /// Wait until at least `n` lines after position `mark` contain `needle`, at most
    /// `timeout`; returns the `n`-th such line.
    pub async fn wait_for_count(
        &self,
        mark: usize,
        needle: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<LogLine> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(line) = self.nth_after(mark, needle, n) {
                return Ok(line);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::Timeout {
                    what: format!("{n} output lines {needle:?}"),
                    timeout,
                });
            }
        }
    }

    fn nth_after(&self, mark: usize, needle: &str, n: usize) -> Option<LogLine> {
        let lines = self.lock();
        let skip = mark.saturating_sub(lines.dropped);
        lines
            .kept
            .iter()
            .skip(skip)
            .filter(|l| l.text.contains(needle))
            .nth(n.checked_sub(1)?)
            .cloned()
    }

    /// Wait until a line containing `needle` arrives (or has arrived), at most `timeout`.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> Result<LogLine> {
        self.wait_for_after(0, needle, timeout).await
    }

    /// Wait until a line after position `mark` contains `needle`, at most `timeout`.
    pub async fn wait_for_after(
        &self,
        mark: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<LogLine> {
        self.wait_for_count(mark, needle, 1, timeout).await
    }
}

/// Parse `YYYY-MM-DDTHH:MM:SS(.fff)(Z|±HH:MM|±HHMM)` into a `SystemTime` (Consul's agent
/// logs UTC with `Z`; a local zone shows as an offset, without a colon in newer agents).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let after_seconds = s.get(19..)?;
    let frac = after_seconds
        .strip_prefix('.')
        .map_or(0, |f| 1 + f.bytes().take_while(u8::is_ascii_digit).count());
    let (stamp, zone) = s.split_at(19 + frac);
    let east_of_utc: i64 = match zone.as_bytes() {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let digits: Vec<i64> = rest
                .iter()
                .filter(|b| **b != b':')
                .map(|b| b.is_ascii_digit().then(|| i64::from(b - b'0')))
                .collect::<Option<_>>()?;
            let [h1, h2, m1, m2] = digits[..] else {
                return None;
            };
            let secs = (h1 * 10 + h2) * 3600 + (m1 * 10 + m2) * 60;
            if *sign == b'+' { secs } else { -secs }
        }
        _ => return None,
    };
    let as_if_utc = humantime::parse_rfc3339(&format!("{stamp}Z")).ok()?;
    let shift = Duration::from_secs(east_of_utc.unsigned_abs());
    if east_of_utc >= 0 {
        as_if_utc.checked_sub(shift)
    } else {
        as_if_utc.checked_add(shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_consul_timestamps() {
        let t = parse_rfc3339("2026-11-25T13:32:04.915Z").unwrap();
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(secs.as_secs(), 1_795_613_524);
        assert_eq!(secs.subsec_millis(), 915);
        let with_offset = parse_rfc3339("2026-11-25T14:32:04.915+01:00").unwrap();
        assert_eq!(with_offset, t);
        assert_eq!(parse_rfc3339("2026-11-25T14:32:04.915+0100"), Some(t));
        assert_eq!(parse_rfc3339("2026-11-25T08:32:04.915-05:00"), Some(t));
        assert!(parse_rfc3339("2026-11-25T14:32:04.915+01").is_none());
        assert!(parse_rfc3339("2026-11-25T14:32:04.915").is_none());
        assert!(parse_rfc3339("==> Consul").is_none());
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:00Z"),
            Some(SystemTime::UNIX_EPOCH)
        );
    }

    #[test]
    fn splits_partial_lines() {
        let log = LogBuffer::new();
        log.push_bytes(b"    2026-11-25T13:32:04.915Z [INFO]  agent: Started HTTP ser");
        assert!(log.lines().is_empty());
        log.push_bytes(b"ver\n==> Consul agent running!\n");
        let lines = log.lines();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].consul_time().is_some());
        assert_eq!(log.matching("agent running").len(), 1);
        assert_eq!(log.mark(), 2);
        assert!(log.find_after(1, "Started HTTP").is_none());
    }

    #[tokio::test]
    async fn wait_for_sees_later_lines_and_times_out() {
        let log = LogBuffer::new();
        let writer = log.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            writer.push_line("hello there");
        });
        let line = log.wait_for("hello", Duration::from_secs(5)).await.unwrap();
        assert_eq!(line.text, "hello there");
        let err = log
            .wait_for("never", Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("never"));
    }
}
