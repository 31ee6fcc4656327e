//! The impact budget: as many rows per second as production's latency allows.
//!
//! The operator states how much production's latency may rise, as a ratio of its own
//! recent baseline (default 1.3) with a floor in milliseconds so that microsecond noise
//! never counts. [`ImpactController`] maximises the rows per second backfilld writes on
//! the primary subject to that budget, from one signal: the round trip of the committing
//! canary (see [`crate::latency`]), a tiny transaction timed on a connection of its own,
//! which waits for the same CPUs, locks and WAL flushes production's transactions wait for.
//!
//! - **Baseline**: a high quantile ([`QUANTILE`]) of canary round trips while backfilld
//!   rests ([`REST`], after [`DRAIN`] for the last batch to finish), at start, every
//!   `relearn_every`, and whenever production starts working on the primary (its latency
//!   moves with its own load, not only with ours).
//! - **Impact**: the same quantile over the canaries since the pace last changed, as a
//!   ratio of the baseline. Over budget means over `budget_ratio × baseline` *and* more
//!   than `floor` above it.
//! - **Pace** (AIMD, as TCP congestion control, with a fast climb where there is room):
//!   from [`START_RATE`], judged once a second ([`GROW_AFTER`], [`CUT_AFTER`]). Over budget
//!   cuts it by [`CUT_FACTOR`] — at once when far over ([`SEVERE`]), else when the next
//!   second is over too (one second over holds the pace). Under budget it grows, as fast as the room left allows:
//!   while the canary's rise is under [`ROOMY_SHARE`] of what the budget allows, it
//!   multiplies ([`SLOW_START_FACTOR`] until the first cut; [`ROOMY_FACTOR`] after one, up
//!   to [`APPROACH`] of the rate last cut at, then again once past it); otherwise, and
//!   between [`APPROACH`] of the last cut and the cut itself, it grows by
//!   [`GROWTH_FRACTION`] of the rate (at least [`MIN_GROWTH`]). A cut by a noisy second is
//!   thus won back in a second or two, and a pace far under what production allows (a
//!   light load) climbs there in seconds, not minutes, while a pace near the budget creeps.
//!   The rate never grows past twice what the jobs achieved: a rate the jobs cannot reach
//!   buys nothing and would make the next cut arrive late.
//! - **No signal** (no canary answered for [`SIGNAL_TIMEOUT`]): no verdict; the throttle
//!   falls back to the fixed duty cycle next to production.
//!
//! The rate is the whole daemon's; each running job takes its share and spends it in
//! small evenly spaced batches ([`crate::throttle`]), never a second's worth at once.

use std::time::Duration;

/// Quantile of canary round trips that stands for production's tail latency: the p90 of
/// a few dozen canaries is stable from window to window where their p99 is just the
/// slowest one.
pub const QUANTILE: f64 = 0.9;

/// How long backfilld rests to learn the baseline (after [`DRAIN`]): a few dozen canaries.
pub const REST: Duration = Duration::from_millis(1_500);

/// At the start of a rest, canaries are ignored this long: the last batch and its commit
/// flush may still be running.
pub const DRAIN: Duration = Duration::from_millis(300);

/// Pace of the first batches after the first baseline (rows per second, whole daemon).
pub const START_RATE: f64 = 200.0;

/// Lowest pace: a job always moves.
pub const MIN_RATE: f64 = 10.0;

/// Highest pace (a sanity bound; the achieved-rate cap binds long before).
pub const MAX_RATE: f64 = 10_000_000.0;

/// Canaries are judged for a cut once they span this long since the pace last changed:
/// with commits that flush (`fsync = on`) the canary's tail moves by milliseconds from one
/// half second to the next on a loaded machine, whatever we do; a second of them is a
/// steadier sample (seen in issue 19's benchmark runs).
pub const CUT_AFTER: Duration = Duration::from_millis(1_000);

/// Canaries are judged for growth once they span this long since the pace last changed.
pub const GROW_AFTER: Duration = Duration::from_millis(1_000);

/// Fewest canaries a judgement or a baseline is made from.
pub const MIN_SAMPLES: usize = 8;

