//! Health probes: replication lag of every standby and the lock trouble our
//! sessions cause, sampled on their own connection with a timeout each.
//!
//! # Replication lag, measured on the primary
//!
//! `pg_stat_replication` gives two readings per physical standby, and neither is right
//! on its own:
//!
//! - `replay_lag` (time) comes from the standby's feedback messages (every
//!   `wal_receiver_status_interval`), so it trails reality by up to one interval, and once
//!   the standby has replayed everything on an idle primary it keeps showing the last
//!   measured value for one interval and then goes NULL.
//! - `pg_current_wal_lsn() - replay_lsn` (bytes) is exact about what is left to replay as
//!   of the standby's last report, and grows the moment we write WAL, before `replay_lag`
//!   notices anything.
//!
//! So a standby with zero bytes outstanding is caught up, 0 s behind whatever `replay_lag`
//! still says (idle periods read right), and one with bytes outstanding is judged on both
//! readings, the controller holding when either is over its limit (busy periods read
//! right). A standby that reports neither is passed on as unmeasured, which the controller
//! treats as over the limit.
//!
//! # Replicas probed directly
//!
//! `throttle.replica_urls` name physical standbys the primary cannot see (cascaded ones).
//! On a standby, bytes are WAL received but not replayed, and time is the age of the last
//! replayed commit while anything is left to replay; WAL the standby has not received yet
//! (a broken upstream) is invisible from there, which is why the primary's view comes
//! first. An unreachable replica, or one that is not in recovery, counts as missing.
//!
//! # More signals, read on the primary with the same connection
//!
//! - WAL retained by every replication slot, physical and logical, active or not
//!   (`pg_replication_slots`): a CDC consumer that stops reading lags here, not in
//!   `pg_stat_replication`. Slots already `lost` keep nothing any more and are skipped.
//! - Operator throttles (`backfill.throttles`, set by `backfill.throttle`), matched to the
//!   running jobs and slices in the database: the worker reads only its own job's ratio.
//!
//! - Vacuums working on a running job's table (`pg_stat_progress_vacuum`, manual or auto),
//!   marked when they prevent wraparound (autovacuum says so in its query text).
//! - The operator's throttle query, run as is (simple protocol: its one value arrives as
//!   text, so any numeric type or a boolean reads the same).
//!
//! - The WAL rate: the WAL insert position each sample, turned into bytes per second
//!   over about a second ([`WalRateMeter`]).
//! - WAL archiving (`pg_stat_archiver`, readable by any role): whether the archiver's last
//!   failure is newer than its last success, and how many completed segments lie between
//!   the last archived one and the one being written (`pg_ls_archive_statusdir()` would
//!   count `.ready` files exactly but needs pg_monitor or a superuser; the names need
//!   nothing and agree with it except while a segment is being switched).
//! - The dead-tuple ratio of running jobs' tables (`pg_stat_all_tables`).
//! - The operator's Prometheus query ([`PrometheusQuery`]), read at the same time as the
//!   primary; unreadable, it is a reading of its own that holds unless
//!   `throttle.prometheus_fail_open`.
//! - Running jobs' own throttle queries (`backfill.jobs.throttle_query`, a slice using
//!   its parent's), each run as the job's role with its search_path in a read-only
//!   transaction that is rolled back, within `probe_timeout`, after the primary's sample
//!   and on a connection of their own: a slow one holds its job, not the probe.
//!
//! Any of them but the throttle queries failing fails the whole sample (`probe_failed`),
//! which holds: not knowing is not healthy. A throttle query's failure is its own
//! reading, which holds unless `throttle.query_fail_open`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use backfill_core::signals::{
    archive_pending_segments, ArchiveStatus, JobQuery, TableDeadTuples, WalRateMeter,
    DEAD_TUPLES_MIN_ROWS,
};
use backfill_core::throttle::{
    BlockingBackend, HealthSample, OperatorThrottle, QueryReading, ReplicaLag, SlotRetention,
    TableVacuum,
};
use deadpool_postgres::Pool;
use futures::future::join_all;
use tokio_postgres::SimpleQueryMessage;

