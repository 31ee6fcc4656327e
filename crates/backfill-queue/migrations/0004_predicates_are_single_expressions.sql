-- A predicate is pasted into the daemon's queries as `… AND (predicate)`. One that
-- closes that parenthesis itself, such as 'v = 0) OR (true', is valid there but changes
-- what the query selects: `… AND (v = 0) OR (true)` picks the first keys again after
-- every checkpoint, and the job would re-run the same batch for ever. So a predicate
-- must also parse where nothing encloses it, between CASE WHEN and THEN: there every
-- parenthesis it closes must be one it opened. The ";" rule stays, since EXECUTE would
-- run a second statement, but now only outside quotes.
CREATE OR REPLACE FUNCTION backfill.check_predicate_text(column_name text, predicate text, table_name text) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    code text;
BEGIN
    IF predicate IS NULL THEN
        RETURN;
    END IF;
    IF btrim(predicate) = '' THEN
        RAISE EXCEPTION '% must not be empty (use NULL for none)', column_name USING ERRCODE = 'syntax_error';
    END IF;
    -- Outside string literals and quoted identifiers (so '"v;alue" = 0' passes). A
    -- comment or dollar quote could hide a quote character from this regex, so those go.
    code := regexp_replace(predicate, $re$'(?:[^']|'')*'|"(?:[^"]|"")*"$re$, '', 'g');
    IF position(';' IN code) > 0 THEN
        RAISE EXCEPTION '% must be a single boolean expression, without ";"', column_name USING ERRCODE = 'syntax_error';
    END IF;
    IF code ~ '--|/\*|\$' THEN
        RAISE EXCEPTION '% must not contain comments or dollar quotes', column_name USING ERRCODE = 'syntax_error';
    END IF;
    BEGIN
        EXECUTE format('SELECT 1 FROM %s WHERE (%s) LIMIT 0', table_name, predicate);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION '% is not a valid boolean expression over %: %', column_name, table_name, SQLERRM
            USING ERRCODE = 'syntax_error';
    END;
    BEGIN
        EXECUTE format('SELECT CASE WHEN %s THEN 1 END FROM %s LIMIT 0', predicate, table_name);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION '% must be a single boolean expression, but it does not parse on its own: %', column_name, SQLERRM
            USING ERRCODE = 'syntax_error';
    END;
END
$fn$;
