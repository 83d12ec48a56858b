//! Where results go and what they hold. Criterion keeps its own data under its home
//! (`target/criterion`); next to it, in `bench-results/`, the benches write what criterion
//! does not keep: every timed interval of the measured samples (so percentiles are exact, not
//! of sample means), the parts of each interval, the run's environment, and the memory
//! measurement. All durations are nanoseconds.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    spread::Interval,
};
use lab_report::{select_percentile as percentile, unix_ms};

/// Criterion's output directory, found the way criterion finds it: `CRITERION_HOME`, else
/// `$CARGO_TARGET_DIR/criterion`, else the target directory `cargo metadata` names, else
/// `target/criterion`.
pub fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    #[derive(Deserialize)]
    struct Metadata {
        target_directory: PathBuf,
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let metadata = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| serde_json::from_slice::<Metadata>(&out.stdout).ok());
    match metadata {
        Some(m) => m.target_directory.join("criterion"),
        None => PathBuf::from("target/criterion"),
    }
}

/// Where the benches write their own results: `bench-results/` in criterion's home.
pub fn results_dir() -> PathBuf {
    criterion_home().join("bench-results")
}

/// Whether this bench binary measures for real (`cargo bench` passes `--bench`), as opposed
/// to criterion's test mode (`cargo test --benches`), `--list` or `--profile-time`, whose
/// numbers must not replace a real run's.
pub fn measuring() -> bool {
    measuring_with(std::env::args())
}

fn measuring_with(args: impl IntoIterator<Item = String>) -> bool {
    let args: Vec<String> = args.into_iter().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    has("--bench")
        && !has("--test")
        && !has("--list")
        && !args.iter().any(|a| a.starts_with("--profile-time"))
}

/// Percentiles of one series, in nanoseconds (negative values allowed: a signed difference).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// How many finite values it summarises.
    pub count: usize,
    /// The smallest value.
    pub min: f64,
    /// The median.
    pub p50: f64,
    /// The 90th percentile.
    pub p90: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The largest value.
    pub max: f64,
    /// The arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// The summary of `values` (its finite ones); `None` when there are none. Percentiles
    /// by the one rule, [`lab_report::select_percentile`].
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let count = finite.len();
        let min = finite.iter().copied().reduce(f64::min)?;
        let max = finite.iter().copied().reduce(f64::max)?;
        let mean = finite.iter().sum::<f64>() / count as f64;
        let mut at = |p| percentile(&mut finite, p);
        Some(Summary {
            count,
            min,
            p50: at(50.0)?,
            p90: at(90.0)?,
            p99: at(99.0)?,
            max,
            mean,
        })
    }
}

/// One file in [`results_dir`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResultFile {
    /// `"kind": "series"`: one bench's timed intervals.
    Series(SeriesRecord),
    /// `"kind": "run"`: one bench binary's run.
    Run(RunInfo),
    /// `"kind": "memory"`: the memory measurement.
    Memory(MemoryRecord),
    /// `"kind": "fairness"`: a well-behaved client's latency, quiet and under attack.
    Fairness(FairnessRecord),
}

/// The fairness measurement: a well-behaved client's round trips to an echo-server process,
/// quiet and while the hostile-input attack runs, with the attacker on a CPU of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FairnessRecord {
    /// The measurement's id, the report's row.
    pub id: String,
    /// Where each side ran, in words (which CPU, or unpinned).
    pub placement: String,
    /// What the attacker sent, in words.
    pub attack: String,
    /// The client's round trips before the attack.
    pub quiet: Summary,
    /// Its round trips during the attack.
    pub attacked: Summary,
    /// Its round trips during each phase of the attack, with the server's CPU use (1.0 =
    /// one CPU busy) over the phase.
    pub phases: Vec<(String, f64, Summary)>,
    /// The same round trips less the client's own wait for its CPU during each; `None`
    /// where the kernel keeps no schedstats (or in a record from before they were read).
    #[serde(default)]
    pub less_own_wait: Option<Box<LessOwnWait>>,
    /// The same client against the fair baseline under the same attack (less the phase a
    /// copier cannot end); `None` where nothing was pinned, or in a record from before it
    /// was measured.
    #[serde(default)]
    pub baseline: Option<Box<FairnessBaseline>>,
}

