//! The operator verbs (migrate, enqueue, status, plan, pause/resume/cancel/retry) and
//! the database connections every verb shares.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use backfill_core::activity::ProductionActivity;
use backfill_core::error_class::ErrorClass;
use backfill_core::impact::ImpactController;
use backfill_core::latency::DelayDetector;
use backfill_core::throttle::HealthSample;
use backfill_dataplane::{
    connect_pool, error_chain, pinned_startup_settings, BatchRunner, BatchTarget, Endpoint,
    HealthProbe, LatencyCanary, RetryBackoff, SessionSettings, Signals, SslMode,
};
use backfill_queue::{Job, JobState, JobStatus, NewJob, Phase, QueueError, SteeringVerb};
use comfy_table::{ColumnConstraint, Width};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::watch;

use crate::cli::{EnqueueArgs, Verb};
use crate::log_escape::escape_controls;
use crate::redact::redacted;
use crate::settings::Settings;
use crate::shutdown::Shutdown;
use crate::telemetry;

/// How a verb failed: bad usage exits 2, anything else 1.
#[derive(Debug)]
pub enum CliFailure {
    /// The user asked for something that cannot be done (exit 2).
    Usage(String),
    /// Something broke at run time (exit 1).
    Fatal(anyhow::Error),
    /// `wait` gave up before the job finished (exit 3).
    TimedOut(String),
}

impl CliFailure {
    /// Classifies a daemon error: what a retry cannot fix (a refused login, an unknown
    /// database, a bad URL, a missing grant) is a configuration problem (exit 2); a
    /// database still unreachable after the start-up retries, and anything else, is a
    /// runtime failure (exit 1) that a new pod may well get past.
    pub fn from_daemon(e: anyhow::Error) -> Self {
        let permanent = e
            .downcast_ref::<DatabaseUnreachable>()
            .is_some_and(|e| !e.retryable)
            || e.downcast_ref::<ProbesBlind>().is_some();
        if permanent {
            CliFailure::Usage(e.to_string())
        } else {
            CliFailure::Fatal(e)
        }
    }
}

impl From<DatabaseUnreachable> for CliFailure {
    fn from(e: DatabaseUnreachable) -> Self {
        CliFailure::from_daemon(e.into())
    }
}

impl From<QueueError> for CliFailure {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Refused { message, .. } => CliFailure::Usage(message),
            other => CliFailure::Fatal(other.into()),
        }
    }
}

/// The database could not be reached at start-up. `retryable`: it may come back (refused,
/// timed out, starting up, failing over), so the start-up retries were spent on it and the
/// process exits 1; otherwise a retry cannot help (a refused login, an unknown database, a
/// bad URL): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the database at {url}: {reason}{hint}")]
pub struct DatabaseUnreachable {
    url: String,
    reason: String,
    retryable: bool,
    /// Said after the reason: how long we tried, and where the URL came from.
    hint: String,
}

/// Back-off between start-up connection attempts: doubles from the first to the last.
const STARTUP_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(10));

/// One failed connection attempt.
struct ConnectFailure {
    reason: String,
    retryable: bool,
}

/// Where the URL came from, when it is not from the environment: a missing `DATABASE_URL`
/// is the most common reason for connecting to the wrong place.
fn url_source_hint() -> &'static str {
    let set = |name: &str| std::env::var_os(name).is_some_and(|value| !value.is_empty());
    if set("DATABASE_URL") || set("BACKFILLD_DATABASE__URL") {
        ""
    } else {
        "; DATABASE_URL is not set, so database.url from the configuration was used"
    }
}

/// The role cannot see what the throttle's probes read, and `throttle.allow_blind` is
/// off: a configuration problem (exit 2).
#[derive(Debug, thiserror::Error)]
#[error(
    "{0}; GRANT pg_monitor to it, or set throttle.allow_blind = true to run without these probes"
)]
pub struct ProbesBlind(String);

/// Whether a failed connection attempt may succeed later: no SQLSTATE (refused, reset, name
/// resolution, timed out) or a transient one (starting up, shutting down, too many
/// connections). A refused login or an unknown database is final.
fn connect_error_is_retryable(sqlstate: Option<&str>, message: &str) -> bool {
    sqlstate.is_none_or(|code| {
        backfill_core::error_class::classify(&backfill_core::error_class::ErrorFacts {
            sqlstate: Some(code),
            message,
            connection_closed: true,
            canceled_by_us: false,
        })
        .is_transient()
    })
}

/// Connections to the target database: sqlx for the queue, deadpool for batches.
pub struct Database {
    pub control: PgPool,
    pub data: deadpool_postgres::Pool,
    pub redacted_url: String,
    /// How the data plane reaches the database (TLS included), for cancel requests.
    pub endpoint: Endpoint,
}

