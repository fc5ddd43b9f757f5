//! The Parquet time-series store: the durable sink of readings, and its deduplication ledger.
//!
//! # Layout
//!
//! ```text
//! <root>/tenant=<tenant>/date=YYYY-MM-DD/hour=HH/part-<writer_id>-<uuid v7>.parquet
//! ```
//!
//! `date` and `hour` are the UTC hour of each row's device timestamp (`ts`), so a batch whose
//! rows straddle an hour boundary is split over two partitions. [`crate::query`] reads the
//! same layout as a hive-partitioned table.
//!
//! # Commits
//!
//! [`ParquetStore::commit`] writes ONE file per (tenant, hour) partition per commit: ZSTD,
//! dictionary encoding, row groups of at most [`ParquetStoreConfig::max_row_group_rows`] rows.
//! A file is written as `<dir>/.tmp-<name>.inprogress`, fsynced, renamed to `<name>`, and the
//! directory is fsynced; so a reader or a crash sees a file whole or not at all. The temporary
//! name does not end in `.parquet` so that queries never pick up a half-written or abandoned
//! file. Files with zero rows are never written.
//!
//! # Deduplication: the files are the ledger
//!
//! Every file lists the ids of the batches it contains in its footer key-value metadata
//! ([`BATCHES_KEY`], a JSON array of UUID strings). A batch is committed in a partition iff
//! some file of that partition lists it. There is no other state to lose or to keep in sync.
//!
//! Each store keeps an in-memory index `partition -> batch ids` (plus the file names already
//! read) and skips the rows of batches already committed in a partition. The index of a
//! partition is refreshed — its directory listed and the footers of files not yet seen read,
//! which is cheap: metadata only — on the first touch of that partition since the store was
//! opened (so a restarted process sees what it wrote before), and whenever a batch headed
//! there has [`StagedBatch::maybe_duplicate`] set (the AMQP redelivered flag: the batch may
//! have been committed by another process sharing the root). Partitions older than
//! [`ParquetStoreConfig::index_horizon_hours`] are forgotten to bound memory; touching one
//! again counts as a first touch.
//!
//! Limit: two processes committing the *same* batch id at the *same* time (each before the
//! other's rename) both write it. The broker only redelivers a batch after its first
//! delivery was given up (nack, channel or connection loss), so this needs a consumer that
//! lost its delivery yet still finished the commit concurrently with the redelivery.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::errors::ParquetError;
use ::parquet::file::metadata::{KeyValue, ParquetMetaDataReader};
use ::parquet::file::properties::WriterProperties;
use arrow::array::{AsArray, Int64Array};
use arrow::compute::{max, min, partition, sort_to_indices, take, take_record_batch, unary};
use arrow::datatypes::{Int64Type, TimestampNanosecondType};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::temporal_conversions::timestamp_s_to_datetime;
use serde::{Deserialize, Serialize};
use sluice_binding::model::{InvalidTenantId, TenantId, now_ns};
use uuid::Uuid;

use crate::columns::TS_IDX;
use crate::{SchemaMismatch, StagedBatch, conform_rows, readings_schema};

/// Footer key-value metadata key listing the batch ids in a file (JSON array of UUIDs).
pub const BATCHES_KEY: &str = "sluice.batches";
/// Footer key-value metadata key naming the writer ([`ParquetStoreConfig::writer_id`]).
pub const WRITER_KEY: &str = "sluice.writer";

const NS_PER_HOUR: i64 = 3_600_000_000_000;
const PART_PREFIX: &str = "part-";
const PART_SUFFIX: &str = ".parquet";
const TMP_PREFIX: &str = ".tmp-";
const TMP_SUFFIX: &str = ".inprogress";

/// Configuration of a [`ParquetStore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetStoreConfig {
    /// Root directory of the store; `tenant=<tenant>/date=YYYY-MM-DD/hour=HH/` lie below it.
    /// Several processes may share one root: they deduplicate each other's batches.
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// ZSTD compression level (1–22). Level 1 already stores synthetic telemetry at about
    /// 1.7 bytes a row; higher levels cost CPU on the commit path, which gates the acks.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Maximum rows in a row group. The writer buffers a whole row group before flushing it,
    /// so this bounds its memory; it is also the granularity of `ts` statistics pruning.
    #[serde(default = "default_max_row_group_rows")]
    pub max_row_group_rows: usize,
    /// Names this writer in file names (`part-<writer_id>-<uuid>.parquet`) and in the footer
    /// ([`WRITER_KEY`]), for provenance. `[A-Za-z0-9_-]{1,64}`. It need not be unique: file
    /// names are unique by their UUID v7.
    #[serde(default = "default_writer_id")]
    pub writer_id: String,
    /// How many hours back from the current hour partitions stay in the in-memory dedup
    /// index. Older ones are forgotten to bound memory; writing to one again re-reads its
    /// footers first, so this trades memory for a directory listing, never correctness.
    #[serde(default = "default_index_horizon_hours")]
    pub index_horizon_hours: u32,
}

