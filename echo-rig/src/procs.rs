//! Echo servers and clients as real child processes ([`ChildProcess`]), so the testbed and the
//! benches can SIGKILL, SIGTERM, SIGSTOP and SIGCONT them exactly as an operator or a crash
//! would.
//!
//! Children run the same CLI users run, with command lines written from the CLIs' own
//! argument types ([`echo_server::cli::Args`], [`echo_client::cli::Args`]), never from
//! strings. The testbed binary embeds both CLIs (`testbed echo-server ...`, `testbed
//! echo-client ...`), so one `cargo run -p testbed` builds everything an experiment needs; a
//! [`Launcher`] names the binary and the subcommand prefix. Consul's address, token and TLS
//! settings reach the child as Consul's variables ([`consul_command`]), never on its command
//! line.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use consul_api::GoDuration;
use consul_harness::process::{ChildProcess, consul_command, loopback_ip, two_free_ports_on};
use tokio::process::Command;

use consul_harness::{Error, Result};

/// How to start the echo CLIs: a program and the arguments before the subcommand's own.
#[derive(Debug, Clone)]
pub struct Launcher {
    program: PathBuf,
    server_prefix: Vec<OsString>,
    client_prefix: Vec<OsString>,
}

impl Launcher {
    /// The testbed binary at `bin`: `bin echo-server ...`, `bin echo-client ...`. Integration
    /// tests pass `env!("CARGO_BIN_EXE_testbed")`.
    pub fn testbed(bin: impl Into<PathBuf>) -> Launcher {
        Launcher {
            program: bin.into(),
            server_prefix: vec!["echo-server".into()],
            client_prefix: vec!["echo-client".into()],
        }
    }

    /// The running testbed binary itself.
    pub fn current_exe() -> Result<Launcher> {
        Ok(Launcher::testbed(std::env::current_exe()?))
    }

    /// Start another subcommand of the binary (a sidecar: `testbed reaper ...`) with `args`,
    /// Consul's settings passed as Consul's variables.
    pub fn spawn_subcommand(
        &self,
        subcommand: &str,
        consul: &consul_api::Config,
        args: &[String],
    ) -> Result<ChildProcess> {
        let mut cmd = self.command(&[subcommand.into()], consul);
        cmd.args(args);
        ChildProcess::spawn(cmd, subcommand.to_owned())
    }

    fn command(&self, prefix: &[OsString], consul: &consul_api::Config) -> Command {
        let mut cmd = consul_command(&self.program, consul);
        cmd.args(prefix).env("RUST_LOG", child_log_filter());
        cmd
    }
}

/// The children's log filter: the user's `RUST_LOG`, but never so quiet that the lines the
/// testbed waits on ("echo-server listening", ...) are hidden.
fn child_log_filter() -> String {
    match std::env::var("RUST_LOG") {
        Ok(user) if !user.trim().is_empty() => {
            let mut filter = user;
            for target in [
                "echo_server",
                "echo_client",
                "consul_registry",
                "consul_reaper",
            ] {
                if !filter.contains(target) {
                    filter.push_str(&format!(",{target}=info"));
                }
            }
            filter
        }
        _ => {
            "warn,echo_server=info,echo_client=info,consul_registry=info,consul_reaper=info".into()
        }
    }
}

/// Everything an echo server is started with: its own arguments, and where Consul is.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// The echo-server's arguments (its command line is written from them): `bind` and
    /// `address` are its own loopback address (see [`loopback_ip`]), `deregister_after` is
    /// raised by Consul to 1 minute if under it.
    pub args: echo_server::cli::Args,
    /// Where Consul is, and the token to use.
    pub consul: consul_api::Config,
}

