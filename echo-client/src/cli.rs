//! The command line: [`Args`] (clap) and [`run`], shared by the `echo-client` binary and
//! `testbed echo-client`. Stdout gets one line per reply (see [`Reply::line`]) and a final
//! `done ...` line; logs go to stderr.

use std::{collections::BTreeSet, ffi::OsString, time::Duration};

use clap::{Parser, ValueEnum};
use consul_api::GoDuration;
use tokio::time::{Instant, MissedTickBehavior};

use crate::{
    balancer::Strategy,
    client::{ClientConfig, EchoClient, Reply},
    discovery::Source,
    error::{Error, Result},
    naive::{self, NaiveConfig},
};

/// Which client to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The seed article's client: agent service list, one ID, no failover.
    Naive,
    /// Healthy instances by blocking queries, failover without losing a message.
    Resilient,
}

/// How to choose among passing instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Balance {
    /// Each new connection to the next instance.
    RoundRobin,
    /// Power of two choices: the faster of two random instances.
    P2c,
}

/// Which of Consul's interfaces the resilient client discovers through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// Passing instances by health blocking queries (the default, and the one to use).
    Health,
    /// Every registered instance by catalog blocking queries, healthy or not.
    Catalog,
    /// The agent's own list, polled (the seed article's way): healthy or not.
    Agent,
    /// A prepared query (`--query`), polled; fails over to other datacenters if it says so.
    Query,
    /// SRV records from the agent's DNS interface (`--dns-addr`), polled, over TCP.
    Dns,
}

/// Send messages to an echo service found through Consul and print each reply with the
/// instance that served it. Consul's address and TLS settings come from the flags below or
/// Consul's own variables (CONSUL_HTTP_ADDR, CONSUL_HTTP_SSL, CONSUL_CACERT, CONSUL_CAPATH,
/// CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME, CONSUL_HTTP_SSL_VERIFY); the
/// ACL token from CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE.
#[derive(Parser, Debug, Clone)]
#[command(name = "echo-client", version)]
pub struct Args {
    /// The service name to discover.
    #[arg(long, default_value = "servernode")]
    pub service: String,
    /// Naive mode: the service ID to look up (default: the service name with _1 appended).
    #[arg(long)]
    pub service_id: Option<String>,
    /// Only instances with this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Ask this datacenter instead of the agent's own.
    #[arg(long)]
    pub datacenter: Option<String>,
    /// Datacenters to fail over to, in order (comma-separated), when the own one lists no
    /// passing instance.
    #[arg(long, value_delimiter = ',')]
    pub failover_dc: Vec<String>,
    /// How many replies to get.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Pause between messages (Go syntax: 1s, 250ms).
    #[arg(long, default_value = "1s")]
    pub interval: GoDuration,
    /// Message text; message N is the text, a comma and N ("hello world, 001").
    #[arg(long, default_value = "hello world")]
    pub message: String,
    /// Naive (the seed article's client) or resilient.
    #[arg(long, value_enum, default_value_t = Mode::Resilient)]
    pub mode: Mode,
    /// Give up when a message is not answered for this long (naive: no reply for this long).
    #[arg(long, default_value = "30s")]
    pub timeout: GoDuration,
    /// Treat an instance as failed when its reply takes longer than this.
    #[arg(long, default_value = "2s")]
    pub reply_timeout: GoDuration,
    /// Deadline to connect to an instance.
    #[arg(long, default_value = "1s")]
    pub connect_timeout: GoDuration,
    /// First ejection cooldown of a failed instance (doubles per consecutive failure).
    #[arg(long, default_value = "2s")]
    pub cooldown: GoDuration,
    /// How to choose among passing instances.
    #[arg(long, value_enum, default_value_t = Balance::RoundRobin)]
    pub balance: Balance,
    /// Where the resilient client learns instances from.
    #[arg(long, value_enum, default_value_t = SourceKind::Health)]
    pub source: SourceKind,
    /// The prepared query to execute (`--source query`), or to resolve as
    /// `<query>.query.consul` (`--source dns`).
    #[arg(long)]
    pub query: Option<String>,
    /// The agent's DNS interface (`--source dns`); default: the Consul agent's host, port 8600.
    #[arg(long)]
    pub dns_addr: Option<std::net::SocketAddr>,
    /// How often the polled sources (agent, query, dns) read.
    #[arg(long, default_value = "1s")]
    pub poll: GoDuration,
    /// Stay on the current instance when new ones are listed (default: move with probability
    /// added/total, so that many clients spread over a scale-out).
    #[arg(long)]
    pub no_spread: bool,
    /// Keep a standby connection: one more open connection, to a second passing instance,
    /// verified by one echo, so that a failover resends on it without connecting (it costs
    /// one idle connection per client on a server). Off by default: it does not reliably
    /// shorten a failover, as the client first waits for the dead instance's close either
    /// way (BENCHMARKS.md, `failover/kill/*_standby` beside the rows without it), and it
    /// doubles the connections every server holds.
    #[arg(long)]
    pub standby: bool,
    /// Discovery's read consistency: stale (any server answers, also during an election or
    /// without quorum), default (the leader answers; reads fail during an election) or
    /// consistent (the leader after a quorum check).
    #[arg(long, default_value = "stale")]
    pub consistency: consul_api::Consistency,
    /// With stale reads: the oldest answer applied (its X-Consul-LastContact); an older one
    /// is treated as an outage and the last known instances kept. Unbounded when unset.
    #[arg(long)]
    pub max_stale: Option<GoDuration>,
    /// Read through the agent's cache (`?cached`, health and catalog sources): one query to
    /// the servers per agent, shared by all its clients (7× less server CPU with 100 clients
    /// in `testbed scale`); a revoked token is noticed only when the agent's background
    /// refresh of the entry returns (the next change, or up to 10 minutes).
    #[arg(long)]
    pub cached: bool,
    /// A server-side filter (Consul's `filter`, e.g. 'Service.Meta.shard == "0"'): only the
    /// instances it selects are sent and used.
    #[arg(long)]
    pub filter: Option<String>,
    /// Where the Consul agent is and how to speak TLS to it.
    #[command(flatten)]
    pub consul: consul_api::ConsulArgs,
}

