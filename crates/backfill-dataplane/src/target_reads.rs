//! Reading a job's table in the job's own session (its role and search_path), always
//! rolled back: pending counts, the pass's last key, rows the pass's own batches moved.

use deadpool_postgres::{Client, Transaction};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::target::BatchTarget;
use crate::BatchError;

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

impl BatchTarget {
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

    /// Runs one read-only `query` in the job's own session (see [`Self::begin`]), rolls
    /// back, and hands its rows to `rows`; `context` says what it reads in an error.
    pub(crate) async fn read_in_session<T>(
        &self,
        client: &mut Client,
        context: &str,
        query: &str,
        params: &[&(dyn ToSql + Sync)],
        rows: impl FnOnce(Vec<Row>) -> T,
    ) -> Result<T, BatchError> {
        let tx = self.begin(client, context).await?;
        let read = tx
            .query(query, params)
            .await
            .map_err(|e| BatchError::from_driver(context, &e))?;
        drop(tx.rollback().await);
        Ok(rows(read))
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
        let (query, params): (&str, Vec<&(dyn ToSql + Sync)>) = match (&after, excluding_failed) {
            (_, true) => (&self.sql.count_pending_excluding_failed, vec![]),
            (Some(after), false) => (&self.sql.count_pending_after, vec![after]),
            (None, false) => (&self.sql.count_pending_all, vec![]),
        };
        // A count is one row.
        self.read_in_session(client, &context, query, &params, |rows| rows[0].get(0))
            .await
    }

    /// After a pass that ended at `last_key`: the job's error when a row above it (of the
    /// first [`ROWS_PAST_CHECKED`](crate::target_sql::ROWS_PAST_CHECKED)) was written by one of the pass's own batches — the
    /// job's statement moved it past the end.
    pub async fn row_moved_past(
        &self,
        client: &mut Client,
        last_key: &str,
        writes: &PassWrites,
    ) -> Result<Option<BatchError>, BatchError> {
        let context = format!("job {:?}: looking past the end of its pass", self.job_name);
        let moved = |rows: Vec<Row>| {
            rows.into_iter()
                .find(|row| writes.wrote(row.get(1)))
                .map(|row| {
                    let key: String = row.get(0);
                    moved_keys_error(&self.job_name, &key, "past the end of its pass")
                })
        };
        self.read_in_session(client, &context, &self.sql.rows_past, &[&last_key], moved)
            .await
    }

    /// The table's last key now (`None` when it is empty): where a pass that starts now
    /// ends, so that it ends even when the job's statement moves keys forward.
    pub async fn last_key(&self, client: &mut Client) -> Result<Option<String>, BatchError> {
        let context = format!(
            "job {:?}: reading the last key of {}",
            self.job_name, self.table
        );
        // One row: the subquery's key, NULL for an empty table.
        self.read_in_session(client, &context, &self.sql.last_key, &[], |rows| {
            rows[0].get(0)
        })
        .await
    }
}
