//! The passing set composed on the client from two cheap reads, so that Consul's cost per
//! change does not grow with instances × clients ([`Source::Composed`](crate::Source)).
//!
//! `?passing` (`/v1/health/service/<name>?passing`) blocks on the service's own index, which
//! every check change of the service moves: each flip wakes every client and Consul renders
//! the whole list, nodes and checks included, once per client. This source reads instead:
//!
//! * **membership** — a blocking `/v1/catalog/services`, which moves only when a service is
//!   registered, changed or removed (anywhere in the datacenter), and then, not blocking,
//!   `/v1/catalog/service/<name>` (the instance list, without checks);
//! * **what is not passing** — blocking `/v1/health/state/critical` and
//!   `/v1/health/state/warning`, unfiltered: every check of the datacenter in that status,
//!   usually a handful whatever the instance count; the service's own checks and the node
//!   checks (`serfHealth`, `_node_maintenance`) are kept on the client;
//! * **statuses Consul does not know** — a blocking `/v1/health/state/any` with
//!   `filter=Status != "passing" and Status != "critical" and Status != "warning" and
//!   (ServiceName == "<name>" or ServiceID == "")`, paced to one read per [`OTHER_EVERY`]:
//!   only the catalog endpoint stores such a status, and `?passing` drops the instance;
//!
//! and composes the passing set with [`passing`], a pure function.
//!
//! **What was verified in Consul 1.8.7's source** (`agent/consul/state/catalog.go`,
//! `agent/consul/state/catalog_oss.go`, `agent/consul/rpc.go`,
//! `agent/consul/health_endpoint.go`, `agent/health_endpoint.go`):
//!
//! * A blocking query re-runs only when its watch set fires and answers once the table index
//!   it reports exceeds the client's `index` (`blockingQuery`).
//! * `/v1/catalog/services` (`Store.Services`) reports the `services` table's index and
//!   watches the services table: `ensureCheckTxn` never writes it (a check change bumps the
//!   per-service index `service.<name>` and the `checks` table only), so check flips do not
//!   wake it; a registration, a changed registration (`ensureServiceTxn` skips an identical
//!   one) or a removal (of the service, or of its node) does. A node's address change
//!   (`ensureNodeTxn`) bumps the `nodes` table and the per-service index, not `services`: an
//!   instance registered without an address of its own shows its node's new address at the
//!   next membership change only.
//! * `/v1/health/service/<name>` and `/v1/catalog/service/<name>` report the per-service
//!   index, which `ensureCheckTxn` moves on every check change of the service, and on every
//!   node check change of a node that holds one (`updateAllServiceIndexesOfNode`).
//! * `/v1/health/state/<status>` (`checksInStateTxn`) reports the `checks` table's index.
//!   For `critical` or `warning` it reads the `status` index (`catalogListChecksInState`:
//!   `tx.Get("checks", "status", state)`, lower-cased) and watches only that status's
//!   entries: a flip between passing and critical wakes the `critical` readers, not the
//!   `warning` ones; for `any` it reads and watches every check. The server applies `filter`
//!   (`Health.ChecksInState`, after the ACL filter) by building it from the expression on
//!   every read and testing each check: the `any` read costs Consul the whole checks table
//!   per read, which is why it is paced, and the status reads carry no filter.
//! * `?passing` is applied by the HTTP handler (`filterNonPassing`): an instance is dropped
//!   when any of its checks — its node's checks, then its own — has a status other than
//!   `passing`, compared exactly. So `warning` is dropped, and so is a status Consul does not
//!   know: the agent's endpoints refuse one (`ValidStatus`), the catalog endpoint stores
//!   whatever a registration sends. Maintenance is a `critical` check (`_node_maintenance`,
//!   `_service_maintenance:<id>`).
//!
//! **Ordering.** The reads are not one snapshot. Where that could show an instance as
//! passing that `?passing` would not, the composer reads again first: after a membership
//! change it reads the non-passing checks too (an instance registered critical is not shown
//! passing for a moment); after a check change that clears something it reads, without
//! blocking and side by side, the other status (a check moved from `critical` straight to
//! `warning` is one write that wakes both reads, in either order) and `/v1/catalog/services`,
//! then the list again if that moved (an instance deregistered: its checks vanish in the same
//! write, and a checks' read may answer first). A check change that only holds more out (a
//! node or an instance not passing that was, none cleared) skips those reads: the view only
//! loses instances, and such a write is not a deregistration (which removes checks). Each
//! published view is then at least as recent as its index (the largest of the reads') says,
//! but for a write that both holds something out and removes an instance at once (a `/v1/txn`
//! of both): the removal shows when the membership read, woken by the same write, answers;
//! and for a status Consul does not know, which shows within [`OTHER_EVERY`].
//!
//! **Wakes that are not news.** A status read blocks on the `status` index's entries for that
//! status; while no check is in it, the read also wakes on other check writes (seen on 1.8.7:
//! an empty `critical` read woke when a `warning` check turned passing; go-memdb, which
//! Debian's source package does not vendor, was not read) and answers what it answered
//! before. Such an answer, and one a confirming read has already overtaken, is not
//! composed: the composer keeps waiting, and each read's watch goes on from its index. An
//! answer below the index its own read last delivered means Consul's state went back (a
//! restart, a snapshot restored): everything is read again.
//!
//! **Cost per change on the client.** The list's instances are built once per list read
//! ([`members`], unchanged ones kept as the same `Arc`); a check change composes by lookups
//! ([`passing`]): the snapshot compares and hands on the unchanged instances by pointer, as
//! [`Source::Health`](crate::Source)'s decoder does.