impl Args {
    /// Every flag at its default, whatever the environment holds (no `CONSUL_*` variable is
    /// read): the arguments a launcher starts from.
    pub fn defaults() -> std::result::Result<Args, clap::Error> {
        consul_api::args::defaults()
    }

    /// These arguments as the command line that parses back into them, every setting
    /// written out; Consul's flags only where given.
    pub fn to_argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: String| {
            argv.push(name.into());
            argv.push(value.into());
        };
        flag("--service", self.service.clone());
        if let Some(id) = &self.service_id {
            flag("--service-id", id.clone());
        }
        if let Some(tag) = &self.tag {
            flag("--tag", tag.clone());
        }
        if let Some(dc) = &self.datacenter {
            flag("--datacenter", dc.clone());
        }
        if !self.failover_dc.is_empty() {
            flag("--failover-dc", self.failover_dc.join(","));
        }
        flag("--count", self.count.to_string());
        flag("--interval", self.interval.to_string());
        flag("--message", self.message.clone());
        flag("--mode", value_name(&self.mode));
        flag("--timeout", self.timeout.to_string());
        flag("--reply-timeout", self.reply_timeout.to_string());
        flag("--connect-timeout", self.connect_timeout.to_string());
        flag("--cooldown", self.cooldown.to_string());
        flag("--balance", value_name(&self.balance));
        flag("--source", value_name(&self.source));
        if let Some(query) = &self.query {
            flag("--query", query.clone());
        }
        if let Some(addr) = self.dns_addr {
            flag("--dns-addr", addr.to_string());
        }
        flag("--poll", self.poll.to_string());
        flag("--consistency", self.consistency.to_string());
        if let Some(max_stale) = self.max_stale {
            flag("--max-stale", max_stale.to_string());
        }
        if let Some(filter) = &self.filter {
            flag("--filter", filter.clone());
        }
        if self.no_spread {
            argv.push("--no-spread".into());
        }
        if self.standby {
            argv.push("--standby".into());
        }
        if self.cached {
            argv.push("--cached".into());
        }
        argv.extend(self.consul.to_argv());
        argv
    }
}

