//! The seed article's story, timestamped, for two clients side by side.
//!
//! The client starts first and finds nothing (`servernode_1 not found`); the server starts
//! and echo works; the server is SIGKILLed; the client fails until Consul removes the dead
//! instance (60 to 95 s later), and then finds nothing again. The naive client (the seed
//! article's: one service ID from the agent's list, no failover) lives through all of it;
//! the resilient client, with a second server up, should not notice. Each story runs against
//! its own Consul, at the same time, with the seed article's check settings; events come from
//! the client's output, the testbed's own actions, and Consul's blocking queries.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::{
    consul::{Consul, ConsulOptions},
    error::{Error, Result},
    experiment::{Findings, OnItsOwn, Plan, Suite},
    logbuf::LogLine,
    procs::{ClientProcess, Launcher, ServerProcess, ServerSpec},
    progress::Progress,
    report::{Axis, Mark, PALETTE, Plot, Series, Span, Table, secs_since},
    wait,
};

/// Which client a story runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMode {
    /// The seed article's client, one server.
    Naive,
    /// The discovering, failing-over client, two servers.
    Resilient,
}

impl ClientMode {
    fn flag(self) -> &'static str {
        match self {
            ClientMode::Naive => "naive",
            ClientMode::Resilient => "resilient",
        }
    }

    fn cli(self) -> echo_client::cli::Mode {
        match self {
            ClientMode::Naive => echo_client::cli::Mode::Naive,
            ClientMode::Resilient => echo_client::cli::Mode::Resilient,
        }
    }
}

/// How a story is told.
#[derive(Debug, Clone)]
pub struct TimelineConfig {
    /// How long the client runs alone before the server starts.
    pub client_alone: Duration,
    /// Replies to wait for before the kill (the seed article's log shows 8).
    pub replies_before_kill: usize,
    /// The servers' check `Interval` (the seed article's: 5s).
    pub interval: Duration,
    /// The servers' check `Timeout` (the seed article's: 3s).
    pub timeout: Duration,
    /// The servers' `DeregisterCriticalServiceAfter` (the seed article's: 30s, which
    /// Consul raises to 1m).
    pub deregister_after: Duration,
    /// Messages every this often.
    pub message_interval: Duration,
}

impl Default for TimelineConfig {
    fn default() -> Self {
        TimelineConfig {
            client_alone: Duration::from_secs(3),
            replies_before_kill: 8,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
            deregister_after: Duration::from_secs(30),
            message_interval: Duration::from_secs(1),
        }
    }
}

/// One line of a timeline: several identical client lines in a row are one event with a count.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Seconds since the story began.
    pub at: f64,
    /// Until when the repeated line went on, if it repeated.
    pub until: Option<f64>,
    /// How many identical lines in a row this event stands for (1 if it did not repeat).
    pub count: usize,
    /// `client`, `testbed` or `consul`.
    pub source: &'static str,
    /// What happened: the client's line (log lines without timestamp and target), the
    /// testbed's action, or what Consul published.
    pub text: String,
}

/// One story's timeline and what the client went through.
#[derive(Debug, Clone, Serialize)]
pub struct Story {
    /// Which client this story ran.
    pub mode: ClientMode,
    /// Consul's version, as the agent reports it.
    pub consul_version: String,
    /// Everything that happened, in time order.
    pub events: Vec<Event>,
    /// When the server the client used was sent SIGKILL, seconds since the story began.
    pub killed_at: f64,
    /// When a blocking query first showed its check critical, seconds since the story began.
    pub critical_at: f64,
    /// When a blocking query first showed it gone, seconds since the story began.
    pub removed_at: f64,
    /// Replies the client printed before the kill.
    pub replies_before_kill: usize,
    /// Replies the client printed after the kill.
    pub replies_after_kill: usize,
    /// Failed dials and reads the client printed after the kill.
    pub failures_after_kill: usize,
    /// The longest a message waited for its reply after the kill, seconds: what the client's
    /// caller saw as an outage. `None` if no message was answered after the kill.
    pub worst_reply_after_kill: Option<f64>,
    /// From the kill to the first answered message sent after it, seconds.
    pub first_reply_after_kill: Option<f64>,
}

