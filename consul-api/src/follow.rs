//! The one loop around a [`Watch`]: [`Follow`] reads with a fetch function it is given, backs
//! off when reads fail, resets the watch, and classifies each error by a small explicit policy
//! ([`Classify`]); the caller only sees [`Event`]s. [`Retry`], its error half (backoff,
//! classification, the state "answering / failing since"), also serves loops that write
//! rather than watch (a TTL heartbeat).
//!
//! The rules, for every caller:
//!
//! * A read that succeeds and changes (by the [`Watch`]'s rules: index, hash, or every poll)
//!   is [`Event::Changed`], with the answer's [`QueryMeta`]; the backoff starts over.
//! * A failed read is either [`Event::Unreachable`] — the watch is reset (Consul may be a new
//!   agent whose indexes start over: a blocking query on the old index would sit out its whole
//!   wait on stale data), the next read waits the backoff's delay first — or
//!   [`Event::Fatal`], after which the caller stops. Which one is the [`Classify`] policy's
//!   call, given the error and whether any read has succeeded yet.
//! * Delays come from the one [`Backoff`] (jittered, doubling, endless): the loop never gives
//!   up by itself. Callers bound it with a deadline or by stopping on an event.
//! * An answer the caller will not use (its metadata fails the [`Follow::refusing`] check:
//!   discovery's `max_stale`) is [`Event::Refused`]: not a success (the backoff keeps
//!   growing, a 403 after it is still an early one), the watch is reset and the next read
//!   waits a backoff delay, as after a failure.
//! * Each event says whether it is news ([`Answered::news`], [`Retrying::news`]): the first
//!   answer, the first answer after failures, a failure of a new kind. Callers log news once
//!   and repeats quietly, not once per retry.
//! * Nothing runs in the background: the loop advances only inside [`Follow::next`], so
//!   dropping the [`Follow`] (or the `next()` future) cancels it, mid-read or mid-backoff.
//!   `next()` is cancel-safe: a delay owed is kept until it has been waited.
//! * With [`Follow::limited`], reads take a token from a bucket ([`RateLimit`]: a rate and a
//!   burst), as Consul's documentation on blocking queries recommends: a burst of changes is
//!   read at once, then reads are spaced at the rate, and changes that land meanwhile are
//!   coalesced into the next answer (the blocking read on the old index returns the latest
//!   state at once). Off by default.
//! * The fetch function is passed in, so paused-time tests can script outages.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::{
    backoff::Backoff,
    error::{Error, ErrorKind, Result},
    query::{QueryMeta, QueryOptions},
    watch::Watch,
};

/// Which errors a loop retries; the others end it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retried {
    /// What [`Error::is_retryable`] says may pass: no answer, 5xx, 429, a garbled body. Not a
    /// refusal (403, 404 and other 4xx, TLS) nor a configuration error.
    Transient,
    /// [`Retried::Transient`], and a refused token (403): rotated, or an agent restarted
    /// without it.
    TransientAndDenied,
    /// [`Error::is_retryable_after_success`]: everything but a configuration error (a
    /// refusal may change back: a token rotated, an agent reloaded to HTTPS, a prepared
    /// query created again).
    AllButConfig,
    /// Everything but a refused token (403).
    AllButDenied,
    /// Everything.
    All,
}

impl Retried {
    /// Whether `error` is retried.
    pub fn retries(self, error: &Error) -> bool {
        match self {
            Retried::Transient => error.is_retryable(),
            Retried::TransientAndDenied => error.is_retryable() || error.is_permission_denied(),
            Retried::AllButConfig => error.is_retryable_after_success(),
            Retried::AllButDenied => !error.is_permission_denied(),
            Retried::All => true,
        }
    }
}

/// The error policy of a loop: which errors are retried before any attempt has succeeded,
/// and which after. Before, a refusal most likely means our own configuration is wrong (fail
/// fast, say why); after, something changed on the other side and may change back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classify {
    /// Until an attempt succeeds.
    pub before_success: Retried,
    /// Once one has.
    pub after_success: Retried,
}

