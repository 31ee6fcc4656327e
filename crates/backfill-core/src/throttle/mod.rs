//! Adaptive throttle controller: decides the size of the next batch and how long to wait
//! before it, or whether to hold completely, from the latest health sample and the outcome
//! of the last batch.
//!
//! The controller is pure: no I/O and no clock. The caller passes `now` (a monotonic
//! [`Duration`](std::time::Duration) since any origin it likes), so every decision is
//! deterministic and can be replayed in tests with simulated time.
//!
//! How it decides, and why the defaults are what they are: `docs/THROTTLE.md` (the rules
//! for each signal, replication lag in time and bytes, the defaults against gh-ost and
//! pt-archiver). The unit tests are in `throttle/tests.rs`.
//!
//! The rooms, in the order of one decision: what the controller is tuned with
//! (`settings.rs`), what it reads (`health.rs`, `report.rs`), the state machine
//! (`controller.rs`), the signal checks that hold (`holds.rs`), the sizing and pacing of the
//! next batch (`pacing.rs`), and what it answers (`decision.rs`).

mod controller;
mod decision;
mod health;
mod holds;
mod pacing;
mod report;
mod settings;

pub use controller::ThrottleController;
pub use decision::{ThrottleDecision, ThrottleReason};
pub use health::{
    BlockingBackend, HealthSample, OperatorThrottle, QueryReading, ReplicaLag, SlotRetention,
    TableVacuum,
};
pub use pacing::DEFAULT_RATE_WINDOW;
pub use report::{BatchOutcome, BatchReport};
pub use settings::{
    QueryLimits, ThrottleSettings, ThrottleSettingsError, DEFAULT_MAX_ARCHIVE_PENDING_SEGMENTS,
    DEFAULT_MAX_SLOT_RETAINED_BYTES,
};

#[cfg(test)]
mod tests;
