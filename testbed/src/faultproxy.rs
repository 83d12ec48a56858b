//! A fault-injecting HTTP proxy in front of a real Consul agent: it forwards requests and
//! answers byte for byte, and on demand delays, drops, cuts or corrupts the answers (or strips
//! their `X-Consul-Index`), so that
//! servers and clients can be shown a misbehaving Consul without a mock. It listens on
//! 127.0.0.1 only, forwards to one upstream address, and knows nothing of Consul's API.
//!
//! The fault is switched at run time with [`FaultProxy::set`] and applies at once: while a
//! fault fails answers, no request waits on the upstream more than `FAULT_DEADLINE` (a
//! blocking query would otherwise hold its failure back for minutes), so the upstream's real
//! answer is corrupted when it comes that fast, and a stand-in body is used otherwise.

use std::{convert::Infallible, fmt, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header,
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// What the proxy does to each answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward faithfully.
    Pass,
    /// Forward, but hold each answer this long first.
    Delay(Duration),
    /// Accept requests and never answer them; when the fault is lifted, their connections
    /// are closed without an answer (new requests are forwarded again).
    Drop,
    /// Send the status line, the headers (with the full `Content-Length`) and half the body,
    /// then close the connection.
    Cut,
    /// Answer 200 with the upstream's headers and a body that is not JSON.
    BadJson,
    /// Answer 200 with the upstream's headers and only the first half of its body (a
    /// complete HTTP answer carrying incomplete JSON).
    Truncated,
    /// Answer this status (500, 429, ...) with a short text body.
    Status(u16),
    /// Forward, without the `X-Consul-Index` header (a proxy that strips it).
    StripIndex,
}

impl Serialize for Fault {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Fault {
    /// Whether the answer fails (everything but [`Fault::Pass`], [`Fault::Delay`] and
    /// [`Fault::StripIndex`]).
    pub fn is_failure(self) -> bool {
        !matches!(self, Fault::Pass | Fault::Delay(_) | Fault::StripIndex)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Pass => f.write_str("pass"),
            Fault::Delay(d) => write!(f, "delay {}", consul_api::GoDuration(*d)),
            Fault::Drop => f.write_str("drop (accept, never answer)"),
            Fault::Cut => f.write_str("cut mid-answer"),
            Fault::BadJson => f.write_str("bad JSON"),
            Fault::Truncated => f.write_str("truncated body"),
            Fault::Status(code) => write!(f, "HTTP {code}"),
            Fault::StripIndex => f.write_str("X-Consul-Index stripped"),
        }
    }
}

/// Under a failing fault, the upstream's answer is awaited this long at most (a blocking
/// query could take minutes); past it, [`STAND_IN`] takes the place of its body.
const FAULT_DEADLINE: Duration = Duration::from_millis(200);
/// Stands for the upstream's body when a request is failed before the upstream answered:
/// the start of a health answer.
const STAND_IN: &[u8] = br#"[{"Node":{"ID":"00000000-0000-0000-0000-000000000000","Node":"testbed","Address":"127.0.0.1"},"Service":{"ID":"servernode_1"}}]"#;
/// How long a cut answer waits after its first half before the connection is closed.
const CUT_PAUSE: Duration = Duration::from_millis(50);
/// The body of [`Fault::BadJson`].
const BAD_JSON: &[u8] = b"{\"testbed-faultproxy\": this is not JSON <html>";

/// Counts of what the proxy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStats {
    /// Requests received.
    pub requests: u64,
    /// Answers forwarded unchanged (possibly delayed).
    pub forwarded: u64,
    /// Answers failed by a fault (dropped, cut, corrupted, replaced by a status).
    pub faulted: u64,
    /// Requests held unanswered right now ([`Fault::Drop`]).
    pub held: u64,
    /// Requests the upstream failed (answered 502).
    pub upstream_errors: u64,
    /// Bytes of answer bodies read from the upstream.
    pub upstream_bytes: u64,
}

