//! More reasons to hold, read on the primary by the health probe: the WAL rate of the
//! whole primary, WAL archiving, the dead-tuple ratio of a job's table and a job's own
//! throttle query. Each is a latch with hysteresis, like lag: it trips at its limit and
//! releases only well below it, so a job does not flap around one threshold.
//!
//! - **WAL rate** (`wal_rate`): bytes of WAL the primary inserted per second, over the
//!   last [`WAL_RATE_WINDOW`] (the backfill's own WAL counts: the limit is on what the
//!   primary, its standbys and its archive must absorb). Holds at the limit, resumes below
//!   half of it.
//! - **WAL archiving** (`wal_archive`): completed segments not archived yet, from
//!   `pg_stat_archiver.last_archived_wal` against the segment being written (readable by
//!   any role, no pg_monitor or superuser needed); holds at the limit, resumes below half.
//!   And, unless switched off, while archiving is failing (its last failure is newer than
//!   its last success): every segment the backfill writes then stays on the primary's disk.
//! - **Dead tuples** (`dead_tuples`): the job's table's `n_dead_tup / (n_live_tup +
//!   n_dead_tup)`; holds at the limit, resumes below half of it (vacuum caught up).
//! - **A Prometheus query** (`prometheus`): a PromQL expression's value, judged like the
//!   throttle query (hold above, resume at or below; unreadable holds unless fail-open).
//! - **The job's throttle query** (`throttle_query`, as the global one): the job's
//!   `throttle_query` column, run as the job's role; holds above its `throttle_query_max`,
//!   resumes at or below it; a failing one holds unless `query_fail_open`.

use std::collections::VecDeque;
use std::time::Duration;

use crate::throttle::{QueryLimits, QueryReading, ThrottleReason};

/// The span the WAL rate is averaged over: long enough that one checkpoint's burst of
/// full-page images or one large commit does not trip it, short enough to catch a burst
/// within a few probe intervals.
pub const WAL_RATE_WINDOW: Duration = Duration::from_secs(1);

/// Tables smaller than this (live + dead rows) have no dead-tuple ratio worth judging.
pub const DEAD_TUPLES_MIN_ROWS: u64 = 1_000;

/// Limits of the signals of this module; `None` turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SignalLimits {
    /// Hold while the primary writes this many bytes of WAL per second or more.
    pub max_wal_bytes_per_second: Option<u64>,
    /// Hold while this many completed WAL segments or more await archiving.
    pub max_archive_pending_segments: Option<u64>,
    /// Hold while WAL archiving is failing.
    pub hold_while_archive_failing: bool,
    /// Hold while dead rows are this share of the job's table or more, in (0, 1].
    pub max_dead_tuple_ratio: Option<f64>,
    /// A job's throttle query that fails lets the job run instead of holding it.
    pub job_query_fail_open: bool,
    /// How to judge the Prometheus query's value.
    pub prometheus: QueryLimits,
}

/// Measures the WAL rate from successive WAL insert positions.
#[derive(Debug, Clone, Default)]
pub struct WalRateMeter {
    /// (time, WAL position) of recent readings, oldest first; the oldest is the newest one
    /// at least [`WAL_RATE_WINDOW`] old, once there is one.
    readings: VecDeque<(Duration, u64)>,
}

impl WalRateMeter {
    /// Records the WAL position `lsn` (bytes) read at `now` and returns the bytes per
    /// second since the reading about [`WAL_RATE_WINDOW`] ago (since the first one, early
    /// on); `None` until two readings apart in time exist. A position that went backwards
    /// (another primary after a failover) starts the measurement over.
    pub fn observe(&mut self, now: Duration, lsn: u64) -> Option<f64> {
        if self
            .readings
            .back()
            .is_some_and(|&(at, last)| lsn < last || now < at)
        {
            self.readings.clear();
        }
        self.readings.push_back((now, lsn));
        let horizon = now.saturating_sub(WAL_RATE_WINDOW);
        while self.readings.len() > 2 && self.readings[1].0 <= horizon {
            self.readings.pop_front();
        }
        let &(since, from) = self.readings.front()?;
        let span = now.saturating_sub(since);
        (!span.is_zero()).then(|| (lsn - from) as f64 / span.as_secs_f64())
    }
}

/// WAL archiving as the probe read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ArchiveStatus {
    /// Completed segments not archived yet; `None` when unknown (nothing archived yet).
    pub pending_segments: Option<u64>,
    /// The archiver's last failure is newer than its last success.
    pub failing: bool,
}

