//! `revert`: enqueues a job that puts back the values a `keep_undo` job changed
//! (`backfill.revert`), as the enqueuing engineer.

use sqlx::PgPool;

use super::CliFailure;

/// Enqueues the revert of job `name` over keys `from`..=`to` (all when `None`); `force`
/// overwrites rows changed since the job wrote them.
pub async fn revert(
    pool: &PgPool,
    name: &str,
    from: Option<String>,
    to: Option<String>,
    force: bool,
) -> Result<(), CliFailure> {
    let request = backfill_queue::RevertRequest {
        from_key: from,
        to_key: to,
        force,
    };
    let revert = backfill_queue::revert(pool, name, &request).await?;
    println!("job {name}: enqueued revert job {revert} (pending)");
    Ok(())
}
