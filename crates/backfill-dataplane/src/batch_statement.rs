//! Running the job's statement on a batch's keys, then its check_predicate, and judging a
//! first batch in which every key failed (see the batch module's docs).

use backfill_core::bisect::Bisection;
use backfill_core::error_class::ErrorClass;
use deadpool_postgres::Transaction;

use crate::batch::{BatchFailure, FailureReason, KeySource, RowFailure};
use crate::target::{BatchKeys, BatchTarget};
use crate::BatchError;

/// What one run of the job's statement on some keys came to.
#[derive(Debug)]
pub(crate) enum Applied {
    /// It ran, and check_predicate (if any) holds for none of the rows: the changes may stay.
    Agrees,
    /// It ran, but check_predicate holds for some rows: its changes must be rolled back.
    Disagrees,
    /// It failed because of a row (the transaction, or savepoint, is aborted): bisect.
    RowError(BatchError),
}

/// Runs the job's statement on `keys` (described by `context`), then its check_predicate
/// on the same keys. Errors that no row explains end the batch.
pub(crate) async fn apply(
    tx: &Transaction<'_>,
    target: &BatchTarget,
    keys: BatchKeys<'_>,
    context: &str,
) -> Result<Applied, BatchFailure> {
    if let (Some(undo), BatchKeys::Each(each)) = (&target.undo, keys) {
        // Before the statement, in its savepoint: rolled back with it.
        undo.read_old(tx, each, context).await?;
    }
    if let Err(e) = run_statement(tx, target, &keys).await {
        let error = BatchError::from_driver(format!("{context}: batch statement"), &e);
        return match error.class() {
            ErrorClass::RowLevel => Ok(Applied::RowError(error)),
            _ => Err(error.into()),
        };
    }
    let (check, keys) = match (&target.sql.check_disagrees, keys) {
        (None, _) => return Ok(Applied::Agrees),
        (Some(check), BatchKeys::Each(keys)) => (check, keys),
        (Some(_), BatchKeys::Span { .. }) => {
            unreachable!("key spans are never selected for a job with check_predicate")
        }
    };
    // The statement may have changed how keys parse: pin the session before the check.
    target.session.repin(tx, context).await?;
    let checked = async {
        let check = tx.prepare_cached(check).await?;
        tx.query_one(&check, &[&keys]).await
    }
    .await;
    match checked {
        Ok(row) if row.get::<_, bool>(0) => Ok(Applied::Disagrees),
        Ok(_) => Ok(Applied::Agrees),
        Err(e) => {
            let error = BatchError::from_driver(format!("{context}: check_predicate"), &e);
            match error.class() {
                ErrorClass::RowLevel => Ok(Applied::RowError(error)),
                _ => Err(error.into()),
            }
        }
    }
}

/// What a key whose row disagrees with check_predicate is recorded with.
pub(crate) fn check_predicate_error(context: String) -> BatchError {
    BatchError {
        context,
        sqlstate: None,
        message:
            "check_predicate holds after batch_sql: the new values disagree with the old ones, \
                  so the row was left unchanged"
                .to_string(),
        connection_closed: false,
        canceled_by_us: false,
    }
}

/// The job-level error for a first batch in which every key failed alone the same
/// way (see the module docs), or `None` when the failures are the rows' own.
pub(crate) fn wrong_statement_error(
    target: &BatchTarget,
    source: KeySource<'_>,
    bisection: &Bisection<(FailureReason, BatchError)>,
    keys: &[String],
    failures: &[RowFailure],
) -> Option<BatchError> {
    let first = failures.first()?;
    let same_failure =
        |f: &RowFailure| f.reason == first.reason && f.error.sqlstate == first.error.sqlstate;
    // A revert's conflicts are rows someone else changed, however many (issue 17).
    let judged = matches!(source, KeySource::After(None))
        && first.error.sqlstate.as_deref() != Some(crate::undo::CONFLICT_SQLSTATE)
        && bisection.walked_key_by_key()
        && failures.len() == keys.len()
        && failures.iter().all(same_failure);
    if !judged {
        return None;
    }
    let name = &target.job_name;
    let what = match first.reason {
        FailureReason::Error => "failed alone with the same error",
        FailureReason::Verification => "disagreed with check_predicate",
    };
    Some(BatchError {
        context: format!(
            "job {name:?}: every one of the {} keys of its first batch ({}..={}) {what}, so batch_sql \
             (or check_predicate) most likely cannot work for any row; nothing was applied or recorded. \
             Fix the job (UPDATE backfill.jobs SET batch_sql = …) or the rows, then select \
             backfill.retry_failed('{}'). Key {}",
            keys.len(),
            first.key,
            keys[keys.len() - 1],
            name.replace('\'', "''"),
            first.key,
        ),
        ..first.error.clone()
    })
}

/// Runs the job's statement on `keys`, binding each placeholder.
async fn run_statement(
    tx: &Transaction<'_>,
    target: &BatchTarget,
    keys: &BatchKeys<'_>,
) -> Result<(), tokio_postgres::Error> {
    let statement = tx.prepare_cached(&target.batch.sql).await?;
    tx.execute(&statement, &target.statement_params(keys))
        .await
        .map(|_| ())
}
