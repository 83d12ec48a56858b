//! The HTTP health check Consul's agent calls: `GET {check_path}` answers 200 while the
//! service serves, 503 while it drains or is forced unhealthy; any other path is a 404. The
//! [`Health`] handle decides what it answers. Two ways to serve it:
//!
//! * [`serve`] — on a port of its own, so a stuck service connection cannot block it, and
//!   silent connections cannot starve it: when every slot is taken, the oldest connection is
//!   closed to make room for the new one (the agent's request, which comes with its
//!   connection, is answered long before it could become the oldest);
//! * [`CheckService`] — a `tower::Service` to mount in the service's own hyper or axum
//!   router, where the service already has an HTTP port:
//!
//! ```
//! use consul_registry::{Health, check::CheckService};
//! use tower::Service;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let health = Health::default();
//! let mut check = CheckService::new("/check", health.clone());
//! let get = |path| hyper::Request::get(path).body(()).unwrap();
//! assert_eq!(check.call(get("/check")).await.unwrap().status(), 200);
//! health.set_draining();
//! assert_eq!(check.call(get("/check")).await.unwrap().status(), 503);
//! assert_eq!(check.call(get("/other")).await.unwrap().status(), 404);
//! # });
//! ```

use std::{
    convert::Infallible,
    future::{Ready, ready},
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use consul_api::{AgentServiceCheck, GoDuration};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::shed::Shedder;

/// Check connections served at once; the agent needs one. A new connection beyond this
/// closes the oldest.
const MAX_CHECK_CONNECTIONS: usize = 64;
/// A client must send its request head within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What `/check` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// 200: the service serves.
    Serving,
    /// 503: forced unhealthy ([`Health::set_healthy`]: an operator's drill, a test); the
    /// service itself goes on answering.
    ForcedUnhealthy,
    /// 503: shutting down.
    Draining,
}

impl CheckStatus {
    /// The HTTP status `/check` answers with: 200 or 503.
    pub fn http_status(self) -> u16 {
        self.status_code().as_u16()
    }

    fn status_code(self) -> StatusCode {
        match self {
            CheckStatus::Serving => StatusCode::OK,
            CheckStatus::ForcedUnhealthy | CheckStatus::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn body(self) -> &'static str {
        match self {
            CheckStatus::Serving => "ok: serving\n",
            CheckStatus::ForcedUnhealthy => "unhealthy: forced by operator\n",
            CheckStatus::Draining => "unhealthy: draining\n",
        }
    }
}

/// A handle on what the check answers (an HTTP check's status, a TTL check's beats). Cheap to
/// clone; every clone controls the same check. Create it before anything else (it starts
/// serving) and hand it to [`Registration::start_with_health`](crate::Registration::start_with_health)
/// and to the router that serves the check.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    forced_unhealthy: AtomicBool,
    draining: AtomicBool,
    /// A line added to `/check`'s body (the configuration in force, say).
    note: RwLock<Option<Arc<str>>>,
}

impl Health {
    /// `false`: the check answers 503 while the service goes on answering its own clients (a
    /// fault drill); `true`: back to normal. Draining wins over either.
    pub fn set_healthy(&self, healthy: bool) {
        self.inner
            .forced_unhealthy
            .store(!healthy, Ordering::SeqCst);
    }

    /// Flip between healthy and forced unhealthy; returns whether it is now healthy.
    pub fn toggle(&self) -> bool {
        // The old value was "forced": flipping it from forced means healthy now.
        self.inner
            .forced_unhealthy
            .fetch_xor(true, Ordering::SeqCst)
    }

    /// What `/check` answers now.
    pub fn status(&self) -> CheckStatus {
        if self.inner.draining.load(Ordering::SeqCst) {
            CheckStatus::Draining
        } else if self.inner.forced_unhealthy.load(Ordering::SeqCst) {
            CheckStatus::ForcedUnhealthy
        } else {
            CheckStatus::Serving
        }
    }

    /// A line `/check`'s body carries after its status (`None`: none), such as the index of
    /// the configuration in force.
    pub fn set_note(&self, note: Option<String>) {
        if let Ok(mut slot) = self.inner.note.write() {
            *slot = note.map(Arc::from);
        }
    }

    /// The line `/check`'s body carries after its status, if any.
    pub fn note(&self) -> Option<Arc<str>> {
        self.inner.note.read().ok().and_then(|note| note.clone())
    }

    /// From now on `/check` answers 503: the first step of shutdown.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }
}

