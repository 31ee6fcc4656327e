//! Production latency: how much longer a trivial query takes than it does on a quiet
//! database, and the rows-per-second pace that keeps it from growing.
//!
//! Replication lag and lock waits do not show the harm a backfill does on a busy primary
//! whose CPUs it shares: production queries simply wait for a CPU (or for the WAL the
//! backfill floods), a few milliseconds each, and nothing trips. So the daemon times a
//! *canary*, a tiny committing transaction on a connection of its own, many times a
//! second, and treats the canary's round trip as what production sees right now.
//!
//! The scheme follows LEDBAT (RFC 6817), the congestion control of background transfers
//! that must yield to everything else on a link: what matters is not the round trip but
//! its *excess* over the base, the lowest round trip seen recently, which is the network
//! and the server's fixed cost. [`DelayDetector`] keeps that base (the minimum over the
//! last [`BASE_HISTORY`]) and counts canaries whose excess is over the threshold.
//! [`LatencyPacer`] turns those counts into a rate: the first delayed canary pins the rate
//! at half of what the last batch achieved, each further one halves it again (at most once
//! per [`CUT_SPACING`], so one burst of slow canaries is one cut), and every
//! [`GROWTH_INTERVAL`] without one grows it by [`GROWTH_FRACTION`] of the rate before the
//! last cut.
//! Once the rate is back where pacing began, pacing ends. The rate is spent in bursts of
//! at most [`PACING_WINDOW`] of it, because at one average rate short bursts are what
//! production notices least (docs/BENCHMARKS.md measures it).

use std::collections::VecDeque;
use std::time::Duration;

/// How far back the base round trip is remembered: long enough to include quiet moments
/// even while a backfill runs flat out, short enough to follow a changed network path.
pub const BASE_HISTORY: Duration = Duration::from_secs(60);

/// A paced batch carries at most this much of the paced rate.
pub const PACING_WINDOW: Duration = Duration::from_millis(10);

/// At most one cut per this long: the delays of one burst are one signal, and a cut needs
/// a moment to show its effect.
pub const CUT_SPACING: Duration = Duration::from_millis(250);

/// The paced rate grows once per this long without a delayed canary.
pub const GROWTH_INTERVAL: Duration = Duration::from_secs(1);

/// Each growth adds this fraction of the rate before the last cut: back where it was cut
/// after 20 quiet intervals. Slow on purpose: a background job may take its time to find
/// out that production has calmed down, not to find out that it suffers.
pub const GROWTH_FRACTION: f64 = 0.025;

/// One canary round trip, judged against the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanaryVerdict {
    /// Round trip minus the base round trip.
    pub excess: Duration,
    /// The excess is over the threshold: production is waiting.
    pub delayed: bool,
}

/// Judges canary round trips against the lowest one seen in the last [`BASE_HISTORY`].
#[derive(Debug, Clone)]
pub struct DelayDetector {
    threshold: Duration,
    /// Lowest round trip of each whole second of `now` that had a canary, oldest first.
    minima: VecDeque<(u64, Duration)>,
    delayed_total: u64,
}

impl DelayDetector {
    /// A detector that calls a canary delayed when its excess is over `threshold`.
    pub fn new(threshold: Duration) -> Self {
        DelayDetector {
            threshold,
            minima: VecDeque::new(),
            delayed_total: 0,
        }
    }

    /// Records the round trip of a canary that finished at `now` (a monotonic time since
    /// any origin) and judges it.
    pub fn observe(&mut self, now: Duration, round_trip: Duration) -> CanaryVerdict {
        let second = now.as_secs();
        match self.minima.back_mut() {
            Some((at, lowest)) if *at == second => *lowest = (*lowest).min(round_trip),
            _ => self.minima.push_back((second, round_trip)),
        }
        let oldest = second.saturating_sub(BASE_HISTORY.as_secs());
        while self.minima.front().is_some_and(|(at, _)| *at < oldest) {
            self.minima.pop_front();
        }
        let base = self.base().unwrap_or(round_trip);
        let excess = round_trip.saturating_sub(base);
        let delayed = excess > self.threshold;
        if delayed {
            self.delayed_total += 1;
        }
        CanaryVerdict { excess, delayed }
    }

    /// The lowest round trip remembered, if any canary finished yet.
    pub fn base(&self) -> Option<Duration> {
        self.minima.iter().map(|(_, lowest)| *lowest).min()
    }

    /// Delayed canaries since the detector was made.
    pub fn delayed_total(&self) -> u64 {
        self.delayed_total
    }
}

/// The rows-per-second pace that keeps canaries from being delayed; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct LatencyPacer {
    /// The paced rate; `None` while not pacing.
    rate: Option<f64>,
    /// Pacing ends once the rate grows back to this: the rate when pacing began.
    release_at: f64,
    /// Growth per [`GROWTH_INTERVAL`]: [`GROWTH_FRACTION`] of the rate before the last cut.
    step: f64,
    /// The delayed-canary count seen at the previous update.
    seen: Option<u64>,
    last_cut: Option<Duration>,
    last_change: Duration,
}

