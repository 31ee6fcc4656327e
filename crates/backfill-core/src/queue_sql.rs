//! SQL fragments on the `backfill` schema that both planes use, written once: the control
//! plane (sqlx) and the data plane (tokio-postgres) must agree on them to the letter.

/// The rule for a failed row (aliased `f`) being eligible for a retry, with the job's
/// `max_attempts` as parameter `$n`: attempts left, and either an error (a verification
/// failure would compute the same disagreeing values again) or attempts reset to 0 by
/// `backfill.retry_failed()` after someone fixed the data or the job.
pub fn retry_eligible(max_attempts_param: u8) -> String {
    format!("f.attempts < ${max_attempts_param} AND (f.reason = 'error' OR f.attempts = 0)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_rule_names_its_parameter() {
        assert_eq!(
            retry_eligible(2),
            "f.attempts < $2 AND (f.reason = 'error' OR f.attempts = 0)"
        );
    }
}
