//! [`Watch`] drives one blocking query by Consul's rules, so callers only say what to read.
//! It blocks on the index (`X-Consul-Index`, most endpoints) or, with [`Watch::hash`], on the
//! content hash (`X-Consul-ContentHash`, the agent's own endpoints), like the Go `api/watch`
//! package's `BlockingParamVal`. By index:
//!
//! * the first read does not block (index 0 is never sent as a wait);
//! * each later read blocks on the last `X-Consul-Index`, for at most `wait` (≤ 10 min); the
//!   client's timeout is already above `wait × 17/16` (see [`QueryOptions`]);
//! * an index that goes backwards (a restarted agent, a snapshot restore) resets to 0, and an
//!   index of 0 from Consul is treated as 1;
//! * successive reads are at least `min_interval` apart, so a misbehaving server cannot make
//!   the loop spin.
//!
//! Errors are handed back: the caller decides whether to back off and call again (the index
//! is kept) or to give up (a 403, say).

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::{
    error::Result,
    query::{MAX_WAIT, QueryMeta, QueryOptions},
};

/// The state of one blocking query.
#[derive(Debug, Clone)]
pub struct Watch {
    base: QueryOptions,
    /// Block on the content hash instead of the index.
    by_hash: bool,
    hash: Option<String>,
    index: u64,
    delivered: bool,
    wait: Duration,
    min_interval: Duration,
    last_start: Option<Instant>,
}

/// What one answer means for the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// A new result: deliver it.
    Changed,
    /// The wait timed out with nothing new.
    Unchanged,
    /// The index went backwards: Consul's state was replaced; deliver it and start over.
    Reset,
}

impl Watch {
    /// A watch that blocks up to `wait` per read (capped at 10 minutes), with `base` for the
    /// other options (datacenter, ...).
    pub fn new(base: QueryOptions, wait: Duration) -> Self {
        Watch {
            base,
            by_hash: false,
            hash: None,
            index: 0,
            delivered: false,
            wait: wait.clamp(Duration::from_millis(1), MAX_WAIT),
            min_interval: Duration::from_millis(20),
            last_start: None,
        }
    }

    /// A watch of one of the agent's own endpoints (`/v1/agent/service/:id`, ...), which
    /// block on a content hash rather than an index: each read after the first sends the
    /// last `X-Consul-ContentHash` and waits up to `wait` for the content to differ.
    pub fn hash(base: QueryOptions, wait: Duration) -> Self {
        Watch {
            by_hash: true,
            ..Watch::new(base, wait)
        }
    }

    /// Reads start at least `interval` apart (default 20 ms).
    pub fn with_min_interval(mut self, interval: Duration) -> Self {
        self.min_interval = interval;
        self
    }

    /// The index the next read blocks on (0: it will not block).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Forget the index (or hash): the next read does not block and its result is delivered.
    pub fn reset(&mut self) {
        self.index = 0;
        self.hash = None;
        self.delivered = false;
    }

    /// The options of the next read.
    pub fn options(&self) -> QueryOptions {
        if self.by_hash {
            return QueryOptions {
                wait_hash: self.hash.clone(),
                wait_time: self.hash.is_some().then_some(self.wait),
                ..self.base.clone()
            };
        }
        QueryOptions {
            wait_index: self.index,
            wait_time: (self.index > 0).then_some(self.wait),
            ..self.base.clone()
        }
    }

    /// Account for an answer's metadata.
    pub fn observe(&mut self, meta: &QueryMeta) -> Observed {
        if self.by_hash {
            return self.observe_hash(meta);
        }
        let new = meta.last_index.max(1);
        let old = self.index;
        if old > 0 && new < old {
            self.index = 0;
            self.delivered = true;
            return Observed::Reset;
        }
        self.index = new;
        if !self.delivered || new != old {
            self.delivered = true;
            Observed::Changed
        } else {
            Observed::Unchanged
        }
    }

    /// Hash mode: a new hash is a change; the same hash means the wait timed out. An
    /// answer without a hash cannot be blocked on: it is delivered, and the next read
    /// does not block (reads stay `min_interval` apart).
    fn observe_hash(&mut self, meta: &QueryMeta) -> Observed {
        let new = meta.content_hash.clone().filter(|h| !h.is_empty());
        let changed = !self.delivered || new.is_none() || new != self.hash;
        self.hash = new;
        self.delivered = true;
        if changed {
            Observed::Changed
        } else {
            Observed::Unchanged
        }
    }

