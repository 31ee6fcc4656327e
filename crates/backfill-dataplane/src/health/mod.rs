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
//!
//! Rooms: [`primary`] (the primary's signals on one connection), [`lag`] (standbys'
//! lag, read on the primary or on a replica itself), [`job_queries`] (jobs' own throttle
//! queries, and the operator's one value), [`canary`] (the production-latency canary) and
//! [`failure_log`] (each failing target logged once).

/// Which of `pg_stat_activity`'s sessions are production's: client sessions, not this
/// one, not any of backfilld's (recognised by application_name, see `primary.rs`). A
/// literal, for `concat!`.
macro_rules! production_sessions {
    () => {
        "backend_type = 'client backend' AND pid <> pg_backend_pid() \
         AND application_name NOT LIKE 'backfilld%'"
    };
}

/// What waiting on the WAL is, in `pg_stat_activity`: its flush (`IO:WALSync`), its write
/// (`IO:WALWrite`) or the lock of whoever writes it (`LWLock:WALWrite`). A literal, for
/// `concat!`.
macro_rules! waiting_on_the_wal {
    () => {
        "wait_event IN ('WALSync', 'WALWrite')"
    };
}

mod canary;
mod failure_log;
mod job_queries;
mod lag;
mod primary;
mod wal_waits;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backfill_core::signals::WalRateMeter;
use backfill_core::throttle::{HealthSample, QueryReading};
use deadpool_postgres::Pool;
use futures::future::join_all;

pub use canary::{LatencyCanary, CANARY_SQL};
use failure_log::FailureLog;
use lag::replica_lag;
pub use wal_waits::{ProductionWalWaits, WAITING_ON_THE_WAL};

use crate::PrometheusQuery;

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
}

/// `sql`'s rows, the statement prepared once per connection: the probes run the same few
/// statements many times a second, and parsing and planning each anew cost the primary
/// more than running it. A statement that fails is forgotten, so a stale one (its tables
/// changed under it) is prepared afresh next time.
async fn query_prepared(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let rows = match client.prepare_cached(sql).await {
        Ok(statement) => client.query(&statement, params).await,
        Err(e) => Err(e),
    };
    if rows.is_err() {
        client.statement_cache.remove(sql, &[]);
    }
    rows
}
