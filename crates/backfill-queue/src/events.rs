//! Events: every change of a job's state (and every claim) is a `NOTIFY backfill_events`
//! with a JSON payload, sent by a trigger on `backfill.jobs` (migration 0006), so every
//! writer is covered. `backfilld wait` listens to them; so can anyone else.

use std::time::Duration;

use backfill_core::queue_sql;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;

use crate::{Context as _, JobState, Queue, QueueError};

/// The channel `backfill.notify_event` notifies.
pub const EVENTS_CHANNEL: &str = "backfill_events";

/// One event's payload, as the trigger writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// enqueued, claimed, paused, resumed, rested, retried, requeued, cancelled, failed, succeeded.
    pub event: String,
    pub job: String,
    pub id: i64,
    pub parent_id: Option<i64>,
    pub old_state: Option<String>,
    pub new_state: String,
    pub worker: Option<String>,
    pub last_error: Option<String>,
    pub rows_done: i64,
    /// The time of the change (the transaction's), as PostgreSQL renders it in JSON.
    pub at: String,
}

/// A session listening on [`EVENTS_CHANNEL`].
pub struct JobEvents(PgListener);

/// What a wait for an event brought.
#[derive(Debug, Clone, PartialEq)]
pub enum EventWait {
    /// An event (its raw payload, when it does not parse as a [`JobEvent`]).
    Event(Result<JobEvent, String>),
    /// The listening connection was lost and opened again; events meanwhile were lost.
    MaybeMissed,
}

impl Queue {
    /// Starts listening for job events.
    pub async fn listen_for_events(&self) -> Result<JobEvents, QueueError> {
        let mut listener = PgListener::connect_with(self.pool())
            .await
            .context("connecting to listen for job events")?;
        listener
            .listen(EVENTS_CHANNEL)
            .await
            .context("LISTEN backfill_events")?;
        Ok(JobEvents(listener))
    }

    /// Tells listeners (and the webhook) that the job has been throttled for `lasted`,
    /// most recently for `reason`: an event of the daemon's own, in the trigger's shape
    /// (`event` 'throttled', the state unchanged), plus `reason` and `throttled_seconds`.
    pub async fn notify_throttled(
        &self,
        job_id: i64,
        reason: &str,
        lasted: Duration,
    ) -> Result<(), QueueError> {
        sqlx::query(queue_sql::NOTIFY_THROTTLED)
            .bind(job_id)
            .bind(reason)
            .bind(lasted.as_secs_f64())
            .execute(self.pool())
            .await
            .context(&format!("notifying that job {job_id} is throttled"))?;
        Ok(())
    }

    /// The state and last_error of the job named `name`, or `None` if there is none.
    pub async fn outcome_of(
        &self,
        name: &str,
    ) -> Result<Option<(JobState, Option<String>)>, QueueError> {
        let row: Option<(String, Option<String>)> = sqlx::query_as(queue_sql::OUTCOME_OF)
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .context(&format!("reading the state of job {name:?}"))?;
        Ok(row.and_then(|(state, error)| state.parse().ok().map(|state| (state, error))))
    }
}

impl JobEvents {
    /// Waits up to `timeout` for the next event; `None` when none came.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<EventWait>, QueueError> {
        let Ok(received) = tokio::time::timeout(timeout, self.0.try_recv()).await else {
            return Ok(None);
        };
        let notification = received.context("waiting for job events")?;
        Ok(Some(match notification {
            Some(n) => EventWait::Event(
                serde_json::from_str(n.payload()).map_err(|_| n.payload().to_string()),
            ),
            None => EventWait::MaybeMissed,
        }))
    }
}
