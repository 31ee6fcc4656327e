//! Named placeholders in a job's `batch_sql` (`:keys`, `:first_key`, `:last_key`).
//!
//! The batch statement is user SQL, so the placeholders are found with a small
//! lexer that knows where SQL text is *not* code (string literals, quoted
//! identifiers, dollar quotes, comments, `::` casts). A typo such as `:key` is an
//! error rather than being passed through, because PostgreSQL would report it as
//! an obscure syntax error far from its cause.

use std::fmt;

/// One of the values a batch statement can refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placeholder {
    /// `:keys`: the array of this batch's keys, in key order.
    Keys,
    /// `:first_key`: the smallest key of the batch.
    FirstKey,
    /// `:last_key`: the largest key of the batch.
    LastKey,
}

impl Placeholder {
    /// All placeholders, in the order they are documented.
    pub const ALL: [Placeholder; 3] = [
        Placeholder::Keys,
        Placeholder::FirstKey,
        Placeholder::LastKey,
    ];

    /// The name as written in SQL, without the colon.
    pub fn name(self) -> &'static str {
        match self {
            Placeholder::Keys => "keys",
            Placeholder::FirstKey => "first_key",
            Placeholder::LastKey => "last_key",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// Why a `batch_sql` text cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceholderError {
    /// A `:name` that is not one of ours, e.g. the typo `:key`.
    #[error("batch_sql uses unknown placeholder :{name} at byte {offset}; the placeholders are :keys, :first_key and :last_key")]
    Unknown { name: String, offset: usize },
    /// No placeholder at all: every batch would run over the whole table.
    #[error(
        "batch_sql uses none of :keys, :first_key, :last_key, so it cannot be limited to a batch"
    )]
    Missing,
    /// A literal, quoted identifier or comment is not closed.
    #[error("batch_sql has an unterminated {what} starting at byte {offset}")]
    Unterminated { what: &'static str, offset: usize },
}

/// `batch_sql` with placeholders replaced by positional parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundSql {
    /// The statement text with `$1`, `$2`, … in place of the placeholders.
    pub sql: String,
    /// Which value each positional parameter carries: `params[0]` is `$1`.
    pub params: Vec<Placeholder>,
}

impl fmt::Display for BoundSql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sql)
    }
}

/// Replaces each placeholder with a positional parameter cast to `key_type`
/// (`:keys` becomes `($1::text[]::<key_type>[])`).
///
/// Keys travel as text and are cast by the server, so every orderable key type
/// with a text form works and the planner still sees the column's real type.
pub fn bind_placeholders(batch_sql: &str, key_type: &str) -> Result<BoundSql, PlaceholderError> {
    let mut params: Vec<Placeholder> = Vec::new();
    let mut sql = String::with_capacity(batch_sql.len() + 32);
    let mut copied_up_to = 0;
    for found in scan(batch_sql)? {
        let index = match params.iter().position(|p| *p == found.placeholder) {
            Some(i) => i + 1,
            None => {
                params.push(found.placeholder);
                params.len()
            }
        };
        sql.push_str(&batch_sql[copied_up_to..found.start]);
        let cast = match found.placeholder {
            Placeholder::Keys => format!("(${index}::text[]::{key_type}[])"),
            Placeholder::FirstKey | Placeholder::LastKey => format!("(${index}::text::{key_type})"),
        };
        sql.push_str(&cast);
        copied_up_to = found.end;
    }
    if params.is_empty() {
        return Err(PlaceholderError::Missing);
    }
    sql.push_str(&batch_sql[copied_up_to..]);
    Ok(BoundSql { sql, params })
}

/// Checks that `batch_sql` uses at least one known placeholder and no unknown one.
pub fn check_placeholders(batch_sql: &str) -> Result<(), PlaceholderError> {
    bind_placeholders(batch_sql, "text").map(|_| ())
}

struct Found {
    placeholder: Placeholder,
    start: usize,
    end: usize,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Finds placeholders outside literals, quoted identifiers and comments.
fn scan(text: &str) -> Result<Vec<Found>, PlaceholderError> {
    let b = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // E'…' strings allow backslash escapes; plain ones only ''.
                let backslash_escapes = i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e');
                i = skip_quoted(b, i, b'\'', backslash_escapes, "string literal")?;
            }
            b'"' => i = skip_quoted(b, i, b'"', false, "quoted identifier")?,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |p| i + p + 1);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i)?,
            b'$' => i = skip_dollar_quote(b, i)?,
            b':' if b.get(i + 1) == Some(&b':') => {
                // A cast: skip the type name too, it is never a placeholder.
                i += 2;
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
            }
            b':' if b.get(i + 1).is_some_and(|&c| is_ident_start(c))
                && (i == 0 || !is_ident_char(b[i - 1])) =>
            {
                let start = i;
                let mut end = i + 1;
                while end < b.len() && is_ident_char(b[end]) {
                    end += 1;
                }
                let name = &text[start + 1..end];
                match Placeholder::from_name(name) {
                    Some(placeholder) => found.push(Found {
                        placeholder,
                        start,
                        end,
                    }),
                    None => {
                        return Err(PlaceholderError::Unknown {
                            name: name.to_string(),
                            offset: start,
                        })
                    }
                }
                i = end;
            }
            c if is_ident_char(c) => {
                // Skip a whole word so `$` inside identifiers is not a dollar quote.
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    Ok(found)
}

