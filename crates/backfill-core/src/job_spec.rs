//! A backfill job's definition, declared once: its spec (what to run, on which table) and
//! its tunables (how fast, how often to retry), as the columns of `backfill.jobs` name them.
//!
//! The queue reads them from a job row (`#[sqlx(flatten)]`, feature `sqlx`), `backfilld
//! enqueue` takes them as options (`#[command(flatten)]`, feature `clap`; the doc comments
//! of the fields are the options' help), and the data plane resolves the spec against the
//! catalog. A job's tunables override the deployment's defaults in one place,
//! [`JobTunables::throttle_settings`], and batch-size bounds are checked in one place,
//! [`BatchBounds::check`]. The database checks the same on INSERT (migration triggers).

use std::fmt;
use std::time::Duration;

use crate::throttle::ThrottleSettings;

/// What a job runs, on which table, over which key: the definition an engineer INSERTs.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct JobSpec {
    /// Unique job name.
    #[cfg_attr(feature = "clap", arg(long))]
    pub name: String,
    /// Target table, e.g. public.users.
    #[cfg_attr(feature = "clap", arg(long = "table", value_name = "TABLE"))]
    pub table_name: String,
    /// Unique, indexed key column walked in order.
    #[cfg_attr(feature = "clap", arg(long = "key", value_name = "KEY"))]
    pub key_column: String,
    /// The batch statement, using :keys, :first_key and/or :last_key.
    #[cfg_attr(feature = "clap", arg(long = "sql", value_name = "SQL"))]
    pub batch_sql: String,
    /// Boolean expression true for rows that still need work.
    #[cfg_attr(feature = "clap", arg(long = "pending", value_name = "PENDING"))]
    pub pending_predicate: Option<String>,
    /// Boolean expression true for rows whose new shape disagrees with the old.
    #[cfg_attr(feature = "clap", arg(long = "check", value_name = "CHECK"))]
    pub check_predicate: Option<String>,
}

/// A job's own tuning columns; each `None` (or not positive) takes the deployment's default.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct JobTunables {
    /// Keys in the first batch (the throttle adapts it); default batch.size.
    #[cfg_attr(feature = "clap", arg(long, value_name = "KEYS"))]
    pub batch_size: Option<i32>,
    /// Fewest keys per batch the throttle shrinks to; default batch.min_size.
    #[cfg_attr(feature = "clap", arg(long, value_name = "KEYS"))]
    pub min_batch_size: Option<i32>,
    /// Most keys per batch the throttle grows to; default batch.max_size.
    #[cfg_attr(feature = "clap", arg(long, value_name = "KEYS"))]
    pub max_batch_size: Option<i32>,
    /// Batch duration the throttle steers towards, in milliseconds; default batch.target.
    #[cfg_attr(feature = "clap", arg(long, value_name = "MS"))]
    pub target_batch_ms: Option<i32>,
    /// Most rows written per second, however healthy the database; default
    /// throttle.max_rows_per_second.
    #[cfg_attr(feature = "clap", arg(long, value_name = "ROWS"))]
    pub max_rows_per_second: Option<f64>,
    /// Attempts per failing row before it is set aside in backfill.failed_rows; default
    /// batch.max_attempts.
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_attempts: Option<i32>,
}

impl JobTunables {
    /// The job's throttle: `defaults`, overridden by the job's own columns. A column that
    /// is not positive takes the default; the sizes come out ordered (see
    /// [`BatchBounds::with_overrides`]) and a rate limit that is not positive means none.
    pub fn throttle_settings(&self, defaults: ThrottleSettings) -> ThrottleSettings {
        let bounds = BatchBounds {
            min: defaults.min_batch_size,
            max: defaults.max_batch_size,
            start: defaults.start_batch_size,
        }
        .with_overrides(self);
        let target_batch = positive(self.target_batch_ms)
            .map(|ms| Duration::from_millis(u64::from(ms)))
            .unwrap_or(defaults.target_batch);
        let max_rows_per_second = self
            .max_rows_per_second
            .or(defaults.max_rows_per_second)
            .filter(|rate| *rate > 0.0);
        ThrottleSettings {
            min_batch_size: bounds.min,
            max_batch_size: bounds.max,
            start_batch_size: bounds.start,
            target_batch,
            max_rows_per_second,
            ..defaults
        }
    }

    /// Attempts per failing row: the job's own, else `default`.
    pub fn max_attempts_or(&self, default: i32) -> i32 {
        self.max_attempts.unwrap_or(default)
    }
}

/// A column's value when it is a positive number.
fn positive(value: Option<i32>) -> Option<u32> {
    value.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0)
}

/// Keys per batch: the fewest, the most, and the first batch's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchBounds {
    pub min: u32,
    pub max: u32,
    pub start: u32,
}

/// What the three bounds are called where they were set, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchBoundNames {
    pub min: &'static str,
    pub max: &'static str,
    pub start: &'static str,
}

impl BatchBounds {
    /// Checks that the fewest keys is positive and not above the most, and the first
    /// batch lies between them; the error names each bound as `names` says.
    pub fn check(self, names: BatchBoundNames) -> Result<(), BatchBoundsError> {
        let BatchBounds { min, max, start } = self;
        if min == 0 || min > max {
            return Err(BatchBoundsError {
                bounds: self,
                names,
                kind: BoundsErrorKind::MinNotBelowMax,
            });
        }
        if !(min..=max).contains(&start) {
            return Err(BatchBoundsError {
                bounds: self,
                names,
                kind: BoundsErrorKind::StartOutside,
            });
        }
        Ok(())
    }

