//! The circuit breaker on failed rows: a job whose rows fail in bulk (a wrong
//! `batch_sql`, a constraint every row breaks) is paused instead of isolating millions of
//! bad rows one bisection at a time. Pure arithmetic; the worker feeds it each committed
//! batch and pauses the job when it trips.

use std::fmt;

/// When the breaker trips.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerLimits {
    /// Keys processed (applied or failed) before the share is judged: a few bad rows at
    /// the start of a table must not stop a job.
    pub min_rows: u64,
    /// Trips when more than this share of the processed keys failed (0 < share ≤ 1; 1
    /// never trips on the share).
    pub failed_share: f64,
    /// Trips when more than this many keys failed, whatever the share (0: no such limit).
    pub failed_rows: u64,
    /// `failed_share` is the job's own (`breaker_failed_share`), not the configured default.
    pub failed_share_of_job: bool,
    /// `failed_rows` is the job's own (`breaker_failed_rows`), not the configured default.
    pub failed_rows_of_job: bool,
}

/// Keys processed and failed since the breaker was (re)set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BreakerCount {
    pub processed: u64,
    pub failed: u64,
}

/// Why the breaker tripped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tripped {
    /// The share of failed keys passed `failed_share`.
    Share {
        count: BreakerCount,
        limit: f64,
        of_job: bool,
    },
    /// The number of failed keys passed `failed_rows`.
    Rows {
        count: BreakerCount,
        limit: u64,
        of_job: bool,
    },
}

impl BreakerLimits {
    /// Checks the limits, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.failed_share > 0.0 && self.failed_share <= 1.0) {
            return Err(format!(
                "batch.breaker_failed_share must be more than 0 and at most 1 (1: never on the share), got {}",
                self.failed_share
            ));
        }
        Ok(())
    }

    /// Whether `count` trips the breaker.
    pub fn judge(&self, count: BreakerCount) -> Option<Tripped> {
        if self.failed_rows > 0 && count.failed > self.failed_rows {
            return Some(Tripped::Rows {
                count,
                limit: self.failed_rows,
                of_job: self.failed_rows_of_job,
            });
        }
        if count.processed < self.min_rows.max(1) {
            return None;
        }
        let share = count.failed as f64 / count.processed as f64;
        (share > self.failed_share).then_some(Tripped::Share {
            count,
            limit: self.failed_share,
            of_job: self.failed_share_of_job,
        })
    }

    /// These limits with a job's own columns in place of the defaults (`None`: the
    /// default stands). The database refuses values out of range; a negative row count
    /// that got through anyway counts as 0 (no such limit).
    pub fn with_job_limits(self, failed_share: Option<f64>, failed_rows: Option<i64>) -> Self {
        BreakerLimits {
            failed_share: failed_share.unwrap_or(self.failed_share),
            failed_share_of_job: failed_share.is_some() || self.failed_share_of_job,
            failed_rows: failed_rows
                .map_or(self.failed_rows, |rows| u64::try_from(rows).unwrap_or(0)),
            failed_rows_of_job: failed_rows.is_some() || self.failed_rows_of_job,
            ..self
        }
    }
}

impl BreakerCount {
    /// Adds one batch's keys.
    pub fn add(&mut self, processed: u64, failed: u64) {
        self.processed = self.processed.saturating_add(processed);
        self.failed = self.failed.saturating_add(failed);
    }
}

impl fmt::Display for Tripped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tripped::Share {
                count,
                limit,
                of_job,
            } => write!(
                f,
                "{} of {} rows failed ({:.1}%, more than {} {}%)",
                count.failed,
                count.processed,
                100.0 * count.failed as f64 / count.processed.max(1) as f64,
                limit_name(*of_job, "breaker_failed_share"),
                100.0 * limit
            ),
            Tripped::Rows {
                count,
                limit,
                of_job,
            } => write!(
                f,
                "{} of {} rows failed (more than {} {limit})",
                count.failed,
                count.processed,
                limit_name(*of_job, "breaker_failed_rows"),
            ),
        }
    }
}

