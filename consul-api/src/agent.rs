//! The local agent's endpoints (`/v1/agent/...`): register and deregister services with their
//! checks, and read what the agent holds. Writes go to the agent, which syncs the catalog.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    client::Client,
    duration::GoDuration,
    error::Result,
    health::{HealthCheck, HealthStatus},
    query::{QueryMeta, QueryOptions},
    skip,
};

/// A service registration, as `PUT /v1/agent/service/register` takes it.
///
/// ```
/// use consul_api::{AgentServiceCheck, AgentServiceRegistration, GoDuration};
///
/// let registration = AgentServiceRegistration {
///     id: Some("web-1".into()),
///     name: "web".into(),
///     port: Some(8080),
///     address: Some("127.0.0.1".into()),
///     check: Some(AgentServiceCheck {
///         http: Some("http://127.0.0.1:8080/health".into()),
///         interval: Some(GoDuration::from_secs(5)),
///         deregister_critical_service_after: Some(GoDuration::from_secs(90)),
///         ..Default::default()
///     }),
///     ..Default::default()
/// };
/// // Unset fields are left out; names and durations are Consul's.
/// assert_eq!(
///     serde_json::to_value(&registration).unwrap(),
///     serde_json::json!({
///         "ID": "web-1", "Name": "web", "Port": 8080, "Address": "127.0.0.1",
///         "Check": {
///             "HTTP": "http://127.0.0.1:8080/health",
///             "Interval": "5s",
///             "DeregisterCriticalServiceAfter": "1m30s"
///         }
///     })
/// );
/// ```
///
/// Register it with [`Agent::service_register`]
/// (`client.agent().service_register(&registration).await`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentServiceRegistration {
    /// `ID`: the instance's ID, unique on this agent. `None`: Consul uses `name`.
    /// Registering an ID the agent already holds replaces that service.
    #[serde(rename = "ID", skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    /// `Name`: the service name that discovery asks for. Required (Consul answers 400
    /// without it).
    pub name: String,
    /// `Tags`: free-form labels; health and catalog queries can filter on one (`tag`).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tags: Vec<String>,
    /// `Port`: the port clients dial. `None` is sent as nothing, which Consul stores as 0.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    /// `Address`: the address clients dial. `None` (or empty): clients use the node's
    /// address (see [`ServiceEntry::address`](crate::ServiceEntry::address)).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub address: Option<String>,
    /// `Meta`: string key/value pairs. Consul 1.8 allows at most 64 pairs, keys of
    /// `[a-zA-Z0-9_-]` up to 128 characters not starting with `consul-`, values up to 512.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub meta: BTreeMap<String, String>,
    /// `Check`: one check of the service. Without its own `CheckID` it gets
    /// `service:<service ID>` (with `:1`, `:2`, ... when the service has several checks).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub check: Option<AgentServiceCheck>,
    /// `Checks`: further checks, numbered after `check`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub checks: Vec<AgentServiceCheck>,
}

