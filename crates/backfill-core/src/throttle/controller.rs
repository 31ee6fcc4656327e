//! The state machine: [`ThrottleController`] learns the batch size from each report, backs
//! off on trouble and, through the hold checks (`holds.rs`) and the sizing and pacing rules
//! (`pacing.rs`), turns one health sample into one decision.

use std::time::Duration;

use super::pacing::WorkerCycles;
use super::settings::{normalize_budget, MIN_ROWS_PER_SECOND, UNIT_RANGE};
use super::{
    BatchOutcome, BatchReport, HealthSample, ThrottleDecision, ThrottleReason, ThrottleSettings,
};
use crate::impact::ImpactDirective;
use crate::latency::{LatencyPacer, PACING_WINDOW};
use crate::signals::SignalLatches;

/// A batch that took more than this many times the target is reported as `slow_batch`;
/// smaller overshoots are corrected silently as normal regulation.
const SLOW_BATCH_FACTOR: u32 = 2;

/// Start time and row count of the last committed batch, which prices the next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CommitMark {
    pub(super) started_at: Duration,
    pub(super) rows: u64,
    pub(super) duration: Duration,
}

/// A multiplicative-cut signal from the last batch or the health sample.
#[derive(Debug, Clone, Copy)]
struct Trouble {
    reason: ThrottleReason,
    /// Minimum pause, e.g. as long as we made production wait.
    at_least: Duration,
}

/// The adaptive throttle controller of one worker; see the module docs for its rules.
///
/// Drive it once before every batch:
///
/// ```
/// use std::time::Duration;
/// use backfill_core::throttle::*;
///
/// let mut throttle = ThrottleController::new(ThrottleSettings::default());
/// let mut now = Duration::ZERO; // the caller's monotonic clock
/// let mut last_batch = None;
/// for _ in 0..3 {
///     let health = HealthSample::healthy(); // from the health probe
///     match throttle.decide(now, &health, last_batch.take().as_ref()) {
///         ThrottleDecision::Run { batch_size, pause_before, .. } => {
///             now += pause_before; // sleep, then run the batch
///             let duration = Duration::from_millis(100);
///             now += duration;
///             let outcome = BatchOutcome::Committed { rows: u64::from(batch_size), duration };
///             last_batch = Some(BatchReport { size: batch_size, outcome });
///         }
///         ThrottleDecision::Hold { recheck_after, .. } => now += recheck_after,
///     }
/// }
/// assert_eq!(throttle.state_label(), "running");
/// ```
#[derive(Debug, Clone)]
pub struct ThrottleController {
    pub(super) settings: ThrottleSettings,
    /// Learned batch size, before the rate-budget cap.
    pub(super) batch_size: u32,
    /// Latched when lag reached the hard limit; cleared only once all lag is below half.
    pub(super) holding_for_lag: bool,
    /// Latched when a slot reached its limit; cleared only once every slot is below half.
    pub(super) holding_for_slot: bool,
    /// Latched when the throttle query went over its threshold (or failed, failing safe).
    pub(super) holding_for_query: bool,
    /// Latches of the WAL rate, archiving, dead-tuple and job-query signals.
    pub(super) signal_latches: SignalLatches,
    /// Operator ratio from the latest sample, in (0, 1); `None`: not slowed by an operator.
    pub(super) operator_ratio: Option<f64>,
    /// Consecutive troubled batches; drives the exponential backoff.
    consecutive_troubles: u32,
    /// No batch may start before this time (backoff).
    pub(super) backoff_until: Duration,
    /// What caused the current backoff.
    pub(super) backoff_reason: Option<ThrottleReason>,
    /// Prices the next start against the rate budget.
    pub(super) last_commit: Option<CommitMark>,
    /// When the last Run decision let its batch start.
    allowed_start: Option<Duration>,
    /// When the last Run decision released its batch, if a rate budget's window sized it.
    window_sized_release: Option<Duration>,
    /// How long the worker's recent cycles took; they stretch the rate window.
    pub(super) cycles: WorkerCycles,
    /// Rows per second the last committed batch achieved while it ran.
    last_batch_rate: Option<f64>,
    /// The pace that keeps production's latency flat (see [`crate::latency`]).
    pub(super) latency: LatencyPacer,
    /// A health-driven cut was already applied since the last batch; repeated decisions
    /// without a batch in between (hold rechecks) must not compound it.
    health_cut_since_last_batch: bool,
    /// Production is active and sharing is on: short batches at a bounded duty cycle.
    pub(super) sharing: bool,
    /// This job's share of the impact budget's pace (rows per second), while it paces.
    pub(super) impact_rate: Option<f64>,
    /// Jobs and slices running now, among which the impact budget's pace is shared.
    impact_sharers: i64,
    last_decision: Option<ThrottleDecision>,
}

