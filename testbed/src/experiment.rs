//! The one contract every experiment implements, and the one runner that runs them.
//!
//! An experiment is its settings (a `Config`) implementing [`Experiment`]: its title, what
//! it needs started first ([`Needs`]: nothing, one agent, a cluster), and a run that reports
//! progress ([`Progress`]) and returns an outcome with [`Findings`] (tables, a paragraph,
//! the invariants that did not hold, an optional [`Plot`]). A subcommand is a [`Suite`]: its
//! clap arguments, turned into the experiments to run ([`Plan`]s). [`run`] owns the rest:
//! progress, timing, failure capture, the report's files (`<name>.md`, `<name>.json`,
//! `<name>.svg`) and the exit code.
//!
//! **A new experiment** is one file (its `Config`, `Outcome`, the two impls and a `Suite` for
//! its arguments) plus one line in [`crate::experiments`]'s list.

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Instant, SystemTime},
};

use futures::future::LocalBoxFuture;
use serde::Serialize;

use crate::{
    Cluster, ClusterSpec, Consul, ConsulOptions,
    error::{Error, Result},
    procs::Launcher,
    progress::Progress,
    provision,
    report::{self, Header, Plot, Table},
};

/// What an experiment needs started before it runs.
#[derive(Debug, Clone)]
pub enum Needs {
    /// Nothing: it starts what it needs itself (several agents, two datacenters).
    Nothing,
    /// One agent, started with these options.
    Agent(ConsulOptions),
    /// A cluster of this shape.
    Cluster(ClusterSpec),
}

impl Needs {
    /// One agent as the environment asks for (backend, image), no ACLs, plain HTTP.
    pub fn agent() -> Result<Needs> {
        Ok(Needs::Agent(ConsulOptions::from_env()?))
    }

    /// In words, for the report: `3 servers + 3 client agents, reconnect_timeout 72h`.
    pub fn describe(&self) -> String {
        match self {
            Needs::Nothing => String::new(),
            Needs::Agent(_) => "one agent".into(),
            Needs::Cluster(spec) => describe_cluster(spec),
        }
    }
}

/// "3 servers + 3 client agents, reconnect_timeout 72h (Consul's default)".
pub fn describe_cluster(spec: &ClusterSpec) -> String {
    format!(
        "{} servers + {} client agents, reconnect_timeout {}",
        spec.servers,
        spec.clients,
        spec.reconnect_timeout
            .map(|d| consul_api::GoDuration(d).to_string())
            .unwrap_or_else(|| "72h (Consul's default)".into())
    )
}

/// What [`Needs`] started: the experiment runs on it.
#[derive(Debug)]
pub enum Env {
    /// Nothing was started.
    Nothing,
    /// One agent.
    Agent(Box<Consul>),
    /// A cluster.
    Cluster(Box<Cluster>),
}

impl Env {
    /// Start what `needs` asks for, saying so on `progress`.
    pub async fn start(needs: &Needs, progress: &Progress) -> Result<Env> {
        Ok(match needs {
            Needs::Nothing => Env::Nothing,
            Needs::Agent(options) => {
                progress.say("starting Consul");
                Env::Agent(Box::new(Consul::start_with(options.clone()).await?))
            }
            Needs::Cluster(spec) => {
                progress.say(format!(
                    "starting {} servers and {} client agents, waiting for a leader",
                    spec.servers, spec.clients
                ));
                Env::Cluster(Box::new(Cluster::start(spec.clone()).await?))
            }
        })
    }

    /// The agent; an error if the experiment did not ask for one.
    pub fn agent(&mut self) -> Result<&mut Consul> {
        match self {
            Env::Agent(consul) => Ok(consul),
            _ => Err(Error::Setting("this experiment needs one agent".into())),
        }
    }

    /// The cluster; an error if the experiment did not ask for one.
    pub fn cluster(&mut self) -> Result<&mut Cluster> {
        match self {
            Env::Cluster(cluster) => Ok(cluster),
            _ => Err(Error::Setting("this experiment needs a cluster".into())),
        }
    }

