//! Turning staged batches into the table's Parquet files and their Delta `add` actions.
//!
//! Rows are split by (tenant, UTC date of `ts`), the table's partitions; each partition of a
//! commit becomes one file: ZSTD, dictionary-encoded, row groups of a bounded size, `ts` at
//! microseconds (Delta's `timestamp` type). The statistics of each `add` (row count and the
//! minimum and maximum of every column) are what readers prune files by without opening
//! them: a time-range query opens only the files whose `ts` range meets it.
//!
//! Pure CPU work, run on a blocking thread by the caller.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::file::metadata::KeyValue;
use ::parquet::file::properties::WriterProperties;
use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, TimestampMicrosecondArray};
use arrow::compute::{max, min, partition, sort_to_indices, take, take_record_batch, unary};
use arrow::datatypes::{
    DataType, Field, Int32Type, Int64Type, Schema, SchemaRef, TimeUnit, TimestampNanosecondType,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use deltalake_core::kernel::Add;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{DATE, TENANT, TableError};
use crate::columns::{DEVICE, DEVICE_IDX, METRIC, METRIC_IDX, TS, TS_IDX, VALUE, VALUE_IDX};
use crate::{TS_TIMEZONE, readings_schema};

// The binding's day: the one `Limits::max_days` counts, so a batch never makes more files
// than the bound says.
use sluice_binding::validate::{NS_PER_DAY, utc_day};
/// Longest string kept as a min/max statistic; longer ones are left out (a truncated
/// maximum would not bound the column).
const MAX_STAT_STRING: usize = 64;

static FILE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    Arc::new(Schema::new(vec![
        Field::new(DEVICE, dict.clone(), false),
        Field::new(METRIC, dict, false),
        Field::new(
            TS,
            DataType::Timestamp(TimeUnit::Microsecond, Some(TS_TIMEZONE.into())),
            false,
        ),
        Field::new(VALUE, DataType::Float64, false),
    ]))
});

/// The Arrow schema of the data files: the readings schema with `ts` in microseconds.
/// Partition columns (`tenant`, `date`) are in the paths and the log, not in the files.
pub(crate) fn file_schema() -> SchemaRef {
    Arc::clone(&FILE_SCHEMA)
}

/// Rows of one batch that fall in one partition.
#[derive(Debug)]
pub(crate) struct Piece {
    /// Index of the batch in the commit.
    pub(crate) batch: usize,
    pub(crate) rows: RecordBatch,
}

/// A (tenant, UTC day) partition; `day` counts days since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PartitionKey {
    pub(crate) tenant: String,
    pub(crate) day: i64,
}

impl PartitionKey {
    /// `YYYY-MM-DD`.
    pub(crate) fn date(&self) -> Result<String, TableError> {
        let secs = self
            .day
            .checked_mul(86_400)
            .ok_or(TableError::Timestamp(self.day))?;
        let start = DateTime::<Utc>::from_timestamp(secs, 0)
            .ok_or(TableError::Timestamp(self.day.saturating_mul(NS_PER_DAY)))?;
        Ok(start.format("%Y-%m-%d").to_string())
    }
}

/// Splits conformed rows (readings schema) by the UTC day of `ts`: `(day, rows)` per day.
pub(crate) fn split_by_day(rows: &RecordBatch) -> Result<Vec<(i64, RecordBatch)>, ArrowError> {
    let ts = rows
        .column(TS_IDX)
        .as_primitive::<TimestampNanosecondType>();
    let days: Int64Array = unary(ts, utc_day);
    let (Some(lo), Some(hi)) = (min(&days), max(&days)) else {
        return Ok(Vec::new()); // no rows
    };
    if lo == hi {
        // The common case: the whole batch is within one day; no copy.
        return Ok(vec![(lo, rows.clone())]);
    }
    let order = sort_to_indices(&days, None, None)?;
    let sorted_rows = take_record_batch(rows, &order)?;
    let sorted_days = take(&days, &order, None)?;
    let runs = partition(std::slice::from_ref(&sorted_days))?;
    let sorted_days = sorted_days.as_primitive::<Int64Type>();
    Ok(runs
        .ranges()
        .into_iter()
        .map(|r| {
            (
                sorted_days.value(r.start),
                sorted_rows.slice(r.start, r.len()),
            )
        })
        .collect())
}

/// How the files are written.
#[derive(Debug, Clone)]
pub(crate) struct Encoding {
    pub(crate) zstd: ZstdLevel,
    pub(crate) max_row_group_rows: usize,
    pub(crate) writer_id: String,
}

/// One data file, encoded and not yet written.
#[derive(Debug)]
pub(crate) struct EncodedFile {
    /// Relative to the table root: `tenant=<t>/date=<d>/part-<writer>-<uuid v7>.zstd.parquet`.
    pub(crate) path: String,
    pub(crate) bytes: Bytes,
    pub(crate) add: Add,
}

