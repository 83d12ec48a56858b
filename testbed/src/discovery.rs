//! `testbed discovery`: how a client finds its servers, three experiments on the one contract.
//!
//! * `sources` ([`crate::sources`]) — every discovery source (health, catalog, agent list,
//!   prepared query, DNS) side by side through one SIGKILL, and the naive client;
//! * `elastic` ([`crate::elastic`]) — scale out and in under load: shares, propagation,
//!   nothing lost;
//! * `datacenters` ([`crate::datacenters`]) — failover to a second datacenter and back.

use consul_api::{GoDuration, PreparedQueryDefinition, QueryFailover, ServiceQuery};

use crate::{
    error::{Error, Result},
    experiment::{Plan, Suite, chosen},
};

/// The parts of `testbed discovery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Part {
    /// Every discovery source through one SIGKILL.
    Sources,
    /// Scale out and in under load.
    Elastic,
    /// Two datacenters: failover to dc2 and back.
    Datacenters,
}

/// `testbed discovery`: its parts and their settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Echo servers to start (the first one is killed).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=20))]
    servers: u16,
    /// How often the polled sources (agent list, prepared query, DNS) read.
    #[arg(long, default_value = "1s")]
    poll: GoDuration,
    /// How long after the kill to keep watching (the agent's list needs 60-95 s).
    #[arg(long, default_value = "110s")]
    horizon: GoDuration,
    /// Parts to run (comma-separated); all by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Part>,
}

impl Suite for Args {
    fn name(&self) -> &'static str {
        "discovery"
    }

    fn title(&self) -> String {
        "Every way to discover".into()
    }

    fn plans(&self) -> Result<Vec<Box<dyn Plan>>> {
        if self.poll.as_duration().is_zero() {
            return Err(Error::Setting("--poll must be above zero".into()));
        }
        Ok(chosen(
            &self.only,
            &[Part::Sources, Part::Elastic, Part::Datacenters],
        )
        .into_iter()
        .map(|part| -> Box<dyn Plan> {
            match part {
                Part::Sources => Box::new(crate::sources::SourcesConfig {
                    servers: usize::from(self.servers),
                    poll: self.poll,
                    horizon: self.horizon,
                    ..Default::default()
                }),
                Part::Elastic => Box::new(crate::elastic::ElasticConfig::default()),
                Part::Datacenters => Box::new(crate::datacenters::DatacentersConfig {
                    servers: 2,
                    poll: self.poll.as_duration(),
                }),
            }
        })
        .collect())
    }
}

/// Create the prepared query `name` over the passing instances of `service`, failing over to
/// the datacenters `failover` (none: no failover).
pub async fn create_query(
    client: &consul_api::Client,
    name: &str,
    service: &str,
    failover: &[&str],
) -> Result<()> {
    client
        .prepared_query()
        .create(&PreparedQueryDefinition {
            name: name.into(),
            service: ServiceQuery {
                service: service.into(),
                only_passing: true,
                failover: QueryFailover {
                    nearest_n: 0,
                    datacenters: failover.iter().map(|&dc| dc.to_owned()).collect(),
                },
                ..Default::default()
            },
        })
        .await?;
    Ok(())
}
