//! The `config_service` example run against real Consul as a user would run it: its
//! settings under a prefix, changed by a transaction of two keys (applied whole), a change
//! its check refuses (rejected, the greeting in force kept), and a valid one after it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/config_service.rs"]
mod config_service;

use std::time::Duration;

use consul_api::KVTxnOp;
use consul_harness::Consul;
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;

/// GET `path` until the body satisfies `done`; the last body.
async fn get_until(
    http: &reqwest::Client,
    url: &str,
    mut done: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = http.get(url).send().await.unwrap().text().await.unwrap();
        if done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never answered as expected: {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_config_service_follows_its_prefix_and_keeps_the_last_good_greeting() {
    let consul = Consul::start().await.unwrap();
    let kv = consul.client();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(config_service::run(
        consul.client(),
        listener,
        "greeter/",
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let hello = format!("{base}/hello?name=ana");

    // Nothing under the prefix yet: no greeting, said so.
    let waiting = http.get(&hello).send().await.unwrap();
    assert_eq!(waiting.status(), 503);

    let set = |greeting: &str, punctuation: &str| {
        [
            KVTxnOp::set("greeter/greeting", greeting),
            KVTxnOp::set("greeter/punctuation", punctuation),
        ]
    };
    assert!(kv.kv().txn(&set("Hello", "!")).await.unwrap().committed());
    get_until(&http, &hello, |b| b == "Hello, ana!\n").await;

    // Both keys change in one transaction: the answer never mixes old and new.
    assert!(
        kv.kv()
            .txn(&set("Bonjour", " :)"))
            .await
            .unwrap()
            .committed()
    );
    let mut seen = Vec::new();
    get_until(&http, &hello, |b| {
        seen.push(b.to_owned());
        b == "Bonjour, ana :)\n"
    })
    .await;
    assert!(
        seen.iter()
            .all(|b| b == "Hello, ana!\n" || b == "Bonjour, ana :)\n"),
        "a half change was served: {seen:?}"
    );

    // An empty greeting is refused by the service's check: the greeting in force stays.
    kv.kv().put("greeter/greeting", b"").await.unwrap();
    let config = get_until(&http, &format!("{base}/config"), |b| b.contains("rejected")).await;
    assert!(config.contains("greeting must not be empty"), "{config}");
    let body = http.get(&hello).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "Bonjour, ana :)\n");

    kv.kv().put("greeter/greeting", b"Hola").await.unwrap();
    get_until(&http, &hello, |b| b == "Hola, ana :)\n").await;
    let config = http.get(format!("{base}/config")).send().await.unwrap();
    assert!(config.text().await.unwrap().contains("(applied)"));

    stop.cancel();
    task.await.unwrap().unwrap();
}
