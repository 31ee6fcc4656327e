//! Logs, Prometheus metrics and the HTTP endpoints (`/metrics`, `/healthz`, `/readyz`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use backfill_core::throttle::ThrottleReason;
use backfill_dataplane::BatchStats;
use backfill_queue::{JobState, Phase};
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use sqlx::PgPool;

use crate::settings::{LogFormat, LogSettings};

/// Installs the tracing subscriber: JSON for production, readable text for terminals.
pub fn init_logging(settings: &LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The drivers log every server NOTICE at info; keep them to warnings.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!(
                "sqlx=warn,tokio_postgres=warn,{}",
                settings.level
            ))
        });
    // Colours only for a terminal: log files and pipelines get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder
            .with_target(false)
            // JSON escapes control characters; text must too, or a job name forges lines.
            .fmt_fields(crate::log_escape::EscapedFields::default())
            .try_init(),
    };
}

/// Batch durations span milliseconds (tiny batches) to the statement timeout.
const BATCH_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder and describes every metric (help text, units).
///
/// A series that no update touched for `idle_timeout` leaves `/metrics` (`None`: never):
/// that is how finished jobs stop being exported. Must be called inside the Tokio runtime,
/// which runs the exporter's upkeep.
pub fn install_metrics(idle_timeout: Option<Duration>) -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::ALL, idle_timeout)
        .set_buckets_for_metric(
            Matcher::Full("backfill_batch_duration_seconds".into()),
            BATCH_DURATION_BUCKETS,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    // Samples of the batch histogram pile up in memory until folded into buckets; a
    // scrape does that too, but a daemon nobody scrapes must not grow.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            ticker.tick().await;
            upkeep.run_upkeep();
        }
    });
    metrics_process::Collector::default().describe();
    describe_counter!(
        "backfill_rows_processed_total",
        "Rows whose batch statement committed."
    );
    describe_counter!(
        "backfill_batches_total",
        "Batches by outcome (committed, row_failures, transient_error, fenced, job_error)."
    );
    describe_histogram!(
        "backfill_batch_duration_seconds",
        Unit::Seconds,
        "Wall time of committed batches."
    );
    describe_gauge!("backfill_batch_size", "Keys in the job's current batch.");
    describe_counter!(
        "backfill_failed_rows_total",
        "Rows newly set aside in backfill.failed_rows (a row failing again on retry counts once)."
    );
    describe_counter!(
        "backfill_throttle_sleep_seconds_total",
        Unit::Seconds,
        "Time spent waiting because of the throttle, by reason (whole seconds)."
    );
    describe_gauge!(
        "backfill_throttled",
        "1 while the job is throttled for this reason."
    );
    describe_gauge!(
        "backfill_replication_lag_seconds",
        Unit::Seconds,
        "Replay lag of a standby."
    );
    describe_gauge!(
        "backfill_replication_lag_bytes",
        Unit::Bytes,
        "WAL bytes a standby has not replayed yet."
    );
    describe_gauge!(
        "backfill_lock_waits",
        "Sessions currently waiting on a lock held by the backfill."
    );
    describe_gauge!(
        "backfill_job_rows_remaining",
        "Rows the job still has to process (estimate)."
    );
    describe_gauge!(
        "backfill_job_progress_ratio",
        "Fraction of the job done, 0 to 1."
    );
    describe_gauge!(
        "backfill_job_eta_seconds",
        Unit::Seconds,
        "Estimated time to finish the job at the current rate."
    );
    describe_gauge!("backfill_jobs", "Jobs in the queue by state.");
    describe_gauge!(
        "backfill_job_forecast_seconds",
        Unit::Seconds,
        "Time to the job's forecast finish: rows remaining over its rate across worker.forecast_window, throttled time included."
    );
    describe_gauge!(
        "backfill_job_deadline_margin_seconds",
        Unit::Seconds,
        "The job's finish_by minus its forecast finish (or now, once later); negative: it will be late."
    );
    describe_gauge!(
        "backfill_job_late",
        "1 while the job's forecast (or the clock) is past its finish_by, else 0."
    );
    describe_gauge!(
        "backfill_undo_rows",
        "Rows of undo data a job keeps in backfill.undo (keep_undo), for backfill.revert."
    );
    describe_gauge!(
        "backfill_undo_bytes",
        "Bytes of the keys and old values of a job's undo data."
    );
    describe_gauge!(
        "backfill_job_failed",
        "1 for each job in state failed (it stays failed until retried or cancelled), 0 once it is not."
    );
    describe_gauge!(
        "backfill_build_info",
        "Always 1; the version label says which backfilld runs."
    );
    describe_gauge!(
        "backfill_throttle_max_lag_seconds",
        Unit::Seconds,
        "Configured replication lag limit."
    );
    describe_gauge!(
        "backfill_throttle_max_lag_bytes",
        Unit::Bytes,
        "Configured replication lag limit in bytes."
    );
    describe_gauge!(
        "backfill_probe_delay_seconds",
        Unit::Seconds,
        "How much longer the last canary round trip (a committing transaction) took than the quickest of the last minute."
    );
    describe_gauge!(
        "backfill_impact_ratio",
        "Production's latency (the canary's p90) over its baseline, as the impact budget last measured it."
    );
    describe_gauge!(
        "backfill_impact_budget_rows_per_second",
        "Rows per second the impact budget allows this daemon's running jobs in all; 0 while it rests to re-learn the baseline."
    );
    describe_counter!(
        "backfill_probe_delays_total",
        "Canary round trips over throttle.max_probe_delay: production waiting for the database."
    );
    Ok(handle)
}

