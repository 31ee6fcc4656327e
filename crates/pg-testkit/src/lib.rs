//! Throwaway PostgreSQL clusters on free loopback ports, for backfilld's tests and its
//! `demo` command.
//!
//! - [`PgCluster::start_primary`] initializes and starts a primary in its own temp dir;
//!   [`PgCluster::start_standby`] adds a streaming replica of it.
//! - [`shared_primary`] is one primary per test binary; isolate tests with
//!   [`PgCluster::create_database`].
//! - [`TcpProxy`] sits in front of a cluster and cuts connections on demand.
//! - [`spawn_tied_to_process`] starts any other child (a daemon under test) so that it dies
//!   with the calling process, as the servers do; [`spawn_prometheus`] a Prometheus so.
//!
//! Servers are direct children of the calling process and die with it, even on SIGKILL; their
//! directories are removed on drop and at normal process exit. When run as root (CI
//! containers) the server programs run as the `postgres` system user, since they refuse
//! root.
//!
//! ```no_run
//! use pg_testkit::shared_primary;
//!
//! let pg = shared_primary();
//! let db = pg.create_database("my_test")?;
//! pg.psql(&db, "create table t (id bigint primary key); insert into t values (1)")?;
//! assert_eq!(pg.psql(&db, "select count(*) from t")?, "1");
//! let url = pg.url(&db); // for sqlx / tokio-postgres
//! # let _ = url;
//! # Ok::<(), pg_testkit::TestkitError>(())
//! ```
//!
//! PostgreSQL is found via `$PG_BINDIR`, `PATH`, `pg_config` or `/usr/lib/postgresql/*/bin`
//! (see [`PgBinaries::locate`]).

mod binaries;
mod cluster;
pub mod demo_data;
mod error;
mod process;
mod proxy;

pub use binaries::PgBinaries;
pub use cluster::{shared_primary, PgCluster, StopMode};
pub use error::TestkitError;
pub use proxy::TcpProxy;

/// Makes `path` owned by the user the server runs as — the `postgres` system user when this
/// process is root, else a no-op — e.g. for an `ssl_key_file` a test wrote, which PostgreSQL
/// requires to be owned by the server user with mode 0600. The directories above it must be
/// searchable by that user too.
pub fn chown_to_server_user(path: &std::path::Path) -> Result<(), TestkitError> {
    process::chown_to_server_user(path)
}

/// Spawns `command` so that the kernel sends it `death_signal` when this process dies, even
/// on SIGKILL — for the daemons and load generators a test or benchmark runs beside its
/// clusters, which would otherwise outlive it.
pub fn spawn_tied_to_process(
    command: std::process::Command,
    death_signal: i32,
) -> std::io::Result<std::process::Child> {
    process::spawn_tied_to_process(command, death_signal)
}

/// Starts a throwaway Prometheus (`$PROMETHEUS_BIN`, else `prometheus` from Debian's
/// package) with `config` as its prometheus.yml, its data and its log (`prometheus.log`,
/// warnings and errors) in `dir`, listening on a free loopback port, tied to this process
/// as the servers are: the child and its port. An error names the binary and how to
/// install it.
pub fn spawn_prometheus(
    config: &str,
    dir: &std::path::Path,
) -> std::io::Result<(std::process::Child, u16)> {
    let port = cluster::free_port().map_err(std::io::Error::other)?;
    let binary = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let mut command = std::process::Command::new(&binary);
    command
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log));
    let child = spawn_tied_to_process(command, libc::SIGKILL).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot start {binary}: {e} (Debian: apt-get install prometheus; scripts/test does)"),
        )
    })?;
    Ok((child, port))
}
