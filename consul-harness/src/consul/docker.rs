//! The Docker backend: the Consul image as a testcontainers [`Image`], started with host
//! networking, labelled with its owner's PID so that containers left by a killed test run are
//! removed by the next one. testcontainers removes each container when its handle drops,
//! also when a test panics.
//!
//! Everything this module hands out is type-erased: futures come boxed ([`Boxed`]) and a
//! container as a [`Container`] whose handle is a trait object. The Docker stack (bollard,
//! testcontainers, hyper, h2, serde's decoders of the engine's JSON) is then compiled once,
//! here. An `async fn` is compiled in each crate that awaits it, with every generic it
//! reaches (a release build shares no generic instance between crates): before the boxes,
//! each bench binary that starts Consul carried its own copy of that stack, ~1 million lines
//! of LLVM IR and ~70 s of CPU to build (`cargo llvm-lines`, the `discovery` bench).

use std::{borrow::Cow, future::Future, pin::Pin, sync::OnceLock, time::Duration};

use bollard::Docker;
use testcontainers::{
    ContainerAsync, Image, ImageExt,
    core::{Mount, WaitFor, logs::LogFrame},
    runners::AsyncRunner,
};

use super::agent::{AgentSpec, AgentTls};
use crate::logbuf::LogBuffer;
use crate::{
    error::{Error, Result},
    owner::{self, Owner},
    provision,
};

/// The label every testbed container carries.
pub const OWNER_LABEL: &str = "testbed.owner";
const OWNER_VALUE: &str = "consul-echo";
/// The owning process's pid (older versions of the harness read it alone: it stays bare).
const PID_LABEL: &str = "testbed.pid";
/// The owning process's start time (see [`Owner`]): with the pid, a reused pid is told apart.
const START_LABEL: &str = "testbed.pid_start";

/// Whether the process a container's labels name still runs (a container without
/// [`START_LABEL`], from an older harness, by its pid alone).
fn owner_alive(pid: Option<&String>, start: Option<&String>) -> bool {
    let Some(pid) = pid.and_then(|p| p.parse().ok()) else {
        return false;
    };
    match start.map(|s| s.parse()) {
        Some(Ok(start)) => Owner { pid, start }.alive(),
        Some(Err(_)) => false,
        None => owner::runs(pid),
    }
}

/// A Consul image by name and tag, for example `hashicorp/consul:1.20`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The repository, registry host included if any: `hashicorp/consul`.
    pub name: String,
    /// The tag: `1.20`, `latest`.
    pub tag: String,
}

impl ImageRef {
    /// `CONSUL_IMAGE`, else this project's locally built image.
    pub fn from_env() -> ImageRef {
        match std::env::var("CONSUL_IMAGE") {
            Ok(s) if !s.trim().is_empty() => ImageRef::parse(s.trim()),
            _ => ImageRef::local(),
        }
    }

    /// This project's image, built from Debian's package.
    pub fn local() -> ImageRef {
        ImageRef {
            name: provision::LOCAL_IMAGE_NAME.into(),
            tag: provision::LOCAL_IMAGE_TAG.into(),
        }
    }

    /// `name[:tag]`; the tag defaults to `latest`. A registry port (`host:5000/x`) is kept in
    /// the name.
    pub fn parse(s: &str) -> ImageRef {
        match s.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => ImageRef {
                name: name.into(),
                tag: tag.into(),
            },
            _ => ImageRef {
                name: s.into(),
                tag: "latest".into(),
            },
        }
    }

    /// Whether this is the image the project builds by itself.
    pub fn is_local(&self) -> bool {
        *self == ImageRef::local()
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

/// The Consul image with a given command line.
#[derive(Debug, Clone)]
pub struct ConsulImage {
    image: ImageRef,
    args: Vec<String>,
}

impl Image for ConsulImage {
    fn name(&self) -> &str {
        &self.image.name
    }

    fn tag(&self) -> &str {
        &self.image.tag
    }

    fn ready_conditions(&self) -> Vec<WaitFor> {
        // 1.8.7 prints `==> Consul agent running!`, newer ones `agent: Consul agent running!`.
        vec![WaitFor::message_on_stdout("Consul agent running!")]
    }

    fn cmd(&self) -> impl IntoIterator<Item = impl Into<Cow<'_, str>>> {
        self.args.iter().map(String::as_str)
    }
}

/// Where the Docker client looks for the engine.
pub fn endpoint() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

/// A future of this module's, boxed: see the module documentation.
pub type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whether the engine answers (a ping, with a deadline).
pub fn available() -> Boxed<'static, Result<()>> {
    Box::pin(async { connect().await.map(|_| ()) })
}

/// The engine's version, if it answers.
pub fn engine_version() -> Boxed<'static, Option<String>> {
    Box::pin(async { connect().await.ok()?.version().await.ok()?.version })
}

