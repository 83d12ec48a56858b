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
};

/// A service registration, as `PUT /v1/agent/service/register` takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentServiceRegistration {
    #[serde(rename = "ID", skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub meta: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub check: Option<AgentServiceCheck>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub checks: Vec<AgentServiceCheck>,
}

/// A check attached to a service registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentServiceCheck {
    #[serde(rename = "CheckID", skip_serializing_if = "Option::is_none", default)]
    pub check_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub interval: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timeout: Option<GoDuration>,
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none", default)]
    pub http: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none", default)]
    pub tcp: Option<String>,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none", default)]
    pub ttl: Option<GoDuration>,
    /// Initial status (`passing`, `warning`, `critical`); Consul's default is `critical`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub notes: Option<String>,
    /// Consul clamps this to at least its `CheckDeregisterIntervalMin` (1 minute).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deregister_critical_service_after: Option<GoDuration>,
}

/// A service as the agent holds it (`GET /v1/agent/services`), also the `Service` of a
/// health [`ServiceEntry`](crate::ServiceEntry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentService {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Option<Vec<String>>,
    pub meta: Option<BTreeMap<String, String>>,
    pub port: u16,
    pub address: String,
    pub datacenter: Option<String>,
    pub create_index: u64,
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
    pub config: AgentSelfConfig,
    /// The agent's runtime configuration, as Consul dumps it (keys vary by version).
    pub debug_config: serde_json::Map<String, serde_json::Value>,
}

/// The `Config` block of [`AgentSelf`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentSelfConfig {
    pub datacenter: String,
    pub node_name: String,
    #[serde(rename = "NodeID")]
    pub node_id: String,
    pub version: String,
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

    /// `GET /v1/agent/services`: every service registered with this agent, by ID.
    pub async fn services(&self) -> Result<BTreeMap<String, AgentService>> {
        let (services, _) = self.client.get(&["agent", "services"], &[], None).await?;
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

    /// `GET /v1/agent/checks`: every check of this agent, by check ID.
    pub async fn checks(&self) -> Result<BTreeMap<String, AgentCheck>> {
        let (checks, _) = self.client.get(&["agent", "checks"], &[], None).await?;
        Ok(checks)
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
                    "DeregisterCriticalServiceAfter": "1m30s"
                }
            })
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