impl Database {
    /// Connects both planes, retrying what may pass (refused, timed out, starting up, failing
    /// over) with back-off for up to `database.startup_timeout`: a pod starting during a
    /// failover waits it out instead of failing its Job. What a retry cannot fix (a refused
    /// login, an unknown database, a bad URL) is reported at once.
    pub async fn connect(settings: &Settings) -> Result<Database, DatabaseUnreachable> {
        let started = Instant::now();
        let budget = settings.database.startup_timeout;
        let mut wait = STARTUP_BACKOFF.0;
        let mut attempts = 1u32;
        loop {
            let failure = match Self::connect_once(settings).await {
                Ok(db) => return Ok(db),
                Err(failure) => failure,
            };
            let redacted_url = redacted(&settings.database.url);
            let spent = started.elapsed();
            let left = budget.saturating_sub(spent);
            if !failure.retryable || left.is_zero() {
                let tried = if failure.retryable {
                    format!(
                        " (gave up after {attempts} attempts in {}, database.startup_timeout {})",
                        humantime::format_duration(Duration::from_secs(spent.as_secs())),
                        humantime::format_duration(budget)
                    )
                } else {
                    String::new()
                };
                return Err(DatabaseUnreachable {
                    url: redacted_url,
                    reason: failure.reason,
                    retryable: failure.retryable,
                    hint: format!("{tried}{}", url_source_hint()),
                });
            }
            tracing::warn!(
                database = %redacted_url,
                error = %failure.reason,
                retry_in = %humantime::format_duration(wait.min(left)),
                attempt = attempts,
                "cannot connect to the database; retrying (database.startup_timeout)"
            );
            // The last try comes at the deadline, not a back-off step before it.
            tokio::time::sleep(wait.min(left)).await;
            wait = (wait * 2).min(STARTUP_BACKOFF.1);
            attempts += 1;
        }
    }

    /// One attempt at both planes, with the same TLS settings; it opens one connection on
    /// each, so an unreachable database, a refused login or a certificate that does not
    /// verify is reported now, with its reason, rather than by the first batch.
    async fn connect_once(settings: &Settings) -> Result<Database, ConnectFailure> {
        let url = &settings.database.url;
        let final_failure = |reason: String| ConnectFailure {
            reason,
            retryable: false,
        };
        let timeout = settings.database.connect_timeout;
        let timed_out = || ConnectFailure {
            reason: format!(
                "no answer within database.connect_timeout ({})",
                humantime::format_duration(timeout)
            ),
            retryable: true,
        };
        let endpoint = Endpoint::parse(url).map_err(|e| final_failure(e.to_string()))?;
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| final_failure(e.to_string()))?;
        // The queue's sessions parse and print keys too (slice bounds): pinned like the
        // data plane's, whatever the role's settings.
        let options = with_tls_of(options, &endpoint)
            .application_name("backfilld-control")
            .options(pinned_startup_settings());
        // One plain attempt first: a pool retries until its timeout and then says only
        // that it timed out, hiding why (refused, wrong password, bad certificate).
        let probe = tokio::time::timeout(timeout, PgConnection::connect_with(&options))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                let retryable = match &e {
                    sqlx::Error::Database(db) => {
                        connect_error_is_retryable(db.code().as_deref(), db.message())
                    }
                    // A certificate or URL problem stays one. rustls reports a certificate
                    // it refuses as invalid data on the socket.
                    sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => false,
                    sqlx::Error::Io(io) => io.kind() != std::io::ErrorKind::InvalidData,
                    _ => true,
                };
                ConnectFailure {
                    reason: e.to_string(),
                    retryable,
                }
            })?;
        let _ = probe.close().await;
        // Four for claims, heartbeats and probes, one the daemon keeps listening for
        // queue changes.
        let control = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(timeout)
            .connect_lazy_with(options);
        let data = endpoint
            .pool(&session_settings(settings))
            .map_err(|e| final_failure(e.to_string()))?;
        let first = data.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Timeout(_) => timed_out(),
            deadpool_postgres::PoolError::Backend(e) => ConnectFailure {
                retryable: connect_error_is_retryable(
                    e.code().map(|code| code.code()),
                    &e.to_string(),
                ),
                reason: format!("data plane: {}", error_chain(&e)),
            },
            other => ConnectFailure {
                reason: format!("data plane: {}", error_chain(&other)),
                retryable: true,
            },
        })?;
        drop(first); // back into the pool
        Ok(Database {
            control,
            data,
            redacted_url: redacted(url),
            endpoint,
        })
    }

    /// Refuses to run blind: PostgreSQL shows a role without `pg_read_all_stats` (part of
    /// `pg_monitor`) NULL positions in `pg_stat_replication` and NULL wait events for other
    /// roles' sessions in `pg_stat_activity`, so the lag probe would see no standby and the
    /// lock probe no blocked session, and the throttle would never hold. With
    /// `throttle.allow_blind` it only warns.
    pub async fn check_probes_can_see(&self, settings: &Settings) -> anyhow::Result<()> {
        let (role, reads_all_stats, hidden_standbys, superuser): (String, bool, i64, bool) =
            sqlx::query_as(
                "SELECT current_user::text, pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'), \
                        (SELECT count(*) FROM pg_stat_replication WHERE state IS NULL), \
                        (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            )
            .fetch_one(&self.control)
            .await
            .context("checking what the health probes can see")?;
        if superuser {
            // Jobs run as their engineers (SET LOCAL ROLE), but SQL can reset the role
            // within its own statement: the daemon's role is what it would reach.
            tracing::warn!(
                role = %role,
                "the daemon's role is a superuser: an engineer's SQL that resets its role would run as one; \
                 give the daemon a role of its own (README, \"Least privilege\")"
            );
        }
        if reads_all_stats && hidden_standbys == 0 {
            return Ok(());
        }
        let blind = format!(
            "role {role} cannot see other sessions' statistics (it has neither pg_monitor nor \
             pg_read_all_stats): pg_stat_replication hides standby positions from it \
             (standbys hidden from it now: {hidden_standbys}) and pg_stat_activity hides other sessions' \
             lock waits, so the replication-lag and lock probes are blind"
        );
        if !settings.throttle.allow_blind {
            return Err(ProbesBlind(blind).into());
        }
        tracing::warn!(
            "{blind}; running anyway (throttle.allow_blind = true): only batch duration and \
             max_rows_per_second slow the backfill down"
        );
        Ok(())
    }

    /// The batch runner on the data-plane pool.
    pub fn batch_runner(&self, settings: &Settings) -> BatchRunner {
        let backoff = RetryBackoff {
            base: settings.batch.retry_backoff,
            max: settings.batch.retry_backoff_max,
        };
        BatchRunner::new(self.data.clone(), backoff).cancelling_over(&self.endpoint)
    }
}

