//! The phase machine's I/O: bounding a pass, moving from scan to retries to
//! verification, cutting a sliced job, and recording the job's end.

use backfill_core::phase::{
    after_keys_ran_dry, judge_verification, AfterKeysRanDry, VerificationCount, VerificationVerdict,
};
use backfill_dataplane::BatchTarget;
use backfill_queue::{HeartbeatReport, JobState, Phase};
use tracing::{info, warn};

use super::{JobEnd, JobRun, PhaseStep, StopReason};

impl JobRun<'_> {
    /// A sliced job: cut it on its first claim; once every slice is done,
    /// go on to retries and verification over the whole table.
    pub(super) async fn drive_sliced(&mut self, target: &mut BatchTarget) -> Option<JobEnd> {
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
                match super::slicing::cut(self.worker, target, &self.job, &self.lease).await {
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
    pub(super) async fn fix_pass_bound(
        &mut self,
        target: &mut BatchTarget,
    ) -> Result<bool, JobEnd> {
        if self.job.parent_id.is_some() || self.phase == Phase::Retry || target.upper_key.is_some()
        {
            return Ok(true); // a slice has bounds of its own; retries walk failed keys
        }
        let last_key = match self.worker.runner.last_key(target).await {
            Ok(last_key) => last_key,
            Err(e) => {
                warn!(error = %e, "cannot read where the pass ends");
                return Err(JobEnd::Stopped(StopReason::Unreachable));
            }
        };
        match self
            .worker
            .queue
            .fix_pass_bound(&self.lease, last_key.as_deref())
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
    pub(super) async fn check_pass_end(&mut self, target: &BatchTarget) -> Option<JobEnd> {
        let last_key = target.upper_key.as_deref()?;
        if self.phase == Phase::Retry {
            return None;
        }
        match self
            .worker
            .runner
            .row_moved_past(target, last_key, &self.writes)
            .await
        {
            Ok(None) => None,
            Ok(Some(error)) => Some(self.finish(JobState::Failed, Some(error.to_string())).await),
            Err(e) => {
                warn!(error = %e, "cannot look past the end of the pass");
                Some(JobEnd::Stopped(StopReason::Unreachable))
            }
        }
    }

    /// After a fenced commit of a slice: true when the lease is still ours and
    /// only the slice's upper bound moved (another worker split it); the new
    /// bound is taken over and the batch can be retried.
    pub(super) async fn slice_was_split(&self, target: &mut BatchTarget) -> bool {
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
        let held = self.worker.queue.heartbeat(&self.lease, &progress).await;
        if !matches!(held, Ok(HeartbeatReport::Held(_))) {
            return false;
        }
        target.upper_key = upper_key;
        true
    }

    /// Counts the rows the job still has to touch, once per job.
    pub(super) async fn estimate_total(&mut self, target: &BatchTarget) {
        let pending = if self.job.spec.pending_predicate.is_some() || self.phase == Phase::Scan {
            self.worker
                .runner
                .count_pending(target, self.checkpoint.as_deref(), false)
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
                    .set_total_estimate(&self.lease, total)
                    .await
                {
                    warn!(error = %e, "cannot record the job's size");
                }
                info!(rows_pending = pending, "sized the job");
            }
            Err(e) => warn!(error = %e, "cannot estimate the job's size"),
        }
    }

    /// The key source ran dry: move on to retries, verification or the end.
    pub(super) async fn next_phase(&mut self, target: &mut BatchTarget) -> PhaseStep {
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
        match after_keys_ran_dry(self.phase == Phase::Retry, retry) {
            AfterKeysRanDry::RetryFailedKeys { enter, due_in } => {
                if enter {
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
                PhaseStep::Continue
            }
            AfterKeysRanDry::Verify => self.verify(target).await,
        }
    }

    async fn enter_phase(&mut self, phase: Phase) -> bool {
        match self.worker.queue.enter_phase(&self.lease, phase).await {
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
        let pending = if self.job.spec.pending_predicate.is_some() {
            match self.worker.runner.count_pending(target, None, true).await {
                Ok(pending) => pending,
                Err(e) => {
                    warn!(error = %e, "verification count failed");
                    return PhaseStep::End(JobEnd::Stopped(StopReason::Unreachable));
                }
            }
        } else {
            0 // Without a pending predicate every row was visited once; nothing to count.
        };
        let failed = match self.worker.queue.failed_row_count(self.job.id).await {
            Ok(failed) => failed,
            Err(e) => {
                warn!(error = %e, "cannot count failed rows");
                return PhaseStep::End(JobEnd::Stopped(StopReason::Unreachable));
            }
        };
        info!(pending, failed, "verification pass");
        let count = VerificationCount {
            pending,
            failed,
            sweeps_done: self.job.verify_sweeps,
            after_sweep: self.phase == Phase::Verify,
        };
        let max_sweeps = self.worker.settings.worker.max_verify_sweeps;
        match judge_verification(count, max_sweeps, self.job.id, &self.job.spec.name) {
            VerificationVerdict::SweepAgain { sweeps } => {
                info!(
                    pending,
                    "rows still pending after the scan; sweeping the table again"
                );
                self.job.verify_sweeps = sweeps;
                if self.enter_phase(Phase::Verify).await {
                    // The sweep fixes its own last key before its first batch.
                    target.upper_key = None;
                    PhaseStep::Continue
                } else {
                    PhaseStep::End(JobEnd::Stopped(StopReason::LeaseLost(None)))
                }
            }
            VerificationVerdict::Fail(message) => {
                PhaseStep::End(self.finish(JobState::Failed, Some(message)).await)
            }
            VerificationVerdict::Succeed => {
                PhaseStep::End(self.finish(JobState::Succeeded, None).await)
            }
        }
    }

    pub(super) async fn finish(&mut self, state: JobState, last_error: Option<String>) -> JobEnd {
        if let Some(error) = &last_error {
            warn!(error = %error, "job failed");
        }
        match self
            .worker
            .queue
            .finish(&self.lease, state, last_error.as_deref())
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
}
