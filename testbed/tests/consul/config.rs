//! Consul's KV store through consul-api (Consul 1.8.7's answers: a missing key's 404 with
//! its index, check-and-set, transactions and their 409, the limits), and live configuration
//! from it (consul-registry's `config`): a change applied, an invalid one rejected with the
//! last good kept, a prefix changed by one transaction seen whole, a key deleted, Consul gone
//! and back, a token that may not read the key; echo-server's live settings; 100 watchers
//! of one key beside 100 one-second pollers (latency and Consul's CPU per change).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use consul_api::{Error, KVTxnOp, QueryOptions, kv};
use consul_registry::config::{self, ConfigSpec, Live, Status};
use serde::Deserialize;
use testbed::Consul;
use tokio::sync::watch;

use crate::common::init_tracing;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn kv_answers_as_consul_1_8_7_does() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    let kv = client.kv();
    let now = QueryOptions::default();

    // A missing key: no pair, but an index to block on.
    let (missing, meta) = kv.get("app/absent", &now).await.unwrap();
    assert!(missing.is_none());
    assert!(meta.last_index > 0, "404 carries X-Consul-Index");
    let (empty, _) = kv.list("nothing/", &now).await.unwrap();
    assert!(empty.is_empty());

    kv.put("app/db/url", b"postgres://db").await.unwrap();
    kv.put("app/limit", b"10").await.unwrap();
    let (pair, meta) = kv.get("app/limit", &now).await.unwrap();
    let pair = pair.unwrap();
    assert_eq!(pair.value(), b"10");
    assert_eq!(meta.last_index, pair.modify_index);
    let (keys, _) = kv.keys("app/", Some("/"), &now).await.unwrap();
    assert_eq!(keys, ["app/db/", "app/limit"]);
    let (keys, _) = kv.keys("app/", None, &now).await.unwrap();
    assert_eq!(keys, ["app/db/url", "app/limit"]);
    let (tree, _) = kv.list("app/", &now).await.unwrap();
    assert_eq!(tree.len(), 2);
    assert_eq!(tree[0].value(), b"postgres://db");

    // Check-and-set: a stale index loses without an error; the current one wins.
    assert!(
        !kv.cas("app/limit", b"11", 0, pair.modify_index - 1)
            .await
            .unwrap()
    );
    assert!(
        kv.cas("app/limit", b"11", 7, pair.modify_index)
            .await
            .unwrap()
    );
    let (pair, _) = kv.get("app/limit", &now).await.unwrap();
    let pair = pair.unwrap();
    assert_eq!((pair.value(), pair.flags), (&b"11"[..], 7));
    assert!(!kv.delete_cas("app/limit", 1).await.unwrap());

    // A transaction: all or nothing, the failure's operation named.
    let done = kv
        .txn(&[KVTxnOp::set("tx/a", "1"), KVTxnOp::set("tx/b", "2")])
        .await
        .unwrap();
    assert!(done.committed());
    assert_eq!(done.results.len(), 2);
    let failed = kv
        .txn(&[KVTxnOp::set("tx/a", "3"), KVTxnOp::cas("tx/b", "4", 1)])
        .await
        .unwrap();
    assert!(!failed.committed(), "Consul answers 409");
    assert_eq!(failed.errors[0].op_index, 1);
    assert!(
        failed.errors[0].what.contains("tx/b"),
        "{:?}",
        failed.errors
    );
    let (a, _) = kv.get("tx/a", &now).await.unwrap();
    assert_eq!(
        a.unwrap().value(),
        b"1",
        "nothing of the failed transaction applied"
    );

    // The limits: 512 KiB is accepted, a byte more never sent.
    let largest = vec![b'x'; kv::MAX_VALUE_BYTES];
    kv.put("big", &largest).await.unwrap();
    let (big, _) = kv.get("big", &now).await.unwrap();
    assert_eq!(big.unwrap().value().len(), kv::MAX_VALUE_BYTES);
    let err = kv
        .put("big", &[largest, vec![b'x']].concat())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");

    // A blocking read of a missing key returns when the key is written.
    let (_, meta) = kv.get("later", &now).await.unwrap();
    let waiting = {
        let client = client.clone();
        let opts = QueryOptions {
            wait_index: meta.last_index,
            wait_time: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        tokio::spawn(async move { client.kv().get("later", &opts).await })
    };
    kv.put("later", b"now").await.unwrap();
    let (later, _) = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the blocking read returns on the write")
        .unwrap()
        .unwrap();
    assert_eq!(later.unwrap().value(), b"now");

    kv.delete_tree("app/").await.unwrap();
    let (gone, _) = kv.list("app/", &now).await.unwrap();
    assert!(gone.is_empty());
}

