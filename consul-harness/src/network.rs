//! Network faults between the agents of a [`Cluster`] on loopback: cut both ways or one way,
//! isolate an agent from others, heal; delay, jitter and loss on chosen links.
//!
//! Agents on one host cannot be partitioned by addresses alone: a connection between two
//! local addresses does not carry the sender's bind address as its source, and a packet
//! dropped on OUTPUT fails the sender's `sendto` (memberlist counts that as its own error,
//! not a failed probe). So each agent runs under a uid of its own
//! ([`ClusterSpec::own_uids`](crate::cluster::ClusterSpec::own_uids)), a packet is *marked* on
//! OUTPUT by (sending uid, destination address), and marked packets are dropped silently on
//! INPUT, as a real network would. Loss is a random share of the marked packets dropped on
//! INPUT (nftables' `numgen`); delay and jitter need the kernel's `netem` qdisc: the same
//! mark selects a `tc` netem band on `lo` ([`netem_available`] says when the kernel lacks
//! it, as this project's machine does).
//!
//! Ownership, with other engineers' tests and parallel test binaries on the same kernel:
//! * every [`Network`] has an nftables table of its own, `ip testbed_net_<pid>_<start>_<n>`
//!   (the owner's pid and its start time in clock ticks), deleted when the handle drops and,
//!   after a SIGKILL, by the next [`Network::new`] of any process, which deletes exactly the
//!   tables whose owner is gone;
//! * the netem bands (delay only) hang under one shared root qdisc on `lo` (`prio`, handle `c5:`, every
//!   unmarked packet in its first band, untouched). A band is held by its `fw` filter, whose
//!   mark names the owner's pid; bands are taken and given back under a file lock, the
//!   bands of dead owners are swept, and the root goes with the last band;
//! * rules only ever name loopback addresses that a cluster of this process reserved, and
//!   uids of [`uid_for`](crate::cluster::uid_for)'s range.
//!
//! Without root, or without `nft` or `tc`, [`Network::new`] fails with
//! [`Error::NetworkUnavailable`] naming what is missing; [`required`] says whether the caller
//! must then fail (CI) or may skip, saying so.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use crate::{
    cluster::{Cluster, Member, UID_BASE, is_reserved},
    error::{Error, Result},
    owner::{self, Owner},
};

/// An agent as the kernel tells it apart: the address it listens on and the uid it runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Its own loopback address.
    pub address: Ipv4Addr,
    /// Its uid; `None` when it runs as root (then it cannot be cut).
    pub uid: Option<u32>,
}

/// What a degraded link does to every packet on it (`tc netem`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Netem {
    /// Added delay.
    pub delay: Duration,
    /// Jitter around the delay (uniform, ±).
    pub jitter: Duration,
    /// Share of packets lost, in percent (0–100).
    pub loss_percent: f64,
}

impl Netem {
    /// Only loss.
    pub fn loss(percent: f64) -> Netem {
        Netem {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss_percent: percent,
        }
    }

    /// Only delay, with jitter.
    pub fn delay(delay: Duration, jitter: Duration) -> Netem {
        Netem {
            delay,
            jitter,
            loss_percent: 0.0,
        }
    }

    /// `netem`'s arguments: `delay 200ms 100ms loss random 20%`.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["netem".to_owned(), "limit".into(), "100000".into()];
        if !self.delay.is_zero() || !self.jitter.is_zero() {
            args.push("delay".into());
            args.push(format!("{}us", self.delay.as_micros()));
            if !self.jitter.is_zero() {
                args.push(format!("{}us", self.jitter.as_micros()));
            }
        }
        if self.loss_percent > 0.0 {
            args.extend(["loss".into(), "random".into()]);
            args.push(format!("{}%", self.loss_percent));
        }
        args
    }

    fn check(&self) -> Result<()> {
        if !(0.0..=100.0).contains(&self.loss_percent) {
            return Err(Error::Setting(format!(
                "loss {}%: give a share between 0 and 100",
                self.loss_percent
            )));
        }
        if self.jitter > self.delay {
            return Err(Error::Setting(format!(
                "jitter {:?} above the delay {:?}: packets cannot arrive before they leave",
                self.jitter, self.delay
            )));
        }
        Ok(())
    }

    /// Whether nftables alone can do it (loss without delay): no qdisc needed.
    pub fn in_nftables(&self) -> bool {
        self.delay.is_zero() && self.jitter.is_zero()
    }

    fn key(&self) -> (u128, u128, u64) {
        (
            self.delay.as_micros(),
            self.jitter.as_micros(),
            self.loss_percent.to_bits(),
        )
    }
}

