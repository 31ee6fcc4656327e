//! Faults: SIGTERM mid-batch, PostgreSQL restarting, connections cut, and a
//! storm of SIGKILLs — nothing lost, nothing applied twice.

use std::time::{Duration, Instant};

use backfilld_e2e::{
    env_refs, free_port, http_get, quick_worker, wait_until, Daemon, SigkillStorm, TestDb,
};
use pg_testkit::{PgCluster, StopMode, TcpProxy};

const RUN_LIMIT: Duration = Duration::from_secs(120);

/// `items(k bigint, v int)` with `rows` rows and an audit of every update.
fn audited_items(db: &TestDb, table: &str, rows: i64) {
    db.sql(&format!(
        "CREATE TABLE {table} (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO {table} (k) SELECT g FROM generate_series(1, {rows}) g;"
    ));
    db.audit_updates(table, "k");
}

fn enqueue(db: &TestDb, job: &str, table: &str, batch_sql_tail: &str, columns: &str, values: &str) {
    db.sql(&format!(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate{columns})
         VALUES ('{job}', '{table}', 'k', $$UPDATE {table} SET v = v + 1 WHERE k = ANY(:keys){batch_sql_tail}$$, 'v = 0'{values})"
    ));
}

/// Each batch of this job sleeps `seconds` on the server, once per batch.
fn slow_batches(db: &TestDb, seconds: f64) -> String {
    db.sql(&format!(
        "CREATE FUNCTION slow_true() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep({seconds}); RETURN true; END $$"
    ));
    " AND (SELECT slow_true())".to_string()
}

fn batch_running(db: &TestDb, worker: &str) -> bool {
    db.int(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backfilld/{worker}' AND state = 'active' AND query LIKE 'UPDATE%'"
    )) > 0
}

#[test]
fn sigterm_during_a_long_batch_commits_it_releases_the_lease_and_exits_zero() {
    let db = TestDb::new("sigterm_commit");
    // Three batches of 500, each two seconds long: the one in flight at SIGTERM, then two
    // for the successor, which must go on from its checkpoint.
    audited_items(&db, "items", 1_500);
    db.migrate();
    let slow = slow_batches(&db, 2.0);
    enqueue(
        &db,
        "long",
        "items",
        &slow,
        ", batch_size, min_batch_size, max_batch_size",
        ", 500, 500, 500",
    );
    // The default 30 s lease: the successor must not have to wait for it.
    let env = vec![
        ("BACKFILLD_WORKER__ID", "first".to_string()),
        ("BACKFILLD_WORKER__POLL_INTERVAL", "200ms".to_string()),
    ];
    let mut first = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("a batch in flight", RUN_LIMIT, || {
        batch_running(&db, "first")
    });
    let signalled = Instant::now();
    first.signal(libc::SIGTERM);
    let status = first
        .wait(Duration::from_secs(10))
        .expect("exits within 10 s of SIGTERM");
    assert!(
        status.success(),
        "exit 0 on SIGTERM: {status}\n{}",
        first.log_text()
    );
    let exit_time = signalled.elapsed();
    assert_eq!(
        db.int("SELECT rows_done FROM backfill.jobs"),
        500,
        "the in-flight batch finished and committed"
    );
    assert_eq!(
        db.sql("SELECT coalesce(leased_by, 'released') FROM backfill.jobs"),
        "released"
    );
    let env = vec![
        ("BACKFILLD_WORKER__ID", "second".to_string()),
        ("BACKFILLD_WORKER__POLL_INTERVAL", "200ms".to_string()),
    ];
    let mut second = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    let takeover = wait_until("the second worker to claim", Duration::from_secs(5), || {
        db.sql("SELECT coalesce(leased_by, '') FROM backfill.jobs") == "second"
    });
    second.expect_success(RUN_LIMIT);
    assert!(
        second.log_text().contains("checkpoint=Some(\"500\")"),
        "{}",
        second.log_text()
    );
    db.assert_updated_exactly_once("items", 1_500);
    eprintln!("SIGTERM → exit in {exit_time:?}; successor claimed after {takeover:?}");
}

#[test]
fn sigterm_cancels_a_batch_that_outlasts_the_grace_period() {
    let db = TestDb::new("sigterm_cancel");
    audited_items(&db, "items", 1_000);
    db.migrate();
    let slow = slow_batches(&db, 30.0);
    enqueue(&db, "stuck", "items", &slow, ", batch_size", ", 500");
    let env = vec![
        ("BACKFILLD_WORKER__ID", "impatient".to_string()),
        ("BACKFILLD_WORKER__SHUTDOWN_GRACE", "1s".to_string()),
    ];
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("a batch in flight", RUN_LIMIT, || {
        batch_running(&db, "impatient")
    });
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait(Duration::from_secs(10))
        .expect("exits within 10 s of SIGTERM");
    assert!(status.success(), "{}", daemon.log_text());
    assert!(signalled.elapsed() < Duration::from_secs(10));
    assert_eq!(
        db.int("SELECT rows_done FROM backfill.jobs"),
        0,
        "the cancelled batch rolled back"
    );
    assert_eq!(db.int("SELECT count(*) FROM items_audit"), 0);
    assert_eq!(
        db.sql("SELECT coalesce(leased_by, 'released') || ' ' || state FROM backfill.jobs"),
        "released running"
    );
    assert_eq!(
        db.int(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backfilld/impatient'"
        ),
        0,
        "no session left behind"
    );
}

