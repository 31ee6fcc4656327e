//! Unit and property tests of [`Bisection`]: the guarantees of the module docs, checked
//! exhaustively on small batches and by property on large ones.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

/// Runs a bisection of `len` keys to the end, answering each `Try` with
/// `fails(range)`, and checks the invariants that hold whatever the answers:
/// tried ranges are non-empty, inside the batch and never overlap an applied
/// index; at the end every index is applied or failed, exactly once.
fn drive(len: usize, mut fails: impl FnMut(&Range<usize>) -> bool) -> Bisection<usize> {
    let mut bisection = Bisection::new(len);
    let mut applied_so_far = vec![false; len];
    while let BisectStep::Try(range) = bisection.next_step() {
        assert!(!range.is_empty() && range.end <= len, "bad range {range:?}");
        assert!(
            !range.clone().any(|i| applied_so_far[i]),
            "{range:?} overlaps applied keys"
        );
        assert_eq!(bisection.next_step(), BisectStep::Try(range.clone()));
        if fails(&range) {
            bisection.report_failed(range.start);
        } else {
            applied_so_far[range.clone()]
                .iter_mut()
                .for_each(|a| *a = true);
            bisection.report_ok();
        }
        assert_regret_lemma(&bisection, len);
        assert_resolved_prefix(&bisection);
    }
    assert!(bisection.is_done());
    assert_eq!(bisection.next_step(), BisectStep::Done);
    assert_partition(&bisection, len);
    bisection
}

/// The two steps of the linear bound (module docs): at most `d - 1` multi-key
/// ranges wait untried, so regret never exceeds the budget `3d` plus `d - 1`.
fn assert_regret_lemma<E>(bisection: &Bisection<E>, len: usize) {
    let d = ceil_log2(len);
    let waiting_untried = bisection
        .pending
        .iter()
        .filter(|p| p.knowledge == Knowledge::Untried && p.range.len() >= 2)
        .count();
    assert!(
        waiting_untried <= d.saturating_sub(1),
        "{waiting_untried} waiting, d={d}"
    );
    let regret_ceiling = (REGRET_BUDGET_PER_LEVEL * d + d).saturating_sub(1);
    assert!(
        bisection.statements_tried <= bisection.resolved + regret_ceiling,
        "regret over {regret_ceiling}"
    );
}

/// What is resolved lies inside `0..resolved_prefix()` and fills it: with the
/// final partition check, that makes it exactly the prefix at every step.
fn assert_resolved_prefix<E>(bisection: &Bisection<E>) {
    let prefix = bisection.resolved_prefix();
    let applied: usize = bisection.applied().iter().map(Range::len).sum();
    assert_eq!(applied + bisection.failed().len(), prefix);
    assert!(bisection.applied().iter().all(|r| r.end <= prefix));
    assert!(bisection.failed().iter().all(|(i, _)| *i < prefix));
}

/// Every index exactly once in `applied` or `failed`, both ascending.
fn assert_partition(bisection: &Bisection<usize>, len: usize) {
    let mut seen = vec![0u8; len];
    let mut previous_end = None;
    for range in bisection.applied() {
        assert!(!range.is_empty());
        if let Some(end) = previous_end {
            assert!(
                range.start > end,
                "applied ranges not ascending or not merged"
            );
        }
        previous_end = Some(range.end);
        range.clone().for_each(|i| seen[i] += 1);
    }
    for pair in bisection.failed().windows(2) {
        assert!(pair[0].0 < pair[1].0, "failed indexes not ascending");
    }
    for &(index, error) in bisection.failed() {
        assert_eq!(index, error, "a failing key's error is its own");
        seen[index] += 1;
    }
    assert!(seen.iter().all(|&count| count == 1), "not a partition");
}

/// Bisection against a fixed set of failing keys: a range fails iff it holds one.
fn drive_oracle(len: usize, bad: &BTreeSet<usize>) -> Bisection<usize> {
    let bisection = drive(len, |range| bad.range(range.clone()).next().is_some());
    let failed: BTreeSet<usize> = bisection.failed().iter().map(|&(i, _)| i).collect();
    assert_eq!(&failed, bad, "exactly the failing keys are isolated");
    for range in bisection.applied() {
        assert!(bad.range(range.clone()).next().is_none());
    }
    bisection
}

/// The guaranteed bounds of the module docs, for a deterministic bad set.
fn assert_bounds(len: usize, bad: &BTreeSet<usize>, bisection: &Bisection<usize>) {
    let d = ceil_log2(len);
    let k = bad.len();
    let statements = bisection.statements_tried();
    assert!(
        statements <= len + 4 * d,
        "n={len} k={k}: {statements} > n + 4d"
    );
    if len >= 2 && (1..=d + 1).contains(&k) {
        assert!(
            statements <= 2 * k * d,
            "n={len} k={k}: {statements} > 2kd = {}",
            2 * k * d
        );
        assert!(!bisection.walked_key_by_key());
    }
}