/// sqlx options carrying the TLS decisions the data plane made for the same URL, so
/// both planes encrypt and verify alike (`require` with `sslrootcert` verifies the chain,
/// as in libpq).
fn with_tls_of(options: PgConnectOptions, endpoint: &Endpoint) -> PgConnectOptions {
    let mode = match endpoint.ssl_mode() {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require if endpoint.root_cert().is_some() => PgSslMode::VerifyCa,
        SslMode::Require => PgSslMode::Require,
        SslMode::VerifyCa => PgSslMode::VerifyCa,
        SslMode::VerifyFull => PgSslMode::VerifyFull,
    };
    match endpoint.root_cert() {
        Some(root_cert) => options.ssl_mode(mode).ssl_root_cert(root_cert),
        None => options.ssl_mode(mode),
    }
}

/// The application_name of our data-plane sessions: how probes recognise them.
pub fn data_plane_application_name(settings: &Settings) -> String {
    format!("backfilld/{}", settings.worker_id())
}

fn session_settings(settings: &Settings) -> SessionSettings {
    SessionSettings {
        lock_timeout: settings.batch.lock_timeout,
        statement_timeout: settings.batch.statement_timeout,
        application_name: data_plane_application_name(settings),
        pool_size: settings.database.pool_size,
        connect_timeout: settings.database.connect_timeout,
    }
}

/// How often the probe task refreshes `backfill_jobs{state}` (one query on the queue).
const JOB_STATES_INTERVAL: Duration = Duration::from_secs(2);

/// Samples health every `throttle.probe_interval` on a task of its own and
/// publishes the latest sample; also refreshes the daemon-wide gauges.
pub fn spawn_health_probes(
    settings: &Settings,
    db: &Database,
    shutdown: Shutdown,
) -> anyhow::Result<(watch::Receiver<HealthSample>, tokio::task::JoinHandle<()>)> {
    let mut replicas = Vec::new();
    for (i, url) in settings.throttle.replica_urls.iter().enumerate() {
        let pool = probe_pool(url, settings)
            .with_context(|| format!("throttle.replica_urls[{i}] ({})", redacted(url)))?;
        replicas.push((format!("replica{i}"), pool));
    }
    // Production sessions are counted only for sharing the primary (the impact budget or
    // the duty cycle).
    let impact = settings.impact_settings();
    let sharing = settings.throttle.busy_duty_cycle < 1.0 || impact.is_some();
    let probe = HealthProbe::new(
        db.data.clone(),
        replicas,
        settings.throttle.expected_standbys.clone(),
        data_plane_application_name(settings),
        settings.throttle.probe_timeout,
        sharing.then_some(settings.throttle.probe_interval),
    )
    .with_signals(Signals {
        slots: settings.throttle.max_slot_retained_bytes > 0,
        operator_throttles: true,
        throttle_query: Some(settings.throttle.query.trim().to_owned()).filter(|q| !q.is_empty()),
    });
    let interval = settings.throttle.probe_interval;
    let (max_lag, max_lag_bytes) = (settings.throttle.max_lag, settings.throttle.max_lag_bytes);
    let control = db.control.clone();
    let (tx, rx) = watch::channel(HealthSample::default());
    let detector = Some(settings.throttle.max_probe_delay)
        .filter(|delay| !delay.is_zero())
        .map(DelayDetector::new);
    let canary = if detector.is_none() && impact.is_none() {
        None
    } else {
        let pool = probe_pool(&settings.database.url, settings)
            .context("the production-latency canary's connection")?;
        Some(run_canary(
            LatencyCanary::new(pool, settings.throttle.probe_timeout),
            CanaryJudges {
                detector,
                impact: impact.map(|impact| ImpactController::new(impact, Duration::ZERO)),
                control: control.clone(),
            },
            settings.throttle.canary_interval,
            tx.clone(),
            shutdown.clone(),
        ))
    };
    let sampling = async move {
        let mut job_states_at: Option<Instant> = None;
        let (origin, mut activity) = (Instant::now(), ProductionActivity::default());
        let mut was_active = false;
        while !shutdown.is_triggered() {
            let mut sample = probe.sample().await;
            sample.production_active =
                activity.observe(origin.elapsed(), sample.production_sessions);
            if sharing && sample.production_active != was_active {
                note_production_activity(&sample);
            }
            was_active = sample.production_active;
            telemetry::record_replication_lag(&sample);
            // The canary's count and the impact budget's directive live on in every sample.
            tx.send_modify(|latest| {
                sample.probe_delays = latest.probe_delays;
                sample.impact = latest.impact;
                *latest = sample;
            });
            // Re-set every tick, or the exporter's idle timeout would drop them.
            telemetry::record_daemon_info(max_lag, max_lag_bytes);
            if job_states_at.is_none_or(|at| at.elapsed() >= JOB_STATES_INTERVAL) {
                job_states_at = Some(Instant::now());
                report_queue_state(&control).await;
            }
            shutdown.sleep(interval).await;
        }
    };
    // One task, so that aborting it stops the canary too.
    let probes = tokio::spawn(async move {
        match canary {
            Some(canary) => drop(tokio::join!(canary, sampling)),
            None => sampling.await,
        }
    });
    Ok((rx, probes))
}

