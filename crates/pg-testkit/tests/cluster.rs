//! Primary lifecycle against a real PostgreSQL: start, query, databases, stop/start,
//! crash-restart, drop.

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use pg_testkit::{shared_primary, PgCluster, StopMode, TestkitError};

#[test]
fn shared_primary_answers_select_1() {
    let pg = shared_primary();
    assert_eq!(pg.psql("postgres", "select 1").unwrap(), "1");
    assert_eq!(
        pg.url("postgres"),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
    );
    // The configuration the rest of the suite relies on.
    let settings = pg
        .psql(
            "postgres",
            "select string_agg(name || '=' || setting, ',' order by name) from pg_settings \
              where name in ('wal_level', 'max_wal_senders', 'fsync', 'listen_addresses', \
                             'max_connections', 'server_encoding')",
        )
        .unwrap();
    assert_eq!(
        settings,
        "fsync=off,listen_addresses=127.0.0.1,max_connections=200,max_wal_senders=10,\
         server_encoding=UTF8,wal_level=replica"
    );
}

#[test]
fn create_database_gives_distinct_usable_databases() {
    let pg = shared_primary();
    let a = pg.create_database("distinct check").unwrap();
    let b = pg.create_database("distinct check").unwrap();
    assert_ne!(a, b);
    pg.psql(
        &a,
        "create table only_in_a (id int); insert into only_in_a values (7)",
    )
    .unwrap();
    assert_eq!(pg.psql(&a, "select id from only_in_a").unwrap(), "7");
    let err = pg.psql(&b, "select id from only_in_a").unwrap_err();
    assert!(
        matches!(&err, TestkitError::Psql { stderr, .. } if stderr.contains("does not exist")),
        "{err}"
    );
}

#[test]
fn psql_returns_rows_and_reports_errors_with_stderr() {
    let pg = shared_primary();
    let db = pg.create_database("psql_output").unwrap();
    let out = pg
        .psql(
            &db,
            "create table t (id int, name text);\n\
             insert into t values (1, 'ä'), (2, null);\n\
             select id, name from t order by id;",
        )
        .unwrap();
    // Command tags are suppressed; rows are `|`-separated, without a final newline.
    assert_eq!(out, "1|ä\n2|");

    let err = pg
        .psql(&db, "select 1; select * from missing_table; select 2")
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("missing_table"), "{message}");
    assert!(
        message.contains(&format!("port {}", pg.port())),
        "{message}"
    );
}

#[test]
fn cluster_outlives_the_thread_that_started_it() {
    // cargo test runs each test on its own short-lived thread; a server tied to the
    // starting thread's lifetime would be killed as soon as that thread ends.
    let pg = thread::spawn(|| PgCluster::start_primary().unwrap())
        .join()
        .unwrap();
    let pid = pg.pid().unwrap();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(pg.psql("postgres", "select 1").unwrap(), "1");
    assert_eq!(pg.pid(), Some(pid));
}

#[test]
fn stop_start_and_restart_immediate_keep_port_settings_and_data() {
    let pg =
        PgCluster::start_primary_with(&[("work_mem", "7MB"), ("cluster_name", "it's \\ quoted")])
            .unwrap();
    let port = pg.port();
    let db = pg.create_database("restart").unwrap();
    pg.psql(&db, "create table t (id int); insert into t values (1)")
        .unwrap();
    assert_eq!(pg.psql(&db, "show work_mem").unwrap(), "7MB");
    // Values are quoted and escaped for postgresql.conf.
    assert_eq!(pg.psql(&db, "show cluster_name").unwrap(), "it's \\ quoted");

    pg.stop(StopMode::Fast).unwrap();
    assert!(!pg.is_running());
    assert!(pg.psql(&db, "select 1").is_err());
    pg.stop(StopMode::Fast).unwrap(); // already stopped: a no-op
    pg.start().unwrap();

    let before = pg.pid().unwrap();
    pg.psql(&db, "insert into t values (2)").unwrap();
    pg.restart_immediate().unwrap();
    let after = pg.pid().unwrap();
    assert_ne!(before, after);
    assert_eq!(pg.port(), port);
    assert_eq!(
        pg.psql(&db, "select string_agg(id::text, ',' order by id) from t")
            .unwrap(),
        "1,2"
    );
    assert_eq!(pg.psql(&db, "show work_mem").unwrap(), "7MB");
    // Crash recovery ran: the log says so.
    let log = pg.log_tail();
    assert!(log.contains("immediate shutdown"), "{log}");
}

#[test]
fn drop_stops_the_server_and_removes_its_dir() {
    let pg = PgCluster::start_primary().unwrap();
    let pid = pg.pid().unwrap() as libc::pid_t;
    let port = pg.port();
    let root = pg.data_dir().parent().unwrap().to_path_buf();
    assert!(root.join("data/PG_VERSION").exists());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());

    drop(pg);

    assert!(!root.exists(), "{} still exists", root.display());
    // SAFETY: signal 0 only checks for existence. The pid was reaped by drop, so ESRCH.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "postmaster {pid} still exists");
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "port {port} still accepts connections"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn invalid_settings_are_rejected_up_front() {
    let err = PgCluster::start_primary_with(&[("work_mem = 1\nfsync", "on")]).unwrap_err();
    assert!(matches!(err, TestkitError::InvalidArgument { .. }), "{err}");
    let err = shared_primary().start_standby("bad name'").unwrap_err();
    assert!(matches!(err, TestkitError::InvalidArgument { .. }), "{err}");
}
