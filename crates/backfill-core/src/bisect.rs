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
mod tests;
