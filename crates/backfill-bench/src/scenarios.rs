//! The scenarios, each on a fresh copy of the seeded database, each measured the same
//! way: wall time, WAL written, the standby's lag, the primary's CPU.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _};
use pg_testkit::demo_data::{split_name_single_update, SPLIT_NAME_JOB_SQL};
use tokio_postgres::NoTls;

use crate::daemon::{Daemon, DaemonRun};
use crate::fixture::{Fixture, STANDBY_NAME};
use crate::lockwaits;
use crate::pgbench::{epoch_micros, LatencySummary, Load, LoadShape};
use crate::procfs::tree_cpu_seconds;
use crate::sampler::{Sampler, Samples};
use crate::stats::{peak, percentile};

/// How the name of every scenario-3 row starts; its settings follow.
pub const UNTHROTTLED_PREFIX: &str = "3. backfilld, limits off, ";

/// Keys per batch of the PL/pgSQL loop (scenario 2), as the issue prescribes.
pub const PLPGSQL_BATCH: u32 = 10_000;

/// How the split-name job's statement picks its batch's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JobForm {
    /// `WHERE id = ANY(:keys)`: the job exactly as DESIGN.md writes it.
    KeyArray,
    /// `WHERE id BETWEEN :first_key AND :last_key AND first_name IS NULL`: one index range
    /// scan instead of one index descent per key.
    Range,
}

impl JobForm {
    /// The enqueueing INSERT for this form.
    pub fn job_sql(self) -> anyhow::Result<String> {
        const KEY_ARRAY: &str = "WHERE id = ANY(:keys)$$";
        ensure!(
            SPLIT_NAME_JOB_SQL.contains(KEY_ARRAY),
            "the demo job no longer selects rows with {KEY_ARRAY:?}; update the benchmark"
        );
        Ok(match self {
            JobForm::KeyArray => SPLIT_NAME_JOB_SQL.to_string(),
            JobForm::Range => SPLIT_NAME_JOB_SQL.replace(
                KEY_ARRAY,
                "WHERE id BETWEEN :first_key AND :last_key AND first_name IS NULL$$",
            ),
        })
    }

    /// Keys per batch at the form's best: a range job fetches only its first and last key,
    /// so bigger batches cost it no memory and save per-batch work (40,000 ran 4 % faster
    /// than 10,000); a key-array job holds each key as text, so it stays at 10,000.
    pub fn batch_keys(self) -> u32 {
        match self {
            JobForm::KeyArray => 10_000,
            JobForm::Range => 40_000,
        }
    }

    /// `settings` after the form's batch size (so that anything in `settings` wins).
    pub fn with_batch_size(self, settings: &[(String, String)]) -> Vec<(String, String)> {
        let keys = self.batch_keys().to_string();
        let mut with = vec![
            ("BACKFILLD_BATCH__SIZE".to_string(), keys.clone()),
            ("BACKFILLD_BATCH__MAX_SIZE".to_string(), keys),
        ];
        with.extend(settings.iter().cloned());
        with
    }

    /// How the form shows in the table.
    pub fn label(self) -> &'static str {
        match self {
            JobForm::KeyArray => "= ANY(:keys)",
            JobForm::Range => "BETWEEN :first_key AND :last_key",
        }
    }
}

/// What is measured around every scenario.
#[derive(Debug)]
pub struct Observation {
    pub wall: Duration,
    pub wal_bytes: u64,
    pub samples: Samples,
    /// CPU seconds of the primary's processes (postmaster and every backend).
    pub primary_cpu: f64,
}

impl Observation {
    /// Peak and p99 of the standby's replay lag in seconds.
    pub fn lag_seconds(&self) -> (f64, f64) {
        spread(&self.samples.lag_seconds)
    }

    /// Peak and p99 of the standby's replay lag in bytes.
    pub fn lag_bytes(&self) -> (f64, f64) {
        spread(&self.samples.lag_bytes)
    }
}

fn spread(values: &[f64]) -> (f64, f64) {
    (
        peak(values).unwrap_or(0.0),
        percentile(values, 99.0).unwrap_or(0.0),
    )
}

/// One row of the results table.
#[derive(Debug)]
pub struct Measurement {
    pub name: String,
    /// Rows the scenario changed (0 for pgbench alone).
    pub rows: i64,
    pub observed: Observation,
    pub daemon: Option<DaemonRun>,
    /// pgbench over the scenario's window.
    pub load: Option<LatencySummary>,
    /// Longest wait of a pgbench transaction on a lock held by backfilld, in ms.
    pub longest_lock_wait_ms: Option<f64>,
}

impl Measurement {
    /// Rows changed per second of wall time.
    pub fn rows_per_second(&self) -> f64 {
        self.rows as f64 / self.observed.wall.as_secs_f64().max(1e-9)
    }
}