// === the pure rule builder ===

/// A directed link: packets sent by `uid` to `to`.
pub type Link = (u32, Ipv4Addr);

/// What the network does now: cut links and degraded links. Pure: [`Rules::nft_script`]
/// renders it; [`Network`] applies it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    cuts: BTreeSet<Link>,
    degraded: BTreeMap<Link, usize>,
    netems: Vec<Netem>,
}

/// Every mark of this project: the top byte.
pub const MARK_TAG: u32 = 0xc5 << 24;

/// The mark of a cut packet, or (`index` ≥ 1) of netem band `index` of owner `pid`:
/// `0xc5`, the pid's low 16 bits, the index.
pub fn mark(pid: u32, index: u8) -> u32 {
    MARK_TAG | (pid & 0xffff) << 8 | u32::from(index)
}

/// The pid (low 16 bits) a mark of [`mark`]'s names, if it is one of this project's.
pub fn mark_owner(mark: u32) -> Option<u32> {
    (mark & 0xff00_0000 == MARK_TAG).then_some((mark >> 8) & 0xffff)
}

impl Rules {
    /// Drop what `uid` sends to `to`.
    pub fn cut(&mut self, link: Link) {
        self.cuts.insert(link);
    }

    /// Put what `uid` sends to `to` through `netem` (replacing an earlier setting).
    pub fn degrade(&mut self, link: Link, netem: Netem) {
        let index = match self.netems.iter().position(|n| n.key() == netem.key()) {
            Some(i) => i,
            None => {
                self.netems.push(netem);
                self.netems.len() - 1
            }
        };
        self.degraded.insert(link, index);
        self.drop_unused();
    }

    /// Remove every cut (degraded links stay).
    pub fn heal_cuts(&mut self) {
        self.cuts.clear();
    }

    /// Remove every cut and degradation.
    pub fn heal(&mut self) {
        *self = Rules::default();
    }

    /// The cut links.
    pub fn cuts(&self) -> &BTreeSet<Link> {
        &self.cuts
    }

    /// The distinct netem settings in use, in the order of their bands.
    pub fn netems(&self) -> &[Netem] {
        &self.netems
    }

    fn drop_unused(&mut self) {
        let used: BTreeSet<usize> = self.degraded.values().copied().collect();
        if used.len() == self.netems.len() {
            return;
        }
        let keep: Vec<usize> = (0..self.netems.len())
            .filter(|i| used.contains(i))
            .collect();
        self.netems = keep.iter().map(|i| self.netems[*i]).collect();
        for index in self.degraded.values_mut() {
            *index = keep.iter().position(|k| k == index).unwrap_or(0);
        }
    }

