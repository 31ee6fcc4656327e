//! One batch: select the next keys, run the job's statement on them, check the
//! result, record failed keys, advance the checkpoint and counters — all in one
//! transaction that commits only while the worker still holds the job's lease.
//!
//! # Failing rows
//!
//! The statement first runs once on the whole batch, without a savepoint. When it
//! fails with a row-level error, the transaction is rolled back and the batch is
//! run again in a new one, bisecting with savepoints (see
//! [`backfill_core::bisect`]) until the failing keys are isolated; every other
//! key is applied, and the failing keys are recorded in `backfill.failed_rows`
//! in the same transaction as the checkpoint.
//!
//! Savepoints rather than separate transactions, because the applied keys, the
//! failed-row records and the checkpoint must commit together for a batch to
//! apply exactly once. Their cost: a released savepoint keeps its subtransaction
//! ID in the backend's cache until the transaction ends, and past 64 of them
//! (`PGPROC_MAX_CACHED_SUBXIDS`) the cache overflows and every snapshot on the
//! primary and its standbys gets slower while the transaction lasts. A bisecting
//! transaction therefore releases at most [`MAX_RELEASED_SAVEPOINTS`]; at that
//! point it commits the resolved prefix of its keys and leaves the rest to the
//! next batch. Rolled-back savepoints leave the cache, so a batch in which every
//! key fails never fills it.
//!
//! # check_predicate
//!
//! A job's optional `check_predicate` is true for rows whose new shape disagrees
//! with the old. It is evaluated on the keys of every statement run, right after
//! the statement and in the same transaction, and it works like a CHECK
//! constraint: a row for which it holds is not applied (its change is rolled
//! back with the rest of the statement and bisection isolates it) and its key is
//! recorded with reason `verification`. Such a row keeps its old shape, so the
//! job cannot end `succeeded` while it is recorded. Automatic retries skip
//! verification failures, as batch_sql would compute the same values from the
//! same data again; `backfill.retry_failed(name)` re-runs them once the data or
//! the job is fixed.
//!
//! # A first batch where every key fails
//!
//! When every key of a job's first batch fails alone with the same SQLSTATE (or
//! check_predicate holds for all of them), and there were enough of them for the
//! bisection to walk key by key, the statement itself is almost certainly wrong
//! (say, a cast that cannot work for any row). Recording every key of the table in
//! `failed_rows` would help no one, so the batch rolls back and the job fails with
//! a message saying so. Only the first batch is judged this way: later batches,
//! retries and verification sweeps may legitimately consist of bad rows only.
//!
//! # Rooms
//!
//! This file: the batch's types, its transaction, bisection and the fenced commit;
//! `batch_keys.rs`: selecting the keys; `batch_statement.rs`: running the statement and
//! check_predicate on them, and judging a first batch where every key failed.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backfill_core::bisect::{BisectStep, Bisection};
use backfill_core::lease::{millis, Lease};
use backfill_core::queue_sql;
use deadpool_postgres::{Pool, Transaction};
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::batch_keys::{select_keys, SelectedKeys};
use crate::batch_statement::{apply, check_predicate_error, wrong_statement_error, Applied};
use crate::pool::Endpoint;
use crate::target::{BatchKeys, BatchTarget};
use crate::target_reads::PassWrites;
use crate::BatchError;

/// Savepoints a bisecting transaction may release before it commits what it has
/// resolved: well under PostgreSQL's 64 cached subtransactions per backend, with
/// room for subtransactions of the job's own (PL/pgSQL exception blocks).
pub const MAX_RELEASED_SAVEPOINTS: usize = 48;

/// Where a running batch publishes the backend pid of its connection, so that whoever
/// watches for sessions it blocks can tell them from those another batch of this process
/// blocks.
#[derive(Debug, Clone, Default)]
pub struct BatchBackend(Arc<AtomicI32>);

impl BatchBackend {
    /// The pid of the batch's backend, once the batch has started.
    pub fn pid(&self) -> Option<i32> {
        Some(self.0.load(Ordering::Relaxed)).filter(|pid| *pid != 0)
    }

    fn set(&self, pid: i32) {
        self.0.store(pid, Ordering::Relaxed);
    }
}

/// What a batch is to select: up to `limit` keys from `source`; a key whose row one of
/// `pass_writes` wrote (the pass's own batches) fails the batch: the job's statement
/// moved it.
#[derive(Debug, Clone, Copy)]
pub struct BatchRequest<'a> {
    pub source: KeySource<'a>,
    pub limit: u32,
    pub pass_writes: &'a PassWrites,
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