/// Deterministic pseudo-random numbers (SplitMix64) for reproducible bad sets.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_set(len: usize, count: usize, seed: u64) -> BTreeSet<usize> {
    let mut state = seed;
    let mut set = BTreeSet::new();
    while set.len() < count {
        set.insert((splitmix(&mut state) % len as u64) as usize);
    }
    set
}

#[test]
fn ceil_log2_is_the_halving_depth() {
    let expected = [
        (0, 0),
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 2),
        (5, 3),
        (1000, 10),
        (1024, 10),
    ];
    for (n, depth) in expected {
        assert_eq!(ceil_log2(n), depth, "n={n}");
    }
}

#[test]
fn empty_batch_is_done_at_once() {
    let mut bisection: Bisection<()> = Bisection::new(0);
    assert_eq!(bisection.next_step(), BisectStep::Done);
    assert!(bisection.applied().is_empty() && bisection.failed().is_empty());
}

#[test]
fn single_key_is_tried_once_to_capture_its_error() {
    let mut bisection = Bisection::new(1);
    assert_eq!(bisection.next_step(), BisectStep::Try(0..1));
    bisection.report_failed("boom");
    assert_eq!(bisection.next_step(), BisectStep::Done);
    assert_eq!(bisection.failed(), &[(0, "boom")]);
    assert_eq!(bisection.statements_tried(), 1);
}

#[test]
fn walks_a_small_batch_step_by_step() {
    // Keys 0..4, key 2 fails: try 0..2 (ok), so 2..4 fails: try 2 (fails), try 3 (ok).
    let mut bisection = Bisection::new(4);
    assert_eq!(bisection.next_step(), BisectStep::Try(0..2));
    bisection.report_ok();
    assert_eq!(bisection.next_step(), BisectStep::Try(2..3));
    bisection.report_failed("bad row");
    assert_eq!(bisection.next_step(), BisectStep::Try(3..4));
    bisection.report_ok();
    assert_eq!(bisection.next_step(), BisectStep::Done);
    assert_eq!(bisection.applied(), &[0..2, 3..4]);
    assert_eq!(bisection.failed(), &[(2, "bad row")]);
    assert_eq!(bisection.statements_tried(), 3);
    assert!(!bisection.walked_key_by_key());
    let (applied, failed) = bisection.into_parts();
    assert_eq!((applied.len(), failed.len()), (2, 1));
}

#[test]
fn a_key_that_applies_alone_is_applied() {
    // Keys fail only together (e.g. two rows colliding on a unique value).
    let bisection = drive(8, |range| range.len() == 8);
    assert_eq!(bisection.applied(), std::slice::from_ref(&(0..8)));
    assert!(bisection.failed().is_empty());
}

#[test]
#[should_panic(expected = "without a range awaiting it")]
fn reporting_without_a_try_panics() {
    let mut bisection: Bisection<()> = Bisection::new(4);
    bisection.report_ok();
}

/// Statement counts for a batch of 1000 keys (d = 10, bounds: 2kd for k ≤ 11,
/// n + 4d = 1040 always). The exact counts pin today's efficiency.
#[test]
fn statement_counts_for_a_batch_of_1000() {
    let n = 1000;
    let single = |i| BTreeSet::from([i]);
    let cases: Vec<(&str, BTreeSet<usize>, usize)> = vec![
        ("1 bad key, first", single(0), 18),
        ("1 bad key, middle", single(500), 17),
        ("1 bad key, last", single(999), 11),
        (
            "10 bad keys, spread evenly",
            (0..10).map(|i| 50 + 100 * i).collect(),
            120,
        ),
        ("10 bad keys, random", random_set(n, 10, 7), 113),
        ("50 adjacent bad keys, first", (0..50).collect(), 99),
        ("50 adjacent bad keys, middle", (475..525).collect(), 118),
        ("50 random bad keys", random_set(n, 50, 11), 379),
        (
            "every other key bad (50%)",
            (0..n).step_by(2).collect(),
            1037,
        ),
        ("50% random bad keys", random_set(n, 500, 13), 1036),
        ("all keys bad", (0..n).collect(), 1037),
    ];
    let mut report = String::new();
    for (name, bad, expected) in cases {
        let bisection = drive_oracle(n, &bad);
        assert_bounds(n, &bad, &bisection);
        let statements = bisection.statements_tried();
        report.push_str(&format!(
            "{name}: k={} statements={statements}\n",
            bad.len()
        ));
        assert_eq!(statements, expected, "{name}\n{report}");
    }
    println!("{report}");
}

#[test]
fn one_bad_key_anywhere_costs_at_most_two_per_level() {
    let n = 1000;
    let worst = (0..n)
        .map(|i| drive_oracle(n, &BTreeSet::from([i])).statements_tried())
        .max();
    assert!(worst <= Some(2 * ceil_log2(n)), "{worst:?}");
}

#[test]
fn every_bad_set_of_small_batches_meets_the_bounds() {
    for n in 1..=12 {
        for mask in 1u32..(1 << n) {
            let bad: BTreeSet<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
            let bisection = drive_oracle(n, &bad);
            assert_bounds(n, &bad, &bisection);
        }
    }
}

