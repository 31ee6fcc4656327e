//! `plan NAME`: a dry run of a job — pending rows, batches, a trial batch rolled back,
//! the expected duration.

use std::io::Write as _;
use std::time::{Duration, Instant};

use backfill_core::error_class::ErrorClass;
use backfill_core::impact::{ImpactController, START_RATE};
use backfill_dataplane::BatchTarget;
use backfill_queue::{Job, JobStatus, Phase};
use serde::Serialize;

use super::CliFailure;
use crate::database::Database;
use crate::health_monitor::health_probe;
use crate::settings::{ThrottleConfig, WorkerSections};

/// `plan`: the report, or JSON with `--json`; a failed trial batch fails the verb.
pub async fn print(
    settings: &WorkerSections,
    db: &Database,
    name: &str,
    exact: bool,
    json: bool,
) -> Result<(), CliFailure> {
    let report = plan(settings, db, name, exact).await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report).map_err(|e| CliFailure::Fatal(e.into()))?;
        let _ = writeln!(out);
    } else {
        let _ = write!(out, "{}", report.render());
    }
    if let Some(error) = report.trial_error {
        return Err(CliFailure::Fatal(anyhow::anyhow!(
            "the trial batch of job {name} failed: {error}"
        )));
    }
    Ok(())
}

/// What `backfilld plan` found out about a job; nothing in the database changed.
#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub job: String,
    pub table: String,
    pub key_column: String,
    pub state: String,
    pub phase: String,
    /// The checkpoint the job would continue after (`None`: from the first key).
    pub after_key: Option<String>,
    /// The planner's estimate of the rows still pending.
    pub estimated_pending_rows: Option<i64>,
    /// The exact count (`--exact` only).
    pub exact_pending_rows: Option<i64>,
    pub exact_count_seconds: Option<f64>,
    /// The job's first batch size (its `batch_size`, else `batch.size`).
    pub batch_size: u32,
    /// Batches of `batch_size` for the pending rows.
    pub batches: Option<u64>,
    /// The trial batch, run and rolled back.
    pub trial_keys: Option<usize>,
    pub trial_first_key: Option<String>,
    pub trial_last_key: Option<String>,
    pub trial_select_seconds: Option<f64>,
    pub trial_statement_seconds: Option<f64>,
    /// Rows the trial's statement wrote before the rollback.
    pub trial_rows_written: Option<u64>,
    /// For a job with keep_undo: the undo data it would keep for the pending rows, in bytes
    /// (old values measured on the trial keys, plus each row's storage overhead).
    pub undo_bytes_estimate: Option<u64>,
    /// Why the trial batch failed, if it did.
    pub trial_error: Option<String>,
    /// Its class (`row_level`, `transient`, `job_level`) and what a worker would do about it.
    pub trial_error_class: Option<&'static str>,
    pub trial_error_consequence: Option<&'static str>,
    /// The trial batch's speed, capped by the job's rows-per-second limit.
    pub expected_rows_per_second: Option<f64>,
    /// The job's rows-per-second limit (`max_rows_per_second`, else `throttle.max_rows_per_second`).
    pub max_rows_per_second: Option<f64>,
    /// Batch duration the throttle steers towards.
    pub target_batch_seconds: f64,
    /// Pending rows at the expected rate, on a healthy database (no lag holds).
    pub expected_seconds: Option<f64>,
    /// The least it takes while production is at work on the primary (`None` with sharing
    /// off): with the impact budget, the climb to the trial's speed and the rests that
    /// re-learn production's baseline (what production's latency allows on top is only
    /// known by running); with the duty cycle, the expected time over
    /// `throttle.busy_duty_cycle`.
    pub min_seconds_next_to_production: Option<f64>,
    /// How the job shares the primary with production: `impact_budget`, `duty_cycle`, or
    /// `None` with sharing off.
    pub next_to_production_by: Option<&'static str>,
    /// The throttle signals that would hold the job right now (reason labels, most severe
    /// first), each judged on its own by the health probe the worker runs.
    pub holding_signals: Vec<&'static str>,
    /// How long planning took.
    pub planning_seconds: f64,
    /// The job's deadline, and whether the expected duration from now fits it.
    pub finish_by: Option<chrono::DateTime<chrono::Utc>>,
    pub expected_finish: Option<chrono::DateTime<chrono::Utc>>,
    pub fits_deadline: Option<bool>,
    /// A job under way: its forecast from its recent rate, throttled time included.
    pub forecast_finish: Option<chrono::DateTime<chrono::Utc>>,
    /// Its run windows (`None`: any time) and whether one is open now.
    pub run_windows: Option<Vec<String>>,
    pub in_window: bool,
}

