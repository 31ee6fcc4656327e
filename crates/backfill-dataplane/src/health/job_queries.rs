//! Running jobs' own throttle queries, each run as the job's role on a connection of
//! their own, and the one value a throttle query gives.

use std::time::Duration;

use backfill_core::signals::JobQuery;
use backfill_core::throttle::QueryReading;
use tokio_postgres::SimpleQueryMessage;

use super::HealthProbe;
use crate::pool::error_chain;

impl HealthProbe {
    /// Runs every job's own throttle query on a connection of their own, each within
    /// `probe_timeout`, after the primary's sample: one slow or failing query holds its
    /// own job, never the probe (and so every job).
    pub(super) async fn run_job_queries(&self, specs: Vec<JobQuerySpec>) -> Vec<JobQuery> {
        // A job whose query is gone (removed, or the job stopped running) starts afresh:
        // a failure of a query it is given later is logged again.
        let targets: Vec<String> = specs
            .iter()
            .map(|spec| format!("{JOB_QUERY_TARGET}{}", spec.job_id))
            .collect();
        self.failing.forget_others(JOB_QUERY_TARGET, &targets);
        if specs.is_empty() {
            return Vec::new();
        }
        let mut client = match tokio::time::timeout(self.timeout, self.primary.get()).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(format!("getting a connection: {}", error_chain(&e))),
            Err(_) => Err(self.timed_out()),
        };
        let mut readings = Vec::with_capacity(specs.len());
        for spec in specs {
            let target = format!("{JOB_QUERY_TARGET}{}", spec.job_id);
            let outcome = match &mut client {
                Ok(client) => tokio::time::timeout(
                    self.timeout,
                    run_job_query(
                        client,
                        &spec.query,
                        &spec.role,
                        &spec.search_path,
                        self.timeout,
                    ),
                )
                .await
                .unwrap_or_else(|_| Err(self.timed_out())),
                Err(error) => Err(error.clone()),
            };
            let reading = match outcome {
                Ok(value) => {
                    self.failing.ok(&target);
                    QueryReading::Value(value)
                }
                Err(error) => {
                    let error = format!("{target} failed: {error}");
                    self.failing.failed(&target, &error);
                    QueryReading::Failed(error)
                }
            };
            readings.push(JobQuery {
                job_id: spec.job_id,
                reading,
                hold_above: spec.hold_above,
            });
        }
        readings
    }
}

/// How the failure log names a job's throttle query, before the job's id.
const JOB_QUERY_TARGET: &str = "throttle_query of job ";

/// A running job's own throttle query, to be run as its role.
pub(super) struct JobQuerySpec {
    pub(super) job_id: i64,
    pub(super) query: String,
    pub(super) hold_above: f64,
    pub(super) role: String,
    pub(super) search_path: String,
}

/// Runs a job's throttle query as the job's role, read-only, in a transaction that is
/// rolled back (also when the probe gives up on it: dropping it rolls back).
async fn run_job_query(
    client: &mut deadpool_postgres::Client,
    query: &str,
    role: &str,
    search_path: &str,
    timeout: Duration,
) -> Result<f64, String> {
    let transaction = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| format!("starting its transaction: {e}"))?;
    let timeout_ms = timeout.as_millis().max(1).to_string();
    transaction
        .execute(
            "SELECT set_config('role', $1, true), set_config('search_path', $2, true), \
                    set_config('statement_timeout', $3, true)",
            &[&role, &search_path, &timeout_ms],
        )
        .await
        .map_err(|e| format!("taking the job's role {role:?}: {e}"))?;
    let messages = transaction
        .simple_query(query)
        .await
        .map_err(|e| error_chain(&e))?;
    let value = read_query_value(&messages);
    transaction
        .rollback()
        .await
        .map_err(|e| format!("rolling back: {e}"))?;
    value
}

/// The one value of the throttle query's one row: a number, or a boolean as 1 or 0.
pub(super) fn read_query_value(messages: &[SimpleQueryMessage]) -> Result<f64, String> {
    let rows: Vec<Vec<Option<&str>>> = messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some((0..row.len()).map(|i| row.get(i)).collect()),
            _ => None,
        })
        .collect();
    query_value(&rows)
}

/// [`read_query_value`] on the rows' text cells.
fn query_value(rows: &[Vec<Option<&str>>]) -> Result<f64, String> {
    let [row] = rows else {
        return Err(format!(
            "throttle.query returned {} rows; it must return one row with one number or boolean",
            rows.len()
        ));
    };
    let [cell] = row[..] else {
        return Err(format!(
            "throttle.query returned {} columns; it must return one number or boolean",
            row.len()
        ));
    };
    match cell {
        None => Err("throttle.query returned NULL; it must return a number or boolean".into()),
        Some("t" | "true") => Ok(1.0),
        Some("f" | "false") => Ok(0.0),
        Some(text) => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|value| !value.is_nan())
            .ok_or_else(|| {
                format!("throttle.query returned {text:?}; it must return a number or boolean")
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_query_gives_one_number_or_boolean() {
        for (cell, value) in [
            ("t", 1.0),
            ("f", 0.0),
            ("42", 42.0),
            ("0.25", 0.25),
            ("-3", -3.0),
        ] {
            assert_eq!(query_value(&[vec![Some(cell)]]), Ok(value));
        }
        for (rows, mentions) in [
            (vec![], "returned 0 rows"),
            (vec![vec![Some("1")], vec![Some("2")]], "returned 2 rows"),
            (vec![vec![Some("1"), Some("2")]], "returned 2 columns"),
            (vec![vec![None]], "returned NULL"),
            (vec![vec![Some("NaN")]], "returned \"NaN\""),
            (vec![vec![Some("busy")]], "returned \"busy\""),
        ] {
            let error = query_value(&rows).expect_err(mentions);
            assert!(error.contains(mentions), "{error}");
        }
    }
}
