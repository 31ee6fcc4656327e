//! A job's definition resolved against the live catalog: quoted names, the key's
//! real type, the batch statement with bound placeholders, and the key queries.

use backfill_core::job_spec::JobSpec;
use backfill_core::placeholders::{bind_placeholders, BoundSql, Placeholder};
use backfill_core::queue_sql;
use deadpool_postgres::{Client, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use crate::session::JobSession;
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

/// Rows above a finished pass's last key that are checked for ones the pass itself
/// moved there.
const ROWS_PAST_CHECKED: u32 = 10_000;

/// The transactions (32-bit xids, as `xmin` shows them) of the batches a pass has
/// committed in this run: a row one of them wrote, met again ahead of the checkpoint or
/// past the pass's end, was moved there by the job's own statement.
#[derive(Debug, Clone, Default)]
pub struct PassWrites(std::collections::HashSet<u32>);

impl PassWrites {
    /// Remembers a committed batch's transaction (`txid_current()`, epoch and all).
    pub fn remember(&mut self, txid: i64) {
        // xmin is the txid without its epoch: the low 32 bits.
        self.0.insert((txid & 0xffff_ffff) as u32);
    }

    /// Forgets every batch: a new pass starts.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Whether the row version written by `xmin` (as text) is one of this pass's.
    pub fn wrote(&self, xmin: &str) -> bool {
        xmin.parse().is_ok_and(|xid: u32| self.0.contains(&xid))
    }
}

/// The error for a job whose statement moved the row now at `key` (see [`PassWrites`]).
pub(crate) fn moved_keys_error(job: &str, key: &str, whereabouts: &str) -> BatchError {
    BatchError {
        context: format!("job {job:?}, key {key}"),
        sqlstate: None,
        message: format!(
            "batch_sql moves rows' keys (it changes key_column): the row now at this key was written by \
             one of the job's own batches and lies {whereabouts}, so walking on would apply it again or miss it. \
             A backfill statement must not change the key; this batch was rolled back"
        ),
        connection_closed: false,
        canceled_by_us: false,
    }
}

/// The SQL texts derived from a job once, at claim.
#[derive(Debug, Clone)]
pub(crate) struct TargetSql {
    /// `pending_predicate` as a filter over alias `t` (`true` without one).
    pub pending: String,
    /// Select each key of the next batch, as text.
    pub keys: KeyQueries,
    /// Select only the first and last key of the next batch and how many there are, for
    /// a statement that needs no more (no `:keys`, no check_predicate): the server then
    /// sends one row instead of every key. `None` when the statement needs each key, or
    /// the key type has no `min`/`max` (uuid).
    pub key_spans: Option<KeyQueries>,
    pub retry_keys: String,
    /// Whether check_predicate holds for any of the keys in `$1`; `None` without one.
    pub check_disagrees: Option<String>,
    pub count_pending_after: String,
    pub count_pending_all: String,
    pub count_pending_excluding_failed: String,
    /// The table's largest key, as text (one row, NULL when the table is empty).
    pub last_key: String,
    /// The first [`ROWS_PAST_CHECKED`] keys above `$1` with the transaction that wrote each.
    pub rows_past: String,
}

/// One query per way of walking the key order for the next batch; parameters: the
/// checkpoint key (`next…`), a slice's upper key (`…below`), then the batch size.
#[derive(Debug, Clone)]
pub(crate) struct KeyQueries {
    pub first: String,
    pub next: String,
    /// As `first`/`next`, bounded above by a slice's upper key.
    pub first_below: String,
    pub next_below: String,
    /// As `first_below`/`next_below`, skipping keys recorded in `failed_rows`
    /// (verification sweeps, bounded like every pass).
    pub first_excluding_failed: String,
    pub next_excluding_failed: String,
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

    /// Opens a transaction on `client` in the job's own session (its role and
    /// search_path), for reading the job's table as the job's SQL would.
    pub(crate) async fn begin<'c>(
        &self,
        client: &'c mut Client,
        step: &str,
    ) -> Result<Transaction<'c>, BatchError> {
        let tx = client.transaction().await.map_err(|e| {
            BatchError::from_driver(format!("job {:?}: {step}: BEGIN", self.job_name), &e)
        })?;
        self.session.enter(&tx, &self.job_name).await?;
        Ok(tx)
    }

    /// Rows for which the pending predicate holds above `after` (all rows when
    /// `after` is `None`), excluding keys already in `failed_rows` if asked.
    pub async fn count_pending(
        &self,
        client: &mut Client,
        after: Option<&str>,
        excluding_failed: bool,
    ) -> Result<i64, BatchError> {
        let context = format!(
            "counting pending rows of job {:?} in {}",
            self.job_name, self.table
        );
        let tx = self.begin(client, &context).await?;
        let row = match (after, excluding_failed) {
            (_, true) => {
                tx.query_one(&self.sql.count_pending_excluding_failed, &[])
                    .await
            }
            (Some(after), false) => tx.query_one(&self.sql.count_pending_after, &[&after]).await,
            (None, false) => tx.query_one(&self.sql.count_pending_all, &[]).await,
        }
        .map_err(|e| BatchError::from_driver(&context, &e))?;
        drop(tx.rollback().await);
        Ok(row.get(0))
    }

    /// After a pass that ended at `last_key`: the job's error when a row above it (of the
    /// first [`ROWS_PAST_CHECKED`]) was written by one of the pass's own batches — the
    /// job's statement moved it past the end.
    pub async fn row_moved_past(
        &self,
        client: &mut Client,
        last_key: &str,
        writes: &PassWrites,
    ) -> Result<Option<BatchError>, BatchError> {
        let context = format!("job {:?}: looking past the end of its pass", self.job_name);
        let tx = self.begin(client, &context).await?;
        let rows = tx
            .query(&self.sql.rows_past, &[&last_key])
            .await
            .map_err(|e| BatchError::from_driver(&context, &e))?;
        drop(tx.rollback().await);
        Ok(rows
            .into_iter()
            .find(|row| writes.wrote(row.get(1)))
            .map(|row| {
                let key: String = row.get(0);
                moved_keys_error(&self.job_name, &key, "past the end of its pass")
            }))
    }

    /// The table's last key now (`None` when it is empty): where a pass that starts now
    /// ends, so that it ends even when the job's statement moves keys forward.
    pub async fn last_key(&self, client: &mut Client) -> Result<Option<String>, BatchError> {
        let context = format!(
            "job {:?}: reading the last key of {}",
            self.job_name, self.table
        );
        let tx = self.begin(client, &context).await?;
        let row = tx
            .query_one(&self.sql.last_key, &[])
            .await
            .map_err(|e| BatchError::from_driver(&context, &e))?;
        drop(tx.rollback().await);
        Ok(row.get(0))
    }
}