    /// `1.8.7 (docker)` of the (first) agent, when one was started.
    pub fn consul(&self) -> Option<String> {
        let agent = match self {
            Env::Nothing => return None,
            Env::Agent(consul) => consul,
            Env::Cluster(cluster) => cluster.servers().first()?,
        };
        Some(format!("{} ({})", agent.version(), agent.backend().name()))
    }
}

/// What an outcome gives the report.
pub trait Findings: Serialize {
    /// Its tables: by default one, of its [`figures`](Self::figures).
    fn tables(&self) -> Vec<Table> {
        vec![Table::figures(self.figures())]
    }
    /// Its figures as `(figure, value)` rows, for an outcome whose table is just that.
    fn figures(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// How each figure was measured, with the figures: markdown paragraphs.
    fn details(&self) -> String {
        String::new()
    }
    /// The invariants that did not hold (empty: all held).
    fn violations(&self) -> Vec<String> {
        Vec::new()
    }
    /// Its plot, if it has one.
    fn plot(&self) -> Option<Plot> {
        None
    }
    /// The Consul version it talked to, when it started its own agents ([`Needs::Nothing`]).
    fn consul(&self) -> Option<String> {
        None
    }
}

/// The one shape of an experiment: its settings run it once and return what it measured.
pub trait Experiment {
    /// What one run measured.
    type Outcome: Findings;

    /// Its title: the report's section and the progress line's stage.
    fn title(&self) -> String;

    /// What to start before it runs: one agent unless it says otherwise.
    fn needs(&self) -> Result<Needs> {
        Needs::agent()
    }

    /// Run once on `env`, just started from [`needs`](Self::needs), starting processes
    /// through `launcher`, telling `progress` what it waits for.
    fn run_on(
        &self,
        launcher: &Launcher,
        env: &mut Env,
        progress: &Progress,
    ) -> impl Future<Output = Result<Self::Outcome>>;

    /// Start what it needs, then run once.
    fn run(
        &self,
        launcher: &Launcher,
        progress: &Progress,
    ) -> impl Future<Output = Result<Self::Outcome>> {
        async move {
            let mut env = Env::start(&self.needs()?, progress).await?;
            self.run_on(launcher, &mut env, progress).await
        }
    }
}

/// An experiment that starts its own agents (several, or two datacenters): the runner starts
/// nothing for it ([`Needs::Nothing`]) and it names the Consul it talked to
/// ([`Findings::consul`]). Implementing this implements [`Experiment`].
pub trait OnItsOwn {
    /// What one run measured.
    type Outcome: Findings;

    /// Its title: the report's section and the progress line's stage.
    fn title(&self) -> String;

    /// Start its agents and processes through `launcher`, run once, telling `progress` what
    /// it waits for.
    fn run_alone(
        &self,
        launcher: &Launcher,
        progress: &Progress,
    ) -> impl Future<Output = Result<Self::Outcome>>;
}

impl<T: OnItsOwn> Experiment for T {
    type Outcome = T::Outcome;

    fn title(&self) -> String {
        OnItsOwn::title(self)
    }

    fn needs(&self) -> Result<Needs> {
        Ok(Needs::Nothing)
    }

    fn run_on(
        &self,
        launcher: &Launcher,
        _: &mut Env,
        progress: &Progress,
    ) -> impl Future<Output = Result<Self::Outcome>> {
        self.run_alone(launcher, progress)
    }
}

/// One experiment as run: what it found, or why it could not finish.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    /// Its title.
    pub title: String,
    /// What it ran on, in words (empty: it started its own).
    pub setup: String,
    /// `1.8.7 (docker)` of its agent, when the runner started one.
    pub consul: Option<String>,
    /// Its tables (the markdown's; the JSON has `outcome`).
    #[serde(skip)]
    pub tables: Vec<Table>,
    /// How each figure was measured.
    pub details: String,
    /// The invariants that did not hold, and the error if it failed.
    pub violations: Vec<String>,
    /// Everything it measured, as JSON (`None` if it failed).
    pub outcome: Option<serde_json::Value>,
    /// Why it could not run to the end.
    pub error: Option<String>,
    /// Its wall time, seconds.
    pub wall_time: f64,
    /// Its plot.
    #[serde(skip)]
    pub plot: Option<Plot>,
}

