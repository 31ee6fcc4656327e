//! The walking skeleton end to end: enqueue by SQL, claim, backfill exactly once,
//! leases and fencing, steering, refused definitions, key types.

use std::time::Duration;

use backfilld_e2e::{env_refs, quick_worker, quick_worker_json_log, wait_until, Daemon, TestDb};
use pg_testkit::demo_data::{split_name_single_update, users_table_sql, SPLIT_NAME_JOB_SQL};

const RUN_LIMIT: Duration = Duration::from_secs(120);

fn table_hash(db: &TestDb, table: &str) -> String {
    db.sql(&format!(
        "SELECT md5(string_agg(concat_ws('|', id, full_name, first_name, last_name), E'\\n' ORDER BY id)) FROM {table}"
    ))
}

#[test]
fn split_name_backfill_matches_the_single_update() {
    let db = TestDb::new("split_name");
    db.sql(&users_table_sql(200_000));
    db.sql("CREATE TABLE users_reference AS SELECT * FROM users");
    db.sql(&split_name_single_update("users_reference"));
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    let env = quick_worker("split");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(
        db.job_state("split_full_name"),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    assert_eq!(table_hash(&db, "users"), table_hash(&db, "users_reference"));
    assert_eq!(
        db.int("SELECT rows_done FROM backfill.jobs"),
        200_000,
        "every row starts with first_name NULL"
    );
    assert_eq!(
        db.int("SELECT count(*) FROM users WHERE first_name IS NULL"),
        0
    );
    let status = db.sql("SELECT percent, rows_remaining, failed_rows FROM backfill.job_status");
    assert_eq!(status, "100.0|0|0");
}

#[test]
fn every_pending_row_is_updated_exactly_once_across_sigkills() {
    let db = TestDb::new("sigkill");
    db.sql(&users_table_sql(60_000));
    db.audit_updates("users", "id");
    db.migrate();
    // Small batches and a rate limit keep the job running long enough to be killed mid-way.
    db.sql(&SPLIT_NAME_JOB_SQL.replace(
        "'first_name IS NULL');",
        "'first_name IS NULL'); UPDATE backfill.jobs SET max_rows_per_second = 15000, batch_size = 500, max_batch_size = 2000;",
    ));
    let pending = 60_000; // every row starts with first_name NULL
    let env = quick_worker("killed");
    let mut kills = 0;
    let mut last_done = 0;
    while kills < 4 {
        let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
        // Kill only once this incarnation has committed progress of its own.
        wait_until("progress after restart", RUN_LIMIT, || {
            db.int("SELECT rows_done FROM backfill.jobs") > last_done
                || db.job_state("split_full_name") == "succeeded"
        });
        if db.job_state("split_full_name") == "succeeded" {
            break;
        }
        daemon.signal(libc::SIGKILL);
        daemon
            .wait(Duration::from_secs(10))
            .expect("killed daemon exits");
        kills += 1;
        last_done = db.int("SELECT rows_done FROM backfill.jobs");
    }
    assert!(
        kills >= 3,
        "the job finished before the daemon could be killed 3 times ({kills})"
    );
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(
        db.job_state("split_full_name"),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    db.assert_updated_exactly_once("users", pending);
    assert_eq!(db.int("SELECT rows_done FROM backfill.jobs"), pending);
}

#[test]
fn migrate_twice_is_a_no_op() {
    let db = TestDb::new("migrate_twice");
    db.migrate();
    let objects = "SELECT count(*) FROM pg_class WHERE relnamespace = 'backfill'::regnamespace";
    let before = db.int(objects);
    db.migrate();
    assert_eq!(db.int(objects), before);
    let migrations = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crates/backfill-queue/migrations"
    ))
    .expect("migrations dir")
    .count() as i64;
    assert_eq!(
        db.int("SELECT count(*) FROM backfill._sqlx_migrations"),
        migrations,
        "each applied once"
    );
    assert_eq!(
        db.int("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        0,
        "nothing of ours in public"
    );
}

/// A table `items` with `rows` rows keyed by `key_type`, each with `v = 0`.
fn items_table(db: &TestDb, key_type: &str, key_expr: &str, rows: i64) {
    db.sql(&format!(
        "CREATE TABLE items (k {key_type} PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT {key_expr} FROM generate_series(1, {rows}) AS g;"
    ));
}

fn enqueue_increment(
    db: &TestDb,
    name: &str,
    table: &str,
    extra_columns: &str,
    extra_values: &str,
) {
    db.sql(&format!(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate{extra_columns})
         VALUES ('{name}', '{table}', 'k', $$UPDATE {table} SET v = v + 1 WHERE k = ANY(:keys)$$, 'v = 0'{extra_values})"
    ));
}

