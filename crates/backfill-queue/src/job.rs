//! A backfill job as stored in `backfill.jobs`.

use std::fmt;
use std::str::FromStr;

use backfill_core::job_spec::{JobSpec, JobTunables};
use backfill_core::queue_sql;
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

impl TryFrom<String> for JobState {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
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

impl TryFrom<String> for Phase {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A job's definition and progress, as a worker sees it after claiming.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub id: i64,
    /// What the job runs, on which table.
    #[sqlx(flatten)]
    pub spec: JobSpec,
    /// The job's own tuning columns as claimed (a live retune changes them later).
    #[sqlx(flatten)]
    pub tunables: JobTunables,
    #[sqlx(try_from = "String")]
    pub state: JobState,
    #[sqlx(try_from = "String")]
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

/// A job to enqueue: the same columns an engineer would INSERT.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub spec: JobSpec,
    pub tunables: JobTunables,
    pub priority: Option<i32>,
    pub not_before: Option<DateTime<Utc>>,
    pub parallelism: Option<i32>,
}

impl NewJob {
    /// Inserts the job exactly as an engineer's INSERT would, so the same
    /// validation trigger refuses bad definitions (on a pool, or inside a transaction);
    /// returns the job id.
    pub async fn enqueue<'e>(&self, db: impl sqlx::PgExecutor<'e>) -> Result<i64, QueueError> {
        let (spec, tunables) = (&self.spec, &self.tunables);
        sqlx::query_scalar(queue_sql::ENQUEUE)
            .bind(&spec.name)
            .bind(&spec.table_name)
            .bind(&spec.key_column)
            .bind(&spec.batch_sql)
            .bind(&spec.pending_predicate)
            .bind(&spec.check_predicate)
            .bind(tunables.batch_size)
            .bind(tunables.min_batch_size)
            .bind(tunables.max_batch_size)
            .bind(tunables.target_batch_ms)
            .bind(tunables.max_rows_per_second)
            .bind(tunables.max_attempts)
            .bind(self.priority)
            .bind(self.not_before)
            .bind(self.parallelism)
            .fetch_one(db)
            .await
            .context(&format!("enqueueing job {:?}", spec.name))
    }
}