    /// The nftables script that makes table `ip <table>` say exactly this (created if
    /// missing, emptied, filled; `nft -f` applies it at once). `cut_mark` marks cut packets,
    /// `netem_marks[i]` those of [`Rules::netems`]`[i]`. A cut overrides a degradation of
    /// the same link (its mark is set last).
    pub fn nft_script(&self, table: &str, cut_mark: u32, netem_marks: &[u32]) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "table ip {table} {{}}");
        let _ = writeln!(s, "flush table ip {table}");
        let _ = writeln!(s, "table ip {table} {{");
        let _ = writeln!(
            s,
            "  chain mark_out {{\n    type filter hook output priority mangle; policy accept;"
        );
        for ((uid, to), index) in &self.degraded {
            if let Some(m) = netem_marks.get(*index) {
                let _ = writeln!(
                    s,
                    "    meta skuid {uid} ip daddr {to} meta mark set {m:#010x}"
                );
            }
        }
        for (uid, to) in &self.cuts {
            let _ = writeln!(
                s,
                "    meta skuid {uid} ip daddr {to} meta mark set {cut_mark:#010x}"
            );
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain drop_in {{\n    type filter hook input priority mangle; policy accept;"
        );
        let targets: BTreeSet<Ipv4Addr> = self.cuts.iter().map(|(_, to)| *to).collect();
        for to in targets {
            let _ = writeln!(
                s,
                "    meta mark {cut_mark:#010x} ip daddr {to} counter drop"
            );
        }
        // Loss without delay needs no qdisc: a random share of the marked packets dropped
        // here, per packet.
        for (i, netem) in self.netems.iter().enumerate() {
            let (Some(m), true) = (netem_marks.get(i), netem.in_nftables()) else {
                continue;
            };
            let threshold = (netem.loss_percent * 100.0).round() as u32;
            let targets: BTreeSet<Ipv4Addr> = self
                .degraded
                .iter()
                .filter(|(_, index)| **index == i)
                .map(|((_, to), _)| *to)
                .collect();
            for to in targets {
                let _ = writeln!(
                    s,
                    "    meta mark {m:#010x} ip daddr {to} numgen random mod 10000 < {threshold} counter drop"
                );
            }
        }
        let _ = writeln!(s, "  }}\n}}");
        s
    }
}

/// `ip testbed_net_<pid>_<start>_<n>`: the name of `owner`'s table `n`.
pub fn table_name(owner: Owner, n: u32) -> String {
    format!("{TABLE_PREFIX}{}_{n}", owner.tag())
}

const TABLE_PREFIX: &str = "testbed_net_";

/// The owner of a table named by [`table_name`].
pub fn table_owner(name: &str) -> Option<Owner> {
    let (owner, n) = Owner::parse(name.strip_prefix(TABLE_PREFIX)?)?;
    n.parse::<u32>().ok()?;
    Some(owner)
}

/// The table names in `nft list tables`' output.
pub fn parse_tables(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .filter(|name| name.starts_with(TABLE_PREFIX))
        .map(str::to_owned)
        .collect()
}

/// The packets counted by every `counter ... drop` rule of an `nft list table` listing.
pub fn dropped_packets(listing: &str) -> u64 {
    listing
        .lines()
        .filter(|l| l.trim_end().ends_with("drop"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "packets")?;
            words.get(i + 1)?.parse::<u64>().ok()
        })
        .sum()
}

/// The `(pref, fw handle)` of every filter in `tc filter show dev lo parent c5:`'s output.
pub fn parse_filters(listing: &str) -> Vec<(u16, u32)> {
    listing
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
            };
            let pref = after("pref")?.parse().ok()?;
            let handle = u32::from_str_radix(after("handle")?.trim_start_matches("0x"), 16).ok()?;
            Some((pref, handle))
        })
        .collect()
}

// === the kernel side ===

/// Whether a caller that cannot get a [`Network`] must fail rather than skip: with
/// `TESTBED_NETWORK=required`, or where the suite already insists on the real thing
/// (`CI` set, or `TESTBED_BACKEND=docker` as `.ci/run` sets it). `TESTBED_NETWORK=optional`
/// allows the skip everywhere.
pub fn required() -> bool {
    match std::env::var("TESTBED_NETWORK").as_deref() {
        Ok("required") => true,
        Ok("optional") => false,
        _ => {
            std::env::var_os("CI").is_some()
                || std::env::var("TESTBED_BACKEND").as_deref() == Ok("docker")
        }
    }
}

/// Network faults on one cluster's agents, removed when dropped.
#[derive(Debug)]
pub struct Network {
    table: String,
    endpoints: BTreeMap<Member, Endpoint>,
    rules: Rules,
    /// Netem bands held: (band, mark), in the order of `banded`.
    bands: Vec<(u16, u32)>,
    /// The netem settings the bands were made for.
    banded: Vec<Netem>,
}

static NEXT_TABLE: AtomicU32 = AtomicU32::new(0);
/// Mark indexes (1..=255) of live bands in this process.
static INDEXES: Mutex<BTreeSet<u8>> = Mutex::new(BTreeSet::new());

/// The root qdisc handle of the shared netem tree on `lo`.
const ROOT: &str = "c5:";
/// Band 1 holds every unmarked packet; netem bands are 2..=16.
const BANDS: u16 = 16;

