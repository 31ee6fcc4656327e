//! Undo (issue 17): a backfill that shipped a bug is reverted row for row, under
//! SIGKILLs, leaving alone the rows someone else changed since (unless forced), and
//! keeping undo data only for what committed batches changed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backfilld_e2e::{
    backfilld_at, env_refs, free_port, http_get, quick_worker, readme_engineer_grants, wait_until,
    Daemon, Session, SigkillStorm, TestDb,
};

const RUN_LIMIT: Duration = Duration::from_secs(180);

/// A URL for `role` on `db` (the test kit's clusters trust loopback connections).
fn url_as(db: &TestDb, role: &str) -> String {
    db.url().replacen("postgres@", &format!("{role}@"), 1)
}

/// Runs two workers until the queue is idle, SIGKILLing one of them `kills` times
/// (restarting it each time) while they work.
fn run_through_a_storm(db: &TestDb, name: &str, kills: usize, seed: u64) -> String {
    let mut storm = SigkillStorm::start(db, name, 2, seed);
    for _ in 0..kills {
        storm.kill_one(300);
    }
    storm.finish(RUN_LIMIT)
}

/// md5 over the rows of `table` that `filter` keeps, in key order.
fn table_hash(db: &TestDb, table: &str, filter: &str) -> String {
    db.sql(&format!(
        "SELECT md5(string_agg((p.id, p.full_name, p.first_name, p.last_name, p.note)::text, '|' ORDER BY p.id)) \
           FROM {table} p WHERE {filter}"
    ))
}