/// Refreshes `backfill_jobs{state}` and `backfill_job_failed{backfill_job}` from the queue.
pub async fn report_queue_state(control: &PgPool) {
    match JobStatus::count_by_state(control).await {
        Ok(counts) => telemetry::record_job_states(&counts),
        Err(e) => tracing::debug!(error = %e, "cannot count jobs by state"),
    }
    let failed = sqlx::query_scalar("SELECT name FROM backfill.jobs WHERE state = 'failed'")
        .fetch_all(control)
        .await;
    match failed {
        Ok(names) => telemetry::record_failed_jobs(&names),
        Err(e) => tracing::debug!(error = %e, "cannot list failed jobs"),
    }
}

/// Logs when jobs start and stop sharing the primary with production.
fn note_production_activity(sample: &HealthSample) {
    if sample.production_active {
        tracing::info!(
            sessions = sample.production_sessions,
            "production is at work on the primary: sharing it (the impact budget, throttle.impact_budget_ratio; without its signal, the duty cycle, throttle.busy_duty_cycle)"
        );
    } else {
        tracing::info!(
            "no production sessions at work on the primary for a while: running flat out"
        );
    }
}

/// A one-connection data-plane pool to `url`, for a probe of its own.
fn probe_pool(url: &str, settings: &Settings) -> anyhow::Result<deadpool_postgres::Pool> {
    let session = SessionSettings {
        pool_size: 1,
        ..session_settings(settings)
    };
    Ok(connect_pool(url, &session)?)
}

/// What judges the canary's round trips: the delay detector (`throttle.max_probe_delay`)
/// and the impact budget (`throttle.impact_budget_ratio`), either or both.
struct CanaryJudges {
    detector: Option<DelayDetector>,
    impact: Option<ImpactController>,
    /// The queue, for the rows the running jobs have committed (the impact budget never
    /// paces far above what they achieve).
    control: PgPool,
}

/// How often the impact budget reads the rows committed by running jobs (one query on the
/// queue's table; no load on the target's tables).
const IMPACT_ROWS_INTERVAL: Duration = Duration::from_secs(1);

/// Times the canary every `interval` and publishes the count of delayed round trips and
/// the impact budget's directive in the health samples, between the probes' own updates:
/// a delay should reach the throttle within one canary interval, not one probe interval.
async fn run_canary(
    canary: LatencyCanary,
    mut judges: CanaryJudges,
    interval: Duration,
    health: watch::Sender<HealthSample>,
    shutdown: Shutdown,
) {
    let origin = Instant::now();
    let mut rows_read_at: Option<Instant> = None;
    let mut directive = None;
    while !shutdown.is_triggered() {
        let round_trip = canary.round_trip().await;
        let now = origin.elapsed();
        if let (Some(round_trip), Some(detector)) = (round_trip, judges.detector.as_mut()) {
            let verdict = detector.observe(now, round_trip);
            tracing::trace!(
                target: "backfilld::canary",
                round_trip_us = round_trip.as_micros() as u64,
                excess_us = verdict.excess.as_micros() as u64,
                delayed = verdict.delayed,
                "canary"
            );
            telemetry::record_canary(verdict);
            if verdict.delayed {
                let delays = detector.delayed_total();
                health.send_modify(|latest| latest.probe_delays = delays);
            }
        }
        if let Some(impact) = judges.impact.as_mut() {
            if let Some(round_trip) = round_trip {
                impact.observe(now, round_trip);
            }
            if rows_read_at.is_none_or(|at| at.elapsed() >= IMPACT_ROWS_INTERVAL) {
                rows_read_at = Some(Instant::now());
                match running_rows_done(&judges.control).await {
                    Ok(rows) => impact.record_rows(now, rows),
                    Err(e) => tracing::debug!(error = %e, "cannot read the running jobs' rows"),
                }
            }
            let active = health.borrow().production_active;
            let verdict = impact.evaluate(now, active);
            telemetry::record_impact(&verdict);
            if verdict.directive != directive {
                tracing::debug!(
                    target: "backfilld::impact",
                    directive = ?verdict.directive,
                    ratio = ?verdict.ratio,
                    baseline_us = impact.baseline().map(|b| b.as_micros() as u64),
                    "impact budget"
                );
                directive = verdict.directive;
                health.send_modify(|latest| latest.impact = directive);
            }
        }
        shutdown.sleep(interval).await;
    }
}