/// Encodes the pieces of one partition into a file and its `add` action.
pub(crate) fn encode_partition(
    key: &PartitionKey,
    pieces: &[&RecordBatch],
    encoding: &Encoding,
    now_ms: i64,
) -> Result<EncodedFile, TableError> {
    let date = key.date()?;
    let path = format!(
        "{TENANT}={}/{DATE}={date}/part-{}-{}.zstd.parquet",
        key.tenant,
        encoding.writer_id,
        Uuid::now_v7()
    );
    let parquet_err = |source| TableError::Parquet {
        path: path.clone(),
        source,
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(encoding.zstd))
        .set_dictionary_enabled(true)
        .set_max_row_group_row_count(Some(encoding.max_row_group_rows))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            super::ledger::WRITER_KEY.to_owned(),
            encoding.writer_id.clone(),
        )]))
        .build();
    let mut stats = Stats::default();
    let mut writer =
        ArrowWriter::try_new(Vec::new(), file_schema(), Some(props)).map_err(parquet_err)?;
    for rows in pieces {
        let rows = to_file_rows(rows)?;
        stats.add(&rows);
        // The writer appends the pieces into shared row groups without concatenating them.
        writer.write(&rows).map_err(parquet_err)?;
    }
    let bytes = Bytes::from(writer.into_inner().map_err(parquet_err)?);
    let add = Add {
        path: path.clone(),
        partition_values: HashMap::from([
            (TENANT.to_owned(), Some(key.tenant.clone())),
            (DATE.to_owned(), Some(date)),
        ]),
        size: bytes.len() as i64,
        modification_time: now_ms,
        data_change: true,
        stats: Some(stats.to_json().to_string()),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    };
    Ok(EncodedFile { path, bytes, add })
}

/// Rows of the readings schema (ns) as rows of the file schema (µs, rounded down).
fn to_file_rows(rows: &RecordBatch) -> Result<RecordBatch, TableError> {
    debug_assert_eq!(rows.schema(), readings_schema());
    let ns = rows
        .column(TS_IDX)
        .as_primitive::<TimestampNanosecondType>();
    let us: TimestampMicrosecondArray = unary(ns, |t| t.div_euclid(1_000));
    let columns: Vec<ArrayRef> = vec![
        Arc::clone(rows.column(DEVICE_IDX)),
        Arc::clone(rows.column(METRIC_IDX)),
        Arc::new(us.with_timezone(TS_TIMEZONE)),
        Arc::clone(rows.column(VALUE_IDX)),
    ];
    Ok(RecordBatch::try_new(file_schema(), columns)?)
}

/// The `stats` of an `add`: row count, and minimum and maximum per column.
#[derive(Debug, Default)]
struct Stats {
    rows: u64,
    device: StringRange,
    metric: StringRange,
    ts_us: Option<(i64, i64)>,
    value: Option<(f64, f64)>,
    /// A NaN makes min/max of `value` meaningless: leave them out.
    value_nan: bool,
}

#[derive(Debug, Default)]
struct StringRange(Option<(String, String)>);

impl StringRange {
    fn add(&mut self, column: &dyn Array) {
        let dict = column.as_dictionary::<Int32Type>();
        let values = dict.values().as_string::<i32>();
        // Only the dictionary entries the keys use (a sliced array shares its dictionary).
        let mut used = vec![false; values.len()];
        for k in dict.keys().values() {
            used[*k as usize] = true;
        }
        for (i, s) in values.iter().enumerate() {
            let (Some(s), true) = (s, used[i]) else {
                continue;
            };
            match &mut self.0 {
                None => self.0 = Some((s.to_owned(), s.to_owned())),
                Some((lo, hi)) => {
                    if s < lo.as_str() {
                        *lo = s.to_owned();
                    }
                    if s > hi.as_str() {
                        *hi = s.to_owned();
                    }
                }
            }
        }
    }

    fn bounds(&self) -> Option<(&str, &str)> {
        self.0
            .as_ref()
            .filter(|(lo, hi)| lo.len() <= MAX_STAT_STRING && hi.len() <= MAX_STAT_STRING)
            .map(|(lo, hi)| (lo.as_str(), hi.as_str()))
    }
}

