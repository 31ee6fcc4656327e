//! Adaptive throttle controller: decides the size of the next batch and how long to wait
//! before it, or whether to hold completely, from the latest health sample and the outcome
//! of the last batch.
//!
//! The controller is pure: no I/O and no clock. The caller passes `now` (a monotonic
//! [`Duration`] since any origin it likes), so every decision is deterministic and can be
//! replayed in tests with simulated time.
//!
//! How it decides, and why the defaults are what they are: `docs/THROTTLE.md` (the rules
//! for each signal, replication lag in time and bytes, the defaults against gh-ost and
//! pt-archiver). The unit tests are in `throttle/tests.rs`.

use std::fmt;
use std::time::Duration;

use crate::impact::ImpactDirective;
use crate::latency::{LatencyPacer, PACING_WINDOW};
use crate::signals::{
    ArchiveStatus, JobQuery, SignalLatches, SignalLimits, SignalReadings, TableDeadTuples,
};

/// A batch carries at most this much of the impact budget's pace: small batches, evenly
/// spaced, are what production's latency notices least at one average rate.
pub const IMPACT_WINDOW: Duration = Duration::from_millis(20);

/// While the impact controller rests, holds are re-checked at least this often: a rest is
/// about a second, and the job should resume as soon as it ends.
const IMPACT_REST_RECHECK: Duration = Duration::from_millis(250);

/// A batch that took more than this many times the target is reported as `slow_batch`;
/// smaller overshoots are corrected silently as normal regulation.
const SLOW_BATCH_FACTOR: u32 = 2;

/// A batch never carries more rows than this much of the rate budget, so the pause that
/// pays for it stays about this short: a second's budget written as one batch hurt
/// production's latency more than a naive loop at the same rate (issue 19); ten evenly
/// spaced batches a second cost a few more commits and spread the load.
const RATE_BUDGET_WINDOW: Duration = Duration::from_millis(100);

/// Smallest rate budget, also used in place of a nonsense one (zero, negative, NaN): failing
/// safe means crawling, never running unlimited, and the floor keeps every rate pause finite
/// and safe to add to a clock.
const MIN_ROWS_PER_SECOND: f64 = 1.0;

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

/// What the throttle query gave.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryReading {
    /// Its value (a boolean as 1 or 0).
    Value(f64),
    /// It failed or gave no single number; the error, for the log.
    Failed(String),
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
    /// `min_batch_size` is zero.
    #[error("min_batch_size must be at least 1")]
    ZeroMinBatchSize,
    /// `min_batch_size` exceeds `max_batch_size`.
    #[error("min_batch_size ({min}) is larger than max_batch_size ({max})")]
    MinAboveMax {
        /// The configured minimum.
        min: u32,
        /// The configured maximum.
        max: u32,
    },
    /// `start_batch_size` lies outside the min..=max range.
    #[error(
        "start_batch_size ({start}) is outside min_batch_size..=max_batch_size ({min}..={max})"
    )]
    StartOutOfRange {
        /// The configured start size.
        start: u32,
        /// The configured minimum.
        min: u32,
        /// The configured maximum.
        max: u32,
    },
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
        let (min, max, start) = (
            self.min_batch_size,
            self.max_batch_size,
            self.start_batch_size,
        );
        if min == 0 {
            return Err(ThrottleSettingsError::ZeroMinBatchSize);
        }
        if min > max {
            return Err(ThrottleSettingsError::MinAboveMax { min, max });
        }
        if !(min..=max).contains(&start) {
            return Err(ThrottleSettingsError::StartOutOfRange { start, min, max });
        }
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

impl ThrottleSettings {
    /// Every signal in `health` that would hold a job under these settings right now, each
    /// judged on its own with no hold carried over (so a signal between its resume and hold
    /// thresholds does not count), most severe first; what `backfilld plan` reports.
    pub fn holding_signals(&self, health: &HealthSample) -> Vec<ThrottleReason> {
        if health.probe_failed {
            return vec![ThrottleReason::ProbeFailed];
        }
        let mut fresh = ThrottleController::new(self.clone());
        let mut reasons = Vec::new();
        if health
            .operator_ratio
            .is_some_and(|ratio| ratio.is_nan() || ratio <= 0.0)
        {
            reasons.push(ThrottleReason::Operator);
        }
        let lag = fresh.assess_lag(health);
        if lag.standby_missing {
            reasons.push(ThrottleReason::StandbyMissing);
        }
        let settings = &fresh.settings;
        if health.replicas.iter().any(|replica| {
            replica.is_unmeasured() || replica.reaches(settings.max_lag, settings.max_lag_bytes)
        }) {
            reasons.push(ThrottleReason::ReplicationLag);
        }
        if health
            .table_vacuum
            .is_some_and(|wraparound| wraparound || settings.hold_while_vacuumed)
        {
            reasons.push(ThrottleReason::Vacuum);
        }
        fresh.update_slot_latch(health);
        if fresh.holding_for_slot {
            reasons.push(ThrottleReason::ReplicationSlot);
        }
        fresh.update_query_latch(health);
        if fresh.holding_for_query {
            reasons.push(ThrottleReason::ThrottleQuery);
        }
        reasons.extend(crate::signals::holding_reasons(
            &fresh.settings.signal_limits,
            &health.signal_readings(),
        ));
        reasons.sort_by_key(|reason| std::cmp::Reverse(reason.severity()));
        reasons.dedup();
        reasons
    }
}

/// An open-or-closed range of allowed factor values, with its label for error messages.
#[derive(Clone, Copy)]
struct FactorRange {
    max_inclusive: bool,
    label: &'static str,
}

/// Fractions that may reach 1 (a soft limit equal to the hard one, a step of the whole range).
const UNIT_RANGE: FactorRange = FactorRange {
    max_inclusive: true,
    label: "(0, 1]",
};

/// Cut factors must actually cut.
const CUT_RANGE: FactorRange = FactorRange {
    max_inclusive: false,
    label: "(0, 1)",
};

impl FactorRange {
    fn contains(self, value: f64) -> bool {
        value > 0.0 && (value < 1.0 || (self.max_inclusive && value == 1.0))
    }
}

