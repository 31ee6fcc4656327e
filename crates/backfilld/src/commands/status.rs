//! `status [NAME] [--json] [--watch]`: every job's progress as a table drawn to the
//! terminal's width, or JSON.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use backfill_queue::{JobState, JobStatus};
use comfy_table::{ColumnConstraint, Width};
use sqlx::PgPool;

use super::CliFailure;
use crate::log_escape::escape_controls;

/// `status` once: the table, or JSON with `--json`.
pub async fn print(pool: &PgPool, name: Option<&str>, json: bool) -> Result<(), CliFailure> {
    let statuses = fetch_status(pool, name).await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &statuses)
            .map_err(|e| CliFailure::Fatal(e.into()))?;
        let _ = writeln!(out);
    } else {
        let _ = write!(out, "{}", render_status_table(&statuses));
    }
    Ok(())
}

/// The status of every job, or of the named one (which must exist).
async fn fetch_status(pool: &PgPool, name: Option<&str>) -> Result<Vec<JobStatus>, CliFailure> {
    let statuses = JobStatus::fetch(pool, name).await?;
    match name {
        Some(name) if statuses.is_empty() => {
            Err(CliFailure::Usage(format!("no backfill job named '{name}'")))
        }
        _ => Ok(statuses),
    }
}

/// `status --watch`: redraws the status every `interval` until every job shown has
/// finished (after drawing it once more) or Ctrl-C. On a terminal each frame replaces the
/// last; otherwise frames follow each other, each under its own header line.
pub async fn watch(
    pool: &PgPool,
    name: Option<&str>,
    json: bool,
    interval: Duration,
) -> Result<(), CliFailure> {
    let terminal = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut interrupted => return Ok(()),
        }
        let statuses = fetch_status(pool, name).await?;
        let mut out = std::io::stdout().lock();
        if json {
            serde_json::to_writer(&mut out, &statuses).map_err(|e| CliFailure::Fatal(e.into()))?;
            let _ = writeln!(out);
        } else {
            if terminal {
                let _ = write!(out, "\x1b[H\x1b[2J"); // cursor home, clear screen
            }
            let _ = writeln!(
                out,
                "backfilld status at {}, every {} until the jobs end (Ctrl-C to stop)",
                chrono::Local::now().format("%Y-%m-%d %H:%M:%S"),
                humantime::format_duration(interval)
            );
            let _ = write!(out, "{}", render_status_table(&statuses));
            if !terminal {
                let _ = writeln!(out);
            }
        }
        let _ = out.flush();
        let finished = |s: &JobStatus| s.state.parse().is_ok_and(JobState::is_finished);
        if statuses.iter().all(finished) {
            return Ok(());
        }
    }
}

/// Width of the status table when stdout is no terminal (a pipe, a file) and `COLUMNS`
/// is not set: what a terminal has by default.
const FALLBACK_WIDTH: u16 = 80;

/// The width to draw in: `COLUMNS` when set, else the terminal's, else 80.
fn output_width() -> u16 {
    let columns = std::env::var("COLUMNS").ok();
    columns
        .and_then(|c| c.trim().parse().ok())
        .filter(|w| *w > 0)
        .or_else(|| {
            std::io::stdout()
                .is_terminal()
                .then(|| comfy_table::Table::new().width())
                .flatten()
        })
        .unwrap_or(FALLBACK_WIDTH)
}

/// A borderless table in `width` columns (cells wrap when the content is wider),
/// with control characters in cells escaped so no value forges a line or drives the
/// terminal.
fn table(width: u16, header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_width(width)
        .set_header(header.iter().copied());
    for column in table.column_iter_mut() {
        column.set_padding((0, 1));
    }
    table
}

/// A cell showing `text` with its control characters escaped (`\n`, `\u{1b}`).
fn cell(text: &str) -> comfy_table::Cell {
    comfy_table::Cell::new(escape_controls(text))
}

