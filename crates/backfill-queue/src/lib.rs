//! Control plane of backfilld: the `backfill` schema (embedded migrations) and
//! everything workers and operators do with the queue itself — enqueue, claim
//! with `FOR UPDATE SKIP LOCKED`, leases and their heartbeat, state changes,
//! steering and status. Batch data never passes through here (see the data plane).

mod events;
mod job;
mod lease;
mod notifications;
mod schema;
mod slices;
mod status;
mod undo;

pub use events::{EventWait, JobEvent, JobEvents, EVENTS_CHANNEL};
pub use job::{Job, JobState, NewJob, Phase};
pub use lease::{ClaimedJob, HeartbeatReport, JobProgress, Queue, Tunables};
pub use notifications::{QueueChange, QueueNotifications, CONTROL_CHANNEL};
pub use schema::{migrate, schema_is_current, MIGRATOR};
pub use slices::{SliceSummary, Slices, StealCandidate};
pub use status::{JobStatus, SteeringVerb};
pub use undo::{purge_expired_undo, purge_undo, revert, undo_sizes, RevertRequest};

/// What can go wrong in the control plane.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A query against the queue failed; `context` says which operation.
    #[error("{context}: {source}")]
    Database {
        context: String,
        #[source]
        source: sqlx::Error,
    },
    /// Applying the embedded migrations failed.
    #[error("applying the backfill schema migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database refused a request with a message meant for the user
    /// (a refused job definition, an unknown job name, a wrong state).
    #[error("{message}")]
    Refused {
        message: String,
        sqlstate: Option<String>,
    },
}

impl QueueError {
    /// Wraps a sqlx error, turning errors raised by our own SQL (validation
    /// trigger, steering functions) into [`QueueError::Refused`] so the user
    /// sees just the message.
    pub(crate) fn from_sqlx(context: impl Into<String>, source: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &source {
            let sqlstate = db.code().map(|c| c.into_owned());
            let ours = matches!(
                sqlstate.as_deref(),
                Some(
                    "P0001"
                        | "23514"
                        | "42P01"
                        | "42703"
                        | "42P16"
                        | "42601"
                        | "42809"
                        | "42602"
                        | "P0002"
                        | "55000"
                        | "23505"
                        | "02000"
                        | "22023"
                )
            );
            if ours {
                let message = match (sqlstate.as_deref(), db.constraint()) {
                    (Some("23505"), Some("jobs_name_key")) => {
                        "a backfill job with this name already exists".to_string()
                    }
                    _ => db.message().to_string(),
                };
                return QueueError::Refused { message, sqlstate };
            }
        }
        QueueError::Database {
            context: context.into(),
            source,
        }
    }

    /// True when the database could not be reached (as opposed to refusing).
    pub fn is_connection_problem(&self) -> bool {
        matches!(
            self,
            QueueError::Database {
                source: sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_),
                ..
            }
        )
    }
}

/// Shorthand for `map_err(|e| QueueError::from_sqlx(context, e))`.
pub(crate) trait Context<T> {
    fn context(self, context: &str) -> Result<T, QueueError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn context(self, context: &str) -> Result<T, QueueError> {
        self.map_err(|e| QueueError::from_sqlx(context, e))
    }
}