use crate::pool::error_chain;
use crate::PrometheusQuery;

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
const PRODUCTION_SESSIONS_SQL: &str = "SELECT count(*)::int8 FROM pg_stat_activity \
  WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
    AND application_name NOT LIKE 'backfilld%' \
    AND (state = 'active' OR state_change > clock_timestamp() - make_interval(secs => $1))";

/// WAL each replication slot keeps from being recycled (see the module docs).
const SLOTS_SQL: &str = "SELECT slot_name::text, \
        greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::float8 \
   FROM pg_replication_slots \
  WHERE restart_lsn IS NOT NULL AND wal_status IS DISTINCT FROM 'lost'";

/// The tightest operator throttle in force on each running job or slice; a slice matches
/// through its parent's name too.
const OPERATOR_THROTTLES_SQL: &str = "SELECT j.id, min(t.ratio)::float8 \
   FROM backfill.throttles t \
   JOIN backfill.jobs j ON (j.state = 'running' OR j.id = $1) \
   LEFT JOIN backfill.jobs p ON p.id = j.parent_id \
  WHERE t.expires_at > now() AND (j.name LIKE t.job_pattern OR p.name LIKE t.job_pattern) \
  GROUP BY j.id";

/// Vacuums at work on running jobs' tables in this database; the table name resolves with
/// the probe's search_path, which is why jobs name it schema-qualified.
const VACUUMS_SQL: &str = "SELECT j.id, \
        bool_or(coalesce(a.query, '') LIKE '%(to prevent wraparound)%') \
   FROM pg_stat_progress_vacuum v \
   JOIN backfill.jobs j ON (j.state = 'running' OR j.id = $1) AND v.relid = to_regclass(j.table_name) \
   LEFT JOIN pg_stat_activity a ON a.pid = v.pid \
  WHERE v.datname = current_database() \
  GROUP BY j.id";

/// The WAL insert position, in bytes from the start of WAL.
const WAL_POSITION_SQL: &str = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::float8";

/// WAL archiving: on at all, the last archived file, the segment being written, the
/// segment size, and whether the last attempt failed (see the module docs).
const ARCHIVER_SQL: &str = "SELECT current_setting('archive_mode') <> 'off', \
        a.last_archived_wal, pg_walfile_name(pg_current_wal_lsn()), \
        (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size'), \
        coalesce(a.last_failed_time > coalesce(a.last_archived_time, '-infinity'), false) \
   FROM pg_stat_archiver a";

/// Dead-tuple ratio of running jobs' tables big enough to judge.
const DEAD_TUPLES_SQL: &str = "SELECT j.id, s.n_dead_tup::float8 / (s.n_live_tup + s.n_dead_tup) \
   FROM backfill.jobs j \
   JOIN pg_stat_all_tables s ON s.relid = to_regclass(j.table_name) \
  WHERE (j.state = 'running' OR j.id = $2) AND s.n_live_tup + s.n_dead_tup >= $1";

/// Running jobs' own throttle queries (a slice's from its parent), with who they run as.
const JOB_QUERIES_SQL: &str = "SELECT j.id, coalesce(p.throttle_query, j.throttle_query), \
        coalesce(p.throttle_query_max, j.throttle_query_max), j.enqueued_by::text, \
        coalesce(j.search_path, '') \
   FROM backfill.jobs j LEFT JOIN backfill.jobs p ON p.id = j.parent_id \
  WHERE (j.state = 'running' OR j.id = $1) \
    AND coalesce(p.throttle_query, j.throttle_query) IS NOT NULL";

