-- The two definitions every new job column touches, in one place and once:
--
-- * Which columns engineers may set. Until now each migration that added one copied
--   backfill.engineer_columns() whole; from here on the list is a table, and a migration
--   that adds an engineer column adds a row (the guard triggers of 0005 read it).
-- * backfill.job_status, as issues 15-17 left it: run windows, deadline and forecast
--   (issue 16) and undo data (issue 17) appended after the columns it had, so it is
--   replaced, not dropped, and the grants operators gave on it stay.

CREATE TABLE backfill.engineer_column (
    column_name name PRIMARY KEY,
    -- Why engineers may set it: part of the definition, or a tunable.
    kind text NOT NULL CHECK (kind IN ('definition', 'tunable', 'identity'))
);

COMMENT ON TABLE backfill.engineer_column IS
    'Columns of backfill.jobs that engineers may set (backfill.engineer_columns()); every other column is queue state, the daemon''s alone.';

INSERT INTO backfill.engineer_column (column_name, kind) VALUES
    ('name', 'definition'), ('table_name', 'definition'), ('key_column', 'definition'),
    ('batch_sql', 'definition'), ('pending_predicate', 'definition'),
    ('check_predicate', 'definition'), ('parallelism', 'definition'),
    ('keep_undo', 'definition'), ('undo_columns', 'definition'),                 -- issue 17
    ('batch_size', 'tunable'), ('min_batch_size', 'tunable'), ('max_batch_size', 'tunable'),
    ('target_batch_ms', 'tunable'), ('max_rows_per_second', 'tunable'),
    ('max_attempts', 'tunable'), ('priority', 'tunable'), ('not_before', 'tunable'),
    ('throttle_query', 'tunable'), ('throttle_query_max', 'tunable'),           -- issue 15
    ('run_windows', 'tunable'), ('finish_by', 'tunable'),                       -- issue 16
    ('breaker_failed_share', 'tunable'), ('breaker_failed_rows', 'tunable'),    -- issue 16
    ('updated_at', 'identity'), ('created_at', 'identity'), ('id', 'identity'),
    ('enqueued_by', 'identity'), ('search_path', 'identity');

-- Read by the guard triggers in the writer's session: the definer's rights let an engineer
-- with the README's column grants (and no grant on the list) through.
CREATE OR REPLACE FUNCTION backfill.engineer_columns() RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT array_agg(column_name::text ORDER BY column_name) FROM backfill.engineer_column
$fn$;

