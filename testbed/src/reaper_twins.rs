//! The reaper rows of the deregistration experiment (`testbed deregistration --reaper`): each
//! trial server gets a twin, the same service with Meta `reap-after` set to the same value,
//! SIGKILLed at the same moment; the `consul-reaper` sidecar (run as `testbed reaper`, a child
//! process like any sidecar) removes the twin, Consul's own reaper the original. The twin
//! keeps `DeregisterCriticalServiceAfter` (Consul stays the safety net), so each row says who
//! removed it: the reaper's log line, or the agent's.

use std::time::Duration;

use consul_api::GoDuration;
use consul_reaper::{FOLLOWING, REMOVED};
use serde::Serialize;

use crate::{
    deregistration::Trial, error::Result, logbuf::LogBuffer, process::ChildProcess,
    procs::Launcher, report::Table,
};

/// How far from the setting a removal may fall: the goal of issue 17.
pub const TOLERANCE_MS: f64 = 50.0;

/// Start the sidecar (`testbed reaper`, Consul's settings from `consul`) and wait until it
/// follows the agent's checks.
pub async fn spawn(launcher: &Launcher, consul: &consul_api::Config) -> Result<ChildProcess> {
    let process = launcher.spawn_subcommand("reaper", consul, &[])?;
    process
        .output()
        .wait_for(FOLLOWING, Duration::from_secs(30))
        .await?;
    Ok(process)
}

/// Whether the reaper's output says it removed `service_id`.
pub fn removed_by_reaper(output: &LogBuffer, service_id: &str) -> bool {
    let token = format!("service={service_id}");
    output
        .matching(REMOVED)
        .iter()
        .any(|l| l.text.split_whitespace().any(|w| w == token))
}

/// One twin's trial. Instants are seconds since the sweep began.
#[derive(Debug, Clone, Serialize)]
pub struct ReaperTrial {
    /// The twin's service ID, for example `reap-30s-every-5s-t1`.
    pub service_id: String,
    /// The Consul-only server it is the twin of.
    pub twin_of: String,
    /// `reap-after`, the same as the twin's `DeregisterCriticalServiceAfter`.
    pub setting: GoDuration,
    /// The HTTP check's `Interval`.
    pub interval: GoDuration,
    /// The trial's number within its cell, from 1.
    pub trial: usize,
    /// When the server was sent SIGKILL.
    pub killed_at: f64,
    /// When a blocking query first showed its check critical.
    pub critical_at: f64,
    /// When a blocking query first showed the service gone.
    pub removed_at: f64,
    /// `removed_at − critical_at`, seconds.
    pub critical_to_removed: f64,
    /// `critical_to_removed − setting`, milliseconds.
    pub error_ms: f64,
    /// Who removed it: `reaper` (its log says so), or `consul` otherwise.
    pub removed_by: &'static str,
}

/// The reaper's part of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct ReaperSection {
    /// The goal: |critical → removed − setting| within this many milliseconds.
    pub tolerance_ms: f64,
    /// Every twin's trial, in plan order.
    pub trials: Vec<ReaperTrial>,
    /// Largest |error| over the trials, milliseconds.
    pub max_abs_error_ms: f64,
    /// Whether every twin was removed by the reaper within the tolerance.
    pub all_within: bool,
}

impl ReaperSection {
    /// The section over `trials`.
    pub fn new(trials: Vec<ReaperTrial>) -> ReaperSection {
        let max_abs_error_ms = trials.iter().map(|t| t.error_ms.abs()).fold(0.0, f64::max);
        let all_within = !trials.is_empty()
            && trials
                .iter()
                .all(|t| t.removed_by == "reaper" && t.error_ms.abs() <= TOLERANCE_MS);
        ReaperSection {
            tolerance_ms: TOLERANCE_MS,
            trials,
            max_abs_error_ms,
            all_within,
        }
    }
}