impl Stats {
    fn add(&mut self, rows: &RecordBatch) {
        if rows.num_rows() == 0 {
            return;
        }
        self.rows += rows.num_rows() as u64;
        self.device.add(rows.column(DEVICE_IDX).as_ref());
        self.metric.add(rows.column(METRIC_IDX).as_ref());
        let ts = rows
            .column(TS_IDX)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        if let (Some(lo), Some(hi)) = (min(ts), max(ts)) {
            self.ts_us = Some(match self.ts_us {
                None => (lo, hi),
                Some((a, b)) => (a.min(lo), b.max(hi)),
            });
        }
        let value: &Float64Array = rows.column(VALUE_IDX).as_primitive();
        if value.values().iter().any(|v| v.is_nan()) {
            self.value_nan = true;
        } else if let (Some(lo), Some(hi)) = (min(value), max(value)) {
            self.value = Some(match self.value {
                None => (lo, hi),
                Some((a, b)) => (a.min(lo), b.max(hi)),
            });
        }
    }

    fn to_json(&self) -> Value {
        let mut lo = Map::new();
        let mut hi = Map::new();
        if let Some((a, b)) = self.device.bounds() {
            lo.insert(DEVICE.into(), json!(a));
            hi.insert(DEVICE.into(), json!(b));
        }
        if let Some((a, b)) = self.metric.bounds() {
            lo.insert(METRIC.into(), json!(a));
            hi.insert(METRIC.into(), json!(b));
        }
        if let Some((a, b)) = self.ts_us {
            // Delta keeps timestamp statistics at millisecond precision: round the minimum
            // down and the maximum up, so that both still bound the column.
            lo.insert(TS.into(), json!(format_ms(a.div_euclid(1_000))));
            hi.insert(
                TS.into(),
                json!(format_ms((a.max(b) + 999).div_euclid(1_000))),
            );
        }
        if let (Some((a, b)), false) = (self.value, self.value_nan)
            && a.is_finite()
            && b.is_finite()
        {
            lo.insert(VALUE.into(), json!(a));
            hi.insert(VALUE.into(), json!(b));
        }
        let nulls: Map<String, Value> = [DEVICE, METRIC, TS, VALUE]
            .into_iter()
            .map(|c| (c.to_owned(), json!(0)))
            .collect();
        json!({
            "numRecords": self.rows,
            "minValues": lo,
            "maxValues": hi,
            "nullCount": nulls,
        })
    }
}

fn format_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{HOUR_10, rows};

    const DAY: i64 = NS_PER_DAY;

    #[test]
    fn splits_by_utc_day() {
        let batch = rows(&[
            ("a", "m", HOUR_10 + DAY, 1.0),
            ("b", "m", HOUR_10, 2.0),
            ("c", "m", HOUR_10 + DAY + 1, 3.0),
        ]);
        let parts = split_by_day(&batch).expect("split");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].1.num_rows(), 1);
        assert_eq!(parts[1].0, parts[0].0 + 1);
        assert_eq!(parts[1].1.num_rows(), 2);
        let key = PartitionKey {
            tenant: "t".into(),
            day: parts[0].0,
        };
        assert_eq!(key.date().expect("date"), "2026-11-21");
    }

    #[test]
    fn stats_bound_every_column() {
        let batch = rows(&[
            ("dev-b", "temp", HOUR_10 + 1_500_000, 3.5),
            ("dev-a", "rh", HOUR_10 + 2_000_999, -1.0),
        ]);
        let key = PartitionKey {
            tenant: "acme".into(),
            day: HOUR_10.div_euclid(DAY),
        };
        let encoding = Encoding {
            zstd: ZstdLevel::try_new(1).expect("level"),
            max_row_group_rows: 1024,
            writer_id: "w1".into(),
        };
        let file = encode_partition(&key, &[&batch], &encoding, 7).expect("encode");
        assert!(
            file.path
                .starts_with("tenant=acme/date=2026-11-21/part-w1-")
        );
        assert_eq!(file.add.size as usize, file.bytes.len());
        let stats: Value =
            serde_json::from_str(file.add.stats.as_deref().expect("stats")).expect("json");
        assert_eq!(stats["numRecords"], 2);
        assert_eq!(stats["minValues"]["device"], "dev-a");
        assert_eq!(stats["maxValues"]["device"], "dev-b");
        assert_eq!(stats["minValues"]["metric"], "rh");
        assert_eq!(stats["minValues"]["value"], -1.0);
        assert_eq!(stats["maxValues"]["value"], 3.5);
        // 10:00:00.0015 rounds down to .001, 10:00:00.002000999 (µs .002000) up to .002.
        assert_eq!(stats["minValues"]["ts"], "2026-11-21T10:00:00.001Z");
        assert_eq!(stats["maxValues"]["ts"], "2026-11-21T10:00:00.002Z");

        // The file holds the rows at µs, readable by any Parquet reader.
        let reader = ::parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
            file.bytes.clone(),
            1024,
        )
        .expect("reader");
        let back: Vec<RecordBatch> = reader.collect::<Result<_, _>>().expect("rows");
        let ts = back[0]
            .column(TS_IDX)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(ts.value(0), (HOUR_10 + 1_500_000) / 1_000);
    }
}
