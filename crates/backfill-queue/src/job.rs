//! A backfill job as stored in `backfill.jobs`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{Context, QueueError};

/// Where a job is in its life: pending → running → succeeded | failed | cancelled; running ⇄ paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Every state, for exporting a gauge per state.
    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Running,
        JobState::Paused,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The state's name in SQL and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// True once the job will not run again without someone acting.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

/// Which pass over the table a job is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Walking the key range from the checkpoint.
    Scan,
    /// Retrying keys recorded in `backfill.failed_rows`.
    Retry,
    /// Re-walking the table for rows still pending after the scan.
    Verify,
}

impl Phase {
    /// The phase's name in SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Scan => "scan",
            Phase::Retry => "retry",
            Phase::Verify => "verify",
        }
    }
}

impl FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "scan" => Ok(Phase::Scan),
            "retry" => Ok(Phase::Retry),
            "verify" => Ok(Phase::Verify),
            other => Err(format!("unknown job phase {other:?}")),
        }
    }
}

/// A job's definition and progress, as a worker sees it after claiming.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub name: String,
    pub table_name: String,
    pub key_column: String,
    pub batch_sql: String,
    pub pending_predicate: Option<String>,
    pub check_predicate: Option<String>,
    pub batch_size: Option<i32>,
    pub min_batch_size: Option<i32>,
    pub max_batch_size: Option<i32>,
    pub target_batch_ms: Option<i32>,
    pub max_rows_per_second: Option<f64>,
    pub max_attempts: Option<i32>,
    pub state: JobState,
    pub phase: Phase,
    pub checkpoint: Option<String>,
    pub rows_done: i64,
    pub batches_done: i64,
    pub rows_total_estimate: Option<i64>,
    pub verify_sweeps: i32,
    pub started_at: Option<DateTime<Utc>>,
    /// Slices to cut the job into (1: no slicing).
    pub parallelism: i32,
    /// Set on a slice: the job it is a slice of.
    pub parent_id: Option<i64>,
    /// A slice's keys start above this key (exclusive); `None`: from the first key.
    pub lower_key: Option<String>,
    /// A slice's keys end at this key (inclusive); for a whole job, the last key of the
    /// pass under way, fixed when the pass starts. `None`: not fixed yet.
    pub upper_key: Option<String>,
    /// The role that enqueued the job: its SQL runs as this role.
    pub enqueued_by: String,
    /// The search_path resolved when the job was enqueued (`None`: enqueued before it was recorded).
    pub search_path: Option<String>,
    /// The job's own circuit-breaker limits, a slice's from its parent (`None`: the
    /// configured defaults).
    pub breaker_failed_share: Option<f64>,
    pub breaker_failed_rows: Option<i64>,
    /// Keep the old values of the rows its batches change, for `backfill.revert`.
    pub keep_undo: bool,
    /// The columns whose old values are kept; `None`: the whole row.
    pub undo_columns: Option<Vec<String>>,
}

impl Job {
    /// True for a job that is cut into slices (the parent, not a slice).
    pub fn is_sliced(&self) -> bool {
        self.parallelism > 1 && self.parent_id.is_none()
    }

    /// The job that owns failed rows and verification: the parent for a slice.
    pub fn owner_id(&self) -> i64 {
        self.parent_id.unwrap_or(self.id)
    }
}

