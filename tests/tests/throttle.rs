//! Adaptive throttling end to end, measured from the database's side: a standby whose
//! replay is paused, a declared standby that goes away, a batch waiting on an
//! application's row lock, an application waiting on a batch's row lock, and the
//! controller's path on a healthy database.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use backfilld_e2e::{
    env_refs, free_port, http_get, quick_worker_json_log, wait_until, Application, Daemon, TestDb,
};
use pg_testkit::demo_data::{users_table_sql, SPLIT_NAME_JOB_SQL};
use pg_testkit::{PgCluster, StopMode};

const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Byte-lag limit of the lag tests: a few batches of WAL, yet above what one batch of
/// [`LAG_TEST_MAX_BATCH`] rows leaves in flight while the standby streams normally.
const MAX_LAG_BYTES: f64 = 1024.0 * 1024.0;
/// The default time-lag limit (`throttle.max_lag`).
const MAX_LAG_SECONDS: f64 = 2.0;
/// Largest batch in the lag tests: about 240 kB of WAL.
const LAG_TEST_MAX_BATCH: i64 = 1_000;
/// Rows per second in the lag tests, so the job is still running when the standby acts up.
const LAG_TEST_RATE: i64 = 10_000;

/// `job_status`'s throttle state and reason, as `state|reason`.
fn throttle_status(db: &TestDb) -> String {
    db.sql("SELECT coalesce(throttle_state, '') || '|' || coalesce(throttle_reason, '') FROM backfill.job_status")
}

/// Batches the job has committed.
fn batches_done(db: &TestDb) -> i64 {
    db.int("SELECT coalesce(max(batches_done), 0) FROM backfill.jobs")
}

/// The database's clock, in seconds since the epoch: every instant these tests compare
/// comes from the same clock as the audit trail.
fn db_now(db: &TestDb) -> f64 {
    db.sql("SELECT extract(epoch FROM clock_timestamp())")
        .parse()
        .expect("epoch")
}

/// The users table with an audit trail and the split-name job, rate-limited so it runs
/// for a few seconds with small batches.
fn lag_test_job(db: &TestDb, rows: i64) {
    db.sql(&users_table_sql(rows));
    db.audit_updates("users", "id");
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    db.sql(&format!(
        "UPDATE backfill.jobs SET max_batch_size = {LAG_TEST_MAX_BATCH}, max_rows_per_second = {LAG_TEST_RATE}"
    ));
}

/// Daemon env for the lag tests: `standby` declared, the byte limit lowered.
fn lag_test_env(worker: &str, standby: &str) -> Vec<(&'static str, String)> {
    let mut env = quick_worker_json_log(worker);
    env.push(("BACKFILLD_THROTTLE__EXPECTED_STANDBYS", standby.to_string()));
    env.push((
        "BACKFILLD_THROTTLE__MAX_LAG_BYTES",
        (MAX_LAG_BYTES as u64).to_string(),
    ));
    // The lag signal alone: the test's own sessions would otherwise count as production
    // and the impact budget (tests/tests/budget.rs) would pace the job after the hold.
    env.push(("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0".to_string()));
    env
}

/// The worker's log records with `message`.
fn worker_lines(daemon: &Daemon, message: &str) -> Vec<serde_json::Value> {
    daemon
        .json_lines("backfilld::worker")
        .into_iter()
        .filter(|line| line["message"] == message)
        .collect()
}

/// Seconds of the UTC RFC 3339 timestamp of a log record, on the database's clock.
fn log_time(db: &TestDb, line: &serde_json::Value) -> f64 {
    let at = line["timestamp"].as_str().expect("timestamp");
    db.sql(&format!("SELECT extract(epoch FROM '{at}'::timestamptz)"))
        .parse()
        .expect("epoch")
}

/// One reading of the primary, taken by the test itself.
#[derive(Debug, Clone, Copy)]
struct LagSample {
    /// When (database clock, epoch seconds).
    at: f64,
    /// `pg_current_wal_lsn() - replay_lsn` of the standby.
    bytes: Option<f64>,
    /// Its `replay_lag`.
    seconds: Option<f64>,
    /// Batches the job has committed so far.
    batches_done: i64,
}

impl LagSample {
    fn over_limit(&self) -> bool {
        self.bytes.is_some_and(|b| b >= MAX_LAG_BYTES)
            || self.seconds.is_some_and(|s| s >= MAX_LAG_SECONDS)
    }
}

