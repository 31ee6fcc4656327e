//! Production activity: whether other sessions are working on the primary right now, from
//! the health probe's sightings of them.
//!
//! On a primary whose CPUs a backfill shares with production, production's latency is
//! hurt by how much of the time the backfill keeps a CPU busy and by how long each burst
//! lasts, long before replication lag or lock waits show anything: measured on a 2-core
//! primary, batches of 50 keys flat out raised pgbench's p99 7×, the same batches at a
//! fifth of that rate 1.15× (docs/BENCHMARKS.md). So while production is active the
//! throttle keeps batches short and sparse, and while it is not the job runs flat out.
//!
//! A *sighting* is a probe that saw at least one client session not of backfilld active
//! since the previous probe. One sighting is a monitoring scrape as often as production,
//! so the primary counts as busy only with [`BUSY_SIGHTINGS`] sightings within
//! [`ACTIVITY_WINDOW`] — except before the tracker has a window of history, when one is
//! enough: a job that starts next to production must not spend its first seconds flat out.

use std::collections::VecDeque;
use std::time::Duration;

/// How far back sightings count.
pub const ACTIVITY_WINDOW: Duration = Duration::from_secs(5);

/// Sightings within [`ACTIVITY_WINDOW`] that make the primary busy.
pub const BUSY_SIGHTINGS: usize = 3;

/// Remembers recent sightings of production sessions and judges whether the primary is busy.
#[derive(Debug, Clone, Default)]
pub struct ProductionActivity {
    /// When each sighting within the window happened, oldest first.
    sightings: VecDeque<Duration>,
    /// When the first probe was observed.
    first_probe: Option<Duration>,
}

impl ProductionActivity {
    /// Records a probe at `now` (a monotonic time since any origin) that saw
    /// `sessions_active` other sessions active since the previous probe, and returns
    /// whether the primary is busy.
    pub fn observe(&mut self, now: Duration, sessions_active: u32) -> bool {
        let first_probe = *self.first_probe.get_or_insert(now);
        if sessions_active > 0 {
            self.sightings.push_back(now);
        }
        let oldest = now.saturating_sub(ACTIVITY_WINDOW);
        while self.sightings.front().is_some_and(|at| *at < oldest) {
            self.sightings.pop_front();
        }
        // What is left are the sightings within the window.
        let recent = self.sightings.len();
        let short_history = now.saturating_sub(first_probe) < ACTIVITY_WINDOW;
        recent >= BUSY_SIGHTINGS || (short_history && recent > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// Observes one probe every 250 ms from `from`, `active(i)` sessions at the i-th.
    fn probes(
        activity: &mut ProductionActivity,
        from: Duration,
        count: u64,
        active: impl Fn(u64) -> u32,
    ) -> Vec<bool> {
        (0..count)
            .map(|i| activity.observe(from + ms(250 * i), active(i)))
            .collect()
    }

    #[test]
    fn a_quiet_primary_is_never_busy() {
        let mut activity = ProductionActivity::default();
        assert!(probes(&mut activity, ms(0), 100, |_| 0).iter().all(|b| !b));
    }

    #[test]
    fn one_sighting_is_enough_until_there_is_a_window_of_history() {
        let mut activity = ProductionActivity::default();
        assert!(activity.observe(ms(0), 1));
        // Still busy for the rest of the first window...
        assert!(probes(&mut activity, ms(250), 18, |_| 0).iter().all(|b| *b));
        // ...and idle once that sighting has left it.
        assert!(!activity.observe(ACTIVITY_WINDOW + ms(1), 0));
    }

    #[test]
    fn steady_production_keeps_the_primary_busy() {
        let mut activity = ProductionActivity::default();
        // Two sessions active at every probe for a minute.
        assert!(probes(&mut activity, ms(0), 240, |_| 2).iter().all(|b| *b));
        // Production active at only every third probe still counts.
        assert!(
            probes(&mut activity, ms(60_000), 240, |i| u32::from(i % 3 == 0))
                .iter()
                .all(|b| *b)
        );
    }

    #[test]
    fn a_monitoring_scrape_now_and_then_is_not_production() {
        let mut activity = ProductionActivity::default();
        // Past the first window, one sighting every 15 s (a scrape) never makes it busy.
        let busy = probes(&mut activity, ms(0), 400, |i| u32::from(i % 60 == 30));
        assert!(busy.iter().all(|b| !b), "{busy:?}");
        // Two close together are not enough either; the third within the window is.
        let later = ms(110_000);
        assert!(!activity.observe(later, 1));
        assert!(!activity.observe(later + ms(250), 1));
        assert!(activity.observe(later + ms(500), 1));
    }

    #[test]
    fn production_that_stops_stops_counting_after_the_window() {
        let mut activity = ProductionActivity::default();
        probes(&mut activity, ms(0), 40, |_| 1);
        let quiet = probes(&mut activity, ms(10_000), 40, |_| 0);
        // The sightings of the last probes before 10 s keep it busy for up to a window.
        let busy_for = quiet.iter().take_while(|b| **b).count();
        assert!((1..=20).contains(&busy_for), "{quiet:?}");
        assert!(quiet[busy_for..].iter().all(|b| !b));
    }
}
