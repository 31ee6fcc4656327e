//! Failed rows never block a backfill: row-level failures are isolated by
//! bisection and set aside in `backfill.failed_rows`, retried, and the job ends
//! `succeeded` only when verification finds nothing left; transient errors are
//! retried without blaming any row; job-level errors fail only their job.

use std::time::{Duration, Instant};

use backfilld_e2e::{env_refs, quick_worker, quick_worker_json_log, wait_until, Daemon, TestDb};
use pg_testkit::demo_data::{users_table_sql, SPLIT_NAME_JOB_SQL};

const RUN_LIMIT: Duration = Duration::from_secs(60);
const SPLIT_JOB: &str = "split_full_name";

/// Runs `backfilld run --exit-when-idle` until it exits cleanly.
fn run_until_idle(db: &TestDb, env: &[(&'static str, String)]) -> Daemon {
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(env));
    daemon.expect_success(RUN_LIMIT);
    daemon
}

/// `key:sqlstate:reason` of every failed row of `job`, in key order.
fn failed_rows(db: &TestDb, job: &str) -> String {
    db.sql(&format!(
        "SELECT coalesce(string_agg(f.key || ':' || coalesce(f.sqlstate, '') || ':' || f.reason, ',' ORDER BY f.key::bigint), '')
           FROM backfill.failed_rows f JOIN backfill.jobs j ON j.id = f.job_id WHERE j.name = '{job}'"
    ))
}

/// The `last_error` a job with `count` failed rows ends with.
fn rows_failed_message(db: &TestDb, job: &str, count: usize) -> String {
    let id = db.int(&format!(
        "SELECT id FROM backfill.jobs WHERE name = '{job}'"
    ));
    format!(
        "{count} rows failed (see backfill.failed_rows where job_id = {id}); fix them, then select backfill.retry_failed('{job}')"
    )
}

fn last_error(db: &TestDb, job: &str) -> String {
    db.sql(&format!(
        "SELECT last_error FROM backfill.jobs WHERE name = '{job}'"
    ))
}

/// Counts the statements run on `table` in the sequence `<table>_statements`: a
/// BEFORE … FOR EACH STATEMENT trigger bumps it, and sequences ignore rollbacks,
/// so statements that failed or were rolled back to a savepoint count too.
fn count_statements(db: &TestDb, table: &str) {
    db.sql(&format!(
        "CREATE SEQUENCE {table}_statements;
         CREATE FUNCTION {table}_count_statement() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM nextval('{table}_statements'); RETURN NULL; END $$;
         CREATE TRIGGER {table}_count_statement BEFORE UPDATE ON {table}
             FOR EACH STATEMENT EXECUTE FUNCTION {table}_count_statement();"
    ));
}

fn statements_counted(db: &TestDb, table: &str) -> i64 {
    db.int(&format!(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {table}_statements"
    ))
}

/// `⌈log2 n⌉`.
fn ceil_log2(n: i64) -> i64 {
    i64::from(64 - (n - 1).leading_zeros())
}

/// `users` with `rows` rows, audited, and the backfill schema: 0.1 % poison rows scattered
/// over the table plus the adjacent `cluster`, which a CHECK constraint makes fail with
/// 23514. Returns the failed rows they should become (`key:23514:error`, in key order).
fn poisoned_users(db: &TestDb, rows: i64, cluster: std::ops::RangeInclusive<i64>) -> String {
    db.sql(&users_table_sql(rows));
    db.sql(&format!(
        "UPDATE users SET full_name = 'Poison Pill' WHERE id % 1000 = 537 OR id BETWEEN {} AND {};
         ALTER TABLE users ADD CONSTRAINT first_name_is_no_poison CHECK (first_name <> 'Poison');",
        cluster.start(),
        cluster.end()
    ));
    let poison_keys = db.sql(
        "SELECT string_agg(id || ':23514:error', ',' ORDER BY id) FROM users WHERE full_name = 'Poison Pill'",
    );
    db.audit_updates("users", "id");
    db.migrate();
    poison_keys
}

#[test]
fn poison_rows_are_set_aside_and_retry_failed_finishes_the_job() {
    let db = TestDb::new("poison");
    let poison_keys = poisoned_users(&db, 100_000, 60_001..=60_050);
    db.sql(SPLIT_NAME_JOB_SQL);

    let started = Instant::now();
    let daemon = run_until_idle(&db, &quick_worker_json_log("poison"));
    let ran_for = started.elapsed();
    assert_eq!(db.job_state(SPLIT_JOB), "failed", "{}", daemon.log_text());
    assert_eq!(failed_rows(&db, SPLIT_JOB), poison_keys);
    assert_eq!(
        db.sql("SELECT DISTINCT attempts FROM backfill.failed_rows"),
        "3",
        "each poison key was retried up to max_attempts"
    );
    assert_eq!(
        last_error(&db, SPLIT_JOB),
        rows_failed_message(&db, SPLIT_JOB, 150)
    );
    assert_eq!(db.sql("SELECT failed_rows FROM backfill.job_status"), "150");
    db.assert_backfilled_exactly_once("users", 100_000 - 150);

    // A line per isolated key, rate-limited: at most 20 per 10 s window, then a summary.
    let worker_lines = daemon.json_lines("backfilld::worker");
    let key_lines: Vec<_> = worker_lines
        .iter()
        .filter(|line| line["message"] == "row failed; recorded in backfill.failed_rows")
        .collect();
    let windows = ran_for.as_secs() / 10 + 1;
    assert!(
        (1..=20 * windows as usize).contains(&key_lines.len()),
        "{} key lines in {ran_for:?}",
        key_lines.len()
    );
    assert!(key_lines.iter().all(|line| line["sqlstate"] == "23514"
        && line["key"].is_string()
        && line["error"]
            .as_str()
            .is_some_and(|e| e.contains("first_name_is_no_poison"))));
    let summarised: i64 = worker_lines
        .iter()
        .filter(|line| {
            line["message"]
                == "more rows failed than are logged one by one; all are in backfill.failed_rows"
        })
        .filter_map(|line| line["rows"].as_i64())
        .sum();
    assert_eq!(
        key_lines.len() as i64 + summarised,
        150 * 3,
        "every failure (150 keys, 3 attempts each) is logged or summed up"
    );
    let batches = daemon.json_lines("backfilld::batch");
    let statements: i64 = batches
        .iter()
        .filter_map(|line| line["statements"].as_i64())
        .sum();
    println!(
        "100k rows, 150 poison: {ran_for:?}, {} batches, {statements} statements",
        batches.len()
    );

    // Someone fixes the data and asks for a retry from the command line.
    db.sql("UPDATE users SET full_name = 'Cured Pill' WHERE full_name = 'Poison Pill'");
    let retry = db.backfilld(&["retry", SPLIT_JOB]);
    assert!(retry.status.success(), "{retry:?}");
    let daemon = run_until_idle(&db, &quick_worker("poison"));
    assert_eq!(
        db.job_state(SPLIT_JOB),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    assert_eq!(failed_rows(&db, SPLIT_JOB), "");
    assert_eq!(
        db.sql("SELECT coalesce(last_error, '') || '|' || failed_rows || '|' || percent FROM backfill.job_status"),
        "|0|100.0"
    );
    db.assert_backfilled_exactly_once("users", 100_000);
    assert_eq!(
        db.int("SELECT count(*) FROM users WHERE first_name IS DISTINCT FROM split_part(btrim(full_name), ' ', 1)"),
        0
    );
}

#[test]
fn poison_rows_under_a_range_statement_are_isolated_from_the_listed_keys() {
    // Without :keys a batch selects only its first and last key; a failing batch lists
    // its keys for the bisection.
    let db = TestDb::new("poison_range");
    let poison_keys = poisoned_users(&db, 20_000, 12_001..=12_010);
    db.sql(&SPLIT_NAME_JOB_SQL.replace(
        "id = ANY(:keys)",
        "id BETWEEN :first_key AND :last_key AND first_name IS NULL",
    ));
    let daemon = run_until_idle(&db, &quick_worker_json_log("poison-range"));
    assert_eq!(db.job_state(SPLIT_JOB), "failed", "{}", daemon.log_text());
    assert_eq!(failed_rows(&db, SPLIT_JOB), poison_keys);
    assert_eq!(
        last_error(&db, SPLIT_JOB),
        rows_failed_message(&db, SPLIT_JOB, 30)
    );
    db.assert_backfilled_exactly_once("users", 20_000 - 30);
    assert!(
        daemon
            .json_lines("backfilld::worker")
            .iter()
            .any(|line| line["message"] == "resolved the job" && line["key_selection"] == "span"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn trigger_exceptions_and_bad_casts_are_set_aside_with_their_sqlstate() {
    let db = TestDb::new("trigger_cast");
    db.sql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, amount_text text NOT NULL, note text NOT NULL, amount integer);
         INSERT INTO orders (id, amount_text, note) SELECT g, (g % 500)::text, 'open' FROM generate_series(1, 20000) g;
         -- Frozen orders make a trigger raise; 'n/a' amounts do not cast.
         UPDATE orders SET note = 'frozen' WHERE id % 700 = 3;
         UPDATE orders SET amount_text = 'n/a' WHERE id % 900 = 5 OR id BETWEEN 12001 AND 12050;
         CREATE FUNCTION orders_refuse_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.note = 'frozen' THEN
                 RAISE EXCEPTION 'order % is frozen', NEW.id;
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER orders_refuse_frozen BEFORE UPDATE ON orders
             FOR EACH ROW EXECUTE FUNCTION orders_refuse_frozen();",
    );
    let expected = db.sql(
        "SELECT string_agg(id || CASE WHEN note = 'frozen' THEN ':P0001' ELSE ':22P02' END || ':error', ',' ORDER BY id)
           FROM orders WHERE note = 'frozen' OR amount_text = 'n/a'",
    );
    let failing =
        db.int("SELECT count(*) FROM orders WHERE note = 'frozen' OR amount_text = 'n/a'");
    db.audit_updates("orders", "id");
    db.migrate();
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, max_attempts)
         VALUES ('orders_amount', 'orders', 'id',
                 'UPDATE orders SET amount = amount_text::int WHERE id = ANY(:keys)', 'amount IS NULL', 2)",
    );

    let daemon = run_until_idle(&db, &quick_worker("trigger_cast"));
    assert_eq!(
        db.job_state("orders_amount"),
        "failed",
        "{}",
        daemon.log_text()
    );
    assert_eq!(failed_rows(&db, "orders_amount"), expected);
    assert_eq!(
        db.sql("SELECT count(*) FILTER (WHERE message LIKE 'order % is frozen') || '/' || count(*) FILTER (WHERE message LIKE 'invalid input syntax for type integer: \"n/a\"%') FROM backfill.failed_rows"),
        db.sql("SELECT count(*) FILTER (WHERE note = 'frozen') || '/' || count(*) FILTER (WHERE amount_text = 'n/a') FROM orders"),
        "each key keeps its own error message"
    );
    assert_eq!(
        last_error(&db, "orders_amount"),
        rows_failed_message(&db, "orders_amount", failing as usize)
    );
    db.assert_backfilled_exactly_once("orders", 20_000 - failing);

    // Fixed, then retried with SQL this time.
    db.sql(
        "UPDATE orders SET note = 'thawed' WHERE note = 'frozen';
         UPDATE orders SET amount_text = '0' WHERE amount_text = 'n/a';
         SELECT backfill.retry_failed('orders_amount');",
    );
    let daemon = run_until_idle(&db, &quick_worker("trigger_cast"));
    assert_eq!(
        db.job_state("orders_amount"),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    assert_eq!(failed_rows(&db, "orders_amount"), "");
    db.assert_backfilled_exactly_once("orders", 20_000);
    assert_eq!(
        db.int("SELECT count(*) FROM orders WHERE amount IS DISTINCT FROM amount_text::int"),
        0
    );
}

/// `numbers` with `rows` rows whose `raw` text casts to an integer, except in `bad`.
fn numbers_table(db: &TestDb, rows: i64, bad: &str) {
    db.sql(&format!(
        "CREATE TABLE numbers (id bigint PRIMARY KEY, raw text NOT NULL, n integer);
         INSERT INTO numbers (id, raw) SELECT g, g::text FROM generate_series(1, {rows}) g;
         UPDATE numbers SET raw = 'x' || id WHERE {bad};"
    ));
}

/// Enqueues `parse_numbers` over [`numbers_table`]: batches of exactly `batch`
/// keys, one attempt per key (no retries).
fn enqueue_parse_numbers(db: &TestDb, batch: i64) {
    db.sql(&format!(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate,
                                    batch_size, min_batch_size, max_batch_size, max_attempts)
         VALUES ('parse_numbers', 'numbers', 'id',
                 'UPDATE numbers SET n = raw::int WHERE id = ANY(:keys)', 'n IS NULL',
                 {batch}, {batch}, {batch}, 1)"
    ));
}

#[test]
fn a_batch_in_which_every_row_fails_costs_statements_linear_in_its_size() {
    let db = TestDb::new("all_fail");
    // Batches are exactly 500 keys: the third one is bad through and through.
    let batch = 500;
    numbers_table(&db, 3000, "id BETWEEN 1001 AND 1500");
    count_statements(&db, "numbers");
    db.audit_updates("numbers", "id");
    db.migrate();
    enqueue_parse_numbers(&db, batch);

    let daemon = run_until_idle(&db, &without_breaker(quick_worker_json_log("all_fail")));
    assert_eq!(db.job_state("parse_numbers"), "failed");
    assert_eq!(
        db.sql("SELECT count(*) || ':' || min(key::int) || ':' || max(key::int) || ':' || string_agg(DISTINCT sqlstate, ',') FROM backfill.failed_rows"),
        "500:1001:1500:22P02"
    );
    assert_eq!(
        last_error(&db, "parse_numbers"),
        rows_failed_message(&db, "parse_numbers", 500)
    );
    db.assert_backfilled_exactly_once("numbers", 2500);

    // Five good batches cost one statement each; the bad one its whole-batch
    // statement plus at most n + 4·⌈log2 n⌉ for the bisection, each key once alone.
    let statements = statements_counted(&db, "numbers");
    let bad_batch = statements - 5;
    let bound = 1 + batch + 4 * ceil_log2(batch);
    assert!(
        (1 + batch..=bound).contains(&bad_batch),
        "the all-failing batch of {batch} keys ran {bad_batch} statements (bound {bound})"
    );
    // The daemon's own count agrees with the database's.
    let lines = daemon.json_lines("backfilld::batch");
    let reported: i64 = lines
        .iter()
        .map(|line| line["statements"].as_i64().expect("statements"))
        .sum();
    assert_eq!(reported, statements, "{lines:?}");
    let slowest = lines
        .iter()
        .filter_map(|line| line["duration_ms"].as_f64())
        .fold(0.0, f64::max);
    println!(
        "all-failing batch of {batch}: {bad_batch} statements (bound {bound}), {slowest:.0} ms"
    );
}

#[test]
fn a_statement_that_fails_for_every_row_fails_the_job_without_filling_failed_rows() {
    let db = TestDb::new("bad_sql");
    numbers_table(&db, 2000, "false");
    db.audit_updates("numbers", "id");
    db.migrate();
    // Every row fails the cast: the statement is wrong, not the rows.
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size)
         VALUES ('count_apples', 'numbers', 'id',
                 $$UPDATE numbers SET n = (raw || ' apples')::int WHERE id = ANY(:keys)$$, 'n IS NULL', 200)",
    );
    let daemon = run_until_idle(&db, &quick_worker("bad_sql"));
    assert_eq!(
        db.job_state("count_apples"),
        "failed",
        "{}",
        daemon.log_text()
    );
    let error = last_error(&db, "count_apples");
    for part in [
        "every one of the 200 keys of its first batch (1..=200) failed alone with the same error",
        "select backfill.retry_failed('count_apples')",
        "invalid input syntax for type integer: \"1 apples\" (SQLSTATE 22P02)",
    ] {
        assert!(error.contains(part), "{part:?} not in {error:?}");
    }
    assert_eq!(failed_rows(&db, "count_apples"), "");
    assert_eq!(
        db.sql("SELECT rows_done || ':' || coalesce(checkpoint, 'none') FROM backfill.jobs"),
        "0:none"
    );
    db.assert_updated_exactly_once("numbers", 0);

    // The engineer fixes the statement and resumes the job.
    db.sql(
        "UPDATE backfill.jobs SET batch_sql = 'UPDATE numbers SET n = raw::int WHERE id = ANY(:keys)';
         SELECT backfill.retry_failed('count_apples');",
    );
    let daemon = run_until_idle(&db, &quick_worker("bad_sql"));
    assert_eq!(
        db.job_state("count_apples"),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    db.assert_updated_exactly_once("numbers", 2000);
}

