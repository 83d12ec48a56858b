//! The HTTP client: where the agent is, which ACL token to send, and the one request path
//! every endpoint goes through (timeouts, response-size cap, error mapping).

use std::{
    collections::HashSet,
    error::Error as _,
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use reqwest::{Method, StatusCode, Url, header::HeaderValue};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    acl::Acl,
    agent::Agent,
    catalog::Catalog,
    error::{Error, Result},
    health::Health,
    kv::Kv,
    query::{QueryMeta, QueryOptions},
    skip::{Skipped, decode_skipping},
    status::Status,
    tls::TlsConfig,
};

/// The agent's default address, as in Consul's CLI.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8500";

/// Every environment variable [`Config::from_env`] reads, as Consul's CLI names them.
pub const ENV_VARS: &[&str] = &[
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_SSL_VERIFY",
    "CONSUL_CACERT",
    "CONSUL_CAPATH",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
    "CONSUL_TLS_SERVER_NAME",
];

/// Where a successful answer's body goes, chunk by chunk, as it arrives: a `Vec<u8>`
/// collects it; a decoder can do its work while the rest is still in flight (see
/// [`Health::service_answer_to`](crate::health::Health::service_answer_to)).
pub trait BodySink: Send {
    /// How many bytes it has been given.
    fn received(&self) -> usize;
    /// The answer announced its length: room for that much more.
    fn reserve(&mut self, additional: usize) {
        let _ = additional;
    }
    /// The next chunk of the body.
    fn extend(&mut self, chunk: &[u8]);
}

impl BodySink for Vec<u8> {
    fn received(&self) -> usize {
        self.len()
    }

    fn reserve(&mut self, additional: usize) {
        Vec::reserve(self, additional);
    }

    fn extend(&mut self, chunk: &[u8]) {
        self.extend_from_slice(chunk);
    }
}

