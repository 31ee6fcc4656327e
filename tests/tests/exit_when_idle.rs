//! `run --exit-when-idle` (the Kubernetes Job mode) means "the queue is done": a paused job
//! and a job scheduled for later keep the worker waiting, so the Job cannot complete with
//! work nobody will ever pick up.

use std::time::Duration;

use backfilld_e2e::{env_refs, quick_worker, Daemon, TestDb};
use pg_testkit::demo_data::{users_table_sql, SPLIT_NAME_JOB_SQL};

#[test]
fn paused_and_scheduled_jobs_keep_an_exit_when_idle_worker() {
    let db = TestDb::new("idle_paused");
    db.sql(&users_table_sql(300));
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    db.sql("SELECT backfill.pause('split_full_name')");
    // A second job, due a few seconds from now.
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, not_before) \
         VALUES ('later', 'public.users', 'id', \
                 $$UPDATE public.users SET full_name = full_name WHERE id = ANY(:keys)$$, \
                 now() + interval '3 seconds')",
    );
    let env = quick_worker("idle-paused");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    // Before this change the worker exited 0 here at once: nothing was pending and due.
    // Polling every 200 ms, it stays while the paused job is there...
    assert!(
        daemon.wait(Duration::from_secs(6)).is_none(),
        "the worker left with a paused job in the queue:\n{}",
        daemon.log_text()
    );
    // ...ran the scheduled job when it came due...
    assert_eq!(db.job_state("later"), "succeeded");
    assert_eq!(db.job_state("split_full_name"), "paused");
    // ...and, once the paused job is resumed, works it and only then leaves.
    db.sql("SELECT backfill.resume('split_full_name')");
    daemon.expect_success(Duration::from_secs(60));
    assert_eq!(db.job_state("split_full_name"), "succeeded");
    assert!(
        daemon.log_text().contains("no unfinished job left"),
        "{}",
        daemon.log_text()
    );
}
