//! The catalog endpoints (`/v1/catalog/...`): what the servers know of every service,
//! regardless of health, and direct registration of a node and its service (an external
//! service, or an instance on another node).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    agent::AgentWeights,
    client::Client,
    error::Result,
    query::{QueryMeta, QueryOptions},
    skip,
};

/// One instance of a service in the catalog (`/v1/catalog/service/:service`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CatalogService {
    /// `ID`: the UUID of the node the instance runs on (not the service's ID).
    #[serde(rename = "ID")]
    pub id: String,
    /// `Node`: the node's name.
    pub node: String,
    /// `Address`: the node's address.
    pub address: String,
    /// `Datacenter`: the node's datacenter.
    pub datacenter: String,
    /// `ServiceID`: the instance's ID.
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    /// `ServiceName`: the service name.
    pub service_name: String,
    /// `ServiceAddress`: the instance's address; empty means the node's `address`.
    pub service_address: String,
    /// `ServicePort`: the instance's port; 0 when it registered none.
    pub service_port: u16,
    /// `ServiceTags`; `None` when Consul sends `null`.
    pub service_tags: Option<Vec<String>>,
    /// `ServiceMeta`; `None` when Consul sends `null`.
    pub service_meta: Option<BTreeMap<String, String>>,
    /// `ServiceWeights`; `None` when Consul sends `null` or leaves it out.
    pub service_weights: Option<AgentWeights>,
    /// `CreateIndex`: the Raft index at which the entry was created.
    pub create_index: u64,
    /// `ModifyIndex`: the Raft index of the entry's last change.
    pub modify_index: u64,
}

/// A registration as `PUT /v1/catalog/register` takes it: a node (created if new), a
/// service on it, and a check (as an external monitor such as consul-esm registers one). A
/// node registered this way has no `serfHealth` check: without a check of its own its
/// services count as passing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogRegistration {
    /// `Node`: the node's name (created if Consul does not know it).
    pub node: String,
    /// `Address`: the node's address.
    pub address: String,
    /// `Service`: a service to register on the node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<CatalogServiceRegistration>,
    /// `Check`: a check on the node, or on its service when `service_id` names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<CatalogCheckRegistration>,
}

/// The check of a [`CatalogRegistration`]. The catalog stores its `Status` as sent: unlike
/// the agent's endpoints, it does not refuse a status Consul does not know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogCheckRegistration {
    /// `CheckID`: unique on its node.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// `Name`.
    pub name: String,
    /// `Status`: `passing`, `warning` or `critical` (empty: `critical`).
    pub status: String,
    /// `ServiceID`: the instance it belongs to; empty for a node check.
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    /// `Output`.
    pub output: String,
}

/// The service of a [`CatalogRegistration`] (Consul decodes it strictly: only these fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogServiceRegistration {
    /// `ID`: the instance's ID, unique on its node.
    #[serde(rename = "ID")]
    pub id: String,
    /// `Service`: the service name.
    pub service: String,
    /// `Tags`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// `Address`: where to dial it (empty: the node's address).
    pub address: String,
    /// `Port`.
    pub port: u16,
}

/// The catalog endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Catalog<'a> {
    client: &'a Client,
}

impl<'a> Catalog<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        Catalog { client }
    }

    /// `GET /v1/catalog/service/:service`: every instance, healthy or not (one our types
    /// cannot hold, such as a `ServicePort` of 70000, left out and logged).
    pub async fn service(
        &self,
        service: &str,
        tag: Option<&str>,
        opts: &QueryOptions,
    ) -> Result<(Vec<CatalogService>, QueryMeta)> {
        let params: Vec<_> = tag.map(|t| ("tag", t.to_owned())).into_iter().collect();
        let (services, meta): (Option<Vec<CatalogService>>, _) = self
            .client
            .get_entries::<_, CatalogService>(
                &["catalog", "service", service],
                &params,
                Some(opts),
                skip::list,
            )
            .await?;
        Ok((services.unwrap_or_default(), meta))
    }

    /// `PUT /v1/catalog/register`: add or update a node and its service.
    pub async fn register(&self, registration: &CatalogRegistration) -> Result<()> {
        self.client
            .put(&["catalog", "register"], &[], Some(registration))
            .await
            .map(drop)
    }

    /// `PUT /v1/catalog/deregister`: remove a node, with its services and checks.
    pub async fn deregister_node(&self, node: &str) -> Result<()> {
        #[derive(Serialize)]
        struct Deregistration<'a> {
            #[serde(rename = "Node")]
            node: &'a str,
        }
        self.client
            .put(
                &["catalog", "deregister"],
                &[],
                Some(&Deregistration { node }),
            )
            .await
            .map(drop)
    }

    /// `GET /v1/catalog/datacenters`: every datacenter the agent's servers know over the
    /// WAN, nearest first.
    pub async fn datacenters(&self) -> Result<Vec<String>> {
        let (dcs, _): (Vec<String>, _) = self
            .client
            .get(&["catalog", "datacenters"], &[], None)
            .await?;
        Ok(dcs)
    }

    /// `GET /v1/catalog/services`: every service name with its tags.
    pub async fn services(
        &self,
        opts: &QueryOptions,
    ) -> Result<(BTreeMap<String, Vec<String>>, QueryMeta)> {
        self.client
            .get(&["catalog", "services"], &[], Some(opts))
            .await
    }
}
