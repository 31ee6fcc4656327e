//! Pure logic of backfilld: no I/O, no clocks, no database. Everything here is
//! unit-tested in isolation and driven by the data and control planes.

pub mod activity;
pub mod bisect;
pub mod breaker;
pub mod error_class;
pub mod impact;
pub mod job_spec;
pub mod latency;
pub mod lease;
pub mod phase;
pub mod placeholders;
pub mod queue_sql;
pub mod signals;
pub mod slicing;
pub mod steering;
pub mod throttle;