/// The segment number of a WAL file name (`TTTTTTTTXXXXXXXXYYYYYYYY`, hex; a `.partial`
/// suffix is ignored) for segments of `segment_size` bytes; `None` for anything else (a
/// timeline history file).
pub fn wal_segment_number(file_name: &str, segment_size: u64) -> Option<u64> {
    let name = file_name.strip_suffix(".partial").unwrap_or(file_name);
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) || segment_size == 0 {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let segments_per_log = 0x1_0000_0000 / segment_size;
    log.checked_mul(segments_per_log)?.checked_add(seg)
}

/// Completed segments between the last archived one and `current` (being written, so not
/// ready yet); `None` when either name is not a segment's.
pub fn archive_pending_segments(
    current: &str,
    last_archived: &str,
    segment_size: u64,
) -> Option<u64> {
    let current = wal_segment_number(current, segment_size)?;
    let archived = wal_segment_number(last_archived, segment_size)?;
    Some(current.saturating_sub(archived).saturating_sub(1))
}

/// A job's own throttle query's reading, with its threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct JobQuery {
    /// The job (or slice) it is for.
    pub job_id: i64,
    /// What it gave.
    pub reading: QueryReading,
    /// Hold while the value is above this.
    pub hold_above: f64,
}

/// The dead-tuple ratio of a running job's table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TableDeadTuples {
    /// The job (or slice) whose table it is.
    pub job_id: i64,
    /// `n_dead_tup / (n_live_tup + n_dead_tup)`.
    pub ratio: f64,
}

/// What the signals of this module read, for one job (see
/// [`crate::throttle::HealthSample::for_job`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SignalReadings {
    /// Bytes of WAL per second; `None` until measured.
    pub wal_bytes_per_second: Option<f64>,
    /// WAL archiving; `None` when archive_mode is off.
    pub archive: Option<ArchiveStatus>,
    /// The job's table's dead-tuple ratio; `None` when unknown or the table is small.
    pub dead_tuple_ratio: Option<f64>,
    /// The job's throttle query and its threshold; `None` when the job has none.
    pub job_query: Option<(QueryReading, f64)>,
    /// The Prometheus query's reading; `None` when none is configured.
    pub prometheus: Option<QueryReading>,
}

/// The hold latches of this module's signals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignalLatches {
    wal_rate: bool,
    archive_backlog: bool,
    dead_tuples: bool,
    job_query: bool,
    prometheus: bool,
}

impl SignalLatches {
    /// Updates every latch from `readings` and returns the reason to hold, if any (the
    /// most severe first: WAL piling up on the primary before its table's bloat).
    pub fn update(
        &mut self,
        limits: &SignalLimits,
        readings: &SignalReadings,
    ) -> Option<ThrottleReason> {
        let rate = readings.wal_bytes_per_second;
        self.wal_rate = latch(
            self.wal_rate,
            limits.max_wal_bytes_per_second.map(|l| l as f64),
            rate,
        );
        let pending = readings
            .archive
            .and_then(|a| a.pending_segments)
            .map(|p| p as f64);
        self.archive_backlog = latch(
            self.archive_backlog,
            limits.max_archive_pending_segments.map(|l| l as f64),
            pending,
        );
        self.dead_tuples = latch(
            self.dead_tuples,
            limits.max_dead_tuple_ratio,
            readings.dead_tuple_ratio,
        );
        self.job_query = match &readings.job_query {
            None => false,
            // One threshold: above it holds, at or below it runs.
            Some((QueryReading::Value(value), hold_above)) if !value.is_nan() => value > hold_above,
            Some(_) => !limits.job_query_fail_open,
        };
        let prometheus_limits = limits.prometheus;
        self.prometheus = match &readings.prometheus {
            None => false,
            Some(QueryReading::Value(value)) if !value.is_nan() => {
                if *value > prometheus_limits.hold_above {
                    true
                } else {
                    self.prometheus && *value > prometheus_limits.resume_at_or_below
                }
            }
            Some(_) => !prometheus_limits.fail_open,
        };
        let archive_failing =
            limits.hold_while_archive_failing && readings.archive.is_some_and(|a| a.failing);
        if self.wal_rate {
            Some(ThrottleReason::WalRate)
        } else if self.archive_backlog || archive_failing {
            Some(ThrottleReason::WalArchive)
        } else if self.prometheus {
            Some(ThrottleReason::Prometheus)
        } else if self.job_query {
            Some(ThrottleReason::ThrottleQuery)
        } else if self.dead_tuples {
            Some(ThrottleReason::DeadTuples)
        } else {
            None
        }
    }
}

