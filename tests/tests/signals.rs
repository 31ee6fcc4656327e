//! More throttle signals end to end, each made to trip for real: the operator's incident
//! button (`backfill.throttle` / `backfill.unthrottle`), WAL retained by a replication
//! slot whose consumer stopped, a throttle query the operator flips, and a VACUUM of the
//! job's table. Each test shows the job holding within two probe
//! intervals of the signal tripping (read from an audit trail of every row the job
//! updates, on the database's clock) and resuming after.

use std::time::Duration;

use backfilld_e2e::{
    env_refs, free_port, http_get, quick_worker_json_log, readme_engineer_grants,
    serve_app_latency, wait_until, Daemon, Prometheus, TestDb,
};
use pg_testkit::demo_data::{users_table_sql, SPLIT_NAME_JOB_SQL};
use pg_testkit::PgCluster;

const RUN_LIMIT: Duration = Duration::from_secs(60);
/// The default `throttle.probe_interval`.
const PROBE_INTERVAL: f64 = 0.25;
/// What a batch already running when the signal trips may still take to commit, and what
/// scheduling on a loaded test machine adds: the job's batches are 100 rows of a few ms.
const SLACK: f64 = 0.15;
/// Rows the test job has: far more than it writes during a test at [`RATE`].
const ROWS: i64 = 200_000;
/// The test job's rows per second, in batches of at most 100 rows.
const RATE: i64 = 1_000;

/// The users table with an audit trail and the split-name job, slow enough to be still
/// running when the test is done with it.
fn slow_job(db: &TestDb, parallelism: i32) {
    db.sql(&users_table_sql(ROWS));
    db.audit_updates("users", "id");
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    db.sql(&format!(
        "UPDATE backfill.jobs SET max_batch_size = 100, max_rows_per_second = {RATE}, parallelism = {parallelism}"
    ));
}

/// The database's clock, in seconds since the epoch (the audit trail's clock).
fn db_now(db: &TestDb) -> f64 {
    db.sql("SELECT extract(epoch FROM clock_timestamp())")
        .parse()
        .expect("epoch")
}

/// When the job last updated a row (epoch seconds), 0 if never.
fn last_update(db: &TestDb) -> f64 {
    db.sql("SELECT coalesce(extract(epoch FROM max(at)), 0) FROM users_audit")
        .parse()
        .expect("epoch")
}

/// When the job first updated a row after `after` (epoch seconds), if it has.
fn first_update_after(db: &TestDb, after: f64) -> Option<f64> {
    let at = db.sql(&format!(
        "SELECT extract(epoch FROM min(at)) FROM users_audit WHERE at > to_timestamp({after})"
    ));
    (!at.is_empty()).then(|| at.parse().expect("epoch"))
}

