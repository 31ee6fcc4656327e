//! Production's own latency from its SLI (`sli_window`, off unless a query is set): the
//! budget judged on the very thing it is stated in, as a bound on what the canaries steer.
//!
//! The canaries are quick but a proxy: near the knee their test cuts about as often in
//! runs within budget as in runs over it (issue 19's fifteenth round), so the pace sits
//! below what production tolerates where the canary's line is stricter than production's
//! budget, and above it where the harm is on production's own tables, which the canary
//! never touches. Production's p99 as its monitoring computes it (a Prometheus query over a
//! short range) is slow, a range and a scrape behind, but it is the budget itself. So:
//!
//! - **Baseline**: its value at the end of a long rest (a range wholly at rest, `window`
//!   long), the median of the latest [`SLI_BASELINES`], and no higher than the lowest value
//!   judged since (production next to a pace is no faster than alone). Long rests are the
//!   first, the one production's start begins, and one periodic rest in every
//!   [`SLI_RELEARN_EVERY`].
//! - **Judged once a range**: a value read `window` or more after the pace was last set,
//!   and after the last rest ended, shows that pace alone (a range that held a short
//!   rest reads production partly alone). Over budget (more than `budget_ratio` × the baseline and more
//!   than the floor above it) cuts to any pace, and the pace it was read at is not tried
//!   again until the next long rest; within budget with room to spare (the rise under
//!   [`ROOMY_SHARE`] of the allowed one), the pace is *proven*, and the canaries' cuts go
//!   no lower than the highest pace proven. A value within budget but near it proves
//!   nothing: one reading's noise decides which side of the line it falls. Values a range
//!   apart are judged, not every reading: ranges that overlap are one judgement counted
//!   twice.
//! - **Production's own rise**: over budget at half the pace first found over, or less,
//!   is a rise halving the pace did not bring down: production's own. A long rest then
//!   learns production as it is, its value replacing the baselines before it. Over
//!   budget at a pace no faster than one proven (that pace had room) rests long too,
//!   but its value joins the baselines' median: near the knee it may be our harm.

use std::time::Duration;

use super::{quantile, ImpactSettings, ROOMY_SHARE};

/// Long rests whose SLI values make the baseline (their median): one rest's value over a
/// short range is a few hundred transactions' p99, and one stall of the disk would set it.
pub const SLI_BASELINES: usize = 3;

/// One periodic rest in this long lasts the SLI's window, to re-learn its baseline: a
/// 15 s rest every 10 minutes costs 2.5 % of the pace.
pub const SLI_RELEARN_EVERY: Duration = Duration::from_secs(600);

/// How often the daemon reads the SLI; a long rest lasts twice this past its window, so
/// that a value read in it saw nothing but the rest.
pub const SLI_READ_EVERY: Duration = Duration::from_secs(1);

/// Over budget at this share of the pace first found over since the last long rest, or
/// less: a rise that halving the pace did not bring down is production's own (its load,
/// its disk), not ours. In issue 19's twenty-fourth round production's p99 read 1.73×,
/// 1.80× and 1.56× at 343, 240 and 168 rows/s next to 600 tx/s, and the cuts and their
/// growth caps pinned the pace at 118 rows/s.
pub const OWN_RISE_SHARE: f64 = 0.5;

/// Values read next to production this long without one judged is an SLI that bounds
/// nothing: its window rarely fits between the rests and the pace's changes (issue 19's
/// twenty-eighth round: a 23 s window judged nothing in three runs, the canaries changing
/// the pace every 10–20 s). The daemon says so, once, in its log.
pub const SLI_UNJUDGED_WARN_AFTER: Duration = Duration::from_secs(300);

/// What production's SLI said of the pace in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliVerdict {
    /// Within budget with room to spare: the pace is proven.
    Within,
    /// Within budget, but with less than [`ROOMY_SHARE`] of the allowed rise to spare:
    /// the pace holds, proven or not as before.
    WithinNarrowly,
    /// Over budget.
    Over,
    /// Over budget at [`OWN_RISE_SHARE`] of the pace first found over, or less, or at a
    /// pace no faster than one proven: the rise is production's own, and its baseline is
    /// re-learned.
    OwnRise,
}