/// Maps a rate budget to one the controller can use: infinity means unlimited, and a
/// nonsense budget means the slowest rate (fail safe).
fn normalize_budget(budget: Option<f64>) -> Option<f64> {
    match budget {
        Some(rate) if rate == f64::INFINITY => None,
        Some(rate) if rate.is_finite() && rate > 0.0 => Some(rate.max(MIN_ROWS_PER_SECOND)),
        Some(_) => Some(MIN_ROWS_PER_SECOND),
        None => None,
    }
}

/// Replication lag of one physical standby, as measured by the health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaLag {
    /// Standby name (`application_name`, or the name the operator gave a replica DSN).
    pub name: String,
    /// Time lag (`replay_lag`); `None` when PostgreSQL reports NULL, e.g. on an idle primary.
    /// When measured on the replica itself, report zero while nothing is left to replay,
    /// since `now() - pg_last_xact_replay_timestamp()` grows on an idle primary.
    pub lag: Option<Duration>,
    /// Byte lag (`pg_current_wal_lsn() - replay_lsn`); `None` when unknown.
    pub lag_bytes: Option<u64>,
}

impl ReplicaLag {
    /// A replica with the given time and byte lag.
    pub fn new(name: impl Into<String>, lag: Option<Duration>, lag_bytes: Option<u64>) -> Self {
        Self {
            name: name.into(),
            lag,
            lag_bytes,
        }
    }

    /// True when neither measure is known, so the replica cannot be judged.
    fn is_unmeasured(&self) -> bool {
        self.lag.is_none() && self.lag_bytes.is_none()
    }

    /// True when either known measure is at or above its limit.
    fn reaches(&self, lag_limit: Duration, bytes_limit: u64) -> bool {
        self.lag.is_some_and(|lag| lag >= lag_limit)
            || self.lag_bytes.is_some_and(|bytes| bytes >= bytes_limit)
    }

    /// True when every known measure is strictly below half its hard limit (integer
    /// arithmetic, so the boundary is exact); never for an unmeasured replica.
    fn below_half(&self, max_lag: Duration, max_lag_bytes: u64) -> bool {
        let lag_ok = self.lag.map(|lag| lag.saturating_mul(2) < max_lag);
        let bytes_ok = self
            .lag_bytes
            .map(|bytes| bytes.saturating_mul(2) < max_lag_bytes);
        match (lag_ok, bytes_ok) {
            (None, None) => false,
            (lag_ok, bytes_ok) => lag_ok != Some(false) && bytes_ok != Some(false),
        }
    }
}

/// WAL one replication slot keeps the primary from recycling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRetention {
    /// `slot_name`.
    pub name: String,
    /// `pg_current_wal_lsn() - restart_lsn`.
    pub retained_bytes: u64,
}

/// An operator throttle (`backfill.throttle`) in force on one job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OperatorThrottle {
    /// The job (or slice) it applies to.
    pub job_id: i64,
    /// Share of its rate the job may run at; 0 holds it.
    pub ratio: f64,
}

/// A vacuum working on a running job's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableVacuum {
    /// The job (or slice) whose table it is.
    pub job_id: i64,
    /// It is a wraparound-prevention vacuum.
    pub wraparound: bool,
}

/// One reading of the database's health (built by the probes in the data plane).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthSample {
    /// Lag of every standby that was found.
    pub replicas: Vec<ReplicaLag>,
    /// Standbys the operator declared that are absent or unreachable.
    pub missing_standbys: Vec<String>,
    /// Sessions currently waiting on a lock held by the backfill's backend.
    pub sessions_blocked_by_us: u32,
    /// Longest wait among those blocked sessions.
    pub longest_block: Duration,
    /// The same per backend of ours that blocks someone, so that a batch is cancelled for
    /// the sessions it blocks itself, not for those another job's batch blocks.
    pub blocking_backends: Vec<BlockingBackend>,
    /// The probe itself failed; nothing else in the sample can be trusted.
    pub probe_failed: bool,
    /// Canary round trips judged delayed since the daemon started (monotonic; see
    /// [`crate::latency`]); always 0 when the canary is off.
    pub probe_delays: u64,
    /// Client sessions not of backfilld seen active since the previous probe.
    pub production_sessions: u32,
    /// Production is at work on the primary, judged from recent probes' sightings of
    /// such sessions (see [`crate::activity`]).
    pub production_active: bool,
    /// WAL retained by every replication slot that still has WAL to keep.
    pub slots: Vec<SlotRetention>,
    /// Operator throttles in force, per job (the tightest one per job).
    pub operator_throttles: Vec<OperatorThrottle>,
    /// The operator ratio for the job this sample is decided for (see
    /// [`HealthSample::for_job`]); `None` when no operator throttle applies.
    pub operator_ratio: Option<f64>,
    /// The throttle query's reading; `None` when no query is configured.
    pub throttle_query: Option<QueryReading>,
    /// Vacuums working on running jobs' tables.
    pub vacuums: Vec<TableVacuum>,
    /// For the job this sample is decided for (see [`HealthSample::for_job`]): a vacuum
    /// works on its table, `Some(true)` when it prevents wraparound.
    pub table_vacuum: Option<bool>,
    /// Bytes of WAL the primary wrote per second lately; `None` until measured.
    pub wal_bytes_per_second: Option<f64>,
    /// WAL archiving; `None` when archive_mode is off.
    pub archive: Option<ArchiveStatus>,
    /// Dead-tuple ratios of running jobs' tables.
    pub dead_tuples: Vec<TableDeadTuples>,
    /// Running jobs' own throttle queries.
    pub job_queries: Vec<JobQuery>,
    /// For the job this sample is decided for: its table's dead-tuple ratio and its own
    /// throttle query (see [`HealthSample::for_job`]).
    pub table_dead_tuple_ratio: Option<f64>,
    /// See `table_dead_tuple_ratio`: the job's query's reading and threshold.
    pub job_query: Option<(QueryReading, f64)>,
    /// The Prometheus query's reading; `None` when none is configured.
    pub prometheus: Option<QueryReading>,
    /// The impact budget's directive for the whole daemon (see [`crate::impact`]); `None`
    /// when it is off or has no readable signal.
    pub impact: Option<ImpactDirective>,
}

