//! Every statement on the `backfill` schema (jobs, failed rows, throttles, undo, status, migrations),
//! written once: the control plane (sqlx) and the data plane (tokio-postgres) must agree on
//! them to the letter, and a reader finds the whole queue protocol in one file. Statements
//! the data plane derives from a job's own table (key queries, undo capture) are built
//! there, taking their `backfill.*` parts ([`retry_eligible`], [`not_failed`]) from here.
//!
//! Fenced statements take the job's id as `$1` and its lease token as `$2` (see
//! [`crate::lease`]): a write by a worker whose lease is gone changes no row.

/// The columns of `backfill.jobs` a claimed job is read with, aliased `j` (a slice takes
/// its breaker limits from its job). A macro so that statements can be `concat!`ed.
macro_rules! job_columns {
    () => {
        "j.id, j.name, j.table_name, j.key_column, j.batch_sql, \
         j.pending_predicate, j.check_predicate, j.batch_size, j.min_batch_size, j.max_batch_size, \
         j.target_batch_ms, j.max_rows_per_second, j.max_attempts, j.state, j.phase, j.checkpoint, \
         j.rows_done, j.batches_done, j.rows_total_estimate, j.verify_sweeps, j.started_at, \
         j.parallelism, j.parent_id, j.lower_key, j.upper_key, j.enqueued_by::text AS enqueued_by, \
         j.search_path, \
         coalesce(j.breaker_failed_share, (SELECT p.breaker_failed_share FROM backfill.jobs p WHERE p.id = j.parent_id)) \
             AS breaker_failed_share, \
         coalesce(j.breaker_failed_rows, (SELECT p.breaker_failed_rows FROM backfill.jobs p WHERE p.id = j.parent_id)) \
             AS breaker_failed_rows, \
         j.keep_undo, j.undo_columns"
    };
}

/// The job's tuning columns as a heartbeat reads them back (a live retune), aliased `j`;
/// a slice takes its breaker limits from its job.
macro_rules! tunable_columns {
    () => {
        "j.batch_size, j.min_batch_size, j.max_batch_size, \
         j.target_batch_ms, j.max_rows_per_second, j.max_attempts, j.priority, \
         coalesce(j.breaker_failed_share, (SELECT p.breaker_failed_share \
             FROM backfill.jobs p WHERE p.id = j.parent_id)) AS breaker_failed_share, \
         coalesce(j.breaker_failed_rows, (SELECT p.breaker_failed_rows \
             FROM backfill.jobs p WHERE p.id = j.parent_id)) AS breaker_failed_rows, \
         backfill.job_in_window(j.id) AS in_window"
    };
}

/// The columns of `backfill.jobs` a claimed job is read with, aliased `j`.
pub const JOB_COLUMNS: &str = job_columns!();

/// The job's tuning columns as a heartbeat reads them, aliased `j`.
pub const TUNABLE_COLUMNS: &str = tunable_columns!();

// ---- Enqueue -------------------------------------------------------------------------

/// Enqueues a job exactly as an engineer's INSERT would (the same triggers validate it):
/// the spec `$1`–`$6`, the tunables `$7`–`$12`, priority, not_before, parallelism.
pub const ENQUEUE: &str = "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, \
         check_predicate, batch_size, min_batch_size, max_batch_size, target_batch_ms, \
         max_rows_per_second, max_attempts, priority, not_before, parallelism) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, coalesce($13, 0), coalesce($14, now()), \
             coalesce($15, 1)) \
     RETURNING id";

// ---- Claims and leases ---------------------------------------------------------------

