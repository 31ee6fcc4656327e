//! Planning a job's slices: where to cut its key range, how many rows each
//! slice is expected to hold, each slice's share of the job's rate budget, and each job's
//! share of the duty cycle next to production.

/// The cumulative fractions at which to cut a job into `parallelism` slices
/// of equal row counts: `[1/n, 2/n, …, (n-1)/n]`.
pub fn cut_fractions(parallelism: u32) -> Vec<f64> {
    let n = parallelism.max(1);
    (1..n).map(|i| f64::from(i) / f64::from(n)).collect()
}

/// Cut keys from sampled quantiles: duplicates (few distinct keys, tiny
/// tables) are dropped, so no slice is empty by construction. `quantiles` are in
/// key order, as the database returned them.
pub fn distinct_cuts(quantiles: Vec<String>) -> Vec<String> {
    let mut cuts = quantiles;
    cuts.dedup();
    cuts
}

/// Splits `pending` rows over `slices` slices as evenly as integers allow.
pub fn even_estimates(pending: i64, slices: usize) -> Vec<i64> {
    let slices = slices.max(1);
    let pending = pending.max(0);
    let base = pending / slices as i64;
    let extra = (pending % slices as i64) as usize;
    (0..slices).map(|i| base + i64::from(i < extra)).collect()
}

/// One slice's part of the job's rows-per-second budget while `active` slices run.
pub fn rate_share(budget: Option<f64>, active: i64) -> Option<f64> {
    budget.map(|b| b / active.max(1) as f64)
}

/// One job's part of the duty cycle next to production (see [`crate::activity`]) while
/// `running` jobs and slices run; 1 (sharing off) stays off.
pub fn duty_share(duty_cycle: f64, running: i64) -> f64 {
    if duty_cycle >= 1.0 {
        1.0
    } else {
        duty_cycle / running.max(1) as f64
    }
}

/// Rows a running slice must have left before an idle worker splits it: enough
/// to keep both workers busy for several batches.
pub fn steal_threshold(max_batch_size: u32) -> i64 {
    4 * i64::from(max_batch_size.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_cut_into_equal_parts() {
        assert_eq!(cut_fractions(4), vec![0.25, 0.5, 0.75]);
        assert!(cut_fractions(1).is_empty());
        assert!(cut_fractions(0).is_empty());
    }

    #[test]
    fn duplicate_cuts_are_dropped() {
        let cuts = distinct_cuts(vec!["1".into(), "1".into(), "7".into(), "7".into()]);
        assert_eq!(cuts, vec!["1".to_string(), "7".to_string()]);
    }

    #[test]
    fn estimates_add_up_and_differ_by_at_most_one() {
        let estimates = even_estimates(1_000_003, 4);
        assert_eq!(estimates.iter().sum::<i64>(), 1_000_003);
        assert!(estimates.iter().max().unwrap() - estimates.iter().min().unwrap() <= 1);
        assert_eq!(even_estimates(-5, 2), vec![0, 0]);
    }

    #[test]
    fn the_budget_is_shared_among_active_slices() {
        assert_eq!(rate_share(Some(1000.0), 4), Some(250.0));
        assert_eq!(rate_share(Some(1000.0), 0), Some(1000.0));
        assert_eq!(rate_share(None, 4), None);
    }

    #[test]
    fn the_duty_cycle_is_shared_among_running_jobs_unless_sharing_is_off() {
        assert_eq!(duty_share(0.2, 4), 0.05);
        assert_eq!(duty_share(0.2, 0), 0.2);
        assert_eq!(duty_share(1.0, 4), 1.0);
    }

    #[test]
    fn only_large_remainders_are_stolen() {
        assert_eq!(steal_threshold(10_000), 40_000);
        assert_eq!(steal_threshold(0), 4);
    }
}