/// Lag as a standby sees it itself (see the module docs).
const REPLICA_LAG_SQL: &str = "SELECT pg_is_in_recovery(), \
        CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
             ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END::float8, \
        greatest(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::float8";

/// Samples the signals the throttle controller runs on.
#[derive(Clone)]
pub struct HealthProbe {
    primary: Pool,
    replicas: Vec<(String, Pool)>,
    expected_standbys: Vec<String>,
    our_application_name: String,
    timeout: Duration,
    activity_window: Option<Duration>,
    signals: Signals,
    failing: FailureLog,
    wal_rate: Arc<Mutex<(Instant, WalRateMeter)>>,
}

/// Which of the optional primary signals the probe reads (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// WAL retained by replication slots.
    pub slots: bool,
    /// Operator throttles from `backfill.throttles`, and vacuums on running jobs' tables.
    pub operator_throttles: bool,
    /// The operator's throttle query (`throttle.query`), if any.
    pub throttle_query: Option<String>,
    /// The primary's WAL rate.
    pub wal_rate: bool,
    /// WAL archiving.
    pub archive: bool,
    /// Dead-tuple ratio of running jobs' tables.
    pub dead_tuples: bool,
    /// Running jobs' own throttle queries.
    pub job_queries: bool,
    /// A job read as if it were running, whatever its state (`backfilld plan`); 0: none.
    pub also_job: i64,
    /// The operator's Prometheus query, read alongside the primary.
    pub prometheus: Option<PrometheusQuery>,
}

impl HealthProbe {
    /// A probe on the primary's pool; `replicas` are probed directly by name;
    /// `expected_standbys` must appear in `pg_stat_replication` or count as missing;
    /// production sessions count when active within the last `activity_window` (the
    /// interval between two samples; `None`: not counted, sharing the primary is off).
    pub fn new(
        primary: Pool,
        replicas: Vec<(String, Pool)>,
        expected_standbys: Vec<String>,
        our_application_name: String,
        timeout: Duration,
        activity_window: Option<Duration>,
    ) -> Self {
        HealthProbe {
            primary,
            replicas,
            expected_standbys,
            our_application_name,
            timeout,
            activity_window,
            signals: Signals::default(),
            failing: FailureLog::default(),
            wal_rate: Arc::new(Mutex::new((Instant::now(), WalRateMeter::default()))),
        }
    }

    /// The same probe, also reading the optional `signals`.
    pub fn with_signals(self, signals: Signals) -> Self {
        HealthProbe { signals, ..self }
    }

    /// One sample. A probe of the primary that fails or times out yields a sample with
    /// `probe_failed` set: the throttle treats not knowing as not healthy. A replica that
    /// cannot be probed is reported missing.
    pub async fn sample(&self) -> HealthSample {
        let primary = tokio::time::timeout(self.timeout, self.sample_primary());
        let replicas = join_all(self.replicas.iter().map(|(name, pool)| async move {
            let lag = tokio::time::timeout(self.timeout, replica_lag(pool, name)).await;
            (name, lag.unwrap_or_else(|_| Err(self.timed_out())))
        }));
        let prometheus = async {
            match &self.signals.prometheus {
                Some(query) => Some(query.read().await),
                None => None,
            }
        };
        let (primary, replicas, prometheus) = tokio::join!(primary, replicas, prometheus);
        let mut sample = match primary.unwrap_or_else(|_| Err(self.timed_out())) {
            Ok((mut sample, job_queries)) => {
                self.failing.ok("primary");
                sample.job_queries = self.run_job_queries(job_queries).await;
                sample
            }
            Err(error) => {
                self.failing.failed("primary", &error);
                return HealthSample::probe_failed();
            }
        };
        match &prometheus {
            Some(QueryReading::Failed(error)) => self.failing.failed("prometheus", error),
            Some(QueryReading::Value(_)) => self.failing.ok("prometheus"),
            None => {}
        }
        sample.prometheus = prometheus;
        for (name, lag) in replicas {
            match lag {
                Ok(lag) => {
                    self.failing.ok(name);
                    sample.replicas.push(lag);
                }
                Err(error) => {
                    self.failing.failed(name, &error);
                    sample.missing_standbys.push(name.clone());
                }
            }
        }
        sample
    }

    fn timed_out(&self) -> String {
        format!(
            "no answer within throttle.probe_timeout ({:?})",
            self.timeout
        )
    }

