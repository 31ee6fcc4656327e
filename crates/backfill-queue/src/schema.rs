//! The embedded, versioned migrations that install and upgrade schema `backfill`.

use backfill_core::queue_sql;
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection, PgPool};

use crate::{Context, QueueError};

/// The migrations compiled into the binary (`crates/backfill-queue/migrations`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Installs or upgrades schema `backfill`; running it again is a no-op.
///
/// sqlx keeps its bookkeeping table in the first schema of the search path, so
/// the migrations run on a connection whose search path is `backfill`: nothing
/// of ours lands in `public`. sqlx takes an advisory lock, so several pods
/// starting at once apply each migration exactly once.
pub async fn migrate(pool: &PgPool) -> Result<(), QueueError> {
    let mut conn = pool
        .acquire()
        .await
        .context("connecting to run migrations")?;
    // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema is
    // there: a least-privilege role is given schema backfill (README), not that.
    let exists: bool = sqlx::query_scalar("SELECT to_regnamespace('backfill') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .context("looking for schema backfill")?;
    if !exists {
        sqlx::query("CREATE SCHEMA IF NOT EXISTS backfill")
            .execute(&mut *conn)
            .await
            .context("creating schema backfill")?;
    }
    let mut session: PgConnection = conn.detach();
    sqlx::query("SET search_path TO backfill")
        .execute(&mut session)
        .await
        .context("setting search_path for migrations")?;
    let applied = MIGRATOR.run(&mut session).await;
    let _ = session.close().await;
    applied?;
    Ok(())
}

/// True when every embedded migration has been applied (what `/readyz` checks).
pub async fn schema_is_current(pool: &PgPool) -> Result<bool, QueueError> {
    let latest: Option<i64> = sqlx::query_scalar(queue_sql::LATEST_MIGRATION)
        .fetch_one(pool)
        .await
        .or_else(|e| match &e {
            // Table missing: the schema has never been installed.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(None),
            _ => Err(e),
        })
        .context("reading applied migrations")?;
    let wanted = MIGRATOR.iter().map(|m| m.version).max();
    Ok(latest.is_some() && latest >= wanted)
}
