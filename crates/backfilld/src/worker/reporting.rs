//! What a job tells the world: throttle decisions logged once per change, progress for
//! the heartbeat and the metrics, the rate estimate, and rate-limited failed-row lines.

use std::time::{Duration, Instant};

use backfill_core::throttle::{HealthSample, QueryReading, ThrottleDecision, ThrottleReason};
use backfill_dataplane::RowFailure;
use backfill_queue::JobProgress;
use tracing::{info, warn};

use super::JobRun;

impl JobRun<'_> {
    /// Logs a throttle decision when its state or reason changes, with the health
    /// readings behind it, and exports it.
    pub(super) fn note_decision(&mut self, decision: &ThrottleDecision, health: &HealthSample) {
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
        let wal_bytes_per_second = health.wal_bytes_per_second.map(f64::round);
        let (archive_pending, archive_failing) = (
            health.archive.and_then(|a| a.pending_segments),
            health.archive.map(|a| a.failing),
        );
        match decision {
            ThrottleDecision::Hold { recheck_after, .. } => info!(
                state, reason, ?recheck_after, %lag, missing_standbys = %missing, sessions_blocked = blocked,
                %slots, operator_ratio, wal_bytes_per_second, archive_pending, archive_failing,
                dead_tuple_ratio = health.table_dead_tuple_ratio,
                prometheus = %describe_reading(health.prometheus.as_ref()),
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
    pub(super) fn publish_progress(&self) {
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

/// A query's reading for the log: its value, `failed`, or empty when there is none (the
/// failure itself is logged by the probe when it starts).
fn describe_reading(reading: Option<&QueryReading>) -> String {
    match reading {
        Some(QueryReading::Value(value)) => value.to_string(),
        Some(QueryReading::Failed(_)) => "failed".to_string(),
        None => String::new(),
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

/// Rows per second over recent batches (exponentially weighted).
#[derive(Debug, Default)]
pub(super) struct RateEstimate {
    last: Option<Instant>,
    rows_per_second: Option<f64>,
}

impl RateEstimate {
    pub(super) fn record(&mut self, rows: usize, at: Instant) {
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

/// Log lines per isolated failing key allowed in each [`FAILURE_LOG_WINDOW`].
const FAILURE_LINES_PER_WINDOW: usize = 20;

/// The window of [`FAILURE_LINES_PER_WINDOW`].
const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(10);

/// Rate-limits the log line per isolated failing key (key, SQLSTATE, message):
/// at most [`FAILURE_LINES_PER_WINDOW`] per [`FAILURE_LOG_WINDOW`], then one
/// summary line for the rest when the window ends. A job whose every row fails
/// must not flood the log; `backfill.failed_rows` has them all.
#[derive(Debug, Default)]
pub(super) struct FailureLog {
    window_start: Option<Instant>,
    logged: usize,
    suppressed: usize,
}

impl FailureLog {
    /// Logs a committed batch's failures, within the limit.
    pub(super) fn record(&mut self, failures: &[RowFailure], now: Instant) {
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
    pub(super) fn flush(&mut self) {
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