/// Serve the check at `path` on `listener` until `stop` is cancelled. With `log_requests`,
/// every check request is logged at info level (peer, method, path, host, user agent,
/// status): useful to see the agent's checks arrive; otherwise at debug level.
pub async fn serve(
    listener: TcpListener,
    path: String,
    health: Health,
    log_requests: bool,
    stop: CancellationToken,
) {
    let path: Arc<str> = path.into();
    let limit = Arc::new(Semaphore::new(MAX_CHECK_CONNECTIONS));
    let shed = Shedder::default();
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "check listener: accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        // Every slot taken: the oldest connection (silent, since a request is answered in
        // well under a millisecond) is closed to make room.
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = shed.slot(&limit) => match permit {
                Some(permit) => permit,
                None => break,
            },
        };
        let path = path.clone();
        let health = health.clone();
        let stop = stop.clone();
        let shed = shed.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&req, &path, &health, Some(peer), log_requests);
                async move { Ok::<_, Infallible>(response) }
            });
            // One request per connection (Consul's checker opens a new one each time), so
            // an idle client cannot hold a slot.
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                () = shed.picked() => {
                    tracing::debug!(%peer, "check connection closed to make room for a new one");
                }
                result = conn => if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "check connection ended with an error");
                },
            }
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// The check endpoint as a `tower::Service`, to mount in a service's own HTTP router (axum's
/// `route_service`, a hyper `service_fn` that delegates). Answers like [`serve`] does.
///
/// The path is given once: [`path`](Self::path) is the route to mount it at and
/// [`consul_check`](Self::consul_check) builds the check Consul calls, so the two cannot
/// disagree (a mismatch would be a silent 404 and a critical check).
#[derive(Debug, Clone)]
pub struct CheckService {
    path: Option<Arc<str>>,
    health: Health,
}

impl CheckService {
    /// Answer on `path` with what `health` says; any other path is a 404.
    pub fn new(path: impl Into<String>, health: Health) -> Self {
        CheckService {
            path: Some(path.into().into()),
            health,
        }
    }

    /// Answer on every path: the router that mounts it decides where it is.
    pub fn any_path(health: Health) -> Self {
        CheckService { path: None, health }
    }

    /// The path it answers on (`/` for [`any_path`](Self::any_path)): the route to mount.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// The HTTP check for Consul's agent: `http://{addr}{path}` every `interval`, timing out
    /// after at most 3 s (never more than the interval).
    pub fn consul_check(&self, addr: SocketAddr, interval: Duration) -> AgentServiceCheck {
        AgentServiceCheck {
            http: Some(format!("http://{addr}{}", self.path())),
            interval: Some(GoDuration(interval)),
            timeout: Some(GoDuration(interval.min(Duration::from_secs(3)))),
            ..Default::default()
        }
    }
}

impl<B> tower::Service<Request<B>> for CheckService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = self.path.as_deref().unwrap_or(req.uri().path());
        ready(Ok(respond(&req, path, &self.health, None, false)))
    }
}

fn respond<B>(
    req: &Request<B>,
    path: &str,
    health: &Health,
    peer: Option<SocketAddr>,
    log_requests: bool,
) -> Response<Full<Bytes>> {
    let mut note = None;
    let (status, body) = if req.uri().path() != path {
        (StatusCode::NOT_FOUND, "not found\n")
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET\n",
        )
    } else {
        let now = health.status();
        note = health.note();
        (now.status_code(), now.body())
    };
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let (method, uri) = (req.method().as_str(), req.uri().path());
    let (host, agent) = (header(header::HOST), header(header::USER_AGENT));
    let code = status.as_u16();
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    if log_requests {
        tracing::info!(%peer, method, path = uri, host, user_agent = agent, status = code, "check request");
    } else {
        tracing::debug!(%peer, method, path = uri, host, user_agent = agent, status = code, "check request");
    }
    let body = match note {
        Some(note) => Bytes::from(format!("{body}{note}\n")),
        None => Bytes::from_static(body.as_bytes()),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_wins_and_toggle_flips() {
        let health = Health::default();
        assert_eq!(health.status(), CheckStatus::Serving);
        assert!(!health.toggle(), "now forced unhealthy");
        assert_eq!(health.status(), CheckStatus::ForcedUnhealthy);
        assert!(health.toggle(), "healthy again");
        assert_eq!(health.status().http_status(), 200);
        health.set_healthy(false);
        assert_eq!(health.status().http_status(), 503);
        health.set_draining();
        health.set_healthy(true);
        assert_eq!(health.status(), CheckStatus::Draining);
    }

    #[test]
    fn a_note_follows_the_status_in_the_body() {
        use http_body_util::BodyExt;
        let health = Health::default();
        let get = || Request::get("/check").body(()).unwrap();
        let body = |r: Response<Full<Bytes>>| {
            let bytes = futures::executor::block_on(r.into_body().collect()).unwrap();
            String::from_utf8(bytes.to_bytes().to_vec()).unwrap()
        };
        assert_eq!(
            body(respond(&get(), "/check", &health, None, false)),
            "ok: serving\n"
        );
        health.set_note(Some("config: index 42 (applied)".into()));
        assert_eq!(
            body(respond(&get(), "/check", &health, None, false)),
            "ok: serving\nconfig: index 42 (applied)\n"
        );
        health.set_note(None);
        assert_eq!(health.note(), None);
    }

    #[tokio::test]
    async fn one_path_for_the_route_and_the_check_or_any_path() {
        use tower::Service;
        let health = Health::default();
        let check = CheckService::new("/healthz", health.clone());
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let consul = check.consul_check(addr, Duration::from_secs(1));
        assert_eq!(
            consul.http.as_deref(),
            Some("http://127.0.0.1:8080/healthz")
        );
        assert_eq!(check.path(), "/healthz");
        let mut any = CheckService::any_path(health.clone());
        let get = |path| Request::get(path).body(()).unwrap();
        assert_eq!(
            any.call(get("/mounted/anywhere")).await.unwrap().status(),
            200
        );
        health.set_draining();
        assert_eq!(any.call(get("/x")).await.unwrap().status(), 503);
    }
}
