//! The one traffic streamer: a resilient [`EchoClient`] sending `"<label> <seq>"` messages,
//! bounded in count and time, recording who answered each and when. The testbed's scenarios
//! watch every message's [`Outcome`] through a fault; the benches wait for the first correct
//! reply from another instance after a kill.
//!
//! Two paces, one send loop ([`Pace`]):
//! * [`Pace::Every`] — one message every interval, each sent concurrently, so a slow answer
//!   (a failover in progress) does not hold the next one back: what a scenario observes;
//! * [`Pace::BackToBack`] — one message after another, each sent when the last is answered,
//!   back to back while [armed](Stream::arm) and one per `idle` otherwise: what a bench
//!   times, with the client's connection always busy at the moment of a kill.
//!
//! Every message's outcome is kept (when [`StreamSpec::keep`] asks; a bench keeps only the
//! last) and the last reply is published on a watch channel, so a waiter wakes on each answer
//! without polling.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use echo_client::{EchoClient, Instance};
use tokio::{
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

/// Why waiting on a [`Stream`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The awaited reply did not come in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
    },
    /// A message was lost or answered with other bytes while waiting.
    #[error("echo failed: {0}")]
    BadEcho(String),
    /// The stream's task ended (its count or time bound reached) before the wait was met.
    #[error("the traffic stream stopped")]
    Stopped,
}

/// How messages follow one another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// One message every interval, sent concurrently (a slow answer holds nothing back).
    Every(Duration),
    /// One after another; back to back while armed, else one per `idle`.
    BackToBack {
        /// Between messages while disarmed.
        idle: Duration,
    },
}

/// What a [`Stream`] sends, and its bounds.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// The messages' first word.
    pub label: String,
    /// How they follow one another.
    pub pace: Pace,
    /// At most this many messages.
    pub max: u64,
    /// At most this long.
    pub limit: Duration,
    /// Keep every message's [`Outcome`] (`false`: only the last reply is kept).
    pub keep: bool,
}

impl StreamSpec {
    /// A scenario's stream: `"<label> <seq>"` every `every`, at most `max` messages and 15
    /// minutes, every outcome kept.
    pub fn every(label: &str, every: Duration, max: u64) -> StreamSpec {
        StreamSpec {
            label: label.to_owned(),
            pace: Pace::Every(every),
            max,
            limit: MAX_RUN,
            keep: true,
        }
    }

    /// A bench's stream: back to back when armed, one per `idle` otherwise, for at most
    /// `limit`; only the last reply kept.
    pub fn back_to_back(idle: Duration, limit: Duration) -> StreamSpec {
        StreamSpec {
            label: "stream".to_owned(),
            pace: Pace::BackToBack { idle },
            max: u64::MAX,
            limit,
            keep: false,
        }
    }
}

/// Longest a scenario's stream runs, whatever happens.
pub const MAX_RUN: Duration = Duration::from_secs(15 * 60);

/// The outcome of one message.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Its number in the stream, from 1.
    pub seq: u64,
    /// When it was handed to the client.
    pub sent: std::time::Instant,
    /// When the client answered.
    pub done: std::time::Instant,
    /// The reply, or the client's error as text.
    pub result: Result<Served, String>,
}

/// A reply.
#[derive(Debug, Clone)]
pub struct Served {
    /// The service ID of the instance that answered.
    pub instance: String,
    /// From `send` to the reply, failovers included.
    pub latency: Duration,
    /// How many times it was written.
    pub attempts: u32,
    /// The reply equals the message.
    pub exact: bool,
}

impl Outcome {
    /// Lost: answered with an error, or with other bytes than sent.
    pub fn lost(&self) -> bool {
        !matches!(&self.result, Ok(s) if s.exact)
    }
}

/// The last reply a [`Stream`] got, and its counts.
#[derive(Debug, Clone)]
pub struct LastReply {
    /// Who answered (`None` before the first reply).
    pub instance: Option<Instance>,
    /// When the last correct reply came back.
    pub at: Instant,
    /// Correct replies so far.
    pub replies: u64,
    /// Failed sends and wrong echoes so far.
    pub errors: u64,
    /// The last of those errors, if any.
    pub last_error: Option<String>,
    /// Outcomes recorded so far (every message answered or failed).
    pub answered: u64,
}