impl ThrottleController {
    /// A controller starting at `start_batch_size`; nonsense settings are normalised (see
    /// [`ThrottleSettings::normalized`]) so the controller never panics on user input.
    pub fn new(settings: ThrottleSettings) -> Self {
        let settings = settings.normalized();
        Self {
            batch_size: settings.start_batch_size,
            settings,
            holding_for_lag: false,
            holding_for_slot: false,
            holding_for_query: false,
            signal_latches: SignalLatches::default(),
            operator_ratio: None,
            consecutive_troubles: 0,
            backoff_until: Duration::ZERO,
            backoff_reason: None,
            last_commit: None,
            allowed_start: None,
            window_sized_release: None,
            cycles: WorkerCycles::default(),
            last_batch_rate: None,
            latency: LatencyPacer::default(),
            health_cut_since_last_batch: false,
            sharing: false,
            impact_rate: None,
            impact_sharers: 1,
            last_decision: None,
        }
    }

    /// Decides what to do next.
    ///
    /// `now` is a monotonic Duration since an arbitrary origin (the caller passes elapsed
    /// time), so the controller can enforce rate budgets and hysteresis without a clock.
    /// `last_batch` is the report of the batch that ran since the previous decision, and
    /// `None` when none ran (the first decision, or after a hold); passing one report twice
    /// counts it twice.
    pub fn decide(
        &mut self,
        now: Duration,
        health: &HealthSample,
        last_batch: Option<&BatchReport>,
    ) -> ThrottleDecision {
        let base = self.batch_size;
        let mut next_size = base;
        let mut reason = None;
        let mut trouble = None;
        // The impact budget applies next to production; with no verdict, the duty cycle.
        let impact = health.impact.filter(|_| health.production_active);
        self.sharing =
            health.production_active && self.settings.busy_duty_cycle < 1.0 && impact.is_none();
        self.impact_rate = match impact {
            Some(ImpactDirective::Pace(rate)) => {
                Some((rate / self.impact_sharers.max(1) as f64).max(MIN_ROWS_PER_SECOND))
            }
            _ => None,
        };
        // Nonsense (NaN, negative) holds: failing safe; 1 or more is no throttle at all.
        let operator_ratio =
            health
                .operator_ratio
                .map(|ratio| if ratio.is_nan() { 0.0 } else { ratio.max(0.0) });
        self.operator_ratio = operator_ratio.filter(|ratio| *ratio > 0.0 && *ratio < 1.0);
        let operator_hold = operator_ratio == Some(0.0);

        let after_window_sized_batch = self.window_sized_release.is_some()
            && matches!(
                last_batch,
                Some(BatchReport {
                    outcome: BatchOutcome::Committed { .. },
                    ..
                })
            );
        if let Some(report) = last_batch {
            self.health_cut_since_last_batch = false;
            let (size, report_reason, report_trouble) = self.absorb_report(now, base, report);
            next_size = size;
            reason = report_reason;
            trouble = report_trouble;
        }

        // A failed probe says nothing reliable: no health-driven cut, no lag judgement.
        let lag = (!health.probe_failed).then(|| self.assess_lag(health));
        if let Some(lag) = &lag {
            if !self.health_cut_since_last_batch {
                let mut factor: f64 = 1.0;
                if health.sessions_blocked_by_us > 0 {
                    factor = self.settings.blocking_cut_factor;
                    trouble = worse_trouble(
                        trouble,
                        Trouble {
                            reason: ThrottleReason::BlockingProduction,
                            at_least: health.longest_block,
                        },
                    );
                }
                if lag.at_or_over_soft {
                    factor = factor.min(self.settings.cut_factor);
                }
                if factor < 1.0 {
                    next_size = next_size.min(scale(base, factor));
                    self.health_cut_since_last_batch = true;
                }
            }
        }
        if lag.is_some() {
            let floor = f64::from(self.settings.min_batch_size) / PACING_WINDOW.as_secs_f64();
            if self
                .latency
                .update(now, health.probe_delays, self.last_batch_rate, floor)
            {
                reason = ThrottleReason::worst(reason, ThrottleReason::ProductionLatency);
            }
        }
        if let Some(trouble) = trouble {
            self.start_backoff(now, trouble);
        }
        self.batch_size = self.clamp_size(next_size);

        let decision = match lag {
            // Hold briefly and leave the lag latch alone: the database may be unreachable.
            None => self.hold(ThrottleReason::ProbeFailed),
            Some(_) if operator_hold => {
                // Keep the latches current, so that a release does not run on stale news.
                self.update_slot_latch(health);
                self.update_query_latch(health);
                self.signal_latches
                    .update(&self.settings.signal_limits, &health.signal_readings());
                self.hold(ThrottleReason::Operator)
            }
            Some(lag) => self.lag_decision(now, &lag, health, reason),
        };
        self.note_release(now, decision, after_window_sized_batch);
        self.last_decision = Some(decision);
        decision
    }

