//! Turning experiment results into what a person reads: a markdown table for the terminal
//! and the README, a JSON file for tools, and an SVG plot of measured removal times against
//! each setting's window.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use plotters::prelude::*;

use crate::{
    deregistration::{Report, by_cell},
    error::{Error, Result},
};

/// `SystemTime` as RFC 3339 UTC with seconds, e.g. `2026-11-25T13:32:04Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn signed_ms(x: f64) -> String {
    format!("{x:+.1}")
}

/// The deregistration report as markdown.
pub fn deregistration_markdown(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.model;
    let _ = writeln!(
        out,
        "### Deregistration of a SIGKILLed service: Consul {} ({}), {}\n",
        report.consul_version, report.backend, report.date
    );
    let _ = writeln!(
        out,
        "Reaper every {} (`CheckReapInterval`), minimum delay {} (`CheckDeregisterIntervalMin`), \
         from {}. Reaper phase from {}.\n",
        consul_api::GoDuration(m.reap_interval),
        consul_api::GoDuration(m.min_deregister),
        report.model_source,
        report.anchor_source
    );
    out.push_str(
        "| DeregisterCriticalServiceAfter | applied | check interval | trial | kill→critical (s) | critical→removed (s) | kill→removed (s) | model window, critical→removed (s) | prediction error (ms): from agent start / from earlier removals |\n",
    );
    out.push_str("|---|---|---|---|---:|---:|---:|---|---:|\n");
    for (_, trials) in by_cell(&report.trials) {
        for t in trials {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | ({:.0}, {:.0}]{} | {} / {} |",
                t.setting,
                t.effective,
                t.interval,
                t.trial,
                t.kill_to_critical,
                t.critical_to_removed,
                t.kill_to_removed,
                t.critical_window.lo,
                t.critical_window.hi,
                if t.in_window { "" } else { " **outside**" },
                signed_ms(t.error_from_start_ms),
                t.error_from_earlier_ms
                    .map(signed_ms)
                    .unwrap_or_else(|| "–".into()),
            );
        }
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "{} trials, {} inside their window. Largest prediction error: {:.1} ms from the agent's start{}.",
        report.trials.len(),
        if report.all_in_window {
            "all"
        } else {
            "NOT all"
        },
        report.max_error_from_start_ms,
        report
            .max_error_from_earlier_ms
            .map(|e| format!(", {e:.1} ms from earlier removals"))
            .unwrap_or_default()
    );
    if let Some(c) = &report.contrast {
        let _ = writeln!(
            out,
            "Contrast: on {} the server deregistered itself and Consul no longer listed it after {:.1} ms (exit code {}).",
            c.signal,
            c.removed_after_ms,
            c.exit_code.map_or("none".into(), |c| c.to_string())
        );
    }
    let _ = writeln!(out, "Sweep wall time: {:.0} s.", report.wall_time);
    out
}

/// Why removal takes what it takes, in three sentences.
pub fn explanation(report: &Report) -> String {
    let m = &report.model;
    format!(
        "Why: the agent raises any DeregisterCriticalServiceAfter below {min} to {min} (its log says \
         \"has deregister interval below minimum\"), and removes a service only when its reaper, \
         which wakes every {reap} from the agent's start, finds the check critical for longer than \
         that. So a 30s setting removes a dead service between 60 and 90 s after its check turns \
         critical, which itself happens up to one check interval after the crash: the seed \
         article's \"about 80 seconds\". Knowing the reaper's phase, the exact tick is predictable.",
        min = consul_api::GoDuration(m.min_deregister),
        reap = consul_api::GoDuration(m.reap_interval),
    )
}

/// Write `name.json` and `name.md` into `dir`; returns their paths.
pub fn write_json_and_markdown(
    dir: &Path,
    name: &str,
    value: &impl serde::Serialize,
    markdown: &str,
) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Report {
        path: json.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&json, text)?;
    let md = dir.join(format!("{name}.md"));
    std::fs::write(&md, markdown)?;
    Ok((json, md))
}