/// Everything the scenarios share.
pub struct Bench {
    pub fixture: Fixture,
    pub daemon: Daemon,
    /// The seeded database every scenario copies.
    pub template: String,
    pub rows: i64,
    /// Where daemon logs go.
    pub work_dir: PathBuf,
    pub load: LoadShape,
    /// pgbench runs this long before the measured window opens.
    pub warmup: Duration,
    /// The fingerprint of the single UPDATE's result, which every other scenario must match.
    pub reference: Option<String>,
}

impl Bench {
    /// Scenario 1: the database's own speed, one UPDATE over the whole table.
    pub async fn single_update(&mut self) -> anyhow::Result<Measurement> {
        let db = self.copy("bench_single")?;
        let client = self.connect(&db).await?;
        let update = split_name_single_update("public.users");
        let observed = self
            .observe(async {
                client
                    .batch_execute(&update)
                    .await
                    .context("running the single UPDATE")
            })
            .await?
            .1;
        self.check_result(&db, "1")?;
        Ok(self.measurement("1. single UPDATE", observed))
    }

    /// Scenario 2: the PL/pgSQL keyset loop committing every [`PLPGSQL_BATCH`] keys.
    pub async fn plpgsql_loop(&mut self) -> anyhow::Result<Measurement> {
        let db = self.copy("bench_plpgsql")?;
        let client = self.connect(&db).await?;
        let call = format!("CALL public.split_names_in_batches({PLPGSQL_BATCH})");
        let observed = self
            .observe(async {
                client
                    .batch_execute(&call)
                    .await
                    .context("running the PL/pgSQL loop")
            })
            .await?
            .1;
        self.check_result(&db, "2")?;
        Ok(self.measurement(
            &format!("2. PL/pgSQL loop, {PLPGSQL_BATCH} per COMMIT"),
            observed,
        ))
    }

    /// Scenario 3: backfilld with its limits off, at the given settings, running the job
    /// in `form` cut into `parallelism` slices, all driven by the one daemon process.
    pub async fn backfilld_unthrottled(
        &mut self,
        settings: &[(String, String)],
        form: JobForm,
        parallelism: u32,
    ) -> anyhow::Result<Measurement> {
        let db = self.copy("bench_unthrottled")?;
        let url = self.enqueue(&db, form)?;
        let settings = self.with_slices(&db, &form.with_batch_size(settings), parallelism)?;
        let label = format!("unthrottled-{form:?}-{parallelism}");
        let (run, observed) = self
            .observe(self.run_daemon(&url, &settings, &label))
            .await?;
        self.check_result(&db, "3")?;
        let slices = if parallelism == 1 {
            "1 slice".to_string()
        } else {
            format!("{parallelism} slices")
        };
        let name = format!("{UNTHROTTLED_PREFIX}{}, {slices}", form.label());
        let mut measurement = self.measurement(&name, observed);
        measurement.daemon = Some(run);
        Ok(measurement)
    }

    /// Scenario 5 (issue 17): backfilld with its limits off as scenario 3 runs it (key
    /// array, one slice), with `keep_undo` as `undo` says: `None` off, `Some(None)` the
    /// whole row, `Some(Some(columns))` those columns. Undo's cost is this row's rows/s and
    /// WAL beside the plain one's.
    pub async fn backfilld_with_undo(
        &mut self,
        settings: &[(String, String)],
        undo: Option<Option<&str>>,
    ) -> anyhow::Result<Measurement> {
        let db = self.copy("bench_undo")?;
        let url = self.enqueue(&db, JobForm::KeyArray)?;
        let what = match undo {
            None => "no undo".to_string(),
            Some(None) => "keep_undo, whole row".to_string(),
            Some(Some(columns)) => format!("keep_undo, undo_columns {columns}"),
        };
        if let Some(columns) = undo {
            let columns = columns.map_or("NULL".to_string(), |c| format!("'{{{c}}}'"));
            self.fixture.psql(
                &db,
                &format!(
                    "UPDATE backfill.jobs SET keep_undo = true, undo_columns = {columns} \
                      WHERE name = 'split_full_name'"
                ),
            )?;
        }
        let settings = JobForm::KeyArray.with_batch_size(settings);
        let label = format!("undo-{}", what.replace([' ', ','], "-"));
        let (run, observed) = self
            .observe(self.run_daemon(&url, &settings, &label))
            .await?;
        let kept = self.fixture.psql(
            &db,
            "SELECT coalesce(round(undo_bytes / 1048576.0, 1) || ' MiB in ' || undo_rows || ' rows', 'none') \
               FROM backfill.job_status WHERE name = 'split_full_name'",
        )?;
        self.check_result(&db, "5")?;
        let name = format!(
            "5. backfilld, limits off, {}, {what} (undo data: {kept})",
            JobForm::KeyArray.label()
        );
        let mut measurement = self.measurement(&name, observed);
        measurement.daemon = Some(run);
        Ok(measurement)
    }

