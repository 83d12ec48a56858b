//! A real Consul cluster: N servers (`-server -bootstrap-expect N`) and M client agents,
//! production timings (not `-dev`), each agent a [`Consul`] on its own loopback address
//! 127.x.y.z with Consul's default ports, host networking, a data directory on the host that
//! outlives the agent. Ready when a leader is elected and every member is alive.
//!
//! Every agent can be crashed (SIGKILL: it does not leave), stopped (SIGTERM: a client
//! leaves), paused, resumed and started again with or without its data. A second
//! datacenter is a second `Cluster` with another [`ClusterSpec::datacenter`] and
//! [`ClusterSpec::join_wan`] set to the first one's [`Cluster::server_addresses`].
//!
//! Addresses are drawn at random in 127.0.0.0/8, reserved in this process until the cluster
//! is dropped (parallel tests never share one), and checked free by binding Consul's ports
//! on them (other processes).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, TcpListener, UdpSocket},
    path::PathBuf,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use consul_api::AgentMember;
use tokio::time::Instant;

use crate::{
    consul::{AgentMode, AgentSpec, Consul, ConsulOptions, Flavor, Membership, Ports},
    error::{Error, Result},
    owner,
};

/// The shape of a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// `-datacenter` of every agent.
    pub datacenter: String,
    /// How many servers (`-bootstrap-expect` is this number).
    pub servers: usize,
    /// How many client agents.
    pub clients: usize,
    /// `reconnect_timeout` of every agent; Consul's default (72 h) when `None`.
    pub reconnect_timeout: Option<Duration>,
    /// Servers of another datacenter to join over the WAN (`-retry-join-wan`).
    pub join_wan: Vec<Ipv4Addr>,
    /// How long the whole cluster may take to elect a leader and see every member alive.
    pub startup_timeout: Duration,
    /// A pause before each client agent after the first: agents started apart run their
    /// reapers on different phases (each agent's reaper is anchored at its own start).
    pub client_stagger: Duration,
    /// Run each agent under a uid of its own ([`uid_for`] its address) instead of root: what
    /// [`crate::network::Network`] needs to tell the agents' packets apart.
    pub own_uids: bool,
}

impl Default for ClusterSpec {
    /// `dc1`, 3 servers, 3 clients, Consul's default `reconnect_timeout`, 2 minutes to start.
    fn default() -> Self {
        ClusterSpec {
            datacenter: "dc1".into(),
            servers: 3,
            clients: 3,
            reconnect_timeout: None,
            join_wan: Vec::new(),
            startup_timeout: Duration::from_secs(120),
            client_stagger: Duration::ZERO,
            own_uids: false,
        }
    }
}

impl ClusterSpec {
    /// `servers` servers and `clients` client agents in `dc1`.
    pub fn new(servers: usize, clients: usize) -> Self {
        ClusterSpec {
            servers,
            clients,
            ..Default::default()
        }
    }
}

/// One agent of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Member {
    /// Server number `i` (from 0).
    Server(usize),
    /// Client agent number `i` (from 0): a node where services run.
    Client(usize),
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Member::Server(i) => write!(f, "server-{}", i + 1),
            Member::Client(i) => write!(f, "client-{}", i + 1),
        }
    }
}

/// What a restarted agent finds in its data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// Its state as it left it (node ID, services, Raft log).
    Keep,
    /// Nothing: a replacement agent with the same name and address.
    Wipe,
}

/// A running cluster; every agent is removed, and the data directories deleted, on drop.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    servers: Vec<Consul>,
    clients: Vec<Consul>,
    root: PathBuf,
    addresses: Vec<Ipv4Addr>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first (their containers write into the data directories), then the files.
        self.servers.clear();
        self.clients.clear();
        let _ = std::fs::remove_dir_all(&self.root);
        release(&self.addresses);
    }
}

impl Cluster {
    /// Start `spec` with options from the environment (`TESTBED_BACKEND`, `CONSUL_IMAGE`).
    pub async fn start(spec: ClusterSpec) -> Result<Cluster> {
        Cluster::start_with(ConsulOptions::from_env()?, spec).await
    }