use std::{cmp::Ordering, collections::BTreeSet, fmt, pin::Pin, sync::Arc, time::Duration};

use consul_api::{
    CatalogService, Client, HealthCheck, HealthStatus, QueryMeta, QueryOptions, Watch,
    error::Result,
};

use crate::discovery::Instance;

/// The passing instances: those of `members` (an instance's `node` and `id` are its catalog
/// entry's `Node` and `ServiceID`) whose node has no check in `non_passing` with an empty
/// `ServiceID`, and that have no check of their own there (`ServiceID` = theirs, on their
/// node). A check in `non_passing` that is passing after all is ignored; one naming an
/// instance or node not in `members` concerns nothing listed. In `members`' order, each the
/// same `Arc`: composing costs a lookup per member, not an instance built.
pub fn passing(members: &[Arc<Instance>], non_passing: &[HealthCheck]) -> Vec<Arc<Instance>> {
    let (bad_nodes, bad_instances) = not_passing(non_passing);
    members
        .iter()
        .filter(|m| {
            !bad_nodes.contains(m.node.as_str())
                && !bad_instances.contains(&(m.node.as_str(), m.id.as_str()))
        })
        .cloned()
        .collect()
}

/// The nodes, and the (node, service ID) instances, that a check of `non_passing` which is
/// not passing concerns.
fn not_passing(non_passing: &[HealthCheck]) -> (BTreeSet<&str>, BTreeSet<(&str, &str)>) {
    let mut bad_nodes: BTreeSet<&str> = BTreeSet::new();
    let mut bad_instances: BTreeSet<(&str, &str)> = BTreeSet::new();
    for check in non_passing
        .iter()
        .filter(|c| c.status != HealthStatus::Passing)
    {
        if check.service_id.is_empty() {
            bad_nodes.insert(&check.node);
        } else {
            bad_instances.insert((&check.node, &check.service_id));
        }
    }
    (bad_nodes, bad_instances)
}

/// Whether the change from `before` to `now` only holds more nodes or instances out (a check
/// turned critical, say) and clears none. Then the composed set can only lose instances, and
/// the write was a check change, not a removal. Otherwise (something cleared: a check turned
/// passing or gone; or nothing different: a check of another service, or a passing instance
/// removed with its checks) the list may be older than the checks and is read again.
fn only_holds_more_out(before: &[HealthCheck], now: &[HealthCheck]) -> bool {
    let (nodes_now, instances_now) = not_passing(now);
    let (nodes_before, instances_before) = not_passing(before);
    nodes_before.is_subset(&nodes_now)
        && instances_before.is_subset(&instances_now)
        && (nodes_before.len(), instances_before.len()) != (nodes_now.len(), instances_now.len())
}