impl HealthSample {
    /// A sample of a healthy database with no standbys.
    pub fn healthy() -> Self {
        Self::default()
    }

    /// A sample in which the probe failed.
    pub fn probe_failed() -> Self {
        Self {
            probe_failed: true,
            ..Self::default()
        }
    }

    /// This sample as seen by one job: `operator_ratio` set to the tightest operator
    /// throttle on `job_id`, if any, and `table_vacuum` to a vacuum on its table.
    pub fn for_job(&self, job_id: i64) -> Self {
        let operator_ratio = self
            .operator_throttles
            .iter()
            .filter(|throttle| throttle.job_id == job_id)
            .map(|throttle| throttle.ratio)
            .reduce(f64::min);
        let table_vacuum = self
            .vacuums
            .iter()
            .filter(|vacuum| vacuum.job_id == job_id)
            .map(|vacuum| vacuum.wraparound)
            .reduce(|a, b| a || b);
        let table_dead_tuple_ratio = self
            .dead_tuples
            .iter()
            .filter(|dead| dead.job_id == job_id)
            .map(|dead| dead.ratio)
            .reduce(f64::max);
        let job_query = self
            .job_queries
            .iter()
            .find(|query| query.job_id == job_id)
            .map(|query| (query.reading.clone(), query.hold_above));
        Self {
            operator_ratio,
            table_vacuum,
            table_dead_tuple_ratio,
            job_query,
            ..self.clone()
        }
    }

    /// What the signals of [`crate::signals`] read, for the job of [`Self::for_job`].
    pub fn signal_readings(&self) -> SignalReadings {
        SignalReadings {
            wal_bytes_per_second: self.wal_bytes_per_second,
            archive: self.archive,
            dead_tuple_ratio: self.table_dead_tuple_ratio,
            job_query: self.job_query.clone(),
            prometheus: self.prometheus.clone(),
        }
    }

    /// A sample with the given standbys and nothing else wrong.
    pub fn with_replicas(replicas: Vec<ReplicaLag>) -> Self {
        Self {
            replicas,
            ..Self::default()
        }
    }
}

/// One of our backends holding locks other sessions wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockingBackend {
    /// Its `pg_backend_pid()`.
    pub pid: i32,
    /// Sessions waiting on it.
    pub sessions: u32,
    /// Longest wait among them.
    pub longest: Duration,
}

/// How a batch ended (row-level data errors are handled by bisection elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The batch committed `rows` rows in `duration`.
    Committed {
        /// Rows written by the batch.
        rows: u64,
        /// Wall time of the batch.
        duration: Duration,
    },
    /// Our batch waited on another session's lock past `lock_timeout` (map deadlocks here too).
    LockTimeout {
        /// Wall time until the error.
        duration: Duration,
    },
    /// Our batch was cancelled because it blocked production sessions.
    CancelledForBlocking {
        /// Wall time until the cancellation.
        duration: Duration,
    },
    /// The batch ran past `statement_timeout`.
    StatementTimeout {
        /// Wall time until the timeout.
        duration: Duration,
    },
    /// Another transient failure: connection loss, serialization failure, failover.
    TransientError {
        /// Wall time until the error.
        duration: Duration,
    },
}

impl BatchOutcome {
    /// Wall time the batch took, whatever its outcome.
    pub fn duration(&self) -> Duration {
        match *self {
            Self::Committed { duration, .. }
            | Self::LockTimeout { duration }
            | Self::CancelledForBlocking { duration }
            | Self::StatementTimeout { duration }
            | Self::TransientError { duration } => duration,
        }
    }
}

/// What happened to the batch that ran since the previous decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    /// Number of keys the batch was run with.
    pub size: u32,
    /// How it ended.
    pub outcome: BatchOutcome,
}

/// Why the controller slowed down, cut or held; `as_str` gives the metric/log label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThrottleReason {
    /// A replica's lag is above the soft or hard limit, or not yet back below half of it.
    ReplicationLag,
    /// A declared standby is absent or unreachable.
    StandbyMissing,
    /// Our batch waited on a lock past `lock_timeout`.
    LockTimeout,
    /// Our batch blocked production sessions.
    BlockingProduction,
    /// The last batch took much longer than the target, or hit `statement_timeout`.
    SlowBatch,
    /// The last batch failed with a transient error.
    TransientError,
    /// The rows-per-second budget is being enforced.
    RateLimit,
    /// The health probe failed.
    ProbeFailed,
    /// Production queries (the canary) take longer than on a quiet database: paced.
    ProductionLatency,
    /// Production is at work on the primary: short batches at a bounded duty cycle.
    ProductionActive,
    /// A replication slot retains too much WAL (a consumer is not keeping up).
    ReplicationSlot,
    /// An operator throttle (`backfill.throttle`) slows or holds the job.
    Operator,
    /// The operator's throttle query is over its threshold, or failed.
    ThrottleQuery,
    /// A vacuum works on the job's table.
    Vacuum,
    /// The primary writes WAL faster than `throttle.max_wal_bytes_per_second`.
    WalRate,
    /// WAL archiving is failing or behind.
    WalArchive,
    /// Dead rows are too large a share of the job's table.
    DeadTuples,
    /// The operator's Prometheus query is over its threshold, or unreadable.
    Prometheus,
    /// The impact budget paces the job: production's latency allows no more.
    ImpactBudget,
    /// The impact budget rests the job briefly to re-learn production's baseline latency.
    ImpactBaseline,
}

impl ThrottleReason {
    /// Every reason, e.g. to initialise one metric series per label.
    pub const ALL: [ThrottleReason; 20] = [
        Self::ReplicationLag,
        Self::StandbyMissing,
        Self::LockTimeout,
        Self::BlockingProduction,
        Self::SlowBatch,
        Self::TransientError,
        Self::RateLimit,
        Self::ProbeFailed,
        Self::ProductionLatency,
        Self::ProductionActive,
        Self::ReplicationSlot,
        Self::Operator,
        Self::ThrottleQuery,
        Self::Vacuum,
        Self::WalRate,
        Self::WalArchive,
        Self::DeadTuples,
        Self::Prometheus,
        Self::ImpactBudget,
        Self::ImpactBaseline,
    ];