/// Plot critical→removed of every trial against its window, as SVG.
pub fn deregistration_svg(report: &Report, path: &Path) -> Result<()> {
    let plot_err = |e: &dyn std::fmt::Display| Error::Report {
        path: path.to_owned(),
        reason: format!("cannot draw: {e}"),
    };
    let cells = by_cell(&report.trials);
    let mut settings: Vec<consul_api::GoDuration> = cells.keys().map(|(s, _)| *s).collect();
    settings.dedup();
    let intervals: Vec<consul_api::GoDuration> = {
        let mut v: Vec<_> = cells.keys().map(|(_, i)| *i).collect();
        v.sort();
        v.dedup();
        v
    };
    let y_max = report
        .trials
        .iter()
        .map(|t| t.critical_window.hi.max(t.critical_to_removed))
        .fold(60.0, f64::max)
        + 10.0;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let n = settings.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Consul {}: check critical -> service removed, by DeregisterCriticalServiceAfter",
                report.consul_version
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..(n - 0.5), 0.0..y_max)
        .map_err(|e| plot_err(&e))?;
    let labels = settings.clone();
    chart
        .configure_mesh()
        .x_labels(settings.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < labels.len() {
                format!("{}", labels[i as usize])
            } else {
                String::new()
            }
        })
        .x_desc("DeregisterCriticalServiceAfter (as registered)")
        .y_desc("seconds from critical to removed")
        .disable_x_mesh()
        .draw()
        .map_err(|e| plot_err(&e))?;
    let band = RGBColor(180, 205, 240);
    for (i, setting) in settings.iter().enumerate() {
        let Some(t) = report.trials.iter().find(|t| t.setting == *setting) else {
            continue;
        };
        let x = i as f64;
        let w = &t.critical_window;
        let series = chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x - 0.35, w.lo), (x + 0.35, w.hi)],
                band.mix(0.6).filled(),
            )))
            .map_err(|e| plot_err(&e))?;
        if i == 0 {
            series
                .label("model window (max(setting, 1m), +30 s]")
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], band.filled()));
        }
        let naive = setting.as_duration().as_secs_f64();
        let series = chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x - 0.4, naive), (x + 0.4, naive)],
                RED.stroke_width(2),
            )))
            .map_err(|e| plot_err(&e))?;
        if i == 0 {
            series
                .label("the setting itself (what one expects)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], RED.stroke_width(2)));
        }
    }
    let palette = [BLUE, BLACK, GREEN, MAGENTA];
    for (k, interval) in intervals.iter().enumerate() {
        let color = palette[k % palette.len()];
        let spread = (k as f64 - (intervals.len() as f64 - 1.0) / 2.0) * 0.15;
        let points: Vec<(f64, f64)> = report
            .trials
            .iter()
            .filter(|t| t.interval == *interval)
            .filter_map(|t| {
                settings
                    .iter()
                    .position(|s| *s == t.setting)
                    .map(|i| (i as f64 + spread, t.critical_to_removed))
            })
            .collect();
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 5, color.filled())),
            )
            .map_err(|e| plot_err(&e))?
            .label(format!("measured, check every {interval}"))
            .legend(move |(x, y)| Circle::new((x + 7, y), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(&e))?;
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_613_524)),
            "2026-11-25T13:32:04Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    fn synthetic() -> Report {
        use crate::{deregistration::Trial, model::ReaperModel};
        use consul_api::GoDuration;
        let model = ReaperModel::CONSUL;
        let trials = [
            (30, 1, 81.2),
            (30, 5, 66.0),
            (90, 1, 104.3),
            (120, 5, 140.0),
        ]
        .iter()
        .enumerate()
        .map(|(i, (setting, interval, c2r))| {
            let setting = Duration::from_secs(*setting);
            Trial {
                service_id: format!("t{i}"),
                setting: GoDuration(setting),
                effective: GoDuration(model.effective(setting)),
                interval: GoDuration::from_secs(*interval),
                trial: 1,
                killed_at: 1.0,
                critical_at: 1.5,
                removed_at: 1.5 + c2r,
                kill_to_critical: 0.5,
                critical_to_removed: *c2r,
                kill_to_removed: 0.5 + c2r,
                critical_window: model.critical_window(setting),
                kill_window: model.kill_window(
                    setting,
                    Duration::from_secs(*interval),
                    Duration::from_secs(1),
                ),
                in_window: true,
                predicted_from_start: 1.5 + c2r - 0.007,
                error_from_start_ms: 7.0,
                predicted_from_earlier: None,
                error_from_earlier_ms: None,
                agent_logged_critical: None,
                agent_logged_removed: None,
            }
        })
        .collect();
        Report {
            date: "2026-11-25T00:00:00Z".into(),
            consul_version: "1.8.7".into(),
            backend: "docker",
            model,
            model_source: "test",
            reaper_anchor: 0.0,
            anchor_source: "test".into(),
            trials,
            contrast: None,
            reaper: None,
            max_error_from_start_ms: 7.0,
            max_error_from_earlier_ms: None,
            all_in_window: true,
            wall_time: 1.0,
        }
    }

    #[test]
    fn markdown_lists_every_trial_with_its_window() {
        let md = deregistration_markdown(&synthetic());
        assert_eq!(md.matches("\n| ").count(), 5, "header + 4 trials:\n{md}");
        assert!(
            md.contains("| 30s | 1m | 1s | 1 | 0.50 | 81.20 | 81.70 | (60, 90] | +7.0 / – |"),
            "{md}"
        );
        assert!(md.contains("all inside their window"));
    }

    #[test]
    fn svg_plot_is_written() {
        let dir = std::env::temp_dir().join(format!("testbed-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.svg");
        deregistration_svg(&synthetic(), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("<circle"), "trials are drawn");
        assert!(svg.contains("1m30s"), "settings label the axis");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