impl LatencyPacer {
    /// Takes in the daemon's delayed-canary count (monotonic) at `now`; returns true when
    /// this update cut the rate.
    ///
    /// `current_rate` is what the job achieves right now (the last batch's rows over its
    /// duration), the starting point of the first cut; `floor` is the lowest rate pacing
    /// may reach, so a job always finishes.
    pub fn update(
        &mut self,
        now: Duration,
        delayed_total: u64,
        current_rate: Option<f64>,
        floor: f64,
    ) -> bool {
        // The count at the first update is history, not news.
        let new_delays = self
            .seen
            .map_or(0, |seen| delayed_total.saturating_sub(seen));
        self.seen = Some(delayed_total.max(self.seen.unwrap_or(0)));
        let may_cut = self
            .last_cut
            .is_none_or(|at| now.saturating_sub(at) >= CUT_SPACING);
        if new_delays > 0 && may_cut {
            let before = match (self.rate, current_rate) {
                (Some(rate), _) => rate,
                (None, Some(rate)) if rate.is_finite() && rate > 0.0 => {
                    self.release_at = rate;
                    rate
                }
                // Nothing of ours ran yet: these delays are not ours to answer for.
                (None, _) => return false,
            };
            self.rate = Some((before / 2.0).max(floor));
            self.step = (before * GROWTH_FRACTION).max(floor * GROWTH_FRACTION);
            self.last_cut = Some(now);
            self.last_change = now;
            return true;
        }
        if let Some(rate) = self.rate {
            if new_delays == 0 && now.saturating_sub(self.last_change) >= GROWTH_INTERVAL {
                let grown = rate + self.step;
                self.rate = (grown < self.release_at).then_some(grown);
                self.last_change = now;
            }
        }
        false
    }

    /// The paced rate, `None` while not pacing.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn excess_is_measured_from_the_lowest_recent_round_trip() {
        let mut detector = DelayDetector::new(ms(1));
        assert_eq!(detector.observe(ms(0), ms(3)).excess, Duration::ZERO);
        assert_eq!(detector.observe(ms(50), ms(2)).excess, Duration::ZERO);
        let verdict = detector.observe(ms(100), ms(4));
        assert_eq!(verdict.excess, ms(2));
        assert!(verdict.delayed);
        // Exactly at the threshold is not delayed.
        assert!(!detector.observe(ms(150), ms(3)).delayed);
        assert_eq!(detector.delayed_total(), 1);
        assert_eq!(detector.base(), Some(ms(2)));
    }

    #[test]
    fn the_base_forgets_round_trips_older_than_its_history() {
        let mut detector = DelayDetector::new(ms(1));
        detector.observe(Duration::ZERO, ms(1));
        // The network path got slower for good: at first that reads as delay...
        assert!(detector.observe(Duration::from_secs(30), ms(5)).delayed);
        // ...and once the old minimum is out of the history, as the new base.
        let later = BASE_HISTORY + Duration::from_secs(2);
        assert!(!detector.observe(later, ms(5)).delayed);
        assert_eq!(detector.base(), Some(ms(5)));
        // One entry per second, whatever the number of canaries.
        for i in 0..100 {
            detector.observe(later + ms(i), ms(6));
        }
        assert!(detector.minima.len() <= 3);
    }

    #[test]
    fn first_delay_halves_the_rate_the_job_achieved_and_more_delays_halve_again() {
        let mut pacer = LatencyPacer::default();
        // The count before the first update is history.
        assert!(!pacer.update(ms(0), 7, Some(100_000.0), 1_000.0));
        assert_eq!(pacer.rate(), None);
        assert!(pacer.update(ms(100), 8, Some(100_000.0), 1_000.0));
        assert_eq!(pacer.rate(), Some(50_000.0));
        // Within CUT_SPACING of the last cut: the same burst, no second cut.
        assert!(!pacer.update(ms(200), 9, Some(100_000.0), 1_000.0));
        assert_eq!(pacer.rate(), Some(50_000.0));
        assert!(pacer.update(ms(400), 10, Some(40_000.0), 1_000.0));
        assert_eq!(pacer.rate(), Some(25_000.0));
    }

    #[test]
    fn the_rate_never_goes_below_the_floor() {
        let mut pacer = LatencyPacer::default();
        pacer.update(ms(0), 0, None, 1_000.0);
        let mut now = ms(0);
        for delays in 1..40 {
            now += CUT_SPACING;
            pacer.update(now, delays, Some(300_000.0), 1_000.0);
        }
        assert_eq!(pacer.rate(), Some(1_000.0));
    }

    #[test]
    fn quiet_seconds_grow_the_rate_back_until_pacing_ends() {
        let mut pacer = LatencyPacer::default();
        pacer.update(ms(0), 0, None, 1_000.0);
        pacer.update(ms(10), 1, Some(80_000.0), 1_000.0);
        assert_eq!(pacer.rate(), Some(40_000.0));
        // Less than a growth interval: unchanged.
        pacer.update(ms(900), 1, Some(40_000.0), 1_000.0);
        assert_eq!(pacer.rate(), Some(40_000.0));
        // Each quiet interval adds 2.5 % of the rate before the cut (2,000); the 20th
        // brings it back to 80,000, where pacing began, and ends it.
        let mut now = ms(10);
        let mut rates = Vec::new();
        while let Some(rate) = pacer.rate() {
            now += GROWTH_INTERVAL;
            pacer.update(now, 1, Some(rate), 1_000.0);
            rates.push(pacer.rate());
        }
        assert_eq!(rates.len(), 20, "{rates:?}");
        assert_eq!(rates[..3], [Some(42_000.0), Some(44_000.0), Some(46_000.0)]);
        assert_eq!(rates[18], Some(78_000.0));
        assert_eq!(rates[19], None);
    }

    #[test]
    fn delays_before_any_batch_ran_are_not_ours() {
        let mut pacer = LatencyPacer::default();
        pacer.update(ms(0), 0, None, 1_000.0);
        assert!(!pacer.update(ms(300), 5, None, 1_000.0));
        assert_eq!(pacer.rate(), None);
        // And they are not counted again once a batch has run.
        assert!(!pacer.update(ms(600), 5, Some(10_000.0), 1_000.0));
        assert_eq!(pacer.rate(), None);
    }
}
