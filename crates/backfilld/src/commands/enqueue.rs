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
        SteeringVerb::Pause.apply(&mut *tx, &job.spec.name).await?;
    }
    tx.commit()
        .await
        .with_context(|| format!("enqueueing job {}: committing", job.spec.name))
        .map_err(CliFailure::Fatal)?;
    let state = if paused { "paused" } else { "pending" };
    println!("enqueued job {id} ({state})");
    Ok(())
}

fn new_job(args: EnqueueArgs) -> NewJob {
    NewJob {
        spec: args.spec,
        tunables: args.tunables,
        priority: args.priority,
        not_before: args.not_before,
        parallelism: args.parallelism,
    }
}
