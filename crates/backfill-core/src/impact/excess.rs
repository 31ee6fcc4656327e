//! The slow share backfilld's batches add to production, from canaries timed inside them.
//!
//! Issue 19's ninth round (`scripts/frontier-timelines --overlap`, 91 frontier runs next
//! to pgbench at 200 and 600 tx/s): of the transactions in flight while one of
//! backfilld's batches was, a median of 4.4 % ended over the budget's line, against 0.55 %
//! of the others; the batches were in flight 2–6 % of the time. So production's p99 moves when the share the batches add,
//! `busy × (slow inside − slow outside)`, reaches a few tenths of a percent. A canary
//! timed at an arbitrary moment lands inside a batch one time in twenty-five and sees
//! that excess diluted in the disk's own stalls; a canary timed inside a batch sees it
//! whole, and the daemon knows exactly how long its batches are in flight.

use std::time::Duration;

/// How sure the excess's bounds are (one-sided, normal quantile): 95 %.
const CONFIDENCE_Z: f64 = 1.645;

/// Canaries over the line among those timed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    timed: u32,
    over: u32,
}

impl Tally {
    fn record(&mut self, over: bool) {
        self.timed += 1;
        self.over += u32::from(over);
    }

    fn share(&self) -> f64 {
        f64::from(self.over) / f64::from(self.timed.max(1))
    }

    /// Wilson's score interval for the share over the line at [`CONFIDENCE_Z`]: sound
    /// where a handful of canaries hold none or one over it.
    fn bounds(&self) -> (f64, f64) {
        let n = f64::from(self.timed.max(1));
        let p = self.share();
        let z2 = CONFIDENCE_Z * CONFIDENCE_Z;
        let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
        let half = CONFIDENCE_Z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
        ((centre - half).max(0.0), (centre + half).min(1.0))
    }
}

/// What the in-batch canaries said over one span, for the judge and the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExcessReading {
    /// Share of the span's time backfilld's batches were in flight.
    pub busy_share: f64,
    /// Canaries timed inside a batch.
    pub inside_canaries: u32,
    /// Share of the canaries timed inside a batch over the line.
    pub inside_share: f64,
    /// Share of the canaries timed anywhere over the line.
    pub anywhere_share: f64,
    /// The slow share the batches add: `busy × (inside − anywhere)`.
    pub estimate: f64,
    /// The estimate with the inside share at its low Wilson bound.
    pub low: f64,
    /// The estimate with the inside share at its high Wilson bound.
    pub high: f64,
}

/// The in-batch canaries and the batches' busy time since the pace last changed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct ExcessEvidence {
    inside: Tally,
    anywhere: Tally,
    /// (when, the batches' busy time in all by then) at the span's start and latest.
    busy_from: Option<(Duration, Duration)>,
    busy_to: Option<(Duration, Duration)>,
}

impl ExcessEvidence {
    /// The latest busy mark recorded, if any: where the next span starts.
    pub(super) fn latest_mark(&self) -> Option<(Duration, Duration)> {
        self.busy_to.or(self.busy_from)
    }

    /// A span starting from the latest busy mark, if any.
    pub(super) fn from_mark(mark: Option<(Duration, Duration)>) -> Self {
        ExcessEvidence {
            busy_from: mark,
            ..Self::default()
        }
    }

    /// A canary timed inside a batch: over the line or not.
    pub(super) fn observe_inside(&mut self, over: bool) {
        self.inside.record(over);
    }

    /// A canary timed at its own interval, wherever it fell.
    pub(super) fn observe_anywhere(&mut self, over: bool) {
        self.anywhere.record(over);
    }

    /// The batches had been in flight `busy_total` in all by `at`.
    pub(super) fn record_busy(&mut self, at: Duration, busy_total: Duration) {
        match self.busy_from {
            Some((from, busy)) if at > from && busy_total >= busy => {
                self.busy_to = Some((at, busy_total));
            }
            // The first mark of the span, or a counter that went back: start over.
            _ => {
                self.busy_from = Some((at, busy_total));
                self.busy_to = None;
            }
        }
    }

    /// The reading so far; `None` before `min_inside` in-batch canaries or two busy marks.
    pub(super) fn reading(&self, min_inside: u32) -> Option<ExcessReading> {
        let ((from, busy_from), (to, busy_to)) = self.busy_from.zip(self.busy_to)?;
        if self.inside.timed < min_inside {
            return None;
        }
        let busy_share =
            ((busy_to - busy_from).as_secs_f64() / (to - from).as_secs_f64()).clamp(0.0, 1.0);
        let anywhere = self.anywhere.share();
        let (low, high) = self.inside.bounds();
        let added = |inside: f64| busy_share * (inside - anywhere).max(0.0);
        Some(ExcessReading {
            busy_share,
            inside_canaries: self.inside.timed,
            inside_share: self.inside.share(),
            anywhere_share: anywhere,
            estimate: added(self.inside.share()),
            low: added(low),
            high: added(high),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(timed: u32, over: u32) -> Tally {
        Tally { timed, over }
    }

    #[test]
    fn wilson_bounds_hold_the_share_and_narrow_with_more_canaries() {
        let (low, high) = tally(20, 2).bounds();
        assert!(low < 0.1 && 0.1 < high, "{low} {high}");
        let (low_more, high_more) = tally(200, 20).bounds();
        assert!(low < low_more && high_more < high);
        // None over: the low bound is zero, the high one is not.
        let (low, high) = tally(50, 0).bounds();
        assert_eq!(low, 0.0);
        assert!(high > 0.02 && high < 0.1, "{high}");
    }

    #[test]
    fn the_excess_is_the_busy_share_times_the_inside_share_over_the_anywhere_one() {
        let mut evidence = ExcessEvidence::from_mark(Some((Duration::ZERO, Duration::ZERO)));
        for i in 0..100 {
            evidence.observe_inside(i % 10 == 0);
        }
        for i in 0..200 {
            evidence.observe_anywhere(i % 100 == 0);
        }
        evidence.record_busy(Duration::from_secs(10), Duration::from_millis(400));
        let reading = evidence.reading(20).expect("enough canaries");
        assert!((reading.busy_share - 0.04).abs() < 1e-9);
        assert!((reading.estimate - 0.04 * (0.10 - 0.01)).abs() < 1e-9);
        assert!(reading.low < reading.estimate && reading.estimate < reading.high);
    }

    #[test]
    fn no_reading_before_enough_inside_canaries_or_a_second_busy_mark() {
        let mut evidence = ExcessEvidence::from_mark(None);
        for _ in 0..30 {
            evidence.observe_inside(false);
        }
        assert_eq!(evidence.reading(20), None, "no busy marks");
        evidence.record_busy(Duration::from_secs(1), Duration::ZERO);
        assert_eq!(evidence.reading(20), None, "one busy mark");
        evidence.record_busy(Duration::from_secs(2), Duration::from_millis(10));
        assert!(evidence.reading(20).is_some());
        assert_eq!(evidence.reading(31), None, "too few inside canaries");
    }
}