fn default_root() -> PathBuf {
    PathBuf::from("data")
}
fn default_zstd_level() -> i32 {
    1
}
fn default_max_row_group_rows() -> usize {
    // Large enough for good compression and few row groups per hourly file, small enough
    // that a writer's buffered row group stays in the tens of MiB.
    256 * 1024
}
fn default_writer_id() -> String {
    "sluice".to_owned()
}
fn default_index_horizon_hours() -> u32 {
    48
}

impl Default for ParquetStoreConfig {
    fn default() -> Self {
        Self {
            root: default_root(),
            zstd_level: default_zstd_level(),
            max_row_group_rows: default_max_row_group_rows(),
            writer_id: default_writer_id(),
            index_horizon_hours: default_index_horizon_hours(),
        }
    }
}

/// Errors of the Parquet store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A batch names a tenant outside the tenant alphabet (it would be a path segment).
    #[error(transparent)]
    InvalidTenant(#[from] InvalidTenantId),
    /// A batch's rows do not have the readings schema.
    #[error(transparent)]
    Schema(#[from] SchemaMismatch),
    /// The configuration is unusable.
    #[error("invalid parquet store config: {0}")]
    Config(String),
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing a file or reading a footer failed.
    #[error("parquet {}: {source}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The Parquet error.
        #[source]
        source: ParquetError,
    },
    /// An Arrow kernel failed while splitting batches into partitions.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// A file's [`BATCHES_KEY`] footer entry is unreadable. Writing on would risk duplicates,
    /// so the commit fails instead.
    #[error("{}: unreadable {BATCHES_KEY} footer entry: {reason}", path.display())]
    Ledger {
        /// The file.
        path: PathBuf,
        /// Why it could not be parsed.
        reason: String,
    },
    /// A timestamp whose UTC date cannot be represented.
    #[error("timestamp {0} ns is outside the representable date range")]
    Timestamp(i64),
    /// The blocking commit task panicked or was cancelled.
    #[error("commit task failed: {0}")]
    Task(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What one [`ParquetStore::commit`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitOutcome {
    /// Per tenant, in tenant order.
    pub tenants: BTreeMap<String, TenantCommit>,
    /// Wall clock when the last file of the commit was durable, ns since the Unix epoch
    /// (the `committed` time of receipts).
    pub committed_ns: i64,
}

impl CommitOutcome {
    /// Rows newly stored, over all tenants.
    pub fn rows_written(&self) -> u64 {
        self.tenants.values().map(|t| t.rows_written).sum()
    }
    /// Rows skipped as already stored, over all tenants.
    pub fn rows_skipped(&self) -> u64 {
        self.tenants.values().map(|t| t.rows_skipped).sum()
    }
    /// Files written, over all tenants.
    pub fn files_written(&self) -> u64 {
        self.tenants.values().map(|t| t.files_written).sum()
    }
}

/// What a commit did for one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantCommit {
    /// Rows newly stored.
    pub rows_written: u64,
    /// Rows not stored because their batch was already committed in their partition.
    pub rows_skipped: u64,
    /// Files written (one per partition that got rows).
    pub files_written: u64,
    /// Every batch of this tenant in the commit, in input order. A batch with
    /// `rows_written > 0` was (at least partly) stored by this commit; receipts and latency
    /// metrics should cover those rows only.
    pub batches: Vec<BatchCommit>,
}

/// What a commit did with one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchCommit {
    /// The batch.
    pub batch_id: Uuid,
    /// Rows of this batch stored by this commit.
    pub rows_written: u64,
    /// Rows of this batch skipped as already stored (in the partitions where it was).
    pub rows_skipped: u64,
}

/// The Parquet store. Cheap to clone; clones share the dedup index.
#[derive(Debug, Clone)]
pub struct ParquetStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ParquetStoreConfig,
    zstd: ZstdLevel,
    /// Held for a whole commit (inside the blocking task, never across an `.await`): it
    /// serialises this process's commits, so two concurrent commits of one store cannot
    /// both decide a batch is new.
    ledger: Mutex<Ledger>,
}

