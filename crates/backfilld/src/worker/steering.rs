//! Steering a job while it runs: resting it outside its run windows, its own circuit
//! breaker limits, and the event for a long throttled spell. The rules themselves live in
//! the database (`backfill.in_window`) and in `backfill_core`; this wires them to a run.

use backfill_core::breaker::BreakerLimits;
use backfill_core::throttle::ThrottleReason;
use tracing::{info, warn};

use super::{JobEnd, JobRun, StopReason};

impl JobRun<'_> {
    /// Gives the job back when the heartbeat found every one of its run windows closed:
    /// it keeps its checkpoint, claims skip it until a window opens, and this worker's
    /// slot goes to jobs that may run now.
    pub(super) async fn rest_if_outside_window(&mut self) -> Option<JobEnd> {
        if self.tunables.borrow().as_ref().is_none_or(|t| t.in_window) {
            return None;
        }
        let given_back = self
            .worker
            .queue
            .rest_outside_window(self.job.id, self.fence_token())
            .await;
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
    pub(super) fn breaker_limits(&self) -> BreakerLimits {
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
    /// own rate limit) for `events.throttled_after`, tells listeners with a
    /// `throttled` event, once per spell. The NOTIFY goes out on its own task: a batch
    /// never waits for it.
    pub(super) fn watch_throttled_spell(&mut self, reason: Option<ThrottleReason>) {
        let reason = reason.filter(|r| *r != ThrottleReason::RateLimit);
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
