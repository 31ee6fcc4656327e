//! Operators steer running jobs: the completion gate (`backfilld wait`, and
//! `backfill.require_succeeded` for migration tools), events on every state change, the
//! circuit breaker on failed rows, and live retuning of a running job.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use backfilld_e2e::{backfilld_at, env_refs, quick_worker, readme_engineer_grants, Daemon, TestDb};

const RUN_LIMIT: Duration = Duration::from_secs(60);

/// `items` with `rows` rows whose `v` is 0 (pending).
fn items(db: &TestDb, rows: i64) {
    db.sql(&format!(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, {rows}) g;"
    ));
}

/// Enqueues job `name` over `items`, setting `v` to `set` (an expression) with extra
/// columns `extra` (e.g. `, max_rows_per_second` / `, 200`).
fn enqueue(db: &TestDb, name: &str, set: &str, columns: &str, values: &str) {
    db.sql(&format!(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate{columns})
         VALUES ('{name}', 'items', 'k', $$UPDATE items SET v = {set} WHERE k = ANY(:keys)$$, 'v = 0'{values})"
    ));
}

/// Runs `backfilld wait <args>` on a thread of its own; the receiver gets its exit code,
/// stdout and stderr.
fn wait_in_background(url: &str, args: &[&str]) -> mpsc::Receiver<(Option<i32>, String, String)> {
    let (tx, rx) = mpsc::channel();
    let url = url.to_string();
    let mut argv = vec!["wait".to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    std::thread::spawn(move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = backfilld_at(&url, &argv, &[]);
        let _ = tx.send((out.status.code(), out.stdout, out.stderr));
    });
    rx
}

#[test]
fn wait_exits_0_1_2_3_for_succeeded_failed_unknown_and_timed_out() {
    let db = TestDb::new("ctl_wait");
    items(&db, 3000);
    db.migrate();
    enqueue(&db, "good", "1", ", batch_size", ", 500");
    // Fails at claim: the column does not exist.
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql)
         VALUES ('broken', 'items', 'k', $$UPDATE items SET nope = 1 WHERE k = ANY(:keys)$$)",
    );
    enqueue(&db, "doomed", "1", "", "");

    // Unknown job: exit 2, one line.
    let unknown = db.backfilld(&["wait", "nope", "--timeout", "5s"]);
    assert_eq!(
        unknown.usage_error(),
        "backfilld: no backfill job named 'nope'"
    );
    // Bad usage: a zero timeout.
    let zero = db.backfilld(&["wait", "good", "--timeout", "0s"]);
    assert!(zero.usage_error().contains("--timeout"), "{zero:?}");

    // Nobody runs the queue yet: the timeout passes, exit 3, saying the state.
    let started = Instant::now();
    let timed_out = db.backfilld(&["wait", "good", "--timeout", "1s"]);
    assert_eq!(timed_out.status.code(), Some(3), "{timed_out:?}");
    assert_eq!(
        timed_out.stderr.trim(),
        "backfilld: job good is still pending after 1s"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Waiting before anyone runs the jobs: each wait ends when its job does.
    let good = wait_in_background(&db.url(), &["good", "--timeout", "60s"]);
    let broken = wait_in_background(&db.url(), &["broken"]);
    let doomed = wait_in_background(&db.url(), &["doomed", "--timeout", "60s"]);
    // Cancelled while waited for: exit 1 too.
    db.sql("SELECT backfill.cancel('doomed')");
    let (code, _, stderr) = doomed.recv_timeout(RUN_LIMIT).expect("wait doomed");
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim(), "backfilld: job doomed cancelled");

    let env = quick_worker("ctl-wait");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    let (code, stdout, stderr) = good.recv_timeout(RUN_LIMIT).expect("wait good");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "job good: succeeded");
    assert_eq!(db.job_state("good"), "succeeded");
    let (code, _, stderr) = broken.recv_timeout(RUN_LIMIT).expect("wait broken");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with("backfilld: job broken failed: batch_sql is not valid")
            && stderr.contains("nope"),
        "{stderr}"
    );
    daemon.expect_success(RUN_LIMIT);
    // A finished job answers at once.
    let again = db.backfilld(&["wait", "good"]);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
}

