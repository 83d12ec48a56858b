//! How a test agent is started, whatever runs it: a dev-mode agent on free loopback ports with
//! a unique node name, optionally with ACLs on and `default_policy = "deny"`; or a member of a
//! real cluster (server or client, see [`AgentMode`]) on its own loopback address with
//! Consul's default ports. With host networking several such agents run side by side, and
//! each reaches HTTP checks served on loopback by processes on the host.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, TcpListener, UdpSocket},
    path::PathBuf,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use consul_api::GoDuration;

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
                other => Err(Error::Setting(format!(
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
    /// The HTTP API (`-http-port`), what clients and tests talk to.
    pub http: u16,
    /// Serf LAN gossip (`-serf-lan-port`), TCP and UDP.
    pub serf_lan: u16,
    /// Serf WAN gossip between datacenters (`-serf-wan-port`), TCP and UDP.
    pub serf_wan: u16,
    /// Server RPC (`-server-port`).
    pub server: u16,
    /// The DNS interface (`-dns-port`), UDP and TCP.
    pub dns: u16,
}

impl Ports {
    /// Consul's own defaults (HTTP 8500, Serf LAN 8301, Serf WAN 8302, server RPC 8300, DNS
    /// 8600), what a cluster member on its own loopback address listens on.
    pub const CONSUL_DEFAULTS: Ports = Ports {
        http: 8500,
        serf_lan: 8301,
        serf_wan: 8302,
        server: 8300,
        dns: 8600,
    };

    /// Five ports free right now on 127.0.0.1 (TCP, and UDP for the Serf and DNS ones).
    ///
    /// They are taken below the kernel's ephemeral range: once we let go of them, nothing
    /// takes them implicitly (an outgoing connection's local port, another program's bind
    /// to port 0), so a stopped agent can start again on the same HTTP port. They stay
    /// reserved in this process until [`Ports::release`]: another agent started meanwhile
    /// (tests run side by side) never picks the ports of one that is stopped for a moment.
    pub fn pick() -> Result<Ports> {
        Ports::pick_avoiding(None)
    }

    /// New ports for the agent's own traffic (Serf, RPC), keeping `http`: what its clients
    /// already know.
    pub fn repick_keeping_http(http: u16) -> Result<Ports> {
        let fresh = Ports::pick_avoiding(Some(http))?;
        release(&[fresh.http]);
        Ok(Ports { http, ..fresh })
    }

    /// Give the ports back to this process's pool (the agent that owned them is gone).
    pub fn release(&self) {
        release(&[
            self.http,
            self.serf_lan,
            self.serf_wan,
            self.server,
            self.dns,
        ]);
    }

    /// Give back the Serf and RPC ports only (the HTTP port stays with its agent).
    pub fn release_all_but_http(&self) {
        release(&[self.serf_lan, self.serf_wan, self.server, self.dns]);
    }

    fn pick_avoiding(avoid: Option<u16>) -> Result<Ports> {
        let range = below_ephemeral_range();
        let mut held = Vec::new();
        let mut owned = OWNED.lock().unwrap_or_else(PoisonError::into_inner);
        let mut take = |udp_too: bool| -> Result<u16> {
            for _ in 0..200 {
                let candidate = range.as_ref().map_or(0, |r| rand::random_range(r.clone()));
                if owned.contains(&candidate) {
                    continue;
                }
                let Ok(tcp) = TcpListener::bind(("127.0.0.1", candidate)) else {
                    continue;
                };
                let port = tcp.local_addr()?.port();
                if Some(port) == avoid
                    || owned.contains(&port)
                    || (udp_too && UdpSocket::bind(("127.0.0.1", port)).is_err())
                {
                    continue;
                }
                held.push(tcp);
                owned.insert(port);
                return Ok(port);
            }
            Err(Error::NoFreePort {
                below: range.as_ref().map_or(0, |r| r.end),
            })
        };
        Ok(Ports {
            http: take(false)?,
            serf_lan: take(true)?,
            serf_wan: take(true)?,
            server: take(false)?,
            dns: take(true)?,
        })
    }
}

/// The agent ports handed out in this process and not yet released.
static OWNED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

fn release(ports: &[u16]) {
    let mut owned = OWNED.lock().unwrap_or_else(PoisonError::into_inner);
    for port in ports {
        owned.remove(port);
    }
}

/// Ports from 10000 up to the start of the kernel's ephemeral range (Linux's
/// `ip_local_port_range`, 32768 by default); `None` (any free port) where that range is
/// unknown or leaves too little room below it.
fn below_ephemeral_range() -> Option<std::ops::Range<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = text.split_whitespace().next()?.parse().ok()?;
    (low >= 12_000).then_some(10_000..low)
}

/// The agent's TLS files and whether it requires client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTls {
    /// `ca_file`: the CA that signed the agent's certificate (and clients' certificates).
    pub ca_file: PathBuf,
    /// `cert_file`: the agent's certificate.
    pub cert_file: PathBuf,
    /// `key_file`: the agent's private key.
    pub key_file: PathBuf,
    /// `verify_incoming`: every client must present a certificate signed by `ca_file`.
    pub verify_incoming: bool,
}