impl TargetSql {
    fn new(
        owner_id: i64,
        table: &str,
        key: &str,
        key_type: &str,
        predicate: Option<&str>,
        check_predicate: Option<&str>,
        statement_needs_each_key: bool,
    ) -> TargetSql {
        let pending = predicate.map_or_else(|| "true".to_string(), |p| format!("({p})"));
        let not_failed = queue_sql::not_failed(owner_id, key);
        let after = format!("t.{key} > $1::text::{key_type}");
        let below = |n: &str| format!("t.{key} <= {n}::text::{key_type}");
        let queries = |select: &dyn Fn(&str) -> String| KeyQueries {
            first: select(&pending).replace("$LIMIT", "$1"),
            next: select(&format!("{after} AND {pending}")).replace("$LIMIT", "$2"),
            first_below: select(&format!("{} AND {pending}", below("$1"))).replace("$LIMIT", "$2"),
            next_below: select(&format!("{after} AND {} AND {pending}", below("$2")))
                .replace("$LIMIT", "$3"),
            first_excluding_failed: select(&format!(
                "{} AND {pending} AND {not_failed}",
                below("$1")
            ))
            .replace("$LIMIT", "$2"),
            next_excluding_failed: select(&format!(
                "{after} AND {} AND {pending} AND {not_failed}",
                below("$2")
            ))
            .replace("$LIMIT", "$3"),
        };
        let batch = |columns: &str, filter: &str| {
            format!("SELECT {columns} FROM {table} t WHERE {filter} ORDER BY t.{key} LIMIT $LIMIT")
        };
        // Each key with the transaction that last wrote its row: a row this job's own
        // batch wrote, met again ahead of the checkpoint, was moved there by the job.
        let each_key = format!("t.{key}::text, t.xmin::text");
        let key_as_k = format!("t.{key} AS k");
        TargetSql {
            keys: queries(&|filter| batch(&each_key, filter)),
            key_spans: (!statement_needs_each_key && check_predicate.is_none()).then(|| {
                queries(&|filter| {
                    format!(
                        "SELECT min(b.k)::text, max(b.k)::text, count(*) FROM ({}) b",
                        batch(&key_as_k, filter)
                    )
                })
            }),
            // Verification failures are retried only when retry_failed() reset
            // their attempts to 0: without a change to the data or the job,
            // batch_sql computes the same disagreeing values again.
            // With whether the key's row still exists: a vanished row is forgotten, never
            // counted as applied.
            retry_keys: format!(
                "SELECT f.key, EXISTS (SELECT FROM {table} t WHERE t.{key} = f.key::{key_type}) \
                   FROM backfill.failed_rows f \
                  WHERE f.job_id = {owner_id} AND {eligible} \
                    AND f.next_attempt_at <= now() \
                  ORDER BY f.key::{key_type} LIMIT $2",
                eligible = queue_sql::retry_eligible(1)
            ),
            check_disagrees: check_predicate.map(|check| {
                format!(
                    "SELECT EXISTS (SELECT FROM {table} t \
                      WHERE t.{key} = ANY($1::text[]::{key_type}[]) AND ({check}))"
                )
            }),
            count_pending_after: format!(
                "SELECT count(*) FROM {table} t WHERE {after} AND {pending}"
            ),
            count_pending_all: format!("SELECT count(*) FROM {table} t WHERE {pending}"),
            count_pending_excluding_failed: format!(
                "SELECT count(*) FROM {table} t WHERE {pending} AND {not_failed}"
            ),
            // ORDER BY rather than max(): every orderable key type has it (uuid has no max).
            rows_past: format!(
                "SELECT t.{key}::text, t.xmin::text FROM {table} t WHERE t.{key} > $1::text::{key_type} \
                  ORDER BY t.{key} LIMIT {ROWS_PAST_CHECKED}"
            ),
            last_key: format!(
                "SELECT (SELECT t.{key}::text FROM {table} t ORDER BY t.{key} DESC LIMIT 1)"
            ),
            pending,
        }
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
