//! Claims and leases: who may work on a job, and for how long.
//!
//! A claim picks the next runnable job with `FOR UPDATE SKIP LOCKED` and stamps
//! it with a fresh [`LeaseToken`]. Every later write by the worker (heartbeat,
//! batch commit, state change) is conditional on that token, so a worker whose
//! lease was taken over — or whose job was paused or cancelled, which clears the
//! token — can no longer change anything.

use std::fmt;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::job::{Job, JobState, Phase, JOB_COLUMNS};
use crate::{Context, QueueError};

/// The fencing token of one claim of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub Uuid);

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A job this worker now holds, with the token that fences its writes.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub job: Job,
    pub token: LeaseToken,
}

/// What a heartbeat found.
#[derive(Debug, Clone, PartialEq)]
pub enum HeartbeatReport {
    /// The lease is ours and was extended; the job's tuning columns as they are now.
    Held(Tunables),
    /// The lease is gone: paused, cancelled, finished or taken over; `state` is the job's state now.
    Lost { state: Option<JobState> },
}

/// The columns an engineer may change on a running job (live retune).
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct Tunables {
    pub batch_size: Option<i32>,
    pub min_batch_size: Option<i32>,
    pub max_batch_size: Option<i32>,
    pub target_batch_ms: Option<i32>,
    pub max_rows_per_second: Option<f64>,
    pub priority: i32,
    /// The job's own circuit-breaker limits, a slice's from its parent (`None`: the
    /// configured defaults).
    pub breaker_failed_share: Option<f64>,
    pub breaker_failed_rows: Option<i64>,
    /// Whether one of the job's run windows (a slice: its parent's) is open now.
    pub in_window: bool,
}

/// Live numbers a worker publishes with each heartbeat, for `job_status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobProgress {
    pub rows_per_second: Option<f64>,
    pub batch_size: Option<i32>,
    pub throttle_state: Option<String>,
    pub throttle_reason: Option<String>,
    /// Rows done by this worker's run so far (the job's `rows_done` as the worker counts it).
    pub rows_done: i64,
    /// Rows per second over the recent forecast window, throttled time included.
    pub recent_rows_per_second: Option<f64>,
}

/// The queue as a worker uses it.
#[derive(Debug, Clone)]
pub struct Queue {
    pool: PgPool,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The job's tuning columns as a heartbeat reads them back (a live retune); a slice takes its
/// breaker limits from its job. Aliased `j`.
const TUNABLE_COLUMNS: &str = "j.batch_size, j.min_batch_size, j.max_batch_size, \
     j.target_batch_ms, j.max_rows_per_second, j.priority, \
     coalesce(j.breaker_failed_share, (SELECT p.breaker_failed_share \
         FROM backfill.jobs p WHERE p.id = j.parent_id)) AS breaker_failed_share, \
     coalesce(j.breaker_failed_rows, (SELECT p.breaker_failed_rows \
         FROM backfill.jobs p WHERE p.id = j.parent_id)) AS breaker_failed_rows, \
     backfill.job_in_window(j.id) AS in_window";

impl Queue {
    /// Wraps a pool connected to the target database.
    pub fn new(pool: PgPool) -> Self {
        Queue { pool }
    }

    /// The underlying pool, for status queries and steering.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The slice operations on the same pool.
    pub fn slices(&self) -> crate::slices::Slices {
        crate::slices::Slices::new(self.pool.clone())
    }

