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
    Share { count: BreakerCount, limit: f64 },
    /// The number of failed keys passed `failed_rows`.
    Rows { count: BreakerCount, limit: u64 },
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
            });
        }
        if count.processed < self.min_rows.max(1) {
            return None;
        }
        let share = count.failed as f64 / count.processed as f64;
        (share > self.failed_share).then_some(Tripped::Share {
            count,
            limit: self.failed_share,
        })
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
            Tripped::Share { count, limit } => write!(
                f,
                "{} of {} rows failed ({:.1}%, more than batch.breaker_failed_share {}%)",
                count.failed,
                count.processed,
                100.0 * count.failed as f64 / count.processed.max(1) as f64,
                100.0 * limit
            ),
            Tripped::Rows { count, limit } => write!(
                f,
                "{} of {} rows failed (more than batch.breaker_failed_rows {limit})",
                count.failed, count.processed
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: BreakerLimits = BreakerLimits {
        min_rows: 1000,
        failed_share: 0.1,
        failed_rows: 100_000,
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
                limit: 0.1
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
                limit: 50
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
}