/// The instances `list` describes, sorted as [`Snapshot`](crate::discovery::Snapshot)s are
/// (by ID, host, port); an instance equal to one of `previous` (sorted the same way) is that
/// same `Arc`, so that a snapshot compares and hands on unchanged instances by pointer.
pub fn members(list: &[CatalogService], previous: &[Arc<Instance>]) -> Vec<Arc<Instance>> {
    let mut out: Vec<Arc<Instance>> = list
        .iter()
        .map(|entry| {
            let built = instance(entry);
            match previous.binary_search_by(|p| order(p, &built)) {
                Ok(at) if *previous[at] == built => previous[at].clone(),
                _ => Arc::new(built),
            }
        })
        .collect();
    out.sort_by(|a, b| order(a, b));
    out
}

/// Snapshots' order: by ID, host, port.
fn order(a: &Instance, b: &Instance) -> Ordering {
    (a.id.as_str(), a.host.as_str(), a.port).cmp(&(b.id.as_str(), b.host.as_str(), b.port))
}

/// The instance a catalog entry describes, as `?passing` would list it.
pub fn instance(entry: &CatalogService) -> Instance {
    Instance {
        id: entry.service_id.clone(),
        node: entry.node.clone(),
        host: if entry.service_address.is_empty() {
            entry.address.clone()
        } else {
            entry.service_address.clone()
        },
        port: entry.service_port,
        tags: entry.service_tags.clone().unwrap_or_default(),
        meta: entry.service_meta.clone().unwrap_or_default(),
        weight: entry.service_weights.unwrap_or_default().passing,
    }
}

/// The `filter` of the paced read: `service`'s checks and every node check whose status
/// Consul does not know (neither `passing`, `critical` nor `warning`, compared exactly as
/// `?passing` compares). The name is quoted as bexpr reads strings.
pub fn other_status_filter(service: &str) -> String {
    let quoted = service.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"Status != "passing" and Status != "critical" and Status != "warning" and (ServiceName == "{quoted}" or ServiceID == "")"#
    )
}

/// How often, at most, the read of statuses Consul does not know runs: it costs Consul the
/// whole checks table per read, and only a catalog registration can bring such a status.
pub const OTHER_EVERY: Duration = Duration::from_secs(5);

/// The three reads of what is not passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Critical,
    Warning,
    /// Statuses Consul does not know; paced.
    Other,
}

const PARTS: [Part; 3] = [Part::Critical, Part::Warning, Part::Other];

impl Part {
    fn index(self) -> usize {
        self as usize
    }

    /// The `/v1/health/state/<state>` it reads.
    fn state(self) -> &'static str {
        match self {
            Part::Critical => "critical",
            Part::Warning => "warning",
            Part::Other => "any",
        }
    }

    /// Its options: the base's datacenter and consistency, not the user's filter (which is
    /// the list's); only the paced read filters on the server.
    fn options(self, base: &QueryOptions, service: &str) -> QueryOptions {
        QueryOptions {
            filter: (self == Part::Other).then(|| other_status_filter(service)),
            ..base.clone()
        }
    }

    /// Its watch: the paced read's reads are at least [`OTHER_EVERY`] apart.
    fn watch(self, base: &QueryOptions, service: &str, wait: Duration) -> Watch {
        let watch = Watch::new(self.options(base, service), wait);
        if self == Part::Other {
            watch.with_min_interval(OTHER_EVERY)
        } else {
            watch
        }
    }
}

/// Checks as held: one read's answer, kept to `service`'s own checks and node checks.
type Checks = (Vec<HealthCheck>, QueryMeta);

/// One read's result, with the watch that made it (handed back to block on next).
type Pending<T> = Pin<Box<dyn Future<Output = (Watch, Result<T>)> + Send>>;

/// A membership read: the list, the `/v1/catalog/services` answer's metadata, and the
/// non-passing checks read right after (each part).
type Membership = (Vec<CatalogService>, QueryMeta, [Checks; 3]);

/// What woke the composer.
enum Woke {
    Membership(Watch, Box<Result<Membership>>),
    Checks(Part, Watch, Result<Checks>),
}

