//! Everything a server is started with, checked once, and the Consul registration it implies.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use consul_api::{AgentServiceCheck, AgentServiceRegistration, GoDuration};

use crate::{
    codec::DEFAULT_MAX_FRAME,
    error::{Error, Result},
};

/// The settings of one server. [`Config::default`] gives the seed article's service
/// (`servernode` / `servernode_1` on 9527, `/check` on 8080 every 5s, timeout 3s,
/// deregister after 30s), registered with the agent at `CONSUL_HTTP_ADDR`'s default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Service name (`Name`).
    pub name: String,
    /// Service ID (`ID`), unique on the agent.
    pub id: String,
    /// Address advertised to Consul (`Address`, and the host of the check URL).
    pub address: String,
    /// IP the echo and check ports listen on.
    pub bind: IpAddr,
    /// Echo port; 0 picks a free one (the registration carries the real one).
    pub port: u16,
    /// Port of the HTTP check; 0 picks a free one.
    pub check_port: u16,
    /// Path of the HTTP check.
    pub check_path: String,
    /// Service tags.
    pub tags: Vec<String>,
    /// Check interval.
    pub interval: Duration,
    /// Check timeout.
    pub timeout: Duration,
    /// `DeregisterCriticalServiceAfter` (Consul clamps it to at least 1m).
    pub deregister_after: Duration,
    /// Meta `reap-after` (see `consul_registry::reap_meta`): opts in to the reaper sidecar.
    pub reap_after: Option<Duration>,
    /// Largest frame accepted, in bytes, the newline not counted.
    pub max_frame: usize,
    /// Connections served at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// A connection that neither sends nor takes data for this long is closed.
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight frames before cutting connections.
    pub drain_timeout: Duration,
    /// Register with Consul (off for tests and benches that need no Consul).
    pub register: bool,
    /// Log every `/check` request at info level (debug otherwise).
    pub log_checks: bool,
    /// Where Consul is, and the ACL token.
    pub consul: consul_api::Config,
    /// A Consul KV key holding live settings (see [`crate::live`]); `None`: none.
    pub config_key: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "servernode".into(),
            id: "servernode_1".into(),
            address: "127.0.0.1".into(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 9527,
            check_port: 8080,
            check_path: "/check".into(),
            tags: vec!["servernode".into()],
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
            deregister_after: Duration::from_secs(30),
            reap_after: None,
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(5),
            register: true,
            log_checks: false,
            consul: consul_api::Config::default(),
            config_key: None,
        }
    }
}

impl Config {
    /// A server on free loopback ports that does not register: for tests and benches.
    pub fn local() -> Self {
        Config {
            port: 0,
            check_port: 0,
            register: false,
            ..Config::default()
        }
    }

    /// Reject settings that cannot work, with the flag to fix.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.name.trim().is_empty() {
            return bad("--name must not be empty".into());
        }
        if self.id.trim().is_empty() {
            return bad("--id must not be empty".into());
        }
        if self.address.trim().is_empty() || self.address.contains(['/', ' ']) {
            return bad(format!(
                "--address {:?} must be a bare host or IP",
                self.address
            ));
        }
        if !self.check_path.starts_with('/') || self.check_path.contains([' ', '?', '#']) {
            return bad(format!(
                "--check-path {:?} must be a path starting with /",
                self.check_path
            ));
        }
        if self.max_frame == 0 {
            return bad("--max-frame must be at least 1 byte".into());
        }
        if self.max_connections == 0 || self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return bad(format!(
                "--max-connections must be between 1 and {}",
                tokio::sync::Semaphore::MAX_PERMITS
            ));
        }
        for (flag, d) in [
            ("--interval", self.interval),
            ("--timeout", self.timeout),
            ("--idle-timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{flag} must be above 0"));
            }
        }
        if self
            .config_key
            .as_deref()
            .is_some_and(|k| k.trim_matches('/').is_empty())
        {
            return bad("--config-key must name a key".into());
        }
        if self.port != 0 && self.port == self.check_port {
            return bad(format!(
                "--port and --check-port must differ (both {})",
                self.port
            ));
        }
        Ok(())
    }

    /// The echo listener's address.
    pub fn echo_bind_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// The check listener's address.
    pub fn check_bind_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.check_port)
    }

    /// The URL the agent calls: `http://{address}:{check_port}{check_path}`.
    pub fn check_url(&self, check_port: u16) -> String {
        let host = match self.address.parse::<Ipv6Addr>() {
            Ok(v6) => format!("[{v6}]"),
            Err(_) => self.address.clone(),
        };
        format!("http://{host}:{check_port}{}", self.check_path)
    }

    /// The registration sent to the agent, for a server listening on `echo_port` and
    /// `check_port` (the real ports, when the configured ones were 0).
    pub fn registration(&self, echo_port: u16, check_port: u16) -> AgentServiceRegistration {
        let mut registration = AgentServiceRegistration {
            id: Some(self.id.clone()),
            name: self.name.clone(),
            tags: self.tags.clone(),
            port: Some(echo_port),
            address: Some(self.address.clone()),
            meta: BTreeMap::from([("version".to_owned(), crate::VERSION.to_owned())]),
            check: Some(AgentServiceCheck {
                check_id: Some(format!("service:{}", self.id)),
                http: Some(self.check_url(check_port)),
                method: Some("GET".into()),
                interval: Some(GoDuration(self.interval)),
                timeout: Some(GoDuration(self.timeout)),
                deregister_critical_service_after: Some(GoDuration(self.deregister_after)),
                ..Default::default()
            }),
            checks: Vec::new(),
        };
        if let Some(after) = self.reap_after {
            consul_registry::reap_meta::opt_in(&mut registration, after);
        }
        registration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_registration_as_consul_takes_it() {
        let json = serde_json::to_value(Config::default().registration(9527, 8080)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "ID": "servernode_1",
                "Name": "servernode",
                "Tags": ["servernode"],
                "Port": 9527,
                "Address": "127.0.0.1",
                "Meta": {"version": crate::VERSION},
                "Check": {
                    "CheckID": "service:servernode_1",
                    "HTTP": "http://127.0.0.1:8080/check",
                    "Method": "GET",
                    "Interval": "5s",
                    "Timeout": "3s",
                    "DeregisterCriticalServiceAfter": "30s"
                }
            })
        );
    }

    #[test]
    fn check_url_brackets_ipv6_and_uses_the_real_port() {
        let config = Config {
            address: "::1".into(),
            check_path: "/health/check".into(),
            ..Config::local()
        };
        assert_eq!(config.check_url(4242), "http://[::1]:4242/health/check");
        let config = Config {
            address: "echo.internal".into(),
            ..Config::local()
        };
        assert_eq!(config.check_url(80), "http://echo.internal:80/check");
    }

    #[test]
    fn rejects_settings_that_cannot_work() {
        assert!(Config::default().validate().is_ok());
        let cases = [
            Config {
                check_path: "check".into(),
                ..Config::default()
            },
            Config {
                max_frame: 0,
                ..Config::default()
            },
            Config {
                max_connections: 0,
                ..Config::default()
            },
            Config {
                interval: Duration::ZERO,
                ..Config::default()
            },
            Config {
                id: " ".into(),
                ..Config::default()
            },
            Config {
                address: "http://x".into(),
                ..Config::default()
            },
            Config {
                check_port: 9527,
                ..Config::default()
            },
        ];
        for config in cases {
            let err = config.validate().unwrap_err();
            assert!(err.to_string().contains("--"), "names the flag: {err}");
        }
    }
}
