//! What operators and the job's own failures change while it runs: a live retune of its
//! tuning columns, resting it outside its run windows, the circuit breaker (with the job's
//! own limits), resting a job that cannot move, and the event for a long throttled spell.
//! The rules themselves live in the database (`backfill.in_window`) and in
//! `backfill_core`; this wires them to a run.

use backfill_core::breaker::BreakerLimits;
use backfill_core::throttle::ThrottleReason;
use backfill_queue::Phase;
use tracing::{info, warn};

use super::budgets::throttle_settings;
use super::{JobEnd, JobRun, StopReason};

impl JobRun<'_> {
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
    pub(super) async fn rest(&mut self, error: &str) -> JobEnd {
        let worker = &self.worker.settings.worker;
        let why = format!(
            "not moving: every batch failed for {} (last: {error}); resting {} before any worker tries again",
            humantime::format_duration(worker.stuck_after),
            humantime::format_duration(worker.stuck_rest),
        );
        let given_back = self
            .worker
            .queue
            .rest(&self.lease, worker.stuck_rest, &why)
            .await;
        if matches!(given_back, Ok(true)) {
            warn!(reason = %why, "job not moving");
        }
        self.given_back(given_back, StopReason::Stuck, "give the stuck job back")
            .await
    }

    /// Live retune: when the heartbeat found the job's tuning columns changed, logs each
    /// change (old → new) and hands the new limits to the throttle, keeping what it learned.
    pub(super) fn apply_retune(&mut self) {
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
            (
                "batch_size",
                &mut job.tunables.batch_size,
                new.job.batch_size,
            ),
            (
                "min_batch_size",
                &mut job.tunables.min_batch_size,
                new.job.min_batch_size,
            ),
            (
                "max_batch_size",
                &mut job.tunables.max_batch_size,
                new.job.max_batch_size,
            ),
            (
                "target_batch_ms",
                &mut job.tunables.target_batch_ms,
                new.job.target_batch_ms,
            ),
        ] {
            if *old != new {
                info!(column, old = ?*old, new = ?new, "retuned");
                restart_at |= column == "batch_size";
                *old = new;
                changed = true;
            }
        }
        if job.tunables.max_rows_per_second != new.job.max_rows_per_second {
            info!(column = "max_rows_per_second", old = ?job.tunables.max_rows_per_second, new = ?new.job.max_rows_per_second, "retuned");
            job.tunables.max_rows_per_second = new.job.max_rows_per_second;
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
    pub(super) async fn judge_failures(
        &mut self,
        stats: &backfill_dataplane::BatchStats,
    ) -> Option<JobEnd> {
        if self.phase == Phase::Retry {
            return None;
        }
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.breaker.add(count(stats.keys), count(stats.failed));
        let tripped = self.breaker_limits().judge(self.breaker)?;
        let why = format!(
            "circuit breaker: {tripped} since this worker claimed the job; paused. Fix the rows (backfill.failed_rows where job_id = {}) or batch_sql, then select backfill.resume('{}')",
            self.job.id,
            self.job.spec.name.replace('\'', "''")
        );
        let given_back = self.worker.queue.pause_for(&self.lease, &why).await;
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

    /// Gives the job back when the heartbeat found every one of its run windows closed:
    /// it keeps its checkpoint, claims skip it until a window opens, and this worker's
    /// slot goes to jobs that may run now.
    pub(super) async fn rest_if_outside_window(&mut self) -> Option<JobEnd> {
        if self.tunables.borrow().as_ref().is_none_or(|t| t.in_window) {
            return None;
        }
        let given_back = self.worker.queue.rest_outside_window(&self.lease).await;
        Some(
            self.given_back(
                given_back,
                StopReason::OutsideWindow,
                "give the job back outside its run windows",
            )
            .await,
        )
    }

    /// The circuit breaker's limits for this job: its own columns as last read, else the
    /// configured defaults.
    fn breaker_limits(&self) -> BreakerLimits {
        let (share, rows) = match self.tunables.borrow().as_ref() {
            Some(now) => (now.breaker_failed_share, now.breaker_failed_rows),
            None => (self.job.breaker_failed_share, self.job.breaker_failed_rows),
        };
        self.worker
            .settings
            .breaker_limits()
            .with_job_limits(share, rows)
    }

    /// Follows the job's throttle; once it has been slowed or held (for anything but its
    /// steady state: its own rate limit, sharing the primary with production) for
    /// `events.throttled_after`, tells listeners with a
    /// `throttled` event, once per spell. The NOTIFY goes out on its own task: a batch
    /// never waits for it.
    pub(super) fn watch_throttled_spell(&mut self, reason: Option<ThrottleReason>) {
        let reason = reason.filter(|r| !r.is_steady_state());
        let Some(lasted) = self
            .throttled_spell
            .observe(self.started.elapsed(), reason.is_some())
        else {
            return;
        };
        let reason = reason.map_or("", ThrottleReason::as_str);
        warn!(
            reason,
            throttled_for = %humantime::format_duration(std::time::Duration::from_secs(lasted.as_secs())),
            "job throttled for longer than events.throttled_after"
        );
        let (queue, job_id, reason) = (self.worker.queue.clone(), self.job.id, reason.to_string());
        tokio::spawn(async move {
            if let Err(e) = queue.notify_throttled(job_id, &reason, lasted).await {
                info!(error = %e, "cannot send the throttled event");
            }
        });
    }
}