impl ServerSpec {
    /// The seed article's service (`servernode` / `servernode_1`, check every 5s with a 3s
    /// timeout, deregister after 30s), on free ports of its own loopback address.
    pub fn seed(consul: consul_api::Config) -> Result<ServerSpec> {
        let mut args = echo_server::cli::Args::defaults()
            .map_err(|e| Error::Setting(format!("echo-server's defaults: {e}")))?;
        args.name = "servernode".into();
        args.id = "servernode_1".into();
        args.interval = GoDuration::from_secs(5);
        args.timeout = GoDuration::from_secs(3);
        args.deregister_after = GoDuration::from_secs(30);
        ServerSpec { args, consul }.on_address(loopback_ip())
    }

    /// This spec on another loopback address (a cluster node's, so that the server binds
    /// and advertises its node's address), with free ports there.
    pub fn on_address(mut self, ip: Ipv4Addr) -> Result<Self> {
        self.args.bind = ip.into();
        self.args.address = ip.to_string();
        (self.args.port, self.args.check_port) = two_free_ports_on(ip)?;
        Ok(self)
    }

    /// This spec with another service ID.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.args.id = id.into();
        self
    }

    /// This spec under another service name and ID.
    pub fn named(mut self, name: impl Into<String>, id: impl Into<String>) -> Self {
        self.args.name = name.into();
        self.args.id = id.into();
        self
    }

    /// This spec with another check: its `Interval`, `Timeout` and
    /// `DeregisterCriticalServiceAfter`.
    pub fn with_check(
        mut self,
        interval: Duration,
        timeout: Duration,
        deregister_after: Duration,
    ) -> Self {
        self.args.interval = GoDuration(interval);
        self.args.timeout = GoDuration(timeout);
        self.args.deregister_after = GoDuration(deregister_after);
        self
    }

    /// The loopback address it listens on and registers.
    pub fn ip(&self) -> IpAddr {
        self.args.bind
    }

    /// Where the server echoes.
    pub fn echo_addr(&self) -> SocketAddr {
        SocketAddr::new(self.args.bind, self.args.port)
    }

    /// The URL of its `/check`.
    pub fn check_url(&self) -> String {
        format!(
            "http://{}{}",
            SocketAddr::new(self.args.bind, self.args.check_port),
            self.args.check_path
        )
    }

    /// Its check interval.
    pub fn interval(&self) -> Duration {
        self.args.interval.as_duration()
    }
}

/// An echo server process.
#[derive(Debug)]
pub struct ServerProcess {
    /// What it was started with (after [`ServerProcess::spawn`], the ports it bound).
    pub spec: ServerSpec,
    /// The child itself: signals, output, exit.
    pub process: ChildProcess,
}

impl ServerProcess {
    /// Start a server without waiting for anything (for servers expected to exit at once).
    pub fn start(launcher: &Launcher, spec: ServerSpec) -> Result<ServerProcess> {
        let mut cmd = launcher.command(&launcher.server_prefix, &spec.consul);
        cmd.args(spec.args.to_argv());
        let process = ChildProcess::spawn(cmd, format!("echo-server {}", spec.args.id))?;
        Ok(ServerProcess { spec, process })
    }

    /// Start a server and wait until it says it listens. Ports are picked free but another
    /// process may take one before the server binds it: then the server exits saying so, and
    /// it is started again on fresh ports (at most three times).
    pub async fn spawn(launcher: &Launcher, mut spec: ServerSpec) -> Result<ServerProcess> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut started = ServerProcess::start(launcher, spec.clone())?;
            let failure = match started
                .process
                .wait_for_line("echo-server listening", Duration::from_secs(30))
                .await
            {
                Ok(_) => return Ok(started),
                Err(not_said) => not_said,
            };
            let tail: Vec<String> = started
                .process
                .output()
                .lines()
                .iter()
                .rev()
                .take(5)
                .rev()
                .map(|l| l.text.clone())
                .collect();
            let clash = tail.iter().any(|l| l.contains("cannot listen"));
            if clash && attempt < 3 {
                tracing::info!(id = %spec.args.id, "a port was taken before the server bound it; new ports");
                (spec.args.port, spec.args.check_port) = two_free_ports_on(spec.ip())?;
                continue;
            }
            return Err(Error::Process {
                what: format!("echo-server {}", spec.args.id),
                reason: format!(
                    "{failure} before saying it listens, on {}: {}",
                    spec.echo_addr(),
                    tail.join(" | ")
                ),
            });
        }
    }
}

