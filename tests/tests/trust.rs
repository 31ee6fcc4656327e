//! Never a silent wrong result: keys and checkpoints that no session setting can bend,
//! a walk that always ends, the definition a job ran is the one it reports, queue state
//! that only the daemon writes, engineer SQL with the engineer's rights, and jobs that
//! cannot harm each other. Each test is a case a hostile or careless user hit.

use std::time::Duration;

use backfilld_e2e::{
    backfilld_at, env_refs, quick_worker, readme_engineer_grants, wait_until, Daemon, Session,
    TestDb,
};

const RUN_LIMIT: Duration = Duration::from_secs(90);

/// Runs `backfilld run --exit-when-idle` with `env` until it exits cleanly.
fn run_until_idle(db: &TestDb, env: &[(&'static str, String)]) -> Daemon {
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(env));
    daemon.expect_success(RUN_LIMIT);
    daemon
}

fn job_field(db: &TestDb, job: &str, column: &str) -> String {
    db.sql(&format!(
        "SELECT {column} FROM backfill.jobs WHERE name = '{job}'"
    ))
}

/// A URL for `role` on `db` (the test kit's clusters trust loopback connections).
fn url_as(db: &TestDb, role: &str) -> String {
    db.url().replacen("postgres@", &format!("{role}@"), 1)
}

/// Key types and how to make 1,500 distinct keys of each from `g`, chosen so that
/// their text differs under the settings below: floats with 17 significant digits,
/// timestamps with microseconds, intervals, bytea.
const KEY_TYPES: &[(&str, &str, &str)] = &[
    ("kt_float8", "float8", "1000000 + g / 3.0"),
    (
        "kt_timestamptz",
        "timestamptz",
        "timestamptz '2024-03-10 01:00:00+00' + g * interval '37 minutes 0.123457 seconds'",
    ),
    (
        "kt_timestamp",
        "timestamp",
        "timestamp '2024-01-31 23:00:00' + g * interval '1 day 1.5 seconds'",
    ),
    ("kt_numeric", "numeric", "g / 7.0"),
    ("kt_text", "text", "'key ' || g"),
    ("kt_uuid", "uuid", "md5(g::text)::uuid"),
    (
        "kt_interval",
        "interval",
        "g * interval '1 day 3 hours 0.25 seconds'",
    ),
    (
        "kt_bytea",
        "bytea",
        "decode(lpad(to_hex(g), 8, '0'), 'hex')",
    ),
    ("kt_date", "date", "date '1999-12-31' + g"),
];

/// Settings a role or database can carry that change how keys print and parse.
fn hostile_settings(db: &TestDb, role: &str, round: usize) {
    let settings: &[&str] = if round == 0 {
        &[
            "extra_float_digits = 0",
            "DateStyle = 'SQL, MDY'",
            "TimeZone = 'Asia/Shanghai'",
            "IntervalStyle = 'sql_standard'",
            "bytea_output = 'escape'",
        ]
    } else {
        &[
            "extra_float_digits = -15",
            "DateStyle = 'German, DMY'",
            "TimeZone = 'America/St_Johns'",
            "IntervalStyle = 'iso_8601'",
            "bytea_output = 'hex'",
        ]
    };
    for setting in settings {
        db.sql(&format!(
            "ALTER ROLE {role} IN DATABASE \"{}\" SET {setting}",
            db.name
        ));
    }
}

#[test]
fn keys_and_checkpoints_read_back_the_same_under_any_session_setting() {
    let db = TestDb::new("trust_keys");
    db.migrate();
    for (table, key_type, key) in KEY_TYPES {
        db.sql(&format!(
            "CREATE TABLE {table} (k {key_type} PRIMARY KEY, v int NOT NULL DEFAULT 0);
             INSERT INTO {table} (k) SELECT {key} FROM generate_series(1, 1500) g;
             INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate,
                                        batch_size, min_batch_size, max_batch_size, max_rows_per_second)
             VALUES ('{table}', '{table}', 'k', $$UPDATE {table} SET v = v + 1 WHERE k = ANY(:keys)$$,
                     'v = 0', 100, 100, 100, 3000);"
        ));
    }
    // The daemon's own role carries the settings (ALTER ROLE … IN DATABASE reaches every
    // session of it there, the daemon's included).
    hostile_settings(&db, "postgres", 0);
    let mut env = quick_worker("trust_keys");
    env.push(("BACKFILLD_WORKER__CONCURRENCY", "9".to_string()));
    env.push(("BACKFILLD_DATABASE__POOL_SIZE", "12".to_string()));
    // First run: stop every job half-way, with checkpoints written under these settings.
    let mut first = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("every job has a checkpoint", RUN_LIMIT, || {
        db.int(
            "SELECT count(*) FROM backfill.jobs WHERE checkpoint IS NOT NULL AND rows_done >= 300",
        ) == KEY_TYPES.len() as i64
    });
    first.signal(libc::SIGTERM);
    first.expect_success(Duration::from_secs(20));
    assert!(
        db.int("SELECT count(*) FROM backfill.jobs WHERE state = 'succeeded'")
            < KEY_TYPES.len() as i64,
        "the first run was to stop half-way"
    );
    // Second run under other settings reads those checkpoints back and finishes.
    hostile_settings(&db, "postgres", 1);
    let daemon = run_until_idle(&db, &env);
    for (table, key_type, _) in KEY_TYPES {
        assert_eq!(
            job_field(&db, table, "state"),
            "succeeded",
            "{key_type}: {}\n{}",
            job_field(&db, table, "last_error"),
            daemon.log_text()
        );
        // v = 0: skipped; v = 2: applied twice.
        assert_eq!(
            db.sql(&format!(
                "SELECT v || ':' || count(*) FROM {table} GROUP BY v ORDER BY v"
            )),
            "1:1500",
            "{key_type}: every row exactly once"
        );
        assert_eq!(job_field(&db, table, "rows_done"), "1500", "{key_type}");
    }
}

