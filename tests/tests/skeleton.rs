//! The walking skeleton end to end: enqueue by SQL, claim, backfill exactly once,
//! leases and fencing, steering, refused definitions, key types.

use std::time::Duration;

use backfilld_e2e::{env_refs, quick_worker, wait_until, Daemon, TestDb};
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