    /// Whether this is how a healthy job runs rather than trouble: its own rate limit, or
    /// sharing a primary that production is using (the duty cycle or the impact budget).
    /// A job slowed for these alone is not "throttled for long" (event, alert).
    pub fn is_steady_state(self) -> bool {
        matches!(
            self,
            Self::RateLimit | Self::ProductionActive | Self::ImpactBudget | Self::ImpactBaseline
        )
    }

    /// The snake_case label used in logs, metrics and `backfill.job_status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReplicationLag => "replication_lag",
            Self::StandbyMissing => "standby_missing",
            Self::LockTimeout => "lock_timeout",
            Self::BlockingProduction => "blocking_production",
            Self::SlowBatch => "slow_batch",
            Self::TransientError => "transient_error",
            Self::RateLimit => "rate_limit",
            Self::ProbeFailed => "probe_failed",
            Self::ProductionLatency => "production_latency",
            Self::ProductionActive => "production_active",
            Self::ReplicationSlot => "replication_slot",
            Self::Operator => "operator",
            Self::ThrottleQuery => "throttle_query",
            Self::Vacuum => "vacuum",
            Self::WalRate => "wal_rate",
            Self::WalArchive => "wal_archive",
            Self::DeadTuples => "dead_tuples",
            Self::Prometheus => "prometheus",
            Self::ImpactBudget => "impact_budget",
            Self::ImpactBaseline => "impact_baseline",
        }
    }

    /// Rank used to pick one reason when several apply: harm to production first.
    fn severity(self) -> u8 {
        match self {
            Self::BlockingProduction => 12,
            Self::StandbyMissing => 11,
            Self::ReplicationLag => 10,
            Self::ReplicationSlot => 9,
            Self::WalArchive => 9,
            Self::WalRate => 9,
            Self::DeadTuples => 8,
            Self::Prometheus => 8,
            Self::ThrottleQuery => 8,
            Self::Vacuum => 8,
            Self::ProbeFailed => 7,
            Self::Operator => 6,
            Self::ProductionLatency => 5,
            Self::ImpactBudget => 5,
            Self::ImpactBaseline => 5,
            Self::LockTimeout => 4,
            Self::SlowBatch => 3,
            Self::TransientError => 2,
            Self::RateLimit => 1,
            Self::ProductionActive => 0,
        }
    }

    /// The more severe of an optional current reason and a new one.
    fn worst(current: Option<Self>, candidate: Self) -> Option<Self> {
        match current {
            Some(reason) if reason.severity() >= candidate.severity() => Some(reason),
            _ => Some(candidate),
        }
    }
}

impl fmt::Display for ThrottleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the worker should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleDecision {
    /// Sleep `pause_before`, then run a batch of `batch_size` keys.
    Run {
        /// Keys in the next batch.
        batch_size: u32,
        /// Time to wait before starting it.
        pause_before: Duration,
        /// Why the pause or cut, if any.
        reason: Option<ThrottleReason>,
    },
    /// Run nothing; sample health again after `recheck_after` and ask again.
    Hold {
        /// Why the controller holds.
        reason: ThrottleReason,
        /// Time to wait before the next decision.
        recheck_after: Duration,
    },
}

impl ThrottleDecision {
    /// The reason attached to the decision, if any.
    pub fn reason(&self) -> Option<ThrottleReason> {
        match *self {
            Self::Run { reason, .. } => reason,
            Self::Hold { reason, .. } => Some(reason),
        }
    }

    /// True for [`ThrottleDecision::Hold`].
    pub fn is_hold(&self) -> bool {
        matches!(self, Self::Hold { .. })
    }

    /// How long to wait before acting: the pause before a batch or the hold's recheck delay.
    pub fn wait(&self) -> Duration {
        match *self {
            Self::Run { pause_before, .. } => pause_before,
            Self::Hold { recheck_after, .. } => recheck_after,
        }
    }
}

/// Start time and row count of the last committed batch, which prices the next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CommitMark {
    started_at: Duration,
    rows: u64,
    duration: Duration,
}

/// A multiplicative-cut signal from the last batch or the health sample.
#[derive(Debug, Clone, Copy)]
struct Trouble {
    reason: ThrottleReason,
    /// Minimum pause, e.g. as long as we made production wait.
    at_least: Duration,
}

/// The lag picture of one health sample against the configured limits.
#[derive(Debug, Clone, Copy)]
struct LagAssessment {
    /// Some replica is at or above the hard limit, unmeasured, or a standby is missing.
    at_or_over_limit: bool,
    /// Some replica is at or above the soft limit (implied by `at_or_over_limit`).
    at_or_over_soft: bool,
    /// Every standby is present and below half the hard limit in both measures.
    all_below_half: bool,
    /// A declared standby is missing.
    standby_missing: bool,
}

/// The adaptive throttle controller of one worker; see the module docs for its rules.
///
/// Drive it once before every batch:
///
/// ```
/// use std::time::Duration;
/// use backfill_core::throttle::*;
///
/// let mut throttle = ThrottleController::new(ThrottleSettings::default());
/// let mut now = Duration::ZERO; // the caller's monotonic clock
/// let mut last_batch = None;
/// for _ in 0..3 {
///     let health = HealthSample::healthy(); // from the health probe
///     match throttle.decide(now, &health, last_batch.take().as_ref()) {
///         ThrottleDecision::Run { batch_size, pause_before, .. } => {
///             now += pause_before; // sleep, then run the batch
///             let duration = Duration::from_millis(100);
///             now += duration;
///             let outcome = BatchOutcome::Committed { rows: u64::from(batch_size), duration };
///             last_batch = Some(BatchReport { size: batch_size, outcome });
///         }
///         ThrottleDecision::Hold { recheck_after, .. } => now += recheck_after,
///     }
/// }
/// assert_eq!(throttle.state_label(), "running");
/// ```
#[derive(Debug, Clone)]
pub struct ThrottleController {
    settings: ThrottleSettings,
    /// Learned batch size, before the rate-budget cap.
    batch_size: u32,
    /// Latched when lag reached the hard limit; cleared only once all lag is below half.
    holding_for_lag: bool,
    /// Latched when a slot reached its limit; cleared only once every slot is below half.
    holding_for_slot: bool,
    /// Latched when the throttle query went over its threshold (or failed, failing safe).
    holding_for_query: bool,
    /// Latches of the WAL rate, archiving, dead-tuple and job-query signals.
    signal_latches: SignalLatches,
    /// Operator ratio from the latest sample, in (0, 1); `None`: not slowed by an operator.
    operator_ratio: Option<f64>,
    /// Consecutive troubled batches; drives the exponential backoff.
    consecutive_troubles: u32,
    /// No batch may start before this time (backoff).
    backoff_until: Duration,
    /// What caused the current backoff.
    backoff_reason: Option<ThrottleReason>,
    /// Prices the next start against the rate budget.
    last_commit: Option<CommitMark>,
    /// Rows per second the last committed batch achieved while it ran.
    last_batch_rate: Option<f64>,
    /// The pace that keeps production's latency flat (see [`crate::latency`]).
    latency: LatencyPacer,
    /// A health-driven cut was already applied since the last batch; repeated decisions
    /// without a batch in between (hold rechecks) must not compound it.
    health_cut_since_last_batch: bool,
    /// Production is active and sharing is on: short batches at a bounded duty cycle.
    sharing: bool,
    /// This job's share of the impact budget's pace (rows per second), while it paces.
    impact_rate: Option<f64>,
    /// Jobs and slices running now, among which the impact budget's pace is shared.
    impact_sharers: i64,
    last_decision: Option<ThrottleDecision>,
}