#[test]
fn a_statement_that_changes_session_settings_cannot_bend_its_keys() {
    let db = TestDb::new("trust_set_config");
    db.migrate();
    // A poison row (the CHECK) makes the batch bisect; check_predicate makes every
    // statement be checked afterwards: both parse keys after the statement changed
    // DateStyle and TimeZone for the rest of the transaction.
    db.sql(
        "CREATE TABLE events (k timestamptz PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO events (k) SELECT timestamptz '2024-01-02 03:04:05.678901+00' + g * interval '1 hour 0.5 s'
           FROM generate_series(1, 2000) g;
         ALTER TABLE events ADD CONSTRAINT poison CHECK (v = 0 OR k <> timestamptz '2024-01-02 03:04:05.678901+00' + 777 * interval '1 hour 0.5 s');
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, check_predicate, batch_size)
         VALUES ('bend', 'events', 'k',
                 $$UPDATE events SET v = v + 1
                    WHERE k = ANY(:keys)
                      AND set_config('DateStyle', 'SQL, DMY', true) IS NOT NULL
                      AND set_config('TimeZone', 'Pacific/Chatham', true) IS NOT NULL
                      AND set_config('extra_float_digits', '0', true) IS NOT NULL$$,
                 'v = 0', 'v <> 1', 500);",
    );
    let daemon = run_until_idle(&db, &quick_worker("trust_set_config"));
    let poison = db.sql(
        "SELECT (timestamptz '2024-01-02 03:04:05.678901+00' + 777 * interval '1 hour 0.5 s')::text",
    );
    assert_eq!(
        db.sql("SELECT string_agg(key || ':' || reason, ',') FROM backfill.failed_rows"),
        format!("{poison}:error"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        db.sql("SELECT v || ':' || count(*) FROM events GROUP BY v ORDER BY v"),
        "0:1\n1:1999"
    );
    assert_eq!(job_field(&db, "bend", "state"), "failed");
    assert!(job_field(&db, "bend", "last_error").starts_with("1 rows failed"));
}

