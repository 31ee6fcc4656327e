//! A job's definition resolved against the live catalog: quoted names, the key's
//! real type, the batch statement with bound placeholders, and the key queries.

use backfill_core::job_spec::JobSpec;
use backfill_core::placeholders::{bind_placeholders, BoundSql, Placeholder};
use deadpool_postgres::{Client, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use crate::session::JobSession;
use crate::target_sql::TargetSql;
use crate::undo::UndoSql;
use crate::{BatchError, DataPlaneError};

/// The parts of a job row the data plane needs.
#[derive(Debug, Clone)]
pub struct JobDefinition {
    pub job_id: i64,
    /// What the job runs, on which table; its `check_predicate` is checked after each
    /// batch statement (see the batch module).
    pub spec: JobSpec,
    /// The job whose failed rows these are: the parent of a slice, else the job.
    pub owner_id: i64,
    /// A slice's inclusive upper key bound, or the last key of a whole job's pass;
    /// `None`: not bounded (yet).
    pub upper_key: Option<String>,
    /// Who the job's SQL runs as, and with which search_path.
    pub session: JobSession,
    /// Keep the old values of the rows the batches change (`backfill.undo`).
    pub keep_undo: bool,
    /// The columns whose old values are kept; `None`: the whole row.
    pub undo_columns: Option<Vec<String>>,
}

/// A job checked against the catalog and ready to run batches.
#[derive(Debug, Clone)]
pub struct BatchTarget {
    pub job_id: i64,
    pub job_name: String,
    /// Schema-qualified, quoted table name.
    pub table: String,
    /// Quoted key column name.
    pub key_column: String,
    /// The key column's type as SQL (`bigint`, `uuid`, `timestamp with time zone`…).
    pub key_type: String,
    /// The batch statement with `$n` parameters in place of the placeholders.
    pub batch: BoundSql,
    /// The job whose failed rows these are (the parent of a slice).
    pub owner_id: i64,
    /// A slice's inclusive upper key bound (it shrinks when another worker splits the
    /// slice), or the last key of a whole job's pass, fixed when the pass starts; every
    /// commit is fenced on the value it used. `None`: unbounded.
    pub upper_key: Option<String>,
    /// Who the job's SQL runs as, and with which search_path.
    pub session: JobSession,
    pub(crate) sql: TargetSql,
    /// The undo capture of a job with `keep_undo`.
    pub(crate) undo: Option<UndoSql>,
}

/// The keys a batch statement runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BatchKeys<'a> {
    /// Each key, in key order (non-empty).
    Each(&'a [String]),
    /// Only the first and last key, for a statement that needs no more.
    Span { first: &'a String, last: &'a String },
}

impl<'a> BatchKeys<'a> {
    /// The first and the last key.
    pub(crate) fn first_and_last(&self) -> (&'a String, &'a String) {
        match *self {
            BatchKeys::Each(each) => (&each[0], &each[each.len() - 1]),
            BatchKeys::Span { first, last } => (first, last),
        }
    }
}

impl BatchTarget {
    /// Resolves `job` against the catalog and has the server parse every
    /// statement, so a job that cannot run fails now with a clear message
    /// instead of at its first batch.
    pub async fn resolve(
        client: &mut Client,
        job: &JobDefinition,
    ) -> Result<BatchTarget, DataPlaneError> {
        // In the job's own session: its search_path decides what its SQL names.
        let tx = client.transaction().await.map_err(|e| {
            DataPlaneError::Batch(BatchError::from_driver(
                format!("job {:?}: BEGIN", job.spec.name),
                &e,
            ))
        })?;
        // A role the daemon cannot take (not a member, dropped) is the job's fault.
        job.session.enter(&tx, &job.spec.name).await.map_err(|e| {
            if e.class().is_transient() {
                DataPlaneError::Batch(e)
            } else {
                DataPlaneError::JobDefinition(e.to_string())
            }
        })?;
        let target = Self::resolve_in(&tx, job).await;
        drop(tx.rollback().await);
        target
    }

    async fn resolve_in(
        tx: &Transaction<'_>,
        job: &JobDefinition,
    ) -> Result<BatchTarget, DataPlaneError> {
        let definition_error = |msg: String| DataPlaneError::JobDefinition(msg);
        let row = tx
            .query_opt(
                "SELECT format('%I.%I', n.nspname, c.relname), quote_ident(a.attname), \
                        format_type(a.atttypid, a.atttypmod), \
                        EXISTS (SELECT 1 FROM pg_index i \
                                 WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid \
                                   AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum \
                                   AND i.indpred IS NULL AND i.indexprs IS NULL), \
                        a.attnotnull \
                   FROM pg_class c \
                   JOIN pg_namespace n ON n.oid = c.relnamespace \
                   LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $2 \
                                           AND a.attnum > 0 AND NOT a.attisdropped \
                  WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
                &[&job.spec.table_name, &job.spec.key_column],
            )
            .await
            .map_err(|e| {
                definition_or_transient(&job.spec.name, "resolving table_name", &e, |message| {
                    format!(
                        "table_name {:?} cannot be resolved: {message}",
                        job.spec.table_name
                    )
                })
            })?
            .ok_or_else(|| {
                definition_error(format!(
                    "table {} does not exist (or is not a table)",
                    job.spec.table_name
                ))
            })?;
        let table: String = row.get(0);
        let key_column: Option<String> = row.get(1);
        let key_column = key_column.ok_or_else(|| {
            definition_error(format!(
                "key_column {:?} does not exist in table {table}",
                job.spec.key_column
            ))
        })?;
        let key_type: String = row.get(2);
        let key_is_unique: bool = row.get(3);
        if !key_is_unique {
            return Err(definition_error(format!(
                "key_column {key_column} of table {table} has no unique index on it alone; batches need a unique, ordered key"
            )));
        }
        // NULL sorts after every key and compares to none: such rows cannot be walked.
        let key_not_null: bool = row.get(4);
        if !key_not_null {
            return Err(definition_error(format!(
                "key_column {key_column} of table {table} may be NULL; rows with a NULL key cannot be walked in key order \
                 (ALTER TABLE {table} ALTER COLUMN {key_column} SET NOT NULL)"
            )));
        }
        let batch = bind_placeholders(&job.spec.batch_sql, &key_type)
            .map_err(|e| definition_error(e.to_string()))?;
        let sql = TargetSql::new(
            job.owner_id,
            &table,
            &key_column,
            &key_type,
            job.spec.pending_predicate.as_deref(),
            job.spec.check_predicate.as_deref(),
            // Undo is captured for each key a batch runs on.
            batch.params.contains(&Placeholder::Keys) || job.keep_undo,
        );
        let undo = job.keep_undo.then(|| {
            UndoSql::new(
                job.owner_id,
                &table,
                &key_column,
                &key_type,
                job.undo_columns.as_deref(),
            )
        });
        let mut target = BatchTarget {
            job_id: job.job_id,
            job_name: job.spec.name.clone(),
            table,
            key_column,
            key_type,
            batch,
            owner_id: job.owner_id,
            upper_key: job.upper_key.clone(),
            session: job.session.clone(),
            sql,
            undo,
        };
        for (column, predicate) in [
            ("pending_predicate", &job.spec.pending_predicate),
            ("check_predicate", &job.spec.check_predicate),
        ] {
            if let Some(predicate) = predicate {
                check_stands_alone(tx, &target, column, predicate).await?;
            }
        }
        target.check_statements(tx).await?;
        target.list_keys_unless_spans_work(tx).await?;
        Ok(target)
    }

    /// Drops `key_spans` when the server has no `min`/`max` for the key type (uuid):
    /// such a job lists its keys.
    async fn list_keys_unless_spans_work(
        &mut self,
        client: &Transaction<'_>,
    ) -> Result<(), DataPlaneError> {
        let Some(spans) = &self.sql.key_spans else {
            return Ok(());
        };
        match client.prepare(&spans.next).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_FUNCTION) => {
                self.sql.key_spans = None;
                Ok(())
            }
            Err(e) => Err(definition_or_transient(
                &self.job_name,
                "preparing its statements",
                &e,
                |message| format!("pending_predicate is not valid: {message}"),
            )),
        }
    }

    /// Has the server parse and plan each statement without running it.
    async fn check_statements(&self, client: &Transaction<'_>) -> Result<(), DataPlaneError> {
        let invalid = |what: &'static str, e: &tokio_postgres::Error| {
            definition_or_transient(&self.job_name, "preparing its statements", e, |message| {
                format!("{what} is not valid: {message}")
            })
        };
        let statement = client
            .prepare(&self.batch.sql)
            .await
            .map_err(|e| invalid("batch_sql", &e))?;
        if !statement.columns().is_empty() {
            return Err(DataPlaneError::JobDefinition(
                "batch_sql returns rows (a SELECT, or RETURNING); it must be a statement that only writes".to_string(),
            ));
        }
        for sql in [
            &self.sql.keys.first,
            &self.sql.keys.next,
            &self.sql.count_pending_all,
        ] {
            client
                .prepare(sql)
                .await
                .map_err(|e| invalid("pending_predicate", &e))?;
        }
        if let Some(check) = &self.sql.check_disagrees {
            client
                .prepare(check)
                .await
                .map_err(|e| invalid("check_predicate", &e))?;
        }
        Ok(())
    }

    /// How batches select their keys: `"span"` (first, last and count: the statement
    /// needs no more) or `"each_key"`.
    pub fn key_selection(&self) -> &'static str {
        if self.sql.key_spans.is_some() {
            "span"
        } else {
            "each_key"
        }
    }

    /// The batch statement's parameters for `keys`, one per placeholder.
    pub(crate) fn statement_params<'a>(
        &self,
        keys: &'a BatchKeys<'a>,
    ) -> Vec<&'a (dyn ToSql + Sync)> {
        let (first, last) = keys.first_and_last();
        self.batch
            .params
            .iter()
            .map(|placeholder| -> &(dyn ToSql + Sync) {
                match (placeholder, keys) {
                    (Placeholder::Keys, BatchKeys::Each(each)) => each,
                    // A span is selected only for statements without :keys
                    // (`TargetSql::key_spans`).
                    (Placeholder::Keys, BatchKeys::Span { .. }) => {
                        unreachable!("key spans are never selected for a statement with :keys")
                    }
                    (Placeholder::FirstKey, _) => first,
                    (Placeholder::LastKey, _) => last,
                }
            })
            .collect()
    }
}