    /// Scenario 4: backfilld with `settings` (on top of the defaults) while pgbench runs;
    /// `name` labels the row. The measured window is the daemon's run.
    pub async fn backfilld_under_load(
        &mut self,
        settings: &[(String, String)],
        name: &str,
    ) -> anyhow::Result<Measurement> {
        let db = self.copy("bench_throttled")?;
        let url = self.enqueue(&db, JobForm::KeyArray)?;
        let log = self.fixture.primary.log_path().to_path_buf();
        let log_offset = lockwaits::log_offset(&log)?;
        let pgbench = self.fixture.primary.binaries().path("pgbench");
        let conninfo = self.fixture.primary.conninfo(&db);
        let ((run, transactions, window), observed) = self
            .observe(async {
                let load = Load::start(&pgbench, &conninfo, self.load)?;
                tokio::time::sleep(self.warmup).await;
                let opened = SystemTime::now();
                let label = format!("loaded-{}", name.split(',').next().unwrap_or("4"));
                let run = self.run_daemon(&url, settings, &label).await;
                let closed = SystemTime::now();
                let transactions = load.stop()?;
                Ok((run?, transactions, (opened, closed)))
            })
            .await?;
        self.check_result(&db, "4")?;
        eprintln!(
            "backfill-bench: active pgbench sessions under backfill, by wait event (samples): {}",
            observed.samples.describe_pgbench_waits()
        );
        let waits = lockwaits::read_since(&log, log_offset)?;
        let longest_wait =
            lockwaits::longest_wait_on(&waits, "pgbench", &observed.samples.backfilld_pids);
        let window_micros = (epoch_micros(window.0), epoch_micros(window.1));
        let mut loaded = self.measurement(name, observed);
        loaded.load = LatencySummary::over(&transactions, window_micros);
        loaded.longest_lock_wait_ms = Some(longest_wait);
        loaded.daemon = Some(run);
        Ok(loaded)
    }

    /// pgbench alone on a fresh copy, measured over `length` after the warm-up: the
    /// baseline of scenario 4.
    pub async fn pgbench_alone(&mut self, length: Duration) -> anyhow::Result<Measurement> {
        let db = self.copy("bench_baseline")?;
        let pgbench = self.fixture.primary.binaries().path("pgbench");
        let conninfo = self.fixture.primary.conninfo(&db);
        let ((transactions, window), observed) = self
            .observe(async {
                let load = Load::start(&pgbench, &conninfo, self.load)?;
                tokio::time::sleep(self.warmup).await;
                let opened = SystemTime::now();
                tokio::time::sleep(length).await;
                let closed = SystemTime::now();
                Ok((load.stop()?, (epoch_micros(opened), epoch_micros(closed))))
            })
            .await?;
        self.fixture.drop_database(&db)?;
        eprintln!(
            "backfill-bench: active pgbench sessions alone, by wait event (samples): {}",
            observed.samples.describe_pgbench_waits()
        );
        let mut measurement = self.measurement("pgbench alone (baseline)", observed);
        measurement.rows = 0;
        measurement.load = LatencySummary::over(&transactions, window);
        Ok(measurement)
    }

    /// A memory-only run: backfilld with its limits off over a fresh table of `rows` rows,
    /// as scenario 3 runs it in `form` with `parallelism` slices.
    pub async fn daemon_memory(
        &mut self,
        rows: i64,
        settings: &[(String, String)],
        form: JobForm,
        parallelism: u32,
    ) -> anyhow::Result<DaemonRun> {
        let db = format!("bench_memory_{rows}");
        self.fixture.drop_database(&db)?;
        self.fixture.seed_users(&db, rows)?;
        self.fixture.settle()?;
        let url = self.enqueue(&db, form)?;
        let settings = self.with_slices(&db, &form.with_batch_size(settings), parallelism)?;
        let run = self
            .run_daemon(&url, &settings, &format!("memory-{rows}"))
            .await?;
        self.fixture.drop_database(&db)?;
        Ok(run)
    }

    /// Cuts the enqueued job in `db` into `parallelism` slices and gives the daemon as
    /// many job slots (unless `settings` set `worker.concurrency`); returns `settings` with
    /// that.
    fn with_slices(
        &self,
        db: &str,
        settings: &[(String, String)],
        parallelism: u32,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let mut settings = settings.to_vec();
        if parallelism > 1 {
            self.fixture.psql(
                db,
                &format!(
                    "UPDATE backfill.jobs SET parallelism = {parallelism} WHERE name = 'split_full_name'"
                ),
            )?;
            // As many job slots as slices, unless the settings say otherwise (to measure a
            // daemon with fewer slots than slices, e.g. one default daemon).
            let slots = settings
                .iter()
                .find(|(key, _)| key == "BACKFILLD_WORKER__CONCURRENCY")
                .and_then(|(_, value)| value.parse::<u32>().ok())
                .unwrap_or(parallelism);
            settings.push((
                "BACKFILLD_WORKER__CONCURRENCY".to_string(),
                slots.to_string(),
            ));
            // One data-plane connection per job slot, plus one for the health probes.
            settings.push((
                "BACKFILLD_DATABASE__POOL_SIZE".to_string(),
                (slots + 1).to_string(),
            ));
        }
        Ok(settings)
    }