    /// Current batch size: what the next batch would use, with the rate cap applied, barring
    /// new signals.
    pub fn batch_size(&self) -> u32 {
        match self.rate_cap() {
            Some(cap) => self.batch_size.min(cap),
            None => self.batch_size,
        }
    }

    /// Changes the rows-per-second budget at run time (e.g. a share of a budget split across
    /// workers); `None` or infinity removes it, and anything below 1 row/s (or nonsense)
    /// means 1 row/s.
    pub fn set_max_rows_per_second(&mut self, budget: Option<f64>) {
        self.settings.max_rows_per_second = normalize_budget(budget);
    }

    /// Applies a live retune of the batch bounds and target (the job's columns changed while
    /// it runs). The learned batch size is kept, inside the new bounds; `restart_at` (a new
    /// `batch_size` column) replaces it outright, clamped likewise. Nonsense is normalised
    /// as in [`ThrottleController::new`].
    pub fn retune_batches(
        &mut self,
        min_batch_size: u32,
        max_batch_size: u32,
        target_batch: Duration,
        restart_at: Option<u32>,
    ) {
        self.settings = ThrottleSettings {
            min_batch_size,
            max_batch_size,
            target_batch,
            start_batch_size: restart_at.unwrap_or(self.settings.start_batch_size),
            ..self.settings.clone()
        }
        .normalized();
        if restart_at.is_some() {
            self.batch_size = self.settings.start_batch_size;
        }
        self.batch_size = self.clamp_size(self.batch_size);
    }

    /// Changes the duty cycle next to production at run time (this job's share of it while
    /// others run); nonsense keeps the one in force.
    pub fn set_busy_duty_cycle(&mut self, duty_cycle: f64) {
        if UNIT_RANGE.contains(duty_cycle) {
            self.settings.busy_duty_cycle = duty_cycle;
        }
    }

    /// Sets how many jobs and slices share the impact budget's pace now (at least 1).
    pub fn set_impact_sharers(&mut self, running: i64) {
        self.impact_sharers = running.max(1);
    }

    /// This job's share of the impact budget's pace in force, if it paces (rows per second).
    pub fn impact_rate(&self) -> Option<f64> {
        self.impact_rate
    }

    /// The duty cycle next to production in force.
    pub fn busy_duty_cycle(&self) -> f64 {
        self.settings.busy_duty_cycle
    }

    /// The rows-per-second budget in force.
    pub fn max_rows_per_second(&self) -> Option<f64> {
        self.settings.max_rows_per_second
    }