    /// Claims the next runnable job (highest priority, then oldest; `not_before`
    /// passed; unleased or lease expired), or `None` when nothing is runnable.
    ///
    /// A job still leased to this process (`instance`) but not among `driving` (the
    /// jobs it is working on now) was left behind by an earlier attempt of ours — a
    /// lost connection — and is taken back at once instead of after its lease
    /// expires. The worker id names the lease for people; it never makes a lease
    /// ours: two live pods given the same `worker.id` must not take each other's jobs.
    ///
    /// A sliced job is not claimable while any of its slices is unfinished;
    /// once they all are, it is claimed to retry failed rows and verify.
    pub async fn claim(
        &self,
        worker: &str,
        instance: Uuid,
        lease: Duration,
        driving: &[i64],
    ) -> Result<Option<ClaimedJob>, QueueError> {
        let token = LeaseToken(Uuid::new_v4());
        let job: Option<Job> = sqlx::query_as(&format!(
            "WITH next AS ( \
                 SELECT q.id FROM backfill.jobs q \
                  WHERE q.state IN ('pending', 'running') AND q.not_before <= now() \
                    AND backfill.job_in_window(q.id) \
                    AND (q.lease_expires_at IS NULL OR q.lease_expires_at < now() \
                         OR (q.leased_instance = $5 AND q.id <> ALL($4))) \
                    AND NOT EXISTS (SELECT 1 FROM backfill.jobs c WHERE c.parent_id = q.id \
                                       AND c.state IN ('pending', 'running', 'paused')) \
                  ORDER BY q.priority DESC, q.created_at, q.parent_id NULLS FIRST, q.id \
                  LIMIT 1 FOR UPDATE SKIP LOCKED) \
             UPDATE backfill.jobs j \
                SET state = 'running', lease_token = $1, leased_by = $2, leased_instance = $5, \
                    lease_expires_at = now() + $3 * interval '1 millisecond', heartbeat_at = now(), \
                    started_at = coalesce(j.started_at, now()), updated_at = now(), \
                    throttle_state = NULL, throttle_reason = NULL \
               FROM next WHERE j.id = next.id \
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(token.0)
        .bind(worker)
        .bind(millis(lease))
        .bind(driving)
        .bind(instance)
        .fetch_optional(&self.pool)
        .await
        .context("claiming a job")?;
        Ok(job.map(|job| ClaimedJob { job, token }))
    }

    /// Extends the lease and publishes live progress; reports whether the lease is still ours.
    ///
    /// The job row is taken with `SKIP LOCKED`: while our own batch commits its
    /// checkpoint (which extends the lease itself) the row is locked until that COMMIT's
    /// flush, and a heartbeat that queued behind it would wait for nothing and look like a
    /// session our batch blocks. A skipped heartbeat reads the row without locking it
    /// instead: still ours and running is `Held` (the tunables as committed); anything
    /// else is `Lost`. Skipping never extends a lease, so the fencing stays as it was.
    pub async fn heartbeat(
        &self,
        job_id: i64,
        token: LeaseToken,
        lease: Duration,
        progress: &JobProgress,
    ) -> Result<HeartbeatReport, QueueError> {
        let extended: Option<Tunables> = sqlx::query_as(
            &format!(
                "WITH mine AS ( \
                     SELECT id FROM backfill.jobs \
                      WHERE id = $1 AND lease_token = $2 AND state = 'running' \
                      FOR NO KEY UPDATE SKIP LOCKED) \
                 UPDATE backfill.jobs j \
                    SET lease_expires_at = now() + $3 * interval '1 millisecond', heartbeat_at = now(), \
                        rows_per_second = $4, current_batch_size = $5, throttle_state = $6, \
                        throttle_reason = $7, recent_rows_per_second = $8, updated_at = now() \
                   FROM mine WHERE j.id = mine.id \
                  RETURNING {TUNABLE_COLUMNS}"
            ),
        )
        .bind(job_id)
        .bind(token.0)
        .bind(millis(lease))
        .bind(progress.rows_per_second)
        .bind(progress.batch_size)
        .bind(&progress.throttle_state)
        .bind(&progress.throttle_reason)
        .bind(progress.recent_rows_per_second)
        .fetch_optional(&self.pool)
        .await
        .context(&format!("heartbeat of job {job_id}"))?;
        if let Some(tunables) = extended {
            return Ok(HeartbeatReport::Held(tunables));
        }
        // Skipped (the row is locked) or gone: which one, without waiting for the lock.
        let still_ours: Option<Tunables> = sqlx::query_as(&format!(
            "SELECT {TUNABLE_COLUMNS} FROM backfill.jobs j \
              WHERE j.id = $1 AND j.lease_token = $2 AND j.state = 'running'"
        ))
        .bind(job_id)
        .bind(token.0)
        .fetch_optional(&self.pool)
        .await
        .context(&format!("heartbeat of job {job_id} (row busy)"))?;
        if let Some(tunables) = still_ours {
            return Ok(HeartbeatReport::Held(tunables));
        }
        Ok(HeartbeatReport::Lost {
            state: self.state_of(job_id).await?,
        })
    }

    /// The job with id `job_id` as it is now, or `None` if it was deleted.
    pub async fn job(&self, job_id: i64) -> Result<Option<Job>, QueueError> {
        sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM backfill.jobs j WHERE j.id = $1"
        ))
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await
        .context(&format!("reading job {job_id}"))
    }

    /// The job named `name` as it is now, or `None` if there is none.
    pub async fn job_named(&self, name: &str) -> Result<Option<Job>, QueueError> {
        sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM backfill.jobs j WHERE j.name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .context(&format!("reading job {name:?}"))
    }

    /// The job's state now, or `None` if it was deleted.
    pub async fn state_of(&self, job_id: i64) -> Result<Option<JobState>, QueueError> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM backfill.jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(&self.pool)
                .await
                .context(&format!("reading the state of job {job_id}"))?;
        Ok(state.and_then(|s| s.parse().ok()))
    }

