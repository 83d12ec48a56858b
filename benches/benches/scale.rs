//! scale: what one change costs a discovery client as the instance count grows — the client's
//! CPU from the moment a health answer's body is in memory to the moment the new view is
//! published and the balancer holds it.
//!
//! Bodies are built from a real Consul 1.8.7 health entry (a service with a TTL check, as
//! `GET /v1/health/service/scale?passing` answers), `n` of them with their own IDs and ports,
//! in two layouts: `compact` (what a server or client agent sends) and `dev` (a `-dev` agent
//! indents its JSON with four spaces, 2.3× the bytes). One change is one check flipping:
//! under `?passing` its entry leaves the answer (Consul 1.8.7 moves the last entry into its
//! place: `filterNonPassing`, agent/health_endpoint.go), and comes back at the next change.
//!
//! * `scale/change/<n>/<layout>`: one change, as the client handles it now — the body decoded
//!   by what changed ([`consul_registry::decode::Decoder`]), the snapshot built (unchanged
//!   instances are the same `Arc`s), the balancer updated in place.
//! * `scale/change_full/<n>/<layout>`: the same change decoded the way the client did before:
//!   every entry decoded in full (`Vec<ServiceEntry>`), every instance built again.
//! * `scale/first/<n>/<layout>`: the first answer (nothing to reuse), decoded by the views.
//!
//! Both copy the body once into a buffer, as reading it off the socket does (`change` into the
//! decoder's spare buffer in 64 KiB chunks, each walked as it is appended, as the client reads
//! it; `change_full` into a new one). Not
//! included: reading the body off the socket (the kernel's copy and hyper's), measured
//! end to end by `testbed scale`.

// criterion_group! and criterion_main! generate public functions without docs.
#![allow(missing_docs)]

use std::{sync::Arc, time::Duration};

use consul_api::{BodySink, ServiceEntry};
use consul_registry::{Balancer, Instance, Snapshot, Strategy, decode::Decoder};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

/// One entry as Consul 1.8.7 answers it (`-dev` agent, compacted), its ID and port replaced
/// per instance.
const ENTRY: &str = r#"{"Node":{"ID":"dc0e370e-f0b7-8911-fd59-11e46eeb4a23","Node":"vm","Address":"127.0.0.1","Datacenter":"dc1","TaggedAddresses":{"lan":"127.0.0.1","lan_ipv4":"127.0.0.1","wan":"127.0.0.1","wan_ipv4":"127.0.0.1"},"Meta":{"consul-network-segment":""},"CreateIndex":10,"ModifyIndex":12},"Service":{"ID":"scale-1","Service":"scale","Tags":["v1"],"Address":"127.0.0.1","TaggedAddresses":{"lan_ipv4":{"Address":"127.0.0.1","Port":20001},"wan_ipv4":{"Address":"127.0.0.1","Port":20001}},"Meta":{"version":"1"},"Port":20001,"Weights":{"Passing":1,"Warning":1},"EnableTagOverride":false,"Proxy":{"MeshGateway":{},"Expose":{}},"Connect":{},"CreateIndex":13,"ModifyIndex":13},"Checks":[{"Node":"vm","CheckID":"serfHealth","Name":"Serf Health Status","Status":"passing","Notes":"","Output":"Agent alive and reachable","ServiceID":"","ServiceName":"","ServiceTags":[],"Type":"","Definition":{},"CreateIndex":10,"ModifyIndex":10},{"Node":"vm","CheckID":"scale-1-ttl","Name":"Service 'scale' check","Status":"passing","Notes":"","Output":"","ServiceID":"scale-1","ServiceName":"scale","ServiceTags":["v1"],"Type":"ttl","Definition":{},"CreateIndex":13,"ModifyIndex":13}]}"#;

const COUNTS: [usize; 3] = [10, 1_000, 5_000];
const PATH: &str = "/v1/health/service/scale";
/// The answer is handed to the decoder in chunks of this size, as chunks arrive from the
/// socket (the size is the bench's choice: what the decoder returns does not depend on it;
/// what a chunk costs to compare while in cache does, a little).
const CHUNK: usize = 64 << 10;