/// Where and how to reach a Consul agent.
#[derive(Clone)]
pub struct Config {
    /// `host:port`, `http://host:port` or `https://host:port`, like `CONSUL_HTTP_ADDR`.
    pub address: String,
    /// HTTPS even when the address has no scheme or says `http://`, like
    /// `CONSUL_HTTP_SSL=true` (Go's `api` never reverts to HTTP once TLS is asked for).
    pub ssl: bool,
    /// Certificates and verification for HTTPS (`CONSUL_CACERT`, ...).
    pub tls: TlsConfig,
    /// ACL token sent as `X-Consul-Token`, like `CONSUL_HTTP_TOKEN`. Never logged, and sent
    /// to the agent only: a redirect is not followed (an [`Error::Status`] 3xx instead).
    pub token: Option<String>,
    /// Deadline of a non-blocking request.
    pub timeout: Duration,
    /// Deadline to establish a connection.
    pub connect_timeout: Duration,
    /// Largest response body accepted, in bytes (64 MiB by default: a health answer is about
    /// 1.1 KB an instance, 2.5 KB from a `-dev` agent, which indents its JSON).
    pub max_body_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            address: DEFAULT_ADDRESS.to_owned(),
            ssl: false,
            tls: TlsConfig::default(),
            token: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_body_bytes: 64 << 20,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("ssl", &self.ssl)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

impl Config {
    /// Defaults overridden by Consul's CLI variables ([`ENV_VARS`]): `CONSUL_HTTP_ADDR`,
    /// `CONSUL_HTTP_TOKEN` / `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_HTTP_SSL`, `CONSUL_CACERT`,
    /// `CONSUL_CAPATH`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`, `CONSUL_TLS_SERVER_NAME`
    /// and `CONSUL_HTTP_SSL_VERIFY`.
    pub fn from_env() -> Result<Config> {
        Config::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Config::from_env`] with the variables looked up by `var`.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let path = |name: &str| var(name).map(PathBuf::from);
        let mut config = Config::default();
        if let Some(addr) = var("CONSUL_HTTP_ADDR") {
            config.address = addr;
        }
        if let Some(token) = var("CONSUL_HTTP_TOKEN") {
            config.token = Some(token);
        } else if let Some(path) = var("CONSUL_HTTP_TOKEN_FILE") {
            let token = std::fs::read_to_string(&path).map_err(|e| {
                Error::Config(format!("cannot read CONSUL_HTTP_TOKEN_FILE {path:?}: {e}"))
            })?;
            config.token = Some(token.trim().to_owned());
        }
        if let Some(ssl) = var("CONSUL_HTTP_SSL") {
            config.ssl = parse_bool("CONSUL_HTTP_SSL", &ssl)?;
        }
        if let Some(verify) = var("CONSUL_HTTP_SSL_VERIFY") {
            config.tls.insecure_skip_verify = !parse_bool("CONSUL_HTTP_SSL_VERIFY", &verify)?;
        }
        config.tls.ca_file = path("CONSUL_CACERT");
        config.tls.ca_path = path("CONSUL_CAPATH");
        config.tls.client_cert = path("CONSUL_CLIENT_CERT");
        config.tls.client_key = path("CONSUL_CLIENT_KEY");
        config.tls.server_name = var("CONSUL_TLS_SERVER_NAME").map(|name| strip_port(&name));
        Ok(config)
    }

    /// The variables that give this configuration to a child process (the inverse of
    /// [`Config::from_env`]; the token included, so pass them as its environment, never on
    /// its command line).
    pub fn to_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let mut vars = vec![("CONSUL_HTTP_ADDR", self.address.clone().into())];
        if let Some(token) = &self.token {
            vars.push(("CONSUL_HTTP_TOKEN", token.into()));
        }
        if self.ssl {
            vars.push(("CONSUL_HTTP_SSL", "true".into()));
        }
        if self.tls.insecure_skip_verify {
            vars.push(("CONSUL_HTTP_SSL_VERIFY", "false".into()));
        }
        let paths = [
            ("CONSUL_CACERT", &self.tls.ca_file),
            ("CONSUL_CAPATH", &self.tls.ca_path),
            ("CONSUL_CLIENT_CERT", &self.tls.client_cert),
            ("CONSUL_CLIENT_KEY", &self.tls.client_key),
        ];
        for (name, value) in paths {
            if let Some(path) = value {
                vars.push((name, path.clone().into_os_string()));
            }
        }
        if let Some(name) = &self.tls.server_name {
            vars.push(("CONSUL_TLS_SERVER_NAME", name.into()));
        }
        vars
    }

    /// This configuration with another address.
    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// This configuration with another token (`None`: anonymous).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// This configuration with other TLS settings.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// The base URL the address designates: `http`, or `https` for an `https://` address or
    /// with [`Config::ssl`].
    pub fn base_url(&self) -> Result<Url> {
        let raw = self.address.trim();
        let bad = |why: &str| Error::Config(format!("CONSUL_HTTP_ADDR {raw:?} {why}"));
        let (scheme, rest) = match raw.split_once("://") {
            Some(("http", rest)) if self.ssl => ("https", rest),
            Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
            Some((other, _)) => return Err(bad(&format!("has unsupported scheme {other:?}"))),
            None if self.ssl => ("https", raw),
            None => ("http", raw),
        };
        let url = Url::parse(&format!("{scheme}://{rest}"))
            .map_err(|e| bad(&format!("is not an address: {e}")))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err(bad("must be host:port, without a path"));
        }
        Ok(url)
    }
}

/// Go's `strconv.ParseBool`, which Consul's CLI uses for its boolean variables.
fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(Error::Config(format!(
            "{name}={other:?} is not a boolean: use true or false"
        ))),
    }
}

/// `host:port` to `host`, as Go's `api` does with `CONSUL_TLS_SERVER_NAME`.
pub(crate) fn strip_port(name: &str) -> String {
    let name = name.trim();
    if let Some(bracketed) = name.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or_default().to_owned();
    }
    match name.split_once(':') {
        Some((host, port)) if !port.contains(':') && port.parse::<u16>().is_ok() => host.to_owned(),
        _ => name.to_owned(),
    }
}

/// A handle to one Consul agent's HTTP API. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    token: Option<HeaderValue>,
    config: Config,
    /// The entries left out of answers so far (path, entry, reason): each is a warning
    /// once, then a debug line.
    skipped: Mutex<HashSet<String>>,
}