/// A duration in at most two units (`2h05m`, `4m10s`, `42s`): narrow enough for a table.
fn short_duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    match seconds {
        s if s >= 86_400 => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3_600),
        s if s >= 3_600 => format!("{}h{:02}m", s / 3_600, s % 3_600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The status of `statuses` for a terminal of the current width (see [`output_width`]).
pub fn render_status_table(statuses: &[JobStatus]) -> String {
    render_status_table_in(statuses, output_width())
}

/// A readable table in `width` columns: one row per job with a progress bar, then the
/// last error of each job that has one.
fn render_status_table_in(statuses: &[JobStatus], width: u16) -> String {
    let mut jobs = table(
        width,
        &[
            "JOB", "STATE", "PROGRESS", "ROWS", "ROWS/S", "ETA", "BATCH", "THROTTLE", "FAILED",
        ],
    );
    // The state and the progress bar never wrap (the job name and throttle reason do):
    // "succeeded" and "##########  100.0%", each with its padding.
    for (index, least) in [(1, 10), (2, 18)] {
        if let Some(column) = jobs.column_mut(index) {
            column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(least)));
        }
    }
    for s in statuses {
        let percent = s.percent.unwrap_or(0.0);
        let filled = ((percent / 100.0) * 10.0).round().clamp(0.0, 10.0) as usize;
        let bar = format!(
            "{}{} {:>5.1}%",
            "#".repeat(filled),
            ".".repeat(10 - filled),
            percent
        );
        let throttle = match (&s.throttle_state, &s.throttle_reason) {
            (Some(state), Some(reason)) => format!("{state} ({reason})"),
            (Some(state), None) => state.clone(),
            _ => "-".to_string(),
        };
        jobs.add_row(vec![
            cell(&s.name),
            cell(&s.state),
            cell(&bar),
            cell(&s.rows_done.to_string()),
            cell(
                &s.rows_per_second
                    .map_or("-".to_string(), |r| format!("{r:.0}")),
            ),
            // The forecast counts throttled time; the batch-speed ETA is the fallback.
            cell(
                &forecast_seconds(s)
                    .or(s.eta_seconds)
                    .map_or("-".to_string(), short_duration),
            ),
            cell(&s.batch_size.map_or("-".to_string(), |b| b.to_string())),
            cell(&throttle),
            cell(&s.failed_rows.to_string()),
        ]);
    }
    let mut out = format!("{}\n", jobs.trim_fmt());
    out.push_str(&render_steering_table(statuses, width));
    let errors: Vec<&JobStatus> = statuses.iter().filter(|s| s.last_error.is_some()).collect();
    if !errors.is_empty() {
        let mut last_errors = table(width, &["JOB", "LAST ERROR"]);
        for s in errors {
            last_errors.add_row(vec![
                cell(&s.name),
                cell(s.last_error.as_deref().unwrap_or_default()),
            ]);
        }
        out.push_str(&format!("\n{}\n", last_errors.trim_fmt()));
    }
    let undo: Vec<&JobStatus> = statuses.iter().filter(|s| s.undo_rows.is_some()).collect();
    if !undo.is_empty() {
        let mut kept = table(width, &["JOB", "UNDO ROWS", "UNDO BYTES"]);
        for s in undo {
            kept.add_row(vec![
                cell(&s.name),
                cell(&s.undo_rows.unwrap_or(0).to_string()),
                cell(&s.undo_bytes.unwrap_or(0).to_string()),
            ]);
        }
        out.push_str(&format!("\n{}\n", kept.trim_fmt()));
    }
    out
}

/// Seconds until the job's forecast finish (rows done over the recent window, throttled
/// time included), if it has one and is not finished.
fn forecast_seconds(s: &JobStatus) -> Option<f64> {
    let finish = s.forecast_finish.filter(|_| s.finished_at.is_none())?;
    Some((finish - chrono::Utc::now()).num_milliseconds() as f64 / 1000.0)
}

/// Run windows and deadlines of the jobs that have them (issue 16): empty when none has.
fn render_steering_table(statuses: &[JobStatus], width: u16) -> String {
    let steered: Vec<&JobStatus> = statuses
        .iter()
        .filter(|s| s.finish_by.is_some() || s.run_windows.as_ref().is_some_and(|w| !w.is_empty()))
        .collect();
    if steered.is_empty() {
        return String::new();
    }
    let mut rows = table(
        width,
        &[
            "JOB",
            "RUN WINDOWS",
            "FINISH BY",
            "FORECAST FINISH",
            "DEADLINE",
        ],
    );
    let at = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or("-".to_string(), |t| {
            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
        })
    };
    for s in steered {
        let windows = match &s.run_windows {
            Some(windows) if !windows.is_empty() => format!(
                "{} ({})",
                windows.join("; "),
                if s.in_window { "open" } else { "closed" }
            ),
            _ => "any time".to_string(),
        };
        let deadline = match s.late {
            Some(true) => "LATE",
            Some(false) => "on time",
            None => "-",
        };
        rows.add_row(vec![
            cell(&s.name),
            cell(&windows),
            cell(&at(s.finish_by)),
            cell(&at(s.forecast_finish)),
            cell(deadline),
        ]);
    }
    format!("\n{}\n", rows.trim_fmt())
}
