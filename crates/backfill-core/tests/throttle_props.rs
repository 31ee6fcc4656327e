//! Property tests of the throttle controller, driven in simulated time through its public
//! API. Each case is a random scenario: health samples, batch outcomes and time steps.

use std::time::Duration;

use backfill_core::throttle::{
    BatchOutcome, BatchReport, HealthSample, ReplicaLag, ThrottleController, ThrottleDecision,
    ThrottleReason, ThrottleSettings,
};
use proptest::prelude::*;

const MIB: u64 = 1024 * 1024;

/// How a simulated batch ends.
#[derive(Debug, Clone, Copy)]
enum OutcomeKind {
    Committed,
    LockTimeout,
    CancelledForBlocking,
    StatementTimeout,
    TransientError,
}

/// One step of a scenario: the health the probe reports, then (if the controller runs a
/// batch) how that batch behaves.
#[derive(Debug, Clone)]
struct Step {
    /// Time spent between the previous step and this decision (probing, bookkeeping).
    gap: Duration,
    replicas: Vec<ReplicaLag>,
    standby_missing: bool,
    probe_failed: bool,
    sessions_blocked_by_us: u32,
    longest_block: Duration,
    outcome: OutcomeKind,
    per_row: Duration,
    /// Fraction of the batch's keys that still needed work and were written.
    written_fraction: f64,
    /// Canaries judged delayed since the previous step.
    new_probe_delays: u64,
    /// Production sessions are at work on the primary.
    production_active: bool,
}

impl Step {
    /// The step's health sample; `probe_delays` is the running total of delayed canaries.
    fn health(&self, probe_delays: u64) -> HealthSample {
        HealthSample {
            replicas: self.replicas.clone(),
            missing_standbys: if self.standby_missing {
                vec!["standby9".to_owned()]
            } else {
                Vec::new()
            },
            sessions_blocked_by_us: self.sessions_blocked_by_us,
            longest_block: self.longest_block,
            blocking_backends: Vec::new(),
            probe_failed: self.probe_failed,
            probe_delays,
            production_sessions: u32::from(self.production_active),
            production_active: self.production_active,
            ..HealthSample::default()
        }
    }

    fn run_batch(&self, size: u32) -> BatchOutcome {
        let duration = self.per_row * size;
        match self.outcome {
            OutcomeKind::Committed => BatchOutcome::Committed {
                rows: (f64::from(size) * self.written_fraction) as u64,
                duration,
            },
            OutcomeKind::LockTimeout => BatchOutcome::LockTimeout { duration },
            OutcomeKind::CancelledForBlocking => BatchOutcome::CancelledForBlocking { duration },
            OutcomeKind::StatementTimeout => BatchOutcome::StatementTimeout { duration },
            OutcomeKind::TransientError => BatchOutcome::TransientError { duration },
        }
    }
}

fn replica_strategy() -> impl Strategy<Value = ReplicaLag> {
    // Lags spread over 0..5 s and 0..160 MiB so every band (below half, soft, over) occurs.
    (
        prop::option::weighted(0.9, 0u64..5_000),
        prop::option::weighted(0.9, 0u64..160 * MIB),
        0u8..3,
    )
        .prop_map(|(lag_ms, bytes, index)| {
            ReplicaLag::new(
                format!("standby{index}"),
                lag_ms.map(Duration::from_millis),
                bytes,
            )
        })
}

fn outcome_strategy() -> impl Strategy<Value = OutcomeKind> {
    prop_oneof![
        12 => Just(OutcomeKind::Committed),
        1 => Just(OutcomeKind::LockTimeout),
        1 => Just(OutcomeKind::CancelledForBlocking),
        1 => Just(OutcomeKind::StatementTimeout),
        1 => Just(OutcomeKind::TransientError),
    ]
}

fn step_strategy(probe_failure_chance: f64) -> impl Strategy<Value = Step> {
    (
        0u64..3_000,
        prop::collection::vec(replica_strategy(), 0..3),
        prop::bool::weighted(0.05),
        prop::bool::weighted(probe_failure_chance),
        prop_oneof![8 => Just(0u32), 1 => 1u32..5],
        0u64..10_000,
        outcome_strategy(),
        1u64..2_000,
        (0.0f64..=1.0, prop_oneof![6 => Just(0u64), 1 => 1u64..4]),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(
                gap_ms,
                replicas,
                standby_missing,
                probe_failed,
                blocked,
                block_ms,
                outcome,
                per_row_us,
                (written_fraction, new_probe_delays),
                production_active,
            )| Step {
                gap: Duration::from_millis(gap_ms),
                replicas,
                standby_missing,
                probe_failed,
                sessions_blocked_by_us: blocked,
                longest_block: Duration::from_millis(block_ms),
                outcome,
                per_row: Duration::from_micros(per_row_us),
                written_fraction,
                new_probe_delays,
                production_active,
            },
        )
}

