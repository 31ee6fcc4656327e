//! The primary's signals, read on one connection (see the module docs of [`super`]).

use backfill_core::queue_sql;
use backfill_core::signals::{
    archive_pending_segments, ArchiveStatus, TableDeadTuples, DEAD_TUPLES_MIN_ROWS,
};
use backfill_core::throttle::{
    BlockingBackend, HealthSample, OperatorThrottle, QueryReading, ReplicaLag, SlotRetention,
    TableVacuum,
};
use std::sync::PoisonError;

use super::job_queries::{read_query_value, JobQuerySpec};
use super::lag::{combine_lag, missing_standbys, seconds};
use super::HealthProbe;
use crate::pool::error_chain;

/// Lag of every standby streaming from the primary. `state` filters out standbys that are
/// still starting or taking a base backup: those have no meaningful positions yet.
const PRIMARY_LAG_SQL: &str = "SELECT application_name, \
        extract(epoch FROM replay_lag)::float8, \
        greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::float8 \
   FROM pg_stat_replication \
  WHERE state IN ('streaming', 'catchup')";

/// Sessions waiting on a lock that one of our sessions holds, and the longest such wait:
/// per backend of ours that blocks someone, then (blocker NULL) for all of ours together.
///
/// Our sessions are recognised by application_name, which pg_stat_activity truncates to
/// `max_identifier_length` bytes (the name is ASCII: PostgreSQL replaces anything else).
/// Waiters that are backfilld's own (`backfilld%`: this daemon's control sessions, whose
/// heartbeat and lease writes on `backfill.jobs` queue behind the commit of our batch's
/// checkpoint, and other workers' batches) are not production: counting them made the
/// daemon cancel its own batches (issue 19).
/// The wait is counted from the start of the waiting statement: never shorter than the
/// lock wait itself, so we may cancel a little early, never late.
const BLOCKED_BY_US_SQL: &str = "WITH ours AS ( \
        SELECT pid FROM pg_stat_activity \
         WHERE application_name = left($1, current_setting('max_identifier_length')::int)), \
     waits AS ( \
        SELECT a.pid AS waiter, blocker, \
               extract(epoch FROM clock_timestamp() - coalesce(a.query_start, a.state_change))::float8 AS waited \
          FROM pg_stat_activity a CROSS JOIN LATERAL unnest(pg_blocking_pids(a.pid)) AS blocker \
         WHERE a.wait_event_type = 'Lock' \
           AND a.pid NOT IN (SELECT pid FROM ours) \
           AND a.application_name NOT LIKE 'backfilld%' \
           AND blocker IN (SELECT pid FROM ours)) \
     SELECT blocker, count(DISTINCT waiter)::int8, max(waited) FROM waits GROUP BY blocker \
     UNION ALL \
     SELECT NULL, count(DISTINCT waiter)::int8, coalesce(max(waited), 0) FROM waits";

/// Client sessions not of backfilld (any of our workers) that were active at any moment of
/// the last `$1` seconds: running now, or changed state since (a transaction that began
/// and ended between two probes). What the throttle shares the primary with; see
/// [`backfill_core::activity`]. Without pg_read_all_stats other roles' sessions show no
/// state and are not seen.
const PRODUCTION_SESSIONS_SQL: &str = concat!(
    "SELECT count(*)::int8 FROM pg_stat_activity WHERE ",
    production_sessions!(),
    " AND (state = 'active' OR state_change > clock_timestamp() - make_interval(secs => $1))"
);

/// WAL each replication slot keeps from being recycled (see the module docs).
const SLOTS_SQL: &str = "SELECT slot_name::text, \
        greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::float8 \
   FROM pg_replication_slots \
  WHERE restart_lsn IS NOT NULL AND wal_status IS DISTINCT FROM 'lost'";

/// The WAL insert position, in bytes from the start of WAL.
const WAL_POSITION_SQL: &str = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::float8";

/// WAL archiving: on at all, the last archived file, the segment being written, the
/// segment size, and whether the last attempt failed (see the module docs).
const ARCHIVER_SQL: &str = "SELECT current_setting('archive_mode') <> 'off', \
        a.last_archived_wal, pg_walfile_name(pg_current_wal_lsn()), \
        (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size'), \
        coalesce(a.last_failed_time > coalesce(a.last_archived_time, '-infinity'), false) \
   FROM pg_stat_archiver a";