/// Why a key was set aside: the `reason` column of `backfill.failed_rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// The batch statement failed for this key alone.
    Error,
    /// The statement ran, but check_predicate held for the row afterwards.
    Verification,
}

impl FailureReason {
    /// The value stored in `backfill.failed_rows.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Error => "error",
            FailureReason::Verification => "verification",
        }
    }
}

/// A key set aside in `backfill.failed_rows`, with why.
#[derive(Debug, Clone)]
pub struct RowFailure {
    pub key: String,
    pub reason: FailureReason,
    /// The statement's error; for a verification failure, what disagreed (no SQLSTATE).
    pub error: BatchError,
}

/// What a committed batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    /// Keys the batch settled: applied or recorded. Usually all keys selected; fewer
    /// when a bisection stopped at [`MAX_RELEASED_SAVEPOINTS`].
    pub keys: usize,
    /// Keys whose statement committed.
    pub applied: usize,
    /// Keys recorded in `failed_rows`.
    pub failed: usize,
    /// Retried keys whose rows no longer exist: forgotten, neither applied nor failed.
    pub vanished: Vec<String>,
    /// The batch's largest settled key: the new checkpoint when scanning.
    pub last_key: Option<String>,
    /// Batch statements run, bisection attempts included (check_predicate
    /// queries are not counted).
    pub statements: usize,
    /// Isolated failing keys with their error, for logging.
    pub failures: Vec<RowFailure>,
    /// The batch's transaction (`txid_current()`), for [`PassWrites`].
    pub txid: i64,
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
    /// How cancel requests reach the server: like the pool's connections (TLS or not).
    cancel_tls: Option<MakeRustlsConnect>,
}

impl BatchRunner {
    /// A runner on `pool`; failed keys are retried with `backoff`.
    pub fn new(pool: Pool, backoff: RetryBackoff) -> Self {
        BatchRunner {
            pool,
            backoff,
            cancel_tls: None,
        }
    }

    /// Sends cancel requests the way `endpoint` connects: a pool on `sslmode=require`
    /// or stricter refuses a plaintext cancel request.
    pub fn cancelling_over(mut self, endpoint: &Endpoint) -> Self {
        self.cancel_tls = Some(endpoint.tls());
        self
    }

    /// A pooled data-plane session for `job`'s `step` (a batch, or a read between batches).
    pub(crate) async fn session_for(
        &self,
        job: &str,
        step: &str,
    ) -> Result<deadpool_postgres::Client, BatchError> {
        self.pool.get().await.map_err(|e| {
            BatchError::from_pool(format!("job {job:?}: getting a connection for {step}"), &e)
        })
    }

