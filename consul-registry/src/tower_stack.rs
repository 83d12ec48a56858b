//! A tower `Service` that fails over before Consul notices: discovery → balance → passive
//! ejection → retry with a budget, in one layer over any per-instance service (a hyper or
//! reqwest client bound to one address, a tonic `Channel`).
//!
//! Each call picks an instance from a [`Pool`] (so ejection and balancing are the pool's one
//! mechanism, keyed by address), calls that instance's service (made once per address by the
//! caller's `make`, dropped when the address leaves the passing set), and reports the outcome.
//! A failed call whose request the caller marked retryable ([`Balanced::retry`]) is sent again
//! to another instance while a [`TpsBudget`] allows (tower's: retries stay a share of
//! requests, so a dead service is not hammered). An ejected instance comes back after its
//! hold-down while Consul still lists it. `poll_ready` is always ready: readiness is awaited
//! per instance inside the call, so one stuck instance does not block the others.
//!
//! Unlike tower's `Balance`, which drops an endpoint only when discovery removes it or its
//! `poll_ready` fails (then for good), a failed request here holds its instance out at once
//! and lets it back when its hold-down ends.

use std::{
    collections::HashMap,
    fmt,
    future::{Future, poll_fn},
    marker::PhantomData,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;
pub use tower::retry::budget::TpsBudget;
use tower::{Service, retry::budget::Budget};

use crate::{discovery::Instance, pool::Pool};

/// The error of a [`Balanced`] call: the instance's service's, or
/// [`Error::NoInstance`](crate::Error::NoInstance).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Classify<R> = dyn Fn(&Result<R, BoxError>) -> bool + Send + Sync;
type Again<Req> = dyn Fn(&Req) -> Option<Req> + Send + Sync;

/// The balanced service; see the module documentation. Cheap to clone: clones share the
/// pool, the instances' services and the budget.
pub struct Balanced<Req, S: Service<Req>, M> {
    pool: Pool,
    make: Arc<M>,
    endpoints: Arc<Mutex<Endpoints<S>>>,
    pick_timeout: Duration,
    succeeded: Arc<Classify<S::Response>>,
    again: Option<Arc<Again<Req>>>,
    budget: Arc<TpsBudget>,
    _req: PhantomData<fn(Req)>,
}

struct Endpoints<S> {
    by_address: HashMap<String, S>,
    /// The passing set the map was last pruned against.
    set: Option<Arc<[Arc<Instance>]>>,
}

impl<Req, S, M> Balanced<Req, S, M>
where
    S: Service<Req>,
    M: Fn(&Instance) -> S,
{
    /// Balance over `pool`'s instances, `make` building the service that talks to one of
    /// them. Defaults: a call waits up to 5 s for an instance; `Ok` is a success, `Err` a
    /// failure; nothing is retried (see [`retry`](Self::retry)).
    pub fn new(pool: Pool, make: M) -> Self {
        Balanced {
            pool,
            make: Arc::new(make),
            endpoints: Arc::new(Mutex::new(Endpoints {
                by_address: HashMap::new(),
                set: None,
            })),
            pick_timeout: Duration::from_secs(5),
            succeeded: Arc::new(|r: &Result<S::Response, BoxError>| r.is_ok()),
            again: None,
            budget: Arc::new(TpsBudget::default()),
            _req: PhantomData,
        }
    }

    /// How long a call waits for a usable instance (discovery's first answer, a hold-down's
    /// end) before it fails with [`Error::NoInstance`](crate::Error::NoInstance).
    pub fn pick_timeout(mut self, timeout: Duration) -> Self {
        self.pick_timeout = timeout;
        self
    }

    /// Which outcomes count as a success; the rest eject (after the pool's consecutive
    /// failures) and may be retried. An HTTP client would count a 502, 503 or 504 as a failure.
    pub fn succeeded_when(
        mut self,
        succeeded: impl Fn(&Result<S::Response, BoxError>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.succeeded = Arc::new(succeeded);
        self
    }

    /// Retry failed calls on another instance: `again` returns a copy of a request that may be
    /// sent twice (`None`: not retryable, such as a non-idempotent write), and `budget` bounds
    /// the retries to a share of the calls ([`TpsBudget::default`]: 20 % over 10 s, at least
    /// 10 per second). [`http_retryable`] marks idempotent HTTP requests.
    pub fn retry(
        mut self,
        budget: TpsBudget,
        again: impl Fn(&Req) -> Option<Req> + Send + Sync + 'static,
    ) -> Self {
        self.again = Some(Arc::new(again));
        self.budget = Arc::new(budget);
        self
    }

    /// The pool the calls pick from.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The service for `instance`'s address: made once, dropped once it leaves the set.
    fn endpoint(&self, instance: &Instance) -> S
    where
        S: Clone,
    {
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let set = self.pool.instances();
        if endpoints.set.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &set)) {
            let listed: Vec<String> = set.iter().map(|i| i.address()).collect();
            endpoints.by_address.retain(|a, _| listed.contains(a));
            endpoints.set = Some(set);
        }
        endpoints
            .by_address
            .entry(instance.address())
            .or_insert_with(|| (self.make)(instance))
            .clone()
    }
}

