//! The command line: every setting as a flag or an `ECHO_*` environment variable (Consul's
//! address, token and TLS settings as for Consul's own CLI: `--http-addr` / `CONSUL_HTTP_ADDR`,
//! `--ca-file` / `CONSUL_CACERT`, ..., `CONSUL_HTTP_TOKEN`), and [`run`], which the
//! `echo-server` binary and `testbed echo-server` both call.

use std::{ffi::OsString, net::IpAddr};

use clap::Parser;
use consul_api::GoDuration;

use crate::{config::Config, error::Result, live::LogLevel, server::Server, shutdown};

/// A TCP echo service (newline-delimited frames, echoed byte-exact) that registers itself
/// with the local Consul agent, serves an HTTP check, re-registers when its entry disappears
/// and deregisters on SIGINT/SIGTERM (or SIGHUP). SIGUSR1 flips /check between 200 and a
/// forced 503.
///
/// Consul's address and TLS settings come from the flags below or Consul's own variables
/// (CONSUL_HTTP_ADDR, CONSUL_HTTP_SSL, CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT,
/// CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME, CONSUL_HTTP_SSL_VERIFY); the ACL token from
/// CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE. Durations are written as Go writes them: 5s,
/// 250ms, 1m30s.
#[derive(Debug, Clone, Parser)]
#[command(name = "echo-server", version)]
pub struct Args {
    /// Service name registered in Consul.
    #[arg(long, env = "ECHO_NAME", default_value = "servernode")]
    pub name: String,

    /// Service ID, unique on the agent.
    #[arg(long, env = "ECHO_ID", default_value = "servernode_1")]
    pub id: String,

    /// Echo port.
    #[arg(long, env = "ECHO_PORT", default_value_t = 9527)]
    pub port: u16,

    /// Port of the HTTP check.
    #[arg(long, env = "ECHO_CHECK_PORT", default_value_t = 8080)]
    pub check_port: u16,

    /// Path of the HTTP check.
    #[arg(long, env = "ECHO_CHECK_PATH", default_value = "/check")]
    pub check_path: String,

    /// Check interval.
    #[arg(long, env = "ECHO_INTERVAL", default_value = "5s")]
    pub interval: GoDuration,

    /// Check timeout.
    #[arg(long, env = "ECHO_TIMEOUT", default_value = "3s")]
    pub timeout: GoDuration,

    /// DeregisterCriticalServiceAfter (Consul raises anything below 1m to 1m).
    #[arg(long, env = "ECHO_DEREGISTER_AFTER", default_value = "30s")]
    pub deregister_after: GoDuration,

    /// Opt in to a consul-reaper sidecar: Meta reap-after, how long the check may stay
    /// critical before the reaper deregisters the service (no 1m floor, no 30s grid).
    #[arg(long, env = "ECHO_REAP_AFTER", value_name = "DURATION")]
    pub reap_after: Option<GoDuration>,

    /// Address advertised to Consul, also the host of the check URL.
    #[arg(long, env = "ECHO_ADDRESS", default_value = "127.0.0.1")]
    pub address: String,

    /// IP the echo and check ports listen on.
    #[arg(long, env = "ECHO_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Service tag; repeat for several (ECHO_TAGS takes a comma-separated list).
    #[arg(
        long = "tag",
        env = "ECHO_TAGS",
        value_delimiter = ',',
        default_value = "servernode"
    )]
    pub tags: Vec<String>,

    /// Largest frame, in bytes (newline not counted); a longer one gets an error line and
    /// its connection is closed.
    #[arg(long, env = "ECHO_MAX_FRAME", default_value_t = crate::codec::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,

    /// Connections served at once; more wait in the accept backlog.
    #[arg(long, env = "ECHO_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Close a connection that neither sends nor takes data for this long.
    #[arg(long, env = "ECHO_IDLE_TIMEOUT", default_value = "5m")]
    pub idle_timeout: GoDuration,

    /// On shutdown, how long in-flight frames may take before connections are cut.
    #[arg(long, env = "ECHO_DRAIN_TIMEOUT", default_value = "5s")]
    pub drain_timeout: GoDuration,

    /// Do not register with Consul (echo and /check only).
    #[arg(long, env = "ECHO_NO_REGISTER")]
    pub no_register: bool,

    /// Log every /check request (peer, Host, User-Agent, status) at info level.
    #[arg(long, env = "ECHO_LOG_CHECKS")]
    pub log_checks: bool,

    /// A Consul KV key whose JSON sets, while the server runs, the frame limit, idle
    /// timeout, connection cap, maintenance mode and log level: {"max_frame": 1024,
    /// "idle_timeout": "30s", "max_connections": 100, "maintenance": false, "log_level":
    /// "info"}. A change that is invalid, or names a setting that only a restart changes,
    /// is rejected and the settings in force stay.
    #[arg(long, env = "ECHO_CONFIG_KEY", value_name = "KEY")]
    pub config_key: Option<String>,

    /// Where the Consul agent is and how to speak TLS to it.
    #[command(flatten)]
    pub consul: consul_api::ConsulArgs,
}