impl Classify {
    /// Transient errors are retried, anything else is fatal, always: for waits that must
    /// fail fast on a mistake.
    pub const TRANSIENT: Classify = Classify {
        before_success: Retried::Transient,
        after_success: Retried::Transient,
    };

    /// Everything is retried, always: an observer that only reports what it sees.
    pub const ALL: Classify = Classify {
        before_success: Retried::All,
        after_success: Retried::All,
    };

    /// Whether `error` ends the loop, given whether an attempt has succeeded before.
    pub fn is_fatal(self, error: &Error, answered: bool) -> bool {
        let retried = if answered {
            self.after_success
        } else {
            self.before_success
        };
        !retried.retries(error)
    }
}

/// A success, as the loop's state sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    /// The first success, or the first after failures or a refused answer: log it.
    pub news: bool,
    /// How many failures in a row came just before it (0: none).
    pub failures: u32,
}

/// A failure that is retried.
#[derive(Debug)]
pub struct Retrying {
    /// What failed.
    pub error: Error,
    /// How long the loop waits before the next attempt.
    pub retry_in: Duration,
    /// The first failure, or one of another kind than the last: log it (repeats quietly).
    pub news: bool,
    /// Failures in a row, this one included.
    pub failures: u32,
}

/// What the loop's state was last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Answering,
    Failing(ErrorKind),
    Refused,
}

/// The error half of the loop: the backoff, the [`Classify`] policy and the state (answered
/// yet? failing since when?). [`Follow`] uses one; a loop that writes (a heartbeat) can too.
#[derive(Debug)]
pub struct Retry {
    classify: Classify,
    backoff: Backoff,
    answered: bool,
    state: Option<State>,
    failures: u32,
}

impl Retry {
    /// Classify errors by `classify`; wait `backoff`'s delays between failed attempts.
    pub fn new(classify: Classify, backoff: Backoff) -> Self {
        Retry {
            classify,
            backoff,
            answered: false,
            state: None,
            failures: 0,
        }
    }

    /// Count a success as already seen (a registration that worked before this loop began),
    /// so that a 403 is treated as a late one from the start.
    pub fn answered_before(mut self) -> Self {
        self.answered = true;
        self
    }

    /// Whether an attempt has succeeded (or [`Retry::answered_before`]).
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// An attempt succeeded: the backoff starts over.
    pub fn success(&mut self) -> Answered {
        self.backoff.reset();
        self.answered = true;
        let news = self.state.replace(State::Answering) != Some(State::Answering);
        Answered {
            news,
            failures: std::mem::take(&mut self.failures),
        }
    }

    /// An attempt failed: `Ok` with the delay to wait if it is retried, `Err` with the error
    /// if the policy says it is fatal.
    pub fn failure(&mut self, error: Error) -> Result<Retrying> {
        if self.classify.is_fatal(&error, self.answered) {
            return Err(error);
        }
        self.failures += 1;
        let next = State::Failing(error.kind());
        Ok(Retrying {
            news: self.state.replace(next) != Some(next),
            retry_in: self.backoff.next_delay(),
            failures: self.failures,
            error,
        })
    }

    /// An answer came but the caller will not use it (too stale, say): back off as for a
    /// failure. Returns the delay, and whether this is news (the last attempt was not refused).
    pub fn refused(&mut self) -> (Duration, bool) {
        let news = self.state.replace(State::Refused) != Some(State::Refused);
        (self.backoff.next_delay(), news)
    }
}

/// What one step of a [`Follow`] brought.
#[derive(Debug)]
pub enum Event<T> {
    /// A new answer.
    Changed {
        /// The fetched value.
        value: T,
        /// Its metadata (`X-Consul-Index`, ...).
        meta: QueryMeta,
        /// Whether it is news (the first answer, or the first after failures).
        answered: Answered,
    },
    /// An answer came that the [`Follow::refusing`] check rejects: not applied; the read is
    /// tried again after `retry_in`, from a reset watch.
    Refused {
        /// The fetched value.
        value: T,
        /// Its metadata, as Consul sent it.
        meta: QueryMeta,
        /// How long the loop waits before the next read.
        retry_in: Duration,
        /// Whether the last answer was not refused too: log it.
        news: bool,
    },
    /// A read failed and will be tried again after `retry_in`, from a reset watch.
    Unreachable(Retrying),
    /// A read failed for good, by the [`Classify`] policy: stop following.
    Fatal(Error),
}