-- job_status (0003's, with issue 16's and issue 17's columns appended).
CREATE OR REPLACE VIEW backfill.job_status AS
WITH progress AS (
    SELECT j.id,
           -- sum(bigint) is numeric: cast back so the view keeps its column types.
           (j.rows_done + coalesce(sum(c.rows_done), 0))::bigint AS rows_done,
           coalesce(j.rows_total_estimate, sum(c.rows_total_estimate)::bigint) AS rows_total,
           CASE WHEN count(c.id) = 0 THEN j.rows_per_second ELSE sum(c.rows_per_second) END AS rows_per_second,
           count(c.id) AS slices,
           count(c.id) FILTER (WHERE c.state = 'running' AND c.lease_token IS NOT NULL) AS slices_running,
           (array_agg(c.throttle_state ORDER BY c.throttle_state = 'holding' DESC, c.slice_no)
               FILTER (WHERE c.throttle_state IS NOT NULL))[1] AS slice_throttle_state,
           (array_agg(c.throttle_reason ORDER BY c.slice_no) FILTER (WHERE c.throttle_reason IS NOT NULL))[1]
               AS slice_throttle_reason,
           max(c.current_batch_size) AS slice_batch_size,
           -- issue 16: the recent rate, throttled time included, of the job or its slices.
           CASE WHEN count(c.id) = 0 OR j.state = 'running' THEN j.recent_rows_per_second
                ELSE sum(c.recent_rows_per_second) END AS recent_rows_per_second,
           -- issue 16: the windows of the job (a slice: its parent's), open now?
           backfill.in_window(coalesce(pj.run_windows, j.run_windows), now()) AS in_window,
           coalesce(pj.finish_by, j.finish_by) AS finish_by
      FROM backfill.jobs j
      LEFT JOIN backfill.jobs pj ON pj.id = j.parent_id
      LEFT JOIN backfill.jobs c ON c.parent_id = j.id
     GROUP BY j.id, pj.id
),
steering AS (  -- issue 16
    SELECT p.*,
           p.in_window = false AND j.state IN ('pending', 'running') AS resting_for_window,
           CASE WHEN j.state = 'succeeded' THEN j.finished_at
                WHEN j.state IN ('pending', 'running') AND p.recent_rows_per_second > 0
                THEN now() + make_interval(secs => round(greatest(p.rows_total - p.rows_done, 0) / p.recent_rows_per_second))
           END AS forecast_finish
      FROM progress p
      JOIN backfill.jobs j ON j.id = p.id
)
SELECT j.id AS job_id,
       j.name,
       j.state,
       j.phase,
       j.table_name,
       p.rows_done,
       CASE WHEN j.state = 'succeeded' THEN 0 ELSE greatest(p.rows_total - p.rows_done, 0) END AS rows_remaining,
       CASE WHEN j.state = 'succeeded' THEN 100.0
            WHEN p.rows_total > 0 THEN round(100.0 * least(p.rows_done, p.rows_total) / p.rows_total, 1)
       END AS percent,
       p.rows_per_second,
       CASE WHEN j.state = 'running' AND p.rows_per_second > 0
            THEN make_interval(secs => round(greatest(p.rows_total - p.rows_done, 0) / p.rows_per_second))
       END AS eta,
       coalesce(j.current_batch_size, p.slice_batch_size) AS batch_size,
       -- issue 16: outside its run windows a job holds for 'window', whoever last wrote the row.
       CASE WHEN p.resting_for_window THEN 'holding'
            WHEN j.throttle_reason = 'window' THEN NULL
            ELSE coalesce(j.throttle_state, p.slice_throttle_state) END AS throttle_state,
       CASE WHEN p.resting_for_window THEN 'window'
            WHEN j.throttle_reason = 'window' THEN NULL
            ELSE coalesce(j.throttle_reason, p.slice_throttle_reason) END AS throttle_reason,
       (SELECT count(*) FROM backfill.failed_rows f WHERE f.job_id = j.id) AS failed_rows,
       j.leased_by AS worker,
       j.heartbeat_at AS last_heartbeat,
       j.last_error,
       j.priority,
       j.created_at,
       j.started_at,
       j.finished_at,
       j.parent_id,
       j.slice_no,
       p.slices,
       p.slices_running,
       -- issue 16
       j.run_windows,
       p.in_window,
       p.finish_by,
       p.recent_rows_per_second,
       p.forecast_finish,
       CASE WHEN p.finish_by IS NULL THEN NULL
            WHEN j.state = 'succeeded' THEN j.finished_at > p.finish_by
            WHEN j.state IN ('failed', 'cancelled') THEN NULL
            ELSE now() > p.finish_by OR p.forecast_finish > p.finish_by
       END AS late,
       -- issue 17: the job's undo data (NULL for a job that keeps none and has none, and
       -- for a slice: its rows are its job's).
       CASE WHEN j.parent_id IS NULL AND (j.keep_undo OR us.rows > 0) THEN us.rows END AS undo_rows,
       CASE WHEN j.parent_id IS NULL AND (j.keep_undo OR us.rows > 0) THEN us.bytes END AS undo_bytes,
       j.reverts_job_id
  FROM backfill.jobs j
  JOIN steering p ON p.id = j.id
  -- issue 17: read with the view owner's rights (past the engineers' row policy): sizes only.
  CROSS JOIN LATERAL (
      SELECT count(*) AS rows,
             coalesce(sum(pg_column_size(u.key) + pg_column_size(u.old_values)), 0)::bigint AS bytes
        FROM backfill.undo u WHERE u.job_id = j.id) us;
