//! The daemon-wide gauges: the daemon's limits, the queue's jobs by state, failed jobs,
//! deadlines and windows, and undo data, refreshed on a task of their own.

use backfill_core::queue_sql;
use std::time::{Duration, Instant};

use backfill_queue::JobStatus;
use sqlx::PgPool;

use crate::shutdown::Shutdown;
use crate::telemetry;

/// How often `backfill_jobs{state}` is refreshed (one query on the queue).
const JOB_STATES_INTERVAL: Duration = Duration::from_secs(2);

/// What the gauges show and how often they are refreshed.
pub struct DaemonGauges {
    /// The queue.
    pub control: PgPool,
    /// How often the daemon's limits are re-set (the probe interval).
    pub interval: Duration,
    /// `throttle.max_lag`, for `backfill_daemon_info`.
    pub max_lag: Duration,
    /// `throttle.max_lag_bytes`, for `backfill_daemon_info`.
    pub max_lag_bytes: u64,
    /// `undo.retention`, applied when undo data is measured.
    pub undo_retention: Option<Duration>,
}

impl DaemonGauges {
    /// Refreshes the gauges until shutdown, on a task of their own.
    pub fn spawn(self, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut job_states_at: Option<Instant> = None;
            let mut undo_at: Option<Instant> = None;
            while !shutdown.is_triggered() {
                // Re-set every tick, or the exporter's idle timeout would drop them.
                telemetry::record_daemon_info(self.max_lag, self.max_lag_bytes);
                if job_states_at.is_none_or(|at| at.elapsed() >= JOB_STATES_INTERVAL) {
                    job_states_at = Some(Instant::now());
                    report_queue_state(&self.control).await;
                }
                if undo_at.is_none_or(|at| at.elapsed() >= crate::undo::UNDO_REPORT_INTERVAL) {
                    undo_at = Some(Instant::now());
                    crate::undo::report_undo(&self.control, self.undo_retention).await;
                }
                shutdown.sleep(self.interval).await;
            }
        })
    }
}

/// Refreshes `backfill_jobs{state}` and `backfill_job_failed{backfill_job}` from the queue.
pub async fn report_queue_state(control: &PgPool) {
    match JobStatus::count_by_state(control).await {
        Ok(counts) => telemetry::record_job_states(&counts),
        Err(e) => tracing::debug!(error = %e, "cannot count jobs by state"),
    }
    let failed = sqlx::query_scalar(queue_sql::FAILED_JOB_NAMES)
        .fetch_all(control)
        .await;
    match failed {
        Ok(names) => telemetry::record_failed_jobs(&names),
        Err(e) => tracing::debug!(error = %e, "cannot list failed jobs"),
    }
    let steering = sqlx::query_as(queue_sql::JOB_STEERING_GAUGES)
        .fetch_all(control)
        .await;
    match steering {
        Ok(jobs) => telemetry::record_job_steering(&jobs),
        Err(e) => tracing::debug!(error = %e, "cannot read job deadlines and windows"),
    }
}
