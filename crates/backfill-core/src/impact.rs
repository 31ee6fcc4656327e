//! The impact budget: as many rows per second as production's latency allows.
//!
//! The operator states how much production's latency may rise, as a ratio of its own
//! recent baseline (default 1.3) with a floor in milliseconds so that microsecond noise
//! never counts. [`ImpactController`] maximises the rows per second backfilld writes on
//! the primary subject to that budget, from one signal: the round trip of the committing
//! canary (see [`crate::latency`]), a tiny transaction timed on a connection of its own,
//! which waits for the same CPUs, locks and WAL flushes production's transactions wait for.
//!
//! - **The tail, not the median**: a backfill hurts production's p99 by stalling a few
//!   transactions in a hundred (a commit that waits behind a batch's WAL flush, a backend
//!   that waits for a CPU), and leaves the rest as fast as before. So what is judged is a
//!   *tail* of the canaries: their [`TAIL_QUANTILE`] over a span of about a hundred, which
//!   three stalled canaries move and one or two strays cannot.
//! - **Baseline**: the same quantile of the canaries of the last [`BASELINE_RESTS`] rests
//!   together ([`REST`] each, after [`DRAIN`] for the last batch to finish) — about as many
//!   canaries as a judgement has, so the two compare like with like. backfilld rests at
//!   start, every `relearn_every`, and whenever production starts working on the primary
//!   (its latency moves with its own load, not only with ours). A rest is trusted only as
//!   far as the calmest span judged within budget since: one that caught a stall of the
//!   disk, or the daemon's own start-up work, reads slower than production alone is.
//! - **Impact**: the same tail over the canaries since the pace last changed, as a ratio
//!   of the baseline. Over budget means over `budget_ratio × baseline` *and* more than
//!   `floor` above it.
//! - **Stalls that are not ours**: a disk that stalls a commit every few seconds with or
//!   without a backfill puts a p98 on the edge between its calm mode and its stalls, at
//!   rest and in a span alike (issue 19's fourth round). So the canaries' median is
//!   judged too, against the latest rest's ([`CALM_QUANTILE`], same ratio and floor),
//!   and so is how many canaries are over the tail's line ([`BROAD_QUANTILE`]). A median
//!   over budget (the whole primary slower) or many canaries over the line (many
//!   transactions delayed) cuts at once; a tail over budget by a few canaries, which is
//!   what a stall of the disk looks like, cuts only on a second such span running (a
//!   *strike* first), unless a multiplying step just set the pace. A baseline that
//!   learned the stalls thus still sees the load in the median, and one that learned
//!   the calm mode is not cut for each stall.
//! - **Pace** (AIMD, as TCP congestion control, with a fast climb where there is room):
//!   from [`START_RATE`]. Over budget, judged on [`CUT_AFTER`] of canaries, cuts it by
//!   [`CUT_FACTOR`], or back to where the step that set it started when that step
//!   multiplied (as TCP's slow start halves on a loss: the step is what went over). A pace
//!   just set by a multiplying step is cut already after [`DECIDED_AFTER`] when enough of
//!   its canaries are over that the full span's tail must be: a doubling over a cliff
//!   costs production a second, not five. Under budget it grows, as fast as the room
//!   left allows (a multiplying step is judged already after [`GROW_AFTER`] when not one
//!   canary was over, an additive one after [`CUT_AFTER`]):
//!   while the canary's rise is under [`ROOMY_SHARE`] of what the budget allows, it
//!   multiplies ([`SLOW_START_FACTOR`] until the first cut; [`ROOMY_FACTOR`] after one, up
//!   to [`APPROACH`] of the rate last cut at, then again once past it); otherwise, and
//!   between [`APPROACH`] of the last cut and the cut itself, it grows by
//!   [`GROWTH_FRACTION`] of the rate (at least [`MIN_GROWTH`]). A cut by noise is thus won
//!   back in a few judgements, and a pace far under what production allows (a light load)
//!   climbs there in seconds, not minutes, while a pace near the budget creeps.
//!   The rate never grows past twice what the jobs achieved: a rate the jobs cannot reach
//!   buys nothing and would make the next cut arrive late.
//! - **No signal** (no canary answered for [`SIGNAL_TIMEOUT`]): no verdict; the throttle
//!   falls back to the fixed duty cycle next to production.
//!
//! The rate is the whole daemon's; each running job takes its share and spends it in
//! small evenly spaced batches ([`crate::throttle`]), never a second's worth at once.

