-- issue 16: operators steer running jobs — recurring run windows, a finish_by deadline
-- with a forecast that counts throttled time, per-job circuit-breaker limits, and a
-- reason on rest events.

ALTER TABLE backfill.jobs
    -- Recurring windows the job may run in, e.g. '{"Mon-Fri 22:00-06:00 Europe/Berlin"}';
    -- NULL or empty: any time. Outside every window the job rests (holding reason 'window').
    ADD COLUMN run_windows text[],
    -- When the job should be done; the forecast is compared with it (late, alert).
    ADD COLUMN finish_by timestamptz,
    -- Per-job circuit breaker limits; NULL: batch.breaker_failed_share / _rows.
    ADD COLUMN breaker_failed_share float8,
    ADD COLUMN breaker_failed_rows bigint,
    -- Queue state: rows per second over the recent forecast window of wall time,
    -- throttled and held time included (what the forecast extrapolates).
    ADD COLUMN recent_rows_per_second float8;

COMMENT ON COLUMN backfill.jobs.run_windows IS 'Recurring windows the job runs in (''[days ]HH:MM[:SS]-HH:MM[:SS][ time zone]''); NULL: any time.';
COMMENT ON COLUMN backfill.jobs.finish_by IS 'Deadline: job_status.late and the deadline alert compare the forecast with it.';
COMMENT ON COLUMN backfill.jobs.breaker_failed_share IS 'Circuit breaker: pause when more than this share of processed rows failed; NULL: batch.breaker_failed_share.';
COMMENT ON COLUMN backfill.jobs.breaker_failed_rows IS 'Circuit breaker: pause when more than this many rows failed (0: no such limit); NULL: batch.breaker_failed_rows.';
COMMENT ON COLUMN backfill.jobs.recent_rows_per_second IS 'Rows per second over the recent forecast window, throttled time included (written by backfilld).';

-- One run window, parsed: the ISO days (1 = Monday) it opens on, its opening and closing
-- second counted from the opening day's midnight (a closing past 86400 spills into the
-- next day: an overnight window), and the time zone its wall clock is read in.
CREATE TYPE backfill.run_window AS (days int[], opens_at int, closes_at int, time_zone text);

