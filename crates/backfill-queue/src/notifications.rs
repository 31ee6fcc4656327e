//! Notifications of changes to the queue: every enqueue and every steering call
//! (`pause`, `resume`, `cancel`, `retry_failed`) sends `NOTIFY backfill_control`
//! with the job's name, so an idle worker can claim at once instead of at its
//! next poll.

use sqlx::postgres::PgListener;

use crate::{Context as _, Queue, QueueError};

/// The channel `backfill.notify_control` notifies.
pub const CONTROL_CHANNEL: &str = "backfill_control";

/// A session listening on [`CONTROL_CHANNEL`]; it holds one connection of the
/// queue's pool for as long as it lives.
pub struct QueueNotifications(PgListener);

/// What a wait for a notification brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueChange {
    /// A job changed: the payload names it.
    Job(String),
    /// The listening connection was lost and has been opened again; anything
    /// notified meanwhile was lost with it.
    MaybeMissed,
}

impl Queue {
    /// Starts listening for queue changes.
    pub async fn listen_for_changes(&self) -> Result<QueueNotifications, QueueError> {
        let mut listener = PgListener::connect_with(self.pool())
            .await
            .context("connecting to listen for queue changes")?;
        listener
            .listen(CONTROL_CHANNEL)
            .await
            .context("LISTEN backfill_control")?;
        Ok(QueueNotifications(listener))
    }
}

impl QueueNotifications {
    /// Waits for the next change.
    pub async fn next(&mut self) -> Result<QueueChange, QueueError> {
        let notification = self
            .0
            .try_recv()
            .await
            .context("waiting for queue changes")?;
        Ok(match notification {
            Some(notification) => QueueChange::Job(notification.payload().to_string()),
            None => QueueChange::MaybeMissed,
        })
    }
}