    async fn sample_primary(&self) -> Result<(HealthSample, Vec<JobQuerySpec>), String> {
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
                .query(OPERATOR_THROTTLES_SQL, &[&self.signals.also_job])
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
                .query(VACUUMS_SQL, &[&self.signals.also_job])
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
}

impl HealthProbe {
    /// The WAL rate, archiving, dead tuples and jobs' own throttle queries (see the
    /// module docs).
    async fn sample_more_signals(
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
                .query(DEAD_TUPLES_SQL, &[&min_rows, &self.signals.also_job])
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
                .query(JOB_QUERIES_SQL, &[&self.signals.also_job])
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

    /// Runs every job's own throttle query on a connection of their own, each within
    /// `probe_timeout`, after the primary's sample: one slow or failing query holds its
    /// own job, never the probe (and so every job).
    async fn run_job_queries(&self, specs: Vec<JobQuerySpec>) -> Vec<JobQuery> {
        // A job whose query is gone (removed, or the job stopped running) starts afresh:
        // a failure of a query it is given later is logged again.
        let targets: Vec<String> = specs
            .iter()
            .map(|spec| format!("{JOB_QUERY_TARGET}{}", spec.job_id))
            .collect();
        self.failing.forget_others(JOB_QUERY_TARGET, &targets);
        if specs.is_empty() {
            return Vec::new();
        }
        let mut client = match tokio::time::timeout(self.timeout, self.primary.get()).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(format!("getting a connection: {}", error_chain(&e))),
            Err(_) => Err(self.timed_out()),
        };
        let mut readings = Vec::with_capacity(specs.len());
        for spec in specs {
            let target = format!("{JOB_QUERY_TARGET}{}", spec.job_id);
            let outcome = match &mut client {
                Ok(client) => tokio::time::timeout(
                    self.timeout,
                    run_job_query(
                        client,
                        &spec.query,
                        &spec.role,
                        &spec.search_path,
                        self.timeout,
                    ),
                )
                .await
                .unwrap_or_else(|_| Err(self.timed_out())),
                Err(error) => Err(error.clone()),
            };
            let reading = match outcome {
                Ok(value) => {
                    self.failing.ok(&target);
                    QueryReading::Value(value)
                }
                Err(error) => {
                    let error = format!("{target} failed: {error}");
                    self.failing.failed(&target, &error);
                    QueryReading::Failed(error)
                }
            };
            readings.push(JobQuery {
                job_id: spec.job_id,
                reading,
                hold_above: spec.hold_above,
            });
        }
        readings
    }
}

/// How the failure log names a job's throttle query, before the job's id.
const JOB_QUERY_TARGET: &str = "throttle_query of job ";

/// A running job's own throttle query, to be run as its role.
struct JobQuerySpec {
    job_id: i64,
    query: String,
    hold_above: f64,
    role: String,
    search_path: String,
}

/// Runs a job's throttle query as the job's role, read-only, in a transaction that is
/// rolled back (also when the probe gives up on it: dropping it rolls back).
async fn run_job_query(
    client: &mut deadpool_postgres::Client,
    query: &str,
    role: &str,
    search_path: &str,
    timeout: Duration,
) -> Result<f64, String> {
    let transaction = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| format!("starting its transaction: {e}"))?;
    let timeout_ms = timeout.as_millis().max(1).to_string();
    transaction
        .execute(
            "SELECT set_config('role', $1, true), set_config('search_path', $2, true), \
                    set_config('statement_timeout', $3, true)",
            &[&role, &search_path, &timeout_ms],
        )
        .await
        .map_err(|e| format!("taking the job's role {role:?}: {e}"))?;
    let messages = transaction
        .simple_query(query)
        .await
        .map_err(|e| error_chain(&e))?;
    let value = read_query_value(&messages);
    transaction
        .rollback()
        .await
        .map_err(|e| format!("rolling back: {e}"))?;
    value
}