/// The name a [`ValueEnum`] value is written as on the command line.
fn value_name(value: &impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// Run the client the arguments describe.
pub async fn run(args: Args) -> Result<()> {
    if args.message.contains('\n') {
        return Err(Error::InvalidMessage(
            "--message cannot contain a newline".into(),
        ));
    }
    if args.max_stale.is_some() && args.consistency != consul_api::Consistency::Stale {
        return Err(Error::Config(format!(
            "--max-stale bounds stale reads: it needs --consistency stale (not {})",
            args.consistency
        )));
    }
    let consul = args.consul.config()?;
    match args.mode {
        Mode::Naive => run_naive(args, consul).await,
        Mode::Resilient => run_resilient(args, consul).await,
    }
}

async fn run_naive(args: Args, consul: consul_api::Config) -> Result<()> {
    let service_id = args
        .service_id
        .clone()
        .unwrap_or_else(|| format!("{}_1", args.service));
    let summary = naive::run(NaiveConfig {
        consul,
        service_id,
        message: args.message,
        count: args.count,
        interval: args.interval.into(),
        poll: Duration::from_secs(1),
        timeout: args.timeout.into(),
        io_timeout: args.reply_timeout.into(),
    })
    .await?;
    println!(
        "done mode=naive sent={} replies={} lost={} mismatched={} not_found={} dial_errors={}",
        summary.sent,
        summary.replies,
        summary.sent - summary.replies,
        summary.mismatched,
        summary.not_found,
        summary.dial_errors
    );
    mismatch_check(summary.mismatched, summary.replies)
}

/// The discovery source the flags ask for.
fn source(args: &Args, consul: &str) -> Result<Source> {
    let every: Duration = args.poll.into();
    if every.is_zero() && !matches!(args.source, SourceKind::Health | SourceKind::Catalog) {
        return Err(Error::Config("--poll must be above zero".into()));
    }
    Ok(match args.source {
        SourceKind::Health => Source::Health,
        SourceKind::Catalog => Source::Catalog,
        SourceKind::Agent => Source::Agent { every },
        SourceKind::Query => Source::PreparedQuery {
            name: args.query.clone().ok_or_else(|| {
                Error::Config("--source query needs --query <prepared query name>".into())
            })?,
            every,
        },
        SourceKind::Dns => Source::Dns {
            server: match args.dns_addr {
                Some(addr) => addr,
                None => default_dns_addr(consul)?,
            },
            query: args.query.clone(),
            every,
        },
    })
}

/// The agent's DNS interface on the host of its HTTP address, Consul's default port 8600.
fn default_dns_addr(consul: &str) -> Result<std::net::SocketAddr> {
    let ip: std::net::IpAddr = host_of(consul).parse().map_err(|_| {
        Error::Config(format!(
            "--source dns: the Consul address {consul:?} is not an IP address; give --dns-addr"
        ))
    })?;
    Ok(std::net::SocketAddr::new(ip, 8600))
}

/// The host of a Consul address as `CONSUL_HTTP_ADDR` holds it: with or without a scheme, a
/// port and a path; an IPv6 host in brackets (`[::1]:8500`) or bare (`::1`).
fn host_of(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(bracketed) = authority.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or(bracketed);
    }
    match authority.rsplit_once(':') {
        // One colon: host and port. More: a bare IPv6 address.
        Some((host, _)) if !host.contains(':') => host,
        _ => authority,
    }
}

