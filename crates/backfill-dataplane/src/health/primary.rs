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
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::job_queries::{read_query_value, JobQuerySpec};
use super::lag::{combine_lag, missing_standbys, seconds};
use super::{query_prepared, HealthProbe};
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
        pg_size_bytes(current_setting('wal_segment_size')), \
        coalesce(a.last_failed_time > coalesce(a.last_archived_time, '-infinity'), false) \
   FROM pg_stat_archiver a";

impl HealthProbe {
    /// One sample of the primary. Every query is sent at once (tokio-postgres pipelines
    /// the statements of futures polled together), each prepared once per connection:
    /// parsing and planning them every sample cost the primary more than running them, and
    /// one after the other they were a round trip each.
    pub(super) async fn sample_primary(&self) -> Result<(HealthSample, Vec<JobQuerySpec>), String> {
        let client = self
            .primary
            .get()
            .await
            .map_err(|e| format!("getting a connection: {}", error_chain(&e)))?;
        let client = &client;
        let signals = &self.signals;
        let window = self.activity_window.unwrap_or_default().as_secs_f64();
        let min_dead_rows = i64::try_from(DEAD_TUPLES_MIN_ROWS).unwrap_or(i64::MAX);
        let ours: [&(dyn ToSql + Sync); 1] = [&self.our_application_name];
        let within: [&(dyn ToSql + Sync); 1] = [&window];
        let by_job: [&(dyn ToSql + Sync); 1] = [&signals.also_job];
        let dead_tuples_params: [&(dyn ToSql + Sync); 2] = [&min_dead_rows, &signals.also_job];
        let throttle_query = async {
            match &signals.throttle_query {
                Some(query) => Some(client.simple_query(query).await),
                None => None,
            }
        };
        let (
            lag,
            blocked,
            production,
            slots,
            throttles,
            vacuums,
            wal_position,
            archiver,
            dead_tuples,
            job_queries,
            throttle_query,
        ) = tokio::join!(
            read(
                client,
                true,
                PRIMARY_LAG_SQL,
                &[],
                "reading pg_stat_replication"
            ),
            read(
                client,
                true,
                BLOCKED_BY_US_SQL,
                &ours,
                "reading sessions blocked by ours"
            ),
            read(
                client,
                self.activity_window.is_some(),
                PRODUCTION_SESSIONS_SQL,
                &within,
                "counting production sessions"
            ),
            read(
                client,
                signals.slots,
                SLOTS_SQL,
                &[],
                "reading pg_replication_slots"
            ),
            // The vacuums are read with the operator throttles: both need the queue,
            // whose jobs they name.
            read(
                client,
                signals.operator_throttles,
                queue_sql::OPERATOR_THROTTLES,
                &by_job,
                "reading backfill.throttles"
            ),
            read(
                client,
                signals.operator_throttles,
                queue_sql::VACUUMS_ON_JOB_TABLES,
                &by_job,
                "reading pg_stat_progress_vacuum"
            ),
            read(
                client,
                signals.wal_rate,
                WAL_POSITION_SQL,
                &[],
                "reading the WAL position"
            ),
            read(
                client,
                signals.archive,
                ARCHIVER_SQL,
                &[],
                "reading pg_stat_archiver"
            ),
            read(
                client,
                signals.dead_tuples,
                queue_sql::DEAD_TUPLES_OF_JOB_TABLES,
                &dead_tuples_params,
                "reading pg_stat_all_tables"
            ),
            read(
                client,
                signals.job_queries,
                queue_sql::JOB_THROTTLE_QUERIES,
                &by_job,
                "reading jobs' throttle queries"
            ),
            throttle_query,
        );
        let mut sample = HealthSample::default();
        for row in lag? {
            let name: String = row.get(0);
            let (lag, lag_bytes) = combine_lag(row.get(1), row.get(2));
            sample.replicas.push(ReplicaLag::new(name, lag, lag_bytes));
        }
        sample.missing_standbys = missing_standbys(&self.expected_standbys, &sample.replicas);
        for row in blocked? {
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
        if let Some(production) = production?.first() {
            sample.production_sessions =
                u32::try_from(production.get::<_, i64>(0)).unwrap_or(u32::MAX);
        }
        sample.slots = slots?
            .iter()
            .map(|row| SlotRetention {
                name: row.get(0),
                // float8 → u64 saturates; greatest(…, 0) ruled out negatives.
                retained_bytes: row.get::<_, f64>(1) as u64,
            })
            .collect();
        sample.operator_throttles = throttles?
            .iter()
            .map(|row| OperatorThrottle {
                job_id: row.get(0),
                ratio: row.get(1),
            })
            .collect();
        sample.vacuums = vacuums?
            .iter()
            .map(|row| TableVacuum {
                job_id: row.get(0),
                wraparound: row.get(1),
            })
            .collect();
        if let Some(position) = wal_position?.first() {
            let position: f64 = position.get(0);
            let mut meter = self.wal_rate.lock().unwrap_or_else(PoisonError::into_inner);
            let now = meter.0.elapsed();
            // float8 → u64 saturates; positions are never negative.
            sample.wal_bytes_per_second = meter.1.observe(now, position as u64);
        }
        if let Some(row) = archiver?.first() {
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
        sample.dead_tuples = dead_tuples?
            .iter()
            .map(|row| TableDeadTuples {
                job_id: row.get(0),
                ratio: row.get(1),
            })
            .collect();
        let job_queries = job_queries?
            .iter()
            .map(|job| JobQuerySpec {
                job_id: job.get(0),
                query: job.get(1),
                hold_above: job.get(2),
                role: job.get(3),
                search_path: job.get(4),
            })
            .collect();
        if let Some(reading) = throttle_query {
            let reading = reading
                .map_err(|e| format!("throttle.query failed: {}", error_chain(&e)))
                .and_then(|messages| read_query_value(&messages));
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
}

/// The rows of `sql`, prepared once per connection, when the signal it reads is `wanted`
/// (none otherwise); an error names what was being read. A statement that failed is
/// prepared afresh next time: a cached one can go stale (a newer daemon migrating the
/// queue's tables under it).
async fn read(
    client: &deadpool_postgres::Client,
    wanted: bool,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    reading: &str,
) -> Result<Vec<Row>, String> {
    if !wanted {
        return Ok(Vec::new());
    }
    query_prepared(client, sql, params)
        .await
        .map_err(|e| format!("{reading}: {}", error_chain(&e)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pg_testkit::PgCluster;

    use super::super::{HealthProbe, Signals};
    use crate::pool::{connect_pool, SessionSettings};

    /// The probe's statements are prepared once per connection, so a change of the queue's
    /// tables under a running daemon (a newer one migrating them) makes a cached statement
    /// stale: PostgreSQL refuses it ("cached plan must not change result type"). That
    /// sample fails, as any failed read does; the next one prepares the statement afresh
    /// and the probe sees again, rather than holding every job for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_statement_gone_stale_under_the_probe_is_prepared_afresh() {
        let cluster = PgCluster::start_primary().expect("start a primary");
        let url = cluster.url("postgres");
        let pool = connect_pool(&url, &SessionSettings::default()).expect("pool");
        let admin = pool.get().await.expect("a session");
        // Only the columns the jobs' throttle-query read names.
        admin
            .batch_execute(
                "CREATE SCHEMA backfill; \
                 CREATE TABLE backfill.jobs (id int8 PRIMARY KEY, parent_id int8, state text, \
                     throttle_query text, throttle_query_max float8, enqueued_by name, \
                     search_path text); \
                 INSERT INTO backfill.jobs VALUES \
                     (1, NULL, 'running', 'SELECT 0', 1, current_user, NULL)",
            )
            .await
            .expect("a queue table");
        let probe = HealthProbe::new(
            pool.clone(),
            Vec::new(),
            Vec::new(),
            "backfilld-test".into(),
            Duration::from_secs(5),
            None,
        )
        .with_signals(Signals {
            job_queries: true,
            ..Signals::default()
        });
        let read_jobs = |round: &str| {
            let probe = &probe;
            let round = round.to_owned();
            async move {
                let (sample, jobs) = probe.sample_primary().await.unwrap_or_else(|e| {
                    panic!("{round}: the probe failed: {e}");
                });
                assert!(!sample.probe_failed, "{round}");
                assert_eq!(jobs.len(), 1, "{round}: the running job's throttle query");
                assert_eq!(jobs[0].query, "SELECT 0", "{round}");
            }
        };
        read_jobs("before the change").await;
        admin
            .batch_execute("ALTER TABLE backfill.jobs ALTER COLUMN throttle_query TYPE varchar")
            .await
            .expect("change the column's type");
        let Err(stale) = probe.sample_primary().await else {
            panic!("the cached statement's result type changed under it, yet it ran");
        };
        assert!(
            stale.contains("reading jobs' throttle queries")
                && stale.contains("cached plan must not change result type"),
            "the error names the read and the server's reason: {stale}"
        );
        read_jobs("after the failed sample").await;
        read_jobs("once more").await;
    }
}
