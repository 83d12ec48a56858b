//! A client that discovers a service's passing instances through Consul (blocking queries)
//! and balances GET requests over them through a [`Pool`], failing over to another instance
//! on any error: the failed one is held out, the request tried elsewhere.
//!
//!     cargo run -p consul-registry --example failover_client -- hello 10
//!
//! Try it against two `http_service` (or `ttl_service`) instances and stop one of them
//! mid-way.

use std::time::Duration;

use consul_api::Client;
use consul_registry::{DiscoveryConfig, Instance, Pool, PoolConfig};
use tokio::time::Instant;

/// One GET through the pool: the instance that answered and its body. Each failed instance
/// is reported (held out for a while) and another tried, until `deadline`.
pub async fn get(
    http: &reqwest::Client,
    pool: &Pool,
    deadline: Instant,
) -> anyhow::Result<(Instance, String)> {
    let mut tried = Vec::new();
    loop {
        let pick = pool.pick_except(deadline, &tried).await?;
        let url = format!("http://{}/", pick.instance().address());
        let answer = async {
            let response = http
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await?;
            response.error_for_status()?.text().await
        };
        match answer.await {
            Ok(body) => {
                let instance = pick.instance().clone();
                pick.succeeded();
                return Ok((instance, body));
            }
            Err(e) => {
                eprintln!("{}: {e}", pick.instance());
                tried.push(pick.instance().address());
                pick.failed();
            }
        }
    }
}

#[allow(dead_code)] // a test includes this file and calls `get` itself
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = std::env::args().nth(1).unwrap_or_else(|| "hello".into());
    let count: u32 = std::env::args().nth(2).map_or(Ok(10), |n| n.parse())?;
    let pool = Pool::discover(
        Client::from_env()?,
        DiscoveryConfig::new(service),
        PoolConfig::default(),
    );
    let http = reqwest::Client::new();
    for _ in 0..count {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (instance, body) = get(&http, &pool, deadline).await?;
        print!("{instance}: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