/// Samples a standby's lag and the job's committed batches on the primary every 20 ms on
/// a thread and connection of its own: ten times the daemon's probe rate, so what it
/// records bounds what the daemon could have known.
struct LagSampler {
    samples: Arc<Mutex<Vec<LagSample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LagSampler {
    fn start(db: &TestDb, standby: &str) -> LagSampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let session = db.session();
        let sql = format!(
            "SELECT extract(epoch FROM clock_timestamp())::float8, \
                    greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn), 0)::float8, \
                    extract(epoch FROM r.replay_lag)::float8, \
                    (SELECT coalesce(max(batches_done), 0) FROM backfill.jobs)::int8 \
               FROM (SELECT 1) one \
               LEFT JOIN pg_stat_replication r ON r.application_name = '{standby}'"
        );
        let thread = thread::spawn({
            let (samples, stop) = (Arc::clone(&samples), Arc::clone(&stop));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let row = &session.query(&sql)[0];
                    let sample = LagSample {
                        at: row.get(0),
                        bytes: row.get(1),
                        seconds: row.get(2),
                        batches_done: row.get(3),
                    };
                    samples.lock().unwrap().push(sample);
                    thread::sleep(Duration::from_millis(20));
                }
            }
        });
        LagSampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    fn samples(&self) -> Vec<LagSample> {
        self.samples.lock().unwrap().clone()
    }

    /// Stops sampling; everything recorded.
    fn finish(mut self) -> Vec<LagSample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("sampler thread");
        }
        self.samples()
    }
}

/// The first sample at or after `since` with lag over the limit.
fn first_over_limit(samples: &[LagSample], since: f64) -> Option<LagSample> {
    samples
        .iter()
        .find(|s| s.at >= since && s.over_limit())
        .copied()
}

