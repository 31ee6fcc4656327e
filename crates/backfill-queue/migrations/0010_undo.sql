-- Undo (issue 17): a job may keep the old values of the rows its batches change, and
-- backfill.revert(name) enqueues an ordinary job that puts them back.
--
-- Capture is the data plane's (crates/backfill-dataplane/src/undo.rs): each batch of a
-- job with keep_undo locks and reads the old values of exactly its keys as the job's
-- role, before its statement and inside the same savepoint; after the statement it
-- hashes the new values (post_hash), and the daemon stores both here in one insert in the
-- batch's own transaction: keys left as they were are skipped, and a key seen again keeps
-- its FIRST, original values. So what is stored is what the committed batches changed,
-- under crashes and retries.
--
-- The image of a row is jsonb: `jsonb_build_object('c', t.c, …)` over undo_columns, or
-- `to_jsonb(t.*)` (the whole row) when undo_columns is NULL. Its text is canonical
-- (jsonb sorts keys), so md5(image::text) compares images.

ALTER TABLE backfill.jobs
    -- Keep the old values of every row the job's batches change (off by default).
    ADD COLUMN keep_undo      boolean NOT NULL DEFAULT false,
    -- The columns the job writes, whose old values are kept; NULL: the whole row.
    ADD COLUMN undo_columns   text[],
    -- Set on a job backfill.revert() enqueued: the job whose changes it reverts.
    ADD COLUMN reverts_job_id bigint REFERENCES backfill.jobs (id) ON DELETE SET NULL;

COMMENT ON COLUMN backfill.jobs.keep_undo IS 'Keep the old values of the rows the job changes in backfill.undo, for backfill.revert(name).';
COMMENT ON COLUMN backfill.jobs.undo_columns IS 'The columns the job writes (their old values are kept); NULL keeps the whole row as jsonb.';
COMMENT ON COLUMN backfill.jobs.reverts_job_id IS 'For a job enqueued by backfill.revert(): the job it reverts.';

CREATE TABLE backfill.undo (
    -- The job (the parent of a slice) whose batch changed the row. No foreign key: its
    -- check would run once per saved row, in every batch (jobs_forget_undo cleans up).
    job_id     bigint NOT NULL,
    -- The key in the data plane's pinned text form, as in checkpoints and failed_rows.
    key        text NOT NULL,
    -- The row's image before the job first changed it.
    old_values jsonb NOT NULL,
    -- md5 of the row's image after the job's last change: a row whose image no longer
    -- hashes to it was changed since by someone else, and a revert leaves it alone.
    post_hash  text,
    saved_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, key)
);

COMMENT ON TABLE backfill.undo IS 'Old values of the rows backfills with keep_undo changed; written by backfilld alone, restored by backfill.revert(name).';

-- Engineers may read the undo data of jobs their role enqueued (it holds values of their
-- tables), nothing else; a revert job reads it as that role. The daemon owns the table
-- and is not subject to the policy.
ALTER TABLE backfill.undo ENABLE ROW LEVEL SECURITY;
CREATE POLICY undo_of_own_jobs ON backfill.undo FOR SELECT
    USING (EXISTS (SELECT FROM backfill.jobs j
                    WHERE j.id = undo.job_id AND pg_has_role(j.enqueued_by, 'USAGE')));