/// The canary's statement: a transaction that writes WAL and commits, as production's
/// writes do. Measured side by side, its round trip told a backfill that hurt pgbench from
/// one that did not far better than `SELECT 1`, which never waits for WAL (see
/// docs/BENCHMARKS.md). It takes a transaction ID each time: at the default interval
/// about 1.7 million a day, far below what any writing database burns.
const CANARY_SQL: &str = "SELECT pg_current_xact_id()";

/// The production-latency canary (see [`backfill_core::latency`]): [`CANARY_SQL`] timed on
/// a connection of its own, so that neither our batches nor the other probes queue before
/// it.
#[derive(Clone)]
pub struct LatencyCanary {
    pool: Pool,
    timeout: Duration,
}

impl LatencyCanary {
    /// A canary on `pool` (one connection is enough); a round trip is given up after
    /// `timeout`.
    pub fn new(pool: Pool, timeout: Duration) -> Self {
        LatencyCanary { pool, timeout }
    }

    /// One round trip on an established connection (connecting is not timed). A canary
    /// still unanswered after the timeout reports the timeout: production is that slow at
    /// least. `None` when it could not run at all (no connection, an error): no verdict.
    pub async fn round_trip(&self) -> Option<Duration> {
        let client = self.pool.get().await.ok()?;
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, client.simple_query(CANARY_SQL)).await {
            Ok(Ok(_)) => Some(started.elapsed()),
            Ok(Err(_)) => None,
            Err(_) => Some(self.timeout),
        }
    }
}

/// The one value of the throttle query's one row: a number, or a boolean as 1 or 0.
fn read_query_value(messages: &[SimpleQueryMessage]) -> Result<f64, String> {
    let rows: Vec<Vec<Option<&str>>> = messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some((0..row.len()).map(|i| row.get(i)).collect()),
            _ => None,
        })
        .collect();
    query_value(&rows)
}

/// [`read_query_value`] on the rows' text cells.
fn query_value(rows: &[Vec<Option<&str>>]) -> Result<f64, String> {
    let [row] = rows else {
        return Err(format!(
            "throttle.query returned {} rows; it must return one row with one number or boolean",
            rows.len()
        ));
    };
    let [cell] = row[..] else {
        return Err(format!(
            "throttle.query returned {} columns; it must return one number or boolean",
            row.len()
        ));
    };
    match cell {
        None => Err("throttle.query returned NULL; it must return a number or boolean".into()),
        Some("t" | "true") => Ok(1.0),
        Some("f" | "false") => Ok(0.0),
        Some(text) => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|value| !value.is_nan())
            .ok_or_else(|| {
                format!("throttle.query returned {text:?}; it must return a number or boolean")
            }),
    }
}

/// Time and byte lag of one standby from `pg_stat_replication` (see the module docs): zero
/// bytes outstanding means caught up, whatever a stale or NULL `replay_lag` says.
fn combine_lag(
    replay_lag_seconds: Option<f64>,
    lag_bytes: Option<f64>,
) -> (Option<Duration>, Option<u64>) {
    // float8 → u64 saturates, and greatest(…, 0) already ruled out negatives.
    let lag_bytes = lag_bytes.map(|bytes| bytes as u64);
    let lag = match lag_bytes {
        Some(0) => Some(Duration::ZERO),
        _ => replay_lag_seconds.map(seconds),
    };
    (lag, lag_bytes)
}

/// The declared standbys that are not among the `found` ones.
fn missing_standbys(expected: &[String], found: &[ReplicaLag]) -> Vec<String> {
    expected
        .iter()
        .filter(|name| !found.iter().any(|replica| &replica.name == *name))
        .cloned()
        .collect()
}

/// A duration from seconds the database computed; negative (clock skew) or NaN read as 0.
fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(Duration::MAX)
}

