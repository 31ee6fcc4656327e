-- The backfill schema: the queue engineers INSERT into, the failed-rows table,
-- the status view and the steering functions. Every object is schema-qualified:
-- the migrator runs with search_path = backfill.

CREATE TABLE backfill.jobs (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                text NOT NULL UNIQUE,
    -- What to do (set by the engineer).
    table_name          text NOT NULL,
    key_column          text NOT NULL,
    batch_sql           text NOT NULL,
    pending_predicate   text,
    check_predicate     text,
    -- Tuning; NULL means "use the daemon's configured default".
    batch_size          integer,
    min_batch_size      integer,
    max_batch_size      integer,
    target_batch_ms     integer,
    max_rows_per_second double precision,
    max_attempts        integer,
    -- Scheduling: higher priority first, then older jobs first.
    priority            integer NOT NULL DEFAULT 0,
    not_before          timestamptz NOT NULL DEFAULT now(),
    -- Progress (written by workers, fenced by lease_token).
    state               text NOT NULL DEFAULT 'pending',
    phase               text NOT NULL DEFAULT 'scan',
    checkpoint          text,
    rows_done           bigint NOT NULL DEFAULT 0,
    batches_done        bigint NOT NULL DEFAULT 0,
    rows_total_estimate bigint,
    verify_sweeps       integer NOT NULL DEFAULT 0,
    current_batch_size  integer,
    rows_per_second     double precision,
    throttle_state      text,
    throttle_reason     text,
    -- The lease: whoever holds lease_token may write progress until lease_expires_at.
    lease_token         uuid,
    leased_by           text,
    lease_expires_at    timestamptz,
    heartbeat_at        timestamptz,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT jobs_state_known CHECK (state IN ('pending', 'running', 'paused', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT jobs_phase_known CHECK (phase IN ('scan', 'retry', 'verify'))
);

COMMENT ON TABLE backfill.jobs IS 'The backfill queue: enqueue a job with a plain INSERT (see README).';

-- Claims scan only runnable jobs, in claim order.
CREATE INDEX jobs_claim_order ON backfill.jobs (priority DESC, created_at, id)
    WHERE state IN ('pending', 'running');

CREATE TABLE backfill.failed_rows (
    job_id           bigint NOT NULL REFERENCES backfill.jobs (id) ON DELETE CASCADE,
    key              text NOT NULL,
    reason           text NOT NULL DEFAULT 'error',
    sqlstate         text,
    message          text NOT NULL,
    attempts         integer NOT NULL DEFAULT 1,
    first_failed_at  timestamptz NOT NULL DEFAULT now(),
    last_failed_at   timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, key),
    CONSTRAINT failed_rows_reason_known CHECK (reason IN ('error', 'verification'))
);

COMMENT ON TABLE backfill.failed_rows IS 'Rows a backfill could not apply, with the error; retried with backoff.';

-- Refuses a job definition the database can already tell is wrong, naming the
-- problem, and stores the table name schema-qualified so the daemon does not
-- depend on the inserting session's search_path.
CREATE FUNCTION backfill.validate_job() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    target      regclass;
    target_kind "char";
    key_attnum  smallint;
    key_type    text;
BEGIN
    IF NEW.name IS NULL OR btrim(NEW.name) = '' THEN
        RAISE EXCEPTION 'backfill job name must not be empty'
            USING ERRCODE = 'check_violation';
    END IF;

    BEGIN
        target := to_regclass(NEW.table_name);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'table_name % is not a valid table name: %', quote_literal(NEW.table_name), SQLERRM
            USING ERRCODE = 'invalid_name';
    END;
    IF target IS NULL THEN
        RAISE EXCEPTION 'table_name: table % does not exist', quote_literal(NEW.table_name)
            USING ERRCODE = 'undefined_table';
    END IF;
    SELECT c.relkind, format('%I.%I', n.nspname, c.relname)
      INTO target_kind, NEW.table_name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = target;
    IF target_kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'table_name: % is not a table', NEW.table_name
            USING ERRCODE = 'wrong_object_type';
    END IF;

    SELECT a.attnum, format_type(a.atttypid, a.atttypmod)
      INTO key_attnum, key_type
      FROM pg_attribute a
     WHERE a.attrelid = target AND a.attname = NEW.key_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_attnum IS NULL THEN
        RAISE EXCEPTION 'key_column: column % does not exist in table %', quote_literal(NEW.key_column), NEW.table_name
            USING ERRCODE = 'undefined_column';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i
         WHERE i.indrelid = target AND i.indisunique AND i.indisvalid
           AND i.indnkeyatts = 1 AND i.indkey[0] = key_attnum
           AND i.indpred IS NULL AND i.indexprs IS NULL)
    THEN
        RAISE EXCEPTION 'key_column: column % of table % has no unique index on it alone; batches need a unique, ordered key', quote_ident(NEW.key_column), NEW.table_name
            USING ERRCODE = 'invalid_table_definition';
    END IF;

    IF NEW.batch_sql IS NULL OR NEW.batch_sql !~ '(^|[^:A-Za-z0-9_]):(keys|first_key|last_key)([^A-Za-z0-9_]|$)' THEN
        RAISE EXCEPTION 'batch_sql uses none of :keys, :first_key, :last_key, so it cannot be limited to a batch'
            USING ERRCODE = 'syntax_error';
    END IF;

    IF NEW.batch_size <= 0 THEN
        RAISE EXCEPTION 'batch_size must be positive, got %', NEW.batch_size USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.min_batch_size <= 0 THEN
        RAISE EXCEPTION 'min_batch_size must be positive, got %', NEW.min_batch_size USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.max_batch_size <= 0 THEN
        RAISE EXCEPTION 'max_batch_size must be positive, got %', NEW.max_batch_size USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.target_batch_ms <= 0 THEN
        RAISE EXCEPTION 'target_batch_ms must be positive, got %', NEW.target_batch_ms USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.max_rows_per_second <= 0 THEN
        RAISE EXCEPTION 'max_rows_per_second must be positive (or NULL for no limit), got %', NEW.max_rows_per_second USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.max_attempts <= 0 THEN
        RAISE EXCEPTION 'max_attempts must be positive, got %', NEW.max_attempts USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.min_batch_size > NEW.max_batch_size THEN
        RAISE EXCEPTION 'min_batch_size (%) is greater than max_batch_size (%)', NEW.min_batch_size, NEW.max_batch_size
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.batch_size < NEW.min_batch_size OR NEW.batch_size > NEW.max_batch_size THEN
        RAISE EXCEPTION 'batch_size (%) is outside min_batch_size..max_batch_size (%..%)', NEW.batch_size,
            coalesce(NEW.min_batch_size::text, ''), coalesce(NEW.max_batch_size::text, '')
            USING ERRCODE = 'check_violation';
    END IF;

    PERFORM backfill.check_predicate_text('pending_predicate', NEW.pending_predicate, NEW.table_name);
    PERFORM backfill.check_predicate_text('check_predicate', NEW.check_predicate, NEW.table_name);
    RETURN NEW;
