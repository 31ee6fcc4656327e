//! `[throttle]`: the limits the throttle holds jobs to, the health probe and the canary.

use std::time::Duration;

use backfill_core::signals::SignalLimits;
use backfill_core::throttle::{QueryLimits, ThrottleSettings};
use serde::Deserialize;

use super::database::check_database_url;
use super::{BatchSettings, SettingsError};

/// Shortest `throttle.rate_window`: every batch costs a commit flush, and shorter windows
/// mean more of them for the same rows.
const MIN_RATE_WINDOW: Duration = Duration::from_millis(10);
/// Longest `throttle.rate_window`: a batch carries this much of the budget at once, and
/// longer windows hurt production more (issue 19's tenth round: 500 ms and 1 s already
/// raised pgbench's p99 more than 100 ms).
const MAX_RATE_WINDOW: Duration = Duration::from_secs(10);
/// Shortest `throttle.impact_sli_window`: Prometheus's shortest useful range is a few
/// scrapes.
const MIN_SLI_WINDOW: Duration = Duration::from_secs(2);
/// Longest `throttle.impact_sli_window`: a long rest lasts it, once every ten minutes.
const MAX_SLI_WINDOW: Duration = Duration::from_secs(120);

/// `[throttle]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    #[serde(with = "humantime_serde")]
    pub max_lag: Duration,
    pub max_lag_bytes: u64,
    #[serde(deserialize_with = "name_list")]
    pub expected_standbys: Vec<String>,
    #[serde(deserialize_with = "name_list")]
    pub replica_urls: Vec<String>,
    pub max_rows_per_second: f64,
    #[serde(with = "humantime_serde")]
    pub max_blocking: Duration,
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// A canary round trip this much over the quietest recent one counts as production
    /// being delayed; zero turns the canary off.
    #[serde(with = "humantime_serde")]
    pub max_probe_delay: Duration,
    /// How often the canary runs.
    #[serde(with = "humantime_serde")]
    pub canary_interval: Duration,
    /// Impact budget: production's latency (the canary's) may rise to this many times its
    /// own baseline; 0 turns the budget off (the duty cycle then shares the primary).
    pub impact_budget_ratio: f64,
    /// A rise in production's latency smaller than this never counts against the budget.
    #[serde(with = "humantime_serde")]
    pub impact_floor: Duration,
    /// How often the impact budget rests briefly to re-learn production's baseline.
    #[serde(with = "humantime_serde")]
    pub impact_relearn_every: Duration,
    /// The share of production's transactions backfilld's batches may slow past the
    /// impact budget's line, judged from canaries timed inside them; 0: not judged.
    pub impact_excess_share: f64,
    /// The rise over its share at rest of production's active sessions waiting on the WAL
    /// that the impact budget cuts on (1.15: 15 % more); 0: not judged.
    pub impact_wal_rise: f64,
    /// PromQL giving production's own latency (e.g. its p99 over a short range), read from
    /// `prometheus_url` to bound the impact budget's pace; empty: not read.
    pub impact_sli_query: String,
    /// How long after a pace is set `impact_sli_query` shows it alone: its range plus the
    /// scrape interval.
    #[serde(with = "humantime_serde")]
    pub impact_sli_window: Duration,
    /// While production is at work on the primary, the share of time a job's batches may
    /// run; 1 turns sharing off.
    pub busy_duty_cycle: f64,
    /// While production is at work, the batch duration steered towards.
    #[serde(with = "humantime_serde")]
    pub busy_batch_target: Duration,
    /// A rate budget (`max_rows_per_second`, the impact budget's pace) is spent in batches
    /// of this much of it.
    #[serde(with = "humantime_serde")]
    pub rate_window: Duration,
    /// Run even when the role cannot see standby positions and other sessions' lock
    /// waits (no pg_monitor): the lag and lock probes are then blind.
    pub allow_blind: bool,
    /// Hold while a replication slot retains this many bytes of WAL; 0 turns it off.
    pub max_slot_retained_bytes: u64,
    /// SQL returning one number or boolean, run on the primary every probe interval;
    /// empty: none.
    pub query: String,
    /// Hold while the query's value is above this.
    pub query_max: f64,
    /// After a hold, run again once the value is at or below this.
    pub query_resume: f64,
    /// A failing query lets jobs run instead of holding them.
    pub query_fail_open: bool,
    /// Hold a job while a vacuum works on its table (wraparound-prevention ones always hold).
    pub hold_while_vacuumed: bool,
    /// Hold while the primary writes this many bytes of WAL per second; 0 turns it off.
    pub max_wal_bytes_per_second: u64,
    /// Hold while this many completed WAL segments await archiving; 0 turns it off.
    pub max_archive_pending_segments: u64,
    /// Hold while WAL archiving is failing.
    pub hold_while_archive_failing: bool,
    /// Hold a job while dead rows are this share of its table; 0 turns it off.
    pub max_dead_tuple_ratio: f64,
    /// Prometheus server the query is sent to (`http://host:port`); empty: no query.
    pub prometheus_url: String,
    /// PromQL expression giving one number (the largest series counts).
    pub prometheus_query: String,
    /// Hold while the expression's value is above this.
    pub prometheus_max: f64,
    /// After a hold, run again once the value is at or below this.
    pub prometheus_resume: f64,
    /// An unreachable Prometheus or unreadable answer lets jobs run instead of holding them.
    pub prometheus_fail_open: bool,
}