/// `backfilld plan NAME`: the job's pending rows (planner estimate, exact count with
/// `exact`), batches at its first batch size, one trial batch timed and rolled back, and
/// the duration to expect at that speed under the job's throttle settings.
pub async fn plan(
    settings: &WorkerSections,
    db: &Database,
    name: &str,
    exact: bool,
) -> Result<PlanReport, CliFailure> {
    let started = Instant::now();
    let job: Job = backfill_queue::Queue::new(db.control.clone())
        .job_named(name)
        .await?
        .ok_or_else(|| CliFailure::Usage(format!("no backfill job named '{name}'")))?;
    let throttle = crate::worker::throttle_settings(settings, &job);
    let definition = crate::worker::job_definition(&job);
    let fatal = |e: &dyn std::fmt::Display| CliFailure::Fatal(anyhow::anyhow!("job {name}: {e}"));
    let mut client = db.data.get().await.map_err(|e| fatal(&e))?;
    let target = BatchTarget::resolve(&mut client, &definition)
        .await
        .map_err(|e| fatal(&e))?;
    // Retry and verification passes re-walk the table from the start.
    let after = match job.phase {
        Phase::Scan => job.checkpoint.clone(),
        Phase::Retry | Phase::Verify => None,
    };
    let estimated_pending_rows = target
        .estimate_pending(&mut client, after.as_deref())
        .await
        .map_err(|e| fatal(&e))?;
    let (exact_pending_rows, exact_count_seconds) = if exact {
        let counting = Instant::now();
        let count = target
            .count_pending(&mut client, after.as_deref(), false)
            .await
            .map_err(|e| fatal(&e))?;
        (Some(count), Some(counting.elapsed().as_secs_f64()))
    } else {
        (None, None)
    };
    let batch_size = throttle.start_batch_size;
    let trial = target
        .trial_batch(&mut client, after.as_deref(), batch_size)
        .await;
    let pending = exact_pending_rows.or(estimated_pending_rows);
    let max_rows_per_second = throttle.max_rows_per_second;
    let expected_rows_per_second = trial.as_ref().ok().and_then(|trial| {
        let seconds = trial.duration().as_secs_f64();
        let speed = (trial.keys > 0 && seconds > 0.0).then(|| trial.keys as f64 / seconds)?;
        Some(max_rows_per_second.map_or(speed, |limit| speed.min(limit)))
    });
    let expected_seconds = match (pending, expected_rows_per_second) {
        (Some(0), _) => Some(0.0),
        (Some(pending), Some(rate)) => Some(pending as f64 / rate),
        _ => None,
    };
    let next_to_production = next_to_production(
        &settings.throttle,
        &throttle,
        pending,
        expected_rows_per_second,
        expected_seconds,
    );
    let trial_ok = trial.as_ref().ok();
    let holding_signals = signals_holding(settings, db, &throttle, job.id)
        .await
        .map_err(|e| fatal(&e))?;
    let status = JobStatus::fetch(&db.control, Some(&job.spec.name))
        .await?
        .into_iter()
        .next();
    let finish_by = status.as_ref().and_then(|s| s.finish_by);
    let expected_finish = expected_seconds.and_then(|seconds| {
        chrono::Duration::try_milliseconds((seconds * 1000.0) as i64)
            .map(|expected| chrono::Utc::now() + expected)
    });
    Ok(PlanReport {
        fits_deadline: finish_by
            .zip(expected_finish)
            .map(|(deadline, finish)| finish <= deadline),
        finish_by,
        expected_finish,
        forecast_finish: status
            .as_ref()
            .filter(|s| s.finished_at.is_none())
            .and_then(|s| s.forecast_finish),
        run_windows: status.as_ref().and_then(|s| s.run_windows.clone()),
        in_window: status.as_ref().is_none_or(|s| s.in_window),
        job: job.spec.name,
        table: target.table.clone(),
        key_column: target.key_column.clone(),
        state: job.state.to_string(),
        phase: job.phase.as_str().to_string(),
        after_key: after,
        estimated_pending_rows,
        exact_pending_rows,
        exact_count_seconds,
        batch_size,
        batches: pending.map(|rows| {
            u64::try_from(rows)
                .unwrap_or(0)
                .div_ceil(u64::from(batch_size))
        }),
        trial_keys: trial_ok.map(|t| t.keys),
        trial_first_key: trial_ok.and_then(|t| t.key_range.as_ref().map(|r| r.0.clone())),
        trial_last_key: trial_ok.and_then(|t| t.key_range.as_ref().map(|r| r.1.clone())),
        trial_select_seconds: trial_ok.map(|t| t.select.as_secs_f64()),
        trial_statement_seconds: trial_ok.map(|t| t.statement.as_secs_f64()),
        trial_rows_written: trial_ok.map(|t| t.rows_written),
        undo_bytes_estimate: trial_ok.and_then(|t| {
            t.undo_bytes_for(pending.and_then(|rows| u64::try_from(rows).ok())?)
        }),
        trial_error: trial.as_ref().err().map(ToString::to_string),
        trial_error_class: trial.as_ref().err().map(|e| e.class().as_str()),
        trial_error_consequence: trial.as_ref().err().map(|e| match e.class() {
            ErrorClass::RowLevel => {
                "some rows fail: a worker applies the others and sets those aside in backfill.failed_rows"
            }
            ErrorClass::Transient(_) => "transient: a worker backs off and retries smaller",
            ErrorClass::JobLevel => "the job would end failed with this error",
        }),
        expected_rows_per_second,
        max_rows_per_second,
        target_batch_seconds: throttle.target_batch.as_secs_f64(),
        expected_seconds,
        min_seconds_next_to_production: next_to_production.and_then(|(_, seconds)| seconds),
        next_to_production_by: next_to_production.map(|(by, _)| by),
        holding_signals,
        planning_seconds: started.elapsed().as_secs_f64(),
    })
}