impl Story {
    /// One sentence on the outage the client saw.
    pub fn outage(&self) -> String {
        match (self.worst_reply_after_kill, self.first_reply_after_kill) {
            (Some(worst), Some(first)) => format!(
                "no outage to speak of: every message answered, the slowest after the kill in {:.1} ms; \
                 first reply after the kill {:.2} s later (the next tick); {} failed attempts absorbed",
                worst * 1e3,
                first,
                self.failures_after_kill
            ),
            _ => format!(
                "outage from the kill to the end of the run ({:.0} s): no reply; {} failed dials/reads, \
                 the dead address until Consul removed it {:.0} s after the kill, then \"not found\"",
                self.events.last().map_or(0.0, |e| e.until.unwrap_or(e.at)) - self.killed_at,
                self.failures_after_kill,
                self.removed_at - self.killed_at
            ),
        }
    }
}

/// Both stories.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineReport {
    /// When the run began (RFC 3339, UTC).
    pub date: String,
    /// The naive story, then the resilient one.
    pub stories: Vec<Story>,
}

/// Tell one story against its own Consul.
pub async fn story(
    launcher: &Launcher,
    config: &TimelineConfig,
    mode: ClientMode,
) -> Result<Story> {
    let consul = Consul::start_with(ConsulOptions::from_env()?).await?;
    let client = consul.client();
    let t0 = SystemTime::now();
    let mut actions: Vec<(SystemTime, String)> = Vec::new();
    let (client_proc, started, output) = start_client(launcher, &consul, config, mode).await?;
    actions.push((
        started,
        format!("started echo-client --mode {}", mode.flag()),
    ));
    let ids: &[&str] = match mode {
        ClientMode::Naive => &["servernode_1"],
        ClientMode::Resilient => &["servernode_1", "servernode_2"],
    };
    let mut servers = Vec::new();
    for id in ids {
        let spec = ServerSpec::seed(consul.config())?.with_id(*id).with_check(
            config.interval,
            config.timeout,
            config.deregister_after,
        );
        servers.push(ServerProcess::spawn(launcher, spec).await?);
        actions.push((SystemTime::now(), format!("started echo-server {id}")));
    }
    let mut consul_events = first_passing(&client, ids).await?;

    // Let the echo go on, then kill the server the client is using, like a crash.
    let last = output
        .wait_for_count(
            0,
            "reply ",
            config.replies_before_kill,
            Duration::from_secs(120),
        )
        .await?;
    let victim = last
        .text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("instance="))
        .unwrap_or("servernode_1")
        .to_owned();
    let index = ids.iter().position(|id| *id == victim).unwrap_or(0);
    let (killed, lifecycle, kill_mark) =
        kill_and_follow(&client, &mut servers[index], &victim, config, &output).await?;
    actions.push((
        killed,
        format!("SIGKILL echo-server {victim} (the one serving the client)"),
    ));

    // The client's view after the removal.
    let after = output.mark();
    let needle = if mode == ClientMode::Naive {
        "not found"
    } else {
        "reply "
    };
    output
        .wait_for_count(after, needle, 2, Duration::from_secs(10))
        .await?;
    drop(client_proc);
    drop(servers);

    consul_events.push((lifecycle.critical_at, format!("{victim} critical")));
    consul_events.push((
        lifecycle.removed_at,
        format!("{victim} deregistered (Consul's reaper)"),
    ));
    let lines = output.lines();
    let events = events(&lines, t0, &actions, consul_events);
    let after_kill = &lines[kill_mark.min(lines.len())..];
    let replies_after: Vec<&LogLine> = after_kill
        .iter()
        .filter(|l| l.text.starts_with("reply "))
        .collect();
    let worst = replies_after
        .iter()
        .filter_map(|l| field(&l.text, "latency_ms="))
        .fold(None, |acc: Option<f64>, ms| {
            Some(acc.map_or(ms, |a| a.max(ms)))
        })
        .map(|ms| ms / 1e3);
    Ok(Story {
        mode,
        consul_version: consul.version().to_owned(),
        killed_at: secs_since(killed, t0),
        critical_at: secs_since(lifecycle.critical_at, t0),
        removed_at: secs_since(lifecycle.removed_at, t0),
        replies_before_kill: lines[..kill_mark.min(lines.len())]
            .iter()
            .filter(|l| l.text.starts_with("reply "))
            .count(),
        replies_after_kill: replies_after.len(),
        failures_after_kill: after_kill
            .iter()
            .filter(|l| l.text.contains("dial tcp") || l.text.contains("buffer error"))
            .count(),
        worst_reply_after_kill: worst,
        first_reply_after_kill: replies_after
            .first()
            .map(|l| secs_since(l.received, killed)),
        events,
    })
}

