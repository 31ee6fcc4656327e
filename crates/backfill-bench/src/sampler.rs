//! Samples the standby's replication lag on the primary every 100 ms while a scenario
//! runs, notes which backends belong to backfilld (to attribute lock waits), and what
//! active pgbench sessions are waiting for (to explain their latency).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use crate::fixture::STANDBY_NAME;

/// How often lag is sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// The standby's replay lag in time and bytes as the primary sees it, and backfilld's
/// backend pids. Bytes are exact as of the standby's last report. Time comes from the
/// standby's feedback and keeps its last value for a while after the standby caught up,
/// so with nothing left to replay it reads 0 — as backfilld's own probe reads it.
const SAMPLE_SQL: &str = "SELECT \
        coalesce(max(CASE WHEN behind > 0 THEN extract(epoch FROM replay_lag) ELSE 0 END), 0)::float8, \
        coalesce(max(behind), 0)::float8, \
        ARRAY(SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'backfilld%'), \
        ARRAY(SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity \
               WHERE application_name = 'pgbench' AND state = 'active') \
   FROM (SELECT replay_lag, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) AS behind \
           FROM pg_stat_replication WHERE application_name = $1) AS standby";

/// What the sampler saw over one scenario.
#[derive(Debug, Default)]
pub struct Samples {
    /// Replay lag in seconds, one value per sample.
    pub lag_seconds: Vec<f64>,
    /// Replay lag in bytes, one value per sample.
    pub lag_bytes: Vec<f64>,
    /// Backends whose application_name started with `backfilld` at any sample.
    pub backfilld_pids: HashSet<i32>,
    /// How often an active pgbench session was seen in each wait event (`CPU`: none).
    pub pgbench_waits: BTreeMap<String, u32>,
}

impl Samples {
    /// The most frequent wait events of active pgbench sessions, e.g. `CPU 40, LWLock:WALWrite 12`.
    pub fn describe_pgbench_waits(&self) -> String {
        let mut waits: Vec<(&String, &u32)> = self.pgbench_waits.iter().collect();
        waits.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = waits
            .iter()
            .take(6)
            .map(|(e, n)| format!("{e} {n}"))
            .collect();
        top.join(", ")
    }
}

/// A session of its own on `conninfo`, named `application_name`, with `sql` prepared on it.
pub async fn sampling_session(
    conninfo: &str,
    application_name: &str,
    sql: &str,
) -> anyhow::Result<(tokio_postgres::Client, tokio_postgres::Statement)> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .context("connecting")?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!("SET application_name = '{application_name}'"))
        .await
        .context("naming the session")?;
    let statement = client.prepare(sql).await.context("preparing the sample")?;
    Ok((client, statement))
}

/// Ticks every `interval`; a tick missed while a sample was slow is not made up.
pub fn ticker(interval: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// A running sampler; [`Sampler::finish`] stops it and hands over its samples.
pub struct Sampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<Samples>>,
}

impl Sampler {
    /// Connects to `url` (the primary) and starts sampling.
    pub async fn start(url: &str) -> anyhow::Result<Sampler> {
        let (client, statement) = sampling_session(url, "backfill-bench", SAMPLE_SQL)
            .await
            .context("starting the lag sampler")?;
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut ticker = ticker(SAMPLE_INTERVAL);
            loop {
                tokio::select! {
                    _ = &mut stopped => return Ok(samples),
                    _ = ticker.tick() => {}
                }
                let row = client
                    .query_one(&statement, &[&STANDBY_NAME])
                    .await
                    .context("sampling replication lag")?;
                samples.lag_seconds.push(row.get(0));
                samples.lag_bytes.push(row.get(1));
                samples.backfilld_pids.extend(row.get::<_, Vec<i32>>(2));
                for event in row.get::<_, Vec<String>>(3) {
                    *samples.pgbench_waits.entry(event).or_default() += 1;
                }
            }
        });
        Ok(Sampler { stop, task })
    }

    /// Stops sampling and returns what was seen.
    pub async fn finish(self) -> anyhow::Result<Samples> {
        let _ = self.stop.send(());
        self.task.await.context("the lag sampler panicked")?
    }
}
