//! The lease's heartbeat: extends it, publishes progress, hands on live retunes, and
//! tells the job to stop once the lease is gone.

use std::time::Duration;

use backfill_core::lease::Lease;
use backfill_queue::{HeartbeatReport, JobProgress, JobState, Queue, Tunables};
use tokio::sync::watch;
use tracing::{info, warn};

use super::StopReason;

/// Whose lease a heartbeat extends (by its duration), how often.
pub(super) struct HeartbeatOf {
    pub(super) lease: Lease,
    pub(super) interval: Duration,
    /// The wall time the forecast's recent rate is measured over.
    pub(super) forecast_window: Duration,
}

/// Extends the lease every `interval`, publishes progress and hands on the job's tuning
/// columns (a live retune); tells the job to stop as soon as the lease turns out to be
/// gone (paused, cancelled, taken over).
pub(super) async fn heartbeat_loop(
    queue: Queue,
    of: HeartbeatOf,
    progress: watch::Receiver<JobProgress>,
    stop: watch::Sender<Option<StopReason>>,
    tunables: watch::Sender<Option<Tunables>>,
) {
    let HeartbeatOf {
        lease,
        interval,
        forecast_window,
    } = of;
    // Measured here, every beat, whether batches run or not: held time counts.
    let mut recent = backfill_core::steering::RecentRate::new(forecast_window);
    let started = std::time::Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let mut current = progress.borrow().clone();
        recent.record(started.elapsed(), current.rows_done);
        current.recent_rows_per_second = recent.rows_per_second();
        match queue.heartbeat(&lease, &current).await {
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
