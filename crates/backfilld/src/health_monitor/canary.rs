//! The production-latency canary: its round trips timed on a connection of their own
//! ([`CanaryTimer`]), and judged by the delay detector (`throttle.max_probe_delay`) and the
//! impact budget (`throttle.impact_budget_ratio`), either or both ([`CanaryJudges`]); with
//! `throttle.impact_excess_share`, a second one timed inside the worker's batches
//! ([`InBatchCanary`]).

use backfill_core::queue_sql;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backfill_core::impact::{ImpactController, ImpactDirective, ImpactSettings, WalWaitCount};
use backfill_core::latency::DelayDetector;
use backfill_core::throttle::HealthSample;
use backfill_dataplane::LatencyCanary;
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::Reading;
use crate::batches_in_flight::BatchesInFlight;
use crate::settings::ThrottleConfig;
use crate::shutdown::Shutdown;
use crate::telemetry;

/// How often the impact budget reads the rows committed by running jobs (one query on the
/// queue's table; no load on the target's tables).
const IMPACT_ROWS_INTERVAL: Duration = Duration::from_secs(1);

/// One canary round trip, for the judges.
pub(super) struct CanaryReading {
    /// When it ended, since the monitor started.
    pub(super) at: Duration,
    /// `None`: the canary could not run (no connection, an error).
    pub(super) round_trip: Option<Duration>,
    /// The rows the running jobs have committed in all, read after the round trip when
    /// the impact budget is due to see them.
    pub(super) rows_done: Option<u64>,
    /// Timed inside one of the worker's batches ([`InBatchCanary`]), not at its interval.
    pub(super) in_batch: bool,
    /// How long the worker's batches had been in flight in all by then.
    pub(super) busy_total: Duration,
}

/// A canary on a connection of its own, how often it may run, and the worker's batches.
struct TimedCanary {
    canary: LatencyCanary,
    interval: Duration,
    batches: Arc<BatchesInFlight>,
}

impl TimedCanary {
    fn new(
        pool: deadpool_postgres::Pool,
        throttle: &ThrottleConfig,
        batches: &Arc<BatchesInFlight>,
    ) -> Self {
        TimedCanary {
            canary: LatencyCanary::new(pool, throttle.probe_timeout),
            interval: throttle.canary_interval,
            batches: Arc::clone(batches),
        }
    }
}

/// Times the canary every `throttle.canary_interval`.
pub(super) struct CanaryTimer {
    timed: TimedCanary,
    /// The queue, for the rows the running jobs have committed (the impact budget never
    /// paces far above what they achieve); `None` when no judge needs them.
    rows_from: Option<PgPool>,
}

impl CanaryTimer {
    /// A canary on `pool`; `rows_from` is the queue when the impact budget is on.
    pub(super) fn new(
        pool: deadpool_postgres::Pool,
        throttle: &ThrottleConfig,
        rows_from: Option<PgPool>,
        batches: &Arc<BatchesInFlight>,
    ) -> Self {
        CanaryTimer {
            timed: TimedCanary::new(pool, throttle, batches),
            rows_from,
        }
    }

    /// Times the canary until shutdown, handing every round trip to the judges.
    pub(super) async fn run(
        self,
        origin: Instant,
        readings: mpsc::Sender<Reading>,
        shutdown: Shutdown,
    ) {
        let mut rows_read_at: Option<Instant> = None;
        let TimedCanary {
            canary,
            interval,
            batches,
        } = &self.timed;
        while !shutdown.is_triggered() {
            let round_trip = canary.round_trip().await;
            let at = origin.elapsed();
            let mut rows_done = None;
            if let Some(control) = &self.rows_from {
                if rows_read_at.is_none_or(|at| at.elapsed() >= IMPACT_ROWS_INTERVAL) {
                    rows_read_at = Some(Instant::now());
                    match running_rows_done(control).await {
                        Ok(rows) => rows_done = Some(rows),
                        Err(e) => tracing::debug!(error = %e, "cannot read the running jobs' rows"),
                    }
                }
            }
            let reading = CanaryReading {
                at,
                round_trip,
                rows_done,
                in_batch: false,
                busy_total: batches.busy_total(),
            };
            if readings.send(Reading::Canary(reading)).await.is_err() {
                return;
            }
            shutdown.sleep(*interval).await;
        }
    }
}

/// Times a second canary, on a connection of its own, at a random moment inside one of
/// the worker's batches, at most one every `throttle.canary_interval`: production's slow
/// transactions fall inside the batches (`backfill_core::impact::excess`).
pub(super) struct InBatchCanary(TimedCanary);

