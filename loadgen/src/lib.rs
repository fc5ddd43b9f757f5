//! Sluice load generator: simulated devices sending telemetry on an open-loop schedule, fault
//! injection, and HDR latency reports.
//!
//! Layout:
//!
//! - [`profile`]: the load's shape over time (steady, burst, time slots, reconnect storm) and
//!   the open-loop send schedule it implies.
//! - [`run`]: one load run: the sender loop, the fleet of simulated series, the output files.
//! - [`notify`]: the router subscription of a run and the webhook receiver measuring
//!   device → notified latency.
//! - [`report`]: latency recording (corrected for coordinated omission), live progress, the
//!   final summary, `.hgrm` percentile files and SVG plots.

pub mod notify;
pub mod profile;
pub mod report;
pub mod run;
