//! Dry runs for `backfilld plan`: the planner's estimate of a job's pending rows, and one
//! trial batch — the job's own key query and statement — inside a transaction that is
//! always rolled back, timed.

use std::time::{Duration, Instant};

use deadpool_postgres::Client;

use crate::target::{BatchKeys, BatchTarget};
use crate::BatchError;

/// What one trial batch did before it was rolled back.
#[derive(Debug, Clone)]
pub struct TrialBatch {
    /// Keys the batch selected (fewer than asked near the end of the table; 0 when nothing is pending).
    pub keys: usize,
    /// The batch's first and last key.
    pub key_range: Option<(String, String)>,
    /// Time to select the keys.
    pub select: Duration,
    /// Time of the batch statement on those keys.
    pub statement: Duration,
    /// Rows the statement reported as written.
    pub rows_written: u64,
    /// For a job with keep_undo: the rows of the trial keys and the bytes their keys and
    /// old values take (measured before the statement).
    pub undo_sample: Option<(u64, u64)>,
}

/// What `backfill.undo` stores per row besides its key and old values: tuple header and
/// line pointer (28), job_id (8), post_hash (33), saved_at (8), and its primary-key index
/// entry (about 16 plus the key again, counted with the key). An estimate.
pub const UNDO_ROW_OVERHEAD_BYTES: u64 = 100;

impl TrialBatch {
    /// The undo data a job with keep_undo would keep for `rows` rows, from the trial's sample.
    pub fn undo_bytes_for(&self, rows: u64) -> Option<u64> {
        let (sampled, bytes) = self.undo_sample?;
        let per_row = if sampled == 0 {
            0.0
        } else {
            bytes as f64 / sampled as f64
        };
        Some((rows as f64 * (per_row + UNDO_ROW_OVERHEAD_BYTES as f64)).round() as u64)
    }
}

impl TrialBatch {
    /// Key selection plus statement: what a batch costs before its commit.
    pub fn duration(&self) -> Duration {
        self.select + self.statement
    }
}

impl BatchTarget {
    /// The planner's estimate of the rows still pending above `after` (every pending row when
    /// `None`), without reading the table; `None` when the plan carries no estimate.
    pub async fn estimate_pending(
        &self,
        client: &mut Client,
        after: Option<&str>,
    ) -> Result<Option<i64>, BatchError> {
        let context = || {
            format!(
                "estimating pending rows of job {:?} in {}",
                self.job_name, self.table
            )
        };
        let tx = self.begin(client, &context()).await?;
        // A parallel plan reports rows per worker below its Gather; a serial one reports
        // the whole estimate on the node under the count's Aggregate.
        tx.batch_execute("SET LOCAL max_parallel_workers_per_gather = 0")
            .await
            .map_err(|e| BatchError::from_driver(context(), &e))?;
        let rows = match after {
            Some(after) => {
                tx.query(
                    &format!("EXPLAIN {}", self.sql.count_pending_after),
                    &[&after],
                )
                .await
            }
            None => {
                tx.query(&format!("EXPLAIN {}", self.sql.count_pending_all), &[])
                    .await
            }
        }
        .map_err(|e| BatchError::from_driver(context(), &e))?;
        tx.rollback()
            .await
            .map_err(|e| BatchError::from_driver(context(), &e))?;
        let plan: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        Ok(rows_under_aggregate(&plan))
    }

    /// Runs one batch of at most `limit` keys above `after` exactly as a worker would (key
    /// query, then the job's statement) and rolls it back, whatever happens: the table,
    /// the job and its checkpoint are left as they were. Like a real batch it takes row
    /// locks, waits at most the session's `lock_timeout` for them, and fires triggers.
    pub async fn trial_batch(
        &self,
        client: &mut Client,
        after: Option<&str>,
        limit: u32,
    ) -> Result<TrialBatch, BatchError> {
        let name = &self.job_name;
        // As the role that enqueued the job, like any batch: plan must not run an
        // engineer's statement with the rights of whoever runs plan.
        let tx = self.begin(client, "trial batch").await?;
        let limit = i64::from(limit);
        let started = Instant::now();
        let rows = match after {
            Some(after) => tx.query(&self.sql.keys.next, &[&after, &limit]).await,
            None => tx.query(&self.sql.keys.first, &[&limit]).await,
        }
        .map_err(|e| BatchError::from_driver(format!("job {name:?}: selecting keys"), &e))?;
        let keys: Vec<String> = rows.into_iter().map(|row| row.get(0)).collect();
        let select = started.elapsed();
        let mut trial = TrialBatch {
            keys: keys.len(),
            key_range: keys.first().cloned().zip(keys.last().cloned()),
            select,
            statement: Duration::ZERO,
            rows_written: 0,
            undo_sample: None,
        };
        if let Some(undo) = &self.undo {
            let sample = tx.query_one(&undo.measure, &[&keys]).await.map_err(|e| {
                BatchError::from_driver(format!("job {name:?}: measuring undo data"), &e)
            })?;
            let (rows, bytes): (i64, i64) = (sample.get(0), sample.get(1));
            trial.undo_sample = Some((
                u64::try_from(rows).unwrap_or(0),
                u64::try_from(bytes).unwrap_or(0),
            ));
        }
        if !keys.is_empty() {
            let started = Instant::now();
            let each = BatchKeys::Each(&keys);
            let written = tx
                .execute(&self.batch.sql, &self.statement_params(&each))
                .await;
            trial.statement = started.elapsed();
            trial.rows_written = written.map_err(|e| {
                let (first, last) = (&keys[0], &keys[keys.len() - 1]);
                BatchError::from_driver(
                    format!("job {name:?}, keys {first}..={last}: batch statement"),
                    &e,
                )
            })?;
        }
        // Dropping the transaction would roll back too, but only by a message sent later;
        // the caller must see the rollback done (or failed) before reporting.
        tx.rollback()
            .await
            .map_err(|e| BatchError::from_driver(format!("job {name:?}: ROLLBACK"), &e))?;
        Ok(trial)
    }
}

/// The row estimate of the node directly under a count's Aggregate, from EXPLAIN's text
/// output: the first line that starts a child node (`->`) carries `rows=N`.
fn rows_under_aggregate(plan: &[String]) -> Option<i64> {
    let child = plan
        .iter()
        .find(|line| line.trim_start().starts_with("->"))?;
    let rows = child.split("rows=").nth(1)?;
    rows.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::rows_under_aggregate;

    fn plan(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn the_estimate_is_read_from_the_node_under_the_aggregate() {
        let seq_scan = plan(
            "Aggregate  (cost=20406.00..20406.01 rows=1 width=8)\n\
             \x20 ->  Seq Scan on users t  (cost=0.00..17906.00 rows=999987 width=0)\n\
             \x20       Filter: (first_name IS NULL)",
        );
        assert_eq!(rows_under_aggregate(&seq_scan), Some(999_987));
        let index_scan = plan(
            "Aggregate  (cost=8.31..8.32 rows=1 width=8)\n\
             \x20 ->  Index Scan using users_pkey on users t  (cost=0.29..8.31 rows=12 width=0)\n\
             \x20       Index Cond: (id > '5'::bigint)",
        );
        assert_eq!(rows_under_aggregate(&index_scan), Some(12));
    }

    #[test]
    fn a_plan_without_a_child_node_has_no_estimate() {
        assert_eq!(
            rows_under_aggregate(&plan("Result  (cost=0.00..0.01 rows=1 width=8)")),
            None
        );
        assert_eq!(rows_under_aggregate(&[]), None);
    }
}