impl Network {
    /// Ready to cut and degrade `cluster`'s links: checks root and the tools, sweeps what dead
    /// processes left, creates this handle's (empty) table. The cluster must run its agents
    /// under their own uids ([`ClusterSpec::own_uids`](crate::cluster::ClusterSpec)).
    pub fn new(cluster: &Cluster) -> Result<Network> {
        available()?;
        let endpoints: BTreeMap<Member, Endpoint> = cluster
            .members()
            .into_iter()
            .map(|m| (m, cluster.endpoint(m)))
            .collect();
        for (m, e) in &endpoints {
            if !is_reserved(e.address) || e.address.octets()[0] != 127 {
                return Err(Error::Setting(format!(
                    "{m} is on {}, not a loopback address this process reserved",
                    e.address
                )));
            }
            if e.uid.is_none_or(|u| u < UID_BASE) {
                return Err(Error::Setting(format!(
                    "{m} runs as root: start the cluster with ClusterSpec::own_uids to cut it"
                )));
            }
        }
        sweep();
        let table = table_name(Owner::me()?, NEXT_TABLE.fetch_add(1, Ordering::Relaxed));
        let mut network = Network {
            table,
            endpoints,
            rules: Rules::default(),
            bands: Vec::new(),
            banded: Vec::new(),
        };
        network.apply()?;
        Ok(network)
    }

    /// The table this handle owns.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn link(&self, from: Member, to: Member) -> Result<Link> {
        let endpoint = |m: Member| {
            self.endpoints
                .get(&m)
                .copied()
                .ok_or_else(|| Error::Setting(format!("{m} is not a member of this cluster")))
        };
        let (from, to) = (endpoint(from)?, endpoint(to)?);
        let uid = from
            .uid
            .ok_or_else(|| Error::Setting("a root agent".into()))?;
        Ok((uid, to.address))
    }

    /// Drop everything `from` sends to `to` (one way).
    pub fn cut_one_way(&mut self, from: Member, to: Member) -> Result<()> {
        let link = self.link(from, to)?;
        self.rules.cut(link);
        self.apply()
    }

    /// Cut `a` and `b` apart, both ways.
    pub fn cut(&mut self, a: Member, b: Member) -> Result<()> {
        for link in [self.link(a, b)?, self.link(b, a)?] {
            self.rules.cut(link);
        }
        self.apply()
    }

    /// Cut `member` from each of `others`, both ways.
    pub fn isolate(&mut self, member: Member, others: &[Member]) -> Result<()> {
        for other in others.iter().filter(|o| **o != member) {
            for link in [self.link(member, *other)?, self.link(*other, member)?] {
                self.rules.cut(link);
            }
        }
        self.apply()
    }

    /// Put what `from` sends to `to` through `netem`.
    pub fn degrade_one_way(&mut self, from: Member, to: Member, netem: Netem) -> Result<()> {
        netem.check()?;
        let link = self.link(from, to)?;
        self.rules.degrade(link, netem);
        self.apply()
    }

    /// Put every link between two distinct members of `members`, both ways, through `netem`.
    pub fn degrade_all(&mut self, members: &[Member], netem: Netem) -> Result<()> {
        netem.check()?;
        for a in members {
            for b in members.iter().filter(|b| *b != a) {
                let link = self.link(*a, *b)?;
                self.rules.degrade(link, netem);
            }
        }
        self.apply()
    }

    /// Remove every cut; degraded links stay.
    pub fn heal_cuts(&mut self) -> Result<()> {
        self.rules.heal_cuts();
        self.apply()
    }

    /// Remove every cut and every degradation.
    pub fn heal(&mut self) -> Result<()> {
        self.rules.heal();
        self.apply()
    }

    /// Packets the rules of this handle dropped so far (cuts and loss; the counters start
    /// again at zero when the rules change): proof that a fault is more than a rule.
    pub fn dropped(&self) -> Result<u64> {
        let listing = output("nft", &["list", "table", "ip", &self.table])?;
        Ok(dropped_packets(&listing))
    }

    /// The rules in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Bring the kernel in line with `self.rules`: bands first (a mark with no band is
    /// harmless, a band whose netem is stale is not), then the table at once.
    fn apply(&mut self) -> Result<()> {
        let pid = std::process::id();
        self.sync_bands(pid)?;
        let mut bands = self.bands.iter();
        let marks: Vec<u32> = (0..self.rules.netems().len())
            .map(|i| {
                if self.rules.netems()[i].in_nftables() {
                    mark(pid, 0x80 | (i as u8 & 0x7f))
                } else {
                    bands.next().map_or(0, |(_, m)| *m)
                }
            })
            .collect();
        let script = self.rules.nft_script(&self.table, mark(pid, 0), &marks);
        nft_script(&script)
    }

    /// Make the bands held match the netem settings with a delay (loss alone is done in
    /// nftables): release all and take anew when they differ (a change of setting is rare:
    /// once per scenario step).
    fn sync_bands(&mut self, pid: u32) -> Result<()> {
        let wanted: Vec<Netem> = self
            .rules
            .netems()
            .iter()
            .filter(|n| !n.in_nftables())
            .copied()
            .collect();
        if self.banded.len() == wanted.len()
            && self
                .banded
                .iter()
                .zip(&wanted)
                .all(|(a, b)| a.key() == b.key())
        {
            return Ok(());
        }
        if !wanted.is_empty() {
            netem_available()?;
        }
        let _lock = TcLock::take()?;
        release_bands(&std::mem::take(&mut self.bands));
        self.banded.clear();
        if wanted.is_empty() {
            remove_root_if_unused();
            return Ok(());
        }
        ensure_root()?;
        for netem in &wanted {
            match take_band(pid, netem) {
                Ok(b) => self.bands.push(b),
                Err(e) => {
                    release_bands(&std::mem::take(&mut self.bands));
                    remove_root_if_unused();
                    return Err(e);
                }
            }
        }
        self.banded = wanted;
        Ok(())
    }
}

