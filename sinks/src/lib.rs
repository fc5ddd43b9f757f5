//! The durable sinks of Sluice's storage pool, and SQL over what they stored.
//!
//! The storage pool stages decoded batches as Arrow [`RecordBatch`]es ([`StagedBatch`]) and
//! hands them to the sinks; it acks the AMQP deliveries only after every sink accepted them.
//!
//! - [`table`]: the readings table, a Delta Lake table on a local directory or an object
//!   store. One log entry per commit, adding one Parquet file per (tenant, date) partition;
//!   the batch ids in the log are the deduplication ledger, so a redelivered batch never
//!   duplicates rows, across restarts, processes and machines (`docs/storage.md`).
//! - [`latest`]: the latest value per (tenant, device, metric), in Redis or in memory, never
//!   regressing to an older reading.
//! - [`query`]: DataFusion SQL over one tenant's view of the table, read-only.
//! - [`legacy`]: the directory layout of earlier versions, read for conversion.
//!
//! Its contract with the rest of the workspace is the Arrow schema below
//! ([`readings_schema`]) and [`StagedBatch`]; from the binding it takes only the contract's
//! data rules (tenant ids, the clock), without the transports (`default-features = false`).

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, Float64Array, StringDictionaryBuilder, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

pub mod latest;
pub mod legacy;
pub mod query;
pub mod table;

/// Column names of the readings schema ([`readings_schema`]), in schema order.
pub mod columns {
    /// Device id, `Dictionary(Int32, Utf8)`.
    pub const DEVICE: &str = "device";
    /// Metric name, `Dictionary(Int32, Utf8)`.
    pub const METRIC: &str = "metric";
    /// Device timestamp, `Timestamp(Nanosecond, "UTC")`.
    pub const TS: &str = "ts";
    /// Reading value, `Float64`.
    pub const VALUE: &str = "value";

    /// Column positions, so hot paths index columns without a name lookup.
    pub(crate) const DEVICE_IDX: usize = 0;
    pub(crate) const METRIC_IDX: usize = 1;
    pub(crate) const TS_IDX: usize = 2;
    pub(crate) const VALUE_IDX: usize = 3;
}

/// The timezone of the `ts` column. Parquet and DataFusion keep it, so queries see UTC.
pub const TS_TIMEZONE: &str = "UTC";

static READINGS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    Arc::new(Schema::new(vec![
        Field::new(columns::DEVICE, dict.clone(), false),
        Field::new(columns::METRIC, dict, false),
        Field::new(
            columns::TS,
            DataType::Timestamp(TimeUnit::Nanosecond, Some(TS_TIMEZONE.into())),
            false,
        ),
        Field::new(columns::VALUE, DataType::Float64, false),
    ]))
});

/// The schema of [`StagedBatch::rows`]. The readings table stores `ts` at microseconds and
/// adds the `tenant` and `date` partition columns ([`table`]).
pub fn readings_schema() -> SchemaRef {
    Arc::clone(&READINGS_SCHEMA)
}

/// A decoded batch waiting to be committed to the sinks.
#[derive(Debug, Clone)]
pub struct StagedBatch {
    /// Tenant id, checked with [`sluice_binding::TenantId::check`] by every sink (it becomes a directory
    /// name and a key segment).
    pub tenant: String,
    /// The batch id from the binding: the deduplication key.
    pub batch_id: uuid::Uuid,
    /// The AMQP `redelivered` flag: this batch may already have been stored (by this process
    /// before a restart or by another one). The table checks every batch against its ledger
    /// whatever this says (a producer's republished copy is not flagged); the flag is kept
    /// for metrics and for sinks without a ledger of their own.
    pub maybe_duplicate: bool,
    /// The readings, with exactly [`readings_schema`] (no nulls).
    pub rows: RecordBatch,
}

impl StagedBatch {
    /// A new batch (a fresh batch id, not a redelivery) of `tenant`'s
    /// `(device, metric, ts_ns, value)` readings, for callers that hold readings rather than
    /// a binding batch (tests, benchmarks, embedders).
    pub fn from_readings<'a>(
        tenant: &str,
        readings: impl IntoIterator<Item = (&'a str, &'a str, i64, f64)>,
    ) -> Self {
        Self {
            tenant: tenant.to_owned(),
            batch_id: uuid::Uuid::now_v7(),
            maybe_duplicate: false,
            rows: readings_rows(readings),
        }
    }
}

