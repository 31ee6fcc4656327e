//! The database connections every verb and the daemon share: sqlx for the queue, deadpool
//! for batches, both with the same TLS decisions, with start-up retries.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use backfill_dataplane::{
    error_chain, pinned_startup_settings, BatchRunner, Endpoint, RetryBackoff, SessionSettings,
    SslMode,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection as _, PgConnection, PgPool};

use crate::redact::redacted;
use crate::settings::{BatchSettings, DatabaseSettings};

/// The database could not be reached at start-up. `retryable`: it may come back (refused,
/// timed out, starting up, failing over), so the start-up retries were spent on it and the
/// process exits 1; otherwise a retry cannot help (a refused login, an unknown database, a
/// bad URL): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the database at {url}: {reason}{hint}")]
pub struct DatabaseUnreachable {
    url: String,
    reason: String,
    pub(crate) retryable: bool,
    /// Said after the reason: how long we tried, and where the URL came from.
    hint: String,
}

/// Back-off between start-up connection attempts: doubles from the first to the last.
const STARTUP_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(10));

/// One failed connection attempt.
struct ConnectFailure {
    reason: String,
    retryable: bool,
}

/// Where the URL came from, when it is not from the environment: a missing `DATABASE_URL`
/// is the most common reason for connecting to the wrong place.
fn url_source_hint() -> &'static str {
    let set = |name: &str| std::env::var_os(name).is_some_and(|value| !value.is_empty());
    if set("DATABASE_URL") || set("BACKFILLD_DATABASE__URL") {
        ""
    } else {
        "; DATABASE_URL is not set, so database.url from the configuration was used"
    }
}

/// The role cannot see what the throttle's probes read, and `throttle.allow_blind` is
/// off: a configuration problem (exit 2).
#[derive(Debug, thiserror::Error)]
#[error(
    "{0}; GRANT pg_monitor to it, or set throttle.allow_blind = true to run without these probes"
)]
pub struct ProbesBlind(String);

/// Whether a failed connection attempt may succeed later: no SQLSTATE (refused, reset, name
/// resolution, timed out) or a transient one (starting up, shutting down, too many
/// connections). A refused login or an unknown database is final.
fn connect_error_is_retryable(sqlstate: Option<&str>, message: &str) -> bool {
    sqlstate.is_none_or(|code| {
        backfill_core::error_class::classify(&backfill_core::error_class::ErrorFacts {
            sqlstate: Some(code),
            message,
            connection_closed: true,
            canceled_by_us: false,
        })
        .is_transient()
    })
}

/// Connections to the target database: sqlx for the queue, deadpool for batches.
pub struct Database {
    pub control: PgPool,
    pub data: deadpool_postgres::Pool,
    pub redacted_url: String,
    /// How the data plane reaches the database (TLS included), for cancel requests.
    pub endpoint: Endpoint,
    /// What every data-plane session is opened with (probes' pools too).
    session: SessionSettings,
}

impl Database {
    /// Connects both planes, retrying what may pass (refused, timed out, starting up, failing
    /// over) with back-off for up to `database.startup_timeout`: a pod starting during a
    /// failover waits it out instead of failing its Job. What a retry cannot fix (a refused
    /// login, an unknown database, a bad URL) is reported at once.
    pub async fn connect(
        database: &DatabaseSettings,
        session: &SessionSettings,
    ) -> Result<Database, DatabaseUnreachable> {
        let started = Instant::now();
        let budget = database.startup_timeout;
        let mut wait = STARTUP_BACKOFF.0;
        let mut attempts = 1u32;
        loop {
            let failure = match Self::connect_once(database, session).await {
                Ok(db) => return Ok(db),
                Err(failure) => failure,
            };
            let redacted_url = redacted(&database.url);
            let spent = started.elapsed();
            let left = budget.saturating_sub(spent);
            if !failure.retryable || left.is_zero() {
                let tried = if failure.retryable {
                    format!(
                        " (gave up after {attempts} attempts in {}, database.startup_timeout {})",
                        humantime::format_duration(Duration::from_secs(spent.as_secs())),
                        humantime::format_duration(budget)
                    )
                } else {
                    String::new()
                };
                return Err(DatabaseUnreachable {
                    url: redacted_url,
                    reason: failure.reason,
                    retryable: failure.retryable,
                    hint: format!("{tried}{}", url_source_hint()),
                });
            }
            tracing::warn!(
                database = %redacted_url,
                error = %failure.reason,
                retry_in = %humantime::format_duration(wait.min(left)),
                attempt = attempts,
                "cannot connect to the database; retrying (database.startup_timeout)"
            );
            // The last try comes at the deadline, not a back-off step before it.
            tokio::time::sleep(wait.min(left)).await;
            wait = (wait * 2).min(STARTUP_BACKOFF.1);
            attempts += 1;
        }
    }