/// The blocking reads of one service and what they last said. Owned by the source's reader;
/// [`Composer::read`] is called by discovery's one loop ([`consul_api::Follow`]), which owns
/// backoff and error policy. A read abandoned midway (the loop dropped) leaves the blocking
/// queries in flight here, to be awaited by the next call.
pub struct Composer {
    client: Client,
    service: String,
    tag: Option<String>,
    /// Datacenter, consistency, the user's `filter` (applied to the instance list).
    base: QueryOptions,
    wait: Duration,
    /// The list's instances, built when it is read (unchanged ones kept as they were).
    members: Option<(Vec<Arc<Instance>>, QueryMeta)>,
    /// Each part's last answer, by [`Part::index`].
    checks: [Option<Checks>; 3],
    /// The index the membership's blocking read last delivered, and each part's: an answer
    /// below its own read's last one means Consul's state went back.
    watched_members: u64,
    watched: [u64; 3],
    members_read: Option<Pending<Membership>>,
    checks_reads: [Option<Pending<Checks>>; 3],
}

impl fmt::Debug for Composer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = |part: Part| {
            self.checks[part.index()]
                .as_ref()
                .map(|(c, q)| (c.len(), q.last_index))
        };
        f.debug_struct("Composer")
            .field("service", &self.service)
            .field(
                "members",
                &self.members.as_ref().map(|(m, q)| (m.len(), q.last_index)),
            )
            .field("critical", &held(Part::Critical))
            .field("warning", &held(Part::Warning))
            .field("other", &held(Part::Other))
            .finish_non_exhaustive()
    }
}

impl Composer {
    /// Follow `service` (with `tag`) through `client`; `base` holds the datacenter,
    /// consistency and the user's `filter` (applied to `/v1/catalog/service/<name>`, so in
    /// the catalog's field names: `ServiceMeta.shard == "0"`).
    pub fn new(
        client: Client,
        service: String,
        tag: Option<String>,
        base: QueryOptions,
        wait: Duration,
    ) -> Self {
        Composer {
            client,
            service,
            tag,
            base: QueryOptions {
                // The agent's cache answers from before a change: never for these reads.
                cached: false,
                wait_index: 0,
                wait_time: None,
                wait_hash: None,
                ..base
            },
            wait,
            members: None,
            checks: [None, None, None],
            watched_members: 0,
            watched: [0; 3],
            members_read: None,
            checks_reads: [None, None, None],
        }
    }

    /// Wait until a read brings news, and return the composed passing set with a metadata
    /// whose index is the largest of the reads' (it goes backwards when Consul's state does)
    /// and whose content hash names the four reads' indexes: it differs on every
    /// composition, so the loop's watch ([`Watch::hash`]) delivers each. An error drops every read: the next call starts
    /// them afresh.
    pub async fn read(&mut self) -> Result<(Vec<Arc<Instance>>, QueryMeta)> {
        let result = self.step().await;
        if result.is_err() {
            self.members = None;
            self.checks = [None, None, None];
            self.watched_members = 0;
            self.watched = [0; 3];
            self.members_read = None;
            self.checks_reads = [None, None, None];
        }
        result
    }

