//! The health endpoints (`/v1/health/...`): which instances of a service are healthy, and the
//! state of checks. These are what discovery reads, usually as blocking queries.

use std::{borrow::Cow, collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

use crate::{
    agent::{AgentService, AgentWeights},
    client::{BodySink, Client},
    duration::GoDuration,
    error::Result,
    query::{QueryMeta, QueryOptions},
    skip::{self, decode_skipping},
};

/// A check's status, as Consul writes it (`passing`, `warning`, `critical`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// `passing`: healthy.
    Passing,
    /// `warning`: up but degraded (an HTTP check answered 429, or a TTL update said so).
    /// Not counted as passing by `?passing` queries.
    Warning,
    /// `critical`: failing, and the status a new check starts in unless its registration
    /// sets another. The default.
    #[default]
    Critical,
    /// `maintenance`: Go's `api` uses this name for an aggregated status. Consul 1.8 itself
    /// reports a maintenance check as `critical`.
    Maintenance,
    /// Any other string Consul sends; decoding never fails on a new status.
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
    /// `ID`: the node's UUID.
    #[serde(rename = "ID")]
    pub id: String,
    /// `Node`: the node's name.
    pub node: String,
    /// `Address`: the node's address, used for services registered without one.
    pub address: String,
    /// `Datacenter`: the node's datacenter.
    pub datacenter: String,
    /// `Meta`: node metadata; `None` when Consul sends `null`.
    pub meta: Option<BTreeMap<String, String>>,
}

/// A health check's state (`/v1/health/checks/...`, `/v1/health/state/...`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthCheck {
    /// `Node`: the name of the node the check runs on.
    pub node: String,
    /// `CheckID`: for example `serfHealth` (the node's own check), `service:<service ID>`,
    /// or `_service_maintenance:<service ID>` while the service is in maintenance.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// `Name`: the check's human-readable name.
    pub name: String,
    /// `Status`: the check's current status.
    pub status: HealthStatus,
    /// `Notes`: free text from the registration (a maintenance check holds its reason).
    pub notes: String,
    /// `Output`: what the last run said, for example the HTTP status line and body, or the
    /// output of the last TTL update.
    pub output: String,
    /// `ServiceID`: the service instance the check belongs to; empty for node checks.
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    /// `ServiceName`: that instance's service name; empty for node checks.
    pub service_name: String,
    /// `ServiceTags`; `None` when Consul sends `null`.
    pub service_tags: Option<Vec<String>>,
    /// `Type`: `http`, `tcp`, `ttl`, `maintenance`, ...; empty for `serfHealth`.
    #[serde(rename = "Type")]
    pub check_type: String,
    /// The check's definition. Consul 1.8 sends it empty: verify check settings by behaviour.
    pub definition: HealthCheckDefinition,
    /// `CreateIndex`: the Raft index at which the check was created.
    pub create_index: u64,
    /// `ModifyIndex`: the Raft index of the check's last change (a status change moves it).
    pub modify_index: u64,
}

/// The settings of a check, as newer Consul versions echo them back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthCheckDefinition {
    /// `HTTP`: the URL of an HTTP check.
    #[serde(rename = "HTTP")]
    pub http: Option<String>,
    /// `Interval`: how often the check runs.
    pub interval: Option<GoDuration>,
    /// `Timeout`: the check's timeout.
    pub timeout: Option<GoDuration>,
    /// `DeregisterCriticalServiceAfter`.
    pub deregister_critical_service_after: Option<GoDuration>,
}

/// One instance of a service with its node and checks (`/v1/health/service/:service`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceEntry {
    /// `Node`: the node the instance runs on.
    pub node: Node,
    /// `Service`: the instance itself (ID, name, address, port, tags, meta).
    pub service: AgentService,
    /// `Checks`: the node's checks (such as `serfHealth`) and the instance's own checks.
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

/// A `/v1/health/service/:service` answer, not decoded yet: the caller decodes what it needs
/// ([`ServiceAnswer::entries`], or a part of [`ServiceAnswer::body`] that changed since the
/// last answer). A full [`ServiceEntry`] carries tagged addresses, proxy and connect settings
/// and every check's output (1.1 KB an instance, 2.5 KB from a `-dev` agent, which indents
/// its JSON); discovery needs a tenth of it.
#[derive(Debug, Clone, Default)]
pub struct ServiceAnswer {
    body: Vec<u8>,
    path: String,
}

impl ServiceAnswer {
    /// An answer's raw JSON body, as read from `path` (for errors).
    pub fn new(body: Vec<u8>, path: impl Into<String>) -> Self {
        ServiceAnswer {
            body,
            path: path.into(),
        }
    }

    /// The raw JSON body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body, given up.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// The request path the answer came from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Every entry, decoded into views that borrow from the body (Consul sends `null` for
    /// no entry). An entry the views cannot hold (a foreign registration's `Port: 70000`) is
    /// left out, with a warning; the others are returned.
    pub fn entries(&self) -> Result<Vec<EntryView<'_>>> {
        let entries = decode_skipping::<Option<Vec<EntryView<'_>>>, EntryView<'_>>(
            "GET",
            &self.path,
            &self.body,
            skip::list,
            &mut |skipped| {
                tracing::warn!(
                    path = %self.path,
                    entry = %skipped.label,
                    "Consul's answer holds an entry that cannot be used, left out (the others \
                     are used; the registration that made it needs fixing): {}",
                    skipped.reason
                );
            },
        )?;
        Ok(entries.unwrap_or_default())
    }
}

