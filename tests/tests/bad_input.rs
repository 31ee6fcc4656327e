//! Bad input: job definitions the INSERT refuses, jobs that pass it but cannot run,
//! configurations and command lines that cannot work. Every case asserts the exact
//! message and that nothing else was harmed. (skeleton.rs holds 12 more refused
//! INSERTs, `enqueue` of a bad and of a duplicate job, and `pause` of a missing one.)

use std::time::{Duration, Instant};

use backfilld_e2e::{backfilld_at, env_refs, free_port, quick_worker, wait_until, Daemon, TestDb};

const RUN_LIMIT: Duration = Duration::from_secs(120);

/// `items(k bigint, v int, note text, doc json)` with `rows` rows, every `v = 0`.
fn items(db: &TestDb, rows: i64) {
    db.sql(&format!(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0, note text, doc json);
         INSERT INTO items (k) SELECT g FROM generate_series(1, {rows}) g;"
    ));
}

/// A job `good` that sets `v = 1` on every row of its own table `good`: the bystander
/// that must succeed whatever the broken jobs beside it do.
fn good_job(db: &TestDb) {
    db.sql(
        "CREATE TABLE good (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO good (k) SELECT g FROM generate_series(1, 2000) g;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
         VALUES ('good', 'good', 'k', $$UPDATE good SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0');",
    );
}

fn assert_good_job_succeeded(db: &TestDb, daemon: &Daemon) {
    assert_eq!(db.job_state("good"), "succeeded", "{}", daemon.log_text());
    assert_eq!(db.int("SELECT count(*) FROM good WHERE v = 1"), 2000);
}

fn last_error(db: &TestDb, job: &str) -> String {
    db.sql(&format!(
        "SELECT state || ': ' || coalesce(last_error, '') FROM backfill.jobs WHERE name = '{job}'"
    ))
}

/// The `ERROR:` line of a psql failure, without the prefix.
fn error_line(psql_stderr: &str) -> &str {
    psql_stderr
        .lines()
        .find_map(|line| line.strip_prefix("ERROR:  "))
        .unwrap_or_else(|| panic!("no ERROR line in {psql_stderr}"))
}

#[test]
fn more_bad_definitions_are_refused_at_insert_naming_the_problem() {
    let db = TestDb::new("refused_more");
    items(&db, 10);
    db.sql("CREATE VIEW items_view AS SELECT * FROM items");
    db.migrate();
    let ok_sql = "$$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$";
    let insert = |columns: &str, values: &str| {
        format!(
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql{columns}) VALUES ({values})"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        (
            insert("", &format!("'j', 'items; DROP TABLE items', 'k', {ok_sql}")),
            "table_name 'items; DROP TABLE items' is not a valid table name: invalid name syntax",
        ),
        (
            insert("", &format!("'j', 'items', 'k; DROP TABLE items', {ok_sql}")),
            "key_column: column 'k; DROP TABLE items' does not exist in table public.items",
        ),
        (
            insert("", &format!("'j', 'items_view', 'k', {ok_sql}")),
            "table_name: public.items_view is not a table",
        ),
        (
            // json has no ordering, so no unique index can exist on it.
            insert("", &format!("'j', 'items', 'doc', {ok_sql}")),
            "key_column: column doc of table public.items has no unique index on it alone; batches need a unique, ordered key",
        ),
        (
            insert("", &format!("'   ', 'items', 'k', {ok_sql}")),
            "backfill job name must not be empty",
        ),
        (
            insert("", &format!("NULL, 'items', 'k', {ok_sql}")),
            "backfill job name must not be empty",
        ),
        (
            insert(", target_batch_ms", &format!("'j', 'items', 'k', {ok_sql}, 0")),
            "target_batch_ms must be positive, got 0",
        ),
        (
            insert(", max_rows_per_second", &format!("'j', 'items', 'k', {ok_sql}, -1")),
            "max_rows_per_second must be positive (or NULL for no limit), got -1",
        ),
        (
            insert(", max_attempts", &format!("'j', 'items', 'k', {ok_sql}, 0")),
            "max_attempts must be positive, got 0",
        ),
        (
            insert(", max_batch_size", &format!("'j', 'items', 'k', {ok_sql}, -1")),
            "max_batch_size must be positive, got -1",
        ),
        (
            insert(", check_predicate", &format!("'j', 'items', 'k', {ok_sql}, 'v'")),
            "check_predicate is not a valid boolean expression over public.items: argument of WHERE must be type boolean, not type integer",
        ),
        (
            insert(", pending_predicate", &format!("'j', 'items', 'k', {ok_sql}, '  '")),
            "pending_predicate must not be empty (use NULL for none)",
        ),
        (
            // Pasted into the daemon's `WHERE … AND (predicate)` this would select every
            // row after every checkpoint: the same batch over and over.
            insert(", pending_predicate", &format!("'j', 'items', 'k', {ok_sql}, 'v = 0) OR (true'")),
            "pending_predicate must be a single boolean expression, but it does not parse on its own: syntax error at or near \")\"",
        ),
        (
            // The comment hides a quote from the ";" rule; run, it would drop the table.
            insert(", pending_predicate", &format!("'j', 'items', 'k', {ok_sql}, $p$true /* ' */ THEN 1 END FROM items; DROP TABLE items; SELECT CASE WHEN true /* ' */$p$")),
            "pending_predicate must not contain comments or dollar quotes",
        ),
        (
            insert("", "'j', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:KEYS)$$"),
            "batch_sql uses none of :keys, :first_key, :last_key, so it cannot be limited to a batch",
        ),
    ];
    for (sql, message) in &cases {
        assert_eq!(error_line(&db.sql_err(sql)), *message, "{sql}");
    }
    assert_eq!(
        db.int("SELECT count(*) FROM backfill.jobs"),
        0,
        "nothing enqueued"
    );

    // Editing an enqueued job is checked the same way.
    db.sql(&insert("", &format!("'edited', 'items', 'k', {ok_sql}")));
    for (sql, message) in [
        (
            "UPDATE backfill.jobs SET table_name = 'nope' WHERE name = 'edited'",
            "table_name: table 'nope' does not exist",
        ),
        (
            "UPDATE backfill.jobs SET batch_size = 0 WHERE name = 'edited'",
            "batch_size must be positive, got 0",
        ),
    ] {
        assert_eq!(error_line(&db.sql_err(sql)), message, "{sql}");
    }
    assert_eq!(
        db.sql(
            "SELECT table_name || ' ' || coalesce(batch_size::text, 'default') FROM backfill.jobs"
        ),
        "public.items default"
    );
    assert_eq!(
        db.int("SELECT count(*) FROM items WHERE v = 0"),
        10,
        "no injection attempt touched the table"
    );
}