/// An echo client process.
#[derive(Debug)]
pub struct ClientProcess {
    /// The child itself: signals, output, exit.
    pub process: ChildProcess,
}

impl ClientProcess {
    /// Start `echo-client` with `args`.
    pub fn spawn(
        launcher: &Launcher,
        consul: &consul_api::Config,
        args: &echo_client::cli::Args,
    ) -> Result<ClientProcess> {
        let mut cmd = launcher.command(&launcher.client_prefix, consul);
        cmd.args(args.to_argv());
        Ok(ClientProcess {
            process: ChildProcess::spawn(cmd, "echo-client".into())?,
        })
    }
}

/// The echo-client's arguments at their defaults (no environment read), for
/// [`ClientProcess::spawn`].
pub fn client_args() -> Result<echo_client::cli::Args> {
    echo_client::cli::Args::defaults()
        .map_err(|e| Error::Setting(format!("echo-client's defaults: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(argv: &[OsString], flag: &str) -> Option<String> {
        let at = argv.iter().position(|a| a == flag)?;
        argv.get(at + 1).map(|v| v.to_string_lossy().into_owned())
    }

    #[test]
    fn a_seed_server_runs_the_seed_service_on_an_address_of_its_own() {
        let spec = ServerSpec::seed(consul_api::Config::default()).unwrap();
        assert_ne!(spec.ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
        assert_ne!(spec.args.port, spec.args.check_port);
        let argv = spec.args.to_argv();
        let ip = spec.ip().to_string();
        assert_eq!(value_of(&argv, "--bind"), Some(ip.clone()));
        assert_eq!(value_of(&argv, "--address"), Some(ip.clone()));
        assert_eq!(value_of(&argv, "--name").as_deref(), Some("servernode"));
        assert_eq!(value_of(&argv, "--id").as_deref(), Some("servernode_1"));
        assert_eq!(value_of(&argv, "--interval").as_deref(), Some("5s"));
        assert_eq!(value_of(&argv, "--timeout").as_deref(), Some("3s"));
        assert_eq!(
            value_of(&argv, "--deregister-after").as_deref(),
            Some("30s")
        );
        assert!(
            !argv.iter().any(|a| a == "--http-addr"),
            "Consul's settings go as variables: {argv:?}"
        );
        assert_eq!(
            spec.check_url(),
            format!("http://{ip}:{}/check", spec.args.check_port)
        );
        assert_eq!(spec.echo_addr(), SocketAddr::new(spec.ip(), spec.args.port));
    }

    #[test]
    fn a_spec_moves_and_changes_its_check() {
        let spec = ServerSpec::seed(consul_api::Config::default())
            .unwrap()
            .named("other", "other_2")
            .on_address(Ipv4Addr::new(127, 0, 0, 9))
            .unwrap()
            .with_check(
                Duration::from_millis(250),
                Duration::from_millis(100),
                Duration::from_secs(90),
            );
        let argv = spec.args.to_argv();
        assert_eq!(value_of(&argv, "--bind").as_deref(), Some("127.0.0.9"));
        assert_eq!(value_of(&argv, "--name").as_deref(), Some("other"));
        assert_eq!(value_of(&argv, "--id").as_deref(), Some("other_2"));
        assert_eq!(value_of(&argv, "--interval").as_deref(), Some("250ms"));
        assert_eq!(
            value_of(&argv, "--deregister-after").as_deref(),
            Some("1m30s")
        );
        assert_eq!(spec.interval(), Duration::from_millis(250));
    }

    #[test]
    fn client_arguments_start_from_the_clis_defaults() {
        let args = client_args().unwrap();
        assert_eq!(args.service, "servernode");
        assert_eq!(args.count, 10);
        assert!(args.consul.http_addr.is_none());
    }
}
