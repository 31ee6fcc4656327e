//! Steering a running job: the recent rate a finish forecast extrapolates (throttled and
//! held time included), and when a throttled spell has lasted long enough to tell people.
//! Pure bookkeeping on times the caller passes in.

use std::collections::VecDeque;
use std::time::Duration;

/// Rows per second over the last `window` of wall time, from samples of a job's
/// `rows_done`. Time the job spent throttled or held counts: a job that ran at 1,000
/// rows/s for a minute and then held for nine makes 100 rows/s here, which is what its
/// finish depends on (an ETA from batch speed alone misses such a job by 10×).
#[derive(Debug, Clone)]
pub struct RecentRate {
    window: Duration,
    /// (time, rows done), oldest first; the first sample is the newest one at or before
    /// the window's start, so a full window is measured once there is that much history.
    samples: VecDeque<(Duration, i64)>,
}

impl RecentRate {
    /// A rate over the last `window` (at least a second).
    pub fn new(window: Duration) -> Self {
        RecentRate {
            window: window.max(Duration::from_secs(1)),
            samples: VecDeque::new(),
        }
    }

    /// Records that `rows_done` rows were done at time `at` (any fixed origin; times
    /// never go back).
    pub fn record(&mut self, at: Duration, rows_done: i64) {
        if self.samples.back().is_some_and(|(last, _)| at < *last) {
            return;
        }
        self.samples.push_back((at, rows_done));
        let window_start = at.saturating_sub(self.window);
        while self.samples.len() > 2 && self.samples[1].0 <= window_start {
            self.samples.pop_front();
        }
    }

    /// Rows per second over the window (or over the history there is, once it spans a
    /// quarter of the window); `None` before that.
    pub fn rows_per_second(&self) -> Option<f64> {
        let (first_at, first_rows) = *self.samples.front()?;
        let (last_at, last_rows) = *self.samples.back()?;
        let span = last_at.saturating_sub(first_at);
        if span.is_zero() || span < self.window / 4 {
            return None;
        }
        Some((last_rows - first_rows).max(0) as f64 / span.as_secs_f64())
    }
}

/// Watches a job's throttle and says once per spell when it has been throttled (slowed
/// or held, for any reason but its own rate limit) for longer than `after`.
#[derive(Debug, Clone)]
pub struct ThrottledSpell {
    after: Duration,
    /// When the current spell began, and whether it was reported.
    since: Option<(Duration, bool)>,
}

impl ThrottledSpell {
    /// Reports spells longer than `after`; zero reports none.
    pub fn new(after: Duration) -> Self {
        ThrottledSpell { after, since: None }
    }

    /// Notes whether the job is throttled at `at`; returns how long the spell has lasted
    /// the first time it passes `after`, `None` otherwise.
    pub fn observe(&mut self, at: Duration, throttled: bool) -> Option<Duration> {
        if !throttled {
            self.since = None;
            return None;
        }
        let (began, reported) = self.since.get_or_insert((at, false));
        let lasted = at.saturating_sub(*began);
        if self.after.is_zero() || *reported || lasted < self.after {
            return None;
        }
        *reported = true;
        Some(lasted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    #[test]
    fn the_rate_counts_held_time_over_the_window() {
        let mut rate = RecentRate::new(s(600));
        // One minute at 1,000 rows/s, then nine minutes held.
        for t in 0..=60 {
            rate.record(s(t), (t * 1000) as i64);
        }
        assert_eq!(rate.rows_per_second(), None, "less than a quarter window");
        for t in 61..=600 {
            rate.record(s(t), 60_000);
        }
        let measured = rate.rows_per_second().expect("a full window");
        assert!((measured - 100.0).abs() < 0.01, "{measured}");
    }

    #[test]
    fn only_the_last_window_counts() {
        let mut rate = RecentRate::new(s(60));
        // Fast for ten minutes, then 10 rows/s for two.
        let mut rows = 0;
        for t in 0..600 {
            rows += 1000;
            rate.record(s(t), rows);
        }
        for t in 600..=720 {
            rows += 10;
            rate.record(s(t), rows);
        }
        let measured = rate.rows_per_second().expect("rate");
        assert!((measured - 10.0).abs() < 0.01, "{measured}");
        // The history kept stays bounded by the window.
        assert!(rate.samples.len() <= 62, "{}", rate.samples.len());
    }

    #[test]
    fn a_partial_window_gives_the_rate_so_far_and_time_going_back_is_ignored() {
        let mut rate = RecentRate::new(s(40));
        rate.record(s(0), 0);
        rate.record(s(10), 500);
        assert_eq!(rate.rows_per_second(), Some(50.0));
        rate.record(s(5), 10_000);
        assert_eq!(rate.rows_per_second(), Some(50.0));
    }

    #[test]
    fn a_spell_is_reported_once_when_it_passes_the_limit_and_starts_over_after() {
        let mut spell = ThrottledSpell::new(s(600));
        assert_eq!(spell.observe(s(0), true), None);
        assert_eq!(spell.observe(s(599), true), None);
        assert_eq!(spell.observe(s(601), true), Some(s(601)));
        assert_eq!(spell.observe(s(900), true), None, "once per spell");
        assert_eq!(spell.observe(s(901), false), None);
        assert_eq!(spell.observe(s(1000), true), None);
        assert_eq!(spell.observe(s(1600), true), Some(s(600)));
        let mut off = ThrottledSpell::new(Duration::ZERO);
        assert_eq!(off.observe(s(0), true), None);
        assert_eq!(off.observe(s(100_000), true), None);
    }
}