    /// These bounds (the deployment's defaults) overridden by a job's positive columns;
    /// the result is always usable: the most at least the fewest, the first batch between.
    pub fn with_overrides(self, job: &JobTunables) -> BatchBounds {
        let min = positive(job.min_batch_size).unwrap_or(self.min);
        let max = positive(job.max_batch_size).unwrap_or(self.max).max(min);
        let start = positive(job.batch_size)
            .unwrap_or(self.start)
            .clamp(min, max);
        BatchBounds { min, max, start }
    }
}

/// Batch-size bounds that make no sense, with the names they were set under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchBoundsError {
    bounds: BatchBounds,
    names: BatchBoundNames,
    kind: BoundsErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BoundsErrorKind {
    /// The fewest is zero or above the most.
    MinNotBelowMax,
    /// The first batch lies outside fewest..most.
    StartOutside,
}

impl fmt::Display for BatchBoundsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let BatchBounds { min, max, start } = self.bounds;
        let names = self.names;
        match self.kind {
            BoundsErrorKind::MinNotBelowMax => write!(
                f,
                "{} ({min}) must be positive and not above {} ({max})",
                names.min, names.max
            ),
            BoundsErrorKind::StartOutside => write!(
                f,
                "{} ({start}) must lie within {}..{} ({min}..{max})",
                names.start, names.min, names.max
            ),
        }
    }
}

impl std::error::Error for BatchBoundsError {}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: BatchBoundNames = BatchBoundNames {
        min: "batch.min_size",
        max: "batch.max_size",
        start: "batch.size",
    };

    fn bounds(min: u32, max: u32, start: u32) -> BatchBounds {
        BatchBounds { min, max, start }
    }

    #[test]
    fn bounds_are_checked_with_the_names_they_were_set_under() {
        assert_eq!(bounds(10, 100, 50).check(NAMES), Ok(()));
        assert_eq!(
            bounds(50, 20, 30).check(NAMES).unwrap_err().to_string(),
            "batch.min_size (50) must be positive and not above batch.max_size (20)"
        );
        assert_eq!(
            bounds(0, 20, 10).check(NAMES).unwrap_err().to_string(),
            "batch.min_size (0) must be positive and not above batch.max_size (20)"
        );
        assert_eq!(
            bounds(10, 20, 30).check(NAMES).unwrap_err().to_string(),
            "batch.size (30) must lie within batch.min_size..batch.max_size (10..20)"
        );
    }

    #[test]
    fn a_jobs_positive_columns_override_the_defaults_and_come_out_ordered() {
        let defaults = bounds(10, 10_000, 1_000);
        let job = |min, max, start| JobTunables {
            min_batch_size: min,
            max_batch_size: max,
            batch_size: start,
            ..JobTunables::default()
        };
        assert_eq!(defaults.with_overrides(&job(None, None, None)), defaults);
        assert_eq!(
            defaults.with_overrides(&job(Some(100), Some(500), Some(200))),
            bounds(100, 500, 200)
        );
        // Not positive: the default. A maximum below the minimum is raised to it, and
        // the first batch is clamped between them.
        assert_eq!(
            defaults.with_overrides(&job(Some(0), Some(-5), None)),
            defaults
        );
        assert_eq!(
            defaults.with_overrides(&job(Some(500), Some(100), Some(5))),
            bounds(500, 500, 500)
        );
        assert_eq!(
            defaults.with_overrides(&job(None, Some(50), None)),
            bounds(10, 50, 50)
        );
    }

    #[test]
    fn the_throttle_takes_the_jobs_target_and_rate_over_the_defaults() {
        let defaults = ThrottleSettings {
            max_rows_per_second: Some(1_000.0),
            ..ThrottleSettings::default()
        };
        let own = JobTunables {
            target_batch_ms: Some(250),
            max_rows_per_second: Some(50.0),
            ..JobTunables::default()
        }
        .throttle_settings(defaults.clone());
        assert_eq!(own.target_batch, Duration::from_millis(250));
        assert_eq!(own.max_rows_per_second, Some(50.0));
        let inherited = JobTunables {
            target_batch_ms: Some(0),
            ..JobTunables::default()
        }
        .throttle_settings(defaults.clone());
        assert_eq!(inherited.target_batch, defaults.target_batch);
        assert_eq!(inherited.max_rows_per_second, Some(1_000.0));
        // A rate limit that is not positive is no limit.
        let unlimited = JobTunables {
            max_rows_per_second: Some(0.0),
            ..JobTunables::default()
        }
        .throttle_settings(defaults);
        assert_eq!(unlimited.max_rows_per_second, None);
    }

    #[test]
    fn max_attempts_falls_back_to_the_default() {
        assert_eq!(JobTunables::default().max_attempts_or(5), 5);
        let own = JobTunables {
            max_attempts: Some(2),
            ..JobTunables::default()
        };
        assert_eq!(own.max_attempts_or(5), 2);
    }
}
