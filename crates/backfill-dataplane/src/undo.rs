//! Undo capture for jobs with `keep_undo`: the old values of exactly the keys a batch
//! runs its statement on, saved in `backfill.undo` in the batch's own transaction.
//!
//! Before each run of the statement (the whole batch, or one bisection savepoint), the
//! keys' rows are read **as the job's role** (so column privileges and row policies hold:
//! undo never shows an engineer more than the engineer may read) into a transaction-local
//! setting, and the daemon, with the role left as in [`JobSession::leave`], copies them
//! into `backfill.undo` with `ON CONFLICT DO NOTHING`: a key processed again (a retried
//! row, a verification sweep) keeps its first, original values. Inside a savepoint that
//! is rolled back, the saved rows go with it. Before the commit, the keys' new images are
//! hashed (`post_hash`, read as the job's role again) so a revert can tell rows someone
//! else changed since; keys the statement left as they were are forgotten. A batch that
//! does not commit saves nothing: the capture is exactly what the committed batch changed.
//!
//! The transport through `set_config(…, true)` keeps the values on the server: no round
//! trip of row data through the daemon, and no temporary table per batch.

use deadpool_postgres::Transaction;

use crate::session::JobSession;
use crate::BatchError;

/// The setting holding a batch's pre-images between reading them and saving them.
const PRE_SETTING: &str = "backfill.undo_pre";
/// The setting holding a batch's post-image hashes.
const POST_SETTING: &str = "backfill.undo_post";

/// The SQL of a job's undo capture, derived once at claim.
#[derive(Debug, Clone)]
pub(crate) struct UndoSql {
    /// As the job's role: reads the images of the keys in `$1` into [`PRE_SETTING`].
    read_old: String,
    /// As the daemon: saves them, first image wins.
    save_old: String,
    /// As the job's role: hashes the images of the keys in `$1` into [`POST_SETTING`].
    read_new: String,
    /// As the daemon: records the hashes.
    save_new: String,
    /// As the daemon: forgets keys of `$1` the job left unchanged.
    forget_unchanged: String,
    /// Rows of the keys in `$1` and the bytes of their keys and images (for `plan`).
    pub(crate) measure: String,
}

/// The jsonb image of a row of alias `t`: `undo_columns`, or the whole row. The same
/// expression as `backfill.undo_image` (migration 0010) builds for the revert.
pub fn row_image(columns: Option<&[String]>) -> String {
    match columns {
        None => "to_jsonb(t)".to_string(),
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
        let into = |setting: &str, element: &str| {
            format!(
                "SELECT set_config('{setting}', coalesce((SELECT jsonb_agg(jsonb_build_array(t.{key}::text, {element})) \
                 {rows_of_keys}), '[]')::text, true)"
            )
        };
        let elements = |setting: &str| {
            format!("jsonb_array_elements(current_setting('{setting}')::jsonb) AS e")
        };
        UndoSql {
            read_old: into(PRE_SETTING, &image),
            save_old: format!(
                "INSERT INTO backfill.undo (job_id, key, old_values) \
                 SELECT {owner_id}, e ->> 0, e -> 1 FROM {} \
                 ON CONFLICT (job_id, key) DO NOTHING",
                elements(PRE_SETTING)
            ),
            read_new: into(POST_SETTING, &format!("md5(({image})::text)")),
            save_new: format!(
                "UPDATE backfill.undo u SET post_hash = e ->> 1 FROM {} \
                  WHERE u.job_id = {owner_id} AND u.key = e ->> 0",
                elements(POST_SETTING)
            ),
            forget_unchanged: format!(
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
    /// statement's savepoint if any): saves their rows' current images. Leaves the
    /// transaction in the job's session again.
    pub(crate) async fn save_old(
        &self,
        tx: &Transaction<'_>,
        session: &JobSession,
        job: &str,
        keys: &[String],
        context: &str,
    ) -> Result<(), BatchError> {
        let step = |what: &str| format!("{context}: undo: {what}");
        run(tx, &self.read_old, keys, &step("reading the old values")).await?;
        session.leave(tx, &step("before saving")).await?;
        run(tx, &self.save_old, &[], &step("saving the old values")).await?;
        session.enter(tx, job).await?;
        Ok(())
    }

    /// After the statements, before the commit (in the job's session): records the new
    /// images' hashes of `keys` and forgets the keys left unchanged. Leaves the
    /// transaction as the daemon (what [`JobSession::leave`] does), the commit's next step.
    pub(crate) async fn save_new(
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
        run(tx, &self.save_new, &[], &step("saving the new hashes")).await?;
        run(
            tx,
            &self.forget_unchanged,
            keys,
            &step("forgetting unchanged rows"),
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
        assert_eq!(row_image(None), "to_jsonb(t)");
        let columns = vec!["first_name".to_string(), "we\"ird'".to_string()];
        assert_eq!(
            row_image(Some(&columns)),
            "jsonb_build_object('first_name', t.\"first_name\", 'we\"ird''', t.\"we\"\"ird'\")"
        );
    }

    #[test]
    fn old_values_keep_the_first_image_and_belong_to_the_owner() {
        let sql = UndoSql::new(7, "public.users", "\"id\"", "bigint", None);
        assert!(sql
            .save_old
            .contains("ON CONFLICT (job_id, key) DO NOTHING"));
        assert!(sql.save_old.contains("SELECT 7,"));
        assert!(sql
            .read_old
            .contains("t.\"id\" = ANY($1::text[]::bigint[])"));
        assert!(sql
            .forget_unchanged
            .contains("md5(old_values::text) = post_hash"));
    }
}