/// Rows the running jobs have committed in all.
async fn running_rows_done(control: &PgPool) -> Result<u64, sqlx::Error> {
    let rows: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(rows_done), 0)::int8 FROM backfill.jobs WHERE state = 'running'",
    )
    .fetch_one(control)
    .await?;
    Ok(u64::try_from(rows).unwrap_or(0))
}

/// Runs an operator verb (everything but `run` and `demo`).
pub async fn run(verb: Verb, settings: Settings) -> Result<(), CliFailure> {
    let db = Database::connect(&settings).await?;
    let pool = &db.control;
    if !matches!(verb, Verb::Migrate) {
        require_schema(pool).await?;
    }
    match verb {
        Verb::Migrate => {
            backfill_queue::migrate(pool).await?;
            println!("schema backfill is current");
        }
        Verb::Enqueue(args) => {
            let paused = args.paused;
            let job = new_job(args);
            // Paused in the same transaction: no worker can claim it in between.
            let mut tx = pool
                .begin()
                .await
                .context("enqueueing: beginning a transaction")
                .map_err(CliFailure::Fatal)?;
            let id = job.enqueue(&mut *tx).await?;
            if paused {
                SteeringVerb::Pause.apply(&mut *tx, &job.name).await?;
            }
            tx.commit()
                .await
                .with_context(|| format!("enqueueing job {}: committing", job.name))
                .map_err(CliFailure::Fatal)?;
            let state = if paused { "paused" } else { "pending" };
            println!("enqueued job {id} ({state})");
        }
        Verb::Status {
            name,
            json,
            watch: false,
            ..
        } => {
            let statuses = fetch_status(pool, name.as_deref()).await?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &statuses)
                    .map_err(|e| CliFailure::Fatal(e.into()))?;
                let _ = writeln!(out);
            } else {
                let _ = write!(out, "{}", render_status_table(&statuses));
            }
        }
        Verb::Status {
            name,
            json,
            watch: true,
            interval,
        } => watch_status(pool, name.as_deref(), json, interval).await?,
        Verb::Plan { name, exact, json } => {
            let report = plan(&settings, &db, &name, exact).await?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &report)
                    .map_err(|e| CliFailure::Fatal(e.into()))?;
                let _ = writeln!(out);
            } else {
                let _ = write!(out, "{}", report.render());
            }
            if let Some(error) = report.trial_error {
                return Err(CliFailure::Fatal(anyhow::anyhow!(
                    "the trial batch of job {name} failed: {error}"
                )));
            }
        }
        Verb::Pause { name } => steer(pool, SteeringVerb::Pause, &name).await?,
        Verb::Resume { name } => steer(pool, SteeringVerb::Resume, &name).await?,
        Verb::Cancel { name } => steer(pool, SteeringVerb::Cancel, &name).await?,
        Verb::Retry { name } => steer(pool, SteeringVerb::RetryFailed, &name).await?,
        Verb::Wait { name, timeout } => {
            crate::wait::wait(&backfill_queue::Queue::new(pool.clone()), &name, timeout).await?
        }
        Verb::Run { .. } | Verb::Demo(_) => unreachable!("handled in main"),
    }
    Ok(())
}

/// Refuses to work on a database whose `backfill` schema is missing or older than this
/// binary, saying what to do, instead of a raw "relation does not exist" (exit 2: running
/// the verb again will not help until someone migrates).
async fn require_schema(pool: &PgPool) -> Result<(), CliFailure> {
    let (installed, reads_history): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('backfill.jobs') IS NOT NULL, \
                coalesce(has_table_privilege(to_regclass('backfill._sqlx_migrations'), 'SELECT'), false)",
    )
    .fetch_one(pool)
    .await
    .context("looking for schema backfill")
    .map_err(CliFailure::Fatal)?;
    // An engineer with README's grants cannot read the migration history: the schema is
    // there, and its version is the daemon's business (workers migrate as they start).
    if installed && (!reads_history || backfill_queue::schema_is_current(pool).await?) {
        return Ok(());
    }
    Err(CliFailure::Usage(if installed {
        "schema backfill in this database is older than this backfilld: run `backfilld migrate` (or start a worker, which migrates)".to_string()
    } else {
        "schema backfill is not installed in this database: run `backfilld migrate` first (or start a worker, which migrates)".to_string()
    }))
}

/// The status of every job, or of the named one (which must exist).
async fn fetch_status(pool: &PgPool, name: Option<&str>) -> Result<Vec<JobStatus>, CliFailure> {
    let statuses = JobStatus::fetch(pool, name).await?;
    match name {
        Some(name) if statuses.is_empty() => {
            Err(CliFailure::Usage(format!("no backfill job named '{name}'")))
        }
        _ => Ok(statuses),
    }
}