impl AgentTls {
    /// The directories holding its files, which a container must mount.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = [&self.ca_file, &self.cert_file, &self.key_file]
            .iter()
            .filter_map(|f| f.parent().map(PathBuf::from))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// Whether the agent runs alone in dev mode or as a member of a real cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMode {
    /// `-dev`: a server that elects itself at once, in memory, with dev-mode timings (100 ms
    /// gossip probes, fast Raft). Never carry its figures over to a cluster.
    Dev,
    /// `-server -bootstrap-expect N`: a server of a real cluster, production timings.
    Server {
        /// `-bootstrap-expect`: how many servers must join before the first election.
        bootstrap_expect: usize,
        /// Datacenter, joins, data directory.
        membership: Membership,
    },
    /// A client agent of a real cluster: it holds its node's services and checks and forwards
    /// reads to the servers.
    Client(Membership),
}

impl AgentMode {
    /// The cluster membership, `None` in dev mode.
    pub fn membership(&self) -> Option<&Membership> {
        match self {
            AgentMode::Dev => None,
            AgentMode::Server { membership, .. } | AgentMode::Client(membership) => {
                Some(membership)
            }
        }
    }

    /// Whether the agent is a server (dev mode included).
    pub fn is_server(&self) -> bool {
        !matches!(self, AgentMode::Client(_))
    }
}

/// What makes an agent a member of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// `-datacenter`.
    pub datacenter: String,
    /// `-retry-join`: LAN addresses to join (the servers), retried every second.
    pub retry_join: Vec<Ipv4Addr>,
    /// `-retry-join-wan`: another datacenter's servers, for servers only.
    pub retry_join_wan: Vec<Ipv4Addr>,
    /// `-data-dir`: where the agent keeps its state (node ID, Raft log, services). A host
    /// directory, mounted at the same path in a container, so that it outlives the agent.
    pub data_dir: PathBuf,
    /// `reconnect_timeout`: how long a failed member stays in the pool (and its node in the
    /// catalog) before it is reaped; Consul's default, 72 h, when `None`. Consul 1.8.7's
    /// documentation asks for at least 8 h but its configuration does not enforce it.
    pub reconnect_timeout: Option<Duration>,
    /// Run the agent as this uid (and gid) rather than as root, its data directory owned by
    /// it: a sender the kernel can tell apart, which [`crate::network`]'s cuts and netem
    /// links select packets by. `None`: the backend's default user.
    pub uid: Option<u32>,
}