/// A check attached to a service registration (Go's `AgentServiceCheck`).
///
/// Set exactly one kind: `http`, `tcp` or `grpc` with an `interval`, or a `ttl`. Consul
/// rejects a check with both `interval` and `ttl`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentServiceCheck {
    /// `CheckID`: the check's ID on the agent, the one [`Agent::check_update`] takes.
    /// `None`: `service:<service ID>` (`:1`, `:2`, ... appended when the service has
    /// several checks).
    #[serde(rename = "CheckID", skip_serializing_if = "Option::is_none", default)]
    pub check_id: Option<String>,
    /// `Name`: a human-readable name. `None`: `Service '<name>' check`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    /// `Interval`: how often an HTTP or TCP check runs. Consul raises anything under 1 s
    /// to 1 s; the first run comes after a random part of one interval.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub interval: Option<GoDuration>,
    /// `Timeout`: how long one HTTP request or TCP connect may take. `None`: 10 s.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timeout: Option<GoDuration>,
    /// `HTTP`: the URL an HTTP check requests. A 2xx answer is `passing`, 429 is
    /// `warning`, anything else (or no answer) is `critical`.
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none", default)]
    pub http: Option<String>,
    /// `Method`: the HTTP check's method. `None`: `GET`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    /// `TCP`: `host:port` a TCP check connects to; `passing` if the connect succeeds.
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none", default)]
    pub tcp: Option<String>,
    /// `GRPC`: `host:port` (or `host:port/service`) a gRPC check calls the standard
    /// `grpc.health.v1.Health/Check` on, with an `interval`. `SERVING` is `passing`; any other
    /// status, an error or no answer within the `timeout` is `critical`. With a `/service`
    /// suffix, that service's status is asked for; without, the server's (empty name).
    #[serde(rename = "GRPC", skip_serializing_if = "Option::is_none", default)]
    pub grpc: Option<String>,
    /// `GRPCUseTLS`: the gRPC check speaks TLS to the service (verified against the agent's
    /// CA settings unless `tls_skip_verify`). `None`: plaintext HTTP/2.
    #[serde(
        rename = "GRPCUseTLS",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub grpc_use_tls: Option<bool>,
    /// `TLSSkipVerify`: an HTTPS or TLS gRPC check accepts any certificate.
    #[serde(
        rename = "TLSSkipVerify",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub tls_skip_verify: Option<bool>,
    /// `TTL`: makes this a TTL check. The service reports its own status with
    /// [`Agent::check_update`]; if no update comes within the TTL the check turns
    /// `critical`.
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none", default)]
    pub ttl: Option<GoDuration>,
    /// Initial status (`passing`, `warning`, `critical`); Consul's default is `critical`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<String>,
    /// `Notes`: free text shown with the check.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub notes: Option<String>,
    /// `DeregisterCriticalServiceAfter`: once the check has been `critical` this long, the
    /// agent deregisters the whole service. `None`: never. Consul raises it to at least its
    /// `CheckDeregisterIntervalMin` (1 minute), and its reaper acts on a 30 s grid
    /// (`CheckReapInterval`), so removal comes up to 30 s later than that.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deregister_critical_service_after: Option<GoDuration>,
    /// `SuccessBeforePassing` (Consul ≥ 1.7): consecutive successful runs before the check
    /// turns `passing`. `None` or 0: at the first. For HTTP, TCP, gRPC, script and Docker
    /// checks; a TTL check's status is what its updates say.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub success_before_passing: Option<u32>,
    /// `FailuresBeforeCritical` (Consul ≥ 1.7): consecutive failed runs before the check
    /// turns `critical` — a check that fails once in a while (a lossy link, a slow answer)
    /// does not flap. `None` or 0: at the first. Consul 1.8.7 returns an empty `Definition`
    /// for checks: whether it holds shows only in the check's behaviour.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failures_before_critical: Option<u32>,
}

/// A service as the agent holds it (`GET /v1/agent/services`), also the `Service` of a
/// health [`ServiceEntry`](crate::ServiceEntry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentService {
    /// `ID`: the instance's ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// `Service`: the service name.
    pub service: String,
    /// `Tags`; `None` when Consul sends `null`. Read them with [`AgentService::tags`].
    pub tags: Option<Vec<String>>,
    /// `Meta`; `None` when Consul sends `null`.
    pub meta: Option<BTreeMap<String, String>>,
    /// `Port`; 0 when the registration gave none.
    pub port: u16,
    /// `Address`; empty when the registration gave none, meaning the node's address.
    pub address: String,
    /// `Datacenter`; Consul 1.8 does not send it, so `None` there.
    pub datacenter: Option<String>,
    /// `Weights`: how much traffic a client should send it, passing and warning (Consul's
    /// default is 1 and 1); `None` when Consul sends none.
    pub weights: Option<AgentWeights>,
    /// `CreateIndex`: the Raft index at which the entry was created.
    pub create_index: u64,
    /// `ModifyIndex`: the Raft index of the entry's last change.
    pub modify_index: u64,
}

