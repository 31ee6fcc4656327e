//! The impact budget and what it stands on, end to end: backfilld's own control sessions
//! (heartbeats, lease writes) never count as production it blocks, so it never cancels
//! its own batches for them; and the impact budget paces a job next to production.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use backfilld_e2e::{
    env_refs, free_port, http_get, quick_worker_json_log, serve_app_latency, wait_until,
    Application, Daemon, Prometheus, TestDb,
};

const RUN_LIMIT: Duration = Duration::from_secs(120);

/// A deferred constraint trigger that sleeps `0.4 s` once per transaction, at COMMIT: it
/// fires after the batch's checkpoint UPDATE of its job row, so the batch holds that row
/// lock for as long as a durable commit of a big batch flushes on a loaded disk (the
/// issue measured 200–800 ms with `fsync = on`).
const SLOW_COMMIT_SQL: &str = "
    CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF current_setting('test.slept', true) IS DISTINCT FROM 'yes' THEN
            PERFORM set_config('test.slept', 'yes', true);
            PERFORM pg_sleep(0.4);
        END IF;
        RETURN NULL;
    END $$;";

/// The metric's value for `job` in a `/metrics` body, if exported.
fn lock_waits_of(body: &str, job: &str) -> Option<f64> {
    let label = format!("backfill_job=\"{job}\"");
    body.lines()
        .filter(|line| line.starts_with("backfill_lock_waits{"))
        .find(|line| line.contains(&label))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Highest `backfill_lock_waits` of `job`, and the most control sessions seen waiting on a
/// lock at once, sampled every 50 ms until stopped.
struct Watcher {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(f64, i64, usize)>,
}

impl Watcher {
    fn start(db: &TestDb, port: u16, job: &'static str) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let url = db.url();
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let session = backfilld_e2e::Session::connect(&url);
            let (mut most_lock_waits, mut most_control_waiting, mut scrapes) = (0.0_f64, 0, 0);
            while !flag.load(Ordering::Relaxed) {
                if let Some((200, body)) = http_get(port, "/metrics") {
                    if let Some(value) = lock_waits_of(&body, job) {
                        most_lock_waits = most_lock_waits.max(value);
                        scrapes += 1;
                    }
                }
                let waiting: i64 = session.query(
                    "SELECT count(*) FROM pg_stat_activity \
                      WHERE application_name = 'backfilld-control' AND wait_event_type = 'Lock'",
                )[0]
                .get(0);
                most_control_waiting = most_control_waiting.max(waiting);
                thread::sleep(Duration::from_millis(50));
            }
            (most_lock_waits, most_control_waiting, scrapes)
        });
        Watcher { stop, handle }
    }

    fn finish(self) -> (f64, i64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("watcher")
    }
}

#[test]
fn slow_commits_with_a_quick_heartbeat_never_make_the_daemon_cancel_its_own_batches() {
    let db = TestDb::new("self_lock");
    db.sql(SLOW_COMMIT_SQL);
    db.sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, done boolean NOT NULL DEFAULT false);
         INSERT INTO items (id) SELECT generate_series(1, 600);
         CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON items
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();",
    );
    db.audit_updates("items", "id");
    db.migrate();
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate,
                                    batch_size, min_batch_size, max_batch_size)
         VALUES ('slow_commits', 'public.items', 'id',
                 'UPDATE public.items SET done = true WHERE id = ANY(:keys)', 'NOT done',
                 50, 50, 50)",
    );
    let port = free_port();
    let mut env = quick_worker_json_log("self_lock");
    // A heartbeat every 100 ms lands inside nearly every 400 ms commit.
    env.push(("BACKFILLD_WORKER__HEARTBEAT", "100ms".to_string()));
    env.push(("BACKFILLD_HTTP__LISTEN", format!("127.0.0.1:{port}")));
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    wait_until("the metrics endpoint", RUN_LIMIT, || {
        http_get(port, "/metrics").is_some()
    });
    let watcher = Watcher::start(&db, port, "slow_commits");
    daemon.expect_success(RUN_LIMIT);
    let (most_lock_waits, most_control_waiting, scrapes) = watcher.finish();

    let log = daemon.log_text();
    assert!(
        !log.contains("the batch is blocking other sessions"),
        "the daemon cancelled its own batch:\n{log}"
    );
    assert!(scrapes > 0, "backfill_lock_waits was never exported");
    assert_eq!(
        most_lock_waits, 0.0,
        "backfill_lock_waits counted our own sessions"
    );
    assert_eq!(
        most_control_waiting, 0,
        "a control session (heartbeat) queued behind our own batch's row lock"
    );
    assert_eq!(db.job_state("slow_commits"), "succeeded");
    assert_eq!(db.int("SELECT count(*) FROM items WHERE NOT done"), 0);
    db.assert_backfilled_exactly_once("items", 600);
}