/// The SLI's state as last judged, for the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliReading {
    /// The baseline (the SLI's unit, e.g. seconds).
    pub baseline: Option<f64>,
    /// The last value judged over the baseline.
    pub ratio: Option<f64>,
    /// The highest pace the SLI showed within budget: the canaries cut no lower.
    pub proven: Option<f64>,
    /// The pace the SLI last showed over budget: not tried again until a long rest.
    pub harmed: Option<f64>,
}

/// The SLI judge (see the module docs). Pure, like the controller.
#[derive(Debug, Clone)]
pub(super) struct SliJudge {
    /// How long after a pace is set the SLI shows it alone: the query's range plus the
    /// scrape interval.
    window: Duration,
    /// The latest long rests' values, oldest first.
    baselines: Vec<f64>,
    /// The last value of the long rest in progress whose range lay wholly in it.
    at_rest: Option<f64>,
    /// When a value was last judged.
    judged_at: Option<Duration>,
    last_ratio: Option<f64>,
    proven: Option<f64>,
    harmed: Option<f64>,
    /// The pace first shown over budget since the last long rest.
    first_harmed: Option<f64>,
    /// A rise of production's own that a halved pace did not bring down was seen: the
    /// next value learned replaces the baselines before it, which production has left.
    baselines_stale: bool,
    /// The lowest value judged since the last long rest learned one: production next to a
    /// pace is no faster than production alone, so the baseline is trusted only as far as
    /// this.
    calmest: Option<f64>,
    /// Since when values read next to production have gone unjudged (none: the last one
    /// was judged, or production went idle).
    unjudged_since: Option<Duration>,
}

impl SliJudge {
    /// A judge of an SLI that shows a pace alone `window` after it is set.
    pub(super) fn new(window: Duration) -> Self {
        SliJudge {
            window,
            baselines: Vec::new(),
            at_rest: None,
            judged_at: None,
            last_ratio: None,
            proven: None,
            harmed: None,
            first_harmed: None,
            baselines_stale: false,
            calmest: None,
            unjudged_since: None,
        }
    }

    /// How long a long rest rests after its drain: a range wholly at rest, and two
    /// readings' time, so that one lands after the range even when a slow answer stretched
    /// the reader's period past [`SLI_READ_EVERY`].
    pub(super) fn rest(&self) -> Duration {
        self.window + 2 * SLI_READ_EVERY
    }

    /// A value read `rested` into a long rest (after its drain).
    pub(super) fn observe_at_rest(&mut self, rested: Duration, value: f64) {
        if rested >= self.window && value.is_finite() && value > 0.0 {
            self.at_rest = Some(value);
        }
    }

    /// A long rest ends: its value joins the baseline, and a pace shown over budget before
    /// it may be tried again (production's own load has moved since, or it was noise). A
    /// rise production's own is told anew from here, learned or not: a rest that learned
    /// nothing (no value read) must not start another at once.
    pub(super) fn end_long_rest(&mut self) {
        self.first_harmed = None;
        if let Some(value) = self.at_rest.take() {
            if std::mem::take(&mut self.baselines_stale) {
                self.baselines.clear();
            }
            if self.baselines.len() == SLI_BASELINES {
                self.baselines.remove(0);
            }
            self.baselines.push(value);
            self.harmed = None;
            self.calmest = None;
        }
    }

    /// The median of the latest long rests' values (the lower of two), or the calmest
    /// value judged since the last when that is lower: one range at rest that caught a
    /// stall of the disk reads slower than production alone is (issue 19's twenty-fourth
    /// round: a first rest read 4.61 ms where production alone read about 2.5, and the
    /// judge proved 3,000 rows/s at 1.51× production's own p99).
    fn baseline(&self) -> Option<f64> {
        let median = quantile(&mut self.baselines.clone(), 0.5)?;
        Some(self.calmest.map_or(median, |calmest| calmest.min(median)))
    }

