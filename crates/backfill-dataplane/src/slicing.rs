//! Reading the key distribution to cut a job into slices of equal row counts,
//! and to split a running slice in two.

use deadpool_postgres::Client;

use crate::target::BatchTarget;
use crate::BatchError;

/// Rows the sample aims for: enough for percentiles within a fraction of a
/// percent, few enough to read quickly on any table size.
const SAMPLE_ROWS: f64 = 50_000.0;

impl BatchTarget {
    /// Pending keys at the cumulative `fractions` of the pending rows, from a
    /// row sample (`TABLESAMPLE BERNOULLI`), so slices cut there hold about the
    /// same number of rows however skewed the keys are. Ascending; may hold
    /// duplicates on tiny or low-cardinality tables.
    pub async fn sample_cuts(
        &self,
        client: &mut Client,
        fractions: &[f64],
    ) -> Result<Vec<String>, BatchError> {
        let context = || {
            format!(
                "job {:?}: sampling the key distribution of {}",
                self.job_name, self.table
            )
        };
        let client = self.begin(client, &context()).await?;
        let rows: f32 = client
            .query_one(&format!("SELECT greatest(reltuples, 0)::float4 FROM pg_class WHERE oid = '{}'::regclass", self.table), &[])
            .await
            .map_err(|e| BatchError::from_driver(context(), &e))?
            .get(0);
        // Never analysed (reltuples 0 or -1): read everything, it is small or about to be.
        let percent = if rows < 1.0 {
            100.0
        } else {
            (100.0 * SAMPLE_ROWS / f64::from(rows)).clamp(0.001, 100.0) as f32
        };
        let key = &self.key_column;
        let sql = format!(
            "SELECT coalesce(array_agg(q::text), '{{}}') FROM unnest(( \
                 SELECT percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY t.{key}) \
                   FROM {table} t TABLESAMPLE BERNOULLI ($2::float4) WHERE {pending})) AS q",
            table = self.table,
            pending = self.sql.pending,
        );
        let cuts: Vec<String> = client
            .query_one(&sql, &[&fractions, &percent])
            .await
            .map_err(|e| BatchError::from_driver(context(), &e))?
            .get(0);
        drop(client.rollback().await);
        Ok(cuts)
    }

    /// The pending key `offset` rows above `after` (and not above `upper`):
    /// where to split a slice so both halves hold about the same rows.
    pub async fn key_at_offset(
        &self,
        client: &mut Client,
        after: Option<&str>,
        upper: Option<&str>,
        offset: i64,
    ) -> Result<Option<String>, BatchError> {
        let key = &self.key_column;
        let key_type = &self.key_type;
        let sql = format!(
            "SELECT t.{key}::text FROM {table} t \
              WHERE ($1::text IS NULL OR t.{key} > $1::text::{key_type}) \
                AND ($2::text IS NULL OR t.{key} <= $2::text::{key_type}) AND {pending} \
              ORDER BY t.{key} OFFSET $3 LIMIT 1",
            table = self.table,
            pending = self.sql.pending,
        );
        let context = format!("job {:?}: finding where to split a slice", self.job_name);
        self.read_in_session(client, &context, &sql, &[&after, &upper, &offset], |rows| {
            rows.first().map(|row| row.get(0))
        })
        .await
    }
}
