//! Sizing and pacing of the next batch: the size steered towards the target duration, the
//! duty cycle next to production, and the rate budgets (the configured one, the latency
//! pace, the impact budget's pace) with the pauses that pay for each batch.

use std::time::Duration;

use super::holds::LagAssessment;
use super::settings::MIN_ROWS_PER_SECOND;
use super::{ThrottleController, ThrottleDecision, ThrottleReason};
use crate::latency::PACING_WINDOW;

/// By default a batch carries at most this much of a rate budget (the configured one, or
/// the impact budget's pace; `throttle.rate_window`), evenly spaced: a second's budget
/// written as one batch hurt production's latency more than a naive loop at the same rate
/// (issue 19). Production feels how long each batch runs more than how many run (our
/// reading of the overlap of its transactions with the batches): in issue 19's tenth
/// frontier round, at a fixed 2,000 rows/s, 40-row batches every 20 ms left pgbench's p99
/// lower than 200-row batches every 100 ms in six rounds of six (medians 1.09× and 1.25×
/// against 1.22× and 1.54× at 200 and 600 tx/s), and 500 ms or 1 s windows raised it more
/// than 100 ms in 15 paired rounds of 18.
pub const DEFAULT_RATE_WINDOW: Duration = Duration::from_millis(20);

/// The window stretches to this many times the worker's typical cycle, so that the
/// cycle's spread around its median does not leave the budget short.
const CYCLE_HEADROOM: f64 = 1.25;

/// The cycles the typical one is the median of: a rest or a stall is one cycle of these,
/// and moves the median little.
const CYCLE_SAMPLES: usize = 8;

/// Fewer cycles than this say nothing typical yet (the first batches run cold).
const MIN_CYCLE_SAMPLES: usize = 3;

/// How long the worker's recent cycles took: from the release of a window-sized batch to
/// the decision after it (the batch and the loop's own work around it).
#[derive(Debug, Clone, Default)]
pub(super) struct WorkerCycles {
    recent: [Duration; CYCLE_SAMPLES],
    recorded: usize,
}

impl WorkerCycles {
    /// Adds a cycle, forgetting the oldest of [`CYCLE_SAMPLES`].
    pub(super) fn record(&mut self, cycle: Duration) {
        self.recent[self.recorded % CYCLE_SAMPLES] = cycle;
        self.recorded += 1;
    }

    /// The median of the recent cycles, once there are enough of them.
    fn typical(&self) -> Option<Duration> {
        let count = self.recorded.min(CYCLE_SAMPLES);
        if count < MIN_CYCLE_SAMPLES {
            return None;
        }
        let mut cycles = self.recent;
        let cycles = &mut cycles[..count];
        cycles.sort_unstable();
        Some(cycles[count / 2])
    }
}

impl ThrottleController {
    /// Batch size and pause for the next batch: the longest of the pending backoff, the
    /// soft-lag pause and the rate-budget pause; the reason is the most severe one active.
    pub(super) fn plan_run(
        &self,
        now: Duration,
        lag: &LagAssessment,
        mut reason: Option<ThrottleReason>,
    ) -> ThrottleDecision {
        let mut pause = self.backoff_until.saturating_sub(now);
        if !pause.is_zero() {
            if let Some(backoff_reason) = self.backoff_reason {
                reason = ThrottleReason::worst(reason, backoff_reason);
            }
        }
        if lag.at_or_over_soft {
            pause = pause.max(self.settings.soft_lag_pause);
            reason = ThrottleReason::worst(reason, ThrottleReason::ReplicationLag);
        }
        if self.sharing {
            reason = ThrottleReason::worst(reason, ThrottleReason::ProductionActive);
        }
        if let Some(ratio) = self.operator_ratio {
            reason = ThrottleReason::worst(reason, ThrottleReason::Operator);
            // The operator's share applies on top of the share next to production.
            pause = pause.max(self.duty_pause(now, self.duty_cycle() * ratio, None));
        } else if self.sharing {
            pause = pause.max(self.duty_pause(
                now,
                self.settings.busy_duty_cycle,
                Some(self.settings.backoff_max),
            ));
        }
        let mut batch_size = self.batch_size;
        for budget in self.budgets() {
            let cap = self.clamp_size(budget.window_rows());
            if cap < batch_size {
                batch_size = cap;
                reason = ThrottleReason::worst(reason, budget.reason);
            }
            let rate_pause = self.rate_pause(now, &budget);
            if !rate_pause.is_zero() {
                pause = pause.max(rate_pause);
                reason = ThrottleReason::worst(reason, budget.reason);
            }
        }
        ThrottleDecision::Run {
            batch_size,
            pause_before: pause,
            reason,
        }
    }

    /// The batch duration steered towards: the short one while sharing the primary.
    pub(super) fn target(&self) -> Duration {
        if self.sharing {
            self.settings
                .target_batch
                .min(self.settings.busy_batch_target)
        } else {
            self.settings.target_batch
        }
    }

    /// Share of the time batches may run next to production: `busy_duty_cycle` while
    /// sharing, else all of it.
    fn duty_cycle(&self) -> f64 {
        if self.sharing {
            self.settings.busy_duty_cycle
        } else {
            1.0
        }
    }

    /// Wait until the last committed batch's run time is at most `duty_cycle` of the time
    /// since it started, but no longer than `cap`. While sharing the cap is `backoff_max`
    /// (a batch far over the target is cut to size anyway; resting 19× its length at 5 %
    /// would only stall the job); an operator's ratio is not capped, it is what they asked.
    fn duty_pause(&self, now: Duration, duty_cycle: f64, cap: Option<Duration>) -> Duration {
        let Some(mark) = self.last_commit else {
            return Duration::ZERO;
        };
        let cycle = Duration::try_from_secs_f64(mark.duration.as_secs_f64() / duty_cycle)
            .unwrap_or(Duration::MAX);
        let pause = mark.started_at.saturating_add(cycle).saturating_sub(now);
        cap.map_or(pause, |cap| pause.min(cap))
    }

