//! The worker: claims jobs from the queue and drives each one through its
//! phases (scan → retry failed keys → verify) batch by batch, under the
//! throttle, until it ends or is taken away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backfill_core::breaker::BreakerCount;
use backfill_core::error_class::{ErrorClass, TransientKind};
use backfill_core::slicing::{duty_share, rate_share};
use backfill_core::throttle::{
    BatchOutcome, BatchReport, HealthSample, ThrottleController, ThrottleDecision, ThrottleReason,
    ThrottleSettings,
};
use backfill_dataplane::{
    BatchBackend, BatchRequest, BatchRunner, BatchTarget, DataPlaneError, Fence, KeySource,
    PassWrites, RowFailure, RunOutcome,
};
use backfill_queue::{
    ClaimedJob, HeartbeatReport, Job, JobProgress, JobState, LeaseToken, Phase, Queue, QueueChange,
    Tunables,
};
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use crate::settings::Settings;
use crate::shutdown::Shutdown;
use crate::telemetry::JobMetrics;

mod steering;

/// Everything a worker needs, shared by its claim loops.
pub struct Worker {
    pub queue: Queue,
    pub runner: BatchRunner,
    pub settings: Arc<Settings>,
    pub worker_id: String,
    /// This process: what makes a lease ours (two pods may share a `worker.id`).
    pub instance: uuid::Uuid,
    pub health: watch::Receiver<HealthSample>,
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

impl Worker {
    /// Runs `worker.concurrency` claim loops until shutdown, or, with
    /// `exit_when_idle`, until no unfinished job is left for anyone.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown, exit_when_idle: bool) {
        let relay = tokio::spawn(relay_queue_changes(Arc::clone(&self), shutdown.clone()));
        let loops: Vec<_> = (0..self.settings.worker.concurrency)
            .map(|slot| {
                let worker = Arc::clone(&self);
                let shutdown = shutdown.clone();
                tokio::spawn(async move { worker.claim_loop(slot, shutdown, exit_when_idle).await })
            })
            .collect();
        for handle in loops {
            if let Err(e) = handle.await {
                warn!(error = %e, "a claim loop ended abnormally");
            }
        }
        relay.abort();
        let _ = relay.await;
    }

    async fn claim_loop(&self, slot: usize, shutdown: Shutdown, exit_when_idle: bool) {
        let mut backoff = ConnectionBackoff::default();
        let mut work_signal = self.work_signal.subscribe();
        while !shutdown.is_triggered() {
            // Whatever was raised before this claim, the claim sees.
            work_signal.borrow_and_update();
            let claimed = {
                let mut driving = self.driving.lock().await;
                let claimed = self
                    .queue
                    .claim(
                        &self.worker_id,
                        self.instance,
                        self.settings.worker.lease,
                        &driving,
                    )
                    .await;
                if let Ok(Some(claimed)) = &claimed {
                    driving.push(claimed.job.id);
                }
                claimed
            };
            match claimed {
                Ok(Some(claimed)) => {
                    backoff.reset();
                    let job_id = claimed.job.id;
                    let span = tracing::info_span!("job", job = %claimed.job.name, job_id, slot);
                    let end = self.drive(claimed, &shutdown).instrument(span).await;
                    self.driving.lock().await.retain(|id| *id != job_id);
                    self.work_signal.raise();
                    if matches!(end, JobEnd::Stopped(StopReason::Unreachable)) {
                        // Not straight back to the same trouble: claiming would hand
                        // us that job again at once.
                        shutdown.sleep(backoff.next()).await;
                    }
                }
                // Idle: split the busiest slice of some job, then claim its second half.
                Ok(None) if crate::slicing::steal(self).await => backoff.reset(),
                Ok(None) => {
                    backoff.reset();
                    if exit_when_idle {
                        match self.queue.has_unfinished_work().await {
                            Ok(false) => {
                                info!("no unfinished job left; exiting (--exit-when-idle)");
                                return;
                            }
                            Ok(true) => {}
                            Err(e) => warn!(error = %e, "cannot tell whether work is left"),
                        }
                    }
                    tokio::select! {
                        () = shutdown.sleep(self.settings.worker.poll_interval) => {}
                        _ = work_signal.changed() => {}
                    }
                }
                Err(e) => {
                    let wait = backoff.next();
                    warn!(error = %e, retry_in = ?wait, "cannot claim jobs; retrying");
                    shutdown.sleep(wait).await;
                }
            }
        }
    }

    /// Works on one claimed job until it ends, is taken away, or we shut down.
    async fn drive(&self, claimed: ClaimedJob, shutdown: &Shutdown) -> JobEnd {
        let ClaimedJob { job, token } = claimed;
        info!(phase = job.phase.as_str(), checkpoint = ?job.checkpoint, rows_done = job.rows_done, "claimed job");
        let mut run = JobRun::start(self, job, token, shutdown.clone());
        let end = run.execute().await;
        run.stop_heartbeat();
        match end {
            JobEnd::Finished(state) => info!(
                state = state.as_str(),
                rows_done = run.rows_done,
                "job finished"
            ),
            JobEnd::Stopped(StopReason::Shutdown) => {
                match self.queue.release(run.job.id, token).await {
                    Ok(true) => {
                        info!(checkpoint = ?run.checkpoint, "shutting down: lease released")
                    }
                    Ok(false) => info!("shutting down: the lease was already gone"),
                    Err(e) => {
                        warn!(error = %e, "shutting down: could not release the lease; it expires by itself")
                    }
                }
            }
            JobEnd::Stopped(StopReason::LeaseLost(state)) => {
                info!(
                    state = state.map_or("deleted", JobState::as_str),
                    "stopped working on the job: lease gone"
                )
            }
            JobEnd::Stopped(StopReason::Sliced) => {
                info!("job cut into slices; any worker may claim them")
            }
            JobEnd::Stopped(StopReason::Stuck) => {
                warn!(rest = ?self.settings.worker.stuck_rest, "job not moving: given back to rest; other jobs get this slot")
            }
            JobEnd::Stopped(StopReason::Tripped) => {
                warn!("job paused by the circuit breaker; resume it once its rows can succeed")
            }
            JobEnd::Stopped(StopReason::OutsideWindow) => {
                info!(checkpoint = ?run.checkpoint, "outside the job's run windows: given back to rest until one opens (holding, reason window)")
            }
            JobEnd::Stopped(StopReason::Unreachable) => {
                match self.queue.release(run.job.id, token).await {
                    Ok(_) => warn!("database trouble: job given back to the queue"),
                    Err(e) => {
                        warn!(error = %e, "database trouble: job not released; its lease expires by itself")
                    }
                }
            }
        }
        run.failure_log.flush();
        run.metrics.job_left();
        end
    }
}