#[test]
fn bigint_integer_uuid_text_and_timestamptz_keys_backfill_correctly() {
    let cases = [
        ("bigint", "g::bigint * 1000"),
        ("integer", "g"),
        ("uuid", "md5(g::text)::uuid"),
        ("text", "'key-' || g"),
        (
            "timestamptz",
            "'2020-01-01'::timestamptz + g * interval '1 second 17 microseconds'",
        ),
    ];
    for (key_type, key_expr) in cases {
        let db = TestDb::new(&format!("keys_{key_type}"));
        items_table(&db, key_type, key_expr, 5_000);
        db.audit_updates("items", "k");
        db.migrate();
        enqueue_increment(
            &db,
            "increment",
            "items",
            // min = max: the size stays 700 however slow a loaded machine makes a batch.
            ", batch_size, min_batch_size, max_batch_size",
            ", 700, 700, 700",
        );
        let env = quick_worker(key_type);
        let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
        daemon.expect_success(RUN_LIMIT);
        assert_eq!(
            db.job_state("increment"),
            "succeeded",
            "{key_type}: {}",
            daemon.log_text()
        );
        assert_eq!(
            db.int("SELECT count(*) FROM items WHERE v <> 1"),
            0,
            "{key_type}: every row exactly +1"
        );
        db.assert_updated_exactly_once("items", 5_000);
        assert_eq!(
            db.int("SELECT batches_done FROM backfill.jobs"),
            (5_000 + 699) / 700,
            "{key_type}"
        );
    }
}

#[test]
fn first_key_and_last_key_placeholders_bound_a_range() {
    // Without :keys a batch selects only its first and last key and how many there are,
    // where the key type has min/max; uuid has none, so its keys are listed.
    let cases = [
        ("bigint", "g", "span"),
        ("text", "'key-' || g", "span"),
        (
            "timestamptz",
            "'2020-01-01'::timestamptz + g * interval '1 second 17 microseconds'",
            "span",
        ),
        ("uuid", "md5(g::text)::uuid", "each_key"),
    ];
    for (key_type, key_expr, key_selection) in cases {
        let db = TestDb::new(&format!("range_{key_type}"));
        items_table(&db, key_type, key_expr, 3_000);
        db.audit_updates("items", "k");
        db.migrate();
        db.sql(
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size, min_batch_size, max_batch_size)
             VALUES ('by_range', 'public.items', 'k',
                     $$UPDATE items SET v = v + 1 WHERE k BETWEEN :first_key AND :last_key AND v = 0$$, 'v = 0', 1000, 1000, 1000)",
        );
        let env = quick_worker_json_log(&format!("range-{key_type}"));
        let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
        daemon.expect_success(RUN_LIMIT);
        assert_eq!(
            db.job_state("by_range"),
            "succeeded",
            "{key_type}: {}",
            daemon.log_text()
        );
        db.assert_updated_exactly_once("items", 3_000);
        assert_eq!(
            db.sql("SELECT batches_done || '|' || rows_done FROM backfill.jobs"),
            "3|3000",
            "{key_type}: three batches of 1000"
        );
        let resolved: Vec<_> = daemon
            .json_lines("backfilld::worker")
            .into_iter()
            .filter(|line| line["message"] == "resolved the job")
            .collect();
        assert!(
            !resolved.is_empty()
                && resolved
                    .iter()
                    .all(|line| line["key_selection"] == key_selection),
            "{key_type}: keys selected as {key_selection}: {resolved:?}"
        );
        let batch_keys: Vec<i64> = daemon
            .json_lines("backfilld::batch")
            .iter()
            .filter_map(|line| line["keys"].as_i64())
            .collect();
        assert_eq!(batch_keys, [1000, 1000, 1000], "{key_type}");
    }
}