#[test]
fn jobs_that_pass_the_insert_but_cannot_run_fail_alone_with_a_clear_last_error() {
    let db = TestDb::new("cannot_run");
    items(&db, 100);
    db.sql(
        r#"CREATE TABLE "Odd ""Name""" ("Key ""K""" bigint PRIMARY KEY, "v;alue" int NOT NULL DEFAULT 0);
           INSERT INTO "Odd ""Name""" SELECT g FROM generate_series(1, 500) g;"#,
    );
    db.migrate();
    let typo = "UPDATE items SET v = 1 WHERE k = ANY(:keys) AND k <> :key";
    let typo_offset = typo.rfind(":key").expect("typo");
    let jobs: [(&str, &str, &str, String); 9] = [
        (
            "syntax",
            "UPDATE items SET v = WHERE k = ANY(:keys)",
            "NULL",
            r#"batch_sql is not valid: syntax error at or near "WHERE" (SQLSTATE 42601)"#.into(),
        ),
        (
            "select",
            "SELECT k FROM items WHERE k = ANY(:keys)",
            "NULL",
            "batch_sql returns rows (a SELECT, or RETURNING); it must be a statement that only writes".into(),
        ),
        (
            "returning",
            "UPDATE items SET v = 1 WHERE k = ANY(:keys) RETURNING k",
            "NULL",
            "batch_sql returns rows (a SELECT, or RETURNING); it must be a statement that only writes".into(),
        ),
        (
            "typo",
            typo,
            "NULL",
            format!("batch_sql uses unknown placeholder :key at byte {typo_offset}; the placeholders are :keys, :first_key and :last_key"),
        ),
        (
            "unknown_table",
            "UPDATE nope SET v = 1 WHERE k = ANY(:keys)",
            "NULL",
            r#"batch_sql is not valid: relation "nope" does not exist (SQLSTATE 42P01)"#.into(),
        ),
        (
            "two_statements",
            "UPDATE items SET v = 1 WHERE k = ANY(:keys); DROP TABLE items",
            "NULL",
            "batch_sql is not valid: cannot insert multiple commands into a prepared statement (SQLSTATE 42601)".into(),
        ),
        (
            // The INSERT's check sees ":keys"; only the daemon's lexer knows it is a
            // comment, and that the statement would update the whole table at once.
            "commented_out",
            "UPDATE items SET v = 1 -- WHERE k = ANY(:keys)",
            "NULL",
            "batch_sql uses none of :keys, :first_key, :last_key, so it cannot be limited to a batch".into(),
        ),
        (
            "type_mismatch",
            "UPDATE items SET v = 1 WHERE note = ANY(:keys)",
            "NULL",
            "batch_sql is not valid: operator does not exist: text = bigint (SQLSTATE 42883)".into(),
        ),
        (
            // Plans fine; fails on the first row it is evaluated for.
            "predicate_fails",
            "UPDATE items SET v = 1 WHERE k = ANY(:keys)",
            "'k / (v - v) = 1'",
            r#"job "predicate_fails": selecting the next keys: division by zero (SQLSTATE 22012)"#.into(),
        ),
    ];
    // Higher priority first: every broken job is claimed before the good ones.
    for (name, batch_sql, pending, _) in &jobs {
        db.sql(&format!(
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, priority)
             VALUES ('{name}', 'items', 'k', $${batch_sql}$$, {pending}, 10)"
        ));
    }
    db.sql(
        r#"INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
           VALUES ('quoted', '"Odd ""Name"""', 'Key "K"',
                   $$UPDATE "Odd ""Name""" SET "v;alue" = 1 WHERE "Key ""K""" = ANY(:keys)$$, '"v;alue" <> 1')"#,
    );
    // Enqueued before the INSERT refused such predicates (migration 0004): the daemon
    // refuses it too, or `… AND (v = 0) OR (true)` would re-select the first keys forever.
    db.sql(
        "ALTER TABLE backfill.jobs DISABLE TRIGGER jobs_validate;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, priority)
         VALUES ('escaping', 'public.items', 'k', $$UPDATE items SET v = v + 1 WHERE k = ANY(:keys)$$, 'v = 0) OR (true', 10);
         ALTER TABLE backfill.jobs ENABLE TRIGGER jobs_validate;",
    );
    good_job(&db);

    let env = quick_worker("cannot_run");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    for (name, _, _, message) in &jobs {
        assert_eq!(
            last_error(&db, name),
            format!("failed: {message}"),
            "job {name}"
        );
    }
    assert_eq!(
        last_error(&db, "escaping"),
        "failed: pending_predicate must be a single boolean expression, but it does not parse on its own: syntax error at or near \")\" (SQLSTATE 42601)"
    );
    assert_eq!(
        last_error(&db, "quoted"),
        "succeeded: ",
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        db.int(r#"SELECT count(*) FROM "Odd ""Name""" WHERE "v;alue" = 1"#),
        500
    );
    assert_good_job_succeeded(&db, &daemon);
    assert_eq!(
        db.sql("SELECT count(*) || ' ' || sum(v) FROM items"),
        "100 0",
        "no broken job changed a row"
    );
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 0);
}

