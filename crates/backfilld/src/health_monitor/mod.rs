//! The daemon's one health monitor: the task that owns the health probe (standby lag,
//! locks, slots, operator throttles, production's sessions), the production-activity judge,
//! the production-latency canary, (with `throttle.impact_wal_rise`) the sampler of
//! production's WAL waits and (with `throttle.impact_sli_query`) the reader of
//! production's latency SLI, and that alone publishes the health samples the worker's
//! jobs run on.
//!
//! Rooms: [`probe`] (the probe `[throttle]` configures, also used by `plan`) and [`canary`]
//! (the canary's round trips and their judges). The daemon-wide gauges are
//! `telemetry::gauges`.

mod canary;
mod probe;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use backfill_core::activity::ProductionActivity;
use backfill_core::impact::sli::SLI_READ_EVERY;
use backfill_core::impact::WalWaitCount;
use backfill_core::throttle::{HealthSample, QueryReading};
use backfill_dataplane::{HealthProbe, ProductionWalWaits, PrometheusQuery};
use tokio::sync::{mpsc, watch};

use crate::batches_in_flight::BatchesInFlight;
use crate::database::Database;
use crate::settings::ThrottleConfig;
use crate::shutdown::Shutdown;
use crate::telemetry;
use canary::{CanaryJudges, CanaryReading, CanaryTimer, CanaryVerdicts, InBatchCanary};
pub(crate) use probe::health_probe;

/// How often production's WAL waits are sampled for the impact budget's WAL judge
/// (`throttle.impact_wal_rise`): the rate issue 19's sixteenth round judged it at.
const WAL_WAIT_INTERVAL: Duration = Duration::from_millis(20);

/// What the monitor's readers hand its judges: a probe sample, a canary round trip or a
/// sample of production's WAL waits, each stamped with when it was taken (time since the
/// monitor started).
enum Reading {
    // Boxed: a sample is large next to a canary's round trip.
    Probe {
        at: Duration,
        sample: Box<HealthSample>,
    },
    Canary(CanaryReading),
    WalWaits {
        at: Duration,
        count: WalWaitCount,
    },
    /// A value of production's latency SLI.
    Sli {
        at: Duration,
        value: f64,
    },
}

/// The health monitor (see the module docs): its readers — the probe every
/// `throttle.probe_interval`, the canary every `throttle.canary_interval`, the WAL waits
/// every [`WAL_WAIT_INTERVAL`] — only read, and its [`Judges`] judge what they read and
/// publish.
pub struct HealthMonitor {
    /// What every reading's time is counted from.
    origin: Instant,
    probe: HealthProbe,
    probe_interval: Duration,
    /// `None` when no judge needs the canary.
    canary: Option<CanaryTimer>,
    /// `None` unless the impact budget judges the batches' own share.
    in_batch: Option<InBatchCanary>,
    /// `None` unless the impact budget judges production's WAL waits.
    wal_waits: Option<ProductionWalWaits>,
    /// `None` unless the impact budget reads production's latency SLI.
    sli: Option<PrometheusQuery>,
    judges: Judges,
}