/// The echo client of `mode`, started before any server, and left alone: the naive one
/// until it says twice that it found none, the resilient one `client_alone`. With when it
/// started, and its output.
async fn start_client(
    launcher: &Launcher,
    consul: &Consul,
    config: &TimelineConfig,
    mode: ClientMode,
) -> Result<(ClientProcess, SystemTime, crate::logbuf::LogBuffer)> {
    let args = echo_client::cli::Args {
        mode: mode.cli(),
        service: "servernode".into(),
        count: 100_000,
        interval: consul_api::GoDuration(config.message_interval),
        timeout: consul_api::GoDuration::from_secs(600),
        ..crate::procs::client_args()?
    };
    let client_proc = ClientProcess::spawn(launcher, &consul.config(), &args)?;
    let started = SystemTime::now();
    let output = client_proc.process.output().clone();
    if mode == ClientMode::Naive {
        output
            .wait_for_count(
                0,
                "not found",
                2,
                config.client_alone + Duration::from_secs(10),
            )
            .await?;
    } else {
        tokio::time::sleep(config.client_alone).await;
    }
    Ok((client_proc, started, output))
}

/// Each server's first passing check, timed on its own (the servers' first checks are
/// staggered independently within the interval).
async fn first_passing(
    client: &consul_api::Client,
    ids: &[&str],
) -> Result<Vec<(SystemTime, String)>> {
    futures::future::try_join_all(ids.iter().map(|id| async move {
        wait::health_until(client, "servernode", true, Duration::from_secs(60), |e| {
            e.iter().any(|x| x.service.id == *id)
        })
        .await?;
        Ok::<_, Error>((SystemTime::now(), format!("{id} passing")))
    }))
    .await
}

/// SIGKILL `server` (`victim`) once a watch follows it, and wait (bounded by the model's
/// window and some) until Consul has marked it critical and removed it: when it was killed,
/// what Consul did, and the client's output mark at the kill.
async fn kill_and_follow(
    client: &consul_api::Client,
    server: &mut ServerProcess,
    victim: &str,
    config: &TimelineConfig,
    output: &crate::logbuf::LogBuffer,
) -> Result<(SystemTime, wait::Lifecycle, usize)> {
    let (passing_tx, passing_rx) = oneshot::channel();
    let follow = {
        let client = client.clone();
        let victim = victim.to_owned();
        tokio::spawn(async move {
            wait::follow_instance(&client, "servernode", &victim, passing_tx).await
        })
    };
    passing_rx
        .await
        .map_err(|_| Error::Stopped(format!("the watch on {victim}")))?;
    let killed = server.process.kill().await?;
    let kill_mark = output.mark();
    let limit = config.interval
        + config.deregister_after.max(Duration::from_secs(60))
        + Duration::from_secs(60);
    let lifecycle = tokio::time::timeout(limit, follow)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("Consul to remove {victim}"),
            timeout: limit,
        })?
        .map_err(|source| Error::Task {
            what: "the watch on the killed server",
            source,
        })??;
    Ok((killed, lifecycle, kill_mark))
}

/// The story's events in time order: the client's output condensed, what the testbed did
/// (`actions`) and what Consul did (`consul`), in seconds since `t0`.
fn events(
    lines: &[LogLine],
    t0: SystemTime,
    actions: &[(SystemTime, String)],
    consul: Vec<(SystemTime, String)>,
) -> Vec<Event> {
    let mut events = condense(lines, t0);
    let stamped = actions
        .iter()
        .map(|(at, text)| ("testbed", *at, text.clone()))
        .chain(consul.into_iter().map(|(at, text)| ("consul", at, text)));
    for (source, at, text) in stamped {
        events.push(Event {
            at: secs_since(at, t0),
            until: None,
            count: 1,
            source,
            text,
        });
    }
    events.sort_by(|a, b| a.at.total_cmp(&b.at));
    events
}

/// The value after `key` in a `key=value` line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

/// What kind of client line this is, for grouping repeats.
fn kind(text: &str) -> Option<String> {
    if text.starts_with("reply ") {
        let instance = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("instance="))
            .unwrap_or("?");
        Some(format!("echo replies from {instance}"))
    } else if text.starts_with("done ") || text.contains(" INFO ") || text.contains(" DEBUG ") {
        None
    } else if text.contains(" WARN ") || text.contains(" ERROR ") {
        // Log lines: keep the message, without the timestamp and target.
        text.split_once(": ").map(|(_, msg)| msg.trim().to_owned())
    } else {
        Some(text.trim().to_owned())
    }
}