#[test]
fn dense_failures_commit_in_short_transactions_without_overflowing_subtransactions() {
    let db = TestDb::new("dense");
    // Every tenth row fails: the bisection ends up walking keys one by one.
    let batch = 1000;
    numbers_table(&db, 10_000, "id % 10 = 7");
    db.audit_updates("numbers", "id");
    db.migrate();
    enqueue_parse_numbers(&db, batch);
    let daemon = run_until_idle(&db, &without_breaker(quick_worker_json_log("dense")));
    assert_eq!(db.job_state("parse_numbers"), "failed");
    assert_eq!(
        db.sql("SELECT count(*) || ':' || bool_and(key::int % 10 = 7) FROM backfill.failed_rows"),
        "1000:true"
    );
    db.assert_updated_exactly_once("numbers", 9000);

    // A row's xmin is the (sub)transaction that wrote it, and the audit row holds
    // its top-level transaction: distinct xmins per transaction are the savepoints
    // it released, which must stay under PostgreSQL's 64 cached subtransactions.
    let most_released = db.int(
        "SELECT max(released) FROM (SELECT count(DISTINCT n.xmin::text) AS released
           FROM numbers_audit a JOIN numbers n ON n.id::text = a.key GROUP BY a.xid) t",
    );
    assert!(
        (2..=48).contains(&most_released),
        "{most_released} savepoints released in one transaction"
    );
    println!("at most {most_released} savepoints released in one transaction");
    let partial = daemon
        .json_lines("backfilld::batch")
        .iter()
        .filter(|line| line["keys"].as_i64() < Some(batch))
        .count();
    assert!(partial > 0, "no batch stopped early to commit");
}