    /// Jobs and slices some worker is running now (at least 1): everything backfilld runs on
    /// this database shares one duty cycle next to production.
    pub async fn running_jobs(&self) -> Result<i64, QueueError> {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM backfill.jobs \
              WHERE state = 'running' AND lease_expires_at > now()",
        )
        .fetch_one(&self.pool)
        .await
        .context("counting the running jobs")?;
        Ok(running.max(1))
    }

    /// Gives the job back without finishing it (shutdown): another worker may claim it at once.
    pub async fn release(&self, job_id: i64, token: LeaseToken) -> Result<bool, QueueError> {
        let released = sqlx::query(
            "UPDATE backfill.jobs \
                SET lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
                    throttle_state = NULL, throttle_reason = NULL, rows_per_second = NULL, recent_rows_per_second = NULL, updated_at = now() \
              WHERE id = $1 AND lease_token = $2",
        )
        .bind(job_id)
        .bind(token.0)
        .execute(&self.pool)
        .await
        .context(&format!("releasing the lease of job {job_id}"))?
        .rows_affected();
        Ok(released == 1)
    }

    /// Ends the job as succeeded or failed (with `last_error`) and lets go of it.
    pub async fn finish(
        &self,
        job_id: i64,
        token: LeaseToken,
        state: JobState,
        last_error: Option<&str>,
    ) -> Result<bool, QueueError> {
        let finished = sqlx::query(
            "UPDATE backfill.jobs \
                SET state = $3, last_error = $4, finished_at = now(), lease_token = NULL, \
                    leased_by = NULL, lease_expires_at = NULL, throttle_state = NULL, \
                    throttle_reason = NULL, rows_per_second = NULL, recent_rows_per_second = NULL, updated_at = now() \
              WHERE id = $1 AND lease_token = $2",
        )
        .bind(job_id)
        .bind(token.0)
        .bind(state.as_str())
        .bind(last_error)
        .execute(&self.pool)
        .await
        .context(&format!("finishing job {job_id} as {state}"))?
        .rows_affected();
        Ok(finished == 1)
    }

    /// Records how many rows the job is expected to touch in all (done + pending).
    pub async fn set_total_estimate(
        &self,
        job_id: i64,
        token: LeaseToken,
        total: i64,
    ) -> Result<bool, QueueError> {
        let updated = sqlx::query(
            "UPDATE backfill.jobs SET rows_total_estimate = $3, updated_at = now() \
              WHERE id = $1 AND lease_token = $2",
        )
        .bind(job_id)
        .bind(token.0)
        .bind(total)
        .execute(&self.pool)
        .await
        .context(&format!("recording the row estimate of job {job_id}"))?
        .rows_affected();
        Ok(updated == 1)
    }

    /// Fixes the last key of the pass a whole job (not a slice) starts: rows that
    /// arrive above it later, or that a statement moves above it, belong to the
    /// verification sweeps, so a pass always ends. `None`: the table is empty.
    pub async fn fix_pass_bound(
        &self,
        job_id: i64,
        token: LeaseToken,
        last_key: Option<&str>,
    ) -> Result<bool, QueueError> {
        let updated = sqlx::query(
            "UPDATE backfill.jobs SET upper_key = $3, updated_at = now() \
              WHERE id = $1 AND lease_token = $2 AND state = 'running' AND parent_id IS NULL",
        )
        .bind(job_id)
        .bind(token.0)
        .bind(last_key)
        .execute(&self.pool)
        .await
        .context(&format!("fixing the key range of job {job_id}"))?
        .rows_affected();
        Ok(updated == 1)
    }

    /// Gives a job that cannot progress back to the queue until `rest` has passed, with
    /// `why` in `last_error` (so `job_status` says why it is not moving): other jobs get
    /// the worker's slot meanwhile.
    pub async fn rest(
        &self,
        job_id: i64,
        token: LeaseToken,
        rest: Duration,
        why: &str,
    ) -> Result<bool, QueueError> {
        let rested = sqlx::query(
            "UPDATE backfill.jobs \
                SET state = 'pending', lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
                    leased_instance = NULL, throttle_state = 'holding', throttle_reason = 'stuck', \
                    rows_per_second = NULL, recent_rows_per_second = NULL, last_error = $4, \
                    not_before = now() + $3 * interval '1 millisecond', updated_at = now() \
              WHERE id = $1 AND lease_token = $2 AND state = 'running'",
        )
        .bind(job_id)
        .bind(token.0)
        .bind(millis(rest))
        .bind(why)
        .execute(&self.pool)
        .await
        .context(&format!("resting job {job_id}"))?
        .rows_affected();
        Ok(rested == 1)
    }

    /// Gives a job whose run windows are all closed back to the queue, holding for
    /// `window` (claims skip it until one opens): its checkpoint stays, and the worker's
    /// slot goes to jobs that may run now.
    pub async fn rest_outside_window(
        &self,
        job_id: i64,
        token: LeaseToken,
    ) -> Result<bool, QueueError> {
        let rested = sqlx::query(
            "UPDATE backfill.jobs \
                SET state = 'pending', lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
                    leased_instance = NULL, throttle_state = 'holding', throttle_reason = 'window', \
                    rows_per_second = NULL, recent_rows_per_second = NULL, updated_at = now() \
              WHERE id = $1 AND lease_token = $2 AND state = 'running'",
        )
        .bind(job_id)
        .bind(token.0)
        .execute(&self.pool)
        .await
        .context(&format!("resting job {job_id} outside its run windows"))?
        .rows_affected();
        Ok(rested == 1)
    }

    /// Pauses the job on the daemon's own verdict (the circuit breaker), with `why` in
    /// `last_error`: as `backfill.pause` would, fenced by the lease.
    pub async fn pause_for(
        &self,
        job_id: i64,
        token: LeaseToken,
        why: &str,
    ) -> Result<bool, QueueError> {
        let paused = sqlx::query(
            "UPDATE backfill.jobs \
                SET state = 'paused', lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
                    throttle_state = NULL, throttle_reason = NULL, rows_per_second = NULL, recent_rows_per_second = NULL, \
                    last_error = $3, updated_at = now() \
              WHERE id = $1 AND lease_token = $2 AND state = 'running'",
        )
        .bind(job_id)
        .bind(token.0)
        .bind(why)
        .execute(&self.pool)
        .await
        .context(&format!("pausing job {job_id}"))?
        .rows_affected();
        Ok(paused == 1)
    }

    /// Moves the job to another pass; a verify pass restarts from the first key.
    pub async fn enter_phase(
        &self,
        job_id: i64,
        token: LeaseToken,
        phase: Phase,
    ) -> Result<bool, QueueError> {
        let updated = sqlx::query(
            "UPDATE backfill.jobs \
                SET phase = $3, \
                    checkpoint = CASE WHEN $3 = 'verify' THEN NULL ELSE checkpoint END, \
                    upper_key = CASE WHEN $3 = 'verify' AND parent_id IS NULL THEN NULL ELSE upper_key END, \
                    verify_sweeps = verify_sweeps + CASE WHEN $3 = 'verify' THEN 1 ELSE 0 END, \
                    updated_at = now() \
              WHERE id = $1 AND lease_token = $2",
        )
        .bind(job_id)
        .bind(token.0)
        .bind(phase.as_str())
        .execute(&self.pool)
        .await
        .context(&format!("moving job {job_id} to phase {}", phase.as_str()))?
        .rows_affected();
        Ok(updated == 1)
    }

    /// True while some job is pending (due or scheduled for later), running or paused: what
    /// `--exit-when-idle` waits out, so a run-to-completion Job does not complete while a
    /// paused job waits for its resume or a scheduled one for its `not_before`.
    pub async fn has_unfinished_work(&self) -> Result<bool, QueueError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM backfill.jobs WHERE state IN ('pending', 'running', 'paused'))",
        )
        .fetch_one(&self.pool)
        .await
        .context("looking for unfinished jobs")
    }

    /// When the next failed row of the job is due for a retry (zero: now), or
    /// `None` when no failed row has attempts left.
    pub async fn failed_rows_to_retry(
        &self,
        job_id: i64,
        max_attempts: i32,
    ) -> Result<Option<Duration>, QueueError> {
        let sql = format!(
            "SELECT CASE WHEN count(*) > 0 THEN greatest(extract(epoch FROM min(f.next_attempt_at) - now()), 0) END::float8 \
               FROM backfill.failed_rows f \
              WHERE f.job_id = $1 AND {}",
            backfill_core::queue_sql::retry_eligible(2)
        );
        let due_in: Option<f64> = sqlx::query_scalar(&sql)
            .bind(job_id)
            .bind(max_attempts)
            .fetch_one(&self.pool)
            .await
            .context(&format!("reading failed rows of job {job_id}"))?;
        Ok(due_in.map(Duration::from_secs_f64))
    }

    /// Rows of the job currently in `backfill.failed_rows`.
    pub async fn failed_row_count(&self, job_id: i64) -> Result<i64, QueueError> {
        sqlx::query_scalar("SELECT count(*) FROM backfill.failed_rows WHERE job_id = $1")
            .bind(job_id)
            .fetch_one(&self.pool)
            .await
            .context(&format!("counting failed rows of job {job_id}"))
    }
}