/// A client sending in the background; see the module documentation.
#[derive(Debug)]
pub struct Stream {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    last: watch::Receiver<LastReply>,
    armed: Arc<AtomicBool>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Stream {
    /// Start sending through `client` as `spec` says.
    pub fn start(client: &EchoClient, spec: StreamSpec) -> Stream {
        let (tx, last) = watch::channel(LastReply {
            instance: None,
            at: Instant::now(),
            replies: 0,
            errors: 0,
            last_error: None,
            answered: 0,
        });
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let armed = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let sink = Sink {
            outcomes: spec.keep.then(|| outcomes.clone()),
            tx,
        };
        let task = tokio::spawn(send_loop(
            client.clone(),
            spec,
            sink,
            armed.clone(),
            stop.clone(),
        ));
        Stream {
            outcomes,
            last,
            armed,
            stop,
            task,
        }
    }

    /// Send back to back (`true`) or one per `idle` (`false`); [`Pace::BackToBack`] only.
    pub fn arm(&self, armed: bool) {
        self.armed.store(armed, Ordering::SeqCst);
    }

    /// The last reply and the counts.
    pub fn last(&self) -> LastReply {
        self.last.borrow().clone()
    }

    /// The instance that answered last (the one the client is connected to).
    pub fn last_instance(&self) -> Option<String> {
        self.last.borrow().instance.as_ref().map(|i| i.id.clone())
    }

    /// Every outcome so far, in order of completion (empty unless [`StreamSpec::keep`]).
    pub fn outcomes(&self) -> Vec<Outcome> {
        lock(&self.outcomes).clone()
    }

    /// Wait for a recorded outcome satisfying `pred`, at most `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Outcome) -> bool,
    ) -> Result<Outcome, StreamError> {
        let mut seen = 0;
        let found = self
            .wait_last(what, timeout, |_| {
                let outcomes = lock(&self.outcomes);
                let found = outcomes[seen..].iter().find(|o| pred(o)).cloned();
                seen = outcomes.len();
                found
            })
            .await?;
        Ok(found)
    }

    /// Wait until `more` further correct replies have come back; an error meanwhile fails it.
    pub async fn replies(&self, more: u64, timeout: Duration) -> Result<LastReply, StreamError> {
        let target = self.last.borrow().replies + more;
        self.correct(timeout, "replies", |l| l.replies >= target)
            .await
    }

    /// Wait for the first correct reply from an instance other than `id` that came back at or
    /// after `since` (a fault's instant: a reply from elsewhere before it is no failover);
    /// returns when it came back. An error meanwhile fails it.
    pub async fn reply_from_other_than(
        &self,
        id: &str,
        since: Instant,
        timeout: Duration,
    ) -> Result<Instant, StreamError> {
        let what = format!("a reply from another instance than {id}");
        let last = self
            .correct(timeout, &what, |l| {
                l.at >= since && l.instance.as_ref().is_some_and(|i| i.id != id)
            })
            .await?;
        Ok(last.at)
    }

    /// Wait for `done`, failing on any error meanwhile.
    async fn correct(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&LastReply) -> bool,
    ) -> Result<LastReply, StreamError> {
        let errors = self.last.borrow().errors;
        let last = self
            .wait_last(what, timeout, |l| {
                (l.errors > errors || done(l)).then(|| l.clone())
            })
            .await?;
        if last.errors > errors {
            return Err(StreamError::BadEcho(last.last_error.unwrap_or_default()));
        }
        Ok(last)
    }

    /// Wait until `found` returns something for the last reply, checked now and on each answer.
    async fn wait_last<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut found: impl FnMut(&LastReply) -> Option<T>,
    ) -> Result<T, StreamError> {
        let mut rx = self.last.clone();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = found(&rx.borrow_and_update()) {
                return Ok(t);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(StreamError::Stopped),
                Err(_) => {
                    return Err(StreamError::Timeout {
                        what: what.to_owned(),
                        timeout,
                    });
                }
            }
        }
    }

    /// Stop sending, wait until every message sent has its outcome, and return them all, by
    /// sequence number (empty unless [`StreamSpec::keep`]).
    pub async fn finish(self) -> Vec<Outcome> {
        self.stop.cancel();
        let _ = self.task.await;
        let mut all = std::mem::take(&mut *lock(&self.outcomes));
        all.sort_by_key(|o| o.seq);
        all
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the send loop records: the outcomes (if kept) and the last reply.
#[derive(Debug, Clone)]
struct Sink {
    outcomes: Option<Arc<Mutex<Vec<Outcome>>>>,
    tx: watch::Sender<LastReply>,
}

impl Sink {
    fn record(&self, outcome: Outcome, instance: Option<Instance>) {
        let at = Instant::now();
        let error = match &outcome.result {
            Ok(s) if s.exact => None,
            Ok(s) => Some(format!(
                "{} answered other bytes to message {}",
                s.instance, outcome.seq
            )),
            Err(e) => Some(format!("message {}: {e}", outcome.seq)),
        };
        if let Some(outcomes) = &self.outcomes {
            lock(outcomes).push(outcome);
        }
        self.tx.send_modify(|l| {
            l.answered += 1;
            match error {
                None => {
                    l.instance = instance;
                    l.at = at;
                    l.replies += 1;
                }
                Some(e) => {
                    l.errors += 1;
                    l.last_error = Some(e);
                }
            }
        });
    }
}

/// The one send loop, for both paces.
async fn send_loop(
    client: EchoClient,
    spec: StreamSpec,
    sink: Sink,
    armed: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let deadline = Instant::now() + spec.limit;
    let mut in_flight = JoinSet::new();
    let mut ticker = match spec.pace {
        Pace::Every(every) => {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            Some(t)
        }
        Pace::BackToBack { .. } => None,
    };
    for seq in 1..=spec.max {
        // Stopped, out of time, or the `Stream` dropped without `finish`.
        if stop.is_cancelled() || Instant::now() >= deadline || sink.tx.is_closed() {
            break;
        }
        let message = format!("{} {seq:012}", spec.label);
        match spec.pace {
            Pace::Every(_) => {
                if let Some(ticker) = ticker.as_mut() {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = ticker.tick() => {}
                    }
                }
                while in_flight.try_join_next().is_some() {}
                in_flight.spawn(send_one(client.clone(), seq, message, sink.clone()));
            }
            Pace::BackToBack { idle } => {
                send_one(client.clone(), seq, message, sink.clone()).await;
                if !armed.load(Ordering::SeqCst) {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(idle) => {}
                    }
                }
            }
        }
    }
    // Every message has a deadline inside the client (its message timeout).
    while in_flight.join_next().await.is_some() {}
}