-- The one place the window rule lives: parses `spec`, raising with a message that names
-- the window and what is wrong with it. Grammar: [DAYS ]HH:MM[:SS]-HH:MM[:SS][ ZONE]
--   DAYS  comma-separated days or day ranges: Mon-Fri, Sat,Sun, Fri-Mon (wraps); default every day
--   times a closing at or before the opening runs overnight into the next day; equal
--         times: the whole day from the opening; 24:00 closes at midnight
--   ZONE  a time zone PostgreSQL knows (Europe/Berlin, UTC); default UTC, never the
--         session's, so a window means the same on every worker.
CREATE FUNCTION backfill.parse_run_window(spec text) RETURNS backfill.run_window
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    day_names constant text[] := ARRAY['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];
    example constant text := 'write e.g. ''Mon-Fri 22:00-06:00 Europe/Berlin'' ([days ]HH:MM[:SS]-HH:MM[:SS][ time zone])';
    parts text[];
    item text;
    bounds text[];
    first_day int;
    last_day int;
    result backfill.run_window;
    hours int[];
BEGIN
    parts := regexp_match(coalesce(btrim(spec), ''),
        '^(?:([A-Za-z][A-Za-z, -]*?)\s+)?(\d{1,2}):(\d{2})(?::(\d{2}))?\s*-\s*(\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s+(\S+))?$');
    IF parts IS NULL THEN
        RAISE EXCEPTION 'run_windows: % is not a run window; %', coalesce(quote_literal(spec), 'NULL'), example
            USING ERRCODE = 'check_violation';
    END IF;
    result.days := '{}';
    IF parts[1] IS NULL THEN
        result.days := ARRAY[1, 2, 3, 4, 5, 6, 7];
    ELSE
        FOREACH item IN ARRAY string_to_array(regexp_replace(parts[1], '\s+', '', 'g'), ',') LOOP
            bounds := string_to_array(item, '-');
            first_day := array_position(day_names, lower(left(bounds[1], 3)));
            last_day := array_position(day_names, lower(left(bounds[cardinality(bounds)], 3)));
            IF cardinality(bounds) > 2 OR first_day IS NULL OR last_day IS NULL
               OR length(bounds[1]) < 3 OR length(bounds[cardinality(bounds)]) < 3 THEN
                RAISE EXCEPTION 'run_windows: % is not a run window: % is not a day or a day range (Mon, Tue, ... Sun; Mon-Fri; Sat,Sun)',
                    quote_literal(spec), quote_literal(item)
                    USING ERRCODE = 'check_violation';
            END IF;
            -- A range that wraps (Fri-Mon) runs through Sunday.
            LOOP
                result.days := result.days || first_day;
                EXIT WHEN first_day = last_day;
                first_day := first_day % 7 + 1;
            END LOOP;
        END LOOP;
    END IF;
    hours := ARRAY[parts[2]::int, parts[5]::int];
    IF hours[1] > 23 OR hours[2] > 24 OR parts[3]::int > 59 OR parts[6]::int > 59
       OR coalesce(parts[4], '0')::int > 59 OR coalesce(parts[7], '0')::int > 59
       OR (hours[2] = 24 AND (parts[6]::int > 0 OR coalesce(parts[7], '0')::int > 0)) THEN
        RAISE EXCEPTION 'run_windows: % is not a run window: % is not a time of day (00:00 to 23:59:59; 24:00 as a closing)',
            quote_literal(spec),
            quote_literal(CASE WHEN hours[1] > 23 OR parts[3]::int > 59 OR coalesce(parts[4], '0')::int > 59
                               THEN concat_ws(':', parts[2], parts[3], parts[4])
                               ELSE concat_ws(':', parts[5], parts[6], parts[7]) END)
            USING ERRCODE = 'check_violation';
    END IF;
    result.opens_at := hours[1] * 3600 + parts[3]::int * 60 + coalesce(parts[4], '0')::int;
    result.closes_at := hours[2] * 3600 + parts[6]::int * 60 + coalesce(parts[7], '0')::int;
    IF result.closes_at <= result.opens_at THEN
        result.closes_at := result.closes_at + 86400;  -- overnight (or the whole day)
    END IF;
    result.time_zone := coalesce(parts[8], 'UTC');
    BEGIN
        PERFORM now() AT TIME ZONE result.time_zone;
    EXCEPTION WHEN invalid_parameter_value OR feature_not_supported THEN
        RAISE EXCEPTION 'run_windows: % is not a run window: % is not a time zone PostgreSQL knows (see pg_timezone_names, e.g. Europe/Berlin, UTC)',
            quote_literal(spec), quote_literal(result.time_zone)
            USING ERRCODE = 'check_violation';
    END;
    RETURN result;
END
$fn$;

-- True when `at` falls in one of `windows` (NULL or empty: always). Both the INSERT/UPDATE
-- validation and the daemon (claims, heartbeats, job_status) use it.
CREATE FUNCTION backfill.in_window(windows text[], at timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    spec text;
    w backfill.run_window;
    local_time timestamp;
    second_of_day int;
    day int;
BEGIN
    IF windows IS NULL OR cardinality(windows) = 0 THEN
        RETURN true;
    END IF;
    FOREACH spec IN ARRAY windows LOOP
        w := backfill.parse_run_window(spec);
        local_time := at AT TIME ZONE w.time_zone;
        second_of_day := extract(epoch FROM local_time - date_trunc('day', local_time))::int;
        day := extract(isodow FROM local_time)::int;
        IF day = ANY (w.days) AND second_of_day >= w.opens_at AND second_of_day < w.closes_at THEN
            RETURN true;
        END IF;
        -- The part of an overnight window opened the day before.
        IF w.closes_at > 86400 AND (day + 5) % 7 + 1 = ANY (w.days)
           AND second_of_day < w.closes_at - 86400 THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$fn$;

-- The run windows that apply to a job: its own, or its parent's for a slice (a retune of
-- the job reaches its slices at once).
CREATE FUNCTION backfill.job_in_window(job_id bigint) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT backfill.in_window(p.run_windows, now())
      FROM backfill.jobs j
      JOIN backfill.jobs p ON p.id = coalesce(j.parent_id, j.id)
     WHERE j.id = job_id
$fn$;

-- Refuses bad steering columns with a message naming the column (and the window).
CREATE FUNCTION backfill.validate_steering() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    spec text;
BEGIN
    IF NEW.run_windows IS NOT NULL THEN
        IF array_ndims(NEW.run_windows) > 1 THEN
            RAISE EXCEPTION 'run_windows must be a list of windows (text[]), not a matrix'
                USING ERRCODE = 'check_violation';
        END IF;
        FOREACH spec IN ARRAY NEW.run_windows LOOP
            PERFORM backfill.parse_run_window(spec);
        END LOOP;
    END IF;
    IF NEW.breaker_failed_share IS NOT NULL
       AND NOT (NEW.breaker_failed_share > 0 AND NEW.breaker_failed_share <= 1) THEN
        RAISE EXCEPTION 'breaker_failed_share must be more than 0 and at most 1 (1: never on the share; NULL: batch.breaker_failed_share), got %',
            NEW.breaker_failed_share
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.breaker_failed_rows < 0 THEN
        RAISE EXCEPTION 'breaker_failed_rows must be 0 (no such limit) or more (NULL: batch.breaker_failed_rows), got %',
            NEW.breaker_failed_rows
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.finish_by IN ('infinity'::timestamptz, '-infinity'::timestamptz) THEN
        RAISE EXCEPTION 'finish_by must be a point in time (or NULL for no deadline), got %', NEW.finish_by
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER jobs_validate_steering
    BEFORE INSERT OR UPDATE OF run_windows, finish_by, breaker_failed_share, breaker_failed_rows
    ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.validate_steering();

-- Events (copied from 0006; issue 16: a job resting outside its run windows is 'rested'
-- like a stuck one, and the payload says why in 'reason').
CREATE OR REPLACE FUNCTION backfill.notify_event() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    old_state text := CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END;
    event text;
    payload jsonb;
BEGIN
    event := CASE
        WHEN TG_OP = 'INSERT' THEN 'enqueued'
        WHEN NEW.state = 'running' THEN 'claimed'
        WHEN NEW.state = 'pending' AND old_state = 'paused' THEN 'resumed'
        WHEN NEW.state = 'pending' AND old_state = 'running' AND NEW.throttle_reason IN ('stuck', 'window') THEN 'rested'  -- issue 16: window
        WHEN NEW.state = 'pending' AND old_state IN ('failed', 'succeeded') THEN 'retried'
        WHEN NEW.state = 'pending' THEN 'requeued'
        ELSE NEW.state  -- paused, cancelled, failed, succeeded
    END;
    payload := jsonb_build_object(
        'event', event,
        'job', NEW.name,
        'id', NEW.id,
        'parent_id', NEW.parent_id,
        'old_state', old_state,
        'new_state', NEW.state,
        'worker', NEW.leased_by,
        'last_error', left(NEW.last_error, 2000),
        'rows_done', NEW.rows_done,
        'at', now());
    IF event = 'rested' THEN  -- issue 16
        payload := payload || jsonb_build_object('reason', NEW.throttle_reason);
    END IF;
    -- NOTIFY refuses a payload of 8000 bytes or more, and the refusal would roll back the
    -- state change itself: shorten rather than ever fail the writer.
    IF octet_length(payload::text) >= 7900 THEN
        payload := payload || jsonb_build_object('job', left(NEW.name, 500), 'last_error', NULL, 'truncated', true);
    END IF;
    PERFORM pg_notify('backfill_events', payload::text);
    RETURN NULL;
END
$fn$;
