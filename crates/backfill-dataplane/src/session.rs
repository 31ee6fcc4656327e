//! The job's own session inside each of our transactions: the role that enqueued the
//! job, the search_path it was enqueued with, and text formats no setting can change.
//!
//! Keys and checkpoints travel as text. A key's text depends on the session (DateStyle
//! and TimeZone for timestamps, extra_float_digits for floats, bytea_output…), and a
//! role, a database or the job's own SQL can change those. So every data-plane session
//! starts with [`PINNED`] as startup options (they outrank `ALTER ROLE … SET`), goes
//! back to the pool reset to them (deadpool's `Clean` recycling), and is pinned again
//! after every statement of the job's own before we read or parse a key in the same
//! transaction (`set_config(…, true)` in batch_sql lasts until the transaction ends).
//!
//! The job's SQL runs as the role that enqueued it (`SET LOCAL ROLE`, the way pg_cron
//! runs a job as its owner), so an engineer gets the rights the engineer has, not the
//! daemon's. Our own writes (checkpoint, counters, failed keys) run after the role is
//! reset, and only if the job's SQL left the role as it was: SQL that changed it is
//! refused and its batch rolled back. SET ROLE is not a sandbox: SQL can reset the role
//! and act as the daemon's role within the statement, so that role should have no more
//! rights than the queue needs (README, "Least privilege").

use deadpool_postgres::Transaction;

use crate::BatchError;

/// Session settings every data-plane session runs with: the text form of every key type
/// depends on nothing else.
pub(crate) const PINNED: &[(&str, &str)] = &[
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("standard_conforming_strings", "on"),
    ("default_transaction_read_only", "off"),
];

/// [`PINNED`] as (name, value) pairs for a startup `options` string: spaces in values
/// escaped, as the server splits options on unescaped spaces. The control plane's
/// sessions take the same (sqlx joins them as `-c name=value` without escaping).
pub fn pinned_startup_settings() -> Vec<(&'static str, String)> {
    PINNED
        .iter()
        .map(|(name, value)| (*name, value.replace(' ', "\\ ")))
        .collect()
}

/// [`PINNED`] as libpq startup options (`-c name=value`, spaces escaped).
pub(crate) fn startup_options() -> String {
    pinned_startup_settings()
        .iter()
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Takes the job's role and search_path for the rest of the transaction; returns the
/// backend pid. `$1` NULL keeps the session's role, `$2` NULL its search_path.
const ENTER_SQL: &str = "SELECT pg_backend_pid(), \
       CASE WHEN $1::text IS NULL THEN NULL ELSE set_config('role', $1, true) END, \
       CASE WHEN $2::text IS NULL THEN NULL ELSE set_config('search_path', $2, true) END";

/// Pins the text formats again after the job's SQL ran and reports the role it left.
const REPIN_SQL: &str = "SELECT current_user::text, \
       set_config('DateStyle', 'ISO, YMD', true), set_config('IntervalStyle', 'postgres', true), \
       set_config('TimeZone', 'UTC', true), set_config('extra_float_digits', '3', true), \
       set_config('bytea_output', 'hex', true)";

/// Back to the daemon's own role, with a search_path nobody can plant objects in, for
/// our writes to the queue; reports the role the job's SQL left.
const LEAVE_SQL: &str = "SELECT current_user::text, set_config('role', 'none', true), \
       set_config('search_path', 'pg_catalog, pg_temp', true)";

/// Who a job's SQL runs as, and with which search_path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobSession {
    /// The role that enqueued the job; `None` runs as the daemon's role.
    pub run_as: Option<String>,
    /// The search_path the job was enqueued with; `None` keeps the session's.
    pub search_path: Option<String>,
}

