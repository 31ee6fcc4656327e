//! Classification of batch errors into what the worker does next.
//!
//! - [`ErrorClass::Transient`]: the database is busy, restarting or failing over.
//!   Back off, shrink, retry the same batch. Never written to `backfill.failed_rows`.
//! - [`ErrorClass::RowLevel`]: some row's data makes the statement fail. Bisect the
//!   batch (see [`crate::bisect`]) and set the failing keys aside.
//! - [`ErrorClass::JobLevel`]: the job definition cannot work (unknown table or column,
//!   bad SQL, missing privilege). The job goes `failed` with a clear `last_error`;
//!   other jobs carry on.
//!
//! The decision is driven by [`SQLSTATE_TABLE`]: exact codes first, then whole
//! SQLSTATE classes. What is not in the table is job-level, see [`classify`].

use std::fmt;

// Variant shorthands keep the table below readable.
use ErrorClass::{JobLevel, RowLevel, Transient};
use SqlstatePattern::{Class, Code};
use TransientKind::{
    AdminShutdown, ConnectionLost, Deadlock, LockTimeout, Other, QueryCanceled, ReadOnly,
    SerializationFailure, StatementTimeout, TooManyConnections,
};

/// What the worker does after a failed batch statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Back off, shrink the batch and retry it; no row is to blame.
    Transient(TransientKind),
    /// Some rows of the batch fail: bisect to isolate them.
    RowLevel,
    /// The job cannot run as defined: fail the job with a clear `last_error`.
    JobLevel,
}

impl ErrorClass {
    /// Stable label for metrics and logs: `transient`, `row_level` or `job_level`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient(_) => "transient",
            ErrorClass::RowLevel => "row_level",
            ErrorClass::JobLevel => "job_level",
        }
    }

    /// Whether the same batch should simply be retried later.
    pub const fn is_transient(self) -> bool {
        matches!(self, ErrorClass::Transient(_))
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorClass::Transient(kind) => write!(f, "transient ({kind})"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// Why a transient error happened; the throttle reacts differently to each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransientKind {
    /// `lock_timeout` fired, or a `NOWAIT` lock was refused (55P03).
    LockTimeout,
    /// The server broke a deadlock by aborting our statement (40P01).
    Deadlock,
    /// A serialization failure, including recovery conflicts (40001).
    SerializationFailure,
    /// `statement_timeout` fired (57014): the batch was too slow.
    StatementTimeout,
    /// We cancelled the statement ourselves, e.g. because it blocked production (57014).
    QueryCanceled,
    /// The server is shutting down, crashed or is starting up, or an operator
    /// terminated our backend (57P01, 57P02, 57P03).
    AdminShutdown,
    /// The connection is gone (class 08, session timeouts, or no SQLSTATE at all).
    ConnectionLost,
    /// The server is read-only, typically a primary demoted by a failover (25006).
    ReadOnly,
    /// The server refused a new connection: no slot left (53300).
    TooManyConnections,
    /// Any other transient condition (out of memory, disk full, snapshot too old…).
    Other,
}

impl TransientKind {
    /// Stable snake_case label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            TransientKind::LockTimeout => "lock_timeout",
            TransientKind::Deadlock => "deadlock",
            TransientKind::SerializationFailure => "serialization_failure",
            TransientKind::StatementTimeout => "statement_timeout",
            TransientKind::QueryCanceled => "query_canceled",
            TransientKind::AdminShutdown => "admin_shutdown",
            TransientKind::ConnectionLost => "connection_lost",
            TransientKind::ReadOnly => "read_only",
            TransientKind::TooManyConnections => "too_many_connections",
            TransientKind::Other => "other",
        }
    }
}

impl fmt::Display for TransientKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the driver told us, reduced to plain data so the core stays driver-free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorFacts<'a> {
    /// The server's five-character SQLSTATE, when the server answered at all.
    pub sqlstate: Option<&'a str>,
    /// The server's (or driver's) message text.
    pub message: &'a str,
    /// The connection is unusable: closed, reset, or could not be obtained.
    pub connection_closed: bool,
    /// We asked the server to cancel this statement (or abandoned it ourselves).
    pub canceled_by_us: bool,
}