/// The in-memory dedup index.
#[derive(Debug, Default)]
struct Ledger {
    partitions: HashMap<PartitionKey, PartitionLedger>,
}

#[derive(Debug, Default)]
struct PartitionLedger {
    /// Batches committed in this partition.
    batches: HashSet<Uuid>,
    /// File names whose footers are already in `batches`.
    files: HashSet<String>,
}

/// A (tenant, UTC hour) partition; `hour` counts hours since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PartitionKey {
    tenant: String,
    hour: i64,
}

impl PartitionKey {
    /// `tenant=<tenant>/date=YYYY-MM-DD/hour=HH`.
    fn relative_dir(&self) -> Result<PathBuf, StoreError> {
        let start = timestamp_s_to_datetime(self.hour.saturating_mul(3600))
            .ok_or(StoreError::Timestamp(self.hour.saturating_mul(NS_PER_HOUR)))?;
        let mut dir = PathBuf::from(format!("tenant={}", self.tenant));
        dir.push(format!("date={}", start.format("%Y-%m-%d")));
        dir.push(format!("hour={:02}", self.hour.rem_euclid(24)));
        Ok(dir)
    }
}

impl ParquetStore {
    /// Opens (creating the root directory if needed) a store. No file is read here: each
    /// partition's footers are read on its first touch.
    pub fn open(config: ParquetStoreConfig) -> Result<Self, StoreError> {
        let zstd = ZstdLevel::try_new(config.zstd_level)
            .map_err(|e| StoreError::Config(format!("zstd_level: {e}")))?;
        if config.max_row_group_rows == 0 {
            return Err(StoreError::Config("max_row_group_rows must be > 0".into()));
        }
        let id = config.writer_id.as_bytes();
        if id.is_empty()
            || id.len() > 64
            || !id
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(StoreError::Config(format!(
                "writer_id {:?}: expected [A-Za-z0-9_-]{{1,64}}",
                config.writer_id
            )));
        }
        fs::create_dir_all(&config.root).map_err(io_err("create", &config.root))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                zstd,
                ledger: Mutex::new(Ledger::default()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ParquetStoreConfig {
        &self.inner.config
    }

    /// Commits `batches`: splits their rows by (tenant, hour), skips the rows of batches
    /// already committed in a partition, and writes one file per partition that has rows
    /// left. When this returns `Ok`, every row of every batch is durable (newly written or
    /// found already stored), so the deliveries may be acked.
    ///
    /// On `Err` some partitions may have been written; retrying the same batches is safe
    /// (they are then skipped there).
    pub async fn commit(&self, batches: Vec<StagedBatch>) -> Result<CommitOutcome, StoreError> {
        if batches.is_empty() {
            return Ok(CommitOutcome::default());
        }
        let inner = Arc::clone(&self.inner);
        // Splitting, encoding, compression and fsync are all CPU or blocking I/O.
        tokio::task::spawn_blocking(move || inner.commit_blocking(&batches, now_ns()))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Number of partitions in the in-memory dedup index (for tests and metrics). Waits
    /// for a running commit to finish.
    pub fn indexed_partitions(&self) -> usize {
        self.inner.lock_ledger().partitions.len()
    }
}

impl Inner {
    fn lock_ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|poisoned| {
            // A commit panicked mid-way. The files are the truth: forget the index so every
            // partition is re-read on its next touch.
            let mut ledger = poisoned.into_inner();
            ledger.partitions.clear();
            self.ledger.clear_poison();
            ledger
        })
    }