END
$fn$;

-- A predicate must be one boolean expression over the target table. Planning
-- `SELECT … WHERE (predicate) LIMIT 0` lets PostgreSQL say what is wrong with it.
CREATE FUNCTION backfill.check_predicate_text(column_name text, predicate text, table_name text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    IF predicate IS NULL THEN
        RETURN;
    END IF;
    IF btrim(predicate) = '' THEN
        RAISE EXCEPTION '% must not be empty (use NULL for none)', column_name USING ERRCODE = 'syntax_error';
    END IF;
    IF position(';' IN predicate) > 0 THEN
        RAISE EXCEPTION '% must be a single boolean expression, without ";"', column_name USING ERRCODE = 'syntax_error';
    END IF;
    BEGIN
        EXECUTE format('SELECT 1 FROM %s WHERE (%s) LIMIT 0', table_name, predicate);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION '% is not a valid boolean expression over %: %', column_name, table_name, SQLERRM
            USING ERRCODE = 'syntax_error';
    END;
END
$fn$;

CREATE TRIGGER jobs_validate
    BEFORE INSERT OR UPDATE OF name, table_name, key_column, batch_sql, pending_predicate, check_predicate,
        batch_size, min_batch_size, max_batch_size, target_batch_ms, max_rows_per_second, max_attempts
    ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.validate_job();

-- Workers LISTEN on this channel to react to steering at once.
CREATE FUNCTION backfill.notify_control(job_name text) RETURNS void
LANGUAGE sql AS $fn$ SELECT pg_notify('backfill_control', job_name) $fn$;

CREATE FUNCTION backfill.job_named(job_name text) RETURNS backfill.jobs
LANGUAGE plpgsql AS $fn$
DECLARE
    job_row backfill.jobs;
BEGIN
    SELECT * INTO job_row FROM backfill.jobs WHERE name = job_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no backfill job named %', quote_literal(job_name) USING ERRCODE = 'no_data_found';
    END IF;
    RETURN job_row;
END
$fn$;

CREATE FUNCTION backfill.pause(job_name text) RETURNS text
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
     WHERE id = job.id;
    PERFORM backfill.notify_control(job_name);
    RETURN 'paused';
END
$fn$;

CREATE FUNCTION backfill.resume(job_name text) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    job backfill.jobs := backfill.job_named(job_name);
BEGIN
    IF job.state NOT IN ('paused', 'pending', 'running') THEN
        RAISE EXCEPTION 'job % is %; only paused jobs can be resumed', quote_literal(job_name), job.state
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF job.state = 'paused' THEN
        UPDATE backfill.jobs SET state = 'pending', updated_at = now() WHERE id = job.id;
        PERFORM backfill.notify_control(job_name);
    END IF;
    RETURN CASE WHEN job.state = 'paused' THEN 'pending' ELSE job.state END;
END
$fn$;

CREATE FUNCTION backfill.cancel(job_name text) RETURNS text
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
     WHERE id = job.id;
    PERFORM backfill.notify_control(job_name);
    RETURN 'cancelled';
END
$fn$;

-- Re-runs a finished job's failed keys (after someone fixed the data), or, when
-- it failed without failed rows (say, a job-level error since corrected),
-- resumes it from its checkpoint.
CREATE FUNCTION backfill.retry_failed(job_name text) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    job backfill.jobs := backfill.job_named(job_name);
    failed_count bigint;
BEGIN
    IF job.state NOT IN ('failed', 'succeeded') THEN
        RAISE EXCEPTION 'job % is %; only finished jobs can be retried', quote_literal(job_name), job.state
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE backfill.failed_rows SET attempts = 0, next_attempt_at = now() WHERE job_id = job.id;
    GET DIAGNOSTICS failed_count = ROW_COUNT;
    UPDATE backfill.jobs
       SET state = 'pending',
           phase = CASE WHEN failed_count > 0 THEN 'retry' ELSE phase END,
           verify_sweeps = 0, last_error = NULL, finished_at = NULL, updated_at = now()
     WHERE id = job.id;
    PERFORM backfill.notify_control(job_name);
    RETURN 'pending';
END
$fn$;

CREATE VIEW backfill.job_status AS
SELECT j.id AS job_id,
       j.name,
       j.state,
       j.phase,
       j.table_name,
       j.rows_done,
       CASE WHEN j.state = 'succeeded' THEN 0
            ELSE greatest(j.rows_total_estimate - j.rows_done, 0) END AS rows_remaining,
       CASE WHEN j.state = 'succeeded' THEN 100.0
            WHEN j.rows_total_estimate > 0
            THEN round(100.0 * least(j.rows_done, j.rows_total_estimate) / j.rows_total_estimate, 1)
       END AS percent,
       j.rows_per_second,
       CASE WHEN j.state = 'running' AND j.rows_per_second > 0
            THEN make_interval(secs => round(greatest(j.rows_total_estimate - j.rows_done, 0) / j.rows_per_second))
       END AS eta,
       j.current_batch_size AS batch_size,
       j.throttle_state,
       j.throttle_reason,
       (SELECT count(*) FROM backfill.failed_rows f WHERE f.job_id = j.id) AS failed_rows,
       j.leased_by AS worker,
       j.heartbeat_at AS last_heartbeat,
       j.last_error,
       j.priority,
       j.created_at,
       j.started_at,
       j.finished_at
  FROM backfill.jobs j;

-- Idle workers LISTEN too, so a new job starts at once instead of at the next poll.
CREATE FUNCTION backfill.notify_new_job() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM backfill.notify_control(NEW.name);
    RETURN NULL;
END
$fn$;

CREATE TRIGGER jobs_notify_new
    AFTER INSERT ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.notify_new_job();