/// Every signal of this module that holds on `readings` by itself, with no hold carried
/// over (what `backfilld plan` reports), most severe first.
pub fn holding_reasons(limits: &SignalLimits, readings: &SignalReadings) -> Vec<ThrottleReason> {
    let mut reasons = Vec::new();
    for (reason, alone) in [
        (
            ThrottleReason::WalRate,
            SignalReadings {
                wal_bytes_per_second: readings.wal_bytes_per_second,
                ..SignalReadings::default()
            },
        ),
        (
            ThrottleReason::WalArchive,
            SignalReadings {
                archive: readings.archive,
                ..SignalReadings::default()
            },
        ),
        (
            ThrottleReason::Prometheus,
            SignalReadings {
                prometheus: readings.prometheus.clone(),
                ..SignalReadings::default()
            },
        ),
        (
            ThrottleReason::ThrottleQuery,
            SignalReadings {
                job_query: readings.job_query.clone(),
                ..SignalReadings::default()
            },
        ),
        (
            ThrottleReason::DeadTuples,
            SignalReadings {
                dead_tuple_ratio: readings.dead_tuple_ratio,
                ..SignalReadings::default()
            },
        ),
    ] {
        if SignalLatches::default().update(limits, &alone) == Some(reason) {
            reasons.push(reason);
        }
    }
    reasons
}