#[test]
fn require_succeeded_raises_naming_state_and_last_error_until_the_job_succeeded() {
    let db = TestDb::new("ctl_gate");
    items(&db, 2000);
    db.migrate();
    enqueue(&db, "fill", "1", "", "");
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql)
         VALUES ('broken', 'items', 'k', $$UPDATE items SET nope = 1 WHERE k = ANY(:keys)$$)",
    );
    // An engineer with README's grants calls the gate; a role without them cannot.
    db.sql(&format!(
        "CREATE ROLE gate_engineer; CREATE ROLE gate_stranger;
         GRANT USAGE ON SCHEMA backfill TO gate_stranger;
         {}",
        readme_engineer_grants("gate_engineer", "public.items")
    ));
    let gate = |role: &str, job: &str| {
        db.session().try_execute(&format!(
            "SET ROLE {role}; SELECT backfill.require_succeeded('{job}')"
        ))
    };
    assert_eq!(
        gate("gate_engineer", "fill").unwrap_err(),
        "55000: backfill job 'fill' has not succeeded: it is pending (0 rows done)"
    );
    assert_eq!(
        gate("gate_engineer", "nope").unwrap_err(),
        "P0002: no backfill job named 'nope'"
    );
    let stranger = gate("gate_stranger", "fill").unwrap_err();
    assert!(
        stranger.starts_with("42501: permission denied for function require_succeeded"),
        "{stranger}"
    );

    let env = quick_worker("ctl-gate");
    Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env)).expect_success(RUN_LIMIT);
    assert_eq!(gate("gate_engineer", "fill"), Ok(()));
    let failed = gate("gate_engineer", "broken").unwrap_err();
    assert!(
        failed.starts_with(
            "55000: backfill job 'broken' has not succeeded: it is failed (0 rows done); last_error: batch_sql is not valid: column \"nope\""
        ),
        "{failed}"
    );
    // The gate fails the migration's transaction, as a migration tool needs.
    let session = db.session();
    assert!(session
        .try_execute("BEGIN; SELECT backfill.require_succeeded('broken'); ALTER TABLE items RENAME v TO w; COMMIT")
        .is_err());
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v = 1"), 2000);
}

/// A session that LISTENs on `backfill_events` and collects the payloads it receives.
struct EventListener {
    events: mpsc::Receiver<serde_json::Value>,
    /// Every event received so far, of every job.
    received: std::cell::RefCell<Vec<serde_json::Value>>,
    _runtime: tokio::runtime::Runtime,
}

impl EventListener {
    fn start(url: &str) -> EventListener {
        let (events, runtime) = backfilld_e2e::listen_for_events(url);
        EventListener {
            events,
            received: Default::default(),
            _runtime: runtime,
        }
    }