/// How often a [`Follow`] may read: `burst` reads at once, then `per_second`. A token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second (the steady read rate); above 0.
    pub per_second: f64,
    /// The bucket's size: reads allowed back to back after a quiet spell; at least 1.
    pub burst: u32,
}

impl RateLimit {
    /// `per_second` reads a second, `burst` at once (1 at least; a rate of 0 or below
    /// is taken as one read a minute).
    pub fn new(per_second: f64, burst: u32) -> Self {
        RateLimit {
            per_second: if per_second > 0.0 {
                per_second
            } else {
                1.0 / 60.0
            },
            burst: burst.max(1),
        }
    }
}

/// The token bucket of a [`RateLimit`]: pure, given the time. A read taken while the bucket
/// is empty is owed (the count goes below zero) and starts when its token is in.
#[derive(Debug, Clone)]
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn new(limit: RateLimit) -> Self {
        Bucket {
            limit,
            tokens: f64::from(limit.burst),
            last: None,
        }
    }

    /// Take a token at `now`: when the read may start.
    fn take(&mut self, now: Instant) -> Instant {
        let RateLimit { per_second, burst } = self.limit;
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * per_second;
            self.tokens = (self.tokens + refill).min(f64::from(burst));
        }
        self.last = Some(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-self.tokens / per_second)
        }
    }
}

/// Which answers the caller will not use (too stale, say), by their metadata.
type Refuse = Box<dyn Fn(&QueryMeta) -> bool + Send + Sync>;

/// The one driver of a [`Watch`]; see the module documentation.
pub struct Follow<F> {
    watch: Watch,
    retry: Retry,
    fetch: F,
    refuse: Option<Refuse>,
    /// A delay owed before the next read: a backoff after a failure.
    resume_at: Option<Instant>,
    /// The read rate's bucket, if limited.
    bucket: Option<Bucket>,
    /// When the next read's token is in (taken, not used yet: kept if `next()` is dropped).
    token_at: Option<Instant>,
}

impl<F> std::fmt::Debug for Follow<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("watch", &self.watch)
            .field("retry", &self.retry)
            .field("refusing", &self.refuse.is_some())
            .field("resume_at", &self.resume_at)
            .field("limit", &self.bucket.as_ref().map(|b| b.limit))
            .finish_non_exhaustive()
    }
}

