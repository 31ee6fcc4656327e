//! One job's metric series, labelled with its name.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use backfill_core::throttle::ThrottleReason;
use backfill_dataplane::BatchStats;
use backfill_queue::Phase;
use metrics::{counter, gauge, histogram};

/// Throttle sleep per (job, reason) in this process, in seconds, exactly: several slots
/// (slices) of one job share one series.
static SLEPT: SleepTotals = SleepTotals(Mutex::new(BTreeMap::new()));

/// See [`SLEPT`].
struct SleepTotals(Mutex<BTreeMap<(String, String), f64>>);

impl SleepTotals {
    /// Adds `seconds` to the total of (`job`, `reason`) and returns the new total.
    fn add(&self, job: &str, reason: &str, seconds: f64) -> f64 {
        // Plain sums: a panic elsewhere cannot leave them inconsistent.
        let mut totals = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let total = totals
            .entry((job.to_string(), reason.to_string()))
            .or_insert(0.0);
        *total += seconds;
        *total
    }
}

/// Every `outcome` label of `backfill_batches_total`.
pub const BATCH_OUTCOMES: [&str; 5] = [
    "committed",
    "row_failures",
    "transient_error",
    "fenced",
    "job_error",
];

/// How often a held job's unchanged series are touched (see [`JobMetrics`]).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Metric series of one job, labelled with its name.
///
/// The exporter drops a series no update touched for `http.metrics_idle_timeout`: that is
/// how a finished job leaves `/metrics`. While a worker holds the job, each throttle
/// decision ([`JobMetrics::throttled`]) also re-exports the series that did not move, so a
/// job held back for a long time keeps them all (but its batch duration histogram, which
/// only a batch can touch). Counters start at 0, so `increase()` sees their first rise.
pub struct JobMetrics {
    job: String,
    latest: Mutex<LatestValues>,
}

/// The gauge values a job last exported, for re-exporting them unchanged.
#[derive(Debug, Default)]
struct LatestValues {
    batch_size: Option<f64>,
    rows_remaining: Option<f64>,
    progress_ratio: Option<f64>,
    eta_seconds: Option<f64>,
    refreshed_at: Option<Instant>,
}

impl JobMetrics {
    /// Metrics for the job called `job`; exports its counters at 0.
    pub fn new(job: &str) -> Self {
        let metrics = JobMetrics {
            job: job.to_string(),
            latest: Mutex::new(LatestValues::default()),
        };
        metrics.touch_counters();
        metrics.export_throttled(None);
        metrics.lock_waits(0);
        metrics
    }

    /// A batch committed. In the retry phase every key comes from `backfill.failed_rows`:
    /// one failing again is no new failed row, so `backfill_failed_rows_total` counts rows,
    /// not attempts.
    pub fn committed(&self, stats: &BatchStats, duration: Duration, phase: Phase) {
        let job = self.job.clone();
        counter!("backfill_rows_processed_total", "backfill_job" => job.clone())
            .increment(stats.applied as u64);
        let outcome = if stats.failed > 0 {
            "row_failures"
        } else {
            "committed"
        };
        counter!("backfill_batches_total", "backfill_job" => job.clone(), "outcome" => outcome)
            .increment(1);
        histogram!("backfill_batch_duration_seconds", "backfill_job" => job.clone())
            .record(duration.as_secs_f64());
        if stats.failed > 0 && phase != Phase::Retry {
            counter!("backfill_failed_rows_total", "backfill_job" => job)
                .increment(stats.failed as u64);
        }
    }

    /// A batch ended without committing; `outcome` is one of [`BATCH_OUTCOMES`].
    pub fn batch_outcome(&self, outcome: &'static str) {
        debug_assert!(
            BATCH_OUTCOMES.contains(&outcome),
            "unknown outcome {outcome}"
        );
        counter!("backfill_batches_total", "backfill_job" => self.job.clone(), "outcome" => outcome)
            .increment(1);
    }

    /// The size of the next batch.
    pub fn batch_size(&self, size: u32) {
        let size = f64::from(size);
        self.latest().batch_size = Some(size);
        gauge!("backfill_batch_size", "backfill_job" => self.job.clone()).set(size);
    }

    /// Time waited because of the throttle.
    pub fn slept(&self, reason: &str, duration: Duration) {
        let total = SLEPT.add(&self.job, reason, duration.as_secs_f64());
        self.export_slept(reason, total);
    }

    /// The metrics facade's counters hold integers and sleeps are fractions of a second:
    /// the exact total is kept per process in [`SLEPT`] and exported in whole seconds, as
    /// `absolute`, so the series is a true counter (rate() and resets work) that loses no
    /// fraction over time.
    fn export_slept(&self, reason: &str, total_seconds: f64) {
        counter!("backfill_throttle_sleep_seconds_total", "backfill_job" => self.job.clone(), "reason" => reason.to_string())
            .absolute(total_seconds.floor() as u64);
    }

