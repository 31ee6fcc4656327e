//! The job's phase machine, as pure decisions: what follows when a pass runs out of keys,
//! what a verification count means, when a job that cannot move must rest, and which
//! throttle outcome a transient batch error is. The worker does the I/O and obeys.
//!
//! A whole job goes scan → (retry failed keys) → verify, and sweeps the table again while
//! verification still finds pending rows, up to a limit; it succeeds only at 100 %.

use std::time::Duration;

use crate::error_class::TransientKind;
use crate::throttle::BatchOutcome;

/// What follows once the job's key source ran dry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterKeysRanDry {
    /// Failed keys are due (now or after `due_in`): retry them, entering the retry phase
    /// first when `enter` (the job is not in it yet).
    RetryFailedKeys {
        /// Whether the job must switch to the retry phase.
        enter: bool,
        /// How long until the next failed key is due (zero: now).
        due_in: Duration,
    },
    /// No failed key left to retry: count what is left.
    Verify,
}

/// Decides what follows an exhausted key source: `next_retry_due` is when the next failed
/// key may be retried (`None`: none left within its attempts).
pub fn after_keys_ran_dry(
    in_retry_phase: bool,
    next_retry_due: Option<Duration>,
) -> AfterKeysRanDry {
    match next_retry_due {
        Some(due_in) => AfterKeysRanDry::RetryFailedKeys {
            enter: !in_retry_phase,
            due_in,
        },
        None => AfterKeysRanDry::Verify,
    }
}

/// What a verification count found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerificationCount {
    /// Rows still matching the pending predicate.
    pub pending: i64,
    /// Rows in `backfill.failed_rows` for the job.
    pub failed: i64,
    /// Verification sweeps recorded before this count.
    pub sweeps_done: i32,
    /// Whether the count ends a verification sweep (rather than the scan or retries).
    pub after_sweep: bool,
}

/// The verdict on a verification count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerificationVerdict {
    /// Rows are still pending: walk the table again; `sweeps` is the new sweep count.
    SweepAgain {
        /// Sweeps done, counting the one that just ended.
        sweeps: i32,
    },
    /// The job cannot succeed: fail it with this `last_error`.
    Fail(String),
    /// Nothing pending, nothing failed: the job succeeded.
    Succeed,
}

/// Judges a verification count: sweep again while sweeps are left, else fail with a
/// message that says what to do; succeed only when nothing is pending or failed.
/// `job_id` and `job_name` go into the messages (the name quoted for SQL).
pub fn judge_verification(
    count: VerificationCount,
    max_sweeps: i32,
    job_id: i64,
    job_name: &str,
) -> VerificationVerdict {
    let VerificationCount {
        pending,
        failed,
        sweeps_done,
        after_sweep,
    } = count;
    if pending > 0 {
        let sweeps = sweeps_done + i32::from(after_sweep);
        if sweeps < max_sweeps {
            return VerificationVerdict::SweepAgain { sweeps };
        }
        return VerificationVerdict::Fail(format!(
            "{pending} rows still match pending_predicate after {sweeps} verification sweeps; \
             something keeps making rows pending (or batch_sql does not change what pending_predicate tests)"
        ));
    }
    if failed > 0 {
        return VerificationVerdict::Fail(format!(
            "{failed} rows failed (see backfill.failed_rows where job_id = {job_id}); fix them, then select backfill.retry_failed('{}')",
            job_name.replace('\'', "''")
        ));
    }
    VerificationVerdict::Succeed
}

/// Batches that must fail in a row, besides the stuck time passing, before a job is taken
/// for stuck: time alone is not enough, a long hold between two failures is not a job that
/// cannot move.
pub const MIN_FAILED_BATCHES_TO_REST: u32 = 3;

/// Batches failing in a row (transient errors, no commit in between), and since when;
/// `T` is the caller's clock (an `Instant`, or a `Duration` in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailingStreak<T> {
    started: Option<(T, u32)>,
}

impl<T> Default for FailingStreak<T> {
    fn default() -> Self {
        FailingStreak { started: None }
    }
}

impl<T: Copy + PartialOrd + std::ops::Sub<Output = Duration>> FailingStreak<T> {
    /// A batch committed: the streak is over.
    pub fn reset(&mut self) {
        self.started = None;
    }

    /// Records a failed batch at `now`; true when the job is stuck: at least
    /// [`MIN_FAILED_BATCHES_TO_REST`] failed in a row over at least `stuck_after`.
    pub fn failed(&mut self, now: T, stuck_after: Duration) -> bool {
        let (since, batches) = self.started.get_or_insert((now, 0));
        *batches += 1;
        *batches >= MIN_FAILED_BATCHES_TO_REST && now - *since >= stuck_after
    }
}