/// Ready to start containers of `image`, once per process: testbed containers whose owning
/// process is gone are removed, and the local image is built if it is the one asked for
/// and missing (another image is left to testcontainers to pull, with a clear error).
pub fn prepare(image: &ImageRef) -> Boxed<'_, Result<()>> {
    Box::pin(async move {
        let docker = connect().await?;
        remove_orphans(&docker).await;
        ensure_image(&docker, image).await
    })
}

/// Build the local image ([`provision::LOCAL_IMAGE`]) if it is missing; `true` if it was
/// built now.
pub fn build_local_image() -> Boxed<'static, Result<bool>> {
    Box::pin(async {
        let docker = connect().await?;
        provision::ensure_local_image(&docker).await
    })
}

/// Connect to the engine and ping it, with a deadline.
async fn connect() -> Result<Docker> {
    let unavailable = |reason: String| Error::DockerUnavailable {
        endpoint: endpoint(),
        reason,
    };
    let docker = Docker::connect_with_defaults().map_err(|e| unavailable(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(5), docker.ping()).await {
        Ok(Ok(_)) => Ok(docker),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Err(_) => Err(unavailable("no answer to ping within 5s".into())),
    }
}

/// Make `image` available: build the local one if missing; for another image, leave pulling
/// to testcontainers, but say clearly what failed.
async fn ensure_image(docker: &Docker, image: &ImageRef) -> Result<()> {
    if image.is_local() {
        provision::ensure_local_image(docker).await?;
    }
    Ok(())
}

static SWEPT: OnceLock<tokio::sync::OnceCell<()>> = OnceLock::new();

/// Once per process: remove testbed containers whose owning process is gone.
async fn remove_orphans(docker: &Docker) {
    SWEPT
        .get_or_init(tokio::sync::OnceCell::new)
        .get_or_init(|| async {
            let filters = std::collections::HashMap::from([(
                "label".to_string(),
                vec![format!("{OWNER_LABEL}={OWNER_VALUE}")],
            )]);
            let options = bollard::query_parameters::ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            };
            let Ok(containers) = docker.list_containers(Some(options)).await else {
                return;
            };
            for c in containers {
                let labels = c.labels.as_ref();
                let owner_alive = owner_alive(
                    labels.and_then(|l| l.get(PID_LABEL)),
                    labels.and_then(|l| l.get(START_LABEL)),
                );
                if owner_alive {
                    continue;
                }
                if let Some(id) = c.id {
                    tracing::info!(container = %id, "removing a testbed container left by a dead process");
                    let options = bollard::query_parameters::RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    };
                    let _ = docker.remove_container(&id, Some(options)).await;
                }
            }
        })
        .await;
}

/// Start one agent container; returns when it printed that it runs.
pub fn start<'a>(
    image: &'a ImageRef,
    spec: &'a AgentSpec,
    log: &'a LogBuffer,
    timeout: Duration,
) -> Boxed<'a, Result<Container>> {
    Box::pin(async move {
        let handle: Box<dyn Handle> = Box::new(start_container(image, spec, log, timeout).await?);
        Ok(Container(handle))
    })
}

async fn start_container(
    image: &ImageRef,
    spec: &AgentSpec,
    log: &LogBuffer,
    timeout: Duration,
) -> Result<ContainerAsync<ConsulImage>> {
    let sink = log.clone();
    let mut request = ConsulImage {
        image: image.clone(),
        args: spec.args(),
    }
    .with_network("host");
    // TLS files, and a cluster member's data directory, are at the same path as on the host.
    let data_dir = spec.mode.membership().map(|m| m.data_dir.clone());
    for dir in spec.tls.iter().flat_map(AgentTls::dirs).chain(data_dir) {
        let dir = dir.to_string_lossy().into_owned();
        request = request.with_mount(Mount::bind_mount(dir.clone(), dir));
    }
    if let Some(uid) = spec.mode.membership().and_then(|m| m.uid) {
        request = request.with_user(format!("{uid}:{uid}"));
    }
    let me = Owner::me()?;
    let request = request
        .with_container_name(format!("testbed-{}", spec.node_name))
        .with_label(OWNER_LABEL, OWNER_VALUE)
        .with_label(PID_LABEL, me.pid.to_string())
        .with_label(START_LABEL, me.start.to_string())
        .with_startup_timeout(timeout)
        .with_log_consumer(move |frame: &LogFrame| match frame {
            LogFrame::StdOut(bytes) | LogFrame::StdErr(bytes) => sink.push_bytes(bytes),
        });
    request.start().await.map_err(|e| {
        let text = e.to_string();
        if text.contains("No such image") || text.contains("pull") || text.contains("manifest") {
            Error::ImageUnavailable {
                image: image.to_string(),
                reason: format!(
                    "{text} (this machine may have no registry: unset CONSUL_IMAGE to use the \
                     locally built {})",
                    provision::LOCAL_IMAGE
                ),
            }
        } else {
            Error::Container(e)
        }
    })
}