/// A Prometheus sample line of `/metrics` that starts with `series_prefix` and contains
/// every one of `labels`.
fn metric_value(body: &str, series_prefix: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|line| line.starts_with(series_prefix))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[test]
fn paused_replay_stops_commits_within_a_second_and_resumes_by_itself() {
    let primary = PgCluster::start_primary().expect("primary");
    let standby = primary.start_standby("lagging").expect("standby");
    let db = TestDb::on(&primary, "replay_paused");
    let rows = 60_000;
    lag_test_job(&db, rows);
    let port = free_port();
    let mut env = lag_test_env("lag", "lagging");
    env.push(("BACKFILLD_HTTP__LISTEN", format!("127.0.0.1:{port}")));
    // The metrics are scraped while the job holds, not after: no final scrape to wait for
    // (http.final_scrape_wait would keep the idle worker up for 30 s).
    env.push(("BACKFILLD_HTTP__FINAL_SCRAPE_WAIT", "0s".to_string()));
    // The same standby probed directly too, as replica0.
    env.push(("BACKFILLD_THROTTLE__REPLICA_URLS", standby.url("postgres")));
    let sampler = LagSampler::start(&db, "lagging");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    wait_until("the first batch", RUN_LIMIT, || batches_done(&db) >= 1);

    standby
        .psql("postgres", "SELECT pg_wal_replay_pause()")
        .expect("pause replay");
    let paused_at = db_now(&db);
    wait_until("lag over the limit", RUN_LIMIT, || {
        first_over_limit(&sampler.samples(), paused_at).is_some()
    });
    let crossed = first_over_limit(&sampler.samples(), paused_at).expect("crossing");
    wait_until("job_status: holding for replication_lag", RUN_LIMIT, || {
        throttle_status(&db) == "holding|replication_lag"
    });
    // Keep replay paused for a while, so a daemon that did not stop would show it.
    wait_until("2.5 s of lag over the limit", RUN_LIMIT, || {
        sampler
            .samples()
            .last()
            .is_some_and(|s| s.at >= crossed.at + 2.5)
    });
    let metrics = http_get(port, "/metrics").expect("/metrics answers").1;
    standby
        .psql("postgres", "SELECT pg_wal_replay_resume()")
        .expect("resume replay");
    let resumed_at = db_now(&db);
    daemon.expect_success(RUN_LIMIT);
    let samples = sampler.finish();

    // The commit that came last before the resume, as early as the sampler saw it: an
    // upper bound of its commit time, never flattering.
    let held_at = samples
        .iter()
        .rev()
        .find(|s| s.at < resumed_at)
        .expect("samples before the resume")
        .batches_done;
    let last_commit_seen = samples
        .iter()
        .find(|s| s.batches_done >= held_at)
        .expect("sample of the last commit")
        .at;
    let stop_delay = last_commit_seen - crossed.at;
    let first_commit_after = samples
        .iter()
        .find(|s| s.at > resumed_at && s.batches_done > held_at)
        .map(|s| s.at - resumed_at);
    eprintln!(
        "replay paused: lag over the limit {:.3} s after the pause ({crossed:?}); last commit seen \
         {stop_delay:.3} s after that; held {:.3} s until the resume; first commit {first_commit_after:?} s after it",
        crossed.at - paused_at,
        resumed_at - last_commit_seen,
    );
    assert!(
        stop_delay <= 1.0,
        "commits went on {stop_delay:.3} s after lag crossed the limit"
    );
    assert!(
        first_commit_after.is_some(),
        "no commit after the resume was sampled"
    );

    assert_eq!(
        metric_value(
            &metrics,
            "backfill_throttled{",
            &["job=\"split_full_name\"", "reason=\"replication_lag\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    let held_seconds = metric_value(
        &metrics,
        "backfill_throttle_sleep_seconds_total{",
        &["job=\"split_full_name\"", "reason=\"replication_lag\""],
    );
    assert!(
        held_seconds.is_some_and(|s| s >= 1.0),
        "time held for replication_lag: {held_seconds:?}"
    );
    for lag_metric in [
        "backfill_replication_lag_bytes{",
        "backfill_replication_lag_seconds{",
    ] {
        for replica in ["replica=\"lagging\"", "replica=\"replica0\""] {
            assert!(
                metric_value(&metrics, lag_metric, &[replica]).is_some(),
                "{lag_metric} of {replica} missing: {metrics}"
            );
        }
    }

    for decision in daemon.json_lines("backfilld::worker") {
        if decision["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("throttle: "))
        {
            eprintln!(
                "  {} {} {} size={} pause={} lag={}",
                decision["timestamp"],
                decision["message"],
                decision["reason"],
                decision["batch_size"],
                decision["pause_before"],
                decision["lag"]
            );
        }
    }
    let holds = worker_lines(&daemon, "throttle: holding");
    assert!(
        holds.iter().any(|line| line["reason"] == "replication_lag"),
        "{holds:?}"
    );
    let hold_logged = log_time(&db, &holds[0]);
    // Running again: freely, or paced by the job's own rate limit alone (its 20 ms window
    // caps batches at 200 rows whenever the worker's cycle is quick, as on a quiet host).
    let running_again: Vec<_> = ["throttle: running freely", "throttle: slowing down"]
        .into_iter()
        .flat_map(|message| worker_lines(&daemon, message))
        .filter(|line| line["reason"] != "replication_lag")
        .collect();
    assert!(
        running_again
            .iter()
            .any(|line| log_time(&db, line) > hold_logged),
        "never ran again, unheld by the lag, after the hold: {running_again:?}"
    );

    assert_eq!(db.job_state("split_full_name"), "succeeded");
    db.assert_backfilled_exactly_once("users", rows);
    assert_eq!(
        db.int("SELECT count(*) FROM users WHERE first_name IS NULL AND full_name <> ''"),
        0
    );
}

#[test]
fn stopped_declared_standby_holds_the_job_until_it_is_back() {
    let primary = PgCluster::start_primary().expect("primary");
    let standby = primary.start_standby("declared").expect("standby");
    let db = TestDb::on(&primary, "standby_missing");
    let rows = 40_000;
    lag_test_job(&db, rows);
    let env = lag_test_env("missing", "declared");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    wait_until("the first batch", RUN_LIMIT, || batches_done(&db) >= 1);

    standby.stop(StopMode::Fast).expect("pg_ctl stop -m fast");
    wait_until("job_status: holding for standby_missing", RUN_LIMIT, || {
        throttle_status(&db) == "holding|standby_missing"
    });
    let hold_seen = db_now(&db);
    let held_batches = batches_done(&db);
    // Gone for a while: nothing commits and job_status keeps saying why.
    let away = Instant::now();
    while away.elapsed() < Duration::from_secs(1) {
        assert_eq!(throttle_status(&db), "holding|standby_missing");
        assert_eq!(
            batches_done(&db),
            held_batches,
            "committed while the standby was away"
        );
        thread::sleep(Duration::from_millis(100));
    }

    standby.start().expect("start the standby again");
    // The last moment the standby was seen not streaming: the job must not move before it.
    let mut still_away = db_now(&db);
    wait_until("the standby streams again", RUN_LIMIT, || {
        let now = db_now(&db);
        let streaming = db.int(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'declared' AND state = 'streaming'",
        ) == 1;
        if !streaming {
            still_away = now;
        }
        streaming
    });
    daemon.expect_success(RUN_LIMIT);

    let first_commit_after_hold: f64 = db
        .sql(&format!(
            "SELECT extract(epoch FROM min(at)) FROM users_audit \
              WHERE app LIKE 'backfilld/%' AND at > to_timestamp({hold_seen})"
        ))
        .parse()
        .expect("commits after the hold");
    eprintln!(
        "standby stopped: hold seen, standby last seen away {:.3} s later, first update {:.3} s after that",
        still_away - hold_seen,
        first_commit_after_hold - still_away
    );
    assert!(
        first_commit_after_hold > still_away,
        "updated rows {:.3} s before the standby was back",
        still_away - first_commit_after_hold
    );
    let holds = worker_lines(&daemon, "throttle: holding");
    assert!(
        holds
            .iter()
            .any(|line| line["reason"] == "standby_missing"
                && line["missing_standbys"] == "declared"),
        "{holds:?}"
    );
    assert_eq!(db.job_state("split_full_name"), "succeeded");
    db.assert_backfilled_exactly_once("users", rows);
}

#[test]
fn replica_url_that_is_not_a_standby_holds_the_job() {
    let db = TestDb::new("not_a_standby");
    db.sql(&users_table_sql(1_000));
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    let mut env = quick_worker_json_log("not_a_standby");
    // Fail safe: the primary itself, given as a replica, cannot tell any standby's lag.
    env.push(("BACKFILLD_THROTTLE__REPLICA_URLS", db.url()));
    let daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("job_status: holding for standby_missing", RUN_LIMIT, || {
        throttle_status(&db) == "holding|standby_missing"
    });
    assert_eq!(batches_done(&db), 0);
    let failures: Vec<_> = daemon
        .json_lines("backfill_dataplane::health")
        .into_iter()
        .filter(|line| line["probed"] == "replica0")
        .collect();
    assert!(
        failures.iter().any(|line| line["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("health probe failed"))
            && line["error"]
                .as_str()
                .is_some_and(|e| e.contains("not a standby"))),
        "{failures:?}"
    );
}

#[test]
fn batch_waiting_on_an_application_lock_backs_off_and_finishes_after_release() {
    let db = TestDb::new("lock_wait");
    let rows = 3_000;
    db.sql(&users_table_sql(rows));
    db.audit_updates("users", "id");
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    db.sql("UPDATE backfill.jobs SET batch_size = 100");
    // The application holds rows in the middle of the table.
    let application = db.session();
    application.execute("BEGIN; SELECT id FROM users WHERE id BETWEEN 2001 AND 2010 FOR UPDATE");
    let env = quick_worker_json_log("lock_wait");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));

    let lock_timeouts = |daemon: &Daemon| -> Vec<f64> {
        worker_lines(
            daemon,
            "batch rolled back; will retry it smaller after a pause",
        )
        .iter()
        .filter(|line| line["kind"] == "lock_timeout")
        .map(|line| log_time(&db, line))
        .collect()
    };
    wait_until("three lock timeouts", RUN_LIMIT, || {
        lock_timeouts(&daemon).len() >= 3
    });
    assert_eq!(db.job_state("split_full_name"), "running");
    assert_eq!(
        db.int("SELECT count(*) FROM backfill.failed_rows"),
        0,
        "a lock wait is not a row failure"
    );
    assert!(
        db.int("SELECT checkpoint::bigint FROM backfill.jobs") < 2001,
        "the locked rows cannot have been passed"
    );
    let timeouts = lock_timeouts(&daemon);
    application.execute("COMMIT");
    daemon.expect_success(RUN_LIMIT);

    // Each retry waited out lock_timeout (1 s) after a backoff pause doubling from 100 ms:
    // lower bounds, which a busy machine can only lengthen.
    let gaps: Vec<f64> = timeouts.windows(2).map(|t| t[1] - t[0]).collect();
    eprintln!("lock wait: seconds between lock timeouts {gaps:?}");
    for (i, gap) in gaps.iter().enumerate() {
        let backoff = 0.1 * f64::from(1 << i);
        assert!(
            *gap >= 1.0 + backoff,
            "retry {i} after {gap:.3} s: {gaps:?}"
        );
    }
    let backoff = worker_lines(&daemon, "throttle: slowing down")
        .into_iter()
        .find(|line| line["reason"] == "lock_timeout")
        .expect("a decision for lock_timeout");
    assert_eq!(backoff["pause_before"], "100ms", "{backoff}");
    assert_eq!(db.job_state("split_full_name"), "succeeded");
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 0);
    db.assert_backfilled_exactly_once("users", rows);
}

/// `hold_row_locks()`: a statement trigger function that, while `slow_batches.on_`, keeps
/// every backfill statement (and so its row locks) 2 s longer.
const HOLD_ROW_LOCKS_SQL: &str = "CREATE TABLE slow_batches (on_ boolean NOT NULL);
     INSERT INTO slow_batches VALUES (true);
     CREATE FUNCTION hold_row_locks() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
         IF current_setting('application_name') LIKE 'backfilld/%'
            AND (SELECT on_ FROM slow_batches) THEN
             PERFORM pg_sleep(2);
         END IF;
         RETURN NULL;
     END $$;";

#[test]
fn application_blocked_by_a_batch_waits_no_longer_than_max_blocking_plus_a_probe_interval() {
    let db = TestDb::new("blocking");
    db.sql(HOLD_ROW_LOCKS_SQL);
    db.sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false,
                             touched int NOT NULL DEFAULT 0);
         INSERT INTO items (id) SELECT generate_series(1, 400);
         CREATE TRIGGER hold_row_locks AFTER UPDATE ON items
             FOR EACH STATEMENT EXECUTE FUNCTION hold_row_locks();",
    );
    db.audit_updates("items", "id");
    db.migrate();
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size)
         VALUES ('mark_done', 'public.items', 'id',
                 'UPDATE public.items SET done = true WHERE id = ANY(:keys)', 'NOT done', 100)",
    );
    let env = quick_worker_json_log("blocking");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    let application = db.session();
    let mut waits = Vec::new();
    for _ in 0..3 {
        wait_until("a batch holding its row locks", RUN_LIMIT, || {
            db.int(
                "SELECT count(*) FROM pg_stat_activity \
                  WHERE datname = current_database() AND application_name LIKE 'backfilld/%' \
                    AND wait_event = 'PgSleep'",
            ) == 1
        });
        // The first key above the checkpoint is in the running batch, locked by it.
        waits.push(application.timed(
            "UPDATE items SET touched = touched + 1 \
              WHERE id = (SELECT coalesce(checkpoint::bigint, 0) + 1 FROM backfill.jobs)",
        ));
    }
    db.sql("UPDATE slow_batches SET on_ = false");
    daemon.expect_success(RUN_LIMIT);

    let limit = Duration::from_millis(200 + 250); // throttle.max_blocking + throttle.probe_interval
    eprintln!("blocked application waits: {waits:?} (limit {limit:?})");
    for wait in &waits {
        assert!(*wait <= limit, "the application waited {wait:?}");
        // It really was blocked (an UPDATE of one row takes about a millisecond).
        assert!(*wait >= Duration::from_millis(100), "not blocked: {wait:?}");
    }
    let cancels = worker_lines(
        &daemon,
        "the batch is blocking other sessions; cancelling it",
    );
    assert!(cancels.len() >= waits.len(), "{cancels:?}");
    let cut = worker_lines(&daemon, "throttle: slowing down")
        .into_iter()
        .find(|line| line["reason"] == "blocking_production")
        .expect("a decision for blocking_production");
    assert!(
        cut["batch_size"].as_u64().expect("batch_size") < 100,
        "{cut}"
    );

    assert_eq!(db.job_state("mark_done"), "succeeded");
    assert_eq!(db.int("SELECT count(*) FROM items WHERE NOT done"), 0);
    assert_eq!(
        db.int("SELECT sum(touched) FROM items"),
        3,
        "the application's updates stand"
    );
    db.assert_backfilled_exactly_once("items", 400);
}

