//! A client that discovers a service's passing instances through Consul (blocking queries)
//! and balances GET requests over them, failing over to another instance on any error.
//!
//!     cargo run -p consul-registry --example failover_client -- hello 10
//!
//! Try it against two `ttl_service` instances and stop one of them mid-way.

use std::time::Duration;

use consul_api::Client;
use consul_registry::{Balancer, DiscoveryConfig, Instance, Snapshot, Strategy, discovery};
use tokio::{sync::watch, time::Instant};

/// One GET through the balancer: the instance that answered and its body. Each failed
/// instance is ejected for a cooldown and the next one tried, until `deadline`.
pub async fn get(
    http: &reqwest::Client,
    balancer: &mut Balancer,
    snapshots: &mut watch::Receiver<Snapshot>,
    deadline: Instant,
) -> anyhow::Result<(Instance, String)> {
    loop {
        if snapshots.has_changed()? {
            balancer.update(&snapshots.borrow_and_update().instances);
        }
        let Some(instance) = balancer.pick(Instant::now()) else {
            // Nothing usable: wait for discovery to change (or a cooldown to end).
            let until = balancer
                .next_unejection(Instant::now())
                .unwrap_or(deadline)
                .min(deadline);
            tokio::select! {
                changed = snapshots.changed() => {
                    changed?;
                    balancer.update(&snapshots.borrow_and_update().instances);
                }
                () = tokio::time::sleep_until(until) => {}
            }
            anyhow::ensure!(Instant::now() < deadline, "no instance answered in time");
            continue;
        };
        let url = format!("http://{}/", instance.address());
        let started = Instant::now();
        match http.get(&url).timeout(Duration::from_secs(1)).send().await {
            Ok(response) if response.status().is_success() => {
                balancer.succeeded(&instance, started.elapsed());
                return Ok((instance, response.text().await?));
            }
            Ok(response) => eprintln!("{instance}: {}", response.status()),
            Err(e) => eprintln!("{instance}: {e}"),
        }
        balancer.eject(&instance, Instant::now());
    }
}

#[allow(dead_code)] // a test includes this file and calls `get` itself
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = std::env::args().nth(1).unwrap_or_else(|| "hello".into());
    let count: u32 = std::env::args().nth(2).map_or(Ok(10), |n| n.parse())?;
    let mut snapshots = discovery::spawn(Client::from_env()?, DiscoveryConfig::new(service));
    let mut balancer = Balancer::new(Strategy::RoundRobin, Duration::from_secs(2));
    let http = reqwest::Client::new();
    for _ in 0..count {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (instance, body) = get(&http, &mut balancer, &mut snapshots, deadline).await?;
        print!("{instance}: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