/// A running agent container, removed when dropped (testcontainers' handle, behind a trait
/// object so that its drop is compiled here: see the module documentation).
pub struct Container(Box<dyn Handle>);

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Container").field(&self.0.id()).finish()
    }
}

/// What [`Container`] needs of testcontainers' handle.
trait Handle: Send + Sync {
    fn id(&self) -> &str;
    fn is_running(&self) -> Boxed<'_, Result<bool>>;
    fn pause(&self) -> Boxed<'_, Result<()>>;
    fn unpause(&self) -> Boxed<'_, Result<()>>;
    fn remove(self: Box<Self>) -> Boxed<'static, Result<()>>;
}

impl Handle for ContainerAsync<ConsulImage> {
    fn id(&self) -> &str {
        // The raw container's, through testcontainers' `Deref`.
        std::ops::Deref::deref(self).id()
    }

    fn is_running(&self) -> Boxed<'_, Result<bool>> {
        Box::pin(async { Ok(ContainerAsync::is_running(self).await?) })
    }

    fn pause(&self) -> Boxed<'_, Result<()>> {
        Box::pin(async { Ok(ContainerAsync::pause(self).await?) })
    }

    fn unpause(&self) -> Boxed<'_, Result<()>> {
        Box::pin(async { Ok(ContainerAsync::unpause(self).await?) })
    }

    fn remove(self: Box<Self>) -> Boxed<'static, Result<()>> {
        Box::pin(async move { Ok(self.rm().await?) })
    }
}

impl Container {
    /// The container's ID.
    pub fn id(&self) -> &str {
        self.0.id()
    }

    /// Whether its main process still runs.
    pub fn is_running(&self) -> Boxed<'_, Result<bool>> {
        self.0.is_running()
    }

    /// Freeze it (`docker pause`).
    pub fn pause(&self) -> Boxed<'_, Result<()>> {
        self.0.pause()
    }

    /// Unfreeze it.
    pub fn unpause(&self) -> Boxed<'_, Result<()>> {
        self.0.unpause()
    }

    /// Remove it now (`docker rm -f`: SIGKILL).
    pub fn remove(self) -> Boxed<'static, Result<()>> {
        self.0.remove()
    }

    /// The host PID of the container's main process (the agent itself: the image holds
    /// nothing else).
    pub fn main_pid(&self) -> Boxed<'_, Result<u32>> {
        Box::pin(async move {
            let docker = connect().await?;
            let fail = |reason: String| Error::Process {
                what: format!("find the main process of container {}", self.id()),
                reason,
            };
            let inspected = docker
                .inspect_container(self.id(), None)
                .await
                .map_err(|e| fail(e.to_string()))?;
            inspected
                .state
                .and_then(|s| s.pid)
                .and_then(|pid| u32::try_from(pid).ok())
                .filter(|pid| *pid > 0)
                .ok_or_else(|| fail("not running".into()))
        })
    }

    /// Send `signal` (`"SIGHUP"`, ...) to the container's main process.
    pub fn signal<'a>(&'a self, signal: &'a str) -> Boxed<'a, Result<()>> {
        Box::pin(async move {
            let docker = connect().await?;
            let options = bollard::query_parameters::KillContainerOptions {
                signal: signal.to_owned(),
            };
            docker
                .kill_container(self.id(), Some(options))
                .await
                .map_err(|e| Error::Process {
                    what: format!("send {signal} to container {}", self.id()),
                    reason: e.to_string(),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_of_a_dead_or_reused_pid_is_an_orphan() {
        let me = Owner::me().unwrap();
        let label = |v: u64| Some(v.to_string());
        let alive = |pid: u64, start: Option<u64>| {
            owner_alive(label(pid).as_ref(), start.and_then(label).as_ref())
        };
        assert!(alive(me.pid.into(), Some(me.start)));
        assert!(!alive(me.pid.into(), Some(me.start + 1)), "a reused pid");
        assert!(alive(me.pid.into(), None), "an older harness's container");
        assert!(!alive(4_194_305, None));
        assert!(!owner_alive(Some(&"not a pid".into()), None));
        assert!(!owner_alive(None, None));
    }

    #[test]
    fn image_refs() {
        assert_eq!(
            ImageRef::parse("hashicorp/consul:1.20"),
            ImageRef {
                name: "hashicorp/consul".into(),
                tag: "1.20".into()
            }
        );
        assert_eq!(ImageRef::parse("consul").tag, "latest");
        assert_eq!(ImageRef::parse("reg:5000/consul").name, "reg:5000/consul");
        assert_eq!(ImageRef::parse("reg:5000/consul:1.21").tag, "1.21");
        assert!(ImageRef::local().is_local());
        assert_eq!(ImageRef::local().to_string(), provision::LOCAL_IMAGE);
    }
}