#[test]
fn rows_that_disagree_with_check_predicate_are_left_unchanged_and_recorded() {
    let db = TestDb::new("check_predicate");
    db.sql(&users_table_sql(20_000));
    // Extra spaces inside a last name survive the split: its check disagrees.
    db.sql("UPDATE users SET full_name = 'Ada Mary  Lovelace' WHERE id % 1000 = 123");
    let disagreeing = db.sql(
        "SELECT string_agg(id || '::verification', ',' ORDER BY id) FROM users WHERE id % 1000 = 123",
    );
    db.audit_updates("users", "id");
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    db.sql(
        r"UPDATE backfill.jobs SET check_predicate =
            $$concat_ws(' ', first_name, last_name) <> regexp_replace(btrim(full_name), '\s+', ' ', 'g')$$",
    );

    let daemon = run_until_idle(&db, &quick_worker("check_predicate"));
    assert_eq!(db.job_state(SPLIT_JOB), "failed", "{}", daemon.log_text());
    assert_eq!(failed_rows(&db, SPLIT_JOB), disagreeing);
    assert_eq!(
        db.sql("SELECT DISTINCT attempts || ':' || message FROM backfill.failed_rows"),
        "1:check_predicate holds after batch_sql: the new values disagree with the old ones, so the row was left unchanged",
        "not retried automatically: the same data gives the same values"
    );
    assert_eq!(
        last_error(&db, SPLIT_JOB),
        rows_failed_message(&db, SPLIT_JOB, 20)
    );
    assert_eq!(
        db.int("SELECT count(*) FROM users WHERE first_name IS NULL"),
        20,
        "the disagreeing rows keep their old shape"
    );
    db.assert_backfilled_exactly_once("users", 20_000 - 20);

    db.sql(
        r"UPDATE users SET full_name = regexp_replace(full_name, '\s+', ' ', 'g') WHERE id % 1000 = 123;
          SELECT backfill.retry_failed('split_full_name');",
    );
    let daemon = run_until_idle(&db, &quick_worker("check_predicate"));
    assert_eq!(
        db.job_state(SPLIT_JOB),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    assert_eq!(failed_rows(&db, SPLIT_JOB), "");
    db.assert_backfilled_exactly_once("users", 20_000);
    assert_eq!(
        db.sql("SELECT DISTINCT first_name || '|' || last_name FROM users WHERE id % 1000 = 123"),
        "Ada|Mary Lovelace"
    );
}

#[test]
fn a_lock_held_past_lock_timeout_is_waited_out_without_blaming_rows() {
    let db = TestDb::new("lock_wait");
    db.sql(&users_table_sql(5000));
    db.audit_updates("users", "id");
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    db.sql("UPDATE backfill.jobs SET batch_size = 500");
    let holder = db.session();
    holder.execute("BEGIN; SELECT 1 FROM users WHERE id = 2500 FOR UPDATE;");

    let mut env = quick_worker_json_log("lock_wait");
    env.push(("BACKFILLD_BATCH__LOCK_TIMEOUT", "100ms".to_string()));
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    let lock_timeouts = |daemon: &Daemon| {
        daemon
            .json_lines("backfilld::worker")
            .iter()
            .filter(|line| line["kind"] == "lock_timeout")
            .count()
    };
    wait_until("the batch to time out on the lock twice", RUN_LIMIT, || {
        lock_timeouts(&daemon) >= 2
    });
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 0);
    assert_eq!(db.job_state(SPLIT_JOB), "running");
    assert_eq!(
        db.int("SELECT count(*) FROM users WHERE id = 2500 AND first_name IS NOT NULL"),
        0
    );

    holder.execute("COMMIT");
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(
        db.job_state(SPLIT_JOB),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 0);
    db.assert_updated_exactly_once("users", 5000);
}

