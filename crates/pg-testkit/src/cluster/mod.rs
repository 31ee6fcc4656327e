//! Throwaway PostgreSQL clusters: a primary, and streaming standbys of it.
//!
//! [`PgCluster`] is the handle; this file holds it and how to reach its server. The rooms:
//! starting a primary (`primary.rs`) or a standby of it (`standby.rs`), what both share when
//! they set a cluster up (`setup.rs`: its directory, the tools, `postgresql.conf`), the
//! server process and stopping and starting it (`server.rs`), how long clusters live
//! (`lifetime.rs`: drop, process exit, the shared primary) and the names and quoting that
//! end up in SQL and connection strings (`names.rs`).

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tempfile::TempDir;

use crate::binaries::PgBinaries;
use crate::error::TestkitError;
use crate::process::{client_command, log_tail, run_captured, RunError};

mod lifetime;
mod names;
mod primary;
mod server;
mod setup;
mod standby;

pub use lifetime::shared_primary;
pub(crate) use names::percent_encode;
pub(crate) use server::free_port;
pub use server::StopMode;

use lifetime::register_for_exit_teardown;
use names::{conninfo_quote, unique_database_name};
use server::Postmaster;
use setup::Layout;

/// Servers listen on this address only: nothing outside the machine can reach them.
const LOOPBACK: &str = "127.0.0.1";
/// The superuser initdb creates; every connection uses it.
const SUPERUSER: &str = "postgres";
/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// A throwaway PostgreSQL cluster (primary or standby) on a free loopback port, living in
/// its own temporary directory.
///
/// The server runs as a direct child of this process and is stopped (and its directory
/// removed) when the value is dropped, when the process exits normally, and — through a
/// parent-death signal — even when the process is SIGKILLed.
///
/// Connections use trust authentication as the `postgres` superuser on 127.0.0.1.
///
/// # Example: replication lag on demand
///
/// ```no_run
/// use pg_testkit::PgCluster;
///
/// let primary = PgCluster::start_primary()?;
/// let standby = primary.start_standby("replica_a")?;
/// // Freeze replay on the standby: WAL keeps arriving but is not applied, so
/// // pg_stat_replication on the primary shows growing replay lag.
/// standby.psql("postgres", "select pg_wal_replay_pause()")?;
/// primary.psql("postgres", "create table t as select generate_series(1, 1000) as id")?;
/// let lag = primary.psql(
///     "postgres",
///     "select pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) \
///        from pg_stat_replication where application_name = 'replica_a'",
/// )?;
/// assert!(lag.parse::<f64>().unwrap() > 0.0);
/// // Let it catch up again.
/// standby.psql("postgres", "select pg_wal_replay_resume()")?;
/// # Ok::<(), pg_testkit::TestkitError>(())
/// ```
pub struct PgCluster {
    inner: Arc<Inner>,
}

struct Inner {
    binaries: PgBinaries,
    layout: Layout,
    port: u16,
    standby_name: Option<String>,
    state: Mutex<State>,
}

struct State {
    postmaster: Option<Postmaster>,
    /// `None` once torn down; dropping it removes the directory.
    dir: Option<TempDir>,
}

impl PgCluster {
    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{LOOPBACK}:{}/{}",
            self.port(),
            percent_encode(db)
        )
    }

    /// A libpq key/value connection string for `db`, e.g. for `pgbench` or `psql -d`.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host={LOOPBACK} port={} user={SUPERUSER} dbname={} connect_timeout=10",
            self.port(),
            conninfo_quote(db)
        )
    }

    /// Creates a fresh database with a unique name derived from `prefix` (safe for
    /// concurrent tests in one process) and returns its name.
    pub fn create_database(&self, prefix: &str) -> Result<String, TestkitError> {
        let name = unique_database_name(prefix);
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(name)
    }

    /// Runs `sql` through `psql -X -q -v ON_ERROR_STOP=1 -At` on database `db` and returns
    /// its stdout without the final newline.
    ///
    /// The script is fed on stdin, so it may hold several statements (each in its own
    /// transaction unless you write BEGIN/COMMIT), including ones like `CREATE DATABASE`
    /// that cannot run in a transaction block. Rows are printed unaligned, `|`-separated,
    /// one per line; command tags are suppressed. The first failing statement stops the
    /// script and becomes an error carrying psql's stderr.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, TestkitError> {
        let psql = self.inner.binaries.path("psql");
        let mut command = client_command(&psql);
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d"])
            .arg(self.conninfo(db))
            // Output is decoded as UTF-8, whatever the caller's locale says.
            .env("PGCLIENTENCODING", "UTF8");
        match run_captured(&mut command, Some(sql.as_bytes().to_vec()), None) {
            Ok(out) if out.status.success() => {
                let mut stdout = out.stdout;
                if stdout.ends_with('\n') {
                    stdout.pop();
                }
                Ok(stdout)
            }
            Ok(out) => Err(TestkitError::Psql {
                port: self.port(),
                db: db.to_owned(),
                status: out.status,
                stderr: out.stderr.trim_end().to_owned(),
            }),
            Err(RunError::Spawn(source)) => Err(TestkitError::Spawn {
                binary: psql,
                source,
            }),
            Err(RunError::TimedOut { .. }) => unreachable!("psql runs without a timeout"),
        }
    }

    /// The data directory (PGDATA).
    pub fn data_dir(&self) -> &Path {
        &self.inner.layout.data_dir
    }

    /// The server log (postgres' stderr), kept across restarts.
    pub fn log_path(&self) -> &Path {
        &self.inner.layout.log_path
    }

    /// The last few KiB of the server log, for assertion messages.
    pub fn log_tail(&self) -> String {
        log_tail(self.log_path(), 0)
    }

    /// For a standby, the application_name it streams under; `None` for a primary.
    pub fn standby_name(&self) -> Option<&str> {
        self.inner.standby_name.as_deref()
    }

    /// The binaries this cluster runs.
    pub fn binaries(&self) -> &PgBinaries {
        &self.inner.binaries
    }

    fn assemble(
        binaries: PgBinaries,
        layout: Layout,
        dir: TempDir,
        port: u16,
        postmaster: Postmaster,
        standby_name: Option<String>,
    ) -> PgCluster {
        let inner = Arc::new(Inner {
            binaries,
            layout,
            port,
            standby_name,
            state: Mutex::new(State {
                postmaster: Some(postmaster),
                dir: Some(dir),
            }),
        });
        register_for_exit_teardown(&inner);
        PgCluster { inner }
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves State consistent (every field is
        // updated in one assignment), so poisoning is safe to ignore.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn not_running(&self) -> TestkitError {
        TestkitError::NotRunning {
            port: self.port(),
            data_dir: self.data_dir().to_path_buf(),
        }
    }

    fn timeout_error(&self, what: String, waited: Duration) -> TestkitError {
        TestkitError::Timeout {
            what,
            port: self.port(),
            data_dir: self.data_dir().to_path_buf(),
            waited,
            log_tail: self.log_tail(),
        }
    }
}

impl fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port())
            .field("data_dir", &self.data_dir())
            .field("standby_name", &self.standby_name())
            .finish()
    }
}