/// Throttle sleep per (job, reason) in this process, in seconds, exactly: several slots
/// (slices) of one job share one series.
static SLEPT: SleepTotals = SleepTotals(Mutex::new(BTreeMap::new()));

/// See [`SLEPT`].
struct SleepTotals(Mutex<BTreeMap<(String, String), f64>>);

impl SleepTotals {
    /// Adds `seconds` to the total of (`job`, `reason`) and returns the new total.
    fn add(&self, job: &str, reason: &str, seconds: f64) -> f64 {
        // Plain sums: a panic elsewhere cannot leave them inconsistent.
        let mut totals = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let total = totals
            .entry((job.to_string(), reason.to_string()))
            .or_insert(0.0);
        *total += seconds;
        *total
    }
}

/// Every `outcome` label of `backfill_batches_total`.
pub const BATCH_OUTCOMES: [&str; 5] = [
    "committed",
    "row_failures",
    "transient_error",
    "fenced",
    "job_error",
];

/// How often a held job's unchanged series are touched (see [`JobMetrics`]).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Metric series of one job, labelled with its name.
///
/// The exporter drops a series no update touched for `http.metrics_idle_timeout`: that is
/// how a finished job leaves `/metrics`. While a worker holds the job, each throttle
/// decision ([`JobMetrics::throttled`]) also re-exports the series that did not move, so a
/// job held back for a long time keeps them all (but its batch duration histogram, which
/// only a batch can touch). Counters start at 0, so `increase()` sees their first rise.
pub struct JobMetrics {
    job: String,
    latest: Mutex<LatestValues>,
}

/// The gauge values a job last exported, for re-exporting them unchanged.
#[derive(Debug, Default)]
struct LatestValues {
    batch_size: Option<f64>,
    rows_remaining: Option<f64>,
    progress_ratio: Option<f64>,
    eta_seconds: Option<f64>,
    refreshed_at: Option<Instant>,
}

impl JobMetrics {
    /// Metrics for the job called `job`; exports its counters at 0.
    pub fn new(job: &str) -> Self {
        let metrics = JobMetrics {
            job: job.to_string(),
            latest: Mutex::new(LatestValues::default()),
        };
        metrics.touch_counters();
        metrics.export_throttled(None);
        metrics.lock_waits(0);
        metrics
    }

    /// A batch committed. In the retry phase every key comes from `backfill.failed_rows`:
    /// one failing again is no new failed row, so `backfill_failed_rows_total` counts rows,
    /// not attempts.
    pub fn committed(&self, stats: &BatchStats, duration: Duration, phase: Phase) {
        let job = self.job.clone();
        counter!("backfill_rows_processed_total", "backfill_job" => job.clone())
            .increment(stats.applied as u64);
        let outcome = if stats.failed > 0 {
            "row_failures"
        } else {
            "committed"
        };
        counter!("backfill_batches_total", "backfill_job" => job.clone(), "outcome" => outcome)
            .increment(1);
        histogram!("backfill_batch_duration_seconds", "backfill_job" => job.clone())
            .record(duration.as_secs_f64());
        if stats.failed > 0 && phase != Phase::Retry {
            counter!("backfill_failed_rows_total", "backfill_job" => job)
                .increment(stats.failed as u64);
        }
    }

    /// A batch ended without committing; `outcome` is one of [`BATCH_OUTCOMES`].
    pub fn batch_outcome(&self, outcome: &'static str) {
        debug_assert!(
            BATCH_OUTCOMES.contains(&outcome),
            "unknown outcome {outcome}"
        );
        counter!("backfill_batches_total", "backfill_job" => self.job.clone(), "outcome" => outcome)
            .increment(1);
    }