/// Whether this kernel can delay packets: the `netem` qdisc, the `prio` qdisc and the `fw`
/// classifier (`CONFIG_NET_SCH_NETEM`, `CONFIG_NET_SCH_PRIO`, `CONFIG_NET_CLS_FW`), as
/// `/proc/config.gz` says where it is readable. Loss alone needs none of them.
pub fn netem_available() -> Result<()> {
    let Ok(config) = Command::new("zcat").arg("/proc/config.gz").output() else {
        return Ok(());
    };
    let config = String::from_utf8_lossy(&config.stdout);
    let missing: Vec<&str> = [
        "CONFIG_NET_SCH_NETEM",
        "CONFIG_NET_SCH_PRIO",
        "CONFIG_NET_CLS_FW",
    ]
    .into_iter()
    .filter(|k| config.contains(&format!("# {k} is not set")))
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::NetworkUnavailable(format!(
            "a kernel with {} to delay packets (this one, {}, has not; loss alone is done in \
             nftables and works)",
            missing.join(", "),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        )))
    }
}

impl Drop for Network {
    /// The table goes, and the bands with it (the root qdisc too if no one else holds a band).
    fn drop(&mut self) {
        if let Err(e) = nft(&["delete", "table", "ip", &self.table]) {
            tracing::warn!(table = %self.table, error = %e, "cannot delete the network table");
        }
        if !self.bands.is_empty() {
            match TcLock::take() {
                Ok(_lock) => {
                    release_bands(&self.bands);
                    remove_root_if_unused();
                }
                Err(e) => tracing::warn!(error = %e, "cannot release the netem bands"),
            }
        }
    }
}

