//! How long clusters live: a cluster is torn down when its handle is dropped, and every one
//! still alive at process exit; the shared primary lives for the whole test binary.

use std::io::{self, Write as _};
use std::sync::{Arc, Mutex, Once, OnceLock, PoisonError, TryLockError, Weak};

use super::{Inner, PgCluster, State};

impl Drop for PgCluster {
    /// Stops the server immediately and removes the cluster's directory; never panics.
    fn drop(&mut self) {
        let mut state = self.lock_state();
        self.inner.teardown(&mut state);
    }
}

impl Inner {
    fn teardown(&self, state: &mut State) {
        // The server must be gone before its files are removed from under it.
        drop(state.postmaster.take());
        if let Some(dir) = state.dir.take() {
            if let Err(e) = dir.close() {
                // Not eprintln!: that panics if stderr is closed, and this runs in Drop.
                let _ = writeln!(
                    io::stderr(),
                    "pg-testkit: could not remove {}: {e}",
                    self.layout.root.display()
                );
            }
        }
    }
}

/// One primary shared by all tests of a test binary, started on first use and stopped and
/// removed at process exit.
///
/// Isolate tests from each other with [`PgCluster::create_database`].
///
/// # Panics
///
/// If the primary cannot be started, e.g. with instructions to install PostgreSQL when its
/// binaries are absent.
pub fn shared_primary() -> &'static PgCluster {
    static SHARED: OnceLock<PgCluster> = OnceLock::new();
    // Statics are never dropped: the exit-time teardown registered by every cluster is what
    // stops this one.
    SHARED.get_or_init(|| {
        PgCluster::start_primary()
            .unwrap_or_else(|e| panic!("pg-testkit: could not start the shared primary: {e}"))
    })
}

/// Clusters still alive, for teardown when the process exits.
static LIVE: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());

pub(super) fn register_for_exit_teardown(inner: &Arc<Inner>) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // The test harness leaves through libc exit(), which runs atexit hooks but no Rust
        // destructors for statics or leaked values.
        // SAFETY: the hook is a plain extern "C" function that never unwinds.
        unsafe {
            libc::atexit(teardown_live_clusters);
        }
    });
    let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
    live.retain(|cluster| cluster.strong_count() > 0);
    live.push(Arc::downgrade(inner));
}

extern "C" fn teardown_live_clusters() {
    // Unwinding out of an extern "C" function aborts; swallow any panic instead.
    let _ = std::panic::catch_unwind(|| {
        // try_lock: a thread stuck while holding a lock must not hang process exit. A
        // server we skip still dies by its parent-death signal; only its dir is left.
        let clusters: Vec<Arc<Inner>> = match LIVE.try_lock() {
            Ok(live) => live.iter().filter_map(Weak::upgrade).collect(),
            Err(TryLockError::Poisoned(live)) => {
                live.into_inner().iter().filter_map(Weak::upgrade).collect()
            }
            Err(TryLockError::WouldBlock) => return,
        };
        for cluster in clusters {
            let state = match cluster.state.try_lock() {
                Ok(state) => Some(state),
                Err(TryLockError::Poisoned(state)) => Some(state.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut state) = state {
                cluster.teardown(&mut state);
            }
        }
    });
}