    /// The events of job `name` received until `last` (an event name) arrives.
    fn events_of_until(&self, name: &str, last: &str) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + RUN_LIMIT;
        loop {
            let seen: Vec<_> = (self.received.borrow().iter())
                .filter(|event| event["job"] == name)
                .cloned()
                .collect();
            if let Some(end) = seen.iter().position(|event| event["event"] == last) {
                return seen[..=end].to_vec();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no '{last}' event of {name}; got {seen:#?}"));
            self.received.borrow_mut().push(event);
        }
    }
}

/// (event, old_state, new_state) of each event.
fn transitions(events: &[serde_json::Value]) -> Vec<(String, String, String)> {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("null").to_string();
    events
        .iter()
        .map(|e| {
            (
                text(&e["event"]),
                text(&e["old_state"]),
                text(&e["new_state"]),
            )
        })
        .collect()
}

#[test]
fn a_listen_session_receives_every_state_change_of_a_jobs_life_in_order() {
    let db = TestDb::new("ctl_events");
    items(&db, 3000);
    db.migrate();
    let listener = EventListener::start(&db.url());
    enqueue(
        &db,
        "life",
        "1",
        ", batch_size, max_rows_per_second",
        ", 100, 600",
    );
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql)
         VALUES ('broken', 'items', 'k', $$UPDATE items SET nope = 1 WHERE k = ANY(:keys)$$)",
    );
    let env = quick_worker("ctl-events");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    backfilld_e2e::wait_until("life to make progress", RUN_LIMIT, || {
        db.int("SELECT rows_done FROM backfill.jobs WHERE name = 'life'") > 0
    });
    db.sql("SELECT backfill.pause('life')");
    backfilld_e2e::wait_until("the worker to let go of life", RUN_LIMIT, || {
        daemon.log_text().contains("stopped working on the job")
    });
    db.sql("SELECT backfill.resume('life')");
    daemon.expect_success(RUN_LIMIT);

    let life = listener.events_of_until("life", "succeeded");
    let expected = [
        ("enqueued", "null", "pending"),
        ("claimed", "pending", "running"),
        ("paused", "running", "paused"),
        ("resumed", "paused", "pending"),
        ("claimed", "pending", "running"),
        ("succeeded", "running", "succeeded"),
    ]
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
    assert_eq!(transitions(&life), expected, "{life:#?}");
    let id = db.int("SELECT id FROM backfill.jobs WHERE name = 'life'");
    for event in &life {
        assert_eq!(event["id"], id, "{event}");
        assert!(event["parent_id"].is_null(), "{event}");
        assert!(event["at"].is_string(), "{event}");
    }
    assert_eq!(life[1]["worker"], "ctl-events");
    assert_eq!(life[0]["rows_done"], 0);
    let paused_at = life[2]["rows_done"].as_i64().expect("rows_done");
    assert!(paused_at > 0 && paused_at < 3000, "{}", life[2]);
    assert_eq!(life[5]["rows_done"], 3000);

    let broken = listener.events_of_until("broken", "failed");
    assert_eq!(
        transitions(&broken)
            .into_iter()
            .map(|(event, ..)| event)
            .collect::<Vec<_>>(),
        ["enqueued", "claimed", "failed"]
    );
    let error = broken[2]["last_error"].as_str().expect("last_error");
    assert!(
        error.starts_with("batch_sql is not valid") && error.contains("nope"),
        "{error}"
    );
}

#[test]
fn the_circuit_breaker_pauses_a_job_full_of_bad_rows_and_lets_a_few_pass() {
    let db = TestDb::new("ctl_breaker");
    // Every second row of `items` breaks the constraint; three rows of `few` do.
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0 CHECK (v < 10));
         INSERT INTO items (k) SELECT g FROM generate_series(1, 20000) g;
         CREATE TABLE few (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0 CHECK (v < 10));
         INSERT INTO few (k) SELECT g FROM generate_series(1, 5000) g;",
    );
    db.migrate();
    enqueue(
        &db,
        "half_bad",
        "CASE WHEN k % 2 = 0 THEN 100 ELSE 1 END",
        ", batch_size",
        ", 200",
    );
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size, max_attempts)
         VALUES ('few_bad', 'few', 'k',
                 $$UPDATE few SET v = CASE WHEN k IN (17, 2500, 4999) THEN 100 ELSE 1 END WHERE k = ANY(:keys)$$,
                 'v = 0', 200, 1)",
    );
    let env = quick_worker("ctl-breaker");
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    backfilld_e2e::wait_until("few_bad to finish", RUN_LIMIT, || {
        db.job_state("few_bad") == "failed"
    });
    backfilld_e2e::wait_until("the breaker to pause half_bad", RUN_LIMIT, || {
        db.job_state("half_bad") == "paused"
    });
    let id = db.int("SELECT id FROM backfill.jobs WHERE name = 'half_bad'");
    let last_error = db.sql("SELECT last_error FROM backfill.jobs WHERE name = 'half_bad'");
    assert!(
        last_error.starts_with("circuit breaker: ")
            && last_error.contains("more than batch.breaker_failed_share 10%")
            && last_error.contains(&format!("backfill.failed_rows where job_id = {id}"))
            && last_error.ends_with("select backfill.resume('half_bad')"),
        "{last_error}"
    );
    // Judged after 1000 rows (breaker_min_rows), so it stopped within a few batches of it,
    // not after isolating all 10,000 bad rows.
    let failed = db.int(&format!(
        "SELECT count(*) FROM backfill.failed_rows WHERE job_id = {id}"
    ));
    assert!((500..=700).contains(&failed), "{failed} failed rows");
    assert!(
        daemon
            .log_text()
            .contains("job paused by the circuit breaker"),
        "{}",
        daemon.log_text()
    );
    // The job with three bad rows ran through: every other row applied, the three set
    // aside (it ends failed because failed rows remain, as without the breaker).
    assert_eq!(db.int("SELECT count(*) FROM few WHERE v = 1"), 4997);
    assert_eq!(
        db.sql("SELECT string_agg(key, ',' ORDER BY key::bigint) FROM backfill.failed_rows f JOIN backfill.jobs j ON j.id = f.job_id WHERE j.name = 'few_bad'"),
        "17,2500,4999"
    );
    assert!(db
        .sql("SELECT last_error FROM backfill.jobs WHERE name = 'few_bad'")
        .starts_with("3 rows failed"),);
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(RUN_LIMIT);
}

