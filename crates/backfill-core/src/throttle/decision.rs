//! What the controller answers: a [`ThrottleDecision`], and the [`ThrottleReason`] that
//! explains a pause, a cut or a hold.

use std::fmt;
use std::time::Duration;

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
    pub(super) fn severity(self) -> u8 {
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
    pub(super) fn worst(current: Option<Self>, candidate: Self) -> Option<Self> {
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