/// The proxy; it stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    /// The counts, published on every change so waits need no polling.
    stats: Arc<watch::Sender<ProxyStats>>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listen on a free port of 127.0.0.1 and forward to `upstream` (a loopback address).
    pub async fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        if !upstream.ip().is_loopback() {
            return Err(Error::Setting(format!(
                "the fault proxy forwards to loopback only, not {upstream}"
            )));
        }
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (fault, _) = watch::channel(Fault::Pass);
        let stats = Arc::new(watch::Sender::new(ProxyStats::default()));
        let stop = CancellationToken::new();
        let ctx = Ctx {
            upstream,
            fault: fault.clone(),
            stats: stats.clone(),
        };
        tokio::spawn(accept_loop(listener, ctx, stop.clone()));
        tracing::debug!(%addr, %upstream, "fault proxy listening");
        Ok(FaultProxy {
            addr,
            upstream,
            fault,
            stats,
            stop,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:port`, as `CONSUL_HTTP_ADDR` takes it.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switch to `fault`, at once (requests in flight included).
    pub fn set(&self, fault: Fault) {
        tracing::debug!(%fault, "fault proxy switched");
        self.fault.send_replace(fault);
    }

    /// Forward faithfully again.
    pub fn heal(&self) {
        self.set(Fault::Pass);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// What it has done so far.
    pub fn stats(&self) -> ProxyStats {
        *self.stats.borrow()
    }

    /// Wait, at most `timeout`, until the counts satisfy `done` (woken by each change).
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl FnMut(&ProxyStats) -> bool,
    ) -> Result<ProxyStats> {
        let mut stats = self.stats.subscribe();
        match tokio::time::timeout(timeout, stats.wait_for(done)).await {
            Ok(Ok(now)) => Ok(*now),
            // The sender lives in `self`: it cannot have closed.
            Ok(Err(_)) | Err(_) => Err(Error::Timeout {
                what: format!("the fault proxy {what}"),
                timeout,
            }),
        }
    }

    /// Wait until at least `n` requests are held unanswered, at most `timeout`.
    pub async fn wait_held(&self, n: u64, timeout: Duration) -> Result<()> {
        self.wait_until(&format!("to hold {n} requests"), timeout, |s| s.held >= n)
            .await
            .map(drop)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug, Clone)]
struct Ctx {
    upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    stats: Arc<watch::Sender<ProxyStats>>,
}

impl Ctx {
    /// Change the counts, and wake whoever waits on them.
    fn count(&self, change: impl FnOnce(&mut ProxyStats)) {
        self.stats.send_modify(change);
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

/// Why the proxy closed a connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Closed(&'static str);

async fn accept_loop(listener: TcpListener, ctx: Ctx, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "fault proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(ctx.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                result = conn => {
                    if let Err(e) = result {
                        tracing::trace!(error = %e, "fault proxy: connection ended");
                    }
                }
            }
        });
    }
}

/// One request: forward it, racing the upstream against a switch to a failing fault.
async fn handle(ctx: Ctx, req: Request<Incoming>) -> std::result::Result<Response<Body>, Closed> {
    ctx.count(|s| s.requests += 1);
    let mut fault = ctx.fault.subscribe();
    if *fault.borrow_and_update() == Fault::Drop {
        ctx.count(|s| s.faulted += 1);
        return hold(&ctx, &mut fault).await;
    }
    let exchange = forward(ctx.upstream, req);
    tokio::pin!(exchange);
    let grace = || Some(tokio::time::Instant::now() + FAULT_DEADLINE);
    let mut deadline = if fault.borrow().is_failure() {
        grace()
    } else {
        None
    };
    let upstream = loop {
        tokio::select! {
            answer = &mut exchange => break Some(answer),
            changed = fault.changed() => {
                if changed.is_err() {
                    break None;
                }
                match *fault.borrow_and_update() {
                    Fault::Drop => break None,
                    f if f.is_failure() => {
                        deadline = deadline.or_else(grace);
                    }
                    _ => deadline = None,
                }
            }
            () = sleep_until(deadline) => break None,
        }
    };
    let upstream = match upstream {
        Some(Ok(answer)) => Some(answer),
        Some(Err(e)) => {
            ctx.count(|s| s.upstream_errors += 1);
            tracing::debug!(error = %e, "fault proxy: upstream failed");
            return Ok(text(
                StatusCode::BAD_GATEWAY,
                format!("testbed faultproxy: upstream {}: {e}\n", ctx.upstream),
            ));
        }
        None => None,
    };
    let current = *fault.borrow_and_update();
    apply(&ctx, current, upstream, &mut fault).await
}

/// An upstream answer, read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

async fn forward(
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> std::result::Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::trace!(error = %e, "fault proxy: upstream connection ended");
        }
    });
    let response = sender.send_request(req).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

async fn apply(
    ctx: &Ctx,
    fault: Fault,
    upstream: Option<Answer>,
    watch: &mut watch::Receiver<Fault>,
) -> std::result::Result<Response<Body>, Closed> {
    if let Some(a) = &upstream {
        let len = a.body.len() as u64;
        ctx.count(|s| s.upstream_bytes += len);
    }
    if fault.is_failure() {
        ctx.count(|s| s.faulted += 1);
    } else {
        ctx.count(|s| s.forwarded += 1);
    }
    let (status, headers, body) = match upstream {
        Some(a) => (a.status, a.headers, a.body),
        None => (
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(STAND_IN),
        ),
    };
    match fault {
        Fault::Pass => Ok(answer(status, &headers, full(body))),
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(answer(status, &headers, full(body)))
        }
        Fault::StripIndex => {
            let mut headers = headers;
            headers.remove("x-consul-index");
            Ok(answer(status, &headers, full(body)))
        }
        Fault::Drop => hold(ctx, watch).await,
        Fault::Cut => {
            let half = body.slice(..body.len() / 2);
            // The pause lets hyper flush the first half before the error tears the
            // connection down.
            let frames = futures::stream::iter([Some(half), None]).then(|chunk| async move {
                match chunk {
                    Some(half) => Ok(Frame::data(half)),
                    None => {
                        tokio::time::sleep(CUT_PAUSE).await;
                        Err(std::io::Error::other("testbed faultproxy: cut mid-answer"))
                    }
                }
            });
            let mut response = answer(status, &headers, BoxBody::new(StreamBody::new(frames)));
            response.headers_mut().insert(
                header::CONTENT_LENGTH,
                header::HeaderValue::from(body.len()),
            );
            Ok(response)
        }
        Fault::BadJson => Ok(answer(
            StatusCode::OK,
            &headers,
            full(Bytes::from_static(BAD_JSON)),
        )),
        Fault::Truncated => {
            let half = body.slice(..body.len() / 2);
            Ok(answer(StatusCode::OK, &headers, full(half)))
        }
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = text(
                status,
                format!("testbed faultproxy: injected {}\n", status.as_u16()),
            );
            if status == StatusCode::TOO_MANY_REQUESTS {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            Ok(response)
        }
    }
}

/// Never answer while the fault is [`Fault::Drop`]; then close the connection unanswered.
async fn hold(
    ctx: &Ctx,
    watch: &mut watch::Receiver<Fault>,
) -> std::result::Result<Response<Body>, Closed> {
    ctx.count(|s| s.held += 1);
    while *watch.borrow_and_update() == Fault::Drop {
        if watch.changed().await.is_err() {
            break;
        }
    }
    ctx.count(|s| s.held -= 1);
    Err(Closed(
        "testbed faultproxy: dropped request released unanswered",
    ))
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn full(body: Bytes) -> Body {
    BoxBody::new(Full::new(body).map_err(|e: Infallible| match e {}))
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An answer with the upstream's status and end-to-end headers (framing headers are hyper's).
fn answer(status: StatusCode, headers: &HeaderMap, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    for (name, value) in headers {
        let hop = [
            header::CONNECTION,
            header::TRANSFER_ENCODING,
            header::CONTENT_LENGTH,
            header::TE,
            header::TRAILER,
            header::UPGRADE,
        ];
        if !hop.contains(name) && name.as_str() != "keep-alive" {
            response.headers_mut().append(name, value.clone());
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A tiny upstream: answers every request with a JSON array and an index header.
    async fn upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let delay = req.uri().query() == Some("slow");
                        if delay {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        let mut r = Response::new(Full::new(Bytes::from_static(
                            b"[{\"ID\":\"a\"},{\"ID\":\"b\"}]",
                        )));
                        r.headers_mut()
                            .insert("X-Consul-Index", header::HeaderValue::from_static("42"));
                        Ok::<_, Infallible>(r)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// One raw HTTP/1.1 exchange; returns everything read until the proxy closes (or resets).
    async fn raw_get(proxy: SocketAddr, query: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(proxy).await?;
        let req = format!("GET /v1/x{query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn forwards_and_corrupts_on_demand() {
        let proxy = FaultProxy::start(upstream().await).await.unwrap();
        let ok = raw_get(proxy.addr(), "").await.unwrap();
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.to_ascii_lowercase().contains("x-consul-index: 42"),
            "{ok}"
        );
        assert!(ok.ends_with("[{\"ID\":\"a\"},{\"ID\":\"b\"}]"), "{ok}");

        proxy.set(Fault::StripIndex);
        let stripped = raw_get(proxy.addr(), "").await.unwrap();
        assert!(stripped.starts_with("HTTP/1.1 200"), "{stripped}");
        assert!(
            !stripped.to_ascii_lowercase().contains("x-consul-index"),
            "{stripped}"
        );
        assert!(
            stripped.ends_with("[{\"ID\":\"a\"},{\"ID\":\"b\"}]"),
            "{stripped}"
        );

        proxy.set(Fault::BadJson);
        let bad = raw_get(proxy.addr(), "").await.unwrap();
        assert!(bad.starts_with("HTTP/1.1 200"), "{bad}");
        assert!(bad.ends_with("this is not JSON <html>"), "{bad}");

        proxy.set(Fault::Truncated);
        let cut = raw_get(proxy.addr(), "").await.unwrap();
        assert!(cut.contains("content-length: 11"), "{cut}");
        assert!(cut.ends_with("\r\n\r\n[{\"ID\":\"a\"}"), "{cut}");

        proxy.set(Fault::Status(429));
        let busy = raw_get(proxy.addr(), "").await.unwrap();
        assert!(busy.starts_with("HTTP/1.1 429"), "{busy}");
        assert!(busy.contains("retry-after: 1"), "{busy}");

        proxy.set(Fault::Cut);
        let partial = raw_get(proxy.addr(), "").await.unwrap();
        assert!(partial.contains("content-length: 23"), "{partial}");
        assert!(partial.ends_with("\r\n\r\n[{\"ID\":\"a\"}"), "{partial}");

        proxy.heal();
        assert!(raw_get(proxy.addr(), "").await.unwrap().ends_with("}]"));
        let stats = proxy.stats();
        assert_eq!(stats.requests, 7);
        assert_eq!(
            (stats.forwarded, stats.faulted),
            (3, 4),
            "a stripped index is no failure"
        );
    }

    #[tokio::test]
    async fn failing_faults_do_not_wait_on_the_upstream_and_drop_holds_until_healed() {
        let proxy = FaultProxy::start(upstream().await).await.unwrap();
        let addr = proxy.addr();
        let slow = tokio::spawn(async move { raw_get(addr, "?slow").await });
        // The request is in the proxy, waiting on the slow upstream, when the fault comes.
        proxy
            .wait_until("to receive the slow request", Duration::from_secs(5), |s| {
                s.requests >= 1
            })
            .await
            .unwrap();
        proxy.set(Fault::Status(500));
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), slow)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5));

        // A request arriving under a failing fault does not wait for a slow upstream.
        proxy.set(Fault::Truncated);
        let started = Instant::now();
        let truncated = raw_get(addr, "?slow").await.unwrap();
        let half = String::from_utf8_lossy(&STAND_IN[..STAND_IN.len() / 2]).into_owned();
        assert!(truncated.starts_with("HTTP/1.1 200"), "{truncated}");
        assert!(truncated.ends_with(&half), "{truncated}");
        assert!(started.elapsed() < Duration::from_secs(5));

        proxy.set(Fault::Drop);
        let held = tokio::spawn(async move { raw_get(addr, "").await });
        proxy.wait_held(1, Duration::from_secs(5)).await.unwrap();
        assert!(!held.is_finished());
        proxy.heal();
        let released = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(released.unwrap(), "", "closed without an answer");
        assert_eq!(proxy.stats().held, 0);
        assert!(raw_get(addr, "").await.unwrap().starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn faults_read_well() {
        assert_eq!(Fault::Delay(Duration::from_secs(2)).to_string(), "delay 2s");
        assert_eq!(Fault::Status(429).to_string(), "HTTP 429");
        assert!(!Fault::Delay(Duration::ZERO).is_failure());
        assert!(Fault::Truncated.is_failure());
    }
}
