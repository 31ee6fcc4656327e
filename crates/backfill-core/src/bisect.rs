//! Isolating the failing keys of a batch that failed with a row-level error.
//!
//! [`Bisection`] is a pure state machine over key *indexes* `0..len`; the data
//! plane owns the keys and the database. It asks [`Bisection::next_step`] for a
//! sub-range, runs the batch statement on those keys inside a savepoint, and
//! reports [`Bisection::report_ok`] (savepoint released: the keys are applied) or
//! [`Bisection::report_failed`] with the row-level error (rolled back to the
//! savepoint). A transient or job-level error is not reported here: it aborts the
//! whole batch transaction, and with it the bisection.
//!
//! # Strategy
//!
//! Ranges are resolved left to right, depth first. A range known to contain a
//! failing key is split in halves and the left half is tried; when the left half
//! applies, the right half must hold the failure, so it is split without being
//! tried. A single key is always tried on its own, both to make sure it fails
//! alone and to capture its error.
//!
//! Halving costs up to two statements per level for every failing key, which is
//! cheap when failures are sparse and about `2n` statements when every key fails.
//! To stay linear the machine keeps a *regret*: statements run minus keys
//! resolved, i.e. how far it is behind simply trying every key alone. Once the
//! regret reaches a budget of `3·⌈log2 n⌉`, ranges known to fail are walked key by
//! key instead of halved; untried ranges are still tried whole, and each success
//! pays regret back, so halving resumes after a dense cluster of failures.
//!
//! # Guarantees
//!
//! With `n = len` and `d = ⌈log2 n⌉`:
//! - Every index ends up exactly once, either in [`Bisection::applied`] or in
//!   [`Bisection::failed`], and no index is handed out again once applied, so no
//!   key is applied twice. This holds whatever the statements report.
//! - At most `n + 4d` statements, whatever they report: linear even when every key
//!   fails. (Regret grows only by failing multi-key statements; halving stops at
//!   the budget `3d`, and past it only the at most `d - 1` multi-key ranges already
//!   waiting can fail whole. At the end `statements = n + regret`.)
//! - When failures are deterministic (a range fails exactly when it holds one of
//!   `k ≥ 1` failing keys), `n ≥ 2` and `k ≤ d + 1`: at most `2·k·d` statements,
//!   as in plain bisection. Every tried range is a half of a range holding a
//!   failing key, and there are at most `k·d` of those; depth-first halving keeps
//!   regret at most `d + 2k - 3`, under the budget, so the fallback never engages.
//!
//! The statement that failed for the whole batch before [`Bisection::new`] is not
//! counted; a batch of one key costs one statement, to capture its error.

use std::ops::Range;

/// Regret budget per level of halving (`⌈log2 n⌉` levels); see the module docs.
const REGRET_BUDGET_PER_LEVEL: usize = 3;

/// What the data plane does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BisectStep {
    /// Run the batch statement on the keys at these indexes, inside a savepoint,
    /// then report the outcome.
    Try(Range<usize>),
    /// Every index is resolved: applied or isolated as failing.
    Done,
}

/// Drives the isolation of failing keys in a batch of `len` keys; see the module docs.
#[derive(Debug, Clone)]
pub struct Bisection<E> {
    /// Unresolved ranges, disjoint, leftmost on top.
    pending: Vec<Pending>,
    /// The range handed out by `next_step`, awaiting its report.
    in_flight: Option<InFlight>,
    /// Applied ranges, ascending, adjacent ones merged.
    applied: Vec<Range<usize>>,
    /// Isolated failing indexes with their errors, ascending.
    failed: Vec<(usize, E)>,
    statements_tried: usize,
    /// Indexes applied or isolated so far.
    resolved: usize,
    /// Once `statements_tried - resolved` reaches this, stop halving.
    regret_budget: usize,
    walked_key_by_key: bool,
}

/// An unresolved range and what is known about it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    range: Range<usize>,
    knowledge: Knowledge,
}

/// What is known about a pending range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Knowledge {
    /// Never tried: it may apply as a whole.
    Untried,
    /// Holds at least one failing key and at least two keys: to be split or walked.
    Failing,
    /// The rest of a key-by-key walk.
    KeyByKey,
}

/// The range handed out, awaiting its report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    range: Range<usize>,
    /// Left half of a failing range: if it applies, the right half (on top of
    /// `pending`) is known to fail.
    right_half_fails_if_ok: bool,
}

impl<E> Bisection<E> {
    /// Starts after the whole batch `0..len` failed with a row-level error.
    pub fn new(len: usize) -> Self {
        // A single key must still be tried alone to capture its error.
        let knowledge = if len >= 2 {
            Knowledge::Failing
        } else {
            Knowledge::Untried
        };
        let pending = if len == 0 {
            Vec::new()
        } else {
            vec![Pending {
                range: 0..len,
                knowledge,
            }]
        };
        Bisection {
            pending,
            in_flight: None,
            applied: Vec::new(),
            failed: Vec::new(),
            statements_tried: 0,
            resolved: 0,
            regret_budget: REGRET_BUDGET_PER_LEVEL * ceil_log2(len),
            walked_key_by_key: false,
        }
    }