#[test]
fn two_workers_three_jobs_each_done_once_by_one_worker() {
    let db = TestDb::new("two_workers");
    for table in ["items_a", "items_b", "items_c"] {
        db.sql(&format!(
            "CREATE TABLE {table} (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
             INSERT INTO {table} (k) SELECT g FROM generate_series(1, 20000) g;"
        ));
        db.audit_updates(table, "k");
    }
    db.migrate();
    for (job, table) in [
        ("job_a", "items_a"),
        ("job_b", "items_b"),
        ("job_c", "items_c"),
    ] {
        // A rate limit makes each job last about 2 s, so both workers are busy at once.
        enqueue_increment(
            &db,
            job,
            table,
            ", batch_size, max_rows_per_second",
            ", 500, 10000",
        );
    }
    let env_one = quick_worker("worker-one");
    let env_two = quick_worker("worker-two");
    let mut one = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env_one));
    let mut two = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env_two));
    one.expect_success(RUN_LIMIT);
    two.expect_success(RUN_LIMIT);
    for (job, table) in [
        ("job_a", "items_a"),
        ("job_b", "items_b"),
        ("job_c", "items_c"),
    ] {
        assert_eq!(
            db.job_state(job),
            "succeeded",
            "{job}\n{}\n{}",
            one.log_text(),
            two.log_text()
        );
        db.assert_updated_exactly_once(table, 20_000);
        // Without failures no job ever changes hands: each was run by exactly one worker.
        assert_eq!(
            db.int(&format!("SELECT count(DISTINCT app) FROM {table}_audit")),
            1,
            "{job} ran on one worker"
        );
    }
    let apps = db.sql("SELECT string_agg(DISTINCT app, ',' ORDER BY app) FROM (SELECT app FROM items_a_audit UNION ALL SELECT app FROM items_b_audit UNION ALL SELECT app FROM items_c_audit) a");
    assert_eq!(
        apps, "backfilld/worker-one,backfilld/worker-two",
        "both workers took part"
    );
}

/// The worker's batch statement (`UPDATE items …`) is running on the server.
fn batch_statement_running(db: &TestDb, worker: &str) -> bool {
    db.int(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backfilld/{worker}' \
         AND state = 'active' AND query LIKE 'UPDATE items%'"
    )) > 0
}

#[test]
fn a_frozen_worker_loses_its_lease_and_its_late_commit_is_fenced() {
    let db = TestDb::new("fencing");
    items_table(&db, "bigint", "g", 6_000);
    db.audit_updates("items", "k");
    // Each batch takes ≥ 0.3 s on the server, so a worker can be frozen mid-batch.
    db.sql("CREATE FUNCTION slow_true() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.3); RETURN true; END $$");
    db.migrate();
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size, max_batch_size)
         VALUES ('fenced', 'public.items', 'k',
                 $$UPDATE items SET v = v + 1 WHERE k = ANY(:keys) AND (SELECT slow_true())$$, 'v = 0', 500, 500)",
    );
    let env_a = quick_worker("frozen");
    let mut frozen = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env_a));
    wait_until("a first committed batch", RUN_LIMIT, || {
        db.int("SELECT rows_done FROM backfill.jobs") > 0
    });
    // Freeze the worker while its batch statement runs: the statement completes on the
    // server and the transaction stays open, holding its row locks, fence not yet passed.
    let mut attempts = 0;
    loop {
        wait_until("the batch statement to run", RUN_LIMIT, || {
            batch_statement_running(&db, "frozen")
        });
        frozen.signal(libc::SIGSTOP);
        let in_transaction = || {
            db.sql("SELECT state FROM pg_stat_activity WHERE application_name = 'backfilld/frozen' AND xact_start IS NOT NULL AND query LIKE 'UPDATE items%'")
        };
        wait_until(
            "the frozen batch to leave the active state",
            Duration::from_secs(5),
            || in_transaction() != "active",
        );
        if in_transaction() == "idle in transaction" {
            break;
        }
        frozen.signal(libc::SIGCONT);
        attempts += 1;
        assert!(attempts < 20, "could not freeze the worker mid-batch");
    }
    let done_when_frozen = db.int("SELECT rows_done FROM backfill.jobs");
    wait_until("the frozen worker's lease to expire", RUN_LIMIT, || {
        db.sql("SELECT lease_expires_at < now() FROM backfill.jobs") == "t"
    });
    let env_b = quick_worker("successor");
    let mut successor = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env_b));
    wait_until("the successor to take the job over", RUN_LIMIT, || {
        db.sql("SELECT leased_by FROM backfill.jobs") == "successor"
    });
    frozen.signal(libc::SIGCONT);
    successor.expect_success(RUN_LIMIT);
    frozen.expect_success(RUN_LIMIT);
    assert_eq!(db.job_state("fenced"), "succeeded");
    db.assert_updated_exactly_once("items", 6_000);
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v <> 1"), 0);
    let frozen_log = frozen.log_text();
    assert!(
        frozen_log.contains("lease lost") || frozen_log.contains("lease gone"),
        "the frozen worker noticed it lost the job:\n{frozen_log}"
    );
    let successor_log = successor.log_text();
    let resumed_at = format!("checkpoint=Some(\"{done_when_frozen}\")");
    assert!(
        successor_log.contains(&resumed_at),
        "the successor resumed from the checkpoint {done_when_frozen}:\n{successor_log}"
    );
}

