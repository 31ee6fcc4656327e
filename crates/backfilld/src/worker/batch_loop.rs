//! One job on this worker, batch by batch: ask the throttle, pause, run the batch, and
//! turn its outcome into progress, a smaller next batch, or the job's end.

use std::time::{Duration, Instant};

use backfill_core::breaker::BreakerCount;
use backfill_core::error_class::{ErrorClass, TransientKind};
use backfill_core::lease::Lease;
use backfill_core::phase::{transient_outcome, FailingStreak};
use backfill_core::throttle::{
    BatchOutcome, BatchReport, ThrottleController, ThrottleDecision, ThrottleReason,
};
use backfill_dataplane::{
    BatchBackend, BatchError, BatchRequest, BatchStats, BatchTarget, DataPlaneError, KeySource,
    PassWrites, RunOutcome,
};
use backfill_queue::{Job, JobProgress, JobState, Phase};
use tokio::sync::watch;
use tracing::{info, warn};

use super::budgets::throttle_settings;
use super::heartbeat::{heartbeat_loop, HeartbeatOf};
use super::reporting::{FailureLog, RateEstimate};
use super::{until, ConnectionBackoff, JobEnd, JobRun, PhaseStep, StopReason, Worker};
use crate::shutdown::Shutdown;
use crate::telemetry::JobMetrics;

