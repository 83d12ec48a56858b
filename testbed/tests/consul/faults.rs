//! The fault and security scenarios of `testbed::faults`, each with short settings, asserting
//! their invariants: no echo lost, no panic or exit, recovery happened, errors are clear, no
//! token printed, memory bounded (generously).

use std::time::Duration;

use testbed::{
    experiment::Experiment,
    faults::{self, Rows, Scenario},
    progress::Progress,
};

use crate::common::{init_tracing, launcher};

fn show(outcome: &impl serde::Serialize) {
    eprintln!("{}", serde_json::to_string_pretty(outcome).unwrap());
}

/// Each step of a scenario, on the test's output.
fn step() -> Progress {
    Progress::lines()
}

#[tokio::test]
async fn hung_server_leaves_and_rejoins_rotation_without_losing_an_echo() {
    init_tracing();
    let config = faults::hung::Config {
        hold: Duration::from_secs(1),
        ..Default::default()
    };
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert_eq!(o.basics.tally.lost, 0);
    assert!(o.during_fault.sent > 0);
    assert!(
        o.check_output.contains("Timeout exceeded"),
        "{}",
        o.check_output
    );
    let left = o.left_rotation.unwrap();
    // Check interval + timeout + a blocking query's answer: a generous "no hang" bound.
    assert!(left < Duration::from_secs(10), "{left:?}");
    assert!(o.failover.unwrap() < Duration::from_secs(5));
    assert!(o.rejoined_rotation.unwrap() < Duration::from_secs(10));
    assert!(o.survived);
    assert_eq!(o.rows()[0].scenario, Scenario::Hung.title());
}

#[tokio::test]
async fn paused_consul_costs_no_echo_and_everything_converges() {
    init_tracing();
    let config = faults::paused::Config {
        pause: Duration::from_secs(6),
        ..Default::default()
    };
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert_eq!(o.during_pause.lost, 0);
    assert!(o.during_pause.sent > 0);
    assert_eq!(o.direct_echoes.0, o.direct_echoes.1);
    assert!(o.registrations_lost.is_empty());
    assert!(o.converged.unwrap() < Duration::from_secs(30));
}

#[tokio::test]
async fn restarted_consul_gets_every_registration_back_within_two_intervals() {
    init_tracing();
    let config = faults::restarted::Config::default();
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert!(o.re_registered.unwrap() < 2 * config.cast.interval);
    assert_eq!(o.servers_re_registered, config.cast.servers);
    // Dev mode starts its indexes over: the client's index went backwards, and its watch
    // reset (a fresh read, not a block on the old index) and followed the new agent.
    assert!(
        o.first_index_after > 0 && o.first_index_after < o.index_before,
        "the index went backwards: {} before the restart, {} after",
        o.index_before,
        o.first_index_after
    );
    assert!(
        o.index_after >= o.first_index_after,
        "the watch followed the new agent's index: {} then {}",
        o.first_index_after,
        o.index_after
    );
    assert!(o.client_view.is_some());
    assert_eq!(o.basics.tally.lost, 0);
}

#[tokio::test]
async fn behind_a_faulty_proxy_servers_and_clients_log_back_off_and_recover() {
    init_tracing();
    let config = faults::proxy::Config {
        hold: Duration::from_secs(1),
        faults: faults::proxy::every_fault(Duration::from_secs(1)),
        ..Default::default()
    };
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert_eq!(o.phases.len(), config.faults.len());
    for p in o.phases.iter().filter(|p| p.fault.is_failure()) {
        assert_eq!(p.server_errors.len(), config.cast.servers, "{:?}", p.fault);
        assert!(p.client_error.is_some(), "{:?}", p.fault);
        assert!(
            p.clear,
            "{:?}: {:?} {:?}",
            p.fault, p.server_errors, p.client_error
        );
        assert!(
            p.recovered.unwrap() < Duration::from_secs(15),
            "{:?}",
            p.fault
        );
    }
    assert!(o.all_registered);
    assert_eq!(o.basics.tally.lost, 0);
}

