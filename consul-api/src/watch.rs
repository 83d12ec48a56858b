//! [`Watch`] drives one blocking query by Consul's rules, so callers only say what to read.
//! It blocks on the index (`X-Consul-Index`, most endpoints) or, with [`Watch::hash`], on the
//! content hash (`X-Consul-ContentHash`, the agent's own endpoints), like the Go `api/watch`
//! package's `BlockingParamVal`. By index:
//!
//! * the first read does not block (index 0 is never sent as a wait);
//! * each later read blocks on the last `X-Consul-Index`, for at most `wait` (≤ 10 min); the
//!   client's timeout is already above `wait × 17/16` (see [`QueryOptions`]);
//! * an index that goes backwards (a restarted agent, a snapshot restore) resets to 0;
//! * an answer without a usable index (`X-Consul-Index` missing or 0: a proxy stripped it)
//!   cannot be blocked on nor compared: it is delivered as it is, and the next read does not
//!   block but waits a [`Backoff::poll`] delay (200 ms doubling to 2 s, jittered), until an
//!   index shows up again;
//! * by hash, the same: a new hash is a change, the same hash a wait that timed out, an
//!   answer without a hash is delivered and the next read polls;
//! * successive reads are at least `min_interval` apart, so a misbehaving server cannot make
//!   the loop spin;
//! * with [`Watch::poll`], for what cannot block (a prepared query's execution, the agent's
//!   service list), every read is delivered and reads start `every` apart.
//!
//! Errors are handed back: the caller decides whether to back off and call again (the index
//! is kept) or to give up (a 403, say).

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::{
    backoff::Backoff,
    error::Result,
    query::{MAX_WAIT, QueryMeta, QueryOptions},
};

/// The state of one blocking query.
#[derive(Debug)]
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
    /// The last answer had no usable index: poll with this backoff.
    polling: Option<Backoff>,
    /// Never block: read at this fixed rate and deliver every answer.
    poll_every: Option<Duration>,
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
    /// No usable index: deliver it, and poll (with backoff) instead of blocking.
    NoIndex,
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
            polling: None,
            poll_every: None,
        }
    }

    /// A watch of an endpoint that cannot block: reads start `every` apart (at least 1 ms)
    /// and every answer is delivered, changed or not.
    pub fn poll(base: QueryOptions, every: Duration) -> Self {
        let every = every.max(Duration::from_millis(1));
        Watch {
            poll_every: Some(every),
            min_interval: every,
            ..Watch::new(base, every)
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

    /// Reads start at least `interval` apart (default 20 ms; a polling watch's period).
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
        if self.poll_every.is_some() {
            return self.base.clone();
        }
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
        if self.poll_every.is_some() {
            self.index = meta.last_index;
            self.delivered = true;
            return Observed::Changed;
        }
        if self.by_hash {
            return self.observe_hash(meta);
        }
        if meta.last_index == 0 {
            self.index = 0;
            self.delivered = true;
            self.polling.get_or_insert_with(Backoff::poll);
            return Observed::NoIndex;
        }
        self.polling = None;
        let new = meta.last_index;
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

    fn observe_hash(&mut self, meta: &QueryMeta) -> Observed {
        let Some(new) = meta.content_hash.clone().filter(|h| !h.is_empty()) else {
            self.hash = None;
            self.delivered = true;
            self.polling.get_or_insert_with(Backoff::poll);
            return Observed::NoIndex;
        };
        self.polling = None;
        let changed = !self.delivered || self.hash.as_deref() != Some(new.as_str());
        self.hash = Some(new);
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
                let delay = match &mut self.polling {
                    Some(backoff) => backoff.next_delay().max(self.min_interval),
                    None => self.min_interval,
                };
                tokio::time::sleep_until(last + delay).await;
            }
            self.last_start = Some(Instant::now());
            let (value, meta) = fetch(self.options()).await?;
            match self.observe(&meta) {
                Observed::Changed | Observed::Reset | Observed::NoIndex => return Ok(value),
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
        assert_eq!(w.observe(&meta(0)), Observed::NoIndex);
        assert_eq!(w.options().wait_index, 0);
        assert_eq!(w.options().wait_time, None, "nothing to block on");
        assert_eq!(w.observe(&meta(0)), Observed::NoIndex, "delivered again");
        assert_eq!(w.observe(&meta(4)), Observed::Changed, "an index again");
        assert_eq!(w.options().wait_index, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_index_every_answer_is_delivered_and_reads_back_off() {
        let mut w = Watch::new(QueryOptions::default(), Duration::from_secs(30));
        let mut starts = Vec::new();
        for expected in 1..=6u64 {
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                w.next(|opts| {
                    assert_eq!(opts.wait_index, 0, "never blocks on a made-up index");
                    starts.push(Instant::now());
                    async move { Ok::<_, crate::Error>((expected, meta(0))) }
                }),
            )
            .await
            .expect("an answer without index is delivered")
            .unwrap();
            assert_eq!(got, expected);
        }
        let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().all(|g| *g >= Duration::from_millis(200)),
            "polls back off: {gaps:?}"
        );
        assert!(gaps[4] >= Duration::from_secs(2), "and grow: {gaps:?}");
        assert!(
            gaps.iter().all(|g| *g < Duration::from_secs(4)),
            "capped: {gaps:?}"
        );
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
            Observed::NoIndex,
            "no hash: delivered, and polled"
        );
        assert_eq!(w.options().wait_hash, None, "the next read does not block");
        assert_eq!(w.observe(&hashed(Some("c3"))), Observed::Changed);
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

    #[tokio::test(start_paused = true)]
    async fn a_polling_watch_never_blocks_and_delivers_every_answer_at_its_rate() {
        let base = QueryOptions {
            datacenter: Some("dc2".into()),
            ..Default::default()
        };
        let mut w = Watch::poll(base, Duration::from_millis(500));
        let start = Instant::now();
        let mut starts = Vec::new();
        for expected in [7u64, 7, 9] {
            let got = w
                .next(|opts| {
                    assert_eq!(opts.wait_index, 0, "a poll never blocks");
                    assert_eq!(opts.wait_time, None);
                    assert_eq!(opts.datacenter.as_deref(), Some("dc2"));
                    starts.push(start.elapsed());
                    async move { Ok::<_, crate::Error>((expected, meta(expected))) }
                })
                .await
                .unwrap();
            assert_eq!(got, expected, "the same answer twice is delivered twice");
        }
        assert_eq!(
            starts,
            [0, 500, 1000].map(Duration::from_millis).to_vec(),
            "reads start every 500 ms"
        );
    }
}
