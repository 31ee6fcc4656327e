//! Production's sessions waiting on the WAL, for the impact budget's WAL judge
//! (`backfill_core::impact::wal`).

use std::time::Duration;

use backfill_core::impact::WalWaitCount;
use deadpool_postgres::Pool;

use super::query_prepared;

/// A session of `pg_stat_activity` waiting on the WAL, where a commit behind a batch's WAL
/// waits: the bench measures the signal by this same predicate.
pub const WAITING_ON_THE_WAL: &str = waiting_on_the_wal!();

/// Production's active sessions, and how many of them wait on the WAL.
const WAL_WAITS_SQL: &str = concat!(
    "SELECT count(*) FILTER (WHERE ",
    waiting_on_the_wal!(),
    ")::int8, count(*)::int8 FROM pg_stat_activity WHERE state = 'active' AND ",
    production_sessions!()
);

/// Samples production's WAL waits on a connection of its own (one sample a few tenths of
/// a millisecond of the primary's time; issue 19's sixteenth round measured it).
#[derive(Clone)]
pub struct ProductionWalWaits {
    pool: Pool,
    timeout: Duration,
}

impl ProductionWalWaits {
    /// A sampler on `pool` (one connection is enough); a sample is given up after
    /// `timeout`.
    pub fn new(pool: Pool, timeout: Duration) -> Self {
        ProductionWalWaits { pool, timeout }
    }

    /// One sample; `None` when it could not be read (no connection, an error, too slow).
    /// Without pg_read_all_stats other roles' sessions show no state and are not seen.
    pub async fn sample(&self) -> Option<WalWaitCount> {
        let client = self.pool.get().await.ok()?;
        let rows = tokio::time::timeout(self.timeout, query_prepared(&client, WAL_WAITS_SQL, &[]))
            .await
            .ok()?
            .ok()?;
        let row = rows.first()?;
        let count = |i: usize| u32::try_from(row.get::<_, i64>(i)).unwrap_or(u32::MAX);
        Some(WalWaitCount {
            waiting: count(0),
            active: count(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{connect_pool, SessionSettings};
    use pg_testkit::PgCluster;

    /// Sessions running `pg_sleep` under `application_name`, until dropped.
    async fn sleeping_session(url: &str, application_name: &str) -> tokio::task::JoinHandle<()> {
        let pool = connect_pool(
            url,
            &SessionSettings {
                application_name: application_name.to_owned(),
                ..SessionSettings::default()
            },
        )
        .expect("pool");
        let client = pool.get().await.expect("a session");
        tokio::spawn(async move {
            let _ = client.simple_query("SELECT pg_sleep(60)").await;
        })
    }

    /// Production is every client session but the sampler's and backfilld's; a session in
    /// `pg_sleep` is active and waits on a timeout, not on the WAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_production_active_sessions_and_none_of_ours() {
        let cluster = PgCluster::start_primary().expect("start a primary");
        let url = cluster.url("postgres");
        let pool = connect_pool(&url, &SessionSettings::default()).expect("pool");
        let sampler = ProductionWalWaits::new(pool.clone(), Duration::from_secs(5));
        assert_eq!(
            sampler.sample().await,
            Some(WalWaitCount::default()),
            "an idle primary"
        );
        let production = sleeping_session(&url, "app").await;
        let ours = sleeping_session(&url, "backfilld-worker").await;
        let watcher = pool.get().await.expect("a session");
        // Wait until both sleep (a poll, not a guess at how long that takes).
        let mut sleeping = 0;
        for _ in 0..100_000 {
            sleeping = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .get::<_, i64>(0);
            if sleeping == 2 {
                break;
            }
        }
        assert_eq!(sleeping, 2, "both sessions sleep");
        assert_eq!(
            sampler.sample().await,
            Some(WalWaitCount {
                waiting: 0,
                active: 1
            })
        );
        production.abort();
        ours.abort();
    }
}