use std::time::Duration;

/// The tail judged (nearest rank). Issue 19's frontier, pgbench next to backfilld at fixed
/// rates (durable commits, a quiet 2-core machine): where pgbench's p99 rose 2–7×, the
/// canary's p99 rose 1.2–7.6× and its p90 mostly not at all; a backfill stalls a few
/// canaries in a hundred. The p98 of a hundred is the third slowest: a stray or two do not
/// set it.
pub const TAIL_QUANTILE: f64 = 0.98;

/// How long backfilld rests to re-learn the baseline (after [`DRAIN`]): [`BASELINE_RESTS`]
/// rests' canaries together are about as many as a judgement's.
pub const REST: Duration = Duration::from_millis(2_000);

/// The first rest is as long as a judgement's span: alone, a two-second rest's p98 is its
/// slowest canary, and one stray there (2.4 ms against 0.5 ms, in issue 19's frontier) set
/// a budget nothing ever exceeded.
pub const FIRST_REST: Duration = CUT_AFTER;

/// At the start of a rest, canaries are ignored this long: the last batch and its commit
/// flush may still be running.
pub const DRAIN: Duration = Duration::from_millis(300);

/// Pace of the first batches after the first baseline (rows per second, whole daemon).
pub const START_RATE: f64 = 500.0;

/// Lowest pace: a job always moves.
pub const MIN_RATE: f64 = 10.0;

/// Highest pace (a sanity bound; the achieved-rate cap binds long before).
pub const MAX_RATE: f64 = 10_000_000.0;

/// Canaries are judged over budget only once they span this long since the pace last
/// changed: a hundred at the default 50 ms `canary_interval`, enough for a tail
/// ([`TAIL_QUANTILE`]) that a stray canary does not set.
pub const CUT_AFTER: Duration = Duration::from_millis(5_000);

/// A pace just reached by a multiplying step is judged over budget already after this
/// long when enough of its canaries are over that the full span's tail must be (see
/// [`decided_tail`]): issue 19's frontier doubled from 15,000 to 29,000 rows/s next to
/// 200 tx/s, where production's p99 went from 4 to 150 ms, and waiting out a full span
/// there costs production five seconds of that.
pub const DECIDED_AFTER: Duration = Duration::from_millis(1_000);

/// Canaries are judged under budget once they span this long: with fewer than fifty, the
/// p98 is the slowest of them, so growing this early asks that not one was over budget.
/// The climb where there is room (a light load) is not held to one step in five seconds.
pub const GROW_AFTER: Duration = Duration::from_millis(2_000);

/// Fewest canaries a judgement or a rest is made from.
pub const MIN_SAMPLES: usize = 20;

/// Additive growth per judgement near the budget, as a fraction of the rate in force
/// (at least [`MIN_GROWTH`]).
pub const GROWTH_FRACTION: f64 = 0.1;

/// Smallest additive growth step, rows per second: a pace cut to its floor by noise
/// climbs back within seconds, not minutes.
pub const MIN_GROWTH: f64 = 50.0;

/// Growth per judgement under budget until the first cut (slow start, as TCP's).
pub const SLOW_START_FACTOR: f64 = 2.0;

/// Growth per judgement after a cut while there is room ([`ROOMY_SHARE`]): back near where
/// it was cut in one or two judgements, and past it in a few if that cut was noise.
pub const ROOMY_FACTOR: f64 = 1.5;

/// After a cut, a roomy climb multiplies only up to this share of the rate last cut at,
/// then grows additively to it (as TCP CUBIC's plateau near its last maximum).
pub const APPROACH: f64 = 0.85;

/// "Room": the canary's rise over its baseline is under this share of the rise the budget
/// allows. The rise grows with the pace, so a pace using less than half the allowed rise
/// is far from the budget; nearer, growth turns additive.
pub const ROOMY_SHARE: f64 = 0.5;

/// Multiplicative decrease when over budget (as TCP CUBIC's 0.7, gentler than halving: one
/// noisy judgement costs less).
pub const CUT_FACTOR: f64 = 0.7;

/// The baseline is the tail of this many latest rests' canaries together: one rest's
/// forty-odd are too few for a p98, and three (issue 19's fourth round) still learned
/// either the disk's calm mode or its stalls, about one rest in three each.
pub const BASELINE_RESTS: usize = 5;