    async fn step(&mut self) -> Result<(Vec<Arc<Instance>>, QueryMeta)> {
        loop {
            match self.next_wake().await {
                Woke::Membership(watch, result) => {
                    self.members_read = Some(Box::pin(membership_next(
                        watch,
                        self.client.clone(),
                        self.service.clone(),
                        self.tag.clone(),
                        self.base.clone(),
                    )));
                    let (list, meta, checks) = (*result)?;
                    if went_back(&mut self.watched_members, &meta) {
                        self.read_all_now().await?;
                    } else {
                        // Each half applied unless a read of the composer's own (a confirm)
                        // already holds something fresher.
                        if !older(&meta, &self.members) {
                            self.set_members(&list, meta);
                        }
                        for (part, read) in PARTS.into_iter().zip(checks) {
                            if !older(&read.1, &self.checks[part.index()]) {
                                self.checks[part.index()] = Some(read);
                            }
                        }
                    }
                }
                Woke::Checks(part, watch, result) => {
                    self.checks_reads[part.index()] = Some(Box::pin(checks_next(
                        watch,
                        self.client.clone(),
                        part,
                        self.service.clone(),
                    )));
                    let checks = result?;
                    if went_back(&mut self.watched[part.index()], &checks.1) {
                        self.read_all_now().await?;
                    } else {
                        let held = &self.checks[part.index()];
                        // Not news: a confirm read already showed as much or more, or the
                        // same checks (a read of a status no check is in wakes on every check
                        // write: Consul watches the index's nearest node). Keep waiting.
                        if older(&checks.1, held)
                            || held.as_ref().is_some_and(|(c, _)| *c == checks.0)
                        {
                            continue;
                        }
                        // A change that only holds more out shows no removed instance and
                        // no check moved elsewhere: nothing else to read.
                        let confirm = held
                            .as_ref()
                            .is_none_or(|(before, _)| !only_holds_more_out(before, &checks.0));
                        self.checks[part.index()] = Some(checks);
                        if confirm {
                            self.confirm(part).await?;
                        }
                    }
                }
            }
            if let (Some((members, m)), [Some(c), Some(w), Some(o)]) = (&self.members, &self.checks)
            {
                let non_passing: Vec<HealthCheck> =
                    [&c.0, &w.0, &o.0].into_iter().flatten().cloned().collect();
                let parts = [&c.1, &w.1, &o.1];
                let meta = QueryMeta {
                    // The paced read may bring news at an index already published by
                    // another read: the composition is told apart by all four indexes.
                    content_hash: Some(format!(
                        "{}-{}-{}-{}",
                        m.last_index, c.1.last_index, w.1.last_index, o.1.last_index
                    )),
                    ..parts
                        .into_iter()
                        .fold(m.clone(), |acc, q| combined(&acc, q))
                };
                return Ok((passing(members, &non_passing), meta));
            }
        }
    }

    /// Start any read not in flight, and wait for the first to answer.
    async fn next_wake(&mut self) -> Woke {
        let members_read = self.members_read.get_or_insert_with(|| {
            Box::pin(membership_next(
                Watch::new(self.base.clone(), self.wait),
                self.client.clone(),
                self.service.clone(),
                self.tag.clone(),
                self.base.clone(),
            ))
        });
        let [critical, warning, other] = &mut self.checks_reads;
        let start = |slot, part| {
            start_part(
                slot,
                part,
                &self.client,
                &self.base,
                &self.service,
                self.wait,
            )
        };
        let (critical, warning, other) = (
            start(critical, Part::Critical),
            start(warning, Part::Warning),
            start(other, Part::Other),
        );
        tokio::select! {
            (watch, result) = members_read.as_mut() => Woke::Membership(watch, Box::new(result)),
            (watch, result) = critical.as_mut() => Woke::Checks(Part::Critical, watch, result),
            (watch, result) = warning.as_mut() => Woke::Checks(Part::Warning, watch, result),
            (watch, result) = other.as_mut() => Woke::Checks(Part::Other, watch, result),
        }
    }

    /// Everything read again, not blocking: the services' index, the list, the checks, in
    /// that order (each at least as recent as the one before).
    async fn read_all_now(&mut self) -> Result<()> {
        let (_, meta) = self.client.catalog().services(&self.base).await?;
        let (list, _) = self
            .client
            .catalog()
            .service(&self.service, self.tag.as_deref(), &self.base)
            .await?;
        let checks = read_parts(&self.client, &self.service, &self.base).await?;
        self.set_members(&list, meta);
        self.checks = checks.map(Some);
        Ok(())
    }

    /// Hold `list` (read with `meta`), its unchanged instances kept as they were.
    fn set_members(&mut self, list: &[CatalogService], meta: QueryMeta) {
        let previous = self.members.as_ref().map_or(&[][..], |(m, _)| m.as_slice());
        let members = members(list, previous);
        self.members = Some((members, meta));
    }

