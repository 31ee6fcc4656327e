//! The production-latency canary.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

/// The canary's statement: a transaction that writes WAL and commits, as production's
/// writes do. Measured side by side, its round trip told a backfill that hurt pgbench from
/// one that did not far better than `SELECT 1`, which never waits for WAL (see
/// docs/BENCHMARKS.md). It takes a transaction ID each time: at the default interval
/// about 1.7 million a day, far below what any writing database burns.
const CANARY_SQL: &str = "SELECT pg_current_xact_id()";

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