    /// The size of the next batch.
    pub fn batch_size(&self, size: u32) {
        let size = f64::from(size);
        self.latest().batch_size = Some(size);
        gauge!("backfill_batch_size", "backfill_job" => self.job.clone()).set(size);
    }

    /// Time waited because of the throttle.
    pub fn slept(&self, reason: &str, duration: Duration) {
        let total = SLEPT.add(&self.job, reason, duration.as_secs_f64());
        self.export_slept(reason, total);
    }

    /// The metrics facade's counters hold integers and sleeps are fractions of a second:
    /// the exact total is kept per process in [`SLEPT`] and exported in whole seconds, as
    /// `absolute`, so the series is a true counter (rate() and resets work) that loses no
    /// fraction over time.
    fn export_slept(&self, reason: &str, total_seconds: f64) {
        counter!("backfill_throttle_sleep_seconds_total", "backfill_job" => self.job.clone(), "reason" => reason.to_string())
            .absolute(total_seconds.floor() as u64);
    }

    /// Which throttle reason is active now (at most one). Called on every throttle
    /// decision, holds included, so it also keeps the job's other series alive.
    pub fn throttled(&self, active: Option<&str>) {
        self.export_throttled(active);
        self.keep_alive();
    }

    /// Sessions waiting on our locks.
    pub fn lock_waits(&self, sessions: u32) {
        gauge!("backfill_lock_waits", "backfill_job" => self.job.clone()).set(f64::from(sessions));
    }

    /// Progress and ETA.
    pub fn progress(&self, rows_done: i64, remaining: Option<i64>, rows_per_second: Option<f64>) {
        let Some(remaining) = remaining else {
            return;
        };
        let total = rows_done + remaining;
        let ratio = if total > 0 {
            rows_done as f64 / total as f64
        } else {
            1.0
        };
        let eta = rows_per_second
            .filter(|rate| *rate > 0.0)
            .map(|rate| remaining as f64 / rate);
        self.export_progress(remaining as f64, ratio.clamp(0.0, 1.0), eta);
    }

    /// The job ended here.
    pub fn finished(&self, succeeded: bool) {
        let (remaining, ratio) = if succeeded {
            (Some(0.0), Some(1.0))
        } else {
            let latest = self.latest();
            (latest.rows_remaining, latest.progress_ratio)
        };
        match (remaining, ratio) {
            (Some(remaining), Some(ratio)) => self.export_progress(remaining, ratio, Some(0.0)),
            _ => {
                self.latest().eta_seconds = Some(0.0);
                gauge!("backfill_job_eta_seconds", "backfill_job" => self.job.clone()).set(0.0);
            }
        }
    }

    /// This worker no longer works on the job: it is not throttled by us any more. The
    /// job's series are left alone from here on and expire after the idle timeout.
    pub fn job_left(&self) {
        self.export_throttled(None);
        self.lock_waits(0);
    }

    fn latest(&self) -> std::sync::MutexGuard<'_, LatestValues> {
        // The values are plain numbers: a panic elsewhere cannot leave them inconsistent.
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn export_throttled(&self, active: Option<&str>) {
        // Every reason is exported, so a reason's gauge drops to 0 when it ends.
        for reason in ThrottleReason::ALL {
            let value = if Some(reason.as_str()) == active {
                1.0
            } else {
                0.0
            };
            gauge!("backfill_throttled", "backfill_job" => self.job.clone(), "reason" => reason.as_str())
                .set(value);
        }
    }

    fn export_progress(&self, remaining: f64, ratio: f64, eta: Option<f64>) {
        let mut latest = self.latest();
        latest.rows_remaining = Some(remaining);
        latest.progress_ratio = Some(ratio);
        latest.eta_seconds = eta.or(latest.eta_seconds);
        let eta = latest.eta_seconds;
        drop(latest);
        let job = self.job.clone();
        gauge!("backfill_job_rows_remaining", "backfill_job" => job.clone()).set(remaining);
        gauge!("backfill_job_progress_ratio", "backfill_job" => job.clone()).set(ratio);
        if let Some(eta) = eta {
            gauge!("backfill_job_eta_seconds", "backfill_job" => job).set(eta);
        }
    }

    /// Touches the counters without changing them: creates them at 0, keeps them exported.
    fn touch_counters(&self) {
        let job = &self.job;
        counter!("backfill_rows_processed_total", "backfill_job" => job.clone()).increment(0);
        counter!("backfill_failed_rows_total", "backfill_job" => job.clone()).increment(0);
        for outcome in BATCH_OUTCOMES {
            counter!("backfill_batches_total", "backfill_job" => job.clone(), "outcome" => outcome)
                .increment(0);
        }
        for reason in ThrottleReason::ALL {
            let reason = reason.as_str();
            self.export_slept(reason, SLEPT.add(job, reason, 0.0));
        }
    }

