//! The daemon-wide series: replicas' lag, the canary, the impact budget, the queue.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use backfill_queue::JobState;
use metrics::{counter, gauge};

/// Exports the per-replica lag of a health sample.
pub fn record_replication_lag(sample: &backfill_core::throttle::HealthSample) {
    for replica in &sample.replicas {
        if let Some(lag) = replica.lag {
            gauge!("backfill_replication_lag_seconds", "replica" => replica.name.clone())
                .set(lag.as_secs_f64());
        }
        if let Some(bytes) = replica.lag_bytes {
            gauge!("backfill_replication_lag_bytes", "replica" => replica.name.clone())
                .set(bytes as f64);
        }
    }
    for missing in &sample.missing_standbys {
        // A missing standby is unbounded lag: say so rather than show a stale number.
        gauge!("backfill_replication_lag_seconds", "replica" => missing.clone()).set(f64::INFINITY);
    }
}

/// Exports one canary verdict (see backfill_core::latency).
pub fn record_canary(verdict: backfill_core::latency::CanaryVerdict) {
    gauge!("backfill_probe_delay_seconds").set(verdict.excess.as_secs_f64());
    let delays = counter!("backfill_probe_delays_total");
    // Touched on every canary so the series exists (at 0) before the first delay.
    delays.increment(u64::from(verdict.delayed));
}

/// Exports the impact budget's last verdict (see backfill_core::impact).
pub fn record_impact(verdict: &backfill_core::impact::ImpactVerdict) {
    use backfill_core::impact::ImpactDirective;
    // NaN until the first judgement: the series exists from the start.
    gauge!("backfill_impact_ratio").set(verdict.ratio.unwrap_or(f64::NAN));
    let rate = match verdict.directive {
        Some(ImpactDirective::Pace(rate)) => rate,
        Some(ImpactDirective::Rest) => 0.0,
        None => f64::NAN,
    };
    gauge!("backfill_impact_budget_rows_per_second").set(rate);
}

/// Exports the build and the configured lag limits (so dashboards and alerts can compare
/// against them). Called periodically: a series set once would expire like a finished job's.
pub fn record_daemon_info(max_lag: Duration, max_lag_bytes: u64) {
    gauge!("backfill_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!("backfill_throttle_max_lag_seconds").set(max_lag.as_secs_f64());
    gauge!("backfill_throttle_max_lag_bytes").set(max_lag_bytes as f64);
}

/// Exports the queue's job counts by state.
pub fn record_job_states(counts: &[(String, i64)]) {
    for state in JobState::ALL {
        let count = counts
            .iter()
            .find(|(s, _)| s == state.as_str())
            .map_or(0, |(_, n)| *n);
        gauge!("backfill_jobs", "state" => state.as_str()).set(count as f64);
    }
}

/// Jobs this process last reported failed, to report 0 for them once they are not.
static FAILED_JOBS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Exports `backfill_job_failed{backfill_job}`: 1 per failed job (the alert names each),
/// 0 for the ones that stopped being failed (retried, cancelled) until they expire.
pub fn record_failed_jobs(names: &[String]) {
    let mut reported = FAILED_JOBS.lock().unwrap_or_else(PoisonError::into_inner);
    for gone in reported.iter().filter(|name| !names.contains(name)) {
        gauge!("backfill_job_failed", "backfill_job" => gone.clone()).set(0.0);
    }
    for name in names {
        gauge!("backfill_job_failed", "backfill_job" => name.clone()).set(1.0);
    }
    *reported = names.iter().cloned().collect();
}

/// One unfinished job's window and deadline, as `backfill.job_status` has them (issue 16).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobSteering {
    pub name: String,
    /// Seconds to the forecast finish (throttled time counted), if known.
    pub forecast_seconds: Option<f64>,
    /// Seconds from the forecast finish (or now, once that is later) to `finish_by`;
    /// negative: late. `None`: no deadline, or no forecast yet and still time.
    pub deadline_margin_seconds: Option<f64>,
    pub late: bool,
    /// The job has run windows and all are closed: it rests.
    pub outside_window: bool,
    pub has_windows: bool,
}

/// Jobs this process last reported a window or a deadline for.
static STEERED_JOBS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Exports `backfill_job_forecast_seconds`, `backfill_job_deadline_margin_seconds`,
/// `backfill_job_late` and `backfill_throttled{reason="window"}` for unfinished jobs;
/// a job that is no longer unfinished reports not late and not held, until it expires.
pub fn record_job_steering(jobs: &[JobSteering]) {
    let mut reported = STEERED_JOBS.lock().unwrap_or_else(PoisonError::into_inner);
    for gone in reported
        .iter()
        .filter(|name| !jobs.iter().any(|j| &j.name == *name))
    {
        gauge!("backfill_job_late", "backfill_job" => gone.clone()).set(0.0);
        gauge!("backfill_throttled", "backfill_job" => gone.clone(), "reason" => "window").set(0.0);
    }
    for job in jobs {
        let name = || job.name.clone();
        if let Some(seconds) = job.forecast_seconds {
            gauge!("backfill_job_forecast_seconds", "backfill_job" => name()).set(seconds);
        }
        if let Some(margin) = job.deadline_margin_seconds {
            gauge!("backfill_job_deadline_margin_seconds", "backfill_job" => name()).set(margin);
            gauge!("backfill_job_late", "backfill_job" => name())
                .set(f64::from(u8::from(job.late)));
        }
        if job.has_windows {
            gauge!("backfill_throttled", "backfill_job" => name(), "reason" => "window")
                .set(f64::from(u8::from(job.outside_window)));
        }
    }
    *reported = jobs
        .iter()
        .filter(|j| j.deadline_margin_seconds.is_some() || j.has_windows)
        .map(|j| j.name.clone())
        .collect();
}