/// An experiment with its settings, behind a pointer: what a [`Suite`] hands the runner.
pub trait Plan {
    /// Its title.
    fn title(&self) -> String;
    /// Run it, recording what it found or why it failed.
    fn record<'a>(
        &'a self,
        launcher: &'a Launcher,
        progress: &'a Progress,
    ) -> LocalBoxFuture<'a, Recorded>;
}

impl<E: Experiment> Plan for E {
    fn title(&self) -> String {
        Experiment::title(self)
    }

    fn record<'a>(
        &'a self,
        launcher: &'a Launcher,
        progress: &'a Progress,
    ) -> LocalBoxFuture<'a, Recorded> {
        Box::pin(async move {
            let title = Experiment::title(self);
            let started = Instant::now();
            let mut setup = String::new();
            let mut consul = None;
            let result = async {
                let needs = self.needs()?;
                setup = needs.describe();
                let mut env = Env::start(&needs, progress).await?;
                consul = env.consul();
                self.run_on(launcher, &mut env, progress).await
            }
            .await;
            let wall_time = started.elapsed().as_secs_f64();
            match result {
                Ok(outcome) => Recorded {
                    title,
                    setup,
                    consul: consul.or_else(|| outcome.consul()),
                    tables: outcome.tables(),
                    details: outcome.details(),
                    violations: outcome.violations(),
                    // Derived `Serialize` on plain data cannot fail; should it, it says so.
                    outcome: Some(serde_json::to_value(&outcome).unwrap_or_else(|e| {
                        serde_json::Value::String(format!("(the outcome as JSON failed: {e})"))
                    })),
                    error: None,
                    wall_time,
                    plot: outcome.plot(),
                },
                Err(e) => {
                    tracing::error!(experiment = %title, error = %e, "experiment failed");
                    Recorded {
                        title,
                        setup,
                        consul,
                        tables: Vec::new(),
                        details: String::new(),
                        violations: vec![format!("error: {e}")],
                        outcome: None,
                        error: Some(format!("{e:#}")),
                        wall_time,
                        plot: None,
                    }
                }
            }
        })
    }
}

/// A subcommand that runs experiments: its clap arguments, turned into plans.
pub trait Suite {
    /// The subcommand's name, which names the report's files.
    fn name(&self) -> &'static str;
    /// The report's title.
    fn title(&self) -> String;
    /// The experiments to run, in order (an error for arguments that make no sense).
    fn plans(&self) -> Result<Vec<Box<dyn Plan>>>;
    /// A closing paragraph: how the figures were taken, common to every experiment.
    fn method(&self) -> &'static str {
        ""
    }
}

/// The `--only` selection of a suite: `only` in `all`'s order without repeats, or `all` when
/// it is empty.
pub fn chosen<T: Ord + Clone>(only: &[T], all: &[T]) -> Vec<T> {
    let mut chosen = if only.is_empty() {
        all.to_vec()
    } else {
        only.to_vec()
    };
    chosen.sort();
    chosen.dedup();
    chosen
}

/// Everything one subcommand measured: the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Machine, date, Consul and command line.
    pub header: Header,
    /// The experiments, in order.
    pub experiments: Vec<Recorded>,
    /// Wall time of the whole run, seconds.
    pub wall_time: f64,
    /// The closing paragraph.
    #[serde(skip)]
    pub method: String,
}

impl Report {
    /// True when every experiment ran and every invariant held.
    pub fn all_held(&self) -> bool {
        self.experiments
            .iter()
            .all(|e| e.error.is_none() && e.violations.is_empty())
    }