/// Claims the next runnable job: `$1` the new token, `$2` the worker id, `$3` the lease in
/// milliseconds, `$4` the jobs this process drives now, `$5` this process.
pub const CLAIM: &str = concat!(
    "WITH next AS ( \
         SELECT q.id FROM backfill.jobs q \
          WHERE q.state IN ('pending', 'running') AND q.not_before <= now() \
            AND backfill.job_in_window(q.id) \
            AND (q.lease_expires_at IS NULL OR q.lease_expires_at < now() \
                 OR (q.leased_instance = $5 AND q.id <> ALL($4))) \
            AND NOT EXISTS (SELECT 1 FROM backfill.jobs c WHERE c.parent_id = q.id \
                               AND c.state IN ('pending', 'running', 'paused')) \
          ORDER BY q.priority DESC, q.created_at, q.parent_id NULLS FIRST, q.id \
          LIMIT 1 FOR UPDATE SKIP LOCKED) \
     UPDATE backfill.jobs j \
        SET state = 'running', lease_token = $1, leased_by = $2, leased_instance = $5, \
            lease_expires_at = now() + $3 * interval '1 millisecond', heartbeat_at = now(), \
            started_at = coalesce(j.started_at, now()), updated_at = now(), \
            throttle_state = NULL, throttle_reason = NULL \
       FROM next WHERE j.id = next.id \
     RETURNING ",
    job_columns!()
);

/// Extends the lease (fenced; `$3` milliseconds) and publishes progress (`$4`–`$8`),
/// skipping a row our own batch has locked; returns the tunables.
pub const HEARTBEAT: &str = concat!(
    "WITH mine AS ( \
         SELECT id FROM backfill.jobs \
          WHERE id = $1 AND lease_token = $2 AND state = 'running' \
          FOR NO KEY UPDATE SKIP LOCKED) \
     UPDATE backfill.jobs j \
        SET lease_expires_at = now() + $3 * interval '1 millisecond', heartbeat_at = now(), \
            rows_per_second = $4, current_batch_size = $5, throttle_state = $6, \
            throttle_reason = $7, recent_rows_per_second = $8, updated_at = now() \
       FROM mine WHERE j.id = mine.id \
      RETURNING ",
    tunable_columns!()
);

/// A heartbeat whose row was busy: the tunables, if the lease is still ours, without a lock.
pub const HEARTBEAT_ROW_BUSY: &str = concat!(
    "SELECT ",
    tunable_columns!(),
    " FROM backfill.jobs j \
      WHERE j.id = $1 AND j.lease_token = $2 AND j.state = 'running'"
);

/// The job with id `$1`.
pub const JOB_BY_ID: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM backfill.jobs j WHERE j.id = $1"
);

/// The job named `$1`.
pub const JOB_BY_NAME: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM backfill.jobs j WHERE j.name = $1"
);

/// The state of job `$1`.
pub const STATE_OF: &str = "SELECT state FROM backfill.jobs WHERE id = $1";

/// Jobs and slices some worker is running now.
pub const RUNNING_JOBS: &str = "SELECT count(*) FROM backfill.jobs \
      WHERE state = 'running' AND lease_expires_at > now()";

/// Whether some job is pending, running or paused.
pub const HAS_UNFINISHED_WORK: &str =
    "SELECT EXISTS (SELECT 1 FROM backfill.jobs WHERE state IN ('pending', 'running', 'paused'))";

/// Gives the job back without finishing it (shutdown).
pub const RELEASE: &str = "UPDATE backfill.jobs \
        SET lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
            throttle_state = NULL, throttle_reason = NULL, rows_per_second = NULL, recent_rows_per_second = NULL, updated_at = now() \
      WHERE id = $1 AND lease_token = $2";

/// Ends the job in state `$3` with `last_error` `$4` and lets go of it.
pub const FINISH: &str = "UPDATE backfill.jobs \
        SET state = $3, last_error = $4, finished_at = now(), lease_token = NULL, \
            leased_by = NULL, lease_expires_at = NULL, throttle_state = NULL, \
            throttle_reason = NULL, rows_per_second = NULL, recent_rows_per_second = NULL, updated_at = now() \
      WHERE id = $1 AND lease_token = $2";

/// Records the rows the job is expected to touch in all (`$3`).
pub const SET_TOTAL_ESTIMATE: &str =
    "UPDATE backfill.jobs SET rows_total_estimate = $3, updated_at = now() \
      WHERE id = $1 AND lease_token = $2";

/// Fixes the last key (`$3`) of the pass a whole job starts.
pub const FIX_PASS_BOUND: &str = "UPDATE backfill.jobs SET upper_key = $3, updated_at = now() \
      WHERE id = $1 AND lease_token = $2 AND state = 'running' AND parent_id IS NULL";