    fn commit_blocking(
        &self,
        batches: &[StagedBatch],
        now_ns: i64,
    ) -> Result<CommitOutcome, StoreError> {
        // Validate everything before writing anything, and split without holding the lock.
        let mut partitions: BTreeMap<PartitionKey, Vec<Piece>> = BTreeMap::new();
        for (index, batch) in batches.iter().enumerate() {
            TenantId::check(&batch.tenant)?;
            let rows = conform_rows(batch.batch_id, &batch.rows)?;
            for (hour, rows) in split_by_hour(&rows)? {
                let key = PartitionKey {
                    tenant: batch.tenant.clone(),
                    hour,
                };
                partitions
                    .entry(key)
                    .or_default()
                    .push(Piece { batch: index, rows });
            }
        }

        let mut tally = vec![(0u64, 0u64); batches.len()];
        let mut files: HashMap<String, u64> = HashMap::new();
        let mut ledger = self.lock_ledger();
        let horizon = i64::from(self.config.index_horizon_hours);
        ledger.evict_before(now_ns.div_euclid(NS_PER_HOUR) - horizon);

        for (key, pieces) in partitions {
            let dir = self.config.root.join(key.relative_dir()?);
            let first_touch = !ledger.partitions.contains_key(&key);
            let redelivered = pieces.iter().any(|p| batches[p.batch].maybe_duplicate);
            if first_touch || redelivered {
                let entry = ledger.partitions.entry(key.clone()).or_default();
                if let Err(e) = refresh(&dir, entry) {
                    // A half-read index would pass for a complete one on the next touch.
                    ledger.partitions.remove(&key);
                    return Err(e);
                }
            }
            let entry = ledger.partitions.entry(key.clone()).or_default();

            let mut new_ids = Vec::new();
            let mut kept = Vec::new();
            for (i, piece) in pieces.iter().enumerate() {
                let batch = &batches[piece.batch];
                // `new_ids` also catches a batch id given twice in one commit.
                if entry.batches.contains(&batch.batch_id) || new_ids.contains(&batch.batch_id) {
                    tally[piece.batch].1 += piece.rows.num_rows() as u64;
                } else {
                    new_ids.push(batch.batch_id);
                    kept.push(i);
                }
            }
            if kept.is_empty() {
                continue;
            }
            let rows: Vec<&RecordBatch> = kept.iter().map(|&i| &pieces[i].rows).collect();
            let name = match self.write_file(&key, &dir, &rows, &new_ids) {
                Ok(name) => name,
                Err(e) => {
                    // The file may exist anyway (e.g. renamed, then the directory fsync
                    // failed): re-read the partition on its next touch rather than trust
                    // the index.
                    ledger.partitions.remove(&key);
                    return Err(e);
                }
            };
            entry.files.insert(name);
            entry.batches.extend(new_ids.iter().copied());
            for &i in &kept {
                tally[pieces[i].batch].0 += pieces[i].rows.num_rows() as u64;
            }
            *files.entry(key.tenant).or_default() += 1;
        }
        drop(ledger);

        let mut outcome = CommitOutcome {
            tenants: BTreeMap::new(),
            committed_ns: now_ns_after(now_ns),
        };
        for (batch, (written, skipped)) in batches.iter().zip(tally) {
            let tenant = outcome.tenants.entry(batch.tenant.clone()).or_default();
            tenant.rows_written += written;
            tenant.rows_skipped += skipped;
            tenant.batches.push(BatchCommit {
                batch_id: batch.batch_id,
                rows_written: written,
                rows_skipped: skipped,
            });
        }
        for (tenant, n) in files {
            if let Some(t) = outcome.tenants.get_mut(&tenant) {
                t.files_written = n;
            }
        }
        Ok(outcome)
    }

    /// Writes one partition file atomically and returns its name.
    fn write_file(
        &self,
        key: &PartitionKey,
        dir: &Path,
        rows: &[&RecordBatch],
        batch_ids: &[Uuid],
    ) -> Result<String, StoreError> {
        create_dirs_durable(&self.config.root, dir)?;
        let name = format!(
            "{PART_PREFIX}{}-{}{PART_SUFFIX}",
            self.config.writer_id,
            Uuid::now_v7()
        );
        let tmp = dir.join(format!("{TMP_PREFIX}{name}{TMP_SUFFIX}"));
        let path = dir.join(&name);

        let result = self.write_tmp(&tmp, rows, batch_ids).and_then(|()| {
            fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
            // The rename is only durable once the directory entry is.
            sync_dir(dir)
        });
        if let Err(e) = result {
            // Best effort: the temporary name is invisible to queries and to the ledger.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        tracing::debug!(
            tenant = %key.tenant,
            file = %path.display(),
            batches = batch_ids.len(),
            "parquet file committed"
        );
        Ok(name)
    }

