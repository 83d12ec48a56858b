//! The harness around one real Consul agent: start it (a container through testcontainers, or
//! a local process where no Docker engine answers), wait until it runs AND has a leader, and
//! stop, restart, pause or resume it on demand. Several harnesses run side by side.
//!
//! * [`agent`] — the agent's command line, ports and ACL settings, whoever runs it;
//! * [`docker`] — the image and the container backend;
//! * [`process`] — the local-process backend;
//! * [`pki`] — test certificates (rcgen) for an agent with HTTPS and `verify_incoming`;
//!
//! The agent's output goes to a [`LogBuffer`], waitable, with Consul's own timestamps.

pub mod agent;
pub mod docker;
pub mod pki;
pub mod process;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

pub use self::{
    agent::{AgentMode, AgentSpec, AgentTls, Flavor, Membership, Ports},
    docker::{ConsulImage, ImageRef},
    pki::{Issuer, TestPki},
};
use crate::{
    error::{Error, Result},
    logbuf::LogBuffer,
};

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Docker if an engine answers, else a local process, with a loud warning.
    Auto,
    /// Docker, or an error.
    Docker,
    /// A local `consul` process.
    Process,
}

impl BackendChoice {
    /// `TESTBED_BACKEND=auto|docker|process` (default `auto`).
    pub fn from_env() -> Result<BackendChoice> {
        match std::env::var("TESTBED_BACKEND").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(BackendChoice::Auto),
            Ok("docker") => Ok(BackendChoice::Docker),
            Ok("process") => Ok(BackendChoice::Process),
            Ok(other) => Err(Error::Setting(format!(
                "TESTBED_BACKEND={other:?}: use auto, docker or process"
            ))),
        }
    }
}

/// The backend an agent actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// A container of the Consul image, host networking.
    Docker,
    /// A local `consul` child process (the fallback without Docker).
    Process,
}

impl BackendKind {
    /// `"docker"` or `"process"`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Docker => "docker",
            BackendKind::Process => "process",
        }
    }
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct ConsulOptions {
    /// Which backend to run on (`TESTBED_BACKEND`).
    pub backend: BackendChoice,
    /// The image to run (`CONSUL_IMAGE`, or the locally built one).
    pub image: ImageRef,
    /// With ACLs on and default deny: the management token.
    pub acl_management_token: Option<String>,
    /// With TLS: the API on HTTPS only, with these certificates.
    pub tls: Option<TlsOptions>,
    /// How long the agent may take to run and elect itself leader.
    pub startup_timeout: Duration,
    /// The HTTP API and DNS interface on `::1` too (dev agents only; see
    /// [`Consul::ipv6_config`], [`Consul::ipv6_dns_addr`]).
    pub ipv6_loopback: bool,
    /// Consul's cap on HTTP connections from one client IP, raised (dev agents and every
    /// cluster member; see [`AgentSpec::http_max_conns_per_client`]).
    pub http_max_conns_per_client: Option<u32>,
    /// Every agent's `-log-level`; `None`: Consul's default (see [`AgentSpec::log_level`]).
    pub log_level: Option<String>,
}

/// An agent's HTTPS settings.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// The CA and the agent's and a client's certificates.
    pub pki: Arc<TestPki>,
    /// `verify_incoming`: clients must present a certificate signed by the CA.
    pub verify_incoming: bool,
}

impl ConsulOptions {
    /// Options from the environment: `TESTBED_BACKEND`, `CONSUL_IMAGE`.
    pub fn from_env() -> Result<ConsulOptions> {
        Ok(ConsulOptions {
            backend: BackendChoice::from_env()?,
            image: ImageRef::from_env(),
            acl_management_token: None,
            tls: None,
            startup_timeout: Duration::from_secs(60),
            ipv6_loopback: false,
            http_max_conns_per_client: None,
            log_level: None,
        })
    }

    /// These options with ACLs enabled, default policy deny, and `token` as management token.
    pub fn with_acl(mut self, token: impl Into<String>) -> Self {
        self.acl_management_token = Some(token.into());
        self
    }

    /// These options with the API on HTTPS only (HTTP port off), certificates from `pki`,
    /// and client certificates required when `verify_incoming`.
    pub fn with_tls(mut self, pki: Arc<TestPki>, verify_incoming: bool) -> Self {
        self.tls = Some(TlsOptions {
            pki,
            verify_incoming,
        });
        self
    }

    /// These options with the HTTP API and DNS interface on `::1` as well as 127.0.0.1 (same
    /// ports). For a dev agent ([`Consul::start_with`]); cluster members ignore it.
    pub fn with_ipv6_loopback(mut self) -> Self {
        self.ipv6_loopback = true;
        self
    }

