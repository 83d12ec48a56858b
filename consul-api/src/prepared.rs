//! Prepared queries (`/v1/query`): a named, stored service query that Consul executes on
//! request, with failover to other datacenters when the local one has no instance left. Their
//! execution cannot block: whoever follows one must poll it.

use serde::{Deserialize, Serialize};

use crate::{
    client::Client,
    error::Result,
    health::ServiceEntry,
    query::{QueryMeta, QueryOptions},
    skip,
};

/// A prepared query as `POST /v1/query` takes it (the fields this workspace uses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PreparedQueryDefinition {
    /// `Name`: what to execute it by (`/v1/query/<name>/execute`, `<name>.query.consul`).
    pub name: String,
    /// `Service`: what it looks for.
    pub service: ServiceQuery,
}

/// The service part of a prepared query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceQuery {
    /// `Service`: the service name.
    pub service: String,
    /// `Failover`: where to look when the local datacenter has no instance after filtering.
    pub failover: QueryFailover,
    /// `OnlyPassing`: drop instances with a warning check too (critical ones are always
    /// dropped).
    pub only_passing: bool,
    /// `Tags`: required tags (`!tag` excludes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// `Failover` of a [`ServiceQuery`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct QueryFailover {
    /// `NearestN`: try this many datacenters, nearest first by network coordinates.
    #[serde(rename = "NearestN")]
    pub nearest_n: u32,
    /// `Datacenters`: then these, in this order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub datacenters: Vec<String>,
}

/// The answer of `GET /v1/query/<name>/execute`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PreparedQueryExecuteResponse {
    /// `Service`: the service name the query looked for.
    pub service: String,
    /// `Nodes`: the instances, healthy by the query's rules, shuffled.
    pub nodes: Vec<ServiceEntry>,
    /// `Datacenter`: where they came from (another one after a failover).
    pub datacenter: String,
    /// `Failovers`: how many other datacenters were tried.
    pub failovers: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Created {
    #[serde(rename = "ID")]
    id: String,
}

/// The prepared-query endpoints.
#[derive(Debug, Clone, Copy)]
pub struct PreparedQuery<'a> {
    client: &'a Client,
}

impl<'a> PreparedQuery<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        PreparedQuery { client }
    }

    /// `POST /v1/query`: store a query; returns its ID.
    pub async fn create(&self, definition: &PreparedQueryDefinition) -> Result<String> {
        let created: Created = self.client.post_json(&["query"], definition).await?;
        Ok(created.id)
    }

    /// `DELETE /v1/query/<id>`.
    pub async fn delete(&self, id: &str) -> Result<()> {
        self.client.delete(&["query", id]).await.map(drop)
    }

    /// `GET /v1/query/<id or name>/execute`. Does not block (Consul ignores `index`): poll
    /// it. An unknown name is a 404 ([`crate::Error::is_not_found`]). An entry of `Nodes` our
    /// types cannot hold is left out and logged.
    pub async fn execute(
        &self,
        id_or_name: &str,
        opts: &QueryOptions,
    ) -> Result<(PreparedQueryExecuteResponse, QueryMeta)> {
        let opts = QueryOptions {
            wait_index: 0,
            wait_hash: None,
            ..opts.clone()
        };
        self.client
            .get_entries::<_, ServiceEntry>(
                &["query", id_or_name, "execute"],
                &[],
                Some(&opts),
                nodes,
            )
            .await
    }
}

/// Where an execution's entries are: its `Nodes`.
fn nodes(answer: &mut serde_json::Value) -> Option<&mut serde_json::Value> {
    answer.get_mut("Nodes").and_then(skip::list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_uses_consuls_names() {
        let q = PreparedQueryDefinition {
            name: "web".into(),
            service: ServiceQuery {
                service: "servernode".into(),
                failover: QueryFailover {
                    nearest_n: 0,
                    datacenters: vec!["dc2".into()],
                },
                only_passing: true,
                tags: Vec::new(),
            },
        };
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(json["Name"], "web");
        assert_eq!(json["Service"]["Service"], "servernode");
        assert_eq!(json["Service"]["Failover"]["NearestN"], 0);
        assert_eq!(json["Service"]["Failover"]["Datacenters"][0], "dc2");
        assert_eq!(json["Service"]["OnlyPassing"], true);
        assert!(json["Service"].get("Tags").is_none());
    }

    #[test]
    fn an_execution_leaves_out_an_entry_out_of_range() {
        let body = br#"{"Service": "web", "Datacenter": "dc1", "Failovers": 0, "Nodes": [
            {"Node": {"Node": "n1"}, "Service": {"ID": "bad", "Port": 70000}, "Checks": []},
            {"Node": {"Node": "n1"}, "Service": {"ID": "good", "Port": 80}, "Checks": []}]}"#;
        let mut skipped = Vec::new();
        let r = crate::skip::decode_skipping::<PreparedQueryExecuteResponse, ServiceEntry>(
            "GET",
            "/v1/query/web/execute",
            body,
            nodes,
            &mut |s| skipped.push(s.label),
        )
        .unwrap();
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.nodes[0].service.id, "good");
        assert_eq!(r.datacenter, "dc1");
        assert_eq!(skipped, [r#""bad" on node "n1""#]);
    }

    #[test]
    fn decodes_an_execution() {
        let r: PreparedQueryExecuteResponse = serde_json::from_str(
            r#"{"Service": "servernode", "Nodes": [{"Node": {"Node": "n2", "Address": "127.0.0.2"},
                "Service": {"ID": "s1", "Service": "servernode", "Port": 9000}, "Checks": []}],
                "DNS": {"TTL": ""}, "Datacenter": "dc2", "Failovers": 1}"#,
        )
        .unwrap();
        assert_eq!(r.datacenter, "dc2");
        assert_eq!(r.failovers, 1);
        assert_eq!(r.nodes[0].address(), "127.0.0.2");
    }
}
