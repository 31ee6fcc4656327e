//! Start-up against a database that is not there (yet): what a retry can fix is retried
//! with back-off for `database.startup_timeout` and then exits 1 (a Kubernetes Job replaces
//! the pod); what it cannot fix (unknown database, refused login, missing schema) exits 2
//! at once with a line that says what to do.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use backfilld_e2e::{
    backfilld_at, backfilld_bin, env_refs, free_port, quick_worker, Daemon, TestDb,
};
use pg_testkit::demo_data::{users_table_sql, SPLIT_NAME_JOB_SQL};

/// Lines of a log that announce a start-up retry.
fn retries(log: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("cannot connect to the database; retrying"))
        .count()
}

#[test]
fn an_unreachable_database_is_retried_with_backoff_then_exits_1() {
    let port = free_port();
    let closed = format!("postgres://app:s3cret@127.0.0.1:{port}/x");
    let budget = Duration::from_secs(2);
    for verb in [&["run", "--exit-when-idle"][..], &["migrate"], &["status"]] {
        let started = Instant::now();
        let out = backfilld_at(
            &closed,
            verb,
            &[("BACKFILLD_DATABASE__STARTUP_TIMEOUT", "2s")],
        );
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(1), "{verb:?}: {out:?}");
        // 0.5 s, 1 s, then the last try at the deadline: three retries, not one failure.
        assert_eq!(retries(&out.stderr), 3, "{verb:?}: {}", out.stderr);
        assert!(
            took >= budget && took < budget + Duration::from_secs(3),
            "{verb:?} took {took:?}"
        );
        let last = out.stderr.lines().last().unwrap_or_default();
        assert_eq!(
            last,
            format!("backfilld: cannot connect to the database at postgres://app:***@127.0.0.1:{port}/x: error communicating with database: Connection refused (os error 111) (gave up after 4 attempts in 2s, database.startup_timeout 2s)"),
            "{verb:?}"
        );
        assert!(!out.stderr.contains("s3cret"), "{}", out.stderr);
    }
}

#[test]
fn a_database_that_comes_back_during_start_up_is_waited_for() {
    let db = TestDb::new("startup_back");
    db.sql(&users_table_sql(500));
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    // The worker starts while nothing listens on `port` (a database being failed over)...
    let port = free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
    let env = quick_worker("startup-back");
    let mut daemon = Daemon::start(&url, &["--exit-when-idle"], &env_refs(&env));
    backfilld_e2e::wait_until("a start-up retry", Duration::from_secs(20), || {
        retries(&daemon.log_text()) >= 1
    });
    // ...and the database comes back there: the same worker connects and does the job.
    let _forwarder = forward(port, db.cluster.port());
    daemon.expect_success(Duration::from_secs(60));
    assert_eq!(db.job_state("split_full_name"), "succeeded");
    assert_eq!(
        db.int("SELECT count(*) FROM users WHERE first_name IS NULL"),
        0
    );
}

#[test]
fn what_a_retry_cannot_fix_exits_2_at_once() {
    let db = TestDb::new("startup_final");
    // Generous retries: none may be spent on these.
    let env = [("BACKFILLD_DATABASE__STARTUP_TIMEOUT", "1m")];
    let unknown = format!(
        "postgres://postgres@127.0.0.1:{}/no_such_database",
        db.cluster.port()
    );
    for verb in ["run", "status"] {
        let started = Instant::now();
        let out = backfilld_at(&unknown, &[verb], &env);
        assert_eq!(
            out.usage_error(),
            format!("backfilld: cannot connect to the database at {unknown}: error returned from database: database \"no_such_database\" does not exist"),
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{verb}");
    }
    // Reachable, but nobody ran `migrate`: say so rather than "relation does not exist".
    for verb in [&["status"][..], &["pause", "x"], &["plan", "x"]] {
        let out = backfilld_at(&db.url(), verb, &env);
        assert_eq!(
            out.usage_error(),
            "backfilld: schema backfill is not installed in this database: run `backfilld migrate` first (or start a worker, which migrates)",
            "{verb:?}"
        );
    }
}

#[test]
fn a_missing_database_url_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("backfilld.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!("[database]\nurl = \"postgres://postgres@127.0.0.1:{port}/postgres\"\nstartup_timeout = \"0s\"\n"),
    )
    .expect("write config");
    let out = Command::new(backfilld_bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(["--config", config.to_str().expect("utf-8 path"), "status"])
        .output()
        .expect("run backfilld");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        format!("backfilld: cannot connect to the database at postgres://postgres@127.0.0.1:{port}/postgres: error communicating with database: Connection refused (os error 111) (gave up after 1 attempts in 0s, database.startup_timeout 0s); DATABASE_URL is not set, so database.url from the configuration was used")
    );
}

/// Forwards every connection to 127.0.0.1:`listen` to 127.0.0.1:`target` until dropped
/// (the process ends with the test; the threads hold nothing the test checks).
fn forward(listen: u16, target: u16) -> TcpListener {
    let listener = TcpListener::bind(("127.0.0.1", listen)).expect("bind the database's port");
    let acceptor = listener.try_clone().expect("clone listener");
    std::thread::spawn(move || {
        for client in acceptor.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            for (mut from, mut to) in [
                (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                ),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 16 * 1024];
                    while let Ok(n @ 1..) = from.read(&mut buffer) {
                        if to.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    listener
}

#[test]
fn a_zero_watch_interval_is_refused_not_a_panic() {
    let db = TestDb::new("startup_watch0");
    for interval in ["0s", "0ms"] {
        let out = backfilld_at(
            &db.url(),
            &["status", "--watch", "--interval", interval],
            &[],
        );
        assert_eq!(
            out.usage_error(),
            format!("backfilld: invalid value '{interval}' for '--interval <DURATION>': must be more than 0s, e.g. 500ms or 2s (see backfilld --help)")
        );
    }
}