#[test]
fn one_jobs_session_state_never_reaches_another() {
    let db = TestDb::new("trust_isolation");
    db.migrate();
    db.sql(
        "CREATE TABLE a (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         CREATE TABLE b (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         CREATE TABLE c (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO a (k) SELECT g FROM generate_series(1, 1000) g;
         INSERT INTO b (k) SELECT g FROM generate_series(1, 1000) g;
         INSERT INTO c (k) SELECT g FROM generate_series(1, 1000) g;
         -- The first job leaves its session pointing nowhere and read-only; the next
         -- ones name their tables without a schema and write.
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size, priority)
         VALUES ('spoiler', 'a', 'k',
                 $$UPDATE a SET v = 1 WHERE k = ANY(:keys)
                      AND set_config('search_path', 'nowhere', false) IS NOT NULL
                      AND set_config('default_transaction_read_only', 'on', false) IS NOT NULL
                      AND set_config('statement_timeout', '1', false) IS NOT NULL$$,
                 'v = 0', 250, 10),
                ('second', 'b', 'k', $$UPDATE b SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 250, 5),
                ('third', 'c', 'k', $$UPDATE c SET v = 1 WHERE k BETWEEN :first_key AND :last_key AND v = 0$$, 'v = 0', 250, 1);",
    );
    let mut env = quick_worker("trust_isolation");
    // Two connections, one job at a time: every job gets the spoiler's connections.
    env.push(("BACKFILLD_DATABASE__POOL_SIZE", "2".to_string()));
    let daemon = run_until_idle(&db, &env);
    for (job, table) in [("spoiler", "a"), ("second", "b"), ("third", "c")] {
        assert_eq!(
            job_field(&db, job, "state"),
            "succeeded",
            "{job}: {}\n{}",
            job_field(&db, job, "last_error"),
            daemon.log_text()
        );
        assert_eq!(
            db.int(&format!("SELECT count(*) FROM {table} WHERE v = 1")),
            1000
        );
    }
}

#[test]
fn a_statement_that_moves_its_own_keys_ends() {
    let db = TestDb::new("trust_moving");
    db.migrate();
    db.sql(
        "CREATE TABLE moving (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO moving (k) SELECT g FROM generate_series(1, 3000) g;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, batch_size)
         VALUES ('mover', 'moving', 'k', $$UPDATE moving SET k = k + 100000, v = v + 1 WHERE k = ANY(:keys)$$, 200);",
    );
    db.audit_updates("moving", "v");
    let daemon = run_until_idle(&db, &quick_worker("trust_moving"));
    // Every row once, however far it moved: the walk ended at the last key it found.
    assert_eq!(
        db.sql("SELECT v || ':' || count(*) FROM moving GROUP BY v ORDER BY v"),
        "1:3000",
        "{}",
        daemon.log_text()
    );
    assert_eq!(job_field(&db, "mover", "rows_done"), "3000");
    assert_eq!(job_field(&db, "mover", "state"), "failed");
    assert!(
        job_field(&db, "mover", "last_error").contains("moves rows' keys"),
        "{}",
        job_field(&db, "mover", "last_error")
    );
}