impl ThrottleController {
    /// A controller starting at `start_batch_size`; nonsense settings are normalised (see
    /// [`ThrottleSettings::normalized`]) so the controller never panics on user input.
    pub fn new(settings: ThrottleSettings) -> Self {
        let settings = settings.normalized();
        Self {
            batch_size: settings.start_batch_size,
            settings,
            holding_for_lag: false,
            holding_for_slot: false,
            holding_for_query: false,
            signal_latches: SignalLatches::default(),
            operator_ratio: None,
            consecutive_troubles: 0,
            backoff_until: Duration::ZERO,
            backoff_reason: None,
            last_commit: None,
            last_batch_rate: None,
            latency: LatencyPacer::default(),
            health_cut_since_last_batch: false,
            sharing: false,
            impact_rate: None,
            impact_sharers: 1,
            last_decision: None,
        }
    }

    /// Decides what to do next.
    ///
    /// `now` is a monotonic Duration since an arbitrary origin (the caller passes elapsed
    /// time), so the controller can enforce rate budgets and hysteresis without a clock.
    /// `last_batch` is the report of the batch that ran since the previous decision, and
    /// `None` when none ran (the first decision, or after a hold); passing one report twice
    /// counts it twice.
    pub fn decide(
        &mut self,
        now: Duration,
        health: &HealthSample,
        last_batch: Option<&BatchReport>,
    ) -> ThrottleDecision {
        let base = self.batch_size;
        let mut next_size = base;
        let mut reason = None;
        let mut trouble = None;
        // The impact budget applies next to production; with no verdict, the duty cycle.
        let impact = health.impact.filter(|_| health.production_active);
        self.sharing =
            health.production_active && self.settings.busy_duty_cycle < 1.0 && impact.is_none();
        self.impact_rate = match impact {
            Some(ImpactDirective::Pace(rate)) => {
                Some((rate / self.impact_sharers.max(1) as f64).max(MIN_ROWS_PER_SECOND))
            }
            _ => None,
        };
        // Nonsense (NaN, negative) holds: failing safe; 1 or more is no throttle at all.
        let operator_ratio =
            health
                .operator_ratio
                .map(|ratio| if ratio.is_nan() { 0.0 } else { ratio.max(0.0) });
        self.operator_ratio = operator_ratio.filter(|ratio| *ratio > 0.0 && *ratio < 1.0);
        let operator_hold = operator_ratio == Some(0.0);

        if let Some(report) = last_batch {
            self.health_cut_since_last_batch = false;
            let (size, report_reason, report_trouble) = self.absorb_report(now, base, report);
            next_size = size;
            reason = report_reason;
            trouble = report_trouble;
        }

        // A failed probe says nothing reliable: no health-driven cut, no lag judgement.
        let lag = (!health.probe_failed).then(|| self.assess_lag(health));
        if let Some(lag) = &lag {
            if !self.health_cut_since_last_batch {
                let mut factor: f64 = 1.0;
                if health.sessions_blocked_by_us > 0 {
                    factor = self.settings.blocking_cut_factor;
                    trouble = worse_trouble(
                        trouble,
                        Trouble {
                            reason: ThrottleReason::BlockingProduction,
                            at_least: health.longest_block,
                        },
                    );
                }
                if lag.at_or_over_soft {
                    factor = factor.min(self.settings.cut_factor);
                }
                if factor < 1.0 {
                    next_size = next_size.min(scale(base, factor));
                    self.health_cut_since_last_batch = true;
                }
            }
        }
        if lag.is_some() {
            let floor = f64::from(self.settings.min_batch_size) / PACING_WINDOW.as_secs_f64();
            if self
                .latency
                .update(now, health.probe_delays, self.last_batch_rate, floor)
            {
                reason = ThrottleReason::worst(reason, ThrottleReason::ProductionLatency);
            }
        }
        if let Some(trouble) = trouble {
            self.start_backoff(now, trouble);
        }
        self.batch_size = self.clamp_size(next_size);

        let decision = match lag {
            // Hold briefly and leave the lag latch alone: the database may be unreachable.
            None => ThrottleDecision::Hold {
                reason: ThrottleReason::ProbeFailed,
                recheck_after: self.settings.hold_recheck,
            },
            Some(_) if operator_hold => {
                // Keep the latches current, so that a release does not run on stale news.
                self.update_slot_latch(health);
                self.update_query_latch(health);
                self.signal_latches
                    .update(&self.settings.signal_limits, &health.signal_readings());
                ThrottleDecision::Hold {
                    reason: ThrottleReason::Operator,
                    recheck_after: self.settings.hold_recheck,
                }
            }
            Some(lag) => self.lag_decision(now, &lag, health, reason),
        };
        self.last_decision = Some(decision);
        decision
    }

