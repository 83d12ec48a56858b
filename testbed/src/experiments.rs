//! The list of experiments `testbed` runs, one line each: the subcommand (a variant, its doc
//! comment the subcommand's help) and its arguments, a [`Suite`]. Adding an experiment is its
//! file plus its line here.

use crate::experiment::Suite;

macro_rules! experiments {
    ($( $(#[$doc:meta])* $variant:ident($args:ty), )*) => {
        /// Every experiment, as a subcommand with its arguments.
        #[derive(clap::Subcommand, Debug)]
        pub enum Experiments {
            $( $(#[$doc])* $variant($args), )*
        }

        impl Experiments {
            /// The subcommand's suite, for [`crate::experiment::run`].
            pub fn suite(&self) -> &dyn Suite {
                match self {
                    $( Experiments::$variant(args) => args, )*
                }
            }
        }
    };
}

experiments! {
    /// A real cluster (3 servers, client agents, production timings): a node dies, an agent
    /// dies, the leader is killed, quorum is lost, per-agent reapers; each measured.
    Cluster(crate::cluster::Args),
    /// Live configuration from one KV key: echo-servers watching it beside 1 s and 15 s
    /// pollers (latency, Consul CPU per change); bad, 512 KiB and oversized values; Consul
    /// paused and restarted; a token that cannot read the key.
    Config(crate::config::Args),
    /// How long Consul takes to remove a SIGKILLed service, measured, explained and predicted.
    Deregistration(crate::deregistration::Args),
    /// Every way to discover (health, catalog, agent list, prepared query, DNS) side by side
    /// through one SIGKILL, with a resilient session on each and the naive client; elastic
    /// scale-out and in; failover to a second datacenter.
    Discovery(crate::discovery::Args),
    /// Fault and security scenarios (hung server, paused/restarted Consul, a faulty proxy,
    /// ACLs, hostile input, a TLS certificate rotated), each measured.
    Faults(crate::faults::Args),
    /// Network faults between Consul agents (a client agent or the leader cut off, a one-way
    /// cut, lossy and slow links) with resilient clients streaming: what Consul and each
    /// client's view make of them.
    Partitions(crate::partitions::Args),
    /// Discovery at scale: instances × clients (CPU, memory, bytes, propagation per change),
    /// and Consul's read modes (stale, cached, filter) with many clients on one agent.
    Scale(crate::scale::Args),
    /// Start Consul, register a checked service, see it pass, deregister it.
    Smoke(crate::smoke::Args),
    /// The seed article's story, timestamped, for the naive and the resilient client.
    Timeline(crate::timeline::Args),
}
