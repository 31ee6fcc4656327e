//! When this worker's batches are in flight on the primary: the impact budget times a
//! canary inside them and weighs what it sees by how long they run
//! (`backfill_core::impact::excess`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The worker's batches in flight, shared by its claim loops and the health monitor.
#[derive(Debug)]
pub struct BatchesInFlight {
    state: Mutex<InFlightState>,
    /// Counts batch starts, for the in-batch canary to wait on.
    started: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct InFlightState {
    running: u32,
    /// Since when at least one batch has been in flight (while one is).
    since: Option<Instant>,
    /// Time with at least one batch in flight, up to `since`.
    busy: Duration,
    /// How long the latest batch to end ran.
    latest: Duration,
}

impl Default for BatchesInFlight {
    fn default() -> Self {
        BatchesInFlight {
            state: Mutex::default(),
            started: watch::channel(0).0,
        }
    }
}

impl BatchesInFlight {
    /// Marks a batch in flight until the returned guard drops (on every path: committed,
    /// failed or cancelled).
    pub fn start(self: &Arc<Self>) -> BatchInFlight {
        let started = Instant::now();
        {
            let mut state = self.state();
            if state.running == 0 {
                state.since = Some(started);
            }
            state.running += 1;
        }
        self.started
            .send_modify(|count| *count = count.wrapping_add(1));
        BatchInFlight {
            batches: Arc::clone(self),
            started,
        }
    }

    /// Time with at least one batch in flight since the worker started.
    pub fn busy_total(&self) -> Duration {
        let state = self.state();
        state.busy + state.since.map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// Whether a batch is in flight now.
    pub fn in_flight(&self) -> bool {
        self.state().running > 0
    }

    /// How long the latest batch to end ran (zero before the first).
    pub fn latest_duration(&self) -> Duration {
        self.state().latest
    }

    /// A receiver that sees each batch start after it last looked.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.started.subscribe()
    }

    fn end(&self, started: Instant) {
        let now = Instant::now();
        let mut state = self.state();
        state.running = state.running.saturating_sub(1);
        state.latest = now - started;
        if state.running == 0 {
            if let Some(since) = state.since.take() {
                state.busy += now - since;
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, InFlightState> {
        // Nothing held under the lock can be left half-updated by a panic elsewhere.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One batch in flight; it ends when this drops.
#[derive(Debug)]
pub struct BatchInFlight {
    batches: Arc<BatchesInFlight>,
    started: Instant,
}

impl Drop for BatchInFlight {
    fn drop(&mut self) {
        self.batches.end(self.started);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_counts_overlapping_batches_once_and_ends_with_the_last() {
        let batches = Arc::new(BatchesInFlight::default());
        let mut starts = batches.subscribe();
        assert!(!batches.in_flight());
        let before = Instant::now();
        let first = batches.start();
        let second = batches.start();
        assert!(starts.has_changed().unwrap());
        assert_eq!(*starts.borrow_and_update(), 2);
        std::thread::sleep(Duration::from_millis(20));
        drop(first);
        assert!(batches.in_flight(), "the second is still running");
        std::thread::sleep(Duration::from_millis(20));
        drop(second);
        let wall = before.elapsed();
        assert!(!batches.in_flight());
        let busy = batches.busy_total();
        // One span, from the first start to the last end: never more than the wall time
        // (the two batches' own durations would sum to more).
        assert!(
            busy >= Duration::from_millis(40) && busy <= wall,
            "{busy:?} busy in {wall:?}"
        );
        assert!(batches.latest_duration() >= Duration::from_millis(40));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(batches.busy_total(), busy, "idle time is not busy");
    }
}
