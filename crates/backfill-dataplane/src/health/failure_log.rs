//! Each failing probe target logged once when it starts failing and once when it works
//! again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

/// Which probe targets are failing, so each failure is logged once when it starts and once
/// when it ends, not at every probe interval.
#[derive(Clone, Default)]
pub(super) struct FailureLog {
    failing: Arc<Mutex<HashSet<String>>>,
}

impl FailureLog {
    pub(super) fn failed(&self, target: &str, error: &str) {
        let newly = self.lock().insert(target.to_owned());
        if newly {
            tracing::warn!(
                probed = target,
                error,
                "health probe failed; the throttle holds until it works again"
            );
        } else {
            tracing::debug!(probed = target, error, "health probe still failing");
        }
    }

    pub(super) fn ok(&self, target: &str) {
        if self.lock().remove(target) {
            tracing::info!(probed = target, "health probe works again");
        }
    }

    /// Forgets the failing targets named `prefix…` that are not among `current`.
    pub(super) fn forget_others(&self, prefix: &str, current: &[String]) {
        self.lock()
            .retain(|target| !target.starts_with(prefix) || current.contains(target));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.failing.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