impl HealthProbe {
    pub(super) async fn sample_primary(&self) -> Result<(HealthSample, Vec<JobQuerySpec>), String> {
        let mut client = self
            .primary
            .get()
            .await
            .map_err(|e| format!("getting a connection: {}", error_chain(&e)))?;
        let rows = client
            .query(PRIMARY_LAG_SQL, &[])
            .await
            .map_err(|e| format!("reading pg_stat_replication: {e}"))?;
        let mut sample = HealthSample::default();
        for row in rows {
            let name: String = row.get(0);
            let (lag, lag_bytes) = combine_lag(row.get(1), row.get(2));
            sample.replicas.push(ReplicaLag::new(name, lag, lag_bytes));
        }
        sample.missing_standbys = missing_standbys(&self.expected_standbys, &sample.replicas);
        let blocked = client
            .query(BLOCKED_BY_US_SQL, &[&self.our_application_name])
            .await
            .map_err(|e| format!("reading sessions blocked by ours: {e}"))?;
        for row in blocked {
            let blocker: Option<i32> = row.get(0);
            let sessions = u32::try_from(row.get::<_, i64>(1)).unwrap_or(u32::MAX);
            let longest = seconds(row.get(2));
            match blocker {
                Some(pid) => sample.blocking_backends.push(BlockingBackend {
                    pid,
                    sessions,
                    longest,
                }),
                None => {
                    sample.sessions_blocked_by_us = sessions;
                    sample.longest_block = longest;
                }
            }
        }
        if let Some(window) = self.activity_window {
            let production = client
                .query_one(PRODUCTION_SESSIONS_SQL, &[&window.as_secs_f64()])
                .await
                .map_err(|e| format!("counting production sessions: {e}"))?;
            sample.production_sessions =
                u32::try_from(production.get::<_, i64>(0)).unwrap_or(u32::MAX);
        }
        if self.signals.slots {
            let slots = client
                .query(SLOTS_SQL, &[])
                .await
                .map_err(|e| format!("reading pg_replication_slots: {e}"))?;
            sample.slots = slots
                .iter()
                .map(|row| SlotRetention {
                    name: row.get(0),
                    // float8 → u64 saturates; greatest(…, 0) ruled out negatives.
                    retained_bytes: row.get::<_, f64>(1) as u64,
                })
                .collect();
        }
        if self.signals.operator_throttles {
            let throttles = client
                .query(queue_sql::OPERATOR_THROTTLES, &[&self.signals.also_job])
                .await
                .map_err(|e| format!("reading backfill.throttles: {e}"))?;
            sample.operator_throttles = throttles
                .iter()
                .map(|row| OperatorThrottle {
                    job_id: row.get(0),
                    ratio: row.get(1),
                })
                .collect();
            // Read with the operator throttles: both need the queue, whose jobs they name.
            let vacuums = client
                .query(queue_sql::VACUUMS_ON_JOB_TABLES, &[&self.signals.also_job])
                .await
                .map_err(|e| format!("reading pg_stat_progress_vacuum: {e}"))?;
            sample.vacuums = vacuums
                .iter()
                .map(|row| TableVacuum {
                    job_id: row.get(0),
                    wraparound: row.get(1),
                })
                .collect();
        }
        let job_queries = self.sample_more_signals(&mut client, &mut sample).await?;
        if let Some(query) = &self.signals.throttle_query {
            let reading = match client.simple_query(query).await {
                Ok(messages) => read_query_value(&messages),
                Err(e) => Err(format!("throttle.query failed: {}", error_chain(&e))),
            };
            sample.throttle_query = Some(match reading {
                Ok(value) => {
                    self.failing.ok("throttle.query");
                    QueryReading::Value(value)
                }
                Err(error) => {
                    self.failing.failed("throttle.query", &error);
                    QueryReading::Failed(error)
                }
            });
        }
        Ok((sample, job_queries))
    }

    /// The WAL rate, archiving, dead tuples and jobs' own throttle queries (see the
    /// module docs).
    pub(super) async fn sample_more_signals(
        &self,
        client: &mut deadpool_postgres::Client,
        sample: &mut HealthSample,
    ) -> Result<Vec<JobQuerySpec>, String> {
        if self.signals.wal_rate {
            let position: f64 = client
                .query_one(WAL_POSITION_SQL, &[])
                .await
                .map_err(|e| format!("reading the WAL position: {e}"))?
                .get(0);
            let mut meter = self.wal_rate.lock().unwrap_or_else(PoisonError::into_inner);
            let now = meter.0.elapsed();
            // float8 → u64 saturates; positions are never negative.
            sample.wal_bytes_per_second = meter.1.observe(now, position as u64);
        }
        if self.signals.archive {
            let row = client
                .query_one(ARCHIVER_SQL, &[])
                .await
                .map_err(|e| format!("reading pg_stat_archiver: {e}"))?;
            let archiving: bool = row.get(0);
            let last_archived: Option<String> = row.get(1);
            let (current, segment_size): (String, i64) = (row.get(2), row.get(3));
            sample.archive = archiving.then(|| ArchiveStatus {
                pending_segments: last_archived.and_then(|last| {
                    archive_pending_segments(&current, &last, segment_size.unsigned_abs())
                }),
                failing: row.get(4),
            });
        }
        if self.signals.dead_tuples {
            let min_rows = i64::try_from(DEAD_TUPLES_MIN_ROWS).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    queue_sql::DEAD_TUPLES_OF_JOB_TABLES,
                    &[&min_rows, &self.signals.also_job],
                )
                .await
                .map_err(|e| format!("reading pg_stat_all_tables: {e}"))?;
            sample.dead_tuples = rows
                .iter()
                .map(|row| TableDeadTuples {
                    job_id: row.get(0),
                    ratio: row.get(1),
                })
                .collect();
        }
        let mut job_queries = Vec::new();
        if self.signals.job_queries {
            let jobs = client
                .query(queue_sql::JOB_THROTTLE_QUERIES, &[&self.signals.also_job])
                .await
                .map_err(|e| format!("reading jobs' throttle queries: {e}"))?;
            job_queries = jobs
                .iter()
                .map(|job| JobQuerySpec {
                    job_id: job.get(0),
                    query: job.get(1),
                    hold_above: job.get(2),
                    role: job.get(3),
                    search_path: job.get(4),
                })
                .collect();
        }
        Ok(job_queries)
    }
}