/// Everything that defines one agent's command line.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// `-node`: the agent's node name, unique so that agents side by side do not clash.
    pub node_name: String,
    /// `-bind`, `-client` (and for a cluster member `-advertise`): the loopback address the
    /// agent listens on; 127.0.0.1 for a dev agent, its own 127.x.y.z in a cluster.
    pub address: Ipv4Addr,
    /// Dev agent, cluster server or cluster client.
    pub mode: AgentMode,
    /// The API port (`ports.http`, or `ports.https` with [`AgentSpec::tls`]), Serf and RPC.
    pub ports: Ports,
    /// Which generation of flags and ACL configuration to write.
    pub flavor: Flavor,
    /// With ACLs: the management token (also used as the agent's own token).
    pub acl_management_token: Option<String>,
    /// With TLS: the API on HTTPS only (the HTTP port off). The agent's own checks of
    /// services' `http://` endpoints stay plain HTTP.
    pub tls: Option<AgentTls>,
    /// A dev agent's HTTP API and DNS interface on `::1` too (`-client "<address> ::1"`), on
    /// the same ports. Ignored for cluster members, which share Consul's default ports.
    pub ipv6_loopback: bool,
    /// `limits { http_max_conns_per_client = N }`: Consul's cap on HTTP connections from one
    /// client IP (200 by default). Every process on this machine reaches the agent from
    /// 127.0.0.1, so hundreds of watchers need it raised. `None`: Consul's default.
    pub http_max_conns_per_client: Option<u32>,
    /// `-log-level`; `None`: Consul's default (`DEBUG` for a `-dev` agent, `INFO` otherwise).
    pub log_level: Option<String>,
}

