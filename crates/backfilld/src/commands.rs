//! The operator verbs (migrate, enqueue, status, pause/resume/cancel/retry) and
//! the database connections every verb shares.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use backfill_core::throttle::HealthSample;
use backfill_dataplane::{connect_pool, BatchRunner, HealthProbe, RetryBackoff, SessionSettings};
use backfill_queue::{JobStatus, NewJob, QueueError, SteeringVerb};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::cli::{EnqueueArgs, Verb};
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
}

impl CliFailure {
    /// Classifies a daemon error: an unreachable database at start-up is a
    /// configuration problem (exit 2), anything else is fatal (exit 1).
    pub fn from_daemon(e: anyhow::Error) -> Self {
        if e.downcast_ref::<DatabaseUnreachable>().is_some() {
            CliFailure::Usage(e.to_string())
        } else {
            CliFailure::Fatal(e)
        }
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

/// The database could not be reached at start-up: a configuration problem (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the database at {url}: {reason}")]
pub struct DatabaseUnreachable {
    url: String,
    reason: String,
}

/// Connections to the target database: sqlx for the queue, deadpool for batches.
pub struct Database {
    pub control: PgPool,
    pub data: deadpool_postgres::Pool,
    pub redacted_url: String,
}

impl Database {
    /// Connects both planes, failing fast with a clear error when unreachable.
    pub async fn connect(settings: &Settings) -> Result<Database, DatabaseUnreachable> {
        let url = &settings.database.url;
        let redacted_url = redacted(url);
        let unreachable = |reason: String| DatabaseUnreachable {
            url: redacted_url.clone(),
            reason,
        };
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| unreachable(e.to_string()))?;
        let control = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(settings.database.connect_timeout)
            .connect_with(options.application_name("backfilld-control"))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let data = connect_pool(url, &session_settings(settings))
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Database {
            control,
            data,
            redacted_url,
        })
    }

    /// The batch runner on the data-plane pool.
    pub fn batch_runner(&self, settings: &Settings) -> BatchRunner {
        let backoff = RetryBackoff {
            base: settings.batch.retry_backoff,
            max: settings.batch.retry_backoff_max,
        };
        BatchRunner::new(self.data.clone(), backoff)
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

/// Samples health every `throttle.probe_interval` on a task of its own and
/// publishes the latest sample; also refreshes the job-state gauges.
pub fn spawn_health_probes(
    settings: &Settings,
    db: &Database,
    shutdown: Shutdown,
) -> anyhow::Result<watch::Receiver<HealthSample>> {
    let mut replicas = Vec::new();
    for (i, url) in settings.throttle.replica_urls.iter().enumerate() {
        let pool = connect_pool(
            url,
            &SessionSettings {
                pool_size: 1,
                ..session_settings(settings)
            },
        )
        .with_context(|| format!("throttle.replica_urls[{i}] ({})", redacted(url)))?;
        replicas.push((format!("replica{i}"), pool));
    }
    let probe = HealthProbe::new(
        db.data.clone(),
        replicas,
        settings.throttle.expected_standbys.clone(),
        data_plane_application_name(settings),
        settings.throttle.probe_timeout,
    );
    let interval = settings.throttle.probe_interval;
    let control = db.control.clone();
    let (tx, rx) = watch::channel(HealthSample::default());
    tokio::spawn(async move {
        let mut ticks: u64 = 0;
        while !shutdown.is_triggered() {
            let sample = probe.sample().await;
            telemetry::record_replication_lag(&sample);
            tx.send_replace(sample);
            if ticks.is_multiple_of(8) {
                if let Ok(counts) = JobStatus::count_by_state(&control).await {
                    telemetry::record_job_states(&counts);
                }
            }
            ticks += 1;
            shutdown.sleep(interval).await;
        }
    });
    Ok(rx)
}

/// Runs an operator verb (everything but `run` and `demo`).
pub async fn run(verb: Verb, settings: Settings) -> Result<(), CliFailure> {
    let db = Database::connect(&settings)
        .await
        .map_err(|e| CliFailure::Usage(e.to_string()))?;
    let pool = &db.control;
    match verb {
        Verb::Migrate => {
            backfill_queue::migrate(pool).await?;
            println!("schema backfill is current");
        }
        Verb::Enqueue(args) => {
            let id = new_job(args).enqueue(pool).await?;
            println!("enqueued job {id}");
        }
        Verb::Status { name, json } => {
            let statuses = JobStatus::fetch(pool, name.as_deref()).await?;
            if let Some(name) = name.filter(|_| statuses.is_empty()) {
                return Err(CliFailure::Usage(format!("no backfill job named '{name}'")));
            }
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &statuses)
                    .map_err(|e| CliFailure::Fatal(e.into()))?;
                let _ = writeln!(out);
            } else {
                let _ = write!(out, "{}", render_status_table(&statuses));
            }
        }
        Verb::Pause { name } => steer(pool, SteeringVerb::Pause, &name).await?,
        Verb::Resume { name } => steer(pool, SteeringVerb::Resume, &name).await?,
        Verb::Cancel { name } => steer(pool, SteeringVerb::Cancel, &name).await?,
        Verb::Retry { name } => steer(pool, SteeringVerb::RetryFailed, &name).await?,
        Verb::Run { .. } | Verb::Demo(_) => unreachable!("handled in main"),
    }
    Ok(())
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
        not_before: None,
    }
}

/// A readable table: one line per job with a progress bar.
pub fn render_status_table(statuses: &[JobStatus]) -> String {
    let mut out = format!(
        "{:<24} {:<10} {:<24} {:>12} {:>10} {:>9} {:>8} {:<22} {:>7}\n",
        "JOB", "STATE", "PROGRESS", "ROWS", "ROWS/S", "ETA", "BATCH", "THROTTLE", "FAILED"
    );
    for s in statuses {
        let percent = s.percent.unwrap_or(0.0);
        let filled = ((percent / 100.0) * 16.0).round().clamp(0.0, 16.0) as usize;
        let bar = format!(
            "[{}{}] {:>5.1}%",
            "#".repeat(filled),
            ".".repeat(16 - filled),
            percent
        );
        let eta = s.eta_seconds.map_or("-".to_string(), |e| {
            humantime::format_duration(Duration::from_secs(e as u64)).to_string()
        });
        let throttle = match (&s.throttle_state, &s.throttle_reason) {
            (Some(state), Some(reason)) => format!("{state} ({reason})"),
            (Some(state), None) => state.clone(),
            _ => "-".to_string(),
        };
        out.push_str(&format!(
            "{:<24} {:<10} {:<24} {:>12} {:>10} {:>9} {:>8} {:<22} {:>7}\n",
            s.name,
            s.state,
            bar,
            s.rows_done,
            s.rows_per_second
                .map_or("-".to_string(), |r| format!("{r:.0}")),
            eta,
            s.batch_size.map_or("-".to_string(), |b| b.to_string()),
            throttle,
            s.failed_rows
        ));
        if let Some(error) = &s.last_error {
            out.push_str(&format!("    last error: {error}\n"));
        }
    }
    out
}
