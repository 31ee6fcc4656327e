-- Operators steer running jobs: a completion gate for migration tools, and an event on
-- every state change of a job.

-- The completion gate. A schema migration's "switch" step calls it first:
--     SELECT backfill.require_succeeded('split_full_name');
-- It returns when the job has succeeded and raises otherwise, naming the job's state, its
-- progress and its last_error, so the migration fails with the reason in its log. It
-- reads without locking: a gate must never wait behind the daemon's row lock.
CREATE FUNCTION backfill.require_succeeded(job_name text) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    job backfill.jobs;
BEGIN
    SELECT * INTO job FROM backfill.jobs WHERE name = job_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no backfill job named %', quote_literal(job_name) USING ERRCODE = 'no_data_found';
    END IF;
    IF job.state = 'succeeded' THEN
        RETURN;
    END IF;
    RAISE EXCEPTION 'backfill job % has not succeeded: it is % (% rows done)%',
        quote_literal(job_name), job.state, job.rows_done,
        coalesce('; last_error: ' || job.last_error, '')
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = CASE job.state
                  WHEN 'failed' THEN format('Fix what last_error says, then SELECT backfill.retry_failed(%L).', job_name)
                  WHEN 'cancelled' THEN 'A cancelled job never finishes: enqueue the backfill again.'
                  WHEN 'paused' THEN format('SELECT backfill.resume(%L), then wait for it: backfilld wait %s.', job_name, job_name)
                  ELSE format('Wait for it to finish: backfilld wait %s.', job_name)
              END;
END
$fn$;

REVOKE EXECUTE ON FUNCTION backfill.require_succeeded(text) FROM PUBLIC;

-- Events: every change of a job's state, and every claim (a takeover of an expired lease
-- keeps the state 'running' but is a new claim), is a NOTIFY on channel backfill_events
-- with a JSON payload. A trigger, so every writer is covered: the daemon, the steering
-- functions, and any future code path. Listeners get it when the change commits, in
-- commit order; a rolled-back change sends nothing.
CREATE FUNCTION backfill.notify_event() RETURNS trigger
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
        WHEN NEW.state = 'pending' AND old_state = 'running' AND NEW.throttle_reason = 'stuck' THEN 'rested'
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
    -- NOTIFY refuses a payload of 8000 bytes or more, and the refusal would roll back the
    -- state change itself: shorten rather than ever fail the writer.
    IF octet_length(payload::text) >= 7900 THEN
        payload := payload || jsonb_build_object('job', left(NEW.name, 500), 'last_error', NULL, 'truncated', true);
    END IF;
    PERFORM pg_notify('backfill_events', payload::text);
    RETURN NULL;
END
$fn$;

REVOKE EXECUTE ON FUNCTION backfill.notify_event() FROM PUBLIC;

CREATE TRIGGER jobs_events_insert
    AFTER INSERT ON backfill.jobs
    FOR EACH ROW EXECUTE FUNCTION backfill.notify_event();

CREATE TRIGGER jobs_events_update
    AFTER UPDATE OF state, lease_token ON backfill.jobs
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          OR (NEW.state = 'running' AND NEW.lease_token IS NOT NULL
              AND NEW.lease_token IS DISTINCT FROM OLD.lease_token))
    EXECUTE FUNCTION backfill.notify_event();