#[derive(Debug, Deserialize, PartialEq)]
struct Settings {
    limit: u32,
    #[serde(default)]
    name: String,
}

fn positive(s: &Settings) -> Result<(), String> {
    if s.limit == 0 {
        Err("limit must be at least 1".into())
    } else {
        Ok(())
    }
}

/// The first value of `rx` (the current one included) that satisfies `done`.
async fn until<T>(
    rx: &mut watch::Receiver<Live<T>>,
    what: &str,
    mut done: impl FnMut(&Live<T>) -> bool,
) -> Live<T> {
    let found = tokio::time::timeout(DEADLINE, rx.wait_for(|live| done(live)))
        .await
        .map(|found| found.map(|live| live.clone()));
    match found {
        Ok(Ok(live)) => live,
        _ => panic!(
            "{what}: not within {DEADLINE:?}; last {:?}",
            rx.borrow().status
        ),
    }
}

fn limit(live: &Live<Settings>) -> Option<u32> {
    live.config.as_ref().map(|c| c.limit)
}

#[tokio::test]
async fn a_change_is_applied_an_invalid_one_rejected_and_a_deletion_keeps_the_last_good() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let kv = consul.client();
    let spec = ConfigSpec::<Settings>::key("svc/config").with_validation(positive);
    let mut rx = config::spawn(consul.client(), spec);
    assert_eq!(rx.borrow().status, Status::Waiting);

    kv.kv().put("svc/config", br#"{"limit": 5}"#).await.unwrap();
    let live = until(&mut rx, "applied", |l| l.status == Status::Applied).await;
    assert_eq!(limit(&live), Some(5));
    let good_index = live.index;

    kv.kv().put("svc/config", br#"{"limit": 0}"#).await.unwrap();
    let live = until(&mut rx, "rejected", |l| {
        matches!(l.status, Status::Rejected { .. })
    })
    .await;
    assert_eq!(limit(&live), Some(5), "last good stays");
    assert_eq!(live.index, good_index);
    let Status::Rejected { key, index, reason } = &live.status else {
        unreachable!()
    };
    assert_eq!(key, "svc/config");
    assert!(*index > good_index);
    assert!(reason.contains("at least 1"), "{reason}");

    kv.kv().put("svc/config", b"{not json").await.unwrap();
    until(
        &mut rx,
        "undecodable rejected",
        |l| matches!(&l.status, Status::Rejected { reason, .. } if reason.contains("not valid")),
    )
    .await;

    kv.kv()
        .put("svc/config", br#"{"limit": 8, "name": "b"}"#)
        .await
        .unwrap();
    let live = until(&mut rx, "applied again", |l| {
        l.status == Status::Applied && l.index > good_index
    })
    .await;
    assert_eq!(limit(&live), Some(8));

    kv.kv().delete("svc/config").await.unwrap();
    let live = until(&mut rx, "deleted", |l| l.status == Status::KeyMissing).await;
    assert_eq!(limit(&live), Some(8), "last good stays");

    // With defaults chosen, a missing key means the defaults.
    let spec = ConfigSpec::key("svc/config").with_defaults(Settings {
        limit: 1,
        name: "default".into(),
    });
    let mut defaults = config::spawn(consul.client(), spec);
    let live = until(&mut defaults, "defaults", |l| l.status == Status::Defaults).await;
    assert_eq!((limit(&live), live.index), (Some(1), 0));
}

#[derive(Debug, Deserialize)]
struct Pair {
    a: u64,
    b: u64,
}

#[tokio::test]
async fn a_prefix_changed_by_one_transaction_is_seen_whole() {
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let client = consul.client();
    client
        .kv()
        .txn(&[KVTxnOp::set("pair/a", "0"), KVTxnOp::set("pair/b", "0")])
        .await
        .unwrap();
    let spec = ConfigSpec::<Pair>::prefix("pair/").with_validation(|p: &Pair| {
        if p.a == p.b {
            Ok(())
        } else {
            Err(format!("half a change: a={} b={}", p.a, p.b))
        }
    });
    let mut rx = config::spawn(consul.client(), spec);
    until(&mut rx, "first", |l| l.status == Status::Applied).await;

    // Every change writes both keys in one transaction: never seen half-applied.
    let mut seen = Vec::new();
    for n in 1..=20u64 {
        let v = n.to_string();
        let done = client
            .kv()
            .txn(&[KVTxnOp::set("pair/a", v.clone()), KVTxnOp::set("pair/b", v)])
            .await
            .unwrap();
        assert!(done.committed());
        let live = until(&mut rx, "next", |l| {
            l.config.as_ref().is_some_and(|c| c.a == n)
                || matches!(l.status, Status::Rejected { .. })
        })
        .await;
        assert_eq!(live.status, Status::Applied, "change {n}");
        let config = live.config.unwrap();
        assert_eq!((config.a, config.b), (n, n));
        seen.push(live.index);
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "one index per change: {seen:?}"
    );

    // Written key by key instead, the half change is refused by the check, never applied.
    client.kv().put("pair/a", b"99").await.unwrap();
    let live = until(&mut rx, "half rejected", |l| {
        matches!(l.status, Status::Rejected { .. })
    })
    .await;
    assert_eq!(live.config.unwrap().a, 20, "the last good stays");
}

#[tokio::test]
async fn consul_gone_keeps_the_last_good_and_its_return_is_followed() {
    init_tracing();
    let mut consul = Consul::start().await.unwrap();
    consul
        .client()
        .kv()
        .put("svc/config", br#"{"limit": 5}"#)
        .await
        .unwrap();
    let spec = ConfigSpec::<Settings>::key("svc/config")
        .with_validation(positive)
        .with_wait(Duration::from_secs(5));
    let mut rx = config::spawn(consul.client(), spec);
    until(&mut rx, "applied", |l| l.status == Status::Applied).await;

    consul.stop().await.unwrap();
    let live = until(&mut rx, "unreachable", |l| {
        matches!(l.status, Status::Unreachable { .. })
    })
    .await;
    assert_eq!(limit(&live), Some(5), "last good stays");

    // A dev agent comes back empty: the key is missing, the last good stays until it is
    // written again.
    consul.start_again().await.unwrap();
    let live = until(&mut rx, "back, key missing", |l| {
        l.status == Status::KeyMissing
    })
    .await;
    assert_eq!(limit(&live), Some(5));
    consul
        .client()
        .kv()
        .put("svc/config", br#"{"limit": 6}"#)
        .await
        .unwrap();
    let live = until(&mut rx, "applied after the return", |l| {
        l.status == Status::Applied && l.config.as_ref().is_some_and(|c| c.limit == 6)
    })
    .await;
    assert_eq!(limit(&live), Some(6));
}

/// `GET /check`'s body.
async fn check_body(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /check HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The `/check` body once it contains `needle`.
async fn check_says(addr: std::net::SocketAddr, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let body = check_body(addr).await;
        if body.contains(needle) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/check never said {needle:?}; last: {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Send `line` (a newline added) and read what comes back until the server closes or a
/// newline arrives.
async fn echo_once(addr: std::net::SocketAddr, line: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    stream
        .get_mut()
        .write_all(&[line, b"\n"].concat())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_until(b'\n', &mut answer))
        .await
        .expect("an answer")
        .unwrap();
    answer
}

/// Whether the service's maintenance check is there.
async fn in_maintenance(consul: &Consul, id: &str) -> bool {
    let checks = consul.client().agent().checks().await.unwrap();
    checks.contains_key(&format!("_service_maintenance:{id}"))
}

#[tokio::test]
async fn echo_server_takes_live_settings_from_kv_and_rejects_what_cannot_change_live() {
    use echo_server::{Config, Server, live::LogLevel};

    init_tracing();
    let consul = Consul::start().await.unwrap();
    let levels = Arc::new(Mutex::new(Vec::<String>::new()));
    let config = Config {
        register: true,
        id: "echo-live-1".into(),
        interval: Duration::from_secs(1),
        consul: consul.config(),
        config_key: Some("echo/live".into()),
        ..Config::local()
    };
    let server = Server::bind(config)
        .await
        .unwrap()
        .with_log_level(LogLevel::new("warn", {
            let levels = levels.clone();
            move |level: &str| {
                levels.lock().unwrap().push(level.to_owned());
                Ok(())
            }
        }));
    let (echo, check) = (server.echo_addr(), server.check_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        stopped.await.ok();
    }));

    // No key: the flags' settings, said in /check.
    check_says(
        check,
        "config: key echo/live index 0 (key missing: defaults in force)",
    )
    .await;
    assert_eq!(
        echo_once(echo, &[b'a'; 100]).await,
        [&[b'a'; 100][..], b"\n"].concat()
    );

    let kv = consul.client();
    kv.kv()
        .put(
            "echo/live",
            br#"{"max_frame": 16, "idle_timeout": "1s", "max_connections": 3,
                 "maintenance": true, "log_level": "debug"}"#,
        )
        .await
        .unwrap();
    let (pair, _) = kv
        .kv()
        .get("echo/live", &QueryOptions::default())
        .await
        .unwrap();
    let index = pair.unwrap().modify_index;
    check_says(check, &format!("index {index} (applied)")).await;
    assert_eq!(echo_once(echo, b"short").await, b"short\n");
    let mut idle = tokio::net::TcpStream::connect(echo).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        idle.read(&mut [0u8; 8]).await
    })
    .await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection is closed after the new 1s idle timeout: {closed:?}"
    );
    let refused = echo_once(echo, &[b'a'; 100]).await;
    assert!(
        !refused.starts_with(&[b'a'; 100]),
        "a frame over the new limit is refused: {:?}",
        String::from_utf8_lossy(&refused)
    );
    assert!(
        in_maintenance(&consul, "echo-live-1").await,
        "maintenance on"
    );
    assert_eq!(
        levels.lock().unwrap().last().map(String::as_str),
        Some("debug")
    );

    // What only a restart changes is rejected; the settings in force stay.
    kv.kv().put("echo/live", br#"{"port": 1}"#).await.unwrap();
    let body = check_says(check, "restart it with --port").await;
    assert!(body.contains(&format!("index {index} (rejected")), "{body}");
    assert!(
        !echo_once(echo, &[b'a'; 100])
            .await
            .starts_with(&[b'a'; 100])
    );
    assert!(in_maintenance(&consul, "echo-live-1").await);

    // The key deleted: back to the flags' settings, maintenance off.
    kv.kv().delete("echo/live").await.unwrap();
    check_says(check, "index 0 (key missing: defaults in force)").await;
    assert_eq!(
        echo_once(echo, &[b'a'; 100]).await,
        [&[b'a'; 100][..], b"\n"].concat()
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while in_maintenance(&consul, "echo-live-1").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "maintenance stays on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        *levels.lock().unwrap(),
        ["debug", "warn"],
        "set when the key says so, the process's own filter back when it says nothing"
    );

    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

/// Watchers (or pollers) of one key, each recording when it first sees each `limit`.
type Seen = Arc<Mutex<Vec<(u32, tokio::time::Instant)>>>;

/// Put `limit` `changes` times, one a second; per change, wait until `count` sightings of
/// it are in `seen`. Returns how many sightings there were.
async fn changes(
    consul: &Consul,
    key: &str,
    seen: &Seen,
    count: usize,
    first: u32,
    changes: u32,
) -> usize {
    let kv = consul.client();
    let mut sightings = 0;
    for limit in first..first + changes {
        let tick = tokio::time::Instant::now() + Duration::from_secs(1);
        let start = tokio::time::Instant::now();
        kv.kv()
            .put(key, format!(r#"{{"limit": {limit}}}"#).as_bytes())
            .await
            .unwrap();
        let deadline = start + DEADLINE;
        loop {
            let at: Vec<_> = {
                let seen = seen.lock().unwrap();
                seen.iter()
                    .filter(|(l, _)| *l == limit)
                    .map(|(_, at)| *at)
                    .collect()
            };
            if at.len() >= count {
                sightings += at.len();
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "change {limit}: {} of {count}",
                at.len()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep_until(tick).await;
    }
    sightings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_100_watchers_on_one_agent_and_a_bad_one_none() {
    const WATCHERS: usize = 100;
    const CHANGES: u32 = 10;
    init_tracing();
    let consul = Consul::start().await.unwrap();
    let key = "fleet/config";
    consul
        .client()
        .kv()
        .put(key, br#"{"limit": 1}"#)
        .await
        .unwrap();

    // 100 watchers (one blocking query each, as 100 services would hold).
    let seen: Seen = Arc::default();
    let mut receivers = Vec::new();
    for _ in 0..WATCHERS {
        let spec = ConfigSpec::<Settings>::key(key).with_validation(positive);
        let mut rx = config::spawn(consul.client(), spec);
        receivers.push(rx.clone());
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let limit = rx.borrow_and_update().config.as_ref().map(|c| c.limit);
                if limit != last {
                    if let Some(limit) = limit {
                        seen.lock()
                            .unwrap()
                            .push((limit, tokio::time::Instant::now()));
                    }
                    last = limit;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    for rx in &mut receivers {
        until(rx, "first", |l| l.status == Status::Applied).await;
    }
    let watched = changes(&consul, key, &seen, WATCHERS, 2, CHANGES).await;

    // A bad value: every watcher reports it, none applies it.
    consul
        .client()
        .kv()
        .put(key, br#"{"limit": 0}"#)
        .await
        .unwrap();
    for rx in &mut receivers {
        let live = until(rx, "rejected", |l| {
            matches!(l.status, Status::Rejected { .. })
        })
        .await;
        assert_eq!(limit(&live), Some(CHANGES + 1), "the last good stays");
    }
    assert!(
        seen.lock().unwrap().iter().all(|(l, _)| *l != 0),
        "0 watchers applied it"
    );
    drop(receivers);

    // Every watcher saw every change, in order of the changes; how fast, beside 1 s and 15 s
    // pollers and with Consul's CPU, is `testbed config`'s to measure (docs/results/config.md).
    assert_eq!(watched, WATCHERS * CHANGES as usize);
}

#[tokio::test]
async fn a_token_that_cannot_read_the_key_is_reported_and_the_last_good_stays() {
    use consul_api::{AclPolicy, AclPolicyLink, AclToken};
    use testbed::consul::ConsulOptions;

    init_tracing();
    let options = ConsulOptions::from_env()
        .unwrap()
        .with_acl("config-root-token");
    let consul = Consul::start_with(options).await.unwrap();
    let admin = consul.client();
    admin
        .kv()
        .put("svc/config", br#"{"limit": 5}"#)
        .await
        .unwrap();
    admin.kv().put("svc/tree/limit", b"5").await.unwrap();
    let token = |rules: &'static str, name: &'static str| {
        let admin = admin.clone();
        async move {
            let policy = admin
                .acl()
                .policy_create(&AclPolicy {
                    name: name.into(),
                    rules: rules.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            admin
                .acl()
                .token_create(&AclToken {
                    description: name.into(),
                    policies: vec![AclPolicyLink {
                        id: policy.id,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };
    let reader = token(r#"key_prefix "svc/" { policy = "read" }"#, "svc-reader").await;
    let other = token(r#"key_prefix "other/" { policy = "read" }"#, "other-reader").await;
    let client_with = |t: &AclToken| {
        consul_api::Client::new(consul.config().with_token(Some(t.secret_id.clone()))).unwrap()
    };

    // A token without read on the key: refused, said so; the defaults are not applied.
    let spec = ConfigSpec::<Settings>::key("svc/config").with_defaults(Settings {
        limit: 1,
        name: String::new(),
    });
    let mut refused = config::spawn(client_with(&other), spec);
    let live = until(
        &mut refused,
        "refused",
        |l| matches!(&l.status, Status::Unreachable { error } if error.contains("403")),
    )
    .await;
    assert!(live.config.is_none(), "nothing applied on a refusal");

    // A prefix it may not read is no refusal in Consul 1.8.7: the keys are filtered out, and
    // the prefix reads as empty (which is why `config` documents `Missing::Wait` for one).
    let (tree, _) = client_with(&other)
        .kv()
        .list("svc/tree/", &QueryOptions::default())
        .await
        .unwrap();
    assert!(tree.is_empty(), "{tree:?}");

    // A token that could read, then revoked: the last good stays, the 403 is reported.
    let spec = ConfigSpec::<Settings>::key("svc/config").with_wait(Duration::from_secs(1));
    let mut revoked = config::spawn(client_with(&reader), spec);
    until(&mut revoked, "applied", |l| l.status == Status::Applied).await;
    admin.acl().token_delete(&reader.accessor_id).await.unwrap();
    let live = until(
        &mut revoked,
        "revoked",
        |l| matches!(&l.status, Status::Unreachable { error } if error.contains("403")),
    )
    .await;
    assert_eq!(limit(&live), Some(5), "the last good stays");
}

/// `testbed config`'s one cell of `instances` echo-servers `on` an agent or a cluster: two
/// changes half a second apart, one 1 s poller mode beside them, no pause/restart/ACL phases.
async fn config_cell(instances: usize, on: testbed::config::On) -> testbed::config::ConfigReport {
    use testbed::{config::ConfigExperiment, experiment::Experiment, progress::Progress};

    init_tracing();
    let experiment = ConfigExperiment {
        instances: vec![instances],
        changes: 2,
        every: Duration::from_millis(500),
        poll_wait: Duration::from_millis(500),
        poll_every: vec![Duration::from_secs(1)],
        idle: Duration::from_secs(1),
        faults: false,
        on,
    };
    experiment
        .run(&crate::common::launcher(), &Progress::hidden())
        .await
        .unwrap()
}

/// `testbed config`'s smallest cell against real Consul: three echo-server processes (the
/// testbed binary's, whose log level is live too: every change carries one), one poller
/// mode beside them; every change reaches every instance, a bad value is reported by all and
/// applied by none, a 512 KiB value is applied by all and one byte more refused.
#[tokio::test]
async fn the_config_experiment_s_smallest_cell_holds_its_invariants() {
    use testbed::experiment::Findings;
    let report = config_cell(3, testbed::config::On::Agent).await;
    let cell = &report.cells[0];
    let watch = &cell.modes[0];
    assert_eq!(
        (watch.seen, watch.expected),
        (6, 6),
        "every change reached every instance: {watch:?}"
    );
    assert!(watch.max_ms < 10_000.0, "{watch:?}");
    let poll = &cell.modes[1];
    assert_eq!(poll.seen, poll.expected, "{poll:?}");
    assert_eq!(
        (cell.bad.reported, cell.bad.applied),
        (3, 0),
        "all report the bad value, none applies it"
    );
    assert_eq!(
        (cell.big.applied, cell.big.bytes),
        (3, consul_api::kv::MAX_VALUE_BYTES)
    );
    assert!(
        cell.oversized.contains("over Consul's limit"),
        "{}",
        cell.oversized
    );
    assert!(report.violations().is_empty(), "{:?}", report.violations());
}

/// `testbed config`'s cluster cell against a real cluster (one server, two client agents:
/// gossip and Raft at production timings): four instances spread over the client agents,
/// one poller mode; every change reaches every instance, the bad value none, and the server's
/// and the client agents' CPU are read apart.
#[tokio::test]
async fn the_config_experiment_s_cluster_cell_holds_its_invariants() {
    use testbed::experiment::Findings;
    let on = testbed::config::On::Cluster {
        servers: 1,
        clients: 2,
    };
    let report = config_cell(4, on).await;
    assert_eq!(report.cluster.map(|c| (c.servers, c.clients)), Some((1, 2)));
    let cell = &report.cells[0];
    let watch = &cell.modes[0];
    assert_eq!(
        (watch.seen, watch.expected),
        (8, 8),
        "every change reached every instance: {watch:?}"
    );
    let poll = &cell.modes[1];
    assert_eq!(poll.seen, poll.expected, "{poll:?}");
    assert_eq!(
        (cell.bad.reported, cell.bad.applied),
        (4, 0),
        "all report the bad value, none applies it"
    );
    assert_eq!(cell.big.applied, 4, "{:?}", cell.big);
    for m in &cell.modes {
        let by_role = m.cpu_by_role.expect("a cluster's CPU by role");
        assert!(
            by_role.servers_ms_per_s > 0.0 && by_role.clients_ms_per_s > 0.0,
            "both roles worked while {}: {by_role:?}",
            m.mode
        );
        let sum = by_role.servers_ms_per_s + by_role.clients_ms_per_s;
        assert!((sum - m.cpu_ms_per_s).abs() < 1e-6, "{m:?}");
    }
    assert!(report.violations().is_empty(), "{:?}", report.violations());
}
