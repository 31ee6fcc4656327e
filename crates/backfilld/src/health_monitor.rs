//! The daemon's health probes: standby lag, locks, slots, operator throttles and
//! production's activity sampled on a task of their own, the canary, and the daemon-wide
//! gauges.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use backfill_core::activity::ProductionActivity;
use backfill_core::impact::ImpactController;
use backfill_core::latency::DelayDetector;
use backfill_core::throttle::HealthSample;
use backfill_dataplane::{HealthProbe, LatencyCanary, PrometheusQuery, Signals};
use backfill_queue::JobStatus;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::database::{data_plane_application_name, probe_pool, Database};
use crate::redact::redacted;
use crate::settings::Settings;
use crate::shutdown::Shutdown;
use crate::telemetry;

/// How often the probe task refreshes `backfill_jobs{state}` (one query on the queue).
const JOB_STATES_INTERVAL: Duration = Duration::from_secs(2);

/// Samples health every `throttle.probe_interval` on a task of its own and
/// publishes the latest sample; also refreshes the daemon-wide gauges.
pub fn spawn_health_probes(
    settings: &Settings,
    db: &Database,
    shutdown: Shutdown,
) -> anyhow::Result<(watch::Receiver<HealthSample>, tokio::task::JoinHandle<()>)> {
    // Production sessions are counted only for sharing the primary (the impact budget or
    // the duty cycle).
    let impact = settings.impact_settings();
    let sharing = settings.throttle.busy_duty_cycle < 1.0 || impact.is_some();
    let probe = health_probe(
        settings,
        db,
        sharing.then_some(settings.throttle.probe_interval),
        0,
    )?;
    let interval = settings.throttle.probe_interval;
    let (max_lag, max_lag_bytes) = (settings.throttle.max_lag, settings.throttle.max_lag_bytes);
    let control = db.control.clone();
    let (tx, rx) = watch::channel(HealthSample::default());
    let detector = Some(settings.throttle.max_probe_delay)
        .filter(|delay| !delay.is_zero())
        .map(DelayDetector::new);
    let canary = if detector.is_none() && impact.is_none() {
        None
    } else {
        let pool = probe_pool(&settings.database.url, settings)
            .context("the production-latency canary's connection")?;
        Some(run_canary(
            LatencyCanary::new(pool, settings.throttle.probe_timeout),
            CanaryJudges {
                detector,
                impact: impact.map(|impact| ImpactController::new(impact, Duration::ZERO)),
                control: control.clone(),
            },
            settings.throttle.canary_interval,
            tx.clone(),
            shutdown.clone(),
        ))
    };
    let undo_retention = settings.undo.retention();
    let sampling = async move {
        let mut job_states_at: Option<Instant> = None;
        let mut undo_at: Option<Instant> = None;
        let (origin, mut activity) = (Instant::now(), ProductionActivity::default());
        let mut was_active = false;
        while !shutdown.is_triggered() {
            let mut sample = probe.sample().await;
            sample.production_active =
                activity.observe(origin.elapsed(), sample.production_sessions);
            if sharing && sample.production_active != was_active {
                note_production_activity(&sample);
            }
            was_active = sample.production_active;
            telemetry::record_replication_lag(&sample);
            // The canary's count and the impact budget's directive live on in every sample.
            tx.send_modify(|latest| {
                sample.probe_delays = latest.probe_delays;
                sample.impact = latest.impact;
                *latest = sample;
            });
            // Re-set every tick, or the exporter's idle timeout would drop them.
            telemetry::record_daemon_info(max_lag, max_lag_bytes);
            if job_states_at.is_none_or(|at| at.elapsed() >= JOB_STATES_INTERVAL) {
                job_states_at = Some(Instant::now());
                report_queue_state(&control).await;
            }
            if undo_at.is_none_or(|at| at.elapsed() >= crate::undo::UNDO_REPORT_INTERVAL) {
                undo_at = Some(Instant::now());
                crate::undo::report_undo(&control, undo_retention).await;
            }
            shutdown.sleep(interval).await;
        }
    };
    // One task, so that aborting it stops the canary too.
    let probes = tokio::spawn(async move {
        match canary {
            Some(canary) => drop(tokio::join!(canary, sampling)),
            None => sampling.await,
        }
    });
    Ok((rx, probes))
}

