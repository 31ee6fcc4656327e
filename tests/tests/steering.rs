//! Operators steer jobs (issue 16): run windows, per-job circuit-breaker limits, the
//! finish_by deadline and its forecast, and events to a LISTEN session and a webhook.

use std::time::Duration;

use backfilld_e2e::{
    env_refs, free_port, http_get, listen_for_events, quick_worker, wait_until, Daemon, TestDb,
};

const RUN_LIMIT: Duration = Duration::from_secs(90);

/// `items` with `rows` rows whose `v` is 0 (pending).
fn items(db: &TestDb, rows: i64) {
    db.sql(&format!(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, {rows}) g;"
    ));
}

/// Enqueues job `name` over `items` (adding 1 to `v`, so a row done twice shows), with
/// extra `columns` / `values` (e.g. `, max_rows_per_second` / `, 200`).
fn enqueue(db: &TestDb, name: &str, columns: &str, values: &str) {
    db.sql(&format!(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate{columns})
         VALUES ('{name}', 'items', 'k', $$UPDATE items SET v = v + 1 WHERE k = ANY(:keys)$$, 'v = 0'{values})"
    ));
}

fn rows_done(db: &TestDb, name: &str) -> i64 {
    db.int(&format!(
        "SELECT rows_done FROM backfill.job_status WHERE name = '{name}'"
    ))
}

#[test]
fn a_run_window_is_refused_at_insert_naming_what_is_wrong() {
    let db = TestDb::new("steer_window_input");
    items(&db, 10);
    db.migrate();
    let refused = |windows: &str| {
        db.sql_err(&format!(
            "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, run_windows)
             VALUES ('w', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, '{windows}')"
        ))
    };
    for (windows, message) in [
        (
            r#"{"Mon-Fri 22:00-06:00 Europe/Berlin", "Mon-Fry 22:00-06:00"}"#,
            "run_windows: 'Mon-Fry 22:00-06:00' is not a run window: 'Mon-Fry' is not a day or a day range (Mon, Tue, ... Sun; Mon-Fri; Sat,Sun)",
        ),
        (
            r#"{"Sat 25:00-06:00"}"#,
            "run_windows: 'Sat 25:00-06:00' is not a run window: '25:00' is not a time of day (00:00 to 23:59:59; 24:00 as a closing)",
        ),
        (
            r#"{"22:00-06:00 Mars/Olympus"}"#,
            "run_windows: '22:00-06:00 Mars/Olympus' is not a run window: 'Mars/Olympus' is not a time zone PostgreSQL knows (see pg_timezone_names, e.g. Europe/Berlin, UTC)",
        ),
        (
            r#"{"nights"}"#,
            "run_windows: 'nights' is not a run window; write e.g. 'Mon-Fri 22:00-06:00 Europe/Berlin' ([days ]HH:MM[:SS]-HH:MM[:SS][ time zone])",
        ),
    ] {
        let error = refused(windows);
        assert!(error.contains(message), "{windows}: {error}");
    }
    let share = db.sql_err(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, breaker_failed_share)
         VALUES ('b', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 0)",
    );
    assert!(
        share.contains("breaker_failed_share must be more than 0 and at most 1"),
        "{share}"
    );
    // Nothing was enqueued by the refused INSERTs; a good one goes in and reads back.
    assert_eq!(db.int("SELECT count(*) FROM backfill.jobs"), 0);
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, run_windows)
         VALUES ('ok', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$,
                 '{\"Mon-Fri 22:00-06:00 Europe/Berlin\", \"Sat,Sun 00:00-00:00\"}')",
    );
    // An engineer with README's grants sets the steering columns; not the daemon's forecast.
    db.sql(&format!(
        "CREATE ROLE steer_engineer; {}",
        backfilld_e2e::readme_engineer_grants("steer_engineer", "public.items")
    ));
    let engineer = db.session();
    engineer.execute("SET ROLE steer_engineer");
    engineer.execute(
        "UPDATE backfill.jobs SET run_windows = '{\"Mon-Fri 22:00-06:00 Europe/Berlin\", \"Sat,Sun 00:00-00:00\"}',
                finish_by = now() + interval '1 day', breaker_failed_share = 0.5, breaker_failed_rows = 10
          WHERE name = 'ok'",
    );
    let queue_state = engineer
        .try_execute("UPDATE backfill.jobs SET recent_rows_per_second = 1e9 WHERE name = 'ok'")
        .unwrap_err();
    // Not granted, and the guard trigger would refuse it besides.
    assert_eq!(queue_state, "42501: permission denied for table jobs");
    let bad = engineer
        .try_execute("UPDATE backfill.jobs SET run_windows = '{\"Mon 9-17\"}' WHERE name = 'ok'")
        .unwrap_err();
    assert!(
        bad.contains("run_windows: 'Mon 9-17' is not a run window"),
        "{bad}"
    );
    // The rule the daemon uses, on fixed instants (2026-12-03 is a Thursday).
    for (at, open) in [
        ("2026-12-03 21:30+00", true), // 22:30 in Berlin
        ("2026-12-04 04:59+00", true), // Friday 05:59 in Berlin: Thursday's night
        ("2026-12-04 05:00+00", false),
        ("2026-12-04 12:00+00", false),
        ("2026-12-05 12:00+00", true), // Saturday, all day
    ] {
        assert_eq!(
            db.sql(&format!(
                "SELECT backfill.in_window(run_windows, '{at}') FROM backfill.jobs WHERE name = 'ok'"
            )),
            if open { "t" } else { "f" },
            "{at}"
        );
    }
}