#[test]
fn only_the_batch_that_blocks_an_application_is_cancelled_when_two_jobs_share_a_process() {
    let db = TestDb::new("blocking_two");
    db.sql(HOLD_ROW_LOCKS_SQL);
    let mut setup = String::new();
    for table in ["items", "others"] {
        setup.push_str(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false,
                                   touched int NOT NULL DEFAULT 0);
             INSERT INTO {table} (id) SELECT generate_series(1, 300);
             CREATE TRIGGER hold_row_locks AFTER UPDATE ON {table}
                 FOR EACH STATEMENT EXECUTE FUNCTION hold_row_locks();
             INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size)
             VALUES ('mark_{table}', 'public.{table}', 'id',
                     'UPDATE public.{table} SET done = true WHERE id = ANY(:keys)', 'NOT done', 100);"
        ));
    }
    db.migrate();
    db.sql(&setup);
    db.audit_updates("items", "id");
    db.audit_updates("others", "id");
    let mut env = quick_worker_json_log("blocking_two");
    env.push(("BACKFILLD_WORKER__CONCURRENCY", "2".to_string()));
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    wait_until(
        "both jobs' batches holding their row locks",
        RUN_LIMIT,
        || {
            db.int(
                "SELECT count(*) FROM pg_stat_activity \
              WHERE datname = current_database() AND application_name LIKE 'backfilld/%' \
                    AND wait_event = 'PgSleep'",
            ) == 2
        },
    );
    // The first key above its checkpoint is in mark_items' running batch, locked by it.
    let waited = db.session().timed(
        "UPDATE items SET touched = touched + 1 \
          WHERE id = (SELECT coalesce(checkpoint::bigint, 0) + 1 FROM backfill.jobs \
                       WHERE name = 'mark_items')",
    );
    db.sql("UPDATE slow_batches SET on_ = false");
    daemon.expect_success(RUN_LIMIT);

    assert!(
        waited <= Duration::from_millis(200 + 250),
        "the application waited {waited:?}"
    );
    let cancelled: Vec<String> = worker_lines(
        &daemon,
        "the batch is blocking other sessions; cancelling it",
    )
    .iter()
    .map(|line| line["span"]["job"].as_str().unwrap_or_default().to_string())
    .collect();
    assert!(
        !cancelled.is_empty() && cancelled.iter().all(|job| job == "mark_items"),
        "cancelled batches by job: {cancelled:?}"
    );
    for table in ["items", "others"] {
        assert_eq!(db.job_state(&format!("mark_{table}")), "succeeded");
        db.assert_backfilled_exactly_once(table, 300);
    }
}