/// Our queries paste a predicate inside `(…)`; one that closes that parenthesis itself
/// (`v = 0) OR (true`) parses there but changes what they select: `… AND (v = 0) OR
/// (true)` selects the first keys after every checkpoint. Where nothing encloses it,
/// between CASE WHEN and THEN, it must parse too. The INSERT checks the same (migration
/// 0004); this catches jobs enqueued before.
async fn check_stands_alone(
    client: &Transaction<'_>,
    target: &BatchTarget,
    column: &str,
    predicate: &str,
) -> Result<(), DataPlaneError> {
    let sql = format!(
        "SELECT CASE WHEN {predicate} THEN 1 END FROM {} t LIMIT 0",
        target.table
    );
    client.prepare(&sql).await.map_err(|e| {
        definition_or_transient(&target.job_name, "preparing its statements", &e, |message| {
            format!("{column} must be a single boolean expression, but it does not parse on its own: {message}")
        })
    })?;
    Ok(())
}

/// What a statement that failed while resolving job `job_name` means: a transient error
/// (another session holds a lock the statement needs, the connection dropped) is no fault
/// of the job, which is tried again later; anything else is, with `message` made of the
/// server's words.
fn definition_or_transient(
    job_name: &str,
    step: &str,
    e: &tokio_postgres::Error,
    message: impl FnOnce(String) -> String,
) -> DataPlaneError {
    let error = BatchError::from_driver(format!("job {job_name:?}: {step}"), e);
    if error.class().is_transient() {
        DataPlaneError::Batch(error)
    } else {
        DataPlaneError::JobDefinition(message(db_message(e)))
    }
}

/// The server's message (with detail) when there is one, else the driver's.
pub(crate) fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}