/// Rows whose schema is not [`readings_schema`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch {batch_id}: rows do not match the readings schema: {reason}")]
pub struct SchemaMismatch {
    /// The offending batch.
    pub batch_id: uuid::Uuid,
    /// What differs.
    pub reason: String,
}

/// Returns `rows` re-labelled with the canonical [`readings_schema`] after checking that its
/// columns have the right names and types and no nulls. The canonical schema (without any
/// caller metadata) keeps every Parquet file's embedded Arrow schema identical.
pub(crate) fn conform_rows(
    batch_id: uuid::Uuid,
    rows: &RecordBatch,
) -> Result<RecordBatch, SchemaMismatch> {
    let mismatch = |reason: String| SchemaMismatch { batch_id, reason };
    let expected = readings_schema();
    let actual = rows.schema();
    if actual.fields().len() != expected.fields().len() {
        return Err(mismatch(format!(
            "{} columns, expected {}",
            actual.fields().len(),
            expected.fields().len()
        )));
    }
    for (got, want) in actual.fields().iter().zip(expected.fields()) {
        if got.name() != want.name() || got.data_type() != want.data_type() {
            return Err(mismatch(format!(
                "column {} {}, expected {} {}",
                got.name(),
                got.data_type(),
                want.name(),
                want.data_type()
            )));
        }
    }
    // `try_new` rejects nulls in the non-nullable fields.
    RecordBatch::try_new(expected, rows.columns().to_vec()).map_err(|e| mismatch(e.to_string()))
}

/// Rows of [`readings_schema`] from `(device, metric, ts_ns, value)` readings, for callers
/// that hold readings rather than a binding batch (tests, benchmarks, embedders).
pub fn readings_rows<'a>(
    readings: impl IntoIterator<Item = (&'a str, &'a str, i64, f64)>,
) -> RecordBatch {
    let mut device = StringDictionaryBuilder::<Int32Type>::new();
    let mut metric = StringDictionaryBuilder::<Int32Type>::new();
    let (mut ts, mut value) = (Vec::new(), Vec::new());
    for (d, m, t, x) in readings {
        device.append_value(d);
        metric.append_value(m);
        ts.push(t);
        value.push(x);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(device.finish()),
        Arc::new(metric.finish()),
        Arc::new(TimestampNanosecondArray::from(ts).with_timezone(TS_TIMEZONE)),
        Arc::new(Float64Array::from(value)),
    ];
    RecordBatch::try_new(readings_schema(), columns).expect("columns built to the readings schema")
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Builders for test batches.

    use arrow::record_batch::RecordBatch;

    use super::StagedBatch;

    /// 2026-11-21T10:00:00Z in nanoseconds.
    pub(crate) const HOUR_10: i64 = 1_795_255_200_000_000_000;
    pub(crate) const NS_PER_HOUR: i64 = 3_600_000_000_000;

    /// Rows from `(device, metric, ts_ns, value)` tuples.
    pub(crate) fn rows(readings: &[(&str, &str, i64, f64)]) -> RecordBatch {
        super::readings_rows(readings.iter().copied())
    }

    /// `n` readings of device `dev-<i % 10>`, metric `m`, one per millisecond from `start`.
    pub(crate) fn series(n: usize, start: i64) -> RecordBatch {
        let devices: Vec<String> = (0..10).map(|i| format!("dev-{i}")).collect();
        let readings: Vec<(&str, &str, i64, f64)> = (0..n)
            .map(|i| {
                (
                    devices[i % 10].as_str(),
                    "m",
                    start + i as i64 * 1_000_000,
                    i as f64,
                )
            })
            .collect();
        rows(&readings)
    }

    pub(crate) fn staged(tenant: &str, rows: RecordBatch) -> StagedBatch {
        StagedBatch {
            tenant: tenant.to_owned(),
            batch_id: uuid::Uuid::now_v7(),
            maybe_duplicate: false,
            rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conform_rejects_wrong_schema() {
        let id = uuid::Uuid::nil();
        let good = test_util::rows(&[("d", "m", 1, 1.0)]);
        assert!(conform_rows(id, &good).is_ok());

        let renamed = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("dev", good.schema().field(0).data_type().clone(), false),
                good.schema().field(1).clone(),
                good.schema().field(2).clone(),
                good.schema().field(3).clone(),
            ])),
            good.columns().to_vec(),
        )
        .expect("batch");
        let err = conform_rows(id, &renamed).expect_err("renamed column");
        assert!(err.reason.contains("dev"), "{err}");
    }
}