    /// After `woken` cleared a check, read at once and side by side: the prompt statuses it
    /// did not read, for the check may have moved there (`critical` to `warning`, or a status
    /// Consul does not know to either), and `/v1/catalog/services`, then the list if that
    /// moved, so that the list is not older than the checks (an instance's checks vanish in
    /// the write that removes it). The paced read is not read again here: that would cost
    /// Consul the whole checks table on every clearing flip.
    async fn confirm(&mut self, woken: Part) -> Result<()> {
        let others: Vec<Part> = [Part::Critical, Part::Warning]
            .into_iter()
            .filter(|&part| part != woken)
            .collect();
        let (client, service, base) = (&self.client, self.service.as_str(), &self.base);
        let (reads, services) = futures::future::try_join(
            futures::future::try_join_all(
                others
                    .iter()
                    .map(|&part| read_part(client, service, base, part)),
            ),
            client.catalog().services(base),
        )
        .await?;
        for (part, read) in others.into_iter().zip(reads) {
            self.checks[part.index()] = Some(read);
        }
        let (_, now) = services;
        if self
            .members
            .as_ref()
            .is_some_and(|(_, m)| now.last_index != m.last_index)
        {
            let (list, _) = self
                .client
                .catalog()
                .service(&self.service, self.tag.as_deref(), &self.base)
                .await?;
            self.set_members(&list, now);
        }
        Ok(())
    }
}

/// `slot`'s read of `part`, started if none is in flight.
fn start_part<'a>(
    slot: &'a mut Option<Pending<Checks>>,
    part: Part,
    client: &Client,
    base: &QueryOptions,
    service: &str,
    wait: Duration,
) -> &'a mut Pending<Checks> {
    slot.get_or_insert_with(|| {
        Box::pin(checks_next(
            part.watch(base, service, wait),
            client.clone(),
            part,
            service.to_owned(),
        ))
    })
}

/// Whether a blocking read's answer is below the index that read last delivered (`watched`,
/// then set to the answer's): Consul's state went back (a restart, a snapshot restored), and
/// everything is read again.
fn went_back(watched: &mut u64, meta: &QueryMeta) -> bool {
    let back = meta.last_index < *watched;
    *watched = meta.last_index;
    back
}

/// Whether an answer is older than the one held: a blocking read overtaken by a fresher
/// non-blocking read of the same table.
fn older<T>(meta: &QueryMeta, held: &Option<(T, QueryMeta)>) -> bool {
    held.as_ref()
        .is_some_and(|(_, current)| meta.last_index < current.last_index)
}

/// The composition's metadata: the larger index; the worse of leader contact and staleness;
/// the later arrival.
fn combined(a: &QueryMeta, b: &QueryMeta) -> QueryMeta {
    let later = if b.received_at >= a.received_at { b } else { a };
    QueryMeta {
        last_index: a.last_index.max(b.last_index),
        known_leader: a.known_leader && b.known_leader,
        last_contact_ms: a.last_contact_ms.max(b.last_contact_ms),
        content_hash: None,
        cache_hit: None,
        received_at: later.received_at,
        read_at: later.read_at,
    }
}

/// `checks` kept to what concerns `service`: its own checks and node checks. The status
/// reads are unfiltered on the server (a filter costs Consul more than the few checks it
/// saves); the paced read's filter already did this.
fn relevant(mut checks: Vec<HealthCheck>, service: &str) -> Vec<HealthCheck> {
    checks.retain(|c| c.service_id.is_empty() || c.service_name == service);
    checks
}

/// One part read now, not blocking.
async fn read_part(
    client: &Client,
    service: &str,
    base: &QueryOptions,
    part: Part,
) -> Result<Checks> {
    let (checks, meta) = client
        .health()
        .state(part.state(), &part.options(base, service))
        .await?;
    Ok((relevant(checks, service), meta))
}

/// Every part read now, in order.
async fn read_parts(client: &Client, service: &str, base: &QueryOptions) -> Result<[Checks; 3]> {
    Ok([
        read_part(client, service, base, Part::Critical).await?,
        read_part(client, service, base, Part::Warning).await?,
        read_part(client, service, base, Part::Other).await?,
    ])
}

