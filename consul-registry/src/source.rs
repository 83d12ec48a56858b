//! Where discovery learns a service's instances: every way Consul offers, behind one loop.
//!
//! Discovery ([`crate::discovery`]) runs the same loop, the same error handling and publishes
//! the same [`Snapshot`](crate::discovery::Snapshot)s whatever the [`Source`]; the session on
//! top (failover, balancing) never knows which one it reads. What differs is what each source
//! tells, and how fast:
//!
//! | source | what it lists | how it follows changes |
//! |---|---|---|
//! | [`Source::Health`] | passing instances (`/v1/health/service/<name>?passing`) | blocking query |
//! | [`Source::Catalog`] | every registered instance, healthy or not | blocking query |
//! | [`Source::Agent`] | the local agent's own registrations, healthy or not (the naive way) | polled |
//! | [`Source::PreparedQuery`] | a prepared query's answer, failing over to other datacenters | polled |
//! | [`Source::Dns`] | SRV records of the agent's DNS interface (critical ones dropped) | polled |
//!
//! Prepared-query execution and the agent's list cannot block, and DNS has no index: those
//! are polled at a stated rate ([`consul_api::Watch::poll`]). DNS is asked over TCP: a UDP
//! answer carries at most 3 records (Consul's `udp_answer_limit`), a TCP one every instance up
//! to 64 KiB; Consul's DNS TTL is 0, so nothing is cached in between.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use consul_api::{
    Client, QueryMeta, QueryOptions, Watch,
    error::{Error as ConsulError, Result as ConsulResult},
};
use hickory_resolver::{
    Resolver, TokioResolver,
    config::{NameServerConfig, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
    proto::{
        ProtoErrorKind,
        rr::{RData, RecordType},
        xfer::Protocol,
    },
};

use crate::{
    decode::Decoder,
    discovery::{DiscoveryConfig, Instance},
};

/// Which of Consul's interfaces discovery reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Source {
    /// `/v1/health/service/<name>?passing`, blocking: only instances whose every check (and
    /// their node's `serfHealth`) passes. The default, and the one to use.
    #[default]
    Health,
    /// `/v1/catalog/service/<name>`, blocking: every registered instance, whatever its
    /// health. Only the balancer's ejection keeps failing ones from being used.
    Catalog,
    /// `/v1/agent/services` of the agent the client talks to, polled every `every`: that
    /// agent's own registrations, whatever their health, until the agent removes them (the
    /// seed article's client).
    Agent {
        /// How often to read the list.
        every: Duration,
    },
    /// `/v1/query/<name>/execute`, polled every `every`: a prepared query's answer, which
    /// fails over to other datacenters when the local one has no instance.
    PreparedQuery {
        /// The query's name (or ID).
        name: String,
        /// How often to execute it.
        every: Duration,
    },
    /// SRV records from the agent's DNS interface (`<tag>.<service>.service[.<dc>].consul`,
    /// or `<query>.query.consul`), over TCP, polled every `every`.
    Dns {
        /// The agent's DNS address (Consul's default port is 8600).
        server: SocketAddr,
        /// A prepared query to resolve instead of the service (`<query>.query.consul`).
        query: Option<String>,
        /// How often to resolve.
        every: Duration,
    },
}

impl Source {
    /// A short name for reports and logs: `health`, `catalog`, `agent`, `query`, `dns`.
    pub fn name(&self) -> &'static str {
        match self {
            Source::Health => "health",
            Source::Catalog => "catalog",
            Source::Agent { .. } => "agent",
            Source::PreparedQuery { .. } => "query",
            Source::Dns { .. } => "dns",
        }
    }

    /// The watch that drives this source: blocking for health and catalog, polling otherwise.
    pub(crate) fn watch(&self, base: QueryOptions, wait: Duration) -> Watch {
        match self {
            Source::Health | Source::Catalog => Watch::new(base, wait),
            Source::Agent { every }
            | Source::PreparedQuery { every, .. }
            | Source::Dns { every, .. } => Watch::poll(base, *every),
        }
    }
}

/// One read of a source: its instances, and the answer's metadata (index 0 for DNS).
pub(crate) type Read = ConsulResult<(Vec<Arc<Instance>>, QueryMeta)>;

/// The reader of one source, made once per discovery task.
#[derive(Debug, Clone)]
pub(crate) enum Reader {
    Consul {
        client: Client,
        config: DiscoveryConfig,
        /// Health answers decoded by what changed (one read at a time, so never contended;
        /// held while an answer arrives).
        decoder: Arc<tokio::sync::Mutex<Decoder>>,
    },
    Dns {
        resolver: Box<TokioResolver>,
        server: SocketAddr,
        name: String,
    },
}

impl Reader {
    /// The reader of `config.source` through `client`.
    pub(crate) fn new(client: Client, config: DiscoveryConfig) -> Self {
        match &config.source {
            Source::Dns {
                server,
                query,
                every: _,
            } => Reader::Dns {
                resolver: Box::new(dns_resolver(*server)),
                server: *server,
                name: dns_name(&config, query.as_deref()),
            },
            _ => Reader::Consul {
                client,
                config,
                decoder: Arc::default(),
            },
        }
    }