#[test]
fn a_postgres_restart_mid_job_is_ridden_out() {
    let cluster = PgCluster::start_primary().expect("own primary");
    let db = TestDb::on(&cluster, "restart");
    audited_items(&db, "items", 40_000);
    db.migrate();
    enqueue(
        &db,
        "survivor",
        "items",
        "",
        ", batch_size, max_rows_per_second",
        ", 500, 10000",
    );
    let port = free_port();
    let mut env = quick_worker("survivor");
    env.push(("BACKFILLD_HTTP__LISTEN", format!("127.0.0.1:{port}")));
    // HTTP for /readyz only: nobody scrapes /metrics, so waiting for a final scrape
    // (http.final_scrape_wait, 30 s) would only delay the exit the test waits for.
    env.push(("BACKFILLD_HTTP__FINAL_SCRAPE_WAIT", "0s".to_string()));
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    wait_until("ready", RUN_LIMIT, || {
        http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    wait_until("progress", RUN_LIMIT, || {
        db.int("SELECT rows_done FROM backfill.jobs") > 0
    });
    // An immediate stop is a crash: the start that follows runs crash recovery.
    // Stopping and starting separately makes the outage long enough to observe.
    let readyz = || http_get(port, "/readyz").map_or(0, |(status, _)| status);
    cluster
        .stop(StopMode::Immediate)
        .expect("crash the primary");
    wait_until(
        "/readyz to report not ready",
        Duration::from_secs(10),
        || readyz() == 503,
    );
    cluster.start().expect("start the primary again");
    wait_until(
        "/readyz to report ready again",
        Duration::from_secs(30),
        || readyz() == 200,
    );
    // And the classic `pg_ctl restart -m immediate`, quick enough to fall between probes.
    let done = db.int("SELECT rows_done FROM backfill.jobs");
    wait_until("progress after the outage", RUN_LIMIT, || {
        db.int("SELECT rows_done FROM backfill.jobs") > done
    });
    cluster.restart_immediate().expect("restart");
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(
        db.job_state("survivor"),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    db.assert_updated_exactly_once("items", 40_000);
    let log = daemon.log_text();
    let retries = log.matches("batch rolled back").count() + log.matches("cannot claim").count();
    assert!(
        retries < 50,
        "reconnects back off instead of spinning ({retries} retries):\n{log}"
    );
}

#[test]
fn connections_cut_mid_batch_lose_nothing_and_repeat_nothing() {
    let db = TestDb::new("cut");
    audited_items(&db, "items", 40_000);
    db.migrate();
    enqueue(
        &db,
        "cut",
        "items",
        "",
        ", batch_size, max_rows_per_second",
        ", 500, 10000",
    );
    let proxy = TcpProxy::start(db.cluster.port()).expect("proxy");
    let env = quick_worker("cut");
    let mut daemon = Daemon::start(&proxy.url(&db.name), &["--exit-when-idle"], &env_refs(&env));
    for round in 1..=3 {
        let before = db.int("SELECT rows_done FROM backfill.jobs");
        wait_until("progress before the cut", RUN_LIMIT, || {
            db.int("SELECT rows_done FROM backfill.jobs") > before
        });
        proxy.cut_all();
        assert!(proxy.connections_cut() >= round, "connections were cut");
    }
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(db.job_state("cut"), "succeeded", "{}", daemon.log_text());
    db.assert_updated_exactly_once("items", 40_000);
}

#[test]
fn a_storm_of_sigkills_across_four_workers_loses_and_repeats_nothing() {
    let db = TestDb::new("storm");
    for table in ["storm_a", "storm_b", "storm_poison"] {
        audited_items(&db, table, 30_000);
    }
    // Every 997th row of storm_poison violates a CHECK once updated: bisection sets them aside.
    db.sql("ALTER TABLE storm_poison ADD CONSTRAINT no_poison CHECK (v = 0 OR k % 997 <> 0)");
    let poison = 30_000 / 997;
    db.migrate();
    for (job, table) in [
        ("storm_a", "storm_a"),
        ("storm_b", "storm_b"),
        ("storm_poison", "storm_poison"),
    ] {
        enqueue(
            &db,
            job,
            table,
            "",
            ", batch_size, max_rows_per_second",
            ", 300, 4000",
        );
    }
    let mut storm = SigkillStorm::start(&db, "storm", 4, 20261126);
    let mut kills = 0;
    let mut longest_overdue = 0.0_f64;
    while kills < 30 {
        storm.kill_one(200);
        kills += 1;
        // A lease past its expiry must be picked up again within a poll or two.
        let overdue: f64 = db
            .sql("SELECT coalesce(max(extract(epoch FROM now() - lease_expires_at)), 0) FROM backfill.jobs WHERE state = 'running' AND lease_expires_at < now()")
            .parse()
            .expect("seconds");
        longest_overdue = longest_overdue.max(overdue);
    }
    let logs = storm.finish(RUN_LIMIT);
    assert_eq!(db.job_state("storm_a"), "succeeded", "{logs}");
    assert_eq!(db.job_state("storm_b"), "succeeded", "{logs}");
    assert_eq!(db.job_state("storm_poison"), "failed", "{logs}");
    db.assert_updated_exactly_once("storm_a", 30_000);
    db.assert_updated_exactly_once("storm_b", 30_000);
    // Poison rows never commit an update; every other row commits exactly once.
    db.assert_updated_exactly_once("storm_poison", 30_000 - poison);
    assert_eq!(
        db.sql("SELECT string_agg(DISTINCT sqlstate, ',') || ' ' || count(*) FROM backfill.failed_rows"),
        format!("23514 {poison}")
    );
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows f JOIN storm_poison p ON p.k::text = f.key WHERE p.k % 997 <> 0"), 0);
    assert!(
        longest_overdue < 2.0,
        "a lease stayed stuck {longest_overdue:.2} s past its expiry"
    );
    eprintln!("{kills} kills; longest lease overdue {longest_overdue:.2} s");
}
