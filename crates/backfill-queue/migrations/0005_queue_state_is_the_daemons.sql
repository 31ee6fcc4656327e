-- Trust: a job runs as the role that enqueued it, the queue's state is the daemon's
-- alone, and the definition a job reports is the definition it ran.
--
-- "The daemon" is whoever owns backfill.jobs (the role that ran `migrate`) or is a
-- member of that role (superusers are members of every role). Everyone else is an
-- engineer: they enqueue, retune and steer, and the triggers below refuse every other
-- change, whatever grants they hold.

ALTER TABLE backfill.jobs
    -- The role that enqueued the job: its statement and predicates run as this role.
    ADD COLUMN enqueued_by name,
    -- The enqueuing session's resolved search_path: the job's SQL runs with it.
    ADD COLUMN search_path text,
    -- The process holding the lease (one per daemon run): a restart or a second pod
    -- with the same worker.id is another instance and never takes a live lease back.
    ADD COLUMN leased_instance uuid;

-- Jobs enqueued before this migration ran as the daemon's role; they keep doing so.
UPDATE backfill.jobs SET enqueued_by = current_user WHERE enqueued_by IS NULL;
ALTER TABLE backfill.jobs ALTER COLUMN enqueued_by SET NOT NULL;

COMMENT ON COLUMN backfill.jobs.enqueued_by IS 'The role that enqueued the job; batch_sql and the predicates run as it (SET LOCAL ROLE).';
COMMENT ON COLUMN backfill.jobs.search_path IS 'The search_path resolved when the job was enqueued; the job''s SQL runs with it.';

-- True when the current role may write queue state: the owner of backfill.jobs (the
-- daemon) or a member of it. Inside the SECURITY DEFINER steering functions the
-- current role is their owner, so steering passes too.
CREATE FUNCTION backfill.is_daemon() RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    SELECT pg_has_role(current_user, c.relowner, 'MEMBER')
      FROM pg_class c
     WHERE c.oid = 'backfill.jobs'::regclass
$fn$;

-- The columns engineers may set: the definition (INSERT, and UPDATE while the job is
-- not running) and the tunables (any time). Everything else is queue state.
CREATE FUNCTION backfill.engineer_columns() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT ARRAY['name', 'table_name', 'key_column', 'batch_sql', 'pending_predicate',
                 'check_predicate', 'parallelism',
                 'batch_size', 'min_batch_size', 'max_batch_size', 'target_batch_ms',
                 'max_rows_per_second', 'max_attempts', 'priority', 'not_before',
                 'updated_at', 'created_at', 'id',
                 'enqueued_by', 'search_path']
$fn$;

-- Refuses queue state written by anyone but the daemon, and records who enqueued a job
-- and with which search_path.
CREATE FUNCTION backfill.guard_job_row() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    -- A job as an INSERT must leave it: everything else at its default.
    fresh constant jsonb := '{"state": "pending", "phase": "scan", "rows_done": 0,
                              "batches_done": 0, "verify_sweeps": 0}';
    offending text;