/// The fairness measurement against the fair baseline (a plain copier, no framing and no
/// limits, with the server's placement): what the kernel and a tokio server with nothing of
/// its own give a well-behaved client under the same attack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FairnessBaseline {
    /// The baseline, in words.
    pub server: String,
    /// The attack's phase it did not run (a copier never answers an oversized frame).
    pub left_out: String,
    /// The client's round trips to it before the attack.
    pub quiet: Summary,
    /// During the attack.
    pub attacked: Summary,
    /// During each phase of the attack.
    pub phases: Vec<(String, Summary)>,
    /// The client's round trips to echo-server during the phases the baseline ran too.
    pub echo_server_same_phases: Summary,
}

/// The well-behaved client's round trips less its own wait for its CPU during each (its
/// thread's run-queue delay, `/proc/thread-self/schedstat`): what the server and the
/// kernel's loopback path took, without the time the client, woken by the echo, waited for
/// the CPU it shares with the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LessOwnWait {
    /// Before the attack.
    pub quiet: Summary,
    /// During the attack.
    pub attacked: Summary,
    /// During each phase of the attack.
    pub phases: Vec<(String, Summary)>,
}

impl FairnessRecord {
    /// Save it (only when [`measuring`]).
    pub fn save(&self) -> Result<Option<PathBuf>> {
        if !measuring() {
            return Ok(None);
        }
        let path = results_dir().join(format!("fairness.{}.json", file_safe(&self.id)));
        write_json(&path, &ResultFile::Fairness(self.clone()))?;
        Ok(Some(path))
    }
}

/// The intervals a bench timed in criterion's measured samples, and their parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeriesRecord {
    /// Criterion's id of the bench (`failover/kill/sigkill_process`).
    pub id: String,
    /// How many calls of the timed routine (criterion samples) the series cover.
    pub samples: usize,
    /// Each series' summary. [`MEASURED`] is the interval criterion was given.
    pub series: BTreeMap<String, Summary>,
    /// What each series is, in the order to show them.
    pub descriptions: Vec<(String, String)>,
    /// Payload bytes per iteration, when [`MEASURED`] is a time per iteration of a
    /// throughput (the report turns it into bytes per second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_iter: Option<u64>,
    /// 95 % intervals the bench computed from its samples ([`crate::spread`]), by what they
    /// bound (see [`Recorder::bound`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub intervals: BTreeMap<String, Interval>,
    /// When it was recorded (Unix milliseconds).
    pub recorded_unix_ms: u64,
}

/// The series holding exactly the interval each iteration returned to criterion.
pub const MEASURED: &str = "measured";

/// One bench binary's run: when, and what it ran against.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunInfo {
    /// The bench binary's name.
    pub bench: String,
    /// When it started (Unix milliseconds).
    pub started_unix_ms: u64,
    /// When it finished (Unix milliseconds); 0 until [`RunInfo::finish`].
    pub finished_unix_ms: u64,
    /// Consul's version, as the agent reports it; `None` if the run started no Consul.
    pub consul_version: Option<String>,
    /// Which backend ran Consul (`docker` or `process`); `None` if the run started none.
    pub consul_backend: Option<String>,
    /// The Docker engine's version, when Consul ran in Docker and the engine said.
    pub docker_version: Option<String>,
}

impl RunInfo {
    /// A run of `bench` starting now.
    pub fn start(bench: impl Into<String>) -> Self {
        RunInfo {
            bench: bench.into(),
            started_unix_ms: unix_ms(SystemTime::now()),
            ..Default::default()
        }
    }

    /// Mark it finished now and save it (only when [`measuring`]).
    pub fn finish(mut self) -> Result<Option<PathBuf>> {
        self.finished_unix_ms = unix_ms(SystemTime::now());
        if !measuring() {
            return Ok(None);
        }
        let path = results_dir().join(format!("run.{}.json", file_safe(&self.bench)));
        write_json(&path, &ResultFile::Run(self))?;
        Ok(Some(path))
    }
}

