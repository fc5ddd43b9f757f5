//! Everything the storage pool logs and counts, each event in one place. Metric names are
//! consts; labels are bounded (`tenant` from configuration or validated ids, `error` from
//! a fixed set, `queue` from the topology) — never device ids.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Deliveries received from the transport.
pub const DELIVERIES: &str = "sluice_storage_deliveries_total";
/// Of them, flagged redelivered by the broker (a consumer went away, or a requeue).
pub const REDELIVERIES: &str = "sluice_storage_redeliveries_total";
/// Rows newly committed, by tenant.
pub const ROWS_COMMITTED: &str = "sluice_storage_rows_committed_total";
/// Rows skipped as already stored (redelivery), by tenant.
pub const ROWS_DUPLICATE: &str = "sluice_storage_rows_duplicate_total";
/// Deliveries dead-lettered, by error kind.
pub const DEAD_LETTERED: &str = "sluice_storage_dead_lettered_total";
/// Commits that failed (their deliveries held and the commit tried again), by sink.
pub const COMMIT_FAILURES: &str = "sluice_storage_commit_failures_total";
/// Data files added to the readings table.
pub const FILES_WRITTEN: &str = "sluice_storage_files_written_total";
/// New latest-value series refused by their tenant's cap (the readings are stored), by
/// tenant.
pub const LATEST_SERIES_REFUSED: &str = "sluice_storage_latest_series_refused_total";
/// Duration of a commit (readings table + latest values), seconds.
pub const COMMIT_SECONDS: &str = "sluice_storage_commit_seconds";
/// Device timestamp → committed, seconds, per row.
pub const END_TO_END_SECONDS: &str = "sluice_storage_end_to_end_seconds";
/// Decode + validate + Arrow build per delivery, seconds.
pub const STAGE_SECONDS: &str = "sluice_storage_stage_seconds";
/// Worker threads running.
pub const WORKERS: &str = "sluice_storage_workers";
/// Ready messages in each partition queue.
pub const QUEUE_BACKLOG: &str = "sluice_storage_queue_backlog";
/// Workers the pool is asked to run (by hand or by the autoscaler).
pub const WORKERS_DESIRED: &str = "sluice_storage_workers_desired";
/// Autoscaler decisions, by `direction` (up, down, none) and `reason`.
pub const AUTOSCALE_DECISIONS: &str = "sluice_autoscale_decisions_total";
/// Workers the autoscaling target asks for (clamped to min..max).
pub const AUTOSCALE_WANTED: &str = "sluice_autoscale_wanted_workers";
/// Fraction of the last autoscaling interval the workers were busy.
pub const AUTOSCALE_BUSY: &str = "sluice_autoscale_busy_ratio";
/// Deliveries staged per second over the last autoscaling interval.
pub const AUTOSCALE_RATE: &str = "sluice_autoscale_processing_rate";

/// An update of the latest values refused new series of tenants at their cap.
#[derive(Debug)]
pub(crate) struct LatestSeriesRefused<'a>(pub(crate) &'a sluice_sinks::latest::Refused);

impl LatestSeriesRefused<'_> {
    pub(crate) fn emit(&self) {
        for (tenant, n) in &self.0.series {
            // Debug: at its cap a tenant may hit this on every commit; the counter says it.
            tracing::debug!(%tenant, series = n, "tenant at its cap of latest-value series; new series not kept");
            metrics::counter!(LATEST_SERIES_REFUSED, "tenant" => tenant.clone()).increment(*n);
        }
    }
}

/// One commit finished.
#[derive(Debug)]
pub(crate) struct Committed<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) rows_written: u64,
    pub(crate) rows_skipped: u64,
    pub(crate) files: u64,
    pub(crate) end_to_end: &'a Histogram<u64>,
}

impl Committed<'_> {
    pub(crate) fn emit(self) {
        tracing::debug!(
            tenant = self.tenant,
            rows = self.rows_written,
            duplicates = self.rows_skipped,
            files = self.files,
            "committed"
        );
        let tenant = self.tenant.to_owned();
        metrics::counter!(ROWS_COMMITTED, "tenant" => tenant.clone()).increment(self.rows_written);
        if self.rows_skipped > 0 {
            tracing::info!(
                tenant = self.tenant,
                rows = self.rows_skipped,
                "skipped rows already stored (redelivery)"
            );
            metrics::counter!(ROWS_DUPLICATE, "tenant" => tenant).increment(self.rows_skipped);
        }
        metrics::counter!(FILES_WRITTEN).increment(self.files);
        // One record per distinct HDR bucket, not per row.
        let h = metrics::histogram!(END_TO_END_SECONDS);
        for v in self.end_to_end.iter_recorded() {
            h.record_many(
                v.value_iterated_to() as f64 / 1e9,
                v.count_at_value() as usize,
            );
        }
    }
}

/// A commit took this long.
#[derive(Debug)]
pub(crate) struct CommitDuration(pub(crate) Duration);

