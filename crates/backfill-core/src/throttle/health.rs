//! What the controller reads about the database: one [`HealthSample`] per decision, built
//! by the probes in the data plane, and its parts.

use std::time::Duration;

use crate::impact::ImpactDirective;
use crate::signals::{ArchiveStatus, JobQuery, SignalReadings, TableDeadTuples};

/// What the throttle query gave.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryReading {
    /// Its value (a boolean as 1 or 0).
    Value(f64),
    /// It failed or gave no single number; the error, for the log.
    Failed(String),
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
    pub(super) fn is_unmeasured(&self) -> bool {
        self.lag.is_none() && self.lag_bytes.is_none()
    }

    /// True when either known measure is at or above its limit.
    pub(super) fn reaches(&self, lag_limit: Duration, bytes_limit: u64) -> bool {
        self.lag.is_some_and(|lag| lag >= lag_limit)
            || self.lag_bytes.is_some_and(|bytes| bytes >= bytes_limit)
    }

    /// True when every known measure is strictly below half its hard limit (integer
    /// arithmetic, so the boundary is exact); never for an unmeasured replica.
    pub(super) fn below_half(&self, max_lag: Duration, max_lag_bytes: u64) -> bool {
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