/// A window (UTC) opening `opens_in` seconds from the database's now, for `lasts` seconds.
fn window_from_now(db: &TestDb, opens_in: u32, lasts: u32) -> String {
    db.sql(&format!(
        "SELECT to_char(now() AT TIME ZONE 'UTC' + interval '{opens_in} s', 'HH24:MI:SS') || '-' ||
                to_char(now() AT TIME ZONE 'UTC' + interval '{} s', 'HH24:MI:SS') || ' UTC'",
        opens_in + lasts
    ))
}

#[test]
fn a_job_runs_only_inside_its_window_and_rests_outside_without_blocking_others() {
    let db = TestDb::new("steer_window");
    items(&db, 20000);
    db.sql(
        "CREATE TABLE others (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO others (k) SELECT g FROM generate_series(1, 2000) g;",
    );
    db.migrate();
    let window = window_from_now(&db, 10, 12);
    enqueue(
        &db,
        "nightly",
        ", run_windows, max_rows_per_second, batch_size, priority",
        &format!(", ARRAY['{window}'], 1000, 100, 10"),
    );
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, max_rows_per_second, batch_size)
         VALUES ('daytime', 'others', 'k', $$UPDATE others SET v = v + 1 WHERE k = ANY(:keys)$$, 'v = 0', 500, 100)",
    );
    let status = |column: &str| {
        db.sql(&format!(
            "SELECT {column} FROM backfill.job_status WHERE name = 'nightly'"
        ))
    };
    assert_eq!(
        status("throttle_state || '/' || throttle_reason"),
        "holding/window"
    );

    let (events, _runtime) = listen_for_events(&db.url());
    // One slot: the job waiting for its window does not keep the other from running.
    let port = free_port();
    let mut env = quick_worker("steer-window");
    env.push(("BACKFILLD_WORKER__CONCURRENCY", "1".to_string()));
    env.push(("BACKFILLD_HTTP__LISTEN", format!("127.0.0.1:{port}")));
    let daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("daytime to finish", RUN_LIMIT, || {
        db.job_state("daytime") == "succeeded"
    });
    assert_eq!(rows_done(&db, "nightly"), 0, "ran before its window opened");
    assert_eq!(db.job_state("nightly"), "pending");
    let held_for_window = "backfill_throttled{backfill_job=\"nightly\",reason=\"window\"}";
    wait_until("the window metric", RUN_LIMIT, || {
        metric(port, held_for_window) == Some(1.0)
    });

    wait_until("the window to open and nightly to run", RUN_LIMIT, || {
        rows_done(&db, "nightly") > 0
    });
    assert_eq!(status("in_window"), "t");
    wait_until("the window metric to clear", RUN_LIMIT, || {
        metric(port, held_for_window) == Some(0.0)
    });
    wait_until("the window to close and nightly to rest", RUN_LIMIT, || {
        status("state || '/' || coalesce(throttle_reason, '')") == "pending/window"
    });
    let rested_at = rows_done(&db, "nightly");
    assert!(
        (3000..19000).contains(&rested_at),
        "{rested_at} rows in a 12 s window at 1000 rows/s"
    );
    // Resting, it keeps its checkpoint and stays put; nothing holds its lease.
    assert_eq!(
        db.sql("SELECT (checkpoint IS NOT NULL)::text || '/' || (lease_token IS NULL)::text FROM backfill.jobs WHERE name = 'nightly'"),
        "true/true"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        rows_done(&db, "nightly"),
        rested_at,
        "ran outside its window"
    );
    let log = daemon.log_text();
    assert!(log.contains("outside the job's run windows"), "{log}");
    let mut seen = Vec::new();
    collect_until(&events, &mut seen, "nightly", "rested");
    assert_eq!(
        events_of(&seen, "nightly"),
        ["claimed", "rested"],
        "{seen:#?}"
    );
    let rested = seen
        .iter()
        .rfind(|e| e["job"] == "nightly")
        .expect("rested");
    assert_eq!(rested["reason"], "window", "{rested}");
    assert_eq!(rested["new_state"], "pending", "{rested}");

    // Windows are tunable: opening it for good lets it finish from its checkpoint.
    db.sql("UPDATE backfill.jobs SET run_windows = NULL WHERE name = 'nightly'");
    wait_until("nightly to finish", RUN_LIMIT, || {
        db.job_state("nightly") == "succeeded"
    });
    // Every row exactly once: resting and resuming redid and skipped nothing.
    assert_eq!(
        db.sql("SELECT count(*) FILTER (WHERE v = 1) || '/' || count(*) FROM items"),
        "20000/20000"
    );
}