-- Undo data is the daemon's record of what it changed: nobody else writes it, whatever
-- grants they hold (purge_undo deletes it on the engineer's behalf). Checked once per
-- statement: a batch saves thousands of rows in one.
CREATE FUNCTION backfill.guard_undo() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NOT backfill.is_daemon() THEN
        RAISE EXCEPTION 'backfill.undo is written by backfilld alone; select backfill.revert(name) or backfill.purge_undo(name)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER undo_guard
    BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON backfill.undo
    FOR EACH STATEMENT EXECUTE FUNCTION backfill.guard_undo();

-- A job deleted takes its undo data with it (the foreign key's ON DELETE CASCADE).
CREATE FUNCTION backfill.forget_undo() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    DELETE FROM backfill.undo WHERE job_id = OLD.id;
    RETURN NULL;
END
$fn$;

REVOKE EXECUTE ON FUNCTION backfill.forget_undo() FROM PUBLIC;

CREATE TRIGGER jobs_forget_undo
    AFTER DELETE ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.forget_undo();

-- keep_undo and undo_columns are checked at INSERT (and when changed) with a message
-- naming the bad column.
CREATE FUNCTION backfill.validate_undo() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    target regclass := to_regclass(NEW.table_name);
    column_name text;
    generated "char";
    found boolean;
BEGIN
    IF NEW.undo_columns IS NULL THEN
        RETURN NEW;
    END IF;
    IF NOT NEW.keep_undo THEN
        RAISE EXCEPTION 'undo_columns is set but keep_undo is false: set keep_undo = true to keep their old values, or leave undo_columns NULL'
            USING ERRCODE = 'check_violation';
    END IF;
    IF cardinality(NEW.undo_columns) = 0 OR cardinality(NEW.undo_columns) > 50 THEN
        RAISE EXCEPTION 'undo_columns must name 1 to 50 columns (NULL keeps the whole row), got %', cardinality(NEW.undo_columns)
            USING ERRCODE = 'check_violation';
    END IF;
    FOREACH column_name IN ARRAY NEW.undo_columns LOOP
        SELECT true, a.attgenerated INTO found, generated
          FROM pg_attribute a
         WHERE a.attrelid = target AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
        IF found IS NULL THEN
            RAISE EXCEPTION 'undo_columns: column % does not exist in table %', coalesce(quote_literal(column_name), 'NULL'), NEW.table_name
                USING ERRCODE = 'undefined_column';
        END IF;
        IF generated <> '' THEN
            RAISE EXCEPTION 'undo_columns: column % of table % is generated; no statement writes it', quote_ident(column_name), NEW.table_name
                USING ERRCODE = 'check_violation';
        END IF;
        IF column_name = NEW.key_column THEN
            RAISE EXCEPTION 'undo_columns: % is the key_column, which a backfill must not change', quote_ident(column_name)
                USING ERRCODE = 'check_violation';
        END IF;
        found := NULL;
    END LOOP;
    IF (SELECT count(DISTINCT c) FROM unnest(NEW.undo_columns) c) < cardinality(NEW.undo_columns) THEN
        RAISE EXCEPTION 'undo_columns names a column twice: %', NEW.undo_columns USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_validate_undo
    BEFORE INSERT OR UPDATE OF keep_undo, undo_columns, table_name, key_column ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.validate_undo();

-- keep_undo and undo_columns are part of a job's definition (copied from 0005): they
-- change only while no worker runs the job, and a started job that changes them starts
-- over. Its undo rows stay: they hold the values from before the job's first change,
-- which is what a revert must restore.
CREATE OR REPLACE FUNCTION backfill.check_definition_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF (NEW.table_name, NEW.key_column, NEW.batch_sql, NEW.pending_predicate, NEW.check_predicate,
        NEW.parallelism, NEW.name,
        NEW.keep_undo, NEW.undo_columns)  -- issue 17
       IS NOT DISTINCT FROM
       (OLD.table_name, OLD.key_column, OLD.batch_sql, OLD.pending_predicate, OLD.check_predicate,
        OLD.parallelism, OLD.name,
        OLD.keep_undo, OLD.undo_columns)  -- issue 17
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

DROP TRIGGER jobs_definition_change ON backfill.jobs;
CREATE TRIGGER jobs_definition_change
    BEFORE UPDATE OF table_name, key_column, batch_sql, pending_predicate, check_predicate, parallelism, name,
        keep_undo, undo_columns  -- issue 17
    ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.check_definition_change();

DROP TRIGGER jobs_forget_old_definition ON backfill.jobs;
CREATE TRIGGER jobs_forget_old_definition
    AFTER UPDATE OF table_name, key_column, batch_sql, pending_predicate, check_predicate, parallelism,
        keep_undo, undo_columns  -- issue 17
    ON backfill.jobs
    FOR EACH ROW
    WHEN (OLD.started_at IS NOT NULL AND
          (NEW.table_name, NEW.key_column, NEW.batch_sql, NEW.pending_predicate, NEW.check_predicate, NEW.parallelism,
           NEW.keep_undo, NEW.undo_columns)  -- issue 17
          IS DISTINCT FROM
          (OLD.table_name, OLD.key_column, OLD.batch_sql, OLD.pending_predicate, OLD.check_predicate, OLD.parallelism,
           OLD.keep_undo, OLD.undo_columns))  -- issue 17
    EXECUTE FUNCTION backfill.forget_old_definition();

-- What a revert job's batch_sql calls for a row whose image no longer hashes to what the
-- backfill left: someone else changed it since, so it is not overwritten. The error is a
-- row's (class P0): bisection sets the key aside in failed_rows with this message. Its
-- own SQLSTATE, P0U01, tells the data plane it is a conflict, never a wrong statement.
CREATE FUNCTION backfill.undo_conflict(job_name text, key text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RAISE EXCEPTION 'row % was changed since backfill % wrote it, by someone else: not overwritten. Check it by hand, or revert with force => true to overwrite it',
        key, quote_literal(job_name)
        USING ERRCODE = 'P0U01';
END
$fn$;

-- The SQL image of a row over `columns` (NULL: the whole row) with table alias `alias`;
-- the data plane builds the same expression (crates/backfill-dataplane/src/undo.rs).
CREATE FUNCTION backfill.undo_image(columns text[], alias text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    -- `alias.*`, not `alias`: a column of that name would be taken for the row.
    SELECT CASE WHEN columns IS NULL THEN format('to_jsonb(%I.*)', alias)
                ELSE format('jsonb_build_object(%s)',
                            (SELECT string_agg(format('%L, %I.%I', c, alias, c), ', ' ORDER BY o)
                               FROM unnest(columns) WITH ORDINALITY AS u(c, o)))
           END
$fn$;

-- Whether job `job_id` kept old values for `key` that differ from `current` (an image of
-- the columns a revert restores): such a row is still to be reverted. As the caller, so
-- the revert job's role sees only its own jobs' undo data.
CREATE FUNCTION backfill.undo_differs(job_id bigint, key text, current jsonb) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (
        SELECT FROM backfill.undo u
         WHERE u.job_id = undo_differs.job_id AND u.key = undo_differs.key
           AND (SELECT jsonb_object_agg(k, coalesce(u.old_values -> k, 'null'::jsonb))
                  FROM jsonb_object_keys(undo_differs.current) AS k) IS DISTINCT FROM undo_differs.current)
$fn$;

-- Enqueues a job that restores the values `job_name` changed (those still in
-- backfill.undo), in keyed batches through the normal worker path: same throttling,
-- fencing, failed rows and verification. Only keys from from_key to to_key (inclusive,
-- in the key column's type) when given. A row someone else changed since the backfill
-- wrote it is not overwritten unless force: its key goes to the revert job's
-- failed_rows, and the job ends failed listing them. The revert job runs as the role
-- that enqueued the original job (its batches wrote those values); the caller's login
-- role must be a member of that role. Returns the revert job's name.
CREATE FUNCTION backfill.revert(job_name text, from_key text DEFAULT NULL, to_key text DEFAULT NULL,
                                force boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    job backfill.jobs := backfill.job_named(job_name);
    target regclass;
    key_type text;
    restored text[];
    image text;
    predicate text;
    statement text;
    revert_name text;
    n integer := 1;
BEGIN
    IF job.parent_id IS NOT NULL THEN
        RAISE EXCEPTION 'job % is a slice; revert its job instead', quote_literal(job_name)
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF NOT pg_has_role(session_user, job.enqueued_by, 'MEMBER') THEN
        RAISE EXCEPTION 'backfill.revert: % is not a member of role %, which enqueued job % (a revert runs as that role)',
            session_user, job.enqueued_by, quote_literal(job_name)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF job.state NOT IN ('succeeded', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'job % is %; only a finished job can be reverted (select backfill.cancel(%) first)',
            quote_literal(job_name), job.state, quote_literal(job_name)
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF NOT EXISTS (SELECT FROM backfill.undo u WHERE u.job_id = job.id) THEN
        RAISE EXCEPTION 'job % has no undo data: %', quote_literal(job_name),
            CASE WHEN job.keep_undo THEN 'it changed no rows, or its undo data was purged'
                 ELSE 'it ran without keep_undo' END
            USING ERRCODE = 'no_data_found';
    END IF;
    IF EXISTS (SELECT FROM backfill.jobs r WHERE r.reverts_job_id = job.id
                 AND r.state IN ('pending', 'running', 'paused')) THEN
        RAISE EXCEPTION 'job % is being reverted already (%)', quote_literal(job_name),
            (SELECT string_agg(r.name, ', ') FROM backfill.jobs r WHERE r.reverts_job_id = job.id
                AND r.state IN ('pending', 'running', 'paused'))
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    target := to_regclass(job.table_name);
    IF target IS NULL THEN
        RAISE EXCEPTION 'table % of job % no longer exists', job.table_name, quote_literal(job_name)
            USING ERRCODE = 'undefined_table';
    END IF;
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = target AND a.attname = job.key_column AND NOT a.attisdropped;
    -- The columns put back: the job's undo_columns, or every column a statement can write.
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO restored
      FROM pg_attribute a
     WHERE a.attrelid = target AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attgenerated = '' AND a.attidentity <> 'a' AND a.attname <> job.key_column
       AND (job.undo_columns IS NULL OR a.attname = ANY (job.undo_columns));
    IF restored IS NULL THEN
        RAISE EXCEPTION 'table % has no column left to restore for job %', job.table_name, quote_literal(job_name)
            USING ERRCODE = 'undefined_column';
    END IF;
    FOREACH predicate IN ARRAY ARRAY[from_key, to_key] LOOP
        BEGIN
            EXECUTE format('SELECT %L::%s', predicate, key_type);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'backfill.revert: % is not a key of type %: %', quote_literal(predicate), key_type, SQLERRM
                USING ERRCODE = 'invalid_parameter_value';
        END;
    END LOOP;
    image := backfill.undo_image(job.undo_columns, 't');
    -- Pending: rows with undo data whose restored columns differ from the old values. The
    -- row's columns are passed to a function, not named inside a subquery, where a column
    -- of the table called like one of backfill.undo's would mean the latter.
    predicate := format('backfill.undo_differs(%s, %I::text, jsonb_build_object(%s))',
        job.id, job.key_column,
        (SELECT string_agg(format('%L, %I', c, c), ', ') FROM unnest(restored) c));
    IF from_key IS NOT NULL THEN
        predicate := predicate || format(' AND %I >= %L::%s', job.key_column, from_key, key_type);
    END IF;
    IF to_key IS NOT NULL THEN
        predicate := predicate || format(' AND %I <= %L::%s', job.key_column, to_key, key_type);
    END IF;
    statement := format(
        'UPDATE %s AS t SET (%s) = (SELECT %s FROM jsonb_populate_record(NULL::%s, u.old_values) AS r) '
        'FROM backfill.undo AS u WHERE t.%I = ANY(:keys) AND u.job_id = %s AND u.key = t.%I::text%s',
        job.table_name,
        (SELECT string_agg(format('%I', c), ', ') FROM unnest(restored) c),
        (SELECT string_agg(format('r.%I', c), ', ') FROM unnest(restored) c),
        job.table_name, job.key_column, job.id, job.key_column,
        CASE WHEN force THEN ''
             ELSE format(' AND CASE WHEN md5((%s)::text) = u.post_hash THEN true ELSE backfill.undo_conflict(%L, u.key) END',
                         image, job.name) END);
    revert_name := 'revert:' || job.name;
    WHILE EXISTS (SELECT FROM backfill.jobs j WHERE j.name = revert_name) LOOP
        n := n + 1;
        revert_name := format('revert:%s:%s', job.name, n);
    END LOOP;
    -- A conflict will not resolve itself: one attempt, then the job ends failed listing them.
    INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate,
                               batch_size, min_batch_size, max_batch_size, target_batch_ms,
                               max_rows_per_second, max_attempts, priority, reverts_job_id)
    VALUES (revert_name, job.table_name, job.key_column, statement, predicate,
            job.batch_size, job.min_batch_size, job.max_batch_size, job.target_batch_ms,
            job.max_rows_per_second, 1, job.priority, job.id);
    -- Inserted as the daemon (this function's owner): it runs as the original's role.
    UPDATE backfill.jobs SET enqueued_by = job.enqueued_by, search_path = job.search_path
     WHERE name = revert_name;
    RETURN revert_name;
END
$fn$;

-- Drops a job's undo data (its revert is no longer possible); returns the rows dropped.
CREATE FUNCTION backfill.purge_undo(job_name text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    job backfill.jobs := backfill.job_named(job_name);
    dropped bigint;
BEGIN
    IF job.state IN ('pending', 'running', 'paused') AND job.started_at IS NOT NULL THEN
        RAISE EXCEPTION 'job % is %; purge its undo data once it has finished (or cancel it)', quote_literal(job_name), job.state
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    DELETE FROM backfill.undo WHERE job_id = job.id;
    GET DIAGNOSTICS dropped = ROW_COUNT;
    RETURN dropped;
END
$fn$;

-- The daemon's retention: drops the undo data of jobs finished longer than `retention`
-- ago; returns the rows dropped.
CREATE FUNCTION backfill.purge_expired_undo(retention interval) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    dropped bigint;
BEGIN
    DELETE FROM backfill.undo u
     USING backfill.jobs j
     WHERE j.id = u.job_id AND j.state IN ('succeeded', 'failed', 'cancelled')
       AND j.finished_at < now() - retention;
    GET DIAGNOSTICS dropped = ROW_COUNT;
    RETURN dropped;
END
$fn$;

REVOKE EXECUTE ON FUNCTION backfill.revert(text, text, text, boolean), backfill.purge_undo(text),
    backfill.purge_expired_undo(interval), backfill.guard_undo(), backfill.validate_undo()
    FROM PUBLIC;