/// `public.metered`: `rows` rows whose update costs a millisecond each (a trigger sleeps),
/// so batch durations follow batch sizes on any machine.
fn create_metered_table(db: &TestDb, rows: i64) {
    db.sql(&format!(
        "CREATE TABLE metered (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false);
         INSERT INTO metered (id) SELECT generate_series(1, {rows});
         CREATE FUNCTION cost_a_millisecond() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
         CREATE TRIGGER cost_a_millisecond BEFORE UPDATE ON metered
             FOR EACH ROW EXECUTE FUNCTION cost_a_millisecond();"
    ));
}

/// `(batch_size, duration_ms)` of every committed batch of `job`, in order.
fn batches_of(daemon: &Daemon, job: &str) -> Vec<(u64, f64)> {
    batch_lines(daemon, job)
        .iter()
        .map(|line| {
            (
                line["batch_size"].as_u64().expect("batch_size"),
                line["duration_ms"].as_f64().expect("duration_ms"),
            )
        })
        .collect()
}

#[test]
fn healthy_database_grows_batches_to_the_max_and_settles_near_the_target() {
    let db = TestDb::new("healthy");
    db.sql(&users_table_sql(16_000));
    // Rows that cost about a millisecond each, so the target, not the maximum, bounds
    // the batch size.
    create_metered_table(&db, 2_000);
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    db.sql(
        "UPDATE backfill.jobs SET batch_size = 100, max_batch_size = 1000, priority = 2;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate,
                                    batch_size, max_batch_size, target_batch_ms, priority)
         VALUES ('metered', 'public.metered', 'id',
                 'UPDATE public.metered SET done = true WHERE id = ANY(:keys)', 'NOT done',
                 20, 5000, 200, 1)",
    );
    let env = quick_worker_json_log("healthy");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(db.job_state("split_full_name"), "succeeded");
    assert_eq!(db.job_state("metered"), "succeeded");

    // Cheap rows: from the start size to the maximum in steps of 10 % of it, then stay.
    let sizes: Vec<u64> = batches_of(&daemon, "split_full_name")
        .iter()
        .map(|(size, _)| *size)
        .collect();
    eprintln!("split_full_name batch sizes: {sizes:?}");
    assert_eq!(sizes.first(), Some(&100), "{sizes:?}");
    let reached = sizes
        .iter()
        .position(|size| *size == 1_000)
        .unwrap_or_else(|| panic!("never reached the maximum: {sizes:?}"));
    assert!(
        sizes[..=reached]
            .windows(2)
            .all(|pair| pair[1] >= pair[0] && pair[1] - pair[0] <= 100),
        "{sizes:?}"
    );
    assert!(
        sizes[reached..].iter().all(|size| *size == 1_000),
        "{sizes:?}"
    );

    // Millisecond rows: durations settle near the 200 ms target.
    let metered = batches_of(&daemon, "metered");
    eprintln!("metered (size, ms): {metered:?}");
    assert!(metered.len() >= 10, "{metered:?}");
    let mut settled: Vec<f64> = metered[3..].iter().map(|(_, ms)| *ms).collect();
    settled.sort_by(f64::total_cmp);
    let median = settled[settled.len() / 2];
    let near = settled
        .iter()
        .filter(|ms| (100.0..=300.0).contains(*ms))
        .count();
    assert!(
        (160.0..=240.0).contains(&median),
        "median {median} ms: {metered:?}"
    );
    assert!(
        near * 10 >= settled.len() * 8,
        "fewer than 80 % of batches within 100..300 ms: {metered:?}"
    );
    let slowed = worker_lines(&daemon, "throttle: slowing down");
    assert!(
        slowed.is_empty(),
        "a healthy database needs no slowing down: {slowed:?}"
    );
}

