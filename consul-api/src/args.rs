//! [`ConsulArgs`]: the connection flags of Consul's own CLI (`-http-addr`, `-ca-file`,
//! `-ca-path`, `-client-cert`, `-client-key`, `-tls-server-name`), for binaries built on
//! clap. Each falls back to its variable, and anything not given comes from
//! [`Config::from_env`], so flags and variables mean the same as for `consul`.

use std::path::PathBuf;

use crate::{client::Config, error::Result};

/// How to reach the Consul agent: flags over Consul's variables.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Consul (flags override Consul's own variables)")]
pub struct ConsulArgs {
    /// The agent's address: host:port, http://host:port or https://host:port
    /// (default 127.0.0.1:8500; CONSUL_HTTP_SSL=true makes it HTTPS too).
    #[arg(long, env = "CONSUL_HTTP_ADDR", value_name = "ADDRESS")]
    pub http_addr: Option<String>,

    /// PEM file of the CA(s) that signed the agent's HTTPS certificate (default: the
    /// system's roots).
    #[arg(long, env = "CONSUL_CACERT", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// Directory of PEM CA files, used when --ca-file is not given.
    #[arg(long, env = "CONSUL_CAPATH", value_name = "DIR")]
    pub ca_path: Option<PathBuf>,

    /// PEM client certificate, for an agent with verify_incoming (with --client-key).
    #[arg(long, env = "CONSUL_CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of --client-cert.
    #[arg(long, env = "CONSUL_CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,

    /// The name the agent's certificate must hold, when it is not the address's host.
    #[arg(long, env = "CONSUL_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

/// A clap command line's arguments at their defaults, whatever the environment holds (no
/// `env` fallback is read): what a launcher starts from before setting the ones it means.
pub fn defaults<T: clap::Parser>() -> std::result::Result<T, clap::Error> {
    let command = T::command().mut_args(|arg| arg.env(None));
    let name = command.get_name().to_owned();
    T::from_arg_matches(&command.try_get_matches_from([name])?)
}

impl ConsulArgs {
    /// These flags as a command line (`--http-addr ADDRESS`, ...), the ones given only: what
    /// parses back into these arguments.
    pub fn to_argv(&self) -> Vec<std::ffi::OsString> {
        let mut argv = Vec::new();
        let mut flag = |name: &str, value: Option<std::ffi::OsString>| {
            if let Some(value) = value {
                argv.push(name.into());
                argv.push(value);
            }
        };
        flag("--http-addr", self.http_addr.clone().map(Into::into));
        flag("--ca-file", self.ca_file.clone().map(Into::into));
        flag("--ca-path", self.ca_path.clone().map(Into::into));
        flag("--client-cert", self.client_cert.clone().map(Into::into));
        flag("--client-key", self.client_key.clone().map(Into::into));
        flag(
            "--tls-server-name",
            self.tls_server_name.clone().map(Into::into),
        );
        argv
    }

    /// [`Config::from_env`] (the token, `CONSUL_HTTP_SSL`, `CONSUL_HTTP_SSL_VERIFY`, ...)
    /// with these flags over it.
    pub fn config(&self) -> Result<Config> {
        let mut config = Config::from_env()?;
        let given = |s: &Option<String>| s.clone().filter(|v| !v.trim().is_empty());
        let path = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        if let Some(address) = given(&self.http_addr) {
            config.address = address;
        }
        let tls = &mut config.tls;
        tls.ca_file = path(&self.ca_file).or(tls.ca_file.take());
        tls.ca_path = path(&self.ca_path).or(tls.ca_path.take());
        tls.client_cert = path(&self.client_cert).or(tls.client_cert.take());
        tls.client_key = path(&self.client_key).or(tls.client_key.take());
        if let Some(name) = given(&self.tls_server_name) {
            tls.server_name = Some(crate::client::strip_port(&name));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        consul: ConsulArgs,
    }

    #[test]
    fn the_command_line_parses_back_into_the_arguments() {
        let given = ConsulArgs {
            http_addr: Some("https://127.0.0.9:8501".into()),
            ca_path: Some("/etc/consul/ca.d".into()),
            tls_server_name: Some("server.dc1.consul".into()),
            ..ConsulArgs::default()
        };
        let argv = given.to_argv();
        assert_eq!(argv.len(), 6, "{argv:?}");
        let back = Cli::try_parse_from(std::iter::once("x".into()).chain(argv)).unwrap();
        assert_eq!(format!("{:?}", back.consul), format!("{given:?}"));
        assert!(ConsulArgs::default().to_argv().is_empty());
    }

    #[test]
    fn flags_override_the_environment() {
        let cli = Cli::try_parse_from([
            "x",
            "--http-addr",
            "https://consul.internal:8501",
            "--ca-file",
            "/etc/consul/ca.pem",
            "--client-cert",
            "/etc/consul/client.pem",
            "--client-key",
            "/etc/consul/client-key.pem",
            "--tls-server-name",
            "server.dc1.consul:8501",
        ])
        .unwrap();
        let config = cli.consul.config().unwrap();
        assert_eq!(
            config.base_url().unwrap().as_str(),
            "https://consul.internal:8501/"
        );
        assert_eq!(
            config.tls.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/consul/ca.pem"))
        );
        assert_eq!(
            config.tls.client_key.as_deref(),
            Some(std::path::Path::new("/etc/consul/client-key.pem"))
        );
        assert_eq!(config.tls.server_name.as_deref(), Some("server.dc1.consul"));
    }
}