    /// Size the last batch's per-row cost predicts would take exactly the target.
    pub(super) fn size_for_target(&self, size: u32, took: Duration) -> u32 {
        if took.is_zero() || size == 0 {
            return u32::MAX;
        }
        let rows = f64::from(size) * self.target().as_secs_f64() / took.as_secs_f64();
        // `as` saturates, which is what we want for huge predictions.
        rows.floor() as u32
    }

    pub(super) fn growth_step(&self) -> u32 {
        let step = f64::from(self.settings.max_batch_size) * self.settings.growth_step_fraction;
        (step.ceil() as u32).max(1)
    }

    pub(super) fn clamp_size(&self, size: u32) -> u32 {
        size.clamp(self.settings.min_batch_size, self.settings.max_batch_size)
    }

    /// The rate budgets in force: the configured one and the latency pace.
    fn budgets(&self) -> impl Iterator<Item = RateBudget> {
        // A batch is charged at most what one admitted under this budget can cost (a
        // window's worth, or a smallest batch): the batch before the budget was lowered (an
        // operator's live retune or incident ratio, a slice's share shrinking) carried the
        // old budget's window, and charging all of it at the new rate would stall the job
        // for seconds.
        let operator = self.operator_ratio;
        let configured = self.settings.max_rows_per_second.map(|rate| {
            // An operator ratio scales the budget (never below the 1 row/s floor).
            let rate = (rate * operator.unwrap_or(1.0)).max(MIN_ROWS_PER_SECOND);
            self.windowed_budget(
                rate,
                if operator.is_some() {
                    ThrottleReason::Operator
                } else {
                    ThrottleReason::RateLimit
                },
            )
        });
        // The batch before a cut carried far more than a window of the new pace; charging
        // all of it would stall the job for seconds where it should be paced.
        let paced = self.latency.rate().map(|rate| RateBudget {
            rows_per_second: rate,
            window: PACING_WINDOW,
            max_charge: PACING_WINDOW,
            reason: ThrottleReason::ProductionLatency,
        });
        let impact = self
            .impact_rate
            .map(|rate| self.windowed_budget(rate, ThrottleReason::ImpactBudget));
        configured.into_iter().chain(paced).chain(impact)
    }

    /// The window a rate budget is spent in: `rate_window`, or longer when the worker's
    /// typical cycle (its batch and the loop's own work) takes longer than that. A worker
    /// runs one batch at a time, so windows shorter than its cycle cannot add up to the
    /// budget: on a busy 2-core host 20-row batches took 28 ms a cycle, and four workers
    /// sharing 4,000 rows/s wrote 2,462 in CI (issue 19). Never past `target_batch`.
    pub(super) fn rate_window(&self) -> Duration {
        let configured = self.settings.rate_window;
        match self.cycles.typical() {
            Some(cycle) => configured.max(
                cycle
                    .mul_f64(CYCLE_HEADROOM)
                    .min(self.settings.target_batch),
            ),
            None => configured,
        }
    }

    /// A rate budget spent in batches of the [`rate_window`](Self::rate_window), each
    /// charged at most a window or a smallest batch.
    fn windowed_budget(&self, rate: f64, reason: ThrottleReason) -> RateBudget {
        let window = self.rate_window();
        RateBudget {
            rows_per_second: rate,
            window,
            max_charge: window.max(
                Duration::try_from_secs_f64(f64::from(self.settings.min_batch_size) / rate)
                    .unwrap_or(Duration::MAX),
            ),
            reason,
        }
    }

    /// Largest batch allowed by the rate budgets: the smallest window's worth of rows.
    pub(super) fn rate_cap(&self) -> Option<u32> {
        self.budgets()
            .map(|budget| self.clamp_size(budget.window_rows()))
            .min()
    }

    /// Wait until the last committed batch is paid for at the budget's rate.
    fn rate_pause(&self, now: Duration, budget: &RateBudget) -> Duration {
        self.paid_for_at(budget)
            .map_or(Duration::ZERO, |due| due.saturating_sub(now))
    }

    /// When the last committed batch is paid for at the budget's rate (at most its
    /// `max_charge`).
    fn paid_for_at(&self, budget: &RateBudget) -> Option<Duration> {
        self.last_commit.map(|mark| {
            let cost = Duration::try_from_secs_f64(mark.rows as f64 / budget.rows_per_second)
                .unwrap_or(Duration::MAX)
                .min(budget.max_charge);
            mark.started_at.saturating_add(cost)
        })
    }

    /// When the rate budgets let the next batch start, if any applies: possibly in the
    /// past, when the worker is behind.
    pub(super) fn budgets_allow_at(&self) -> Option<Duration> {
        self.budgets()
            .filter_map(|budget| self.paid_for_at(&budget))
            .max()
    }

    /// The pace production latency imposes, if any (rows per second).
    pub fn latency_pace(&self) -> Option<f64> {
        self.latency.rate()
    }
}

/// A rows-per-second budget and the most of it one batch may carry.
struct RateBudget {
    rows_per_second: f64,
    /// A batch carries at most this much of the budget.
    window: Duration,
    /// The pause after a batch pays for at most this much of it.
    max_charge: Duration,
    reason: ThrottleReason,
}

impl RateBudget {
    fn window_rows(&self) -> u32 {
        // `as` saturates; the caller clamps to the batch size range.
        (self.rows_per_second * self.window.as_secs_f64()).floor() as u32
    }
}