    /// Read with `fetch` until the result changes, and return it. Errors are returned as they
    /// come; the index is kept, so calling again resumes the watch.
    pub async fn next<T, F, Fut>(&mut self, mut fetch: F) -> Result<T>
    where
        F: FnMut(QueryOptions) -> Fut,
        Fut: Future<Output = Result<(T, QueryMeta)>>,
    {
        loop {
            if let Some(last) = self.last_start {
                tokio::time::sleep_until(last + self.min_interval).await;
            }
            self.last_start = Some(Instant::now());
            let (value, meta) = fetch(self.options()).await?;
            match self.observe(&meta) {
                Observed::Changed | Observed::Reset => return Ok(value),
                Observed::Unchanged => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(index: u64) -> QueryMeta {
        QueryMeta {
            last_index: index,
            ..Default::default()
        }
    }

    #[test]
    fn first_read_does_not_block_then_blocks_on_the_index() {
        let mut w = Watch::new(QueryOptions::default(), Duration::from_secs(30));
        assert_eq!(w.options().wait_index, 0);
        assert_eq!(w.options().wait_time, None);
        assert_eq!(w.observe(&meta(7)), Observed::Changed);
        assert_eq!(w.options().wait_index, 7);
        assert_eq!(w.options().wait_time, Some(Duration::from_secs(30)));
        assert_eq!(w.observe(&meta(7)), Observed::Unchanged, "wait timed out");
        assert_eq!(w.observe(&meta(9)), Observed::Changed);
    }

    #[test]
    fn backwards_index_resets() {
        let mut w = Watch::new(QueryOptions::default(), Duration::from_secs(30));
        w.observe(&meta(100));
        assert_eq!(w.observe(&meta(3)), Observed::Reset);
        assert_eq!(
            w.options().wait_index,
            0,
            "next read is a fresh, non-blocking one"
        );
        assert_eq!(w.observe(&meta(3)), Observed::Changed);
        assert_eq!(w.options().wait_index, 3);
    }

    #[test]
    fn zero_index_is_never_sent_as_a_wait() {
        let mut w = Watch::new(QueryOptions::default(), Duration::from_secs(30));
        assert_eq!(w.observe(&meta(0)), Observed::Changed);
        assert_eq!(w.options().wait_index, 1);
        assert_eq!(w.observe(&meta(0)), Observed::Unchanged);
    }

    fn hashed(hash: Option<&str>) -> QueryMeta {
        QueryMeta {
            content_hash: hash.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn hash_mode_blocks_on_the_content_hash() {
        let mut w = Watch::hash(QueryOptions::default(), Duration::from_secs(30));
        assert_eq!(w.options().wait_hash, None, "the first read does not block");
        assert_eq!(w.options().wait_time, None);
        assert_eq!(w.observe(&hashed(Some("a1"))), Observed::Changed);
        let opts = w.options();
        assert_eq!(opts.wait_hash.as_deref(), Some("a1"));
        assert_eq!(opts.wait_index, 0, "never an index in hash mode");
        assert_eq!(opts.wait_time, Some(Duration::from_secs(30)));
        assert_eq!(w.observe(&hashed(Some("a1"))), Observed::Unchanged);
        assert_eq!(w.observe(&hashed(Some("b2"))), Observed::Changed);
        assert_eq!(
            w.observe(&hashed(None)),
            Observed::Changed,
            "no hash: delivered, not taken for a timeout"
        );
        assert_eq!(
            w.options().wait_hash,
            None,
            "and the next read does not block"
        );
        w.observe(&hashed(Some("c3")));
        w.reset();
        assert_eq!(w.options().wait_hash, None);
        assert_eq!(w.observe(&hashed(Some("c3"))), Observed::Changed);
    }

    #[test]
    fn wait_is_capped_at_ten_minutes() {
        let mut w = Watch::new(QueryOptions::default(), Duration::from_secs(3600));
        w.observe(&meta(5));
        assert_eq!(w.options().wait_time, Some(Duration::from_secs(600)));
    }

    #[tokio::test(start_paused = true)]
    async fn reads_are_rate_bounded_and_skip_unchanged_answers() {
        let mut w = Watch::new(QueryOptions::default(), Duration::from_secs(30))
            .with_min_interval(Duration::from_millis(100));
        let start = Instant::now();
        let mut calls = 0u64;
        // Index stays 5 three times (timeouts), then moves to 6.
        let answers = [5, 5, 5, 6];
        let first = w
            .next(|_| {
                let i = answers[calls as usize];
                calls += 1;
                async move { Ok::<_, crate::Error>((i, meta(i))) }
            })
            .await
            .unwrap();
        assert_eq!(first, 5);
        let second = w
            .next(|opts| {
                assert_eq!(opts.wait_index, 5);
                let i = answers[calls as usize];
                calls += 1;
                async move { Ok::<_, crate::Error>((i, meta(i))) }
            })
            .await
            .unwrap();
        assert_eq!(second, 6);
        assert_eq!(calls, 4);
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "4 reads, 100 ms apart"
        );
    }
}
