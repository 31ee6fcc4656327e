//! The benchmark's throwaway primary and streaming standby, the seeded template
//! database, and a fresh copy of it for every scenario.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use pg_testkit::demo_data::{split_name_single_update, users_table_sql};
use pg_testkit::PgCluster;

/// The standby's `application_name` in `pg_stat_replication`.
pub const STANDBY_NAME: &str = "bench_standby";

/// Server settings every scenario runs under.
///
/// - Room for the whole table in shared buffers and no checkpoint in the middle of a run
///   (`CHECKPOINT` is issued before each scenario instead), so every scenario starts from
///   the same state and pays the same full-page writes.
/// - `log_lock_waits` with a `deadlock_timeout` well under `throttle.max_blocking`: the
///   server then logs every lock wait longer than that, with who held the lock and how long
///   the waiter waited in the end — exact, where sampling `pg_stat_activity` would miss the
///   tail of each wait. `%p` and `%a` in the prefix tie each line to a session.
///
/// - Durable commits (`fsync = on`, the default `synchronous_commit`), as a user runs
///   PostgreSQL: the test kit's clusters turn fsync off, which made every commit free and
///   the figures of earlier runs about 10× too kind to small batches (issue 19).
const SERVER_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "on"),
    ("shared_buffers", "512MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "30min"),
    // A server that has run for a while recycles WAL segments; a throwaway one creates
    // each anew, zero-filling 16 MB while holding WALWriteLock, which stalls every commit
    // behind it. Not zero-filling makes a fresh cluster behave like a long-running one.
    ("wal_init_zero", "off"),
    ("log_lock_waits", "on"),
    ("deadlock_timeout", "50ms"),
    ("log_line_prefix", "%m [%p] %a: "),
];

/// The procedure of scenario 2: the best hand-written loop, keyset batches committed one by
/// one inside the server, with no client round trip. `{update}` is the single UPDATE.
const PLPGSQL_LOOP_SQL: &str = r#"
CREATE PROCEDURE public.split_names_in_batches(batch_size int)
LANGUAGE plpgsql AS $proc$
DECLARE
    after_id bigint := 0;
    upto_id  bigint;
BEGIN
    LOOP
        SELECT max(id) INTO upto_id
          FROM (SELECT id FROM public.users WHERE id > after_id ORDER BY id LIMIT batch_size) AS next_keys;
        EXIT WHEN upto_id IS NULL;
        {update} AND id > after_id AND id <= upto_id;
        after_id := upto_id;
        COMMIT;
    END LOOP;
END
$proc$;
"#;

/// A primary with its streaming standby.
pub struct Fixture {
    pub primary: PgCluster,
    /// Kept alive for the whole run: its replay is what replication lag measures.
    _standby: PgCluster,
}

impl Fixture {
    /// Starts the primary (with [`SERVER_SETTINGS`]) and a streaming standby of it.
    pub fn start() -> anyhow::Result<Fixture> {
        let primary = PgCluster::start_primary_with(SERVER_SETTINGS)
            .context("starting the benchmark primary")?;
        let standby = primary
            .start_standby(STANDBY_NAME)
            .context("starting the benchmark standby")?;
        Ok(Fixture {
            primary,
            _standby: standby,
        })
    }

    /// Runs SQL on `db` of the primary, with the database named in the error.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        self.primary
            .psql(db, sql)
            .with_context(|| format!("running SQL on database {db}"))
    }

    /// Creates `db` holding the split-name table with `rows` rows, frozen and analyzed so
    /// that no scenario pays for hint bits or statistics.
    pub fn seed_users(&self, db: &str, rows: i64) -> anyhow::Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE {db}"))?;
        self.psql(db, &users_table_sql(rows))
            .with_context(|| format!("seeding {rows} rows"))?;
        // For pgbench to write: a column of its own, so the load and the backfill meet
        // on row locks without changing each other's results.
        self.psql(
            db,
            "ALTER TABLE public.users ADD COLUMN last_seen_at timestamptz; \
             VACUUM (FREEZE, ANALYZE) public.users",
        )?;
        Ok(())
    }

    /// [`seed_users`](Self::seed_users) plus the PL/pgSQL loop and pgbench's own tables:
    /// the template every scenario copies.
    pub fn seed_template(&self, db: &str, rows: i64) -> anyhow::Result<()> {
        self.seed_users(db, rows)?;
        let update = split_name_single_update("public.users");
        self.psql(db, &PLPGSQL_LOOP_SQL.replace("{update}", &update))?;
        self.pgbench_init(db)
    }

    /// `pgbench -i -s 1`: 100 000 accounts for the load's own writes.
    fn pgbench_init(&self, db: &str) -> anyhow::Result<()> {
        let output = Command::new(self.primary.binaries().path("pgbench"))
            .args(["-i", "-s", "1", "-q"])
            .arg(self.primary.conninfo(db))
            .output()
            .context("running pgbench -i")?;
        if !output.status.success() {
            bail!(
                "pgbench -i on {db} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// A fresh copy of `template` named `name` (replacing any old one), made by copying
    /// files rather than by writing them to WAL; then a checkpoint and a caught-up standby,
    /// so the scenario starts from a quiet cluster.
    pub fn fresh_copy(&self, template: &str, name: &str) -> anyhow::Result<()> {
        self.drop_database(name)?;
        // Before 15 every CREATE DATABASE copies files; from 15 on that must be asked for.
        let version: u32 = self
            .psql("postgres", "SHOW server_version_num")?
            .parse()
            .context("reading server_version_num")?;
        let strategy = if version >= 150_000 {
            " STRATEGY FILE_COPY"
        } else {
            ""
        };
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {name} TEMPLATE {template}{strategy}"),
        )?;
        self.settle()
    }

    /// Drops `name` if it exists, disconnecting whoever is still on it.
    pub fn drop_database(&self, name: &str) -> anyhow::Result<()> {
        self.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )?;
        Ok(())
    }

    /// Checkpoints, then waits until the standby has replayed everything.
    pub fn settle(&self) -> anyhow::Result<()> {
        self.psql("postgres", "CHECKPOINT")?;
        // The kernel writes back what the last copy and drop left dirty on its own
        // schedule, and its flushes stalled pgbench's commits for tens of milliseconds in
        // the next window (pgbench alone read 1.4 ms, then 15 ms): flush it all now.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let behind = format!(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), -1) \
               FROM pg_stat_replication WHERE application_name = '{STANDBY_NAME}'"
        );
        let started = Instant::now();
        loop {
            let bytes = self.psql("postgres", &behind)?;
            if bytes == "0" {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the standby is still {bytes} bytes behind after 5 minutes");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The primary's current WAL position, in bytes since the start of WAL.
    pub fn wal_position(&self) -> anyhow::Result<u64> {
        let lsn = self.psql(
            "postgres",
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8",
        )?;
        lsn.parse()
            .with_context(|| format!("reading the WAL position from {lsn:?}"))
    }
}