impl HealthMonitor {
    /// Starts the monitor on a task of its own: the receiver of its samples, and the task
    /// (aborting it stops the probe and the canary alike).
    pub fn spawn(
        throttle: &ThrottleConfig,
        db: &Database,
        batches: &Arc<BatchesInFlight>,
        shutdown: Shutdown,
    ) -> anyhow::Result<(watch::Receiver<HealthSample>, tokio::task::JoinHandle<()>)> {
        // Production sessions are counted only for sharing the primary (the impact budget or
        // the duty cycle).
        let impact = throttle.impact_settings();
        let sharing = throttle.busy_duty_cycle < 1.0 || impact.is_some();
        let probe = health_probe(throttle, db, sharing.then_some(throttle.probe_interval), 0)?;
        // Readings are stamped with the time since `origin`; the impact budget's periodic
        // rests fall on the wall clock, so that the pods of one Job rest together.
        let origin = Instant::now();
        let wall_at_origin = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let canary_judges = CanaryJudges::new(throttle.max_probe_delay, impact, wall_at_origin);
        let canary = match &canary_judges {
            None => None,
            Some(judges) => {
                let pool = db
                    .primary_probe_pool()
                    .context("the production-latency canary's connection")?;
                Some(CanaryTimer::new(
                    pool,
                    throttle,
                    judges.needs_rows().then(|| db.control.clone()),
                    batches,
                ))
            }
        };
        let needs_in_batch = CanaryJudges::needs_in_batch(impact.as_ref());
        let in_batch = own_connection(db, needs_in_batch, "the in-batch canary")?
            .map(|pool| InBatchCanary::new(pool, throttle, batches));
        let needs_wal_waits = CanaryJudges::needs_wal_waits(impact.as_ref());
        let wal_waits = own_connection(db, needs_wal_waits, "the WAL-wait sampler")?
            .map(|pool| ProductionWalWaits::new(pool, throttle.probe_timeout));
        let sli = match (&canary, throttle.impact_sli()) {
            (Some(_), Some((url, query))) => Some(
                PrometheusQuery::new(url, query, throttle.probe_timeout)
                    .map_err(|e| anyhow::anyhow!("throttle.prometheus_url: {e}"))?,
            ),
            _ => None,
        };
        let (published, samples) = watch::channel(HealthSample::default());
        let monitor = HealthMonitor {
            origin,
            probe,
            probe_interval: throttle.probe_interval,
            canary,
            in_batch,
            wal_waits,
            sli,
            judges: Judges {
                activity: ActivityJudge::new(sharing),
                canary: canary_judges,
                verdicts: CanaryVerdicts::default(),
                latest: None,
                published,
            },
        };
        Ok((samples, tokio::spawn(monitor.run(shutdown))))
    }

    /// Reads until shutdown, the probe, the canary and the WAL waits on their own
    /// cadences, while the judges take each reading in turn.
    async fn run(self, shutdown: Shutdown) {
        let HealthMonitor {
            origin,
            probe,
            probe_interval,
            canary,
            in_batch,
            wal_waits,
            sli,
            mut judges,
        } = self;
        let (readings, mut to_judge) = mpsc::channel(4);
        let probing = read_probe(
            probe,
            probe_interval,
            origin,
            readings.clone(),
            shutdown.clone(),
        );
        let judging = async {
            while let Some(reading) = to_judge.recv().await {
                judges.judge(reading);
            }
        };
        match canary {
            Some(canary) => {
                let (in_batch_readings, in_batch_shutdown) = (readings.clone(), shutdown.clone());
                let in_batch = async move {
                    if let Some(in_batch) = in_batch {
                        in_batch
                            .run(origin, in_batch_readings, in_batch_shutdown)
                            .await;
                    }
                };
                let (wal_readings, wal_shutdown) = (readings.clone(), shutdown.clone());
                let wal_waiting = async move {
                    if let Some(wal_waits) = wal_waits {
                        read_wal_waits(wal_waits, origin, wal_readings, wal_shutdown).await;
                    }
                };
                let (sli_readings, sli_shutdown) = (readings.clone(), shutdown.clone());
                let sli_reading = async move {
                    if let Some(sli) = sli {
                        read_sli(sli, origin, sli_readings, sli_shutdown).await;
                    }
                };
                tokio::join!(
                    probing,
                    in_batch,
                    wal_waiting,
                    sli_reading,
                    canary.run(origin, readings, shutdown),
                    judging
                );
            }
            None => {
                drop(readings);
                tokio::join!(probing, judging);
            }
        }
    }
}

/// A connection of its own on the primary for `reader`, when it is `needed`.
fn own_connection(
    db: &Database,
    needed: bool,
    reader: &str,
) -> anyhow::Result<Option<deadpool_postgres::Pool>> {
    needed
        .then(|| {
            db.primary_probe_pool()
                .with_context(|| format!("{reader}'s connection"))
        })
        .transpose()
}

