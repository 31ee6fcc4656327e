-- Scale-out: a job with parallelism > 1 is cut into key-range slices. A slice is
-- a job of its own (same definition, a parent and a key range), so it is
-- claimed, leased, fenced, checkpointed and stopped exactly like any job. The
-- parent waits until its slices are done, then retries failed rows and verifies
-- the whole table itself.

ALTER TABLE backfill.jobs
    ADD COLUMN parallelism integer NOT NULL DEFAULT 1,
    ADD COLUMN parent_id   bigint REFERENCES backfill.jobs (id) ON DELETE CASCADE,
    ADD COLUMN slice_no    integer,
    -- The slice's keys: above lower_key (exclusive, NULL = from the first key) up to
    -- upper_key (inclusive, NULL = to the last key), in the key column's text form.
    ADD COLUMN lower_key   text,
    ADD COLUMN upper_key   text,
    ADD CONSTRAINT jobs_parallelism_range CHECK (parallelism BETWEEN 1 AND 256),
    ADD CONSTRAINT jobs_slice_has_parent CHECK ((parent_id IS NULL) = (slice_no IS NULL));

CREATE INDEX jobs_parent ON backfill.jobs (parent_id) WHERE parent_id IS NOT NULL;

-- Steering a sliced job steers its slices too.
CREATE OR REPLACE FUNCTION backfill.pause(job_name text) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    job backfill.jobs := backfill.job_named(job_name);
BEGIN
    IF job.state NOT IN ('pending', 'running', 'paused') THEN
        RAISE EXCEPTION 'job % is %; only pending or running jobs can be paused', quote_literal(job_name), job.state
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE backfill.jobs
       SET state = 'paused', lease_token = NULL, leased_by = NULL, lease_expires_at = NULL,
           throttle_state = NULL, throttle_reason = NULL, updated_at = now()
     WHERE id = job.id OR (parent_id = job.id AND state IN ('pending', 'running'));
    PERFORM backfill.notify_control(job_name);
    RETURN 'paused';
END
$fn$;

CREATE OR REPLACE FUNCTION backfill.resume(job_name text) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    job backfill.jobs := backfill.job_named(job_name);
BEGIN
    IF job.state NOT IN ('paused', 'pending', 'running') THEN
        RAISE EXCEPTION 'job % is %; only paused jobs can be resumed', quote_literal(job_name), job.state
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE backfill.jobs SET state = 'pending', updated_at = now()
     WHERE state = 'paused' AND (id = job.id OR parent_id = job.id);
    IF job.state = 'paused' THEN
        PERFORM backfill.notify_control(job_name);
    END IF;
    RETURN CASE WHEN job.state = 'paused' THEN 'pending' ELSE job.state END;
END
$fn$;

CREATE OR REPLACE FUNCTION backfill.cancel(job_name text) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    job backfill.jobs := backfill.job_named(job_name);
BEGIN
    IF job.state IN ('succeeded', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'job % is already %', quote_literal(job_name), job.state
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE backfill.jobs
       SET state = 'cancelled', lease_token = NULL, leased_by = NULL, lease_expires_at = NULL,
           throttle_state = NULL, throttle_reason = NULL, finished_at = now(), updated_at = now()
     WHERE id = job.id OR (parent_id = job.id AND state NOT IN ('succeeded', 'failed', 'cancelled'));
    PERFORM backfill.notify_control(job_name);
    RETURN 'cancelled';
END
$fn$;

-- A sliced job's status sums its slices; each slice has a row of its own too.
DROP VIEW backfill.job_status;
CREATE VIEW backfill.job_status AS
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
           max(c.current_batch_size) AS slice_batch_size
      FROM backfill.jobs j
      LEFT JOIN backfill.jobs c ON c.parent_id = j.id
     GROUP BY j.id
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
       coalesce(j.throttle_state, p.slice_throttle_state) AS throttle_state,
       coalesce(j.throttle_reason, p.slice_throttle_reason) AS throttle_reason,
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
       p.slices_running
  FROM backfill.jobs j
  JOIN progress p ON p.id = j.id;

-- parallelism is checked with a message naming it (the CHECK above is the backstop).
CREATE FUNCTION backfill.validate_parallelism() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.parallelism IS NULL OR NEW.parallelism < 1 OR NEW.parallelism > 256 THEN
        RAISE EXCEPTION 'parallelism must be between 1 and 256, got %', coalesce(NEW.parallelism::text, 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_validate_parallelism
    BEFORE INSERT OR UPDATE OF parallelism ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.validate_parallelism();