/// Valid settings across a wide range of scales.
fn settings_strategy() -> impl Strategy<Value = ThrottleSettings> {
    (
        1u32..500,
        0u32..50_000,
        0.0f64..=1.0,
        100u64..5_000,
        MIB..128 * MIB,
        prop::option::weighted(0.5, 10.0f64..100_000.0),
        prop_oneof![Just(0.5), 0.05f64..=1.0],
    )
        .prop_map(
            |(min, extra, start_position, max_lag_ms, max_lag_bytes, budget, soft_fraction)| {
                let max = min + extra;
                let start = min + (f64::from(extra) * start_position) as u32;
                ThrottleSettings {
                    min_batch_size: min,
                    max_batch_size: max,
                    start_batch_size: start,
                    max_lag: Duration::from_millis(max_lag_ms),
                    max_lag_bytes,
                    max_rows_per_second: budget,
                    soft_lag_fraction: soft_fraction,
                    ..ThrottleSettings::default()
                }
            },
        )
}

/// What the lag rules say, computed independently of the controller from the samples.
#[derive(Debug, Default)]
struct LagOracle {
    /// Lag reached the limit and has not yet been below half of it since.
    latched: bool,
    /// Times lag went from at/above the limit to below half of it.
    recoveries: usize,
}

impl LagOracle {
    /// Updates from a sample; returns whether any replica is at or above the limit now.
    fn observe(&mut self, health: &HealthSample, settings: &ThrottleSettings) -> bool {
        if health.probe_failed {
            return false;
        }
        let over = !health.missing_standbys.is_empty()
            || health.replicas.iter().any(|replica| {
                (replica.lag.is_none() && replica.lag_bytes.is_none())
                    || replica.lag.is_some_and(|lag| lag >= settings.max_lag)
                    || replica
                        .lag_bytes
                        .is_some_and(|bytes| bytes >= settings.max_lag_bytes)
            });
        let all_below_half = health.missing_standbys.is_empty()
            && health.replicas.iter().all(|replica| {
                let lag_ok = replica.lag.map(|lag| lag * 2 < settings.max_lag);
                let bytes_ok = replica
                    .lag_bytes
                    .map(|bytes| bytes * 2 < settings.max_lag_bytes);
                match (lag_ok, bytes_ok) {
                    (None, None) => false,
                    (lag_ok, bytes_ok) => lag_ok.unwrap_or(true) && bytes_ok.unwrap_or(true),
                }
            });
        if over {
            self.latched = true;
        } else if self.latched && all_below_half {
            self.latched = false;
            self.recoveries += 1;
        }
        over
    }
}

/// Everything a scenario run records for the properties to check.
#[derive(Debug, Default)]
struct Trace {
    hold_to_run_transitions: usize,
    recoveries: usize,
    probe_failures: usize,
    violations: Vec<String>,
}