impl AgentService {
    /// The service's tags (Consul sends `null` for none).
    pub fn tags(&self) -> &[String] {
        self.tags.as_deref().unwrap_or_default()
    }
}

/// A check as the agent reports it; the same shape as a health check.
pub type AgentCheck = HealthCheck;

/// What `GET /v1/agent/self` says of the agent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentSelf {
    /// `Config`: datacenter, node, version.
    pub config: AgentSelfConfig,
    /// The agent's runtime configuration, as Consul dumps it (keys vary by version).
    pub debug_config: serde_json::Map<String, serde_json::Value>,
}

/// The `Config` block of [`AgentSelf`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentSelfConfig {
    /// `Datacenter`: the agent's datacenter, for example `dc1`.
    pub datacenter: String,
    /// `NodeName`: the agent's node name.
    pub node_name: String,
    /// `NodeID`: the node's UUID.
    #[serde(rename = "NodeID")]
    pub node_id: String,
    /// `Version`: Consul's version, for example `1.8.7`.
    pub version: String,
    /// `Server`: true for a server agent, false for a client agent.
    pub server: bool,
}

impl AgentSelf {
    /// A duration from the runtime configuration, for example `CheckReapInterval` or
    /// `CheckDeregisterIntervalMin`; `None` if absent or not a duration.
    pub fn debug_duration(&self, key: &str) -> Option<Duration> {
        let value = self.debug_config.get(key)?;
        serde_json::from_value::<GoDuration>(value.clone())
            .ok()
            .map(GoDuration::as_duration)
    }
}

/// A service's `Weights` (DNS SRV weights, and a hint to any balancer): relative shares of
/// traffic while its checks pass, and while the worst of them warns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentWeights {
    /// `Passing`: the weight while every check passes.
    pub passing: u32,
    /// `Warning`: the weight while a check warns.
    pub warning: u32,
}

impl Default for AgentWeights {
    fn default() -> Self {
        AgentWeights {
            passing: 1,
            warning: 1,
        }
    }
}

/// One member of the agent's LAN gossip pool, as `GET /v1/agent/members` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentMember {
    /// `Name`: the member's node name.
    pub name: String,
    /// `Addr`: its gossip address.
    pub addr: String,
    /// `Port`: its gossip port.
    pub port: u16,
    /// `Tags`: Serf tags (`role` is `consul` for a server, `node` for a client; `dc`, ...).
    pub tags: BTreeMap<String, String>,
    /// `Status`: Serf's member status, see [`AgentMember::status_name`].
    pub status: u8,
}

impl AgentMember {
    /// Serf's status 1: the member answers gossip.
    pub const ALIVE: u8 = 1;

    /// `alive`, `leaving`, `left`, `failed` (Serf's 1 to 4), or `none`.
    pub fn status_name(&self) -> &'static str {
        match self.status {
            1 => "alive",
            2 => "leaving",
            3 => "left",
            4 => "failed",
            _ => "none",
        }
    }

    /// Whether the member is a server (Serf tag `role=consul`).
    pub fn is_server(&self) -> bool {
        self.tags.get("role").map(String::as_str) == Some("consul")
    }
}

/// The body of `PUT /v1/agent/check/update/:check_id`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckUpdate<'a> {
    status: HealthStatus,
    output: &'a str,
}

/// The local agent's endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Agent<'a> {
    client: &'a Client,
}