/// A copy of an idempotent HTTP request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) with a body
/// that clones, for [`Balanced::retry`]; `None` for other methods. Extensions are not copied.
pub fn http_retryable<B: Clone>(req: &hyper::http::Request<B>) -> Option<hyper::http::Request<B>> {
    if !req.method().is_idempotent() {
        return None;
    }
    let mut copy = hyper::http::Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

impl<Req, S, M> Clone for Balanced<Req, S, M>
where
    S: Service<Req>,
{
    fn clone(&self) -> Self {
        Balanced {
            pool: self.pool.clone(),
            make: Arc::clone(&self.make),
            endpoints: Arc::clone(&self.endpoints),
            pick_timeout: self.pick_timeout,
            succeeded: Arc::clone(&self.succeeded),
            again: self.again.clone(),
            budget: Arc::clone(&self.budget),
            _req: PhantomData,
        }
    }
}

impl<Req, S: Service<Req>, M> fmt::Debug for Balanced<Req, S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balanced")
            .field("pool", &self.pool)
            .field("pick_timeout", &self.pick_timeout)
            .field("retries", &self.again.is_some())
            .finish_non_exhaustive()
    }
}

impl<Req, S, M> Service<Req> for Balanced<Req, S, M>
where
    Req: Send + 'static,
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    S::Future: Send,
    M: Fn(&Instance) -> S + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            this.budget.deposit();
            let deadline = Instant::now() + this.pick_timeout;
            let mut tried: Vec<String> = Vec::new();
            let mut req = req;
            loop {
                let spare = this.again.as_ref().and_then(|again| again(&req));
                let pick = this.pool.pick_except(deadline, &tried).await?;
                let mut service = this.endpoint(pick.instance());
                let result = async {
                    poll_fn(|cx| service.poll_ready(cx))
                        .await
                        .map_err(Into::into)?;
                    service.call(req).await.map_err(Into::into)
                }
                .await;
                if (this.succeeded)(&result) {
                    pick.succeeded();
                    return result;
                }
                tried.push(pick.instance().address());
                let instance = pick.instance().to_string();
                pick.failed();
                match spare {
                    Some(copy) if this.budget.withdraw() => {
                        tracing::debug!(%instance, "failed: retrying on another instance");
                        req = copy;
                    }
                    _ => return result,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::sync::watch;

    use super::*;
    use crate::{discovery::Snapshot, pool::PoolConfig};

    fn pool(ports: &[u16]) -> (watch::Sender<Snapshot>, Pool) {
        let set = ports
            .iter()
            .map(|p| Instance::new(format!("s{p}"), "127.0.0.1", *p))
            .collect();
        let (tx, rx) = watch::channel(Snapshot::fixed(set));
        let config = PoolConfig {
            strategy: crate::Strategy::RoundRobin,
            hold_down: Duration::from_secs(1),
            ..PoolConfig::default()
        };
        (tx, Pool::new("svc", rx, config))
    }

    /// Instance `dead` refuses; the others answer with their port. Counts calls per port.
    fn make(
        dead: u16,
        calls: Arc<Mutex<HashMap<u16, u32>>>,
        made: Arc<AtomicU32>,
    ) -> impl Fn(&Instance) -> tower::util::BoxCloneSyncService<u32, u16, BoxError> {
        move |instance: &Instance| {
            made.fetch_add(1, Ordering::SeqCst);
            let (port, calls) = (instance.port, calls.clone());
            tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: u32| {
                *calls.lock().unwrap().entry(port).or_default() += 1;
                async move {
                    if port == dead {
                        Err(BoxError::from("connection refused"))
                    } else {
                        Ok::<_, BoxError>(port)
                    }
                }
            }))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_call_is_retried_elsewhere_and_its_instance_held_out_then_let_back() {
        let (_tx, pool) = pool(&[1, 2, 3]);
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let made = Arc::new(AtomicU32::new(0));
        let mut balanced = Balanced::new(pool, make(2, calls.clone(), made.clone()))
            .retry(TpsBudget::default(), |r: &u32| Some(*r));
        for i in 0..30 {
            let port = balanced.call(i).await.unwrap();
            assert_ne!(port, 2);
        }
        assert_eq!(
            calls.lock().unwrap()[&2],
            1,
            "one failed attempt, then held out"
        );
        assert_eq!(made.load(Ordering::SeqCst), 3, "one service per address");
        // Still listed: back after its hold-down, fails once more, held out longer.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in 0..30 {
            balanced.call(i).await.unwrap();
        }
        assert_eq!(calls.lock().unwrap()[&2], 2);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_retry_the_failure_is_returned_and_the_instance_still_held_out() {
        let (_tx, pool) = pool(&[1, 2]);
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let mut balanced = Balanced::new(pool, make(1, calls.clone(), Arc::default()));
        let results: Vec<bool> = futures::future::join_all((0..10).map(|i| balanced.call(i)))
            .await
            .iter()
            .map(Result::is_ok)
            .collect();
        assert_eq!(results.iter().filter(|ok| !**ok).count(), 1, "{results:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_that_leaves_the_set_loses_its_service_and_nothing_listed_is_an_error() {
        let (tx, pool) = pool(&[1]);
        let made = Arc::new(AtomicU32::new(0));
        let mut balanced = Balanced::new(pool.clone(), make(0, Arc::default(), made.clone()))
            .pick_timeout(Duration::from_millis(200));
        assert_eq!(balanced.call(0).await.unwrap(), 1);
        tx.send_replace(Snapshot::fixed(vec![Instance::new("s9", "127.0.0.1", 9)]));
        assert_eq!(balanced.call(0).await.unwrap(), 9);
        tx.send_replace(Snapshot::fixed(vec![Instance::new("s1", "127.0.0.1", 1)]));
        assert_eq!(balanced.call(0).await.unwrap(), 1);
        assert_eq!(
            made.load(Ordering::SeqCst),
            3,
            "port 1's service was dropped and made again"
        );
        tx.send_replace(Snapshot::fixed(vec![]));
        let err = balanced.call(0).await.unwrap_err();
        assert!(err.to_string().contains("no instance"), "{err}");
    }

    #[test]
    fn only_idempotent_http_requests_are_copied() {
        let get = hyper::http::Request::get("/a")
            .header("x", "1")
            .body("b")
            .unwrap();
        let copy = http_retryable(&get).unwrap();
        assert_eq!(
            (copy.uri(), copy.headers()["x"].as_bytes(), *copy.body()),
            (get.uri(), b"1".as_slice(), "b")
        );
        assert!(http_retryable(&hyper::http::Request::post("/a").body("b").unwrap()).is_none());
    }
}
