//! Slices of a job with `parallelism > 1`: key ranges that are jobs of their own.
//!
//! Cutting, stealing and summing slices all happen in the queue table with row
//! locks, so any number of pods coordinate through PostgreSQL alone.

use sqlx::PgPool;

use crate::{Context, QueueError};
use backfill_core::lease::Lease;

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
        let released = sqlx::query(
            "UPDATE backfill.jobs \
                SET lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
                    rows_total_estimate = $3, updated_at = now() \
              WHERE id = $1 AND lease_token = $2 AND state = 'running'",
        )
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
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT name, state, last_error FROM backfill.jobs WHERE parent_id = $1 ORDER BY slice_no",
        )
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
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM backfill.jobs \
              WHERE parent_id = $1 AND state = 'running' AND lease_expires_at > now()",
        )
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
        sqlx::query_as(
            "SELECT id AS slice_id, parent_id, coalesce(checkpoint, lower_key) AS after, upper_key, \
                    rows_total_estimate - rows_done AS remaining \
               FROM backfill.jobs \
              WHERE parent_id IS NOT NULL AND state = 'running' AND phase = 'scan' \
                AND lease_expires_at > now() AND rows_total_estimate - rows_done >= $1 \
              ORDER BY remaining DESC LIMIT 1",
        )
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
        let shrunk = sqlx::query(&format!(
            "UPDATE backfill.jobs \
                SET upper_key = $2, rows_total_estimate = rows_total_estimate - $4, updated_at = now() \
              WHERE id = $1 AND state = 'running' AND upper_key IS NOT DISTINCT FROM $3 \
                AND (coalesce(checkpoint, lower_key) IS NULL \
                     OR coalesce(checkpoint, lower_key)::{key_type} < $2::text::{key_type}) \
                AND ($3::text IS NULL OR $2::text::{key_type} < $3::text::{key_type})"
        ))
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
        sqlx::query_scalar("SELECT upper_key FROM backfill.jobs WHERE id = $1")
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
    sqlx::query(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, \
             check_predicate, batch_size, min_batch_size, max_batch_size, target_batch_ms, \
             max_rows_per_second, max_attempts, priority, not_before, created_at, \
             parent_id, slice_no, lower_key, upper_key, rows_total_estimate, enqueued_by, search_path, \
             keep_undo, undo_columns) \
         SELECT p.name || '#' || (n.taken + s.n), p.table_name, p.key_column, p.batch_sql, \
                p.pending_predicate, p.check_predicate, p.batch_size, p.min_batch_size, \
                p.max_batch_size, p.target_batch_ms, p.max_rows_per_second, p.max_attempts, \
                p.priority, p.not_before, p.created_at, \
                p.id, n.taken + s.n, s.lower_key, s.upper_key, s.estimate, p.enqueued_by, p.search_path, \
                p.keep_undo, p.undo_columns \
           FROM backfill.jobs p, \
                (SELECT coalesce(max(slice_no), 0) AS taken FROM backfill.jobs WHERE parent_id = $1) n, \
                unnest($2::text[], $3::text[], $4::int8[]) WITH ORDINALITY AS s(lower_key, upper_key, estimate, n) \
          WHERE p.id = $1",
    )
    .bind(parent_id)
    .bind(lowers)
    .bind(uppers)
    .bind(estimates)
    .execute(&mut *tx)
    .await
    .map(|_| ())
}
