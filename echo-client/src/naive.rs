//! The seed article's client, reproduced for comparison: every second it lists the local
//! agent's services (`/v1/agent/services`), looks for one service ID, dials it and talks on
//! that connection until it breaks. It does not look at health, does not fail over, and loses
//! the message in flight when the server dies. It prints the article's lines:
//! `servernode_1 not found`, `dial tcp 127.0.0.1:9527: connect: connection refused`,
//! `read buffer error: EOF`, and one `reply ...` line per answer.

use std::{io, time::Duration};

use echo_wire::EchoCodec;
use futures::{SinkExt, StreamExt};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::codec::Framed;

use crate::{
    client::Reply,
    discovery::Instance,
    error::{Error, Result},
};

/// What the naive client does.
#[derive(Debug, Clone)]
pub struct NaiveConfig {
    /// Where Consul is.
    pub consul: consul_api::Config,
    /// The service ID to look up (`servernode_1`).
    pub service_id: String,
    /// The text before `, <seq>` in each message.
    pub message: String,
    /// Stop after this many replies.
    pub count: u64,
    /// Pause between messages on a connection.
    pub interval: Duration,
    /// Pause between looks at the agent's services (the article's one second).
    pub poll: Duration,
    /// Give up when no reply came for this long.
    pub timeout: Duration,
    /// Deadline to dial and to read one reply.
    pub io_timeout: Duration,
}

/// How a naive run went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NaiveSummary {
    /// Messages written.
    pub sent: u64,
    /// Replies received.
    pub replies: u64,
    /// Replies that differ from their message.
    pub mismatched: u64,
    /// Lookups that did not find the service ID.
    pub not_found: u64,
    /// Dials that failed.
    pub dial_errors: u64,
}

/// Run until `count` replies, or fail after `timeout` without one.
pub async fn run(config: NaiveConfig) -> Result<NaiveSummary> {
    let client = consul_api::Client::new(config.consul.clone())?;
    let mut summary = NaiveSummary::default();
    let mut last_reply = Instant::now();
    let mut last_problem = String::from("nothing tried yet");
    let mut poll = tokio::time::interval(config.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while summary.replies < config.count {
        if last_reply.elapsed() >= config.timeout {
            return Err(Error::Timeout {
                service: config.service_id.clone(),
                waited: config.timeout,
                last: last_problem,
            });
        }
        poll.tick().await;
        let services = match client.agent().services().await {
            Ok(services) => services,
            Err(e) => {
                println!("consul error: {e}");
                last_problem = e.to_string();
                continue;
            }
        };
        let Some(service) = services.get(&config.service_id) else {
            println!("{} not found", config.service_id);
            summary.not_found += 1;
            last_problem = format!("{} not found", config.service_id);
            continue;
        };
        let host = if service.address.is_empty() {
            "127.0.0.1"
        } else {
            service.address.as_str()
        };
        let instance = Instance::new(service.id.clone(), host, service.port);
        let addr = instance.address();
        let stream =
            match tokio::time::timeout(config.io_timeout, TcpStream::connect((host, service.port)))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    let line = format!("dial tcp {addr}: {}", go_dial_error(&e));
                    println!("{line}");
                    summary.dial_errors += 1;
                    last_problem = line;
                    continue;
                }
                Err(_) => {
                    let line = format!("dial tcp {addr}: i/o timeout");
                    println!("{line}");
                    summary.dial_errors += 1;
                    last_problem = line;
                    continue;
                }
            };
        let mut framed = Framed::new(stream, EchoCodec::default());
        // Talk on this connection until it breaks, as the article's client does.
        while summary.replies < config.count {
            let payload = message(&config.message, summary.sent + 1);
            let started = Instant::now();
            if let Err(e) = framed.send(payload.as_bytes()).await {
                println!("write buffer error: {e}");
                last_problem = e.to_string();
                break;
            }
            summary.sent += 1;
            match tokio::time::timeout(config.io_timeout, framed.next()).await {
                Ok(Some(Ok(bytes))) => {
                    let rtt = started.elapsed();
                    let reply = Reply {
                        bytes,
                        instance: instance.clone(),
                        rtt,
                        latency: rtt,
                        attempts: 1,
                    };
                    println!("{}", reply.line(summary.sent));
                    if reply.bytes != payload.as_bytes() {
                        summary.mismatched += 1;
                    }
                    summary.replies += 1;
                    last_reply = Instant::now();
                }
                Ok(Some(Err(e))) => {
                    println!("read buffer error: {e}");
                    last_problem = e.to_string();
                    break;
                }
                Ok(None) => {
                    println!("read buffer error: EOF");
                    last_problem = "EOF".into();
                    break;
                }
                Err(_) => {
                    println!("read buffer error: i/o timeout");
                    last_problem = "read timed out".into();
                    break;
                }
            }
            if summary.replies < config.count {
                tokio::time::sleep(config.interval).await;
            }
        }
    }
    Ok(summary)
}

/// The message with sequence number `seq`: `hello world, 001`, as in the article.
pub fn message(text: &str, seq: u64) -> String {
    format!("{text}, {seq:03}")
}

/// A dial error the way Go prints it: `connect: connection refused`.
pub fn go_dial_error(e: &io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    let lowered: String = match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    };
    format!("connect: {lowered}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_the_article() {
        assert_eq!(message("hello world", 1), "hello world, 001");
        assert_eq!(message("hello world", 1234), "hello world, 1234");
        let e = io::Error::new(io::ErrorKind::TimedOut, "Timed out");
        assert_eq!(go_dial_error(&e), "connect: timed out");
    }

    #[tokio::test]
    async fn a_refused_dial_is_printed_the_go_way() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(go_dial_error(&e), "connect: connection refused");
    }
}
