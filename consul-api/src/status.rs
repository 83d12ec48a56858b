//! The status endpoints (`/v1/status/...`): is there a Raft leader, and who are the peers.

use crate::{client::Client, error::Result};

/// The status endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Status<'a> {
    client: &'a Client,
}

impl<'a> Status<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        Status { client }
    }

    /// `GET /v1/status/leader`: the leader's `ip:port`, empty while there is none.
    pub async fn leader(&self) -> Result<String> {
        let (leader, _) = self.client.get(&["status", "leader"], &[], None).await?;
        Ok(leader)
    }

    /// `GET /v1/status/peers`: the Raft peers' addresses.
    pub async fn peers(&self) -> Result<Vec<String>> {
        let (peers, _) = self.client.get(&["status", "peers"], &[], None).await?;
        Ok(peers)
    }
}
