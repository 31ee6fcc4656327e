//! `[worker]`: this worker's name, how many jobs it drives, its lease and cadences.

use std::time::Duration;

use serde::Deserialize;

use super::SettingsError;

/// `[worker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub id: String,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub max_verify_sweeps: i32,
    /// A job failing every batch this long, without a commit, rests (see default.toml).
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    /// How long a stuck job rests before it is claimed again.
    #[serde(with = "humantime_serde")]
    pub stuck_rest: Duration,
    /// The wall time a job's recent rate is measured over for its finish forecast.
    #[serde(with = "humantime_serde")]
    pub forecast_window: Duration,
}

impl WorkerSettings {
    /// Checks `[worker]`, naming the bad key.
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        let fail = |msg: String| Err(SettingsError(msg));
        if self.stuck_after.is_zero() || self.stuck_rest.is_zero() {
            return fail(
                "worker.stuck_after and worker.stuck_rest must be longer than 0s".to_string(),
            );
        }
        if self.concurrency == 0 {
            return fail("worker.concurrency must be at least 1".to_string());
        }
        if self.heartbeat.is_zero() || self.heartbeat * 2 > self.lease {
            return fail(format!(
                "worker.heartbeat ({}) must be positive and at most half of worker.lease ({})",
                humantime::format_duration(self.heartbeat),
                humantime::format_duration(self.lease)
            ));
        }
        if self.poll_interval.is_zero() {
            return fail("worker.poll_interval must be positive".to_string());
        }
        if self.max_verify_sweeps < 0 {
            return fail(format!(
                "worker.max_verify_sweeps must be 0 or more, got {}",
                self.max_verify_sweeps
            ));
        }
        if self.forecast_window < Duration::from_secs(1) {
            return fail(format!(
                "worker.forecast_window must be at least 1s, got {}",
                humantime::format_duration(self.forecast_window)
            ));
        }
        Ok(())
    }

    /// This worker's name in `job_status`.
    pub fn worker_id(&self) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "backfilld".to_string());
        format!("{host}-{}", std::process::id())
    }
}