impl<F, Fut, T> Follow<F>
where
    F: FnMut(QueryOptions) -> Fut,
    Fut: Future<Output = Result<(T, QueryMeta)>>,
{
    /// Drive `watch` with `fetch` (one read with the options given), retrying by `retry`.
    pub fn new(watch: Watch, retry: Retry, fetch: F) -> Self {
        Follow {
            watch,
            retry,
            fetch,
            refuse: None,
            resume_at: None,
            bucket: None,
            token_at: None,
        }
    }

    /// Bound the read rate by `limit` (see the module documentation): for a watch whose
    /// data churns, Consul answers at most that often and changes in between are coalesced.
    pub fn limited(mut self, limit: RateLimit) -> Self {
        self.bucket = Some(Bucket::new(limit));
        self
    }

    /// Refuse the answers whose metadata `refuse` rejects (discovery: older than
    /// `max_stale`): each is [`Event::Refused`], delivered even if its index did not move,
    /// not counted as a success; the watch is reset and the next read waits a backoff delay.
    pub fn refusing(mut self, refuse: impl Fn(&QueryMeta) -> bool + Send + Sync + 'static) -> Self {
        self.refuse = Some(Box::new(refuse));
        self
    }

    /// Read until something happens: a change, a failure to retry, or a fatal error. Waits
    /// the backoff owed by a previous failure first. Cancel-safe.
    pub async fn next(&mut self) -> Event<T> {
        if let Some(at) = self.resume_at {
            tokio::time::sleep_until(at).await;
            self.resume_at = None;
        }
        if let Some(bucket) = &mut self.bucket {
            let at = *self
                .token_at
                .get_or_insert_with(|| bucket.take(Instant::now()));
            tokio::time::sleep_until(at).await;
            self.token_at = None;
        }
        let (fetch, refuse) = (&mut self.fetch, self.refuse.as_deref());
        let read = self
            .watch
            .next(|opts| {
                let fut = fetch(opts);
                async move {
                    let (value, meta) = fut.await?;
                    let refused = refuse.is_some_and(|refuse| refuse(&meta));
                    // A refused answer is delivered even when its index did not move, as an
                    // answer without an index is.
                    let observed = if refused {
                        QueryMeta {
                            last_index: 0,
                            content_hash: None,
                            ..meta.clone()
                        }
                    } else {
                        meta.clone()
                    };
                    Ok(((value, meta, refused), observed))
                }
            })
            .await;
        match read {
            Ok((value, meta, true)) => {
                let (retry_in, news) = self.retry.refused();
                self.back_off(retry_in);
                Event::Refused {
                    value,
                    meta,
                    retry_in,
                    news,
                }
            }
            Ok((value, meta, false)) => Event::Changed {
                value,
                meta,
                answered: self.retry.success(),
            },
            Err(error) => match self.retry.failure(error) {
                Ok(retrying) => {
                    self.back_off(retrying.retry_in);
                    Event::Unreachable(retrying)
                }
                Err(error) => Event::Fatal(error),
            },
        }
    }

    /// Start the next read afresh, after `delay`.
    fn back_off(&mut self, delay: Duration) {
        self.watch.reset();
        self.resume_at = Some(Instant::now() + delay);
    }

    /// The watch, to reset it (an entry gone, a refresh asked for).
    pub fn watch_mut(&mut self) -> &mut Watch {
        &mut self.watch
    }

    /// Whether a read has succeeded.
    pub fn answered(&self) -> bool {
        self.retry.answered()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{
            Arc, Mutex,
            atomic::{AtomicU32, Ordering},
        },
    };

    use super::*;

    fn meta(index: u64) -> QueryMeta {
        QueryMeta {
            last_index: index,
            ..Default::default()
        }
    }

    fn unreachable() -> Error {
        Error::Transport {
            method: "GET",
            url: "http://127.0.0.1:1".into(),
            path: "/v1/health/service/web".into(),
            reason: "connection refused".into(),
            timeout: false,
        }
    }

    fn denied() -> Error {
        Error::PermissionDenied {
            method: "GET",
            path: "/v1/health/service/web".into(),
            message: "ACL not found".into(),
        }
    }

    fn status(code: u16) -> Error {
        Error::Status {
            method: "GET",
            path: "/v1/query/q/execute".into(),
            status: code,
            message: "nope".into(),
        }
    }

    fn tls() -> Error {
        Error::Tls {
            method: "GET",
            url: "https://127.0.0.1:1".into(),
            path: "/v1/status/leader".into(),
            problem: "certificate refused".into(),
        }
    }

    /// One scripted read's outcome.
    type Answer = Result<(u64, QueryMeta)>;
    /// The options of each read and when it started.
    type Asked = Arc<Mutex<Vec<(QueryOptions, Instant)>>>;

    /// A fetch that answers from a script (one entry per read, then "unreachable") and
    /// records what it was asked.
    fn scripted(
        answers: Vec<Answer>,
    ) -> (
        Asked,
        impl FnMut(QueryOptions) -> std::future::Ready<Answer>,
    ) {
        let mut script: VecDeque<_> = answers.into();
        let asked = Asked::default();
        let log = asked.clone();
        let fetch = move |opts: QueryOptions| {
            log.lock().unwrap().push((opts, Instant::now()));
            std::future::ready(script.pop_front().unwrap_or_else(|| Err(unreachable())))
        };
        (asked, fetch)
    }

    fn follow<F>(classify: Classify, fetch: F) -> Follow<F> {
        Follow {
            watch: Watch::new(QueryOptions::default(), Duration::from_secs(30)),
            retry: Retry::new(classify, Backoff::consul()),
            fetch,
            refuse: None,
            resume_at: None,
            bucket: None,
            token_at: None,
        }
    }

    fn changed<T: std::fmt::Debug>(event: Event<T>) -> (T, QueryMeta, Answered) {
        match event {
            Event::Changed {
                value,
                meta,
                answered,
            } => (value, meta, answered),
            other => panic!("expected a change, got {other:?}"),
        }
    }

    fn retrying<T: std::fmt::Debug>(event: Event<T>) -> Retrying {
        match event {
            Event::Unreachable(r) => r,
            other => panic!("expected a retried failure, got {other:?}"),
        }
    }

    /// Discovery's policy: refusals fatal before the first answer, retried after it.
    const REFUSALS_LATE: Classify = Classify {
        before_success: Retried::Transient,
        after_success: Retried::AllButConfig,
    };

    /// The TTL heartbeat's policy.
    const HEARTBEAT: Classify = Classify {
        before_success: Retried::AllButDenied,
        after_success: Retried::All,
    };

    #[test]
    fn each_policy_says_what_it_retries() {
        use Retried::*;
        let config = Error::Config("bad address".into());
        let errors = [
            unreachable(),
            status(503),
            denied(),
            status(404),
            tls(),
            config,
        ];
        let table: [(Retried, [bool; 6]); 5] = [
            (Transient, [true, true, false, false, false, false]),
            (TransientAndDenied, [true, true, true, false, false, false]),
            (AllButConfig, [true, true, true, true, true, false]),
            (AllButDenied, [true, true, false, true, true, true]),
            (All, [true; 6]),
        ];
        for (retried, expected) in table {
            let got = errors.each_ref().map(|e| retried.retries(e));
            assert_eq!(got, expected, "{retried:?}");
        }
        assert!(
            REFUSALS_LATE.is_fatal(&denied(), false),
            "before: its own half"
        );
        assert!(!REFUSALS_LATE.is_fatal(&denied(), true), "after: the other");
        assert!(Classify::TRANSIENT.is_fatal(&denied(), true));
        assert!(!Classify::ALL.is_fatal(&denied(), false));
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_backs_off_then_recovers_on_a_fresh_watch() {
        let (asked, fetch) = scripted(vec![
            Ok((1, meta(10))),
            Err(unreachable()),
            Err(unreachable()),
            Err(unreachable()),
            Ok((2, meta(12))),
            Ok((2, meta(12))),
            Ok((3, meta(13))),
        ]);
        let mut f = follow(REFUSALS_LATE, fetch);
        let (value, meta, answered) = changed(f.next().await);
        assert_eq!((value, meta.last_index), (1, 10));
        assert_eq!(
            answered,
            Answered {
                news: true,
                failures: 0
            }
        );

        let mut delays = Vec::new();
        for n in 1..=3 {
            let r = retrying(f.next().await);
            assert_eq!(r.failures, n);
            assert_eq!(r.news, n == 1, "only the first failure of a kind is news");
            assert!(r.error.is_retryable());
            delays.push(r.retry_in);
        }
        let (value, _, answered) = changed(f.next().await);
        assert_eq!(value, 2);
        assert_eq!(
            answered,
            Answered {
                news: true,
                failures: 3
            }
        );
        let (value, _, answered) = changed(f.next().await);
        assert_eq!(value, 3, "an unchanged answer is not an event");
        assert!(!answered.news);

        let asked = asked.lock().unwrap();
        let indexes: Vec<u64> = asked.iter().map(|(o, _)| o.wait_index).collect();
        assert_eq!(
            indexes,
            [0, 10, 0, 0, 0, 12, 12],
            "after a failure the watch starts over"
        );
        for (i, delay) in delays.iter().enumerate() {
            let gap = asked[i + 2].1 - asked[i + 1].1;
            assert!(gap >= *delay, "read {} waited {gap:?} < {delay:?}", i + 2);
        }
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] < Duration::from_millis(200));
        assert!(delays[2] >= Duration::from_millis(400), "grows: {delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_index_going_backwards_resets_the_watch() {
        let (asked, fetch) = scripted(vec![Ok((1, meta(100))), Ok((2, meta(3))), Ok((3, meta(4)))]);
        let mut f = follow(Classify::TRANSIENT, fetch);
        for expected in 1..=3 {
            let (value, _, _) = changed(f.next().await);
            assert_eq!(value, expected, "a reset answer is delivered");
        }
        let indexes: Vec<u64> = asked
            .lock()
            .unwrap()
            .iter()
            .map(|(o, _)| o.wait_index)
            .collect();
        assert_eq!(
            indexes,
            [0, 100, 0],
            "the next read after going backwards does not block"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_denial_is_fatal_before_the_first_answer_and_retried_after() {
        // Registration's policy: only a 403 is forgiven once the token has worked.
        let late_denial = Classify {
            before_success: Retried::Transient,
            after_success: Retried::TransientAndDenied,
        };
        let (_, fetch) = scripted(vec![Err(denied())]);
        let mut f = follow(late_denial, fetch);
        match f.next().await {
            Event::Fatal(e) => assert!(e.is_permission_denied()),
            other => panic!("expected fatal, got {other:?}"),
        }

        let (_, fetch) = scripted(vec![Ok((1, meta(5))), Err(denied()), Err(status(404))]);
        let mut f = follow(late_denial, fetch);
        changed(f.next().await);
        let r = retrying(f.next().await);
        assert!(r.error.is_permission_denied() && r.news);
        match f.next().await {
            Event::Fatal(e) => assert!(e.is_not_found(), "a 404 stays fatal"),
            other => panic!("expected fatal, got {other:?}"),
        }

        // Discovery's: any refusal after an answer is retried, each new kind is news.
        let (_, fetch) = scripted(vec![Ok((1, meta(5))), Err(denied()), Err(status(404))]);
        let mut f = follow(REFUSALS_LATE, fetch);
        changed(f.next().await);
        assert!(retrying(f.next().await).news);
        let r = retrying(f.next().await);
        assert!(r.error.is_not_found() && r.news && r.failures == 2);

        let mut retry = Retry::new(late_denial, Backoff::consul()).answered_before();
        assert!(
            retry.failure(denied()).is_ok(),
            "answered before: a late denial"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_follow_cancels_it_mid_backoff() {
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let fetch = move |_: QueryOptions| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err::<(u64, QueryMeta), _>(unreachable()))
        };
        let mut f = follow(Classify::ALL, fetch);
        retrying(f.next().await);
        let task = tokio::spawn(async move {
            loop {
                f.next().await;
            }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        let before = calls.load(Ordering::SeqCst);
        assert!(before > 2, "it kept retrying while alive: {before}");
        task.abort();
        let _ = task.await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before,
            "no read after the drop"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn next_is_cancel_safe_a_delay_owed_is_still_waited() {
        let (asked, fetch) = scripted(vec![Err(unreachable()), Ok((1, meta(2)))]);
        let mut f = follow(Classify::TRANSIENT, fetch);
        let r = retrying(f.next().await);
        let failed_at = Instant::now();
        // Abandon the next step in the middle of its backoff, then step again.
        let cut = tokio::time::timeout(Duration::from_millis(10), f.next()).await;
        assert!(cut.is_err(), "still backing off");
        changed(f.next().await);
        let asked = asked.lock().unwrap();
        assert!(
            asked[1].1 - failed_at >= r.retry_in,
            "the delay was not skipped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_answer_backs_off_and_reads_afresh() {
        let stale = |index| QueryMeta {
            last_contact_ms: 5_000,
            ..meta(index)
        };
        let (asked, fetch) = scripted(vec![
            Ok((1, meta(7))),
            Ok((2, stale(7))),
            Ok((3, stale(7))),
            Ok((4, meta(7))),
        ]);
        let mut f =
            follow(REFUSALS_LATE, fetch).refusing(|m: &QueryMeta| m.last_contact_ms > 1_000);
        changed(f.next().await);
        let mut refused_at = Vec::new();
        for (expected, news) in [(2, true), (3, false)] {
            match f.next().await {
                Event::Refused {
                    value,
                    meta,
                    retry_in,
                    news: n,
                } => {
                    assert_eq!(value, expected, "delivered though the index did not move");
                    assert_eq!((meta.last_index, n), (7, news));
                    refused_at.push((Instant::now(), retry_in));
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        let (value, _, answered) = changed(f.next().await);
        assert_eq!(value, 4, "the same index after a refusal is delivered");
        assert!(answered.news, "answering again after refusals is news");
        let asked = asked.lock().unwrap();
        let indexes: Vec<u64> = asked.iter().map(|(o, _)| o.wait_index).collect();
        assert_eq!(indexes, [0, 7, 0, 0], "a refusal resets the watch");
        for (i, (at, delay)) in refused_at.iter().enumerate() {
            assert!(asked[i + 2].1 - *at >= *delay, "backed off");
        }
        assert!(
            refused_at[1].1 >= Duration::from_millis(200),
            "refusals are not successes: the backoff grows"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_answer_is_not_an_answer_for_the_policy() {
        let stale = QueryMeta {
            last_contact_ms: 5_000,
            ..meta(7)
        };
        let (_, fetch) = scripted(vec![Ok((1, stale)), Err(denied())]);
        let mut f =
            follow(REFUSALS_LATE, fetch).refusing(|m: &QueryMeta| m.last_contact_ms > 1_000);
        assert!(matches!(f.next().await, Event::Refused { news: true, .. }));
        assert!(!f.answered());
        match f.next().await {
            Event::Fatal(e) => assert!(e.is_permission_denied(), "a 403 before any answer"),
            other => panic!("expected fatal, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_limited_follow_reads_a_burst_then_at_the_rate_and_coalesces() {
        // Data that churns: every read brings a new index, as fast as it is asked.
        let (asked, fetch) = scripted((1..=12).map(|i| Ok((i, meta(i)))).collect());
        let mut f = follow(Classify::TRANSIENT, fetch).limited(RateLimit::new(5.0, 2));
        let start = Instant::now();
        for expected in 1..=8 {
            let (value, _, _) = changed(f.next().await);
            assert_eq!(value, expected);
        }
        let starts: Vec<Duration> = asked
            .lock()
            .unwrap()
            .iter()
            .map(|(_, at)| *at - start)
            .collect();
        // The burst: two reads at once (the watch's own 20 ms floor between them).
        assert!(starts[1] <= Duration::from_millis(20), "{starts:?}");
        // Then one read per 200 ms, never faster.
        for pair in starts[1..].windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(180),
                "{starts:?}"
            );
        }
        let steady = starts[7] - starts[1];
        assert!(
            steady >= Duration::from_millis(6 * 200 - 20)
                && steady <= Duration::from_millis(6 * 200 + 40),
            "{starts:?}"
        );
        // A quiet spell refills the bucket: a burst again.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let quiet = Instant::now();
        changed(f.next().await);
        changed(f.next().await);
        let last = asked.lock().unwrap().last().unwrap().1;
        assert!(last - quiet <= Duration::from_millis(20), "refilled");
    }

    #[test]
    fn the_bucket_owes_reads_taken_while_empty() {
        let mut b = Bucket::new(RateLimit::new(2.0, 1));
        let t0 = Instant::now();
        assert_eq!(b.take(t0), t0);
        assert_eq!(b.take(t0), t0 + Duration::from_millis(500));
        assert_eq!(b.take(t0), t0 + Duration::from_millis(1000), "owed in turn");
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.take(later), later, "the debt is paid and the bucket full");
        assert_eq!(RateLimit::new(0.0, 0), RateLimit::new(1.0 / 60.0, 1));
    }

    #[test]
    fn a_heartbeat_retries_all_but_an_early_denial() {
        let mut retry = Retry::new(HEARTBEAT, Backoff::consul());
        assert!(
            retry.failure(status(404)).is_ok(),
            "a lost check is retried"
        );
        assert!(retry.failure(denied()).is_err(), "a wrong token is fatal");
        let answered = retry.success();
        assert_eq!(answered.failures, 1, "the fatal one is not counted");
        let r = retry.failure(denied()).expect("a late denial is retried");
        assert!(r.news && r.failures == 1);
        let r = retry.failure(denied()).expect("and again");
        assert!(!r.news && r.failures == 2);
        assert!(
            r.retry_in >= Duration::from_millis(200),
            "backs off: {:?}",
            r.retry_in
        );
    }
}