impl JobSession {
    /// Enters the job's session in `tx` (its first statement); returns the backend pid.
    pub(crate) async fn enter(&self, tx: &Transaction<'_>, job: &str) -> Result<i32, BatchError> {
        let context = || {
            match &self.run_as {
            Some(role) => format!(
                "job {job:?}: taking role {role}, which enqueued it (the daemon's role must be a member of it: GRANT {role} TO <daemon role>)"
            ),
            None => format!("job {job:?}: entering its session"),
        }
        };
        let row = async {
            let statement = tx.prepare_cached(ENTER_SQL).await?;
            tx.query_one(&statement, &[&self.run_as, &self.search_path])
                .await
        }
        .await
        .map_err(|e| refused(BatchError::from_driver(context(), &e)))?;
        Ok(row.get(0))
    }

    /// After the job's SQL ran in `tx`: pins the text formats again and checks the SQL left
    /// the role as it found it.
    pub(crate) async fn repin(
        &self,
        tx: &Transaction<'_>,
        context: &str,
    ) -> Result<(), BatchError> {
        self.run_checking_role(tx, REPIN_SQL, context, "pinning the session")
            .await
    }

    /// Leaves the job's session in `tx` before our own writes; fails when the job's SQL
    /// changed the role.
    pub(crate) async fn leave(
        &self,
        tx: &Transaction<'_>,
        context: &str,
    ) -> Result<(), BatchError> {
        self.run_checking_role(tx, LEAVE_SQL, context, "resetting the role")
            .await
    }

    /// Runs `sql`, whose first column is the role the job's SQL left, and checks it.
    async fn run_checking_role(
        &self,
        tx: &Transaction<'_>,
        sql: &str,
        context: &str,
        step: &str,
    ) -> Result<(), BatchError> {
        let row = async {
            let statement = tx.prepare_cached(sql).await?;
            tx.query_one(&statement, &[]).await
        }
        .await
        .map_err(|e| BatchError::from_driver(format!("{context}: {step}"), &e))?;
        self.check_role(row.get(0), context)
    }

    fn check_role(&self, current: String, context: &str) -> Result<(), BatchError> {
        match &self.run_as {
            Some(role) if *role != current => Err(BatchError {
                context: context.to_string(),
                sqlstate: None,
                message: format!(
                    "the job's SQL changed the session's role from {role} to {current} (SET ROLE, RESET ROLE or set_config('role', …)); \
                     its batch was rolled back: a job runs as the role that enqueued it"
                ),
                connection_closed: false,
                canceled_by_us: false,
            }),
            _ => Ok(()),
        }
    }
}

/// A failure to take the job's role or search_path is the job's (a role it cannot
/// take, a role since dropped), not its rows': unless it is transient, it carries no
/// SQLSTATE so that it fails the job with the server's words (`22023` for a missing
/// role would otherwise read as a row's data error).
fn refused(error: BatchError) -> BatchError {
    if error.class().is_transient() {
        return error;
    }
    let message = match &error.sqlstate {
        Some(code) => format!("{} (SQLSTATE {code})", error.message),
        None => error.message,
    };
    BatchError {
        sqlstate: None,
        message,
        ..error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_options_escape_spaces_in_values() {
        let options = startup_options();
        assert!(options.starts_with("-c DateStyle=ISO,\\ YMD -c IntervalStyle=postgres "));
        assert!(options.contains("-c extra_float_digits=3"));
        assert_eq!(options.matches("-c ").count(), PINNED.len());
    }

    #[test]
    fn a_changed_role_is_refused_and_an_unchanged_one_passes() {
        let session = JobSession {
            run_as: Some("engineer".to_string()),
            search_path: None,
        };
        assert!(session.check_role("engineer".to_string(), "job").is_ok());
        let error = session
            .check_role("postgres".to_string(), "job \"x\"")
            .unwrap_err();
        assert!(
            error.message.contains("from engineer to postgres"),
            "{error}"
        );
        assert_eq!(
            error.class(),
            backfill_core::error_class::ErrorClass::JobLevel
        );
        // A job without a recorded role runs as the daemon: nothing to compare.
        assert!(JobSession::default().check_role("x".into(), "job").is_ok());
    }
}