    /// These options with Consul's cap on HTTP connections per client IP raised to `n`
    /// (`limits { http_max_conns_per_client }`, 200 by default): for hundreds of watchers
    /// on this machine, all of which reach the agent from 127.0.0.1. Dev agents and every
    /// member of a cluster.
    pub fn with_http_max_conns_per_client(mut self, n: u32) -> Self {
        self.http_max_conns_per_client = Some(n);
        self
    }

    /// These options with every agent's `-log-level` set to `level` (`info`, say): a `-dev`
    /// agent logs at `DEBUG`, a line per local service and check on every anti-entropy
    /// sync: at thousands of local instances, thousands of lines per change for the engine
    /// to store.
    pub fn with_log_level(mut self, level: impl Into<String>) -> Self {
        self.log_level = Some(level.into());
        self
    }

    /// These options on a given backend.
    pub fn with_backend(mut self, backend: BackendChoice) -> Self {
        self.backend = backend;
        self
    }
}

enum Running {
    Docker(docker::Container),
    Process(tokio::process::Child),
}

/// One real Consul agent, removed when dropped.
pub struct Consul {
    options: ConsulOptions,
    kind: BackendKind,
    spec: AgentSpec,
    log: LogBuffer,
    client: consul_api::Client,
    running: Option<Running>,
    started_at: SystemTime,
    version: String,
}

impl std::fmt::Debug for Consul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consul")
            .field("backend", &self.kind)
            .field("http", &self.http_addr())
            .field("version", &self.version)
            .field("running", &self.running.is_some())
            .finish()
    }
}

static FALLBACK_WARNED: OnceLock<()> = OnceLock::new();

async fn resolve_backend(choice: BackendChoice) -> Result<BackendKind> {
    match choice {
        BackendChoice::Process => Ok(BackendKind::Process),
        BackendChoice::Docker => docker::available().await.map(|_| BackendKind::Docker),
        BackendChoice::Auto => match docker::available().await {
            Ok(_) => Ok(BackendKind::Docker),
            Err(e) => {
                FALLBACK_WARNED.get_or_init(|| {
                    let msg = format!(
                        "\n!!! testbed WARNING: {e}\n!!! FALLING BACK to a local consul PROCESS \
                         instead of a container. Set TESTBED_BACKEND=docker to make this an \
                         error.\n"
                    );
                    eprintln!("{msg}");
                });
                Ok(BackendKind::Process)
            }
        },
    }
}

/// The API address of an agent on `ip:port` with `options` (`[::1]:port` for IPv6).
fn address(options: &ConsulOptions, ip: impl Into<IpAddr>, port: u16) -> String {
    let scheme = if options.tls.is_some() {
        "https://"
    } else {
        ""
    };
    format!("{scheme}{}", SocketAddr::new(ip.into(), port))
}

/// The client configuration for an agent on `ip:port` with `options`: the management token,
/// and with TLS the CA (and the client certificate when the agent verifies clients).
fn client_config(options: &ConsulOptions, ip: impl Into<IpAddr>, port: u16) -> consul_api::Config {
    let mut config = consul_api::Config::default()
        .with_address(address(options, ip, port))
        .with_token(options.acl_management_token.clone());
    if let Some(tls) = &options.tls {
        config = config.with_tls(tls.pki.client_tls(tls.verify_incoming));
    }
    config
}

/// Before the first agent on `kind`: the orphan sweep and the image; returns the flavor of
/// Consul the backend runs.
async fn prepare(options: &ConsulOptions, kind: BackendKind) -> Result<Flavor> {
    let flavor = match kind {
        BackendKind::Docker => Flavor::guess(&options.image.tag)?,
        BackendKind::Process if std::env::var_os("TESTBED_CONSUL_BIN").is_some() => {
            Flavor::guess(&std::env::var("TESTBED_CONSUL_VERSION").unwrap_or_default())?
        }
        BackendKind::Process => Flavor::Legacy,
    };
    if kind == BackendKind::Docker {
        docker::prepare(&options.image).await?;
    }
    Ok(flavor)
}

/// What an agent logs when one of its ports is taken.
const PORT_CLASH: &str = "address already in use";

impl Drop for Consul {
    /// Its ports go back to the pool (the container or process itself is removed by its own
    /// handle's drop).
    fn drop(&mut self) {
        self.spec.ports.release();
    }
}