    /// The report as markdown: the header, a summary, then one section per experiment
    /// (`plots` are the SVG files' names, one per plot, in order).
    pub fn markdown(&self, plots: &[String]) -> String {
        let mut out = self.header.markdown();
        if self.experiments.len() > 1 {
            let mut summary =
                Table::new(["experiment", "wall time (s)", "invariants"]).align_right([1]);
            for e in &self.experiments {
                summary.push([
                    e.title.clone(),
                    format!("{:.0}", e.wall_time),
                    held(&e.violations),
                ]);
            }
            out.push_str(&summary.markdown());
            out.push('\n');
        }
        let mut plots = plots.iter();
        for e in &self.experiments {
            out.push_str(&format!("### {}\n\n", e.title));
            if !e.setup.is_empty() {
                out.push_str(&format!("Ran on: {}.\n\n", e.setup));
            }
            for table in &e.tables {
                out.push_str(&table.markdown());
                out.push('\n');
            }
            if e.plot.is_some()
                && let Some(file) = plots.next()
            {
                out.push_str(&format!("![{}]({file})\n\n", e.title));
            }
            if !e.details.is_empty() {
                out.push_str(e.details.trim_end());
                out.push_str("\n\n");
            }
            out.push_str(&format!(
                "Invariants: {}. Wall time {:.0} s.\n\n",
                held(&e.violations),
                e.wall_time
            ));
        }
        if !self.method.is_empty() {
            out.push_str(&self.method);
            out.push_str("\n\n");
        }
        out.push_str(&format!("Run wall time: {:.0} s.\n", self.wall_time));
        out
    }
}

fn held(violations: &[String]) -> String {
    if violations.is_empty() {
        "all held".into()
    } else {
        format!("**broken**: {}", violations.join("; "))
    }
}

/// Run `suite`'s experiments one after the other, each recorded even if another fails, with
/// progress on stderr; print the markdown, write `<name>.md`, `<name>.json` and (one per plot)
/// `<name>.svg` into `out`. Success only when every experiment ran and every invariant held.
pub async fn run(suite: &dyn Suite, launcher: &Launcher, out: &Path) -> anyhow::Result<ExitCode> {
    let plans = suite.plans()?;
    let began = SystemTime::now();
    let started = Instant::now();
    let progress = Progress::for_stderr();
    let mut experiments = Vec::with_capacity(plans.len());
    for (i, plan) in plans.iter().enumerate() {
        progress.stage(format!("[{}/{}] {}", i + 1, plans.len(), plan.title()));
        experiments.push(plan.record(launcher, &progress).await);
    }
    progress.finish();
    let consul = experiments
        .iter()
        .find_map(|e| e.consul.clone())
        .unwrap_or_else(|| provision::CONSUL_VERSION.to_owned());
    let report = Report {
        header: Header {
            title: suite.title(),
            machine: report::machine(),
            date: report::rfc3339(began),
            consul,
            command: report::command_line(),
        },
        experiments,
        wall_time: started.elapsed().as_secs_f64(),
        method: suite.method().to_owned(),
    };
    let written = write(&report, suite.name(), out)?;
    println!("{}", written.markdown);
    for path in written.files {
        println!("Wrote {}", path.display());
    }
    Ok(if report.all_held() {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: some experiment failed or some invariant did not hold (see the report)");
        ExitCode::FAILURE
    })
}

/// `title` as a file name's part: lower case letters and digits, words joined by `-`.
fn slug(title: &str) -> String {
    title
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// What [`write()`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The markdown.
    pub markdown: String,
    /// The files, markdown first.
    pub files: Vec<PathBuf>,
}

