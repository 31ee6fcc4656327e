//! Scale-out: cutting a job with `parallelism > 1` into key-range slices, and
//! an idle worker splitting the busiest running slice (work stealing), so the
//! job ends when its last rows are done, not when its slowest slice is.

use backfill_core::lease::Lease;
use backfill_core::slicing::{cut_fractions, distinct_cuts, even_estimates, steal_threshold};
use backfill_dataplane::{BatchTarget, DataPlaneError, JobDefinition, JobSession};
use backfill_queue::Job;
use tracing::{debug, info};

use super::Worker;

/// What the data plane needs to know of a job (or slice) to run its batches.
pub fn job_definition(job: &Job) -> JobDefinition {
    JobDefinition {
        job_id: job.id,
        spec: job.spec.clone(),
        owner_id: job.owner_id(),
        upper_key: job.upper_key.clone(),
        session: JobSession {
            run_as: Some(job.enqueued_by.clone()),
            search_path: job.search_path.clone(),
        },
        keep_undo: job.keep_undo,
        undo_columns: job.undo_columns.clone(),
    }
}

/// Resolves a job against the catalog on a pooled data-plane connection.
pub async fn resolve(worker: &Worker, job: &Job) -> Result<BatchTarget, DataPlaneError> {
    worker.runner.resolve(&job_definition(job)).await
}

/// Cuts the leased `job` into `job.parallelism` slices of about equal pending
/// rows (cut keys from a row sample) and gives it back to the queue. Returns
/// the number of slices, or `None` when the lease was lost meanwhile.
pub async fn cut(
    worker: &Worker,
    target: &BatchTarget,
    job: &Job,
    lease: &Lease,
) -> Result<Option<usize>, String> {
    let parallelism = u32::try_from(job.parallelism).unwrap_or(1);
    let runner = &worker.runner;
    let cuts = distinct_cuts(
        runner
            .sample_cuts(target, &cut_fractions(parallelism))
            .await
            .map_err(|e| e.to_string())?,
    );
    let pending = runner
        .count_pending(target, None, false)
        .await
        .map_err(|e| e.to_string())?;
    // The last slice ends where the job's keys end now: rows arriving above belong
    // to the verification sweeps, as for a job walked whole.
    let last_key = runner.last_key(target).await.map_err(|e| e.to_string())?;
    let estimates = even_estimates(pending, cuts.len() + 1);
    let slices = worker.queue.slices();
    let cut = slices
        .cut(lease, &cuts, last_key.as_deref(), &estimates)
        .await
        .map_err(|e| e.to_string())?;
    if cut {
        info!(slices = estimates.len(), rows_pending = pending, cuts = ?cuts, "cut the job into slices");
    }
    Ok(cut.then_some(estimates.len()))
}

/// Splits the running slice with the most rows left, if one is worth it, so
/// this idle worker can claim its second half. True when a new slice exists.
pub async fn steal(worker: &Worker) -> bool {
    let slices = worker.queue.slices();
    let min_remaining = steal_threshold(worker.settings.batch.max_size);
    let candidate = match slices.steal_candidate(min_remaining).await {
        Ok(Some(candidate)) => candidate,
        Ok(None) => return false,
        Err(e) => {
            debug!(error = %e, "cannot look for a slice to split");
            return false;
        }
    };
    let Ok(Some(slice)) = worker.queue.job(candidate.slice_id).await else {
        return false;
    };
    let target = match resolve(worker, &slice).await {
        Ok(target) => target,
        Err(e) => {
            debug!(error = %e, slice = %slice.spec.name, "cannot resolve a slice to split");
            return false;
        }
    };
    let half = candidate.remaining / 2;
    let mid = worker
        .runner
        .key_at_offset(
            &target,
            candidate.after.as_deref(),
            candidate.upper_key.as_deref(),
            half,
        )
        .await;
    let Ok(Some(mid)) = mid else {
        return false;
    };
    match slices.split(&candidate, &target.key_type, &mid, half).await {
        Ok(true) => {
            info!(slice = %slice.spec.name, at = %mid, rows_moved = half, "split a busy slice for an idle worker");
            true
        }
        Ok(false) => false,
        Err(e) => {
            debug!(error = %e, slice = %slice.spec.name, "splitting a slice failed");
            false
        }
    }
}