    /// One attempt at both planes, with the same TLS settings; it opens one connection on
    /// each, so an unreachable database, a refused login or a certificate that does not
    /// verify is reported now, with its reason, rather than by the first batch.
    async fn connect_once(
        database: &DatabaseSettings,
        session: &SessionSettings,
    ) -> Result<Database, ConnectFailure> {
        let url = &database.url;
        let final_failure = |reason: String| ConnectFailure {
            reason,
            retryable: false,
        };
        let timeout = database.connect_timeout;
        let timed_out = || ConnectFailure {
            reason: format!(
                "no answer within database.connect_timeout ({})",
                humantime::format_duration(timeout)
            ),
            retryable: true,
        };
        let endpoint = Endpoint::parse(url).map_err(|e| final_failure(e.to_string()))?;
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| final_failure(e.to_string()))?;
        // The queue's sessions parse and print keys too (slice bounds): pinned like the
        // data plane's, whatever the role's settings.
        let options = with_tls_of(options, &endpoint)
            .application_name("backfilld-control")
            .options(pinned_startup_settings());
        // One plain attempt first: a pool retries until its timeout and then says only
        // that it timed out, hiding why (refused, wrong password, bad certificate).
        let probe = tokio::time::timeout(timeout, PgConnection::connect_with(&options))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                let retryable = match &e {
                    sqlx::Error::Database(db) => {
                        connect_error_is_retryable(db.code().as_deref(), db.message())
                    }
                    // A certificate or URL problem stays one. rustls reports a certificate
                    // it refuses as invalid data on the socket.
                    sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => false,
                    sqlx::Error::Io(io) => io.kind() != std::io::ErrorKind::InvalidData,
                    _ => true,
                };
                ConnectFailure {
                    reason: e.to_string(),
                    retryable,
                }
            })?;
        let _ = probe.close().await;
        // Four for claims, heartbeats and probes, one the daemon keeps listening for
        // queue changes.
        let control = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(timeout)
            .connect_lazy_with(options);
        let data = endpoint
            .pool(session)
            .map_err(|e| final_failure(e.to_string()))?;
        let first = data.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Timeout(_) => timed_out(),
            deadpool_postgres::PoolError::Backend(e) => ConnectFailure {
                retryable: connect_error_is_retryable(
                    e.code().map(|code| code.code()),
                    &e.to_string(),
                ),
                reason: format!("data plane: {}", error_chain(&e)),
            },
            other => ConnectFailure {
                reason: format!("data plane: {}", error_chain(&other)),
                retryable: true,
            },
        })?;
        drop(first); // back into the pool
        Ok(Database {
            control,
            data,
            redacted_url: redacted(url),
            endpoint,
            session: session.clone(),
        })
    }

    /// Refuses to run blind: PostgreSQL shows a role without `pg_read_all_stats` (part of
    /// `pg_monitor`) NULL positions in `pg_stat_replication` and NULL wait events for other
    /// roles' sessions in `pg_stat_activity`, so the lag probe would see no standby and the
    /// lock probe no blocked session, and the throttle would never hold. With
    /// `throttle.allow_blind` it only warns.
    pub async fn check_probes_can_see(&self, allow_blind: bool) -> anyhow::Result<()> {
        let (role, reads_all_stats, hidden_standbys, superuser): (String, bool, i64, bool) =
            sqlx::query_as(
                "SELECT current_user::text, pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'), \
                        (SELECT count(*) FROM pg_stat_replication WHERE state IS NULL), \
                        (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            )
            .fetch_one(&self.control)
            .await
            .context("checking what the health probes can see")?;
        if superuser {
            // Jobs run as their engineers (SET LOCAL ROLE), but SQL can reset the role
            // within its own statement: the daemon's role is what it would reach.
            tracing::warn!(
                role = %role,
                "the daemon's role is a superuser: an engineer's SQL that resets its role would run as one; \
                 give the daemon a role of its own (README, \"Least privilege\")"
            );
        }
        if reads_all_stats && hidden_standbys == 0 {
            return Ok(());
        }
        let blind = format!(
            "role {role} cannot see other sessions' statistics (it has neither pg_monitor nor \
             pg_read_all_stats): pg_stat_replication hides standby positions from it \
             (standbys hidden from it now: {hidden_standbys}) and pg_stat_activity hides other sessions' \
             lock waits, so the replication-lag and lock probes are blind"
        );
        if !allow_blind {
            return Err(ProbesBlind(blind).into());
        }
        tracing::warn!(
            "{blind}; running anyway (throttle.allow_blind = true): only batch duration and \
             max_rows_per_second slow the backfill down"
        );
        Ok(())
    }

    /// The batch runner on the data-plane pool.
    pub fn batch_runner(&self, batch: &BatchSettings) -> BatchRunner {
        let backoff = RetryBackoff {
            base: batch.retry_backoff,
            max: batch.retry_backoff_max,
        };
        BatchRunner::new(self.data.clone(), backoff).cancelling_over(&self.endpoint)
    }

    /// The application_name of our data-plane sessions: how probes recognise them.
    pub fn data_plane_application_name(&self) -> &str {
        &self.session.application_name
    }

    /// A one-connection data-plane pool to `url` (a replica), for a probe of its own.
    pub fn probe_pool(&self, url: &str) -> anyhow::Result<deadpool_postgres::Pool> {
        Ok(Endpoint::parse(url)?.probe_pool(&self.probe_session())?)
    }

    /// A one-connection data-plane pool to the database, for a probe of its own.
    pub fn primary_probe_pool(&self) -> anyhow::Result<deadpool_postgres::Pool> {
        Ok(self.endpoint.probe_pool(&self.probe_session())?)
    }

    fn probe_session(&self) -> SessionSettings {
        SessionSettings {
            pool_size: 1,
            ..self.session.clone()
        }
    }
}

/// sqlx options carrying the TLS decisions the data plane made for the same URL, so
/// both planes encrypt and verify alike (`require` with `sslrootcert` verifies the chain,
/// as in libpq).
fn with_tls_of(options: PgConnectOptions, endpoint: &Endpoint) -> PgConnectOptions {
    let mode = match endpoint.ssl_mode() {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require if endpoint.root_cert().is_some() => PgSslMode::VerifyCa,
        SslMode::Require => PgSslMode::Require,
        SslMode::VerifyCa => PgSslMode::VerifyCa,
        SslMode::VerifyFull => PgSslMode::VerifyFull,
    };
    match endpoint.root_cert() {
        Some(root_cert) => options.ssl_mode(mode).ssl_root_cert(root_cert),
        None => options.ssl_mode(mode),
    }
}