#[test]
fn nonsense_throttle_configuration_is_refused_with_exit_2() {
    for (key, value, mentions) in [
        (
            "BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND",
            "0.5",
            "max_rows_per_second",
        ),
        ("BACKFILLD_THROTTLE__MAX_LAG_BYTES", "0", "max_lag_bytes"),
        ("BACKFILLD_THROTTLE__MAX_BLOCKING", "soon", "max_blocking"),
    ] {
        // Configuration is judged before any connection: the URL is never used.
        let mut daemon = Daemon::start("postgres://nobody@127.0.0.1:1/none", &[], &[(key, value)]);
        let status = daemon.wait(Duration::from_secs(10)).expect("exits at once");
        let log = daemon.log_text();
        assert_eq!(status.code(), Some(2), "{key}={value}: {log}");
        assert_eq!(log.trim().lines().count(), 1, "{log}");
        assert!(log.contains(mentions), "{key}={value}: {log}");
    }
}

#[test]
fn delayed_canaries_pace_the_job_in_short_batches_and_it_still_finishes() {
    let db = TestDb::new("canary");
    // Rows that cost a millisecond each, in batches of 20: unpaced, the job runs 15 batches
    // over about 300 ms, dozens of canary intervals, so the pace starts while it runs.
    create_metered_table(&db, 300);
    db.migrate();
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate,
                                    batch_size, max_batch_size)
         VALUES ('metered', 'public.metered', 'id',
                 'UPDATE public.metered SET done = true WHERE id = ANY(:keys)', 'NOT done', 20, 20)",
    );
    let mut env = quick_worker_json_log("canary");
    // Every canary a microsecond slower than the quickest counts as production waiting: on
    // any machine most are, so the job is paced from its first batches on.
    env.push(("BACKFILLD_THROTTLE__MAX_PROBE_DELAY", "1us".to_string()));
    env.push(("BACKFILLD_THROTTLE__CANARY_INTERVAL", "10ms".to_string()));
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(db.job_state("metered"), "succeeded");
    assert_eq!(
        db.sql("SELECT count(*) FROM public.metered WHERE NOT done"),
        "0"
    );

    let paced = worker_lines(&daemon, "throttle: slowing down")
        .into_iter()
        .find(|line| line["reason"] == "production_latency")
        .unwrap_or_else(|| panic!("never paced for production latency: {}", daemon.log_text()));
    let pace = paced["paced_rows_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no pace in {paced}"));
    assert!(
        pace >= 1_000.0,
        "the pace never goes below its floor: {paced}"
    );
    // The next batch carries at most 10 ms of the pace (and at least the minimum size).
    let next = daemon
        .json_lines("backfilld::batch")
        .into_iter()
        .find(|line| line["timestamp"].as_str() > paced["timestamp"].as_str())
        .unwrap_or_else(|| panic!("no batch after {paced}"));
    let size = next["batch_size"].as_f64().expect("batch_size");
    assert!(size <= (pace / 100.0).max(10.0), "{next} after {paced}");
}

