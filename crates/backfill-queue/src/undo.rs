//! Undo data (`backfill.undo`): reverting a job, purging its data, and its size.

use std::time::Duration;

use backfill_core::queue_sql;
use sqlx::PgPool;

use crate::{Context, QueueError};

/// What a revert covers and whether it overwrites rows changed since.
#[derive(Debug, Clone, Default)]
pub struct RevertRequest {
    /// First key to revert (inclusive), in the key column's text form; `None`: from the first.
    pub from_key: Option<String>,
    /// Last key to revert (inclusive); `None`: to the last.
    pub to_key: Option<String>,
    /// Overwrite rows someone else changed since the job wrote them.
    pub force: bool,
}

/// Enqueues a revert of `job_name` through `backfill.revert`; returns the revert job's name.
pub async fn revert<'e>(
    db: impl sqlx::PgExecutor<'e>,
    job_name: &str,
    request: &RevertRequest,
) -> Result<String, QueueError> {
    sqlx::query_scalar(queue_sql::REVERT)
        .bind(job_name)
        .bind(&request.from_key)
        .bind(&request.to_key)
        .bind(request.force)
        .fetch_one(db)
        .await
        .context(&format!("backfill.revert({job_name:?})"))
}

/// Drops the undo data of `job_name` through `backfill.purge_undo`; returns the rows dropped.
pub async fn purge_undo(pool: &PgPool, job_name: &str) -> Result<i64, QueueError> {
    sqlx::query_scalar(queue_sql::PURGE_UNDO)
        .bind(job_name)
        .fetch_one(pool)
        .await
        .context(&format!("backfill.purge_undo({job_name:?})"))
}

/// The daemon's retention: drops the undo data of jobs finished more than `retention`
/// ago; returns the rows dropped.
pub async fn purge_expired_undo(pool: &PgPool, retention: Duration) -> Result<i64, QueueError> {
    sqlx::query_scalar(queue_sql::PURGE_EXPIRED_UNDO)
        .bind(backfill_core::lease::millis(retention))
        .fetch_one(pool)
        .await
        .context("dropping expired undo data")
}

/// Undo data per job that has some: (job name, rows, bytes).
pub async fn undo_sizes(pool: &PgPool) -> Result<Vec<(String, i64, i64)>, QueueError> {
    sqlx::query_as(queue_sql::UNDO_SIZES)
        .fetch_all(pool)
        .await
        .context("reading undo data sizes")
}