/// Every row of `job_status` (the job and its slices) as `state|reason`, sorted, deduplicated.
fn throttle_states(db: &TestDb) -> Vec<String> {
    db.sql(
        "SELECT DISTINCT coalesce(throttle_state, '') || '|' || coalesce(throttle_reason, '') \
           FROM backfill.job_status ORDER BY 1",
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

fn holding_for(db: &TestDb, reason: &str) -> bool {
    throttle_states(db) == [format!("holding|{reason}")]
}

/// Waits until the job updates rows after `since` and returns how long after `since` the
/// first one came.
fn resumed_after(db: &TestDb, since: f64, what: &str) -> f64 {
    wait_until(what, RUN_LIMIT, || first_update_after(db, since).is_some());
    first_update_after(db, since).expect("an update") - since
}

/// Asserts that the job stopped updating rows within two probe intervals of `tripped`,
/// once `job_status` shows it holding for `reason`.
fn assert_holds_within_two_probes(db: &TestDb, tripped: f64, reason: &str) {
    wait_until(
        &format!("job_status: holding for {reason}"),
        RUN_LIMIT,
        || holding_for(db, reason),
    );
    // Holding as the heartbeat reports it; no row was updated since well before that.
    let stopped = last_update(db) - tripped;
    assert!(
        stopped <= 2.0 * PROBE_INTERVAL + SLACK,
        "the job kept updating rows {stopped:.3} s after {reason} tripped"
    );
}

fn daemon_env(worker: &str, port: u16) -> Vec<(&'static str, String)> {
    let mut env = quick_worker_json_log(worker);
    env.push(("BACKFILLD_HTTP__LISTEN", format!("127.0.0.1:{port}")));
    env
}

/// `backfill_throttled{reason}` series of the scrape that are 1.
fn throttled_reasons(port: u16) -> Vec<String> {
    let metrics = http_get(port, "/metrics").expect("/metrics answers").1;
    metrics
        .lines()
        .filter(|line| line.starts_with("backfill_throttled{") && line.ends_with(" 1"))
        .filter_map(|line| line.split("reason=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_incident_button_holds_every_matching_job_and_slice_until_lifted_or_expired() {
    let db = TestDb::new("signals_operator");
    slow_job(&db, 2);
    let port = free_port();
    let mut env = daemon_env("operator", port);
    env.push(("BACKFILLD_WORKER__CONCURRENCY", "2".to_string()));
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("both slices updating rows", RUN_LIMIT, || {
        db.int("SELECT count(*) FROM backfill.jobs WHERE parent_id IS NOT NULL AND rows_done > 0")
            == 2
    });

    // Hold: every job, the SRE's button.
    let pressed = db_now(&db);
    assert_eq!(db.sql("SELECT backfill.throttle(0, '1 hour')"), "1");
    assert_holds_within_two_probes(&db, pressed, "operator");
    assert!(
        throttled_reasons(port).iter().all(|r| r == "operator"),
        "{:?}",
        throttled_reasons(port)
    );
    assert!(!throttled_reasons(port).is_empty());
    wait_until(
        "a 'throttle: holding' log line with reason operator",
        RUN_LIMIT,
        || {
            daemon
                .json_lines("backfilld::worker")
                .iter()
                .any(|line| line["message"] == "throttle: holding" && line["reason"] == "operator")
        },
    );

    // Lifted: runs again within two probe intervals.
    let lifted = db_now(&db);
    assert_eq!(db.sql("SELECT backfill.unthrottle()"), "1");
    let resumed = resumed_after(&db, lifted, "updates after unthrottle");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after unthrottle"
    );

    // A throttle on the parent's exact name reaches its slices, and expires by itself.
    let pressed = db_now(&db);
    assert_eq!(
        db.sql("SELECT backfill.throttle(0, '2 seconds', 'split_full_name')"),
        "1"
    );
    assert_holds_within_two_probes(&db, pressed, "operator");
    let expires: f64 = db
        .sql("SELECT extract(epoch FROM expires_at) FROM backfill.throttles")
        .parse()
        .expect("epoch");
    let resumed = resumed_after(&db, expires, "updates after the throttle expired");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the throttle expired"
    );
    assert!(
        last_update(&db) - pressed > 2.0,
        "it did not wait for the expiry"
    );

    // A pattern matching no job holds nothing.
    assert_eq!(
        db.sql("SELECT backfill.throttle(0, '1 hour', 'other_job%')"),
        "0"
    );
    let since = db_now(&db) + 2.0 * PROBE_INTERVAL + SLACK;
    resumed_after(
        &db,
        since,
        "updates while another job's throttle is in force",
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

#[test]
fn an_operator_ratio_slows_the_job_to_that_share_of_its_rate() {
    let db = TestDb::new("signals_ratio");
    slow_job(&db, 1);
    let env = quick_worker_json_log("ratio");
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    let rows_in = |from: f64, to: f64| {
        db.int(&format!(
            "SELECT count(*) FROM users_audit WHERE at > to_timestamp({from}) AND at <= to_timestamp({to})"
        )) as f64
    };
    wait_until("the job running", RUN_LIMIT, || last_update(&db) > 0.0);
    let start = db_now(&db);
    wait_until("2 s at full rate", RUN_LIMIT, || db_now(&db) >= start + 2.0);
    let full = rows_in(start, start + 2.0) / 2.0;
    assert_eq!(db.sql("SELECT backfill.throttle(0.25, '1 hour')"), "1");
    // Past the two probe intervals the throttle takes to arrive.
    let slowed = db_now(&db) + 2.0 * PROBE_INTERVAL + SLACK;
    wait_until("4 s at a quarter", RUN_LIMIT, || {
        db_now(&db) >= slowed + 4.0
    });
    let quarter = rows_in(slowed, slowed + 4.0) / 4.0;
    let share = quarter / full;
    assert!(
        (0.18..=0.32).contains(&share),
        "throttled to 0.25 the job ran at {quarter:.0} rows/s, {share:.2} of its {full:.0} rows/s"
    );
    assert_eq!(throttle_states(&db), ["throttled|operator"]);
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

#[test]
fn the_incident_button_refuses_nonsense_and_is_only_for_those_granted_it() {
    let db = TestDb::new("signals_button_input");
    db.migrate();
    for (call, mentions) in [
        (
            "SELECT backfill.throttle(1, '1 hour')",
            "ratio must be at least 0 (hold) and below 1",
        ),
        (
            "SELECT backfill.throttle(-0.5, '1 hour')",
            "ratio must be at least 0",
        ),
        (
            "SELECT backfill.throttle('NaN', '1 hour')",
            "ratio must be at least 0",
        ),
        (
            "SELECT backfill.throttle(0, '-5 minutes')",
            "for_interval must be a positive, finite interval",
        ),
        (
            "SELECT backfill.throttle(0, '0 seconds')",
            "for_interval must be a positive",
        ),
        (
            "SELECT backfill.throttle(0, '1 hour', NULL)",
            "job_pattern must be a LIKE pattern on job names",
        ),
        (
            "SELECT backfill.unthrottle(NULL)",
            "job_pattern must be a LIKE pattern",
        ),
    ] {
        let error = db.sql_err(call);
        assert!(error.contains(mentions), "{call}: {error}");
    }
    // Pressing it again for a pattern replaces the earlier throttle.
    db.sql("SELECT backfill.throttle(0.5, '1 hour', 'a%')");
    db.sql("SELECT backfill.throttle(0, '10 minutes', 'a%')");
    assert_eq!(
        db.sql("SELECT ratio || ' ' || (expires_at < now() + interval '11 minutes') FROM backfill.throttles"),
        "0 true"
    );
    assert_eq!(db.sql("SELECT backfill.unthrottle('b%')"), "0");
    assert_eq!(db.sql("SELECT backfill.unthrottle()"), "1");

    // No EXECUTE for PUBLIC; the README's grants give it; nobody writes the table directly.
    db.sql("DROP ROLE IF EXISTS signals_nobody; CREATE ROLE signals_nobody; GRANT USAGE ON SCHEMA backfill TO signals_nobody");
    let denied = db.sql_err("SET ROLE signals_nobody; SELECT backfill.throttle(0, '1 hour')");
    assert!(denied.contains("permission denied"), "{denied}");
    db.sql("DROP ROLE IF EXISTS signals_sre; CREATE ROLE signals_sre");
    db.sql("CREATE TABLE public.users (id bigint PRIMARY KEY)");
    db.sql(&readme_engineer_grants("signals_sre", "public.users"));
    assert_eq!(
        db.sql("SET ROLE signals_sre; SELECT backfill.throttle(0, '1 hour')"),
        "0"
    );
    assert_eq!(
        db.sql("SELECT created_by FROM backfill.throttles"),
        db.sql("SELECT session_user")
    );
    let denied = db.sql_err("SET ROLE signals_sre; DELETE FROM backfill.throttles");
    assert!(denied.contains("permission denied"), "{denied}");
    assert_eq!(
        db.sql("SET ROLE signals_sre; SELECT backfill.unthrottle()"),
        "1"
    );
    db.sql("DROP OWNED BY signals_sre, signals_nobody; DROP ROLE signals_sre, signals_nobody");
}

#[test]
fn a_replication_slot_whose_consumer_stopped_holds_the_job_until_it_is_dropped() {
    // Logical slots need wal_level = logical; slots are the whole cluster's, so this test
    // has a primary of its own.
    let cluster = PgCluster::start_primary_with(&[("wal_level", "logical")]).expect("primary");
    let db = TestDb::on(&cluster, "signals_slot");
    slow_job(&db, 1);
    let mut env = quick_worker_json_log("slot");
    // 4 MiB: far above what the job writes during the test, far below the burst.
    env.push((
        "BACKFILLD_THROTTLE__MAX_SLOT_RETAINED_BYTES",
        (4 * 1024 * 1024).to_string(),
    ));
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the job running", RUN_LIMIT, || last_update(&db) > 0.0);
    // A CDC consumer that connects once and then stops reading.
    db.sql("SELECT 1 FROM pg_create_logical_replication_slot('cdc', 'test_decoding')");
    let since = db_now(&db) + 2.0 * PROBE_INTERVAL + SLACK;
    resumed_after(&db, since, "updates with a slot under its limit");

    // 8 MiB of WAL from another session, never consumed.
    db.sql("SELECT pg_logical_emit_message(true, 'burst', repeat('x', 8 * 1024 * 1024))");
    let tripped = db_now(&db);
    assert_holds_within_two_probes(&db, tripped, "replication_slot");
    wait_until(
        "a 'throttle: holding' log line naming the slot",
        RUN_LIMIT,
        || {
            daemon.json_lines("backfilld::worker").iter().any(|line| {
                line["message"] == "throttle: holding"
                    && line["reason"] == "replication_slot"
                    && line["slots"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("cdc="))
            })
        },
    );

    db.sql("SELECT pg_drop_replication_slot('cdc')");
    let dropped = db_now(&db);
    let resumed = resumed_after(&db, dropped, "updates after the slot was dropped");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the slot was dropped"
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

#[test]
fn a_throttle_query_the_operator_flips_holds_the_job_and_a_failing_one_fails_safe() {
    let db = TestDb::new("signals_query");
    slow_job(&db, 1);
    db.sql("CREATE TABLE public.maintenance (hold boolean NOT NULL); INSERT INTO public.maintenance VALUES (false)");
    let mut env = quick_worker_json_log("query");
    env.push((
        "BACKFILLD_THROTTLE__QUERY",
        "SELECT hold FROM public.maintenance".to_string(),
    ));
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the job running", RUN_LIMIT, || last_update(&db) > 0.0);
    let since = db_now(&db) + 2.0 * PROBE_INTERVAL + SLACK;
    resumed_after(&db, since, "updates while the query says false");

    db.sql("UPDATE public.maintenance SET hold = true");
    let flipped = db_now(&db);
    assert_holds_within_two_probes(&db, flipped, "throttle_query");
    db.sql("UPDATE public.maintenance SET hold = false");
    let flipped = db_now(&db);
    let resumed = resumed_after(&db, flipped, "updates after the query went false");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the query went false"
    );

    // The query cannot run: not knowing holds.
    db.sql("ALTER TABLE public.maintenance RENAME TO maintenance_gone");
    let broken = db_now(&db);
    assert_holds_within_two_probes(&db, broken, "throttle_query");
    wait_until("the query's failure in the log", RUN_LIMIT, || {
        daemon.log_text().contains("throttle.query failed")
    });
    db.sql("ALTER TABLE public.maintenance_gone RENAME TO maintenance");
    let fixed = db_now(&db);
    let resumed = resumed_after(&db, fixed, "updates after the query works again");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the query worked again"
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

#[test]
fn a_vacuum_working_on_the_jobs_table_holds_the_job_until_it_ends() {
    let db = TestDb::new("signals_vacuum");
    slow_job(&db, 1);
    let env = quick_worker_json_log("vacuum");
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the job running", RUN_LIMIT, || last_update(&db) > 0.0);

    // A VACUUM of the job's table slowed to a crawl by its cost delay, from another session.
    let url = db.url();
    let vacuum = std::thread::spawn(move || {
        let session = backfilld_e2e::Session::connect(&url);
        session.execute(
            "SET application_name = 'signals_vacuum'; \
             SET vacuum_cost_delay = '100ms'; SET vacuum_cost_limit = 1",
        );
        session.try_execute("VACUUM public.users")
    });
    wait_until("the VACUUM at work", RUN_LIMIT, || {
        db.int(
            "SELECT count(*) FROM pg_stat_progress_vacuum WHERE relid = 'public.users'::regclass",
        ) == 1
    });
    let started = db_now(&db);
    assert_holds_within_two_probes(&db, started, "vacuum");

    db.sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'signals_vacuum'");
    let ended = db_now(&db);
    let outcome = vacuum.join().expect("the VACUUM thread");
    assert!(
        outcome.as_ref().is_err_and(|e| e.starts_with("57014")),
        "the VACUUM was cancelled: {outcome:?}"
    );
    let resumed = resumed_after(&db, ended, "updates after the VACUUM ended");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the VACUUM ended"
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

/// Emits WAL from another session until told to stop: 4 MiB non-transactional messages
/// (no table grows), one every 100 ms. Sends once the first one is written.
fn wal_burst(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    started: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let session = backfilld_e2e::Session::connect(&url);
        let mut first = true;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            session.execute(
                "SELECT pg_logical_emit_message(false, 'burst', repeat('x', 4 * 1024 * 1024))",
            );
            if std::mem::take(&mut first) {
                started.send(()).expect("the test waits");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

#[test]
fn a_wal_burst_from_another_session_holds_the_job_until_the_rate_falls() {
    // The WAL rate is the whole cluster's: a primary of its own.
    let cluster = PgCluster::start_primary().expect("primary");
    let db = TestDb::on(&cluster, "signals_wal_rate");
    slow_job(&db, 1);
    let port = free_port();
    let mut env = daemon_env("walrate", port);
    // 4 MiB/s: far above what the job writes at its rate, far below the burst.
    env.push((
        "BACKFILLD_THROTTLE__MAX_WAL_BYTES_PER_SECOND",
        (4 * 1024 * 1024).to_string(),
    ));
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the job running", RUN_LIMIT, || last_update(&db) > 0.0);
    let since = db_now(&db) + 2.0 * PROBE_INTERVAL + 1.0 + SLACK;
    resumed_after(&db, since, "updates while only the job writes WAL");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started, first_written) = std::sync::mpsc::channel();
    let burst = wal_burst(db.url(), stop.clone(), started);
    first_written.recv().expect("the burst started");
    // 4 MiB written: the rate over the last second is at the limit from now on.
    let tripped = db_now(&db);
    assert_holds_within_two_probes(&db, tripped, "wal_rate");
    assert_eq!(throttled_reasons(port), ["wal_rate"]);
    wait_until(
        "a 'throttle: holding' log line with the WAL rate",
        RUN_LIMIT,
        || {
            daemon.json_lines("backfilld::worker").iter().any(|line| {
                line["message"] == "throttle: holding"
                    && line["reason"] == "wal_rate"
                    && line["wal_bytes_per_second"]
                        .as_f64()
                        .is_some_and(|rate| rate >= 4.0 * 1024.0 * 1024.0)
            })
        },
    );

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    burst.join().expect("the burst thread");
    let stopped = db_now(&db);
    let resumed = resumed_after(&db, stopped, "updates after the burst");
    // The rate is averaged over the last second (WAL_RATE_WINDOW).
    assert!(
        resumed <= 1.0 + 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the burst ended"
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

/// The archiver's last failure (epoch seconds), if any.
fn last_archive_failure(db: &TestDb) -> Option<f64> {
    let at = db.sql("SELECT extract(epoch FROM last_failed_time) FROM pg_stat_archiver");
    (!at.is_empty()).then(|| at.parse().expect("epoch"))
}

/// Completes the WAL segment being written (writing a little WAL first, so that there
/// is one to complete).
fn switch_wal(db: &TestDb) {
    db.sql("SELECT pg_logical_emit_message(false, 'switch', 'x'); SELECT pg_switch_wal()");
}

#[test]
fn a_failing_archive_command_holds_the_job_and_so_does_a_backlog_of_segments() {
    // The cluster may run as another user than the test: an archive that accepts every
    // segment and keeps none is enough here.
    let copy_to_archive = "true";
    let cluster = PgCluster::start_primary_with(&[
        ("archive_mode", "on"),
        ("archive_command", copy_to_archive),
    ])
    .expect("primary");
    let db = TestDb::on(&cluster, "signals_archive");
    slow_job(&db, 1);
    let env = quick_worker_json_log("archive");
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the job running", RUN_LIMIT, || last_update(&db) > 0.0);
    switch_wal(&db);
    let since = db_now(&db) + 2.0 * PROBE_INTERVAL + SLACK;
    resumed_after(&db, since, "updates while archiving works");

    // The archive breaks; a completed segment the archive_command fails on.
    db.sql("ALTER SYSTEM SET archive_command = 'false'; SELECT pg_reload_conf()");
    switch_wal(&db);
    wait_until("the archiver failing", RUN_LIMIT, || {
        db.sql("SELECT last_failed_time > last_archived_time FROM pg_stat_archiver") == "t"
    });
    let failed = last_archive_failure(&db).expect("a failure");
    assert_holds_within_two_probes(&db, failed, "wal_archive");
    wait_until(
        "a 'throttle: holding' log line saying archiving fails",
        RUN_LIMIT,
        || {
            daemon.json_lines("backfilld::worker").iter().any(|line| {
                line["message"] == "throttle: holding"
                    && line["reason"] == "wal_archive"
                    && line["archive_failing"] == true
            })
        },
    );

    // Archiving works again: the job runs once a segment is archived.
    db.sql(&format!(
        "ALTER SYSTEM SET archive_command = '{copy_to_archive}'; SELECT pg_reload_conf()"
    ));
    switch_wal(&db);
    wait_until("the archiver catching up", RUN_LIMIT, || {
        db.sql("SELECT last_archived_time > last_failed_time FROM pg_stat_archiver") == "t"
    });
    let archived: f64 = db
        .sql("SELECT extract(epoch FROM last_archived_time) FROM pg_stat_archiver")
        .parse()
        .expect("epoch");
    let resumed = resumed_after(&db, archived, "updates after archiving worked again");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after archiving worked again"
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);

    // A backlog alone: failures tolerated, 3 segments waiting hold.
    db.sql("ALTER SYSTEM SET archive_command = 'false'; SELECT pg_reload_conf()");
    let mut env = quick_worker_json_log("archive_backlog");
    env.push((
        "BACKFILLD_THROTTLE__HOLD_WHILE_ARCHIVE_FAILING",
        "false".to_string(),
    ));
    env.push((
        "BACKFILLD_THROTTLE__MAX_ARCHIVE_PENDING_SEGMENTS",
        "3".to_string(),
    ));
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    switch_wal(&db);
    switch_wal(&db);
    wait_until("the archiver failing again", RUN_LIMIT, || {
        db.sql("SELECT last_failed_time > last_archived_time FROM pg_stat_archiver") == "t"
    });
    let since = db_now(&db) + 2.0 * PROBE_INTERVAL + SLACK;
    resumed_after(&db, since, "updates with 2 segments waiting");
    switch_wal(&db);
    let tripped = db_now(&db);
    assert_holds_within_two_probes(&db, tripped, "wal_archive");
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

#[test]
fn a_jobs_own_throttle_query_set_while_it_runs_holds_it_and_runs_read_only() {
    let db = TestDb::new("signals_job_query");
    slow_job(&db, 1);
    db.sql("CREATE TABLE public.job_gate (waiting int NOT NULL); INSERT INTO public.job_gate VALUES (0)");
    let port = free_port();
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&daemon_env("job_query", port)));
    wait_until("the job running", RUN_LIMIT, || last_update(&db) > 0.0);

    // A tunable: set on the running job, with a threshold.
    db.sql(
        "UPDATE backfill.jobs SET throttle_query = 'SELECT waiting FROM job_gate', \
                throttle_query_max = 5",
    );
    db.sql("UPDATE public.job_gate SET waiting = 5");
    let since = db_now(&db) + 2.0 * PROBE_INTERVAL + SLACK;
    resumed_after(&db, since, "updates at the threshold");
    db.sql("UPDATE public.job_gate SET waiting = 6");
    let flipped = db_now(&db);
    assert_holds_within_two_probes(&db, flipped, "throttle_query");
    assert_eq!(throttled_reasons(port), ["throttle_query"]);
    db.sql("UPDATE public.job_gate SET waiting = 0");
    let flipped = db_now(&db);
    let resumed = resumed_after(&db, flipped, "updates after the value fell");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the value fell"
    );

    // It runs read-only: a query that writes fails, which holds, and writes nothing.
    db.sql(
        "UPDATE backfill.jobs SET throttle_query = \
           'WITH gone AS (DELETE FROM job_gate RETURNING 1) SELECT count(*) FROM gone'",
    );
    let changed = db_now(&db);
    assert_holds_within_two_probes(&db, changed, "throttle_query");
    wait_until("the job query's failure in the log", RUN_LIMIT, || {
        daemon.log_text().contains("throttle_query of job 1 failed")
    });
    assert!(daemon.log_text().contains("read-only transaction"));
    assert_eq!(db.int("SELECT count(*) FROM public.job_gate"), 1);
    // Removed: runs again.
    db.sql("UPDATE backfill.jobs SET throttle_query = NULL");
    let removed = db_now(&db);
    let resumed = resumed_after(&db, removed, "updates after the query was removed");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the query was removed"
    );
    // A query slower than throttle.probe_timeout (1 s) holds its job (reason
    // throttle_query), not the probe (which would say probe_failed).
    db.sql("UPDATE backfill.jobs SET throttle_query = 'SELECT 0 FROM pg_sleep(3)'");
    wait_until("holding for the slow query", RUN_LIMIT, || {
        holding_for(&db, "throttle_query")
    });
    wait_until("the slow query's timeout in the log", RUN_LIMIT, || {
        daemon.log_text().contains("statement timeout")
            || daemon
                .log_text()
                .contains("no answer within throttle.probe_timeout")
    });
    db.sql("UPDATE backfill.jobs SET throttle_query = NULL");
    resumed_after(&db, db_now(&db), "updates after the slow query was removed");
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

#[test]
fn a_blank_job_throttle_query_or_a_nonsense_threshold_is_refused_naming_the_column() {
    let db = TestDb::new("signals_job_query_bad");
    db.sql("CREATE TABLE public.users (id bigint PRIMARY KEY, v text)");
    db.migrate();
    for (column, value, mentions) in [
        (
            "throttle_query",
            "'  '",
            "throttle_query of job 'j' is blank",
        ),
        (
            "throttle_query_max",
            "'NaN'",
            "throttle_query_max of job 'j' must be a finite number",
        ),
    ] {
        let error = db.sql_err(&format!(
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, {column}) \
             VALUES ('j', 'public.users', 'id', 'UPDATE public.users SET v = ''x'' WHERE id = ANY(:keys)', {value})"
        ));
        assert!(error.contains(mentions), "{column}: {error}");
    }
    assert_eq!(db.int("SELECT count(*) FROM backfill.jobs"), 0);
    // An engineer with the README's grants may set both.
    db.sql("DROP ROLE IF EXISTS signals_eng; CREATE ROLE signals_eng");
    db.sql(&readme_engineer_grants("signals_eng", "public.users"));
    db.sql(
        "SET ROLE signals_eng; \
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, throttle_query, throttle_query_max) \
         VALUES ('j', 'public.users', 'id', 'UPDATE public.users SET v = ''x'' WHERE id = ANY(:keys)', 'SELECT 1', 2); \
         UPDATE backfill.jobs SET throttle_query = 'SELECT 0', throttle_query_max = 0.5",
    );
    assert_eq!(
        db.sql("SELECT throttle_query || ' ' || throttle_query_max FROM backfill.jobs"),
        "SELECT 0 0.5"
    );
    db.sql("DELETE FROM backfill.jobs; DROP OWNED BY signals_eng; DROP ROLE signals_eng");
}

#[test]
fn plan_names_the_signals_that_would_hold_the_job_now() {
    let db = TestDb::new("signals_plan");
    db.sql(&users_table_sql(1_000));
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    let plan = db.backfilld(&["plan", "split_full_name"]);
    assert!(plan.status.success(), "{}", plan.stderr);
    assert!(
        plan.stdout
            .contains("holds now      none: every throttle signal lets the job run"),
        "{}",
        plan.stdout
    );

    // The job (pending, not running yet) has its own query saying hold, and the
    // operator pressed the button.
    db.sql("UPDATE backfill.jobs SET throttle_query = 'SELECT true'");
    db.sql("SELECT backfill.throttle(0, '1 hour')");
    let plan = db.backfilld(&["plan", "split_full_name"]);
    assert!(plan.status.success(), "{}", plan.stderr);
    assert!(
        plan.stdout
            .contains("holds now      throttle_query, operator"),
        "{}",
        plan.stdout
    );
    let json = db.backfilld(&["plan", "split_full_name", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&json.stdout).expect("plan --json");
    assert_eq!(
        report["holding_signals"],
        serde_json::json!(["throttle_query", "operator"])
    );
    // Nothing was changed: the job is still pending, the throttle still there.
    assert_eq!(db.job_state("split_full_name"), "pending");
    assert_eq!(db.sql("SELECT backfill.unthrottle()"), "1");
}

/// Waits until Prometheus has `app_latency_seconds == value` and returns when (database
/// clock), polled every 20 ms so the time is close to when the daemon could first see it.
fn prometheus_has(db: &TestDb, prometheus: &Prometheus, value: f64) -> f64 {
    wait_until(
        &format!("Prometheus to have app_latency_seconds {value}"),
        RUN_LIMIT,
        || {
            let has = prometheus.app_latency() == Some(value);
            if !has {
                std::thread::sleep(Duration::from_millis(20));
            }
            has
        },
    );
    db_now(db)
}

#[test]
fn a_prometheus_query_over_its_threshold_holds_the_job_and_so_does_an_unreachable_prometheus() {
    let db = TestDb::new("signals_prometheus");
    slow_job(&db, 1);
    let latency = std::sync::Arc::new(std::sync::Mutex::new(0.1));
    let prometheus =
        Prometheus::scraping_every_second(serve_app_latency(latency.clone()), RUN_LIMIT);
    prometheus_has(&db, &prometheus, 0.1);
    let port = free_port();
    let mut env = daemon_env("prometheus", port);
    for (key, value) in [
        (
            "BACKFILLD_THROTTLE__PROMETHEUS_URL",
            format!("http://127.0.0.1:{}", prometheus.port()),
        ),
        (
            "BACKFILLD_THROTTLE__PROMETHEUS_QUERY",
            "max(app_latency_seconds)".to_string(),
        ),
        ("BACKFILLD_THROTTLE__PROMETHEUS_MAX", "0.5".to_string()),
        ("BACKFILLD_THROTTLE__PROMETHEUS_RESUME", "0.3".to_string()),
    ] {
        env.push((key, value));
    }
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the job running", RUN_LIMIT, || last_update(&db) > 0.0);

    // The app slows down: held within two probe intervals of Prometheus knowing it.
    *latency.lock().expect("value") = 0.9;
    let crossed = prometheus_has(&db, &prometheus, 0.9);
    assert_holds_within_two_probes(&db, crossed, "prometheus");
    assert_eq!(throttled_reasons(port), ["prometheus"]);
    wait_until(
        "a 'throttle: holding' log line with the value",
        RUN_LIMIT,
        || {
            daemon.json_lines("backfilld::worker").iter().any(|line| {
                line["message"] == "throttle: holding"
                    && line["reason"] == "prometheus"
                    && line["prometheus"] == "0.9"
            })
        },
    );
    // Between resume and max: still held (hysteresis).
    *latency.lock().expect("value") = 0.4;
    let between = prometheus_has(&db, &prometheus, 0.4);
    let since = between + 2.0 * PROBE_INTERVAL + SLACK;
    std::thread::sleep(Duration::from_secs_f64(2.0 * PROBE_INTERVAL + 2.0 * SLACK));
    assert!(holding_for(&db, "prometheus"), "{:?}", throttle_states(&db));
    assert!(
        first_update_after(&db, since).is_none(),
        "it ran between resume and max"
    );
    // Recovered: runs again.
    *latency.lock().expect("value") = 0.2;
    let recovered = prometheus_has(&db, &prometheus, 0.2);
    let resumed = resumed_after(&db, recovered, "updates after the latency recovered");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the latency recovered"
    );

    // Prometheus gone: not knowing holds.
    drop(prometheus);
    let gone = db_now(&db);
    assert_holds_within_two_probes(&db, gone, "prometheus");
    wait_until("the unreachable Prometheus in the log", RUN_LIMIT, || {
        daemon.log_text().contains("Prometheus at http://127.0.0.1")
    });
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

/// The dead-tuple ratio of public.users as the statistics have it.
fn dead_ratio(db: &TestDb) -> f64 {
    db.sql(
        "SELECT n_dead_tup::float8 / greatest(n_live_tup + n_dead_tup, 1) \
           FROM pg_stat_user_tables WHERE relid = 'public.users'::regclass",
    )
    .parse()
    .expect("a ratio")
}

#[test]
fn dead_rows_piling_up_in_the_jobs_table_hold_it_until_vacuum_cleans_them() {
    let db = TestDb::new("signals_dead_tuples");
    slow_job(&db, 1);
    // Autovacuum would race the test's own VACUUM.
    db.sql("ALTER TABLE public.users SET (autovacuum_enabled = false)");
    let mut env = quick_worker_json_log("dead_tuples");
    env.push((
        "BACKFILLD_THROTTLE__MAX_DEAD_TUPLE_RATIO",
        "0.15".to_string(),
    ));
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the job running", RUN_LIMIT, || last_update(&db) > 0.0);
    let since = db_now(&db) + 2.0 * PROBE_INTERVAL + SLACK;
    resumed_after(&db, since, "updates with few dead rows");

    // Another session rewrites half the table (its triggers off: not the job's updates):
    // a ratio of 1/3, or less while n_live_tup is still overestimated.
    db.sql(
        "SET session_replication_role = replica; \
         UPDATE public.users SET full_name = full_name WHERE id % 2 = 0",
    );
    wait_until("the statistics counting the dead rows", RUN_LIMIT, || {
        dead_ratio(&db) >= 0.15
    });
    let tripped = db_now(&db);
    assert_holds_within_two_probes(&db, tripped, "dead_tuples");
    wait_until(
        "a 'throttle: holding' log line with the ratio",
        RUN_LIMIT,
        || {
            daemon.json_lines("backfilld::worker").iter().any(|line| {
                line["message"] == "throttle: holding"
                    && line["reason"] == "dead_tuples"
                    && line["dead_tuple_ratio"].as_f64().is_some_and(|r| r >= 0.15)
            })
        },
    );

    db.sql("VACUUM public.users");
    wait_until("the statistics seeing the vacuum", RUN_LIMIT, || {
        dead_ratio(&db) < 0.075
    });
    let cleaned = db_now(&db);
    let resumed = resumed_after(&db, cleaned, "updates after the vacuum");
    assert!(
        resumed <= 2.0 * PROBE_INTERVAL + SLACK,
        "resumed {resumed:.3} s after the vacuum"
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}