/// Group consecutive client lines of the same kind.
fn condense(lines: &[LogLine], t0: SystemTime) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::new();
    for line in lines {
        let Some(text) = kind(&line.text) else {
            continue;
        };
        let at = secs_since(line.received, t0);
        match events.last_mut() {
            Some(last) if last.text == text => {
                last.count += 1;
                last.until = Some(at);
            }
            _ => events.push(Event {
                at,
                until: None,
                count: 1,
                source: "client",
                text,
            }),
        }
    }
    events
}

// === the contract ===

/// `testbed timeline`: no flags; the seed article's settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

impl Suite for Args {
    fn name(&self) -> &'static str {
        "timeline"
    }

    fn title(&self) -> String {
        "The seed article's story, timestamped".into()
    }

    fn plans(&self) -> Result<Vec<Box<dyn Plan>>> {
        Ok(vec![Box::new(TimelineConfig::default())])
    }
}

impl OnItsOwn for TimelineConfig {
    type Outcome = TimelineReport;

    fn title(&self) -> String {
        "The naive and the resilient client, each against its own agent".into()
    }

    /// Tell the naive and the resilient story at the same time.
    async fn run_alone(&self, launcher: &Launcher, progress: &Progress) -> Result<TimelineReport> {
        progress.say(
            "two stories at once (naive, resilient): client first, server, SIGKILL, then \
             Consul's reaper removes the dead server (60 to 95 s)",
        );
        let began = SystemTime::now();
        let (naive, resilient) = tokio::join!(
            story(launcher, self, ClientMode::Naive),
            story(launcher, self, ClientMode::Resilient)
        );
        Ok(TimelineReport {
            date: crate::report::rfc3339(began),
            stories: vec![naive?, resilient?],
        })
    }
}

impl Findings for TimelineReport {
    fn consul(&self) -> Option<String> {
        self.stories.first().map(|s| s.consul_version.clone())
    }

    fn tables(&self) -> Vec<Table> {
        self.stories
            .iter()
            .map(|story| {
                let mut t = Table::new(["t (s)", "source", "event"])
                    .caption(format!(
                        "Timeline, {} client, {}: Consul {}",
                        story.mode.flag(),
                        match story.mode {
                            ClientMode::Resilient => "two servers",
                            ClientMode::Naive => "one server",
                        },
                        story.consul_version,
                    ))
                    .align_right([0]);
                for e in &story.events {
                    let repeat = match (e.count, e.until) {
                        (n, Some(until)) if n > 1 => format!(" (×{n}, until {until:.1})"),
                        _ => String::new(),
                    };
                    t.push([
                        format!("{:.2}", e.at),
                        e.source.to_owned(),
                        format!("{}{repeat}", e.text),
                    ]);
                }
                t.note(format!(
                    "Kill → critical {:.1} s, kill → deregistered {:.1} s. Client-seen: {}.",
                    story.critical_at - story.killed_at,
                    story.removed_at - story.killed_at,
                    story.outage()
                ));
                t
            })
            .collect()
    }

    fn plot(&self) -> Option<Plot> {
        Some(self.stories_plot())
    }

    fn violations(&self) -> Vec<String> {
        self.stories
            .iter()
            .filter(|s| s.mode == ClientMode::Resilient && s.worst_reply_after_kill.is_none())
            .map(|_| "the resilient client had no reply after the kill".to_owned())
            .collect()
    }
}