/// Block on `/v1/catalog/services` until it moves, then read the list and the non-passing
/// checks, not blocking.
async fn membership_next(
    mut watch: Watch,
    client: Client,
    service: String,
    tag: Option<String>,
    base: QueryOptions,
) -> (Watch, Result<Membership>) {
    let result = async {
        let meta = watch
            .next(|opts| {
                let client = client.clone();
                async move {
                    let (_, meta) = client.catalog().services(&opts).await?;
                    Ok((meta.clone(), meta))
                }
            })
            .await?;
        let (list, _) = client
            .catalog()
            .service(&service, tag.as_deref(), &base)
            .await?;
        let checks = read_parts(&client, &service, &base).await?;
        Ok((list, meta, checks))
    }
    .await;
    (watch, result)
}

/// Block on one part (the watch is the part's: [`Part::watch`]) until it moves.
async fn checks_next(
    mut watch: Watch,
    client: Client,
    part: Part,
    service: String,
) -> (Watch, Result<Checks>) {
    let result = watch
        .next(|opts| {
            let client = client.clone();
            async move {
                let (checks, meta) = client.health().state(part.state(), &opts).await?;
                Ok(((checks, meta.clone()), meta))
            }
        })
        .await
        .map(|(checks, meta)| (relevant(checks, &service), meta));
    (watch, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node: &str, id: &str, port: u16) -> CatalogService {
        CatalogService {
            node: node.into(),
            address: format!("10.0.0.{}", node.len()),
            service_id: id.into(),
            service_name: "web".into(),
            service_port: port,
            ..Default::default()
        }
    }

    fn check(node: &str, service_id: &str, id: &str, status: HealthStatus) -> HealthCheck {
        HealthCheck {
            node: node.into(),
            check_id: id.into(),
            service_id: service_id.into(),
            service_name: if service_id.is_empty() {
                String::new()
            } else {
                "web".into()
            },
            status,
            ..Default::default()
        }
    }

    fn ids(instances: &[Arc<Instance>]) -> Vec<&str> {
        instances.iter().map(|i| i.id.as_str()).collect()
    }

    /// The passing set of `list` under `checks`, as the composer composes it.
    fn compose(list: &[CatalogService], checks: &[HealthCheck]) -> Vec<Arc<Instance>> {
        passing(&members(list, &[]), checks)
    }

    fn listed() -> Vec<CatalogService> {
        vec![
            member("n1", "web-2", 2),
            member("n1", "web-1", 1),
            member("n22", "web-3", 3),
            member("n22", "web-4", 4),
        ]
    }

    #[test]
    fn no_check_failing_lists_every_member_sorted() {
        assert_eq!(
            ids(&compose(&listed(), &[])),
            ["web-1", "web-2", "web-3", "web-4"]
        );
    }

    #[test]
    fn any_non_passing_check_of_an_instance_drops_it_and_only_it() {
        use HealthStatus::*;
        for status in [Critical, Warning, Maintenance, Unknown] {
            let checks = [check("n1", "web-1", "service:web-1:2", status)];
            assert_eq!(
                ids(&compose(&listed(), &checks)),
                ["web-2", "web-3", "web-4"],
                "{status}"
            );
        }
        // Several checks per instance: one failing is enough; a passing one listed (a foreign
        // answer unfiltered) drops nothing.
        let checks = [
            check("n1", "web-2", "a", Passing),
            check("n22", "web-3", "b", Passing),
            check("n22", "web-3", "c", Critical),
        ];
        assert_eq!(
            ids(&compose(&listed(), &checks)),
            ["web-1", "web-2", "web-4"]
        );
    }

    #[test]
    fn a_node_check_drops_every_instance_on_that_node() {
        for id in ["serfHealth", "_node_maintenance"] {
            let checks = [check("n22", "", id, HealthStatus::Critical)];
            assert_eq!(
                ids(&compose(&listed(), &checks)),
                ["web-1", "web-2"],
                "{id}"
            );
        }
    }

    #[test]
    fn a_check_is_matched_by_node_and_service_id() {
        // The same service ID on another node: a different instance.
        let mut list = listed();
        list.push(member("n333", "web-1", 9));
        let checks = [
            check(
                "n333",
                "web-1",
                "_service_maintenance:web-1",
                HealthStatus::Critical,
            ),
            check("elsewhere", "", "serfHealth", HealthStatus::Critical),
            check("n1", "other-9", "service:other-9", HealthStatus::Critical),
        ];
        let out = compose(&list, &checks);
        assert_eq!(ids(&out), ["web-1", "web-2", "web-3", "web-4"]);
        assert_eq!(out[0].node, "n1");
    }

    #[test]
    fn unchanged_instances_are_the_same_arc_in_every_read_and_composition() {
        let first = members(&listed(), &[]);
        let mut changed = listed();
        changed[0].service_port = 99; // web-2 moved
        changed.push(member("n4444", "web-0", 5));
        let second = members(&changed, &first);
        assert_eq!(ids(&second), ["web-0", "web-1", "web-2", "web-3", "web-4"]);
        let same = |a: &[Arc<Instance>], id: &str, b: &[Arc<Instance>]| {
            let find = |l: &[Arc<Instance>]| l.iter().find(|i| i.id == id).cloned().unwrap();
            Arc::ptr_eq(&find(a), &find(b))
        };
        for id in ["web-1", "web-3", "web-4"] {
            assert!(same(&first, id, &second), "{id} reused");
        }
        assert!(!same(&first, "web-2", &second), "a changed instance is new");
        assert_eq!(second[2].port, 99);
        let checks = [check("n22", "web-3", "c", HealthStatus::Critical)];
        let composed = passing(&second, &checks);
        assert!(
            composed
                .iter()
                .all(|i| second.iter().any(|m| Arc::ptr_eq(m, i))),
            "composing builds nothing"
        );
    }

    #[test]
    fn only_a_change_that_holds_more_out_skips_reading_the_list() {
        use HealthStatus::*;
        let a = check("n1", "web-1", "a", Critical);
        let b = check("n22", "web-3", "b", Warning);
        let node = check("n22", "", "serfHealth", Critical);
        let cases = [
            (vec![], vec![a.clone()], true),
            (vec![a.clone()], vec![a.clone(), b.clone()], true),
            (vec![a.clone()], vec![a.clone(), node.clone()], true),
            (vec![a.clone()], vec![], false),
            (vec![a.clone(), b], vec![a.clone(), node], false),
            // Nothing different: another service's check, or a passing instance removed.
            (vec![a.clone()], vec![a], false),
            (vec![], vec![], false),
        ];
        for (before, now, skips) in cases {
            assert_eq!(
                only_holds_more_out(&before, &now),
                skips,
                "{before:?} -> {now:?}"
            );
        }
    }

    #[test]
    fn instances_are_built_as_passing_lists_them() {
        let mut m = member("n1", "web-1", 80);
        m.service_tags = Some(vec!["v2".into()]);
        m.service_meta = Some([("shard".to_owned(), "0".to_owned())].into());
        m.service_weights = Some(consul_api::AgentWeights {
            passing: 7,
            warning: 1,
        });
        let i = instance(&m);
        assert_eq!(
            (i.host.as_str(), i.port, i.weight),
            ("10.0.0.2", 80, 7),
            "the node's address"
        );
        assert_eq!(i.tags, ["v2"]);
        m.service_address = "127.0.0.9".into();
        m.service_weights = None;
        let i = instance(&m);
        assert_eq!((i.host.as_str(), i.weight), ("127.0.0.9", 1));
    }

    #[test]
    fn the_filter_quotes_the_name() {
        assert_eq!(
            other_status_filter(r#"we"b\x"#),
            r#"Status != "passing" and Status != "critical" and Status != "warning" and (ServiceName == "we\"b\\x" or ServiceID == "")"#
        );
    }

    #[test]
    fn only_the_service_s_own_checks_and_node_checks_are_kept() {
        let mut other = check("n1", "api-1", "api-1-ttl", HealthStatus::Critical);
        other.service_name = "api".into();
        let kept = relevant(
            vec![
                check("n1", "web-1", "web-1-ttl", HealthStatus::Critical),
                other,
                check("n2", "", "serfHealth", HealthStatus::Critical),
            ],
            "web",
        );
        let ids: Vec<&str> = kept.iter().map(|c| c.check_id.as_str()).collect();
        assert_eq!(ids, ["web-1-ttl", "serfHealth"]);
    }
}