    fn write_tmp(
        &self,
        tmp: &Path,
        rows: &[&RecordBatch],
        batch_ids: &[Uuid],
    ) -> Result<(), StoreError> {
        let parquet_err = |source| StoreError::Parquet {
            path: tmp.to_owned(),
            source,
        };
        let ids: Vec<String> = batch_ids.iter().map(|id| format!("\"{id}\"")).collect();
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(self.zstd))
            .set_dictionary_enabled(true)
            .set_max_row_group_row_count(Some(self.config.max_row_group_rows))
            .set_key_value_metadata(Some(vec![
                KeyValue::new(BATCHES_KEY.to_owned(), format!("[{}]", ids.join(","))),
                KeyValue::new(WRITER_KEY.to_owned(), self.config.writer_id.clone()),
            ]))
            .build();
        // `create_new`: never clobber another writer's file, even on a UUID collision.
        let file = File::create_new(tmp).map_err(io_err("create", tmp))?;
        let mut writer =
            ArrowWriter::try_new(file, readings_schema(), Some(props)).map_err(parquet_err)?;
        // The writer appends the pieces into shared row groups, which concatenates them
        // without first copying them into one RecordBatch.
        for batch in rows {
            writer.write(batch).map_err(parquet_err)?;
        }
        let file = writer.into_inner().map_err(parquet_err)?;
        file.sync_all().map_err(io_err("fsync", tmp))
    }
}

impl Ledger {
    fn evict_before(&mut self, hour: i64) {
        self.partitions.retain(|key, _| key.hour >= hour);
    }
}

/// Rows of one batch that fall in one partition.
struct Piece {
    /// Index of the batch in the commit.
    batch: usize,
    rows: RecordBatch,
}

/// Splits rows by the UTC hour of `ts`, returning `(hours since epoch, rows)` per hour.
fn split_by_hour(rows: &RecordBatch) -> Result<Vec<(i64, RecordBatch)>, ArrowError> {
    let ts = rows
        .column(TS_IDX)
        .as_primitive::<TimestampNanosecondType>();
    let hours: Int64Array = unary(ts, |t| t.div_euclid(NS_PER_HOUR));
    let (Some(lo), Some(hi)) = (min(&hours), max(&hours)) else {
        return Ok(Vec::new()); // no rows
    };
    if lo == hi {
        // The common case: the whole batch is within one hour; no copy.
        return Ok(vec![(lo, rows.clone())]);
    }
    // Group rows by hour: sort the hour column, take the rows in that order, and cut the
    // runs of equal hours into zero-copy slices.
    let order = sort_to_indices(&hours, None, None)?;
    let sorted_rows = take_record_batch(rows, &order)?;
    let sorted_hours = take(&hours, &order, None)?;
    let runs = partition(std::slice::from_ref(&sorted_hours))?;
    let sorted_hours = sorted_hours.as_primitive::<Int64Type>();
    Ok(runs
        .ranges()
        .into_iter()
        .map(|r| {
            (
                sorted_hours.value(r.start),
                sorted_rows.slice(r.start, r.len()),
            )
        })
        .collect())
}

/// Adds to `entry` the batch ids of the partition's files not read yet.
fn refresh(dir: &Path, entry: &mut PartitionLedger) -> Result<(), StoreError> {
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for dirent in listing {
        let dirent = dirent.map_err(io_err("list", dir))?;
        let Ok(name) = dirent.file_name().into_string() else {
            continue; // not ours: our names are ASCII
        };
        if !(name.starts_with(PART_PREFIX) && name.ends_with(PART_SUFFIX))
            || entry.files.contains(&name)
        {
            continue;
        }
        let path = dirent.path();
        match read_batch_ids(&path) {
            Ok(ids) => entry.batches.extend(ids),
            // Removed since the listing (a future compaction): its batches live elsewhere.
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue;
            }
            Err(e) => return Err(e),
        }
        entry.files.insert(name);
    }
    Ok(())
}