impl Args {
    /// Every flag at its default, whatever the environment holds (no `ECHO_*` or `CONSUL_*`
    /// variable is read): the arguments a launcher starts from.
    pub fn defaults() -> std::result::Result<Args, clap::Error> {
        consul_api::args::defaults()
    }

    /// These arguments as the command line that parses back into them, every setting
    /// written out (so that no `ECHO_*` variable of the child's environment overrides one);
    /// Consul's flags only where given.
    pub fn to_argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: String| {
            argv.push(name.into());
            argv.push(value.into());
        };
        flag("--name", self.name.clone());
        flag("--id", self.id.clone());
        flag("--port", self.port.to_string());
        flag("--check-port", self.check_port.to_string());
        flag("--check-path", self.check_path.clone());
        flag("--interval", self.interval.to_string());
        flag("--timeout", self.timeout.to_string());
        flag("--deregister-after", self.deregister_after.to_string());
        if let Some(reap_after) = self.reap_after {
            flag("--reap-after", reap_after.to_string());
        }
        if let Some(key) = &self.config_key {
            flag("--config-key", key.clone());
        }
        flag("--address", self.address.clone());
        flag("--bind", self.bind.to_string());
        for tag in &self.tags {
            flag("--tag", tag.clone());
        }
        flag("--max-frame", self.max_frame.to_string());
        flag("--max-connections", self.max_connections.to_string());
        flag("--idle-timeout", self.idle_timeout.to_string());
        flag("--drain-timeout", self.drain_timeout.to_string());
        if self.no_register {
            argv.push("--no-register".into());
        }
        if self.log_checks {
            argv.push("--log-checks".into());
        }
        argv.extend(self.consul.to_argv());
        argv
    }

    /// The server settings these arguments give, with Consul's token (and what no flag
    /// gives) from Consul's variables.
    pub fn config(&self) -> Result<Config> {
        Ok(Config {
            name: self.name.clone(),
            id: self.id.clone(),
            address: self.address.clone(),
            bind: self.bind,
            port: self.port,
            check_port: self.check_port,
            check_path: self.check_path.clone(),
            tags: self.tags.clone(),
            interval: self.interval.as_duration(),
            timeout: self.timeout.as_duration(),
            deregister_after: self.deregister_after.as_duration(),
            reap_after: self.reap_after.map(GoDuration::as_duration),
            max_frame: self.max_frame,
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout.as_duration(),
            drain_timeout: self.drain_timeout.as_duration(),
            register: !self.no_register,
            log_checks: self.log_checks,
            consul: self.consul.config()?,
            config_key: self.config_key.clone(),
        })
    }
}

/// Run the server the arguments describe until SIGINT or SIGTERM, then shut down in order.
/// `Ok` after a clean shutdown; an error (for a non-zero exit) when it cannot start or
/// Consul refuses it for good.
pub async fn run(args: Args) -> Result<()> {
    run_with(args, None).await
}

/// [`run`], with a way to change the process's log level (from the live settings of
/// `--config-key`): the `echo-server` binary's logging is built reloadable ([`init_logging`]).
pub async fn run_with(args: Args, log_level: Option<LogLevel>) -> Result<()> {
    let config = args.config()?;
    // Handlers first: from here on a signal is a clean shutdown, never a kill.
    let terminate = shutdown::terminate()?;
    let mut server = Server::bind(config).await?;
    if let Some(log_level) = log_level {
        server = server.with_log_level(log_level);
    }
    let toggler = shutdown::toggle_health_on_sigusr1(server.health())?;
    let config = server.config();
    tracing::info!(
        version = crate::VERSION,
        id = %config.id,
        name = %config.name,
        consul = %config.consul.address,
        https = config.consul.base_url().is_ok_and(|u| u.scheme() == "https"),
        acl_token = if config.consul.token.is_some() { "set" } else { "none" },
        register = config.register,
        "echo-server starting"
    );
    let result = server.run(terminate).await;
    toggler.abort();
    result
}