fn entries(n: usize) -> Vec<Value> {
    let template: Value = serde_json::from_str(ENTRY).expect("the template is JSON");
    (0..n)
        .map(|i| {
            let id = format!("scale-{i:05}");
            let port = 20_000 + i as u64;
            let mut e = template.clone();
            e["Service"]["ID"] = json!(id);
            e["Service"]["Port"] = json!(port);
            e["Service"]["TaggedAddresses"]["lan_ipv4"]["Port"] = json!(port);
            e["Service"]["TaggedAddresses"]["wan_ipv4"]["Port"] = json!(port);
            e["Checks"][1]["CheckID"] = json!(format!("{id}-ttl"));
            e["Checks"][1]["ServiceID"] = json!(id);
            e
        })
        .collect()
}

/// The body in Consul's layout: compact, or indented by four spaces as a `-dev` agent does.
fn body(entries: &[Value], dev: bool) -> Vec<u8> {
    if !dev {
        return serde_json::to_vec(entries).expect("encode");
    }
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    entries.serialize(&mut ser).expect("encode");
    out
}

/// The two answers a flipping check alternates between: all passing, and one gone.
struct Answers {
    all: Vec<u8>,
    flipped: Vec<u8>,
}

impl Answers {
    fn new(n: usize, dev: bool) -> Self {
        let all = entries(n);
        let mut flipped = all.clone();
        flipped.swap_remove(n / 2);
        Answers {
            all: body(&all, dev),
            flipped: body(&flipped, dev),
        }
    }
}

/// The client's state across changes: the view and the balancer.
struct Client {
    decoder: Decoder,
    snapshot: Snapshot,
    balancer: Balancer,
}

impl Client {
    fn new() -> Self {
        Client {
            decoder: Decoder::new(),
            snapshot: Snapshot::starting(),
            balancer: Balancer::new(Strategy::RoundRobin, Duration::from_secs(1)).with_seed(1),
        }
    }

    fn apply(&mut self, instances: Vec<Arc<Instance>>) {
        let next = self.snapshot.with_instances(
            instances,
            self.snapshot.index + 1,
            std::time::SystemTime::now(),
        );
        self.balancer
            .update_spreading(&next.instances, Instant::now());
        self.snapshot = next;
    }

    /// One change, the way the client handles it.
    fn change(&mut self, body: &[u8]) {
        let mut decoding = self.decoder.start();
        for chunk in body.chunks(CHUNK) {
            BodySink::extend(&mut decoding, chunk);
        }
        let instances = decoding.finish(PATH).expect("decodes");
        self.apply(instances);
    }

    /// One change, every entry decoded in full and every instance built again (before).
    fn change_full(&mut self, body: &[u8]) {
        let body = body.to_vec();
        let entries: Vec<ServiceEntry> = serde_json::from_slice(&body).expect("decodes");
        let instances: Vec<Arc<Instance>> = entries
            .iter()
            .map(|e| Arc::new(Instance::from_entry(e)))
            .collect();
        self.apply(instances);
    }
}

fn scale(c: &mut Criterion) {
    let mut group = c.benchmark_group("scale");
    // Pure CPU, 18 functions: 1 s each keeps the whole `cargo bench` within its 10 minutes
    // (this bench 32 s; 57 s with 2 s each and 500 ms of warm-up). Three alternating runs
    // each way (2026-12-02): a function's estimate moved as much between runs of one setting
    // (change/5000/compact 1.5–3.2 ms with 2 s) as between the settings (2.1–2.5 ms with 1 s).
    group
        .sample_size(20)
        .nresamples(benches::harness::NRESAMPLES)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1));
    for n in COUNTS {
        for (dev, layout) in [(false, "compact"), (true, "dev")] {
            let answers = Answers::new(n, dev);
            let id = |name: &str| BenchmarkId::new(name, format!("{n}/{layout}"));

            // Each iteration is one change; the bodies alternate, as a flipping check's do.
            let mut client = Client::new();
            client.change(&answers.all);
            let mut flip = false;
            group.bench_function(id("change"), |b| {
                b.iter(|| {
                    flip = !flip;
                    client.change(if flip { &answers.flipped } else { &answers.all });
                })
            });

            let mut client = Client::new();
            client.change_full(&answers.all);
            let mut flip = false;
            group.bench_function(id("change_full"), |b| {
                b.iter(|| {
                    flip = !flip;
                    client.change_full(if flip { &answers.flipped } else { &answers.all });
                })
            });

            group.bench_function(id("first"), |b| {
                b.iter_batched(
                    Client::new,
                    |mut client| client.change(&answers.all),
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, scale);
criterion_main!(benches);