#[test]
fn a_statement_that_moves_keys_a_little_is_still_applied_once_per_row() {
    let db = TestDb::new("trust_creeping");
    db.migrate();
    // Each row moves 10 keys forward: into the part of the range not walked yet.
    db.sql(
        "CREATE TABLE creeping (k bigint PRIMARY KEY, id int NOT NULL UNIQUE, v int NOT NULL DEFAULT 0);
         INSERT INTO creeping (k, id) SELECT g * 1000, g FROM generate_series(1, 2000) g;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size)
         VALUES ('creeper', 'creeping', 'k', $$UPDATE creeping SET k = k + 10, v = v + 1 WHERE k = ANY(:keys)$$, 'v < 1000', 100);",
    );
    let daemon = run_until_idle(&db, &quick_worker("trust_creeping"));
    assert_eq!(
        job_field(&db, "creeper", "state"),
        "failed",
        "{}",
        daemon.log_text()
    );
    assert!(
        job_field(&db, "creeper", "last_error").contains("moves rows' keys"),
        "{}",
        job_field(&db, "creeper", "last_error")
    );
    // Bounded: no row was applied more than the batches it met before the job stopped.
    assert!(
        db.int("SELECT max(v) FROM creeping") <= 2,
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_definition_cannot_change_under_a_running_job_and_starts_over_when_paused() {
    let db = TestDb::new("trust_definition");
    db.migrate();
    db.sql(
        "CREATE TABLE old_items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         CREATE TABLE new_items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO old_items (k) SELECT g FROM generate_series(1, 3000) g;
         INSERT INTO new_items (k) SELECT g FROM generate_series(1, 2000) g;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size, max_rows_per_second)
         VALUES ('edit', 'old_items', 'k', $$UPDATE old_items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 100, 1000);",
    );
    let env = quick_worker("trust_definition");
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the job runs", RUN_LIMIT, || {
        db.int("SELECT rows_done FROM backfill.jobs WHERE name = 'edit'") >= 300
    });
    for change in [
        "table_name = 'new_items', batch_sql = $$UPDATE new_items SET v = 1 WHERE k = ANY(:keys)$$",
        "pending_predicate = 'v < 0'",
        "name = 'renamed'",
    ] {
        let refused = db.sql_err(&format!(
            "UPDATE backfill.jobs SET {change} WHERE name = 'edit'"
        ));
        assert!(
            refused.contains(
                "its definition cannot change while it runs; select backfill.pause('edit') first"
            ),
            "{refused}"
        );
    }
    // Tunables may change at any time.
    db.sql("UPDATE backfill.jobs SET max_rows_per_second = 2000, priority = 3 WHERE name = 'edit'");
    db.sql("SELECT backfill.pause('edit')");
    let done_before = db.int("SELECT count(*) FROM old_items WHERE v = 1");
    assert!(done_before > 0);
    db.sql(
        "UPDATE backfill.jobs SET table_name = 'new_items',
                batch_sql = $$UPDATE new_items SET v = 1 WHERE k = ANY(:keys)$$ WHERE name = 'edit'",
    );
    // Started over: the progress of the old definition is not the new one's.
    assert_eq!(
        db.sql("SELECT phase || ':' || coalesce(checkpoint, '-') || ':' || rows_done FROM backfill.jobs WHERE name = 'edit'"),
        "scan:-:0"
    );
    db.sql("SELECT backfill.resume('edit')");
    wait_until("the edited job ends", RUN_LIMIT, || {
        db.job_state("edit") == "succeeded"
    });
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(Duration::from_secs(20));
    assert_eq!(db.int("SELECT count(*) FROM new_items WHERE v = 1"), 2000);
    assert_eq!(job_field(&db, "edit", "rows_done"), "2000");
    assert_eq!(job_field(&db, "edit", "table_name"), "public.new_items");
    // The old table kept what the old definition did, no more.
    assert_eq!(
        db.int("SELECT count(*) FROM old_items WHERE v = 1"),
        done_before
    );
    // A finished job's definition is what it ran.
    let refused = db.sql_err("UPDATE backfill.jobs SET batch_sql = $$UPDATE new_items SET v = 2 WHERE k = ANY(:keys)$$ WHERE name = 'edit'");
    assert!(
        refused.contains("job 'edit' has succeeded: its definition is what it ran"),
        "{refused}"
    );
}

/// An engineer role with exactly the grants README.md's "Least privilege" section gives.
fn readme_engineer(db: &TestDb, engineer: &str, tables: &str) {
    db.sql(&format!(
        "CREATE ROLE {engineer} LOGIN; {}",
        readme_engineer_grants(engineer, tables)
    ));
}