/// Reads the batch ids listed in a file's footer (reads the footer only).
fn read_batch_ids(path: &Path) -> Result<Vec<Uuid>, StoreError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let metadata = ParquetMetaDataReader::new()
        .parse_and_finish(&file)
        .map_err(|source| StoreError::Parquet {
            path: path.to_owned(),
            source,
        })?;
    let value = metadata
        .file_metadata()
        .key_value_metadata()
        .and_then(|kvs| kvs.iter().find(|kv| kv.key == BATCHES_KEY))
        .and_then(|kv| kv.value.as_deref());
    let Some(value) = value else {
        tracing::warn!(file = %path.display(), "parquet file without {BATCHES_KEY}; ignored for dedup");
        return Ok(Vec::new());
    };
    serde_json::from_str(value).map_err(|e| StoreError::Ledger {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Creates `dir` (below the existing `root`) and fsyncs the parent of every directory it
/// creates, so a committed file's path survives a crash too.
fn create_dirs_durable(root: &Path, dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let relative = dir
        .strip_prefix(root)
        .map_err(|_| StoreError::Config(format!("{} is not below the root", dir.display())))?;
    let mut current = root.to_path_buf();
    for component in relative.components() {
        let next = current.join(component);
        match fs::create_dir(&next) {
            Ok(()) => sync_dir(&current)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", &next)(e)),
        }
        current = next;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// The current time, but never before `start` (the wall clock may step back).
fn now_ns_after(start: i64) -> i64 {
    now_ns().max(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::query::TenantQuery;
    use crate::test_util::{HOUR_10, NS_PER_HOUR as HOUR, rows, series, staged};

    fn config(root: &Path, writer: &str) -> ParquetStoreConfig {
        ParquetStoreConfig {
            root: root.to_owned(),
            writer_id: writer.to_owned(),
            ..ParquetStoreConfig::default()
        }
    }

    async fn count(root: &Path, tenant: &str, filter: &str) -> i64 {
        let q = TenantQuery::new(root, tenant).expect("query");
        let batches = q
            .sql(&format!("SELECT count(*) AS n FROM readings {filter}"))
            .await
            .expect("sql");
        batches[0].column(0).as_primitive::<Int64Type>().value(0)
    }

    /// All files below `root`, relative, sorted.
    fn files(root: &Path) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).expect("read_dir") {
                let path = e.expect("dirent").path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else {
                    let rel = path.strip_prefix(root).expect("below root");
                    out.push(rel.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out.sort();
        out
    }

    #[test]
    fn example_config_parses() {
        let config: ParquetStoreConfig = toml::from_str(
            r#"
            root = "/var/lib/sluice"
            zstd_level = 3
            max_row_group_rows = 100000
            writer_id = "storage-1"
            index_horizon_hours = 24
            "#,
        )
        .expect("parse");
        assert_eq!(config.root, PathBuf::from("/var/lib/sluice"));
        assert_eq!(config.index_horizon_hours, 24);
        let defaults: ParquetStoreConfig = toml::from_str("").expect("parse");
        assert_eq!(defaults, ParquetStoreConfig::default());
        assert!(toml::from_str::<ParquetStoreConfig>("rooot = \"x\"").is_err());
    }

    #[test]
    fn partition_dirs_are_utc_date_and_hour() {
        let key = PartitionKey {
            tenant: "acme".into(),
            hour: HOUR_10 / HOUR + 15, // 2026-11-22T01:00Z
        };
        assert_eq!(
            key.relative_dir().expect("dir"),
            PathBuf::from("tenant=acme/date=2026-11-22/hour=01")
        );
    }

    #[tokio::test]
    async fn commit_then_query_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ParquetStore::open(config(dir.path(), "w1")).expect("open");
        let a = staged("acme", series(1000, HOUR_10));
        let b = staged("acme", series(500, HOUR_10 + HOUR));
        let c = staged("other", series(7, HOUR_10));
        let outcome = store
            .commit(vec![a.clone(), b.clone(), c])
            .await
            .expect("commit");

        let acme = &outcome.tenants["acme"];
        assert_eq!(
            (acme.rows_written, acme.rows_skipped, acme.files_written),
            (1500, 0, 2)
        );
        assert_eq!(
            acme.batches,
            vec![
                BatchCommit {
                    batch_id: a.batch_id,
                    rows_written: 1000,
                    rows_skipped: 0
                },
                BatchCommit {
                    batch_id: b.batch_id,
                    rows_written: 500,
                    rows_skipped: 0
                },
            ]
        );
        assert_eq!(outcome.tenants["other"].rows_written, 7);
        assert_eq!(outcome.files_written(), 3);
        assert!(outcome.committed_ns > 0);

        assert_eq!(count(dir.path(), "acme", "").await, 1500);
        assert_eq!(
            count(
                dir.path(),
                "acme",
                "WHERE date = '2026-11-21' AND hour = '11'"
            )
            .await,
            500
        );
        assert_eq!(count(dir.path(), "other", "").await, 7);

        // Layout, and no temporary file left behind.
        let names = files(dir.path());
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names[0].starts_with("tenant=acme/date=2026-11-21/hour=10/part-w1-"));
        assert!(names[1].starts_with("tenant=acme/date=2026-11-21/hour=11/part-w1-"));
        assert!(names.iter().all(|n| n.ends_with(".parquet")));
    }

    #[tokio::test]
    async fn footer_lists_batches_and_files_are_zstd_dictionary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ParquetStore::open(ParquetStoreConfig {
            max_row_group_rows: 300,
            ..config(dir.path(), "w1")
        })
        .expect("open");
        let a = staged("acme", series(500, HOUR_10));
        let b = staged("acme", series(500, HOUR_10));
        store
            .commit(vec![a.clone(), b.clone()])
            .await
            .expect("commit");

        let names = files(dir.path());
        assert_eq!(names.len(), 1, "one file per partition per commit");
        let path = dir.path().join(&names[0]);
        let mut ids = read_batch_ids(&path).expect("ids");
        ids.sort();
        let mut want = vec![a.batch_id, b.batch_id];
        want.sort();
        assert_eq!(ids, want);

        let file = File::open(&path).expect("open");
        let meta = ParquetMetaDataReader::new()
            .parse_and_finish(&file)
            .expect("footer");
        assert_eq!(meta.file_metadata().num_rows(), 1000);
        assert_eq!(meta.num_row_groups(), 4, "row groups of at most 300 rows");
        let device = meta.row_group(0).column(0);
        assert!(matches!(device.compression(), Compression::ZSTD(_)));
        assert!(
            device.dictionary_page_offset().is_some(),
            "dictionary encoded"
        );
    }

    #[tokio::test]
    async fn straddling_batch_splits_and_partial_redelivery_completes_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 30 rows before 11:00 and 30 after.
        let full = staged("acme", series(60, HOUR_10 + HOUR - 30 * 1_000_000));
        let store = ParquetStore::open(config(dir.path(), "w1")).expect("open");

        // Simulate a crash after only the 10:00 partition of `full` was written: commit the
        // same batch id with just its 10:00 rows.
        let first_half = StagedBatch {
            rows: full.rows.slice(0, 30),
            ..full.clone()
        };
        let outcome = store.commit(vec![first_half]).await.expect("commit");
        assert_eq!(outcome.files_written(), 1);
        drop(store);

        // A restarted process gets the whole batch redelivered.
        let store = ParquetStore::open(config(dir.path(), "w2")).expect("open");
        let redelivered = StagedBatch {
            maybe_duplicate: true,
            ..full.clone()
        };
        let outcome = store.commit(vec![redelivered]).await.expect("commit");
        let acme = &outcome.tenants["acme"];
        assert_eq!(
            (acme.rows_written, acme.rows_skipped, acme.files_written),
            (30, 30, 1)
        );

        assert_eq!(count(dir.path(), "acme", "").await, 60);
        assert_eq!(count(dir.path(), "acme", "WHERE hour = '10'").await, 30);
        assert_eq!(count(dir.path(), "acme", "WHERE hour = '11'").await, 30);
        // The 10:00 and 11:00 partitions each got exactly one file.
        assert_eq!(files(dir.path()).len(), 2);

        // And a straddling batch committed in one go writes one file per partition.
        let other = staged("acme", series(60, HOUR_10 + HOUR - 30 * 1_000_000));
        let outcome = store.commit(vec![other]).await.expect("commit");
        assert_eq!(outcome.files_written(), 2);
        assert_eq!(outcome.rows_written(), 60);
    }

    #[tokio::test]
    async fn two_stores_on_one_root_dedup_redeliveries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = ParquetStore::open(config(dir.path(), "a")).expect("open");
        let b = ParquetStore::open(config(dir.path(), "b")).expect("open");

        // `b` touches the partition first, so its index of it is already warm.
        b.commit(vec![staged("acme", series(10, HOUR_10))])
            .await
            .expect("commit");
        // `a` stores batch X, then "loses" the delivery; the broker redelivers X to `b`.
        let x = staged("acme", series(100, HOUR_10));
        assert_eq!(
            a.commit(vec![x.clone()])
                .await
                .expect("commit")
                .rows_written(),
            100
        );
        let redelivered = StagedBatch {
            maybe_duplicate: true,
            ..x.clone()
        };
        let outcome = b.commit(vec![redelivered.clone()]).await.expect("commit");
        assert_eq!((outcome.rows_written(), outcome.rows_skipped()), (0, 100));
        assert_eq!(outcome.files_written(), 0, "zero rows are never written");

        // And the other way round, for a batch first stored by `b`.
        let y = staged("acme", series(20, HOUR_10));
        b.commit(vec![y.clone()]).await.expect("commit");
        let outcome = a
            .commit(vec![StagedBatch {
                maybe_duplicate: true,
                ..y
            }])
            .await
            .expect("commit");
        assert_eq!(outcome.rows_skipped(), 20);

        assert_eq!(count(dir.path(), "acme", "").await, 130);
    }

    #[tokio::test]
    async fn restarted_store_sees_its_own_commits_without_the_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let x = staged("acme", series(100, HOUR_10));
        let store = ParquetStore::open(config(dir.path(), "w")).expect("open");
        store.commit(vec![x.clone()]).await.expect("commit");
        // Same process, same batch again (e.g. a retry after a later partition failed).
        assert_eq!(
            store
                .commit(vec![x.clone()])
                .await
                .expect("commit")
                .rows_skipped(),
            100
        );
        drop(store);

        let store = ParquetStore::open(config(dir.path(), "w")).expect("open");
        let outcome = store.commit(vec![x]).await.expect("commit");
        assert_eq!((outcome.rows_written(), outcome.rows_skipped()), (0, 100));
        assert_eq!(count(dir.path(), "acme", "").await, 100);
    }

    #[tokio::test]
    async fn same_batch_twice_in_one_commit_is_stored_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ParquetStore::open(config(dir.path(), "w")).expect("open");
        let x = staged("acme", series(50, HOUR_10));
        let outcome = store.commit(vec![x.clone(), x]).await.expect("commit");
        assert_eq!((outcome.rows_written(), outcome.rows_skipped()), (50, 50));
        assert_eq!(count(dir.path(), "acme", "").await, 50);
    }

    #[tokio::test]
    async fn old_partitions_are_forgotten_but_still_deduplicated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ParquetStore::open(config(dir.path(), "w")).expect("open");
        // Drive the clock explicitly ("now" = 10 h after the data) instead of the wall clock.
        let x = staged("acme", series(10, HOUR_10));
        let now = HOUR_10 + 10 * HOUR;
        store
            .inner
            .commit_blocking(std::slice::from_ref(&x), now)
            .expect("commit");
        assert_eq!(store.indexed_partitions(), 1);

        // 49 hours later the partition is evicted by the next commit ...
        let later = HOUR_10 + 59 * HOUR;
        let y = staged("acme", series(10, later));
        store
            .inner
            .commit_blocking(std::slice::from_ref(&y), later)
            .expect("commit");
        assert_eq!(store.indexed_partitions(), 1);
        // ... and a late retry of `x` (flag unset) still finds it in the files.
        let outcome = store.inner.commit_blocking(&[x], later).expect("commit");
        assert_eq!(outcome.rows_skipped(), 10);
        assert_eq!(count(dir.path(), "acme", "").await, 20);
    }

    #[tokio::test]
    async fn invalid_input_is_rejected_before_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ParquetStore::open(config(dir.path(), "w")).expect("open");
        let good = staged("acme", series(10, HOUR_10));
        for tenant in ["../escape", "Acme", "a/b", ""] {
            let bad = staged(tenant, series(10, HOUR_10));
            let err = store
                .commit(vec![good.clone(), bad])
                .await
                .expect_err("invalid tenant");
            assert!(matches!(err, StoreError::InvalidTenant(_)), "{err}");
        }
        assert!(files(dir.path()).is_empty());

        // Zero rows: nothing written, not an error.
        let empty = staged("acme", rows(&[]));
        let outcome = store.commit(vec![empty]).await.expect("commit");
        assert_eq!(outcome.files_written(), 0);
        assert!(files(dir.path()).is_empty());

        assert!(
            ParquetStore::open(ParquetStoreConfig {
                writer_id: "../x".into(),
                ..config(dir.path(), "w")
            })
            .is_err()
        );
        assert!(
            ParquetStore::open(ParquetStoreConfig {
                zstd_level: 99,
                ..config(dir.path(), "w")
            })
            .is_err()
        );
    }

    #[test]
    fn split_by_hour_groups_rows() {
        let batch = rows(&[
            ("a", "m", HOUR_10 + HOUR, 1.0),
            ("b", "m", HOUR_10, 2.0),
            ("c", "m", HOUR_10 + 2 * HOUR + 5, 3.0),
            ("d", "m", HOUR_10 + HOUR + 7, 4.0),
        ]);
        let parts = split_by_hour(&batch).expect("split");
        let summary: Vec<(i64, Vec<f64>)> = parts
            .iter()
            .map(|(h, r)| {
                let mut v = r
                    .column(crate::columns::VALUE_IDX)
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .values()
                    .to_vec();
                v.sort_by(f64::total_cmp);
                (h - HOUR_10 / HOUR, v)
            })
            .collect();
        assert_eq!(
            summary,
            vec![(0, vec![2.0]), (1, vec![1.0, 4.0]), (2, vec![3.0])]
        );
    }
}