    /// Re-exports the series that did not move, at most every [`KEEP_ALIVE_INTERVAL`].
    fn keep_alive(&self) {
        let mut latest = self.latest();
        if latest
            .refreshed_at
            .is_some_and(|at| at.elapsed() < KEEP_ALIVE_INTERVAL)
        {
            return;
        }
        latest.refreshed_at = Some(Instant::now());
        let LatestValues {
            batch_size,
            rows_remaining,
            progress_ratio,
            eta_seconds,
            ..
        } = *latest;
        drop(latest);
        self.touch_counters();
        let job = &self.job;
        if let Some(size) = batch_size {
            gauge!("backfill_batch_size", "backfill_job" => job.clone()).set(size);
        }
        if let (Some(remaining), Some(ratio)) = (rows_remaining, progress_ratio) {
            gauge!("backfill_job_rows_remaining", "backfill_job" => job.clone()).set(remaining);
            gauge!("backfill_job_progress_ratio", "backfill_job" => job.clone()).set(ratio);
        }
        if let Some(eta) = eta_seconds {
            gauge!("backfill_job_eta_seconds", "backfill_job" => job.clone()).set(eta);
        }
    }
}

/// Exports the per-replica lag of a health sample.
pub fn record_replication_lag(sample: &backfill_core::throttle::HealthSample) {
    for replica in &sample.replicas {
        if let Some(lag) = replica.lag {
            gauge!("backfill_replication_lag_seconds", "replica" => replica.name.clone())
                .set(lag.as_secs_f64());
        }
        if let Some(bytes) = replica.lag_bytes {
            gauge!("backfill_replication_lag_bytes", "replica" => replica.name.clone())
                .set(bytes as f64);
        }
    }
    for missing in &sample.missing_standbys {
        // A missing standby is unbounded lag: say so rather than show a stale number.
        gauge!("backfill_replication_lag_seconds", "replica" => missing.clone()).set(f64::INFINITY);
    }
}

/// Exports one canary verdict (see backfill_core::latency).
pub fn record_canary(verdict: backfill_core::latency::CanaryVerdict) {
    gauge!("backfill_probe_delay_seconds").set(verdict.excess.as_secs_f64());
    let delays = counter!("backfill_probe_delays_total");
    // Touched on every canary so the series exists (at 0) before the first delay.
    delays.increment(u64::from(verdict.delayed));
}

/// Exports the impact budget's last verdict (see backfill_core::impact).
pub fn record_impact(verdict: &backfill_core::impact::ImpactVerdict) {
    use backfill_core::impact::ImpactDirective;
    // NaN until the first judgement: the series exists from the start.
    gauge!("backfill_impact_ratio").set(verdict.ratio.unwrap_or(f64::NAN));
    let rate = match verdict.directive {
        Some(ImpactDirective::Pace(rate)) => rate,
        Some(ImpactDirective::Rest) => 0.0,
        None => f64::NAN,
    };
    gauge!("backfill_impact_budget_rows_per_second").set(rate);
}

/// Exports the build and the configured lag limits (so dashboards and alerts can compare
/// against them). Called periodically: a series set once would expire like a finished job's.
pub fn record_daemon_info(max_lag: Duration, max_lag_bytes: u64) {
    gauge!("backfill_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!("backfill_throttle_max_lag_seconds").set(max_lag.as_secs_f64());
    gauge!("backfill_throttle_max_lag_bytes").set(max_lag_bytes as f64);
}

/// Exports the queue's job counts by state.
pub fn record_job_states(counts: &[(String, i64)]) {
    for state in JobState::ALL {
        let count = counts
            .iter()
            .find(|(s, _)| s == state.as_str())
            .map_or(0, |(_, n)| *n);
        gauge!("backfill_jobs", "state" => state.as_str()).set(count as f64);
    }
}

/// Jobs this process last reported failed, to report 0 for them once they are not.
static FAILED_JOBS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Exports `backfill_job_failed{backfill_job}`: 1 per failed job (the alert names each),
/// 0 for the ones that stopped being failed (retried, cancelled) until they expire.
pub fn record_failed_jobs(names: &[String]) {
    let mut reported = FAILED_JOBS.lock().unwrap_or_else(PoisonError::into_inner);
    for gone in reported.iter().filter(|name| !names.contains(name)) {
        gauge!("backfill_job_failed", "backfill_job" => gone.clone()).set(0.0);
    }
    for name in names {
        gauge!("backfill_job_failed", "backfill_job" => name.clone()).set(1.0);
    }
    *reported = names.iter().cloned().collect();
}

/// One unfinished job's window and deadline, as `backfill.job_status` has them (issue 16).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobSteering {
    pub name: String,
    /// Seconds to the forecast finish (throttled time counted), if known.
    pub forecast_seconds: Option<f64>,
    /// Seconds from the forecast finish (or now, once that is later) to `finish_by`;
    /// negative: late. `None`: no deadline, or no forecast yet and still time.
    pub deadline_margin_seconds: Option<f64>,
    pub late: bool,
    /// The job has run windows and all are closed: it rests.
    pub outside_window: bool,
    pub has_windows: bool,
}

