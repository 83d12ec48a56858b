//! The health endpoints (`/v1/health/...`): which instances of a service are healthy, and the
//! state of checks. These are what discovery reads, usually as blocking queries.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

use crate::{
    agent::AgentService,
    client::Client,
    duration::GoDuration,
    error::Result,
    query::{QueryMeta, QueryOptions},
};

/// A check's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Passing,
    Warning,
    #[default]
    Critical,
    Maintenance,
    #[serde(other)]
    Unknown,
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthStatus::Passing => "passing",
            HealthStatus::Warning => "warning",
            HealthStatus::Critical => "critical",
            HealthStatus::Maintenance => "maintenance",
            HealthStatus::Unknown => "unknown",
        })
    }
}

/// A node, as health and catalog answers embed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub meta: Option<BTreeMap<String, String>>,
}

/// A health check's state (`/v1/health/checks/...`, `/v1/health/state/...`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthCheck {
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub status: HealthStatus,
    pub notes: String,
    pub output: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Option<Vec<String>>,
    #[serde(rename = "Type")]
    pub check_type: String,
    /// The check's definition. Consul 1.8 sends it empty: verify check settings by behaviour.
    pub definition: HealthCheckDefinition,
    pub create_index: u64,
    pub modify_index: u64,
}

/// The settings of a check, as newer Consul versions echo them back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthCheckDefinition {
    #[serde(rename = "HTTP")]
    pub http: Option<String>,
    pub interval: Option<GoDuration>,
    pub timeout: Option<GoDuration>,
    pub deregister_critical_service_after: Option<GoDuration>,
}

/// One instance of a service with its node and checks (`/v1/health/service/:service`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceEntry {
    pub node: Node,
    pub service: AgentService,
    pub checks: Vec<HealthCheck>,
}

impl ServiceEntry {
    /// The address to dial: the service's own, or its node's when the service has none.
    pub fn address(&self) -> &str {
        if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        }
    }

    /// The worst status among the entry's checks (passing when it has none).
    pub fn aggregated_status(&self) -> HealthStatus {
        let rank = |s: HealthStatus| match s {
            HealthStatus::Passing => 0,
            HealthStatus::Warning => 1,
            HealthStatus::Critical | HealthStatus::Unknown => 2,
            HealthStatus::Maintenance => 3,
        };
        self.checks
            .iter()
            .map(|c| c.status)
            .max_by_key(|s| rank(*s))
            .unwrap_or(HealthStatus::Passing)
    }
}

/// The health endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Health<'a> {
    client: &'a Client,
}

impl<'a> Health<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        Health { client }
    }

    /// `GET /v1/health/service/:service`: the service's instances with their checks; with
    /// `passing_only`, only instances whose every check passes. Blocks on `opts.wait_index`.
    pub async fn service(
        &self,
        service: &str,
        tag: Option<&str>,
        passing_only: bool,
        opts: &QueryOptions,
    ) -> Result<(Vec<ServiceEntry>, QueryMeta)> {
        let mut params = Vec::new();
        if let Some(tag) = tag {
            params.push(("tag", tag.to_owned()));
        }
        if passing_only {
            params.push(("passing", String::new()));
        }
        let (entries, meta): (Option<Vec<ServiceEntry>>, _) = self
            .client
            .get(&["health", "service", service], &params, Some(opts))
            .await?;
        Ok((entries.unwrap_or_default(), meta))
    }

    /// `GET /v1/health/checks/:service`: the checks of every instance of a service.
    pub async fn checks(
        &self,
        service: &str,
        opts: &QueryOptions,
    ) -> Result<(Vec<HealthCheck>, QueryMeta)> {
        let (checks, meta): (Option<Vec<HealthCheck>>, _) = self
            .client
            .get(&["health", "checks", service], &[], Some(opts))
            .await?;
        Ok((checks.unwrap_or_default(), meta))
    }

    /// `GET /v1/health/state/:state`: every check in a state (`any`, `passing`, `warning`,
    /// `critical`).
    pub async fn state(
        &self,
        state: &str,
        opts: &QueryOptions,
    ) -> Result<(Vec<HealthCheck>, QueryMeta)> {
        let (checks, meta): (Option<Vec<HealthCheck>>, _) = self
            .client
            .get(&["health", "state", state], &[], Some(opts))
            .await?;
        Ok((checks.unwrap_or_default(), meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = r#"{
        "Node": {"ID": "n1", "Node": "vm", "Address": "127.0.0.1", "Datacenter": "dc1",
                 "TaggedAddresses": {"lan": "127.0.0.1"}, "Meta": null,
                 "CreateIndex": 5, "ModifyIndex": 6},
        "Service": {"ID": "servernode_1", "Service": "servernode", "Tags": ["servernode"],
                    "Address": "", "Meta": {"version": "0.1.0"}, "Port": 9527,
                    "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false,
                    "CreateIndex": 10, "ModifyIndex": 10},
        "Checks": [
            {"Node": "vm", "CheckID": "serfHealth", "Name": "Serf Health Status",
             "Status": "passing", "ServiceID": "", "Type": "", "Definition": {}},
            {"Node": "vm", "CheckID": "service:servernode_1", "Status": "critical",
             "ServiceID": "servernode_1", "ServiceName": "servernode", "Type": "http",
             "Definition": {}, "Output": "connection refused"}
        ]
    }"#;

    #[test]
    fn decodes_a_consul_1_8_entry() {
        let entry: ServiceEntry = serde_json::from_str(ENTRY).unwrap();
        assert_eq!(
            entry.address(),
            "127.0.0.1",
            "falls back to the node address"
        );
        assert_eq!(entry.service.port, 9527);
        assert_eq!(entry.aggregated_status(), HealthStatus::Critical);
        assert_eq!(entry.checks[1].definition, HealthCheckDefinition::default());
    }

    #[test]
    fn decodes_newer_definitions_and_unknown_statuses() {
        let check: HealthCheck = serde_json::from_str(
            r#"{"Status": "bogus", "Definition": {"HTTP": "http://x/check", "Interval": "5s",
                "Timeout": "3s", "DeregisterCriticalServiceAfter": "30s"}}"#,
        )
        .unwrap();
        assert_eq!(check.status, HealthStatus::Unknown);
        assert_eq!(
            check.definition.deregister_critical_service_after,
            Some(GoDuration::from_secs(30))
        );
    }
}
