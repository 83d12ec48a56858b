//! The typed Consul HTTP API: the only place in this workspace that speaks to Consul.
//!
//! Names follow Consul's own Go `api` package so that its documentation reads across:
//!
//! * [`client`] — [`Client`] and its [`Config`] (address, ACL token and TLS, read from
//!   `CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`, `CONSUL_CACERT`, ... like Consul's CLI), the
//!   request plumbing and response-size cap.
//! * `args` (feature `clap`) — `ConsulArgs`, the Consul CLI's connection flags
//!   (`--http-addr`, `--ca-file`, ...) for binaries.
//! * [`tls`] — [`TlsConfig`]: HTTPS and mutual TLS (rustls; feature `tls`, on by default:
//!   without it an `https` agent is refused), with errors that name the
//!   setting to fix.
//! * [`agent`] — the local agent: `ServiceRegister` ([`AgentServiceRegistration`] with an
//!   [`AgentServiceCheck`]), `ServiceDeregister`, `Services`, `Service`, `Checks`, `Self`.
//! * [`health`] — `Service` (healthy instances as [`ServiceEntry`], blocking), `Checks`, `Node`,
//!   `State`.
//! * [`catalog`] — `Service`, `Services` and `Register`.
//! * [`kv`] — the key/value store: `Get`, `List` (`?recurse`), `Keys`, `Put`, `CAS`, `Delete`
//!   ([`KVPair`]) and transactions (`/v1/txn`, [`KVTxnOp`]), Consul's limits checked before
//!   a request is sent.
//! * [`prepared`] — prepared queries: `Create`, `Execute` (polled: it cannot block), `Delete`.
//! * [`status`] — `Leader`.
//! * [`acl`] — policies and tokens, enough to set up ACL scenarios.
//! * [`query`] — [`QueryOptions`] (`index`, `wait`, `dc`, ...) and [`QueryMeta`]
//!   (`X-Consul-Index`, ...).
//! * [`watch`] — [`Watch`], the state of a blocking query by Consul's rules.
//! * [`follow`] — [`Follow`], the one loop that drives a [`Watch`] (fetch, backoff, reset,
//!   error classification by a [`Classify`] policy of what is [`Retried`]) and hands out [`Event`]s; its [`Retry`]
//!   half serves loops that write (a heartbeat).
//! * [`backoff`] — [`Backoff`], the one jittered exponential backoff (backon) of the workspace:
//!   the watch's polling without an index, the client's Consul retries and reconnects.
//! * [`duration`] — [`GoDuration`], durations written and read the way Go does (`5s`, `1m30s`).
//! * [`error`] — the one [`Error`] enum, carrying HTTP status and Consul's message.
//! * `skip` — one bad entry of a list (a foreign registration's `Port: 70000`) left out and
//!   logged, never failing the rest of the answer.
//!
//! The client never retries by itself: callers decide (reads may be retried with backoff,
//! writes are not), using [`Error::is_retryable`] or, for a loop, a [`Classify`] policy.
//!
//! Follow a service's passing instances with blocking queries, as discovery does:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use consul_api::{
//!     Backoff, Classify, Client, Event, Follow, QueryOptions, Retried, Retry, Watch,
//! };
//!
//! # async fn demo() -> consul_api::Result<()> {
//! // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ... as Consul's CLI reads them.
//! let client = Client::from_env()?;
//! let watch = Watch::new(QueryOptions::default(), Duration::from_secs(60));
//! // Refusals are fatal until Consul has answered once, retried after (a token rotated).
//! let classify = Classify {
//!     before_success: Retried::Transient,
//!     after_success: Retried::AllButConfig,
//! };
//! let retry = Retry::new(classify, Backoff::consul());
//! let mut follow = Follow::new(watch, retry, |opts| {
//!     let client = client.clone();
//!     async move { client.health().service("web", None, true, &opts).await }
//! });
//! loop {
//!     match follow.next().await {
//!         // Each time the set changes.
//!         Event::Changed { value, .. } => println!("{} passing instance(s) of web", value.len()),
//!         // Retried with backoff, from a fresh watch.
//!         Event::Unreachable(retrying) => eprintln!("retrying in {:?}", retrying.retry_in),
//!         Event::Fatal(error) => return Err(error),
//!         // Only with a `Follow::refusing` check.
//!         Event::Refused { .. } => {}
//!     }
//! }
//! # }
//! ```

pub mod acl;
pub mod agent;
#[cfg(feature = "clap")]
pub mod args;
pub mod backoff;
pub mod catalog;
pub mod client;
pub mod duration;
pub mod error;
pub mod follow;
pub mod health;
pub mod kv;
pub mod prepared;
pub mod query;
mod skip;
pub mod status;
pub mod tls;
pub mod watch;

pub use acl::{AclPolicy, AclPolicyLink, AclToken};
pub use agent::{
    AgentCheck, AgentMember, AgentSelf, AgentService, AgentServiceCheck, AgentServiceRegistration,
    AgentWeights,
};
#[cfg(feature = "clap")]
pub use args::ConsulArgs;
pub use backoff::Backoff;
pub use catalog::{
    CatalogCheckRegistration, CatalogRegistration, CatalogService, CatalogServiceRegistration,
};
pub use client::{BodySink, Client, Config};
pub use duration::GoDuration;
pub use error::{Error, Result};
pub use follow::{Answered, Classify, Event, Follow, RateLimit, Retried, Retry, Retrying};
pub use health::{
    CheckView, EntryView, HealthCheck, HealthStatus, Node, NodeView, ServiceAnswer, ServiceEntry,
    ServiceView,
};
pub use kv::{KVOp, KVPair, KVTxnOp, Kv, TxnError, TxnResponse, TxnResult};
pub use prepared::{
    PreparedQueryDefinition, PreparedQueryExecuteResponse, QueryFailover, ServiceQuery,
};
pub use query::{Consistency, QueryMeta, QueryOptions};
pub use tls::TlsConfig;
pub use watch::Watch;