#[test]
fn a_statement_timeout_shrinks_the_batch_and_the_job_succeeds() {
    let db = TestDb::new("statement_timeout");
    let rows = 6000;
    db.sql(&users_table_sql(rows));
    // About a millisecond per row: the first batch, the whole table, takes ~6 s.
    db.sql(
        "CREATE FUNCTION users_slowly() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
         CREATE TRIGGER users_slowly BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION users_slowly();",
    );
    db.audit_updates("users", "id");
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    db.sql(&format!(
        "UPDATE backfill.jobs SET batch_size = {rows}, max_batch_size = {rows}, target_batch_ms = 200"
    ));
    let mut env = quick_worker_json_log("statement_timeout");
    env.push(("BACKFILLD_BATCH__STATEMENT_TIMEOUT", "1s".to_string()));

    let daemon = run_until_idle(&db, &env);
    assert_eq!(
        db.job_state(SPLIT_JOB),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 0);
    db.assert_updated_exactly_once("users", rows);
    let timeouts = daemon
        .json_lines("backfilld::worker")
        .iter()
        .filter(|line| line["kind"] == "statement_timeout")
        .count();
    assert!(timeouts >= 1, "{}", daemon.log_text());
    let batches = daemon.json_lines("backfilld::batch");
    let largest = batches
        .iter()
        .filter_map(|line| line["keys"].as_i64())
        .max();
    assert!(
        largest.is_some_and(|keys| keys <= rows / 2),
        "committed batches up to {largest:?} keys"
    );
}