/// Log to stderr with `filter` (tracing's `EnvFilter`), the filter reloadable: the
/// [`LogLevel`] that changes it, for [`run_with`].
pub fn init_logging(filter: tracing_subscriber::EnvFilter, ansi: bool) -> LogLevel {
    use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt};
    let initial = filter.to_string();
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        )
        .init();
    LogLevel::new(initial, move |directives: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(directives)
            .map_err(|e| format!("{directives:?} is not a log filter: {e}"))?;
        handle
            .reload(filter)
            .map_err(|e| format!("cannot reload the log filter: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::CommandFactory;

    use super::*;

    #[test]
    fn seed_defaults() {
        let args = Args::try_parse_from(["echo-server"]).unwrap();
        let config = args.config().unwrap();
        let seed = Config::default();
        assert_eq!(config.name, "servernode");
        assert_eq!(config.id, "servernode_1");
        assert_eq!((config.port, config.check_port), (9527, 8080));
        assert_eq!(config.interval, Duration::from_secs(5));
        assert_eq!(config.timeout, Duration::from_secs(3));
        assert_eq!(config.deregister_after, Duration::from_secs(30));
        assert_eq!(config.tags, seed.tags);
        assert_eq!(config.check_path, seed.check_path);
        assert_eq!(config.max_frame, seed.max_frame);
        assert_eq!(config.max_connections, seed.max_connections);
        assert_eq!(config.idle_timeout, seed.idle_timeout);
        assert_eq!(config.drain_timeout, seed.drain_timeout);
        assert!(config.register);
    }

    #[test]
    fn the_testbed_command_line_parses() {
        let args = Args::try_parse_from([
            "echo-server",
            "--name",
            "servernode",
            "--id",
            "servernode_7",
            "--port",
            "19527",
            "--check-port",
            "18080",
            "--interval",
            "1s",
            "--timeout",
            "500ms",
            "--deregister-after",
            "1m30s",
            "--tag",
            "a",
            "--tag",
            "b",
            "--no-register",
        ])
        .unwrap();
        let config = args.config().unwrap();
        assert_eq!(config.id, "servernode_7");
        assert_eq!(config.interval, Duration::from_secs(1));
        assert_eq!(config.timeout, Duration::from_millis(500));
        assert_eq!(config.deregister_after, Duration::from_secs(90));
        assert_eq!(config.tags, ["a", "b"]);
        assert!(!config.register);
    }

    #[test]
    fn the_command_line_parses_back_into_the_arguments() {
        let mut given = Args::defaults().unwrap();
        given.name = "elsewhere".into();
        given.interval = GoDuration::from_secs(90);
        given.reap_after = Some(GoDuration(Duration::from_millis(1500)));
        given.tags = vec!["a".into(), "b".into()];
        given.no_register = true;
        given.log_checks = true;
        given.config_key = Some("echo/live".into());
        given.consul.http_addr = Some("127.0.0.9:8500".into());
        let argv = given.to_argv();
        let back = Args::try_parse_from(std::iter::once("echo-server".into()).chain(argv.clone()))
            .unwrap();
        assert_eq!(format!("{back:?}"), format!("{given:?}"));
        // Every flag is written: a flag added to Args and forgotten in to_argv fails here.
        for arg in Args::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let unset_consul = [
                "ca-file",
                "ca-path",
                "client-cert",
                "client-key",
                "tls-server-name",
            ];
            if matches!(long, "help" | "version") || unset_consul.contains(&long) {
                continue;
            }
            assert!(
                argv.iter()
                    .any(|a| a.to_str() == Some(&format!("--{long}"))),
                "--{long} is not written"
            );
        }
    }

    #[test]
    fn the_defaults_are_the_flags_defaults() {
        let defaults = Args::defaults().unwrap();
        assert_eq!(defaults.name, "servernode");
        assert_eq!(defaults.port, 9527);
        assert_eq!(defaults.tags, ["servernode"]);
        assert!(defaults.consul.http_addr.is_none());
        assert!(!defaults.no_register);
    }

    #[test]
    fn humantime_durations_are_refused_with_the_go_form() {
        let err = Args::try_parse_from(["echo-server", "--interval", "1m 30s"]).unwrap_err();
        assert!(err.to_string().contains("1m30s"), "{err}");
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        let cmd = Args::command();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg.get_env().unwrap_or_else(|| panic!("--{id} has no env"));
            let env = env.to_string_lossy();
            // Ours are ECHO_*; Consul's connection settings keep Consul's own names.
            assert!(
                env.starts_with("ECHO_") || env.starts_with("CONSUL_"),
                "{id}: {env:?}"
            );
        }
    }
}