/// Samples health every `interval` until shutdown and hands each sample to the judges.
async fn read_probe(
    probe: HealthProbe,
    interval: Duration,
    origin: Instant,
    readings: mpsc::Sender<Reading>,
    shutdown: Shutdown,
) {
    while !shutdown.is_triggered() {
        let sample = Box::new(probe.sample().await);
        let at = origin.elapsed();
        if readings.send(Reading::Probe { at, sample }).await.is_err() {
            return;
        }
        shutdown.sleep(interval).await;
    }
}

/// Samples production's WAL waits every [`WAL_WAIT_INTERVAL`] until shutdown and hands
/// each sample to the judges (a sample that could not be read is skipped: the judge
/// waits for evidence, it does not guess).
async fn read_wal_waits(
    wal_waits: ProductionWalWaits,
    origin: Instant,
    readings: mpsc::Sender<Reading>,
    shutdown: Shutdown,
) {
    while !shutdown.is_triggered() {
        if let Some(count) = wal_waits.sample().await {
            let at = origin.elapsed();
            if readings
                .send(Reading::WalWaits { at, count })
                .await
                .is_err()
            {
                return;
            }
        }
        shutdown.sleep(WAL_WAIT_INTERVAL).await;
    }
}

/// Reads production's latency SLI every [`SLI_READ_EVERY`] until shutdown and hands
/// each value to the judges. A value that cannot be read is skipped (the canary steers
/// alone meanwhile): logged when it starts failing or fails otherwise, and when it reads
/// again.
async fn read_sli(
    sli: PrometheusQuery,
    origin: Instant,
    readings: mpsc::Sender<Reading>,
    shutdown: Shutdown,
) {
    let mut failing: Option<String> = None;
    while !shutdown.is_triggered() {
        match sli.read().await {
            QueryReading::Value(value) => {
                if failing.take().is_some() {
                    tracing::info!("throttle.impact_sli_query reads again");
                }
                let at = origin.elapsed();
                if readings.send(Reading::Sli { at, value }).await.is_err() {
                    return;
                }
            }
            QueryReading::Failed(why) => {
                if failing.as_deref() != Some(why.as_str()) {
                    tracing::warn!(
                        error = %why,
                        "throttle.impact_sli_query: no value; the impact budget's canary steers alone until it reads"
                    );
                    failing = Some(why);
                }
            }
        }
        shutdown.sleep(SLI_READ_EVERY).await;
    }
}

/// What judges the readings, and the one writer of the health samples. A sample is
/// published only once it is complete: never before the probe's first reading (until then
/// the channel holds a placeholder that knows nothing of standbys or blocked sessions,
/// which no batch may run on), and afterwards the probe's latest reading with the activity
/// verdict and the canary's verdicts folded in. A canary verdict that changes re-publishes
/// it at once: a delay reaches the throttle within one canary interval, not one probe
/// interval.
struct Judges {
    activity: ActivityJudge,
    canary: Option<CanaryJudges>,
    /// The canary's verdicts, carried into every sample.
    verdicts: CanaryVerdicts,
    /// The latest complete sample; `None` until the probe's first reading.
    latest: Option<HealthSample>,
    published: watch::Sender<HealthSample>,
}