#[test]
fn a_job_naming_a_missing_column_fails_while_the_next_job_succeeds() {
    let db = TestDb::new("missing_column");
    db.sql(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL, email_lower text);
         INSERT INTO accounts (id, email) SELECT g, 'User' || g || '@Example.COM' FROM generate_series(1, 3000) g;
         -- PL/pgSQL checks column names only when the function runs.
         CREATE FUNCTION accounts_nickname(account bigint) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN PERFORM nickname FROM accounts WHERE id = account; RETURN true; END $$;",
    );
    db.audit_updates("accounts", "id");
    db.migrate();
    // Higher priority first: both broken jobs are claimed before the good one.
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, priority) VALUES
           ('typo', 'accounts', 'id',
            'UPDATE accounts SET emial_lower = lower(email) WHERE id = ANY(:keys)', 'email_lower IS NULL', 2),
           ('nickname', 'accounts', 'id',
            'UPDATE accounts SET email_lower = lower(email) WHERE id = ANY(:keys) AND accounts_nickname(id)',
            'email_lower IS NULL', 1),
           ('lower_email', 'accounts', 'id',
            'UPDATE accounts SET email_lower = lower(email) WHERE id = ANY(:keys)', 'email_lower IS NULL', 0)",
    );

    let daemon = run_until_idle(&db, &quick_worker("missing_column"));
    let log = daemon.log_text();
    assert_eq!(db.job_state("typo"), "failed", "{log}");
    assert_eq!(db.job_state("nickname"), "failed", "{log}");
    assert_eq!(db.job_state("lower_email"), "succeeded", "{log}");
    let typo = last_error(&db, "typo");
    assert!(
        typo.contains(r#"column "emial_lower" of relation "accounts" does not exist"#),
        "{typo}"
    );
    let nickname = last_error(&db, "nickname");
    assert!(
        nickname.contains(r#"column "nickname" does not exist"#) && nickname.contains("42703"),
        "{nickname}"
    );
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 0);
    db.assert_updated_exactly_once("accounts", 3000);
    assert_eq!(
        db.int("SELECT count(*) FROM accounts WHERE email_lower IS DISTINCT FROM lower(email)"),
        0
    );
}

/// `env` with the circuit breaker off: these jobs fail row after row on purpose, to
/// measure the bisection, where the breaker would pause them after 1,000 rows.
fn without_breaker(mut env: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
    env.push(("BACKFILLD_BATCH__BREAKER_FAILED_SHARE", "1".to_string()));
    env.push(("BACKFILLD_BATCH__BREAKER_FAILED_ROWS", "0".to_string()));
    env
}