#[test]
fn a_jobs_own_breaker_limit_is_tunable_while_it_runs_and_pauses_it() {
    let db = TestDb::new("steer_breaker");
    // Every 50th row breaks the constraint: 2%, under the default share of 10%.
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0 CHECK (v < 10));
         INSERT INTO items (k) SELECT g FROM generate_series(1, 40000) g;",
    );
    db.migrate();
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size, max_rows_per_second)
         VALUES ('two_percent', 'items', 'k',
                 $$UPDATE items SET v = CASE WHEN k % 50 = 0 THEN 100 ELSE 1 END WHERE k = ANY(:keys)$$,
                 'v = 0', 200, 2000)",
    );
    let env = quick_worker("steer-breaker");
    let daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until(
        "two_percent to pass the breaker's min_rows",
        RUN_LIMIT,
        || rows_done(&db, "two_percent") > 2000,
    );
    assert_eq!(
        db.job_state("two_percent"),
        "running",
        "2% is under the default 10%"
    );

    // The job's own limit, set while it runs: more than 1% failed pauses it.
    db.sql("UPDATE backfill.jobs SET breaker_failed_share = 0.01 WHERE name = 'two_percent'");
    wait_until("the job's own breaker to pause it", RUN_LIMIT, || {
        db.job_state("two_percent") == "paused"
    });
    let last_error = db.sql("SELECT last_error FROM backfill.jobs WHERE name = 'two_percent'");
    assert!(
        last_error.starts_with("circuit breaker: ")
            && last_error.contains("more than the job's breaker_failed_share 1%"),
        "{last_error}"
    );
    assert!(
        daemon.log_text().contains("retuned") || daemon.log_text().contains("circuit breaker"),
        "{}",
        daemon.log_text()
    );
    // An absolute limit of the job's own, with the share back to the default.
    db.sql(
        "UPDATE backfill.jobs SET breaker_failed_share = NULL, breaker_failed_rows = 10 WHERE name = 'two_percent';
         SELECT backfill.resume('two_percent')",
    );
    wait_until("the row limit to pause it again", RUN_LIMIT, || {
        db.sql("SELECT state || ':' || coalesce(last_error, '') FROM backfill.jobs WHERE name = 'two_percent'")
            .contains("more than the job's breaker_failed_rows 10")
    });
    assert_eq!(db.job_state("two_percent"), "paused");
}