impl Judges {
    /// Folds one reading into the latest sample, and publishes the sample if it is
    /// complete and the reading changed it.
    fn judge(&mut self, reading: Reading) {
        match reading {
            Reading::Probe { at, mut sample } => {
                sample.production_active = self.activity.judge(at, &sample);
                telemetry::record_replication_lag(&sample);
                self.verdicts.fold_into(&mut sample);
                self.latest = Some(*sample);
            }
            Reading::WalWaits { at, count } => {
                // Weighed now, judged with the next canary.
                if let Some(judges) = self.canary.as_mut() {
                    judges.observe_wal_waits(at, count);
                }
                return;
            }
            Reading::Sli { at, value } => {
                // Judged now; a cut reaches the jobs with the next canary.
                if let Some(judges) = self.canary.as_mut() {
                    judges.observe_sli(at, value);
                }
                return;
            }
            Reading::Canary(reading) => {
                let Some(judges) = self.canary.as_mut() else {
                    return;
                };
                let active = self
                    .latest
                    .as_ref()
                    .is_some_and(|sample| sample.production_active);
                let verdicts = judges.judge(&reading, active);
                if verdicts == self.verdicts {
                    return;
                }
                self.verdicts = verdicts;
                match self.latest.as_mut() {
                    Some(latest) => verdicts.fold_into(latest),
                    None => return,
                }
            }
        }
        if let Some(latest) = &self.latest {
            self.published.send_replace(latest.clone());
        }
    }
}

/// Whether production is at work on the primary, judged from the sessions each sample
/// counted (see [`backfill_core::activity`]); each change is logged when sharing is on.
struct ActivityJudge {
    sharing: bool,
    activity: ProductionActivity,
    was_active: bool,
}

impl ActivityJudge {
    fn new(sharing: bool) -> Self {
        ActivityJudge {
            sharing,
            activity: ProductionActivity::default(),
            was_active: false,
        }
    }

    /// Whether production is active as of `sample`, taken at `at`.
    fn judge(&mut self, at: Duration, sample: &HealthSample) -> bool {
        let active = self.activity.observe(at, sample.production_sessions);
        if self.sharing && active != self.was_active {
            note_production_activity(active, sample.production_sessions);
        }
        self.was_active = active;
        active
    }
}

/// Logs when jobs start and stop sharing the primary with production.
fn note_production_activity(active: bool, sessions: u32) {
    if active {
        tracing::info!(
            sessions,
            "production is at work on the primary: sharing it (the impact budget, throttle.impact_budget_ratio; without its signal, the duty cycle, throttle.busy_duty_cycle)"
        );
    } else {
        tracing::info!(
            "no production sessions at work on the primary for a while: running flat out"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A canary round trip of `round_trip_ms`, ending at `at_ms`.
    fn canary(at_ms: u64, round_trip_ms: u64) -> Reading {
        Reading::Canary(CanaryReading {
            at: Duration::from_millis(at_ms),
            round_trip: Some(Duration::from_millis(round_trip_ms)),
            rows_done: None,
            in_batch: false,
            busy_total: Duration::ZERO,
        })
    }

    #[test]
    fn only_complete_samples_are_published() {
        let (published, mut samples) = watch::channel(HealthSample::default());
        let mut judges = Judges {
            activity: ActivityJudge::new(false),
            canary: CanaryJudges::new(Duration::from_millis(5), None, Duration::ZERO),
            verdicts: CanaryVerdicts::default(),
            latest: None,
            published,
        };
        // A delayed canary before the probe's first reading is judged, not published.
        judges.judge(canary(0, 1));
        judges.judge(canary(100, 50));
        assert!(!samples.has_changed().expect("open"));

        // The probe's first reading is published, with the canary's count in it.
        let probed = HealthSample {
            missing_standbys: vec!["standby1".to_owned()],
            ..HealthSample::default()
        };
        judges.judge(Reading::Probe {
            at: Duration::from_millis(200),
            sample: Box::new(probed),
        });
        assert!(samples.has_changed().expect("open"));
        let first = samples.borrow_and_update().clone();
        assert_eq!(first.missing_standbys, ["standby1"]);
        assert_eq!(first.probe_delays, 1);

        // A round trip that changes no verdict publishes nothing; a delayed one publishes
        // the probe's reading again with the new count.
        judges.judge(canary(300, 1));
        assert!(!samples.has_changed().expect("open"));
        judges.judge(canary(400, 50));
        assert!(samples.has_changed().expect("open"));
        let second = samples.borrow_and_update().clone();
        assert_eq!(second.probe_delays, 2);
        assert_eq!(second.missing_standbys, ["standby1"]);
    }
}