async fn run_resilient(args: Args, consul: consul_api::Config) -> Result<()> {
    let consul_address = consul.address.clone();
    let mut config = ClientConfig::new(consul, &args.service)
        .with_tag(args.tag.clone())
        .with_datacenter(args.datacenter.clone())
        .with_consistency(args.consistency, args.max_stale.map(Into::into))
        .with_failover(args.failover_dc.clone());
    config.discovery.cached = args.cached;
    config.discovery.filter = args.filter.clone();
    config.session.message_timeout = args.timeout.into();
    config.session.reply_timeout = args.reply_timeout.into();
    config.session.connect_timeout = args.connect_timeout.into();
    config.session.cooldown = args.cooldown.into();
    config.session.strategy = match args.balance {
        Balance::RoundRobin => Strategy::RoundRobin,
        Balance::P2c => Strategy::PowerOfTwoChoices,
    };
    config.session.spread = !args.no_spread;
    config.session.standby = args.standby;
    config.discovery.source = source(&args, &consul_address)?;
    let client = EchoClient::start(config)?;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(args.interval.into());
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut mismatched = 0;
    let mut resent = 0;
    let mut served = BTreeSet::new();
    for seq in 1..=args.count {
        ticker.tick().await;
        let payload = naive::message(&args.message, seq);
        let reply: Reply = match client.send(payload).await {
            Ok(reply) => reply,
            // The library tells an echo from other bytes; count it and go on.
            Err(e @ Error::NotAnEcho { .. }) => {
                tracing::warn!(seq, "{e}");
                mismatched += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        println!("{}", reply.line(seq));
        if reply.attempts > 1 {
            resent += 1;
        }
        served.insert(reply.instance.id);
    }
    println!(
        "done mode=resilient sent={count} replies={count} lost=0 mismatched={mismatched} \
         resent={resent} instances={} elapsed_ms={}",
        served.into_iter().collect::<Vec<_>>().join(","),
        started.elapsed().as_millis(),
        count = args.count,
    );
    mismatch_check(mismatched, args.count)
}

fn mismatch_check(mismatched: u64, replies: u64) -> Result<()> {
    if mismatched == 0 {
        Ok(())
    } else {
        Err(Error::Mismatch {
            mismatched,
            replies,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn the_command_line_parses_back_into_the_arguments() {
        let mut given = Args::defaults().unwrap();
        assert_eq!(given.service, "servernode");
        assert_eq!(given.mode, Mode::Resilient);
        given.service_id = Some("servernode_7".into());
        given.tag = Some("v1".into());
        given.datacenter = Some("dc2".into());
        given.failover_dc = vec!["dc3".into(), "dc4".into()];
        given.count = 7;
        given.mode = Mode::Naive;
        given.balance = Balance::P2c;
        given.source = SourceKind::Dns;
        given.query = Some("q".into());
        given.dns_addr = Some("127.0.0.9:8600".parse().unwrap());
        given.consistency = consul_api::Consistency::Consistent;
        given.max_stale = Some(GoDuration::from_secs(10));
        given.filter = Some("Service.Meta.shard == \"0\"".into());
        given.no_spread = true;
        given.standby = true;
        given.cached = true;
        let argv = given.to_argv();
        let back = Args::try_parse_from(std::iter::once("echo-client".into()).chain(argv.clone()))
            .unwrap();
        assert_eq!(format!("{back:?}"), format!("{given:?}"));
        // Every flag is written: a flag added to Args and forgotten in to_argv fails here.
        let consul = [
            "http-addr",
            "ca-file",
            "ca-path",
            "client-cert",
            "client-key",
        ];
        for arg in Args::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version" | "tls-server-name") || consul.contains(&long) {
                continue;
            }
            assert!(
                argv.iter()
                    .any(|a| a.to_str() == Some(&format!("--{long}"))),
                "--{long} is not written"
            );
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let args = Args::try_parse_from([
            "echo-client",
            "--service",
            "servernode",
            "--count",
            "5",
            "--interval",
            "1s",
            "--message",
            "hello world",
            "--mode",
            "naive",
            "--timeout",
            "1m30s",
            "--tag",
            "v1",
        ])
        .unwrap();
        assert_eq!(args.mode, Mode::Naive);
        assert_eq!(args.timeout, GoDuration::from_secs(90));
        assert_eq!(args.tag.as_deref(), Some("v1"));
    }

    #[test]
    fn rejects_bad_input_clearly() {
        let err = Args::try_parse_from(["echo-client", "--interval", "1 s"]).unwrap_err();
        assert!(err.to_string().contains("Go"), "{err}");
        assert!(Args::try_parse_from(["echo-client", "--count", "0"]).is_err());
        assert!(Args::try_parse_from(["echo-client", "--mode", "fast"]).is_err());
        assert_eq!(
            Args::try_parse_from(["echo-client"]).unwrap().consistency,
            consul_api::Consistency::Stale,
            "stale by default (see the README's cluster section)"
        );
        let err = Args::try_parse_from(["echo-client", "--consistency", "eventual"]).unwrap_err();
        assert!(
            err.to_string().contains("default, stale or consistent"),
            "{err}"
        );
        let args = Args::try_parse_from([
            "echo-client",
            "--consistency",
            "stale",
            "--max-stale",
            "10s",
        ])
        .unwrap();
        assert_eq!(args.consistency, consul_api::Consistency::Stale);
        assert_eq!(args.max_stale, Some(GoDuration::from_secs(10)));
    }

    #[test]
    fn sources_from_flags_with_clear_errors() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["echo-client"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).unwrap()
        };
        let consul = "http://127.0.0.9:8500";
        assert_eq!(source(&parse(&[]), consul).unwrap(), Source::Health);
        let err = source(&parse(&["--source", "query"]), consul).unwrap_err();
        assert!(err.to_string().contains("--query"), "{err}");
        assert_eq!(
            source(
                &parse(&["--source", "query", "--query", "q", "--poll", "250ms"]),
                consul
            )
            .unwrap(),
            Source::PreparedQuery {
                name: "q".into(),
                every: Duration::from_millis(250)
            }
        );
        assert_eq!(
            source(&parse(&["--source", "dns"]), consul).unwrap(),
            Source::Dns {
                server: "127.0.0.9:8600".parse().unwrap(),
                query: None,
                every: Duration::from_secs(1)
            }
        );
        for (address, host) in [
            ("http://[::1]", "::1"),
            ("[::1]:8500", "::1"),
            ("https://[::1]:8501/", "::1"),
            ("::1", "::1"),
            ("127.0.0.9", "127.0.0.9"),
            ("http://127.0.0.9:8500/consul", "127.0.0.9"),
        ] {
            let want = std::net::SocketAddr::new(host.parse().unwrap(), 8600);
            assert_eq!(default_dns_addr(address).unwrap(), want, "{address}");
        }
        let err = source(&parse(&["--source", "dns"]), "consul.service:8500").unwrap_err();
        assert!(err.to_string().contains("--dns-addr"), "{err}");
        let err = source(&parse(&["--source", "agent", "--poll", "0s"]), consul).unwrap_err();
        assert!(err.to_string().contains("--poll"), "{err}");
    }
}