/// The columns of `backfill.jobs` that [`Job`] reads, in one place.
pub(crate) const JOB_COLUMNS: &str = "j.id, j.name, j.table_name, j.key_column, j.batch_sql, \
    j.pending_predicate, j.check_predicate, j.batch_size, j.min_batch_size, j.max_batch_size, \
    j.target_batch_ms, j.max_rows_per_second, j.max_attempts, j.state, j.phase, j.checkpoint, \
    j.rows_done, j.batches_done, j.rows_total_estimate, j.verify_sweeps, j.started_at, \
    j.parallelism, j.parent_id, j.lower_key, j.upper_key, j.enqueued_by::text AS enqueued_by, \
    j.search_path, \
    coalesce(j.breaker_failed_share, (SELECT p.breaker_failed_share FROM backfill.jobs p WHERE p.id = j.parent_id)) \
        AS breaker_failed_share, \
    coalesce(j.breaker_failed_rows, (SELECT p.breaker_failed_rows FROM backfill.jobs p WHERE p.id = j.parent_id)) \
        AS breaker_failed_rows, \
    j.keep_undo, j.undo_columns";

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for Job {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let decode = |column: &str, e: String| sqlx::Error::ColumnDecode {
            index: column.to_string(),
            source: e.into(),
        };
        let state: String = row.try_get("state")?;
        let phase: String = row.try_get("phase")?;
        Ok(Job {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            table_name: row.try_get("table_name")?,
            key_column: row.try_get("key_column")?,
            batch_sql: row.try_get("batch_sql")?,
            pending_predicate: row.try_get("pending_predicate")?,
            check_predicate: row.try_get("check_predicate")?,
            batch_size: row.try_get("batch_size")?,
            min_batch_size: row.try_get("min_batch_size")?,
            max_batch_size: row.try_get("max_batch_size")?,
            target_batch_ms: row.try_get("target_batch_ms")?,
            max_rows_per_second: row.try_get("max_rows_per_second")?,
            max_attempts: row.try_get("max_attempts")?,
            state: state.parse().map_err(|e| decode("state", e))?,
            phase: phase.parse().map_err(|e| decode("phase", e))?,
            checkpoint: row.try_get("checkpoint")?,
            rows_done: row.try_get("rows_done")?,
            batches_done: row.try_get("batches_done")?,
            rows_total_estimate: row.try_get("rows_total_estimate")?,
            verify_sweeps: row.try_get("verify_sweeps")?,
            started_at: row.try_get("started_at")?,
            parallelism: row.try_get("parallelism")?,
            parent_id: row.try_get("parent_id")?,
            lower_key: row.try_get("lower_key")?,
            upper_key: row.try_get("upper_key")?,
            enqueued_by: row.try_get("enqueued_by")?,
            search_path: row.try_get("search_path")?,
            breaker_failed_share: row.try_get("breaker_failed_share")?,
            breaker_failed_rows: row.try_get("breaker_failed_rows")?,
            keep_undo: row.try_get("keep_undo")?,
            undo_columns: row.try_get("undo_columns")?,
        })
    }
}

/// A job to enqueue: the same columns an engineer would INSERT.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub name: String,
    pub table_name: String,
    pub key_column: String,
    pub batch_sql: String,
    pub pending_predicate: Option<String>,
    pub check_predicate: Option<String>,
    pub batch_size: Option<i32>,
    pub min_batch_size: Option<i32>,
    pub max_batch_size: Option<i32>,
    pub target_batch_ms: Option<i32>,
    pub max_rows_per_second: Option<f64>,
    pub max_attempts: Option<i32>,
    pub priority: Option<i32>,
    pub not_before: Option<DateTime<Utc>>,
    pub parallelism: Option<i32>,
}

impl NewJob {
    /// Inserts the job exactly as an engineer's INSERT would, so the same
    /// validation trigger refuses bad definitions (on a pool, or inside a transaction);
    /// returns the job id.
    pub async fn enqueue<'e>(&self, db: impl sqlx::PgExecutor<'e>) -> Result<i64, QueueError> {
        sqlx::query_scalar(
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, \
                 check_predicate, batch_size, min_batch_size, max_batch_size, target_batch_ms, \
                 max_rows_per_second, max_attempts, priority, not_before, parallelism) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, coalesce($13, 0), coalesce($14, now()), \
                     coalesce($15, 1)) \
             RETURNING id",
        )
        .bind(&self.name)
        .bind(&self.table_name)
        .bind(&self.key_column)
        .bind(&self.batch_sql)
        .bind(&self.pending_predicate)
        .bind(&self.check_predicate)
        .bind(self.batch_size)
        .bind(self.min_batch_size)
        .bind(self.max_batch_size)
        .bind(self.target_batch_ms)
        .bind(self.max_rows_per_second)
        .bind(self.max_attempts)
        .bind(self.priority)
        .bind(self.not_before)
        .bind(self.parallelism)
        .fetch_one(db)
        .await
        .context(&format!("enqueueing job {:?}", self.name))
    }
}
