//! The demo's data: a `users` table of messy names and the split-name job from
//! DESIGN.md. Shared by `backfilld demo`, the end-to-end suite and the benchmark.

/// The split-name job from DESIGN.md, enqueued exactly as an engineer would.
pub const SPLIT_NAME_JOB_SQL: &str = r#"
INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
VALUES ('split_full_name', 'public.users', 'id',
        $$UPDATE public.users
             SET first_name = split_part(btrim(full_name), ' ', 1),
                 last_name  = nullif(btrim(substr(btrim(full_name),
                                  length(split_part(btrim(full_name), ' ', 1)) + 1)), '')
           WHERE id = ANY(:keys)$$,
        'first_name IS NULL');
"#;

/// Creates `public.users` with `rows` messy names: one, two and three words,
/// extra spaces, empty strings.
pub fn users_table_sql(rows: i64) -> String {
    format!(
        r#"
CREATE TABLE public.users (
    id         bigint PRIMARY KEY,
    full_name  text NOT NULL,
    first_name text,
    last_name  text
);
INSERT INTO public.users (id, full_name)
SELECT g,
       CASE g % 10
           WHEN 0 THEN ''
           WHEN 1 THEN f
           WHEN 2 THEN '  ' || f || '   ' || l || ' '
           WHEN 3 THEN f || ' ' || m || ' ' || l
           ELSE f || ' ' || l
       END
  FROM generate_series(1, {rows}) AS g,
       LATERAL (SELECT (ARRAY['Ada','Grace','Alan','Edsger','Barbara','Donald','Frances','Ken','Radia','Leslie','Margaret','Dennis'])[1 + g % 12] AS f,
                       (ARRAY['Lovelace','Hopper','Turing','Dijkstra','Liskov','Knuth','Allen','Thompson','Perlman','Lamport','Hamilton','Ritchie','Van Rossum','de Icaza','O''Neil'])[1 + (g / 12) % 15] AS l,
                       (ARRAY['Mary','Lee','J.','von'])[1 + g % 4] AS m) AS names;
ANALYZE public.users;
"#
    )
}

/// The same change as one UPDATE over `table`: the database's own speed and
/// the reference result the backfill must reproduce.
pub fn split_name_single_update(table: &str) -> String {
    format!(
        "UPDATE {table}
            SET first_name = split_part(btrim(full_name), ' ', 1),
                last_name  = nullif(btrim(substr(btrim(full_name),
                                 length(split_part(btrim(full_name), ' ', 1)) + 1)), '')
          WHERE first_name IS NULL"
    )
}
