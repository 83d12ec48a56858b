//! The one progress reporter of every experiment: what runs (a stage: which experiment, `2/5`),
//! what it waits for (a step), and a count where there is one (`3/8 removed`). On a terminal it
//! is an indicatif bar; elsewhere (a CI log, `| tee`) a plain line on stderr at each step and
//! at least every [`HEARTBEAT`] while a step lasts; in tests it can be silent.

use std::{
    fmt::Display,
    io::IsTerminal as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};

/// The longest a plain-line reporter stays silent while a step lasts.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// Tells a person what an experiment is doing; cheap to share by reference.
pub struct Progress {
    inner: Inner,
}

enum Inner {
    Bar(ProgressBar),
    Lines(Arc<Lines>, Option<JoinHandle<()>>),
    Hidden,
}

/// The state a plain-line reporter prints.
struct Lines {
    started: Instant,
    state: Mutex<State>,
    stop: AtomicBool,
}

#[derive(Default)]
struct State {
    stage: String,
    step: String,
    count: Option<(u64, u64, String)>,
    printed: Option<Instant>,
}

impl Lines {
    fn line(&self, state: &State) -> String {
        let t = self.started.elapsed().as_secs();
        let mut line = format!("[{:02}:{:02}:{:02}]", t / 3600, t / 60 % 60, t % 60);
        if !state.stage.is_empty() {
            line.push(' ');
            line.push_str(&state.stage);
            line.push(':');
        }
        if let Some((pos, len, what)) = &state.count {
            line.push_str(&format!(" {pos}/{len} {what},"));
        }
        line.push(' ');
        line.push_str(&state.step);
        line
    }

    fn print(&self, state: &mut State) {
        eprintln!("{}", self.line(state));
        state.printed = Some(Instant::now());
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        if let Ok(mut state) = self.state.lock() {
            change(&mut state);
            self.print(&mut state);
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            Inner::Bar(_) => "Progress::Bar",
            Inner::Lines(..) => "Progress::Lines",
            Inner::Hidden => "Progress::Hidden",
        })
    }
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn for_stderr() -> Progress {
        if std::io::stderr().is_terminal() {
            Progress::bar()
        } else {
            Progress::lines()
        }
    }

    /// An indicatif bar on stderr.
    pub fn bar() -> Progress {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {msg}")
        {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress {
            inner: Inner::Bar(bar),
        }
    }

    /// Plain lines on stderr: one per step, and the current one again every [`HEARTBEAT`].
    pub fn lines() -> Progress {
        let lines = Arc::new(Lines {
            started: Instant::now(),
            state: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let beat = Arc::clone(&lines);
        let heart = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                while !beat.stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(Duration::from_millis(500));
                    let Ok(mut state) = beat.state.lock() else {
                        return;
                    };
                    if state.printed.is_some_and(|t| t.elapsed() >= HEARTBEAT)
                        && !beat.stop.load(Ordering::Relaxed)
                    {
                        beat.print(&mut state);
                    }
                }
            })
            .ok();
        Progress {
            inner: Inner::Lines(lines, heart),
        }
    }

    /// Says nothing (tests).
    pub fn hidden() -> Progress {
        Progress {
            inner: Inner::Hidden,
        }
    }

    /// What runs now (`[2/5] c. the leader is killed`); resets the count.
    pub fn stage(&self, stage: impl Display) {
        let stage = stage.to_string();
        match &self.inner {
            Inner::Bar(bar) => {
                bar.set_prefix(stage);
                bar.set_message("");
            }
            Inner::Lines(lines, _) => {
                if let Ok(mut state) = lines.state.lock() {
                    state.stage = stage;
                    state.count = None;
                    state.step.clear();
                }
            }
            Inner::Hidden => {}
        }
    }

    /// What it does or waits for now.
    pub fn say(&self, step: impl Display) {
        let step = step.to_string();
        match &self.inner {
            Inner::Bar(bar) => bar.set_message(step),
            Inner::Lines(lines, _) => lines.update(|s| s.step = step),
            Inner::Hidden => {}
        }
    }

    /// A count: `pos` of `len` `what` (`3/8 removed`), and the step.
    pub fn count(&self, pos: u64, len: u64, what: &str, step: impl Display) {
        let step = step.to_string();
        match &self.inner {
            Inner::Bar(bar) => bar.set_message(format!("{pos}/{len} {what}, {step}")),
            Inner::Lines(lines, _) => lines.update(|s| {
                s.count = Some((pos, len, what.to_owned()));
                s.step = step;
            }),
            Inner::Hidden => {}
        }
    }

    /// Done: the bar is cleared, the heartbeat stops.
    pub fn finish(&self) {
        match &self.inner {
            Inner::Bar(bar) => bar.finish_and_clear(),
            Inner::Lines(lines, heart) => {
                lines.stop.store(true, Ordering::Relaxed);
                if let Some(h) = heart {
                    h.thread().unpark();
                }
            }
            Inner::Hidden => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
        if let Inner::Lines(_, heart) = &mut self.inner
            && let Some(h) = heart.take()
        {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_say_the_stage_the_count_and_the_step() {
        let lines = Lines {
            started: Instant::now(),
            state: Mutex::default(),
            stop: AtomicBool::new(false),
        };
        let state = State {
            stage: "[1/2] seed".into(),
            step: "waiting for Consul's reaper".into(),
            count: Some((3, 8, "removed".into())),
            printed: None,
        };
        assert_eq!(
            lines.line(&state),
            "[00:00:00] [1/2] seed: 3/8 removed, waiting for Consul's reaper"
        );
        let p = Progress::lines();
        p.stage("a");
        p.say("b");
        p.count(1, 2, "done", "c");
        drop(p);
        Progress::hidden().say("nothing");
    }
}