    /// Read once.
    pub(crate) async fn read(&self, opts: QueryOptions) -> Read {
        match self {
            Reader::Consul {
                client,
                config,
                decoder,
            } => read_consul(client, config, decoder, opts).await,
            Reader::Dns {
                resolver,
                server,
                name,
            } => read_dns(resolver, *server, name).await,
        }
    }
}

async fn read_consul(
    client: &Client,
    config: &DiscoveryConfig,
    decoder: &tokio::sync::Mutex<Decoder>,
    opts: QueryOptions,
) -> Read {
    let service = config.service.as_str();
    let tag = config.tag.as_deref();
    match &config.source {
        Source::Health => {
            // Decoded as it arrives: by the time the last chunk is in, all but the last
            // chunk's entries have been compared (or parsed).
            let mut decoder = decoder.lock().await;
            let mut decoding = decoder.start();
            let (meta, path) = client
                .health()
                .service_answer_to(service, tag, true, &opts, &mut decoding)
                .await?;
            Ok((decoding.finish(&path)?, meta))
        }
        Source::Catalog => {
            let (entries, meta) = client.catalog().service(service, tag, &opts).await?;
            let instances = entries
                .iter()
                .map(|e| Instance {
                    id: e.service_id.clone(),
                    node: e.node.clone(),
                    host: if e.service_address.is_empty() {
                        e.address.clone()
                    } else {
                        e.service_address.clone()
                    },
                    port: e.service_port,
                    tags: e.service_tags.clone().unwrap_or_default(),
                    meta: e.service_meta.clone().unwrap_or_default(),
                    weight: 1,
                })
                .map(Arc::new)
                .collect();
            Ok((instances, meta))
        }
        Source::Agent { .. } => {
            let services = client.agent().services().await?;
            let instances = services
                .values()
                .filter(|s| s.service == service)
                .filter(|s| tag.is_none_or(|t| s.tags().iter().any(|x| x == t)))
                .map(|s| Instance {
                    id: s.id.clone(),
                    node: String::new(),
                    // The agent's list has no node address: a service registered without
                    // one is on the agent's own host, which the client dials.
                    host: if s.address.is_empty() {
                        client
                            .base_url()
                            .host_str()
                            .unwrap_or("127.0.0.1")
                            .to_owned()
                    } else {
                        s.address.clone()
                    },
                    port: s.port,
                    tags: s.tags().to_vec(),
                    meta: s.meta.clone().unwrap_or_default(),
                    weight: s.weights.unwrap_or_default().passing,
                })
                .map(Arc::new)
                .collect();
            Ok((instances, QueryMeta::default()))
        }
        Source::PreparedQuery { name, .. } => {
            let (answer, meta) = client.prepared_query().execute(name, &opts).await?;
            if answer.failovers > 0 {
                tracing::debug!(
                    query = %name,
                    datacenter = %answer.datacenter,
                    failovers = answer.failovers,
                    "the prepared query failed over"
                );
            }
            Ok((
                answer
                    .nodes
                    .iter()
                    .map(|e| Arc::new(Instance::from_entry(e)))
                    .collect(),
                meta,
            ))
        }
        Source::Dns { .. } => unreachable_source(),
    }
}

/// DNS sources are read by [`read_dns`]; [`Reader::new`] never pairs them with Consul's API.
fn unreachable_source() -> Read {
    Err(ConsulError::Config(
        "internal: a DNS source read through the HTTP API".into(),
    ))
}

/// The SRV name to resolve: `[<tag>.]<service>.service[.<dc>].consul`, or
/// `<query>.query[.<dc>].consul`.
pub(crate) fn dns_name(config: &DiscoveryConfig, query: Option<&str>) -> String {
    let dc = config
        .datacenter
        .as_deref()
        .map(|dc| format!(".{dc}"))
        .unwrap_or_default();
    match query {
        Some(query) => format!("{query}.query{dc}.consul."),
        None => {
            let tag = config
                .tag
                .as_deref()
                .map(|t| format!("{t}."))
                .unwrap_or_default();
            format!("{tag}{}.service{dc}.consul.", config.service)
        }
    }
}

/// A resolver that asks only `server`, over TCP, caches nothing and does not retry (the
/// discovery loop retries with its own backoff).
fn dns_resolver(server: SocketAddr) -> TokioResolver {
    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(server, Protocol::Tcp));
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = Duration::from_secs(2);
    opts.ndots = 0;
    Resolver::builder_with_config(config, TokioConnectionProvider::default())
        .with_options(opts)
        .build()
}

