//! Standbys' lag: combined from the primary's two readings, or read on a replica itself
//! (see the module docs of [`super`]).

use std::time::Duration;

use backfill_core::throttle::ReplicaLag;
use deadpool_postgres::Pool;

use super::query_prepared;
use crate::pool::error_chain;

/// Lag as a standby sees it itself (see the module docs).
const REPLICA_LAG_SQL: &str = "SELECT pg_is_in_recovery(), \
        CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
             ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END::float8, \
        greatest(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::float8";

/// Time and byte lag of one standby from `pg_stat_replication` (see the module docs): zero
/// bytes outstanding means caught up, whatever a stale or NULL `replay_lag` says.
pub(super) fn combine_lag(
    replay_lag_seconds: Option<f64>,
    lag_bytes: Option<f64>,
) -> (Option<Duration>, Option<u64>) {
    // float8 → u64 saturates, and greatest(…, 0) already ruled out negatives.
    let lag_bytes = lag_bytes.map(|bytes| bytes as u64);
    let lag = match lag_bytes {
        Some(0) => Some(Duration::ZERO),
        _ => replay_lag_seconds.map(seconds),
    };
    (lag, lag_bytes)
}

/// The declared standbys that are not among the `found` ones.
pub(super) fn missing_standbys(expected: &[String], found: &[ReplicaLag]) -> Vec<String> {
    expected
        .iter()
        .filter(|name| !found.iter().any(|replica| &replica.name == *name))
        .cloned()
        .collect()
}

/// A duration from seconds the database computed; negative (clock skew) or NaN read as 0.
pub(super) fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(Duration::MAX)
}

/// Lag measured on a replica itself (see the module docs).
pub(super) async fn replica_lag(pool: &Pool, name: &str) -> Result<ReplicaLag, String> {
    let client = pool
        .get()
        .await
        .map_err(|e| format!("connecting: {}", error_chain(&e)))?;
    let rows = query_prepared(&client, REPLICA_LAG_SQL, &[])
        .await
        .map_err(|e| format!("reading its replay position: {}", error_chain(&e)))?;
    let row = rows.first().ok_or("reading its replay position: no row")?;
    let in_recovery: bool = row.get(0);
    if !in_recovery {
        return Err(
            "it is not a standby (pg_is_in_recovery() is false); throttle.replica_urls takes physical standbys"
                .to_string(),
        );
    }
    let lag_seconds: Option<f64> = row.get(1);
    let lag_bytes: Option<f64> = row.get(2);
    Ok(ReplicaLag::new(
        name,
        lag_seconds.map(seconds),
        lag_bytes.map(|bytes| bytes as u64),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_standby_is_zero_behind_whatever_replay_lag_says() {
        // Idle primary: replay_lag stale for an interval, then NULL.
        assert_eq!(
            combine_lag(Some(3.5), Some(0.0)),
            (Some(Duration::ZERO), Some(0))
        );
        assert_eq!(
            combine_lag(None, Some(0.0)),
            (Some(Duration::ZERO), Some(0))
        );
    }

    #[test]
    fn standby_with_wal_outstanding_keeps_both_readings() {
        assert_eq!(
            combine_lag(Some(1.5), Some(4096.0)),
            (Some(Duration::from_millis(1_500)), Some(4096))
        );
        // Writes started after an idle spell: replay_lag not measured yet, bytes are.
        assert_eq!(combine_lag(None, Some(4096.0)), (None, Some(4096)));
        // Not reported at all (just connected): unmeasured, which the controller holds on.
        assert_eq!(combine_lag(None, None), (None, None));
    }

    #[test]
    fn nonsense_seconds_do_not_panic() {
        assert_eq!(seconds(-0.2), Duration::ZERO);
        assert_eq!(seconds(f64::NAN), Duration::ZERO);
        assert_eq!(seconds(f64::INFINITY), Duration::MAX);
    }

    #[test]
    fn declared_standbys_not_streaming_are_missing() {
        let found = [ReplicaLag::new("a", None, Some(0))];
        let expected = ["a".to_owned(), "b".to_owned()];
        assert_eq!(missing_standbys(&expected, &found), ["b"]);
        assert!(missing_standbys(&[], &found).is_empty());
    }
}
