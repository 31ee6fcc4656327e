//! The worker: claims jobs from the queue and drives each one through its
//! phases (scan → retry failed keys → verify) batch by batch, under the
//! throttle, until it ends or is taken away.
//!
//! Rooms: [`claim`] (claim loops, NOTIFY relay), [`batch_loop`] (one job, batch by
//! batch), [`cancellation`] (when a batch must stop), [`phases`] (pass bounds, phase
//! changes, the end), [`steering`] (retune, breaker, rest), [`budgets`] (throttle settings
//! and shares), [`heartbeat`], [`reporting`] (logs, progress, metrics) and [`slicing`].

mod batch_loop;
mod budgets;
mod cancellation;
mod claim;
mod heartbeat;
mod phases;
mod reporting;
mod slicing;
mod steering;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backfill_core::breaker::BreakerCount;
use backfill_core::lease::Lease;
use backfill_core::phase::FailingStreak;
use backfill_core::throttle::{BatchReport, HealthSample, ThrottleController, ThrottleReason};
use backfill_dataplane::{BatchRunner, PassWrites};
use backfill_queue::{Job, JobProgress, JobState, Phase, Queue, Tunables};
use tokio::sync::watch;

pub(crate) use budgets::throttle_settings;
pub(crate) use slicing::job_definition;

use crate::batches_in_flight::BatchesInFlight;
use crate::settings::WorkerSections;
use crate::shutdown::Shutdown;
use crate::telemetry::JobMetrics;
use reporting::{FailureLog, RateEstimate};

/// Everything a worker needs, shared by its claim loops.
pub struct Worker {
    pub queue: Queue,
    pub runner: BatchRunner,
    pub settings: Arc<WorkerSections>,
    pub worker_id: String,
    /// This process: what makes a lease ours (two pods may share a `worker.id`).
    pub instance: uuid::Uuid,
    pub health: watch::Receiver<HealthSample>,
    /// This worker's batches in flight, for the impact budget's in-batch canary.
    pub batches: Arc<BatchesInFlight>,
    /// Jobs this process is driving now, so a claim never takes one of them
    /// back; held across each claim so two slots cannot race.
    pub driving: tokio::sync::Mutex<Vec<i64>>,
    /// Wakes idle claim loops when there may be work for them.
    pub work_signal: WorkSignal,
}

/// Raised when there may be work for an idle claim loop, so that it claims at once
/// instead of at its next poll: a job enqueued, resumed or retried (NOTIFY on the queue),
/// or a job that ended or was cut into slices on this worker (its slices, its parent, or
/// the end of `--exit-when-idle` may be due).
#[derive(Debug)]
pub struct WorkSignal(watch::Sender<u64>);

impl Default for WorkSignal {
    fn default() -> Self {
        WorkSignal(watch::channel(0).0)
    }
}

impl WorkSignal {
    /// There may be work.
    pub fn raise(&self) {
        self.0
            .send_modify(|raised| *raised = raised.wrapping_add(1));
    }

    /// A receiver that sees each raise after it last looked (`borrow_and_update`).
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// Why a job stopped on this worker before it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// Paused, cancelled or taken over: the lease is gone.
    LeaseLost(Option<JobState>),
    /// SIGTERM/SIGINT.
    Shutdown,
    /// The database cannot be reached; the job goes back to the queue.
    Unreachable,
    /// The job was cut into slices and given back; it returns once they are done.
    Sliced,
    /// Every batch failed for `worker.stuck_after`: the job rests, given back.
    Stuck,
    /// Too many of its rows failed: the circuit breaker paused the job.
    Tripped,
    /// Every run window of the job is closed: it rests, given back, until one opens.
    OutsideWindow,
}

/// How driving a job ended on this worker.
#[derive(Debug)]
enum JobEnd {
    /// Succeeded, failed or cancelled for good.
    Finished(JobState),
    /// Not finished; someone (maybe us, later) carries on.
    Stopped(StopReason),
}

/// What to do after the key source ran dry.
enum PhaseStep {
    Continue,
    End(JobEnd),
}

/// One job on this worker: its lease, throttle, progress and metrics.
struct JobRun<'w> {
    worker: &'w Worker,
    job: Job,
    /// The lease that fences every write of this run (queue calls and batch commits).
    lease: Lease,
    shutdown: Shutdown,
    throttle: ThrottleController,
    last_report: Option<BatchReport>,
    /// State label and reason of the last decision, to log each change once.
    last_decision: Option<(&'static str, Option<ThrottleReason>)>,
    checkpoint: Option<String>,
    phase: Phase,
    rows_done: i64,
    rows_total: Option<i64>,
    rate: RateEstimate,
    started: Instant,
    stop: watch::Receiver<Option<StopReason>>,
    progress: watch::Sender<JobProgress>,
    heartbeat: tokio::task::JoinHandle<()>,
    metrics: JobMetrics,
    failure_log: FailureLog,
    /// The job's rows-per-second budget; a slice runs on its share of it.
    rate_budget: Option<f64>,
    /// The duty cycle next to production; the job runs on its share of it, split among
    /// every job and slice running at the time.
    duty_budget: f64,
    /// When the budgets' shares were last re-read.
    budget_checked: Option<Instant>,
    /// Batches failing in a row (transient errors, no commit in between), and since when.
    failing: FailingStreak<Instant>,
    /// Rows processed and failed since the claim, for the circuit breaker.
    breaker: BreakerCount,
    /// The job's tuning columns as the heartbeat last read them (live retune).
    tunables: watch::Receiver<Option<Tunables>>,
    /// The job's priority as last read (it only orders claims; a change is logged).
    priority: Option<i32>,
    /// The transactions of this pass's committed batches: rows they wrote must not turn
    /// up again ahead of the checkpoint or past the pass's end.
    writes: PassWrites,
    /// How long the job has been throttled, for the `throttled` event.
    throttled_spell: backfill_core::steering::ThrottledSpell,
}

/// Completes once `condition` holds for the channel's value; never, if the
/// sender is gone first (a closed channel must not read as "stop now").
async fn until<T>(channel: &mut watch::Receiver<T>, condition: impl FnMut(&T) -> bool) {
    if channel.wait_for(condition).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Exponential backoff for a database that cannot be reached: 0.5 s doubling to 30 s.
#[derive(Debug, Default)]
struct ConnectionBackoff {
    failures: u32,
}

impl ConnectionBackoff {
    fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = Duration::from_millis(500).saturating_mul(1 << self.failures.min(6));
        wait.min(Duration::from_secs(30))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}