impl TimelineReport {
    /// Each client's story against Consul's events: a lane per client, its replies (a bar
    /// while they repeat) and its failures, and the kill, the check turning critical and the
    /// service removed on its lane.
    pub fn stories_plot(&self) -> Plot {
        let mut replies = Vec::new();
        let mut replying = Vec::new();
        let mut failures = Vec::new();
        let mut failing = Vec::new();
        let mut marks: [Vec<Span>; 3] = Default::default();
        for (lane, story) in self.stories.iter().enumerate() {
            let y = lane as f64;
            for e in story.events.iter().filter(|e| e.source == "client") {
                let good = e.text.starts_with("echo replies");
                let (dots, bars) = if good {
                    (&mut replies, &mut replying)
                } else {
                    (&mut failures, &mut failing)
                };
                dots.push((e.at, y));
                if let Some(until) = e.until {
                    bars.push(((e.at, y - 0.06), (until, y + 0.06)));
                }
            }
            for (mark, at) in
                marks
                    .iter_mut()
                    .zip([story.killed_at, story.critical_at, story.removed_at])
            {
                mark.push(((at, y - 0.35), (at, y + 0.35)));
            }
        }
        let [killed, critical, removed] = marks;
        let series = |label: &str, color, mark| Series {
            label: label.into(),
            color,
            mark,
        };
        Plot {
            title: "The seed article's story: each client against Consul's events".into(),
            x: Axis::linear("seconds since the story began"),
            y: Axis::categories(
                "client",
                self.stories
                    .iter()
                    .map(|s| s.mode.flag().to_owned())
                    .collect(),
            ),
            series: vec![
                series("", PALETTE[2], Mark::Boxes(replying)),
                series("echo replies", PALETTE[2], Mark::Dots(replies)),
                series("", PALETTE[1], Mark::Boxes(failing)),
                series(
                    "failures, \"not found\"",
                    PALETTE[1],
                    Mark::Triangles(failures),
                ),
                series("SIGKILL", PALETTE[4], Mark::Segments(killed)),
                series(
                    "Consul: check critical",
                    PALETTE[5],
                    Mark::Segments(critical),
                ),
                series(
                    "Consul: service removed",
                    PALETTE[3],
                    Mark::Segments(removed),
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn line(at: u64, text: &str) -> LogLine {
        LogLine {
            received: UNIX_EPOCH + Duration::from_secs(at),
            text: text.into(),
        }
    }

    #[test]
    fn repeated_client_lines_become_one_event() {
        let lines = [
            line(0, "servernode_1 not found"),
            line(1, "servernode_1 not found"),
            line(
                2,
                "reply seq=1 instance=servernode_1 addr=127.0.0.1:1 rtt_ms=0.1 latency_ms=0.2 attempts=1 bytes=\"x\"",
            ),
            line(
                3,
                "reply seq=2 instance=servernode_1 addr=127.0.0.1:1 rtt_ms=0.1 latency_ms=0.2 attempts=1 bytes=\"y\"",
            ),
            line(4, "read buffer error: EOF"),
            line(5, "dial tcp 127.0.0.1:1: connect: connection refused"),
            line(6, "dial tcp 127.0.0.1:1: connect: connection refused"),
            line(7, "2026-11-25T00:00:00Z  INFO echo_client: something"),
        ];
        let events = condense(&lines, UNIX_EPOCH);
        let summary: Vec<(String, usize)> =
            events.iter().map(|e| (e.text.clone(), e.count)).collect();
        assert_eq!(
            summary,
            vec![
                ("servernode_1 not found".to_string(), 2),
                ("echo replies from servernode_1".to_string(), 2),
                ("read buffer error: EOF".to_string(), 1),
                (
                    "dial tcp 127.0.0.1:1: connect: connection refused".to_string(),
                    2
                ),
            ]
        );
        assert_eq!(events[3].until, Some(6.0));
    }

    #[test]
    fn reply_fields_parse() {
        let l = "reply seq=8 instance=a addr=127.0.0.1:1 rtt_ms=0.640 latency_ms=1.650 attempts=2 bytes=\"x\"";
        assert_eq!(field(l, "latency_ms="), Some(1.65));
        assert_eq!(field(l, "attempts="), Some(2.0));
        assert_eq!(field(l, "nope="), None);
    }

    #[test]
    fn both_stories_are_drawn_against_consul_s_events() {
        let story = |mode, lines: &[LogLine]| Story {
            mode,
            consul_version: "1.8.7".into(),
            events: condense(lines, UNIX_EPOCH),
            killed_at: 10.0,
            critical_at: 14.0,
            removed_at: 85.0,
            replies_before_kill: 8,
            replies_after_kill: 0,
            failures_after_kill: 1,
            worst_reply_after_kill: None,
            first_reply_after_kill: None,
        };
        let reply = "reply seq=1 instance=servernode_1 addr=127.0.0.1:1 rtt_ms=0.1";
        let report = TimelineReport {
            date: "2026-12-06T00:00:00Z".into(),
            stories: vec![
                story(
                    ClientMode::Naive,
                    &[
                        line(2, reply),
                        line(3, reply),
                        line(11, "dial tcp: refused"),
                    ],
                ),
                story(ClientMode::Resilient, &[line(2, reply)]),
            ],
        };
        assert_eq!(
            report.violations(),
            ["the resilient client had no reply after the kill"]
        );
        let dir = std::env::temp_dir().join(format!("testbed-timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("timeline.svg");
        report.stories_plot().svg(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("resilient") && svg.contains("Consul: service removed"));
        assert!(svg.contains("<circle"), "replies are drawn");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