#[test]
fn a_breaker_share_outside_0_to_1_is_a_configuration_error() {
    let db = TestDb::new("ctl_breaker_config");
    db.migrate();
    for share in ["0", "1.5"] {
        let out = backfilld_at(
            &db.url(),
            &["status"],
            &[("BACKFILLD_BATCH__BREAKER_FAILED_SHARE", share)],
        );
        assert_eq!(
            out.usage_error(),
            format!("backfilld: configuration error: batch.breaker_failed_share must be more than 0 and at most 1 (1: never on the share), got {share}")
        );
    }
}

/// Rows per second the job `name` makes over `window`, from `rows_done` before and after.
fn measured_rate(db: &TestDb, name: &str, window: Duration) -> f64 {
    let rows_done = || {
        db.int(&format!(
            "SELECT rows_done FROM backfill.jobs WHERE name = '{name}'"
        ))
    };
    let (before, started) = (rows_done(), Instant::now());
    std::thread::sleep(window);
    (rows_done() - before) as f64 / started.elapsed().as_secs_f64()
}

#[test]
fn a_retune_of_a_running_job_changes_its_measured_rate_within_two_seconds() {
    let db = TestDb::new("ctl_retune");
    items(&db, 60000);
    db.migrate();
    enqueue(
        &db,
        "tuned",
        "1",
        ", batch_size, max_rows_per_second",
        ", 100, 200",
    );
    let mut env = quick_worker("ctl-retune");
    // The job's own limit alone sets the rate: the impact budget (tests/tests/budget.rs)
    // would pace it next to the test's sessions, below the raised limit.
    env.push(("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0".to_string()));
    let daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    backfilld_e2e::wait_until("the job to run", RUN_LIMIT, || {
        db.int("SELECT rows_done FROM backfill.jobs WHERE name = 'tuned'") > 0
    });
    let slow = measured_rate(&db, "tuned", Duration::from_secs(2));
    assert!(
        (100.0..=320.0).contains(&slow),
        "{slow} rows/s at a limit of 200"
    );

    db.sql("UPDATE backfill.jobs SET max_rows_per_second = 2000 WHERE name = 'tuned'");
    // Within 2 s of the UPDATE the job runs at the new limit: measured from then on.
    std::thread::sleep(Duration::from_secs(2));
    let fast = measured_rate(&db, "tuned", Duration::from_secs(2));
    assert!(
        (1200.0..=2600.0).contains(&fast),
        "{fast} rows/s after raising the limit to 2000 (was {slow}):\n{}",
        daemon.log_text()
    );
    assert_eq!(db.job_state("tuned"), "running", "no pause, no resume");
    let log = daemon.log_text();
    assert!(
        log.lines().any(|line| line.contains("retuned")
            && line.contains("max_rows_per_second")
            && line.contains("old=Some(200.0)")
            && line.contains("new=Some(2000.0)")),
        "{log}"
    );

    // And back down: the new, lower limit holds as promptly.
    db.sql("UPDATE backfill.jobs SET max_rows_per_second = 300, priority = 5 WHERE name = 'tuned'");
    std::thread::sleep(Duration::from_secs(2));
    let slowed = measured_rate(&db, "tuned", Duration::from_secs(2));
    assert!(
        (150.0..=450.0).contains(&slowed),
        "{slowed} rows/s at a limit of 300:\n{}",
        daemon.log_text()
    );
    assert!(
        daemon
            .log_text()
            .lines()
            .any(|line| line.contains("retuned")
                && line.contains("priority")
                && line.contains("new=5")),
        "{}",
        daemon.log_text()
    );
}
