//! Undo capture for jobs with `keep_undo`: the old values of exactly the keys a batch
//! changes, saved in `backfill.undo` in the batch's own transaction.
//!
//! Before each run of the statement (the whole batch, or one bisection savepoint), the
//! keys' rows are locked (`FOR NO KEY UPDATE`, the statement's own lock) and read **as
//! the job's role** (so column privileges and row policies hold:
//! undo never shows an engineer more than the engineer may read) and appended to a
//! transaction-local setting. The setting lives in the statement's savepoint: a sub-batch
//! rolled back takes its old values with it, a released one keeps them. Before the commit
//! the keys' new images are hashed (read as the job's role again), and the daemon, with
//! the role left as in [`JobSession::leave`], stores old values and hash together in one
//! insert: keys whose image the batch did not change are skipped, and a key stored before
//! (a retried row, a verification sweep) keeps its first, original values and gets the
//! new hash. A batch that does not commit stores nothing: the undo data is exactly what
//! the committed batches changed, whatever crashes and retries.
//!
//! One insert, after the statement, rather than an insert before it and an update after:
//! each undo row is written once (half the undo WAL), and the values never travel through
//! the daemon. The job's own SQL could overwrite the setting; it would only forge its
//! own job's undo data for its own keys, which its role may write anyway.

use deadpool_postgres::Transaction;

use crate::session::JobSession;
use crate::BatchError;

/// The SQLSTATE of `backfill.undo_conflict` (migration 0010): a revert met a row someone
/// else changed since the backfill. A row's failure, however many rows have it.
pub(crate) const CONFLICT_SQLSTATE: &str = "P0U01";

/// The setting holding a batch's pre-images between reading them and saving them.
const PRE_SETTING: &str = "backfill.undo_pre";
/// The setting holding a batch's post-image hashes.
const POST_SETTING: &str = "backfill.undo_post";

/// The SQL of a job's undo capture, derived once at claim.
#[derive(Debug, Clone)]
pub(crate) struct UndoSql {
    /// As the job's role: appends the images of the keys in `$1` to [`PRE_SETTING`].
    read_old: String,
    /// As the job's role: hashes the images of the keys in `$1` into [`POST_SETTING`].
    read_new: String,
    /// As the daemon: stores old values with new hashes; returns the keys a repeated
    /// change brought back to their original values.
    save: String,
    /// As the daemon: forgets those keys (`$1`).
    forget: String,
    /// Rows of the keys in `$1` and the bytes of their keys and images (for `plan`).
    pub(crate) measure: String,
}

