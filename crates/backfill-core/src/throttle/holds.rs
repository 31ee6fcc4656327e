//! The signal checks that hold a job: replication lag and missing standbys (with
//! hysteresis), vacuum, the impact budget's rest, replication slots, the throttle query and
//! the signals of [`crate::signals`]; and [`ThrottleSettings::holding_signals`], the same
//! checks for `backfilld plan`.

use std::time::Duration;

use super::{
    HealthSample, QueryReading, ThrottleController, ThrottleDecision, ThrottleReason,
    ThrottleSettings,
};
use crate::impact::ImpactDirective;

/// While the impact controller rests, holds are re-checked at least this often: a rest is
/// about a second, and the job should resume as soon as it ends.
const IMPACT_REST_RECHECK: Duration = Duration::from_millis(250);

impl ThrottleSettings {
    /// Every signal in `health` that would hold a job under these settings right now, each
    /// judged on its own with no hold carried over (so a signal between its resume and hold
    /// thresholds does not count), most severe first; what `backfilld plan` reports.
    pub fn holding_signals(&self, health: &HealthSample) -> Vec<ThrottleReason> {
        if health.probe_failed {
            return vec![ThrottleReason::ProbeFailed];
        }
        let mut fresh = ThrottleController::new(self.clone());
        let mut reasons = Vec::new();
        if health
            .operator_ratio
            .is_some_and(|ratio| ratio.is_nan() || ratio <= 0.0)
        {
            reasons.push(ThrottleReason::Operator);
        }
        let lag = fresh.assess_lag(health);
        if lag.standby_missing {
            reasons.push(ThrottleReason::StandbyMissing);
        }
        let settings = &fresh.settings;
        if health.replicas.iter().any(|replica| {
            replica.is_unmeasured() || replica.reaches(settings.max_lag, settings.max_lag_bytes)
        }) {
            reasons.push(ThrottleReason::ReplicationLag);
        }
        if health
            .table_vacuum
            .is_some_and(|wraparound| wraparound || settings.hold_while_vacuumed)
        {
            reasons.push(ThrottleReason::Vacuum);
        }
        fresh.update_slot_latch(health);
        if fresh.holding_for_slot {
            reasons.push(ThrottleReason::ReplicationSlot);
        }
        fresh.update_query_latch(health);
        if fresh.holding_for_query {
            reasons.push(ThrottleReason::ThrottleQuery);
        }
        reasons.extend(crate::signals::holding_reasons(
            &fresh.settings.signal_limits,
            &health.signal_readings(),
        ));
        reasons.sort_by_key(|reason| std::cmp::Reverse(reason.severity()));
        reasons.dedup();
        reasons
    }
}

/// The lag picture of one health sample against the configured limits.
#[derive(Debug, Clone, Copy)]
pub(super) struct LagAssessment {
    /// Some replica is at or above the hard limit, unmeasured, or a standby is missing.
    at_or_over_limit: bool,
    /// Some replica is at or above the soft limit (implied by `at_or_over_limit`).
    pub(super) at_or_over_soft: bool,
    /// Every standby is present and below half the hard limit in both measures.
    all_below_half: bool,
    /// A declared standby is missing.
    standby_missing: bool,
}

impl ThrottleController {
    /// Holds for `reason`: run nothing, and decide again after `hold_recheck`.
    pub(super) fn hold(&self, reason: ThrottleReason) -> ThrottleDecision {
        ThrottleDecision::Hold {
            reason,
            recheck_after: self.settings.hold_recheck,
        }
    }

