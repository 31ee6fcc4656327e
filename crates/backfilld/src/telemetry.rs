//! Logs, Prometheus metrics and the HTTP endpoints (`/metrics`, `/healthz`, `/readyz`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use backfill_core::throttle::ThrottleReason;
use backfill_dataplane::BatchStats;
use backfill_queue::JobState;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}

/// Batch durations span milliseconds (tiny batches) to the statement timeout.
const BATCH_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the Prometheus recorder and describes every metric (help text, units).
pub fn install_metrics() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("backfill_batch_duration_seconds".into()),
            BATCH_DURATION_BUCKETS,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
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
        "Rows recorded in backfill.failed_rows."
    );
    describe_gauge!(
        "backfill_throttle_sleep_seconds_total",
        Unit::Seconds,
        "Time spent waiting because of the throttle, by reason."
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
    gauge!("backfill_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// Metric handles of one job, labelled with its name.
pub struct JobMetrics {
    job: String,
}

impl JobMetrics {
    /// Metrics for the job called `job`.
    pub fn new(job: &str) -> Self {
        JobMetrics {
            job: job.to_string(),
        }
    }

    /// A batch committed.
    pub fn committed(&self, stats: &BatchStats, duration: Duration) {
        let job = self.job.clone();
        counter!("backfill_rows_processed_total", "job" => job.clone())
            .increment(stats.applied as u64);
        let outcome = if stats.failed > 0 {
            "row_failures"
        } else {
            "committed"
        };
        counter!("backfill_batches_total", "job" => job.clone(), "outcome" => outcome).increment(1);
        histogram!("backfill_batch_duration_seconds", "job" => job.clone())
            .record(duration.as_secs_f64());
        if stats.failed > 0 {
            counter!("backfill_failed_rows_total", "job" => job).increment(stats.failed as u64);
        }
    }

    /// A batch ended without committing.
    pub fn batch_outcome(&self, outcome: &'static str) {
        counter!("backfill_batches_total", "job" => self.job.clone(), "outcome" => outcome)
            .increment(1);
    }

    /// The size of the next batch.
    pub fn batch_size(&self, size: u32) {
        gauge!("backfill_batch_size", "job" => self.job.clone()).set(f64::from(size));
    }

    /// Time waited because of the throttle.
    pub fn slept(&self, reason: &str, duration: Duration) {
        // The metrics facade's counters are integers; sleeps are fractions of a
        // second, so this monotonic total is kept in a gauge (rate() works the same).
        gauge!("backfill_throttle_sleep_seconds_total", "job" => self.job.clone(), "reason" => reason.to_string())
            .increment(duration.as_secs_f64());
    }

    /// Which throttle reason is active now (at most one).
    pub fn throttled(&self, active: Option<&str>) {
        // Every reason is exported, so a reason's gauge drops to 0 when it ends.
        for reason in ThrottleReason::ALL {
            let value = if Some(reason.as_str()) == active {
                1.0
            } else {
                0.0
            };
            gauge!("backfill_throttled", "job" => self.job.clone(), "reason" => reason.as_str())
                .set(value);
        }
    }

    /// Sessions waiting on our locks.
    pub fn lock_waits(&self, sessions: u32) {
        gauge!("backfill_lock_waits", "job" => self.job.clone()).set(f64::from(sessions));
    }

    /// Progress and ETA.
    pub fn progress(&self, rows_done: i64, remaining: Option<i64>, rows_per_second: Option<f64>) {
        let job = self.job.clone();
        if let Some(remaining) = remaining {
            gauge!("backfill_job_rows_remaining", "job" => job.clone()).set(remaining as f64);
            let total = rows_done + remaining;
            let ratio = if total > 0 {
                rows_done as f64 / total as f64
            } else {
                1.0
            };
            gauge!("backfill_job_progress_ratio", "job" => job.clone()).set(ratio.clamp(0.0, 1.0));
            if let Some(rate) = rows_per_second.filter(|r| *r > 0.0) {
                gauge!("backfill_job_eta_seconds", "job" => job).set(remaining as f64 / rate);
            }
        }
    }

    /// The job ended here.
    pub fn finished(&self, succeeded: bool) {
        let job = self.job.clone();
        if succeeded {
            gauge!("backfill_job_rows_remaining", "job" => job.clone()).set(0.0);
            gauge!("backfill_job_progress_ratio", "job" => job.clone()).set(1.0);
        }
        gauge!("backfill_job_eta_seconds", "job" => job).set(0.0);
    }

    /// This worker no longer works on the job: it is not throttled by us any more.
    pub fn job_left(&self) {
        self.throttled(None);
        self.lock_waits(0);
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

/// Exports the configured lag limits, so dashboards and alerts can draw and compare against them.
pub fn record_lag_limits(max_lag: Duration, max_lag_bytes: u64) {
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
    let app = Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let control = control.clone();
                async move {
                    match backfill_queue::schema_is_current(&control).await {
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