/// How a trip names the limit: the job's column, or the configuration key.
fn limit_name(of_job: bool, column: &str) -> String {
    if of_job {
        format!("the job's {column}")
    } else {
        format!("batch.{column}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: BreakerLimits = BreakerLimits {
        min_rows: 1000,
        failed_share: 0.1,
        failed_rows: 100_000,
        failed_share_of_job: false,
        failed_rows_of_job: false,
    };

    fn count(processed: u64, failed: u64) -> BreakerCount {
        BreakerCount { processed, failed }
    }

    #[test]
    fn the_share_is_judged_only_after_min_rows() {
        assert_eq!(DEFAULTS.judge(count(999, 999)), None);
        assert_eq!(
            DEFAULTS.judge(count(1000, 500)),
            Some(Tripped::Share {
                count: count(1000, 500),
                limit: 0.1,
                of_job: false,
            })
        );
    }

    #[test]
    fn a_share_at_the_limit_does_not_trip_one_over_does() {
        assert_eq!(DEFAULTS.judge(count(1000, 100)), None);
        assert!(DEFAULTS.judge(count(1000, 101)).is_some());
        // A few bad rows in a big job never trip it.
        assert_eq!(DEFAULTS.judge(count(1_000_000, 30)), None);
    }

    #[test]
    fn the_absolute_count_trips_whatever_the_share_and_zero_turns_it_off() {
        let limits = BreakerLimits {
            failed_rows: 50,
            failed_share: 1.0,
            ..DEFAULTS
        };
        assert_eq!(limits.judge(count(100, 50)), None);
        assert_eq!(
            limits.judge(count(100, 51)),
            Some(Tripped::Rows {
                count: count(100, 51),
                limit: 50,
                of_job: false,
            })
        );
        let off = BreakerLimits {
            failed_rows: 0,
            failed_share: 1.0,
            ..DEFAULTS
        };
        assert_eq!(off.judge(count(10_000_000, 10_000_000)), None);
    }

    #[test]
    fn counts_add_up_and_the_reason_names_numbers_and_the_limit() {
        let mut total = BreakerCount::default();
        total.add(600, 300);
        total.add(600, 300);
        let tripped = DEFAULTS.judge(total).expect("trips");
        assert_eq!(
            tripped.to_string(),
            "600 of 1200 rows failed (50.0%, more than batch.breaker_failed_share 10%)"
        );
    }

    #[test]
    fn a_share_outside_0_to_1_is_refused() {
        for share in [0.0, -0.1, 1.5, f64::NAN] {
            let limits = BreakerLimits {
                failed_share: share,
                ..DEFAULTS
            };
            assert!(limits.validate().is_err(), "{share}");
        }
        assert!(DEFAULTS.validate().is_ok());
    }

    #[test]
    fn a_jobs_own_limits_replace_the_defaults_and_are_named_as_the_jobs() {
        let strict = DEFAULTS.with_job_limits(Some(0.01), None);
        assert_eq!(strict.failed_rows, 100_000);
        let tripped = strict.judge(count(1000, 11)).expect("trips at 1%");
        assert_eq!(
            tripped.to_string(),
            "11 of 1000 rows failed (1.1%, more than the job's breaker_failed_share 1%)"
        );
        let few = DEFAULTS.with_job_limits(None, Some(5));
        assert_eq!(few.failed_share, 0.1);
        assert_eq!(
            few.judge(count(10, 6)).expect("trips").to_string(),
            "6 of 10 rows failed (more than the job's breaker_failed_rows 5)"
        );
        // Neither set: the defaults, named as the configuration's.
        assert_eq!(DEFAULTS.with_job_limits(None, None), DEFAULTS);
        // 0: no absolute limit for this job.
        let unlimited = DEFAULTS.with_job_limits(Some(1.0), Some(0));
        assert_eq!(unlimited.judge(count(10_000_000, 9_000_000)), None);
    }
}