    /// Start `spec` with `options` (TLS is not supported for clusters; with ACLs, every
    /// agent of the cluster has them on with the management token as its agent token, and
    /// the datacenter is its own ACL primary), and wait until a leader is elected and every
    /// member is alive.
    pub async fn start_with(options: ConsulOptions, spec: ClusterSpec) -> Result<Cluster> {
        if spec.servers == 0 {
            return Err(Error::Setting("a cluster needs at least one server".into()));
        }
        if options.tls.is_some() {
            return Err(Error::Setting(
                "clusters run without TLS (not supported by the harness yet)".into(),
            ));
        }
        if spec.datacenter.is_empty()
            || !spec
                .datacenter
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::Setting(format!(
                "datacenter {:?}: use letters, digits, '-' and '_'",
                spec.datacenter
            )));
        }
        let total = spec.servers + spec.clients;
        let addresses = reserve(total)?;
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let root = owner::temp_dir("testbed-cluster-", &format!("{}-{tag}", spec.datacenter))?;
        let mut cluster = Cluster {
            spec: spec.clone(),
            servers: Vec::new(),
            clients: Vec::new(),
            root,
            addresses: addresses.clone(),
        };
        let server_ips = addresses[..spec.servers].to_vec();
        for (i, ip) in addresses.iter().enumerate() {
            let member = if i < spec.servers {
                Member::Server(i)
            } else {
                Member::Client(i - spec.servers)
            };
            let data_dir = cluster.root.join(member.to_string());
            let uid = spec.own_uids.then(|| uid_for(*ip));
            make_data_dir(&data_dir, uid)?;
            let membership = Membership {
                datacenter: spec.datacenter.clone(),
                retry_join: server_ips.iter().copied().filter(|s| s != ip).collect(),
                retry_join_wan: spec.join_wan.clone(),
                data_dir,
                reconnect_timeout: spec.reconnect_timeout,
                uid,
            };
            let mode = match member {
                Member::Server(_) => AgentMode::Server {
                    bootstrap_expect: spec.servers,
                    membership,
                },
                Member::Client(_) => AgentMode::Client(Membership {
                    retry_join_wan: Vec::new(),
                    ..membership
                }),
            };
            let agent_spec = AgentSpec {
                node_name: format!("{}-{member}-{tag}", spec.datacenter),
                address: *ip,
                mode,
                ports: Ports::CONSUL_DEFAULTS,
                flavor: Flavor::Legacy,
                acl_management_token: options.acl_management_token.clone(),
                tls: None,
                ipv6_loopback: false,
                http_max_conns_per_client: options.http_max_conns_per_client,
                log_level: options.log_level.clone(),
            };
            if matches!(member, Member::Client(c) if c > 0) {
                tokio::time::sleep(spec.client_stagger).await;
            }
            let agent = Consul::start_member(options.clone(), agent_spec).await?;
            match member {
                Member::Server(_) => cluster.servers.push(agent),
                Member::Client(_) => cluster.clients.push(agent),
            }
        }
        cluster.wait_ready(spec.startup_timeout).await?;
        Ok(cluster)
    }

    /// What the cluster was started with.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The servers, in order.
    pub fn servers(&self) -> &[Consul] {
        &self.servers
    }

    /// The client agents, in order.
    pub fn clients(&self) -> &[Consul] {
        &self.clients
    }

    /// Every member, servers first.
    pub fn members(&self) -> Vec<Member> {
        (0..self.servers.len())
            .map(Member::Server)
            .chain((0..self.clients.len()).map(Member::Client))
            .collect()
    }

    /// One agent.
    ///
    /// # Panics
    /// If `member` is out of range (a bug in the caller).
    pub fn agent(&self, member: Member) -> &Consul {
        match member {
            Member::Server(i) => &self.servers[i],
            Member::Client(i) => &self.clients[i],
        }
    }

    fn agent_mut(&mut self, member: Member) -> &mut Consul {
        match member {
            Member::Server(i) => &mut self.servers[i],
            Member::Client(i) => &mut self.clients[i],
        }
    }

    /// The servers' addresses: what another datacenter's [`ClusterSpec::join_wan`] takes.
    pub fn server_addresses(&self) -> Vec<Ipv4Addr> {
        self.servers.iter().map(|s| s.spec().address).collect()
    }

    /// The member as [`crate::network::Network`] addresses it: its address and, when the
    /// cluster runs its agents under their own uids ([`ClusterSpec::own_uids`]), its uid.
    pub fn endpoint(&self, member: Member) -> crate::network::Endpoint {
        let spec = self.agent(member).spec();
        crate::network::Endpoint {
            address: spec.address,
            uid: spec.mode.membership().and_then(|m| m.uid),
        }
    }

    /// The member whose node has this name.
    pub fn member_named(&self, node: &str) -> Option<Member> {
        self.members()
            .into_iter()
            .find(|m| self.agent(*m).spec().node_name == node)
    }

    /// Wait until every running server agrees on a leader and sees every running member
    /// alive (and every stopped one not alive), and every running client knows the leader.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.readiness().await {
                Ok(()) => return Ok(()),
                Err(reason) => reason,
            };
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "the {} cluster to elect a leader and see every member alive (last: {last})",
                        self.spec.datacenter
                    ),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn readiness(&self) -> std::result::Result<(), String> {
        let mut leaders = BTreeSet::new();
        for m in self.members() {
            let agent = self.agent(m);
            if !agent.is_running() {
                continue;
            }
            let leader = agent
                .client()
                .status()
                .leader()
                .await
                .map_err(|e| format!("{m}: {e}"))?;
            if leader.is_empty() {
                return Err(format!("{m} knows no leader"));
            }
            leaders.insert(leader);
            if let Member::Server(_) = m {
                let seen = agent
                    .client()
                    .agent()
                    .members()
                    .await
                    .map_err(|e| format!("{m}: {e}"))?;
                for other in self.members() {
                    let node = &self.agent(other).spec().node_name;
                    let alive = seen
                        .iter()
                        .any(|s| &s.name == node && s.status == AgentMember::ALIVE);
                    if alive != self.agent(other).is_running() {
                        return Err(format!(
                            "{m} sees {other} {}",
                            if alive { "alive" } else { "not alive yet" }
                        ));
                    }
                }
            }
        }
        if leaders.len() > 1 {
            return Err(format!("agents disagree on the leader: {leaders:?}"));
        }
        Ok(())
    }

    /// The server the running servers name as leader, with the moment it was seen; waits
    /// (at most `timeout`) until one is elected. `excluding` is never accepted (the leader
    /// just killed, still named by servers that have not noticed).
    pub async fn wait_leader(
        &self,
        excluding: Option<usize>,
        timeout: Duration,
    ) -> Result<(usize, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader().await
                && Some(i) != excluding
            {
                return Ok((i, Instant::now()));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("a new leader in {}", self.spec.datacenter),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader a majority of the cluster's servers name, if one does: `None` during an
    /// election or without a quorum. One server's word is not enough: a server that has not
    /// noticed its leader's death still names it, and a leader cut off from the others names
    /// itself until its lease runs out.
    pub async fn leader(&self) -> Option<usize> {
        let named =
            futures::future::join_all((0..self.servers.len()).map(|i| self.leader_named_by(i)))
                .await;
        let majority = self.servers.len() / 2 + 1;
        (0..self.servers.len())
            .find(|i| named.iter().filter(|n| **n == Some(*i)).count() >= majority)
    }

    /// The server that server `i` names as leader, if `i` runs, answers within 2 s and names
    /// a running server of this cluster.
    pub async fn leader_named_by(&self, i: usize) -> Option<usize> {
        let server = self.servers.get(i).filter(|s| s.is_running())?;
        let leader =
            tokio::time::timeout(Duration::from_secs(2), server.client().status().leader())
                .await
                .ok()?
                .ok()?;
        let (host, _) = leader.rsplit_once(':')?;
        self.servers
            .iter()
            .position(|s| s.is_running() && s.spec().address.to_string() == host)
    }

    /// SIGKILL the agent (`docker rm -f`): it does not leave; the others mark it failed.
    pub async fn crash(&mut self, member: Member) -> Result<()> {
        self.agent_mut(member).stop().await
    }

    /// SIGTERM the agent and wait until it exits (at most 30 s): a client leaves the
    /// cluster, and its node's services leave the catalog with it.
    pub async fn stop(&mut self, member: Member) -> Result<()> {
        self.agent_mut(member)
            .terminate(Duration::from_secs(30))
            .await
    }

    /// Freeze the agent (`docker pause`): it neither gossips nor answers.
    pub async fn pause(&self, member: Member) -> Result<()> {
        self.agent(member).pause().await
    }

    /// Unfreeze a paused agent.
    pub async fn resume(&self, member: Member) -> Result<()> {
        self.agent(member).resume().await
    }

    /// Start a crashed or stopped agent again, same name and address, with its data or
    /// with an empty data directory; returns once its API answers (it rejoins on its own:
    /// wait for that with [`Cluster::wait_ready`]).
    pub async fn start_again(&mut self, member: Member, data: Data) -> Result<()> {
        if data == Data::Wipe {
            let (dir, uid) = self
                .agent(member)
                .spec()
                .mode
                .membership()
                .map(|m| (m.data_dir.clone(), m.uid))
                .ok_or(Error::AgentState("is not a cluster member"))?;
            if self.agent(member).is_running() {
                return Err(Error::AgentState("is already running"));
            }
            std::fs::remove_dir_all(&dir)?;
            make_data_dir(&dir, uid)?;
        }
        self.agent_mut(member).start_again().await
    }

    /// Remove a failed member's node from the catalog now (`/v1/agent/force-leave`, asked
    /// of the first running server) rather than after `reconnect_timeout`.
    pub async fn force_leave(&self, member: Member) -> Result<()> {
        let server = self
            .servers
            .iter()
            .find(|s| s.is_running())
            .ok_or(Error::AgentState("has no running server to ask"))?;
        let node = self.agent(member).spec().node_name.clone();
        Ok(server.client().agent().force_leave(&node).await?)
    }
}

/// The uid an agent on `address` runs as with [`ClusterSpec::own_uids`]: 2 000 000 000 plus
/// the address's last three octets. Distinct for distinct addresses, and since a live
/// cluster's addresses are distinct machine-wide (Consul's ports are bound on them), no two
/// live agents share one; far above any uid a distribution hands out.
pub fn uid_for(address: Ipv4Addr) -> u32 {
    let [_, a, b, c] = address.octets();
    UID_BASE + u32::from_be_bytes([0, a, b, c])
}

/// The first uid of [`uid_for`]'s range.
pub const UID_BASE: u32 = 2_000_000_000;

/// An agent's data directory, owned by the uid it runs as (if not root).
fn make_data_dir(dir: &std::path::Path, uid: Option<u32>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    if let Some(uid) = uid {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    }
    Ok(())
}

/// Whether `address` is held by a cluster of this process right now: the only addresses
/// [`crate::network::Network`] touches.
pub fn is_reserved(address: Ipv4Addr) -> bool {
    RESERVED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(&address)
}

/// Cluster addresses handed out in this process and not yet released.
static RESERVED: Mutex<BTreeSet<Ipv4Addr>> = Mutex::new(BTreeSet::new());

/// The ports a cluster member listens on (HTTP, DNS, Serf LAN/WAN, server RPC): all must be
/// free on an address before it is handed out. Serf and DNS also need UDP.
const TCP_PORTS: [u16; 5] = [8500, 8600, 8301, 8302, 8300];
const UDP_PORTS: [u16; 3] = [8600, 8301, 8302];

/// `n` distinct random addresses in 127.0.0.0/8 (never 127.0.0.x), reserved in this
/// process, on which nothing listens on Consul's ports right now.
fn reserve(n: usize) -> Result<Vec<Ipv4Addr>> {
    let mut reserved = RESERVED.lock().unwrap_or_else(PoisonError::into_inner);
    let mut picked = Vec::with_capacity(n);
    let mut tries = 0;
    while picked.len() < n {
        tries += 1;
        if tries > 1000 {
            release_locked(&mut reserved, &picked);
            return Err(Error::Setting(
                "no free loopback address for a cluster member after 1000 tries".into(),
            ));
        }
        let [a, b, c] = rand::random::<[u8; 3]>();
        let ip = Ipv4Addr::new(127, a.max(1), b, c.clamp(2, 254));
        if reserved.contains(&ip) || !free(ip) {
            continue;
        }
        reserved.insert(ip);
        picked.push(ip);
    }
    Ok(picked)
}

fn free(ip: Ipv4Addr) -> bool {
    // Held together, so that one check does not see another's socket.
    let tcp: Vec<_> = TCP_PORTS
        .iter()
        .map(|p| TcpListener::bind((ip, *p)))
        .collect();
    let udp: Vec<_> = UDP_PORTS
        .iter()
        .map(|p| UdpSocket::bind((ip, *p)))
        .collect();
    tcp.iter().all(|r| r.is_ok()) && udp.iter().all(|r| r.is_ok())
}

fn release(addresses: &[Ipv4Addr]) {
    let mut reserved = RESERVED.lock().unwrap_or_else(PoisonError::into_inner);
    release_locked(&mut reserved, addresses);
}

fn release_locked(reserved: &mut BTreeSet<Ipv4Addr>, addresses: &[Ipv4Addr]) {
    for ip in addresses {
        reserved.remove(ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_reserved_and_free() {
        let a = reserve(6).unwrap();
        let b = reserve(6).unwrap();
        let all: BTreeSet<_> = a.iter().chain(&b).collect();
        assert_eq!(all.len(), 12, "{a:?} {b:?}");
        for ip in &all {
            assert_eq!(ip.octets()[0], 127);
            assert_ne!(ip.octets()[1..3], [0, 0], "never 127.0.0.x: {ip}");
            assert!(RESERVED.lock().unwrap().contains(ip));
        }
        // Something listening on 8500 makes an address unusable.
        let taken = a[0];
        release(&a);
        let _hold = TcpListener::bind((taken, 8500)).unwrap();
        assert!(!free(taken));
        release(&b);
        assert!(!RESERVED.lock().unwrap().contains(&b[0]));
    }

    #[test]
    fn members_name_themselves() {
        assert_eq!(Member::Server(0).to_string(), "server-1");
        assert_eq!(Member::Client(2).to_string(), "client-3");
    }
}