    /// Current batch size: what the next batch would use, with the rate cap applied, barring
    /// new signals.
    pub fn batch_size(&self) -> u32 {
        match self.rate_cap() {
            Some(cap) => self.batch_size.min(cap),
            None => self.batch_size,
        }
    }

    /// Changes the rows-per-second budget at run time (e.g. a share of a budget split across
    /// workers); `None` or infinity removes it, and anything below 1 row/s (or nonsense)
    /// means 1 row/s.
    pub fn set_max_rows_per_second(&mut self, budget: Option<f64>) {
        self.settings.max_rows_per_second = normalize_budget(budget);
    }

    /// Applies a live retune of the batch bounds and target (the job's columns changed while
    /// it runs). The learned batch size is kept, inside the new bounds; `restart_at` (a new
    /// `batch_size` column) replaces it outright, clamped likewise. Nonsense is normalised
    /// as in [`ThrottleController::new`].
    pub fn retune_batches(
        &mut self,
        min_batch_size: u32,
        max_batch_size: u32,
        target_batch: Duration,
        restart_at: Option<u32>,
    ) {
        self.settings = ThrottleSettings {
            min_batch_size,
            max_batch_size,
            target_batch,
            start_batch_size: restart_at.unwrap_or(self.settings.start_batch_size),
            ..self.settings.clone()
        }
        .normalized();
        if restart_at.is_some() {
            self.batch_size = self.settings.start_batch_size;
        }
        self.batch_size = self.clamp_size(self.batch_size);
    }

    /// Changes the duty cycle next to production at run time (this job's share of it while
    /// others run); nonsense keeps the one in force.
    pub fn set_busy_duty_cycle(&mut self, duty_cycle: f64) {
        if UNIT_RANGE.contains(duty_cycle) {
            self.settings.busy_duty_cycle = duty_cycle;
        }
    }

    /// Sets how many jobs and slices share the impact budget's pace now (at least 1).
    pub fn set_impact_sharers(&mut self, running: i64) {
        self.impact_sharers = running.max(1);
    }

    /// This job's share of the impact budget's pace in force, if it paces (rows per second).
    pub fn impact_rate(&self) -> Option<f64> {
        self.impact_rate
    }

    /// The duty cycle next to production in force.
    pub fn busy_duty_cycle(&self) -> f64 {
        self.settings.busy_duty_cycle
    }

    /// The rows-per-second budget in force.
    pub fn max_rows_per_second(&self) -> Option<f64> {
        self.settings.max_rows_per_second
    }