    /// Runs one batch as `request` says, publishing its backend's pid in `backend` before
    /// its statement runs.
    ///
    /// When `stop` completes before the batch does, the running statement is
    /// cancelled on the server and the batch rolls back (`Failed` with
    /// `canceled_by_us`): shutdown and "we are blocking production" use this.
    pub async fn run(
        &self,
        target: &BatchTarget,
        lease: &Lease,
        request: BatchRequest<'_>,
        backend: &BatchBackend,
        stop: impl Future<Output = ()>,
    ) -> RunOutcome {
        let started = Instant::now();
        let mut client = match self.session_for(&target.job_name, "a batch").await {
            Ok(client) => client,
            Err(error) => {
                return RunOutcome::Failed {
                    error,
                    duration: started.elapsed(),
                };
            }
        };
        let cancel = client.cancel_token();
        let mut work = pin!(self.run_on(&mut client, target, lease, request, backend));
        let mut stop = pin!(stop);
        let mut canceled = false;
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                () = &mut stop, if !canceled => {
                    canceled = true;
                    // The statement ends with query_canceled; its transaction rolls back.
                    let _ = match &self.cancel_tls {
                        Some(tls) => cancel.cancel_query(tls.clone()).await,
                        None => cancel.cancel_query(NoTls).await,
                    };
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
        lease: &Lease,
        request: BatchRequest<'_>,
        backend: &BatchBackend,
    ) -> Result<Option<BatchStats>, BatchFailure> {
        let name = &target.job_name;
        let source = request.source;
        let tx = client
            .transaction()
            .await
            .map_err(|e| BatchError::from_driver(format!("job {name:?}: BEGIN"), &e))?;
        // The job's session first (its role reads the keys), then the key selection
        // pipelined behind it: no round trip of its own once the statement is cached.
        let (pid, selected) = tokio::join!(
            target.session.enter(&tx, name),
            select_keys(&tx, target, request, false)
        );
        backend.set(pid?);
        let (selected, vanished) = selected?;
        let Some(selected) = selected else {
            if vanished.is_empty() {
                return Ok(None);
            }
            // Only retried keys whose rows are gone: nothing to run, they are forgotten.
            let stats = BatchStats {
                vanished,
                ..BatchStats::default()
            };
            return self
                .commit(tx, target, lease, source, CommitKeys::default(), stats)
                .await
                .map(Some);
        };
        let keys = selected.batch_keys();
        let (first, last) = keys.first_and_last();
        let range = format!("job {name:?}, keys {first}..={last}");

        // Happy path first: the whole batch in one statement, no savepoint cost.
        // Disagreeing rows' changes must go, and only theirs; a row-level error (which
        // aborted the transaction) is bisected; any other error ends the batch.
        let bisect = !matches!(apply(&tx, target, keys, &range).await?, Applied::Agrees);
        if bisect {
            drop(tx.rollback().await);
            let keys = match selected {
                SelectedKeys::Each(keys) => keys,
                // Bisection needs each key: the same selection, listed this time.
                SelectedKeys::Span { .. } => {
                    let tx = client
                        .transaction()
                        .await
                        .map_err(|e| BatchError::from_driver(format!("job {name:?}: BEGIN"), &e))?;
                    target.session.enter(&tx, name).await?;
                    let (listed, _) = select_keys(&tx, target, request, true).await?;
                    drop(tx.rollback().await);
                    match listed {
                        Some(SelectedKeys::Each(keys)) => keys,
                        _ => return Ok(None),
                    }
                }
            };
            return Box::pin(self.bisect_on(client, target, lease, source, keys, vanished)).await;
        }
        let count = selected.count();
        let stats = BatchStats {
            keys: count,
            applied: count,
            vanished,
            last_key: Some(last.clone()),
            statements: 1,
            ..BatchStats::default()
        };
        let keys = CommitKeys {
            settled: selected.listed(),
            ran: selected.listed(),
        };
        self.commit(tx, target, lease, source, keys, stats)
            .await
            .map(Some)
    }

    /// Re-runs the batch's keys in savepoints, halving failing ranges until the
    /// failing keys are isolated; every other key is applied. Stops early, with
    /// the resolved prefix of the keys, after [`MAX_RELEASED_SAVEPOINTS`].
    async fn bisect_on(
        &self,
        client: &mut deadpool_postgres::Object,
        target: &BatchTarget,
        lease: &Lease,
        source: KeySource<'_>,
        keys: Vec<String>,
        vanished: Vec<String>,
    ) -> Result<Option<BatchStats>, BatchFailure> {
        let name = &target.job_name;
        let tx = client
            .transaction()
            .await
            .map_err(|e| BatchError::from_driver(format!("job {name:?}: BEGIN"), &e))?;
        target.session.enter(&tx, name).await?;
        // The whole-batch statement that failed before counts too.
        let mut statements = 1;
        let mut released = 0;
        let mut bisection: Bisection<(FailureReason, BatchError)> = Bisection::new(keys.len());
        while released < MAX_RELEASED_SAVEPOINTS {
            let BisectStep::Try(range) = bisection.next_step() else {
                break;
            };
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
            // A statement released earlier in this transaction may have changed the
            // session (its set_config(…, true) lasts): the keys below are parsed pinned.
            target.session.repin(&tx, &context).await?;
            statements += 1;
            match apply(&tx, target, BatchKeys::Each(slice), &context).await? {
                Applied::Agrees => {
                    savepoint("RELEASE SAVEPOINT bisect").await?;
                    released += 1;
                    bisection.report_ok();
                }
                Applied::Disagrees => {
                    savepoint("ROLLBACK TO SAVEPOINT bisect").await?;
                    bisection.report_failed((
                        FailureReason::Verification,
                        check_predicate_error(context),
                    ));
                }
                Applied::RowError(error) => {
                    savepoint("ROLLBACK TO SAVEPOINT bisect").await?;
                    bisection.report_failed((FailureReason::Error, error));
                }
            }
        }
        let settled = &keys[..bisection.resolved_prefix()];
        let failures: Vec<RowFailure> = bisection
            .failed()
            .iter()
            .map(|(index, (reason, error))| RowFailure {
                key: keys[*index].clone(),
                reason: *reason,
                error: error.clone(),
            })
            .collect();
        if let Some(error) = wrong_statement_error(target, source, &bisection, &keys, &failures) {
            drop(tx.rollback().await);
            return Err(error.into());
        }
        let stats = BatchStats {
            keys: settled.len(),
            applied: settled.len() - failures.len(),
            failed: failures.len(),
            vanished,
            last_key: settled.last().cloned(),
            statements,
            failures,
            txid: 0, // set by the commit
        };
        // Every key a statement ran on: a released savepoint may lie past the settled prefix.
        let keys = CommitKeys {
            settled,
            ran: &keys,
        };
        self.commit(tx, target, lease, source, keys, stats)
            .await
            .map(Some)
    }

    /// Leaves the job's session (saving undo hashes on the way), records failures,
    /// advances the checkpoint under the fence, commits.
    /// The stats' `vanished` keys (retried, their rows gone) are forgotten, not applied.
    async fn commit(
        &self,
        tx: Transaction<'_>,
        target: &BatchTarget,
        lease: &Lease,
        source: KeySource<'_>,
        keys: CommitKeys<'_>,
        stats: BatchStats,
    ) -> Result<BatchStats, BatchFailure> {
        let CommitKeys {
            settled: keys,
            ran: undo_keys,
        } = keys;
        let context = |step: &str| format!("job {:?}: {step}", target.job_name);
        // Our writes run as the daemon, and only after SQL that left the role alone.
        match &target.undo {
            // Hashes the new values as the job's role first, then leaves its session.
            Some(undo) if !undo_keys.is_empty() => {
                let context = format!("job {:?}", target.job_name);
                undo.save(&tx, &target.session, undo_keys, &context).await?
            }
            _ => {
                target
                    .session
                    .leave(&tx, &context("after its statement"))
                    .await?
            }
        }
        if !stats.failures.is_empty() {
            let column = |field: fn(&RowFailure) -> Option<&str>| -> Vec<Option<&str>> {
                stats.failures.iter().map(field).collect()
            };
            tx.execute(
                queue_sql::RECORD_FAILED,
                &[
                    &target.owner_id,
                    &column(|f| Some(f.key.as_str())),
                    &column(|f| Some(f.reason.as_str())),
                    &column(|f| f.error.sqlstate.as_deref()),
                    &column(|f| Some(f.error.message.as_str())),
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
                    stats.failures.iter().map(|f| f.key.as_str()).collect();
                let applied: Vec<&str> = keys
                    .iter()
                    .map(String::as_str)
                    .filter(|k| !failed.contains(k))
                    .chain(stats.vanished.iter().map(String::as_str))
                    .collect();
                tx.execute(queue_sql::FORGET_FAILED, &[&target.owner_id, &applied])
                    .await
                    .map_err(|e| BatchError::from_driver(context("forgetting retried rows"), &e))?;
                None
            }
        };
        let applied = i64::try_from(stats.applied).unwrap_or(i64::MAX);
        let fence_statement = tx
            .prepare_cached(queue_sql::FENCE_BATCH)
            .await
            .map_err(|e| BatchError::from_driver(context("advancing the checkpoint"), &e))?;
        let fenced = tx
            .query_opt(
                &fence_statement,
                &[
                    &lease.job_id,
                    &lease.token.0,
                    &checkpoint,
                    &applied,
                    &lease.millis(),
                    // A slice split meanwhile has a lower upper bound: keys of this
                    // batch may now belong to another slice, so it must not commit.
                    &target.upper_key,
                ],
            )
            .await
            .map_err(|e| BatchError::from_driver(context("advancing the checkpoint"), &e))?;
        let Some(fenced) = fenced else {
            drop(tx.rollback().await);
            return Err(BatchFailure::Fenced);
        };
        let stats = BatchStats {
            txid: fenced.get(0),
            ..stats
        };
        tx.commit()
            .await
            .map_err(|e| BatchError::from_driver(context("COMMIT"), &e))?;
        Ok(stats)
    }
}

/// The keys a commit needs, listed.
#[derive(Default)]
struct CommitKeys<'a> {
    /// The keys the batch settled (always listed for retried keys, the only batches that
    /// need them at commit); empty for a span.
    settled: &'a [String],
    /// Every key a statement of the batch ran on, for the undo hashes (a released
    /// savepoint may lie past the settled prefix).
    ran: &'a [String],
}

pub(crate) enum BatchFailure {
    Fenced,
    Error(BatchError),
}

impl From<BatchError> for BatchFailure {
    fn from(e: BatchError) -> Self {
        BatchFailure::Error(e)
    }
}
