//! The job's throttle settings (deployment defaults under its own columns), and the
//! shares of the rate budget and of the duty cycle next to production it runs on.

use std::time::Instant;

use backfill_core::slicing::{duty_share, rate_share};
use backfill_core::throttle::ThrottleSettings;
use backfill_queue::Job;
use tracing::info;

use super::JobRun;
use crate::settings::WorkerSections;

impl JobRun<'_> {
    /// A job takes its share of the duty cycle next to production, divided among every job
    /// and slice running now on any worker, and a slice its share of its job's
    /// rows-per-second budget, divided among the job's slices running now; both re-read
    /// every probe interval.
    pub(super) async fn share_job_budgets(&mut self) {
        let impact = self.worker.settings.throttle.impact_budget_ratio > 0.0;
        let sharing = self.duty_budget < 1.0 || impact;
        let slice_budget = self.job.parent_id.zip(self.rate_budget);
        if !sharing && slice_budget.is_none() {
            return;
        }
        // As often as health is probed: slices starting or ending change the share.
        let every = self.worker.settings.throttle.probe_interval;
        if self.budget_checked.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.budget_checked = Some(Instant::now());
        if let Some((parent_id, budget)) = slice_budget {
            if let Ok(active) = self.worker.queue.slices().active(parent_id).await {
                let share = rate_share(Some(budget), active);
                if share != self.throttle.max_rows_per_second() {
                    info!(active_slices = active, rows_per_second = ?share, "sharing the job's rate budget");
                    self.throttle.set_max_rows_per_second(share);
                }
            }
        }
        if sharing {
            if let Ok(running) = self.worker.queue.running_jobs().await {
                // The impact budget's pace is the daemon's: an equal part for each.
                self.throttle.set_impact_sharers(running);
                let duty = duty_share(self.duty_budget, running);
                if duty != self.throttle.busy_duty_cycle() {
                    info!(
                        running_jobs = running,
                        busy_duty_cycle = duty,
                        "sharing the duty cycle next to production with the other running jobs"
                    );
                    self.throttle.set_busy_duty_cycle(duty);
                }
            }
        }
    }
}

/// The job's throttle: deployment defaults, overridden by the job's own columns.
pub(crate) fn throttle_settings(settings: &WorkerSections, job: &Job) -> ThrottleSettings {
    job.tunables.throttle_settings(settings.throttle_defaults())
}
