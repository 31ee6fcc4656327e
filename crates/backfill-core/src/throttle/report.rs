//! What the controller learns from the batch that ran: its [`BatchReport`].

use std::time::Duration;

/// How a batch ended (row-level data errors are handled by bisection elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The batch committed `rows` rows in `duration`.
    Committed {
        /// Rows written by the batch.
        rows: u64,
        /// Wall time of the batch.
        duration: Duration,
    },
    /// Our batch waited on another session's lock past `lock_timeout` (map deadlocks here too).
    LockTimeout {
        /// Wall time until the error.
        duration: Duration,
    },
    /// Our batch was cancelled because it blocked production sessions.
    CancelledForBlocking {
        /// Wall time until the cancellation.
        duration: Duration,
    },
    /// The batch ran past `statement_timeout`.
    StatementTimeout {
        /// Wall time until the timeout.
        duration: Duration,
    },
    /// Another transient failure: connection loss, serialization failure, failover.
    TransientError {
        /// Wall time until the error.
        duration: Duration,
    },
}

impl BatchOutcome {
    /// Wall time the batch took, whatever its outcome.
    pub fn duration(&self) -> Duration {
        match *self {
            Self::Committed { duration, .. }
            | Self::LockTimeout { duration }
            | Self::CancelledForBlocking { duration }
            | Self::StatementTimeout { duration }
            | Self::TransientError { duration } => duration,
        }
    }
}

/// What happened to the batch that ran since the previous decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    /// Number of keys the batch was run with.
    pub size: u32,
    /// How it ended.
    pub outcome: BatchOutcome,
}
