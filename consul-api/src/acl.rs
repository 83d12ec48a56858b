//! The ACL endpoints (`/v1/acl/...`): just enough to create policies and tokens, so that
//! scenarios can run Consul with `default_policy = "deny"`.

use serde::{Deserialize, Serialize};

use crate::{client::Client, error::Result};

/// An ACL policy (`PUT /v1/acl/policy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AclPolicy {
    /// `ID`: assigned by Consul; leave empty when creating.
    #[serde(rename = "ID", skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// `Name`: unique among policies; tokens can link to it by name.
    pub name: String,
    /// `Description`: free text.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// HCL rules, for example `service "web" { policy = "write" }`.
    pub rules: String,
}

/// A reference to a policy from a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AclPolicyLink {
    /// `ID`: the policy's ID; give this or `name`.
    #[serde(rename = "ID", skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// `Name`: the policy's name; give this or `id`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// An ACL token (`PUT /v1/acl/token`).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AclToken {
    /// `AccessorID`: the token's public ID, safe to log; assigned by Consul when empty.
    #[serde(rename = "AccessorID", skip_serializing_if = "String::is_empty")]
    pub accessor_id: String,
    /// The secret sent as `X-Consul-Token`. Not printed by `Debug`.
    #[serde(rename = "SecretID", skip_serializing_if = "String::is_empty")]
    pub secret_id: String,
    /// `Description`: free text.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// `Policies`: the policies whose rules the token grants.
    pub policies: Vec<AclPolicyLink>,
    /// `Local`: valid only in the datacenter that created it (not replicated).
    pub local: bool,
}

impl std::fmt::Debug for AclToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclToken")
            .field("accessor_id", &self.accessor_id)
            .field("secret_id", &"<redacted>")
            .field("description", &self.description)
            .field("policies", &self.policies)
            .finish()
    }
}

/// The ACL endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Acl<'a> {
    client: &'a Client,
}

impl<'a> Acl<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        Acl { client }
    }

    /// `PUT /v1/acl/policy`: create a policy; returns it with its ID.
    pub async fn policy_create(&self, policy: &AclPolicy) -> Result<AclPolicy> {
        self.client.put_json(&["acl", "policy"], policy).await
    }

    /// `PUT /v1/acl/policy/:id`: replace the policy with ID `policy.id` (its rules, say);
    /// returns it as stored.
    pub async fn policy_update(&self, policy: &AclPolicy) -> Result<AclPolicy> {
        self.client
            .put_json(&["acl", "policy", &policy.id], policy)
            .await
    }

    /// `PUT /v1/acl/token`: create a token; returns it with its secret.
    pub async fn token_create(&self, token: &AclToken) -> Result<AclToken> {
        self.client.put_json(&["acl", "token"], token).await
    }

    /// `DELETE /v1/acl/token/:accessor_id`: revoke a token.
    pub async fn token_delete(&self, accessor_id: &str) -> Result<()> {
        self.client
            .delete(&["acl", "token", accessor_id])
            .await
            .map(drop)
    }
}