#[test]
fn queue_state_is_the_daemons_alone() {
    let db = TestDb::new("trust_queue_state");
    db.migrate();
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, 3000) g;
         ALTER TABLE items ADD CONSTRAINT no_poison CHECK (v = 0 OR k % 1000 <> 7);",
    );
    let engineer = format!("eng_{}", db.name);
    readme_engineer(&db, &engineer, "items");
    let as_engineer = Session::connect(&url_as(&db, &engineer));
    let refused = |sql: &str| -> String {
        as_engineer
            .try_execute(sql)
            .expect_err(&format!("refused: {sql}"))
    };
    // With README's grants: state columns are not theirs to write at all.
    let err = refused(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, state)
         VALUES ('done', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 'succeeded')",
    );
    assert!(err.contains("permission denied"), "{err}");
    as_engineer.execute(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, parallelism, batch_size)
         VALUES ('sliced', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 3, 200)",
    );
    assert_eq!(job_field(&db, "sliced", "enqueued_by"), engineer);
    let env = quick_worker("trust_queue_state");
    let daemon = run_until_idle(&db, &env);
    assert_eq!(
        job_field(&db, "sliced", "state"),
        "failed",
        "{}",
        daemon.log_text()
    );
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 3);
    for sql in [
        "UPDATE backfill.jobs SET upper_key = NULL WHERE name = 'sliced#1'",
        "UPDATE backfill.jobs SET state = 'succeeded' WHERE name = 'sliced'",
        "UPDATE backfill.jobs SET rows_done = 0, checkpoint = NULL WHERE name = 'sliced'",
        "UPDATE backfill.failed_rows SET key = '1'",
        "DELETE FROM backfill.failed_rows",
    ] {
        let err = refused(sql);
        assert!(err.contains("permission denied"), "{sql}: {err}");
    }
    // Even a role granted whole tables (README's old advice) cannot: the triggers refuse.
    let careless = format!("careless_{}", db.name);
    db.sql(&format!(
        "CREATE ROLE {careless} LOGIN;
         GRANT USAGE ON SCHEMA backfill TO {careless};
         GRANT SELECT, INSERT, UPDATE, DELETE ON backfill.jobs, backfill.failed_rows TO {careless};
         GRANT SELECT ON items TO {careless};"
    ));
    let as_careless = Session::connect(&url_as(&db, &careless));
    for (sql, expected) in [
        (
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, state) VALUES ('x', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 'succeeded')",
            "backfill.jobs: state set by backfilld alone",
        ),
        (
            "UPDATE backfill.jobs SET upper_key = '100000' WHERE name = 'sliced#1'",
            "backfill.jobs: upper_key of job 'sliced#1' is queue state",
        ),
        (
            "UPDATE backfill.jobs SET state = 'succeeded', last_error = NULL WHERE name = 'sliced'",
            "backfill.jobs: last_error, state of job 'sliced' is queue state",
        ),
        (
            "UPDATE backfill.failed_rows SET key = '1'",
            "backfill.failed_rows is written by backfilld alone",
        ),
    ] {
        let err = as_careless.try_execute(sql).expect_err(sql);
        assert!(err.contains(expected), "{sql}: {err}");
    }
    // Steering through the functions works for the engineer; a fixed row is retried, a
    // row deleted since it failed is forgotten, not counted as applied.
    db.sql("ALTER TABLE items DROP CONSTRAINT no_poison; DELETE FROM items WHERE k = 1007");
    as_engineer.execute("SELECT backfill.retry_failed('sliced')");
    let daemon = run_until_idle(&db, &env);
    assert_eq!(
        job_field(&db, "sliced", "state"),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v = 0"), 0);
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 0);
    assert_eq!(
        db.int("SELECT sum(rows_done) FROM backfill.jobs WHERE name LIKE 'sliced%'"),
        2999,
        "2,997 rows at first, 2 retried; the deleted row is not counted"
    );
}