/// `status --watch`: redraws the status every `interval` until every job shown has
/// finished (after drawing it once more) or Ctrl-C. On a terminal each frame replaces the
/// last; otherwise frames follow each other, each under its own header line.
async fn watch_status(
    pool: &PgPool,
    name: Option<&str>,
    json: bool,
    interval: Duration,
) -> Result<(), CliFailure> {
    let terminal = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut interrupted => return Ok(()),
        }
        let statuses = fetch_status(pool, name).await?;
        let mut out = std::io::stdout().lock();
        if json {
            serde_json::to_writer(&mut out, &statuses).map_err(|e| CliFailure::Fatal(e.into()))?;
            let _ = writeln!(out);
        } else {
            if terminal {
                let _ = write!(out, "\x1b[H\x1b[2J"); // cursor home, clear screen
            }
            let _ = writeln!(
                out,
                "backfilld status at {}, every {} until the jobs end (Ctrl-C to stop)",
                chrono::Local::now().format("%Y-%m-%d %H:%M:%S"),
                humantime::format_duration(interval)
            );
            let _ = write!(out, "{}", render_status_table(&statuses));
            if !terminal {
                let _ = writeln!(out);
            }
        }
        let _ = out.flush();
        let finished = |s: &JobStatus| s.state.parse().is_ok_and(JobState::is_finished);
        if statuses.iter().all(finished) {
            return Ok(());
        }
    }
}

async fn steer(pool: &PgPool, verb: SteeringVerb, name: &str) -> Result<(), CliFailure> {
    let state = verb.apply(pool, name).await?;
    println!("job {name}: {state}");
    Ok(())
}

fn new_job(args: EnqueueArgs) -> NewJob {
    NewJob {
        name: args.name,
        table_name: args.table,
        key_column: args.key,
        batch_sql: args.sql,
        pending_predicate: args.pending,
        check_predicate: args.check,
        batch_size: args.batch_size,
        min_batch_size: args.min_batch_size,
        max_batch_size: args.max_batch_size,
        target_batch_ms: args.target_batch_ms,
        max_rows_per_second: args.max_rows_per_second,
        max_attempts: args.max_attempts,
        priority: args.priority,
        not_before: args.not_before,
        parallelism: args.parallelism,
    }
}

/// Width of the status table when stdout is no terminal (a pipe, a file) and `COLUMNS`
/// is not set: what a terminal has by default.
const FALLBACK_WIDTH: u16 = 80;

/// The width to draw in: `COLUMNS` when set, else the terminal's, else 80.
fn output_width() -> u16 {
    let columns = std::env::var("COLUMNS").ok();
    columns
        .and_then(|c| c.trim().parse().ok())
        .filter(|w| *w > 0)
        .or_else(|| {
            std::io::stdout()
                .is_terminal()
                .then(|| comfy_table::Table::new().width())
                .flatten()
        })
        .unwrap_or(FALLBACK_WIDTH)
}

/// A borderless table in `width` columns (cells wrap when the content is wider),
/// with control characters in cells escaped so no value forges a line or drives the
/// terminal.
fn table(width: u16, header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_width(width)
        .set_header(header.iter().copied());
    for column in table.column_iter_mut() {
        column.set_padding((0, 1));
    }
    table
}

/// A cell showing `text` with its control characters escaped (`\n`, `\u{1b}`).
fn cell(text: &str) -> comfy_table::Cell {
    comfy_table::Cell::new(escape_controls(text))
}

/// A duration in at most two units (`2h05m`, `4m10s`, `42s`): narrow enough for a table.
fn short_duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    match seconds {
        s if s >= 86_400 => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3_600),
        s if s >= 3_600 => format!("{}h{:02}m", s / 3_600, s % 3_600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The status of `statuses` for a terminal of the current width (see [`output_width`]).
pub fn render_status_table(statuses: &[JobStatus]) -> String {
    render_status_table_in(statuses, output_width())
}

/// A readable table in `width` columns: one row per job with a progress bar, then the
/// last error of each job that has one.
fn render_status_table_in(statuses: &[JobStatus], width: u16) -> String {
    let mut jobs = table(
        width,
        &[
            "JOB", "STATE", "PROGRESS", "ROWS", "ROWS/S", "ETA", "BATCH", "THROTTLE", "FAILED",
        ],
    );
    // The state and the progress bar never wrap (the job name and throttle reason do):
    // "succeeded" and "##########  100.0%", each with its padding.
    for (index, least) in [(1, 10), (2, 18)] {
        if let Some(column) = jobs.column_mut(index) {
            column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(least)));
        }
    }
    for s in statuses {
        let percent = s.percent.unwrap_or(0.0);
        let filled = ((percent / 100.0) * 10.0).round().clamp(0.0, 10.0) as usize;
        let bar = format!(
            "{}{} {:>5.1}%",
            "#".repeat(filled),
            ".".repeat(10 - filled),
            percent
        );
        let throttle = match (&s.throttle_state, &s.throttle_reason) {
            (Some(state), Some(reason)) => format!("{state} ({reason})"),
            (Some(state), None) => state.clone(),
            _ => "-".to_string(),
        };
        jobs.add_row(vec![
            cell(&s.name),
            cell(&s.state),
            cell(&bar),
            cell(&s.rows_done.to_string()),
            cell(
                &s.rows_per_second
                    .map_or("-".to_string(), |r| format!("{r:.0}")),
            ),
            cell(&s.eta_seconds.map_or("-".to_string(), short_duration)),
            cell(&s.batch_size.map_or("-".to_string(), |b| b.to_string())),
            cell(&throttle),
            cell(&s.failed_rows.to_string()),
        ]);
    }
    let mut out = format!("{}\n", jobs.trim_fmt());
    let errors: Vec<&JobStatus> = statuses.iter().filter(|s| s.last_error.is_some()).collect();
    if !errors.is_empty() {
        let mut last_errors = table(width, &["JOB", "LAST ERROR"]);
        for s in errors {
            last_errors.add_row(vec![
                cell(&s.name),
                cell(s.last_error.as_deref().unwrap_or_default()),
            ]);
        }
        out.push_str(&format!("\n{}\n", last_errors.trim_fmt()));
    }
    out
}

