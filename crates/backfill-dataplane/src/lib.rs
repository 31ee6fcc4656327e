//! Data plane of backfilld: runs each batch of a job's SQL on the target table
//! together with the job's checkpoint in one fenced transaction, isolates
//! failing rows, probes the database's health and cancels what must not wait.
//!
//! Built on deadpool-postgres/tokio-postgres rather than sqlx because the batch
//! path needs things sqlx does not expose: per-session settings on every pooled
//! connection, cancellation of a running statement, and full control of the
//! transaction around user SQL.

mod batch;
mod batch_keys;
mod batch_statement;
mod error;
mod health;
mod plan;
mod pool;
mod prometheus;
mod runner_reads;
mod session;
mod slicing;
mod target;
mod target_reads;
mod target_sql;
mod undo;

pub use batch::{
    BatchBackend, BatchRequest, BatchRunner, BatchStats, FailureReason, KeySource, RetryBackoff,
    RowFailure, RunOutcome,
};
pub use error::{BatchError, DataPlaneError};
pub use health::{
    HealthProbe, LatencyCanary, ProductionWalWaits, Signals, CANARY_SQL, WAITING_ON_THE_WAL,
};
pub use plan::{TrialBatch, UNDO_ROW_OVERHEAD_BYTES};
pub use pool::{connect_pool, error_chain, Endpoint, SessionSettings, SslMode};
pub use prometheus::PrometheusQuery;
pub use session::{pinned_startup_settings, JobSession};
pub use target::{BatchTarget, JobDefinition};
pub use target_reads::PassWrites;
pub use undo::row_image;