impl CommitDuration {
    pub(crate) fn emit(self) {
        metrics::histogram!(COMMIT_SECONDS).record(self.0.as_secs_f64());
    }
}

/// A commit failed; its deliveries were requeued.
#[derive(Debug)]
pub(crate) struct CommitFailed<'a> {
    pub(crate) sink: &'static str,
    pub(crate) error: &'a (dyn std::error::Error + Send + Sync),
    pub(crate) deliveries: usize,
    pub(crate) retry_in: std::time::Duration,
}

impl CommitFailed<'_> {
    pub(crate) fn emit(self) {
        tracing::error!(sink = self.sink, error = %self.error, deliveries = self.deliveries, retry_in = ?self.retry_in, "commit failed; holding the deliveries and trying again");
        metrics::counter!(COMMIT_FAILURES, "sink" => self.sink).increment(1);
    }
}

/// A delivery was dead-lettered.
#[derive(Debug)]
pub(crate) struct DeadLettered<'a> {
    pub(crate) queue: &'a str,
    pub(crate) error: &'static str,
    pub(crate) reason: &'a str,
}

impl DeadLettered<'_> {
    pub(crate) fn emit(self) {
        tracing::warn!(
            queue = self.queue,
            error = self.error,
            reason = self.reason,
            "dead-lettered a delivery"
        );
        metrics::counter!(DEAD_LETTERED, "error" => self.error).increment(1);
    }
}

/// A delivery could not be dead-lettered (the broker did not confirm); it is requeued.
#[derive(Debug)]
pub(crate) struct DeadLetterFailed<'a> {
    pub(crate) error: &'a dyn std::error::Error,
}

impl DeadLetterFailed<'_> {
    pub(crate) fn emit(self) {
        tracing::error!(error = %self.error, "cannot dead-letter; requeueing");
        metrics::counter!(DEAD_LETTERED, "error" => "requeued").increment(1);
    }
}

/// A delivery arrived from the transport.
#[derive(Debug)]
pub(crate) struct DeliveryReceived {
    pub(crate) redelivered: bool,
}

impl DeliveryReceived {
    pub(crate) fn emit(self) {
        metrics::counter!(DELIVERIES).increment(1);
        if self.redelivered {
            metrics::counter!(REDELIVERIES).increment(1);
        }
    }
}

/// The ready messages of one partition queue, polled by the pool.
#[derive(Debug)]
pub(crate) struct QueueBacklog {
    pub(crate) queue: String,
    pub(crate) depth: u64,
}

impl QueueBacklog {
    pub(crate) fn emit(self) {
        metrics::gauge!(QUEUE_BACKLOG, "queue" => self.queue).set(self.depth as f64);
    }
}

/// The worker threads running now.
#[derive(Debug)]
pub(crate) struct WorkersRunning(pub(crate) usize);

impl WorkersRunning {
    pub(crate) fn emit(self) {
        metrics::gauge!(WORKERS).set(self.0 as f64);
    }
}

/// The histogram of [`STAGE_SECONDS`]: each worker thread takes one handle and records
/// every delivery it stages into it, without a registry lookup per delivery.
pub(crate) fn stage_seconds() -> metrics::Histogram {
    metrics::histogram!(STAGE_SECONDS)
}

/// Settling a delivery with the broker failed (it will be redelivered; storage dedupes).
#[derive(Debug)]
pub(crate) struct AckFailed<'a> {
    pub(crate) error: &'a dyn std::error::Error,
}

impl AckFailed<'_> {
    pub(crate) fn emit(self) {
        tracing::warn!(error = %self.error, "cannot settle a delivery; it will be redelivered");
        metrics::counter!(COMMIT_FAILURES, "sink" => "ack").increment(1);
    }
}

/// The autoscaler decided (every interval, change or not).
#[derive(Debug)]
pub(crate) struct AutoscaleDecided<'a> {
    pub(crate) group: &'a str,
    pub(crate) decision: &'a crate::autoscale::Decision,
}

impl AutoscaleDecided<'_> {
    pub(crate) fn emit(self) {
        let d = self.decision;
        let direction = match d.to.cmp(&d.from) {
            std::cmp::Ordering::Greater => "up",
            std::cmp::Ordering::Less => "down",
            std::cmp::Ordering::Equal => "none",
        };
        if d.is_change() {
            tracing::info!(
                group = self.group,
                from = d.from,
                to = d.to,
                reason = d.reason.as_str(),
                wanted = d.wanted,
                backlog = d.backlog,
                rate = format_args!("{:.0}/s", d.rate),
                busy = format_args!("{:.0}%", d.busy * 100.0),
                "autoscaled workers"
            );
        } else {
            tracing::debug!(
                group = self.group,
                workers = d.from,
                reason = d.reason.as_str(),
                wanted = d.wanted,
                backlog = d.backlog,
                rate = format_args!("{:.0}/s", d.rate),
                busy = format_args!("{:.0}%", d.busy * 100.0),
                "autoscaler kept workers"
            );
        }
        metrics::counter!(AUTOSCALE_DECISIONS, "direction" => direction, "reason" => d.reason.as_str())
            .increment(1);
        metrics::gauge!(AUTOSCALE_WANTED).set(d.wanted as f64);
        metrics::gauge!(AUTOSCALE_BUSY).set(d.busy);
        metrics::gauge!(AUTOSCALE_RATE).set(d.rate);
    }
}