#[test]
fn pause_resume_and_cancel_take_effect_within_two_seconds() {
    let db = TestDb::new("steering");
    items_table(&db, "bigint", "g", 200_000);
    db.migrate();
    enqueue_increment(
        &db,
        "steered",
        "items",
        ", batch_size, max_rows_per_second",
        ", 200, 4000",
    );
    let env = quick_worker("steered");
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    let rows_done = || db.int("SELECT rows_done FROM backfill.jobs");
    let lets_go = |daemon: &Daemon| daemon.log_text().matches("lease gone").count();
    let limit = Duration::from_secs(2);

    wait_until("progress", RUN_LIMIT, || rows_done() > 0);
    db.sql("SELECT backfill.pause('steered')");
    wait_until("the worker to let go after pause() in SQL", limit, || {
        lets_go(&daemon) == 1
    });
    let paused_at = rows_done();
    assert_eq!(db.job_state("steered"), "paused");

    let resumed = db.backfilld(&["resume", "steered"]);
    assert!(resumed.status.success(), "{}", resumed.stderr);
    assert_eq!(resumed.stdout.trim(), "job steered: pending");
    wait_until("progress after `backfilld resume`", limit, || {
        rows_done() > paused_at
    });

    let paused = db.backfilld(&["pause", "steered"]);
    assert!(paused.status.success(), "{}", paused.stderr);
    wait_until(
        "the worker to let go after `backfilld pause`",
        limit,
        || lets_go(&daemon) == 2,
    );
    let paused_at = rows_done();

    db.sql("SELECT backfill.resume('steered')");
    wait_until("progress after resume() in SQL", limit, || {
        rows_done() > paused_at
    });

    let cancelled = db.backfilld(&["cancel", "steered"]);
    assert!(cancelled.status.success(), "{}", cancelled.stderr);
    wait_until(
        "the worker to let go after `backfilld cancel`",
        limit,
        || lets_go(&daemon) == 3,
    );
    let cancelled_at = rows_done();
    assert_eq!(db.job_state("steered"), "cancelled");

    daemon.signal(libc::SIGTERM);
    daemon.expect_success(Duration::from_secs(10));
    assert_eq!(
        rows_done(),
        cancelled_at,
        "nothing committed after the worker let go"
    );
    assert!(
        cancelled_at < 200_000,
        "the job was cancelled before it finished"
    );
    let again = db.backfilld(&["cancel", "steered"]);
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(
        again.stderr.trim(),
        "backfilld: job 'steered' is already cancelled"
    );
    let missing = db.backfilld(&["pause", "nope"]);
    assert_eq!(missing.status.code(), Some(2));
    assert_eq!(
        missing.stderr.trim(),
        "backfilld: no backfill job named 'nope'"
    );
}