/// Whether this process can change the kernel's tables: root, `nft` and `tc` present.
pub fn available() -> Result<()> {
    let mut missing = Vec::new();
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        });
    if euid.as_deref() != Some("0") {
        missing.push("root (CAP_NET_ADMIN), to change the kernel's packet filter and qdiscs");
    }
    if !runs("nft", &["--version"]) {
        missing.push("the nft command (Debian: apt-get install nftables)");
    }
    if !runs("tc", &["-V"]) {
        missing.push("the tc command (Debian: apt-get install iproute2)");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::NetworkUnavailable(missing.join("; ")))
    }
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Delete the tables and netem bands whose owner is gone (what a SIGKILLed run left);
/// [`Network::new`] does it first.
pub fn sweep() {
    if let Ok(listing) = output("nft", &["list", "tables"]) {
        for table in parse_tables(&listing) {
            if table_owner(&table).is_some_and(|owner| !owner.alive()) {
                tracing::info!(%table, "deleting a network table left by a dead process");
                let _ = nft(&["delete", "table", "ip", &table]);
            }
        }
    }
    if let Ok(_lock) = TcLock::take() {
        let dead: Vec<(u16, u32)> = filters()
            .into_iter()
            .filter(|(_, m)| mark_owner(*m).is_none_or(|pid| !owner::runs(pid)))
            .collect();
        if !dead.is_empty() {
            tracing::info!(?dead, "releasing netem bands left by dead processes");
        }
        release_bands(&dead);
        remove_root_if_unused();
    }
}

fn filters() -> Vec<(u16, u32)> {
    output("tc", &["filter", "show", "dev", "lo", "parent", ROOT])
        .map(|s| parse_filters(&s))
        .unwrap_or_default()
}

fn root_is_ours() -> Result<bool> {
    let listing = output("tc", &["qdisc", "show", "dev", "lo", "root"])?;
    let first = listing.lines().next().unwrap_or_default();
    if first.contains(&format!("prio {ROOT}")) {
        Ok(true)
    } else if first.starts_with("qdisc noqueue") || first.is_empty() {
        Ok(false)
    } else {
        Err(Error::Network {
            what: "add netem to lo".into(),
            reason: format!("lo already has a root qdisc that is not this project's: {first}"),
        })
    }
}

fn ensure_root() -> Result<()> {
    if root_is_ours()? {
        return Ok(());
    }
    let mut args: Vec<String> = ["qdisc", "add", "dev", "lo", "root", "handle", ROOT, "prio"]
        .map(String::from)
        .to_vec();
    args.extend(["bands".into(), BANDS.to_string(), "priomap".into()]);
    args.extend(std::iter::repeat_n("0".to_owned(), 16));
    tc(&args)
}

fn remove_root_if_unused() {
    if matches!(root_is_ours(), Ok(true)) && filters().is_empty() {
        let _ = tc(&["qdisc", "del", "dev", "lo", "root", "handle", ROOT]);
    }
}

/// Take a free band (2..=16) for `netem`, with a fresh mark of `pid`'s.
fn take_band(pid: u32, netem: &Netem) -> Result<(u16, u32)> {
    let used: BTreeSet<u16> = filters().into_iter().map(|(pref, _)| pref).collect();
    let band = (2..=BANDS)
        .find(|b| !used.contains(b))
        .ok_or_else(|| Error::Network {
            what: "take a netem band on lo".into(),
            reason: format!("all {} bands are held by live tests", BANDS - 1),
        })?;
    let index = {
        let mut indexes = INDEXES.lock().unwrap_or_else(PoisonError::into_inner);
        let i = (1..=u8::MAX)
            .find(|i| !indexes.contains(i))
            .ok_or_else(|| Error::Network {
                what: "take a netem mark".into(),
                reason: "255 bands held by this process".into(),
            })?;
        indexes.insert(i);
        i
    };
    let m = mark(pid, index);
    let class = format!("c5:{band:x}");
    let handle = format!("{:x}:", 0xc500 + band);
    let mut args: Vec<String> = [
        "qdisc", "replace", "dev", "lo", "parent", &class, "handle", &handle,
    ]
    .map(String::from)
    .to_vec();
    args.extend(netem.args());
    let added = tc(&args).and_then(|()| {
        tc(&[
            "filter",
            "add",
            "dev",
            "lo",
            "parent",
            ROOT,
            "protocol",
            "ip",
            "prio",
            &band.to_string(),
            "handle",
            &format!("{m:#x}"),
            "fw",
            "classid",
            &class,
        ])
    });
    match added {
        Ok(()) => Ok((band, m)),
        Err(e) => {
            release_bands(&[(band, m)]);
            Err(e)
        }
    }
}