#[test]
fn engineer_sql_runs_with_the_engineers_rights() {
    let db = TestDb::new("trust_rights");
    db.migrate();
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, 1000) g;",
    );
    let engineer = format!("eng_{}", db.name);
    readme_engineer(&db, &engineer, "items");
    let as_engineer = Session::connect(&url_as(&db, &engineer));
    // pg_read_file needs superuser (or pg_read_server_files); the daemon here is one.
    as_engineer.execute(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
         VALUES ('reader', 'items', 'k',
                 $$UPDATE items SET v = length(pg_read_file('PG_VERSION')) WHERE k = ANY(:keys)$$, 'v = 0')",
    );
    // plan, run by a superuser, tries the statement as the engineer.
    let plan = db.backfilld(&["plan", "reader", "--json"]);
    // A failed trial batch exits 1, after the report.
    assert_eq!(plan.status.code(), Some(1), "{plan:?}");
    let report: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan --json");
    assert!(
        report["trial_error"]
            .as_str()
            .is_some_and(|e| e.contains("permission denied for function pg_read_file")),
        "{report}"
    );
    let env = quick_worker("trust_rights");
    let daemon = run_until_idle(&db, &env);
    assert_eq!(
        job_field(&db, "reader", "state"),
        "failed",
        "{}",
        daemon.log_text()
    );
    assert!(
        job_field(&db, "reader", "last_error")
            .contains("permission denied for function pg_read_file"),
        "{}",
        job_field(&db, "reader", "last_error")
    );
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v <> 0"), 0);
    // The test kit's daemon runs as a superuser: it says what that risks.
    assert!(
        daemon
            .log_text()
            .contains("the daemon's role is a superuser: an engineer's SQL that resets its role would run as one"),
        "{}",
        daemon.log_text()
    );
    // SQL that drops the engineer's role to act as the daemon is refused, and nothing of
    // its batch stays.
    as_engineer.execute(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
         VALUES ('escaper', 'items', 'k',
                 $$UPDATE items SET v = 1 WHERE k = ANY(:keys) AND set_config('role', 'none', true) IS NOT NULL$$, 'v = 0')",
    );
    let daemon = run_until_idle(&db, &env);
    assert_eq!(
        job_field(&db, "escaper", "state"),
        "failed",
        "{}",
        daemon.log_text()
    );
    assert!(
        job_field(&db, "escaper", "last_error").contains(&format!(
            "changed the session's role from {engineer} to postgres"
        )),
        "{}",
        job_field(&db, "escaper", "last_error")
    );
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v <> 0"), 0);
}

#[test]
fn a_stuck_job_rests_and_other_jobs_keep_flowing() {
    let db = TestDb::new("trust_stuck");
    db.migrate();
    db.sql(
        "CREATE TABLE held (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         CREATE TABLE free (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO held (k) SELECT g FROM generate_series(1, 100) g;
         INSERT INTO free (k) SELECT g FROM generate_series(1, 1000) g;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, priority)
         VALUES ('blocked', 'held', 'k', $$UPDATE held SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 10),
                ('other', 'free', 'k', $$UPDATE free SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 0);",
    );
    // An idle-in-transaction session holds the first row for ever.
    let holder = db.session();
    holder.execute("BEGIN; SELECT * FROM held WHERE k = 1 FOR UPDATE;");
    let mut env = quick_worker("trust_stuck");
    env.push(("BACKFILLD_BATCH__LOCK_TIMEOUT", "200ms".to_string()));
    env.push(("BACKFILLD_WORKER__STUCK_AFTER", "2s".to_string()));
    env.push(("BACKFILLD_WORKER__STUCK_REST", "3s".to_string()));
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    // One slot: the other job runs only because the stuck one gave its slot back.
    wait_until("the other job ends", RUN_LIMIT, || {
        db.job_state("other") == "succeeded"
    });
    assert_eq!(
        db.job_state("blocked"),
        "pending".to_string() + "",
        "{}",
        daemon.log_text()
    );
    let why = job_field(&db, "blocked", "last_error");
    assert!(
        why.starts_with("not moving: every batch failed for 2s (last: ")
            && why.contains("lock timeout"),
        "{why}"
    );
    let status = db.sql("SELECT throttle_reason || ':' || (last_error IS NOT NULL) FROM backfill.job_status WHERE name = 'blocked'");
    assert_eq!(status, "stuck:true");
    // Once the lock goes, the rested job comes back and ends.
    holder.execute("ROLLBACK");
    wait_until("the rested job ends", RUN_LIMIT, || {
        db.job_state("blocked") == "succeeded"
    });
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(Duration::from_secs(20));
    assert_eq!(db.int("SELECT count(*) FROM held WHERE v = 1"), 100);
    assert_eq!(job_field(&db, "blocked", "last_error"), "");
}