#[test]
fn a_wrong_backfill_is_reverted_row_for_row_after_a_sigkill_storm_leaving_a_writers_rows_alone() {
    let db = TestDb::new("undo_storm");
    db.migrate();
    // Enough rows that each run (at 3,000 rows/s) outlasts its storm of kills.
    let rows = 12_000;
    db.sql(&format!(
        "CREATE TABLE people (id bigint PRIMARY KEY, full_name text NOT NULL, first_name text,
                              last_name text, note text);
         INSERT INTO people (id, full_name, last_name, note)
         SELECT g, 'Ann' || g || ' Lee' || g, CASE WHEN g % 5 = 0 THEN 'kept ' || g END,
                CASE WHEN g % 3 = 0 THEN 'ü ' || g END
           FROM generate_series(1, {rows}) g;
         -- Poison: these rows fail once written; bisection sets them aside.
         ALTER TABLE people ADD CONSTRAINT no_poison CHECK (first_name IS NULL OR id % 997 <> 0);
         CREATE TABLE people_before AS SELECT * FROM people;"
    ));
    let poison = rows / 997;
    let engineer = format!("eng_{}", db.name);
    db.sql(&format!(
        "CREATE ROLE {engineer} LOGIN; {}",
        readme_engineer_grants(&engineer, "people")
    ));
    let as_engineer = Session::connect(&url_as(&db, &engineer));
    // The bug: the second word as first name, and the whole name lower-cased as last name.
    as_engineer.execute(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate,
                                    keep_undo, undo_columns, batch_size, max_rows_per_second, max_attempts)
         VALUES ('split_names', 'people', 'id',
                 $$UPDATE people SET first_name = split_part(full_name, ' ', 2), last_name = lower(full_name)
                    WHERE id = ANY(:keys)$$,
                 'first_name IS NULL', true, '{first_name,last_name}', 300, 3000, 2)",
    );

    // A writer changes rows the job has already changed, while it runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, stop) = (db.url(), stop.clone());
        std::thread::spawn(move || {
            let session = Session::connect(&url);
            while !stop.load(Ordering::Relaxed) {
                session.execute(
                    "UPDATE people SET last_name = 'writer ' || id
                      WHERE id IN (SELECT id FROM people WHERE id % 101 = 5 AND first_name IS NOT NULL
                                      AND last_name NOT LIKE 'writer %' LIMIT 3)",
                );
                std::thread::sleep(Duration::from_millis(30));
            }
        })
    };
    let logs = run_through_a_storm(&db, "undo-storm", 8, 20261203);
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert_eq!(db.job_state("split_names"), "failed", "{logs}");
    assert_eq!(
        db.int("SELECT count(*) FROM backfill.failed_rows f JOIN backfill.jobs j ON j.id = f.job_id WHERE j.name = 'split_names'"),
        poison
    );
    let writer_rows = db.int("SELECT count(*) FROM people WHERE last_name LIKE 'writer %'");
    assert!(writer_rows > 0, "the writer changed rows during the run");

    // Undo holds exactly the committed changes: every key but the poisoned, with the
    // values from before the job (not what a retry or a crash saw later).
    assert_eq!(
        db.int("SELECT count(*) FROM backfill.undo"),
        rows - poison,
        "{logs}"
    );
    assert_eq!(
        db.int("SELECT count(*) FROM backfill.undo WHERE key::bigint % 997 = 0"),
        0,
        "no undo for keys whose change was rolled back"
    );
    assert_eq!(
        db.int(
            "SELECT count(*) FROM backfill.undo u JOIN people_before b ON b.id::text = u.key
              WHERE u.old_values IS DISTINCT FROM jsonb_build_object('first_name', b.first_name, 'last_name', b.last_name)
                 OR u.post_hash IS NULL"
        ),
        0,
        "old values are the originals, each with its post-image hash"
    );
    let undo_rows: i64 =
        db.int("SELECT undo_rows FROM backfill.job_status WHERE name = 'split_names'");
    assert_eq!(undo_rows, rows - poison);

    // Revert, through another storm: the writer's rows are reported, not overwritten.
    let revert = {
        let rows = as_engineer.query("SELECT backfill.revert('split_names')");
        rows[0].get::<_, String>(0)
    };
    assert_eq!(revert, "revert:split_names");
    assert_eq!(
        db.sql("SELECT enqueued_by FROM backfill.jobs WHERE name = 'revert:split_names'"),
        engineer,
        "a revert runs as the role that enqueued the job"
    );
    let logs = run_through_a_storm(&db, "undo-revert", 4, 7);
    assert_eq!(db.job_state("revert:split_names"), "failed", "{logs}");
    let conflicts = db.sql(
        "SELECT count(*) || ' ' || bool_and(f.message LIKE '%was changed since backfill ''split_names'' wrote it%')
           FROM backfill.failed_rows f JOIN backfill.jobs j ON j.id = f.job_id
          WHERE j.name = 'revert:split_names'",
    );
    assert_eq!(conflicts, format!("{writer_rows} true"));
    assert_eq!(
        db.int(
            "SELECT count(*) FROM backfill.failed_rows f JOIN backfill.jobs j ON j.id = f.job_id
               JOIN people p ON p.id::text = f.key
              WHERE j.name = 'revert:split_names' AND p.last_name NOT LIKE 'writer %'"
        ),
        0,
        "only the writer's rows are conflicts"
    );
    let untouched = "p.id NOT IN (SELECT id FROM people WHERE last_name LIKE 'writer %')";
    assert_eq!(
        table_hash(&db, "people", untouched),
        table_hash(&db, "people_before", untouched),
        "every row the writer left alone is back as it was"
    );
    assert_eq!(
        db.int(
            "SELECT count(*) FROM people WHERE last_name LIKE 'writer %'
                AND (last_name <> 'writer ' || id OR first_name IS DISTINCT FROM split_part(full_name, ' ', 2))"
        ),
        0,
        "the writer's rows keep the writer's values"
    );

    // Forced, the writer's rows are overwritten too: the whole table is as before.
    let forced = as_engineer.query("SELECT backfill.revert('split_names', force => true)");
    assert_eq!(forced[0].get::<_, String>(0), "revert:split_names:2");
    let logs = run_through_a_storm(&db, "undo-force", 2, 11);
    assert_eq!(db.job_state("revert:split_names:2"), "succeeded", "{logs}");
    assert_eq!(
        table_hash(&db, "people", "true"),
        table_hash(&db, "people_before", "true")
    );

    // Purged, there is nothing left to revert.
    let purged = as_engineer.query("SELECT backfill.purge_undo('split_names')");
    assert_eq!(purged[0].get::<_, i64>(0), rows - poison);
    let err = as_engineer
        .try_execute("SELECT backfill.revert('split_names')")
        .expect_err("nothing to revert");
    assert!(err.contains("has no undo data"), "{err}");
}

