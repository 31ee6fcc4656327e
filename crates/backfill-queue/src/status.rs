//! Reading `backfill.job_status` and steering jobs through the SQL functions.

use backfill_core::queue_sql;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::{Context, QueueError};

/// One row of `backfill.job_status`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobStatus {
    pub job_id: i64,
    pub name: String,
    pub state: String,
    pub phase: String,
    pub table_name: String,
    pub rows_done: i64,
    pub rows_remaining: Option<i64>,
    pub percent: Option<f64>,
    pub rows_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
    pub batch_size: Option<i32>,
    pub throttle_state: Option<String>,
    pub throttle_reason: Option<String>,
    pub failed_rows: i64,
    pub worker: Option<String>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub priority: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The job's run windows (`None`: any time) and whether one is open now.
    pub run_windows: Option<Vec<String>>,
    pub in_window: bool,
    /// The deadline, if any.
    pub finish_by: Option<DateTime<Utc>>,
    /// Rows per second over the recent forecast window, throttled time included.
    pub recent_rows_per_second: Option<f64>,
    /// When the job will finish at its recent rate (for a succeeded job: when it did).
    pub forecast_finish: Option<DateTime<Utc>>,
    /// The forecast (or the finish) is past `finish_by`; `None`: no deadline, or not known yet.
    pub late: Option<bool>,
    /// Rows of undo data the job keeps (`None`: it keeps none).
    pub undo_rows: Option<i64>,
    /// Bytes of those rows' keys and old values.
    pub undo_bytes: Option<i64>,
}

impl JobStatus {
    /// Every job's status, newest last; or just the named one.
    pub async fn fetch(pool: &PgPool, name: Option<&str>) -> Result<Vec<JobStatus>, QueueError> {
        sqlx::query_as(queue_sql::JOB_STATUS)
            .bind(name)
            .fetch_all(pool)
            .await
            .context("reading backfill.job_status")
    }

    /// Number of jobs in each state, for the `backfill_jobs{state}` gauge.
    pub async fn count_by_state(pool: &PgPool) -> Result<Vec<(String, i64)>, QueueError> {
        sqlx::query_as(queue_sql::COUNT_BY_STATE)
            .fetch_all(pool)
            .await
            .context("counting jobs by state")
    }
}

/// An operator's command to a job, carried out by the SQL function of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteeringVerb {
    Pause,
    Resume,
    Cancel,
    RetryFailed,
}

impl SteeringVerb {
    /// The SQL function that carries it out.
    pub fn function(self) -> &'static str {
        match self {
            SteeringVerb::Pause => "backfill.pause",
            SteeringVerb::Resume => "backfill.resume",
            SteeringVerb::Cancel => "backfill.cancel",
            SteeringVerb::RetryFailed => "backfill.retry_failed",
        }
    }

    /// Applies the verb to the named job (on a pool, or inside a transaction); returns
    /// the job's new state.
    pub async fn apply<'e>(
        self,
        db: impl sqlx::PgExecutor<'e>,
        job_name: &str,
    ) -> Result<String, QueueError> {
        sqlx::query_scalar(&format!("SELECT {}($1)", self.function()))
            .bind(job_name)
            .fetch_one(db)
            .await
            .context(&format!("{}({job_name:?})", self.function()))
    }
}