#[test]
fn a_table_locked_by_another_session_is_waited_out_not_failed() {
    let db = TestDb::new("locked_table");
    items(&db, 3000);
    db.sql("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL); INSERT INTO counters VALUES (1, 0);");
    db.migrate();
    // Every batch also counts itself in another table.
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size, min_batch_size, max_batch_size, priority)
         VALUES ('counted', 'items', 'k',
                 $$WITH counted AS (UPDATE counters SET n = n + 1 WHERE id = 1)
                   UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 500, 500, 500, 1)",
    );
    good_job(&db);
    let holder = db.session();
    holder.execute("BEGIN; LOCK TABLE counters IN ACCESS EXCLUSIVE MODE;");

    let mut env = quick_worker("locked_table");
    env.push(("BACKFILLD_BATCH__LOCK_TIMEOUT", "100ms".to_string()));
    // One slot waits on the lock, the other runs the good job meanwhile.
    env.push(("BACKFILLD_WORKER__CONCURRENCY", "2".to_string()));
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    let lock_timeouts = |daemon: &Daemon| {
        daemon
            .log_text()
            .matches("canceling statement due to lock timeout")
            .count()
    };
    wait_until("the good job and two lock timeouts", RUN_LIMIT, || {
        db.job_state("good") == "succeeded" && lock_timeouts(&daemon) >= 2
    });
    assert_ne!(db.job_state("counted"), "failed", "{}", daemon.log_text());
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v = 1"), 0);

    holder.execute("COMMIT");
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(
        last_error(&db, "counted"),
        "succeeded: ",
        "{}",
        daemon.log_text()
    );
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v = 1"), 3000);
    assert_eq!(
        db.int("SELECT n FROM counters"),
        6,
        "each of the 6 batches counted once: none of the timed-out attempts committed"
    );
    assert_good_job_succeeded(&db, &daemon);
}