/// Scrapes `/metrics` and returns the value of the series whose line starts with `series`.
fn metric(port: u16, series: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics")?;
    body.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[test]
fn the_forecast_counts_held_time_and_tracks_the_actual_finish_within_20_percent() {
    let db = TestDb::new("steer_forecast");
    items(&db, 9000);
    db.migrate();
    enqueue(
        &db,
        "fc",
        ", max_rows_per_second, batch_size, finish_by",
        ", 500, 100, now() + interval '10 seconds'",
    );
    let port = free_port();
    let mut env = quick_worker("steer-forecast");
    env.push(("BACKFILLD_WORKER__FORECAST_WINDOW", "8s".to_string()));
    // The operator's holds alone shape the rate: the impact budget (tests/tests/budget.rs)
    // would pace the job next to the test's own sessions, and its rests would come on top.
    env.push(("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0".to_string()));
    env.push(("BACKFILLD_THROTTLE__PROBE_INTERVAL", "200ms".to_string()));
    env.push(("BACKFILLD_HTTP__LISTEN", format!("127.0.0.1:{port}")));
    let daemon = Daemon::start(&db.url(), &[], &env_refs(&env));

    // The operator holds the job for 2 s of every 4: it runs at half its batch speed.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = {
        let (url, done) = (db.url(), done.clone());
        std::thread::spawn(move || {
            let session = backfilld_e2e::Session::connect(&url);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                session.execute("SELECT backfill.throttle(0, '2 seconds', 'fc')");
                std::thread::sleep(Duration::from_secs(4));
            }
        })
    };
    wait_until("a forecast over a full window", RUN_LIMIT, || {
        rows_done(&db, "fc") > 1500
            && db.sql(
                "SELECT forecast_finish IS NOT NULL FROM backfill.job_status WHERE name = 'fc'",
            ) == "t"
    });
    std::thread::sleep(Duration::from_secs(6));
    let (forecast_in, forecast_at, eta): (f64, f64, f64) = {
        let row = db.sql(
            "SELECT extract(epoch FROM forecast_finish - now()) || ' ' || extract(epoch FROM now())
                    || ' ' || coalesce(extract(epoch FROM eta), -1)
               FROM backfill.job_status WHERE name = 'fc'",
        );
        let mut parts = row.split(' ').map(|v| v.parse::<f64>().expect("a number"));
        (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        )
    };
    // The deadline (10 s after enqueueing) is lost: job_status, status and metrics say so.
    assert_eq!(
        db.sql("SELECT late FROM backfill.job_status WHERE name = 'fc'"),
        "t"
    );
    let status = db.backfilld(&["status", "fc"]);
    assert!(status.stdout.contains("LATE"), "{status:?}");
    let plan = db.backfilld(&["plan", "fc"]);
    assert!(
        plan.stdout.contains("  finish_by      ")
            && plan.stdout.contains("MISSES it")
            && plan.stdout.contains("throttled time included (LATE)"),
        "{plan:?}"
    );
    wait_until("the deadline metrics", RUN_LIMIT, || {
        metric(
            port,
            "backfill_job_deadline_margin_seconds{backfill_job=\"fc\"}",
        )
        .is_some_and(|margin| margin < 0.0)
            && metric(port, "backfill_job_forecast_seconds{backfill_job=\"fc\"}")
                .is_some_and(|seconds| seconds > 0.0)
    });

    wait_until("fc to finish", RUN_LIMIT, || {
        db.job_state("fc") == "succeeded"
    });
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    holder.join().expect("holder");
    let actual_in: f64 = db
        .sql(&format!(
            "SELECT extract(epoch FROM finished_at) - {forecast_at} FROM backfill.jobs WHERE name = 'fc'"
        ))
        .parse()
        .expect("a number");
    // For the record: the batch-speed ETA ignores the holds.
    eprintln!(
        "forecast {forecast_in:.1} s, batch-speed eta {eta:.1} s, finished after {actual_in:.1} s"
    );
    assert!(
        (forecast_in - actual_in).abs() <= 0.2 * actual_in,
        "forecast {forecast_in:.1} s, finished after {actual_in:.1} s:\n{}",
        daemon.log_text()
    );
    drop(daemon);
}