fn release_bands(bands: &[(u16, u32)]) {
    for (band, m) in bands {
        let _ = tc(&[
            "filter",
            "del",
            "dev",
            "lo",
            "parent",
            ROOT,
            "prio",
            &band.to_string(),
        ]);
        let _ = tc(&[
            "qdisc",
            "del",
            "dev",
            "lo",
            "parent",
            &format!("c5:{band:x}"),
        ]);
        if mark_owner(*m) == Some(std::process::id() & 0xffff) {
            INDEXES
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&((m & 0xff) as u8));
        }
    }
}

/// The file lock that serializes changes to the shared netem tree, machine-wide.
struct TcLock(std::fs::File);

impl TcLock {
    fn take() -> Result<TcLock> {
        let dir = if std::path::Path::new("/run/lock").is_dir() {
            std::path::PathBuf::from("/run/lock")
        } else {
            std::env::temp_dir()
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("consul-testbed-netem.lock"))?;
        file.lock()?;
        Ok(TcLock(file))
    }
}

impl Drop for TcLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn nft_script(script: &str) -> Result<()> {
    let fail = |reason: String| Error::Network {
        what: "nft -f -".into(),
        reason,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "{}; the script was:\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn nft(args: &[&str]) -> Result<()> {
    output("nft", args).map(|_| ())
}

fn tc<S: AsRef<str>>(args: &[S]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    output("tc", &args).map(|_| ())
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let fail = |reason: String| Error::Network {
        what: format!("{program} {}", args.join(" ")),
        reason,
    };
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(127, 1, 2, 3);
    const B: Ipv4Addr = Ipv4Addr::new(127, 4, 5, 6);

    #[test]
    fn an_empty_plan_is_an_empty_table_with_both_chains() {
        let s = Rules::default().nft_script("testbed_net_1_2_0", mark(1, 0), &[]);
        assert!(s.starts_with("table ip testbed_net_1_2_0 {}\nflush table ip testbed_net_1_2_0\n"));
        assert!(s.contains("hook output priority mangle"));
        assert!(s.contains("hook input priority mangle"));
        assert!(!s.contains("meta mark"), "{s}");
    }

    #[test]
    fn a_cut_marks_on_output_by_uid_and_address_and_drops_on_input() {
        let mut r = Rules::default();
        r.cut((2_000_000_007, B));
        r.cut((2_000_000_009, B));
        let s = r.nft_script("t", 0xc5000100, &[]);
        assert!(s.contains("meta skuid 2000000007 ip daddr 127.4.5.6 meta mark set 0xc5000100"));
        assert!(s.contains("meta skuid 2000000009 ip daddr 127.4.5.6 meta mark set 0xc5000100"));
        // One drop per destination, matching mark AND address (marks alone may be shared
        // with another process's table).
        assert_eq!(s.matches(" drop\n").count(), 1, "{s}");
        assert!(s.contains("meta mark 0xc5000100 ip daddr 127.4.5.6 counter drop"));
        r.heal();
        assert_eq!(r, Rules::default());
    }

    #[test]
    fn degraded_links_share_a_band_per_setting_and_a_cut_wins() {
        let mut r = Rules::default();
        let lossy = Netem::loss(20.0);
        let slow = Netem::delay(Duration::from_millis(200), Duration::from_millis(100));
        r.degrade((2_000_000_001, A), lossy);
        r.degrade((2_000_000_002, A), lossy);
        r.degrade((2_000_000_001, B), slow);
        assert_eq!(r.netems().len(), 2);
        r.cut((2_000_000_001, B));
        let s = r.nft_script("t", 0xc5000100, &[0xc5000101, 0xc5000102]);
        let lossy_marks = s.matches("meta mark set 0xc5000101").count();
        assert_eq!(lossy_marks, 2, "{s}");
        let slow_at = s
            .find("ip daddr 127.4.5.6 meta mark set 0xc5000102")
            .unwrap();
        let cut_at = s
            .find("ip daddr 127.4.5.6 meta mark set 0xc5000100")
            .unwrap();
        assert!(cut_at > slow_at, "the cut's mark is set last: {s}");
        // Re-degrading every link with one setting frees the other's band.
        r.degrade((2_000_000_001, B), lossy);
        assert_eq!(r.netems().len(), 1);
        r.heal_cuts();
        assert!(r.cuts().is_empty());
        assert_eq!(r.netems().len(), 1);
    }

    #[test]
    fn loss_alone_is_a_random_drop_on_input() {
        let mut r = Rules::default();
        r.degrade((2_000_000_001, A), Netem::loss(20.0));
        r.degrade((2_000_000_002, A), Netem::loss(20.0));
        r.degrade((2_000_000_002, B), Netem::loss(20.0));
        let s = r.nft_script("t", 0xc5000100, &[0xc5000180]);
        assert_eq!(s.matches("meta mark set 0xc5000180").count(), 3, "{s}");
        assert!(s.contains(
            "meta mark 0xc5000180 ip daddr 127.1.2.3 numgen random mod 10000 < 2000 counter drop"
        ));
        assert!(s.contains(
            "meta mark 0xc5000180 ip daddr 127.4.5.6 numgen random mod 10000 < 2000 counter drop"
        ));
        // A delayed link is the qdisc's: no drop rule for it here.
        let mut d = Rules::default();
        d.degrade(
            (2_000_000_001, A),
            Netem::delay(Duration::from_millis(200), Duration::ZERO),
        );
        assert!(
            !d.nft_script("t", 0xc5000100, &[0xc5000102])
                .contains("numgen")
        );
    }

    #[test]
    fn netem_arguments() {
        let n = Netem {
            delay: Duration::from_millis(200),
            jitter: Duration::from_millis(100),
            loss_percent: 5.0,
        };
        assert_eq!(
            n.args().join(" "),
            "netem limit 100000 delay 200000us 100000us loss random 5%"
        );
        assert_eq!(
            Netem::loss(40.0).args().join(" "),
            "netem limit 100000 loss random 40%"
        );
        assert!(Netem::loss(101.0).check().is_err());
        assert!(
            Netem::delay(Duration::from_millis(1), Duration::from_millis(2))
                .check()
                .is_err()
        );
        assert!(n.check().is_ok());
    }

    #[test]
    fn marks_and_table_names_name_their_owner() {
        let m = mark(31_999, 7);
        assert_eq!(m, 0xc57cff07);
        assert_eq!(mark_owner(m), Some(31_999));
        assert_eq!(
            mark_owner(0x0000_4000),
            None,
            "kube-proxy's mark is not ours"
        );
        let owner = Owner {
            pid: 4242,
            start: 987_654,
        };
        let t = table_name(owner, 3);
        assert_eq!(t, "testbed_net_4242_987654_3");
        assert_eq!(table_owner(&t), Some(owner));
        assert_eq!(table_owner("testbed_net_4242_987654"), None);
        assert_eq!(table_owner("testbed_net_x_1_2"), None);
        assert_eq!(table_owner("filter"), None);
        let listing = "table ip nat\ntable ip filter\ntable ip testbed_net_12_34_0\ntable inet testbed_net_1_1_1\n";
        assert_eq!(
            parse_tables(listing),
            vec!["testbed_net_12_34_0".to_owned()]
        );
    }

    #[test]
    fn dropped_packets_are_summed_from_the_counters() {
        let listing = "table ip t {\n\tchain drop_in {\n\
            \t\tmeta mark 0xc5000100 ip daddr 127.4.5.6 counter packets 12 bytes 900 drop\n\
            \t\tmeta mark 0xc5000180 ip daddr 127.1.2.3 numgen random mod 10000 < 2000 counter packets 30 bytes 1 drop\n\
            \t\tmeta skuid 2000000001 ip daddr 127.1.2.3 meta mark set 0xc5000180\n\t}\n}\n";
        assert_eq!(dropped_packets(listing), 42);
        assert_eq!(dropped_packets(""), 0);
    }

    #[test]
    fn filters_are_read_from_tc() {
        let listing = "filter protocol ip pref 2 fw chain 0 \n\
                       filter protocol ip pref 2 fw chain 0 handle 0xc5123402 classid c5:2 \n\
                       filter protocol ip pref 5 fw chain 0 handle 0xc5000101 classid c5:5 \n";
        assert_eq!(
            parse_filters(listing),
            vec![(2, 0xc5123402), (5, 0xc5000101)]
        );
    }
}
