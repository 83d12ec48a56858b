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

/// Parse `YYYY-MM-DDTHH:MM:SS(.fff)(Z|±HH:MM)` into a `SystemTime`.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut nanos: i64 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let mut scale = 100_000_000;
        for d in frac[..digits].bytes().take(9) {
            nanos += i64::from(d - b'0') * scale;
            scale /= 10;
        }
        rest = &frac[digits..];
    }
    let offset_secs = match rest.as_bytes().first()? {
        b'Z' => 0,
        sign @ (b'+' | b'-') => {
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            let off = h * 3600 + m * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, u32::try_from(nanos).ok()?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
