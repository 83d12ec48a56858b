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
//! | [`Source::Composed`] | passing instances, composed from the catalog's list and the non-passing checks ([`crate::compose`]) | blocking queries: membership, critical, warning, and a paced one for unknown statuses |
//! | [`Source::Catalog`] | every registered instance, healthy or not | blocking query |
//! | [`Source::Agent`] | the local agent's own registrations, healthy or not (the naive way) | polled |
//! | [`Source::PreparedQuery`] | a prepared query's answer, failing over to other datacenters | polled |
//! | `Source::Dns` (feature `dns`) | SRV records of the agent's DNS interface (critical ones dropped) | polled |
//!
//! Prepared-query execution and the agent's list cannot block, and DNS has no index: those
//! are polled at a stated rate ([`consul_api::Watch::poll`]). DNS is asked over TCP: a UDP
//! answer carries at most 3 records (Consul's `udp_answer_limit`), a TCP one every instance up
//! to 64 KiB; Consul's DNS TTL is 0, so nothing is cached in between.

#[cfg(feature = "dns")]
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Mutex, PoisonError},
};
use std::{sync::Arc, time::Duration};

use consul_api::error::Error as ConsulError;
use consul_api::{Client, QueryMeta, QueryOptions, Watch, error::Result as ConsulResult};
#[cfg(feature = "dns")]
use hickory_resolver::{
    ResolveError, Resolver, TokioResolver,
    config::{NameServerConfig, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
    proto::{
        ProtoErrorKind,
        op::ResponseCode,
        rr::{Name, RData, RecordType},
        xfer::Protocol,
    },
};

use crate::{
    compose::{self, Composer},
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
    /// The same passing set as [`Source::Health`], composed on the client ([`crate::compose`])
    /// from the instance list, read when membership changes (a blocking
    /// `/v1/catalog/services`), and the non-passing checks of the service and of nodes
    /// (blocking `/v1/health/state/critical` and `/v1/health/state/warning`, and a paced,
    /// filtered `/v1/health/state/any` for statuses Consul does not know): a check flip
    /// costs Consul a few entries per client instead of the whole list. `cached` does not apply; `filter`
    /// applies to `/v1/catalog/service/<name>`, in the catalog's field names
    /// (`ServiceMeta.shard == "0"`).
    Composed,
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
    #[cfg(feature = "dns")]
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
    /// A short name for reports and logs: `health`, `composed`, `catalog`, `agent`, `query`,
    /// `dns`.
    pub fn name(&self) -> &'static str {
        match self {
            Source::Health => "health",
            Source::Composed => "composed",
            Source::Catalog => "catalog",
            Source::Agent { .. } => "agent",
            Source::PreparedQuery { .. } => "query",
            #[cfg(feature = "dns")]
            Source::Dns { .. } => "dns",
        }
    }

    /// The watch that drives this source: blocking for health and catalog, by the
    /// composition's hash for the composed source, polling otherwise.
    pub(crate) fn watch(&self, base: QueryOptions, wait: Duration) -> Watch {
        match self {
            Source::Health | Source::Catalog => Watch::new(base, wait),
            // Each composition is news (its reads block on their own); its index alone may
            // not move (`compose::Composer::read`).
            Source::Composed => Watch::hash(base, wait),
            Source::Agent { every } | Source::PreparedQuery { every, .. } => {
                Watch::poll(base, *every)
            }
            #[cfg(feature = "dns")]
            Source::Dns { every, .. } => Watch::poll(base, *every),
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
        /// Shared: the reader is cloned for every read.
        config: Arc<DiscoveryConfig>,
        /// Health answers decoded by what changed (one read at a time, so never contended;
        /// held while an answer arrives).
        decoder: Arc<tokio::sync::Mutex<Decoder>>,
    },
    #[cfg(feature = "dns")]
    Dns {
        resolver: Box<TokioResolver>,
        server: SocketAddr,
        name: String,
        /// The SRV targets the last read skipped, so that each is logged when it starts
        /// being skipped, not on every poll (rebuilt by each read: bounded by one answer).
        skipped: Arc<Mutex<BTreeSet<String>>>,
    },
    /// Two blocking reads, held between calls (a call abandoned midway leaves them in flight).
    Composed(Arc<tokio::sync::Mutex<Composer>>),
}

impl Reader {
    /// The reader of `config.source` through `client`.
    pub(crate) fn new(client: Client, config: DiscoveryConfig) -> Self {
        match &config.source {
            #[cfg(feature = "dns")]
            Source::Dns {
                server,
                query,
                every: _,
            } => Reader::Dns {
                resolver: Box::new(dns_resolver(*server)),
                server: *server,
                name: dns_name(&config, query.as_deref()),
                skipped: Arc::default(),
            },
            Source::Composed => {
                let base = QueryOptions {
                    datacenter: config.datacenter.clone(),
                    consistency: config.consistency,
                    filter: config.filter.clone(),
                    ..Default::default()
                };
                Reader::Composed(Arc::new(tokio::sync::Mutex::new(Composer::new(
                    client,
                    config.service.clone(),
                    config.tag.clone(),
                    base,
                    config.wait,
                ))))
            }
            _ => Reader::Consul {
                client,
                config: Arc::new(config),
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
            #[cfg(feature = "dns")]
            Reader::Dns {
                resolver,
                server,
                name,
                skipped,
            } => read_dns(resolver, *server, name, skipped).await,
            // The composer blocks on its own reads; the loop's index only tells it
            // apart from a timeout.
            Reader::Composed(composer) => composer.lock().await.read().await,
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
                .map(|e| Arc::new(compose::instance(e)))
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
                    // Without brackets: an IPv6 host is bracketed by `Instance::address`.
                    host: if s.address.is_empty() {
                        client.host()
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
        #[cfg(feature = "dns")]
        Source::Dns { .. } => unreachable_source(),
        Source::Composed => unreachable_source(),
    }
}

/// DNS sources are read by `read_dns`, composed ones by their [`Composer`]; [`Reader::new`]
/// never pairs them with this function.
fn unreachable_source() -> Read {
    Err(ConsulError::Config(
        "internal: a DNS or composed source read as a single query".into(),
    ))
}

#[cfg(feature = "dns")]
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

#[cfg(feature = "dns")]
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

#[cfg(feature = "dns")]
async fn read_dns(
    resolver: &TokioResolver,
    server: SocketAddr,
    name: &str,
    skipped: &Mutex<BTreeSet<String>>,
) -> Read {
    let lookup = match resolver.lookup(name, RecordType::SRV).await {
        Ok(lookup) => lookup,
        // NXDOMAIN or an empty answer: Consul knows no passing instance.
        Err(e) if names_nothing(&e) => return Ok((Vec::new(), QueryMeta::default())),
        // Anything else (SERVFAIL when the agent cannot reach its servers, REFUSED, no
        // answer): an outage, and the last view stays.
        Err(e) => return Err(dns_error(server, name, &e)),
    };
    let mut instances = Vec::new();
    let mut skips = Vec::new();
    for record in lookup.records() {
        let RData::SRV(srv) = record.data() else {
            continue;
        };
        let target = srv.target();
        // Consul names a service's own address `<hex IP>.addr.<dc>.consul.`: decoded here;
        // a node (`<node>.node.<dc>.consul.`) is asked for its address. The resolver drops
        // most of the answer's additional section, where Consul already put those addresses.
        let host = match addr_target(target) {
            Some(ip) => ip,
            None => match address_of(resolver, target).await {
                Ok(Some(ip)) => ip,
                // Gone between the two lookups (NXDOMAIN), or no address: one entry.
                Ok(None) => {
                    skips.push((target.to_ascii(), "it has no A or AAAA record".to_owned()));
                    continue;
                }
                // A node of Consul's that cannot be looked up is the same outage as the SRV
                // lookup's; any other name (a service registered with a hostname, which the
                // agent cannot resolve without recursors) is one bad entry among many.
                Err(e) if is_consul_node(target) => {
                    return Err(dns_error(server, &target.to_ascii(), &e));
                }
                Err(e) => {
                    skips.push((target.to_ascii(), e.to_string()));
                    continue;
                }
            },
        };
        instances.push(Arc::new(instance_from_srv(srv, host.to_string())));
    }
    report_skipped(skipped, name, skips);
    Ok((instances, QueryMeta::default()))
}

#[cfg(feature = "dns")]
/// Whether a failed lookup says the name has no such record: NXDOMAIN, or NOERROR with an
/// empty answer. hickory reports every other response code (SERVFAIL, REFUSED, ...) as "no
/// records found" too; those say nothing about the name.
fn names_nothing(e: &ResolveError) -> bool {
    e.proto().is_some_and(|p| {
        matches!(
            p.kind(),
            ProtoErrorKind::NoRecordsFound {
                response_code: ResponseCode::NXDomain | ResponseCode::NoError,
                ..
            }
        )
    })
}

#[cfg(feature = "dns")]
/// The discovery error for a failed lookup of `name` at `server`: retryable (the last view
/// stays), saying which response code came back, or that none did.
fn dns_error(server: SocketAddr, name: &str, e: &ResolveError) -> ConsulError {
    let kind = e.proto().map(|p| p.kind());
    let reason = match kind {
        Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => format!(
            "the DNS interface answered {response_code} (rcode {}) about {name}: an outage, not \
             an empty list (Consul answers Server Failure when the agent cannot reach its \
             servers)",
            u16::from(*response_code)
        ),
        _ => format!(
            "{e} (is the agent's DNS interface on? Consul's `ports.dns`, -dns-port; default \
             8600)"
        ),
    };
    ConsulError::Transport {
        method: "DNS",
        url: format!("dns+tcp://{server}"),
        path: name.to_owned(),
        reason,
        timeout: matches!(kind, Some(ProtoErrorKind::Timeout)),
    }
}

#[cfg(feature = "dns")]
/// The address of an SRV target: its A record, else its AAAA record (a node with an IPv6
/// address has only that); `None` when it has neither.
async fn address_of(
    resolver: &TokioResolver,
    target: &Name,
) -> Result<Option<IpAddr>, ResolveError> {
    for record_type in [RecordType::A, RecordType::AAAA] {
        match resolver.lookup(target.clone(), record_type).await {
            Ok(lookup) => {
                if let Some(ip) = lookup.iter().find_map(RData::ip_addr) {
                    return Ok(Some(ip));
                }
            }
            Err(e) if names_nothing(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(feature = "dns")]
/// Logs the SRV targets of this read that the last read did not skip too; remembers this
/// read's.
fn report_skipped(skipped: &Mutex<BTreeSet<String>>, name: &str, skips: Vec<(String, String)>) {
    let mut last = skipped.lock().unwrap_or_else(PoisonError::into_inner);
    let now: BTreeSet<String> = skips.iter().map(|(target, _)| target.clone()).collect();
    for (target, why) in &skips {
        if !last.contains(target) {
            tracing::warn!(
                name,
                target = %target,
                "an SRV record's target has no usable address ({why}); that instance is skipped"
            );
        }
    }
    *last = now;
}

#[cfg(feature = "dns")]
/// The node of a Consul `<node>.node.<dc>.consul.` SRV target.
fn consul_node(target: &str) -> Option<&str> {
    let labels: Vec<&str> = target.trim_end_matches('.').split('.').collect();
    match labels.as_slice() {
        [node, "node", _datacenter, "consul"] => Some(node),
        _ => None,
    }
}

#[cfg(feature = "dns")]
/// Whether `target` names a node of Consul's (its lookup is Consul's to answer).
fn is_consul_node(target: &Name) -> bool {
    consul_node(&target.to_ascii()).is_some()
}

#[cfg(feature = "dns")]
/// The address of a Consul `<hex>.addr.<dc>.consul.` target: 8 hex digits for IPv4, 32 for
/// IPv6.
fn addr_target(target: &Name) -> Option<IpAddr> {
    let text = target.to_ascii();
    let mut labels = text.split('.');
    let hex = labels.next()?;
    if labels.next()? != "addr" || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.len() {
        8 => u32::from_str_radix(hex, 16)
            .ok()
            .map(|ip| IpAddr::V4(Ipv4Addr::from(ip))),
        32 => u128::from_str_radix(hex, 16)
            .ok()
            .map(|ip| IpAddr::V6(Ipv6Addr::from(ip))),
        _ => None,
    }
}

#[cfg(feature = "dns")]
/// The instance an SRV record names, at `host`. DNS has no service ID: the address is the
/// instance's identity.
fn instance_from_srv(srv: &hickory_resolver::proto::rr::rdata::SRV, host: String) -> Instance {
    let target = srv.target().to_ascii();
    let node = consul_node(&target).unwrap_or_default().to_owned();
    let mut instance = Instance::new(String::new(), host, srv.port());
    instance.id = instance.address();
    instance.node = node;
    instance.weight = u32::from(srv.weight()).max(1);
    instance
}

// Every test here reads DNS or lists its source.
#[cfg(test)]
#[cfg(feature = "dns")]
mod tests {
    use std::{
        str::FromStr,
        sync::atomic::{AtomicBool, Ordering},
    };

    use hickory_resolver::proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Record, rdata},
        serialize::binary::{BinDecodable, BinEncodable},
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::discovery::{self, ConsulState};

    /// What the fake DNS server answers to one question: a response code and answer records.
    type Answer = (ResponseCode, Vec<Record>);

    /// A DNS server on `ip`, over TCP (what discovery asks), that answers each question with
    /// `answer`; it stops with the test's runtime.
    async fn fake_dns(
        ip: IpAddr,
        answer: impl Fn(&Query) -> Answer + Send + Sync + 'static,
    ) -> SocketAddr {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    // Each message is preceded by its length (RFC 1035 4.2.2).
                    while let Ok(len) = stream.read_u16().await {
                        let mut buf = vec![0; usize::from(len)];
                        if stream.read_exact(&mut buf).await.is_err() {
                            return;
                        }
                        let request = Message::from_bytes(&buf).unwrap();
                        let query = request.queries()[0].clone();
                        let (code, records) = answer(&query);
                        let mut reply = Message::new();
                        reply
                            .set_id(request.id())
                            .set_message_type(MessageType::Response)
                            .set_op_code(OpCode::Query)
                            .set_authoritative(true)
                            .set_recursion_desired(request.recursion_desired())
                            .set_response_code(code)
                            .add_query(query)
                            .add_answers(records);
                        let bytes = reply.to_bytes().unwrap();
                        let len = u16::try_from(bytes.len()).unwrap();
                        if stream.write_u16(len).await.is_err()
                            || stream.write_all(&bytes).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn name(text: &str) -> Name {
        Name::from_str(text).unwrap()
    }

    fn srv(port: u16, target: &str) -> Record {
        Record::from_rdata(
            name(SERVICE_NAME),
            0,
            RData::SRV(rdata::SRV::new(1, 1, port, name(target))),
        )
    }

    fn ip(owner: &Name, ip: IpAddr) -> Record {
        let data = match ip {
            IpAddr::V4(v4) => RData::A(v4.into()),
            IpAddr::V6(v6) => RData::AAAA(v6.into()),
        };
        Record::from_rdata(owner.clone(), 0, data)
    }

    const SERVICE_NAME: &str = "web.service.consul.";

    fn dns_config(server: SocketAddr) -> DiscoveryConfig {
        let mut config = DiscoveryConfig::new("web");
        config.source = Source::Dns {
            server,
            query: None,
            every: Duration::from_millis(50),
        };
        config
    }

    fn client() -> Client {
        Client::new(consul_api::Config::default()).unwrap()
    }

    async fn read_from(server: SocketAddr) -> Read {
        Reader::new(client(), dns_config(server))
            .read(QueryOptions::default())
            .await
    }

    fn addresses(read: &Read) -> Vec<String> {
        let (instances, _) = read.as_ref().unwrap();
        let mut addresses: Vec<String> = instances.iter().map(|i| i.address()).collect();
        addresses.sort();
        addresses
    }

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

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
        assert_eq!(addr_target(&addr), Some(Ipv4Addr::new(127, 0, 1, 2).into()));
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

    #[tokio::test]
    async fn only_nxdomain_and_an_empty_noerror_mean_no_instances() {
        for (code, none) in [
            (ResponseCode::NXDomain, true),
            (ResponseCode::NoError, true),
            (ResponseCode::ServFail, false),
            (ResponseCode::Refused, false),
            (ResponseCode::FormErr, false),
            (ResponseCode::NotImp, false),
        ] {
            let server = fake_dns(LOCALHOST, move |_| (code, Vec::new())).await;
            let read = read_from(server).await;
            if none {
                assert!(addresses(&read).is_empty(), "{code}: {read:?}");
                continue;
            }
            let Err(e) = read else {
                panic!("{code} read as an answer: {read:?}");
            };
            assert!(e.is_retryable(), "{code}: {e}");
            let rcode = format!("rcode {}", u16::from(code));
            assert!(
                e.to_string().contains(&rcode) && e.to_string().contains(SERVICE_NAME),
                "{code}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn a_node_lookup_that_fails_is_an_outage_and_a_missing_node_one_skipped_entry() {
        let node = name("node-a.node.dc1.consul.");
        // `node`'s lookups answer `node_code`; the lookups of a service registered with a
        // hostname, SERVFAIL (what an agent without recursors answers): that one instance
        // is skipped, whatever `node_code`.
        let serve = |node_code: ResponseCode| {
            let node = node.clone();
            move |q: &Query| -> Answer {
                match q.query_type() {
                    RecordType::SRV => (
                        ResponseCode::NoError,
                        vec![
                            srv(8001, "node-a.node.dc1.consul."),
                            srv(8002, "7f000002.addr.dc1.consul."),
                            srv(8003, "web.example."),
                        ],
                    ),
                    RecordType::A if q.name() == &node && node_code == ResponseCode::NoError => {
                        (node_code, vec![ip(&node, LOCALHOST)])
                    }
                    _ if q.name() == &node => (node_code, Vec::new()),
                    _ => (ResponseCode::ServFail, Vec::new()),
                }
            }
        };

        let read = read_from(fake_dns(LOCALHOST, serve(ResponseCode::NoError)).await).await;
        assert_eq!(addresses(&read), ["127.0.0.1:8001", "127.0.0.2:8002"]);

        let read = read_from(fake_dns(LOCALHOST, serve(ResponseCode::NXDomain)).await).await;
        assert_eq!(
            addresses(&read),
            ["127.0.0.2:8002"],
            "the node left meanwhile"
        );

        let read = read_from(fake_dns(LOCALHOST, serve(ResponseCode::ServFail)).await).await;
        let Err(e) = read else {
            panic!("a node's SERVFAIL read as an answer: {read:?}");
        };
        assert!(
            e.is_retryable() && e.to_string().contains("node-a.node.dc1.consul"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn ipv6_targets_and_an_ipv6_dns_interface_are_read() {
        let v6_node = name("node-6.node.dc1.consul.");
        let server = fake_dns(IpAddr::V6(Ipv6Addr::LOCALHOST), {
            let v6_node = v6_node.clone();
            move |q: &Query| -> Answer {
                match q.query_type() {
                    RecordType::SRV => (
                        ResponseCode::NoError,
                        vec![
                            srv(8003, "00000000000000000000000000000001.addr.dc1.consul."),
                            srv(8004, "node-6.node.dc1.consul."),
                        ],
                    ),
                    // Consul answers an A question about an IPv6 node with nothing.
                    RecordType::AAAA if q.name() == &v6_node => (
                        ResponseCode::NoError,
                        vec![ip(&v6_node, IpAddr::V6(Ipv6Addr::LOCALHOST))],
                    ),
                    _ => (ResponseCode::NoError, Vec::new()),
                }
            }
        })
        .await;
        let read = read_from(server).await;
        assert_eq!(addresses(&read), ["[::1]:8003", "[::1]:8004"]);
        let (instances, _) = read.unwrap();
        assert!(instances.iter().all(|i| i.host == "::1"), "{instances:?}");
    }

    #[tokio::test]
    async fn a_servfail_keeps_the_last_view() {
        let failing = Arc::new(AtomicBool::new(false));
        let server = fake_dns(LOCALHOST, {
            let failing = failing.clone();
            move |_: &Query| -> Answer {
                if failing.load(Ordering::SeqCst) {
                    (ResponseCode::ServFail, Vec::new())
                } else {
                    (
                        ResponseCode::NoError,
                        vec![srv(8002, "7f000002.addr.dc1.consul.")],
                    )
                }
            }
        })
        .await;
        let mut rx = discovery::spawn(client(), dns_config(server));
        let timeout = Duration::from_secs(10);
        tokio::time::timeout(timeout, rx.wait_for(|s| s.instances.len() == 1))
            .await
            .expect("the instance is listed")
            .unwrap();
        failing.store(true, Ordering::SeqCst);
        let mut emptied = false;
        let down = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| {
                emptied |= s.instances.is_empty();
                matches!(s.consul, ConsulState::Unreachable { .. })
            }),
        )
        .await
        .map(|found| found.unwrap().clone());
        let Ok(down) = down else {
            panic!("never unreachable; last: {:?}", *rx.borrow());
        };
        assert!(!emptied, "a SERVFAIL emptied the view");
        assert_eq!(down.instances.len(), 1, "{down:?}");
        let ConsulState::Unreachable { error, .. } = &down.consul else {
            unreachable!()
        };
        assert!(error.contains("rcode 2"), "{error}");
    }
}
