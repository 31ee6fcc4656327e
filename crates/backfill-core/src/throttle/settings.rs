//! The controller's tuning: [`ThrottleSettings`] with its documented defaults, the checks
//! that reject nonsense for the user ([`ThrottleSettings::validate`]) and the normalisation
//! that lets the controller work with whatever it is given ([`ThrottleSettings::normalized`]).

use std::time::Duration;

use crate::job_spec::{BatchBoundNames, BatchBounds, BatchBoundsError};
use crate::signals::SignalLimits;

/// Smallest rate budget, also used in place of a nonsense one (zero, negative, NaN): failing
/// safe means crawling, never running unlimited, and the floor keeps every rate pause finite
/// and safe to add to a clock.
pub(super) const MIN_ROWS_PER_SECOND: f64 = 1.0;

/// Tuning of the throttle controller; [`Default`] holds the documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleSettings {
    /// Smallest batch the controller will ask for (rows/keys).
    pub min_batch_size: u32,
    /// Largest batch the controller will ask for.
    pub max_batch_size: u32,
    /// Size of the first batch.
    pub start_batch_size: u32,
    /// Batch duration the size is steered towards.
    pub target_batch: Duration,
    /// Hard time-lag limit: at or above it on any replica, hold.
    pub max_lag: Duration,
    /// Hard byte-lag limit: at or above it on any replica, hold.
    pub max_lag_bytes: u64,
    /// Fraction of the hard limits at which cutting starts (the soft limit), in `(0, 1]`.
    pub soft_lag_fraction: f64,
    /// Pause inserted before each batch while lag is at or above the soft limit.
    pub soft_lag_pause: Duration,
    /// Rows committed per second this controller may spend; `None` means unlimited.
    pub max_rows_per_second: Option<f64>,
    /// Additive growth per healthy batch, as a fraction of `max_batch_size`, in `(0, 1]`.
    pub growth_step_fraction: f64,
    /// Multiplicative cut on lag, lock timeout, statement timeout and transient errors.
    pub cut_factor: f64,
    /// Multiplicative cut when our batch blocked production sessions.
    pub blocking_cut_factor: f64,
    /// First backoff pause after trouble; doubles on each consecutive trouble.
    pub backoff_initial: Duration,
    /// Upper bound of the backoff pause.
    pub backoff_max: Duration,
    /// How long to wait before re-checking while holding.
    pub hold_recheck: Duration,
    /// While production is active on the primary, the share of time batches may run, in
    /// `(0, 1]`; 1 turns sharing off.
    pub busy_duty_cycle: f64,
    /// While production is active, the batch duration steered towards (if shorter than
    /// `target_batch`).
    pub busy_batch_target: Duration,
    /// A rate budget (the configured one, the impact budget's pace) is spent in batches of
    /// this much of it, evenly spaced (or of the worker's typical cycle, when longer).
    pub rate_window: Duration,
    /// Hold when a replication slot retains this many bytes of WAL or more; `None`: off.
    pub max_slot_retained_bytes: Option<u64>,
    /// How to judge the throttle query's value.
    pub query_limits: QueryLimits,
    /// Hold while a vacuum works on the job's table (a wraparound-prevention one always holds).
    pub hold_while_vacuumed: bool,
    /// Limits of the WAL rate, WAL archiving, dead-tuple and job-query signals.
    pub signal_limits: SignalLimits,
}

/// Thresholds of the operator's throttle query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryLimits {
    /// Hold while the value is above this (a boolean reads as 1 or 0).
    pub hold_above: f64,
    /// After a hold, run again once the value is at or below this (at most `hold_above`).
    pub resume_at_or_below: f64,
    /// A query that fails lets jobs run instead of holding them.
    pub fail_open: bool,
}

impl Default for QueryLimits {
    /// A boolean query: true holds, false runs; failures hold.
    fn default() -> Self {
        QueryLimits {
            hold_above: 0.0,
            resume_at_or_below: 0.0,
            fail_open: false,
        }
    }
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            min_batch_size: 10,
            max_batch_size: 10_000,
            start_batch_size: 1_000,
            target_batch: Duration::from_millis(500),
            max_lag: Duration::from_secs(2),
            max_lag_bytes: 64 * 1024 * 1024,
            soft_lag_fraction: 0.5,
            soft_lag_pause: Duration::from_millis(500),
            max_rows_per_second: None,
            growth_step_fraction: 0.1,
            cut_factor: 0.5,
            blocking_cut_factor: 0.25,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            hold_recheck: Duration::from_secs(1),
            busy_duty_cycle: 0.05,
            busy_batch_target: Duration::from_millis(1),
            rate_window: super::DEFAULT_RATE_WINDOW,
            max_slot_retained_bytes: Some(DEFAULT_MAX_SLOT_RETAINED_BYTES),
            query_limits: QueryLimits::default(),
            hold_while_vacuumed: true,
            signal_limits: SignalLimits {
                max_wal_bytes_per_second: None,
                max_archive_pending_segments: Some(DEFAULT_MAX_ARCHIVE_PENDING_SEGMENTS),
                hold_while_archive_failing: true,
                max_dead_tuple_ratio: None,
                job_query_fail_open: false,
                prometheus: QueryLimits::default(),
            },
        }
    }
}