/// Gives a job that cannot progress back for `$3` milliseconds, saying why (`$4`).
pub const REST: &str = "UPDATE backfill.jobs \
        SET state = 'pending', lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
            leased_instance = NULL, throttle_state = 'holding', throttle_reason = 'stuck', \
            rows_per_second = NULL, recent_rows_per_second = NULL, last_error = $4, \
            not_before = now() + $3 * interval '1 millisecond', updated_at = now() \
      WHERE id = $1 AND lease_token = $2 AND state = 'running'";

/// Gives a job whose run windows are all closed back, holding.
pub const REST_OUTSIDE_WINDOW: &str = "UPDATE backfill.jobs \
        SET state = 'pending', lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
            leased_instance = NULL, throttle_state = 'holding', throttle_reason = 'window', \
            rows_per_second = NULL, recent_rows_per_second = NULL, updated_at = now() \
      WHERE id = $1 AND lease_token = $2 AND state = 'running'";

/// Pauses the job on the daemon's own verdict, saying why (`$3`).
pub const PAUSE_FOR: &str = "UPDATE backfill.jobs \
        SET state = 'paused', lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
            throttle_state = NULL, throttle_reason = NULL, rows_per_second = NULL, recent_rows_per_second = NULL, \
            last_error = $3, updated_at = now() \
      WHERE id = $1 AND lease_token = $2 AND state = 'running'";

/// Moves the job to phase `$3`; a verify pass restarts from the first key.
pub const ENTER_PHASE: &str = "UPDATE backfill.jobs \
        SET phase = $3, \
            checkpoint = CASE WHEN $3 = 'verify' THEN NULL ELSE checkpoint END, \
            upper_key = CASE WHEN $3 = 'verify' AND parent_id IS NULL THEN NULL ELSE upper_key END, \
            verify_sweeps = verify_sweeps + CASE WHEN $3 = 'verify' THEN 1 ELSE 0 END, \
            updated_at = now() \
      WHERE id = $1 AND lease_token = $2";

// ---- One batch's commit (data plane) -------------------------------------------------

/// Advances the checkpoint (`$3`, NULL: unchanged), counters (`$4` rows) and the lease
/// (`$5` milliseconds) of a batch, fenced by the lease and the upper key it used (`$6`);
/// no row: the batch must roll back. Returns the batch's transaction.
pub const FENCE_BATCH: &str = "UPDATE backfill.jobs \
       SET checkpoint = coalesce($3, checkpoint), rows_done = rows_done + $4, \
           batches_done = batches_done + 1, \
           lease_expires_at = greatest(lease_expires_at, now() + $5::int8 * interval '1 millisecond'), \
           heartbeat_at = now(), updated_at = now(), last_error = NULL \
     WHERE id = $1 AND lease_token = $2 AND state = 'running' \
       AND upper_key IS NOT DISTINCT FROM $6 \
     RETURNING txid_current()";

// ---- Failed rows ---------------------------------------------------------------------

/// Records failed keys of job `$1`: keys, reasons, SQLSTATEs, messages (`$2`–`$5`), the
/// retry backoff's base and maximum in milliseconds (`$6`, `$7`).
pub const RECORD_FAILED: &str = "INSERT INTO backfill.failed_rows AS f (job_id, key, reason, sqlstate, message, next_attempt_at) \
     SELECT $1, k, r, s, m, now() + $6::int8 * interval '1 millisecond' \
       FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS u(k, r, s, m) \
     ON CONFLICT (job_id, key) DO UPDATE \
       SET attempts = f.attempts + 1, reason = excluded.reason, sqlstate = excluded.sqlstate, \
           message = excluded.message, last_failed_at = now(), \
           next_attempt_at = now() + least($6::int8 * power(2, f.attempts), $7::int8) * interval '1 millisecond'";

/// Forgets the keys `$2` of job `$1` (retried and applied, or their rows gone).
pub const FORGET_FAILED: &str =
    "DELETE FROM backfill.failed_rows WHERE job_id = $1 AND key = ANY($2::text[])";