/// The health probe `throttle` configures: production sessions counted within
/// `activity_window` (`None`: not counted), and job `also_job` read as if running (0: none).
pub(crate) fn health_probe(
    settings: &Settings,
    db: &Database,
    activity_window: Option<Duration>,
    also_job: i64,
) -> anyhow::Result<HealthProbe> {
    let mut replicas = Vec::new();
    for (i, url) in settings.throttle.replica_urls.iter().enumerate() {
        let pool = probe_pool(url, settings)
            .with_context(|| format!("throttle.replica_urls[{i}] ({})", redacted(url)))?;
        replicas.push((format!("replica{i}"), pool));
    }
    Ok(HealthProbe::new(
        db.data.clone(),
        replicas,
        settings.throttle.expected_standbys.clone(),
        data_plane_application_name(settings),
        settings.throttle.probe_timeout,
        activity_window,
    )
    .with_signals(Signals {
        slots: settings.throttle.max_slot_retained_bytes > 0,
        operator_throttles: true,
        throttle_query: Some(settings.throttle.query.trim().to_owned()).filter(|q| !q.is_empty()),
        wal_rate: settings.throttle.max_wal_bytes_per_second > 0,
        archive: settings.throttle.max_archive_pending_segments > 0
            || settings.throttle.hold_while_archive_failing,
        dead_tuples: settings.throttle.max_dead_tuple_ratio > 0.0,
        job_queries: true,
        also_job,
        prometheus: prometheus_query(settings)?,
    }))
}

/// The configured Prometheus query, if any (settings validation checked the URL).
fn prometheus_query(settings: &Settings) -> anyhow::Result<Option<PrometheusQuery>> {
    let (url, query) = (
        settings.throttle.prometheus_url.trim(),
        settings.throttle.prometheus_query.trim(),
    );
    if url.is_empty() || query.is_empty() {
        return Ok(None);
    }
    PrometheusQuery::new(url, query, settings.throttle.probe_timeout)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("throttle.prometheus_url: {e}"))
}

/// Refreshes `backfill_jobs{state}` and `backfill_job_failed{backfill_job}` from the queue.
pub async fn report_queue_state(control: &PgPool) {
    match JobStatus::count_by_state(control).await {
        Ok(counts) => telemetry::record_job_states(&counts),
        Err(e) => tracing::debug!(error = %e, "cannot count jobs by state"),
    }
    let failed = sqlx::query_scalar("SELECT name FROM backfill.jobs WHERE state = 'failed'")
        .fetch_all(control)
        .await;
    match failed {
        Ok(names) => telemetry::record_failed_jobs(&names),
        Err(e) => tracing::debug!(error = %e, "cannot list failed jobs"),
    }
    let steering = sqlx::query_as(
        "SELECT name, extract(epoch FROM forecast_finish - now())::float8 AS forecast_seconds, \
                CASE WHEN forecast_finish IS NOT NULL OR now() > finish_by \
                     THEN extract(epoch FROM finish_by - greatest(forecast_finish, now()))::float8 \
                END AS deadline_margin_seconds, \
                coalesce(late, false) AS late, \
                coalesce(throttle_reason = 'window', false) AS outside_window, \
                coalesce(cardinality(run_windows) > 0, false) AS has_windows \
           FROM backfill.job_status \
          WHERE parent_id IS NULL AND state IN ('pending', 'running', 'paused')",
    )
    .fetch_all(control)
    .await;
    match steering {
        Ok(jobs) => telemetry::record_job_steering(&jobs),
        Err(e) => tracing::debug!(error = %e, "cannot read job deadlines and windows"),
    }
}

