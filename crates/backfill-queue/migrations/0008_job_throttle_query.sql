-- A job's own throttle query: SQL returning one number or boolean, run by the health
-- probe on the primary every probe interval as the role that enqueued the job (read-only,
-- rolled back). While its value is above throttle_query_max the job holds (reason
-- throttle_query); a query that fails holds it too unless throttle.query_fail_open. A
-- tunable: change it on a running job and the next probe uses it. Slices use their
-- parent's.

ALTER TABLE backfill.jobs
    ADD COLUMN throttle_query text,
    ADD COLUMN throttle_query_max float8 NOT NULL DEFAULT 0;

COMMENT ON COLUMN backfill.jobs.throttle_query IS 'SQL returning one number or boolean, run as the job''s role every probe interval; above throttle_query_max the job holds (NULL: none).';
COMMENT ON COLUMN backfill.jobs.throttle_query_max IS 'The job holds while its throttle_query returns more than this (a boolean reads as 1 or 0).';

-- Refuses a blank query and a threshold that is not a finite number, naming the column.
CREATE FUNCTION backfill.validate_throttle_query() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.throttle_query IS NOT NULL AND btrim(NEW.throttle_query) = '' THEN
        RAISE EXCEPTION 'backfill.jobs: throttle_query of job % is blank; give SQL returning one number or boolean, or NULL for none', quote_literal(NEW.name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'e.g. throttle_query = ''SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = ''''Lock''''''';
    END IF;
    IF NEW.throttle_query_max IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8) THEN
        RAISE EXCEPTION 'backfill.jobs: throttle_query_max of job % must be a finite number, got %', quote_literal(NEW.name), NEW.throttle_query_max
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_validate_throttle_query
    BEFORE INSERT OR UPDATE OF throttle_query, throttle_query_max ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.validate_throttle_query();