impl<'a> Agent<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        Agent { client }
    }

    /// `PUT /v1/agent/service/register`: add or replace a service and its checks.
    pub async fn service_register(&self, registration: &AgentServiceRegistration) -> Result<()> {
        self.client
            .put(&["agent", "service", "register"], &[], Some(registration))
            .await
            .map(drop)
    }

    /// `PUT /v1/agent/service/deregister/:service_id`.
    pub async fn service_deregister(&self, service_id: &str) -> Result<()> {
        self.client
            .put::<()>(&["agent", "service", "deregister", service_id], &[], None)
            .await
            .map(drop)
    }

    /// `PUT /v1/agent/service/maintenance/:service_id`: put a service in maintenance mode
    /// (`enable`, with `reason` shown in its maintenance check) or take it out. While in
    /// maintenance the agent adds a critical check, so health queries for passing instances
    /// leave it out; the service stays registered.
    pub async fn service_maintenance(
        &self,
        service_id: &str,
        enable: bool,
        reason: Option<&str>,
    ) -> Result<()> {
        let mut params = vec![("enable", enable.to_string())];
        if let Some(reason) = reason.filter(|r| !r.is_empty()) {
            params.push(("reason", reason.to_owned()));
        }
        self.client
            .put::<()>(
                &["agent", "service", "maintenance", service_id],
                &params,
                None,
            )
            .await
            .map(drop)
    }

    /// `PUT /v1/agent/maintenance`: put this agent's node in maintenance mode (`enable`,
    /// with `reason`) or take it out. While on, the agent adds a critical node check
    /// (`_node_maintenance`): every service on the node leaves the passing lists.
    pub async fn node_maintenance(&self, enable: bool, reason: Option<&str>) -> Result<()> {
        let mut params = vec![("enable", enable.to_string())];
        if let Some(reason) = reason.filter(|r| !r.is_empty()) {
            params.push(("reason", reason.to_owned()));
        }
        self.client
            .put::<()>(&["agent", "maintenance"], &params, None)
            .await
            .map(drop)
    }

    /// `PUT /v1/agent/check/update/:check_id`: set a TTL check's status and output (Go's
    /// `UpdateTTL`). Each update restarts the check's TTL.
    pub async fn check_update(
        &self,
        check_id: &str,
        status: HealthStatus,
        output: &str,
    ) -> Result<()> {
        let update = CheckUpdate { status, output };
        self.client
            .put(&["agent", "check", "update", check_id], &[], Some(&update))
            .await
            .map(drop)
    }

    /// `GET /v1/agent/services`: every service registered with this agent, by ID. A service
    /// our types cannot hold (a foreign registration's `Port: 70000`) is left out and logged.
    pub async fn services(&self) -> Result<BTreeMap<String, AgentService>> {
        let (services, _) = self
            .client
            .get_entries::<_, AgentService>(&["agent", "services"], &[], None, skip::map)
            .await?;
        Ok(services)
    }

    /// `GET /v1/agent/service/:service_id`: one service, `None` if the agent does not hold
    /// it. Blocks on `opts.wait_hash` (the agent's endpoints block on content hashes).
    pub async fn service(
        &self,
        service_id: &str,
        opts: &QueryOptions,
    ) -> Result<Option<(AgentService, QueryMeta)>> {
        self.client
            .get_optional(&["agent", "service", service_id], &[], Some(opts))
            .await
    }

    /// `GET /v1/agent/checks`: every check of this agent, by check ID (one that cannot be
    /// decoded is left out and logged).
    pub async fn checks(&self) -> Result<BTreeMap<String, AgentCheck>> {
        let (checks, _) = self
            .client
            .get_entries::<_, AgentCheck>(&["agent", "checks"], &[], None, skip::map)
            .await?;
        Ok(checks)
    }

    /// `GET /v1/agent/members`: the LAN gossip pool as this agent sees it.
    pub async fn members(&self) -> Result<Vec<AgentMember>> {
        let (members, _) = self.client.get(&["agent", "members"], &[], None).await?;
        Ok(members)
    }

    /// `PUT /v1/agent/force-leave/:node`: mark a failed member as left, so the leader
    /// removes its node (and every service on it) from the catalog now rather than after
    /// `reconnect_timeout`.
    pub async fn force_leave(&self, node: &str) -> Result<()> {
        self.client
            .put::<()>(&["agent", "force-leave", node], &[], None)
            .await
            .map(drop)
    }

    /// `GET /v1/agent/self`: the agent's configuration and version.
    pub async fn agent_self(&self) -> Result<AgentSelf> {
        let (me, _) = self.client.get(&["agent", "self"], &[], None).await?;
        Ok(me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_json_uses_consuls_names() {
        let registration = AgentServiceRegistration {
            id: Some("servernode_1".into()),
            name: "servernode".into(),
            tags: vec!["servernode".into()],
            port: Some(9527),
            address: Some("127.0.0.1".into()),
            meta: BTreeMap::from([("version".into(), "0.1.0".into())]),
            check: Some(AgentServiceCheck {
                check_id: Some("service:servernode_1".into()),
                http: Some("http://127.0.0.1:8080/check".into()),
                interval: Some(GoDuration::from_secs(5)),
                timeout: Some(GoDuration::from_secs(3)),
                deregister_critical_service_after: Some(GoDuration::from_secs(90)),
                success_before_passing: Some(2),
                failures_before_critical: Some(3),
                ..Default::default()
            }),
            checks: vec![],
        };
        let json = serde_json::to_value(&registration).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "ID": "servernode_1",
                "Name": "servernode",
                "Tags": ["servernode"],
                "Port": 9527,
                "Address": "127.0.0.1",
                "Meta": {"version": "0.1.0"},
                "Check": {
                    "CheckID": "service:servernode_1",
                    "HTTP": "http://127.0.0.1:8080/check",
                    "Interval": "5s",
                    "Timeout": "3s",
                    "DeregisterCriticalServiceAfter": "1m30s",
                    "SuccessBeforePassing": 2,
                    "FailuresBeforeCritical": 3
                }
            })
        );
    }

    #[test]
    fn a_grpc_check_uses_consuls_names() {
        let check = AgentServiceCheck {
            grpc: Some("127.0.0.1:50051/hello.Greeter".into()),
            grpc_use_tls: Some(true),
            tls_skip_verify: Some(true),
            interval: Some(GoDuration::from_secs(1)),
            ..Default::default()
        };
        let json = serde_json::to_value(&check).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "GRPC": "127.0.0.1:50051/hello.Greeter",
                "GRPCUseTLS": true,
                "TLSSkipVerify": true,
                "Interval": "1s"
            })
        );
        let plain = AgentServiceCheck {
            grpc: Some("127.0.0.1:50051".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({"GRPC": "127.0.0.1:50051"}),
            "unset TLS fields are left out, so Consul keeps its defaults"
        );
    }

    #[test]
    fn a_ttl_update_uses_consuls_names() {
        let update = CheckUpdate {
            status: HealthStatus::Warning,
            output: "queue 90% full",
        };
        assert_eq!(
            serde_json::to_value(&update).unwrap(),
            serde_json::json!({"Status": "warning", "Output": "queue 90% full"})
        );
    }

    #[test]
    fn agent_service_tolerates_nulls_and_unknown_fields() {
        let s: AgentService = serde_json::from_str(
            r#"{"ID":"a","Service":"b","Tags":null,"Meta":null,"Port":1,"Address":"","Weights":{"Passing":1}}"#,
        )
        .unwrap();
        assert_eq!(s.tags(), &[] as &[String]);
        assert_eq!(s.port, 1);
        let weights = s.weights.expect("Weights is read");
        assert_eq!(weights.passing, 1);
        assert_eq!(
            weights.warning, 1,
            "a missing weight is Consul's default, 1"
        );
    }

    #[test]
    fn agent_self_reads_runtime_durations() {
        let me: AgentSelf = serde_json::from_str(
            r#"{"Config":{"Version":"1.8.7"},"DebugConfig":{"CheckReapInterval":"30s","CheckDeregisterIntervalMin":"1m0s","Other":3}}"#,
        )
        .unwrap();
        assert_eq!(
            me.debug_duration("CheckReapInterval"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            me.debug_duration("CheckDeregisterIntervalMin"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(me.debug_duration("Missing"), None);
        assert_eq!(me.config.version, "1.8.7");
    }
}