/// Which SQLSTATEs a row of [`SQLSTATE_TABLE`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlstatePattern {
    /// Exactly this five-character code.
    Code(&'static str),
    /// Every code whose first two characters are this class.
    Class(&'static str),
}

impl SqlstatePattern {
    /// Whether `sqlstate` (a well-formed five-character code) falls under this pattern.
    fn matches(self, sqlstate: &str) -> bool {
        match self {
            SqlstatePattern::Code(code) => sqlstate.eq_ignore_ascii_case(code),
            SqlstatePattern::Class(class) => sqlstate[..2].eq_ignore_ascii_case(class),
        }
    }
}

/// SQLSTATE → class, first match wins: exact codes come before their class.
///
/// Codes and names follow PostgreSQL's `errcodes.txt`. 57014 is refined by
/// [`classify`] into a statement timeout or our own cancel.
pub const SQLSTATE_TABLE: &[(SqlstatePattern, ErrorClass)] = &[
    // --- Transient: contention. Retrying the same batch later succeeds.
    (Code("55P03"), Transient(LockTimeout)), // lock_not_available
    (Code("40P01"), Transient(Deadlock)),    // deadlock_detected
    (Code("40001"), Transient(SerializationFailure)), // serialization_failure
    // Other transaction rollbacks (e.g. 40003 statement_completion_unknown): the
    // server rolled us back, nothing says a row is to blame.
    (Class("40"), Transient(Other)),
    (Code("55006"), Transient(Other)), // object_in_use: held by another session
    // --- Transient: cancels and terminations.
    (Code("57014"), Transient(QueryCanceled)), // query_canceled, refined by the message
    (Code("57P01"), Transient(AdminShutdown)), // admin_shutdown (also pg_terminate_backend)
    (Code("57P02"), Transient(AdminShutdown)), // crash_shutdown
    (Code("57P03"), Transient(AdminShutdown)), // cannot_connect_now: starting or in recovery
    // database_dropped: the target database is gone, retrying cannot help.
    (Code("57P04"), JobLevel),
    (Code("57P05"), Transient(ConnectionLost)), // idle_session_timeout
    (Class("57"), Transient(Other)),            // operator_intervention
    // --- Transient: connection and server state.
    (Class("08"), Transient(ConnectionLost)), // connection_exception
    (Code("25006"), Transient(ReadOnly)),     // read_only_sql_transaction: failover
    // in_failed_sql_transaction means our own session missed a rollback; the rows are
    // innocent, so retry the batch on a clean transaction rather than blame them.
    (Code("25P02"), Transient(Other)),
    (Code("25P03"), Transient(ConnectionLost)), // idle_in_transaction_session_timeout
    (Code("25P04"), Transient(ConnectionLost)), // transaction_timeout (PostgreSQL 17)
    // Other invalid transaction states come from transaction control inside batch_sql.
    (Class("25"), JobLevel),
    (Code("53300"), Transient(TooManyConnections)), // too_many_connections
    (Class("53"), Transient(Other)), // insufficient_resources: disk full, out of memory
    (Code("58030"), Transient(Other)), // io_error
    (Code("72000"), Transient(Other)), // snapshot_too_old: a fresh snapshot will do
    // --- Row-level: the data of some rows makes the statement fail.
    (Class("09"), RowLevel), // triggered_action_exception
    (Class("20"), RowLevel), // case_not_found: a PL/pgSQL CASE met an unexpected value
    (Class("21"), RowLevel), // cardinality_violation, e.g. a subquery returned two rows
    (Class("22"), RowLevel), // data_exception: casts, division by zero, bad input
    (Class("23"), RowLevel), // integrity_constraint_violation
    (Class("27"), RowLevel), // triggered_data_change_violation
    (Class("2F"), RowLevel), // sql_routine_exception
    (Class("38"), RowLevel), // external_routine_exception
    (Class("39"), RowLevel), // external_routine_invocation_exception
    (Class("44"), RowLevel), // with_check_option_violation
    // program_limit_exceeded with a fixed cause in the statement text is job-level.
    (Code("54011"), JobLevel), // too_many_columns
    (Code("54023"), JobLevel), // too_many_arguments
    // Other limits (index row too large, array too large, stack depth) depend on the
    // rows or on the batch size; bisection isolates the former and applies the rest.
    (Class("54"), RowLevel),
    (Class("P0"), RowLevel), // raise_exception, no_data_found, too_many_rows, assert_failure
    // internal_error, data_corrupted, index_corrupted: mostly a damaged page or TOAST
    // value under specific rows. Set those keys aside for an operator rather than
    // retry forever or stop every other row of the job.
    (Class("XX"), RowLevel),
    // --- Job-level: the job definition cannot work, whatever the rows.
    (Code("42501"), JobLevel), // insufficient_privilege
    (Code("42P01"), JobLevel), // undefined_table
    (Code("42703"), JobLevel), // undefined_column
    (Code("42601"), JobLevel), // syntax_error
    (Code("42883"), JobLevel), // undefined_function
    (Code("42804"), JobLevel), // datatype_mismatch
    (Class("42"), JobLevel),   // syntax_error_or_access_rule_violation
    (Class("0A"), JobLevel),   // feature_not_supported
    (Class("28"), JobLevel),   // invalid_authorization_specification
    (Class("3D"), JobLevel),   // invalid_catalog_name
    (Class("3F"), JobLevel),   // invalid_schema_name
    (Code("55000"), JobLevel), // object_not_in_prerequisite_state, e.g. no replica identity
];

/// Decides what to do about a failed batch statement.
///
/// Rules, in order:
/// 1. A well-formed SQLSTATE is looked up in [`SQLSTATE_TABLE`].
///    - 57014 `query_canceled` says which cancel it was: `StatementTimeout` when
///      the message says "statement timeout" (the server knows which fired),
///      else `QueryCanceled` when `canceled_by_us`, else `Other` for another
///      session's cancel ("user request"), else `StatementTimeout`: an
///      unrecognised, e.g. translated, message is most likely the
///      `statement_timeout` armed on every batch.
///    - A row-level code on a closed connection becomes
///      `Transient(ConnectionLost)`: the server ended the session, which no row
///      causes, and bisection cannot go on without the transaction anyway.
/// 2. Without a SQLSTATE: a closed connection is `Transient(ConnectionLost)`; a
///    statement we cancelled or abandoned is `Transient(QueryCanceled)`.
/// 3. Anything else, an unknown SQLSTATE included, is `JobLevel`. An unknown error
///    must neither be retried silently forever (transient) nor copy every key of
///    the job into `failed_rows` (row-level); failing the job says so loudly with
///    the server's message, and a resumed job continues from its checkpoint.
pub fn classify(facts: &ErrorFacts) -> ErrorClass {
    let sqlstate = facts.sqlstate.filter(|code| is_well_formed(code));
    match sqlstate {
        Some(code) => match table_class(code) {
            Some(Transient(QueryCanceled)) => Transient(query_canceled_kind(facts)),
            Some(RowLevel) if facts.connection_closed => Transient(ConnectionLost),
            Some(class) => class,
            None => JobLevel,
        },
        None if facts.connection_closed => Transient(ConnectionLost),
        None if facts.canceled_by_us => Transient(QueryCanceled),
        None => JobLevel,
    }
}

/// Which cancel a 57014 `query_canceled` was; the rules are on [`classify`].
fn query_canceled_kind(facts: &ErrorFacts) -> TransientKind {
    if facts.message.contains("statement timeout") {
        StatementTimeout
    } else if facts.canceled_by_us {
        QueryCanceled
    } else if facts.message.contains("user request") {
        Other
    } else {
        StatementTimeout
    }
}

/// The table's verdict for a well-formed SQLSTATE, or `None` when no row covers it.
fn table_class(sqlstate: &str) -> Option<ErrorClass> {
    table_row(sqlstate).map(|row| SQLSTATE_TABLE[row].1)
}

/// Index of the first [`SQLSTATE_TABLE`] row covering `sqlstate`.
fn table_row(sqlstate: &str) -> Option<usize> {
    SQLSTATE_TABLE
        .iter()
        .position(|(pattern, _)| pattern.matches(sqlstate))
}

/// A SQLSTATE is five ASCII letters or digits; anything else is treated as absent.
fn is_well_formed(sqlstate: &str) -> bool {
    sqlstate.len() == 5 && sqlstate.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_sqlstate(sqlstate: &str) -> ErrorClass {
        classify(&ErrorFacts {
            sqlstate: Some(sqlstate),
            message: "some message",
            ..ErrorFacts::default()
        })
    }

    /// One real SQLSTATE per table row (and a few more), with the expected verdict.
    const CASES: &[(&str, ErrorClass)] = &[
        ("55P03", Transient(LockTimeout)),
        ("40P01", Transient(Deadlock)),
        ("40001", Transient(SerializationFailure)),
        ("40003", Transient(Other)),
        ("40000", Transient(Other)),
        ("55006", Transient(Other)),
        // 57014 with a neutral message and no cancel of ours: see the cancel tests.
        ("57014", Transient(StatementTimeout)),
        ("57P01", Transient(AdminShutdown)),
        ("57P02", Transient(AdminShutdown)),
        ("57P03", Transient(AdminShutdown)),
        ("57P04", JobLevel),
        ("57P05", Transient(ConnectionLost)),
        ("57000", Transient(Other)),
        ("08006", Transient(ConnectionLost)),
        ("08003", Transient(ConnectionLost)),
        ("08000", Transient(ConnectionLost)),
        ("25006", Transient(ReadOnly)),
        ("25P02", Transient(Other)),
        ("25P03", Transient(ConnectionLost)),
        ("25P04", Transient(ConnectionLost)),
        ("25001", JobLevel),
        ("53300", Transient(TooManyConnections)),
        ("53100", Transient(Other)),
        ("53200", Transient(Other)),
        ("58030", Transient(Other)),
        ("72000", Transient(Other)),
        ("09000", RowLevel),
        ("20000", RowLevel),
        ("21000", RowLevel),
        ("22012", RowLevel),
        ("22P02", RowLevel),
        ("22001", RowLevel),
        ("23505", RowLevel),
        ("23502", RowLevel),
        ("23503", RowLevel),
        ("23514", RowLevel),
        ("27000", RowLevel),
        ("2F005", RowLevel),
        ("38001", RowLevel),
        ("39P01", RowLevel),
        ("44000", RowLevel),
        ("54011", JobLevel),
        ("54023", JobLevel),
        ("54000", RowLevel),
        ("54001", RowLevel),
        ("P0001", RowLevel),
        ("P0002", RowLevel),
        ("P0003", RowLevel),
        ("P0004", RowLevel),
        ("XX000", RowLevel),
        ("XX001", RowLevel),
        ("42501", JobLevel),
        ("42P01", JobLevel),
        ("42703", JobLevel),
        ("42601", JobLevel),
        ("42883", JobLevel),
        ("42804", JobLevel),
        ("42P18", JobLevel),
        ("0A000", JobLevel),
        ("28P01", JobLevel),
        ("3D000", JobLevel),
        ("3F000", JobLevel),
        ("55000", JobLevel),
    ];

    #[test]
    fn every_case_gets_its_class() {
        for &(sqlstate, expected) in CASES {
            assert_eq!(with_sqlstate(sqlstate), expected, "SQLSTATE {sqlstate}");
        }
    }

    #[test]
    fn every_table_row_is_exercised_by_a_case() {
        for (row, (pattern, _)) in SQLSTATE_TABLE.iter().enumerate() {
            let hit = CASES.iter().any(|(code, _)| table_row(code) == Some(row));
            assert!(hit, "no test case reaches table row {row} ({pattern:?})");
        }
    }

    #[test]
    fn table_is_well_formed_and_no_row_is_shadowed() {
        for (row, (pattern, _)) in SQLSTATE_TABLE.iter().enumerate() {
            match *pattern {
                Code(code) => {
                    assert!(is_well_formed(code), "row {row}: bad code {code:?}");
                    assert_eq!(code, code.to_ascii_uppercase(), "row {row}");
                    // An earlier row matching this code would make this row dead.
                    assert_eq!(table_row(code), Some(row), "row {row}: {code} is shadowed");
                }
                Class(class) => {
                    assert_eq!(class.len(), 2, "row {row}: bad class {class:?}");
                    assert_eq!(class, class.to_ascii_uppercase(), "row {row}");
                    let earlier = &SQLSTATE_TABLE[..row];
                    assert!(
                        !earlier.iter().any(|(p, _)| p == pattern),
                        "row {row}: class {class} listed twice"
                    );
                    // Exact codes of this class must all come before it.
                    let later = &SQLSTATE_TABLE[row + 1..];
                    assert!(
                        !later
                            .iter()
                            .any(|(p, _)| matches!(p, Code(c) if c.starts_with(class))),
                        "row {row}: a code of class {class} comes after the class"
                    );
                }
            }
        }
    }

    #[test]
    fn sqlstate_is_matched_case_insensitively() {
        assert_eq!(with_sqlstate("p0001"), RowLevel);
        assert_eq!(with_sqlstate("55p03"), Transient(LockTimeout));
    }

    #[test]
    fn statement_timeout_is_told_from_our_cancel() {
        let timeout = ErrorFacts {
            sqlstate: Some("57014"),
            message: "canceling statement due to statement timeout",
            ..ErrorFacts::default()
        };
        assert_eq!(classify(&timeout), Transient(StatementTimeout));

        let ours = ErrorFacts {
            message: "canceling statement due to user request",
            canceled_by_us: true,
            ..timeout
        };
        assert_eq!(classify(&ours), Transient(QueryCanceled));

        // The server says which cancel fired when both raced.
        let raced = ErrorFacts {
            canceled_by_us: true,
            ..timeout
        };
        assert_eq!(classify(&raced), Transient(StatementTimeout));

        let someone_else = ErrorFacts {
            canceled_by_us: false,
            ..ours
        };
        assert_eq!(classify(&someone_else), Transient(Other));

        let translated = ErrorFacts {
            message: "Anfrage wird storniert wegen Zeitüberschreitung der Anweisung",
            ..timeout
        };
        assert_eq!(classify(&translated), Transient(StatementTimeout));
    }

    #[test]
    fn without_sqlstate_a_closed_connection_is_connection_loss() {
        let facts = ErrorFacts {
            message: "connection closed",
            connection_closed: true,
            ..ErrorFacts::default()
        };
        assert_eq!(classify(&facts), Transient(ConnectionLost));
        // Even if we had cancelled: the connection is what we must recover.
        let canceled = ErrorFacts {
            canceled_by_us: true,
            ..facts
        };
        assert_eq!(classify(&canceled), Transient(ConnectionLost));
    }

    #[test]
    fn without_sqlstate_our_own_abandon_is_a_cancel() {
        let facts = ErrorFacts {
            message: "statement abandoned",
            canceled_by_us: true,
            ..ErrorFacts::default()
        };
        assert_eq!(classify(&facts), Transient(QueryCanceled));
    }

    #[test]
    fn without_sqlstate_anything_else_is_job_level() {
        let facts = ErrorFacts {
            message: "error serializing parameter 0",
            ..ErrorFacts::default()
        };
        assert_eq!(classify(&facts), JobLevel);
    }

    #[test]
    fn unknown_sqlstate_is_job_level() {
        assert_eq!(with_sqlstate("ZZ999"), JobLevel);
        assert_eq!(with_sqlstate("HV000"), JobLevel);
        assert_eq!(with_sqlstate("2D000"), JobLevel);
    }

    #[test]
    fn malformed_sqlstate_counts_as_absent() {
        for bad in ["", "22", "2201", "220123", "22-12", "22é1"] {
            assert_eq!(with_sqlstate(bad), JobLevel, "{bad:?}");
            let closed = ErrorFacts {
                sqlstate: Some(bad),
                connection_closed: true,
                ..ErrorFacts::default()
            };
            assert_eq!(classify(&closed), Transient(ConnectionLost), "{bad:?}");
        }
    }

    #[test]
    fn closed_connection_overrides_only_row_level() {
        let closed = |sqlstate| ErrorFacts {
            sqlstate: Some(sqlstate),
            connection_closed: true,
            ..ErrorFacts::default()
        };
        assert_eq!(classify(&closed("XX000")), Transient(ConnectionLost));
        assert_eq!(classify(&closed("57P01")), Transient(AdminShutdown));
        assert_eq!(classify(&closed("3D000")), JobLevel);
    }

    #[test]
    fn labels_are_stable() {
        assert_eq!(Transient(ReadOnly).as_str(), "transient");
        assert_eq!(RowLevel.as_str(), "row_level");
        assert_eq!(JobLevel.as_str(), "job_level");
        assert!(Transient(Deadlock).is_transient());
        assert!(!RowLevel.is_transient());
        let kinds = [
            (LockTimeout, "lock_timeout"),
            (Deadlock, "deadlock"),
            (SerializationFailure, "serialization_failure"),
            (StatementTimeout, "statement_timeout"),
            (QueryCanceled, "query_canceled"),
            (AdminShutdown, "admin_shutdown"),
            (ConnectionLost, "connection_lost"),
            (ReadOnly, "read_only"),
            (TooManyConnections, "too_many_connections"),
            (Other, "other"),
        ];
        for (kind, label) in kinds {
            assert_eq!(kind.as_str(), label);
            assert_eq!(kind.to_string(), label);
        }
        assert_eq!(Transient(Deadlock).to_string(), "transient (deadlock)");
    }
}