    /// Which throttle reason is active now (at most one). Called on every throttle
    /// decision, holds included, so it also keeps the job's other series alive.
    pub fn throttled(&self, active: Option<&str>) {
        self.export_throttled(active);
        self.keep_alive();
    }

    /// Sessions waiting on our locks.
    pub fn lock_waits(&self, sessions: u32) {
        gauge!("backfill_lock_waits", "backfill_job" => self.job.clone()).set(f64::from(sessions));
    }

    /// Progress and ETA.
    pub fn progress(&self, rows_done: i64, remaining: Option<i64>, rows_per_second: Option<f64>) {
        let Some(remaining) = remaining else {
            return;
        };
        let total = rows_done + remaining;
        let ratio = if total > 0 {
            rows_done as f64 / total as f64
        } else {
            1.0
        };
        let eta = rows_per_second
            .filter(|rate| *rate > 0.0)
            .map(|rate| remaining as f64 / rate);
        self.export_progress(remaining as f64, ratio.clamp(0.0, 1.0), eta);
    }

    /// The job ended here.
    pub fn finished(&self, succeeded: bool) {
        let (remaining, ratio) = if succeeded {
            (Some(0.0), Some(1.0))
        } else {
            let latest = self.latest();
            (latest.rows_remaining, latest.progress_ratio)
        };
        match (remaining, ratio) {
            (Some(remaining), Some(ratio)) => self.export_progress(remaining, ratio, Some(0.0)),
            _ => {
                self.latest().eta_seconds = Some(0.0);
                gauge!("backfill_job_eta_seconds", "backfill_job" => self.job.clone()).set(0.0);
            }
        }
    }

    /// This worker no longer works on the job: it is not throttled by us any more. The
    /// job's series are left alone from here on and expire after the idle timeout.
    pub fn job_left(&self) {
        self.export_throttled(None);
        self.lock_waits(0);
    }

    fn latest(&self) -> std::sync::MutexGuard<'_, LatestValues> {
        // The values are plain numbers: a panic elsewhere cannot leave them inconsistent.
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn export_throttled(&self, active: Option<&str>) {
        // Every reason is exported, so a reason's gauge drops to 0 when it ends.
        for reason in ThrottleReason::ALL {
            let value = if Some(reason.as_str()) == active {
                1.0
            } else {
                0.0
            };
            gauge!("backfill_throttled", "backfill_job" => self.job.clone(), "reason" => reason.as_str())
                .set(value);
        }
    }

    fn export_progress(&self, remaining: f64, ratio: f64, eta: Option<f64>) {
        let mut latest = self.latest();
        latest.rows_remaining = Some(remaining);
        latest.progress_ratio = Some(ratio);
        latest.eta_seconds = eta.or(latest.eta_seconds);
        let eta = latest.eta_seconds;
        drop(latest);
        let job = self.job.clone();
        gauge!("backfill_job_rows_remaining", "backfill_job" => job.clone()).set(remaining);
        gauge!("backfill_job_progress_ratio", "backfill_job" => job.clone()).set(ratio);
        if let Some(eta) = eta {
            gauge!("backfill_job_eta_seconds", "backfill_job" => job).set(eta);
        }
    }

    /// Touches the counters without changing them: creates them at 0, keeps them exported.
    fn touch_counters(&self) {
        let job = &self.job;
        counter!("backfill_rows_processed_total", "backfill_job" => job.clone()).increment(0);
        counter!("backfill_failed_rows_total", "backfill_job" => job.clone()).increment(0);
        for outcome in BATCH_OUTCOMES {
            counter!("backfill_batches_total", "backfill_job" => job.clone(), "outcome" => outcome)
                .increment(0);
        }
        for reason in ThrottleReason::ALL {
            let reason = reason.as_str();
            self.export_slept(reason, SLEPT.add(job, reason, 0.0));
        }
    }

    /// Re-exports the series that did not move, at most every [`KEEP_ALIVE_INTERVAL`].
    fn keep_alive(&self) {
        let mut latest = self.latest();
        if latest
            .refreshed_at
            .is_some_and(|at| at.elapsed() < KEEP_ALIVE_INTERVAL)
        {
            return;
        }
        latest.refreshed_at = Some(Instant::now());
        let LatestValues {
            batch_size,
            rows_remaining,
            progress_ratio,
            eta_seconds,
            ..
        } = *latest;
        drop(latest);
        self.touch_counters();
        let job = &self.job;
        if let Some(size) = batch_size {
            gauge!("backfill_batch_size", "backfill_job" => job.clone()).set(size);
        }
        if let (Some(remaining), Some(ratio)) = (rows_remaining, progress_ratio) {
            gauge!("backfill_job_rows_remaining", "backfill_job" => job.clone()).set(remaining);
            gauge!("backfill_job_progress_ratio", "backfill_job" => job.clone()).set(ratio);
        }
        if let Some(eta) = eta_seconds {
            gauge!("backfill_job_eta_seconds", "backfill_job" => job.clone()).set(eta);
        }
    }
}