/// What `backfilld plan` found out about a job; nothing in the database changed.
#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub job: String,
    pub table: String,
    pub key_column: String,
    pub state: String,
    pub phase: String,
    /// The checkpoint the job would continue after (`None`: from the first key).
    pub after_key: Option<String>,
    /// The planner's estimate of the rows still pending.
    pub estimated_pending_rows: Option<i64>,
    /// The exact count (`--exact` only).
    pub exact_pending_rows: Option<i64>,
    pub exact_count_seconds: Option<f64>,
    /// The job's first batch size (its `batch_size`, else `batch.size`).
    pub batch_size: u32,
    /// Batches of `batch_size` for the pending rows.
    pub batches: Option<u64>,
    /// The trial batch, run and rolled back.
    pub trial_keys: Option<usize>,
    pub trial_first_key: Option<String>,
    pub trial_last_key: Option<String>,
    pub trial_select_seconds: Option<f64>,
    pub trial_statement_seconds: Option<f64>,
    /// Rows the trial's statement wrote before the rollback.
    pub trial_rows_written: Option<u64>,
    /// Why the trial batch failed, if it did.
    pub trial_error: Option<String>,
    /// Its class (`row_level`, `transient`, `job_level`) and what a worker would do about it.
    pub trial_error_class: Option<&'static str>,
    pub trial_error_consequence: Option<&'static str>,
    /// The trial batch's speed, capped by the job's rows-per-second limit.
    pub expected_rows_per_second: Option<f64>,
    /// The job's rows-per-second limit (`max_rows_per_second`, else `throttle.max_rows_per_second`).
    pub max_rows_per_second: Option<f64>,
    /// Batch duration the throttle steers towards.
    pub target_batch_seconds: f64,
    /// Pending rows at the expected rate, on a healthy database (no lag holds).
    pub expected_seconds: Option<f64>,
    /// The least it takes while production is at work on the primary: the job then runs
    /// at most `throttle.busy_duty_cycle` of the time, in batches of about a millisecond that
    /// carry fewer rows per second than the trial's (`None` with sharing off).
    pub min_seconds_next_to_production: Option<f64>,
    /// How long planning took.
    pub planning_seconds: f64,
}

/// `backfilld plan NAME`: the job's pending rows (planner estimate, exact count with
/// `exact`), batches at its first batch size, one trial batch timed and rolled back, and
/// the duration to expect at that speed under the job's throttle settings.
pub async fn plan(
    settings: &Settings,
    db: &Database,
    name: &str,
    exact: bool,
) -> Result<PlanReport, CliFailure> {
    let started = Instant::now();
    let job: Job = backfill_queue::Queue::new(db.control.clone())
        .job_named(name)
        .await?
        .ok_or_else(|| CliFailure::Usage(format!("no backfill job named '{name}'")))?;
    let throttle = crate::worker::throttle_settings(settings, &job);
    let definition = crate::worker::job_definition(&job);
    let fatal = |e: &dyn std::fmt::Display| CliFailure::Fatal(anyhow::anyhow!("job {name}: {e}"));
    let mut client = db.data.get().await.map_err(|e| fatal(&e))?;
    let target = BatchTarget::resolve(&mut client, &definition)
        .await
        .map_err(|e| fatal(&e))?;
    // Retry and verification passes re-walk the table from the start.
    let after = match job.phase {
        Phase::Scan => job.checkpoint.clone(),
        Phase::Retry | Phase::Verify => None,
    };
    let estimated_pending_rows = target
        .estimate_pending(&mut client, after.as_deref())
        .await
        .map_err(|e| fatal(&e))?;
    let (exact_pending_rows, exact_count_seconds) = if exact {
        let counting = Instant::now();
        let count = target
            .count_pending(&mut client, after.as_deref(), false)
            .await
            .map_err(|e| fatal(&e))?;
        (Some(count), Some(counting.elapsed().as_secs_f64()))
    } else {
        (None, None)
    };
    let batch_size = throttle.start_batch_size;
    let trial = target
        .trial_batch(&mut client, after.as_deref(), batch_size)
        .await;
    let pending = exact_pending_rows.or(estimated_pending_rows);
    let max_rows_per_second = throttle.max_rows_per_second;
    let expected_rows_per_second = trial.as_ref().ok().and_then(|trial| {
        let seconds = trial.duration().as_secs_f64();
        let speed = (trial.keys > 0 && seconds > 0.0).then(|| trial.keys as f64 / seconds)?;
        Some(max_rows_per_second.map_or(speed, |limit| speed.min(limit)))
    });
    let expected_seconds = match (pending, expected_rows_per_second) {
        (Some(0), _) => Some(0.0),
        (Some(pending), Some(rate)) => Some(pending as f64 / rate),
        _ => None,
    };
    let trial_ok = trial.as_ref().ok();
    Ok(PlanReport {
        job: job.name,
        table: target.table.clone(),
        key_column: target.key_column.clone(),
        state: job.state.to_string(),
        phase: job.phase.as_str().to_string(),
        after_key: after,
        estimated_pending_rows,
        exact_pending_rows,
        exact_count_seconds,
        batch_size,
        batches: pending.map(|rows| {
            u64::try_from(rows)
                .unwrap_or(0)
                .div_ceil(u64::from(batch_size))
        }),
        trial_keys: trial_ok.map(|t| t.keys),
        trial_first_key: trial_ok.and_then(|t| t.key_range.as_ref().map(|r| r.0.clone())),
        trial_last_key: trial_ok.and_then(|t| t.key_range.as_ref().map(|r| r.1.clone())),
        trial_select_seconds: trial_ok.map(|t| t.select.as_secs_f64()),
        trial_statement_seconds: trial_ok.map(|t| t.statement.as_secs_f64()),
        trial_rows_written: trial_ok.map(|t| t.rows_written),
        trial_error: trial.as_ref().err().map(ToString::to_string),
        trial_error_class: trial.as_ref().err().map(|e| e.class().as_str()),
        trial_error_consequence: trial.as_ref().err().map(|e| match e.class() {
            ErrorClass::RowLevel => {
                "some rows fail: a worker applies the others and sets those aside in backfill.failed_rows"
            }
            ErrorClass::Transient(_) => "transient: a worker backs off and retries smaller",
            ErrorClass::JobLevel => "the job would end failed with this error",
        }),
        expected_rows_per_second,
        max_rows_per_second,
        target_batch_seconds: throttle.target_batch.as_secs_f64(),
        expected_seconds,
        min_seconds_next_to_production: expected_seconds
            .filter(|_| throttle.busy_duty_cycle < 1.0)
            .map(|seconds| seconds / throttle.busy_duty_cycle),
        planning_seconds: started.elapsed().as_secs_f64(),
    })
}