/// The memory measurement: an echo-server process's resident set with idle connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryRecord {
    /// The measurement's id (`memory/idle_connections/<size>`), the report's row; also in
    /// its file name.
    pub id: String,
    /// Idle connections held.
    pub connections: usize,
    /// Size of the one message each connection exchanged before going idle.
    pub message_bytes: usize,
    /// One entry per fresh server process.
    pub runs: Vec<MemoryRun>,
    /// Median over runs of (RSS with the connections − RSS before) / connections.
    pub bytes_per_connection: f64,
}

/// One server process's numbers, in KiB as `/proc/<pid>/status` gives them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MemoryRun {
    /// `VmRSS` after start and one echo, before the idle connections.
    pub base_rss_kib: u64,
    /// `VmRSS` holding every idle connection.
    pub idle_rss_kib: u64,
    /// `VmHWM`, the peak resident set, holding every idle connection.
    pub peak_kib: u64,
}

impl MemoryRecord {
    /// Save it (only when [`measuring`]).
    pub fn save(&self) -> Result<Option<PathBuf>> {
        if !measuring() {
            return Ok(None);
        }
        let path = results_dir().join(format!("memory.{}.json", file_safe(&self.id)));
        write_json(&path, &ResultFile::Memory(self.clone()))?;
        Ok(Some(path))
    }
}

/// Records the intervals a bench times, per call of its timed routine, and keeps the last
/// `keep` calls: criterion calls the routine for warm-up first, then once per sample, so with
/// `keep` = the sample size what is kept is exactly the measured samples.
#[derive(Debug)]
pub struct Recorder {
    id: String,
    keep: usize,
    calls: VecDeque<BTreeMap<String, Vec<f64>>>,
    descriptions: Vec<(String, String)>,
    bytes_per_iter: Option<u64>,
    intervals: BTreeMap<String, Interval>,
}

impl Recorder {
    /// A recorder for bench `id` keeping the last `keep` calls.
    pub fn new(id: impl Into<String>, keep: usize) -> Self {
        Recorder {
            id: id.into(),
            keep: keep.max(1),
            calls: VecDeque::new(),
            descriptions: Vec::new(),
            bytes_per_iter: None,
            intervals: BTreeMap::new(),
        }
    }

    /// [`MEASURED`] is the time per iteration of a throughput of `bytes` per iteration.
    pub fn throughput(mut self, bytes: u64) -> Self {
        self.bytes_per_iter = Some(bytes);
        self
    }

    /// Say what `series` is (shown in the report, in the order described).
    pub fn describe(mut self, series: &str, text: &str) -> Self {
        self.descriptions.retain(|(name, _)| name != series);
        self.descriptions.push((series.into(), text.into()));
        self
    }

    /// The bench's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A new call of the timed routine begins.
    pub fn start_call(&mut self) {
        if self.calls.len() == self.keep {
            self.calls.pop_front();
        }
        self.calls.push_back(BTreeMap::new());
    }

    fn current(&mut self, series: &str) -> &mut Vec<f64> {
        if self.calls.is_empty() {
            self.start_call();
        }
        let last = self.calls.len() - 1;
        self.calls[last].entry(series.to_owned()).or_default()
    }

    /// One interval of `series`.
    pub fn push(&mut self, series: &str, interval: Duration) {
        self.current(series).push(interval.as_nanos() as f64);
    }

    /// One signed difference of `series`, in nanoseconds.
    pub fn push_signed(&mut self, series: &str, nanos: f64) {
        self.current(series).push(nanos);
    }

    /// Many intervals of `series`.
    pub fn extend(&mut self, series: &str, intervals: impl IntoIterator<Item = Duration>) {
        self.current(series)
            .extend(intervals.into_iter().map(|d| d.as_nanos() as f64));
    }

    /// How many calls are kept.
    pub fn calls(&self) -> usize {
        self.calls.len()
    }

    /// The kept values of `series`, one slice per call (empty for a call without any).
    pub fn per_call(&self, series: &str) -> Vec<&[f64]> {
        self.calls
            .iter()
            .map(|call| call.get(series).map_or(&[][..], Vec::as_slice))
            .collect()
    }

    /// Record `interval` as the 95 % interval of `what` (a name the report looks up, such as
    /// [`crate::report::MEDIAN_INTERVAL`]); `None` records nothing.
    pub fn bound(&mut self, what: &str, interval: Option<Interval>) {
        if let Some(interval) = interval {
            self.intervals.insert(what.to_owned(), interval);
        }
    }