    /// Judges `value`, read at `now`, of the pace `rate` set at `pace_set_at`: none while
    /// the value's range still holds an earlier pace, within a range of the last
    /// judgement, or before a baseline is learned; over budget as `budget` says.
    pub(super) fn judge(
        &mut self,
        now: Duration,
        pace_set_at: Duration,
        rate: f64,
        value: f64,
        budget: &ImpactSettings,
    ) -> Option<SliVerdict> {
        self.unjudged_since.get_or_insert(now);
        let baseline = self.baseline()?;
        let shows_the_pace = now >= pace_set_at + self.window;
        let new_range = self
            .judged_at
            .is_none_or(|at| now >= at + self.window || at < pace_set_at);
        if !(shows_the_pace && new_range && value.is_finite() && value >= 0.0) {
            return None;
        }
        self.judged_at = Some(now);
        self.unjudged_since = None;
        self.last_ratio = Some(value / baseline.max(f64::MIN_POSITIVE));
        if value > 0.0 {
            self.calmest = Some(self.calmest.map_or(value, |calmest| calmest.min(value)));
        }
        let (rise, allowed) = (value - baseline, budget.allowed_rise(baseline));
        if rise > allowed {
            self.harmed = Some(self.harmed.map_or(rate, |harmed| harmed.min(rate)));
            // Over at a pace no faster than one proven with room: production has moved,
            // not the pace (issue 19's twenty-fourth round: a stall read 3.12× at 168
            // rows/s, which had read 0.78× nine seconds before, and capped growth at 143
            // rows/s). A slower pace proven stays proven.
            let production_moved = self.proven.is_some_and(|proven| rate <= proven);
            let first = *self.first_harmed.get_or_insert(rate);
            let halved = rate <= first * OWN_RISE_SHARE;
            if production_moved || halved {
                // Only a halved pace is evidence enough to replace the baselines: a
                // pace proven near the knee and then over is as likely our harm (issue
                // 19's twenty-fifth round, k3: replaced, 2.96 ms became 4.53 ms next to
                // 600 tx/s and the pace grew to 2.99× production's p99), so its rest's
                // value joins the median instead. A halved-pace rise still waiting for
                // a rest that reads a value keeps its claim.
                self.baselines_stale |= halved;
                self.proven = None;
                Some(SliVerdict::OwnRise)
            } else {
                Some(SliVerdict::Over)
            }
        } else if rise <= allowed * ROOMY_SHARE {
            self.proven = Some(self.proven.map_or(rate, |proven| proven.max(rate)));
            Some(SliVerdict::Within)
        } else {
            Some(SliVerdict::WithinNarrowly)
        }
    }

    /// How long values read next to production have gone unjudged by `now`.
    pub(super) fn unjudged_for(&self, now: Duration) -> Duration {
        self.unjudged_since
            .map_or(Duration::ZERO, |since| now.saturating_sub(since))
    }

    /// Production went idle: no value is expected, so none has gone unjudged.
    pub(super) fn production_idle(&mut self) {
        self.unjudged_since = None;
    }

    /// The lowest pace the canaries may cut to: the highest the SLI proved (0: none).
    pub(super) fn floor(&self) -> f64 {
        self.proven.unwrap_or(0.0)
    }

    /// The highest pace growth may set: short of the one the SLI last showed over budget.
    pub(super) fn growth_cap(&self, approach: f64) -> f64 {
        self.harmed
            .map_or(f64::INFINITY, |harmed| harmed * approach)
    }

