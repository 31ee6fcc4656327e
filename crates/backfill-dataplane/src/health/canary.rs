//! The production-latency canary.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

/// The canary's statement: a transaction that writes WAL and waits for its commit to be
/// flushed, as production's writes do; a backfill hurts production mostly there (its
/// batches' WAL is flushed before, or with, every commit behind them). Measured side by
/// side, a committing canary told a backfill that hurt pgbench from one that did not far
/// better than `SELECT 1` (see docs/BENCHMARKS.md). A transactional logical message,
/// because a transaction that only takes a transaction ID (the canary until issue 19's
/// third round, `SELECT pg_current_xact_id()`) writes no WAL of its own and so commits
/// *asynchronously*: it never waited for a flush, and missed the 30–110 ms commit stalls
/// pgbench's transactions suffered next to it. The message is empty, names no table, works
/// for any role and in read-only transactions, and reaches only logical-decoding
/// consumers that ask for messages (prefix `backfilld.canary`).
pub const CANARY_SQL: &str = "SELECT pg_logical_emit_message(true, 'backfilld.canary', '')";

/// The production-latency canary (see [`backfill_core::latency`]): [`CANARY_SQL`] timed on
/// a connection of its own, so that neither our batches nor the other probes queue before
/// it.
#[derive(Clone)]
pub struct LatencyCanary {
    pool: Pool,
    timeout: Duration,
}

impl LatencyCanary {
    /// A canary on `pool` (one connection is enough); a round trip is given up after
    /// `timeout`.
    pub fn new(pool: Pool, timeout: Duration) -> Self {
        LatencyCanary { pool, timeout }
    }

    /// One round trip on an established connection (connecting is not timed). A canary
    /// still unanswered after the timeout reports the timeout: production is that slow at
    /// least. `None` when it could not run at all (no connection, an error): no verdict.
    pub async fn round_trip(&self) -> Option<Duration> {
        let client = self.pool.get().await.ok()?;
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, client.simple_query(CANARY_SQL)).await {
            Ok(Ok(_)) => Some(started.elapsed()),
            Ok(Err(_)) => None,
            Err(_) => Some(self.timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{connect_pool, SessionSettings};
    use pg_testkit::PgCluster;

    /// The canary's commit is flushed before it answers. With the WAL writer asleep for
    /// ten seconds, an asynchronous commit (a transaction that writes no WAL of its own)
    /// leaves its commit record unflushed long after the canary answers; production's
    /// commits are synchronous, and the canary must wait as they do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_canary_waits_for_its_commit_to_be_flushed() {
        let cluster =
            PgCluster::start_primary_with(&[("wal_writer_delay", "10s")]).expect("start a primary");
        let url = cluster.url("postgres");
        let pool = connect_pool(&url, &SessionSettings::default()).expect("pool");
        let canary = LatencyCanary::new(pool.clone(), Duration::from_secs(5));
        let client = pool.get().await.expect("a second session");
        let unflushed = "SELECT (pg_current_wal_insert_lsn() - pg_current_wal_flush_lsn())::bigint";
        // A commit that writes no WAL of its own is not flushed: the check below can
        // tell the two apart.
        client
            .simple_query("SELECT pg_current_xact_id()")
            .await
            .expect("xid only");
        let behind: i64 = client.query_one(unflushed, &[]).await.expect("lsn").get(0);
        assert!(
            behind > 0,
            "an xid-only commit was flushed at once ({behind} bytes behind)"
        );
        for _ in 0..3 {
            assert!(canary.round_trip().await.is_some(), "the canary answers");
            let behind: i64 = client.query_one(unflushed, &[]).await.expect("lsn").get(0);
            assert_eq!(
                behind, 0,
                "the canary's commit was not flushed when it answered"
            );
        }
    }
}
