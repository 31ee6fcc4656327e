//! Shared helpers of the end-to-end suite: a database per test on the shared
//! primary, the real `backfilld` binary as a child process, and bounded polling.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pg_testkit::{shared_primary, PgCluster};

mod prometheus;
pub use prometheus::{serve_app_latency, Prometheus};

/// The `backfilld` binary built next to this test binary (`target/<profile>/backfilld`).
pub fn backfilld_bin() -> PathBuf {
    if let Ok(path) = std::env::var("BACKFILLD_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/backfilld
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("backfilld");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build [--release] -p backfilld`, the profile the tests run in; scripts/test does)",
        bin.display()
    );
    bin
}

/// The grants README.md's "Least privilege" section gives an engineer role `role` that
/// enqueues and steers jobs on `tables` (the daemon's role must also be a member of it).
pub fn readme_engineer_grants(role: &str, tables: &str) -> String {
    format!(
        "GRANT USAGE ON SCHEMA backfill TO {role};
         GRANT SELECT ON backfill.jobs, backfill.failed_rows, backfill.job_status, backfill.throttles TO {role};
         GRANT INSERT (name, table_name, key_column, batch_sql, pending_predicate, check_predicate,
                       batch_size, min_batch_size, max_batch_size, target_batch_ms, max_rows_per_second,
                       max_attempts, priority, not_before, parallelism, run_windows, finish_by,
                       breaker_failed_share, breaker_failed_rows, keep_undo, undo_columns,
                       throttle_query, throttle_query_max) ON backfill.jobs TO {role};
         GRANT UPDATE (name, table_name, key_column, batch_sql, pending_predicate, check_predicate,
                       batch_size, min_batch_size, max_batch_size, target_batch_ms, max_rows_per_second,
                       max_attempts, priority, not_before, parallelism, run_windows, finish_by,
                       breaker_failed_share, breaker_failed_rows, keep_undo, undo_columns,
                       throttle_query, throttle_query_max) ON backfill.jobs TO {role};
         GRANT SELECT ON backfill.undo TO {role};
         GRANT EXECUTE ON FUNCTION backfill.revert(text, text, text, boolean), backfill.purge_undo(text) TO {role};
         GRANT EXECUTE ON FUNCTION backfill.pause(text), backfill.resume(text), backfill.cancel(text),
                                   backfill.retry_failed(text), backfill.require_succeeded(text),
                                   backfill.throttle(float8, interval, text), backfill.unthrottle(text) TO {role};
         GRANT SELECT, UPDATE ON {tables} TO {role};"
    )
}

/// A fresh database on the shared primary, for one test.
pub struct TestDb<'c> {
    pub cluster: &'c PgCluster,
    pub name: String,
}

impl TestDb<'static> {
    /// Creates a database named after `prefix` on the shared primary.
    pub fn new(prefix: &str) -> TestDb<'static> {
        let cluster = shared_primary();
        let name = cluster.create_database(prefix).expect("create database");
        TestDb { cluster, name }
    }
}

impl<'c> TestDb<'c> {
    /// Creates a database named after `prefix` on `cluster` (for tests that restart it).
    pub fn on(cluster: &'c PgCluster, prefix: &str) -> TestDb<'c> {
        let name = cluster.create_database(prefix).expect("create database");
        TestDb { cluster, name }
    }

    /// Its connection URL.
    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    /// Runs SQL (psql -At), panicking with the server's message on failure.
    pub fn sql(&self, sql: &str) -> String {
        self.cluster
            .psql(&self.name, sql)
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
    }

    /// Runs SQL that must fail; returns the error text.
    pub fn sql_err(&self, sql: &str) -> String {
        match self.cluster.psql(&self.name, sql) {
            Ok(out) => panic!("SQL unexpectedly succeeded ({out}):\n{sql}"),
            Err(e) => e.to_string(),
        }
    }

    /// A single integer result.
    pub fn int(&self, sql: &str) -> i64 {
        let out = self.sql(sql);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("not an integer: {out:?} from {sql}"))
    }

    /// Installs the schema with `backfilld migrate`.
    pub fn migrate(&self) {
        let out = self.backfilld(&["migrate"]);
        assert!(out.status.success(), "migrate failed: {}", out.stderr);
    }

    /// Runs a `backfilld` verb to completion against this database.
    pub fn backfilld(&self, args: &[&str]) -> CommandOutput {
        backfilld_at(&self.url(), args, &[])
    }

    /// The state of a job.
    pub fn job_state(&self, name: &str) -> String {
        self.sql(&format!(
            "SELECT state FROM backfill.jobs WHERE name = '{name}'"
        ))
    }

    /// A connection of the test's own that stays open between statements.
    pub fn session(&self) -> Session {
        Session::connect(&self.url())
    }

    /// Adds an audit trigger to `table` that records every update of a row
    /// (key, session application_name, time, top-level transaction id) in `<table>_audit`.
    pub fn audit_updates(&self, table: &str, key: &str) {
        self.sql(&format!(
            "CREATE TABLE {table}_audit (key text NOT NULL, app text, at timestamptz NOT NULL DEFAULT clock_timestamp(),
                                         xid bigint NOT NULL DEFAULT txid_current());
             CREATE FUNCTION {table}_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO {table}_audit (key, app) VALUES (NEW.{key}::text, current_setting('application_name'));
                 RETURN NEW;
             END $$;
             CREATE TRIGGER {table}_audit AFTER UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_audit_fn();"
        ));
    }

    /// Asserts that each of `expected_rows` keys of `table` was updated exactly once.
    pub fn assert_updated_exactly_once(&self, table: &str, expected_rows: i64) {
        self.assert_audited_exactly_once(table, "true", expected_rows);
    }

    /// Like [`TestDb::assert_updated_exactly_once`], counting only updates by
    /// backfilld's data-plane sessions (not the test's own fixes of the data).
    pub fn assert_backfilled_exactly_once(&self, table: &str, expected_rows: i64) {
        self.assert_audited_exactly_once(table, "app LIKE 'backfilld/%'", expected_rows);
    }

    fn assert_audited_exactly_once(&self, table: &str, filter: &str, expected_rows: i64) {
        let twice = self.int(&format!(
            "SELECT count(*) FROM (SELECT key FROM {table}_audit WHERE {filter} GROUP BY key HAVING count(*) > 1) d"
        ));
        assert_eq!(twice, 0, "some rows of {table} were updated more than once");
        let once = self.int(&format!(
            "SELECT count(DISTINCT key) FROM {table}_audit WHERE {filter}"
        ));
        assert_eq!(once, expected_rows, "rows of {table} updated once");
    }
}

/// A connection kept open between statements, e.g. to hold a lock while the
/// daemon runs; closed (rolling back what it has open) on drop.
pub struct Session {
    client: tokio_postgres::Client,
    runtime: tokio::runtime::Runtime,
}

impl Session {
    /// Connects to `url`.
    pub fn connect(url: &str) -> Session {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (client, connection) = runtime
            .block_on(tokio_postgres::connect(url, tokio_postgres::NoTls))
            .expect("connect a session");
        runtime.spawn(connection);
        Session { client, runtime }
    }

    /// Runs `sql` (one or more statements), panicking with the server's message on failure.
    pub fn execute(&self, sql: &str) {
        self.runtime
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"));
    }

    /// Runs SQL that may fail; the error (with the server's message) when it does.
    pub fn try_execute(&self, sql: &str) -> Result<(), String> {
        self.runtime
            .block_on(self.client.batch_execute(sql))
            .map_err(|e| match e.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => e.to_string(),
            })
    }

    /// Like [`Session::execute`], returning how long the statements took as the client
    /// saw it (e.g. how long an UPDATE waited on a lock).
    pub fn timed(&self, sql: &str) -> Duration {
        let started = Instant::now();
        self.execute(sql);
        started.elapsed()
    }

    /// The rows of one query, panicking with the server's message on failure.
    pub fn query(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        self.runtime
            .block_on(self.client.query(sql, &[]))
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
    }
}

/// Output of a finished `backfilld` command.
#[derive(Debug)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `backfilld <args>` to completion against `database_url` with extra `env`.
pub fn backfilld_at(database_url: &str, args: &[&str], env: &[(&str, &str)]) -> CommandOutput {
    let output = base_command(database_url, env)
        .args(args)
        .output()
        .expect("run backfilld");
    CommandOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

impl CommandOutput {
    /// Asserts the command exited 2 (bad usage or configuration) with exactly one line
    /// on stderr, and returns that line.
    pub fn usage_error(&self) -> &str {
        assert_eq!(self.status.code(), Some(2), "exit code of {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {self:?}");
        lines[0]
    }
}

fn base_command(database_url: &str, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(backfilld_bin());
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("BACKFILLD_HTTP__LISTEN", "")
        .env("BACKFILLD_LOG__LEVEL", "info")
        // The suite's own sessions (and its parallel tests' on the shared primary) would
        // read as production at work and slow every job down unpredictably; the test of
        // sharing the primary (tests/throttle.rs) turns it back on, on a cluster of its own.
        .env("BACKFILLD_THROTTLE__BUSY_DUTY_CYCLE", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// A running `backfilld run` process; killed on drop.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `backfilld run <args>` against `database_url` with extra `env`.
    pub fn start(database_url: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("daemon.log");
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = base_command(database_url, env);
        command
            .arg("run")
            .args(args)
            .stdout(Stdio::from(file.try_clone().expect("dup")))
            .stderr(Stdio::from(file));
        // Dies with the test binary even on SIGKILL, where drop does not run.
        let child =
            pg_testkit::spawn_tied_to_process(command, libc::SIGKILL).expect("spawn backfilld");
        Daemon {
            child,
            log,
            _dir: dir,
        }
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log lines of `target` or of a module inside it (with `BACKFILLD_LOG__FORMAT=json`),
    /// parsed: `backfilld::worker` takes in `backfilld::worker::reporting`, as `RUST_LOG` would.
    pub fn json_lines(&self, target: &str) -> Vec<serde_json::Value> {
        let inside = format!("{target}::");
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| {
                line["target"]
                    .as_str()
                    .is_some_and(|t| t == target || t.starts_with(&inside))
            })
            .collect()
    }

    /// Waits for a clean exit (code 0), panicking with the log otherwise.
    pub fn expect_success(&mut self, timeout: Duration) {
        match self.wait(timeout) {
            Some(status) if status.success() => {}
            Some(status) => panic!("backfilld exited with {status}:\n{}", self.log_text()),
            None => {
                self.kill();
                panic!(
                    "backfilld did not exit within {timeout:?}:\n{}",
                    self.log_text()
                )
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Quick workers (`--exit-when-idle`) that a test SIGKILLs and restarts at pseudo-random
/// moments: the same seed gives the same storm.
pub struct SigkillStorm {
    envs: Vec<Vec<(&'static str, String)>>,
    database_url: String,
    workers: Vec<Daemon>,
    random: u64,
}

impl SigkillStorm {
    /// Starts `count` workers named `<name>-1`… on `db`.
    pub fn start(db: &TestDb, name: &str, count: usize, seed: u64) -> SigkillStorm {
        let envs: Vec<_> = (1..=count)
            .map(|i| quick_worker(&format!("{name}-{i}")))
            .collect();
        let mut storm = SigkillStorm {
            envs,
            database_url: db.url(),
            workers: Vec::new(),
            random: seed,
        };
        storm.workers = (0..count).map(|i| storm.spawn(i)).collect();
        storm
    }

    fn spawn(&self, i: usize) -> Daemon {
        Daemon::start(
            &self.database_url,
            &["--exit-when-idle"],
            &env_refs(&self.envs[i]),
        )
    }

    /// A small deterministic pseudo-random number below `below` (an LCG).
    fn next(&mut self, below: u64) -> u64 {
        self.random = self
            .random
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.random >> 33) % below
    }

    /// Waits `base_ms` plus up to as much again, then SIGKILLs one worker and restarts it.
    pub fn kill_one(&mut self, base_ms: u64) {
        std::thread::sleep(Duration::from_millis(base_ms + self.next(base_ms)));
        let victim = self.next(self.workers.len() as u64) as usize;
        self.workers[victim].kill();
        self.workers[victim] = self.spawn(victim);
    }

    /// Waits for every worker to exit cleanly and returns their logs.
    pub fn finish(mut self, timeout: Duration) -> String {
        for worker in &mut self.workers {
            worker.expect_success(timeout);
        }
        self.workers.iter().map(Daemon::log_text).collect()
    }
}

/// Polls `condition` every 20 ms until it holds, panicking with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if condition() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Env for a fast-reacting test worker named `id`: short lease, quick heartbeat and poll.
pub fn quick_worker(id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("BACKFILLD_WORKER__ID", id.to_string()),
        ("BACKFILLD_WORKER__LEASE", "3s".to_string()),
        ("BACKFILLD_WORKER__HEARTBEAT", "300ms".to_string()),
        ("BACKFILLD_WORKER__POLL_INTERVAL", "200ms".to_string()),
        ("BACKFILLD_BATCH__RETRY_BACKOFF", "100ms".to_string()),
        // Each test isolates the signal it is about. The impact budget (on by default) would
        // take the tests' own sessions for production and pace every job; tests/tests/budget.rs
        // turns it back on where it is the subject.
        ("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0".to_string()),
    ]
}

/// [`quick_worker`] logging JSON lines, with one debug record per committed batch
/// (target `backfilld::batch`), for tests that read the worker's decisions from its log.
pub fn quick_worker_json_log(id: &str) -> Vec<(&'static str, String)> {
    let mut env = quick_worker(id);
    env.push(("BACKFILLD_LOG__FORMAT", "json".to_string()));
    env.push(("RUST_LOG", "backfilld::batch=debug,info".to_string()));
    env
}

/// Borrows a `Vec<(&str, String)>` as the `&[(&str, &str)]` that [`Daemon::start`] takes.
pub fn env_refs<'a>(env: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A free loopback port for a daemon's HTTP server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `GET path` on 127.0.0.1:`port`; the status code and body, or `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A session that LISTENs on `backfill_events`; the receiver gets each payload.
pub fn listen_for_events(
    url: &str,
) -> (
    std::sync::mpsc::Receiver<serde_json::Value>,
    tokio::runtime::Runtime,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (tx, events) = std::sync::mpsc::channel();
    let (client, mut connection) = runtime
        .block_on(tokio_postgres::connect(url, tokio_postgres::NoTls))
        .expect("connect the listener");
    runtime.spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = message {
                let payload = serde_json::from_str(n.payload()).expect("a JSON payload");
                if tx.send(payload).is_err() {
                    return;
                }
            }
        }
    });
    runtime
        .block_on(client.batch_execute("LISTEN backfill_events"))
        .expect("LISTEN");
    // The session ends with the client: it must outlive the test.
    std::mem::forget(client);
    (events, runtime)
}