    /// `"running"`, `"throttled"` (the last decision paused or cut) or `"holding"`.
    pub fn state_label(&self) -> &'static str {
        match self.last_decision {
            Some(ThrottleDecision::Hold { .. }) => "holding",
            Some(ThrottleDecision::Run {
                reason: Some(_), ..
            }) => "throttled",
            _ => "running",
        }
    }

    /// Reason attached to the last decision, if any.
    pub fn reason(&self) -> Option<ThrottleReason> {
        self.last_decision.and_then(|decision| decision.reason())
    }

    /// The last decision made, if any.
    pub fn last_decision(&self) -> Option<ThrottleDecision> {
        self.last_decision
    }

    /// The settings in force (normalised).
    pub fn settings(&self) -> &ThrottleSettings {
        &self.settings
    }

    /// Remembers when the decision lets its batch start, to price it and to time the
    /// worker's cycle. A batch released at once after a window-sized one is priced from
    /// when the budgets allowed it, which may have passed while that one ran long: the
    /// cycles of a busy host vary (2–70 ms on one), and the long ones must not cost the
    /// budget what the short ones leave over.
    fn note_release(
        &mut self,
        now: Duration,
        decision: ThrottleDecision,
        after_window_sized_batch: bool,
    ) {
        let ThrottleDecision::Run {
            batch_size,
            pause_before,
            ..
        } = decision
        else {
            self.allowed_start = None;
            self.window_sized_release = None;
            return;
        };
        let released = now.saturating_add(pause_before);
        self.allowed_start = Some(match self.budgets_allow_at() {
            Some(due) if after_window_sized_batch && pause_before.is_zero() => due.min(now),
            _ => released,
        });
        self.window_sized_release = (self.rate_cap() == Some(batch_size)).then_some(released);
    }

    /// The start the next one is priced from, for a batch that started at `actual` (about:
    /// a late call only makes it later). The timer and the loop's own work start every
    /// batch a little after the time it was allowed, by more on a busy host (its cycles
    /// ranged 2–70 ms); priced from `actual`, each batch would lose that much of the budget
    /// (about 6 % in 20 ms windows on a quiet one). So a start up to one window late is
    /// priced from the allowed time; idle time past that is never banked, so after a stall
    /// at most one batch follows another without a pause.
    fn priced_start(&self, actual: Duration) -> Duration {
        match self.allowed_start {
            Some(allowed) if allowed <= actual => {
                allowed.max(actual.saturating_sub(self.rate_window()))
            }
            _ => actual,
        }
    }

    /// Learns from the last batch: the proposed next size, a reason to report, and the
    /// trouble (if any) that must cut and back off.
    fn absorb_report(
        &mut self,
        now: Duration,
        base: u32,
        report: &BatchReport,
    ) -> (u32, Option<ThrottleReason>, Option<Trouble>) {
        let settings = &self.settings;
        let trouble = |reason| {
            Some(Trouble {
                reason,
                at_least: Duration::ZERO,
            })
        };
        match report.outcome {
            BatchOutcome::Committed { rows, duration } => {
                self.consecutive_troubles = 0;
                self.last_commit = Some(CommitMark {
                    started_at: self.priced_start(now.saturating_sub(duration)),
                    rows,
                    duration,
                });
                if let Some(released) = self.window_sized_release {
                    self.cycles.record(now.saturating_sub(released));
                }
                if rows > 0 && !duration.is_zero() {
                    self.last_batch_rate = Some(rows as f64 / duration.as_secs_f64());
                }
                let on_target = self.size_for_target(report.size, duration);
                if duration <= self.target() {
                    // An under-target batch never shrinks the size: a short tail batch is
                    // dominated by fixed overhead and would underestimate the good size.
                    let grown = base.saturating_add(self.growth_step());
                    (base.max(grown.min(on_target)), None, None)
                } else {
                    let slow = duration > settings.target_batch.saturating_mul(SLOW_BATCH_FACTOR);
                    let reason = slow.then_some(ThrottleReason::SlowBatch);
                    (base.min(on_target), reason, None)
                }
            }
            BatchOutcome::LockTimeout { .. } => (
                scale(base, settings.cut_factor),
                None,
                trouble(ThrottleReason::LockTimeout),
            ),
            BatchOutcome::CancelledForBlocking { .. } => (
                scale(base, settings.blocking_cut_factor),
                None,
                trouble(ThrottleReason::BlockingProduction),
            ),
            BatchOutcome::StatementTimeout { duration } => {
                let halved = scale(base, settings.cut_factor);
                let on_target = self.size_for_target(report.size, duration);
                (
                    halved.min(on_target),
                    None,
                    trouble(ThrottleReason::SlowBatch),
                )
            }
            BatchOutcome::TransientError { .. } => (
                scale(base, settings.cut_factor),
                None,
                trouble(ThrottleReason::TransientError),
            ),
        }
    }

    /// Escalates the exponential backoff once and pushes the earliest next start out.
    fn start_backoff(&mut self, now: Duration, trouble: Trouble) {
        self.consecutive_troubles = self.consecutive_troubles.saturating_add(1);
        let doublings = (self.consecutive_troubles - 1).min(31);
        let backoff = self
            .settings
            .backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.settings.backoff_max);
        let pause = backoff.max(trouble.at_least.min(self.settings.backoff_max));
        self.backoff_until = self.backoff_until.max(now.saturating_add(pause));
        self.backoff_reason = Some(trouble.reason);
    }
}

/// Multiplies a size by a factor, rounding down.
fn scale(size: u32, factor: f64) -> u32 {
    (f64::from(size) * factor).floor() as u32
}

/// Combines two trouble signals of one decision into one backoff step.
fn worse_trouble(current: Option<Trouble>, candidate: Trouble) -> Option<Trouble> {
    Some(match current {
        None => candidate,
        Some(current) => Trouble {
            reason: ThrottleReason::worst(Some(current.reason), candidate.reason)
                .unwrap_or(candidate.reason),
            at_least: current.at_least.max(candidate.at_least),
        },
    })
}