/// The log record of every committed batch of `job`, in order.
fn batch_lines(daemon: &Daemon, job: &str) -> Vec<serde_json::Value> {
    daemon
        .json_lines("backfilld::batch")
        .into_iter()
        .filter(|line| line["span"]["job"] == job)
        .collect()
}

/// Runs the enqueued jobs to the end with sharing on (a duty cycle of 0.2) and
/// `concurrency` job slots, and returns the daemon for its log.
fn run_sharing_worker(db: &TestDb, worker: &str, concurrency: u32) -> Daemon {
    let mut env = quick_worker_json_log(worker);
    env.push(("BACKFILLD_THROTTLE__BUSY_DUTY_CYCLE", "0.2".to_string()));
    // The duty cycle is the fallback of the impact budget (tests/tests/budget.rs): off here.
    env.push(("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0".to_string()));
    env.push(("BACKFILLD_WORKER__CONCURRENCY", concurrency.to_string()));
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    daemon
}

/// `public.<name>`: `rows` rows, and a job `<name>` that marks them done.
fn plain_table_job(db: &TestDb, name: &str, rows: i64) {
    db.sql(&format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false);
         INSERT INTO {name} (id) SELECT generate_series(1, {rows});
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
         VALUES ('{name}', 'public.{name}', 'id',
                 'UPDATE public.{name} SET done = true WHERE id = ANY(:keys)', 'NOT done')"
    ));
}