impl InBatchCanary {
    /// A canary on `pool`, timed inside `batches`.
    pub(super) fn new(
        pool: deadpool_postgres::Pool,
        throttle: &ThrottleConfig,
        batches: &Arc<BatchesInFlight>,
    ) -> Self {
        InBatchCanary(TimedCanary::new(pool, throttle, batches))
    }

    /// Times the canary inside batches until shutdown, handing every round trip to the
    /// judges.
    pub(super) async fn run(
        self,
        origin: Instant,
        readings: mpsc::Sender<Reading>,
        shutdown: Shutdown,
    ) {
        let TimedCanary {
            canary,
            interval,
            batches,
        } = &self.0;
        let mut starts = batches.subscribe();
        while !shutdown.is_triggered() {
            tokio::select! {
                changed = starts.changed() => if changed.is_err() { return },
                () = shutdown.triggered() => return,
            }
            // A random moment of the batch, as production's transactions arrive at any;
            // the latest batch's duration stands for this one's.
            let offset = batches.latest_duration().mul_f64(fastrand::f64());
            if !offset.is_zero() {
                shutdown.sleep(offset).await;
            }
            if !batches.in_flight() {
                continue;
            }
            let Some(round_trip) = canary.round_trip().await else {
                continue;
            };
            let reading = CanaryReading {
                at: origin.elapsed(),
                round_trip: Some(round_trip),
                rows_done: None,
                in_batch: true,
                busy_total: batches.busy_total(),
            };
            if readings.send(Reading::Canary(reading)).await.is_err() {
                return;
            }
            shutdown.sleep(*interval).await;
            // Batches that started meanwhile are not waited for: the next one is.
            starts.borrow_and_update();
        }
    }
}

/// Rows the running jobs have committed in all.
async fn running_rows_done(control: &PgPool) -> Result<u64, sqlx::Error> {
    let rows: i64 = sqlx::query_scalar(queue_sql::RUNNING_ROWS_DONE)
        .fetch_one(control)
        .await?;
    Ok(u64::try_from(rows).unwrap_or(0))
}

/// The canary's part of a health sample.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct CanaryVerdicts {
    /// Round trips judged delayed since the daemon started.
    probe_delays: u64,
    /// The impact budget's directive.
    impact: Option<ImpactDirective>,
}

impl CanaryVerdicts {
    /// Writes the verdicts into `sample`.
    pub(super) fn fold_into(self, sample: &mut HealthSample) {
        sample.probe_delays = self.probe_delays;
        sample.impact = self.impact;
    }
}

/// What judges the canary's round trips: the delay detector and the impact budget,
/// either or both.
pub(super) struct CanaryJudges {
    detector: Option<DelayDetector>,
    impact: Option<ImpactController>,
    /// The impact budget's last directive.
    directive: Option<ImpactDirective>,
    /// The impact budget's pace decisions as last logged: a cut its floor held changes
    /// no directive and is logged all the same.
    logged_decisions: u64,
    /// The impact budget's rests begun as last logged: a rest restarted at a periodic
    /// moment changes no directive and is logged all the same.
    logged_rests: u64,
    /// Whether the log has said that production's SLI judges nothing, since it last did.
    warned_sli_unjudged: bool,
}

impl CanaryJudges {
    /// The judges `throttle.max_probe_delay` (zero: no delay detector) and the impact
    /// budget ask for; `None` when neither is on, and the canary need not run. Readings
    /// count from the monitor's start, when the wall clock read `wall_at_origin` (since
    /// the Unix epoch).
    pub(super) fn new(
        max_probe_delay: Duration,
        impact: Option<ImpactSettings>,
        wall_at_origin: Duration,
    ) -> Option<Self> {
        let detector = Some(max_probe_delay)
            .filter(|delay| !delay.is_zero())
            .map(DelayDetector::new);
        if detector.is_none() && impact.is_none() {
            return None;
        }
        Some(CanaryJudges {
            detector,
            impact: impact.map(|impact| {
                ImpactController::new(impact, Duration::ZERO)
                    .resting_on_the_wall_clock(Duration::ZERO, wall_at_origin)
            }),
            directive: None,
            logged_decisions: 0,
            logged_rests: 0,
            warned_sli_unjudged: false,
        })
    }

    /// Whether a judge needs the rows the running jobs committed (the impact budget does).
    pub(super) fn needs_rows(&self) -> bool {
        self.impact.is_some()
    }

    /// Whether a judge needs the canary timed inside batches (the impact budget's excess
    /// judge does).
    pub(super) fn needs_in_batch(impact: Option<&ImpactSettings>) -> bool {
        impact.is_some_and(|impact| impact.excess_share > 0.0)
    }

