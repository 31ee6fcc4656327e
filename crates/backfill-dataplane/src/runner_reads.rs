//! The job's reads that the worker asks for between batches (resolving the job, counting
//! what is left, where a pass ends, where to cut or split), each on a pooled session of
//! its own: the worker never holds a raw connection.

use crate::batch::BatchRunner;
use crate::target::{BatchTarget, JobDefinition};
use crate::target_reads::PassWrites;
use crate::{BatchError, DataPlaneError};

impl BatchRunner {
    /// [`BatchTarget::resolve`]: the job checked against the catalog, as its role sees it.
    pub async fn resolve(&self, job: &JobDefinition) -> Result<BatchTarget, DataPlaneError> {
        let mut client = self
            .session_for(&job.spec.name, "resolving the job")
            .await?;
        BatchTarget::resolve(&mut client, job).await
    }

    /// [`BatchTarget::count_pending`] on a session of its own.
    pub async fn count_pending(
        &self,
        target: &BatchTarget,
        after: Option<&str>,
        excluding_failed: bool,
    ) -> Result<i64, BatchError> {
        let mut client = self
            .session_for(&target.job_name, "counting pending rows")
            .await?;
        target
            .count_pending(&mut client, after, excluding_failed)
            .await
    }

    /// [`BatchTarget::last_key`] on a session of its own.
    pub async fn last_key(&self, target: &BatchTarget) -> Result<Option<String>, BatchError> {
        let mut client = self
            .session_for(&target.job_name, "reading the last key")
            .await?;
        target.last_key(&mut client).await
    }

    /// [`BatchTarget::row_moved_past`] on a session of its own.
    pub async fn row_moved_past(
        &self,
        target: &BatchTarget,
        last_key: &str,
        writes: &PassWrites,
    ) -> Result<Option<BatchError>, BatchError> {
        let mut client = self
            .session_for(&target.job_name, "looking past the end of its pass")
            .await?;
        target.row_moved_past(&mut client, last_key, writes).await
    }

    /// [`BatchTarget::sample_cuts`] on a session of its own.
    pub async fn sample_cuts(
        &self,
        target: &BatchTarget,
        fractions: &[f64],
    ) -> Result<Vec<String>, BatchError> {
        let mut client = self
            .session_for(&target.job_name, "sampling cut keys")
            .await?;
        target.sample_cuts(&mut client, fractions).await
    }

    /// [`BatchTarget::key_at_offset`] on a session of its own.
    pub async fn key_at_offset(
        &self,
        target: &BatchTarget,
        after: Option<&str>,
        upper: Option<&str>,
        offset: i64,
    ) -> Result<Option<String>, BatchError> {
        let mut client = self
            .session_for(&target.job_name, "finding a split key")
            .await?;
        target
            .key_at_offset(&mut client, after, upper, offset)
            .await
    }
}
