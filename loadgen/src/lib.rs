//! Sluice load generator: simulated devices sending telemetry on an open-loop schedule, fault
//! injection, and HDR latency reports.
//!
//! Layout (the lead adds modules as they land):
//!
//! - [`report`]: latency recording (corrected for coordinated omission), live progress, the
//!   final summary, `.hgrm` percentile files and SVG plots.

pub mod report;
pub mod run;