/// Lag measured on a replica itself (see the module docs).
async fn replica_lag(pool: &Pool, name: &str) -> Result<ReplicaLag, String> {
    let client = pool
        .get()
        .await
        .map_err(|e| format!("connecting: {}", error_chain(&e)))?;
    let row = client
        .query_one(REPLICA_LAG_SQL, &[])
        .await
        .map_err(|e| format!("reading its replay position: {e}"))?;
    let in_recovery: bool = row.get(0);
    if !in_recovery {
        return Err(
            "it is not a standby (pg_is_in_recovery() is false); throttle.replica_urls takes physical standbys"
                .to_string(),
        );
    }
    let lag_seconds: Option<f64> = row.get(1);
    let lag_bytes: Option<f64> = row.get(2);
    Ok(ReplicaLag::new(
        name,
        lag_seconds.map(seconds),
        lag_bytes.map(|bytes| bytes as u64),
    ))
}

/// Which probe targets are failing, so each failure is logged once when it starts and once
/// when it ends, not at every probe interval.
#[derive(Clone, Default)]
struct FailureLog {
    failing: Arc<Mutex<HashSet<String>>>,
}

impl FailureLog {
    fn failed(&self, target: &str, error: &str) {
        let newly = self.lock().insert(target.to_owned());
        if newly {
            tracing::warn!(
                probed = target,
                error,
                "health probe failed; the throttle holds until it works again"
            );
        } else {
            tracing::debug!(probed = target, error, "health probe still failing");
        }
    }

    fn ok(&self, target: &str) {
        if self.lock().remove(target) {
            tracing::info!(probed = target, "health probe works again");
        }
    }

    /// Forgets the failing targets named `prefix…` that are not among `current`.
    fn forget_others(&self, prefix: &str, current: &[String]) {
        self.lock()
            .retain(|target| !target.starts_with(prefix) || current.contains(target));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.failing.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_standby_is_zero_behind_whatever_replay_lag_says() {
        // Idle primary: replay_lag stale for an interval, then NULL.
        assert_eq!(
            combine_lag(Some(3.5), Some(0.0)),
            (Some(Duration::ZERO), Some(0))
        );
        assert_eq!(
            combine_lag(None, Some(0.0)),
            (Some(Duration::ZERO), Some(0))
        );
    }

    #[test]
    fn standby_with_wal_outstanding_keeps_both_readings() {
        assert_eq!(
            combine_lag(Some(1.5), Some(4096.0)),
            (Some(Duration::from_millis(1_500)), Some(4096))
        );
        // Writes started after an idle spell: replay_lag not measured yet, bytes are.
        assert_eq!(combine_lag(None, Some(4096.0)), (None, Some(4096)));
        // Not reported at all (just connected): unmeasured, which the controller holds on.
        assert_eq!(combine_lag(None, None), (None, None));
    }

    #[test]
    fn nonsense_seconds_do_not_panic() {
        assert_eq!(seconds(-0.2), Duration::ZERO);
        assert_eq!(seconds(f64::NAN), Duration::ZERO);
        assert_eq!(seconds(f64::INFINITY), Duration::MAX);
    }

    #[test]
    fn declared_standbys_not_streaming_are_missing() {
        let found = [ReplicaLag::new("a", None, Some(0))];
        let expected = ["a".to_owned(), "b".to_owned()];
        assert_eq!(missing_standbys(&expected, &found), ["b"]);
        assert!(missing_standbys(&[], &found).is_empty());
    }

    #[test]
    fn the_throttle_query_gives_one_number_or_boolean() {
        for (cell, value) in [
            ("t", 1.0),
            ("f", 0.0),
            ("42", 42.0),
            ("0.25", 0.25),
            ("-3", -3.0),
        ] {
            assert_eq!(query_value(&[vec![Some(cell)]]), Ok(value));
        }
        for (rows, mentions) in [
            (vec![], "returned 0 rows"),
            (vec![vec![Some("1")], vec![Some("2")]], "returned 2 rows"),
            (vec![vec![Some("1"), Some("2")]], "returned 2 columns"),
            (vec![vec![None]], "returned NULL"),
            (vec![vec![Some("NaN")]], "returned \"NaN\""),
            (vec![vec![Some("busy")]], "returned \"busy\""),
        ] {
            let error = query_value(&rows).expect_err(mentions);
            assert!(error.contains(mentions), "{error}");
        }
    }
}