/// Raises the worker's [`WorkSignal`] on every change NOTIFY reports on the queue,
/// listening again (with backoff) whenever the listening session fails. Polling goes on
/// meanwhile, so a lost listener delays claims, it never stops them.
async fn relay_queue_changes(worker: Arc<Worker>, shutdown: Shutdown) {
    let mut backoff = ConnectionBackoff::default();
    while !shutdown.is_triggered() {
        match worker.queue.listen_for_changes().await {
            Ok(mut changes) => {
                backoff.reset();
                // Whatever changed while no one listened, the next claim finds.
                worker.work_signal.raise();
                loop {
                    match changes.next().await {
                        Ok(QueueChange::Job(name)) => {
                            tracing::debug!(job = %name, "queue change notified");
                            worker.work_signal.raise();
                        }
                        Ok(QueueChange::MaybeMissed) => worker.work_signal.raise(),
                        Err(e) => {
                            warn!(error = %e, "stopped listening for queue changes; polling meanwhile");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot listen for queue changes; polling meanwhile"),
        }
        shutdown.sleep(backoff.next()).await;
    }
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
    fence: Fence,
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
    failing: Option<(Instant, u32)>,
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

impl<'w> JobRun<'w> {
    fn start(worker: &'w Worker, job: Job, token: LeaseToken, shutdown: Shutdown) -> Self {
        let settings = &worker.settings;
        let fence = Fence {
            job_id: job.id,
            token: token.0,
            lease: settings.worker.lease,
        };
        let (stop_tx, stop) = watch::channel(None);
        let (progress, progress_rx) = watch::channel(JobProgress {
            rows_done: job.rows_done,
            ..JobProgress::default()
        });
        let (tunables_tx, tunables) = watch::channel(None);
        let heartbeat = tokio::spawn(heartbeat_loop(
            worker.queue.clone(),
            HeartbeatOf {
                job_id: job.id,
                token,
                lease: settings.worker.lease,
                interval: settings.worker.heartbeat,
                forecast_window: settings.worker.forecast_window,
            },
            progress_rx,
            stop_tx,
            tunables_tx,
        ));
        let throttle_settings = throttle_settings(settings, &job);
        JobRun {
            worker,
            fence,
            shutdown,
            rate_budget: throttle_settings.max_rows_per_second,
            duty_budget: throttle_settings.busy_duty_cycle,
            budget_checked: None,
            failing: None,
            breaker: BreakerCount::default(),
            tunables,
            priority: None,
            writes: PassWrites::default(),
            throttled_spell: backfill_core::steering::ThrottledSpell::new(
                settings.events.throttled_after,
            ),
            throttle: ThrottleController::new(throttle_settings),
            last_report: None,
            last_decision: None,
            checkpoint: job.checkpoint.clone(),
            phase: job.phase,
            rows_done: job.rows_done,
            rows_total: job.rows_total_estimate,
            rate: RateEstimate::default(),
            started: Instant::now(),
            stop,
            progress,
            heartbeat,
            metrics: JobMetrics::new(&job.name),
            failure_log: FailureLog::default(),
            job,
        }
    }

    fn stop_heartbeat(&self) {
        self.heartbeat.abort();
    }

    fn stop_reason(&self) -> Option<StopReason> {
        if self.shutdown.is_triggered() {
            return Some(StopReason::Shutdown);
        }
        *self.stop.borrow()
    }

    /// Waits `duration`, or less if the job must stop.
    async fn wait(&self, duration: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            () = self.shutdown.triggered() => {}
            () = until(&mut stop, Option::is_some) => {}
        }
    }

    /// Waits for the health probes' first sample. Until it comes, the channel holds a
    /// placeholder that knows nothing of standbys or blocked sessions, and the first batch
    /// must not run on it (a declared standby may be missing right now).
    async fn first_health_sample(&self) {
        // The worker's own receiver is never marked seen, so a clone of it sees the
        // first sample as a change, whenever it came.
        let mut health = self.worker.health.clone();
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = health.changed() => {}
            () = self.shutdown.triggered() => {}
            () = until(&mut stop, Option::is_some) => {}
        }
    }

    /// Pauses before a batch; `false` as soon as a health sample taken meanwhile makes the
    /// controller hold. A decision made before a pause (up to `soft_lag_pause` or a 5 s
    /// backoff) must not run its batch on health that has gone bad since: lag crossing the
    /// limit during the pause stops commits at once, not one batch later.
    async fn pause_before_batch(&self, pause: Duration) -> bool {
        let would_hold = |sample: &HealthSample| {
            // A dry run on a copy: the real controller decides once per batch.
            let mut controller = self.throttle.clone();
            controller
                .decide(self.started.elapsed(), &sample.for_job(self.job.id), None)
                .is_hold()
        };
        let mut health = self.worker.health.clone();
        health.mark_unchanged();
        let pause_ends = tokio::time::Instant::now() + pause;
        let rest = || pause_ends.saturating_duration_since(tokio::time::Instant::now());
        loop {
            tokio::select! {
                () = self.wait(rest()) => break,
                changed = health.changed() => match changed {
                    Ok(()) if would_hold(&health.borrow_and_update()) => return false,
                    Ok(()) => {}
                    // No more samples (shutting down): just finish the pause.
                    Err(_) => {
                        self.wait(rest()).await;
                        break;
                    }
                },
            }
        }
        let holds = would_hold(&health.borrow());
        !holds
    }

    /// Completes when the in-flight batch (on `backend`) must be cancelled: at once when
    /// the lease is gone, when it has blocked production sessions for
    /// `throttle.max_blocking`, after the grace period on shutdown.
    fn batch_stop(&self, backend: BatchBackend) -> impl std::future::Future<Output = ()> + 'static {
        let mut stop = self.stop.clone();
        let mut health = self.worker.health.clone();
        // Only samples taken while this batch runs count: the one at hand may still
        // show the sessions that an earlier, already cancelled batch blocked.
        health.mark_unchanged();
        let max_blocking = self.worker.settings.throttle.max_blocking;
        let shutdown = self.shutdown.clone();
        let grace = self.worker.settings.worker.shutdown_grace;
        async move {
            tokio::select! {
                () = until(&mut stop, Option::is_some) => {}
                sessions = blocked_for(&mut health, max_blocking, &backend) => {
                    warn!(sessions, ?max_blocking, "the batch is blocking other sessions; cancelling it");
                }
                () = async { shutdown.triggered().await; tokio::time::sleep(grace).await } => {}
            }
        }
    }

    async fn execute(&mut self) -> JobEnd {
        self.first_health_sample().await;
        // A lock held by another session (say on a table batch_sql also writes) is no
        // fault of the job: keep the lease and try again after a pause, as a batch would,
        // rather than hand the job back and have it claimed straight away again.
        let mut backoff = ConnectionBackoff::default();
        let mut target = loop {
            match crate::slicing::resolve(self.worker, &self.job).await {
                Ok(target) => {
                    info!(
                        table = %target.table,
                        key_type = %target.key_type,
                        key_selection = target.key_selection(),
                        "resolved the job"
                    );
                    break target;
                }
                Err(DataPlaneError::JobDefinition(message)) => {
                    return self.finish(JobState::Failed, Some(message)).await
                }
                Err(DataPlaneError::Batch(e))
                    if e.class() == ErrorClass::Transient(TransientKind::LockTimeout) =>
                {
                    let wait = backoff.next();
                    warn!(error = %e, retry_in = ?wait, "cannot prepare the job's statements yet; retrying");
                    self.wait(wait).await;
                    if let Some(reason) = self.stop_reason() {
                        return JobEnd::Stopped(reason);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot resolve the job's table");
                    return JobEnd::Stopped(StopReason::Unreachable);
                }
            }
        };
        if self.job.is_sliced() {
            if let Some(end) = self.drive_sliced(&mut target).await {
                return end;
            }
        } else if self.rows_total.is_none() {
            self.estimate_total(&target).await;
        }
        loop {
            self.apply_retune();
            self.share_job_budgets().await;
            if let Some(reason) = self.stop_reason() {
                return JobEnd::Stopped(reason);
            }
            if let Some(end) = self.rest_if_outside_window().await {
                return end;
            }
            let health = self.worker.health.borrow().for_job(self.job.id);
            let decision = self.throttle.decide(
                self.started.elapsed(),
                &health,
                self.last_report.take().as_ref(),
            );
            self.note_decision(&decision, &health);
            let batch_size = match decision {
                ThrottleDecision::Hold {
                    reason,
                    recheck_after,
                } => {
                    self.wait(recheck_after).await;
                    self.metrics.slept(reason.as_str(), recheck_after);
                    continue;
                }
                ThrottleDecision::Run {
                    batch_size,
                    pause_before,
                    reason,
                } => {
                    if !pause_before.is_zero() {
                        let paused = Instant::now();
                        let still_runnable = self.pause_before_batch(pause_before).await;
                        self.metrics.slept(
                            reason.map_or("pause", ThrottleReason::as_str),
                            paused.elapsed(),
                        );
                        if let Some(reason) = self.stop_reason() {
                            return JobEnd::Stopped(reason);
                        }
                        if !still_runnable {
                            continue; // decide again on the sample that calls for a hold
                        }
                    }
                    batch_size
                }
            };
            self.metrics.batch_size(batch_size);
            match self.fix_pass_bound(&mut target).await {
                Ok(true) => {}
                // Nothing to walk in this pass: the table was empty when it started.
                Ok(false) => match self.next_phase(&mut target).await {
                    PhaseStep::Continue => continue,
                    PhaseStep::End(end) => return end,
                },
                Err(end) => return end,
            }
            let source = match self.phase {
                // A slice starts above its lower bound.
                Phase::Scan => {
                    KeySource::After(self.checkpoint.as_deref().or(self.job.lower_key.as_deref()))
                }
                Phase::Verify => KeySource::AfterExcludingFailed(self.checkpoint.as_deref()),
                Phase::Retry => KeySource::FailedRows {
                    max_attempts: self.max_attempts(),
                },
            };
            let backend = BatchBackend::default();
            let stop = self.batch_stop(backend.clone());
            let outcome = self
                .worker
                .runner
                .run(
                    &target,
                    self.fence,
                    BatchRequest {
                        source,
                        limit: batch_size,
                        pass_writes: &self.writes,
                    },
                    &backend,
                    stop,
                )
                .await;
            match outcome {
                RunOutcome::Committed { stats, duration } => {
                    self.failing = None;
                    if self.phase != Phase::Retry {
                        self.writes.remember(stats.txid);
                        self.checkpoint = stats.last_key.clone();
                    }
                    self.rows_done += i64::try_from(stats.applied).unwrap_or(i64::MAX);
                    self.rate.record(stats.keys, Instant::now());
                    self.metrics.committed(&stats, duration, self.phase);
                    self.failure_log.record(&stats.failures, Instant::now());
                    self.publish_progress();
                    // One line per batch, for tuning and for tests that check the controller's path.
                    tracing::debug!(
                        target: "backfilld::batch",
                        batch_size,
                        keys = stats.keys,
                        applied = stats.applied,
                        failed = stats.failed,
                        statements = stats.statements,
                        duration_ms = duration.as_secs_f64() * 1000.0,
                        "batch committed"
                    );
                    if let Some(end) = self.judge_failures(&stats).await {
                        return end;
                    }
                    let rows = u64::try_from(stats.keys).unwrap_or(u64::MAX);
                    self.last_report = Some(BatchReport {
                        size: batch_size,
                        outcome: BatchOutcome::Committed { rows, duration },
                    });
                }
                RunOutcome::NoKeys => {
                    if let Some(end) = self.check_pass_end(&target).await {
                        return end;
                    }
                    // A slice is done when its range is; the parent retries and verifies.
                    if self.job.parent_id.is_some() {
                        return self.finish(JobState::Succeeded, None).await;
                    }
                    match self.next_phase(&mut target).await {
                        PhaseStep::Continue => {}
                        PhaseStep::End(end) => return end,
                    }
                }
                RunOutcome::Fenced if self.slice_was_split(&mut target).await => {
                    self.metrics.batch_outcome("fenced");
                    info!(upper_key = ?target.upper_key, "another worker took the upper part of this slice; carrying on below it");
                }
                RunOutcome::Fenced => {
                    self.metrics.batch_outcome("fenced");
                    let state = self.worker.queue.state_of(self.job.id).await.ok().flatten();
                    return JobEnd::Stopped(StopReason::LeaseLost(state));
                }
                RunOutcome::Failed { error, duration } => {
                    if let Some(reason) = self.stop_reason() {
                        // Cancelled by us on the way out: nothing was committed.
                        return JobEnd::Stopped(reason);
                    }
                    match error.class() {
                        ErrorClass::Transient(kind) => {
                            self.metrics.batch_outcome("transient_error");
                            warn!(error = %error, kind = kind.as_str(), "batch rolled back; will retry it smaller after a pause");
                            let (since, batches) =
                                self.failing.get_or_insert_with(|| (Instant::now(), 0));
                            *batches += 1;
                            // Time alone is not enough: a long hold between two failures
                            // is not a job that cannot move.
                            if *batches >= MIN_FAILED_BATCHES_TO_REST
                                && since.elapsed() >= self.worker.settings.worker.stuck_after
                            {
                                return self.rest(&error.to_string()).await;
                            }
                            let outcome = match kind {
                                TransientKind::LockTimeout | TransientKind::Deadlock => {
                                    BatchOutcome::LockTimeout { duration }
                                }
                                TransientKind::StatementTimeout => {
                                    BatchOutcome::StatementTimeout { duration }
                                }
                                TransientKind::QueryCanceled => {
                                    BatchOutcome::CancelledForBlocking { duration }
                                }
                                _ => BatchOutcome::TransientError { duration },
                            };
                            self.last_report = Some(BatchReport {
                                size: batch_size,
                                outcome,
                            });
                        }
                        ErrorClass::RowLevel | ErrorClass::JobLevel => {
                            self.metrics.batch_outcome("job_error");
                            return self.finish(JobState::Failed, Some(error.to_string())).await;
                        }
                    }
                }
            }
        }
    }

    /// A sliced job: cut it on its first claim; once every slice is done,
    /// go on to retries and verification over the whole table.
    async fn drive_sliced(&mut self, target: &mut BatchTarget) -> Option<JobEnd> {
        let slices = self.worker.queue.slices();
        let summary = match slices.summary(self.job.id).await {
            Ok(summary) => summary,
            Err(e) => {
                warn!(error = %e, "cannot read the job's slices");
                return Some(JobEnd::Stopped(StopReason::Unreachable));
            }
        };
        if summary.total == 0 {
            return Some(
                match crate::slicing::cut(self.worker, target, &self.job, self.fence_token()).await
                {
                    Ok(Some(_)) => JobEnd::Stopped(StopReason::Sliced),
                    Ok(None) => JobEnd::Stopped(StopReason::LeaseLost(None)),
                    Err(e) => {
                        warn!(error = %e, "cannot cut the job into slices");
                        JobEnd::Stopped(StopReason::Unreachable)
                    }
                },
            );
        }
        if let Some((slice, error)) = summary.failed.first() {
            let message = format!(
                "slice {slice} failed: {}",
                error.as_deref().unwrap_or("(no error recorded)")
            );
            return Some(self.finish(JobState::Failed, Some(message)).await);
        }
        if summary.cancelled > 0 {
            let message = format!(
                "{} of its slices were cancelled; the job is incomplete",
                summary.cancelled
            );
            return Some(self.finish(JobState::Failed, Some(message)).await);
        }
        info!(slices = summary.total, "every slice is done");
        match self.next_phase(target).await {
            PhaseStep::Continue => None,
            PhaseStep::End(end) => Some(end),
        }
    }

    /// Before a batch of a scan or verification pass of a whole job: fixes where the
    /// pass ends (the table's last key when it starts), once per pass, so that rows the
    /// job's own statement moves forward, or production adds, cannot keep it going.
    /// `Ok(false)` when the table is empty: the pass has nothing to walk.
    async fn fix_pass_bound(&mut self, target: &mut BatchTarget) -> Result<bool, JobEnd> {
        if self.job.parent_id.is_some() || self.phase == Phase::Retry || target.upper_key.is_some()
        {
            return Ok(true); // a slice has bounds of its own; retries walk failed keys
        }
        let last_key = match self.worker.runner.pool().get().await {
            Ok(mut client) => target
                .last_key(&mut client)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let last_key = match last_key {
            Ok(last_key) => last_key,
            Err(e) => {
                warn!(error = %e, "cannot read where the pass ends");
                return Err(JobEnd::Stopped(StopReason::Unreachable));
            }
        };
        match self
            .worker
            .queue
            .fix_pass_bound(self.job.id, self.fence_token(), last_key.as_deref())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                let state = self.worker.queue.state_of(self.job.id).await.ok().flatten();
                return Err(JobEnd::Stopped(StopReason::LeaseLost(state)));
            }
            Err(e) => {
                warn!(error = %e, "cannot record where the pass ends");
                return Err(JobEnd::Stopped(StopReason::Unreachable));
            }
        }
        info!(phase = self.phase.as_str(), last_key = ?last_key, "pass bounded: it ends at the last key it found");
        self.writes.clear();
        target.upper_key = last_key;
        Ok(target.upper_key.is_some())
    }

    /// At the end of a scan or verification pass: fails the job when a row past the pass's
    /// last key was written by the pass's own batches (its statement moves keys forward).
    async fn check_pass_end(&mut self, target: &BatchTarget) -> Option<JobEnd> {
        let last_key = target.upper_key.as_deref()?;
        if self.phase == Phase::Retry {
            return None;
        }
        let moved = match self.worker.runner.pool().get().await {
            Ok(mut client) => target
                .row_moved_past(&mut client, last_key, &self.writes)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match moved {
            Ok(None) => None,
            Ok(Some(error)) => Some(self.finish(JobState::Failed, Some(error.to_string())).await),
            Err(e) => {
                warn!(error = %e, "cannot look past the end of the pass");
                Some(JobEnd::Stopped(StopReason::Unreachable))
            }
        }
    }

    /// How driving the job ends after a fenced call that gave it back (rested, paused):
    /// stopped for `reason` when it did, the lease lost when the fence refused, the
    /// database unreachable when the call failed (`what` names the call in the log).
    async fn given_back(
        &self,
        given_back: Result<bool, backfill_queue::QueueError>,
        reason: StopReason,
        what: &str,
    ) -> JobEnd {
        match given_back {
            Ok(true) => JobEnd::Stopped(reason),
            Ok(false) => JobEnd::Stopped(StopReason::LeaseLost(
                self.worker.queue.state_of(self.job.id).await.ok().flatten(),
            )),
            Err(e) => {
                warn!(error = %e, "cannot {what}");
                JobEnd::Stopped(StopReason::Unreachable)
            }
        }
    }

    /// Gives a job whose batches have failed for `worker.stuck_after` back to the queue
    /// to rest for `worker.stuck_rest`, saying why in `last_error`.
    async fn rest(&mut self, error: &str) -> JobEnd {
        let worker = &self.worker.settings.worker;
        let why = format!(
            "not moving: every batch failed for {} (last: {error}); resting {} before any worker tries again",
            humantime::format_duration(worker.stuck_after),
            humantime::format_duration(worker.stuck_rest),
        );
        let given_back = self
            .worker
            .queue
            .rest(self.job.id, self.fence_token(), worker.stuck_rest, &why)
            .await;
        if matches!(given_back, Ok(true)) {
            warn!(reason = %why, "job not moving");
        }
        self.given_back(given_back, StopReason::Stuck, "give the stuck job back")
            .await
    }

    /// Live retune: when the heartbeat found the job's tuning columns changed, logs each
    /// change (old → new) and hands the new limits to the throttle, keeping what it learned.
    fn apply_retune(&mut self) {
        if !self.tunables.has_changed().unwrap_or(false) {
            return;
        }
        let Some(new) = self.tunables.borrow_and_update().clone() else {
            return;
        };
        let job = &mut self.job;
        let mut changed = false;
        let mut restart_at = false;
        for (column, old, new) in [
            ("batch_size", &mut job.batch_size, new.batch_size),
            (
                "min_batch_size",
                &mut job.min_batch_size,
                new.min_batch_size,
            ),
            (
                "max_batch_size",
                &mut job.max_batch_size,
                new.max_batch_size,
            ),
            (
                "target_batch_ms",
                &mut job.target_batch_ms,
                new.target_batch_ms,
            ),
        ] {
            if *old != new {
                info!(column, old = ?*old, new = ?new, "retuned");
                restart_at |= column == "batch_size";
                *old = new;
                changed = true;
            }
        }
        if job.max_rows_per_second != new.max_rows_per_second {
            info!(column = "max_rows_per_second", old = ?job.max_rows_per_second, new = ?new.max_rows_per_second, "retuned");
            job.max_rows_per_second = new.max_rows_per_second;
            changed = true;
        }
        if self.priority.is_some_and(|old| old != new.priority) {
            info!(column = "priority", old = ?self.priority, new = new.priority, "retuned");
        }
        self.priority = Some(new.priority);
        if !changed {
            return;
        }
        let settings = throttle_settings(&self.worker.settings, &self.job);
        self.throttle.retune_batches(
            settings.min_batch_size,
            settings.max_batch_size,
            settings.target_batch,
            restart_at.then_some(settings.start_batch_size),
        );
        self.rate_budget = settings.max_rows_per_second;
        self.throttle
            .set_max_rows_per_second(settings.max_rows_per_second);
        // A slice runs on its share of the budget: split the new one at once.
        self.budget_checked = None;
        self.publish_progress();
    }

    /// The circuit breaker, after a committed batch: pauses the job (fenced) when too many
    /// of the rows it processed since the claim failed. Retries of rows that failed before
    /// are not judged again: they were counted when they first failed.
    async fn judge_failures(&mut self, stats: &backfill_dataplane::BatchStats) -> Option<JobEnd> {
        if self.phase == Phase::Retry {
            return None;
        }
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.breaker.add(count(stats.keys), count(stats.failed));
        let tripped = self.breaker_limits().judge(self.breaker)?;
        let why = format!(
            "circuit breaker: {tripped} since this worker claimed the job; paused. Fix the rows (backfill.failed_rows where job_id = {}) or batch_sql, then select backfill.resume('{}')",
            self.job.id,
            self.job.name.replace('\'', "''")
        );
        let given_back = self
            .worker
            .queue
            .pause_for(self.job.id, self.fence_token(), &why)
            .await;
        if matches!(given_back, Ok(true)) {
            warn!(reason = %why, "too many rows failed");
        }
        Some(
            self.given_back(
                given_back,
                StopReason::Tripped,
                "pause the job for its failed rows",
            )
            .await,
        )
    }

    /// After a fenced commit of a slice: true when the lease is still ours and
    /// only the slice's upper bound moved (another worker split it); the new
    /// bound is taken over and the batch can be retried.
    async fn slice_was_split(&self, target: &mut BatchTarget) -> bool {
        if self.job.parent_id.is_none() {
            return false;
        }
        let slices = self.worker.queue.slices();
        let Ok(upper_key) = slices.upper_key(self.job.id).await else {
            return false;
        };
        if upper_key == target.upper_key {
            return false;
        }
        let progress = self.progress.borrow().clone();
        let held = self
            .worker
            .queue
            .heartbeat(
                self.job.id,
                self.fence_token(),
                self.worker.settings.worker.lease,
                &progress,
            )
            .await;
        if !matches!(held, Ok(HeartbeatReport::Held(_))) {
            return false;
        }
        target.upper_key = upper_key;
        true
    }

    /// A job takes its share of the duty cycle next to production, divided among every job
    /// and slice running now on any worker, and a slice its share of its job's
    /// rows-per-second budget, divided among the job's slices running now; both re-read
    /// every probe interval.
    async fn share_job_budgets(&mut self) {
        let sharing = self.duty_budget < 1.0;
        let slice_budget = self.job.parent_id.zip(self.rate_budget);
        if !sharing && slice_budget.is_none() {
            return;
        }
        // As often as health is probed: slices starting or ending change the share.
        let every = self.worker.settings.throttle.probe_interval;
        if self.budget_checked.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.budget_checked = Some(Instant::now());
        if let Some((parent_id, budget)) = slice_budget {
            if let Ok(active) = self.worker.queue.slices().active(parent_id).await {
                let share = rate_share(Some(budget), active);
                if share != self.throttle.max_rows_per_second() {
                    info!(active_slices = active, rows_per_second = ?share, "sharing the job's rate budget");
                    self.throttle.set_max_rows_per_second(share);
                }
            }
        }
        if sharing {
            if let Ok(running) = self.worker.queue.running_jobs().await {
                let duty = duty_share(self.duty_budget, running);
                if duty != self.throttle.busy_duty_cycle() {
                    info!(
                        running_jobs = running,
                        busy_duty_cycle = duty,
                        "sharing the duty cycle next to production with the other running jobs"
                    );
                    self.throttle.set_busy_duty_cycle(duty);
                }
            }
        }
    }

    /// Counts the rows the job still has to touch, once per job.
    async fn estimate_total(&mut self, target: &BatchTarget) {
        let mut client = match self.worker.runner.pool().get().await {
            Ok(client) => client,
            Err(e) => return warn!(error = %e, "cannot estimate the job's size"),
        };
        let pending = if self.job.pending_predicate.is_some() || self.phase == Phase::Scan {
            target
                .count_pending(&mut client, self.checkpoint.as_deref(), false)
                .await
        } else {
            Ok(0)
        };
        match pending {
            Ok(pending) => {
                let total = self.rows_done + pending;
                self.rows_total = Some(total);
                if let Err(e) = self
                    .worker
                    .queue
                    .set_total_estimate(self.job.id, self.fence_token(), total)
                    .await
                {
                    warn!(error = %e, "cannot record the job's size");
                }
                info!(rows_pending = pending, "sized the job");
            }
            Err(e) => warn!(error = %e, "cannot estimate the job's size"),
        }
    }

    fn fence_token(&self) -> LeaseToken {
        LeaseToken(self.fence.token)
    }

    fn max_attempts(&self) -> i32 {
        self.job
            .max_attempts
            .unwrap_or(self.worker.settings.batch.max_attempts)
    }

    /// The key source ran dry: move on to retries, verification or the end.
    async fn next_phase(&mut self, target: &mut BatchTarget) -> PhaseStep {
        let queue = &self.worker.queue;
        let retry = match queue
            .failed_rows_to_retry(self.job.id, self.max_attempts())
            .await
        {
            Ok(retry) => retry,
            Err(e) => {
                warn!(error = %e, "cannot read failed rows");
                return PhaseStep::End(JobEnd::Stopped(StopReason::Unreachable));
            }
        };
        if let Some(due_in) = retry {
            if self.phase != Phase::Retry {
                info!("scan complete; retrying failed rows");
                if !self.enter_phase(Phase::Retry).await {
                    return PhaseStep::End(JobEnd::Stopped(StopReason::LeaseLost(None)));
                }
            }
            // Wait for the next failed row to be due, staying responsive to stops.
            if !due_in.is_zero() {
                self.wait(due_in.min(self.worker.settings.worker.heartbeat))
                    .await;
            }
            return PhaseStep::Continue;
        }
        self.verify(target).await
    }

    async fn enter_phase(&mut self, phase: Phase) -> bool {
        match self
            .worker
            .queue
            .enter_phase(self.job.id, self.fence_token(), phase)
            .await
        {
            Ok(true) => {
                self.phase = phase;
                if phase == Phase::Verify {
                    self.checkpoint = None;
                }
                true
            }
            Ok(false) => false,
            Err(e) => {
                warn!(error = %e, "cannot change phase");
                false
            }
        }
    }

    /// Counts what is left; succeeds only at 100 %.
    async fn verify(&mut self, target: &mut BatchTarget) -> PhaseStep {
        let mut client = match self.worker.runner.pool().get().await {
            Ok(client) => client,
            Err(e) => {
                warn!(error = %e, "cannot verify");
                return PhaseStep::End(JobEnd::Stopped(StopReason::Unreachable));
            }
        };
        let pending = if self.job.pending_predicate.is_some() {
            match target.count_pending(&mut client, None, true).await {
                Ok(pending) => pending,
                Err(e) => {
                    warn!(error = %e, "verification count failed");
                    return PhaseStep::End(JobEnd::Stopped(StopReason::Unreachable));
                }
            }
        } else {
            0 // Without a pending predicate every row was visited once; nothing to count.
        };
        drop(client);
        let failed = match self.worker.queue.failed_row_count(self.job.id).await {
            Ok(failed) => failed,
            Err(e) => {
                warn!(error = %e, "cannot count failed rows");
                return PhaseStep::End(JobEnd::Stopped(StopReason::Unreachable));
            }
        };
        info!(pending, failed, "verification pass");
        if pending > 0 {
            let sweeps = self.job.verify_sweeps + i32::from(self.phase == Phase::Verify);
            if sweeps < self.worker.settings.worker.max_verify_sweeps {
                info!(
                    pending,
                    "rows still pending after the scan; sweeping the table again"
                );
                self.job.verify_sweeps = sweeps;
                return if self.enter_phase(Phase::Verify).await {
                    // The sweep fixes its own last key before its first batch.
                    target.upper_key = None;
                    PhaseStep::Continue
                } else {
                    PhaseStep::End(JobEnd::Stopped(StopReason::LeaseLost(None)))
                };
            }
            let message = format!(
                "{pending} rows still match pending_predicate after {sweeps} verification sweeps; \
                 something keeps making rows pending (or batch_sql does not change what pending_predicate tests)"
            );
            return PhaseStep::End(self.finish(JobState::Failed, Some(message)).await);
        }
        if failed > 0 {
            let message = format!(
                "{failed} rows failed (see backfill.failed_rows where job_id = {}); fix them, then select backfill.retry_failed('{}')",
                self.job.id,
                self.job.name.replace('\'', "''")
            );
            return PhaseStep::End(self.finish(JobState::Failed, Some(message)).await);
        }
        PhaseStep::End(self.finish(JobState::Succeeded, None).await)
    }

    async fn finish(&mut self, state: JobState, last_error: Option<String>) -> JobEnd {
        if let Some(error) = &last_error {
            warn!(error = %error, "job failed");
        }
        match self
            .worker
            .queue
            .finish(
                self.job.id,
                self.fence_token(),
                state,
                last_error.as_deref(),
            )
            .await
        {
            Ok(true) => {
                self.metrics.finished(state == JobState::Succeeded);
                JobEnd::Finished(state)
            }
            Ok(false) => JobEnd::Stopped(StopReason::LeaseLost(
                self.worker.queue.state_of(self.job.id).await.ok().flatten(),
            )),
            Err(e) => {
                warn!(error = %e, "cannot record the job's end");
                JobEnd::Stopped(StopReason::Unreachable)
            }
        }
    }

    /// Logs a throttle decision when its state or reason changes, with the health
    /// readings behind it, and exports it.
    fn note_decision(&mut self, decision: &ThrottleDecision, health: &HealthSample) {
        let reason = decision.reason();
        self.metrics.throttled(reason.map(ThrottleReason::as_str));
        self.watch_throttled_spell(reason);
        self.metrics.lock_waits(health.sessions_blocked_by_us);
        let current = (self.throttle.state_label(), reason);
        if self.last_decision == Some(current) {
            return;
        }
        self.last_decision = Some(current);
        let (state, reason) = (current.0, reason.map_or("", ThrottleReason::as_str));
        let lag = describe_lag(health);
        let missing = health.missing_standbys.join(",");
        let blocked = health.sessions_blocked_by_us;
        let (slots, operator_ratio) = (describe_slots(health), health.operator_ratio);
        match decision {
            ThrottleDecision::Hold { recheck_after, .. } => info!(
                state, reason, ?recheck_after, %lag, missing_standbys = %missing, sessions_blocked = blocked,
                %slots, operator_ratio,
                "throttle: holding"
            ),
            ThrottleDecision::Run {
                batch_size,
                pause_before,
                reason: Some(_),
            } => {
                let paced_rows_per_second = self.throttle.latency_pace().map(f64::round);
                info!(
                    state, reason, batch_size, ?pause_before, %lag, missing_standbys = %missing, sessions_blocked = blocked,
                    paced_rows_per_second, canary_delays = health.probe_delays, %slots, operator_ratio,
                    "throttle: slowing down"
                )
            }
            ThrottleDecision::Run {
                batch_size,
                reason: None,
                ..
            } => info!(state, batch_size, "throttle: running freely"),
        }
        self.publish_progress();
    }

    /// Hands live numbers to the heartbeat (for job_status) and to the metrics.
    fn publish_progress(&self) {
        let rate = self.rate.rows_per_second();
        let remaining = self.rows_total.map(|total| (total - self.rows_done).max(0));
        self.metrics.progress(self.rows_done, remaining, rate);
        let progress = JobProgress {
            rows_per_second: rate,
            batch_size: i32::try_from(self.throttle.batch_size()).ok(),
            throttle_state: Some(self.throttle.state_label().to_string()),
            throttle_reason: self.throttle.reason().map(|r| r.as_str().to_string()),
            rows_done: self.rows_done,
            recent_rows_per_second: None, // the heartbeat measures it
        };
        self.progress.send_replace(progress);
    }
}

/// The job's throttle: deployment defaults, overridden by the job's own columns.
pub(crate) fn throttle_settings(settings: &Settings, job: &Job) -> ThrottleSettings {
    let defaults = settings.throttle_defaults();
    let positive = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0);
    let min_batch_size = positive(job.min_batch_size).unwrap_or(defaults.min_batch_size);
    let max_batch_size = positive(job.max_batch_size)
        .unwrap_or(defaults.max_batch_size)
        .max(min_batch_size);
    let start_batch_size = positive(job.batch_size)
        .unwrap_or(defaults.start_batch_size)
        .clamp(min_batch_size, max_batch_size);
    let target_batch = positive(job.target_batch_ms)
        .map(|ms| Duration::from_millis(u64::from(ms)))
        .unwrap_or(defaults.target_batch);
    let max_rows_per_second = job
        .max_rows_per_second
        .or(defaults.max_rows_per_second)
        .filter(|rate| *rate > 0.0);
    ThrottleSettings {
        min_batch_size,
        max_batch_size,
        start_batch_size,
        target_batch,
        max_rows_per_second,
        ..defaults
    }
}

/// WAL retained by every replication slot for the log, e.g. `debezium=1100MiB`.
fn describe_slots(health: &HealthSample) -> String {
    let slots: Vec<String> = health
        .slots
        .iter()
        .map(|slot| format!("{}={}MiB", slot.name, slot.retained_bytes >> 20))
        .collect();
    slots.join(",")
}

/// Every standby's lag for the log, e.g. `standby1=1.52s/310kB`, `-` when unknown.
fn describe_lag(health: &HealthSample) -> String {
    let lags: Vec<String> = health
        .replicas
        .iter()
        .map(|replica| {
            let time = replica
                .lag
                .map_or("-".to_string(), |lag| format!("{:.2}s", lag.as_secs_f64()));
            let bytes = replica
                .lag_bytes
                .map_or("-".to_string(), |bytes| format!("{}kB", bytes / 1024));
            format!("{}={time}/{bytes}", replica.name)
        })
        .collect();
    lags.join(",")
}

/// Completes with the number of blocked sessions once sessions our batch blocks have
/// waited `max_blocking`. A fresh sample showing a shorter wait sets a deadline for the
/// rest of it instead of waiting for the next sample: a session blocked by our
/// transaction keeps waiting until it ends, so production never waits a whole probe
/// interval past the limit. A sample showing nobody blocked (they gave up) clears it.
async fn blocked_for(
    health: &mut watch::Receiver<HealthSample>,
    max_blocking: Duration,
    backend: &BatchBackend,
) -> u32 {
    let mut deadline: Option<(tokio::time::Instant, u32)> = None;
    loop {
        let expiry = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = health.changed() => {
                if changed.is_err() {
                    // The probe task is gone: no more samples, no verdict from them.
                    std::future::pending::<()>().await;
                }
                let sample = health.borrow_and_update();
                // Only the sessions this batch's backend blocks: another job's batch in
                // this process answers for its own.
                let ours = backend.pid().and_then(|pid| {
                    sample.blocking_backends.iter().find(|blocking| blocking.pid == pid)
                });
                deadline = ours.map(|blocking| {
                    let at = tokio::time::Instant::now()
                        + max_blocking.saturating_sub(blocking.longest);
                    let earliest = deadline.map_or(at, |(previous, _)| previous.min(at));
                    (earliest, blocking.sessions)
                });
            }
            () = expiry => return deadline.map_or(0, |(_, sessions)| sessions),
        }
    }
}

/// Whose lease a heartbeat extends, by how much, how often.
struct HeartbeatOf {
    job_id: i64,
    token: LeaseToken,
    lease: Duration,
    interval: Duration,
    /// The wall time the forecast's recent rate is measured over.
    forecast_window: Duration,
}

/// Extends the lease every `interval`, publishes progress and hands on the job's tuning
/// columns (a live retune); tells the job to stop as soon as the lease turns out to be
/// gone (paused, cancelled, taken over).
async fn heartbeat_loop(
    queue: Queue,
    of: HeartbeatOf,
    progress: watch::Receiver<JobProgress>,
    stop: watch::Sender<Option<StopReason>>,
    tunables: watch::Sender<Option<Tunables>>,
) {
    let HeartbeatOf {
        job_id,
        token,
        lease,
        interval,
        forecast_window,
    } = of;
    // Measured here, every beat, whether batches run or not: held time counts.
    let mut recent = backfill_core::steering::RecentRate::new(forecast_window);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let mut current = progress.borrow().clone();
        recent.record(started.elapsed(), current.rows_done);
        current.recent_rows_per_second = recent.rows_per_second();
        match queue.heartbeat(job_id, token, lease, &current).await {
            Ok(HeartbeatReport::Held(now)) => {
                tunables.send_if_modified(|seen| {
                    let changed = seen.as_ref() != Some(&now);
                    if changed {
                        *seen = Some(now);
                    }
                    changed
                });
            }
            Ok(HeartbeatReport::Lost { state }) => {
                info!(
                    state = state.map_or("deleted", JobState::as_str),
                    "lease lost"
                );
                stop.send_replace(Some(StopReason::LeaseLost(state)));
                return;
            }
            // The database may be restarting; the batch fence keeps us safe meanwhile.
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// Rows per second over recent batches (exponentially weighted).
#[derive(Debug, Default)]
struct RateEstimate {
    last: Option<Instant>,
    rows_per_second: Option<f64>,
}

impl RateEstimate {
    fn record(&mut self, rows: usize, at: Instant) {
        if let Some(last) = self.last {
            let elapsed = at.duration_since(last).as_secs_f64();
            if elapsed > 0.0 {
                let sample = rows as f64 / elapsed;
                self.rows_per_second = Some(match self.rows_per_second {
                    Some(previous) => 0.7 * previous + 0.3 * sample,
                    None => sample,
                });
            }
        }
        self.last = Some(at);
    }

    fn rows_per_second(&self) -> Option<f64> {
        self.rows_per_second
    }
}

/// Batches that must fail in a row, besides `worker.stuck_after` passing, before a job
/// is taken for stuck and rests.
const MIN_FAILED_BATCHES_TO_REST: u32 = 3;

/// Log lines per isolated failing key allowed in each [`FAILURE_LOG_WINDOW`].
const FAILURE_LINES_PER_WINDOW: usize = 20;
/// The window of [`FAILURE_LINES_PER_WINDOW`].
const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(10);

/// Rate-limits the log line per isolated failing key (key, SQLSTATE, message):
/// at most [`FAILURE_LINES_PER_WINDOW`] per [`FAILURE_LOG_WINDOW`], then one
/// summary line for the rest when the window ends. A job whose every row fails
/// must not flood the log; `backfill.failed_rows` has them all.
#[derive(Debug, Default)]
struct FailureLog {
    window_start: Option<Instant>,
    logged: usize,
    suppressed: usize,
}

impl FailureLog {
    /// Logs a committed batch's failures, within the limit.
    fn record(&mut self, failures: &[RowFailure], now: Instant) {
        if self
            .window_start
            .is_some_and(|start| now.duration_since(start) >= FAILURE_LOG_WINDOW)
        {
            self.flush();
        }
        for failure in failures {
            if self.admit(now) {
                warn!(
                    key = %failure.key,
                    reason = failure.reason.as_str(),
                    sqlstate = failure.error.sqlstate.as_deref().unwrap_or(""),
                    // Not `message`: JSON logs would carry two fields of that name.
                    error = %failure.error.message,
                    "row failed; recorded in backfill.failed_rows"
                );
            }
        }
    }

    /// Whether one more line fits in the current window; counts it either way.
    fn admit(&mut self, now: Instant) -> bool {
        self.window_start.get_or_insert(now);
        if self.logged < FAILURE_LINES_PER_WINDOW {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Ends the window, summing up the lines it held back.
    fn flush(&mut self) {
        if self.suppressed > 0 {
            warn!(
                rows = self.suppressed,
                window = ?FAILURE_LOG_WINDOW,
                "more rows failed than are logged one by one; all are in backfill.failed_rows"
            );
        }
        *self = FailureLog::default();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_lines_are_limited_per_window_and_the_rest_summed_up() {
        let start = Instant::now();
        let mut log = FailureLog::default();
        let admitted = (0..50).filter(|_| log.admit(start)).count();
        assert_eq!(admitted, FAILURE_LINES_PER_WINDOW);
        assert_eq!(log.suppressed, 50 - FAILURE_LINES_PER_WINDOW);
        // Still the same window just before it ends: nothing more is logged.
        log.record(&[], start + FAILURE_LOG_WINDOW - Duration::from_millis(1));
        assert!(!log.admit(start + FAILURE_LOG_WINDOW - Duration::from_millis(1)));
        // A batch after the window ends it (with its summary) and opens a new one.
        log.record(&[], start + FAILURE_LOG_WINDOW);
        assert_eq!((log.logged, log.suppressed, log.window_start), (0, 0, None));
        assert!(log.admit(start + FAILURE_LOG_WINDOW));
        log.flush();
        assert_eq!((log.logged, log.suppressed), (0, 0));
    }
}