/// How many left-out entries a client remembers; past it, it starts over (and warns again).
const SKIPPED_REMEMBERED: usize = 1024;

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.inner.base.as_str())
            .field("token", &self.inner.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Client {
    /// A client for the agent `config` designates. Fails only on a configuration that cannot
    /// work; whether Consul answers is found out by the first request.
    pub fn new(config: Config) -> Result<Client> {
        let base = config.base_url()?;
        let token = match &config.token {
            Some(t) => {
                let mut value = HeaderValue::from_str(t.trim()).map_err(|_| {
                    Error::Config(
                        "the ACL token contains characters not allowed in a header".into(),
                    )
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Consul's API never redirects; a redirect followed would carry the token
            // (reqwest keeps every header but `Authorization` and cookies) to another
            // listener, or from https down to http. An answer 3xx is an error instead.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(30));
        if base.scheme() == "https" {
            builder = with_tls(builder, &config.tls, &base)?;
        } else if config.tls.is_set() {
            tracing::warn!(
                address = %base,
                "TLS settings (CONSUL_CACERT, CONSUL_CLIENT_CERT, ...) are given but the address \
                 is http: they are unused; use an https:// address or CONSUL_HTTP_SSL=true"
            );
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                token,
                config,
                skipped: Mutex::default(),
            }),
        })
    }

    /// A client configured from `CONSUL_HTTP_ADDR` / `CONSUL_HTTP_TOKEN`.
    pub fn from_env() -> Result<Client> {
        Client::new(Config::from_env()?)
    }

    /// The configuration this client was built from.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The agent's base URL.
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    /// The agent's host, an IPv6 address without its URL brackets (`::1`, not `[::1]`).
    pub fn host(&self) -> String {
        host_of(&self.inner.base)
    }

    /// The local agent's endpoints (`/v1/agent/...`).
    pub fn agent(&self) -> Agent<'_> {
        Agent::new(self)
    }

    /// The health endpoints (`/v1/health/...`).
    pub fn health(&self) -> Health<'_> {
        Health::new(self)
    }

    /// The catalog endpoints (`/v1/catalog/...`).
    pub fn catalog(&self) -> Catalog<'_> {
        Catalog::new(self)
    }

    /// The status endpoints (`/v1/status/...`).
    pub fn status(&self) -> Status<'_> {
        Status::new(self)
    }

    /// The prepared-query endpoints (`/v1/query/...`).
    pub fn prepared_query(&self) -> crate::prepared::PreparedQuery<'_> {
        crate::prepared::PreparedQuery::new(self)
    }

    /// The ACL endpoints (`/v1/acl/...`).
    pub fn acl(&self) -> Acl<'_> {
        Acl::new(self)
    }

    /// The key/value store (`/v1/kv/...`) and its transactions (`/v1/txn`).
    pub fn kv(&self) -> Kv<'_> {
        Kv::new(self)
    }

    /// GET a JSON value.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        params: &[(&'static str, String)],
        opts: Option<&QueryOptions>,
    ) -> Result<(T, QueryMeta)> {
        let (body, meta, path) = self
            .send(Method::GET, segments, params, opts, None::<&()>)
            .await?;
        Ok((decode("GET", &path, &body)?, meta))
    }

    /// GET a JSON answer that holds entries (a list, or a map by ID, that `entries` finds
    /// in it): an entry that does not decode as `E` (a port of 70000 from a foreign
    /// registration) is left out and logged, never failing the others.
    pub(crate) async fn get_entries<T: DeserializeOwned, E: DeserializeOwned>(
        &self,
        segments: &[&str],
        params: &[(&'static str, String)],
        opts: Option<&QueryOptions>,
        entries: fn(&mut serde_json::Value) -> Option<&mut serde_json::Value>,
    ) -> Result<(T, QueryMeta)> {
        let (body, meta, path) = self
            .send(Method::GET, segments, params, opts, None::<&()>)
            .await?;
        let answer = decode_skipping::<T, E>("GET", &path, &body, entries, &mut |skipped| {
            self.skipped(&path, skipped);
        })?;
        Ok((answer, meta))
    }

    /// Log an entry left out of an answer from `path`: a warning the first time this client
    /// sees it (the same entry with the same fault), a debug line after that.
    fn skipped(&self, path: &str, skipped: Skipped) {
        let Skipped { label, reason } = skipped;
        let first = {
            let mut seen = self
                .inner
                .skipped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.len() >= SKIPPED_REMEMBERED {
                seen.clear();
            }
            seen.insert(format!("{path}\n{label}\n{reason}"))
        };
        if first {
            tracing::warn!(
                %path,
                entry = %label,
                "Consul's answer holds an entry that cannot be used, left out (the others are \
                 used; the registration that made it needs fixing): {reason}"
            );
        } else {
            tracing::debug!(%path, entry = %label, "entry left out again: {reason}");
        }
    }

    /// GET a body without decoding it, handed to `sink` chunk by chunk as it arrives (only
    /// a successful answer's body: an error's is read for its message); with the answer's
    /// metadata and the request path.
    pub(crate) async fn get_to(
        &self,
        segments: &[&str],
        params: &[(&'static str, String)],
        opts: Option<&QueryOptions>,
        sink: &mut dyn BodySink,
    ) -> Result<(QueryMeta, String)> {
        self.send_to(Method::GET, segments, params, opts, None::<&()>, sink)
            .await
    }

    /// GET a JSON value; `None` when Consul answers 404.
    pub(crate) async fn get_optional<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        params: &[(&'static str, String)],
        opts: Option<&QueryOptions>,
    ) -> Result<Option<(T, QueryMeta)>> {
        match self.get(segments, params, opts).await {
            Err(e) if e.is_not_found() => Ok(None),
            other => other.map(Some),
        }
    }

    /// PUT an optional JSON body; the answer's body is returned raw (often empty or `true`).
    pub(crate) async fn put<B: Serialize>(
        &self,
        segments: &[&str],
        params: &[(&'static str, String)],
        body: Option<&B>,
    ) -> Result<Vec<u8>> {
        let (body, _, _) = self.send(Method::PUT, segments, params, None, body).await?;
        Ok(body)
    }

    /// DELETE; the answer's body is returned raw (often `true`).
    pub(crate) async fn delete(&self, segments: &[&str]) -> Result<Vec<u8>> {
        let (body, _, _) = self
            .send(Method::DELETE, segments, &[], None, None::<&()>)
            .await?;
        Ok(body)
    }

    /// POST a JSON body and decode the JSON answer.
    pub(crate) async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<T> {
        let (raw, _, path) = self
            .send(Method::POST, segments, &[], None, Some(body))
            .await?;
        decode("POST", &path, &raw)
    }

    /// PUT and decode the JSON answer.
    pub(crate) async fn put_json<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<T> {
        let (raw, _, path) = self
            .send(Method::PUT, segments, &[], None, Some(body))
            .await?;
        decode("PUT", &path, &raw)
    }

    /// [`send_to`](Self::send_to), the body collected in a `Vec`.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        segments: &[&str],
        params: &[(&'static str, String)],
        opts: Option<&QueryOptions>,
        body: Option<&B>,
    ) -> Result<(Vec<u8>, QueryMeta, String)> {
        let body = body.map(|b| RequestBody::json(b, segments)).transpose()?;
        let (answer, meta, path, _) = self
            .request(method, segments, params, opts, body, &[])
            .await?;
        Ok((answer, meta, path))
    }

    /// [`exchange`](Self::exchange) with a JSON body (if any), success statuses only.
    async fn send_to<B: Serialize>(
        &self,
        method: Method,
        segments: &[&str],
        params: &[(&'static str, String)],
        opts: Option<&QueryOptions>,
        body: Option<&B>,
        sink: &mut dyn BodySink,
    ) -> Result<(QueryMeta, String)> {
        let body = body.map(|b| RequestBody::json(b, segments)).transpose()?;
        let (meta, path, _) = self
            .exchange(method, segments, params, opts, body, sink, &[])
            .await?;
        Ok((meta, path))
    }

    /// A request whose body is given as is (`None`: no body), whose answer is an answer with
    /// the statuses in `accept` as well as with a success (its body collected, its status
    /// returned): the KV store's 404 of a missing key still carries `X-Consul-Index`, and a
    /// failed transaction's 409 says which operation failed.
    pub(crate) async fn request(
        &self,
        method: Method,
        segments: &[&str],
        params: &[(&'static str, String)],
        opts: Option<&QueryOptions>,
        body: Option<RequestBody>,
        accept: &[StatusCode],
    ) -> Result<(Vec<u8>, QueryMeta, String, StatusCode)> {
        let mut answer = Vec::new();
        let (meta, path, status) = self
            .exchange(method, segments, params, opts, body, &mut answer, accept)
            .await?;
        Ok((answer, meta, path, status))
    }

    /// The one request path: build the URL, send with the token and the deadline, map
    /// transport and TLS failures, hand a successful answer's body (or one whose status is
    /// in `accept`) to `sink` as it arrives, and turn an error status into an [`Error`] with
    /// Consul's message.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        method: Method,
        segments: &[&str],
        params: &[(&'static str, String)],
        opts: Option<&QueryOptions>,
        body: Option<RequestBody>,
        sink: &mut dyn BodySink,
        accept: &[StatusCode],
    ) -> Result<(QueryMeta, String, StatusCode)> {
        let method_name: &'static str = match method {
            Method::PUT => "PUT",
            Method::POST => "POST",
            Method::DELETE => "DELETE",
            _ => "GET",
        };
        let mut url = self.inner.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|_| Error::Config("the Consul address cannot take a path".into()))?;
            path.clear().push("v1");
            for segment in segments {
                path.push(segment);
            }
        }
        {
            let mut query = url.query_pairs_mut();
            for (k, v) in params
                .iter()
                .cloned()
                .chain(opts.map(QueryOptions::pairs).unwrap_or_default())
            {
                if v.is_empty() {
                    query.append_key_only(k);
                } else {
                    query.append_pair(k, &v);
                }
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let path = url.path().to_owned();
        let timeout = opts
            .and_then(QueryOptions::blocking_budget)
            .map_or(self.inner.config.timeout, |budget| {
                budget + self.inner.config.timeout
            });

        let mut request = self.inner.http.request(method, url).timeout(timeout);
        if let Some(token) = &self.inner.token {
            request = request.header("X-Consul-Token", token.clone());
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, body.content_type)
                .body(body.bytes);
        }
        tracing::trace!(method = method_name, %path, "consul request");
        let url = || self.inner.base.as_str().trim_end_matches('/').to_owned();
        let transport = |e: reqwest::Error| {
            #[cfg(feature = "tls")]
            if let Some(tls) = crate::tls::rustls_error(&e) {
                return Error::Tls {
                    method: method_name,
                    url: url(),
                    path: path.clone(),
                    problem: self
                        .inner
                        .config
                        .tls
                        .explain(tls, &host_of(&self.inner.base)),
                };
            }
            Error::Transport {
                method: method_name,
                url: url(),
                path: path.clone(),
                timeout: e.is_timeout(),
                reason: error_chain(&e),
            }
        };
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        let mut meta = QueryMeta::from_headers(response.headers());
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());

        let limit = self.inner.config.max_body_bytes;
        // Large answers (thousands of instances) are handed on as they arrive: a sink that
        // decodes by what changed does most of its work while the rest is in flight. An
        // error's body is read for its message.
        let mut body = Vec::new();
        let answered = status.is_success() || accept.contains(&status);
        let target: &mut dyn BodySink = if answered { sink } else { &mut body };
        if let Some(n) = response.content_length() {
            target.reserve(usize::try_from(n).unwrap_or(0).min(limit));
        }
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if target.received() + chunk.len() > limit {
                return Err(Error::BodyTooLarge {
                    method: method_name,
                    path,
                    limit,
                });
            }
            target.extend(&chunk);
        }
        meta.read_at = Some(SystemTime::now());
        if answered {
            return Ok((meta, path, status));
        }
        if status.is_redirection() {
            let location = printable_location(location.as_deref());
            return Err(Error::Status {
                method: method_name,
                path,
                status: status.as_u16(),
                message: format!(
                    "a redirect to {location}, not followed: Consul's API does not redirect, \
                     and the ACL token goes to the agent only; check CONSUL_HTTP_ADDR"
                ),
            });
        }
        let message = message_of(&body);
        Err(
            if status == StatusCode::BAD_REQUEST && message.contains("to an HTTPS server") {
                Error::Tls {
                    method: method_name,
                    url: url(),
                    path,
                    problem: "the agent's port speaks HTTPS and we spoke plain HTTP: use an \
                          https:// address or CONSUL_HTTP_SSL=true"
                        .into(),
                }
            } else if status == StatusCode::FORBIDDEN {
                Error::PermissionDenied {
                    method: method_name,
                    path,
                    message,
                }
            } else {
                Error::Status {
                    method: method_name,
                    path,
                    status: status.as_u16(),
                    message,
                }
            },
        )
    }
}

/// A request's body, encoded, with its content type.
#[derive(Debug)]
pub(crate) struct RequestBody {
    bytes: Vec<u8>,
    content_type: &'static str,
}

impl RequestBody {
    /// `value` as JSON; `segments` name the request in the error.
    pub(crate) fn json<B: Serialize + ?Sized>(value: &B, segments: &[&str]) -> Result<Self> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            Error::Config(format!(
                "cannot encode the request body for /v1/{}: {e}",
                segments.join("/")
            ))
        })?;
        Ok(RequestBody {
            bytes,
            content_type: "application/json",
        })
    }

    /// Bytes sent as they are (a KV value).
    pub(crate) fn raw(bytes: Vec<u8>) -> Self {
        RequestBody {
            bytes,
            content_type: "application/octet-stream",
        }
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// The host of `url`, without IPv6 brackets: the name its certificate is checked against.
/// `builder` speaking TLS to the agent at `base` as `tls` says (feature `tls`).
#[cfg(feature = "tls")]
fn with_tls(
    builder: reqwest::ClientBuilder,
    tls: &TlsConfig,
    base: &Url,
) -> Result<reqwest::ClientBuilder> {
    Ok(builder.use_preconfigured_tls(tls.client_config(&host_of(base))?))
}

/// Without the `tls` feature an `https` agent is refused, by the feature's name.
#[cfg(not(feature = "tls"))]
fn with_tls(
    _builder: reqwest::ClientBuilder,
    _tls: &TlsConfig,
    base: &Url,
) -> Result<reqwest::ClientBuilder> {
    Err(Error::Config(format!(
        "the agent's address {base} is https, but consul-api was built without its `tls` \
         feature: enable it (on by default) or use an http address"
    )))
}

fn host_of(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

pub(crate) fn decode<'a, T: serde::Deserialize<'a>>(
    method: &'static str,
    path: &str,
    body: &'a [u8],
) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Decode {
        method,
        path: path.to_owned(),
        reason: e.to_string(),
        snippet: snippet(body),
    })
}

/// The first bytes of a body, printable, for a decoding error.
pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(80)]);
    text.chars().filter(|c| !c.is_control()).collect()
}

/// A redirect's `Location`, short and printable, for its error.
fn printable_location(location: Option<&str>) -> String {
    match location {
        Some(location) => {
            let clean: String = location
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            format!("{clean:?}")
        }
        None => "(no Location)".to_owned(),
    }
}

fn message_of(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
    let text = text.trim();
    if text.is_empty() {
        "(no message)".to_owned()
    } else {
        text.lines().next().unwrap_or_default().to_owned()
    }
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = e.source();
    let mut last = String::new();
    while let Some(s) = source {
        let text = s.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
            last = text;
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn addresses_like_consuls_cli() {
        let url = |a: &str| Config::default().with_address(a).base_url();
        assert_eq!(
            url("127.0.0.1:8500").unwrap().as_str(),
            "http://127.0.0.1:8500/"
        );
        assert_eq!(
            url("http://localhost:18500").unwrap().as_str(),
            "http://localhost:18500/"
        );
        assert_eq!(
            url("https://127.0.0.1:8501").unwrap().as_str(),
            "https://127.0.0.1:8501/"
        );
        for bad in [
            "unix:///tmp/consul.sock",
            "http://",
            "127.0.0.1:8500/v1",
            "::::",
        ] {
            let err = url(bad).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad}: {err}");
            assert!(err.to_string().contains("CONSUL_HTTP_ADDR"), "{err}");
        }
    }

    #[test]
    fn tls_settings_from_consuls_variables() {
        let vars = |pairs: &[(&str, &str)]| {
            let map: std::collections::HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_vars(move |name| map.get(name).cloned())
        };
        let config = vars(&[
            ("CONSUL_HTTP_ADDR", "127.0.0.1:8501"),
            ("CONSUL_HTTP_SSL", "true"),
            ("CONSUL_CACERT", "/etc/consul/ca.pem"),
            ("CONSUL_CAPATH", "/etc/consul/cas"),
            ("CONSUL_CLIENT_CERT", "/etc/consul/client.pem"),
            ("CONSUL_CLIENT_KEY", "/etc/consul/client-key.pem"),
            ("CONSUL_TLS_SERVER_NAME", "server.dc1.consul:8501"),
            ("CONSUL_HTTP_SSL_VERIFY", "0"),
            ("CONSUL_HTTP_TOKEN", "s3cr3t"),
        ])
        .unwrap();
        assert_eq!(
            config.base_url().unwrap().as_str(),
            "https://127.0.0.1:8501/"
        );
        let tls = &config.tls;
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(Path::new("/etc/consul/ca.pem"))
        );
        assert_eq!(tls.ca_path.as_deref(), Some(Path::new("/etc/consul/cas")));
        assert_eq!(
            tls.client_cert.as_deref(),
            Some(Path::new("/etc/consul/client.pem"))
        );
        assert_eq!(
            tls.client_key.as_deref(),
            Some(Path::new("/etc/consul/client-key.pem"))
        );
        assert_eq!(tls.server_name.as_deref(), Some("server.dc1.consul"));
        assert!(tls.insecure_skip_verify);

        // The child's environment gives back the same configuration.
        let env = config.to_env();
        let again = Config::from_vars(|name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        })
        .unwrap();
        assert_eq!(again.tls, config.tls);
        assert_eq!((again.ssl, &again.address), (config.ssl, &config.address));
        assert_eq!(again.token, config.token);
        assert!(env.iter().all(|(k, _)| ENV_VARS.contains(k)));

        // Go's `api`: TLS asked for is never reverted by an http:// address.
        let forced = vars(&[
            ("CONSUL_HTTP_ADDR", "http://localhost:8501"),
            ("CONSUL_HTTP_SSL", "true"),
        ])
        .unwrap();
        assert_eq!(forced.base_url().unwrap().scheme(), "https");
        let plain = vars(&[("CONSUL_HTTP_SSL", "false")]).unwrap();
        assert_eq!(plain.base_url().unwrap().scheme(), "http");
        assert!(!plain.tls.is_set());

        let err = vars(&[("CONSUL_HTTP_SSL", "yes")]).unwrap_err();
        assert!(err.to_string().contains("CONSUL_HTTP_SSL"), "{err}");
        let err = vars(&[("CONSUL_HTTP_SSL_VERIFY", "nope")]).unwrap_err();
        assert!(err.to_string().contains("CONSUL_HTTP_SSL_VERIFY"), "{err}");
    }

    #[test]
    fn server_names_lose_their_port_like_gos() {
        assert_eq!(strip_port("server.dc1.consul:8501"), "server.dc1.consul");
        assert_eq!(strip_port("server.dc1.consul"), "server.dc1.consul");
        assert_eq!(strip_port("[::1]:8501"), "::1");
        assert_eq!(strip_port("::1"), "::1");
    }

    /// A listener on 127.0.0.1 that answers every request with `answer` (given the port it
    /// listens on) and keeps each request's head; one request per connection.
    async fn listener(
        answer: impl Fn(u16) -> String + Send + 'static,
    ) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = conn.write_all(answer(port).as_bytes()).await;
                let _ = conn.shutdown().await;
            }
        });
        (port, heads)
    }

    /// Every log line, at every level, written while the returned guard lives (this thread).
    fn capture_logs() -> (
        Arc<std::sync::Mutex<Vec<u8>>>,
        tracing::subscriber::DefaultGuard,
    ) {
        #[derive(Clone)]
        struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Sink(Arc::clone(&lines));
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        (lines, tracing::subscriber::set_default(subscriber))
    }

    const TOKEN: &str = "s3cr3t-token";

    #[tokio::test]
    async fn token_never_printed() {
        let (logs, _guard) = capture_logs();
        let config = Config::default().with_token(Some(TOKEN.into()));
        assert!(!format!("{config:?}").contains(TOKEN));
        let client = Client::new(config.clone()).unwrap();
        assert!(!format!("{client:?}").contains(TOKEN));

        // Error messages: no answer, an error status, a redirect.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (refusing, _) = listener(|_| {
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 17\r\n\r\nPermission denied".into()
        })
        .await;
        // A redirect to another listener: the token must not go there.
        let (elsewhere, reached) =
            listener(|_| "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".into()).await;
        let (redirecting, _) = listener(move |_| {
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{elsewhere}/x\r\n\
                 Content-Length: 0\r\n\r\n"
            )
        })
        .await;
        let mut results = Vec::new();
        for port in [closed, refusing, redirecting] {
            let client =
                Client::new(config.clone().with_address(format!("127.0.0.1:{port}"))).unwrap();
            results.push(client.agent().services().await);
        }
        let reached = reached.lock().unwrap().clone();
        assert!(
            reached.iter().all(|head| !head.contains(TOKEN)),
            "the token went elsewhere: {reached:?}"
        );
        for result in results {
            let err = result.expect_err("no answer, 403, redirect: all errors");
            assert!(!err.to_string().contains(TOKEN), "{err}");
            assert!(!format!("{err:?}").contains(TOKEN), "{err:?}");
        }
        // Log lines at every level, down to trace.
        let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("consul request"), "logs captured: {logs}");
        assert!(!logs.contains(TOKEN), "{logs}");
    }

    #[tokio::test]
    async fn a_redirect_is_an_error_and_the_token_stays_home() {
        // Another listener, where a redirect would take the request and its token.
        let (elsewhere, reached) = listener(|_| {
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                .into()
        })
        .await;
        let (agent, asked) = listener(move |_| {
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\n\
                 Location: http://127.0.0.1:{elsewhere}/v1/agent/services\r\n\
                 Content-Length: 0\r\n\r\n"
            )
        })
        .await;
        let client = Client::new(
            Config::default()
                .with_address(format!("127.0.0.1:{agent}"))
                .with_token(Some(TOKEN.into())),
        )
        .unwrap();
        let result = client.agent().services().await;
        // The agent was asked, with the token.
        let asked = asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert!(
            asked[0]
                .to_lowercase()
                .contains(&format!("x-consul-token: {TOKEN}"))
        );
        // Nothing reached the other listener: no token, no request at all.
        let reached = reached.lock().unwrap().clone();
        assert!(reached.is_empty(), "the redirect was followed: {reached:?}");
        let err = result.expect_err("a redirect is an error");
        assert_eq!(err.status(), Some(307), "{err}");
        assert!(!err.is_retryable(), "{err}");
        let message = err.to_string();
        assert!(message.contains("not followed"), "{message}");
        assert!(
            message.contains(&format!("127.0.0.1:{elsewhere}/v1/agent/services")),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_bad_entry_is_left_out_and_warned_once() {
        let (logs, _guard) = capture_logs();
        // Consul 1.8.7 returns what a foreign registration gave: Port 70000.
        let services = r#"{"good": {"ID": "good", "Service": "web", "Port": 8080},
            "foreign": {"ID": "foreign", "Service": "web", "Port": 70000}}"#;
        let (agent, _) = listener(move |_| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{services}",
                services.len()
            )
        })
        .await;
        let client =
            Client::new(Config::default().with_address(format!("127.0.0.1:{agent}"))).unwrap();
        for _ in 0..3 {
            let services = client.agent().services().await.expect("the good ones");
            assert_eq!(services.keys().collect::<Vec<_>>(), ["good"]);
            assert_eq!(services["good"].port, 8080);
        }
        let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        let about = |level: &str| {
            logs.lines()
                .filter(|l| l.contains(level) && l.contains("foreign"))
                .count()
        };
        assert_eq!(about("WARN"), 1, "{logs}");
        assert!(logs.contains("70000"), "the reason is given: {logs}");
        assert_eq!(about("DEBUG"), 2, "{logs}");
    }

    #[test]
    fn error_messages_are_short_and_clean() {
        assert_eq!(message_of(b"Permission denied\nmore"), "Permission denied");
        assert_eq!(message_of(b""), "(no message)");
        assert_eq!(snippet(b"{\"a\":\n1"), "{\"a\":1");
    }
}