/// The throttle's view of a transient batch error of `kind` after `duration`: lock trouble
/// and timeouts cut the batch in their own ways, being cancelled for blocking production
/// hardest, anything else as a plain transient error.
pub fn transient_outcome(kind: TransientKind, duration: Duration) -> BatchOutcome {
    match kind {
        TransientKind::LockTimeout | TransientKind::Deadlock => {
            BatchOutcome::LockTimeout { duration }
        }
        TransientKind::StatementTimeout => BatchOutcome::StatementTimeout { duration },
        TransientKind::QueryCanceled => BatchOutcome::CancelledForBlocking { duration },
        _ => BatchOutcome::TransientError { duration },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn dry_keys_lead_to_due_retries_first_then_to_verification() {
        assert_eq!(
            after_keys_ran_dry(false, Some(Duration::ZERO)),
            AfterKeysRanDry::RetryFailedKeys {
                enter: true,
                due_in: Duration::ZERO
            }
        );
        // Already retrying: no second phase change, just wait for the next due key.
        assert_eq!(
            after_keys_ran_dry(true, Some(SECOND)),
            AfterKeysRanDry::RetryFailedKeys {
                enter: false,
                due_in: SECOND
            }
        );
        assert_eq!(after_keys_ran_dry(false, None), AfterKeysRanDry::Verify);
        assert_eq!(after_keys_ran_dry(true, None), AfterKeysRanDry::Verify);
    }

    fn count(pending: i64, failed: i64, sweeps_done: i32, after_sweep: bool) -> VerificationCount {
        VerificationCount {
            pending,
            failed,
            sweeps_done,
            after_sweep,
        }
    }

    #[test]
    fn a_job_succeeds_only_with_nothing_pending_and_nothing_failed() {
        assert_eq!(
            judge_verification(count(0, 0, 0, false), 3, 7, "j"),
            VerificationVerdict::Succeed
        );
        assert_eq!(
            judge_verification(count(0, 0, 2, true), 3, 7, "j"),
            VerificationVerdict::Succeed
        );
    }

    #[test]
    fn pending_rows_are_swept_again_until_the_sweeps_run_out() {
        // After the scan, the first sweep; each sweep that ends still pending counts.
        assert_eq!(
            judge_verification(count(5, 0, 0, false), 3, 7, "j"),
            VerificationVerdict::SweepAgain { sweeps: 0 }
        );
        assert_eq!(
            judge_verification(count(5, 0, 0, true), 3, 7, "j"),
            VerificationVerdict::SweepAgain { sweeps: 1 }
        );
        assert_eq!(
            judge_verification(count(5, 0, 1, true), 3, 7, "j"),
            VerificationVerdict::SweepAgain { sweeps: 2 }
        );
        let VerificationVerdict::Fail(message) =
            judge_verification(count(5, 9, 2, true), 3, 7, "j")
        else {
            panic!("three sweeps still pending must fail");
        };
        assert!(
            message.starts_with("5 rows still match pending_predicate after 3 verification sweeps"),
            "{message}"
        );
    }

    #[test]
    fn failed_rows_fail_the_job_with_how_to_retry_them_quoted_for_sql() {
        let VerificationVerdict::Fail(message) =
            judge_verification(count(0, 4, 0, false), 3, 42, "it's")
        else {
            panic!("failed rows must fail the job");
        };
        assert!(
            message.starts_with("4 rows failed (see backfill.failed_rows where job_id = 42)"),
            "{message}"
        );
        assert!(
            message.ends_with("select backfill.retry_failed('it''s')"),
            "{message}"
        );
    }

    #[test]
    fn a_job_is_stuck_only_after_enough_failures_over_enough_time() {
        let stuck_after = Duration::from_secs(120);
        let mut streak = FailingStreak::<Duration>::default();
        // Many failures quickly: not stuck, time has not passed.
        for at in 0..10 {
            assert!(!streak.failed(Duration::from_millis(at), stuck_after));
        }
        let mut streak = FailingStreak::<Duration>::default();
        // Time passed but only two failures (a long hold between them): not stuck.
        assert!(!streak.failed(Duration::ZERO, stuck_after));
        assert!(!streak.failed(Duration::from_secs(600), stuck_after));
        // The third, still past the time: stuck.
        assert!(streak.failed(Duration::from_secs(601), stuck_after));
        // A commit ends the streak.
        streak.reset();
        assert!(!streak.failed(Duration::from_secs(700), stuck_after));
    }

    #[test]
    fn transient_errors_map_to_the_throttle_outcome_of_their_kind() {
        let d = SECOND;
        assert_eq!(
            transient_outcome(TransientKind::LockTimeout, d),
            BatchOutcome::LockTimeout { duration: d }
        );
        assert_eq!(
            transient_outcome(TransientKind::Deadlock, d),
            BatchOutcome::LockTimeout { duration: d }
        );
        assert_eq!(
            transient_outcome(TransientKind::StatementTimeout, d),
            BatchOutcome::StatementTimeout { duration: d }
        );
        assert_eq!(
            transient_outcome(TransientKind::QueryCanceled, d),
            BatchOutcome::CancelledForBlocking { duration: d }
        );
        assert_eq!(
            transient_outcome(TransientKind::ConnectionLost, d),
            BatchOutcome::TransientError { duration: d }
        );
    }
}
