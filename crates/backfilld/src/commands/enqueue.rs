//! `enqueue`: the CLI's way to INSERT a job.

use anyhow::Context as _;
use backfill_queue::{NewJob, SteeringVerb};
use sqlx::PgPool;

use super::CliFailure;
use crate::cli::EnqueueArgs;

/// `enqueue`: inserts the job (paused in the same transaction when asked) and says its id.
pub async fn enqueue(pool: &PgPool, args: EnqueueArgs) -> Result<(), CliFailure> {
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