/// The reasons of the daemon's throttle decisions, in order, duplicates removed.
fn decision_reasons(daemon: &Daemon) -> Vec<String> {
    let mut reasons: Vec<String> = daemon
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| {
            line["message"] == "throttle: slowing down" || line["message"] == "throttle: holding"
        })
        .map(|line| line["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    reasons.dedup();
    reasons
}

/// A job of `rows` on `primary` next to production (an [`Application`]), and a daemon on
/// it with the impact budget on, its decisions and judgements logged, and `extra_env`;
/// with the database, the application and the /metrics port.
fn next_to_production<'c>(
    primary: &'c pg_testkit::PgCluster,
    name: &str,
    rows: i64,
    extra_env: &[(&'static str, &str)],
) -> (TestDb<'c>, Application, Daemon, u16) {
    next_to(Application::start, primary, name, rows, extra_env)
}

/// As [`next_to_production`], with the application `start` starts.
fn next_to<'c>(
    start: fn(&TestDb) -> Application,
    primary: &'c pg_testkit::PgCluster,
    name: &str,
    rows: i64,
    extra_env: &[(&'static str, &str)],
) -> (TestDb<'c>, Application, Daemon, u16) {
    let db = TestDb::on(primary, name);
    db.sql(&pg_testkit::demo_data::users_table_sql(rows));
    db.audit_updates("users", "id");
    db.migrate();
    db.sql(pg_testkit::demo_data::SPLIT_NAME_JOB_SQL);

    let application = start(&db);
    let port = free_port();
    let mut env = quick_worker_json_log(name);
    env.push(("BACKFILLD_HTTP__LISTEN", format!("127.0.0.1:{port}")));
    // The test machine's own load (other tests, compilers) moves the canary by
    // milliseconds: a wide floor keeps these tests about the mechanics, not the noise (the
    // cuts are unit-tested in backfill_core::impact and measured by scripts/bench).
    // On, as by default (quick_worker turns it off for the other tests).
    env.push(("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "1.3".to_string()));
    env.push(("BACKFILLD_THROTTLE__IMPACT_FLOOR", "25ms".to_string()));
    env.push((
        "RUST_LOG",
        "backfilld::batch=debug,backfilld::impact=debug,info".to_string(),
    ));
    env.extend(
        extra_env
            .iter()
            .map(|(key, value)| (*key, value.to_string())),
    );
    let daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    (db, application, daemon, port)
}

/// The daemon's "impact budget" log lines (one per change of its directive).
fn impact_judgements(daemon: &Daemon) -> Vec<serde_json::Value> {
    daemon
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "impact budget")
        .collect()
}

#[test]
fn next_to_production_the_impact_budget_rests_to_learn_then_paces_the_job_in_small_batches() {
    // The pace starts at 1,000 rows/s and doubles every two seconds at best: 10,000 rows
    // span a rest and a few judgements.
    let rows = 10_000;
    // A cluster of its own: on the shared one, other tests' sessions are production too.
    let primary = pg_testkit::PgCluster::start_primary().expect("primary");
    let (db, application, mut daemon, port) = next_to_production(&primary, "impact", rows, &[]);
    let mut paces = Vec::new();
    while daemon.wait(Duration::from_millis(200)).is_none() {
        if let Some((200, body)) = http_get(port, "/metrics") {
            let pace = body
                .lines()
                .find(|line| line.starts_with("backfill_impact_budget_rows_per_second "))
                .and_then(|line| line.rsplit(' ').next())
                .and_then(|value| value.parse::<f64>().ok());
            paces.extend(pace);
        }
        assert!(
            paces.len() < 1_000,
            "the job did not finish:\n{}",
            daemon.log_text()
        );
    }
    daemon.expect_success(RUN_LIMIT);
    assert!(application.stop() > 1);
    db.assert_backfilled_exactly_once("users", rows);

    let reasons = decision_reasons(&daemon);
    eprintln!("reasons: {reasons:?}; paces: {paces:?}");
    // It rested to learn production's baseline before pacing, and the duty cycle (the
    // fallback) never applied.
    let first_rest = reasons.iter().position(|r| r == "impact_baseline");
    let first_pace = reasons.iter().position(|r| r == "impact_budget");
    assert!(
        first_rest.is_some() && first_rest < first_pace,
        "{reasons:?}\n{}",
        daemon.log_text()
    );
    assert!(
        !reasons.iter().any(|r| r == "production_active"),
        "{reasons:?}"
    );
    // The pace was exported, resting (0) and pacing (> 0).
    assert!(paces.iter().any(|p| *p > 0.0), "{paces:?}");
    // Paced batches carry `throttle.rate_window` (20 ms) of the pace, never a second's:
    // far below the 10 000 keys the job grows to flat out (tests/tests/throttle.rs).
    let mut paced_sizes: Vec<u64> = daemon
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["reason"] == "impact_budget")
        .filter_map(|line| line["batch_size"].as_u64())
        .collect();
    paced_sizes.sort_unstable();
    assert!(!paced_sizes.is_empty(), "{}", daemon.log_text());
    let median = paced_sizes[paced_sizes.len() / 2];
    assert!(
        median <= 1_000,
        "median paced batch {median}: {paced_sizes:?}"
    );
}

#[test]
fn the_excess_judge_times_canaries_inside_the_batches_and_lets_a_calm_pace_grow() {
    // A canary every 10 ms: calm shows within two seconds, and as many canaries fall
    // inside batches (one per batch, at most one a canary interval) as a span needs.
    let rows = 10_000;
    let primary = pg_testkit::PgCluster::start_primary().expect("primary");
    let (db, application, mut daemon, _port) = next_to_production(
        &primary,
        "impact_excess",
        rows,
        &[
            ("BACKFILLD_THROTTLE__IMPACT_EXCESS_SHARE", "0.0025"),
            ("BACKFILLD_THROTTLE__CANARY_INTERVAL", "10ms"),
            // Nothing scrapes /metrics here: exit when done.
            ("BACKFILLD_HTTP__FINAL_SCRAPE_WAIT", "0s"),
        ],
    );
    daemon.expect_success(RUN_LIMIT);
    assert!(application.stop() > 1);
    db.assert_backfilled_exactly_once("users", rows);

    let judgements = impact_judgements(&daemon);
    // In-batch canaries were timed and judged, and the batches' busy time was read.
    let judged: Vec<&serde_json::Value> = judgements
        .iter()
        .filter(|line| line["in_batch_canaries"].as_u64().unwrap_or(0) >= 20)
        .collect();
    assert!(!judged.is_empty(), "{judgements:#?}");
    assert!(
        judged.iter().all(|line| {
            let busy = line["busy_share"].as_f64().unwrap_or(-1.0);
            busy > 0.0 && busy < 1.0
        }),
        "{judged:#?}"
    );
    // Growth waits for the excess to be surely within budget: with the canaries under
    // the wide floor it was, and the pace grew past where it starts.
    let highest = judgements
        .iter()
        .filter_map(|line| line["directive"].as_str())
        .filter_map(|directive| directive.strip_prefix("Some(Pace("))
        .filter_map(|rest| rest.trim_end_matches("))").parse::<f64>().ok())
        .fold(0.0, f64::max);
    assert!(highest > 500.0, "{judgements:#?}");
}

#[test]
fn the_wal_judge_learns_how_often_production_waits_on_the_wal_while_the_daemon_rests() {
    // Durable commits, as in production: with fsync off no commit waits on a flush.
    let primary = pg_testkit::PgCluster::start_primary_with(&[("fsync", "on")]).expect("primary");
    let rows = 10_000;
    let (db, application, mut daemon, _port) = next_to(
        Application::start_writing,
        &primary,
        "impact_wal",
        rows,
        &[
            ("BACKFILLD_THROTTLE__IMPACT_WAL_RISE", "1.15"),
            // Nothing scrapes /metrics here: exit when done.
            ("BACKFILLD_HTTP__FINAL_SCRAPE_WAIT", "0s"),
        ],
    );
    daemon.expect_success(RUN_LIMIT);
    assert!(application.stop() > 1);
    db.assert_backfilled_exactly_once("users", rows);

    // The sampler saw the application's session waiting on the WAL in some of the rests'
    // samples, and the judge learned that share.
    let judgements = impact_judgements(&daemon);
    let learned: Vec<f64> = judgements
        .iter()
        .filter_map(|line| line["wal_share_at_rest"].as_f64())
        .collect();
    assert!(
        !learned.is_empty(),
        "{judgements:#?}\n{}",
        daemon.log_text()
    );
    assert!(
        learned.iter().all(|share| (0.02..=0.99).contains(share)),
        "{learned:?}"
    );
}

/// When each of the daemon's rests after its rest at start began (restarted ones
/// included), on the wall clock: the first of its "impact budget" lines resting with each
/// count of rests begun, once it has paced.
fn periodic_rest_starts(daemon: &Daemon) -> Vec<std::time::SystemTime> {
    let mut counted = std::collections::HashSet::new();
    let mut paced = false;
    let mut starts = Vec::new();
    for line in impact_judgements(daemon) {
        let directive = line["directive"].as_str().unwrap_or_default();
        paced |= directive.starts_with("Some(Pace");
        if paced && directive == "Some(Rest)" && counted.insert(line["rests"].as_u64()) {
            let at = line["timestamp"].as_str().expect("a timestamp");
            starts.push(humantime::parse_rfc3339(at).expect("an RFC 3339 timestamp"));
        }
    }
    starts
}

#[test]
fn two_daemons_next_to_production_rest_at_the_same_wall_clock_moments() {
    // Two pods of one Job, started apart: each rests to learn production's baseline at
    // the wall clock's multiples of impact_relearn_every, so neither learns the other's
    // batches. Their own start rests are their own.
    const RELEARN_EVERY_S: u64 = 5;
    // A rest begins with the first canary (every 50 ms) or probe sample judged after its
    // moment; a slow test machine delays both.
    const LATE: Duration = Duration::from_millis(1_000);
    let primary = pg_testkit::PgCluster::start_primary().expect("primary");
    let db = TestDb::on(&primary, "pods_rest");
    db.migrate();
    let application = Application::start(&db);
    let period = Duration::from_secs(RELEARN_EVERY_S);
    // How long after a multiple of the period (since the Unix epoch) `at` is.
    let past_a_moment = |at: &std::time::SystemTime| {
        let since_epoch = at
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch");
        Duration::from_nanos((since_epoch.as_nanos() % period.as_nanos()) as u64)
    };
    // Each daemon starts halfway between two such moments: a daemon that rested on a
    // clock of its own (from its start) would rest about 2.5 s off them.
    let start = |id: &str| {
        let past = past_a_moment(&std::time::SystemTime::now());
        let to_halfway = (period * 3 / 2 - past).as_nanos() % period.as_nanos();
        thread::sleep(Duration::from_nanos(to_halfway as u64));
        let mut env = quick_worker_json_log(id);
        env.push(("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "1.3".to_string()));
        env.push((
            "BACKFILLD_THROTTLE__IMPACT_RELEARN_EVERY",
            format!("{RELEARN_EVERY_S}s"),
        ));
        env.push(("RUST_LOG", "backfilld::impact=debug,info".to_string()));
        Daemon::start(&db.url(), &[], &env_refs(&env))
    };
    let first = start("pod_a");
    // The second starts once the first has rested at start and paces.
    wait_until("the first daemon's first pace", RUN_LIMIT, || {
        impact_judgements(&first).iter().any(|line| {
            line["directive"]
                .as_str()
                .unwrap_or("")
                .starts_with("Some(Pace")
        })
    });
    let second = start("pod_b");
    wait_until(
        "three periodic rests of the second daemon",
        RUN_LIMIT,
        || periodic_rest_starts(&second).len() >= 3,
    );
    let second_rests = periodic_rest_starts(&second);
    let last = *second_rests.last().expect("three rests");
    // The first logs its rest at that moment a few milliseconds before or after.
    wait_until(
        "the first daemon's rest at the second's last",
        RUN_LIMIT,
        || {
            periodic_rest_starts(&first)
                .last()
                .is_some_and(|at| *at + LATE > last)
        },
    );
    let first_rests = periodic_rest_starts(&first);
    for mut daemon in [first, second] {
        daemon.signal(libc::SIGTERM);
        daemon.expect_success(RUN_LIMIT);
    }
    assert!(application.stop() > 1);

    assert!(first_rests.len() >= 3, "{first_rests:?}");
    for (rests, daemon) in [(&first_rests, "first"), (&second_rests, "second")] {
        for at in rests {
            assert!(
                past_a_moment(at) < LATE,
                "the {daemon} daemon rested {:?} after a multiple of {RELEARN_EVERY_S} s: {rests:?}",
                past_a_moment(at)
            );
        }
    }
    // Every periodic rest of the second is one of the first's, at the same moment.
    for at in &second_rests {
        assert!(
            first_rests.iter().any(|other| {
                let apart = at.duration_since(*other).unwrap_or_else(|e| e.duration());
                apart < LATE
            }),
            "the second daemon rested at {at:?} alone: {first_rests:?} against {second_rests:?}"
        );
    }
}

#[test]
fn production_s_own_latency_from_prometheus_grows_and_bounds_the_pace_the_canary_steers() {
    // The application's p99 as its monitoring has it, 3 ms; a Prometheus scraping it.
    let latency = Arc::new(std::sync::Mutex::new(0.003));
    let prometheus =
        Prometheus::scraping_every_second(serve_app_latency(latency.clone()), RUN_LIMIT);
    wait_until("Prometheus to have the SLI", RUN_LIMIT, || {
        prometheus.app_latency() == Some(0.003)
    });
    let primary = pg_testkit::PgCluster::start_primary().expect("primary");
    // Paced near 1,000 rows/s, longer than the test watches: it is stopped at the end.
    let rows = 200_000;
    let url = format!("http://127.0.0.1:{}", prometheus.port());
    let (_db, application, mut daemon, _port) = next_to_production(
        &primary,
        "impact_sli",
        rows,
        &[
            ("BACKFILLD_THROTTLE__PROMETHEUS_URL", &url),
            (
                "BACKFILLD_THROTTLE__IMPACT_SLI_QUERY",
                "max(app_latency_seconds)",
            ),
            ("BACKFILLD_THROTTLE__IMPACT_SLI_WINDOW", "3s"),
            ("BACKFILLD_HTTP__FINAL_SCRAPE_WAIT", "0s"),
        ],
    );
    let judged = |daemon: &Daemon, what: &dyn Fn(&serde_json::Value) -> bool| {
        impact_judgements(daemon)
            .into_iter()
            .find(|line| what(line))
    };
    // It learned the SLI's baseline in its first rest, and then showed a pace within it.
    wait_until("a pace the SLI shows within budget", RUN_LIMIT, || {
        judged(&daemon, &|line| line["sli_proven"].as_f64().is_some()).is_some()
    });
    let proven = judged(&daemon, &|line| line["sli_proven"].as_f64().is_some()).expect("proven");
    assert_eq!(proven["sli_baseline"].as_f64(), Some(0.003), "{proven}");
    let pace_of = |line: &serde_json::Value| {
        line["directive"]
            .as_str()
            .and_then(|d| d.strip_prefix("Some(Pace("))
            .and_then(|d| d.trim_end_matches("))").parse::<f64>().ok())
            .unwrap_or_else(|| panic!("a pace in {line}"))
    };

    // A pace shown with room to spare grows by half again, the SLI to judge the step: the
    // canaries alone do not hold it down.
    wait_until("the SLI to grow the pace it proved", RUN_LIMIT, || {
        judged(&daemon, &|line| line["change"] == "Some(SliCalm)").is_some()
    });
    let grown = judged(&daemon, &|line| line["change"] == "Some(SliCalm)").expect("grown");
    let from = grown["sli_proven"].as_f64().expect("the pace proven");
    assert!(pace_of(&grown) > from, "{grown}");

    // Production's latency rises to 40 ms, over 1.3× and the test's wide 25 ms floor: the
    // SLI cuts the pace, where the canary (under that floor) never would.
    *latency.lock().expect("latency") = 0.040;
    wait_until("the SLI to cut the pace", RUN_LIMIT, || {
        judged(&daemon, &|line| line["change"] == "Some(SliHarm)").is_some()
    });
    let cut = judged(&daemon, &|line| line["change"] == "Some(SliHarm)").expect("cut");
    let harmed = cut["sli_harmed"].as_f64().expect("the pace harmed");
    assert!(pace_of(&cut) < harmed, "{cut}");
    assert!(
        cut["sli_ratio"].as_f64().is_some_and(|ratio| ratio > 10.0),
        "{cut}"
    );
    daemon.signal(libc::SIGTERM);
    assert!(daemon
        .wait(RUN_LIMIT)
        .is_some_and(|status| status.success()));
    assert!(application.stop() > 1);
}