impl ThrottleConfig {
    /// Checks `[throttle]` on its own, naming the bad key.
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        let fail = |msg: String| Err(SettingsError(msg));
        if !(self.max_rows_per_second >= 0.0 && self.max_rows_per_second.is_finite()) {
            return fail(format!(
                "throttle.max_rows_per_second must be 0 (no limit) or positive, got {}",
                self.max_rows_per_second
            ));
        }
        if self.max_lag.is_zero() || self.max_lag_bytes == 0 {
            return fail(
                "throttle.max_lag and throttle.max_lag_bytes must be positive".to_string(),
            );
        }
        if self.probe_interval.is_zero() || self.probe_timeout.is_zero() {
            return fail(
                "throttle.probe_interval and throttle.probe_timeout must be positive".to_string(),
            );
        }
        if self.canary_interval.is_zero() {
            return fail("throttle.canary_interval must be positive".to_string());
        }
        if !(MIN_RATE_WINDOW..=MAX_RATE_WINDOW).contains(&self.rate_window) {
            return fail(format!(
                "throttle.rate_window must be between {} and {} (each batch carries this much of a rate budget), got {}",
                humantime::format_duration(MIN_RATE_WINDOW),
                humantime::format_duration(MAX_RATE_WINDOW),
                humantime::format_duration(self.rate_window)
            ));
        }
        let ratio = self.impact_budget_ratio;
        if !(ratio == 0.0 || (ratio.is_finite() && ratio > 1.0)) {
            return fail(format!(
                "throttle.impact_budget_ratio must be 0 (off) or a number above 1 (1.3: production's latency may rise 30 %), got {ratio}"
            ));
        }
        let excess = self.impact_excess_share;
        if !(excess.is_finite() && (0.0..0.01).contains(&excess)) {
            return fail(format!(
                "throttle.impact_excess_share must be 0 (off) or a share under 0.01 (0.0025: the batches may slow a quarter of a percent of production's transactions past the line; a p99 leaves 1 % over it), got {excess}"
            ));
        }
        let rise = self.impact_wal_rise;
        if !(rise == 0.0 || (rise.is_finite() && rise > 1.0 && rise <= 2.0)) {
            return fail(format!(
                "throttle.impact_wal_rise must be 0 (off) or a ratio above 1 and at most 2 (1.15: production's sessions may wait on the WAL 15 % more often than while backfilld rests), got {rise}"
            ));
        }
        if self.impact_relearn_every < Duration::from_secs(5) {
            return fail(format!(
                "throttle.impact_relearn_every must be at least 5s (each re-learning rests every job for about two seconds), got {}",
                humantime::format_duration(self.impact_relearn_every)
            ));
        }
        if !(self.query_max.is_finite()
            && self.query_resume.is_finite()
            && self.query_resume <= self.query_max)
        {
            return fail(format!(
                "throttle.query_resume ({}) must be a number at or below throttle.query_max ({})",
                self.query_resume, self.query_max
            ));
        }
        let (url, query) = (self.prometheus_url.trim(), self.prometheus_query.trim());
        let sli_query = self.impact_sli_query.trim();
        if url.is_empty() && !sli_query.is_empty() {
            return fail(
                "throttle.impact_sli_query is read from throttle.prometheus_url, which is empty"
                    .to_string(),
            );
        }
        if url.is_empty() != (query.is_empty() && sli_query.is_empty()) {
            return fail(
                "throttle.prometheus_url and throttle.prometheus_query go together: set both or neither (the URL may also serve throttle.impact_sli_query alone)"
                    .to_string(),
            );
        }
        if !url.is_empty() {
            backfill_dataplane::PrometheusQuery::new(url, query, self.probe_timeout)
                .map_err(|e| SettingsError(format!("throttle.prometheus_url: {e}")))?;
        }
        if !sli_query.is_empty() && self.impact_budget_ratio == 0.0 {
            return fail(
                "throttle.impact_sli_query bounds the impact budget, which is off (throttle.impact_budget_ratio = 0): set the ratio or empty the query"
                    .to_string(),
            );
        }
        if !(MIN_SLI_WINDOW..=MAX_SLI_WINDOW).contains(&self.impact_sli_window) {
            return fail(format!(
                "throttle.impact_sli_window must be between {} and {} (the query's range plus the scrape interval; a long rest lasts it and 2s more), got {}",
                humantime::format_duration(MIN_SLI_WINDOW),
                humantime::format_duration(MAX_SLI_WINDOW),
                humantime::format_duration(self.impact_sli_window)
            ));
        }
        if !(self.prometheus_max.is_finite()
            && self.prometheus_resume.is_finite()
            && self.prometheus_resume <= self.prometheus_max)
        {
            return fail(format!(
                "throttle.prometheus_resume ({}) must be a number at or below throttle.prometheus_max ({})",
                self.prometheus_resume, self.prometheus_max
            ));
        }
        if !(0.0..=1.0).contains(&self.max_dead_tuple_ratio) {
            return fail(format!(
                "throttle.max_dead_tuple_ratio must be 0 (off) or a share in (0, 1], got {}",
                self.max_dead_tuple_ratio
            ));
        }
        for (i, replica) in self.replica_urls.iter().enumerate() {
            check_database_url(&format!("throttle.replica_urls[{i}]"), replica)?;
        }
        Ok(())
    }

    /// The impact budget's settings (`impact_*`), or `None` when it is off.
    pub fn impact_settings(&self) -> Option<backfill_core::impact::ImpactSettings> {
        (self.impact_budget_ratio > 0.0).then_some(backfill_core::impact::ImpactSettings {
            budget_ratio: self.impact_budget_ratio,
            floor: self.impact_floor,
            relearn_every: self.impact_relearn_every,
            excess_share: self.impact_excess_share,
            wal_rise: self.impact_wal_rise,
            sli_window: self
                .impact_sli()
                .map_or(Duration::ZERO, |_| self.impact_sli_window),
        })
    }

    /// The impact budget's SLI query (`impact_sli_query` on `prometheus_url`), if set.
    pub fn impact_sli(&self) -> Option<(&str, &str)> {
        let query = self.impact_sli_query.trim();
        (self.impact_budget_ratio > 0.0 && !query.is_empty())
            .then(|| (self.prometheus_url.trim(), query))
    }

    /// The throttle controller's settings for a job that overrides nothing: `batch` sizes
    /// and target, these limits; health-driven holds are re-checked at the probe cadence,
    /// so a hold ends as soon as a fresh sample allows it.
    pub fn job_defaults(&self, batch: &BatchSettings) -> ThrottleSettings {
        ThrottleSettings {
            min_batch_size: batch.min_size,
            max_batch_size: batch.max_size,
            start_batch_size: batch.size,
            target_batch: batch.target,
            max_lag: self.max_lag,
            max_lag_bytes: self.max_lag_bytes,
            // 0 in the config means no limit.
            max_rows_per_second: Some(self.max_rows_per_second).filter(|rate| *rate > 0.0),
            hold_recheck: self.probe_interval,
            busy_duty_cycle: self.busy_duty_cycle,
            busy_batch_target: self.busy_batch_target,
            rate_window: self.rate_window,
            // 0 in the config means off.
            max_slot_retained_bytes: Some(self.max_slot_retained_bytes).filter(|limit| *limit > 0),
            query_limits: QueryLimits {
                hold_above: self.query_max,
                resume_at_or_below: self.query_resume,
                fail_open: self.query_fail_open,
            },
            hold_while_vacuumed: self.hold_while_vacuumed,
            // 0 in the config means off.
            signal_limits: SignalLimits {
                max_wal_bytes_per_second: Some(self.max_wal_bytes_per_second)
                    .filter(|limit| *limit > 0),
                max_archive_pending_segments: Some(self.max_archive_pending_segments)
                    .filter(|limit| *limit > 0),
                hold_while_archive_failing: self.hold_while_archive_failing,
                max_dead_tuple_ratio: Some(self.max_dead_tuple_ratio).filter(|ratio| *ratio > 0.0),
                job_query_fail_open: self.query_fail_open,
                prometheus: QueryLimits {
                    hold_above: self.prometheus_max,
                    resume_at_or_below: self.prometheus_resume,
                    fail_open: self.prometheus_fail_open,
                },
            },
            ..ThrottleSettings::default()
        }
    }
}

/// Reads a list from a TOML array or from one comma-separated string (how
/// `BACKFILLD_THROTTLE__EXPECTED_STANDBYS=a,b` arrives), trimming every entry and dropping
/// empty ones: an empty variable must mean "none", not one standby called "" that is
/// always missing and would hold every job forever.
fn name_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct NameList;

    impl<'de> serde::de::Visitor<'de> for NameList {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of names or one comma-separated string")
        }

        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(value
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect())
        }

        // The environment source parses a lone "1" as a number; it is still a name.
        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Self::Value, E> {
            Ok(vec![value.to_string()])
        }

        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Self::Value, E> {
            Ok(vec![value.to_string()])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = seq.next_element::<String>()? {
                let name = name.trim();
                if !name.is_empty() {
                    names.push(name.to_owned());
                }
            }
            Ok(names)
        }
    }

    deserializer.deserialize_any(NameList)
}