/// Rows of job `$1` in `backfill.failed_rows`.
pub const FAILED_ROW_COUNT: &str = "SELECT count(*) FROM backfill.failed_rows WHERE job_id = $1";

/// When the next failed row of job `$1` is due for a retry (seconds, 0: now), or NULL when
/// none has attempts left (`$2`: the job's `max_attempts`).
pub fn failed_rows_due() -> String {
    format!(
        "SELECT CASE WHEN count(*) > 0 THEN greatest(extract(epoch FROM min(f.next_attempt_at) - now()), 0) END::float8 \
           FROM backfill.failed_rows f \
          WHERE f.job_id = $1 AND {}",
        retry_eligible(2)
    )
}

/// The filter for a key of alias `t` (quoted column `key`) that job `owner_id` has not
/// recorded as failed.
pub fn not_failed(owner_id: i64, key: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM backfill.failed_rows f WHERE f.job_id = {owner_id} AND f.key = t.{key}::text)"
    )
}

// ---- Slices -----------------------------------------------------------------

/// Gives a parent job back (fenced) as it is cut into slices, recording the rows they are estimated to hold (`$3`).
pub const CUT_RELEASE_PARENT: &str = "UPDATE backfill.jobs \
                SET lease_token = NULL, leased_by = NULL, lease_expires_at = NULL, \
                    rows_total_estimate = $3, updated_at = now() \
              WHERE id = $1 AND lease_token = $2 AND state = 'running'";

/// Name, state and last error of every slice of job `$1`, in slice order.
pub const SLICE_STATES: &str =
    "SELECT name, state, last_error FROM backfill.jobs WHERE parent_id = $1 ORDER BY slice_no";

/// Slices of job `$1` some worker is running now.
pub const ACTIVE_SLICES: &str = "SELECT count(*) FROM backfill.jobs \
              WHERE parent_id = $1 AND state = 'running' AND lease_expires_at > now()";

/// The running slice with the most rows left, if at least `$1`.
pub const STEAL_CANDIDATE: &str =
    "SELECT id AS slice_id, parent_id, coalesce(checkpoint, lower_key) AS after, upper_key, \
                    rows_total_estimate - rows_done AS remaining \
               FROM backfill.jobs \
              WHERE parent_id IS NOT NULL AND state = 'running' AND phase = 'scan' \
                AND lease_expires_at > now() AND rows_total_estimate - rows_done >= $1 \
              ORDER BY remaining DESC LIMIT 1";

/// The upper key of slice `$1`.
pub const SLICE_UPPER_KEY: &str = "SELECT upper_key FROM backfill.jobs WHERE id = $1";

/// Shrinks slice `$1` to end at `$2` (a key of type `key_type`) and moves `$4` rows of its
/// estimate away, provided its upper key is still `$3` and its checkpoint below `$2`.
pub fn shrink_slice(key_type: &str) -> String {
    format!(
        "UPDATE backfill.jobs \
                SET upper_key = $2, rows_total_estimate = rows_total_estimate - $4, updated_at = now() \
              WHERE id = $1 AND state = 'running' AND upper_key IS NOT DISTINCT FROM $3 \
                AND (coalesce(checkpoint, lower_key) IS NULL \
                     OR coalesce(checkpoint, lower_key)::{key_type} < $2::text::{key_type}) \
                AND ($3::text IS NULL OR $2::text::{key_type} < $3::text::{key_type})"
    )
}