#[tokio::test]
async fn with_acls_refusals_are_clear_permissions_are_narrow_and_no_token_is_printed() {
    init_tracing();
    let config = faults::acl::Config {
        messages: 5,
        ..Default::default()
    };
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert!(o.cases.len() >= 7);
    assert!(o.cases.iter().all(|c| c.ok), "{:#?}", o.cases);
    assert!(o.tokens_printed.is_empty());
    assert_eq!((o.client.sent, o.client.lost), (5, 0));
    let intruder = o.cases.iter().find(|c| c.who.contains("intruder")).unwrap();
    assert!(
        intruder.observed.contains("Permission denied"),
        "{}",
        intruder.observed
    );
}

#[tokio::test]
async fn hostile_input_leaves_the_server_up_and_its_memory_bounded() {
    init_tracing();
    let config = faults::hostile::Config::default();
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert!(o.alive && o.fresh_echo && o.still_passing);
    assert_eq!(o.stalled, config.attack.stalled_conns);
    assert_eq!(o.short_lived_ok, config.attack.short_lived as u64);
    assert_eq!(o.oversize_refused, config.attack.oversize_conns as u64);
    assert!(o.garbage_sent > 0);
    // Generous: a leak or a frame-sized buffer per connection would break these.
    assert!(o.peak_rss_kib < 256 << 10, "{} KiB", o.peak_rss_kib);
    assert!(o.bytes_per_stalled_conn < 64.0 * 1024.0);
    assert_eq!(o.quiet.lost + o.attack.lost, 0);
    assert!(o.p99_ratio.is_some());
}

#[tokio::test]
async fn blackholed_instances_cost_at_most_one_connect_timeout() {
    init_tracing();
    let config = faults::blackholed::Config::default();
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert_eq!(
        (o.basics.tally.sent, o.basics.tally.lost),
        (config.messages, 0)
    );
    assert_eq!(o.served_by, std::slice::from_ref(&o.healthy));
    // One healthy instance behind 3 that drop SYNs: about the stream plus one connect
    // timeout (tried one after another, they cost 3), beyond what a reply on an open
    // connection took in the same stream (on a loaded machine: 1.07 s slowest once, the
    // timeout 1 s).
    let allowed = o.connect_timeout + o.connected_slowest;
    assert!(o.connected_slowest < o.connect_timeout, "{o:?}");
    assert!(o.extra() <= allowed, "{:?} extra", o.extra());
    assert!(o.slowest <= allowed, "slowest reply {:?}", o.slowest);
}

#[tokio::test]
async fn a_large_pipelined_batch_is_answered_without_ejecting_the_server() {
    init_tracing();
    let config = faults::batch::Config::default();
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert_eq!(o.basics.tally.sent, config.messages as u64);
    assert_eq!(o.exact, config.messages as u64);
    assert_eq!(o.basics.tally.resent, 0, "no reply timeout, no ejection");
}

#[tokio::test]
async fn without_x_consul_index_discovery_polls_with_backoff_and_sees_changes() {
    init_tracing();
    let config = faults::stripped::Config::default();
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert_eq!(o.max_index_seen, 0, "the proxy stripped every index");
    assert!(o.new_server_seen.unwrap() < Duration::from_secs(15));
    assert!(o.request_rate <= config.max_rate, "{}", o.request_rate);
    assert_eq!(o.basics.tally.lost, 0);
}

#[tokio::test]
async fn a_rotated_tls_certificate_reaches_new_connections_and_costs_no_echo() {
    init_tracing();
    let config = faults::rotated::Config {
        window: Duration::from_secs(2),
        ..Default::default()
    };
    let o = config.run(&launcher(), &step()).await.unwrap();
    show(&o);
    assert!(o.violations().is_empty(), "{:?}", o.violations());
    assert_eq!(o.basics.tally.lost, 0);
    assert_eq!(o.phases.len(), 3);
    for phase in &o.phases {
        assert!(phase.tally.sent > 0, "{phase:?}");
        assert!(phase.reload < Duration::from_secs(10), "{phase:?}");
    }
    let refused = o.phases[1].fresh_client_error.as_deref().unwrap();
    assert!(
        refused.contains("is not signed by a CA in CONSUL_CACERT"),
        "{refused}"
    );
    assert!(o.phases[0].fresh_client_error.is_none());
    assert!(o.phases[2].fresh_client_error.is_none());
    assert_eq!(o.rows()[0].scenario, Scenario::Rotated.title());
}