/// An application at work on a database: a small transaction committed every few
/// milliseconds on a session of its own, from before [`Application::start`] returns (so
/// that a daemon started after it sees it at its first probe) until it is stopped.
pub struct Application {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<u64>,
}

impl Application {
    const TRANSACTION: &str = "BEGIN; SELECT count(*) FROM pg_class; COMMIT";

    /// An application that reads, a transaction every 5 ms.
    pub fn start(db: &TestDb) -> Application {
        Self::start_running(db, Self::TRANSACTION, Duration::from_millis(5))
    }

    /// An application that writes, one transaction after the other, each commit waiting
    /// for its WAL to be flushed (on a cluster with `fsync = on`): it touches a row of
    /// `shop_orders`, made here. Always at work, so that a sampler of its sessions every
    /// 20 ms finds it active in most samples.
    pub fn start_writing(db: &TestDb) -> Application {
        db.sql(
            "CREATE TABLE shop_orders (id int PRIMARY KEY, touched int NOT NULL); \
             INSERT INTO shop_orders VALUES (1, 0)",
        );
        Self::start_running(
            db,
            "BEGIN; UPDATE shop_orders SET touched = touched + 1 WHERE id = 1; COMMIT",
            Duration::ZERO,
        )
    }

    fn start_running(db: &TestDb, transaction: &'static str, pause: Duration) -> Application {
        let app = Session::connect(&format!("{}?application_name=shop", db.url()));
        app.execute(transaction);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            let mut transactions = 1u64;
            while !stopped.load(Ordering::Relaxed) {
                app.execute(transaction);
                transactions += 1;
                thread::sleep(pause);
            }
            transactions
        });
        Application { stop, thread }
    }

    /// Stops it and returns how many transactions it committed.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("application thread")
    }
}
