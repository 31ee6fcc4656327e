-- The incident button: backfill.throttle(ratio, for_interval, job_pattern) slows every
-- job whose name (or whose parent's name, for a slice) matches the LIKE pattern to
-- `ratio` of its rate, or holds it (ratio 0), until the throttle expires by itself or
-- backfill.unthrottle lifts it. Workers read the throttles in force with their health
-- probe, so a throttle takes effect within a probe interval.

CREATE TABLE backfill.throttles (
    -- A LIKE pattern on job names ('%': every job).
    job_pattern text PRIMARY KEY,
    -- Share of its rate a matching job may run at; 0 holds it.
    ratio float8 NOT NULL CHECK (ratio >= 0 AND ratio < 1),
    expires_at timestamptz NOT NULL,
    -- Who pressed the button (the session's role: the function runs as the daemon).
    created_by name NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE backfill.throttles IS 'Operator throttles (backfill.throttle / backfill.unthrottle); rows past expires_at no longer apply.';

-- Throttles every job matching job_pattern to ratio of its rate (0: hold) for
-- for_interval; pressing it again for the same pattern replaces the earlier throttle.
-- Returns how many jobs not yet finished match now (0 is not an error: the throttle also
-- applies to jobs enqueued later).
CREATE FUNCTION backfill.throttle(ratio float8, for_interval interval, job_pattern text DEFAULT '%')
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    matching integer;
BEGIN
    IF ratio IS NULL OR ratio = 'NaN'::float8 OR ratio < 0 OR ratio >= 1 THEN
        RAISE EXCEPTION 'backfill.throttle: ratio must be at least 0 (hold) and below 1 (a share of the rate), got %', ratio
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'backfill.throttle(0, ''1 hour'') holds every job; backfill.unthrottle() lifts it.';
    END IF;
    IF for_interval IS NULL OR now() + for_interval <= now() THEN
        RAISE EXCEPTION 'backfill.throttle: for_interval must be a positive, finite interval, got %', for_interval
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF job_pattern IS NULL OR job_pattern = '' THEN
        RAISE EXCEPTION 'backfill.throttle: job_pattern must be a LIKE pattern on job names (''%%'' for every job), got %',
            coalesce(quote_literal(job_pattern), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM backfill.throttles WHERE expires_at <= now();
    INSERT INTO backfill.throttles (job_pattern, ratio, expires_at, created_by)
    VALUES (job_pattern, ratio, now() + for_interval, session_user)
    ON CONFLICT ON CONSTRAINT throttles_pkey DO UPDATE
       SET ratio = EXCLUDED.ratio, expires_at = EXCLUDED.expires_at,
           created_by = EXCLUDED.created_by, created_at = now();
    SELECT count(*) INTO matching
      FROM backfill.jobs j
     WHERE j.parent_id IS NULL
       AND j.state IN ('pending', 'running', 'paused')
       AND j.name LIKE throttle.job_pattern;
    RETURN matching;
END
$fn$;

-- Lifts the throttles whose pattern matches job_pattern ('%', the default: all of them);
-- returns how many it lifted.
CREATE FUNCTION backfill.unthrottle(job_pattern text DEFAULT '%')
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    lifted integer;
BEGIN
    IF job_pattern IS NULL THEN
        RAISE EXCEPTION 'backfill.unthrottle: job_pattern must be a LIKE pattern (''%%'' for every throttle), got NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM backfill.throttles t WHERE t.job_pattern LIKE unthrottle.job_pattern;
    GET DIAGNOSTICS lifted = ROW_COUNT;
    RETURN lifted;
END
$fn$;

REVOKE EXECUTE ON FUNCTION backfill.throttle(float8, interval, text), backfill.unthrottle(text)
    FROM PUBLIC;