/// The jsonb image of a row of alias `t`: `undo_columns`, or the whole row. The same
/// expression as `backfill.undo_image` (migration 0010) builds for the revert.
pub fn row_image(columns: Option<&[String]>) -> String {
    match columns {
        // `t.*`, not `t`: a column named t would be taken for the row.
        None => "to_jsonb(t.*)".to_string(),
        Some(columns) => {
            let pairs: Vec<String> = columns
                .iter()
                .map(|c| format!("{}, t.{}", quote_literal(c), quote_ident(c)))
                .collect();
            format!("jsonb_build_object({})", pairs.join(", "))
        }
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal under `standard_conforming_strings = on` (pinned, see the session).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl UndoSql {
    /// The capture of job `owner_id` (the parent of a slice) on `table` (quoted), whose
    /// key `key` (quoted) has type `key_type`.
    pub(crate) fn new(
        owner_id: i64,
        table: &str,
        key: &str,
        key_type: &str,
        columns: Option<&[String]>,
    ) -> UndoSql {
        let image = row_image(columns);
        let rows_of_keys = format!("FROM {table} t WHERE t.{key} = ANY($1::text[]::{key_type}[])");
        let images = |element: &str| {
            format!(
                "coalesce((SELECT jsonb_agg(jsonb_build_array(t.{key}::text, {element})) {rows_of_keys}), '[]')"
            )
        };
        // The old values are read under the row lock the statement takes anyway: a
        // change committed between this read and the statement would otherwise be
        // missing from them, and a revert would undo it too.
        let locked_images = |element: &str| {
            format!(
                "coalesce((SELECT jsonb_agg(jsonb_build_array(t.{key}::text, {element})) \
                   FROM (SELECT * FROM {table} t WHERE t.{key} = ANY($1::text[]::{key_type}[]) \
                         FOR NO KEY UPDATE OF t) t), '[]')"
            )
        };
        let elements = |setting: &str| {
            format!("jsonb_array_elements(current_setting('{setting}')::jsonb) AS e")
        };
        UndoSql {
            read_old: format!(
                "SELECT set_config('{PRE_SETTING}', \
                   (coalesce(nullif(current_setting('{PRE_SETTING}', true), '')::jsonb, '[]') || {})::text, true)",
                locked_images(&image)
            ),
            read_new: format!(
                "SELECT set_config('{POST_SETTING}', {}::text, true)",
                images(&format!("md5(({image})::text)"))
            ),
            save: format!(
                "WITH old AS (SELECT DISTINCT ON (e ->> 0) e ->> 0 AS key, e -> 1 AS image FROM {}), \
                      new AS (SELECT e ->> 0 AS key, e ->> 1 AS hash FROM {}), \
                      saved AS (INSERT INTO backfill.undo AS u (job_id, key, old_values, post_hash) \
                                SELECT {owner_id}, old.key, old.image, new.hash FROM old JOIN new USING (key) \
                                 WHERE md5(old.image::text) <> new.hash \
                                ON CONFLICT (job_id, key) DO UPDATE SET post_hash = excluded.post_hash \
                                RETURNING u.key, u.xmax <> 0 AS again, md5(u.old_values::text) = u.post_hash AS back) \
                 SELECT coalesce(array_agg(key) FILTER (WHERE again AND back), '{{}}') FROM saved",
                elements(PRE_SETTING),
                elements(POST_SETTING)
            ),
            forget: format!(
                "DELETE FROM backfill.undo WHERE job_id = {owner_id} AND key = ANY($1::text[]) \
                   AND md5(old_values::text) = post_hash"
            ),
            measure: format!(
                "SELECT count(*), coalesce(sum(pg_column_size(t.{key}::text) + pg_column_size({image})), 0)::int8 \
                 {rows_of_keys}"
            ),
        }
    }

    /// Before the statement runs on `keys` (in `tx`, in the job's session, inside the
    /// statement's savepoint if any): reads their rows' current images.
    pub(crate) async fn read_old(
        &self,
        tx: &Transaction<'_>,
        keys: &[String],
        context: &str,
    ) -> Result<(), BatchError> {
        let context = format!("{context}: undo: reading the old values");
        run(tx, &self.read_old, keys, &context).await
    }

    /// After the statements, before the commit (in the job's session): hashes the new
    /// images of `keys` and stores the undo rows. Leaves the transaction as the daemon
    /// (what [`JobSession::leave`] does), the commit's next step.
    pub(crate) async fn save(
        &self,
        tx: &Transaction<'_>,
        session: &JobSession,
        keys: &[String],
        context: &str,
    ) -> Result<(), BatchError> {
        let step = |what: &str| format!("{context}: undo: {what}");
        // The job's statement may have changed how keys and floats print.
        session.repin(tx, &step("after its statement")).await?;
        run(tx, &self.read_new, keys, &step("hashing the new values")).await?;
        session.leave(tx, &step("after its statement")).await?;
        let back: Vec<String> = async {
            let statement = tx.prepare_cached(&self.save).await?;
            tx.query_one(&statement, &[]).await
        }
        .await
        .map_err(|e| BatchError::from_driver(step("saving the old values"), &e))?
        .get(0);
        if back.is_empty() {
            return Ok(());
        }
        run(
            tx,
            &self.forget,
            &back,
            &step("forgetting rows changed back"),
        )
        .await
    }
}

/// Runs `sql` with `keys` as `$1` when it takes them.
async fn run(
    tx: &Transaction<'_>,
    sql: &str,
    keys: &[String],
    context: &str,
) -> Result<(), BatchError> {
    let result = async {
        let statement = tx.prepare_cached(sql).await?;
        if statement.params().is_empty() {
            tx.execute(&statement, &[]).await
        } else {
            tx.execute(&statement, &[&keys]).await
        }
    }
    .await;
    result
        .map(|_| ())
        .map_err(|e| BatchError::from_driver(context, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_the_whole_row_or_the_declared_columns_quoted() {
        assert_eq!(row_image(None), "to_jsonb(t.*)");
        let columns = vec!["first_name".to_string(), "we\"ird'".to_string()];
        assert_eq!(
            row_image(Some(&columns)),
            "jsonb_build_object('first_name', t.\"first_name\", 'we\"ird''', t.\"we\"\"ird'\")"
        );
    }

    #[test]
    fn old_values_keep_the_first_image_and_belong_to_the_owner() {
        let sql = UndoSql::new(7, "public.users", "\"id\"", "bigint", None);
        // A key stored before keeps its old values; only its hash moves on.
        assert!(sql
            .save
            .contains("ON CONFLICT (job_id, key) DO UPDATE SET post_hash = excluded.post_hash"));
        assert!(sql.save.contains("SELECT 7, old.key"));
        // Rows the batch left as they were are not saved.
        assert!(sql.save.contains("WHERE md5(old.image::text) <> new.hash"));
        assert!(sql
            .read_old
            .contains("t.\"id\" = ANY($1::text[]::bigint[])"));
        assert!(sql.forget.contains("md5(old_values::text) = post_hash"));
    }
}
