//! The seed article's story end to end, as `testbed timeline` tells it: the naive client
//! loses the service from the kill until Consul's reaper, the resilient one loses nothing.

use testbed::{
    experiment::{Experiment, Findings},
    progress::Progress,
    timeline::{ClientMode, TimelineConfig},
};

use crate::common::{init_tracing, launcher};

#[tokio::test]
async fn the_naive_client_loses_the_service_and_the_resilient_one_does_not() {
    init_tracing();
    let report = TimelineConfig::default()
        .run(&launcher(), &Progress::lines())
        .await
        .unwrap();
    for table in report.tables() {
        eprintln!("{}", table.markdown());
    }
    let [naive, resilient] = &report.stories[..] else {
        panic!("two stories expected");
    };
    assert_eq!(naive.mode, ClientMode::Naive);
    assert_eq!(resilient.mode, ClientMode::Resilient);
    for story in [naive, resilient] {
        assert!(story.replies_before_kill >= 8, "{story:?}");
        // Removed inside the model's kill window for 30s / every 5s / 3s timeout: (60, 98].
        let kill_to_removed = story.removed_at - story.killed_at;
        assert!(
            kill_to_removed > 60.0 && kill_to_removed < 98.5,
            "{story:?}"
        );
    }
    // Naive: "not found" first, then replies, then only failures, then "not found" again.
    let texts: Vec<&str> = naive
        .events
        .iter()
        .filter(|e| e.source == "client")
        .map(|e| e.text.as_str())
        .collect();
    assert!(texts.first().unwrap().contains("not found"), "{texts:?}");
    assert!(texts.last().unwrap().contains("not found"), "{texts:?}");
    assert!(
        texts.iter().any(|t| t.contains("connection refused")),
        "{texts:?}"
    );
    assert_eq!(naive.replies_after_kill, 0);
    assert!(naive.failures_after_kill > 10, "{naive:?}");
    // Resilient: the stream went on, from the other server, with nothing lost.
    assert!(resilient.replies_after_kill > 10, "{resilient:?}");
    assert!(
        resilient.worst_reply_after_kill.unwrap() < 2.0,
        "{resilient:?}"
    );
}