/// Highest regret (statements minus resolved keys) of plain halving, without
/// the key-by-key fallback, against a fixed bad set.
fn plain_halving_max_regret(len: usize, bad: &BTreeSet<usize>) -> usize {
    let mut bisection = Bisection::new(len);
    bisection.regret_budget = usize::MAX / 2;
    let mut max_regret = 0;
    while let BisectStep::Try(range) = bisection.next_step() {
        if bad.range(range).next().is_some() {
            bisection.report_failed(());
        } else {
            bisection.report_ok();
        }
        let regret = bisection
            .statements_tried
            .saturating_sub(bisection.resolved);
        max_regret = max_regret.max(regret);
    }
    max_regret
}

/// The lemma behind the sparse bound: plain halving never runs more than
/// `d + 2k - 3` statements ahead of the keys it resolved, so for `k ≤ d + 1`
/// it stays under the budget `3d` and the fallback never engages.
fn assert_halving_regret_lemma(len: usize, bad: &BTreeSet<usize>) {
    let ceiling = (ceil_log2(len) + 2 * bad.len()).saturating_sub(3);
    let regret = plain_halving_max_regret(len, bad);
    assert!(
        regret <= ceiling,
        "n={len} bad={bad:?}: regret {regret} > {ceiling}"
    );
}

#[test]
fn halving_regret_lemma_holds_for_every_small_batch() {
    for n in 2..=12 {
        for mask in 1u32..(1 << n) {
            let bad: BTreeSet<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
            assert_halving_regret_lemma(n, &bad);
        }
    }
}

#[test]
fn fallback_stays_off_for_adversarial_few_bad_keys() {
    // Shapes that maximise regret for k = d + 1: clusters, pairs, one per block.
    let n = 1024;
    let d = ceil_log2(n);
    let shapes: Vec<BTreeSet<usize>> = vec![
        (0..d + 1).collect(),
        (n - d - 1..n).collect(),
        (0..d + 1).map(|i| 4 * i + 3).collect(),
        (0..d + 1).map(|i| 2 * i).collect(),
        (0..d + 1).map(|i| (1 << i) - 1).collect(),
    ];
    for bad in shapes {
        assert_halving_regret_lemma(n, &bad);
        let bisection = drive_oracle(n, &bad);
        assert_bounds(n, &bad, &bisection);
    }
}

/// A bad set of a chosen density over a batch of up to 2000 keys.
fn batch_and_bad_set() -> impl Strategy<Value = (usize, BTreeSet<usize>)> {
    (1usize..=2000, 0u32..=100).prop_flat_map(|(len, percent)| {
        let bad = proptest::collection::vec(0..100u32, len).prop_map(move |draws| {
            draws
                .iter()
                .enumerate()
                .filter(|&(_, &draw)| draw < percent)
                .map(|(i, _)| i)
                .collect::<BTreeSet<usize>>()
        });
        (Just(len), bad)
    })
}

/// A batch with few failing keys (1 ≤ k ≤ d + 1), where 2kd is guaranteed.
fn batch_and_sparse_bad_set() -> impl Strategy<Value = (usize, BTreeSet<usize>)> {
    (2usize..=2000).prop_flat_map(|len| {
        let d = ceil_log2(len);
        let bad = proptest::collection::btree_set(0..len, 1..=(d + 1).min(len));
        (Just(len), bad)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn isolates_exactly_the_bad_keys_within_bounds((len, bad) in batch_and_bad_set()) {
        if !bad.is_empty() {
            let bisection = drive_oracle(len, &bad);
            assert_bounds(len, &bad, &bisection);
        }
    }

    #[test]
    fn sparse_failures_cost_at_most_two_per_level_per_key(
        (len, bad) in batch_and_sparse_bad_set()
    ) {
        assert_halving_regret_lemma(len, &bad);
        let bisection = drive_oracle(len, &bad);
        assert_bounds(len, &bad, &bisection);
    }

    #[test]
    fn clustered_failures_stay_linear(
        len in 2usize..=2000,
        start_percent in 0usize..100,
        cluster_percent in 1usize..=100,
    ) {
        let start = len * start_percent / 100;
        let end = (start + (len * cluster_percent).div_ceil(100)).min(len);
        let bad: BTreeSet<usize> = (start..end.max(start + 1)).collect();
        let bisection = drive_oracle(len, &bad);
        assert_bounds(len, &bad, &bisection);
    }

    #[test]
    fn any_answers_keep_the_partition_and_stay_linear(
        len in 0usize..=2000,
        answers in proptest::collection::vec(any::<bool>(), 1..64),
    ) {
        // Answers unrelated to any bad set: flaky or interacting rows.
        let mut next = answers.iter().copied().cycle();
        let bisection = drive(len, |_| next.next().unwrap_or(true));
        prop_assert!(bisection.statements_tried() <= len + 4 * ceil_log2(len));
    }
}