/// A hold latch: trips at or above `limit`, releases below half of it; off (`None` limit)
/// or unread (`None` value) releases.
fn latch(holding: bool, limit: Option<f64>, value: Option<f64>) -> bool {
    match (limit, value) {
        (Some(limit), Some(value)) if value >= limit => true,
        (Some(limit), Some(value)) if holding => value * 2.0 >= limit,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn the_wal_rate_is_averaged_over_about_a_second() {
        let mut meter = WalRateMeter::default();
        assert_eq!(meter.observe(s(0), 1_000), None);
        // 1 MB in 250 ms.
        assert_eq!(meter.observe(s(250), 1_001_000), Some(4_000_000.0));
        assert_eq!(meter.observe(s(500), 1_001_000), Some(2_000_000.0));
        assert_eq!(meter.observe(s(1_000), 1_001_000), Some(1_000_000.0));
        // The burst leaves the window once a reading a second old is past it.
        assert_eq!(meter.observe(s(1_250), 1_001_000), Some(0.0));
        assert_eq!(meter.observe(s(1_500), 1_501_000), Some(500_000.0));
    }

    #[test]
    fn a_wal_position_going_backwards_starts_over() {
        let mut meter = WalRateMeter::default();
        meter.observe(s(0), 5_000_000);
        assert_eq!(meter.observe(s(250), 1_000), None);
        assert_eq!(meter.observe(s(500), 251_000), Some(1_000_000.0));
    }

    #[test]
    fn wal_segment_numbers_follow_the_file_names() {
        let mb16 = 16 * 1024 * 1024;
        assert_eq!(
            wal_segment_number("000000010000000000000003", mb16),
            Some(3)
        );
        // 256 segments of 16 MiB per "log".
        assert_eq!(
            wal_segment_number("0000000100000002000000FF", mb16),
            Some(2 * 256 + 255)
        );
        assert_eq!(
            wal_segment_number("000000020000000000000005.partial", mb16),
            Some(5)
        );
        assert_eq!(
            wal_segment_number("000000010000000100000000", 1 << 30),
            Some(4)
        );
        assert_eq!(wal_segment_number("00000002.history", mb16), None);
        assert_eq!(wal_segment_number("00000001000000000000000G", mb16), None);
        assert_eq!(
            archive_pending_segments("000000010000000100000002", "0000000100000000000000FE", mb16),
            Some(3)
        );
        // The segment being written is not ready yet; nothing archived ahead of it.
        assert_eq!(
            archive_pending_segments("000000010000000000000003", "000000010000000000000002", mb16),
            Some(0)
        );
        assert_eq!(
            archive_pending_segments("000000010000000000000003", "000000010000000000000009", mb16),
            Some(0)
        );
    }

    fn limits() -> SignalLimits {
        SignalLimits {
            max_wal_bytes_per_second: Some(1_000),
            max_archive_pending_segments: Some(10),
            hold_while_archive_failing: true,
            max_dead_tuple_ratio: Some(0.4),
            job_query_fail_open: false,
            prometheus: QueryLimits {
                hold_above: 0.5,
                resume_at_or_below: 0.25,
                fail_open: false,
            },
        }
    }

    #[test]
    fn prometheus_holds_above_its_threshold_until_at_or_below_resume_and_when_unreadable() {
        let mut latches = SignalLatches::default();
        let prometheus = |reading: QueryReading| SignalReadings {
            prometheus: Some(reading),
            ..SignalReadings::default()
        };
        let value = |v: f64| prometheus(QueryReading::Value(v));
        assert_eq!(latches.update(&limits(), &value(0.5)), None);
        assert_eq!(
            latches.update(&limits(), &value(0.51)),
            Some(ThrottleReason::Prometheus)
        );
        assert_eq!(
            latches.update(&limits(), &value(0.3)),
            Some(ThrottleReason::Prometheus)
        );
        assert_eq!(latches.update(&limits(), &value(0.25)), None);
        let unreachable = prometheus(QueryReading::Failed("connection refused".into()));
        assert_eq!(
            latches.update(&limits(), &unreachable),
            Some(ThrottleReason::Prometheus)
        );
        let mut open = limits();
        open.prometheus.fail_open = true;
        assert_eq!(latches.update(&open, &unreachable), None);
    }

    #[test]
    fn the_wal_rate_holds_at_its_limit_until_below_half() {
        let mut latches = SignalLatches::default();
        let rate = |r: f64| SignalReadings {
            wal_bytes_per_second: Some(r),
            ..SignalReadings::default()
        };
        assert_eq!(latches.update(&limits(), &rate(999.0)), None);
        assert_eq!(
            latches.update(&limits(), &rate(1_000.0)),
            Some(ThrottleReason::WalRate)
        );
        assert_eq!(
            latches.update(&limits(), &rate(500.0)),
            Some(ThrottleReason::WalRate)
        );
        assert_eq!(latches.update(&limits(), &rate(499.0)), None);
        // Off: never holds.
        let off = SignalLimits {
            max_wal_bytes_per_second: None,
            ..limits()
        };
        assert_eq!(latches.update(&off, &rate(1e12)), None);
    }

    #[test]
    fn archiving_holds_on_a_backlog_until_below_half_and_while_failing() {
        let mut latches = SignalLatches::default();
        let archive = |pending: Option<u64>, failing: bool| SignalReadings {
            archive: Some(ArchiveStatus {
                pending_segments: pending,
                failing,
            }),
            ..SignalReadings::default()
        };
        assert_eq!(latches.update(&limits(), &archive(Some(9), false)), None);
        assert_eq!(
            latches.update(&limits(), &archive(Some(10), false)),
            Some(ThrottleReason::WalArchive)
        );
        assert_eq!(
            latches.update(&limits(), &archive(Some(5), false)),
            Some(ThrottleReason::WalArchive)
        );
        assert_eq!(latches.update(&limits(), &archive(Some(4), false)), None);
        assert_eq!(
            latches.update(&limits(), &archive(None, true)),
            Some(ThrottleReason::WalArchive)
        );
        let tolerant = SignalLimits {
            hold_while_archive_failing: false,
            ..limits()
        };
        assert_eq!(latches.update(&tolerant, &archive(Some(1), true)), None);
    }

    #[test]
    fn dead_tuples_hold_until_below_half_the_limit() {
        let mut latches = SignalLatches::default();
        let dead = |ratio: f64| SignalReadings {
            dead_tuple_ratio: Some(ratio),
            ..SignalReadings::default()
        };
        assert_eq!(
            latches.update(&limits(), &dead(0.4)),
            Some(ThrottleReason::DeadTuples)
        );
        assert_eq!(
            latches.update(&limits(), &dead(0.2)),
            Some(ThrottleReason::DeadTuples)
        );
        assert_eq!(latches.update(&limits(), &dead(0.19)), None);
    }

    #[test]
    fn a_jobs_query_holds_above_its_threshold_and_when_it_fails() {
        let mut latches = SignalLatches::default();
        let query = |reading: QueryReading, max: f64| SignalReadings {
            job_query: Some((reading, max)),
            ..SignalReadings::default()
        };
        assert_eq!(
            latches.update(&limits(), &query(QueryReading::Value(1.0), 0.0)),
            Some(ThrottleReason::ThrottleQuery)
        );
        assert_eq!(
            latches.update(&limits(), &query(QueryReading::Value(5.0), 5.0)),
            None
        );
        let failed = query(QueryReading::Failed("boom".into()), 0.0);
        assert_eq!(
            latches.update(&limits(), &failed),
            Some(ThrottleReason::ThrottleQuery)
        );
        let open = SignalLimits {
            job_query_fail_open: true,
            ..limits()
        };
        assert_eq!(latches.update(&open, &failed), None);
    }

    #[test]
    fn the_wal_rate_outranks_the_archive_and_the_query() {
        let mut latches = SignalLatches::default();
        let all = SignalReadings {
            wal_bytes_per_second: Some(2_000.0),
            archive: Some(ArchiveStatus {
                pending_segments: Some(20),
                failing: true,
            }),
            dead_tuple_ratio: Some(0.9),
            job_query: Some((QueryReading::Value(1.0), 0.0)),
            prometheus: Some(QueryReading::Value(1.0)),
        };
        assert_eq!(
            latches.update(&limits(), &all),
            Some(ThrottleReason::WalRate)
        );
    }
}