async fn send_one(client: EchoClient, seq: u64, message: String, sink: Sink) {
    let sent = std::time::Instant::now();
    let (result, instance) = match client.send(message.clone()).await {
        Ok(reply) => {
            let served = Served {
                exact: reply.bytes == message.as_bytes(),
                instance: reply.instance.id.clone(),
                latency: reply.latency,
                attempts: reply.attempts,
            };
            (Ok(served), Some(reply.instance))
        }
        Err(e) => (Err(e.to_string()), None),
    };
    let done = std::time::Instant::now();
    sink.record(
        Outcome {
            seq,
            sent,
            done,
            result,
        },
        instance,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
        net::TcpListener,
    };

    /// A line server on loopback answering each line with `answer(line)`; its client.
    async fn client_of(answer: fn(&str) -> String) -> EchoClient {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let reply = format!("{}\n", answer(&line));
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let set = vec![Instance::new("a", "127.0.0.1", port)];
        let (feed, rx) = watch::channel(echo_client::Snapshot::fixed(set));
        // The feed must outlive the test's client: a closed discovery is a failed one.
        std::mem::forget(feed);
        EchoClient::with_discovery(rx, echo_client::SessionConfig::new("t")).unwrap()
    }

    #[tokio::test]
    async fn a_paced_stream_keeps_every_outcome_in_order_and_stops_at_its_count() {
        let client = client_of(|l| l.to_owned()).await;
        let stream = Stream::start(
            &client,
            StreamSpec::every("t", Duration::from_millis(2), 20),
        );
        let last = stream
            .wait_for("message 20", Duration::from_secs(10), |o| o.seq == 20)
            .await
            .unwrap();
        assert!(!last.lost(), "{last:?}");
        let more = stream
            .wait_for("a 21st message", Duration::from_millis(100), |o| o.seq > 20)
            .await;
        assert!(matches!(more, Err(StreamError::Stopped)), "{more:?}");
        let all = stream.finish().await;
        let seqs: Vec<u64> = all.iter().map(|o| o.seq).collect();
        assert_eq!(
            seqs,
            (1..=20).collect::<Vec<_>>(),
            "every message, once, by seq"
        );
        assert!(all.iter().all(|o| !o.lost() && o.done >= o.sent), "{all:?}");
    }

    #[tokio::test]
    async fn a_wait_times_out_and_a_wrong_echo_fails_the_bench_waits() {
        let client = client_of(|l| l.to_owned()).await;
        let stream = Stream::start(
            &client,
            StreamSpec::every("t", Duration::from_millis(2), 10_000),
        );
        let never = stream
            .wait_for("message 0 (none has it)", Duration::from_millis(300), |o| {
                o.seq == 0
            })
            .await;
        assert!(
            matches!(never, Err(StreamError::Timeout { .. })),
            "{never:?}"
        );
        stream.finish().await;

        let liar = client_of(|_| "something else".to_owned()).await;
        let stream = Stream::start(
            &liar,
            StreamSpec::back_to_back(Duration::from_millis(1), Duration::from_secs(30)),
        );
        let replies = stream.replies(3, Duration::from_secs(10)).await;
        assert!(
            matches!(replies, Err(StreamError::BadEcho(_))),
            "{replies:?}"
        );
        assert!(
            stream.outcomes().is_empty(),
            "a bench stream keeps no outcomes"
        );
        assert!(stream.last().errors >= 1);
        stream.finish().await;
    }
}