#[test]
fn a_whole_row_undo_reverts_a_key_range_and_is_planned_shown_and_guarded() {
    let db = TestDb::new("undo_range");
    db.migrate();
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL, w text,
                             doubled int GENERATED ALWAYS AS (v * 2) STORED);
         INSERT INTO items (k, v, w) SELECT g, g % 10, 'w' || g FROM generate_series(1, 2000) g;
         CREATE TABLE items_before AS SELECT * FROM items;",
    );
    let engineer = format!("eng_{}", db.name);
    let stranger = format!("stranger_{}", db.name);
    db.sql(&format!(
        "CREATE ROLE {engineer} LOGIN; {}; CREATE ROLE {stranger} LOGIN; {}",
        readme_engineer_grants(&engineer, "items"),
        readme_engineer_grants(&stranger, "items")
    ));
    let as_engineer = Session::connect(&url_as(&db, &engineer));

    // A bad undo column is refused at INSERT, naming it.
    let err = as_engineer
        .try_execute(
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, keep_undo, undo_columns)
             VALUES ('bad', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, true, '{v,nope}')",
        )
        .expect_err("unknown undo column");
    assert!(
        err.contains("undo_columns: column 'nope' does not exist in table public.items"),
        "{err}"
    );

    // Whole-row undo (no undo_columns); planned first: plan shows the undo cost.
    as_engineer.execute(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, keep_undo, batch_size)
         VALUES ('bump', 'items', 'k', $$UPDATE items SET v = v + 100, w = upper(w) WHERE k = ANY(:keys)$$, true, 250);
         SELECT backfill.pause('bump');",
    );
    let plan = db.backfilld(&["plan", "bump", "--json"]);
    assert!(plan.status.success(), "{plan:?}");
    let report: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan json");
    let undo_bytes = report["undo_bytes_estimate"]
        .as_u64()
        .expect("undo estimate");
    // 2,000 rows of a few dozen bytes of jsonb each, plus the per-row overhead.
    assert!((200_000..2_000_000).contains(&undo_bytes), "{undo_bytes}");
    as_engineer.execute("SELECT backfill.resume('bump')");
    let mut daemon = Daemon::start(
        &db.url(),
        &["--exit-when-idle"],
        &env_refs(&quick_worker("undo-range")),
    );
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(db.job_state("bump"), "succeeded", "{}", daemon.log_text());
    assert_eq!(db.int("SELECT count(*) FROM backfill.undo"), 2000);

    // keep_undo is part of the definition a job ran.
    let err = as_engineer
        .try_execute("UPDATE backfill.jobs SET keep_undo = false WHERE name = 'bump'")
        .expect_err("a finished job's definition stays");
    assert!(
        err.contains("job 'bump' has succeeded: its definition is what it ran"),
        "{err}"
    );

    // status shows the undo data's size.
    let status = db.backfilld(&["status", "bump", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("status json");
    assert_eq!(status[0]["undo_rows"], 2000);
    assert!(status[0]["undo_bytes"].as_i64().unwrap_or(0) > 0);

    // Engineers read their own jobs' undo data, nobody else's, and write none.
    let as_stranger = Session::connect(&url_as(&db, &stranger));
    assert_eq!(
        as_stranger.query("SELECT count(*) FROM backfill.undo")[0].get::<_, i64>(0),
        0
    );
    assert_eq!(
        as_engineer.query("SELECT count(*) FROM backfill.undo")[0].get::<_, i64>(0),
        2000
    );
    let err = as_stranger
        .try_execute("SELECT backfill.revert('bump')")
        .expect_err("not the stranger's job");
    assert!(err.contains("is not a member of role"), "{err}");
    let err = as_engineer
        .try_execute("DELETE FROM backfill.undo")
        .expect_err("engineers do not write undo data");
    assert!(err.contains("permission denied"), "{err}");
    let err = as_engineer
        .try_execute("SELECT backfill.revert('bump', 'ten', NULL)")
        .expect_err("a key of the wrong type");
    assert!(err.contains("is not a key of type bigint"), "{err}");

    // The CLI reverts keys 100..=199 only, as the engineer.
    let out = backfilld_at(
        &url_as(&db, &engineer),
        &["revert", "bump", "--from", "100", "--to", "199"],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("revert:bump"), "{out:?}");
    let port = free_port();
    let mut env = quick_worker("undo-range-revert");
    env.push(("BACKFILLD_HTTP__LISTEN", format!("127.0.0.1:{port}")));
    env.push(("BACKFILLD_HTTP__FINAL_SCRAPE_WAIT", "0s".to_string()));
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the revert to finish", RUN_LIMIT, || {
        db.job_state("revert:bump") == "succeeded"
    });
    // The gauge of the job's undo data.
    wait_until("the undo gauge", RUN_LIMIT, || {
        http_get(port, "/metrics").is_some_and(|(_, body)| {
            body.contains("backfill_undo_rows{backfill_job=\"bump\"} 2000")
        })
    });
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
    let hash = |table: &str, filter: &str| {
        db.sql(&format!(
            "SELECT md5(string_agg(t::text, '|' ORDER BY k)) FROM {table} t WHERE {filter}"
        ))
    };
    assert_eq!(
        hash("items", "k BETWEEN 100 AND 199"),
        hash("items_before", "k BETWEEN 100 AND 199")
    );
    assert_eq!(
        db.int("SELECT count(*) FROM items WHERE k NOT BETWEEN 100 AND 199 AND v < 100"),
        0,
        "keys outside the range keep the job's values"
    );

    // A revert whose first batch meets only rows changed since lists them all as
    // conflicts (it is not taken for a statement that cannot work).
    db.sql("UPDATE items SET w = 'changed ' || k WHERE k BETWEEN 300 AND 339");
    as_engineer.execute("SELECT backfill.revert('bump', '300', '339')");
    let mut daemon = Daemon::start(
        &db.url(),
        &["--exit-when-idle"],
        &env_refs(&quick_worker("undo-range-conflicts")),
    );
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(
        db.job_state("revert:bump:2"),
        "failed",
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        db.sql(
            "SELECT count(*) || ' ' || min(f.sqlstate) FROM backfill.failed_rows f JOIN backfill.jobs j ON j.id = f.job_id
              WHERE j.name = 'revert:bump:2'"
        ),
        "40 P0U01"
    );
    assert_eq!(
        db.int("SELECT count(*) FROM items WHERE k BETWEEN 300 AND 339 AND w LIKE 'changed %' AND v >= 100"),
        40,
        "rows changed since are left alone"
    );

    // purge_undo drops it all; the job's status then shows none kept.
    let purged = as_engineer.query("SELECT backfill.purge_undo('bump')");
    assert_eq!(purged[0].get::<_, i64>(0), 2000);
    assert_eq!(
        db.int("SELECT undo_rows FROM backfill.job_status WHERE name = 'bump'"),
        0
    );
}