/// Runs a scenario in simulated time and checks the per-decision invariants on the way.
fn simulate(settings: &ThrottleSettings, steps: &[Step]) -> (Trace, Vec<ThrottleDecision>) {
    let mut throttle = ThrottleController::new(settings.clone());
    let settings = throttle.settings().clone();
    let mut oracle = LagOracle::default();
    let mut trace = Trace::default();
    let mut decisions = Vec::with_capacity(steps.len());
    let mut now = Duration::ZERO;
    let mut pending_report: Option<BatchReport> = None;
    let mut previous: Option<ThrottleDecision> = None;
    let mut rows_committed: u64 = 0;
    let mut first_batch_start: Option<Duration> = None;
    let mut probe_delays: u64 = 0;

    for (index, step) in steps.iter().enumerate() {
        now += step.gap;
        probe_delays += step.new_probe_delays;
        let health = step.health(probe_delays);
        let over_now = oracle.observe(&health, &settings);
        trace.probe_failures += usize::from(health.probe_failed);
        let decision = throttle.decide(now, &health, pending_report.take().as_ref());
        decisions.push(decision);

        let size = throttle.batch_size();
        if !(settings.min_batch_size..=settings.max_batch_size).contains(&size) {
            trace
                .violations
                .push(format!("step {index}: batch_size() {size} out of range"));
        }
        match decision {
            ThrottleDecision::Hold { .. } => now += decision.wait(),
            ThrottleDecision::Run {
                batch_size,
                pause_before,
                ..
            } => {
                if !(settings.min_batch_size..=settings.max_batch_size).contains(&batch_size) {
                    trace
                        .violations
                        .push(format!("step {index}: ran {batch_size} rows, out of range"));
                }
                if health.probe_failed || over_now || oracle.latched {
                    trace.violations.push(format!(
                        "step {index}: ran although lag is over the limit or not yet below half \
                         (probe_failed={}, over={over_now}, latched={})",
                        health.probe_failed, oracle.latched
                    ));
                }
                if matches!(previous, Some(ThrottleDecision::Hold { .. })) {
                    trace.hold_to_run_transitions += 1;
                }
                now += pause_before;
                let start = *first_batch_start.get_or_insert(now);
                if let Some(budget) = settings.max_rows_per_second {
                    // Everything committed so far must be paid for by the time this batch
                    // starts; one row of slack covers float rounding of the prices.
                    let allowed = budget * (now - start).as_secs_f64() + 1.0;
                    if rows_committed as f64 > allowed {
                        trace.violations.push(format!(
                            "step {index}: {rows_committed} rows committed before {:?}, \
                             budget allows {allowed:.1}",
                            now - start
                        ));
                    }
                }
                let outcome = step.run_batch(batch_size);
                if let BatchOutcome::Committed { rows, .. } = outcome {
                    rows_committed += rows;
                }
                now += outcome.duration();
                pending_report = Some(BatchReport {
                    size: batch_size,
                    outcome,
                });
            }
        }
        if let ThrottleDecision::Hold { reason, .. } = decision {
            let expected = [
                ThrottleReason::ReplicationLag,
                ThrottleReason::StandbyMissing,
                ThrottleReason::ProbeFailed,
            ];
            if !expected.contains(&reason) {
                trace
                    .violations
                    .push(format!("step {index}: hold for unexpected reason {reason}"));
            }
        }
        previous = Some(decision);
    }
    trace.recoveries = oracle.recoveries;
    (trace, decisions)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Sizes stay within min/max, no batch runs while lag is over the limit or not yet
    /// back below half since it was, holds have lag/probe reasons, and the rate budget is
    /// never overspent.
    #[test]
    fn per_decision_invariants_hold(
        settings in settings_strategy(),
        steps in prop::collection::vec(step_strategy(0.05), 1..200),
    ) {
        let (trace, _) = simulate(&settings, &steps);
        prop_assert!(trace.violations.is_empty(), "{:#?}", trace.violations);
    }

    /// Without probe failures, every hold→run transition needs lag to have gone from at or
    /// above the limit to below half of it: no flapping faster than the hysteresis allows.
    #[test]
    fn hold_to_run_transitions_are_bounded_by_lag_recoveries(
        settings in settings_strategy(),
        steps in prop::collection::vec(step_strategy(0.0), 1..200),
    ) {
        let (trace, _) = simulate(&settings, &steps);
        prop_assert!(
            trace.hold_to_run_transitions <= trace.recoveries,
            "{} hold→run transitions but only {} recoveries",
            trace.hold_to_run_transitions,
            trace.recoveries
        );
    }

    /// A failed probe may add one brief hold each, and nothing more.
    #[test]
    fn probe_failures_add_at_most_one_hold_each(
        settings in settings_strategy(),
        steps in prop::collection::vec(step_strategy(0.2), 1..200),
    ) {
        let (trace, _) = simulate(&settings, &steps);
        prop_assert!(
            trace.hold_to_run_transitions <= trace.recoveries + trace.probe_failures,
            "{} hold→run transitions, {} recoveries, {} probe failures",
            trace.hold_to_run_transitions,
            trace.recoveries,
            trace.probe_failures
        );
    }

    /// Pauses stay bounded: at most the backoff cap, the soft-lag pause, or the time one
    /// batch needs to be paid for by the rate budget.
    #[test]
    fn pauses_are_bounded(
        settings in settings_strategy(),
        steps in prop::collection::vec(step_strategy(0.05), 1..200),
    ) {
        let (_, decisions) = simulate(&settings, &steps);
        let settings = ThrottleController::new(settings).settings().clone();
        let rate_bound = settings.max_rows_per_second.map_or(Duration::ZERO, |budget| {
            // One second of budget per batch, or the minimum batch if that is larger.
            let rows = (budget.floor()).max(f64::from(settings.min_batch_size));
            Duration::from_secs_f64(rows / budget) + Duration::from_millis(1)
        });
        let bound = settings
            .backoff_max
            .max(settings.soft_lag_pause)
            .max(settings.hold_recheck)
            .max(rate_bound);
        for decision in decisions {
            prop_assert!(decision.wait() <= bound, "{decision:?} exceeds {bound:?}");
        }
    }

    /// Same inputs, same decisions: the controller depends on nothing but its arguments.
    #[test]
    fn decisions_are_deterministic(
        settings in settings_strategy(),
        steps in prop::collection::vec(step_strategy(0.05), 1..100),
    ) {
        let (_, first) = simulate(&settings, &steps);
        let (_, second) = simulate(&settings, &steps);
        prop_assert_eq!(first, second);
    }

    /// Any settings at all, however nonsensical, give a controller that keeps its sizes in
    /// its (normalised) range and never panics.
    #[test]
    fn arbitrary_settings_never_panic(
        min in any::<u32>(),
        max in any::<u32>(),
        start in any::<u32>(),
        cut in any::<f64>(),
        budget in prop::option::of(any::<f64>()),
        target_ms in 0u64..2_000,
        steps in prop::collection::vec(step_strategy(0.05), 1..50),
    ) {
        let settings = ThrottleSettings {
            min_batch_size: min,
            max_batch_size: max,
            start_batch_size: start,
            cut_factor: cut,
            max_rows_per_second: budget,
            target_batch: Duration::from_millis(target_ms),
            ..ThrottleSettings::default()
        };
        let normalized = ThrottleController::new(settings.clone()).settings().clone();
        prop_assert_eq!(normalized.validate(), Ok(()));
        let (trace, _) = simulate(&settings, &steps);
        prop_assert!(trace.violations.is_empty(), "{:#?}", trace.violations);
    }
}