    /// What the judge knows, for the log.
    pub(super) fn reading(&self) -> SliReading {
        SliReading {
            baseline: self.baseline(),
            ratio: self.last_ratio,
            proven: self.proven,
            harmed: self.harmed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// The default budget: 30 %, at least 0.5 ms.
    fn budget() -> ImpactSettings {
        ImpactSettings::default()
    }

    /// `judge`'s verdict on `value` read a window (10 s) after `rate` was set at `set_at`
    /// seconds.
    fn a_window_after(
        judge: &mut SliJudge,
        set_at: u64,
        rate: f64,
        value: f64,
    ) -> Option<SliVerdict> {
        judge.judge(secs(set_at + 10), secs(set_at), rate, value, &budget())
    }

    /// `judge`'s verdict on 6 ms, twice a 3 ms baseline (over budget), read a window after
    /// `rate` was set at `set_at` seconds.
    fn twice_the_baseline(judge: &mut SliJudge, set_at: u64, rate: f64) -> Option<SliVerdict> {
        a_window_after(judge, set_at, rate, 0.006)
    }

    fn learned(values: &[f64]) -> SliJudge {
        let mut judge = SliJudge::new(secs(10));
        for value in values {
            judge.observe_at_rest(secs(10), *value);
            judge.end_long_rest();
        }
        judge
    }

    #[test]
    fn the_baseline_is_the_median_of_the_latest_long_rests_and_a_short_range_teaches_nothing() {
        let mut judge = learned(&[0.003, 0.009, 0.004, 0.005]);
        // The oldest (3 ms) has left; the median of 9, 4 and 5 ms.
        assert_eq!(judge.reading().baseline, Some(0.005));
        // A value whose range held part of the pace before the rest is not learned.
        judge.observe_at_rest(secs(9), 0.001);
        judge.end_long_rest();
        assert_eq!(judge.reading().baseline, Some(0.005));
    }

    #[test]
    fn a_pace_is_judged_only_once_its_range_shows_it_alone_and_once_a_range() {
        let mut judge = learned(&[0.003]);
        // Set at 100 s: a value at 105 s still holds the pace before.
        assert_eq!(
            judge.judge(secs(105), secs(100), 1000.0, 0.003, &budget()),
            None
        );
        assert_eq!(
            judge.judge(secs(110), secs(100), 1000.0, 0.003, &budget()),
            Some(SliVerdict::Within)
        );
        // The next reading's range overlaps the one judged: not judged again.
        assert_eq!(
            judge.judge(secs(111), secs(100), 1000.0, 0.009, &budget()),
            None
        );
        assert_eq!(
            judge.judge(secs(120), secs(100), 1000.0, 0.0034, &budget()),
            Some(SliVerdict::Within)
        );
        assert_eq!(judge.reading().proven, Some(1000.0));
    }

    #[test]
    fn values_that_never_show_one_pace_alone_go_unjudged_until_one_does() {
        // A 23 s window, the pace changed every 15 s: no range ever holds one pace alone.
        let mut judge = SliJudge::new(secs(23));
        judge.observe_at_rest(secs(23), 0.003);
        judge.end_long_rest();
        for at in (100..=400).step_by(3) {
            let set_at = at - at % 15;
            assert_eq!(
                judge.judge(secs(at), secs(set_at), 1000.0, 0.003, &budget()),
                None
            );
        }
        assert_eq!(judge.unjudged_for(secs(400)), secs(300));
        // Production idle: nothing was waiting.
        judge.production_idle();
        assert_eq!(judge.unjudged_for(secs(500)), Duration::ZERO);
        // Values again, and one that shows its pace alone is judged.
        judge.judge(secs(600), secs(590), 1000.0, 0.003, &budget());
        assert_eq!(judge.unjudged_for(secs(610)), secs(10));
        assert_eq!(
            judge.judge(secs(613), secs(590), 1000.0, 0.003, &budget()),
            Some(SliVerdict::Within)
        );
        assert_eq!(judge.unjudged_for(secs(620)), Duration::ZERO);
    }

    #[test]
    fn over_budget_caps_growth_until_a_long_rest() {
        let mut judge = learned(&[0.003]);
        a_window_after(&mut judge, 0, 1000.0, 0.003);
        a_window_after(&mut judge, 20, 1500.0, 0.0034);
        assert_eq!(judge.floor(), 1500.0);
        // 4.5 ms is 1.5× a 3 ms baseline and 1.5 ms above it: over.
        assert_eq!(
            a_window_after(&mut judge, 40, 2000.0, 0.0045),
            Some(SliVerdict::Over)
        );
        assert_eq!(judge.floor(), 1500.0, "a slower pace proven stays proven");
        assert_eq!(judge.growth_cap(0.85), 1700.0);
        // A long rest learns production anew, and may try that pace again.
        judge.observe_at_rest(secs(11), 0.003);
        judge.end_long_rest();
        assert_eq!(judge.growth_cap(0.85), f64::INFINITY);
    }

    #[test]
    fn only_a_pace_within_budget_with_room_to_spare_is_proven() {
        // 3 ms at rest: 0.9 ms allowed, and a pace is proven up to 0.45 ms above.
        let mut judge = learned(&[0.003]);
        assert_eq!(
            a_window_after(&mut judge, 0, 1000.0, 0.0034),
            Some(SliVerdict::Within)
        );
        assert_eq!(
            a_window_after(&mut judge, 20, 2000.0, 0.0038),
            Some(SliVerdict::WithinNarrowly)
        );
        assert_eq!(judge.floor(), 1000.0, "1.27× proves nothing");
        assert_eq!(judge.growth_cap(0.85), f64::INFINITY, "nor harms");
    }

    #[test]
    fn over_budget_at_a_pace_proven_with_room_is_production_s_own_rise() {
        let mut judge = learned(&[0.003]);
        a_window_after(&mut judge, 0, 1500.0, 0.0031);
        // A stall: over at a pace that had room.
        assert_eq!(
            a_window_after(&mut judge, 20, 1500.0, 0.0094),
            Some(SliVerdict::OwnRise)
        );
        assert_eq!(
            judge.floor(),
            0.0,
            "production has moved: nothing stays proven"
        );
        // Its long rest's value joins the baselines (the median of 3 and 4 ms is the
        // lower): it may have been our harm near the knee. The cap is lifted.
        judge.observe_at_rest(secs(10), 0.004);
        judge.end_long_rest();
        assert_eq!(judge.reading().baseline, Some(0.003));
        assert_eq!(judge.growth_cap(0.85), f64::INFINITY);
        // Over at a pace faster than any proven is ours.
        a_window_after(&mut judge, 60, 1000.0, 0.0032);
        assert_eq!(
            a_window_after(&mut judge, 80, 1500.0, 0.006),
            Some(SliVerdict::Over)
        );
    }

    #[test]
    fn over_budget_at_half_the_pace_first_found_over_is_production_s_own_rise() {
        let mut judge = learned(&[0.003]);
        assert_eq!(
            twice_the_baseline(&mut judge, 0, 1000.0),
            Some(SliVerdict::Over)
        );
        assert_eq!(
            twice_the_baseline(&mut judge, 20, 700.0),
            Some(SliVerdict::Over)
        );
        assert_eq!(
            twice_the_baseline(&mut judge, 40, 490.0),
            Some(SliVerdict::OwnRise)
        );
        // A long rest that read nothing learns nothing, but the rise is told anew.
        judge.end_long_rest();
        assert_eq!(judge.reading().baseline, Some(0.003));
        assert_eq!(
            twice_the_baseline(&mut judge, 60, 490.0),
            Some(SliVerdict::Over)
        );
        // One that read production at 6 ms makes that the baseline: the 3 ms production
        // has left no longer counts, and the paces harmed may be tried again.
        judge.observe_at_rest(secs(10), 0.006);
        judge.end_long_rest();
        assert_eq!(judge.reading().baseline, Some(0.006));
        assert_eq!(judge.growth_cap(0.85), f64::INFINITY);
    }

    #[test]
    fn a_halved_pace_s_claim_on_the_baselines_outlasts_a_rest_that_read_nothing() {
        let mut judge = learned(&[0.003]);
        twice_the_baseline(&mut judge, 0, 1000.0);
        assert_eq!(
            twice_the_baseline(&mut judge, 20, 490.0),
            Some(SliVerdict::OwnRise)
        );
        judge.end_long_rest();
        // Proven again, then over at that pace: a rise that may be ours near the knee,
        // but production's own rise, seen before, has not yet been learned.
        a_window_after(&mut judge, 40, 300.0, 0.0031);
        assert_eq!(
            twice_the_baseline(&mut judge, 60, 300.0),
            Some(SliVerdict::OwnRise)
        );
        judge.observe_at_rest(secs(10), 0.006);
        judge.end_long_rest();
        assert_eq!(judge.reading().baseline, Some(0.006));
    }

    #[test]
    fn a_long_rest_is_trusted_only_as_far_as_the_calmest_value_judged_after_it() {
        // The rest caught a stall: 4.6 ms, where production alone reads 2.6 ms.
        let mut judge = learned(&[0.0046]);
        assert_eq!(
            a_window_after(&mut judge, 0, 1000.0, 0.0026),
            Some(SliVerdict::Within)
        );
        assert_eq!(judge.reading().baseline, Some(0.0026));
        // 4.4 ms is under the rest's 4.6 ms, and 1.7× production alone: over.
        assert_eq!(
            a_window_after(&mut judge, 20, 2000.0, 0.0044),
            Some(SliVerdict::Over)
        );
        // The next long rest that learns a value starts over from it.
        judge.observe_at_rest(secs(10), 0.003);
        judge.end_long_rest();
        assert_eq!(judge.reading().baseline, Some(0.003));
    }

    #[test]
    fn a_rise_under_the_floor_is_within_whatever_the_ratio() {
        // 0.2 ms to 0.4 ms doubles, but 0.2 ms is under the 0.5 ms floor.
        let mut judge = learned(&[0.0002]);
        assert_eq!(
            a_window_after(&mut judge, 0, 5000.0, 0.0004),
            Some(SliVerdict::Within)
        );
    }
}
