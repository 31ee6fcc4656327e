//! Claims and leases: who may work on a job, and for how long.
//!
//! A claim picks the next runnable job with `FOR UPDATE SKIP LOCKED` and stamps
//! it with a fresh [`LeaseToken`]. Every later write by the worker (heartbeat,
//! batch commit, state change) is conditional on that token (see
//! [`backfill_core::lease`]), so a worker whose lease was taken over — or whose job was
//! paused or cancelled, which clears the token — can no longer change anything.

use std::time::Duration;

use backfill_core::job_spec::JobTunables;
use backfill_core::lease::{millis, Lease, LeaseToken};
use backfill_core::queue_sql;
use sqlx::postgres::PgArguments;
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

use crate::job::{Job, JobState, Phase};
use crate::{Context, QueueError};

/// A job this worker now holds, with the lease that fences its writes.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub job: Job,
    pub lease: Lease,
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
    /// The job's own tuning columns as they are now.
    #[sqlx(flatten)]
    pub job: JobTunables,
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

/// A statement with its parameters bound so far.
type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

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
    /// passed; unleased or lease expired), or `None` when nothing is runnable. The
    /// claim's lease lasts `lease` unless extended.
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
        let job: Option<Job> = sqlx::query_as(queue_sql::CLAIM)
            .bind(token.0)
            .bind(worker)
            .bind(millis(lease))
            .bind(driving)
            .bind(instance)
            .fetch_optional(&self.pool)
            .await
            .context("claiming a job")?;
        Ok(job.map(|job| ClaimedJob {
            lease: Lease {
                job_id: job.id,
                token,
                duration: lease,
            },
            job,
        }))
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
        lease: &Lease,
        progress: &JobProgress,
    ) -> Result<HeartbeatReport, QueueError> {
        let job_id = lease.job_id;
        let extended: Option<Tunables> = sqlx::query_as(queue_sql::HEARTBEAT)
            .bind(job_id)
            .bind(lease.token.0)
            .bind(lease.millis())
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
        let still_ours: Option<Tunables> = sqlx::query_as(queue_sql::HEARTBEAT_ROW_BUSY)
            .bind(job_id)
            .bind(lease.token.0)
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
        sqlx::query_as(queue_sql::JOB_BY_ID)
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await
            .context(&format!("reading job {job_id}"))
    }

    /// The job named `name` as it is now, or `None` if there is none.
    pub async fn job_named(&self, name: &str) -> Result<Option<Job>, QueueError> {
        sqlx::query_as(queue_sql::JOB_BY_NAME)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .context(&format!("reading job {name:?}"))
    }

    /// The job's state now, or `None` if it was deleted.
    pub async fn state_of(&self, job_id: i64) -> Result<Option<JobState>, QueueError> {
        let state: Option<String> = sqlx::query_scalar(queue_sql::STATE_OF)
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await
            .context(&format!("reading the state of job {job_id}"))?;
        Ok(state.and_then(|s| s.parse().ok()))
    }

    /// Jobs and slices some worker is running now (at least 1): everything backfilld runs on
    /// this database shares one duty cycle next to production.
    pub async fn running_jobs(&self) -> Result<i64, QueueError> {
        let running: i64 = sqlx::query_scalar(queue_sql::RUNNING_JOBS)
            .fetch_one(&self.pool)
            .await
            .context("counting the running jobs")?;
        Ok(running.max(1))
    }

    /// Runs a fenced `statement` (`$1` the job, `$2` its token) with its further
    /// parameters bound by `bind`; true when it changed the job's row, false when the
    /// lease is gone. `what` names the operation in an error.
    async fn fenced<'q>(
        &self,
        lease: &Lease,
        statement: &'q str,
        bind: impl FnOnce(PgQuery<'q>) -> PgQuery<'q>,
        what: impl FnOnce() -> String,
    ) -> Result<bool, QueueError> {
        let query = sqlx::query(statement)
            .bind(lease.job_id)
            .bind(lease.token.0);
        let changed = bind(query)
            .execute(&self.pool)
            .await
            .context(&what())?
            .rows_affected();
        Ok(changed == 1)
    }

    /// Gives the job back without finishing it (shutdown): another worker may claim it at once.
    pub async fn release(&self, lease: &Lease) -> Result<bool, QueueError> {
        self.fenced(
            lease,
            queue_sql::RELEASE,
            |q| q,
            || format!("releasing the lease of job {}", lease.job_id),
        )
        .await
    }

    /// Ends the job as succeeded or failed (with `last_error`) and lets go of it.
    pub async fn finish(
        &self,
        lease: &Lease,
        state: JobState,
        last_error: Option<&str>,
    ) -> Result<bool, QueueError> {
        self.fenced(
            lease,
            queue_sql::FINISH,
            |q| q.bind(state.as_str()).bind(last_error),
            || format!("finishing job {} as {state}", lease.job_id),
        )
        .await
    }

    /// Records how many rows the job is expected to touch in all (done + pending).
    pub async fn set_total_estimate(&self, lease: &Lease, total: i64) -> Result<bool, QueueError> {
        self.fenced(
            lease,
            queue_sql::SET_TOTAL_ESTIMATE,
            |q| q.bind(total),
            || format!("recording the row estimate of job {}", lease.job_id),
        )
        .await
    }

    /// Fixes the last key of the pass a whole job (not a slice) starts: rows that
    /// arrive above it later, or that a statement moves above it, belong to the
    /// verification sweeps, so a pass always ends. `None`: the table is empty.
    pub async fn fix_pass_bound(
        &self,
        lease: &Lease,
        last_key: Option<&str>,
    ) -> Result<bool, QueueError> {
        self.fenced(
            lease,
            queue_sql::FIX_PASS_BOUND,
            |q| q.bind(last_key),
            || format!("fixing the key range of job {}", lease.job_id),
        )
        .await
    }

    /// Gives a job that cannot progress back to the queue until `rest` has passed, with
    /// `why` in `last_error` (so `job_status` says why it is not moving): other jobs get
    /// the worker's slot meanwhile.
    pub async fn rest(&self, lease: &Lease, rest: Duration, why: &str) -> Result<bool, QueueError> {
        self.fenced(
            lease,
            queue_sql::REST,
            |q| q.bind(millis(rest)).bind(why),
            || format!("resting job {}", lease.job_id),
        )
        .await
    }

    /// Gives a job whose run windows are all closed back to the queue, holding for
    /// `window` (claims skip it until one opens): its checkpoint stays, and the worker's
    /// slot goes to jobs that may run now.
    pub async fn rest_outside_window(&self, lease: &Lease) -> Result<bool, QueueError> {
        self.fenced(
            lease,
            queue_sql::REST_OUTSIDE_WINDOW,
            |q| q,
            || format!("resting job {} outside its run windows", lease.job_id),
        )
        .await
    }

    /// Pauses the job on the daemon's own verdict (the circuit breaker), with `why` in
    /// `last_error`: as `backfill.pause` would, fenced by the lease.
    pub async fn pause_for(&self, lease: &Lease, why: &str) -> Result<bool, QueueError> {
        self.fenced(
            lease,
            queue_sql::PAUSE_FOR,
            |q| q.bind(why),
            || format!("pausing job {}", lease.job_id),
        )
        .await
    }

    /// Moves the job to another pass; a verify pass restarts from the first key.
    pub async fn enter_phase(&self, lease: &Lease, phase: Phase) -> Result<bool, QueueError> {
        self.fenced(
            lease,
            queue_sql::ENTER_PHASE,
            |q| q.bind(phase.as_str()),
            || format!("moving job {} to phase {}", lease.job_id, phase.as_str()),
        )
        .await
    }

    /// True while some job is pending (due or scheduled for later), running or paused: what
    /// `--exit-when-idle` waits out, so a run-to-completion Job does not complete while a
    /// paused job waits for its resume or a scheduled one for its `not_before`.
    pub async fn has_unfinished_work(&self) -> Result<bool, QueueError> {
        sqlx::query_scalar(queue_sql::HAS_UNFINISHED_WORK)
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
        let due_in: Option<f64> = sqlx::query_scalar(&queue_sql::failed_rows_due())
            .bind(job_id)
            .bind(max_attempts)
            .fetch_one(&self.pool)
            .await
            .context(&format!("reading failed rows of job {job_id}"))?;
        Ok(due_in.map(Duration::from_secs_f64))
    }

    /// Rows of the job currently in `backfill.failed_rows`.
    pub async fn failed_row_count(&self, job_id: i64) -> Result<i64, QueueError> {
        sqlx::query_scalar(queue_sql::FAILED_ROW_COUNT)
            .bind(job_id)
            .fetch_one(&self.pool)
            .await
            .context(&format!("counting failed rows of job {job_id}"))
    }
}