/// A tail over budget whose canaries at this quantile are over the same line is broad, not
/// a few stalls: five or more of a span's hundred. A disk that stalls a commit every few
/// seconds stalls one to three canaries a span (issue 19's fourth round); a backfill
/// whose commit flushes delay production's delays many a little.
pub const BROAD_QUANTILE: f64 = 0.95;

/// The calm latency is the median of the canaries (of the latest rest, and of a span):
/// production's typical transaction, which a stall of the disk every few seconds does
/// not move and a backfill that loads the primary does.
pub const CALM_QUANTILE: f64 = 0.5;

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
            // Issue 19's frontier: under 1 ms the canary's tail never rose over budget
            // where pgbench's p99 rose 1.4–2.3×; 500 µs cuts sooner (docs/BENCHMARKS.md).
            floor: Duration::from_micros(500),
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
    /// The last measured impact: the canaries' tail over its baseline.
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
    /// The canaries' levels while resting: the tail of the latest rests' together, the
    /// median of the latest rest alone (it moves with production's own load).
    rested: Option<Levels>,
    /// The lowest levels of the spans judged within budget since the last rest: the
    /// rests' are trusted only as far as these.
    calmest: Option<Levels>,
    /// The latest rests' canary round trips, seconds, oldest rest first.
    rests: Vec<Vec<f64>>,
    rate: f64,
    /// Rate at the last cut; `None` while still in slow start.
    cut_at: Option<f64>,
    /// The pace before the step that set the one in force, when that step multiplied: a
    /// cut undoes it.
    stepped_from: Option<f64>,
    /// The last span's tail alone was over budget (its median was not): one more such
    /// span running cuts, a span under budget clears it.
    strike: bool,
    last_ratio: Option<f64>,
    last_canary: Option<Duration>,
    last_relearn: Duration,
    /// Rows the jobs had committed in all, and when, at the last growth judgement.
    rows_mark: Option<(Duration, u64)>,
    /// Rows per second the jobs achieved over the last judged span.
    achieved: Option<f64>,
    production_active: bool,
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
            rested: None,
            calmest: None,
            rests: Vec::new(),
            rate: START_RATE,
            cut_at: None,
            stepped_from: None,
            strike: false,
            last_ratio: None,
            last_canary: None,
            last_relearn: now,
            rows_mark: None,
            achieved: None,
            production_active: false,
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
                let rest = if self.rests.is_empty() {
                    FIRST_REST
                } else {
                    REST
                };
                if now >= since.saturating_add(DRAIN).saturating_add(rest) {
                    if self.samples.len() >= MIN_SAMPLES {
                        if self.rests.len() == BASELINE_RESTS {
                            self.rests.remove(0);
                        }
                        let calm = quantile(&mut self.samples, CALM_QUANTILE);
                        self.rests.push(std::mem::take(&mut self.samples));
                        let mut pooled: Vec<f64> = self.rests.concat();
                        self.rested = quantile(&mut pooled, TAIL_QUANTILE)
                            .zip(calm)
                            .map(|(tail, calm)| Levels { tail, calm });
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
            Phase::Pacing { .. } if self.rested.is_none() => None,
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

    /// The baseline canary tail, if learned.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline_levels()
            .and_then(|levels| Duration::try_from_secs_f64(levels.tail).ok())
    }

    /// What the canaries are judged against: the rests' levels, each no higher than in
    /// the calmest span since the last rest. A rest can read slower than production
    /// alone is: a stall of the disk sets a short rest's p98, and the daemon's own
    /// start-up work (sizing the job) shares the first. In issue 19's fifth round first
    /// rests read a p98 of 1.2–2.4 ms (8.9 ms once) where spans at 500–1,000 rows/s right
    /// after them read 0.1–0.7 of that; from the 8.9 ms baseline slow start doubled to
    /// 41,283 rows/s next to 200 tx/s, production's p99 6.95× its own. Since the last
    /// rest only: production's own latency moves, and each rest starts over.
    fn baseline_levels(&self) -> Option<Levels> {
        let rested = self.rested?;
        Some(self.calmest.map_or(rested, |calmest| rested.min(calmest)))
    }

    fn start_rest(&mut self, now: Duration) {
        self.phase = Phase::Resting { since: now };
        self.samples.clear();
        self.strike = false;
        self.calmest = None;
    }

    fn enter_pacing(&mut self, now: Duration) {
        self.phase = Phase::Pacing { since: now };
        self.samples.clear();
    }

    /// Cuts when over budget (after [`CUT_AFTER`], or [`DECIDED_AFTER`] when a
    /// multiplying step just set the pace and its tail is already decided), grows when
    /// under it (after [`GROW_AFTER`]). A tail over budget whose median is not is cut for
    /// only on a second such span running (see [`Verdict::FewOver`]).
    fn judge(&mut self, now: Duration, since: Duration) {
        let Some(Levels {
            tail: baseline,
            calm,
        }) = self.baseline_levels()
        else {
            return;
        };
        let span = now.saturating_sub(since);
        if span < DECIDED_AFTER || self.samples.len() < MIN_SAMPLES {
            return;
        }
        let allowed = self.allowed_rise(baseline);
        let ratio_of = |tail: f64| tail / baseline.max(f64::MIN_POSITIVE);
        if self.stepped_from.is_some() {
            if let Some(tail) = decided_tail(&mut self.samples, span, baseline + allowed) {
                self.last_ratio = Some(ratio_of(tail));
                self.cut(now);
                return;
            }
        }
        if span < GROW_AFTER {
            return;
        }
        let Some([current, broad, median]) = quantiles(
            &mut self.samples,
            [TAIL_QUANTILE, BROAD_QUANTILE, CALM_QUANTILE],
        ) else {
            return;
        };
        self.last_ratio = Some(ratio_of(current));
        let rise = current - baseline;
        let verdict = if median - calm > self.allowed_rise(calm) || broad - baseline > allowed {
            Verdict::Over
        } else if rise > allowed {
            Verdict::FewOver
        } else {
            Verdict::Under
        };
        let step = self.growth(rise < allowed * ROOMY_SHARE);
        // Multiplying with room to spare may go on fewer canaries (none of them over);
        // a cut, a strike, or creeping up near the last cut waits for a full span.
        if span < CUT_AFTER && (verdict != Verdict::Under || !step.multiplies || self.strike) {
            return;
        }
        if verdict == Verdict::Under {
            let levels = Levels {
                tail: current,
                calm: median,
            };
            self.calmest = Some(self.calmest.map_or(levels, |calmest| calmest.min(levels)));
        }
        match verdict {
            Verdict::Over => self.cut(now),
            // The step that set this pace went over: undo it now.
            Verdict::FewOver if self.strike || self.stepped_from.is_some() => self.cut(now),
            Verdict::FewOver => {
                self.strike = true;
                self.enter_pacing(now);
            }
            // After a strike, a span under budget clears it; growing waits for the next.
            Verdict::Under if self.strike => {
                self.strike = false;
                self.enter_pacing(now);
            }
            Verdict::Under => {
                // Never past twice what the jobs achieve: a pace they cannot reach buys
                // nothing.
                let cap = self
                    .achieved
                    .map_or(MAX_RATE, |a| (2.0 * a).max(START_RATE));
                let to = step
                    .to
                    .min(cap)
                    .max(self.rate.min(cap))
                    .clamp(MIN_RATE, MAX_RATE);
                self.stepped_from = (step.multiplies && to > self.rate).then_some(self.rate);
                self.rate = to;
                self.enter_pacing(now);
            }
        }
    }

    /// The rise over `level` the budget allows: the ratio's, or the floor when that is
    /// more.
    fn allowed_rise(&self, level: f64) -> f64 {
        (level * (self.settings.budget_ratio - 1.0)).max(self.settings.floor.as_secs_f64())
    }

    /// Over budget: by [`CUT_FACTOR`], or back to the pace before the step that set this
    /// one when that step multiplied and was bigger (as TCP halves on a loss in slow
    /// start): that pace was judged under budget, the step is what went over.
    fn cut(&mut self, now: Duration) {
        self.cut_at = Some(self.rate);
        self.strike = false;
        let undone = self.stepped_from.take().unwrap_or(f64::INFINITY);
        self.rate = (self.rate * CUT_FACTOR).min(undone).max(MIN_RATE);
        self.enter_pacing(now);
    }

    /// The next growth step from the pace in force; `roomy`: the canary's rise is under
    /// [`ROOMY_SHARE`] of the allowed one.
    fn growth(&self, roomy: bool) -> Growth {
        let multiply = |factor: f64, limit: f64| Growth {
            to: (self.rate * factor).min(limit),
            multiplies: true,
        };
        let additive = Growth {
            to: self.rate + (self.rate * GROWTH_FRACTION).max(MIN_GROWTH),
            multiplies: false,
        };
        match self.cut_at {
            _ if !roomy => additive,
            None => multiply(SLOW_START_FACTOR, f64::INFINITY),
            // Back fast to just under the last cut, then creep up to it: production's
            // latency often turns up steeply near its limit (a hockey stick), and jumping
            // back to the rate that was over budget would spend every other judgement
            // over it.
            Some(cut_at) if self.rate < cut_at * APPROACH => {
                multiply(ROOMY_FACTOR, cut_at * APPROACH)
            }
            Some(cut_at) if self.rate < cut_at => additive,
            // Past the last cut with room to spare: that cut was noise, or production has
            // lightened since.
            Some(_) => multiply(ROOMY_FACTOR, f64::INFINITY),
        }
    }

    /// Projects the seconds a backfill of `rows` takes next to production at best, when
    /// its jobs manage `rows_per_second` flat out and production's latency never binds:
    /// the climb from [`START_RATE`] (slow start, one judgement every [`GROW_AFTER`]) after the first
    /// rest ([`FIRST_REST`]), then the full rate, minus the rests that re-learn the baseline
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
        let mut seconds = (DRAIN + FIRST_REST).as_secs_f64();
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

/// Where the canaries' round trips lie, seconds: their [`TAIL_QUANTILE`] and their
/// [`CALM_QUANTILE`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Levels {
    tail: f64,
    calm: f64,
}

