//! `[batch]`: batch sizes and durations, retries of failing rows, the circuit breaker.

use std::time::Duration;

use serde::Deserialize;

use super::SettingsError;

/// `[batch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub size: u32,
    pub min_size: u32,
    pub max_size: u32,
    #[serde(with = "humantime_serde")]
    pub target: Duration,
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    pub max_attempts: i32,
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// The circuit breaker: rows processed before the failed share is judged.
    pub breaker_min_rows: u64,
    /// Pause a job when more than this share of its processed rows failed.
    pub breaker_failed_share: f64,
    /// Pause a job when more than this many of its rows failed (0: no such limit).
    pub breaker_failed_rows: u64,
}

impl BatchSettings {
    /// Checks `[batch]`, naming the bad key.
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        let fail = |msg: String| Err(SettingsError(msg));
        backfill_core::job_spec::BatchBounds {
            min: self.min_size,
            max: self.max_size,
            start: self.size,
        }
        .check(backfill_core::job_spec::BatchBoundNames {
            min: "batch.min_size",
            max: "batch.max_size",
            start: "batch.size",
        })
        .map_err(|e| SettingsError(e.to_string()))?;
        self.breaker_limits().validate().map_err(SettingsError)?;
        if self.max_attempts < 1 {
            return fail(format!(
                "batch.max_attempts must be at least 1, got {}",
                self.max_attempts
            ));
        }
        if self.target.is_zero() || self.lock_timeout.is_zero() || self.statement_timeout.is_zero()
        {
            return fail(
                "batch.target, batch.lock_timeout and batch.statement_timeout must be positive"
                    .to_string(),
            );
        }
        // A batch steered to last as long as the statement may would time out, shrink,
        // grow back and time out again.
        if self.target >= self.statement_timeout {
            return fail(format!(
                "batch.target ({}) must be shorter than batch.statement_timeout ({}): batches steered to it would time out",
                humantime::format_duration(self.target),
                humantime::format_duration(self.statement_timeout)
            ));
        }
        // A zero backoff doubles to zero: a failing row would be retried in a tight loop.
        if self.retry_backoff.is_zero() || self.retry_backoff > self.retry_backoff_max {
            return fail(format!(
                "batch.retry_backoff ({}) must be positive and not above batch.retry_backoff_max ({})",
                humantime::format_duration(self.retry_backoff),
                humantime::format_duration(self.retry_backoff_max)
            ));
        }
        Ok(())
    }

    /// The circuit breaker's limits.
    pub fn breaker_limits(&self) -> backfill_core::breaker::BreakerLimits {
        backfill_core::breaker::BreakerLimits {
            min_rows: self.breaker_min_rows,
            failed_share: self.breaker_failed_share,
            failed_rows: self.breaker_failed_rows,
            failed_share_of_job: false,
            failed_rows_of_job: false,
        }
    }
}