/// Runs `backfilld <args>` against `url` with `env`, expecting exit 2 and one stderr line.
fn usage_error(url: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    backfilld_at(url, args, env).usage_error().to_string()
}

#[test]
fn bad_configuration_exits_2_with_one_clear_line() {
    let db = TestDb::new("bad_config");
    let url = db.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path.to_string_lossy().into_owned()
    };
    let in_dir = |name: &str| dir.path().join(name).display().to_string();
    let with_file =
        |name: &str, text: &str| usage_error(&url, &["--config", &file(name, text), "status"], &[]);
    let with_env = |key: &str, value: &str| usage_error(&url, &["status"], &[(key, value)]);
    let with_url = |database_url: &str| usage_error(database_url, &["status"], &[]);
    let cases: Vec<(String, String)> = vec![
        (
            with_file("unknown_key.toml", "[database]\nnope = 1\n"),
            "backfilld: configuration error: unknown field `nope`, expected one of `url`, `pool_size`, `connect_timeout`, `startup_timeout` for key `database`".into(),
        ),
        (
            with_file("unknown_section.toml", "[nope]\nx = 1\n"),
            "backfilld: configuration error: unknown field `nope`, expected one of `database`, `worker`, `batch`, `throttle`, `http`, `log`, `events`, `undo`".into(),
        ),
        (
            with_env("BACKFILLD_WORKER__NOPE", "1"),
            "backfilld: configuration error: unknown field `nope`, expected one of `id`, `concurrency`, `lease`, `heartbeat`, `poll_interval`, `shutdown_grace`, `max_verify_sweeps`, `stuck_after`, `stuck_rest`, `forecast_window` for key `worker`".into(),
        ),
        (
            with_file("wrong_type.toml", "[database]\npool_size = \"four\"\n"),
            format!("backfilld: configuration error: invalid type: string \"four\", expected an integer for key `database.pool_size` in {}", in_dir("wrong_type.toml")),
        ),
        (
            with_env("BACKFILLD_DATABASE__POOL_SIZE", "x"),
            "backfilld: configuration error: invalid type: string \"x\", expected an integer for key `database.pool_size` in the environment".into(),
        ),
        (
            with_env("BACKFILLD_WORKER__LEASE", "30 parsecs"),
            "backfilld: configuration error: invalid value: string \"30 parsecs\", expected a duration for key `worker.lease` (write a number with a unit, e.g. \"500ms\", \"2s\", \"1m\")".into(),
        ),
        (
            with_file("unitless.toml", "[worker]\nlease = \"30\"\n"),
            "backfilld: configuration error: invalid value: string \"30\", expected a duration for key `worker.lease` (write a number with a unit, e.g. \"500ms\", \"2s\", \"1m\")".into(),
        ),
        (
            with_env("BACKFILLD_LOG__FORMAT", "yaml"),
            "backfilld: configuration error: log.format must be \"text\" or \"json\", not \"yaml\" for key `log.format`".into(),
        ),
        (
            with_env("BACKFILLD_DATABASE__POOL_SIZE", "1"),
            "backfilld: configuration error: database.pool_size (1) must be greater than worker.concurrency (1): one connection per job plus one for the health probes".into(),
        ),
        (
            with_env("BACKFILLD_WORKER__HEARTBEAT", "20s"),
            "backfilld: configuration error: worker.heartbeat (20s) must be positive and at most half of worker.lease (30s)".into(),
        ),
        (
            with_file("not_toml.toml", "[database\nurl = 1\n"),
            format!("backfilld: configuration error: config file {} is not valid TOML at line 1, column 10: unclosed table, expected `]`", in_dir("not_toml.toml")),
        ),
        (
            usage_error(&url, &["--config", "/nonexistent/backfilld.toml", "status"], &[]),
            "backfilld: configuration error: config file /nonexistent/backfilld.toml does not exist".into(),
        ),
        (
            with_url("mysql://app:s3cret@127.0.0.1/x"),
            "backfilld: configuration error: database.url: database URL must start with postgres:// or postgresql://, not mysql://".into(),
        ),
        (
            with_url("postgres://app:s3cret@127.0.0.1/x?sslmode=bogus"),
            "backfilld: configuration error: database.url: sslmode=bogus is not one of disable, prefer, require, verify-ca, verify-full".into(),
        ),
        (
            with_url("postgres://app:s3cret@127.0.0.1/x?sslmode=verify-full&sslrootcert=/nonexistent/root.crt"),
            "backfilld: configuration error: database.url: sslrootcert /nonexistent/root.crt: cannot read it (No such file or directory (os error 2))".into(),
        ),
        (
            with_url("postgres://app:s3cret@127.0.0.1/x?sslcert=/client.crt"),
            "backfilld: configuration error: database.url: the database URL's parameter sslcert is not supported".into(),
        ),
        (
            with_env("BACKFILLD_THROTTLE__REPLICA_URLS", "postgres://r1/x,postgres://r2/x?sslmode=verify"),
            "backfilld: configuration error: throttle.replica_urls[1]: sslmode=verify is not one of disable, prefer, require, verify-ca, verify-full".into(),
        ),
        (
            with_env("BACKFILLD_HTTP__LISTEN", "everywhere"),
            "backfilld: configuration error: http.listen \"everywhere\" is not an address like 0.0.0.0:9187".into(),
        ),
    ];
    for (got, expected) in &cases {
        assert_eq!(got, expected);
        assert!(!got.contains("s3cret"), "{got}");
    }

    // Nothing listens on a fresh port: the database may be failing over, so that is no
    // configuration error: it is retried for database.startup_timeout (tests/startup.rs),
    // then exits 1 with the reason. With no retries, at once, for `run` as for any verb.
    let port = free_port();
    let closed = format!("postgres://app:s3cret@127.0.0.1:{port}/x");
    for verb in ["status", "run"] {
        let started = Instant::now();
        let out = backfilld_at(
            &closed,
            &[verb],
            &[("BACKFILLD_DATABASE__STARTUP_TIMEOUT", "0s")],
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert_eq!(
            out.stderr.trim(),
            format!("backfilld: cannot connect to the database at postgres://app:***@127.0.0.1:{port}/x: error communicating with database: Connection refused (os error 111) (gave up after 1 attempts in 0s, database.startup_timeout 0s)")
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{verb} took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn bad_command_lines_exit_2_with_one_clear_line() {
    let db = TestDb::new("bad_cli");
    db.migrate();
    let url = db.url();
    let cases: Vec<(&[&str], &str)> = vec![
        (&["frobnicate"], "backfilld: unrecognized subcommand 'frobnicate' (see backfilld --help)"),
        (&["statsu"], "backfilld: unrecognized subcommand 'statsu' tip: a similar subcommand exists: 'status' (see backfilld --help)"),
        (
            &["enqueue", "--name", "j"],
            "backfilld: the following required arguments were not provided: --table <TABLE> --key <KEY> --sql <SQL> (see backfilld --help)",
        ),
        (
            &["enqueue", "--name", "j", "--table", "t", "--key", "k", "--sql", "x", "--batch-size", "ten"],
            "backfilld: invalid value 'ten' for '--batch-size <KEYS>': invalid digit found in string (see backfilld --help)",
        ),
        (
            &["status", "--watch", "--interval", "soon"],
            "backfilld: invalid value 'soon' for '--interval <DURATION>': expected number at 0 (see backfilld --help)",
        ),
        (&["status", "nope"], "backfilld: no backfill job named 'nope'"),
        (&["retry", "nope"], "backfilld: no backfill job named 'nope'"),
        (&["cancel", "nope"], "backfilld: no backfill job named 'nope'"),
        (&["plan", "nope"], "backfilld: no backfill job named 'nope'"),
    ];
    for (args, expected) in cases {
        assert_eq!(usage_error(&url, args, &[]), expected, "{args:?}");
    }
    let help = backfilld_at(&url, &["--help"], &[]);
    assert!(
        help.status.success() && help.stdout.contains("Usage: backfilld"),
        "{help:?}"
    );
}