#[test]
fn a_key_that_may_be_null_is_refused_and_never_panics_a_worker() {
    let db = TestDb::new("trust_null_key");
    db.migrate();
    db.sql(
        "CREATE TABLE nullable (k bigint UNIQUE, v int NOT NULL DEFAULT 0);
         INSERT INTO nullable (k) SELECT g FROM generate_series(1, 100) g;
         INSERT INTO nullable (k) VALUES (NULL), (NULL);",
    );
    let refused = db.sql_err(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql)
         VALUES ('nullable', 'nullable', 'k', $$UPDATE nullable SET v = 1 WHERE k = ANY(:keys)$$)",
    );
    assert!(
        refused.contains("key_column: column k of table public.nullable may be NULL; rows with a NULL key cannot be walked in key order"),
        "{refused}"
    );
    // A key made nullable after the INSERT: the job fails at claim, the worker lives on.
    db.sql(
        "CREATE TABLE later (k bigint NOT NULL UNIQUE, v int NOT NULL DEFAULT 0);
         INSERT INTO later (k) SELECT g FROM generate_series(1, 100) g;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql)
         VALUES ('later', 'later', 'k', $$UPDATE later SET v = 1 WHERE k = ANY(:keys)$$);
         ALTER TABLE later ALTER COLUMN k DROP NOT NULL;
         INSERT INTO later (k) VALUES (NULL);",
    );
    let daemon = run_until_idle(&db, &quick_worker("trust_null_key"));
    assert_eq!(db.job_state("later"), "failed", "{}", daemon.log_text());
    assert!(
        job_field(&db, "later", "last_error").contains("may be NULL"),
        "{}",
        job_field(&db, "later", "last_error")
    );
    // Rates that are not numbers are refused too.
    db.sql("CREATE TABLE rated (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0)");
    for rate in ["NaN", "Infinity"] {
        let refused = db.sql_err(&format!(
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, max_rows_per_second)
             VALUES ('rate', 'rated', 'k', $$UPDATE rated SET v = 1 WHERE k = ANY(:keys)$$, '{rate}')"
        ));
        assert!(
            refused.contains("max_rows_per_second must be a positive number"),
            "{refused}"
        );
    }
}

#[test]
fn two_live_workers_with_one_id_never_take_each_others_job() {
    let db = TestDb::new("trust_same_id");
    db.migrate();
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, 3000) g;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size, max_rows_per_second)
         VALUES ('shared', 'items', 'k', $$UPDATE items SET v = v + 1 WHERE k = ANY(:keys)$$, 'v = 0', 100, 1000);",
    );
    db.audit_updates("items", "k");
    let env = quick_worker("same-id");
    let mut one = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    let mut two = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    one.expect_success(RUN_LIMIT);
    two.expect_success(RUN_LIMIT);
    let claims = [&one, &two]
        .iter()
        .map(|daemon| daemon.log_text().matches("claimed job").count())
        .sum::<usize>();
    assert_eq!(claims, 1, "{}\n{}", one.log_text(), two.log_text());
    assert_eq!(db.job_state("shared"), "succeeded");
    db.assert_backfilled_exactly_once("items", 3000);
}

#[test]
fn a_superuser_running_plan_changes_nothing_of_an_engineers_job() {
    // The case: `plan`, run by a superuser, executed an engineer's privileged
    // call as superuser. Covered with pg_read_file above; here lo_export, whose effect
    // (a file on the server) no rollback undoes.
    let db = TestDb::new("trust_plan");
    db.migrate();
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, 10) g;
         SELECT lo_from_bytea(4242, 'leak');",
    );
    let engineer = format!("eng_{}", db.name);
    readme_engineer(&db, &engineer, "items");
    let target = std::env::temp_dir().join(format!("{}-lo-export", db.name));
    let _ = std::fs::remove_file(&target);
    Session::connect(&url_as(&db, &engineer)).execute(&format!(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql)
         VALUES ('exporter', 'items', 'k',
                 $$UPDATE items SET v = lo_export(4242, '{}') WHERE k = ANY(:keys)$$)",
        target.display()
    ));
    let plan = backfilld_at(&db.url(), &["plan", "exporter", "--json"], &[]);
    assert_eq!(plan.status.code(), Some(1), "{plan:?}");
    assert!(
        plan.stdout
            .contains("permission denied for function lo_export"),
        "{}",
        plan.stdout
    );
    assert!(
        !target.exists(),
        "lo_export ran with the superuser's rights"
    );
}