/// Side by side, per setting: Consul's own removal of the originals, and the reaper's of their
/// twins; then every twin's trial.
pub fn tables(section: &ReaperSection, consul: &[Trial]) -> Vec<Table> {
    let mut by_setting = Table::new([
        "setting",
        "Consul alone: critical→removed (s)",
        "with the reaper: critical→removed (s)",
        "reaper − setting (ms), min / max",
        "trials within ±50 ms",
    ])
    .caption("The same services with the reaper sidecar (Meta `reap-after` = the setting)")
    .align_right([1, 2, 3, 4]);
    let mut settings: Vec<GoDuration> = section.trials.iter().map(|t| t.setting).collect();
    settings.sort();
    settings.dedup();
    for setting in settings {
        let ours: Vec<&ReaperTrial> = section
            .trials
            .iter()
            .filter(|t| t.setting == setting)
            .collect();
        let theirs: Vec<f64> = consul
            .iter()
            .filter(|t| t.setting == setting)
            .map(|t| t.critical_to_removed)
            .collect();
        let range = |xs: &[f64], digits: usize| {
            let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if xs.is_empty() {
                "–".to_owned()
            } else {
                format!("{lo:.digits$} – {hi:.digits$}")
            }
        };
        let ours_s: Vec<f64> = ours.iter().map(|t| t.critical_to_removed).collect();
        let errors: Vec<f64> = ours.iter().map(|t| t.error_ms).collect();
        let within = ours
            .iter()
            .filter(|t| t.removed_by == "reaper" && t.error_ms.abs() <= TOLERANCE_MS)
            .count();
        by_setting.push([
            setting.to_string(),
            range(&theirs, 2),
            range(&ours_s, 3),
            range(&errors, 1).replace(" – ", " / "),
            format!("{within}/{}", ours.len()),
        ]);
    }
    let mut twins = Table::new([
        "twin",
        "check interval",
        "trial",
        "critical→removed (s)",
        "− setting (ms)",
        "removed by",
    ])
    .align_right([3, 4]);
    for t in &section.trials {
        twins.push([
            t.service_id.clone(),
            t.interval.to_string(),
            t.trial.to_string(),
            format!("{:.3}", t.critical_to_removed),
            format!("{:+.1}", t.error_ms),
            t.removed_by.to_owned(),
        ]);
    }
    vec![by_setting, twins]
}

/// The twins in one sentence: the largest error, and whether every one held.
pub fn summary(section: &ReaperSection) -> String {
    format!(
        "Reaper sidecar: largest |error| {:.1} ms; every twin removed by the reaper within ±{:.0} \
         ms: {}.\n",
        section.max_abs_error_ms,
        section.tolerance_ms,
        if section.all_within { "yes" } else { "NO" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(setting: u64, error_ms: f64, by: &'static str) -> ReaperTrial {
        ReaperTrial {
            service_id: format!("reap-{setting}s"),
            twin_of: format!("dereg-{setting}s"),
            setting: GoDuration::from_secs(setting),
            interval: GoDuration::from_secs(1),
            trial: 1,
            killed_at: 0.0,
            critical_at: 1.0,
            removed_at: 1.0 + setting as f64 + error_ms / 1e3,
            critical_to_removed: setting as f64 + error_ms / 1e3,
            error_ms,
            removed_by: by,
        }
    }

    #[test]
    fn the_section_holds_only_if_the_reaper_removed_every_twin_in_time() {
        let ok = ReaperSection::new(vec![trial(5, 12.0, "reaper"), trial(10, -3.0, "reaper")]);
        assert!(ok.all_within);
        assert_eq!(ok.max_abs_error_ms, 12.0);
        assert!(!ReaperSection::new(vec![trial(5, 51.0, "reaper")]).all_within);
        assert!(!ReaperSection::new(vec![trial(60, 1.0, "consul")]).all_within);
        assert!(!ReaperSection::new(vec![]).all_within, "nothing measured");
        let md = tables(&ok, &[])[0].markdown();
        assert!(
            md.contains("| 5s | – | 5.012 – 5.012 | 12.0 / 12.0 | 1/1 |"),
            "{md}"
        );
    }

    #[test]
    fn removals_are_read_from_the_reaper_log() {
        let log = LogBuffer::new();
        log.push_line(
            "INFO consul_reaper::driver: check critical for its reap-after; deregistered the service service=reap-5s-t1 after=5s late_ms=0",
        );
        assert!(removed_by_reaper(&log, "reap-5s-t1"));
        assert!(!removed_by_reaper(&log, "reap-5s-t10"));
    }
}
