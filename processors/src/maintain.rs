//! The maintenance service of the readings table: a pass of retention, compaction and
//! vacuum (`sluice_sinks::table::maintain`) every interval, until shutdown. One per
//! deployment is enough (`sluice maintain`); a second one only makes passes conflict, and
//! a pass that loses is retried at the next interval.

use std::future::Future;
use std::time::{Duration, Instant};

use sluice_sinks::table::ReadingsTable;
use sluice_sinks::table::maintain::MaintenanceConfig;

use crate::internal_events::{MaintenanceDone, MaintenanceFailed};

/// Configuration of the maintenance service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintainConfig {
    /// Time between the end of a pass and the start of the next.
    pub interval: Duration,
    /// What a pass does.
    pub pass: MaintenanceConfig,
}

impl Default for MaintainConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(300),
            pass: MaintenanceConfig::default(),
        }
    }
}

/// Runs a pass now, then one every `interval`, until `shutdown` resolves. A running pass is
/// dropped at shutdown: under its I/O budget a pass may take minutes, and dropping it is
/// safe (each commit is one atomic log entry; merged files it wrote and never committed
/// are vacuumed as orphans after the grace). Returns the number of passes that succeeded.
pub async fn run(
    table: ReadingsTable,
    config: MaintainConfig,
    shutdown: impl Future<Output = ()>,
) -> u64 {
    let mut ok = 0;
    tokio::pin!(shutdown);
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            () = &mut shutdown => return ok,
            result = table.maintain(&config.pass) => result,
        };
        match result {
            Ok(report) => {
                ok += 1;
                MaintenanceDone {
                    report: &report,
                    took: started.elapsed(),
                }
                .emit();
            }
            Err(error) => MaintenanceFailed {
                error: &error,
                retry_in: config.interval,
            }
            .emit(),
        }
        tokio::select! {
            () = &mut shutdown => return ok,
            () = tokio::time::sleep(config.interval) => {}
        }
    }
}

/// One pass, for `sluice maintain --once`: its report, or its error.
pub async fn once(
    table: &ReadingsTable,
    config: &MaintenanceConfig,
) -> Result<sluice_sinks::table::maintain::MaintenanceReport, sluice_sinks::table::TableError> {
    let started = Instant::now();
    let result = table.maintain(config).await;
    match &result {
        Ok(report) => MaintenanceDone {
            report,
            took: started.elapsed(),
        }
        .emit(),
        Err(error) => MaintenanceFailed {
            error,
            retry_in: Duration::ZERO,
        }
        .emit(),
    }
    result
}