    /// The next range to try, or `Done`. Asking again before reporting returns the
    /// same range.
    pub fn next_step(&mut self) -> BisectStep {
        if let Some(in_flight) = &self.in_flight {
            return BisectStep::Try(in_flight.range.clone());
        }
        let Some(Pending { range, knowledge }) = self.pending.pop() else {
            return BisectStep::Done;
        };
        let in_flight = match knowledge {
            Knowledge::Untried => InFlight {
                range,
                right_half_fails_if_ok: false,
            },
            Knowledge::Failing if self.within_regret_budget() => {
                let middle = range.start + range.len() / 2;
                self.pending.push(Pending {
                    range: middle..range.end,
                    knowledge: Knowledge::Untried,
                });
                InFlight {
                    range: range.start..middle,
                    right_half_fails_if_ok: true,
                }
            }
            Knowledge::Failing | Knowledge::KeyByKey => {
                self.walked_key_by_key = true;
                let first = range.start;
                if range.len() > 1 {
                    self.pending.push(Pending {
                        range: first + 1..range.end,
                        knowledge: Knowledge::KeyByKey,
                    });
                }
                InFlight {
                    range: first..first + 1,
                    right_half_fails_if_ok: false,
                }
            }
        };
        let step = BisectStep::Try(in_flight.range.clone());
        self.in_flight = Some(in_flight);
        step
    }

    /// The last range handed out applied: its keys are done.
    ///
    /// # Panics
    /// If no range is awaiting a report.
    #[track_caller]
    pub fn report_ok(&mut self) {
        let InFlight {
            range,
            right_half_fails_if_ok,
        } = self.take_in_flight();
        if right_half_fails_if_ok {
            // The parent failed and this half did not, so the failure is in the
            // other half: split it without spending a statement on it. A single
            // key stays untried, as it must run alone anyway.
            if let Some(right_half) = self.pending.last_mut() {
                if right_half.range.len() >= 2 {
                    right_half.knowledge = Knowledge::Failing;
                }
            }
        }
        self.resolved += range.len();
        match self.applied.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => self.applied.push(range),
        }
    }

    /// The last range handed out failed with a row-level error. For a single key
    /// the error is kept as that key's; for a larger range it is dropped.
    ///
    /// # Panics
    /// If no range is awaiting a report.
    #[track_caller]
    pub fn report_failed(&mut self, err: E) {
        let InFlight { range, .. } = self.take_in_flight();
        if range.len() == 1 {
            self.resolved += 1;
            self.failed.push((range.start, err));
        } else {
            self.pending.push(Pending {
                range,
                knowledge: Knowledge::Failing,
            });
        }
    }

    /// Applied index ranges, ascending, disjoint, adjacent ranges merged.
    pub fn applied(&self) -> &[Range<usize>] {
        &self.applied
    }

    /// Isolated failing indexes with their errors, ascending.
    pub fn failed(&self) -> &[(usize, E)] {
        &self.failed
    }

    /// Statements reported so far, not counting the whole-batch statement before `new`.
    pub fn statements_tried(&self) -> usize {
        self.statements_tried
    }

    /// Whether failures were dense enough that some keys were tried one by one
    /// instead of by halving (worth a log line: the batch mostly fails).
    pub fn walked_key_by_key(&self) -> bool {
        self.walked_key_by_key
    }

    /// How many leading indexes are resolved. Ranges are resolved left to right, so
    /// the applied and failed indexes are always exactly `0..resolved_prefix()`: a
    /// caller that must stop early (say, to bound the savepoints of one transaction)
    /// can keep that prefix and hand the rest of the keys to another batch.
    pub fn resolved_prefix(&self) -> usize {
        self.resolved
    }

    /// Whether every index is resolved.
    pub fn is_done(&self) -> bool {
        self.in_flight.is_none() && self.pending.is_empty()
    }

    /// Consumes the machine, returning the applied ranges and the failing keys.
    pub fn into_parts(self) -> (Vec<Range<usize>>, Vec<(usize, E)>) {
        (self.applied, self.failed)
    }

    /// Whether halving is still cheaper than having tried every key alone, give or
    /// take the budget. Written without subtraction: regret may be negative.
    fn within_regret_budget(&self) -> bool {
        self.statements_tried < self.resolved + self.regret_budget
    }

    #[track_caller]
    fn take_in_flight(&mut self) -> InFlight {
        let in_flight = self.in_flight.take().expect(
            "bisection: outcome reported without a range awaiting it (call next_step first)",
        );
        self.statements_tried += 1;
        in_flight
    }
}

/// `⌈log2 n⌉`, with 0 for `n ≤ 1`: the depth of halving down to single keys.
fn ceil_log2(n: usize) -> usize {
    match n {
        0 | 1 => 0,
        n => (usize::BITS - (n - 1).leading_zeros()) as usize,
    }
}

#[cfg(test)]
mod tests {
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
}