    /// `"running"`, `"throttled"` (the last decision paused or cut) or `"holding"`.
    pub fn state_label(&self) -> &'static str {
        match self.last_decision {
            Some(ThrottleDecision::Hold { .. }) => "holding",
            Some(ThrottleDecision::Run {
                reason: Some(_), ..
            }) => "throttled",
            _ => "running",
        }
    }

    /// Reason attached to the last decision, if any.
    pub fn reason(&self) -> Option<ThrottleReason> {
        self.last_decision.and_then(|decision| decision.reason())
    }

    /// The last decision made, if any.
    pub fn last_decision(&self) -> Option<ThrottleDecision> {
        self.last_decision
    }

    /// The settings in force (normalised).
    pub fn settings(&self) -> &ThrottleSettings {
        &self.settings
    }

    /// Learns from the last batch: the proposed next size, a reason to report, and the
    /// trouble (if any) that must cut and back off.
    fn absorb_report(
        &mut self,
        now: Duration,
        base: u32,
        report: &BatchReport,
    ) -> (u32, Option<ThrottleReason>, Option<Trouble>) {
        let settings = &self.settings;
        let trouble = |reason| {
            Some(Trouble {
                reason,
                at_least: Duration::ZERO,
            })
        };
        match report.outcome {
            BatchOutcome::Committed { rows, duration } => {
                self.consecutive_troubles = 0;
                self.last_commit = Some(CommitMark {
                    // Approximates the batch start; a late call only makes it later, so the
                    // rate estimate errs on the slow side.
                    started_at: now.saturating_sub(duration),
                    rows,
                    duration,
                });
                if rows > 0 && !duration.is_zero() {
                    self.last_batch_rate = Some(rows as f64 / duration.as_secs_f64());
                }
                let on_target = self.size_for_target(report.size, duration);
                if duration <= self.target() {
                    // An under-target batch never shrinks the size: a short tail batch is
                    // dominated by fixed overhead and would underestimate the good size.
                    let grown = base.saturating_add(self.growth_step());
                    (base.max(grown.min(on_target)), None, None)
                } else {
                    let slow = duration > settings.target_batch.saturating_mul(SLOW_BATCH_FACTOR);
                    let reason = slow.then_some(ThrottleReason::SlowBatch);
                    (base.min(on_target), reason, None)
                }
            }
            BatchOutcome::LockTimeout { .. } => (
                scale(base, settings.cut_factor),
                None,
                trouble(ThrottleReason::LockTimeout),
            ),
            BatchOutcome::CancelledForBlocking { .. } => (
                scale(base, settings.blocking_cut_factor),
                None,
                trouble(ThrottleReason::BlockingProduction),
            ),
            BatchOutcome::StatementTimeout { duration } => {
                let halved = scale(base, settings.cut_factor);
                let on_target = self.size_for_target(report.size, duration);
                (
                    halved.min(on_target),
                    None,
                    trouble(ThrottleReason::SlowBatch),
                )
            }
            BatchOutcome::TransientError { .. } => (
                scale(base, settings.cut_factor),
                None,
                trouble(ThrottleReason::TransientError),
            ),
        }
    }

    /// Holds for lag (with hysteresis) or plans the next batch.
    fn lag_decision(
        &mut self,
        now: Duration,
        lag: &LagAssessment,
        health: &HealthSample,
        reason: Option<ThrottleReason>,
    ) -> ThrottleDecision {
        self.update_slot_latch(health);
        self.update_query_latch(health);
        let signal_hold = self
            .signal_latches
            .update(&self.settings.signal_limits, &health.signal_readings());
        if lag.at_or_over_limit {
            self.holding_for_lag = true;
        } else if self.holding_for_lag && lag.all_below_half {
            self.holding_for_lag = false;
        }
        if self.holding_for_lag {
            let reason = if lag.standby_missing {
                ThrottleReason::StandbyMissing
            } else {
                ThrottleReason::ReplicationLag
            };
            return ThrottleDecision::Hold {
                reason,
                recheck_after: self.settings.hold_recheck,
            };
        }
        let vacuum_holds = health
            .table_vacuum
            .is_some_and(|wraparound| wraparound || self.settings.hold_while_vacuumed);
        if vacuum_holds {
            return ThrottleDecision::Hold {
                reason: ThrottleReason::Vacuum,
                recheck_after: self.settings.hold_recheck,
            };
        }
        let resting = health.production_active && health.impact == Some(ImpactDirective::Rest);
        if resting && !self.holding_for_slot && !self.holding_for_query {
            return ThrottleDecision::Hold {
                reason: ThrottleReason::ImpactBaseline,
                recheck_after: self.settings.hold_recheck.min(IMPACT_REST_RECHECK),
            };
        }
        if self.holding_for_slot || self.holding_for_query {
            let reason = if self.holding_for_slot {
                ThrottleReason::ReplicationSlot
            } else {
                ThrottleReason::ThrottleQuery
            };
            return ThrottleDecision::Hold {
                reason,
                recheck_after: self.settings.hold_recheck,
            };
        }
        if let Some(reason) = signal_hold {
            return ThrottleDecision::Hold {
                reason,
                recheck_after: self.settings.hold_recheck,
            };
        }
        self.plan_run(now, lag, reason)
    }

    /// Latches the query hold above `hold_above` (or on a failure, unless failing open) and
    /// releases it at or below `resume_at_or_below`.
    fn update_query_latch(&mut self, health: &HealthSample) {
        let limits = self.settings.query_limits;
        match &health.throttle_query {
            None => self.holding_for_query = false,
            Some(QueryReading::Value(value)) if !value.is_nan() => {
                if *value > limits.hold_above {
                    self.holding_for_query = true;
                } else if *value <= limits.resume_at_or_below {
                    self.holding_for_query = false;
                }
            }
            // Failed, or NaN: fail safe unless the operator chose otherwise.
            Some(_) => self.holding_for_query = !limits.fail_open,
        }
    }

    /// Latches the slot hold at the limit and releases it once every slot is below half
    /// of it (the same hysteresis as lag).
    fn update_slot_latch(&mut self, health: &HealthSample) {
        let Some(limit) = self.settings.max_slot_retained_bytes else {
            self.holding_for_slot = false;
            return;
        };
        let most = health
            .slots
            .iter()
            .map(|slot| slot.retained_bytes)
            .max()
            .unwrap_or(0);
        if most >= limit {
            self.holding_for_slot = true;
        } else if most.saturating_mul(2) < limit {
            self.holding_for_slot = false;
        }
    }

    /// Batch size and pause for the next batch: the longest of the pending backoff, the
    /// soft-lag pause and the rate-budget pause; the reason is the most severe one active.
    fn plan_run(
        &self,
        now: Duration,
        lag: &LagAssessment,
        mut reason: Option<ThrottleReason>,
    ) -> ThrottleDecision {
        let mut pause = self.backoff_until.saturating_sub(now);
        if !pause.is_zero() {
            if let Some(backoff_reason) = self.backoff_reason {
                reason = ThrottleReason::worst(reason, backoff_reason);
            }
        }
        if lag.at_or_over_soft {
            pause = pause.max(self.settings.soft_lag_pause);
            reason = ThrottleReason::worst(reason, ThrottleReason::ReplicationLag);
        }
        if self.sharing {
            reason = ThrottleReason::worst(reason, ThrottleReason::ProductionActive);
        }
        if let Some(ratio) = self.operator_ratio {
            reason = ThrottleReason::worst(reason, ThrottleReason::Operator);
            // The operator's share applies on top of the share next to production.
            pause = pause.max(self.duty_pause(now, self.duty_cycle() * ratio, None));
        } else if self.sharing {
            pause = pause.max(self.duty_pause(
                now,
                self.settings.busy_duty_cycle,
                Some(self.settings.backoff_max),
            ));
        }
        let mut batch_size = self.batch_size;
        for budget in self.budgets() {
            let cap = self.clamp_size(budget.window_rows());
            if cap < batch_size {
                batch_size = cap;
                reason = ThrottleReason::worst(reason, budget.reason);
            }
            let rate_pause = self.rate_pause(now, &budget);
            if !rate_pause.is_zero() {
                pause = pause.max(rate_pause);
                reason = ThrottleReason::worst(reason, budget.reason);
            }
        }
        ThrottleDecision::Run {
            batch_size,
            pause_before: pause,
            reason,
        }
    }

    /// Escalates the exponential backoff once and pushes the earliest next start out.
    fn start_backoff(&mut self, now: Duration, trouble: Trouble) {
        self.consecutive_troubles = self.consecutive_troubles.saturating_add(1);
        let doublings = (self.consecutive_troubles - 1).min(31);
        let backoff = self
            .settings
            .backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.settings.backoff_max);
        let pause = backoff.max(trouble.at_least.min(self.settings.backoff_max));
        self.backoff_until = self.backoff_until.max(now.saturating_add(pause));
        self.backoff_reason = Some(trouble.reason);
    }

    fn assess_lag(&self, health: &HealthSample) -> LagAssessment {
        let settings = &self.settings;
        let soft_lag = settings.max_lag.mul_f64(settings.soft_lag_fraction);
        // Truncation only moves the soft byte limit down by less than a byte.
        let soft_bytes = (settings.max_lag_bytes as f64 * settings.soft_lag_fraction) as u64;
        let standby_missing = !health.missing_standbys.is_empty();
        let replicas = &health.replicas;
        let at_or_over_limit = standby_missing
            || replicas.iter().any(|replica| {
                replica.is_unmeasured() || replica.reaches(settings.max_lag, settings.max_lag_bytes)
            });
        LagAssessment {
            at_or_over_limit,
            at_or_over_soft: at_or_over_limit
                || replicas
                    .iter()
                    .any(|replica| replica.reaches(soft_lag, soft_bytes)),
            all_below_half: !standby_missing
                && replicas
                    .iter()
                    .all(|replica| replica.below_half(settings.max_lag, settings.max_lag_bytes)),
            standby_missing,
        }
    }

    /// The batch duration steered towards: the short one while sharing the primary.
    fn target(&self) -> Duration {
        if self.sharing {
            self.settings
                .target_batch
                .min(self.settings.busy_batch_target)
        } else {
            self.settings.target_batch
        }
    }

    /// Share of the time batches may run next to production: `busy_duty_cycle` while
    /// sharing, else all of it.
    fn duty_cycle(&self) -> f64 {
        if self.sharing {
            self.settings.busy_duty_cycle
        } else {
            1.0
        }
    }

    /// Wait until the last committed batch's run time is at most `duty_cycle` of the time
    /// since it started, but no longer than `cap`. While sharing the cap is `backoff_max`
    /// (a batch far over the target is cut to size anyway; resting 19× its length at 5 %
    /// would only stall the job); an operator's ratio is not capped, it is what they asked.
    fn duty_pause(&self, now: Duration, duty_cycle: f64, cap: Option<Duration>) -> Duration {
        let Some(mark) = self.last_commit else {
            return Duration::ZERO;
        };
        let cycle = Duration::try_from_secs_f64(mark.duration.as_secs_f64() / duty_cycle)
            .unwrap_or(Duration::MAX);
        let pause = mark.started_at.saturating_add(cycle).saturating_sub(now);
        cap.map_or(pause, |cap| pause.min(cap))
    }

    /// Size the last batch's per-row cost predicts would take exactly the target.
    fn size_for_target(&self, size: u32, took: Duration) -> u32 {
        if took.is_zero() || size == 0 {
            return u32::MAX;
        }
        let rows = f64::from(size) * self.target().as_secs_f64() / took.as_secs_f64();
        // `as` saturates, which is what we want for huge predictions.
        rows.floor() as u32
    }

    fn growth_step(&self) -> u32 {
        let step = f64::from(self.settings.max_batch_size) * self.settings.growth_step_fraction;
        (step.ceil() as u32).max(1)
    }

    fn clamp_size(&self, size: u32) -> u32 {
        size.clamp(self.settings.min_batch_size, self.settings.max_batch_size)
    }

    /// The rate budgets in force: the configured one and the latency pace.
    fn budgets(&self) -> impl Iterator<Item = RateBudget> {
        // A batch is charged at most what one admitted under this budget can cost (a
        // window's worth, or a smallest batch): the batch before the budget was lowered (an
        // operator's live retune or incident ratio, a slice's share shrinking) carried the
        // old budget's window, and charging all of it at the new rate would stall the job
        // for seconds.
        let operator = self.operator_ratio;
        let configured = self.settings.max_rows_per_second.map(|rate| {
            // An operator ratio scales the budget (never below the 1 row/s floor).
            let rate = (rate * operator.unwrap_or(1.0)).max(MIN_ROWS_PER_SECOND);
            RateBudget {
                rows_per_second: rate,
                window: RATE_BUDGET_WINDOW,
                max_charge: RATE_BUDGET_WINDOW.max(
                    Duration::try_from_secs_f64(f64::from(self.settings.min_batch_size) / rate)
                        .unwrap_or(Duration::MAX),
                ),
                reason: if operator.is_some() {
                    ThrottleReason::Operator
                } else {
                    ThrottleReason::RateLimit
                },
            }
        });
        // The batch before a cut carried far more than a window of the new pace; charging
        // all of it would stall the job for seconds where it should be paced.
        let paced = self.latency.rate().map(|rate| RateBudget {
            rows_per_second: rate,
            window: PACING_WINDOW,
            max_charge: PACING_WINDOW,
            reason: ThrottleReason::ProductionLatency,
        });
        let impact = self.impact_rate.map(|rate| RateBudget {
            rows_per_second: rate,
            window: IMPACT_WINDOW,
            max_charge: IMPACT_WINDOW.max(
                Duration::try_from_secs_f64(f64::from(self.settings.min_batch_size) / rate)
                    .unwrap_or(Duration::MAX),
            ),
            reason: ThrottleReason::ImpactBudget,
        });
        configured.into_iter().chain(paced).chain(impact)
    }

    /// Largest batch allowed by the rate budgets: the smallest window's worth of rows.
    fn rate_cap(&self) -> Option<u32> {
        self.budgets()
            .map(|budget| self.clamp_size(budget.window_rows()))
            .min()
    }

    /// Wait until the last committed batch is paid for at the budget's rate (at most its
    /// `max_charge`).
    fn rate_pause(&self, now: Duration, budget: &RateBudget) -> Duration {
        match self.last_commit {
            Some(mark) => {
                let cost = Duration::try_from_secs_f64(mark.rows as f64 / budget.rows_per_second)
                    .unwrap_or(Duration::MAX)
                    .min(budget.max_charge);
                mark.started_at.saturating_add(cost).saturating_sub(now)
            }
            None => Duration::ZERO,
        }
    }

    /// The pace production latency imposes, if any (rows per second).
    pub fn latency_pace(&self) -> Option<f64> {
        self.latency.rate()
    }
}

/// A rows-per-second budget and the most of it one batch may carry.
struct RateBudget {
    rows_per_second: f64,
    /// A batch carries at most this much of the budget.
    window: Duration,
    /// The pause after a batch pays for at most this much of it.
    max_charge: Duration,
    reason: ThrottleReason,
}

impl RateBudget {
    fn window_rows(&self) -> u32 {
        // `as` saturates; the caller clamps to the batch size range.
        (self.rows_per_second * self.window.as_secs_f64()).floor() as u32
    }
}

/// Multiplies a size by a factor, rounding down.
fn scale(size: u32, factor: f64) -> u32 {
    (f64::from(size) * factor).floor() as u32
}

/// Combines two trouble signals of one decision into one backoff step.
fn worse_trouble(current: Option<Trouble>, candidate: Trouble) -> Option<Trouble> {
    Some(match current {
        None => candidate,
        Some(current) => Trouble {
            reason: ThrottleReason::worst(Some(current.reason), candidate.reason)
                .unwrap_or(candidate.reason),
            at_least: current.at_least.max(candidate.at_least),
        },
    })
}

#[cfg(test)]
mod tests;