    fn copy(&self, name: &str) -> anyhow::Result<String> {
        self.fixture.fresh_copy(&self.template, name)?;
        Ok(name.to_string())
    }

    async fn connect(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.fixture.primary.url(db), NoTls)
            .await
            .with_context(|| format!("connecting to {db}"))?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Installs backfilld's schema in `db` and enqueues the split-name job in `form` by
    /// SQL, as an engineer would; returns the database's URL.
    fn enqueue(&self, db: &str, form: JobForm) -> anyhow::Result<String> {
        let url = self.fixture.primary.url(db);
        self.daemon.migrate(&url)?;
        self.fixture.psql(db, &form.job_sql()?)?;
        Ok(url)
    }

    /// Runs the daemon to its exit and checks that the job succeeded.
    async fn run_daemon(
        &self,
        url: &str,
        settings: &[(String, String)],
        label: &str,
    ) -> anyhow::Result<DaemonRun> {
        let daemon = self.daemon.clone();
        let log = self.work_dir.join(format!("backfilld-{label}.log"));
        let (url_owned, settings_owned) = (url.to_string(), settings.to_vec());
        let run =
            tokio::task::spawn_blocking(move || daemon.run(&url_owned, &settings_owned, &log))
                .await
                .context("the daemon runner panicked")??;
        let db = url.rsplit('/').next().unwrap_or_default();
        let state = self.fixture.psql(
            db,
            "SELECT state || ' ' || coalesce(last_error, '') FROM backfill.jobs WHERE name = 'split_full_name'",
        )?;
        ensure!(
            state.starts_with("succeeded"),
            "backfilld exited but the job is {state:?} ({label})"
        );
        Ok(run)
    }

    /// Runs `work` between two readings of WAL position and primary CPU, with the lag
    /// sampler running.
    async fn observe<T>(
        &self,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<(T, Observation)> {
        let postmaster = self
            .fixture
            .primary
            .pid()
            .context("the primary is not running")?;
        let sampler = Sampler::start(&self.fixture.primary.url("postgres")).await?;
        let wal_before = self.fixture.wal_position()?;
        let cpu_before = tree_cpu_seconds(postmaster)?;
        let started = Instant::now();
        let result = work.await;
        let wall = started.elapsed();
        // Backends of a client that just exited may still be on their way out; once the
        // postmaster has reaped them their time shows in its cutime, not before.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cpu_after = tree_cpu_seconds(postmaster)?;
        let wal_after = self.fixture.wal_position()?;
        let samples = sampler.finish().await?;
        Ok((
            result?,
            Observation {
                wall,
                wal_bytes: wal_after.saturating_sub(wal_before),
                samples,
                primary_cpu: cpu_after - cpu_before,
            },
        ))
    }

    fn measurement(&self, name: &str, observed: Observation) -> Measurement {
        Measurement {
            name: name.to_string(),
            rows: self.rows,
            observed,
            daemon: None,
            load: None,
            longest_lock_wait_ms: None,
        }
    }

    /// Checks that every row was split exactly as the single UPDATE splits it, then drops
    /// the copy.
    fn check_result(&mut self, db: &str, scenario: &str) -> anyhow::Result<()> {
        let fingerprint = self.fixture.psql(
            db,
            "SELECT count(*) FILTER (WHERE first_name IS NULL) || ' pending, hash ' || \
                    coalesce(sum(hashtext(id || '|' || first_name || '|' || coalesce(last_name, '-'))), 0) \
               FROM public.users",
        )?;
        if !fingerprint.starts_with("0 pending") {
            bail!("scenario {scenario} left rows unsplit: {fingerprint}");
        }
        match &self.reference {
            None => self.reference = Some(fingerprint),
            Some(reference) if *reference == fingerprint => {}
            Some(reference) => bail!(
                "scenario {scenario} split the names differently: {fingerprint} vs {reference}"
            ),
        }
        self.fixture.drop_database(db)
    }
}

/// The standby this benchmark declares to backfilld (`throttle.expected_standbys`).
pub fn expected_standby_setting() -> (String, String) {
    (
        "BACKFILLD_THROTTLE__EXPECTED_STANDBYS".to_string(),
        STANDBY_NAME.to_string(),
    )
}
