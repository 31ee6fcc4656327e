//! The lease on one job, as both planes fence their writes with it.
//!
//! A claim stamps the job row with a fresh [`LeaseToken`]. Every later write by the
//! worker — heartbeat, state change (control plane), batch commit (data plane) — is
//! conditional on that token, so a worker whose lease was taken over, or whose job was
//! paused or cancelled (which clears the token), can no longer change anything.

use std::fmt;
use std::time::Duration;

use uuid::Uuid;

/// The fencing token of one claim of one job (`backfill.jobs.lease_token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub Uuid);

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A worker's lease on one job: which job, the token its writes are fenced on, and how
/// long each heartbeat or committed batch extends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub job_id: i64,
    pub token: LeaseToken,
    /// A heartbeat or committed batch extends the lease by this much.
    pub duration: Duration,
}

impl Lease {
    /// [`Lease::duration`] in whole milliseconds, as the SQL takes it.
    pub fn millis(&self) -> i64 {
        millis(self.duration)
    }
}

/// A duration in whole milliseconds for SQL (`$n * interval '1 millisecond'`), saturating.
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_go_to_sql_in_saturating_milliseconds() {
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::MAX), i64::MAX);
        let lease = Lease {
            job_id: 1,
            token: LeaseToken(Uuid::nil()),
            duration: Duration::from_millis(1500),
        };
        assert_eq!(lease.millis(), 1500);
    }
}
