//! SIGTERM/SIGINT handling: a flag every loop checks and a future every wait races.

use std::time::Duration;

use futures::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::watch;

/// Cloneable view of "has shutdown been requested".
#[derive(Clone)]
pub struct Shutdown {
    requested: watch::Receiver<bool>,
}

impl Shutdown {
    /// Installs SIGTERM/SIGINT handlers; the first signal requests shutdown, a
    /// second one exits at once (an operator who insists).
    pub fn on_signals() -> std::io::Result<Shutdown> {
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let (tx, requested) = watch::channel(false);
        tokio::spawn(async move {
            if let Some(signal) = signals.next().await {
                tracing::info!(
                    signal,
                    "shutdown requested: finishing the in-flight batch, then releasing leases"
                );
                tx.send_replace(true);
            }
            if signals.next().await.is_some() {
                tracing::warn!("second signal: exiting now");
                std::process::exit(1);
            }
        });
        Ok(Shutdown { requested })
    }

    /// True once shutdown was requested.
    pub fn is_triggered(&self) -> bool {
        *self.requested.borrow()
    }

    /// Completes when shutdown is requested.
    pub async fn triggered(&self) {
        let mut requested = self.requested.clone();
        let _ = requested.wait_for(|r| *r).await;
    }

    /// Sleeps `duration` or until shutdown, whichever is first.
    pub async fn sleep(&self, duration: Duration) {
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            () = self.triggered() => {}
        }
    }
}