/// Default limit on WAL retained by one replication slot (1 GiB, 64 default segments): far
/// above what a consumer that keeps up holds (a few segments), far below the disk a
/// primary keeps for WAL, so a stalled CDC consumer or WAN standby stops the backfill
/// long before the primary must choose between its disk and the slot.
pub const DEFAULT_MAX_SLOT_RETAINED_BYTES: u64 = 1024 * 1024 * 1024;

/// Default limit on completed WAL segments awaiting archiving (512 MiB of default
/// segments): an archiver that keeps up has at most one or two waiting.
pub const DEFAULT_MAX_ARCHIVE_PENDING_SEGMENTS: u64 = 32;

/// Why a set of [`ThrottleSettings`] makes no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThrottleSettingsError {
    /// The batch-size bounds make no sense (one rule for every place that sets them).
    #[error(transparent)]
    BatchBounds(#[from] BatchBoundsError),
    /// A duration that must be positive is zero.
    #[error("{name} must be greater than zero")]
    ZeroDuration {
        /// Name of the setting.
        name: &'static str,
    },
    /// `max_lag_bytes` is zero.
    #[error("max_lag_bytes must be greater than zero")]
    ZeroMaxLagBytes,
    /// The throttle query's thresholds are not finite or resume above the hold.
    #[error("the throttle query must resume at or below where it holds, with finite numbers (hold above {hold_above}, resume at or below {resume_at_or_below})")]
    QueryLimitsInverted {
        /// The configured hold threshold.
        hold_above: f64,
        /// The configured resume threshold.
        resume_at_or_below: f64,
    },
    /// `max_slot_retained_bytes` is `Some(0)` (off is `None`).
    #[error("max_slot_retained_bytes must be greater than zero (off is None)")]
    ZeroMaxSlotRetainedBytes,
    /// `max_rows_per_second` is not a finite number of at least 1.
    #[error("max_rows_per_second must be a number of at least 1, got {0}")]
    InvalidRowsPerSecond(f64),
    /// A fraction or factor is outside its allowed range.
    #[error("{name} must be in {range}, got {value}")]
    FactorOutOfRange {
        /// Name of the setting.
        name: &'static str,
        /// The configured value.
        value: f64,
        /// The allowed range, for the message.
        range: &'static str,
    },
    /// `backoff_initial` is longer than `backoff_max`.
    #[error("backoff_initial ({initial:?}) is longer than backoff_max ({max:?})")]
    BackoffInitialAboveMax {
        /// The configured initial backoff.
        initial: Duration,
        /// The configured maximum backoff.
        max: Duration,
    },
}

impl ThrottleSettings {
    /// Checks the settings, reporting the first nonsense value with a message for the user.
    pub fn validate(&self) -> Result<(), ThrottleSettingsError> {
        BatchBounds {
            min: self.min_batch_size,
            max: self.max_batch_size,
            start: self.start_batch_size,
        }
        .check(BatchBoundNames {
            min: "min_batch_size",
            max: "max_batch_size",
            start: "start_batch_size",
        })?;
        for (name, value) in [
            ("target_batch", self.target_batch),
            ("max_lag", self.max_lag),
            ("backoff_initial", self.backoff_initial),
            ("hold_recheck", self.hold_recheck),
            ("busy_batch_target", self.busy_batch_target),
        ] {
            if value.is_zero() {
                return Err(ThrottleSettingsError::ZeroDuration { name });
            }
        }
        if self.max_lag_bytes == 0 {
            return Err(ThrottleSettingsError::ZeroMaxLagBytes);
        }
        if self.max_slot_retained_bytes == Some(0) {
            return Err(ThrottleSettingsError::ZeroMaxSlotRetainedBytes);
        }
        let QueryLimits {
            hold_above,
            resume_at_or_below,
            ..
        } = self.query_limits;
        if !(hold_above.is_finite()
            && resume_at_or_below.is_finite()
            && resume_at_or_below <= hold_above)
        {
            return Err(ThrottleSettingsError::QueryLimitsInverted {
                hold_above,
                resume_at_or_below,
            });
        }
        if let Some(ratio) = self.signal_limits.max_dead_tuple_ratio {
            if !UNIT_RANGE.contains(ratio) {
                return Err(ThrottleSettingsError::FactorOutOfRange {
                    name: "max_dead_tuple_ratio",
                    value: ratio,
                    range: UNIT_RANGE.label,
                });
            }
        }
        if let Some(budget) = self.max_rows_per_second {
            if !(budget.is_finite() && budget >= MIN_ROWS_PER_SECOND) {
                return Err(ThrottleSettingsError::InvalidRowsPerSecond(budget));
            }
        }
        for (name, value, allowed) in [
            ("soft_lag_fraction", self.soft_lag_fraction, UNIT_RANGE),
            (
                "growth_step_fraction",
                self.growth_step_fraction,
                UNIT_RANGE,
            ),
            ("cut_factor", self.cut_factor, CUT_RANGE),
            ("blocking_cut_factor", self.blocking_cut_factor, CUT_RANGE),
            ("busy_duty_cycle", self.busy_duty_cycle, UNIT_RANGE),
        ] {
            if !allowed.contains(value) {
                return Err(ThrottleSettingsError::FactorOutOfRange {
                    name,
                    value,
                    range: allowed.label,
                });
            }
        }
        if self.backoff_initial > self.backoff_max {
            return Err(ThrottleSettingsError::BackoffInitialAboveMax {
                initial: self.backoff_initial,
                max: self.backoff_max,
            });
        }
        Ok(())
    }

