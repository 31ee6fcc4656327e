//! Selecting a batch's keys: each key, or only the first, last and count where the job's
//! statement needs no more (`TargetSql::key_spans`), or failed keys due for a retry.

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

use crate::batch::{BatchRequest, KeySource};
use crate::target::{BatchKeys, BatchTarget};
use crate::target_reads::moved_keys_error;
use crate::BatchError;

/// The keys a batch selected (at least one).
pub(crate) enum SelectedKeys {
    /// Each key, in key order.
    Each(Vec<String>),
    /// The first and last key and how many lie between them, for a statement that
    /// needs no more (`TargetSql::key_spans`).
    Span {
        first: String,
        last: String,
        count: usize,
    },
}

impl SelectedKeys {
    /// The keys to run the statement on.
    pub(crate) fn batch_keys(&self) -> BatchKeys<'_> {
        match self {
            SelectedKeys::Each(keys) => BatchKeys::Each(keys),
            SelectedKeys::Span { first, last, .. } => BatchKeys::Span { first, last },
        }
    }

    pub(crate) fn count(&self) -> usize {
        match self {
            SelectedKeys::Each(keys) => keys.len(),
            SelectedKeys::Span { count, .. } => *count,
        }
    }

    /// Each key where they were listed (always so for retried keys, the only batches
    /// whose commit needs them); empty for a span.
    pub(crate) fn listed(&self) -> &[String] {
        match self {
            SelectedKeys::Each(keys) => keys,
            SelectedKeys::Span { .. } => &[],
        }
    }
}

/// Selects the next batch's keys from `source`: only their first, last and count where
/// the job allows (`key_spans`, not for retried keys), else — or with `each_key` — each.
/// `None` when no key is left. Second: retried keys whose rows are gone (never run).
pub(crate) async fn select_keys(
    tx: &Transaction<'_>,
    target: &BatchTarget,
    request: BatchRequest<'_>,
    each_key: bool,
) -> Result<(Option<SelectedKeys>, Vec<String>), BatchError> {
    let BatchRequest {
        source,
        limit,
        pass_writes: writes,
    } = request;
    let limit = i64::from(limit);
    let sql = &target.sql;
    let spans = sql
        .key_spans
        .as_ref()
        .filter(|_| !each_key && !matches!(source, KeySource::FailedRows { .. }));
    let queries = spans.unwrap_or(&sql.keys);
    let (query, params): (&str, Vec<&(dyn ToSql + Sync)>) = match (&source, &target.upper_key) {
        (KeySource::After(None), None) => (&queries.first, vec![&limit]),
        (KeySource::After(Some(after)), None) => (&queries.next, vec![after, &limit]),
        (KeySource::After(None), Some(upper)) => (&queries.first_below, vec![upper, &limit]),
        (KeySource::After(Some(after)), Some(upper)) => {
            (&queries.next_below, vec![after, upper, &limit])
        }
        // A verification sweep is bounded like any pass (NULL: the table was empty).
        (KeySource::AfterExcludingFailed(None), upper) => {
            (&queries.first_excluding_failed, vec![upper, &limit])
        }
        (KeySource::AfterExcludingFailed(Some(after)), upper) => {
            (&queries.next_excluding_failed, vec![after, upper, &limit])
        }
        // Retried keys are always listed: their commit forgets each one that applied.
        (KeySource::FailedRows { max_attempts }, _) => {
            (&sql.retry_keys, vec![max_attempts, &limit])
        }
    };
    // Prepared once per connection, like the batch statement: a plain query would be
    // parsed and planned again for every batch, one more round trip each time.
    let rows = async {
        let statement = tx.prepare_cached(query).await?;
        tx.query(&statement, &params).await
    }
    .await
    .map_err(|e| {
        BatchError::from_driver(
            format!("job {:?}: selecting the next keys", target.job_name),
            &e,
        )
    })?;
    if let KeySource::FailedRows { .. } = source {
        let (present, vanished): (Vec<_>, Vec<_>) =
            rows.into_iter().partition(|row| row.get::<_, bool>(1));
        let keys: Vec<String> = present.into_iter().map(|row| row.get(0)).collect();
        let vanished = vanished.into_iter().map(|row| row.get(0)).collect();
        return Ok((
            (!keys.is_empty()).then_some(SelectedKeys::Each(keys)),
            vanished,
        ));
    }
    if spans.is_none() {
        if let Some(moved) = rows.iter().find(|row| writes.wrote(row.get(1))) {
            let key: String = moved.get(0);
            return Err(moved_keys_error(
                &target.job_name,
                &key,
                "ahead of the checkpoint",
            ));
        }
        let keys: Vec<String> = rows.into_iter().map(|row| row.get(0)).collect();
        return Ok((
            (!keys.is_empty()).then_some(SelectedKeys::Each(keys)),
            Vec::new(),
        ));
    }
    // min/max are NULL over no rows.
    let span = rows.first().and_then(|row| {
        let first: Option<String> = row.get(0);
        let last: Option<String> = row.get(1);
        let count: i64 = row.get(2);
        Some(SelectedKeys::Span {
            first: first?,
            last: last?,
            count: usize::try_from(count).ok()?,
        })
    });
    Ok((span, Vec::new()))
}