/// How the job shares the primary with production, and the least it then takes (`None`
/// with sharing off): the impact budget's best case at the trial's speed (see
/// [`ImpactController::best_case_seconds`]), or without it the expected time over the duty
/// cycle.
fn next_to_production(
    settings: &ThrottleConfig,
    throttle: &backfill_core::throttle::ThrottleSettings,
    pending: Option<i64>,
    rows_per_second: Option<f64>,
    expected_seconds: Option<f64>,
) -> Option<(&'static str, Option<f64>)> {
    match settings.impact_settings() {
        Some(impact) => Some((
            "impact_budget",
            pending.zip(rows_per_second).map(|(rows, rate)| {
                ImpactController::best_case_seconds(
                    &impact,
                    settings.canary_interval,
                    rows as f64,
                    rate,
                )
            }),
        )),
        None if throttle.busy_duty_cycle < 1.0 => Some((
            "duty_cycle",
            expected_seconds.map(|seconds| seconds / throttle.busy_duty_cycle),
        )),
        None => None,
    }
}

/// The signals that would hold job `job_id` now: two health samples a probe interval apart
/// (the WAL rate needs two), the job's view of the second.
async fn signals_holding(
    settings: &WorkerSections,
    db: &Database,
    throttle: &backfill_core::throttle::ThrottleSettings,
    job_id: i64,
) -> anyhow::Result<Vec<&'static str>> {
    let probe = health_probe(&settings.throttle, db, None, job_id)?;
    probe.sample().await;
    tokio::time::sleep(settings.throttle.probe_interval).await;
    let sample = probe.sample().await.for_job(job_id);
    Ok(throttle
        .holding_signals(&sample)
        .into_iter()
        .map(|reason| reason.as_str())
        .collect())
}

impl PlanReport {
    /// Run windows, deadline and forecast lines (issue 16), when the job has them.
    fn render_steering(&self) -> String {
        let at = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
        let mut out = String::new();
        if let Some(windows) = self.run_windows.as_ref().filter(|w| !w.is_empty()) {
            out.push_str(&format!(
                "  run windows    {} ({} now; the job rests outside them, which the expected duration does not count)\n",
                windows.join("; "),
                if self.in_window { "open" } else { "closed" }
            ));
        }
        if let Some(deadline) = self.finish_by {
            let verdict = match (self.expected_finish, self.fits_deadline) {
                (Some(finish), Some(true)) => format!("expected by {}: fits", at(finish)),
                (Some(finish), _) => format!("expected by {}: MISSES it", at(finish)),
                _ => "expected finish unknown".to_string(),
            };
            out.push_str(&format!("  finish_by      {}; {verdict}\n", at(deadline)));
        }
        if let Some(forecast) = self.forecast_finish {
            out.push_str(&format!(
                "  forecast       {} at its recent rate, throttled time included{}\n",
                at(forecast),
                match self.finish_by {
                    Some(deadline) if forecast > deadline => " (LATE)",
                    _ => "",
                }
            ));
        }
        out
    }