    /// The summaries of what is kept.
    pub fn record(&self) -> SeriesRecord {
        let mut all: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for call in &self.calls {
            for (name, values) in call {
                all.entry(name.clone()).or_default().extend(values);
            }
        }
        SeriesRecord {
            id: self.id.clone(),
            samples: self.calls.len(),
            series: all
                .into_iter()
                .filter_map(|(name, values)| Summary::of(&values).map(|s| (name, s)))
                .collect(),
            descriptions: self.descriptions.clone(),
            bytes_per_iter: self.bytes_per_iter,
            intervals: self.intervals.clone(),
            recorded_unix_ms: unix_ms(SystemTime::now()),
        }
    }

    /// Save the record when measuring for real and every sample was taken (a filtered-out
    /// or interrupted bench leaves the last complete run's file alone).
    pub fn save(&self) -> Result<Option<PathBuf>> {
        if !measuring() || self.calls.len() < self.keep {
            return Ok(None);
        }
        let path = results_dir().join(format!("series.{}.json", file_safe(&self.id)));
        write_json(&path, &ResultFile::Series(self.record()))?;
        Ok(Some(path))
    }
}

/// `id` with everything but letters, digits, `-` and `_` replaced, for a file name.
pub fn file_safe(id: &str) -> String {
    id.chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => c,
            '/' => '.',
            _ => '_',
        })
        .collect()
}

/// Write `value` as pretty JSON to `path`, creating its directory.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_vec_pretty(value).map_err(|source| Error::Json {
        path: path.display().to_string(),
        source,
    })?;
    std::fs::write(path, json)?;
    Ok(())
}

/// Read JSON from `path`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.display().to_string(),
        source,
    })
}

/// Every result file in `dir` (none if it does not exist).
pub fn load_all(dir: &Path) -> Result<Vec<ResultFile>> {
    let mut files = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(e.into()),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    for path in paths {
        files.push(read_json(&path)?);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!((s.p50, s.max, s.min, s.count), (50.5, 100.0, 1.0, 100));
        assert!((s.p99 - 99.01).abs() < 1e-9);
        let s = Summary::of(&[3.0, -1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((s.count, s.min, s.p50, s.max), (3, -1.0, 2.0, 3.0));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn the_recorder_keeps_the_last_calls_only() {
        let mut r = Recorder::new("g/f/p", 2).describe(MEASURED, "x");
        for call in 1..=4u64 {
            r.start_call();
            for _ in 0..call {
                r.push(MEASURED, Duration::from_nanos(call));
            }
        }
        let record = r.record();
        assert_eq!(record.samples, 2);
        let s = record.series[MEASURED];
        assert_eq!(s.count, 3 + 4, "calls 3 and 4 kept: the warm-up is dropped");
        assert_eq!((s.min, s.max), (3.0, 4.0));
        assert_eq!(
            file_safe("echo/throughput/raw-copy/16B x1"),
            "echo.throughput.raw-copy.16B_x1"
        );
    }

    #[test]
    fn only_a_real_bench_run_is_saved() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(measuring_with(args(&["failover", "--bench"])));
        assert!(measuring_with(args(&["failover", "--bench", "kill"])));
        assert!(!measuring_with(args(&["failover"])), "cargo test --benches");
        assert!(!measuring_with(args(&["failover", "--bench", "--test"])));
        assert!(!measuring_with(args(&["failover", "--bench", "--list"])));
        assert!(!measuring_with(args(&[
            "f",
            "--bench",
            "--profile-time",
            "5"
        ])));
    }

    #[test]
    fn result_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("bench-results-test-{}", std::process::id()));
        let mut r = Recorder::new("a/b", 1);
        r.push(MEASURED, Duration::from_micros(5));
        write_json(
            &dir.join("series.a.b.json"),
            &ResultFile::Series(r.record()),
        )
        .unwrap();
        let info = RunInfo::start("failover");
        write_json(&dir.join("run.failover.json"), &ResultFile::Run(info)).unwrap();
        let files = load_all(&dir).unwrap();
        assert_eq!(files.len(), 2);
        assert!(matches!(&files[1], ResultFile::Series(s) if s.series[MEASURED].p50 == 5000.0));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(load_all(&dir).unwrap().is_empty());
    }
}
