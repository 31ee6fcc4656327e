//! One batch: select the next keys, run the job's statement on them, record
//! failed keys, advance the checkpoint and counters — all in one transaction
//! that commits only while the worker still holds the job's lease.

use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};

use backfill_core::bisect::{BisectStep, Bisection};
use backfill_core::error_class::ErrorClass;
use backfill_core::placeholders::Placeholder;
use deadpool_postgres::{Pool, Transaction};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::target::BatchTarget;
use crate::BatchError;

/// The lease a batch must still hold to commit.
#[derive(Debug, Clone, Copy)]
pub struct Fence {
    pub job_id: i64,
    pub token: Uuid,
    /// A committed batch also extends the lease by this much.
    pub lease: Duration,
}

/// Where a batch's keys come from.
#[derive(Debug, Clone, Copy)]
pub enum KeySource<'a> {
    /// The next keys above the checkpoint (`None`: from the first key).
    After(Option<&'a str>),
    /// Like `After`, skipping keys already recorded as failed (verification sweeps).
    AfterExcludingFailed(Option<&'a str>),
    /// Keys in `failed_rows` due for another attempt.
    FailedRows { max_attempts: i32 },
}

/// Retry timing for failed keys: the n-th failure waits `base · 2^(n-1)`, at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct RetryBackoff {
    pub base: Duration,
    pub max: Duration,
}

/// What a committed batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    /// Keys selected for the batch.
    pub keys: usize,
    /// Keys whose statement committed.
    pub applied: usize,
    /// Keys recorded in `failed_rows` (row-level errors).
    pub failed: usize,
    /// The batch's largest key: the new checkpoint when scanning.
    pub last_key: Option<String>,
    /// Statements run, counting bisection attempts.
    pub statements: usize,
    /// Isolated failing keys with their error, for logging.
    pub failures: Vec<(String, BatchError)>,
}

/// How a batch ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// Committed, with its checkpoint and counters.
    Committed {
        stats: BatchStats,
        duration: Duration,
    },
    /// The key source had nothing left; nothing was written.
    NoKeys,
    /// The lease is gone or the job is no longer running: rolled back.
    Fenced,
    /// Rolled back because of a transient or job-level error.
    Failed {
        error: BatchError,
        duration: Duration,
    },
}

/// Runs batches of one job on the data-plane pool.
#[derive(Clone)]
pub struct BatchRunner {
    pool: Pool,
    backoff: RetryBackoff,
}

const FENCE_SQL: &str = "UPDATE backfill.jobs \
       SET checkpoint = coalesce($3, checkpoint), rows_done = rows_done + $4, \
           batches_done = batches_done + 1, \
           lease_expires_at = greatest(lease_expires_at, now() + $5::int8 * interval '1 millisecond'), \
           heartbeat_at = now(), updated_at = now() \
     WHERE id = $1 AND lease_token = $2 AND state = 'running'";

const RECORD_FAILED_SQL: &str = "INSERT INTO backfill.failed_rows AS f (job_id, key, sqlstate, message, reason, next_attempt_at) \
     SELECT $1, k, s, m, 'error', now() + $5::int8 * interval '1 millisecond' \
       FROM unnest($2::text[], $3::text[], $4::text[]) AS u(k, s, m) \
     ON CONFLICT (job_id, key) DO UPDATE \
       SET attempts = f.attempts + 1, sqlstate = excluded.sqlstate, message = excluded.message, \
           last_failed_at = now(), \
           next_attempt_at = now() + least($5::int8 * power(2, f.attempts), $6::int8) * interval '1 millisecond'";

const FORGET_FAILED_SQL: &str =
    "DELETE FROM backfill.failed_rows WHERE job_id = $1 AND key = ANY($2::text[])";

impl BatchRunner {
    /// A runner on `pool`; failed keys are retried with `backoff`.
    pub fn new(pool: Pool, backoff: RetryBackoff) -> Self {
        BatchRunner { pool, backoff }
    }