/// Additive growth per [`GROW_AFTER`] near the budget, as a fraction of the rate in force
/// (at least [`MIN_GROWTH`]).
pub const GROWTH_FRACTION: f64 = 0.1;

/// Smallest additive growth step, rows per second: a pace cut to its floor by noise
/// climbs back within seconds, not minutes.
pub const MIN_GROWTH: f64 = 50.0;

/// Growth per judgement under budget until the first cut (slow start, as TCP's).
pub const SLOW_START_FACTOR: f64 = 2.0;

/// Growth per judgement after a cut while there is room ([`ROOMY_SHARE`]): back to where it
/// was cut in one or two seconds, and past it in a few if that cut was noise.
pub const ROOMY_FACTOR: f64 = 1.5;

/// After a cut, a roomy climb multiplies only up to this share of the rate last cut at,
/// then grows additively to it (as TCP CUBIC's plateau near its last maximum).
pub const APPROACH: f64 = 0.85;

/// "Room": the canary's rise over its baseline is under this share of the rise the budget
/// allows. The rise grows with the pace, so a pace using less than half the allowed rise
/// is far from the budget; nearer, growth turns additive.
pub const ROOMY_SHARE: f64 = 0.5;

/// A rise over this many times the allowed one cuts the pace at once; a smaller one only
/// when the next judgement is over budget too. On the shared 2-core benchmark machine,
/// single seconds with the canary's p90 1.5–2.5 ms over its baseline (against a 1 ms
/// allowance) came and went every other second at 130–440 rows/s next to pgbench at
/// 200 tx/s, whose p99 stayed at 1.09× its baseline: noise, which cut the pace to a third
/// of what production allowed. Production's latency past its knee rose 3–5 ms at once.
pub const SEVERE: f64 = 3.0;

/// Multiplicative decrease when over budget (as TCP CUBIC's 0.7, gentler than halving: one
/// noisy judgement costs less).
pub const CUT_FACTOR: f64 = 0.7;

/// The baseline is the median of the quantiles of this many latest rests: one rest's few
/// dozen canaries are a noisy sample of production's tail.
pub const BASELINE_RESTS: usize = 3;

/// Without a canary for this long, there is no signal.
pub const SIGNAL_TIMEOUT: Duration = Duration::from_secs(3);

/// The operator's budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImpactSettings {
    /// Production's latency may rise to this many times its baseline (> 1).
    pub budget_ratio: f64,
    /// A rise smaller than this is never over budget, whatever the ratio.
    pub floor: Duration,
    /// Re-learn the baseline (a brief rest) this often.
    pub relearn_every: Duration,
}

impl Default for ImpactSettings {
    fn default() -> Self {
        ImpactSettings {
            budget_ratio: 1.3,
            floor: Duration::from_millis(1),
            relearn_every: Duration::from_secs(30),
        }
    }
}

/// What backfilld may do now, daemon-wide.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ImpactDirective {
    /// Rest: the baseline is being (re-)learned.
    Rest,
    /// Write at most this many rows per second in all.
    Pace(f64),
}

/// One judgement of the controller, for the throttle, the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImpactVerdict {
    /// The directive; `None` when no signal is readable (fall back to the duty cycle).
    pub directive: Option<ImpactDirective>,
    /// The last measured impact: canary quantile over its baseline.
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Resting since `since`; canaries after `since + DRAIN` form the baseline.
    Resting { since: Duration },
    /// Pacing since the pace last changed at `since`.
    Pacing { since: Duration },
}

/// The impact-budget controller (see the module docs). Pure: the caller passes a monotonic
/// `now` with every call.
#[derive(Debug, Clone)]
pub struct ImpactController {
    settings: ImpactSettings,
    phase: Phase,
    /// Canary round trips (in seconds) of the current phase, in arrival order.
    samples: Vec<f64>,
    /// Canary quantile while resting, seconds: the median of the latest rests'.
    baseline: Option<f64>,
    /// The latest rests' canary quantiles, seconds, oldest first.
    rests: Vec<f64>,
    rate: f64,
    /// Rate at the last cut; `None` while still in slow start.
    cut_at: Option<f64>,
    last_ratio: Option<f64>,
    last_canary: Option<Duration>,
    last_relearn: Duration,
    /// Rows the jobs had committed in all, and when, at the last growth judgement.
    rows_mark: Option<(Duration, u64)>,
    /// Rows per second the jobs achieved over the last judged span.
    achieved: Option<f64>,
    production_active: bool,
    /// The last judgement was over budget, but not far enough to cut at once.
    over_once: bool,
}