/// Jobs this process last reported a window or a deadline for.
static STEERED_JOBS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Exports `backfill_job_forecast_seconds`, `backfill_job_deadline_margin_seconds`,
/// `backfill_job_late` and `backfill_throttled{reason="window"}` for unfinished jobs;
/// a job that is no longer unfinished reports not late and not held, until it expires.
pub fn record_job_steering(jobs: &[JobSteering]) {
    let mut reported = STEERED_JOBS.lock().unwrap_or_else(PoisonError::into_inner);
    for gone in reported
        .iter()
        .filter(|name| !jobs.iter().any(|j| &j.name == *name))
    {
        gauge!("backfill_job_late", "backfill_job" => gone.clone()).set(0.0);
        gauge!("backfill_throttled", "backfill_job" => gone.clone(), "reason" => "window").set(0.0);
    }
    for job in jobs {
        let name = || job.name.clone();
        if let Some(seconds) = job.forecast_seconds {
            gauge!("backfill_job_forecast_seconds", "backfill_job" => name()).set(seconds);
        }
        if let Some(margin) = job.deadline_margin_seconds {
            gauge!("backfill_job_deadline_margin_seconds", "backfill_job" => name()).set(margin);
            gauge!("backfill_job_late", "backfill_job" => name())
                .set(f64::from(u8::from(job.late)));
        }
        if job.has_windows {
            gauge!("backfill_throttled", "backfill_job" => name(), "reason" => "window")
                .set(f64::from(u8::from(job.outside_window)));
        }
    }
    *reported = jobs
        .iter()
        .filter(|j| j.deadline_margin_seconds.is_some() || j.has_windows)
        .map(|j| j.name.clone())
        .collect();
}

/// How long a rendered `/metrics` page takes to reach the scraper, at most, on a live pod.
const RESPONSE_GRACE: Duration = Duration::from_millis(250);

/// Woken by every `/metrics` scrape; see [`await_final_scrape`].
static SCRAPED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Waits for the next scrape of `/metrics`, at most `bound`: a worker leaving because the
/// queue is done lets Prometheus see the final queue state first.
pub async fn await_final_scrape(bound: Duration) {
    if bound.is_zero() {
        return;
    }
    match tokio::time::timeout(bound, SCRAPED.notified()).await {
        Ok(()) => {
            // The page is rendered when we are woken; give its response a moment on the wire.
            tokio::time::sleep(RESPONSE_GRACE).await;
            tracing::info!("final metrics scraped");
        }
        Err(_) => tracing::info!(
            waited = %humantime::format_duration(bound),
            "no scrape of the final metrics within http.final_scrape_wait"
        ),
    }
}

/// How long `/readyz` waits for the database before answering "not ready".
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` until the process ends.
pub async fn serve_http(
    listen: &str,
    metrics: PrometheusHandle,
    control: PgPool,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on http.listen {listen}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    // process_* (CPU, memory, file descriptors, start time) are read from /proc per scrape.
    let process = metrics_process::Collector::default();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                process.collect();
                let page = metrics.render();
                SCRAPED.notify_waiters();
                std::future::ready(page)
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let control = control.clone();
                async move {
                    // A probe must answer quickly even while the database hangs.
                    let check = backfill_queue::schema_is_current(&control);
                    let answer = match tokio::time::timeout(READINESS_TIMEOUT, check).await {
                        Ok(result) => result.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("no answer within {READINESS_TIMEOUT:?}")),
                    };
                    match answer {
                        Ok(true) => (StatusCode::OK, "ready\n".to_string()),
                        Ok(false) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "schema backfill is not current\n".to_string(),
                        ),
                        Err(e) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("database unreachable: {e}\n"),
                        ),
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(bound)
}

/// This process's peak resident set size (`VmHWM`), where `/proc` tells. Not getrusage's
/// `ru_maxrss`: the kernel folds the parent's resident size at our exec into that.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
