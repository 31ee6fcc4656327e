//! Health probes: replication lag of every standby and the lock trouble our
//! sessions cause, sampled on their own connection with a timeout each.

use std::time::Duration;

use backfill_core::throttle::{HealthSample, ReplicaLag};
use deadpool_postgres::Pool;

/// Samples the signals the throttle controller runs on.
#[derive(Clone)]
pub struct HealthProbe {
    primary: Pool,
    replicas: Vec<(String, Pool)>,
    expected_standbys: Vec<String>,
    our_application_name: String,
    timeout: Duration,
}

impl HealthProbe {
    /// A probe on the primary's pool; `replicas` are probed directly by name;
    /// `expected_standbys` must appear in `pg_stat_replication` or count as missing.
    pub fn new(
        primary: Pool,
        replicas: Vec<(String, Pool)>,
        expected_standbys: Vec<String>,
        our_application_name: String,
        timeout: Duration,
    ) -> Self {
        HealthProbe {
            primary,
            replicas,
            expected_standbys,
            our_application_name,
            timeout,
        }
    }

    /// One sample. A probe that fails or times out yields a sample with
    /// `probe_failed` set: the throttle treats not knowing as not healthy.
    pub async fn sample(&self) -> HealthSample {
        match tokio::time::timeout(self.timeout, self.sample_primary()).await {
            Ok(Ok(mut sample)) => {
                for (name, pool) in &self.replicas {
                    match tokio::time::timeout(self.timeout, replica_lag(pool, name)).await {
                        Ok(Ok(lag)) => sample.replicas.push(lag),
                        _ => sample.missing_standbys.push(name.clone()),
                    }
                }
                sample
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "health probe failed");
                HealthSample::probe_failed()
            }
            Err(_) => HealthSample::probe_failed(),
        }
    }

    async fn sample_primary(&self) -> Result<HealthSample, String> {
        let client = self.primary.get().await.map_err(|e| e.to_string())?;
        // replay_lag goes NULL (or stale) once a standby has replayed everything
        // on an idle primary, while byte lag is exact: a standby with nothing
        // left to replay is 0 s behind whatever replay_lag says, and one with
        // bytes outstanding is judged on both numbers.
        let rows = client
            .query(
                "SELECT application_name, \
                        extract(epoch FROM replay_lag)::float8, \
                        greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::float8 \
                   FROM pg_stat_replication \
                  WHERE state IN ('streaming', 'catchup')",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut sample = HealthSample::default();
        for row in rows {
            let name: String = row.get(0);
            let lag_seconds: Option<f64> = row.get(1);
            let lag_bytes: Option<f64> = row.get(2);
            let lag_bytes = lag_bytes.map(|b| b as u64);
            let lag = match lag_bytes {
                Some(0) => Some(Duration::ZERO),
                _ => lag_seconds.map(Duration::from_secs_f64),
            };
            sample.replicas.push(ReplicaLag::new(name, lag, lag_bytes));
        }
        for expected in &self.expected_standbys {
            if !sample.replicas.iter().any(|r| &r.name == expected) {
                sample.missing_standbys.push(expected.clone());
            }
        }
        let blocked = client
            .query_one(
                "SELECT count(*)::int8, \
                        coalesce(max(extract(epoch FROM now() - coalesce(a.query_start, a.state_change))), 0)::float8 \
                   FROM pg_stat_activity a \
                  WHERE a.wait_event_type = 'Lock' \
                    AND pg_blocking_pids(a.pid) && ARRAY(SELECT pid FROM pg_stat_activity WHERE application_name = $1)",
                &[&self.our_application_name],
            )
            .await
            .map_err(|e| e.to_string())?;
        let count: i64 = blocked.get(0);
        let longest: f64 = blocked.get(1);
        sample.sessions_blocked_by_us = u32::try_from(count).unwrap_or(u32::MAX);
        sample.longest_block = Duration::from_secs_f64(longest.max(0.0));
        Ok(sample)
    }
}

/// Lag measured on a replica itself: time since the last replayed transaction,
/// counted as zero when it has replayed everything it received.
async fn replica_lag(pool: &Pool, name: &str) -> Result<ReplicaLag, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
                         ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END::float8, \
                    greatest(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::float8",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let seconds: Option<f64> = row.get(0);
    let bytes: Option<f64> = row.get(1);
    Ok(ReplicaLag::new(
        name,
        seconds.map(|s| Duration::from_secs_f64(s.max(0.0))),
        bytes.map(|b| b as u64),
    ))
}