impl ImpactController {
    /// A controller that starts by resting at `now` to learn the first baseline; nonsense
    /// settings are replaced by the defaults' values.
    pub fn new(settings: ImpactSettings, now: Duration) -> Self {
        let defaults = ImpactSettings::default();
        let settings = ImpactSettings {
            budget_ratio: if settings.budget_ratio.is_finite() && settings.budget_ratio > 1.0 {
                settings.budget_ratio
            } else {
                defaults.budget_ratio
            },
            floor: settings.floor,
            relearn_every: if settings.relearn_every.is_zero() {
                defaults.relearn_every
            } else {
                settings.relearn_every
            },
        };
        ImpactController {
            settings,
            phase: Phase::Resting { since: now },
            samples: Vec::new(),
            baseline: None,
            rests: Vec::new(),
            rate: START_RATE,
            cut_at: None,
            last_ratio: None,
            last_canary: None,
            last_relearn: now,
            rows_mark: None,
            achieved: None,
            production_active: false,
            over_once: false,
        }
    }

    /// Records a canary that answered at `now` after `round_trip`.
    pub fn observe(&mut self, now: Duration, round_trip: Duration) {
        self.last_canary = Some(now);
        if let Phase::Resting { since } = self.phase {
            if now < since.saturating_add(DRAIN) {
                return;
            }
        }
        self.samples.push(round_trip.as_secs_f64());
    }

    /// Records how many rows the jobs have committed in all by `now` (a counter; one that
    /// goes down, e.g. a finished job no longer counted, starts a new span).
    pub fn record_rows(&mut self, now: Duration, rows_total: u64) {
        match self.rows_mark {
            Some((_, rows)) if rows_total < rows => self.rows_mark = Some((now, rows_total)),
            Some((at, rows)) if now > at => {
                let span = (now - at).as_secs_f64();
                if span >= GROW_AFTER.as_secs_f64() {
                    self.achieved = Some(rows_total.saturating_sub(rows) as f64 / span);
                    self.rows_mark = Some((now, rows_total));
                }
            }
            Some(_) => {}
            None => self.rows_mark = Some((now, rows_total)),
        }
    }

    /// Judges the canaries so far and says what backfilld may do now. `production_active`
    /// is the activity judge's verdict: production starting to work re-learns the
    /// baseline.
    pub fn evaluate(&mut self, now: Duration, production_active: bool) -> ImpactVerdict {
        if production_active && !self.production_active {
            self.start_rest(now);
        }
        self.production_active = production_active;
        let readable = self
            .last_canary
            .is_some_and(|at| now.saturating_sub(at) < SIGNAL_TIMEOUT);
        match self.phase {
            Phase::Resting { since } => {
                if now >= since.saturating_add(DRAIN).saturating_add(REST) {
                    if self.samples.len() >= MIN_SAMPLES {
                        if let Some(rest) = quantile(&mut self.samples, QUANTILE) {
                            if self.rests.len() == BASELINE_RESTS {
                                self.rests.remove(0);
                            }
                            self.rests.push(rest);
                            self.baseline = quantile(&mut self.rests.clone(), 0.5);
                        }
                    }
                    // Too few canaries: keep the old baseline (or none: no signal).
                    self.last_relearn = now;
                    self.enter_pacing(now);
                }
            }
            Phase::Pacing { since } => {
                if now.saturating_sub(self.last_relearn) >= self.settings.relearn_every {
                    self.start_rest(now);
                } else if production_active {
                    self.judge(now, since);
                } else {
                    // No production, no pace in force (jobs run flat out): the canaries
                    // say nothing about the pace, and production starting rests anyway.
                    self.enter_pacing(now);
                }
            }
        }
        let directive = match self.phase {
            _ if !readable => None,
            Phase::Resting { .. } => Some(ImpactDirective::Rest),
            Phase::Pacing { .. } if self.baseline.is_none() => None,
            Phase::Pacing { .. } => Some(ImpactDirective::Pace(self.rate)),
        };
        ImpactVerdict {
            directive,
            ratio: self.last_ratio,
        }
    }

