//! How a test agent is started, whatever runs it: a dev-mode agent on free loopback ports with
//! a unique node name, optionally with ACLs on and `default_policy = "deny"`. With host
//! networking several such agents run side by side, and each reaches HTTP checks served at
//! 127.0.0.1 by processes on the host.

use std::net::{TcpListener, UdpSocket};

use crate::error::{Error, Result};

/// Which generation of Consul's command line and configuration to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Before 1.11 (this project's own 1.8.7): `acl.tokens.master`, no gRPC TLS port.
    Legacy,
    /// 1.11 and later (`hashicorp/consul:1.2x`): `acl.tokens.initial_management`, and the
    /// dev-mode gRPC TLS port must be turned off so parallel agents do not clash.
    Modern,
}

impl Flavor {
    /// Guess from an image tag or version string: `1.8.7-bullseye` is legacy, `1.20` or
    /// `latest` modern. `TESTBED_CONSUL_FLAVOR=legacy|modern` overrides the guess.
    pub fn guess(version_or_tag: &str) -> Result<Flavor> {
        if let Ok(forced) = std::env::var("TESTBED_CONSUL_FLAVOR") {
            return match forced.as_str() {
                "legacy" => Ok(Flavor::Legacy),
                "modern" => Ok(Flavor::Modern),
                other => Err(Error::Invalid(format!(
                    "TESTBED_CONSUL_FLAVOR={other:?}: use legacy (Consul < 1.11) or modern"
                ))),
            };
        }
        let trimmed = version_or_tag.trim_start_matches('v');
        let mut parts = trimmed.split(['.', '-']);
        let major = parts.next().and_then(|p| p.parse::<u32>().ok());
        let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
        Ok(match (major, minor) {
            (Some(1), Some(minor)) if minor < 11 => Flavor::Legacy,
            (Some(0), _) => Flavor::Legacy,
            _ => Flavor::Modern,
        })
    }
}

/// The loopback ports one agent listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub http: u16,
    pub serf_lan: u16,
    pub serf_wan: u16,
    pub server: u16,
}

impl Ports {
    /// Four ports free right now on 127.0.0.1 (TCP, and UDP for the Serf ones).
    pub fn pick() -> Result<Ports> {
        let mut held = Vec::new();
        let mut take = |udp_too: bool| -> Result<u16> {
            for _ in 0..50 {
                let tcp = TcpListener::bind("127.0.0.1:0")?;
                let port = tcp.local_addr()?.port();
                if udp_too && UdpSocket::bind(("127.0.0.1", port)).is_err() {
                    continue;
                }
                held.push(tcp);
                return Ok(port);
            }
            Err(Error::Invalid("cannot find a free loopback port".into()))
        };
        Ok(Ports {
            http: take(false)?,
            serf_lan: take(true)?,
            serf_wan: take(true)?,
            server: take(false)?,
        })
    }
}

/// Everything that defines one agent's command line.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub node_name: String,
    pub ports: Ports,
    pub flavor: Flavor,
    /// With ACLs: the management token (also used as the agent's own token).
    pub acl_management_token: Option<String>,
}

impl AgentSpec {
    /// The arguments after `consul`.
    pub fn args(&self) -> Vec<String> {
        let p = self.ports;
        let mut args: Vec<String> = [
            "agent",
            "-dev",
            "-node",
            &self.node_name,
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-http-port",
            &p.http.to_string(),
            "-dns-port",
            "-1",
            "-grpc-port",
            "-1",
            "-serf-lan-port",
            &p.serf_lan.to_string(),
            "-serf-wan-port",
            &p.serf_wan.to_string(),
            "-server-port",
            &p.server.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.flavor == Flavor::Modern {
            args.extend(["-hcl".into(), "ports { grpc_tls = -1 }".into()]);
        }
        if let Some(token) = &self.acl_management_token {
            let key = match self.flavor {
                Flavor::Legacy => "master",
                Flavor::Modern => "initial_management",
            };
            args.extend([
                "-hcl".into(),
                format!(
                    "acl {{ enabled = true default_policy = \"deny\" down_policy = \"extend-cache\" \
                     enable_token_persistence = false tokens {{ {key} = \"{token}\" agent = \"{token}\" }} }}"
                ),
            ]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavor_from_tags() {
        // SAFETY of the test: the variable is not set in the test environment.
        if std::env::var("TESTBED_CONSUL_FLAVOR").is_ok() {
            return;
        }
        assert_eq!(Flavor::guess("1.8.7-bullseye").unwrap(), Flavor::Legacy);
        assert_eq!(Flavor::guess("1.10.12").unwrap(), Flavor::Legacy);
        assert_eq!(Flavor::guess("1.20").unwrap(), Flavor::Modern);
        assert_eq!(Flavor::guess("1.21.3-ent").unwrap(), Flavor::Modern);
        assert_eq!(Flavor::guess("latest").unwrap(), Flavor::Modern);
    }

    #[test]
    fn args_pin_every_port_to_loopback() {
        let ports = Ports::pick().unwrap();
        let all = [ports.http, ports.serf_lan, ports.serf_wan, ports.server];
        let mut sorted = all.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 4, "distinct ports: {all:?}");
        let spec = AgentSpec {
            node_name: "n1".into(),
            ports,
            flavor: Flavor::Legacy,
            acl_management_token: Some("root-token".into()),
        };
        let args = spec.args().join(" ");
        assert!(args.starts_with("agent -dev -node n1 -bind 127.0.0.1 -client 127.0.0.1"));
        assert!(args.contains(&format!("-http-port {}", ports.http)));
        assert!(args.contains("-dns-port -1"));
        assert!(args.contains("master = \"root-token\""));
        assert!(!args.contains("grpc_tls"));
        let modern = AgentSpec {
            flavor: Flavor::Modern,
            ..spec
        };
        let args = modern.args().join(" ");
        assert!(args.contains("grpc_tls = -1"));
        assert!(args.contains("initial_management = \"root-token\""));
    }
}