impl PlanReport {
    /// The report for a terminal.
    pub fn render(&self) -> String {
        let rows = |n: Option<i64>| n.map_or("unknown".to_string(), |n| n.to_string());
        let seconds = |s: f64| {
            if s < 10.0 {
                format!("{s:.2} s")
            } else {
                humantime::format_duration(Duration::from_secs(s.round() as u64)).to_string()
            }
        };
        let millis = |s: Option<f64>| format!("{:.0} ms", s.unwrap_or(0.0) * 1000.0);
        let mut out = format!(
            "plan for job {} on {} by key {} (state {}, phase {}, {})\n",
            self.job,
            self.table,
            self.key_column,
            self.state,
            self.phase,
            self.after_key
                .as_ref()
                .map_or("from the first key".to_string(), |key| format!(
                    "after key {key}"
                ))
        );
        out.push_str(&format!(
            "  pending rows   ~{} (planner estimate)",
            rows(self.estimated_pending_rows)
        ));
        match (self.exact_pending_rows, self.exact_count_seconds) {
            (Some(exact), Some(took)) => {
                out.push_str(&format!(", {exact} counted in {}", seconds(took)))
            }
            _ => out.push_str("; --exact counts them"),
        }
        out.push('\n');
        out.push_str(&format!(
            "  batches        {} of {} keys (the job's first batch size; the throttle adapts it)\n",
            self.batches
                .map_or("unknown".to_string(), |n| n.to_string()),
            self.batch_size
        ));
        match (&self.trial_error, self.trial_keys) {
            (Some(error), _) => {
                out.push_str(&format!(
                    "  trial batch    FAILED (rolled back): {error}\n"
                ));
                if let Some(consequence) = self.trial_error_consequence {
                    out.push_str(&format!("                 ({consequence})\n"));
                }
            }
            (None, Some(0)) => out.push_str("  trial batch    nothing pending: no keys to try\n"),
            (None, Some(keys)) => out.push_str(&format!(
                "  trial batch    {keys} keys ({}..={}) in {}: keys {}, statement {}; rolled back\n",
                self.trial_first_key.as_deref().unwrap_or("?"),
                self.trial_last_key.as_deref().unwrap_or("?"),
                millis(Some(
                    self.trial_select_seconds.unwrap_or(0.0)
                        + self.trial_statement_seconds.unwrap_or(0.0)
                )),
                millis(self.trial_select_seconds),
                millis(self.trial_statement_seconds),
            )),
            (None, None) => {}
        }
        let limit = self
            .max_rows_per_second
            .map_or("no rate limit".to_string(), |limit| {
                format!("max_rows_per_second {limit}")
            });
        match (self.expected_seconds, self.expected_rows_per_second) {
            (Some(expected), Some(rate)) => out.push_str(&format!(
                "  expected       ~{} at ~{rate:.0} rows/s ({limit}, batches steered towards {}, a healthy database; lag holds add to it)\n",
                seconds(expected),
                seconds(self.target_batch_seconds),
            )),
            (Some(_), None) => out.push_str("  expected       nothing to do\n"),
            _ => out.push_str("  expected       unknown (no trial batch timing)\n"),
        }
        if let Some(at_least) = self.min_seconds_next_to_production.filter(|s| *s > 0.0) {
            out.push_str(&format!(
                "  next to production  at least ~{} (while other sessions are at work the job shares the primary: ~1 ms batches, throttle.busy_duty_cycle of the time)\n",
                seconds(at_least),
            ));
        }
        out.push_str(&format!(
            "planned in {}; nothing was changed\n",
            seconds(self.planning_seconds)
        ));
        out
    }
}