    /// The report for a terminal.
    pub fn render(&self) -> String {
        let rows = |n: Option<i64>| n.map_or("unknown".to_string(), |n| n.to_string());
        let seconds = |s: f64| {
            if s < 10.0 {
                format!("{s:.2} s")
            } else {
                humantime::format_duration(Duration::from_secs(s.round() as u64)).to_string()
            }
        };
        let millis = |s: Option<f64>| format!("{:.0} ms", s.unwrap_or(0.0) * 1000.0);
        let mut out = format!(
            "plan for job {} on {} by key {} (state {}, phase {}, {})\n",
            self.job,
            self.table,
            self.key_column,
            self.state,
            self.phase,
            self.after_key
                .as_ref()
                .map_or("from the first key".to_string(), |key| format!(
                    "after key {key}"
                ))
        );
        out.push_str(&format!(
            "  pending rows   ~{} (planner estimate)",
            rows(self.estimated_pending_rows)
        ));
        match (self.exact_pending_rows, self.exact_count_seconds) {
            (Some(exact), Some(took)) => {
                out.push_str(&format!(", {exact} counted in {}", seconds(took)))
            }
            _ => out.push_str("; --exact counts them"),
        }
        out.push('\n');
        out.push_str(&format!(
            "  batches        {} of {} keys (the job's first batch size; the throttle adapts it)\n",
            self.batches
                .map_or("unknown".to_string(), |n| n.to_string()),
            self.batch_size
        ));
        match (&self.trial_error, self.trial_keys) {
            (Some(error), _) => {
                out.push_str(&format!(
                    "  trial batch    FAILED (rolled back): {error}\n"
                ));
                if let Some(consequence) = self.trial_error_consequence {
                    out.push_str(&format!("                 ({consequence})\n"));
                }
            }
            (None, Some(0)) => out.push_str("  trial batch    nothing pending: no keys to try\n"),
            (None, Some(keys)) => out.push_str(&format!(
                "  trial batch    {keys} keys ({}..={}) in {}: keys {}, statement {}; rolled back\n",
                self.trial_first_key.as_deref().unwrap_or("?"),
                self.trial_last_key.as_deref().unwrap_or("?"),
                millis(Some(
                    self.trial_select_seconds.unwrap_or(0.0)
                        + self.trial_statement_seconds.unwrap_or(0.0)
                )),
                millis(self.trial_select_seconds),
                millis(self.trial_statement_seconds),
            )),
            (None, None) => {}
        }
        if let Some(bytes) = self.undo_bytes_estimate {
            out.push_str(&format!(
                "  undo data      ~{bytes} bytes (~{:.1} MiB) kept in backfill.undo for the pending rows (keep_undo)\n",
                bytes as f64 / 1_048_576.0
            ));
        }
        let limit = self
            .max_rows_per_second
            .map_or("no rate limit".to_string(), |limit| {
                format!("max_rows_per_second {limit}")
            });
        match (self.expected_seconds, self.expected_rows_per_second) {
            (Some(expected), Some(rate)) => out.push_str(&format!(
                "  expected       ~{} at ~{rate:.0} rows/s ({limit}, batches steered towards {}, a healthy database; lag holds add to it)\n",
                seconds(expected),
                seconds(self.target_batch_seconds),
            )),
            (Some(_), None) => out.push_str("  expected       nothing to do\n"),
            _ => out.push_str("  expected       unknown (no trial batch timing)\n"),
        }
        if let Some(at_least) = self.min_seconds_next_to_production.filter(|s| *s > 0.0) {
            let how = if self.next_to_production_by == Some("impact_budget") {
                format!(
                    "while other sessions are at work the job shares the primary by the impact budget: as many rows/s as production's latency allows, climbing there from {:.0} rows/s and resting ~2 s every throttle.impact_relearn_every; this is the bound when production's latency never binds",
                    START_RATE
                )
            } else {
                "while other sessions are at work the job shares the primary: ~1 ms batches, throttle.busy_duty_cycle of the time".to_string()
            };
            out.push_str(&format!(
                "  next to production  at least ~{} ({how})\n",
                seconds(at_least),
            ));
        }
        if self.holding_signals.is_empty() {
            out.push_str("  holds now      none: every throttle signal lets the job run\n");
        } else {
            out.push_str(&format!(
                "  holds now      {} (a worker would wait until these clear; see deploy/RUNBOOK.md)\n",
                self.holding_signals.join(", ")
            ));
        }
        out.push_str(&self.render_steering());
        out.push_str(&format!(
            "planned in {}; nothing was changed\n",
            seconds(self.planning_seconds)
        ));
        out
    }
}
