//! Samples, every 20 ms, how many of production's sessions are active and how many of
//! those wait on the WAL (`IO:WALSync`, `IO:WALWrite`, `LWLock:WALWrite`): a candidate
//! impact signal, kept in the frontier's timelines to be judged against the p99 it would
//! stand for (scripts/frontier-timelines) before the daemon reads it.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::pgbench::epoch_micros;
use crate::procfs::process_cpu_seconds;
use crate::sampler::{sampling_session, ticker};

/// How often production's sessions are sampled: the daemon's canary window.
pub const WAL_SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// Production is pgbench's load; the bench canary runs under another name
/// ([`crate::frontier`]) and the sampler under its own. Waiting on the WAL is what the
/// daemon's judge counts ([`backfill_dataplane::WAITING_ON_THE_WAL`]).
fn sample_sql() -> String {
    format!(
        "SELECT count(*) FILTER (WHERE {})::int4, count(*)::int4 \
           FROM pg_stat_activity WHERE application_name = 'pgbench' AND state = 'active'",
        backfill_dataplane::WAITING_ON_THE_WAL
    )
}

/// One look at production's sessions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WalWaitSample {
    /// When the sample was asked for, µs since the Unix epoch.
    pub at_us: i64,
    /// Active production sessions waiting on the WAL.
    pub waiting: i32,
    /// Active production sessions.
    pub active: i32,
    /// The sample's round trip, µs: what sampling costs.
    pub took_us: i64,
}

/// What a sampler saw, and what it cost the primary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WalWaits {
    pub samples: Vec<WalWaitSample>,
    /// CPU seconds the sampler's backend used while sampling (the bench and the primary
    /// share the machine, so its `/proc` entry is readable); NaN where it was not.
    pub backend_cpu_seconds: f64,
    /// Seconds the sampler ran.
    pub wall_seconds: f64,
}

/// A running sampler; [`WalWaitSampler::finish`] stops it and hands over its samples.
pub struct WalWaitSampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<Vec<WalWaitSample>>>,
    /// The sampler's backend, and its CPU seconds when sampling began.
    backend: (u32, Option<f64>),
    started: Instant,
}

impl WalWaitSampler {
    /// Connects to `conninfo` (the primary) and starts sampling.
    pub async fn start(conninfo: &str) -> anyhow::Result<WalWaitSampler> {
        let (client, statement) =
            sampling_session(conninfo, "backfill-bench-walwaits", &sample_sql())
                .await
                .context("starting the WAL-wait sampler")?;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .context("reading the WAL-wait sampler's backend pid")?
            .get(0);
        let pid = u32::try_from(pid).context("backend pid out of range")?;
        let backend = (pid, process_cpu_seconds(pid));
        let started = Instant::now();
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticker = ticker(WAL_SAMPLE_INTERVAL);
            loop {
                tokio::select! {
                    _ = &mut stopped => return Ok(samples),
                    _ = ticker.tick() => {}
                }
                let asked = SystemTime::now();
                let row = client
                    .query_one(&statement, &[])
                    .await
                    .context("sampling production's WAL waits")?;
                let at_us = epoch_micros(asked);
                samples.push(WalWaitSample {
                    at_us,
                    waiting: row.get(0),
                    active: row.get(1),
                    took_us: epoch_micros(SystemTime::now()) - at_us,
                });
            }
        });
        Ok(WalWaitSampler {
            stop,
            task,
            backend,
            started,
        })
    }

    /// Stops sampling and returns what was seen and what it cost.
    pub async fn finish(self) -> anyhow::Result<WalWaits> {
        let _ = self.stop.send(());
        let samples = self.task.await.context("the WAL-wait sampler panicked")??;
        let (pid, cpu_before) = self.backend;
        let backend_cpu_seconds = match (cpu_before, process_cpu_seconds(pid)) {
            (Some(before), Some(after)) => after - before,
            _ => f64::NAN,
        };
        Ok(WalWaits {
            samples,
            backend_cpu_seconds,
            wall_seconds: self.started.elapsed().as_secs_f64(),
        })
    }
}