/// Milliseconds spent in the batches of `jobs` over the time from their first batch to
/// their last (from the daemon's log; the database's clock reads the timestamps).
fn duty_cycle_of(db: &TestDb, daemon: &Daemon, jobs: &[&str]) -> f64 {
    let (mut ran_ms, mut first, mut last) = (0.0, f64::MAX, f64::MIN);
    for job in jobs {
        ran_ms += batches_of(daemon, job)
            .iter()
            .map(|(_, ms)| ms)
            .sum::<f64>();
        let lines = batch_lines(daemon, job);
        first = first.min(log_time(db, &lines[0]));
        last = last.max(log_time(db, &lines[lines.len() - 1]));
    }
    let span_ms = (last - first) * 1000.0;
    eprintln!("{jobs:?}: {ran_ms:.0} ms in batches over {span_ms:.0} ms");
    ran_ms / span_ms
}

#[test]
fn a_job_shares_the_primary_while_production_is_at_work_and_runs_flat_out_when_it_is_not() {
    // A cluster of its own: on the shared one, other tests' sessions are production too.
    let primary = PgCluster::start_primary().expect("primary");
    let db = TestDb::on(&primary, "sharing");
    let rows = 20_000;
    db.sql(&users_table_sql(rows));
    db.audit_updates("users", "id");
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);

    // Production: an application at work for as long as the job runs.
    let application = Application::start(&db);
    let daemon = run_sharing_worker(&db, "sharing", 1);
    assert!(application.stop() > 1);
    db.assert_backfilled_exactly_once("users", rows);
    let shared = batches_of(&daemon, "split_full_name");
    let sizes: Vec<u64> = shared.iter().map(|(size, _)| *size).collect();
    eprintln!("batch sizes next to production: {sizes:?}");
    let noticed = daemon
        .json_lines("backfilld::health_monitor")
        .into_iter()
        .filter(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("production is at work on the primary"))
        })
        .count();
    assert_eq!(noticed, 1, "{}", daemon.log_text());
    let reasons: Vec<String> = worker_lines(&daemon, "throttle: slowing down")
        .iter()
        .map(|line| line["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(reasons, ["production_active"], "{}", daemon.log_text());
    // From the first batch on (the first probe saw production): short batches, a small
    // fraction of the 1,000 it would start at and the 10,000 it would grow to.
    assert!(sizes.len() >= 40, "{sizes:?}");
    let median = {
        let mut sorted = sizes.clone();
        sorted.sort_unstable();
        sorted[sorted.len() / 2]
    };
    assert!(median <= 1_000, "median batch {median}: {sizes:?}");
    // ...and at most a fifth of the time spent in batches, give or take the time the
    // worker takes between them: the rest after each batch is four times its length.
    let duty = duty_cycle_of(&db, &daemon, &["split_full_name"]);
    assert!(duty <= 0.25, "duty cycle {duty:.2}");

    // No production: the same work runs flat out, batches growing to the maximum.
    plain_table_job(&db, "plain", rows);
    let daemon = run_sharing_worker(&db, "alone", 1);
    assert_eq!(db.int("SELECT count(*) FROM plain WHERE NOT done"), 0);
    let sizes: Vec<u64> = batches_of(&daemon, "plain")
        .iter()
        .map(|(size, _)| *size)
        .collect();
    assert_eq!(sizes[..3], [1_000, 2_000, 3_000], "{sizes:?}");
    assert!(
        worker_lines(&daemon, "throttle: slowing down").is_empty(),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn jobs_running_next_to_production_split_one_duty_cycle() {
    let primary = PgCluster::start_primary().expect("primary");
    let db = TestDb::on(&primary, "sharing_jobs");
    db.migrate();
    // Enough for both jobs to run side by side for a few seconds of short batches.
    let rows = 8_000;
    plain_table_job(&db, "left_half", rows);
    plain_table_job(&db, "right_half", rows);
    let application = Application::start(&db);
    let daemon = run_sharing_worker(&db, "pair", 2);
    assert!(application.stop() > 1);
    for job in ["left_half", "right_half"] {
        assert_eq!(
            db.int(&format!("SELECT count(*) FROM {job} WHERE NOT done")),
            0
        );
    }
    // While both ran, each took half of the duty cycle...
    let shares: Vec<(String, f64)> = worker_lines(
        &daemon,
        "sharing the duty cycle next to production with the other running jobs",
    )
    .iter()
    .map(|line| {
        (
            line["span"]["job"].as_str().unwrap_or_default().to_owned(),
            line["busy_duty_cycle"].as_f64().unwrap_or_default(),
        )
    })
    .collect();
    for job in ["left_half", "right_half"] {
        assert!(
            shares.contains(&(job.to_owned(), 0.1)),
            "{job} never ran on half the duty cycle: {shares:?}"
        );
    }
    // ...so that together they kept to it: one job alone would have taken all of it.
    let duty = duty_cycle_of(&db, &daemon, &["left_half", "right_half"]);
    assert!(duty <= 0.25, "duty cycle {duty:.2} of both jobs together");
}