/// Adds slices of job `$1`, one per lower key, upper key and estimate (`$2`–`$4`), numbered after those it has and copying its definition.
pub const ADD_SLICES: &str = "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, \
             check_predicate, batch_size, min_batch_size, max_batch_size, target_batch_ms, \
             max_rows_per_second, max_attempts, priority, not_before, created_at, \
             parent_id, slice_no, lower_key, upper_key, rows_total_estimate, enqueued_by, search_path, \
             keep_undo, undo_columns) \
         SELECT p.name || '#' || (n.taken + s.n), p.table_name, p.key_column, p.batch_sql, \
                p.pending_predicate, p.check_predicate, p.batch_size, p.min_batch_size, \
                p.max_batch_size, p.target_batch_ms, p.max_rows_per_second, p.max_attempts, \
                p.priority, p.not_before, p.created_at, \
                p.id, n.taken + s.n, s.lower_key, s.upper_key, s.estimate, p.enqueued_by, p.search_path, \
                p.keep_undo, p.undo_columns \
           FROM backfill.jobs p, \
                (SELECT coalesce(max(slice_no), 0) AS taken FROM backfill.jobs WHERE parent_id = $1) n, \
                unnest($2::text[], $3::text[], $4::int8[]) WITH ORDINALITY AS s(lower_key, upper_key, estimate, n) \
          WHERE p.id = $1";

// ---- Events -----------------------------------------------------------------

/// Tells `backfill_events` listeners that job `$1` has been throttled (reason `$2`) for `$3` seconds.
pub const NOTIFY_THROTTLED: &str = "SELECT pg_notify('backfill_events', jsonb_build_object( \
                 'event', 'throttled', 'job', name, 'id', id, 'parent_id', parent_id, \
                 'old_state', state, 'new_state', state, 'worker', leased_by, 'last_error', NULL, \
                 'rows_done', rows_done, 'at', now(), 'reason', $2::text, \
                 'throttled_seconds', round($3::numeric, 1))::text) \
               FROM backfill.jobs WHERE id = $1";

/// The state and last error of the job named `$1`.
pub const OUTCOME_OF: &str = "SELECT state, last_error FROM backfill.jobs WHERE name = $1";

// ---- Status -----------------------------------------------------------------

/// Every job's row of `backfill.job_status` (or the one named `$1`), oldest first.
pub const JOB_STATUS: &str =
    "SELECT job_id, name, state, phase, table_name, rows_done, rows_remaining, \
                    percent::float8 AS percent, rows_per_second, \
                    extract(epoch FROM eta)::float8 AS eta_seconds, batch_size, throttle_state, \
                    throttle_reason, failed_rows, worker, last_heartbeat, last_error, priority, \
                    created_at, started_at, finished_at, run_windows, in_window, finish_by, \
                    recent_rows_per_second, forecast_finish, late, undo_rows, undo_bytes \
               FROM backfill.job_status \
              WHERE $1::text IS NULL OR name = $1 \
              ORDER BY created_at, job_id";

/// Jobs per state.
pub const COUNT_BY_STATE: &str = "SELECT state, count(*) FROM backfill.jobs GROUP BY state";

// ---- Undo data --------------------------------------------------------------

/// Enqueues a revert of job `$1` between keys `$2` and `$3`, forced or not (`$4`).
pub const REVERT: &str = "SELECT backfill.revert($1, $2, $3, force => $4)";

/// Drops the undo data of job `$1`.
pub const PURGE_UNDO: &str = "SELECT backfill.purge_undo($1)";

/// Drops the undo data of jobs finished more than `$1` milliseconds ago.
pub const PURGE_EXPIRED_UNDO: &str =
    "SELECT backfill.purge_expired_undo($1::int8 * interval '1 millisecond')";

/// Undo rows and bytes per job that has some.
pub const UNDO_SIZES: &str = "SELECT name, undo_rows, undo_bytes FROM backfill.job_status \
          WHERE undo_rows IS NOT NULL AND parent_id IS NULL ORDER BY name";

/// The rule for a failed row (aliased `f`) being eligible for a retry, with the job's
/// `max_attempts` as parameter `$n`: attempts left, and either an error (a verification
/// failure would compute the same disagreeing values again) or attempts reset to 0 by
/// `backfill.retry_failed()` after someone fixed the data or the job.
pub fn retry_eligible(max_attempts_param: u8) -> String {
    format!("f.attempts < ${max_attempts_param} AND (f.reason = 'error' OR f.attempts = 0)")
}

// ---- Health probe, gauges and schema checks ------------------------------------------