/// Write `report` into `dir` as `<name>.md`, `<name>.json` and its plots: `<name>.svg`, or
/// `<name>-<experiment>.svg` each when it has several (`cluster-c-the-leader-is-killed.svg`).
pub fn write(report: &Report, name: &str, dir: &Path) -> Result<Written> {
    let failed = |path: &Path, e: std::io::Error| Error::Report {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    let plotted: Vec<&Recorded> = report
        .experiments
        .iter()
        .filter(|e| e.plot.is_some())
        .collect();
    let svgs: Vec<String> = plotted
        .iter()
        .map(|e| match plotted.len() {
            1 => format!("{name}.svg"),
            _ => format!("{name}-{}.svg", slug(&e.title)),
        })
        .collect();
    let plots = plotted.iter().filter_map(|e| e.plot.as_ref());
    let markdown = report.markdown(&svgs);
    let md = dir.join(format!("{name}.md"));
    std::fs::write(&md, &markdown).map_err(|e| failed(&md, e))?;
    let json = dir.join(format!("{name}.json"));
    report::write_json(&json, report).map_err(|e| failed(&json, e))?;
    let mut files = vec![md, json];
    for (plot, file) in plots.zip(&svgs) {
        let path = dir.join(file);
        plot.svg(&path).map_err(|e| failed(&path, e))?;
        files.push(path);
    }
    Ok(Written { markdown, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Found(u32);

    impl Findings for Found {
        fn tables(&self) -> Vec<Table> {
            let mut t = Table::new(["n"]);
            t.push([self.0.to_string()]);
            vec![t]
        }
        fn violations(&self) -> Vec<String> {
            if self.0 > 1 {
                vec!["too many".into()]
            } else {
                Vec::new()
            }
        }
        fn plot(&self) -> Option<Plot> {
            (self.0 > 1).then(|| Plot {
                title: "counted".into(),
                x: report::Axis::linear("n"),
                y: report::Axis::linear("n"),
                series: vec![report::Series {
                    label: "n".into(),
                    color: report::PALETTE[0],
                    mark: report::Mark::Dots(vec![(1.0, f64::from(self.0))]),
                }],
            })
        }
    }

    struct Counts(u32);

    impl Experiment for Counts {
        type Outcome = Found;
        fn needs(&self) -> Result<Needs> {
            Ok(Needs::Nothing)
        }
        fn title(&self) -> String {
            format!("count {}", self.0)
        }
        async fn run_on(&self, _: &Launcher, env: &mut Env, p: &Progress) -> Result<Found> {
            p.say("counting");
            match self.0 {
                0 => Err(env.agent().err().unwrap_or(Error::Setting("no".into()))),
                n => Ok(Found(n)),
            }
        }
    }

    #[tokio::test]
    async fn the_runner_records_findings_failures_and_files() {
        let launcher = Launcher::testbed("testbed");
        let progress = Progress::hidden();
        let mut experiments = Vec::new();
        for n in [1, 2, 0] {
            experiments.push(Counts(n).record(&launcher, &progress).await);
        }
        assert!(experiments[0].violations.is_empty());
        assert_eq!(experiments[1].violations, ["too many"]);
        assert!(
            experiments[2]
                .error
                .as_deref()
                .unwrap()
                .contains("one agent")
        );
        let report = Report {
            header: Header {
                title: "Counting".into(),
                machine: report::machine(),
                date: report::rfc3339(SystemTime::now()),
                consul: "1.8.7".into(),
                command: "testbed count".into(),
            },
            experiments,
            wall_time: 1.0,
            method: "Counted by hand.".into(),
        };
        assert!(!report.all_held());
        let dir = std::env::temp_dir().join(format!("testbed-runner-{}", std::process::id()));
        let written = write(&report, "count", &dir).unwrap();
        let md = &written.markdown;
        assert!(md.starts_with("## Counting\n\n- Machine: "), "{md}");
        assert!(md.contains("- Command: `testbed count`"), "{md}");
        assert!(
            md.contains("| count 2 | 0 | **broken**: too many |"),
            "{md}"
        );
        assert!(md.contains("### count 1\n\n| n |\n|---|\n| 1 |\n"), "{md}");
        assert!(md.contains("Counted by hand."), "{md}");
        let names: Vec<_> = written
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["count.md", "count.json", "count.svg"]);
        assert!(md.contains("![count 2](count.svg)"), "{md}");
        assert_eq!(slug("c. the leader is killed"), "c-the-leader-is-killed");
        let json = std::fs::read_to_string(dir.join("count.json")).unwrap();
        assert!(json.contains("\"machine\""), "{json}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