/// The worker count was changed (applied).
#[derive(Debug)]
pub(crate) struct WorkersResized<'a> {
    pub(crate) group: &'a str,
    pub(crate) from: usize,
    pub(crate) to: usize,
    pub(crate) mode: crate::control::Mode,
}

impl WorkersResized<'_> {
    pub(crate) fn emit(self) {
        if self.from != self.to {
            tracing::info!(
                group = self.group,
                from = self.from,
                to = self.to,
                mode = ?self.mode,
                "workers resized"
            );
        }
        metrics::gauge!(WORKERS_DESIRED).set(self.to as f64);
    }
}

/// Maintenance passes over the readings table, by `outcome` (ok, failed).
pub const MAINTENANCE_PASSES: &str = "sluice_table_maintenance_passes_total";
/// Duration of a maintenance pass, seconds.
pub const MAINTENANCE_SECONDS: &str = "sluice_table_maintenance_seconds";
/// Small files merged away by compaction.
pub const FILES_COMPACTED: &str = "sluice_table_files_compacted_total";
/// Merged files compaction wrote.
pub const FILES_MERGED: &str = "sluice_table_files_merged_total";
/// `(tenant, date)` partitions deleted by retention, by tenant.
pub const PARTITIONS_EXPIRED: &str = "sluice_table_partitions_expired_total";
/// Files deleted from storage by vacuum.
pub const FILES_VACUUMED: &str = "sluice_table_files_vacuumed_total";
/// Data files in the table's newest version.
pub const TABLE_FILES: &str = "sluice_table_files";
/// The table's newest version.
pub const TABLE_VERSION: &str = "sluice_table_version";
/// Bytes maintenance read and wrote on the store.
pub const MAINTENANCE_IO_BYTES: &str = "sluice_table_maintenance_io_bytes_total";
/// Store requests maintenance made.
pub const MAINTENANCE_IO_REQUESTS: &str = "sluice_table_maintenance_io_requests_total";
/// Time the last maintenance pass waited on its I/O budget, seconds.
pub const MAINTENANCE_IO_WAIT: &str = "sluice_table_maintenance_io_wait_seconds";

/// A maintenance pass finished.
#[derive(Debug)]
pub(crate) struct MaintenanceDone<'a> {
    pub(crate) report: &'a sluice_sinks::table::maintain::MaintenanceReport,
    pub(crate) took: Duration,
}

impl MaintenanceDone<'_> {
    pub(crate) fn emit(self) {
        let r = self.report;
        tracing::info!(
            version = r.version,
            files = r.files_live,
            compacted = r.files_compacted,
            merged = r.files_merged,
            expired_partitions = r.partitions_expired.len(),
            vacuumed = r.files_vacuumed,
            io_bytes = r.io.bytes,
            io_requests = r.io.requests,
            io_waited = ?r.io.waited,
            took = ?self.took,
            "table maintenance pass"
        );
        metrics::counter!(MAINTENANCE_PASSES, "outcome" => "ok").increment(1);
        metrics::histogram!(MAINTENANCE_SECONDS).record(self.took.as_secs_f64());
        metrics::counter!(FILES_COMPACTED).increment(r.files_compacted);
        metrics::counter!(FILES_MERGED).increment(r.files_merged);
        metrics::counter!(FILES_VACUUMED).increment(r.files_vacuumed);
        for (tenant, _) in &r.partitions_expired {
            metrics::counter!(PARTITIONS_EXPIRED, "tenant" => tenant.clone()).increment(1);
        }
        metrics::gauge!(TABLE_FILES).set(r.files_live as f64);
        metrics::gauge!(TABLE_VERSION).set(r.version as f64);
        metrics::counter!(MAINTENANCE_IO_BYTES).increment(r.io.bytes);
        metrics::counter!(MAINTENANCE_IO_REQUESTS).increment(r.io.requests);
        metrics::gauge!(MAINTENANCE_IO_WAIT).set(r.io.waited.as_secs_f64());
    }
}

/// A maintenance pass failed; the next one tries again.
#[derive(Debug)]
pub(crate) struct MaintenanceFailed<'a> {
    pub(crate) error: &'a sluice_sinks::table::TableError,
    pub(crate) retry_in: Duration,
}

impl MaintenanceFailed<'_> {
    pub(crate) fn emit(self) {
        tracing::warn!(error = %self.error, retry_in = ?self.retry_in, "table maintenance pass failed");
        metrics::counter!(MAINTENANCE_PASSES, "outcome" => "failed").increment(1);
    }
}
