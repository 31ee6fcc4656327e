//! Slices of a job with `parallelism > 1`: key ranges that are jobs of their own.
//!
//! Cutting, stealing and summing slices all happen in the queue table with row
//! locks, so any number of pods coordinate through PostgreSQL alone.

use backfill_core::lease::Lease;
use backfill_core::queue_sql;
use sqlx::PgPool;

use crate::{Context, QueueError};

/// Where the slices of a job stand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceSummary {
    /// Slices in all (0: not cut yet).
    pub total: i64,
    /// Slices not finished yet.
    pub unfinished: i64,
    /// Slices that ended `failed`, with their last error.
    pub failed: Vec<(String, Option<String>)>,
    /// Slices that ended `cancelled`.
    pub cancelled: i64,
}

/// A running slice worth splitting: its remaining keys are many.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StealCandidate {
    pub slice_id: i64,
    pub parent_id: i64,
    /// Last key done (or the slice's lower bound when it has not started).
    pub after: Option<String>,
    /// The slice's inclusive upper bound.
    pub upper_key: Option<String>,
    /// Estimated rows left in the slice.
    pub remaining: i64,
}

/// The slice operations of the queue.
#[derive(Debug, Clone)]
pub struct Slices {
    pool: PgPool,
}

impl Slices {
    /// Slice operations on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Slices { pool }
    }

    /// Cuts the leased parent job into slices at `split_keys` (ascending,
    /// exclusive lower / inclusive upper bounds between neighbours; the last slice ends
    /// at `last_key`, the job's last key when it was cut), each with an
    /// estimated row count, and gives the parent back: it is claimed again once
    /// every slice is finished. Returns false when the lease is gone.
    pub async fn cut(
        &self,
        lease: &Lease,
        split_keys: &[String],
        last_key: Option<&str>,
        estimates: &[i64],
    ) -> Result<bool, QueueError> {
        debug_assert_eq!(estimates.len(), split_keys.len() + 1);
        let parent_id = lease.job_id;
        let context = format!("cutting job {parent_id} into slices");
        let mut tx = self.pool.begin().await.context(&context)?;
        let total: i64 = estimates.iter().sum();
        let released = sqlx::query(queue_sql::CUT_RELEASE_PARENT)
            .bind(parent_id)
            .bind(lease.token.0)
            .bind(total)
            .execute(&mut *tx)
            .await
            .context(&context)?
            .rows_affected();
        if released != 1 {
            return Ok(false);
        }
        let lowers: Vec<Option<&str>> = std::iter::once(None)
            .chain(split_keys.iter().map(|k| Some(k.as_str())))
            .collect();
        let uppers: Vec<Option<&str>> = split_keys
            .iter()
            .map(|k| Some(k.as_str()))
            .chain(std::iter::once(last_key))
            .collect();
        add_slices(&mut tx, parent_id, &lowers, &uppers, estimates)
            .await
            .context(&context)?;
        tx.commit().await.context(&context)?;
        Ok(true)
    }

    /// Where the slices of `parent_id` stand.
    pub async fn summary(&self, parent_id: i64) -> Result<SliceSummary, QueueError> {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(queue_sql::SLICE_STATES)
            .bind(parent_id)
            .fetch_all(&self.pool)
            .await
            .context(&format!("reading the slices of job {parent_id}"))?;
        let mut summary = SliceSummary {
            total: rows.len() as i64,
            ..SliceSummary::default()
        };
        for (name, state, last_error) in rows {
            match state.as_str() {
                "succeeded" => {}
                "failed" => summary.failed.push((name, last_error)),
                "cancelled" => summary.cancelled += 1,
                _ => summary.unfinished += 1,
            }
        }
        Ok(summary)
    }

    /// Slices of `parent_id` being worked on now (at least 1): the job's rate
    /// budget is shared among them.
    pub async fn active(&self, parent_id: i64) -> Result<i64, QueueError> {
        let active: i64 = sqlx::query_scalar(queue_sql::ACTIVE_SLICES)
            .bind(parent_id)
            .fetch_one(&self.pool)
            .await
            .context(&format!("counting the active slices of job {parent_id}"))?;
        Ok(active.max(1))
    }

    /// The running slice with the most rows left, if it has at least `min_remaining`.
    pub async fn steal_candidate(
        &self,
        min_remaining: i64,
    ) -> Result<Option<StealCandidate>, QueueError> {
        sqlx::query_as(queue_sql::STEAL_CANDIDATE)
            .bind(min_remaining)
            .fetch_optional(&self.pool)
            .await
            .context("looking for a slice to split")
    }

    /// Splits `candidate` at `mid` (a key of type `key_type` strictly inside its
    /// remaining range): the slice keeps the keys up to `mid`, a new pending
    /// slice gets the rest. The slice's worker notices at its next commit, whose
    /// fence checks the upper bound it used. Returns false when the slice moved
    /// on past `mid` or changed meanwhile.
    pub async fn split(
        &self,
        candidate: &StealCandidate,
        key_type: &str,
        mid: &str,
        rows_moved: i64,
    ) -> Result<bool, QueueError> {
        let context = format!("splitting slice {} at {mid}", candidate.slice_id);
        let mut tx = self.pool.begin().await.context(&context)?;
        // Under the slice's row lock: its checkpoint is still below mid and its bounds are unchanged.
        let shrunk = sqlx::query(&queue_sql::shrink_slice(key_type))
            .bind(candidate.slice_id)
            .bind(mid)
            .bind(&candidate.upper_key)
            .bind(rows_moved)
            .execute(&mut *tx)
            .await
            .context(&context)?
            .rows_affected();
        if shrunk != 1 {
            return Ok(false);
        }
        add_slices(
            &mut tx,
            candidate.parent_id,
            &[Some(mid)],
            &[candidate.upper_key.as_deref()],
            &[rows_moved],
        )
        .await
        .context(&context)?;
        tx.commit().await.context(&context)?;
        Ok(true)
    }

    /// The slice's current upper bound (it shrinks when another worker steals).
    pub async fn upper_key(&self, slice_id: i64) -> Result<Option<String>, QueueError> {
        sqlx::query_scalar(queue_sql::SLICE_UPPER_KEY)
            .bind(slice_id)
            .fetch_one(&self.pool)
            .await
            .context(&format!("reading the bounds of slice {slice_id}"))
    }
}

/// Adds slices of `parent_id`, one per (lower, upper, estimate), numbered after
/// the slices it already has and copying its definition. Used both to cut a job
/// and to split off the upper part of a running slice.
async fn add_slices(
    tx: &mut sqlx::PgConnection,
    parent_id: i64,
    lowers: &[Option<&str>],
    uppers: &[Option<&str>],
    estimates: &[i64],
) -> Result<(), sqlx::Error> {
    sqlx::query(queue_sql::ADD_SLICES)
        .bind(parent_id)
        .bind(lowers)
        .bind(uppers)
        .bind(estimates)
        .execute(&mut *tx)
        .await
        .map(|_| ())
}