/// Each refused definition, with the message the INSERT (and `backfilld enqueue`) gives.
#[test]
fn bad_job_definitions_are_refused_at_insert_with_a_clear_message() {
    let db = TestDb::new("refused");
    items_table(&db, "bigint", "g", 10);
    db.sql("ALTER TABLE items ADD COLUMN plain int");
    db.migrate();
    let ok_sql = "$$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$";
    let cases: Vec<(String, &str)> = vec![
        (format!("('', 'items', 'k', {ok_sql}, NULL, NULL, NULL, NULL)"), "backfill job name must not be empty"),
        (format!("('j', 'nope', 'k', {ok_sql}, NULL, NULL, NULL, NULL)"), "table_name: table 'nope' does not exist"),
        (format!("('j', 'items', 'nope', {ok_sql}, NULL, NULL, NULL, NULL)"), "key_column: column 'nope' does not exist in table public.items"),
        (format!("('j', 'items', 'plain', {ok_sql}, NULL, NULL, NULL, NULL)"), "key_column: column plain of table public.items has no unique index on it alone; batches need a unique, ordered key"),
        ("('j', 'items', 'k', $$UPDATE items SET v = 1$$, NULL, NULL, NULL, NULL)".to_string(), "batch_sql uses none of :keys, :first_key, :last_key, so it cannot be limited to a batch"),
        (format!("('j', 'items', 'k', {ok_sql}, NULL, 0, NULL, NULL)"), "batch_size must be positive, got 0"),
        (format!("('j', 'items', 'k', {ok_sql}, NULL, -5, NULL, NULL)"), "batch_size must be positive, got -5"),
        (format!("('j', 'items', 'k', {ok_sql}, NULL, NULL, 500, 100)"), "min_batch_size (500) is greater than max_batch_size (100)"),
        (format!("('j', 'items', 'k', {ok_sql}, NULL, 50, 100, 200)"), "batch_size (50) is outside min_batch_size..max_batch_size (100..200)"),
        (format!("('j', 'items', 'k', {ok_sql}, 'v + 1', NULL, NULL, NULL)"), "pending_predicate is not a valid boolean expression over public.items: argument of WHERE must be type boolean, not type integer"),
        (format!("('j', 'items', 'k', {ok_sql}, 'nope IS NULL', NULL, NULL, NULL)"), "pending_predicate is not a valid boolean expression over public.items: column \"nope\" does not exist"),
        (format!("('j', 'items', 'k', {ok_sql}, 'true; DROP TABLE items', NULL, NULL, NULL)"), "pending_predicate must be a single boolean expression, without \";\""),
    ];
    for (values, message) in &cases {
        let err = db.sql_err(&format!(
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size, min_batch_size, max_batch_size) VALUES {values}"
        ));
        assert!(
            err.contains(&format!("ERROR:  {message}")),
            "expected {message:?} in:\n{err}"
        );
    }
    assert_eq!(
        db.int("SELECT count(*) FROM backfill.jobs"),
        0,
        "nothing was enqueued"
    );
    assert_eq!(
        db.int("SELECT count(*) FROM items"),
        10,
        "the injection attempt harmed nothing"
    );

    // The CLI goes through the same INSERT and says the same, with exit code 2.
    let refused = db.backfilld(&[
        "enqueue",
        "--name",
        "j",
        "--table",
        "items",
        "--key",
        "plain",
        "--sql",
        "UPDATE items SET v = 1 WHERE k = ANY(:keys)",
    ]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert_eq!(
        refused.stderr.trim(),
        "backfilld: key_column: column plain of table public.items has no unique index on it alone; batches need a unique, ordered key"
    );
    let accepted = db.backfilld(&[
        "enqueue",
        "--name",
        "j",
        "--table",
        "items",
        "--key",
        "k",
        "--sql",
        "UPDATE items SET v = 1 WHERE k = ANY(:keys)",
    ]);
    assert!(accepted.status.success(), "{accepted:?}");
    let duplicate = db.backfilld(&[
        "enqueue",
        "--name",
        "j",
        "--table",
        "items",
        "--key",
        "k",
        "--sql",
        "UPDATE items SET v = 1 WHERE k = ANY(:keys)",
    ]);
    assert_eq!(duplicate.status.code(), Some(2));
    assert_eq!(
        duplicate.stderr.trim(),
        "backfilld: a backfill job with this name already exists"
    );
    assert_eq!(
        db.sql("SELECT table_name FROM backfill.jobs"),
        "public.items",
        "stored schema-qualified"
    );
}