    /// The pace in force (rows per second, whole daemon).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The baseline canary quantile, if learned.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
            .and_then(|b| Duration::try_from_secs_f64(b).ok())
    }

    fn start_rest(&mut self, now: Duration) {
        self.phase = Phase::Resting { since: now };
        self.samples.clear();
    }

    fn enter_pacing(&mut self, now: Duration) {
        self.phase = Phase::Pacing { since: now };
        self.samples.clear();
    }

    /// Cuts when over budget (after [`CUT_AFTER`]), grows when under it (after
    /// [`GROW_AFTER`]).
    fn judge(&mut self, now: Duration, since: Duration) {
        let Some(baseline) = self.baseline else {
            return;
        };
        let span = now.saturating_sub(since);
        if span < CUT_AFTER || self.samples.len() < MIN_SAMPLES {
            return;
        }
        let Some(current) = quantile(&mut self.samples, QUANTILE) else {
            return;
        };
        let ratio = current / baseline.max(f64::MIN_POSITIVE);
        self.last_ratio = Some(ratio);
        // The rise the budget allows: the ratio's, or the floor when that is more.
        let allowed =
            (baseline * (self.settings.budget_ratio - 1.0)).max(self.settings.floor.as_secs_f64());
        let rise = current - baseline;
        if rise > allowed {
            // A second moderately over budget holds the pace; two in a row, or one far
            // over, cut it.
            if rise > allowed * SEVERE || self.over_once {
                self.over_once = false;
                self.cut_at = Some(self.rate);
                self.rate = (self.rate * CUT_FACTOR).max(MIN_RATE);
            } else {
                self.over_once = true;
            }
            self.enter_pacing(now);
        } else if span >= GROW_AFTER {
            self.over_once = false;
            let roomy = rise < allowed * ROOMY_SHARE;
            let additive = self.rate + (self.rate * GROWTH_FRACTION).max(MIN_GROWTH);
            let grown = match self.cut_at {
                _ if !roomy => additive,
                None => self.rate * SLOW_START_FACTOR,
                // Back fast to just under the last cut, then creep up to it: production's
                // latency often turns up steeply near its limit (a hockey stick), and
                // jumping back to the rate that was over budget would spend every other
                // second over it.
                Some(cut_at) if self.rate < cut_at * APPROACH => {
                    (self.rate * ROOMY_FACTOR).min(cut_at * APPROACH)
                }
                Some(cut_at) if self.rate < cut_at => additive,
                // Past the last cut with room to spare: that cut was noise, or production
                // has lightened since.
                Some(_) => self.rate * ROOMY_FACTOR,
            };
            // Never past twice what the jobs achieve: a pace they cannot reach buys nothing.
            let cap = self
                .achieved
                .map_or(MAX_RATE, |a| (2.0 * a).max(START_RATE));
            self.rate = grown
                .min(cap)
                .max(self.rate.min(cap))
                .clamp(MIN_RATE, MAX_RATE);
            self.enter_pacing(now);
        }
    }

    /// Projects the seconds a backfill of `rows` takes next to production at best, when
    /// its jobs manage `rows_per_second` flat out and production's latency never binds:
    /// the climb from [`START_RATE`] (slow start, one judgement a second) after the first
    /// rest, then the full rate, minus the rests that re-learn the baseline
    /// ([`DRAIN`] + [`REST`] every `relearn_every`). What production's latency allows is
    /// only known by running; this is the bound `plan` shows.
    pub fn best_case_seconds(settings: &ImpactSettings, rows: f64, rows_per_second: f64) -> f64 {
        if rows <= 0.0 || !rows_per_second.is_finite() || rows_per_second <= 0.0 {
            return 0.0;
        }
        let rest = (DRAIN + REST).as_secs_f64();
        let relearn = settings.relearn_every.as_secs_f64().max(rest);
        // Share of the time spent pacing rather than resting.
        let pacing = relearn / (relearn + rest);
        let mut seconds = rest;
        let mut left = rows;
        let mut rate = START_RATE;
        let step = GROW_AFTER.as_secs_f64();
        while rate < rows_per_second && left > 0.0 {
            let done = (rate * step).min(left);
            left -= done;
            seconds += done / rate;
            rate *= SLOW_START_FACTOR;
        }
        seconds + left / (rows_per_second * pacing)
    }
}