impl Consul {
    /// Start an agent with options from the environment.
    pub async fn start() -> Result<Consul> {
        Consul::start_with(ConsulOptions::from_env()?).await
    }

    /// Start an agent with `options`, and wait until it has a leader.
    pub async fn start_with(options: ConsulOptions) -> Result<Consul> {
        let kind = resolve_backend(options.backend).await?;
        let flavor = prepare(&options, kind).await?;
        // Ports are free when picked but may be taken before the agent binds them: retry.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let spec = AgentSpec {
                node_name: format!("testbed-{:08x}", rand::random::<u32>()),
                address: Ipv4Addr::LOCALHOST,
                mode: AgentMode::Dev,
                ports: Ports::pick()?,
                flavor,
                acl_management_token: options.acl_management_token.clone(),
                tls: options.tls.as_ref().map(|t| AgentTls {
                    ca_file: t.pki.ca_file(),
                    cert_file: t.pki.agent_cert(),
                    key_file: t.pki.agent_key(),
                    verify_incoming: t.verify_incoming,
                }),
                ipv6_loopback: options.ipv6_loopback,
                http_max_conns_per_client: options.http_max_conns_per_client,
                log_level: options.log_level.clone(),
            };
            let config = client_config(&options, spec.address, spec.ports.http);
            let mut consul = Consul {
                options: options.clone(),
                kind,
                spec,
                log: LogBuffer::new(),
                client: consul_api::Client::new(config)?,
                running: None,
                started_at: SystemTime::now(),
                version: String::new(),
            };
            match consul.boot().await {
                Ok(()) => return Ok(consul),
                Err(e) => {
                    if attempt >= 3 || !consul.port_clash(&e, 0) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Start one member of a cluster as `spec` describes (its mode is not [`AgentMode::Dev`]),
    /// on the backend `options` name, and return once its HTTP API answers: a cluster member
    /// does not wait for a leader, which only exists once enough servers have joined
    /// ([`crate::cluster::Cluster`] waits for that). The spec's flavor is replaced by the
    /// backend's.
    pub async fn start_member(options: ConsulOptions, mut spec: AgentSpec) -> Result<Consul> {
        if spec.mode == AgentMode::Dev {
            return Err(Error::Setting(
                "Consul::start_member starts cluster members; use Consul::start_with for a dev agent"
                    .into(),
            ));
        }
        let kind = resolve_backend(options.backend).await?;
        spec.flavor = prepare(&options, kind).await?;
        let config = client_config(&options, spec.address, spec.ports.http);
        let mut consul = Consul {
            options,
            kind,
            spec,
            log: LogBuffer::new(),
            client: consul_api::Client::new(config)?,
            running: None,
            started_at: SystemTime::now(),
            version: String::new(),
        };
        consul.boot().await?;
        Ok(consul)
    }

    async fn boot(&mut self) -> Result<()> {
        let timeout = self.options.startup_timeout;
        self.started_at = SystemTime::now();
        self.running = Some(match self.kind {
            BackendKind::Docker => Running::Docker(
                docker::start(&self.options.image, &self.spec, &self.log, timeout).await?,
            ),
            BackendKind::Process => {
                Running::Process(process::start(&self.spec, &self.log, timeout).await?)
            }
        });
        if self.spec.mode == AgentMode::Dev {
            self.wait_ready(timeout).await?;
        } else {
            self.wait_answers(timeout).await?;
        }
        self.version = self.client().agent().agent_self().await?.config.version;
        tracing::info!(backend = self.kind.name(), http = %self.http_addr(), version = %self.version, "consul ready");
        Ok(())
    }

    /// Wait until the agent answers and knows a leader (and, with ACLs on, until the leader
    /// has set up the management token, which it does just after its election).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + timeout;
        let acl = self.options.acl_management_token.is_some();
        loop {
            let last = match client.status().leader().await {
                Ok(leader) if !leader.is_empty() && !acl => return Ok(()),
                Ok(leader) if !leader.is_empty() => match client.agent().agent_self().await {
                    Ok(_) => return Ok(()),
                    Err(e) => format!("management token not usable yet: {e}"),
                },
                Ok(_) => "no leader elected yet".to_owned(),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::StartTimeout {
                    backend: self.kind.name(),
                    timeout,
                    reason: last,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until the agent's HTTP API answers (`/v1/agent/self`), leader or not.
    async fn wait_answers(&self, timeout: Duration) -> Result<()> {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match client.agent().agent_self().await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::StartTimeout {
                        backend: self.kind.name(),
                        timeout,
                        reason: e.to_string(),
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The agent's API address on loopback (its HTTPS port when it serves TLS).
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((self.spec.address, self.spec.ports.http))
    }

    /// The agent's DNS interface (UDP and TCP).
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::from((self.spec.address, self.spec.ports.dns))
    }

    /// The agent's DNS interface on `::1`, when started [`ConsulOptions::with_ipv6_loopback`].
    pub fn ipv6_dns_addr(&self) -> Option<SocketAddr> {
        self.ipv6_on()
            .then(|| SocketAddr::from((Ipv6Addr::LOCALHOST, self.spec.ports.dns)))
    }

    /// A client configuration for the agent's API on `[::1]` (as [`Consul::config`]), when
    /// started [`ConsulOptions::with_ipv6_loopback`].
    pub fn ipv6_config(&self) -> Option<consul_api::Config> {
        self.ipv6_on()
            .then(|| client_config(&self.options, Ipv6Addr::LOCALHOST, self.spec.ports.http))
    }

    fn ipv6_on(&self) -> bool {
        self.spec.ipv6_loopback && self.spec.mode == AgentMode::Dev
    }

    /// `127.x.y.z:port` (`https://...` with TLS), as `CONSUL_HTTP_ADDR` takes it.
    pub fn address(&self) -> String {
        address(&self.options, self.spec.address, self.spec.ports.http)
    }

    /// A client configuration for this agent, with the management token when ACLs are on,
    /// and with TLS on: its CA, and the client certificate when it verifies clients.
    pub fn config(&self) -> consul_api::Config {
        client_config(&self.options, self.spec.address, self.spec.ports.http)
    }

    /// The agent's certificates, when it serves HTTPS.
    pub fn pki(&self) -> Option<&Arc<TestPki>> {
        self.options.tls.as_ref().map(|t| &t.pki)
    }

    /// Re-issue the agent's certificate for `names` (signed by `issuer`) and make the
    /// running agent load it (SIGHUP: Consul reloads its TLS files; new connections get the
    /// new certificate, open ones keep their session). Returns once a new connection is
    /// served the new certificate.
    pub async fn rotate_certificate(&self, names: &[&str], issuer: Issuer) -> Result<()> {
        let tls = self
            .options
            .tls
            .as_ref()
            .ok_or_else(|| Error::AgentState("does not serve HTTPS"))?;
        let marker = tls.pki.reissue_agent(names, issuer)?;
        self.reload().await?;
        // Only the new certificate holds `marker`, and only its CA signed it.
        let probe = consul_api::Client::new(self.config().with_tls(consul_api::TlsConfig {
            ca_file: Some(tls.pki.agent_ca_file()),
            server_name: Some(marker),
            ..tls.pki.client_tls(tls.verify_incoming)
        }))?;
        let timeout = Duration::from_secs(10);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match probe.status().leader().await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Timeout {
                        what: format!("the agent to serve its new certificate (last: {e})"),
                        timeout,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Make the agent reload its configuration files (SIGHUP), and wait until it logs the
    /// signal (it reloads right after, and logs nothing when that succeeds).
    pub async fn reload(&self) -> Result<()> {
        let mark = self.log.mark();
        match &self.running {
            Some(Running::Docker(c)) => c.signal("SIGHUP").await?,
            Some(Running::Process(child)) => {
                let pid = child.id().ok_or_else(|| Error::Process {
                    what: "consul agent".into(),
                    reason: "already exited".into(),
                })?;
                crate::signal::send(pid, crate::signal::Signal::SIGHUP)?;
            }
            None => return Err(Error::AgentState("is not running")),
        }
        self.log
            .wait_for_after(mark, "signal=hangup", Duration::from_secs(10))
            .await?;
        Ok(())
    }

    /// A client for this agent (management token when ACLs are on).
    pub fn client(&self) -> consul_api::Client {
        self.client.clone()
    }

    /// The backend the agent runs on.
    pub fn backend(&self) -> BackendKind {
        self.kind
    }

    /// The agent's output so far (across restarts).
    pub fn log(&self) -> &LogBuffer {
        &self.log
    }

    /// Consul's version, as the agent reports it.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// When the current run of the agent was started.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// The command line and ports.
    pub fn spec(&self) -> &AgentSpec {
        &self.spec
    }

    /// Whether an agent is running (not stopped).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Send the agent SIGTERM and wait (at most `timeout`) until it has exited, then remove
    /// its container. A client agent leaves the cluster on SIGTERM (`leave_on_terminate`
    /// defaults to true for clients, false for servers), deregistering its node's services.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<()> {
        let exited = match &mut self.running {
            Some(Running::Docker(c)) => {
                c.signal("SIGTERM").await?;
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    if !c.is_running().await? {
                        break true;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Some(Running::Process(child)) => {
                let pid = child.id().ok_or_else(|| Error::Process {
                    what: "consul agent".into(),
                    reason: "already exited".into(),
                })?;
                crate::signal::send(pid, crate::signal::Signal::SIGTERM)?;
                tokio::time::timeout(timeout, child.wait()).await.is_ok()
            }
            None => return Err(Error::AgentState("is not running")),
        };
        self.stop().await?;
        if exited {
            Ok(())
        } else {
            Err(Error::Timeout {
                what: "the agent to exit after SIGTERM (it was killed)".into(),
                timeout,
            })
        }
    }

    /// Stop the agent at once: remove the container (`docker rm -f`: SIGKILL) or kill the
    /// process. A crash, for a cluster member: it does not leave. Its ports stop answering.
    pub async fn stop(&mut self) -> Result<()> {
        match self.running.take() {
            Some(Running::Docker(container)) => container.remove().await?,
            Some(Running::Process(mut child)) => {
                child.kill().await?;
            }
            None => {}
        }
        Ok(())
    }

    /// Whether `failed` (a boot) came from a port taken by someone else: the agent logged
    /// it after `seen` such lines, or the error carries the agent's last words.
    fn port_clash(&self, failed: &Error, seen: usize) -> bool {
        self.log.matching(PORT_CLASH).len() > seen || failed.to_string().contains(PORT_CLASH)
    }

    /// Start a stopped agent again, on the same HTTP port. Dev mode keeps no state: every
    /// registration is gone, and indexes start over.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Err(Error::AgentState("is already running"));
        }
        for _attempt in 0..2 {
            let clashes = self.log.matching(PORT_CLASH).len();
            match self.boot().await {
                Err(e) if self.spec.mode == AgentMode::Dev && self.port_clash(&e, clashes) => {
                    // One of its own ports (Serf, RPC) was taken while it was down: only the
                    // agent uses those, so new ones do; the HTTP port stays.
                    self.stop().await?;
                    let old = self.spec.ports;
                    self.spec.ports = Ports::repick_keeping_http(old.http)?;
                    old.release_all_but_http();
                    tracing::info!(ports = ?self.spec.ports, "agent port taken meanwhile; new Serf and RPC ports");
                }
                other => return other,
            }
        }
        self.boot().await
    }

    /// Stop, then start again.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// The host PID of the agent's process (the container's main process on Docker).
    pub async fn pid(&self) -> Result<u32> {
        match &self.running {
            Some(Running::Docker(c)) => c.main_pid().await,
            Some(Running::Process(child)) => child.id().ok_or(Error::AgentState("has exited")),
            None => Err(Error::AgentState("is not running")),
        }
    }

    /// The CPU time the agent has used so far, and where it was read: the container's
    /// cgroup (`"cgroup"`) when it is visible from here, else the agent's process
    /// (`"process"`; the same figure, as the image runs nothing else).
    pub async fn cpu_time(&self) -> Result<(Duration, &'static str)> {
        if let Some(Running::Docker(c)) = &self.running
            && let Some(used) = crate::procfs::container_cpu_time(c.id())
        {
            return Ok((used, "cgroup"));
        }
        let pid = self.pid().await?;
        crate::procfs::cpu_time(pid)
            .map(|used| (used, "process"))
            .ok_or_else(|| Error::Process {
                what: format!("read the CPU time of the agent (pid {pid})"),
                reason: "no /proc entry".into(),
            })
    }

    /// Freeze the agent (`docker pause`, or SIGSTOP): its ports accept but never answer.
    pub async fn pause(&self) -> Result<()> {
        self.signal_or(true).await
    }

    /// Unfreeze a paused agent.
    pub async fn resume(&self) -> Result<()> {
        self.signal_or(false).await
    }

    async fn signal_or(&self, pause: bool) -> Result<()> {
        match &self.running {
            Some(Running::Docker(c)) => {
                if pause {
                    c.pause().await?
                } else {
                    c.unpause().await?
                }
            }
            Some(Running::Process(child)) => {
                let pid = child.id().ok_or_else(|| Error::Process {
                    what: "consul agent".into(),
                    reason: "already exited".into(),
                })?;
                crate::signal::send(
                    pid,
                    if pause {
                        crate::signal::Signal::SIGSTOP
                    } else {
                        crate::signal::Signal::SIGCONT
                    },
                )?;
            }
            None => return Err(Error::AgentState("is not running")),
        }
        Ok(())
    }
}
