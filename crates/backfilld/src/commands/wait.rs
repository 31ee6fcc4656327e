//! `backfilld wait NAME [--timeout DURATION]`: the completion gate for scripts and CI.
//! Exits 0 once the job succeeded, 1 once it failed or was cancelled, 3 when the timeout
//! passes first, 2 for a job that does not exist.

use std::time::Duration;

use backfill_queue::{EventWait, JobEvents, JobState, Queue};
use tokio::time::Instant;

use crate::commands::CliFailure;

/// How often the state is read again when no event came: events are the fast path, this
/// bounds the delay when the listening session was lost or an event was missed.
const POLL: Duration = Duration::from_secs(1);

/// Waits for the job named `name` to finish, up to `timeout` (none: for ever).
pub async fn wait(queue: &Queue, name: &str, timeout: Option<Duration>) -> Result<(), CliFailure> {
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    // Listen before the first read, so a change between the two is not missed.
    let mut events = match queue.listen_for_events().await {
        Ok(events) => Some(events),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for job events; polling every second");
            None
        }
    };
    loop {
        let (state, last_error) = queue
            .outcome_of(name)
            .await?
            .ok_or_else(|| CliFailure::Usage(format!("no backfill job named '{name}'")))?;
        match state {
            JobState::Succeeded => {
                println!("job {name}: succeeded");
                return Ok(());
            }
            JobState::Failed | JobState::Cancelled => {
                let reason = last_error.map_or(String::new(), |error| format!(": {error}"));
                return Err(CliFailure::Fatal(anyhow::anyhow!(
                    "job {name} {}{reason}",
                    state.as_str()
                )));
            }
            JobState::Pending | JobState::Running | JobState::Paused => {}
        }
        let left = deadline.map(|at| at.saturating_duration_since(Instant::now()));
        if left.is_some_and(|left| left.is_zero()) {
            return Err(CliFailure::TimedOut(format!(
                "job {name} is still {} after {}",
                state.as_str(),
                humantime::format_duration(timeout.unwrap_or_default())
            )));
        }
        let nap = left.map_or(POLL, |left| left.min(POLL));
        match events.as_mut() {
            Some(listener) => {
                if !next_event_of(listener, name, nap).await {
                    events = None;
                }
            }
            None => tokio::time::sleep(nap).await,
        }
    }
}

/// Waits up to `nap` for an event (any event of this job ends the wait early: its state
/// is read again); `false` when the listener failed (the caller falls back to polling).
async fn next_event_of(listener: &mut JobEvents, name: &str, nap: Duration) -> bool {
    let until = Instant::now() + nap;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match listener.next(left).await {
            Ok(None) | Ok(Some(EventWait::MaybeMissed)) => return true,
            Ok(Some(EventWait::Event(Ok(event)))) if event.job == name => return true,
            Ok(Some(EventWait::Event(_))) => {}
            Err(e) => {
                tracing::warn!(error = %e, "stopped listening for job events; polling every second");
                return false;
            }
        }
    }
}
