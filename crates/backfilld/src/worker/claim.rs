//! The claim loops: each takes the next runnable job from the queue, drives it until it
//! ends or is taken away, and goes back for more; an idle loop steals half of the busiest
//! slice. A relay turns the queue's NOTIFYs into wake-ups.

use std::sync::Arc;

use backfill_queue::{ClaimedJob, JobState, QueueChange};
use tracing::{info, warn, Instrument};

use super::{ConnectionBackoff, JobEnd, JobRun, StopReason, Worker};
use crate::shutdown::Shutdown;

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
                    let span =
                        tracing::info_span!("job", job = %claimed.job.spec.name, job_id, slot);
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
                Ok(None) if super::slicing::steal(self).await => backoff.reset(),
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
        let ClaimedJob { job, lease } = claimed;
        info!(phase = job.phase.as_str(), checkpoint = ?job.checkpoint, rows_done = job.rows_done, "claimed job");
        let mut run = JobRun::start(self, job, lease, shutdown.clone());
        let end = run.execute().await;
        run.stop_heartbeat();
        match end {
            JobEnd::Finished(state) => info!(
                state = state.as_str(),
                rows_done = run.rows_done,
                "job finished"
            ),
            JobEnd::Stopped(StopReason::Shutdown) => match self.queue.release(&lease).await {
                Ok(true) => {
                    info!(checkpoint = ?run.checkpoint, "shutting down: lease released")
                }
                Ok(false) => info!("shutting down: the lease was already gone"),
                Err(e) => {
                    warn!(error = %e, "shutting down: could not release the lease; it expires by itself")
                }
            },
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
            JobEnd::Stopped(StopReason::Unreachable) => match self.queue.release(&lease).await {
                Ok(_) => warn!("database trouble: job given back to the queue"),
                Err(e) => {
                    warn!(error = %e, "database trouble: job not released; its lease expires by itself")
                }
            },
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
