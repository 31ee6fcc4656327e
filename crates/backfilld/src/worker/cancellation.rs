//! When a batch must stop: the health probe's verdicts taken while it pauses or runs
//! (a hold, production blocked too long), a lost lease, or a shutdown past its grace.

use std::time::Duration;

use backfill_core::throttle::HealthSample;
use backfill_dataplane::BatchBackend;
use tokio::sync::watch;
use tracing::warn;

use super::{until, JobRun};

impl JobRun<'_> {
    /// Waits for the health probes' first sample. Until it comes, the channel holds a
    /// placeholder that knows nothing of standbys or blocked sessions, and the first batch
    /// must not run on it (a declared standby may be missing right now).
    pub(super) async fn first_health_sample(&self) {
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
    pub(super) async fn pause_before_batch(&self, pause: Duration) -> bool {
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
    pub(super) fn batch_stop(
        &self,
        backend: BatchBackend,
    ) -> impl std::future::Future<Output = ()> + 'static {
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