    /// Whether a judge needs production's WAL waits sampled (the impact budget's WAL
    /// judge does).
    pub(super) fn needs_wal_waits(impact: Option<&ImpactSettings>) -> bool {
        impact.is_some_and(|impact| impact.wal_rise > 0.0)
    }

    /// A sample of production's WAL waits taken at `now`, for the impact budget.
    pub(super) fn observe_wal_waits(&mut self, now: Duration, count: WalWaitCount) {
        if let Some(impact) = self.impact.as_mut() {
            impact.observe_wal_waits(now, count);
        }
    }

    /// A value of production's latency SLI read at `now`, for the impact budget; says once
    /// when the SLI has long judged nothing (it then bounds nothing).
    pub(super) fn observe_sli(&mut self, now: Duration, value: f64) {
        let Some(impact) = self.impact.as_mut() else {
            return;
        };
        impact.observe_sli(now, value);
        match impact.sli_unjudged(now) {
            None => self.warned_sli_unjudged = false,
            Some(_) if self.warned_sli_unjudged => {}
            Some(unjudged) => {
                self.warned_sli_unjudged = true;
                tracing::warn!(
                    target: "backfilld::impact",
                    unjudged = ?unjudged,
                    sli_window = ?impact.settings().sli_window,
                    "production's SLI has judged no pace for {}s, so it bounds nothing: a \
                     value is judged only once its range holds one pace alone, after the \
                     last rest, and the pace changed or rested sooner; a shorter range in \
                     throttle.impact_sli_query (and impact_sli_window) lets it judge",
                    unjudged.as_secs()
                );
            }
        }
    }

    /// A canary timed at its interval: the delay detector's, and the impact budget's tail.
    fn observe_at_interval(&mut self, now: Duration, round_trip: Duration) {
        if let Some(detector) = self.detector.as_mut() {
            let verdict = detector.observe(now, round_trip);
            tracing::trace!(
                target: "backfilld::canary",
                round_trip_us = round_trip.as_micros() as u64,
                excess_us = verdict.excess.as_micros() as u64,
                delayed = verdict.delayed,
                "canary"
            );
            telemetry::record_canary(verdict);
        }
        if let Some(impact) = self.impact.as_mut() {
            impact.observe(now, round_trip);
        }
    }

    /// Judges one round trip, production being `active` on the primary as last sampled;
    /// the verdicts as of now.
    pub(super) fn judge(&mut self, reading: &CanaryReading, active: bool) -> CanaryVerdicts {
        let now = reading.at;
        // A canary timed inside a batch is the excess judge's alone; one timed at its
        // interval is the delay detector's and the budget's tail.
        match (reading.round_trip, reading.in_batch) {
            (Some(round_trip), true) => {
                if let Some(impact) = self.impact.as_mut() {
                    impact.observe_in_batch(now, round_trip);
                }
            }
            (Some(round_trip), false) => self.observe_at_interval(now, round_trip),
            (None, _) => {}
        }
        if let Some(impact) = self.impact.as_mut() {
            impact.record_busy(now, reading.busy_total);
            if let Some(rows) = reading.rows_done {
                impact.record_rows(now, rows);
            }
            let verdict = impact.evaluate(now, active);
            telemetry::record_impact(&verdict);
            if verdict.directive != self.directive
                || impact.decisions() != self.logged_decisions
                || impact.rests_begun() != self.logged_rests
            {
                let excess = impact.excess();
                let sli = impact.sli();
                tracing::debug!(
                    target: "backfilld::impact",
                    directive = ?verdict.directive,
                    ratio = ?verdict.ratio,
                    change = ?impact.last_change(),
                    baseline_us = impact.baseline().map(|b| b.as_micros() as u64),
                    busy_share = excess.map(|e| e.busy_share),
                    in_batch_canaries = excess.map(|e| e.inside_canaries),
                    in_batch_over = excess.map(|e| e.inside_share),
                    anywhere_over = excess.map(|e| e.anywhere_share),
                    excess = excess.map(|e| e.estimate),
                    wal_share_at_rest = impact.wal_share_at_rest(),
                    sli_baseline = sli.and_then(|s| s.baseline),
                    sli_ratio = sli.and_then(|s| s.ratio),
                    sli_proven = sli.and_then(|s| s.proven),
                    sli_harmed = sli.and_then(|s| s.harmed),
                    rests = impact.rests_begun(),
                    "impact budget"
                );
                self.directive = verdict.directive;
                self.logged_decisions = impact.decisions();
                self.logged_rests = impact.rests_begun();
            }
        }
        CanaryVerdicts {
            probe_delays: self
                .detector
                .as_ref()
                .map_or(0, DelayDetector::delayed_total),
            impact: self.directive,
        }
    }
}
