//! The operator verbs: `migrate`, `enqueue`, `status`, `plan`, `pause|resume|cancel|retry`,
//! `revert` and `wait`, one file each (`migrate` is one call).

mod enqueue;
mod plan;
mod revert;
mod status;
mod steer;
mod wait;

use anyhow::Context as _;
use backfill_core::queue_sql;
use backfill_queue::{QueueError, SteeringVerb};
use sqlx::PgPool;

use crate::cli::Verb;
use crate::database::{Database, DatabaseUnreachable, ProbesBlind};
use crate::settings::Settings;

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

/// Runs an operator verb (everything but `run` and `demo`).
pub async fn run(verb: Verb, settings: Settings) -> Result<(), CliFailure> {
    let db = Database::connect(&settings.database, &settings.data_plane_session()).await?;
    let pool = &db.control;
    if !matches!(verb, Verb::Migrate) {
        require_schema(pool).await?;
    }
    match verb {
        Verb::Migrate => {
            backfill_queue::migrate(pool).await?;
            println!("schema backfill is current");
        }
        Verb::Enqueue(args) => enqueue::enqueue(pool, args).await?,
        Verb::Status {
            name,
            json,
            watch: false,
            ..
        } => status::print(pool, name.as_deref(), json).await?,
        Verb::Status {
            name,
            json,
            watch: true,
            interval,
        } => status::watch(pool, name.as_deref(), json, interval).await?,
        Verb::Plan { name, exact, json } => {
            plan::print(&settings.worker_sections(), &db, &name, exact, json).await?
        }
        Verb::Pause { name } => steer::steer(pool, SteeringVerb::Pause, &name).await?,
        Verb::Resume { name } => steer::steer(pool, SteeringVerb::Resume, &name).await?,
        Verb::Cancel { name } => steer::steer(pool, SteeringVerb::Cancel, &name).await?,
        Verb::Retry { name } => steer::steer(pool, SteeringVerb::RetryFailed, &name).await?,
        Verb::Revert {
            name,
            from,
            to,
            force,
        } => revert::revert(pool, &name, from, to, force).await?,
        Verb::Wait { name, timeout } => {
            wait::wait(&backfill_queue::Queue::new(pool.clone()), &name, timeout).await?
        }
        Verb::Run { .. } | Verb::Demo(_) => unreachable!("handled in main"),
    }
    Ok(())
}

/// Refuses to work on a database whose `backfill` schema is missing or older than this
/// binary, saying what to do, instead of a raw "relation does not exist" (exit 2: running
/// the verb again will not help until someone migrates).
async fn require_schema(pool: &PgPool) -> Result<(), CliFailure> {
    let (installed, reads_history): (bool, bool) = sqlx::query_as(queue_sql::SCHEMA_INSTALLED)
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