impl<'w> JobRun<'w> {
    pub(super) fn start(worker: &'w Worker, job: Job, lease: Lease, shutdown: Shutdown) -> Self {
        let settings = &worker.settings;
        let (stop_tx, stop) = watch::channel(None);
        let (progress, progress_rx) = watch::channel(JobProgress {
            rows_done: job.rows_done,
            ..JobProgress::default()
        });
        let (tunables_tx, tunables) = watch::channel(None);
        let heartbeat = tokio::spawn(heartbeat_loop(
            worker.queue.clone(),
            HeartbeatOf {
                lease,
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
            lease,
            shutdown,
            rate_budget: throttle_settings.max_rows_per_second,
            duty_budget: throttle_settings.busy_duty_cycle,
            budget_checked: None,
            failing: FailingStreak::default(),
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
            metrics: JobMetrics::new(&job.spec.name),
            failure_log: FailureLog::default(),
            job,
        }
    }

    pub(super) fn stop_heartbeat(&self) {
        self.heartbeat.abort();
    }

    fn stop_reason(&self) -> Option<StopReason> {
        if self.shutdown.is_triggered() {
            return Some(StopReason::Shutdown);
        }
        *self.stop.borrow()
    }

    /// Waits `duration`, or less if the job must stop.
    pub(super) async fn wait(&self, duration: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            () = self.shutdown.triggered() => {}
            () = until(&mut stop, Option::is_some) => {}
        }
    }

    /// Resolves the job against the catalog. A lock held by another session (say on a
    /// table batch_sql also writes) is no fault of the job: keep the lease and try again
    /// after a pause, as a batch would, rather than hand the job back and have it claimed
    /// straight away again.
    async fn resolve_target(&mut self) -> Result<BatchTarget, JobEnd> {
        let mut backoff = ConnectionBackoff::default();
        loop {
            match super::slicing::resolve(self.worker, &self.job).await {
                Ok(target) => {
                    info!(
                        table = %target.table,
                        key_type = %target.key_type,
                        key_selection = target.key_selection(),
                        "resolved the job"
                    );
                    return Ok(target);
                }
                Err(DataPlaneError::JobDefinition(message)) => {
                    return Err(self.finish(JobState::Failed, Some(message)).await)
                }
                Err(DataPlaneError::Batch(e))
                    if e.class() == ErrorClass::Transient(TransientKind::LockTimeout) =>
                {
                    let wait = backoff.next();
                    warn!(error = %e, retry_in = ?wait, "cannot prepare the job's statements yet; retrying");
                    self.wait(wait).await;
                    if let Some(reason) = self.stop_reason() {
                        return Err(JobEnd::Stopped(reason));
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot resolve the job's table");
                    return Err(JobEnd::Stopped(StopReason::Unreachable));
                }
            }
        }
    }

    pub(super) async fn execute(&mut self) -> JobEnd {
        self.first_health_sample().await;
        let mut target = match self.resolve_target().await {
            Ok(target) => target,
            Err(end) => return end,
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
            let batch_size = match self.next_batch_size().await {
                BatchGo::Run(batch_size) => batch_size,
                BatchGo::DecideAgain => continue,
                BatchGo::Stop(reason) => return JobEnd::Stopped(reason),
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
            let source = self.key_source();
            let backend = BatchBackend::default();
            let stop = self.batch_stop(backend.clone());
            let in_flight = self.worker.batches.start();
            let outcome = self
                .worker
                .runner
                .run(
                    &target,
                    &self.lease,
                    BatchRequest {
                        source,
                        limit: batch_size,
                        pass_writes: &self.writes,
                    },
                    &backend,
                    stop,
                )
                .await;
            drop(in_flight);
            if let Some(end) = self.after_batch(outcome, batch_size, &mut target).await {
                return end;
            }
        }
    }

    /// Where this batch's keys come from in the current phase.
    fn key_source(&self) -> KeySource<'_> {
        match self.phase {
            // A slice starts above its lower bound.
            Phase::Scan => {
                KeySource::After(self.checkpoint.as_deref().or(self.job.lower_key.as_deref()))
            }
            Phase::Verify => KeySource::AfterExcludingFailed(self.checkpoint.as_deref()),
            Phase::Retry => KeySource::FailedRows {
                max_attempts: self.max_attempts(),
            },
        }
    }

    /// Turns a batch's outcome into progress and the throttle's next report, a move to
    /// the next phase, or the job's end on this worker (`Some`).
    async fn after_batch(
        &mut self,
        outcome: RunOutcome,
        batch_size: u32,
        target: &mut BatchTarget,
    ) -> Option<JobEnd> {
        match outcome {
            RunOutcome::Committed { stats, duration } => {
                self.committed(&stats, duration, batch_size).await
            }
            RunOutcome::NoKeys => {
                if let Some(end) = self.check_pass_end(target).await {
                    return Some(end);
                }
                // A slice is done when its range is; the parent retries and verifies.
                if self.job.parent_id.is_some() {
                    return Some(self.finish(JobState::Succeeded, None).await);
                }
                match self.next_phase(target).await {
                    PhaseStep::Continue => None,
                    PhaseStep::End(end) => Some(end),
                }
            }
            RunOutcome::Fenced if self.slice_was_split(target).await => {
                self.metrics.batch_outcome("fenced");
                info!(upper_key = ?target.upper_key, "another worker took the upper part of this slice; carrying on below it");
                None
            }
            RunOutcome::Fenced => {
                self.metrics.batch_outcome("fenced");
                let state = self.worker.queue.state_of(self.job.id).await.ok().flatten();
                Some(JobEnd::Stopped(StopReason::LeaseLost(state)))
            }
            RunOutcome::Failed { error, duration } => {
                self.failed(error, duration, batch_size).await
            }
        }
    }

    /// A committed batch: progress, metrics, the failed rows' log lines, the breaker.
    async fn committed(
        &mut self,
        stats: &BatchStats,
        duration: Duration,
        batch_size: u32,
    ) -> Option<JobEnd> {
        self.failing.reset();
        if self.phase != Phase::Retry {
            self.writes.remember(stats.txid);
            self.checkpoint = stats.last_key.clone();
        }
        self.rows_done += i64::try_from(stats.applied).unwrap_or(i64::MAX);
        self.rate.record(stats.keys, Instant::now());
        self.metrics.committed(stats, duration, self.phase);
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
        let rows = u64::try_from(stats.keys).unwrap_or(u64::MAX);
        self.last_report = Some(BatchReport {
            size: batch_size,
            outcome: BatchOutcome::Committed { rows, duration },
        });
        self.judge_failures(stats).await
    }

    /// A batch that rolled back: a transient error retries smaller after a pause (or rests
    /// a job that cannot move); any other error fails the job.
    async fn failed(
        &mut self,
        error: BatchError,
        duration: Duration,
        batch_size: u32,
    ) -> Option<JobEnd> {
        if let Some(reason) = self.stop_reason() {
            // Cancelled by us on the way out: nothing was committed.
            return Some(JobEnd::Stopped(reason));
        }
        match error.class() {
            ErrorClass::Transient(kind) => {
                self.metrics.batch_outcome("transient_error");
                warn!(error = %error, kind = kind.as_str(), "batch rolled back; will retry it smaller after a pause");
                if self
                    .failing
                    .failed(Instant::now(), self.worker.settings.worker.stuck_after)
                {
                    return Some(self.rest(&error.to_string()).await);
                }
                self.last_report = Some(BatchReport {
                    size: batch_size,
                    outcome: transient_outcome(kind, duration),
                });
                None
            }
            ErrorClass::RowLevel | ErrorClass::JobLevel => {
                self.metrics.batch_outcome("job_error");
                Some(self.finish(JobState::Failed, Some(error.to_string())).await)
            }
        }
    }

    /// Asks the throttle for the next batch on the latest health sample: holds and pauses
    /// are waited out here (and counted as sleep), so what comes back is a size to run, a
    /// call to decide again, or a reason to stop.
    async fn next_batch_size(&mut self) -> BatchGo {
        let health = self.worker.health.borrow().for_job(self.job.id);
        let decision = self.throttle.decide(
            self.started.elapsed(),
            &health,
            self.last_report.take().as_ref(),
        );
        self.note_decision(&decision, &health);
        match decision {
            ThrottleDecision::Hold {
                reason,
                recheck_after,
            } => {
                self.wait(recheck_after).await;
                self.metrics.slept(reason.as_str(), recheck_after);
                BatchGo::DecideAgain
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
                        return BatchGo::Stop(reason);
                    }
                    if !still_runnable {
                        // Decide again on the sample that calls for a hold.
                        return BatchGo::DecideAgain;
                    }
                }
                BatchGo::Run(batch_size)
            }
        }
    }

    pub(super) fn max_attempts(&self) -> i32 {
        self.job
            .tunables
            .max_attempts_or(self.worker.settings.batch.max_attempts)
    }
}

/// What the throttle's decision leaves the batch loop to do.
enum BatchGo {
    /// Run a batch of this many keys.
    Run(u32),
    /// Ask the throttle again (a hold was waited out, or health turned during a pause).
    DecideAgain,
    /// The job must stop on this worker.
    Stop(StopReason),
}