async fn read_dns(resolver: &TokioResolver, server: SocketAddr, name: &str) -> Read {
    let transport = |e: &hickory_resolver::ResolveError, path: &str| {
        let timeout = e
            .proto()
            .is_some_and(|p| matches!(p.kind(), ProtoErrorKind::Timeout));
        ConsulError::Transport {
            method: "DNS",
            url: format!("dns+tcp://{server}"),
            path: path.to_owned(),
            reason: format!(
                "{e} (is the agent's DNS interface on? Consul's `ports.dns`, -dns-port; default \
                 8600)"
            ),
            timeout,
        }
    };
    let lookup = match resolver.lookup(name, RecordType::SRV).await {
        Ok(lookup) => lookup,
        // NXDOMAIN or an empty answer: Consul knows no passing instance.
        Err(e) if e.is_no_records_found() => return Ok((Vec::new(), QueryMeta::default())),
        Err(e) => return Err(transport(&e, name)),
    };
    let mut instances = Vec::new();
    for record in lookup.records() {
        let RData::SRV(srv) = record.data() else {
            continue;
        };
        let target = srv.target();
        // Consul names a service's own address `<hex IPv4>.addr.<dc>.consul.`: decoded here;
        // a node (`<node>.node.<dc>.consul.`) is asked for its A record. The resolver drops
        // the answer's additional section, where Consul already put those addresses.
        let host = match addr_target(target) {
            Some(ip) => ip.to_string(),
            None => match resolver.ipv4_lookup(target.clone()).await {
                Ok(a) => match a.iter().next() {
                    Some(ip) => ip.0.to_string(),
                    None => continue,
                },
                Err(e) if e.is_no_records_found() => continue,
                Err(e) => return Err(transport(&e, &target.to_ascii())),
            },
        };
        instances.push(Arc::new(instance_from_srv(srv, host)));
    }
    Ok((instances, QueryMeta::default()))
}

/// The IPv4 address of a Consul `<8 hex digits>.addr.<dc>.consul.` target.
fn addr_target(target: &hickory_resolver::proto::rr::Name) -> Option<std::net::Ipv4Addr> {
    let text = target.to_ascii();
    let mut labels = text.split('.');
    let hex = labels.next()?;
    if labels.next()? != "addr" || hex.len() != 8 {
        return None;
    }
    u32::from_str_radix(hex, 16)
        .ok()
        .map(std::net::Ipv4Addr::from)
}

/// The instance an SRV record names, at `host`. DNS has no service ID: the address is the
/// instance's identity.
fn instance_from_srv(srv: &hickory_resolver::proto::rr::rdata::SRV, host: String) -> Instance {
    let target = srv.target().to_ascii();
    let node = target
        .split_once(".node.")
        .map(|(node, _)| node.to_owned())
        .unwrap_or_default();
    let mut instance = Instance::new(String::new(), host, srv.port());
    instance.id = instance.address();
    instance.node = node;
    instance.weight = u32::from(srv.weight()).max(1);
    instance
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, str::FromStr};

    use hickory_resolver::proto::rr::{Name, rdata};

    use super::*;

    #[test]
    fn dns_names_follow_consuls_scheme() {
        let mut config = DiscoveryConfig::new("servernode");
        assert_eq!(dns_name(&config, None), "servernode.service.consul.");
        config.tag = Some("v2".into());
        config.datacenter = Some("dc2".into());
        assert_eq!(dns_name(&config, None), "v2.servernode.service.dc2.consul.");
        assert_eq!(dns_name(&config, Some("echo")), "echo.query.dc2.consul.");
    }

    #[test]
    fn srv_targets_name_nodes_or_addresses() {
        let addr = Name::from_str("7f000102.addr.dc1.consul.").unwrap();
        assert_eq!(addr_target(&addr), Some(Ipv4Addr::new(127, 0, 1, 2)));
        let node = Name::from_str("node-a.node.dc1.consul.").unwrap();
        assert_eq!(addr_target(&node), None);
        assert_eq!(
            addr_target(&Name::from_str("zz000102.addr.dc1.consul.").unwrap()),
            None
        );
        let on_node = instance_from_srv(&rdata::SRV::new(1, 1, 9527, node), "127.0.0.1".into());
        assert_eq!(on_node.address(), "127.0.0.1:9527");
        assert_eq!(on_node.id, "127.0.0.1:9527");
        assert_eq!(on_node.node, "node-a");
        let own = instance_from_srv(&rdata::SRV::new(1, 5, 9528, addr), "127.0.1.2".into());
        assert_eq!(own.node, "", "an .addr. target names no node");
        assert_eq!(own.weight, 5);
    }

    #[test]
    fn sources_block_or_poll() {
        let base = QueryOptions::default();
        let wait = Duration::from_secs(60);
        let mut health = Source::Health.watch(base.clone(), wait);
        health.observe(&QueryMeta {
            last_index: 9,
            ..Default::default()
        });
        assert_eq!(health.options().wait_index, 9, "health blocks");
        let every = Duration::from_millis(250);
        for source in [
            Source::Agent { every },
            Source::PreparedQuery {
                name: "q".into(),
                every,
            },
            Source::Dns {
                server: "127.0.0.1:8600".parse().unwrap(),
                query: None,
                every,
            },
        ] {
            let mut w = source.watch(base.clone(), wait);
            w.observe(&QueryMeta {
                last_index: 9,
                ..Default::default()
            });
            assert_eq!(w.options().wait_index, 0, "{} polls", source.name());
        }
    }
}