/// What discovery needs of a health entry, borrowed from the answer's body: the node's name
/// and address, the service's ID, address, port, tags, meta and weights, and each check's
/// status. Everything else is skipped by the parser without being built.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EntryView<'a> {
    /// `Node`.
    #[serde(borrow)]
    pub node: NodeView<'a>,
    /// `Service`.
    #[serde(borrow)]
    pub service: ServiceView<'a>,
    /// `Checks`: their statuses only.
    pub checks: Vec<CheckView>,
}

impl EntryView<'_> {
    /// The address to dial: the service's own, or its node's when the service has none.
    pub fn address(&self) -> &str {
        if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        }
    }

    /// Whether every check passes (no check: passing).
    pub fn passing(&self) -> bool {
        self.checks
            .iter()
            .all(|c| c.status == HealthStatus::Passing)
    }
}

/// The part of a [`Node`] discovery reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NodeView<'a> {
    /// `Node`: the node's name.
    #[serde(borrow)]
    pub node: Cow<'a, str>,
    /// `Address`.
    #[serde(borrow)]
    pub address: Cow<'a, str>,
}

/// The part of an [`AgentService`] discovery reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceView<'a> {
    /// `ID`.
    #[serde(rename = "ID", borrow)]
    pub id: Cow<'a, str>,
    /// `Address`; empty when the service uses its node's.
    #[serde(borrow)]
    pub address: Cow<'a, str>,
    /// `Port`.
    pub port: u16,
    /// `Tags`; `None` when Consul sends `null`.
    #[serde(borrow)]
    pub tags: Option<Vec<Cow<'a, str>>>,
    /// `Meta`; `None` when Consul sends `null`.
    #[serde(borrow)]
    pub meta: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
    /// `Weights`.
    pub weights: Option<AgentWeights>,
}

/// The part of a [`HealthCheck`] discovery reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CheckView {
    /// `Status`.
    pub status: HealthStatus,
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
    /// An entry our types cannot hold (a foreign registration's `Port: 70000`) is left out
    /// and logged; the others are returned.
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
            .get_entries::<_, ServiceEntry>(
                &["health", "service", service],
                &params,
                Some(opts),
                skip::list,
            )
            .await?;
        Ok((entries.unwrap_or_default(), meta))
    }

    /// Like [`service`](Self::service), the answer left undecoded ([`ServiceAnswer`]): for
    /// callers that decode only what they need, or only what changed.
    pub async fn service_answer(
        &self,
        service: &str,
        tag: Option<&str>,
        passing_only: bool,
        opts: &QueryOptions,
    ) -> Result<(ServiceAnswer, QueryMeta)> {
        let mut body = Vec::new();
        let (meta, path) = self
            .service_answer_to(service, tag, passing_only, opts, &mut body)
            .await?;
        Ok((ServiceAnswer::new(body, path), meta))
    }

    /// Like [`service_answer`](Self::service_answer), the body handed to `sink` as it arrives
    /// (a successful answer's only); with the request path, for errors. A caller following
    /// thousands of instances decodes a 12 MB answer while it arrives, each chunk while it is
    /// still in the CPU's cache, instead of after it.
    pub async fn service_answer_to(
        &self,
        service: &str,
        tag: Option<&str>,
        passing_only: bool,
        opts: &QueryOptions,
        sink: &mut dyn BodySink,
    ) -> Result<(QueryMeta, String)> {
        let mut params = Vec::new();
        if let Some(tag) = tag {
            params.push(("tag", tag.to_owned()));
        }
        if passing_only {
            params.push(("passing", String::new()));
        }
        self.client
            .get_to(&["health", "service", service], &params, Some(opts), sink)
            .await
    }

    /// `GET /v1/health/checks/:service`: the checks of every instance of a service.
    pub async fn checks(
        &self,
        service: &str,
        opts: &QueryOptions,
    ) -> Result<(Vec<HealthCheck>, QueryMeta)> {
        let (checks, meta): (Option<Vec<HealthCheck>>, _) = self
            .client
            .get_entries::<_, HealthCheck>(
                &["health", "checks", service],
                &[],
                Some(opts),
                skip::list,
            )
            .await?;
        Ok((checks.unwrap_or_default(), meta))
    }

    /// `GET /v1/health/node/:node`: every check of one node (its `serfHealth` and the checks
    /// of the services it holds), as the catalog has them. Blocks on `opts.wait_index`; the
    /// agent's own `/v1/agent/checks` does not block at all in Consul 1.8.
    pub async fn node(
        &self,
        node: &str,
        opts: &QueryOptions,
    ) -> Result<(Vec<HealthCheck>, QueryMeta)> {
        let (checks, meta): (Option<Vec<HealthCheck>>, _) = self
            .client
            .get_entries::<_, HealthCheck>(&["health", "node", node], &[], Some(opts), skip::list)
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
            .get_entries::<_, HealthCheck>(&["health", "state", state], &[], Some(opts), skip::list)
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
