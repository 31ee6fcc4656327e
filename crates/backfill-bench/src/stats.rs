//! Percentiles and peaks of measured series.

/// The `p`-th percentile (0..=100) of `values` by the nearest-rank method, `None` when empty.
///
/// Nearest rank rather than interpolation: the result is always a value that was
/// measured, so "p99 = 12 ms" means some transaction really took 12 ms.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The largest of `values`, `None` when empty.
pub fn peak(values: &[f64]) -> Option<f64> {
    values.iter().copied().reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&values, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn peak_of_unsorted_values() {
        assert_eq!(peak(&[3.0, 9.5, 1.0]), Some(9.5));
        assert_eq!(peak(&[]), None);
    }
}