BEGIN
    IF TG_OP = 'INSERT' AND (NEW.parent_id IS NULL OR NOT backfill.is_daemon()) THEN
        -- Whoever inserts a job is who it runs as; a slice (the daemon's) copies its parent.
        NEW.enqueued_by := current_user;
        NEW.search_path := coalesce(
            (SELECT string_agg(quote_ident(s), ', ' ORDER BY o)
               FROM unnest(current_schemas(false)) WITH ORDINALITY AS p(s, o)), '');
    END IF;
    IF backfill.is_daemon() THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT string_agg(key, ', ' ORDER BY key) INTO offending
          FROM jsonb_each(to_jsonb(NEW))
         WHERE key <> ALL (backfill.engineer_columns())
           AND value IS DISTINCT FROM coalesce(fresh -> key, 'null'::jsonb);
        IF offending IS NOT NULL THEN
            RAISE EXCEPTION 'backfill.jobs: % set by backfilld alone; leave it out of the INSERT', offending
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Enqueue with the definition and tuning columns only (see README).';
        END IF;
        RETURN NEW;
    END IF;
    SELECT string_agg(n.key, ', ' ORDER BY n.key) INTO offending
      FROM jsonb_each(to_jsonb(NEW)) n
     WHERE (n.key <> ALL (backfill.engineer_columns()) OR n.key IN ('id', 'created_at', 'enqueued_by', 'search_path'))
       AND n.value IS DISTINCT FROM (to_jsonb(OLD) -> n.key);
    IF offending IS NOT NULL THEN
        RAISE EXCEPTION 'backfill.jobs: % of job % is queue state, changed by backfilld alone', offending, quote_literal(OLD.name)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Steer with backfill.pause, resume, cancel and retry_failed; tune with the tuning columns.';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_guard
    BEFORE INSERT OR UPDATE ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.guard_job_row();

-- A job's definition may change only while no worker runs it: a running job would
-- otherwise report the old definition's progress, or its success, under the new one.
-- A change to a job that has started starts it over (checkpoint, counters, failed
-- rows and slices of the old definition go); a renaming alone keeps its progress.
CREATE FUNCTION backfill.check_definition_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF (NEW.table_name, NEW.key_column, NEW.batch_sql, NEW.pending_predicate, NEW.check_predicate,
        NEW.parallelism, NEW.name)
       IS NOT DISTINCT FROM
       (OLD.table_name, OLD.key_column, OLD.batch_sql, OLD.pending_predicate, OLD.check_predicate,
        OLD.parallelism, OLD.name)
    THEN
        RETURN NEW;
    END IF;
    IF OLD.parent_id IS NOT NULL THEN
        RAISE EXCEPTION 'job % is a slice of another job: change that job''s definition (paused) instead', quote_literal(OLD.name)
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF OLD.state = 'running' OR (OLD.state = 'pending' AND OLD.started_at IS NOT NULL) THEN
        RAISE EXCEPTION 'job % is %: its definition cannot change while it runs; select backfill.pause(%) first',
            quote_literal(OLD.name), CASE WHEN OLD.state = 'running' THEN 'running' ELSE 'under way' END, quote_literal(OLD.name)
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF OLD.state IN ('succeeded', 'cancelled') THEN
        RAISE EXCEPTION 'job % has %: its definition is what it ran; enqueue a new job instead', quote_literal(OLD.name), OLD.state
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_definition_change
    BEFORE UPDATE OF table_name, key_column, batch_sql, pending_predicate, check_predicate, parallelism, name
    ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.check_definition_change();

-- A paused or failed job whose definition changed starts over from the first key, and
-- what the old definition left behind goes: progress, failed keys, slices. As the daemon
-- (the progress columns are queue state), after the engineer's UPDATE.
CREATE FUNCTION backfill.forget_old_definition() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    UPDATE backfill.jobs
       SET phase = 'scan', checkpoint = NULL, upper_key = NULL, rows_done = 0, batches_done = 0,
           rows_total_estimate = NULL, verify_sweeps = 0, current_batch_size = NULL,
           last_error = NULL, updated_at = now()
     WHERE id = NEW.id;
    DELETE FROM backfill.failed_rows WHERE job_id = NEW.id;
    DELETE FROM backfill.jobs WHERE parent_id = NEW.id;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER jobs_forget_old_definition
    AFTER UPDATE OF table_name, key_column, batch_sql, pending_predicate, check_predicate, parallelism
    ON backfill.jobs
    FOR EACH ROW
    WHEN (OLD.started_at IS NOT NULL AND
          (NEW.table_name, NEW.key_column, NEW.batch_sql, NEW.pending_predicate, NEW.check_predicate, NEW.parallelism)
          IS DISTINCT FROM
          (OLD.table_name, OLD.key_column, OLD.batch_sql, OLD.pending_predicate, OLD.check_predicate, OLD.parallelism))
    EXECUTE FUNCTION backfill.forget_old_definition();

-- Failed keys are the daemon's record of what it could not apply: nobody else writes
-- them (retry_failed resets their attempts on the engineer's behalf).
CREATE FUNCTION backfill.guard_failed_rows() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT backfill.is_daemon() THEN
        RAISE EXCEPTION 'backfill.failed_rows is written by backfilld alone; select backfill.retry_failed(name) to retry a job''s failed rows'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$fn$;

CREATE TRIGGER failed_rows_guard
    BEFORE INSERT OR UPDATE OR DELETE ON backfill.failed_rows
    FOR EACH ROW EXECUTE FUNCTION backfill.guard_failed_rows();

-- More a definition must get right: a key that may be NULL cannot be walked in key
-- order (NULL sorts after every key and compares to none), and a rate limit must be a
-- number.
CREATE FUNCTION backfill.validate_key_and_rate() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    key_not_null boolean;
BEGIN
    SELECT a.attnotnull INTO key_not_null
      FROM pg_attribute a
     WHERE a.attrelid = to_regclass(NEW.table_name) AND a.attname = NEW.key_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT key_not_null THEN
        RAISE EXCEPTION 'key_column: column % of table % may be NULL; rows with a NULL key cannot be walked in key order (ALTER TABLE % ALTER COLUMN % SET NOT NULL)',
            quote_ident(NEW.key_column), NEW.table_name, NEW.table_name, quote_ident(NEW.key_column)
            USING ERRCODE = 'invalid_table_definition';
    END IF;
    IF NEW.max_rows_per_second IN ('NaN'::float8, 'Infinity'::float8) THEN
        RAISE EXCEPTION 'max_rows_per_second must be a positive number (or NULL for no limit), got %', NEW.max_rows_per_second
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_validate_key_and_rate
    BEFORE INSERT OR UPDATE OF table_name, key_column, max_rows_per_second ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.validate_key_and_rate();

-- Steering runs as the daemon on the caller's behalf (the caller needs EXECUTE, not
-- write access to queue state), with a search_path no caller can plant objects in.
ALTER FUNCTION backfill.job_named(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backfill.pause(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backfill.resume(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backfill.cancel(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backfill.retry_failed(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION backfill.job_named(text), backfill.pause(text), backfill.resume(text),
    backfill.cancel(text), backfill.retry_failed(text), backfill.forget_old_definition()
    FROM PUBLIC;
