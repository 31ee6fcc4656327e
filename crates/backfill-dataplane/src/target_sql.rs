//! The SQL a job's batches and reads use, derived once from its resolved table, key and
//! predicates: the key queries for every way of walking the key order, retries, counts.

use backfill_core::queue_sql;

/// Rows above a finished pass's last key that are checked for ones the pass itself
/// moved there.
pub(crate) const ROWS_PAST_CHECKED: u32 = 10_000;

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

impl TargetSql {
    /// The statements of job `owner_id` on `table` (quoted) over key `key` (quoted) of
    /// type `key_type`.
    pub(crate) fn new(
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