    /// The pool, for probes and counts.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs one batch of at most `limit` keys from `source`.
    ///
    /// When `stop` completes before the batch does, the running statement is
    /// cancelled on the server and the batch rolls back (`Failed` with
    /// `canceled_by_us`): shutdown and "we are blocking production" use this.
    pub async fn run(
        &self,
        target: &BatchTarget,
        fence: Fence,
        source: KeySource<'_>,
        limit: u32,
        stop: impl Future<Output = ()>,
    ) -> RunOutcome {
        let started = Instant::now();
        let mut client = match self.pool.get().await {
            Ok(client) => client,
            Err(e) => {
                let error = BatchError::from_pool(
                    format!("job {:?}: getting a connection", target.job_name),
                    &e,
                );
                return RunOutcome::Failed {
                    error,
                    duration: started.elapsed(),
                };
            }
        };
        let cancel = client.cancel_token();
        let mut work = pin!(self.run_on(&mut client, target, fence, source, limit));
        let mut stop = pin!(stop);
        let mut canceled = false;
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                () = &mut stop, if !canceled => {
                    canceled = true;
                    // The statement ends with query_canceled; its transaction rolls back.
                    let _ = cancel.cancel_query(NoTls).await;
                }
            }
        };
        let duration = started.elapsed();
        match result {
            Ok(Some(stats)) => RunOutcome::Committed { stats, duration },
            Ok(None) => RunOutcome::NoKeys,
            Err(BatchFailure::Fenced) => RunOutcome::Fenced,
            Err(BatchFailure::Error(mut error)) => {
                error.canceled_by_us |= canceled;
                RunOutcome::Failed { error, duration }
            }
        }
    }

    async fn run_on(
        &self,
        client: &mut deadpool_postgres::Object,
        target: &BatchTarget,
        fence: Fence,
        source: KeySource<'_>,
        limit: u32,
    ) -> Result<Option<BatchStats>, BatchFailure> {
        let name = &target.job_name;
        let tx = client
            .transaction()
            .await
            .map_err(|e| BatchError::from_driver(format!("job {name:?}: BEGIN"), &e))?;
        let keys = select_keys(&tx, target, source, limit).await?;
        let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
            return Ok(None);
        };
        let range = format!("job {name:?}, keys {first}..={last}");
        let mut stats = BatchStats {
            keys: keys.len(),
            last_key: Some(last.clone()),
            ..BatchStats::default()
        };

        // Happy path first: the whole batch in one statement, no savepoint cost.
        stats.statements += 1;
        match run_statement(&tx, target, &keys).await {
            Ok(()) => stats.applied = keys.len(),
            Err(e) => {
                let error = BatchError::from_driver(format!("{range}: batch statement"), &e);
                if error.class() != ErrorClass::RowLevel {
                    return Err(error.into());
                }
                // The failed statement aborted the transaction: start over and bisect.
                drop(tx.rollback().await);
                return Box::pin(self.bisect_on(client, target, fence, source, keys, stats)).await;
            }
        }
        self.commit(tx, target, fence, source, &keys, stats)
            .await
            .map(Some)
    }

    /// Re-runs the batch's keys in savepoints, halving failing ranges until the
    /// failing keys are isolated; every other key is applied.
    async fn bisect_on(
        &self,
        client: &mut deadpool_postgres::Object,
        target: &BatchTarget,
        fence: Fence,
        source: KeySource<'_>,
        keys: Vec<String>,
        mut stats: BatchStats,
    ) -> Result<Option<BatchStats>, BatchFailure> {
        let name = &target.job_name;
        let tx = client
            .transaction()
            .await
            .map_err(|e| BatchError::from_driver(format!("job {name:?}: BEGIN"), &e))?;
        let mut bisection: Bisection<BatchError> = Bisection::new(keys.len());
        while let BisectStep::Try(range) = bisection.next_step() {
            let slice = &keys[range.clone()];
            let context = format!(
                "job {name:?}, keys {}..={}",
                slice[0],
                slice[slice.len() - 1]
            );
            let savepoint = |sql: &'static str| {
                let context = context.clone();
                let tx = &tx;
                async move {
                    tx.batch_execute(sql)
                        .await
                        .map_err(|e| BatchError::from_driver(context, &e))
                }
            };
            savepoint("SAVEPOINT bisect").await?;
            stats.statements += 1;
            match run_statement(&tx, target, slice).await {
                Ok(()) => {
                    savepoint("RELEASE SAVEPOINT bisect").await?;
                    bisection.report_ok();
                }
                Err(e) => {
                    let error = BatchError::from_driver(format!("{context}: batch statement"), &e);
                    if error.class() != ErrorClass::RowLevel {
                        return Err(error.into());
                    }
                    savepoint("ROLLBACK TO SAVEPOINT bisect").await?;
                    bisection.report_failed(error);
                }
            }
        }
        stats.failures = bisection
            .failed()
            .iter()
            .map(|(index, error)| (keys[*index].clone(), error.clone()))
            .collect();
        stats.failed = stats.failures.len();
        stats.applied = keys.len() - stats.failed;
        self.commit(tx, target, fence, source, &keys, stats)
            .await
            .map(Some)
    }

    /// Records failures, advances the checkpoint under the fence, commits.
    async fn commit(
        &self,
        tx: Transaction<'_>,
        target: &BatchTarget,
        fence: Fence,
        source: KeySource<'_>,
        keys: &[String],
        stats: BatchStats,
    ) -> Result<BatchStats, BatchFailure> {
        let context = |step: &str| format!("job {:?}: {step}", target.job_name);
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if !stats.failures.is_empty() {
            let failed_keys: Vec<&str> = stats.failures.iter().map(|(k, _)| k.as_str()).collect();
            let states: Vec<Option<&str>> = stats
                .failures
                .iter()
                .map(|(_, e)| e.sqlstate.as_deref())
                .collect();
            let messages: Vec<&str> = stats
                .failures
                .iter()
                .map(|(_, e)| e.message.as_str())
                .collect();
            tx.execute(
                RECORD_FAILED_SQL,
                &[
                    &fence.job_id,
                    &failed_keys,
                    &states,
                    &messages,
                    &millis(self.backoff.base),
                    &millis(self.backoff.max),
                ],
            )
            .await
            .map_err(|e| BatchError::from_driver(context("recording failed rows"), &e))?;
        }
        let checkpoint = match source {
            KeySource::After(_) | KeySource::AfterExcludingFailed(_) => stats.last_key.as_deref(),
            KeySource::FailedRows { .. } => {
                // Retried keys that now apply leave failed_rows.
                let failed: std::collections::HashSet<&str> =
                    stats.failures.iter().map(|(k, _)| k.as_str()).collect();
                let applied: Vec<&str> = keys
                    .iter()
                    .map(String::as_str)
                    .filter(|k| !failed.contains(k))
                    .collect();
                tx.execute(FORGET_FAILED_SQL, &[&fence.job_id, &applied])
                    .await
                    .map_err(|e| BatchError::from_driver(context("forgetting retried rows"), &e))?;
                None
            }
        };
        let applied = i64::try_from(stats.applied).unwrap_or(i64::MAX);
        let fenced = tx
            .execute(
                FENCE_SQL,
                &[
                    &fence.job_id,
                    &fence.token,
                    &checkpoint,
                    &applied,
                    &millis(fence.lease),
                ],
            )
            .await
            .map_err(|e| BatchError::from_driver(context("advancing the checkpoint"), &e))?;
        if fenced != 1 {
            drop(tx.rollback().await);
            return Err(BatchFailure::Fenced);
        }
        tx.commit()
            .await
            .map_err(|e| BatchError::from_driver(context("COMMIT"), &e))?;
        Ok(stats)
    }
}