/// Logs when jobs start and stop sharing the primary with production.
fn note_production_activity(sample: &HealthSample) {
    if sample.production_active {
        tracing::info!(
            sessions = sample.production_sessions,
            "production is at work on the primary: sharing it (the impact budget, throttle.impact_budget_ratio; without its signal, the duty cycle, throttle.busy_duty_cycle)"
        );
    } else {
        tracing::info!(
            "no production sessions at work on the primary for a while: running flat out"
        );
    }
}

/// What judges the canary's round trips: the delay detector (`throttle.max_probe_delay`)
/// and the impact budget (`throttle.impact_budget_ratio`), either or both.
struct CanaryJudges {
    detector: Option<DelayDetector>,
    impact: Option<ImpactController>,
    /// The queue, for the rows the running jobs have committed (the impact budget never
    /// paces far above what they achieve).
    control: PgPool,
}

/// How often the impact budget reads the rows committed by running jobs (one query on the
/// queue's table; no load on the target's tables).
const IMPACT_ROWS_INTERVAL: Duration = Duration::from_secs(1);

/// Times the canary every `interval` and publishes the count of delayed round trips and
/// the impact budget's directive in the health samples, between the probes' own updates:
/// a delay should reach the throttle within one canary interval, not one probe interval.
async fn run_canary(
    canary: LatencyCanary,
    mut judges: CanaryJudges,
    interval: Duration,
    health: watch::Sender<HealthSample>,
    shutdown: Shutdown,
) {
    let origin = Instant::now();
    let mut rows_read_at: Option<Instant> = None;
    let mut directive = None;
    while !shutdown.is_triggered() {
        let round_trip = canary.round_trip().await;
        let now = origin.elapsed();
        if let (Some(round_trip), Some(detector)) = (round_trip, judges.detector.as_mut()) {
            let verdict = detector.observe(now, round_trip);
            tracing::trace!(
                target: "backfilld::canary",
                round_trip_us = round_trip.as_micros() as u64,
                excess_us = verdict.excess.as_micros() as u64,
                delayed = verdict.delayed,
                "canary"
            );
            telemetry::record_canary(verdict);
            if verdict.delayed {
                let delays = detector.delayed_total();
                health.send_modify(|latest| latest.probe_delays = delays);
            }
        }
        if let Some(impact) = judges.impact.as_mut() {
            if let Some(round_trip) = round_trip {
                impact.observe(now, round_trip);
            }
            if rows_read_at.is_none_or(|at| at.elapsed() >= IMPACT_ROWS_INTERVAL) {
                rows_read_at = Some(Instant::now());
                match running_rows_done(&judges.control).await {
                    Ok(rows) => impact.record_rows(now, rows),
                    Err(e) => tracing::debug!(error = %e, "cannot read the running jobs' rows"),
                }
            }
            let active = health.borrow().production_active;
            let verdict = impact.evaluate(now, active);
            telemetry::record_impact(&verdict);
            if verdict.directive != directive {
                tracing::debug!(
                    target: "backfilld::impact",
                    directive = ?verdict.directive,
                    ratio = ?verdict.ratio,
                    baseline_us = impact.baseline().map(|b| b.as_micros() as u64),
                    "impact budget"
                );
                directive = verdict.directive;
                health.send_modify(|latest| latest.impact = directive);
            }
        }
        shutdown.sleep(interval).await;
    }
}

/// Rows the running jobs have committed in all.
async fn running_rows_done(control: &PgPool) -> Result<u64, sqlx::Error> {
    let rows: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(rows_done), 0)::int8 FROM backfill.jobs WHERE state = 'running'",
    )
    .fetch_one(control)
    .await?;
    Ok(u64::try_from(rows).unwrap_or(0))
}