impl AgentSpec {
    /// The arguments after `consul`.
    pub fn args(&self) -> Vec<String> {
        let p = self.ports;
        let address = self.address.to_string();
        let client = if self.ipv6_loopback {
            format!("{address} ::1")
        } else {
            address.clone()
        };
        let dns = p.dns.to_string();
        let mut args: Vec<String> = match &self.mode {
            AgentMode::Dev => vec![
                "agent",
                "-dev",
                "-node",
                &self.node_name,
                "-bind",
                &address,
                "-client",
                &client,
                "-http-port",
                &p.http.to_string(),
                "-dns-port",
                &dns,
                "-grpc-port",
                "-1",
                "-serf-lan-port",
                &p.serf_lan.to_string(),
                "-serf-wan-port",
                &p.serf_wan.to_string(),
                "-server-port",
                &p.server.to_string(),
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            AgentMode::Server { membership, .. } | AgentMode::Client(membership) => {
                self.member_args(membership)
            }
        };
        if self.flavor == Flavor::Modern {
            args.extend(["-hcl".into(), "ports { grpc_tls = -1 }".into()]);
        }
        if let Some(tls) = &self.tls {
            // `-hcl` comes after the flags in Consul's merge order, so it wins over
            // `-http-port`.
            args.extend([
                "-hcl".into(),
                format!("ports {{ http = -1 https = {} }}", p.http),
                "-hcl".into(),
                format!(
                    "ca_file = {:?} cert_file = {:?} key_file = {:?} verify_incoming = {}",
                    tls.ca_file, tls.cert_file, tls.key_file, tls.verify_incoming
                ),
            ]);
        }
        if let Some(n) = self.http_max_conns_per_client {
            args.extend([
                "-hcl".into(),
                format!("limits {{ http_max_conns_per_client = {n} }}"),
            ]);
        }
        if let Some(level) = &self.log_level {
            args.extend(["-log-level".into(), level.clone()]);
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

    /// A cluster member's flags: its own address for everything, Consul's default ports
    /// unless told otherwise, joins retried every second (Consul's default is 30 s), no
    /// update check (no traffic off the machine).
    fn member_args(&self, m: &Membership) -> Vec<String> {
        let p = self.ports;
        let address = self.address.to_string();
        let mut args: Vec<String> = vec![
            "agent".into(),
            "-node".into(),
            self.node_name.clone(),
            "-datacenter".into(),
            m.datacenter.clone(),
            "-data-dir".into(),
            m.data_dir.to_string_lossy().into_owned(),
            "-bind".into(),
            address.clone(),
            "-advertise".into(),
            address.clone(),
            "-client".into(),
            address,
            "-retry-interval".into(),
            "1s".into(),
            "-hcl".into(),
            "disable_update_check = true".into(),
        ];
        for (flag, port, default) in [
            ("-http-port", p.http, Ports::CONSUL_DEFAULTS.http),
            (
                "-serf-lan-port",
                p.serf_lan,
                Ports::CONSUL_DEFAULTS.serf_lan,
            ),
            (
                "-serf-wan-port",
                p.serf_wan,
                Ports::CONSUL_DEFAULTS.serf_wan,
            ),
            ("-server-port", p.server, Ports::CONSUL_DEFAULTS.server),
            ("-dns-port", p.dns, Ports::CONSUL_DEFAULTS.dns),
        ] {
            if port != default {
                args.extend([flag.into(), port.to_string()]);
            }
        }
        if let AgentMode::Server {
            bootstrap_expect, ..
        } = &self.mode
        {
            args.extend([
                "-server".into(),
                "-bootstrap-expect".into(),
                bootstrap_expect.to_string(),
            ]);
            for wan in &m.retry_join_wan {
                args.extend(["-retry-join-wan".into(), wan.to_string()]);
            }
            args.extend(["-retry-interval-wan".into(), "1s".into()]);
        }
        for lan in &m.retry_join {
            args.extend(["-retry-join".into(), lan.to_string()]);
        }
        if let Some(timeout) = m.reconnect_timeout {
            args.extend([
                "-hcl".into(),
                format!("reconnect_timeout = \"{}\"", GoDuration(timeout)),
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
    fn picked_ports_stay_reserved_in_this_process_until_released() {
        let owned = |p: u16| OWNED.lock().unwrap().contains(&p);
        let a = Ports::pick().unwrap();
        let all = [a.http, a.serf_lan, a.serf_wan, a.server];
        assert!(all.iter().all(|p| owned(*p)), "{a:?}");
        // Another agent picking meanwhile never gets them.
        let others: Vec<Ports> = (0..50).map(|_| Ports::pick().unwrap()).collect();
        for o in &others {
            let theirs = [o.http, o.serf_lan, o.serf_wan, o.server];
            assert!(
                theirs.iter().all(|p| !all.contains(p)),
                "{o:?} took one of {a:?}"
            );
            o.release();
        }
        let again = Ports::repick_keeping_http(a.http).unwrap();
        a.release_all_but_http();
        assert!(owned(a.http), "the HTTP port stays with its agent");
        assert!(
            !owned(a.serf_lan) && !owned(a.server),
            "old Serf/RPC ports given back"
        );
        assert!(owned(again.serf_lan) && owned(again.server));
        again.release();
        assert!(!owned(a.http) && !owned(again.serf_lan));
    }

    #[test]
    fn cluster_members_use_their_own_address_and_default_ports() {
        let membership = Membership {
            datacenter: "dc2".into(),
            retry_join: vec![Ipv4Addr::new(127, 9, 0, 2), Ipv4Addr::new(127, 9, 0, 3)],
            retry_join_wan: vec![Ipv4Addr::new(127, 8, 0, 2)],
            data_dir: "/tmp/c/server-1".into(),
            reconnect_timeout: Some(Duration::from_secs(120)),
            uid: None,
        };
        let server = AgentSpec {
            node_name: "dc2-server-1".into(),
            address: Ipv4Addr::new(127, 9, 0, 1),
            mode: AgentMode::Server {
                bootstrap_expect: 3,
                membership: membership.clone(),
            },
            ports: Ports::CONSUL_DEFAULTS,
            flavor: Flavor::Legacy,
            acl_management_token: None,
            tls: None,
            ipv6_loopback: false,
            http_max_conns_per_client: None,
            log_level: None,
        };
        let args = server.args().join(" ");
        assert!(!args.contains("-dev"), "{args}");
        assert!(
            args.contains("-bind 127.9.0.1 -advertise 127.9.0.1 -client 127.9.0.1"),
            "{args}"
        );
        assert!(
            !args.contains("-http-port"),
            "Consul's default ports: {args}"
        );
        assert!(
            args.contains("-datacenter dc2 -data-dir /tmp/c/server-1"),
            "{args}"
        );
        assert!(args.contains("-server -bootstrap-expect 3"), "{args}");
        assert!(
            args.contains("-retry-join 127.9.0.2 -retry-join 127.9.0.3"),
            "{args}"
        );
        assert!(args.contains("-retry-join-wan 127.8.0.2"), "{args}");
        assert!(args.contains("reconnect_timeout = \"2m\""), "{args}");
        assert!(args.contains("disable_update_check = true"), "{args}");
        let client = AgentSpec {
            mode: AgentMode::Client(Membership {
                reconnect_timeout: None,
                ..membership
            }),
            ..server
        };
        let args = client.args().join(" ");
        assert!(!client.args().iter().any(|a| a == "-server"), "{args}");
        assert!(!args.contains("-retry-join-wan"), "{args}");
        assert!(!args.contains("reconnect_timeout"), "72 h default: {args}");
        assert!(!client.mode.is_server() && client.mode.membership().is_some());
    }

    #[test]
    fn args_pin_every_port_to_loopback() {
        let ports = Ports::pick().unwrap();
        let all = [
            ports.http,
            ports.serf_lan,
            ports.serf_wan,
            ports.server,
            ports.dns,
        ];
        let mut sorted = all.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 5, "distinct ports: {all:?}");
        if let Some(range) = below_ephemeral_range() {
            assert!(
                all.iter().all(|p| range.contains(p)),
                "{all:?} in {range:?}"
            );
        }
        let again = Ports::repick_keeping_http(ports.http).unwrap();
        assert_eq!(again.http, ports.http);
        assert!(
            ![again.serf_lan, again.serf_wan, again.server].contains(&ports.http),
            "{again:?}"
        );
        let spec = AgentSpec {
            node_name: "n1".into(),
            address: Ipv4Addr::LOCALHOST,
            mode: AgentMode::Dev,
            ports,
            flavor: Flavor::Legacy,
            acl_management_token: Some("root-token".into()),
            tls: None,
            ipv6_loopback: false,
            http_max_conns_per_client: None,
            log_level: None,
        };
        let args = spec.args();
        let v6 = AgentSpec {
            ipv6_loopback: true,
            ..spec.clone()
        };
        let at = args.iter().position(|a| a == "-client").unwrap();
        assert_eq!(args[at + 1], "127.0.0.1");
        assert_eq!(
            v6.args()[at + 1],
            "127.0.0.1 ::1",
            "one argument, both addresses"
        );
        assert!(
            !args.iter().any(|a| a.contains("limits")),
            "Consul's default"
        );
        assert!(!args.iter().any(|a| a == "-log-level"), "Consul's default");
        let many = AgentSpec {
            http_max_conns_per_client: Some(1200),
            log_level: Some("info".into()),
            ..spec.clone()
        };
        assert!(
            many.args()
                .iter()
                .any(|a| a == "limits { http_max_conns_per_client = 1200 }")
        );
        assert!(many.args().join(" ").contains("-log-level info"));
        let args = args.join(" ");
        assert!(args.starts_with("agent -dev -node n1 -bind 127.0.0.1 -client 127.0.0.1"));
        assert!(args.contains(&format!("-http-port {}", ports.http)));
        assert!(args.contains(&format!("-dns-port {}", ports.dns)));
        assert!(args.contains("master = \"root-token\""));
        assert!(!args.contains("grpc_tls"));
        let modern = AgentSpec {
            flavor: Flavor::Modern,
            ..spec
        };
        let args = modern.args().join(" ");
        assert!(args.contains("grpc_tls = -1"));
        assert!(args.contains("initial_management = \"root-token\""));
        assert!(!args.contains("https"));
        let tls = AgentSpec {
            tls: Some(AgentTls {
                ca_file: "/tmp/pki/ca.pem".into(),
                cert_file: "/tmp/pki/agent.pem".into(),
                key_file: "/tmp/pki/agent-key.pem".into(),
                verify_incoming: true,
            }),
            ..modern
        };
        let args = tls.args().join(" ");
        assert!(
            args.contains(&format!("ports {{ http = -1 https = {} }}", ports.http)),
            "{args}"
        );
        assert!(
            args.contains("ca_file = \"/tmp/pki/ca.pem\" cert_file = \"/tmp/pki/agent.pem\" key_file = \"/tmp/pki/agent-key.pem\" verify_incoming = true"),
            "{args}"
        );
    }
}
