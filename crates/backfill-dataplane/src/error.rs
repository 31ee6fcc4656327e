//! Errors of the data plane, reduced to what the core's error classes need.

use backfill_core::error_class::{classify, ErrorClass, ErrorFacts};

/// A failed statement of a batch, with the context an operator needs.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{context}: {message}{}", sqlstate.as_deref().map(|s| format!(" (SQLSTATE {s})")).unwrap_or_default())]
pub struct BatchError {
    /// What we were doing: which job, which step, which key range.
    pub context: String,
    /// SQLSTATE from the server, when the server answered.
    pub sqlstate: Option<String>,
    /// The server's (or driver's) message.
    pub message: String,
    /// The connection is gone: nothing of the transaction was committed.
    pub connection_closed: bool,
    /// We cancelled the statement ourselves (blocking production, shutdown).
    pub canceled_by_us: bool,
}

impl BatchError {
    /// Reduces a driver error to plain data with `context`.
    pub fn from_driver(context: impl Into<String>, e: &tokio_postgres::Error) -> Self {
        let (sqlstate, message) = match e.as_db_error() {
            Some(db) => {
                let mut message = db.message().to_string();
                if let Some(detail) = db.detail() {
                    message.push_str(": ");
                    message.push_str(detail);
                }
                (Some(db.code().code().to_string()), message)
            }
            None => (None, e.to_string()),
        };
        BatchError {
            context: context.into(),
            sqlstate,
            message,
            connection_closed: e.is_closed()
                || (e.as_db_error().is_none()
                    && std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())),
            canceled_by_us: false,
        }
    }

    /// A pool that could not hand out a connection.
    pub fn from_pool(context: impl Into<String>, e: &deadpool_postgres::PoolError) -> Self {
        BatchError {
            context: context.into(),
            sqlstate: None,
            message: e.to_string(),
            connection_closed: true,
            canceled_by_us: false,
        }
    }

    /// Which of the core's classes this error belongs to.
    pub fn class(&self) -> ErrorClass {
        classify(&ErrorFacts {
            sqlstate: self.sqlstate.as_deref(),
            message: &self.message,
            connection_closed: self.connection_closed,
            canceled_by_us: self.canceled_by_us,
        })
    }
}

/// Errors outside a batch: configuration and job definitions.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// The data plane cannot be set up as configured.
    #[error("{0}")]
    Config(String),
    /// The job cannot run as defined; the message says why, for `last_error`.
    #[error("{0}")]
    JobDefinition(String),
    /// A statement failed.
    #[error(transparent)]
    Batch(#[from] BatchError),
}