    /// Returns settings the controller can always work with: sizes ordered and at least 1,
    /// and every other nonsense value replaced by its default (a rate budget below 1 row/s,
    /// or nonsense, by 1 row/s rather than none).
    pub fn normalized(&self) -> Self {
        let defaults = Self::default();
        let min = self.min_batch_size.max(1);
        let max = self.max_batch_size.max(min);
        let positive_or = |value: Duration, fallback: Duration| {
            if value.is_zero() {
                fallback
            } else {
                value
            }
        };
        let factor_or = |value: f64, allowed: FactorRange, fallback: f64| {
            if allowed.contains(value) {
                value
            } else {
                fallback
            }
        };
        let backoff_initial = positive_or(self.backoff_initial, defaults.backoff_initial);
        Self {
            min_batch_size: min,
            max_batch_size: max,
            start_batch_size: self.start_batch_size.clamp(min, max),
            target_batch: positive_or(self.target_batch, defaults.target_batch),
            max_lag: positive_or(self.max_lag, defaults.max_lag),
            max_lag_bytes: if self.max_lag_bytes == 0 {
                defaults.max_lag_bytes
            } else {
                self.max_lag_bytes
            },
            soft_lag_fraction: factor_or(
                self.soft_lag_fraction,
                UNIT_RANGE,
                defaults.soft_lag_fraction,
            ),
            soft_lag_pause: self.soft_lag_pause,
            max_rows_per_second: normalize_budget(self.max_rows_per_second),
            growth_step_fraction: factor_or(
                self.growth_step_fraction,
                UNIT_RANGE,
                defaults.growth_step_fraction,
            ),
            cut_factor: factor_or(self.cut_factor, CUT_RANGE, defaults.cut_factor),
            blocking_cut_factor: factor_or(
                self.blocking_cut_factor,
                CUT_RANGE,
                defaults.blocking_cut_factor,
            ),
            backoff_initial,
            backoff_max: self.backoff_max.max(backoff_initial),
            hold_recheck: positive_or(self.hold_recheck, defaults.hold_recheck),
            busy_duty_cycle: factor_or(self.busy_duty_cycle, UNIT_RANGE, defaults.busy_duty_cycle),
            busy_batch_target: positive_or(self.busy_batch_target, defaults.busy_batch_target),
            rate_window: positive_or(self.rate_window, defaults.rate_window),
            max_slot_retained_bytes: match self.max_slot_retained_bytes {
                Some(0) => defaults.max_slot_retained_bytes,
                limit => limit,
            },
            query_limits: self.query_limits,
            hold_while_vacuumed: self.hold_while_vacuumed,
            signal_limits: self.signal_limits,
        }
    }
}

/// An open-or-closed range of allowed factor values, with its label for error messages.
#[derive(Clone, Copy)]
pub(super) struct FactorRange {
    max_inclusive: bool,
    label: &'static str,
}

/// Fractions that may reach 1 (a soft limit equal to the hard one, a step of the whole range).
pub(super) const UNIT_RANGE: FactorRange = FactorRange {
    max_inclusive: true,
    label: "(0, 1]",
};

/// Cut factors must actually cut.
const CUT_RANGE: FactorRange = FactorRange {
    max_inclusive: false,
    label: "(0, 1)",
};

impl FactorRange {
    pub(super) fn contains(self, value: f64) -> bool {
        value > 0.0 && (value < 1.0 || (self.max_inclusive && value == 1.0))
    }
}

/// Maps a rate budget to one the controller can use: infinity means unlimited, and a
/// nonsense budget means the slowest rate (fail safe).
pub(super) fn normalize_budget(budget: Option<f64>) -> Option<f64> {
    match budget {
        Some(rate) if rate == f64::INFINITY => None,
        Some(rate) if rate.is_finite() && rate > 0.0 => Some(rate.max(MIN_ROWS_PER_SECOND)),
        Some(_) => Some(MIN_ROWS_PER_SECOND),
        None => None,
    }
}