/// The `q` quantile (nearest rank) of `values`; `None` when empty. Reorders `values`.
fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CANARY: Duration = Duration::from_millis(50);

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    thread_local! {
        /// Rows the simulated jobs committed, across the [`run`]s of one test (each test
        /// runs on a thread of its own).
        static ROWS: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
    }

    /// Drives `controller` from `from` for `span`, one canary every 50 ms whose round
    /// trip `latency(rate)` gives from the pace in force; the jobs achieve the pace.
    /// Returns the time reached and the last verdict.
    fn run(
        controller: &mut ImpactController,
        from: Duration,
        span: Duration,
        active: bool,
        latency: impl Fn(Option<ImpactDirective>) -> Duration,
    ) -> (Duration, ImpactVerdict) {
        let mut now = from;
        let mut verdict = controller.evaluate(now, active);
        while now < from + span {
            now += CANARY;
            let rows = ROWS.with(|rows| {
                if let Some(ImpactDirective::Pace(rate)) = verdict.directive {
                    rows.set(rows.get() + rate * CANARY.as_secs_f64());
                }
                rows.get()
            });
            controller.observe(now, latency(verdict.directive));
            controller.record_rows(now, rows as u64);
            verdict = controller.evaluate(now, active);
        }
        (now, verdict)
    }

    /// Production at 2 ms, plus 1 ms per 1 000 rows/s we write.
    fn linear(directive: Option<ImpactDirective>) -> Duration {
        match directive {
            Some(ImpactDirective::Pace(rate)) => ms(2) + Duration::from_secs_f64(rate / 1e6),
            _ => ms(2),
        }
    }

    #[test]
    fn it_rests_first_to_learn_the_baseline() {
        let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
        controller.observe(ms(10), ms(2));
        assert_eq!(
            controller.evaluate(ms(10), true).directive,
            Some(ImpactDirective::Rest)
        );
        let (_, verdict) = run(&mut controller, ms(10), ms(2_000), true, linear);
        let baseline = controller.baseline().expect("a baseline");
        assert!(
            baseline.abs_diff(ms(2)) < Duration::from_micros(1),
            "{baseline:?}"
        );
        assert!(matches!(verdict.directive, Some(ImpactDirective::Pace(_))));
    }

    #[test]
    fn it_converges_below_the_budget_and_near_it() {
        let settings = ImpactSettings {
            relearn_every: Duration::from_secs(3600),
            ..ImpactSettings::default()
        };
        let mut controller = ImpactController::new(settings, ms(0));
        // Budget: the larger of 1.3 × 2 ms and 2 ms + the 1 ms floor, so 3 ms: at most
        // 1 000 rows/s under `linear`.
        let (now, _) = run(
            &mut controller,
            ms(0),
            Duration::from_secs(60),
            true,
            linear,
        );
        let mut rates = Vec::new();
        let mut at = now;
        for _ in 0..40 {
            let (next, verdict) = run(&mut controller, at, ms(1_000), true, linear);
            at = next;
            if let Some(ImpactDirective::Pace(rate)) = verdict.directive {
                rates.push(rate);
            }
        }
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        // One additive step over the limit at most, then a cut.
        assert!(rates.iter().all(|r| *r <= 1_000.0 * 1.1), "{rates:?}");
        assert!(mean >= 1_000.0 * 0.6, "mean {mean}: {rates:?}");
    }

    #[test]
    fn noise_under_the_floor_is_never_over_budget() {
        let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
        // 0.2 ms base, doubled by us: twice the baseline, but 0.2 ms is under the 1 ms floor.
        let tiny = |d: Option<ImpactDirective>| match d {
            Some(ImpactDirective::Pace(_)) => Duration::from_micros(400),
            _ => Duration::from_micros(200),
        };
        let (_, verdict) = run(&mut controller, ms(0), Duration::from_secs(10), true, tiny);
        assert!(verdict.ratio.is_some_and(|r| r > 1.5), "{verdict:?}");
        // Slow start never ended: nothing was ever over budget.
        assert!(
            controller.rate() > START_RATE * 8.0,
            "{}",
            controller.rate()
        );
    }

    #[test]
    fn over_budget_cuts_the_pace_within_a_second_and_a_half() {
        let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
        let (now, _) = run(&mut controller, ms(0), ms(5_000), true, linear);
        let before = controller.rate();
        // Production suffers badly now, whatever we do.
        let (_, verdict) = run(&mut controller, now, ms(1_500), true, |_| ms(20));
        assert!(
            controller.rate() <= before * CUT_FACTOR,
            "{before} → {}",
            controller.rate()
        );
        assert!(verdict.ratio.is_some_and(|r| r > 5.0));
    }

    #[test]
    fn a_cut_by_a_noisy_second_is_won_back_within_seconds() {
        let settings = ImpactSettings {
            relearn_every: Duration::from_secs(3600),
            ..ImpactSettings::default()
        };
        let mut controller = ImpactController::new(settings, ms(0));
        // Production never notices us (a light load on a primary with room to spare).
        let flat = |_: Option<ImpactDirective>| ms(2);
        let (now, _) = run(&mut controller, ms(0), ms(6_000), true, flat);
        let before = controller.rate();
        // One noisy second: the canary is slow whatever we do. It may straddle two
        // judgements and cost two cuts.
        let (now, _) = run(&mut controller, now, ms(1_100), true, |_| ms(20));
        let cut = controller.rate();
        assert!(cut <= before * CUT_FACTOR + 1e-9, "{before} → {cut}");
        // Back at the old pace within five judgements (×1.5 to 85 % of the last cut, a
        // tenth more a second to it, ×1.5 past it), ...
        let (now, _) = run(&mut controller, now, ms(5_100), true, flat);
        assert!(
            controller.rate() >= before - 1e-9,
            "{before} → {cut} → {}",
            controller.rate()
        );
        // ... and past it, multiplying again: that cut was noise.
        let back = controller.rate();
        run(&mut controller, now, ms(2_100), true, flat);
        assert!(
            controller.rate() >= back * 2.0,
            "{back} → {}",
            controller.rate()
        );
    }

    #[test]
    fn under_a_hockey_stick_it_spends_most_seconds_under_the_knee() {
        let settings = ImpactSettings {
            relearn_every: Duration::from_secs(3600),
            ..ImpactSettings::default()
        };
        let mut controller = ImpactController::new(settings, ms(0));
        // Production does not notice us up to 3 000 rows/s, then suffers badly.
        let hockey = |d: Option<ImpactDirective>| match d {
            Some(ImpactDirective::Pace(rate)) if rate > 3_000.0 => ms(10),
            _ => ms(2),
        };
        let (mut now, _) = run(&mut controller, ms(0), ms(30_000), true, hockey);
        let mut rates = Vec::new();
        for _ in 0..60 {
            let (next, verdict) = run(&mut controller, now, ms(1_000), true, hockey);
            now = next;
            if let Some(ImpactDirective::Pace(rate)) = verdict.directive {
                rates.push(rate);
            }
        }
        let over = rates.iter().filter(|r| **r > 3_000.0).count();
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        // Back to 85 % of the last cut at once, then a tenth more a second: over the knee
        // about one second in four, not every other one.
        assert!(
            over * 10 <= rates.len() * 3,
            "{over} of {}: {rates:?}",
            rates.len()
        );
        assert!(mean >= 3_000.0 * 0.75, "mean {mean}: {rates:?}");
    }

    #[test]
    fn one_second_a_little_over_holds_the_pace_and_two_cut_it() {
        let settings = ImpactSettings {
            relearn_every: Duration::from_secs(3600),
            ..ImpactSettings::default()
        };
        let mut controller = ImpactController::new(settings, ms(0));
        let flat = |_: Option<ImpactDirective>| ms(2);
        let (mut now, _) = run(&mut controller, ms(0), ms(6_000), true, flat);
        // Right after a judgement (the pace just changed), so that each run below spans
        // exactly one judgement's canaries.
        let rate = controller.rate();
        while controller.rate() == rate {
            (now, _) = run(&mut controller, now, CANARY, true, flat);
        }
        let before = controller.rate();
        // 2 ms over a 2 ms baseline: over the 1 ms allowance, under three times it.
        let over = |_: Option<ImpactDirective>| ms(4);
        let (now, _) = run(&mut controller, now, ms(1_000), true, over);
        assert_eq!(controller.rate(), before, "one second over holds");
        let (now, _) = run(&mut controller, now, ms(1_000), true, flat);
        assert!(controller.rate() > before, "then grows again");
        let grown = controller.rate();
        let (_, _) = run(&mut controller, now, ms(2_000), true, over);
        assert!(
            (controller.rate() - grown * CUT_FACTOR).abs() < 1e-9,
            "two seconds over cut once: {grown} → {}",
            controller.rate()
        );
    }

    #[test]
    fn near_the_budget_growth_turns_additive() {
        let settings = ImpactSettings {
            relearn_every: Duration::from_secs(3600),
            ..ImpactSettings::default()
        };
        let mut controller = ImpactController::new(settings, ms(0));
        // Under `linear` the budget (a 1 ms rise) is 1 000 rows/s and "room" (half that
        // rise) 500 rows/s: from above 500 rows/s every growth step is a tenth of the pace
        // (at least MIN_GROWTH).
        let (mut now, _) = run(&mut controller, ms(0), ms(30_000), true, linear);
        for _ in 0..20 {
            let before = controller.rate();
            let (next, _) = run(&mut controller, now, ms(1_000), true, linear);
            now = next;
            let after = controller.rate();
            if after > before && before > 500.0 {
                assert!(
                    after <= before + (before * GROWTH_FRACTION).max(MIN_GROWTH) + 1e-9,
                    "{before} → {after}"
                );
            }
        }
    }

    #[test]
    fn the_best_case_adds_the_climb_and_the_rests_to_the_flat_out_time() {
        let settings = ImpactSettings::default();
        assert_eq!(
            ImpactController::best_case_seconds(&settings, 0.0, 1e4),
            0.0
        );
        assert_eq!(
            ImpactController::best_case_seconds(&settings, 1e6, 0.0),
            0.0
        );
        let flat_out = 1e7 / 1e4;
        let best = ImpactController::best_case_seconds(&settings, 1e7, 1e4);
        // A rest of 1.8 s per 30 s of pacing (6 %), and a climb of 6 s from 200 rows/s.
        let rests = flat_out * (DRAIN + REST).as_secs_f64() / 30.0;
        assert!(best > flat_out + rests, "{best}");
        assert!(best < flat_out + rests + 10.0, "{best}");
        // A job smaller than the climb is done during it: 200 rows in its first second,
        // the other 100 at 400 rows/s.
        let small = ImpactController::best_case_seconds(&settings, 300.0, 1e4);
        assert!(
            (small - ((DRAIN + REST).as_secs_f64() + 1.25)).abs() < 1e-9,
            "{small}"
        );
    }

    #[test]
    fn it_rests_again_every_relearn_interval_and_when_production_starts() {
        let settings = ImpactSettings {
            relearn_every: Duration::from_secs(10),
            ..ImpactSettings::default()
        };
        let mut controller = ImpactController::new(settings, ms(0));
        let mut rests = 0;
        let mut now = ms(0);
        let mut resting = false;
        while now < Duration::from_secs(40) {
            let (next, verdict) = run(&mut controller, now, CANARY, true, linear);
            now = next;
            let rest = verdict.directive == Some(ImpactDirective::Rest);
            if rest && !resting {
                rests += 1;
            }
            resting = rest;
        }
        assert_eq!(rests, 4, "the first rest and one per 10 s of pacing");
        // Production stopping and starting again: a rest at once.
        run(&mut controller, now, ms(100), false, linear);
        let verdict = controller.evaluate(now + ms(150), true);
        assert_eq!(verdict.directive, Some(ImpactDirective::Rest));
    }

    #[test]
    fn without_production_the_pace_is_not_judged() {
        let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
        let (now, _) = run(&mut controller, ms(0), ms(3_000), true, linear);
        let before = controller.rate();
        // Jobs run flat out while production is away: their canaries would cut the pace
        // (or, quiet, double it) for nothing.
        run(&mut controller, now, ms(10_000), false, |_| ms(50));
        assert_eq!(controller.rate(), before);
    }

    #[test]
    fn a_silent_canary_is_no_signal() {
        let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
        let (now, _) = run(&mut controller, ms(0), ms(3_000), true, linear);
        assert!(controller.evaluate(now, true).directive.is_some());
        assert_eq!(
            controller.evaluate(now + SIGNAL_TIMEOUT, true).directive,
            None
        );
        // Never a canary at all: no signal either.
        let mut blind = ImpactController::new(ImpactSettings::default(), ms(0));
        assert_eq!(blind.evaluate(ms(5_000), true).directive, None);
    }

    #[test]
    fn the_pace_stays_within_twice_what_the_jobs_achieve() {
        let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
        let mut now = ms(0);
        let mut verdict = controller.evaluate(now, true);
        // The jobs manage only 1 000 rows/s, and production never notices.
        let mut rows = 0u64;
        while now < Duration::from_secs(30) {
            now += CANARY;
            if matches!(verdict.directive, Some(ImpactDirective::Pace(_))) {
                rows += 50;
            }
            controller.observe(now, ms(2));
            controller.record_rows(now, rows);
            verdict = controller.evaluate(now, true);
        }
        assert!(controller.rate() <= 2_000.0 * 1.01, "{}", controller.rate());
    }

    #[test]
    fn nonsense_settings_fall_back_to_the_defaults() {
        let controller = ImpactController::new(
            ImpactSettings {
                budget_ratio: f64::NAN,
                floor: Duration::ZERO,
                relearn_every: Duration::ZERO,
            },
            ms(0),
        );
        assert_eq!(controller.settings.budget_ratio, 1.3);
        assert_eq!(controller.settings.relearn_every, Duration::from_secs(30));
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let mut values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile(&mut values, 0.9), Some(9.0));
        assert_eq!(quantile(&mut [3.0], 0.9), Some(3.0));
        assert_eq!(quantile(&mut [], 0.9), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the canaries say (and whenever they are silent), the pace stays
        /// within [MIN_RATE, MAX_RATE], never grows more than twofold in one judgement,
        /// and every over-budget judgement leaves it no higher than before.
        #[test]
        fn the_pace_stays_bounded_and_moves_by_bounded_steps(
            latencies in proptest::collection::vec(proptest::option::of(0u64..50_000), 1..400),
            ratio in 1.01f64..3.0,
            floor_us in 0u64..5_000,
        ) {
            let settings = ImpactSettings {
                budget_ratio: ratio,
                floor: Duration::from_micros(floor_us),
                relearn_every: Duration::from_secs(7),
            };
            let mut controller = ImpactController::new(settings, ms(0));
            let mut now = ms(0);
            let mut rows = 0u64;
            for latency in latencies {
                now += CANARY;
                let before = controller.rate();
                if let Some(us) = latency {
                    controller.observe(now, Duration::from_micros(us));
                }
                rows += 10;
                controller.record_rows(now, rows);
                let verdict = controller.evaluate(now, true);
                let after = controller.rate();
                prop_assert!((MIN_RATE..=MAX_RATE).contains(&after));
                prop_assert!(after <= (before * 2.0).max(START_RATE) + 1e-9);
                if let Some(ImpactDirective::Pace(rate)) = verdict.directive {
                    prop_assert_eq!(rate, after);
                }
                if let Some(r) = verdict.ratio {
                    prop_assert!(r.is_finite() && r >= 0.0);
                }
            }
        }
    }
}