impl Levels {
    /// Each level the lower of the two.
    fn min(self, other: Levels) -> Levels {
        Levels {
            tail: self.tail.min(other.tail),
            calm: self.calm.min(other.calm),
        }
    }
}

/// A judgement of a full span against the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Over budget broadly: the canaries' median rose over its budget (the whole primary
    /// is slower), or so did their [`BROAD_QUANTILE`] (more canaries are slow than a stall
    /// of the disk now and then makes). Cut now.
    Over,
    /// The tail is over budget but only a few canaries are: ours, or a stall of the disk
    /// that comes with or without us every few seconds (issue 19's fourth round: 30 of 34
    /// cuts at rates that kept the budget). Cut when the span before was one too, or when
    /// the step that set the pace multiplied.
    FewOver,
    /// Within budget.
    Under,
}

/// A growth step of the pace: the rate it grows to, and whether it multiplies (and may
/// then be taken on fewer canaries, see [`GROW_AFTER`]).
#[derive(Debug, Clone, Copy)]
struct Growth {
    to: f64,
    multiplies: bool,
}

/// A tail already over `threshold` whatever the rest of the span says: a full
/// [`CUT_AFTER`] span (at the canaries' pace so far over `span`) has its [`TAIL_QUANTILE`]
/// at a rank with `k` canaries at or above it, so once `k` canaries so far are over
/// `threshold`, so is the tail. Returns the lower bound of the tail they set (the `k`th
/// slowest), or `None` while undecided. Reorders `values`.
fn decided_tail(values: &mut [f64], span: Duration, threshold: f64) -> Option<f64> {
    if values.is_empty() || span.is_zero() {
        return None;
    }
    let full = (values.len() as f64 * CUT_AFTER.as_secs_f64() / span.as_secs_f64())
        .ceil()
        .max(values.len() as f64) as usize;
    let above_tail = full - nearest_rank(TAIL_QUANTILE, full) + 1;
    if values.len() < above_tail {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let decider = values[values.len() - above_tail];
    (decider > threshold).then_some(decider)
}

/// The `q` quantile (nearest rank) of `values`; `None` when empty. Reorders `values`.
fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    quantiles(values, [q]).map(|[value]| value)
}

/// The quantiles `qs` (nearest rank) of `values`, sorted once; `None` when empty.
/// Reorders `values`.
fn quantiles<const N: usize>(values: &mut [f64], qs: [f64; N]) -> Option<[f64; N]> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(qs.map(|q| values[nearest_rank(q, values.len()) - 1]))
}

/// The 1-based rank of the `q` quantile (nearest rank) among `count` values (`count` ≥ 1).
fn nearest_rank(q: f64, count: usize) -> usize {
    ((q * count as f64).ceil() as usize).clamp(1, count)
}

#[cfg(test)]
mod tests;