    /// Holds for lag (with hysteresis) or plans the next batch.
    pub(super) fn lag_decision(
        &mut self,
        now: Duration,
        lag: &LagAssessment,
        health: &HealthSample,
        reason: Option<ThrottleReason>,
    ) -> ThrottleDecision {
        self.update_slot_latch(health);
        self.update_query_latch(health);
        let signal_hold = self
            .signal_latches
            .update(&self.settings.signal_limits, &health.signal_readings());
        if lag.at_or_over_limit {
            self.holding_for_lag = true;
        } else if self.holding_for_lag && lag.all_below_half {
            self.holding_for_lag = false;
        }
        if self.holding_for_lag {
            let reason = if lag.standby_missing {
                ThrottleReason::StandbyMissing
            } else {
                ThrottleReason::ReplicationLag
            };
            return self.hold(reason);
        }
        let vacuum_holds = health
            .table_vacuum
            .is_some_and(|wraparound| wraparound || self.settings.hold_while_vacuumed);
        if vacuum_holds {
            return self.hold(ThrottleReason::Vacuum);
        }
        let resting = health.production_active && health.impact == Some(ImpactDirective::Rest);
        if resting && !self.holding_for_slot && !self.holding_for_query {
            return ThrottleDecision::Hold {
                reason: ThrottleReason::ImpactBaseline,
                recheck_after: self.settings.hold_recheck.min(IMPACT_REST_RECHECK),
            };
        }
        if self.holding_for_slot || self.holding_for_query {
            let reason = if self.holding_for_slot {
                ThrottleReason::ReplicationSlot
            } else {
                ThrottleReason::ThrottleQuery
            };
            return self.hold(reason);
        }
        if let Some(reason) = signal_hold {
            return self.hold(reason);
        }
        self.plan_run(now, lag, reason)
    }

    /// Latches the query hold above `hold_above` (or on a failure, unless failing open) and
    /// releases it at or below `resume_at_or_below`.
    pub(super) fn update_query_latch(&mut self, health: &HealthSample) {
        let limits = self.settings.query_limits;
        match &health.throttle_query {
            None => self.holding_for_query = false,
            Some(QueryReading::Value(value)) if !value.is_nan() => {
                if *value > limits.hold_above {
                    self.holding_for_query = true;
                } else if *value <= limits.resume_at_or_below {
                    self.holding_for_query = false;
                }
            }
            // Failed, or NaN: fail safe unless the operator chose otherwise.
            Some(_) => self.holding_for_query = !limits.fail_open,
        }
    }

    /// Latches the slot hold at the limit and releases it once every slot is below half
    /// of it (the same hysteresis as lag).
    pub(super) fn update_slot_latch(&mut self, health: &HealthSample) {
        let Some(limit) = self.settings.max_slot_retained_bytes else {
            self.holding_for_slot = false;
            return;
        };
        let most = health
            .slots
            .iter()
            .map(|slot| slot.retained_bytes)
            .max()
            .unwrap_or(0);
        if most >= limit {
            self.holding_for_slot = true;
        } else if most.saturating_mul(2) < limit {
            self.holding_for_slot = false;
        }
    }

    pub(super) fn assess_lag(&self, health: &HealthSample) -> LagAssessment {
        let settings = &self.settings;
        let soft_lag = settings.max_lag.mul_f64(settings.soft_lag_fraction);
        // Truncation only moves the soft byte limit down by less than a byte.
        let soft_bytes = (settings.max_lag_bytes as f64 * settings.soft_lag_fraction) as u64;
        let standby_missing = !health.missing_standbys.is_empty();
        let replicas = &health.replicas;
        let at_or_over_limit = standby_missing
            || replicas.iter().any(|replica| {
                replica.is_unmeasured() || replica.reaches(settings.max_lag, settings.max_lag_bytes)
            });
        LagAssessment {
            at_or_over_limit,
            at_or_over_soft: at_or_over_limit
                || replicas
                    .iter()
                    .any(|replica| replica.reaches(soft_lag, soft_bytes)),
            all_below_half: !standby_missing
                && replicas
                    .iter()
                    .all(|replica| replica.below_half(settings.max_lag, settings.max_lag_bytes)),
            standby_missing,
        }
    }
}