/// The tightest operator throttle in force on each running job or slice; a slice matches
/// through its parent's name too.
pub const OPERATOR_THROTTLES: &str = "SELECT j.id, min(t.ratio)::float8 \
   FROM backfill.throttles t \
   JOIN backfill.jobs j ON (j.state = 'running' OR j.id = $1) \
   LEFT JOIN backfill.jobs p ON p.id = j.parent_id \
  WHERE t.expires_at > now() AND (j.name LIKE t.job_pattern OR p.name LIKE t.job_pattern) \
  GROUP BY j.id";

/// Vacuums at work on running jobs' tables in this database; the table name resolves with
/// the probe's search_path, which is why jobs name it schema-qualified.
pub const VACUUMS_ON_JOB_TABLES: &str = "SELECT j.id, \
        bool_or(coalesce(a.query, '') LIKE '%(to prevent wraparound)%') \
   FROM pg_stat_progress_vacuum v \
   JOIN backfill.jobs j ON (j.state = 'running' OR j.id = $1) AND v.relid = to_regclass(j.table_name) \
   LEFT JOIN pg_stat_activity a ON a.pid = v.pid \
  WHERE v.datname = current_database() \
  GROUP BY j.id";

/// Dead-tuple ratio of running jobs' tables big enough to judge.
pub const DEAD_TUPLES_OF_JOB_TABLES: &str =
    "SELECT j.id, s.n_dead_tup::float8 / (s.n_live_tup + s.n_dead_tup) \
   FROM backfill.jobs j \
   JOIN pg_stat_all_tables s ON s.relid = to_regclass(j.table_name) \
  WHERE (j.state = 'running' OR j.id = $2) AND s.n_live_tup + s.n_dead_tup >= $1";

/// Running jobs' own throttle queries (a slice's from its parent), with who they run as.
pub const JOB_THROTTLE_QUERIES: &str =
    "SELECT j.id, coalesce(p.throttle_query, j.throttle_query), \
        coalesce(p.throttle_query_max, j.throttle_query_max), j.enqueued_by::text, \
        coalesce(j.search_path, '') \
   FROM backfill.jobs j LEFT JOIN backfill.jobs p ON p.id = j.parent_id \
  WHERE (j.state = 'running' OR j.id = $1) \
    AND coalesce(p.throttle_query, j.throttle_query) IS NOT NULL";

/// Rows the running jobs have committed in all (the canary's progress check).
pub const RUNNING_ROWS_DONE: &str =
    "SELECT coalesce(sum(rows_done), 0)::int8 FROM backfill.jobs WHERE state = 'running'";

/// Names of the failed jobs (`backfill_job_failed`).
pub const FAILED_JOB_NAMES: &str = "SELECT name FROM backfill.jobs WHERE state = 'failed'";

/// Forecasts, deadline margins and windows of unfinished whole jobs, for their gauges.
pub const JOB_STEERING_GAUGES: &str =
    "SELECT name, extract(epoch FROM forecast_finish - now())::float8 AS forecast_seconds, \
                CASE WHEN forecast_finish IS NOT NULL OR now() > finish_by \
                     THEN extract(epoch FROM finish_by - greatest(forecast_finish, now()))::float8 \
                END AS deadline_margin_seconds, \
                coalesce(late, false) AS late, \
                coalesce(throttle_reason = 'window', false) AS outside_window, \
                coalesce(cardinality(run_windows) > 0, false) AS has_windows \
           FROM backfill.job_status \
          WHERE parent_id IS NULL AND state IN ('pending', 'running', 'paused')";

/// Whether schema `backfill` is installed, and whether this session may read its
/// migration history.
pub const SCHEMA_INSTALLED: &str = "SELECT to_regclass('backfill.jobs') IS NOT NULL, \
                coalesce(has_table_privilege(to_regclass('backfill._sqlx_migrations'), 'SELECT'), false)";

/// The latest migration applied successfully (none: never installed).
pub const LATEST_MIGRATION: &str =
    "SELECT max(version) FROM backfill._sqlx_migrations WHERE success \
         AND to_regclass('backfill._sqlx_migrations') IS NOT NULL";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_rule_names_its_parameter() {
        assert_eq!(
            retry_eligible(2),
            "f.attempts < $2 AND (f.reason = 'error' OR f.attempts = 0)"
        );
    }
}