enum BatchFailure {
    Fenced,
    Error(BatchError),
}

impl From<BatchError> for BatchFailure {
    fn from(e: BatchError) -> Self {
        BatchFailure::Error(e)
    }
}

async fn select_keys(
    tx: &Transaction<'_>,
    target: &BatchTarget,
    source: KeySource<'_>,
    limit: u32,
) -> Result<Vec<String>, BatchError> {
    let limit = i64::from(limit);
    let sql = &target.sql;
    let rows = match source {
        KeySource::After(None) => tx.query(&sql.first_keys, &[&limit]).await,
        KeySource::After(Some(after)) => tx.query(&sql.next_keys, &[&after, &limit]).await,
        KeySource::AfterExcludingFailed(None) => {
            tx.query(&sql.first_keys_excluding_failed, &[&limit]).await
        }
        KeySource::AfterExcludingFailed(Some(after)) => {
            tx.query(&sql.next_keys_excluding_failed, &[&after, &limit])
                .await
        }
        KeySource::FailedRows { max_attempts } => {
            tx.query(&sql.retry_keys, &[&max_attempts, &limit]).await
        }
    }
    .map_err(|e| {
        BatchError::from_driver(
            format!("job {:?}: selecting the next keys", target.job_name),
            &e,
        )
    })?;
    Ok(rows.into_iter().map(|row| row.get(0)).collect())
}

/// Runs the job's statement on `keys` (in key order), binding each placeholder.
async fn run_statement(
    tx: &Transaction<'_>,
    target: &BatchTarget,
    keys: &[String],
) -> Result<(), tokio_postgres::Error> {
    let statement = tx.prepare_cached(&target.batch.sql).await?;
    let first = &keys[0];
    let last = &keys[keys.len() - 1];
    let params: Vec<&(dyn ToSql + Sync)> = target
        .batch
        .params
        .iter()
        .map(|p| -> &(dyn ToSql + Sync) {
            match p {
                Placeholder::Keys => &keys,
                Placeholder::FirstKey => first,
                Placeholder::LastKey => last,
            }
        })
        .collect();
    tx.execute(&statement, &params).await.map(|_| ())
}