/// A local HTTP receiver: answers the first request 503 (so the webhook must retry) and
/// every later one 200; the receiver gets each request's JSON body.
fn http_receiver() -> (u16, std::sync::mpsc::Receiver<serde_json::Value>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, bodies) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut length = 0;
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let status = if n == 0 {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let _ = stream
                .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
            assert!(
                request_line.starts_with("POST /hook?token=s3cr3t HTTP/1.1"),
                "{request_line}"
            );
            if n > 0 {
                let json = serde_json::from_slice(&body).expect("a JSON body");
                if tx.send(json).is_err() {
                    return;
                }
            }
        }
    });
    (port, bodies)
}

/// Collects (job, event) pairs from `source` until `last` of `job` arrives.
fn collect_until(
    source: &std::sync::mpsc::Receiver<serde_json::Value>,
    seen: &mut Vec<serde_json::Value>,
    job: &str,
    last: &str,
) {
    while !seen.iter().any(|e| e["job"] == job && e["event"] == last) {
        let event = source
            .recv_timeout(RUN_LIMIT)
            .unwrap_or_else(|_| panic!("no '{last}' event of {job}; got {seen:#?}"));
        seen.push(event);
    }
}

fn events_of(seen: &[serde_json::Value], job: &str) -> Vec<String> {
    seen.iter()
        .filter(|e| e["job"] == job)
        .map(|e| e["event"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_listen_session_and_a_webhook_receive_the_same_events() {
    let db = TestDb::new("steer_events");
    items(&db, 3000);
    db.sql(
        "CREATE TABLE others (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO others (k) SELECT g FROM generate_series(1, 100000) g;",
    );
    db.migrate();
    let (listened, _runtime) = listen_for_events(&db.url());
    let (port, posted) = http_receiver();
    let mut env = quick_worker("steer-events");
    env.extend([
        ("BACKFILLD_WORKER__CONCURRENCY", "3".to_string()),
        ("BACKFILLD_DATABASE__POOL_SIZE", "6".to_string()),
        ("BACKFILLD_THROTTLE__PROBE_INTERVAL", "200ms".to_string()),
        ("BACKFILLD_EVENTS__THROTTLED_AFTER", "1s".to_string()),
        (
            "BACKFILLD_EVENTS__WEBHOOK_URL",
            format!("http://127.0.0.1:{port}/hook?token=s3cr3t"),
        ),
        ("BACKFILLD_EVENTS__WEBHOOK_TIMEOUT", "2s".to_string()),
    ]);
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    // The webhook posts what happens from when it listens on.
    wait_until("the webhook to listen", RUN_LIMIT, || {
        daemon
            .log_text()
            .contains("events webhook: this worker sends the events")
    });
    db.sql("SELECT backfill.throttle(0, '1 hour', 'held')");
    enqueue(
        &db,
        "hooked",
        ", batch_size, max_rows_per_second",
        ", 100, 600",
    );
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql)
         VALUES ('broken', 'items', 'k', $$UPDATE items SET nope = 1 WHERE k = ANY(:keys)$$);
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, max_rows_per_second)
         VALUES ('held', 'others', 'k', $$UPDATE others SET v = 1 WHERE k = ANY(:keys)$$, 100);
         SELECT backfill.throttle(0, '1 hour', 'held');",
    );
    wait_until("hooked to make progress", RUN_LIMIT, || {
        rows_done(&db, "hooked") > 0
    });
    db.sql("SELECT backfill.pause('hooked')");
    wait_until("the worker to let go of hooked", RUN_LIMIT, || {
        daemon.log_text().contains("stopped working on the job")
    });
    db.sql("SELECT backfill.resume('hooked')");
    wait_until("hooked to succeed", RUN_LIMIT, || {
        db.job_state("hooked") == "succeeded"
    });
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    while !daemon
        .log_text()
        .contains("job throttled for longer than events.throttled_after")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut on_listen = Vec::new();
    collect_until(&listened, &mut on_listen, "held", "throttled");
    db.sql("SELECT backfill.cancel('held')");
    collect_until(&listened, &mut on_listen, "held", "cancelled");
    collect_until(&listened, &mut on_listen, "hooked", "succeeded");
    collect_until(&listened, &mut on_listen, "broken", "failed");
    let mut on_webhook = Vec::new();
    collect_until(&posted, &mut on_webhook, "held", "cancelled");
    collect_until(&posted, &mut on_webhook, "hooked", "succeeded");
    collect_until(&posted, &mut on_webhook, "broken", "failed");

    assert_eq!(
        events_of(&on_listen, "hooked"),
        [
            "enqueued",
            "claimed",
            "paused",
            "resumed",
            "claimed",
            "succeeded"
        ],
        "{on_listen:#?}"
    );
    assert_eq!(
        events_of(&on_listen, "broken"),
        ["enqueued", "claimed", "failed"]
    );
    assert_eq!(
        events_of(&on_listen, "held"),
        ["enqueued", "claimed", "throttled", "cancelled"],
        "{on_listen:#?}"
    );
    let throttled = on_listen
        .iter()
        .find(|e| e["event"] == "throttled")
        .expect("throttled");
    assert_eq!(throttled["reason"], "operator", "{throttled}");
    assert!(
        throttled["throttled_seconds"]
            .as_f64()
            .is_some_and(|s| s >= 1.0),
        "{throttled}"
    );
    // The webhook got the same events, in the same order per job, as JSON; the first
    // POST was answered 503 and retried.
    for job in ["hooked", "broken", "held"] {
        assert_eq!(
            events_of(&on_webhook, job),
            events_of(&on_listen, job),
            "{job}"
        );
    }
    let first = on_listen
        .iter()
        .find(|e| e["job"] == "hooked")
        .expect("an event");
    assert!(on_webhook.contains(first), "{first} not posted as is");
    let log = daemon.log_text();
    assert!(
        log.contains("events webhook: POST failed; retrying"),
        "{log}"
    );
    assert!(
        !log.contains("s3cr3t"),
        "the webhook URL is a secret:\n{log}"
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

#[test]
fn a_bad_webhook_url_or_forecast_window_is_a_configuration_error_that_keeps_the_url_secret() {
    let db = TestDb::new("steer_config");
    db.migrate();
    for (key, value, message) in [
        (
            "BACKFILLD_EVENTS__WEBHOOK_URL",
            "ftp://hooks.example.com/s3cr3t",
            "events.webhook_url must be an http:// or https:// URL, got scheme \"ftp\"",
        ),
        (
            "BACKFILLD_EVENTS__WEBHOOK_ATTEMPTS",
            "0",
            "events.webhook_attempts must be at least 1",
        ),
        (
            "BACKFILLD_WORKER__FORECAST_WINDOW",
            "100ms",
            "worker.forecast_window must be at least 1s, got 100ms",
        ),
    ] {
        let out = backfilld_e2e::backfilld_at(&db.url(), &["status"], &[(key, value)]);
        assert_eq!(
            out.usage_error(),
            format!("backfilld: configuration error: {message}")
        );
        assert!(!out.stderr.contains("s3cr3t"), "{out:?}");
    }
}
