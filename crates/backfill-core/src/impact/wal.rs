//! Production's waits on the WAL: a second harm judge of the impact budget (`wal_rise`,
//! off by default while under trial).
//!
//! A backfill hurts production mostly at its commit flushes, and production's own
//! sessions waiting there are that harm seen directly, not through a canary's few round
//! trips. Issue 19's sixteenth round sampled `pg_stat_activity` every 20 ms next to
//! pgbench (`scripts/frontier-timelines`): production's active sessions waited on the WAL
//! (`IO:WALSync`, `IO:WALWrite`, `LWLock:WALWrite`) in 55–70 % of the samples alone and up
//! to 80 % next to a backfill over budget. Replayed, this judge cut 3.5 times a minute in
//! runs over budget and 1.2 within, the canary's test 4.2 and 1.8 (60 runs; per run, no
//! better at telling them apart), and on in the daemon it did not keep the budget better.
//! Hence off by default.

use super::{Evidence, Tail, BASELINE_RESTS};

/// Production's active sessions in one sample, and how many of them waited on the WAL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalWaitCount {
    /// Active sessions waiting on the WAL.
    pub waiting: u32,
    /// Active sessions.
    pub active: u32,
}

impl WalWaitCount {
    fn add(&mut self, other: WalWaitCount) {
        self.waiting = self.waiting.saturating_add(other.waiting.min(other.active));
        self.active = self.active.saturating_add(other.active);
    }

    fn share(self) -> Option<f64> {
        (self.active > 0).then(|| f64::from(self.waiting) / f64::from(self.active))
    }
}

/// Fewest active sessions a rest's share is learned from: at 200 tx/s a two-second rest
/// sees about a hundred.
pub const MIN_ACTIVE_SEEN: u32 = 20;

/// A share at rest this low or high leaves the test nothing to tell: no commit waits on
/// the WAL (asynchronous commits, `fsync = off`), or every active session does already.
const USABLE_SHARES: std::ops::RangeInclusive<f64> = 0.02..=0.99;

/// The share of production's active sessions waiting on the WAL while backfilld rests,
/// pooled over the latest [`BASELINE_RESTS`] rests (as the canaries' tail is).
#[derive(Debug, Clone, Default)]
pub(super) struct WalBaseline {
    rests: Vec<WalWaitCount>,
    current: WalWaitCount,
}

impl WalBaseline {
    /// A sample taken while resting, after the drain.
    pub(super) fn observe(&mut self, count: WalWaitCount) {
        self.current.add(count);
    }

    /// A rest begins: its samples start from none.
    pub(super) fn begin_rest(&mut self) {
        self.current = WalWaitCount::default();
    }

    /// A rest ends: its samples join the baseline when there are enough of them.
    pub(super) fn end_rest(&mut self) {
        let rest = std::mem::take(&mut self.current);
        if rest.active < MIN_ACTIVE_SEEN {
            return;
        }
        if self.rests.len() == BASELINE_RESTS {
            self.rests.remove(0);
        }
        self.rests.push(rest);
    }

    /// The share at rest, when learned and usable.
    pub(super) fn share(&self) -> Option<f64> {
        let mut pooled = WalWaitCount::default();
        for rest in &self.rests {
            pooled.add(*rest);
        }
        pooled.share().filter(|share| USABLE_SHARES.contains(share))
    }
}

/// Wald's test over production's active sessions since the pace last changed: each one
/// seen is a trial, waiting on the WAL or not, between the share at rest and that share
/// risen by `rise`; the error rates are the canaries' test's ([`Evidence`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct WalEvidence {
    log_ratio: f64,
}

impl WalEvidence {
    /// Weighs one sample, `calm` being the share at rest and `rise` the harm's ratio to it.
    pub(super) fn observe(&mut self, count: WalWaitCount, calm: f64, rise: f64) {
        let harm = (calm * rise).min(1.0 - (1.0 - calm) / 2.0);
        if harm.is_nan() || harm <= calm {
            return;
        }
        let waiting = f64::from(count.waiting.min(count.active));
        let not_waiting = f64::from(count.active) - waiting;
        // Never below the bound calm would stop at (as a CUSUM floors at zero): this judge
        // does not stop there, and a long calm spell must not hide harm that follows it.
        self.log_ratio = (self.log_ratio
            + waiting * (harm / calm).ln()
            + not_waiting * ((1.0 - harm) / (1.0 - calm)).ln())
        .max(Evidence::calm_bound());
    }

    /// Harm once the evidence passes Wald's bound; this judge only ever cuts (calm is the
    /// canaries' to say: at 20 tx/s production shows too few active sessions to show calm
    /// within minutes).
    pub(super) fn verdict(&self) -> Option<Tail> {
        (self.log_ratio >= Evidence::harm_bound()).then_some(Tail::Harm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(waiting: u32, active: u32) -> WalWaitCount {
        WalWaitCount { waiting, active }
    }

    #[test]
    fn the_baseline_pools_the_latest_rests_with_enough_sessions_seen() {
        let mut baseline = WalBaseline::default();
        assert_eq!(baseline.share(), None, "nothing learned yet");
        baseline.begin_rest();
        baseline.observe(count(5, 10));
        baseline.end_rest();
        assert_eq!(baseline.share(), None, "ten sessions are too few");
        for share in [6, 7, 5, 6, 6, 6] {
            baseline.begin_rest();
            for _ in 0..5 {
                baseline.observe(count(share, 10));
            }
            baseline.end_rest();
        }
        // The latest five rests: 7, 5, 6, 6, 6 of ten.
        let share = baseline.share().expect("learned");
        assert!((share - 0.6).abs() < 1e-9, "{share}");
    }

    #[test]
    fn no_wal_waits_at_rest_is_no_baseline() {
        let mut baseline = WalBaseline::default();
        baseline.begin_rest();
        baseline.observe(count(0, 100));
        baseline.end_rest();
        assert_eq!(baseline.share(), None);
    }

    #[test]
    fn more_sessions_waiting_than_at_rest_is_harm_and_as_many_is_not() {
        let (calm, rise) = (0.6, 1.15);
        let mut harmed = WalEvidence::default();
        let mut calmed = WalEvidence::default();
        let mut samples = 0;
        while harmed.verdict().is_none() {
            harmed.observe(count(8, 10), calm, rise);
            calmed.observe(count(6, 10), calm, rise);
            samples += 1;
            assert!(samples < 100, "80 % against 60 % never shown");
        }
        assert_eq!(harmed.verdict(), Some(Tail::Harm));
        assert_eq!(calmed.verdict(), None, "at the share at rest");
        for _ in 0..1_000 {
            calmed.observe(count(6, 10), calm, rise);
        }
        assert_eq!(calmed.verdict(), None, "calm is not this judge's to say");
        // Harm after a long calm spell shows within the samples it takes from the calm
        // bound, not after as many as the calm spell held.
        let mut after_calm = 0;
        while calmed.verdict().is_none() {
            calmed.observe(count(8, 10), calm, rise);
            after_calm += 1;
            assert!(
                after_calm <= 2 * samples,
                "harm hidden by the calm before it"
            );
        }
    }

    #[test]
    fn waiting_counts_no_more_than_the_active_sessions() {
        let mut evidence = WalEvidence::default();
        for _ in 0..100 {
            evidence.observe(count(50, 0), 0.6, 1.15);
        }
        assert_eq!(evidence.verdict(), None);
    }
}
