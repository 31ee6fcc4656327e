//! Streaming standbys against a real PostgreSQL: visibility of writes, pg_stat_replication,
//! and replay lag created with pg_wal_replay_pause.

use std::thread;
use std::time::{Duration, Instant};

use pg_testkit::{shared_primary, PgCluster};

/// Polls `probe` until it returns true, failing the test after `limit`.
fn wait_for(what: &str, limit: Duration, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !probe() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn replication_row(primary: &PgCluster, name: &str, columns: &str) -> String {
    primary
        .psql(
            "postgres",
            &format!("select {columns} from pg_stat_replication where application_name = '{name}'"),
        )
        .unwrap()
}

#[test]
fn standby_streams_and_shows_in_pg_stat_replication() {
    let primary = shared_primary();
    let standby = primary.start_standby("stream_check").unwrap();
    assert_eq!(standby.standby_name(), Some("stream_check"));
    assert_ne!(standby.port(), primary.port());
    assert_ne!(standby.data_dir(), primary.data_dir());

    assert_eq!(
        replication_row(primary, "stream_check", "state || ',' || host(client_addr)"),
        "streaming,127.0.0.1"
    );
    assert_eq!(
        standby
            .psql("postgres", "select pg_is_in_recovery()")
            .unwrap(),
        "t"
    );
    // Its socket lives in its own directory, not the primary's.
    let socket_dir = standby
        .psql("postgres", "show unix_socket_directories")
        .unwrap();
    assert_eq!(
        socket_dir,
        standby.data_dir().parent().unwrap().to_string_lossy()
    );

    let db = primary.create_database("streamed").unwrap();
    primary
        .psql(
            &db,
            "create table t (v text); insert into t values ('from primary')",
        )
        .unwrap();
    wait_for(
        "the row to reach the standby",
        Duration::from_secs(15),
        || {
            standby
                .psql(&db, "select v from t")
                .is_ok_and(|v| v == "from primary")
        },
    );
    let err = standby.psql(&db, "insert into t values ('x')").unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
}

#[test]
fn replay_pause_creates_lag_and_resume_clears_it() {
    let primary = shared_primary();
    let standby = primary.start_standby("lag_check").unwrap();
    let db = primary.create_database("lag").unwrap();
    primary.psql(&db, "create table t (id int)").unwrap();
    wait_for(
        "the table to reach the standby",
        Duration::from_secs(15),
        || standby.psql(&db, "select count(*) from t").is_ok(),
    );

    standby
        .psql("postgres", "select pg_wal_replay_pause()")
        .unwrap();
    wait_for("replay to pause", Duration::from_secs(15), || {
        standby
            .psql("postgres", "select pg_get_wal_replay_pause_state()")
            .unwrap()
            == "paused"
    });

    let written_to = primary
        .psql(
            &db,
            "insert into t select generate_series(1, 10000); select pg_current_wal_lsn()",
        )
        .unwrap();
    // The standby receives and flushes the WAL but does not apply it.
    wait_for(
        "the standby to flush the new WAL",
        Duration::from_secs(15),
        || {
            replication_row(
                primary,
                "lag_check",
                &format!("flush_lsn >= '{written_to}'"),
            ) == "t"
        },
    );
    let lag: i64 = replication_row(
        primary,
        "lag_check",
        "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint",
    )
    .parse()
    .unwrap();
    assert!(lag > 0, "replay lag {lag} bytes while paused");
    assert_eq!(standby.psql(&db, "select count(*) from t").unwrap(), "0");

    standby
        .psql("postgres", "select pg_wal_replay_resume()")
        .unwrap();
    wait_for("replay lag to clear", Duration::from_secs(20), || {
        replication_row(
            primary,
            "lag_check",
            "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint",
        ) == "0"
    });
    assert_eq!(
        standby.psql(&db, "select count(*) from t").unwrap(),
        "10000"
    );
}