fn skip_quoted(
    b: &[u8],
    start: usize,
    quote: u8,
    backslash_escapes: bool,
    what: &'static str,
) -> Result<usize, PlaceholderError> {
    let mut i = start + 1;
    while i < b.len() {
        if backslash_escapes && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Ok(i + 1);
        }
        i += 1;
    }
    Err(PlaceholderError::Unterminated {
        what,
        offset: start,
    })
}

fn skip_block_comment(b: &[u8], start: usize) -> Result<usize, PlaceholderError> {
    // PostgreSQL block comments nest.
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Ok(i);
            }
        } else {
            i += 1;
        }
    }
    Err(PlaceholderError::Unterminated {
        what: "block comment",
        offset: start,
    })
}

fn skip_dollar_quote(b: &[u8], start: usize) -> Result<usize, PlaceholderError> {
    // `$1` is a positional parameter, `$tag$` or `$$` opens a dollar quote.
    let mut tag_end = start + 1;
    if tag_end < b.len() && is_ident_start(b[tag_end]) {
        while tag_end < b.len() && is_ident_char(b[tag_end]) && b[tag_end] != b'$' {
            tag_end += 1;
        }
    }
    if b.get(tag_end) != Some(&b'$') {
        return Ok(start + 1);
    }
    let tag = &b[start..=tag_end];
    let body = tag_end + 1;
    b[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map(|p| body + p + tag.len())
        .ok_or(PlaceholderError::Unterminated {
            what: "dollar-quoted string",
            offset: start,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_keys_with_the_key_type() {
        let bound =
            bind_placeholders("UPDATE t SET a = 1 WHERE id = ANY(:keys)", "bigint").unwrap();
        assert_eq!(
            bound.sql,
            "UPDATE t SET a = 1 WHERE id = ANY(($1::text[]::bigint[]))"
        );
        assert_eq!(bound.params, vec![Placeholder::Keys]);
    }

    #[test]
    fn numbers_parameters_by_first_use_and_reuses_them() {
        let bound = bind_placeholders(
            "UPDATE t SET a = 1 WHERE id BETWEEN :first_key AND :last_key AND :first_key IS NOT NULL",
            "uuid",
        )
        .unwrap();
        assert_eq!(
            bound.sql,
            "UPDATE t SET a = 1 WHERE id BETWEEN ($1::text::uuid) AND ($2::text::uuid) AND ($1::text::uuid) IS NOT NULL"
        );
        assert_eq!(
            bound.params,
            vec![Placeholder::FirstKey, Placeholder::LastKey]
        );
    }

    #[test]
    fn ignores_placeholders_in_literals_comments_and_casts() {
        let sql = "UPDATE t SET a = ':nope' || $q$ :nope $q$ || E'\\' :nope' -- :nope\n /* :nope /* :x */ */ , b = c::keys WHERE \":nope\" = 1 AND id = ANY(:keys)";
        let bound = bind_placeholders(sql, "int").unwrap();
        assert_eq!(bound.params, vec![Placeholder::Keys]);
        assert!(bound.sql.ends_with("id = ANY(($1::text[]::int[]))"));
        assert!(bound.sql.contains("':nope'"));
        assert!(bound.sql.contains("c::keys"));
    }

    #[test]
    fn positional_parameters_and_array_slices_are_not_placeholders() {
        let bound = bind_placeholders(
            "SELECT $1, arr[lo:hi], arr[1:2] WHERE id = ANY(:keys)",
            "int",
        )
        .unwrap();
        assert_eq!(bound.params, vec![Placeholder::Keys]);
        assert!(bound.sql.contains("arr[lo:hi]"));
    }

    #[test]
    fn a_typo_is_named() {
        let err = bind_placeholders("UPDATE t SET a = 1 WHERE id = ANY(:key)", "int").unwrap_err();
        assert_eq!(
            err,
            PlaceholderError::Unknown {
                name: "key".into(),
                offset: 34
            }
        );
        assert_eq!(
            err.to_string(),
            "batch_sql uses unknown placeholder :key at byte 34; the placeholders are :keys, :first_key and :last_key"
        );
    }

    #[test]
    fn missing_placeholder_is_refused() {
        let err = bind_placeholders("UPDATE t SET a = 1", "int").unwrap_err();
        assert_eq!(err, PlaceholderError::Missing);
        assert!(check_placeholders("UPDATE t SET a = ':keys'").is_err());
    }

    #[test]
    fn unterminated_text_is_reported() {
        let err =
            bind_placeholders("UPDATE t SET a = 'x WHERE id = ANY(:keys)", "int").unwrap_err();
        assert_eq!(
            err,
            PlaceholderError::Unterminated {
                what: "string literal",
                offset: 17
            }
        );
        let err =
            bind_placeholders("UPDATE t SET a = $x$ WHERE id = ANY(:keys)", "int").unwrap_err();
        assert_eq!(
            err,
            PlaceholderError::Unterminated {
                what: "dollar-quoted string",
                offset: 17
            }
        );
    }
}