#[test]
fn a_least_privilege_daemon_keeps_undo_and_the_revert_runs_as_the_engineer() {
    let db = TestDb::new("undo_least_privilege");
    let daemon_role = format!("bf_{}", db.name);
    let engineer = format!("eng_{}", db.name);
    // README's "Least privilege": the daemon owns the queue's schema and nothing else.
    db.sql(&format!(
        "CREATE ROLE {daemon_role} LOGIN;
         CREATE SCHEMA backfill AUTHORIZATION {daemon_role};
         GRANT pg_monitor TO {daemon_role};
         CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL, w text);
         INSERT INTO items SELECT g, g, 'w' || g FROM generate_series(1, 1500) g;
         CREATE TABLE items_before AS SELECT * FROM items;"
    ));
    let as_daemon = url_as(&db, &daemon_role);
    let migrated = backfilld_at(&as_daemon, &["migrate"], &[]);
    assert!(migrated.status.success(), "{migrated:?}");
    db.sql(&format!(
        "CREATE ROLE {engineer} LOGIN; {}; GRANT {engineer} TO {daemon_role};",
        readme_engineer_grants(&engineer, "items")
    ));
    let as_engineer = Session::connect(&url_as(&db, &engineer));
    as_engineer.execute(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, keep_undo, undo_columns, batch_size,
                                    parallelism)
         VALUES ('negate', 'items', 'k', $$UPDATE items SET v = -v WHERE k = ANY(:keys)$$, true, '{v}', 200, 3)",
    );
    let env = quick_worker("undo-least-privilege");
    let run = |what: &str| {
        let mut daemon = Daemon::start(&as_daemon, &["--exit-when-idle"], &env_refs(&env));
        daemon.expect_success(RUN_LIMIT);
        assert!(
            !daemon.log_text().contains("ERROR"),
            "{what}: {}",
            daemon.log_text()
        );
    };
    run("the backfill");
    assert_eq!(db.job_state("negate"), "succeeded");
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v < 0"), 1500);
    // Cut into slices, every slice saved its rows under the job.
    assert_eq!(
        db.sql("SELECT count(*) || ' ' || count(DISTINCT job_id) FROM backfill.undo"),
        "1500 1"
    );
    assert_eq!(
        db.int("SELECT count(*) FROM backfill.jobs WHERE parent_id IS NOT NULL"),
        3
    );
    as_engineer.execute("SELECT backfill.revert('negate')");
    run("the revert");
    assert_eq!(db.job_state("revert:negate"), "succeeded");
    assert_eq!(
        db.sql("SELECT enqueued_by FROM backfill.jobs WHERE name = 'revert:negate'"),
        engineer
    );
    let hash = |table: &str| {
        db.sql(&format!(
            "SELECT md5(string_agg(t::text, '|' ORDER BY k)) FROM {table} t"
        ))
    };
    assert_eq!(hash("items"), hash("items_before"));

    // undo.retention: the daemon drops undo data of jobs finished longer ago.
    db.sql(
        "UPDATE backfill.jobs SET finished_at = now() - interval '2 minutes' WHERE name = 'negate'",
    );
    let mut env = quick_worker("undo-retention");
    env.push(("BACKFILLD_UNDO__RETENTION", "1m".to_string()));
    let mut daemon = Daemon::start(&as_daemon, &[], &env_refs(&env));
    wait_until("undo data past its retention to go", RUN_LIMIT, || {
        db.int("SELECT count(*) FROM backfill.undo") == 0
    });
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
    assert!(
        daemon
            .log_text()
            .contains("dropped undo data of jobs finished longer ago than undo.retention"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn undo_keys_and_values_round_trip_exactly_under_hostile_session_settings() {
    let db = TestDb::new("undo_settings");
    db.migrate();
    let engineer = format!("eng_{}", db.name);
    // Timestamp keys and float, timestamp, interval and bytea values: text forms that
    // DateStyle, TimeZone, IntervalStyle, extra_float_digits and bytea_output bend.
    db.sql(&format!(
        "CREATE TABLE events (at timestamptz PRIMARY KEY, x float8, t timestamp, i interval, b bytea, s text);
         INSERT INTO events
         SELECT timestamptz '2024-03-10 01:00:00+00' + g * interval '37 minutes 0.123457 seconds',
                1000000 + g / 3.0, timestamp '2024-01-31 23:00:00' + g * interval '1 day 1.5 seconds',
                g * interval '1 day 3 hours 0.25 seconds', decode(lpad(to_hex(g), 8, '0'), 'hex'), 'é' || g
           FROM generate_series(1, 1200) g;
         CREATE TABLE events_before AS SELECT * FROM events;
         CREATE ROLE {engineer} LOGIN; {};
         ALTER ROLE {engineer} SET extra_float_digits = -15;
         ALTER ROLE {engineer} SET DateStyle = 'SQL, MDY';
         ALTER ROLE {engineer} SET TimeZone = 'Asia/Shanghai';
         ALTER ROLE {engineer} SET IntervalStyle = 'sql_standard';
         ALTER ROLE {engineer} SET bytea_output = 'escape';",
        readme_engineer_grants(&engineer, "events")
    ));
    let as_engineer = Session::connect(&url_as(&db, &engineer));
    as_engineer.execute(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, keep_undo, batch_size)
         VALUES ('mangle', 'events', 'at',
                 $$UPDATE events SET x = x * 1.1, t = t + interval '1 hour', i = i * 2, b = b || '\\x00', s = upper(s)
                    WHERE at = ANY(:keys)$$, true, 250)",
    );
    let env = quick_worker("undo-settings");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(db.job_state("mangle"), "succeeded", "{}", daemon.log_text());
    assert_eq!(db.int("SELECT count(*) FROM backfill.undo"), 1200);
    as_engineer.execute("SELECT backfill.revert('mangle')");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(
        db.job_state("revert:mangle"),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    // Compared as values, not text: every key found its row and every value came back.
    assert_eq!(
        db.int(
            "SELECT count(*) FROM events e FULL JOIN events_before b ON b.at = e.at
              WHERE (e.x, e.t, e.i, e.b, e.s) IS DISTINCT FROM (b.x, b.t, b.i, b.b, b.s)"
        ),
        0
    );
}

#[test]
fn a_change_committed_while_a_batch_waits_for_its_row_is_not_undone_by_the_revert() {
    let db = TestDb::new("undo_race");
    db.migrate();
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL, note text);
         INSERT INTO items (k, v) SELECT g, g FROM generate_series(1, 200) g;",
    );
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, keep_undo, batch_size, min_batch_size, max_batch_size)
         VALUES ('bump', 'items', 'k', $$UPDATE items SET v = v + 1000 WHERE k = ANY(:keys)$$, true, 200, 200, 200)",
    );
    // A writer holds row 5 while the batch starts, then commits a change to a column
    // the job does not write: the batch's old values must be taken after it.
    let writer = db.session();
    writer.execute("BEGIN; UPDATE items SET note = 'writer' WHERE k = 5");
    let mut env = quick_worker("undo-race");
    env.push(("BACKFILLD_BATCH__LOCK_TIMEOUT", "30s".to_string()));
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    wait_until("the batch to wait for row 5", RUN_LIMIT, || {
        db.int(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backfilld/undo-race' AND wait_event_type = 'Lock'",
        ) > 0
    });
    writer.execute("COMMIT");
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(db.job_state("bump"), "succeeded", "{}", daemon.log_text());
    db.sql("SELECT backfill.revert('bump')");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(
        db.job_state("revert:bump"),
        "succeeded",
        "{}",
        daemon.log_text()
    );
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v > 1000"), 0);
    assert_eq!(
        db.sql("SELECT coalesce(note, 'NULL') FROM items WHERE k = 5"),
        "writer",
        "the writer's change, committed before the batch changed the row, survives the revert"
    );
}
