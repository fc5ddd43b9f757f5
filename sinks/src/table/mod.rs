//! The readings table: one Delta Lake table on a local path or an object store, written by
//! Sluice's own Parquet writer and committed to the standard Delta log.
//!
//! `docs/storage.md` is the user-facing description (layout, commit protocol, how other
//! engines read the table). In short:
//!
//! - **Layout.** `<root>/_delta_log/` is the log; data files lie under
//!   `tenant=<tenant>/date=YYYY-MM-DD/` (the partition columns, the UTC date of `ts`). The
//!   table's columns are `device`, `metric` (strings), `ts` (timestamp, µs, UTC), `value`
//!   (double), `tenant` (string) and `date` (date).
//! - **Commits.** [`ReadingsTable::commit`] splits its batches by partition, encodes one file
//!   per partition ([`encode`]), writes the files, then writes ONE log entry that adds them
//!   all: a commit is stored whole or not at all. A data file not named by the log is
//!   invisible to every reader, so a crash between the two writes leaves only garbage for
//!   vacuum, never rows.
//! - **Exactly once.** The log entry's `commitInfo` lists the batch ids it stores; the
//!   [`ledger`] indexes them. A log entry is written with put-if-absent at the next version;
//!   a writer that loses the race reads the winning entry, drops the batches it already
//!   holds (re-encoding its files without them), and tries the next version. Version order
//!   serialises every writer of every process.
//! - **Several writers.** A `ReadingsTable` is cheap to clone and its clones commit
//!   concurrently: encoding and file writes run in parallel; only the log write is taken in
//!   turn, in version order, under the ledger's lock.
//! - **Checkpoints.** Every [`TableConfig::checkpoint_interval`] versions the writer that
//!   committed the version writes a checkpoint in the background, so that readers replay a
//!   bounded number of log entries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ::parquet::basic::ZstdLevel;
use ::parquet::errors::ParquetError;
use arrow::error::ArrowError;
use deltalake_core::kernel::transaction::{CommitData, TransactionError};
use deltalake_core::kernel::{Action, DataType, PrimitiveType, StructField};
use deltalake_core::logstore::{CommitOrBytes, LogStoreRef};
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use deltalake_core::{DeltaTableError, TableProperty};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_binding::model::{InvalidTenantId, TenantId, now_ns};
use tokio::sync::{Mutex, OnceCell};
use uuid::Uuid;

use crate::{SchemaMismatch, StagedBatch, conform_rows};

mod encode;
pub mod ledger;
pub mod location;
pub mod maintain;
pub mod pace;

pub use location::Location;

use encode::{EncodedFile, Encoding, PartitionKey, Piece};
use ledger::{BATCHES_KEY, Ledger, WRITER_KEY, parse_entry};

/// Partition column: the tenant id.
pub const TENANT: &str = "tenant";
/// Partition column: the UTC date of `ts`.
pub const DATE: &str = "date";
/// Columns the table is partitioned by, in path order.
pub const PARTITION_COLUMNS: [&str; 2] = [TENANT, DATE];

/// Configuration of a [`ReadingsTable`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Where the table lives: a local path (created if missing) or a URL, `s3://bucket/prefix`
    /// or `file:///path`. Several processes on several machines may share one table.
    #[serde(default = "default_store")]
    pub store: String,
    /// Options of the object store, by object_store's names (`aws_endpoint`, `aws_region`,
    /// `aws_access_key_id`, `aws_secret_access_key`, `aws_allow_http`, …); unset ones fall
    /// back to the `AWS_*` environment variables. Values whose key names a secret are never
    /// logged.
    #[serde(default)]
    pub storage_options: BTreeMap<String, String>,
    /// ZSTD compression level (1–22). Level 1 already stores synthetic telemetry at about
    /// 1.7 bytes a row; higher levels cost CPU on the commit path, which gates the acks.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Maximum rows in a row group. The writer buffers a whole row group before flushing it,
    /// so this bounds its memory; it is also the granularity of row-group pruning.
    #[serde(default = "default_max_row_group_rows")]
    pub max_row_group_rows: usize,
    /// Names this writer in file names (`part-<writer_id>-<uuid>.zstd.parquet`) and in the
    /// `commitInfo` of its commits, for provenance. `[A-Za-z0-9_-]{1,64}`; it need not be
    /// unique.
    #[serde(default = "default_writer_id")]
    pub writer_id: String,
    /// How far back the deduplication ledger reaches: two copies of a batch (a redelivery,
    /// a producer's retry) committed within this time of each other are stored once. At
    /// open the commits of this window are read from the log; memory is about 40 bytes per
    /// batch committed in the window.
    #[serde(
        default = "default_dedup_window",
        with = "sluice_binding::config::duration"
    )]
    pub dedup_window: Duration,
    /// A checkpoint is written every this many versions (the table property
    /// `delta.checkpointInterval`, set when the table is created).
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: u64,
}

fn default_store() -> String {
    "data".to_owned()
}
fn default_zstd_level() -> i32 {
    1
}
fn default_max_row_group_rows() -> usize {
    256 * 1024
}
fn default_writer_id() -> String {
    "sluice".to_owned()
}
fn default_dedup_window() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_checkpoint_interval() -> u64 {
    100
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            store: default_store(),
            storage_options: BTreeMap::new(),
            zstd_level: default_zstd_level(),
            max_row_group_rows: default_max_row_group_rows(),
            writer_id: default_writer_id(),
            dedup_window: default_dedup_window(),
            checkpoint_interval: default_checkpoint_interval(),
        }
    }
}

/// Errors of the readings table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A batch names a tenant outside the tenant alphabet (it would be a path segment).
    #[error(transparent)]
    InvalidTenant(#[from] InvalidTenantId),
    /// A batch's rows do not have the readings schema.
    #[error(transparent)]
    Schema(#[from] SchemaMismatch),
    /// The configuration is unusable.
    #[error("invalid table config: {0}")]
    Config(String),
    /// The store location cannot be used (shown without credentials).
    #[error("store {location}: {reason}")]
    Location {
        /// The location, without credentials.
        location: String,
        /// Why.
        reason: String,
    },
    /// The location holds files of the pre-Delta layout, which a table there would hide.
    #[error(
        "store {location}: {files} files of the old directory layout (tenant=/date=/hour=); \
         convert them first: sluice store migrate --store <the same location>"
    )]
    Legacy {
        /// The location.
        location: String,
        /// Old files found.
        files: usize,
    },
    /// The location holds a Delta table of another shape.
    #[error("store {location}: not a Sluice readings table: {reason}")]
    Incompatible {
        /// The location, without credentials.
        location: String,
        /// What differs.
        reason: String,
    },
    /// Reading or writing an object failed (network, permissions, full disk, …).
    #[error("{op} {path}: {source}")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The object, relative to the table.
        path: String,
        /// The object store's error.
        #[source]
        source: object_store::Error,
    },
    /// Making a local file durable failed.
    #[error("fsync {path}: {source}")]
    Sync {
        /// The file, relative to the table.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The Delta log could not be read or written.
    #[error("delta log: {0}")]
    Delta(#[from] DeltaTableError),
    /// A log entry is unreadable. Committing on would risk duplicates, so commits fail.
    #[error("log entry {version}: {reason}")]
    Log {
        /// The version.
        version: u64,
        /// Why.
        reason: String,
    },
    /// Encoding a file failed.
    #[error("parquet {path}: {source}")]
    Parquet {
        /// The file, relative to the table.
        path: String,
        /// The Parquet error.
        #[source]
        source: ParquetError,
    },
    /// An Arrow kernel failed while splitting batches into partitions.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// A timestamp whose UTC date cannot be represented.
    #[error("timestamp {0} is outside the representable date range")]
    Timestamp(i64),
    /// A blocking task panicked or was cancelled.
    #[error("commit task failed: {0}")]
    Task(String),
}

/// What one [`ReadingsTable::commit`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitOutcome {
    /// Per tenant, in tenant order.
    pub tenants: BTreeMap<String, TenantCommit>,
    /// Wall clock when the commit was durable, ns since the Unix epoch (the `committed` time
    /// of receipts).
    pub committed_ns: i64,
    /// The table version of the log entry written, or `None` when every batch was already
    /// stored.
    pub version: Option<u64>,
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
    /// Rows not stored because their batch was already committed.
    pub rows_skipped: u64,
    /// Files written (one per partition that got rows).
    pub files_written: u64,
    /// Every batch of this tenant in the commit, in input order.
    pub batches: Vec<BatchCommit>,
}

/// What a commit did with one batch: all its rows are written, or all skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchCommit {
    /// The batch.
    pub batch_id: Uuid,
    /// Rows of this batch stored by this commit.
    pub rows_written: u64,
    /// Rows of this batch skipped as already stored.
    pub rows_skipped: u64,
}

/// The readings table. Cheap to clone; clones share the ledger and commit concurrently.
#[derive(Debug, Clone)]
pub struct ReadingsTable {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: TableConfig,
    location: Location,
    log_store: LogStoreRef,
    store: Arc<dyn ObjectStore>,
    encoding: Encoding,
    /// Loaded before the first commit (reading the window's log entries), then held by a
    /// commit while it writes its log entry. Never held while files are encoded or written.
    ledger: OnceCell<Mutex<Ledger>>,
    /// The background checkpoint, if one was started; [`ReadingsTable::settle`] awaits it.
    checkpoint: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ReadingsTable {
    /// Opens the table at `config.store`, creating it if there is none. Fails with the
    /// location (without credentials) and the reason when the store is unreachable or
    /// holds something else.
    pub async fn open(config: TableConfig) -> Result<Self, TableError> {
        Self::open_checked(config, true).await
    }

    /// [`Self::open`] for the conversion of the old layout, which it leaves in place.
    pub(crate) async fn open_for_migration(config: TableConfig) -> Result<Self, TableError> {
        Self::open_checked(config, false).await
    }

    async fn open_checked(config: TableConfig, refuse_legacy: bool) -> Result<Self, TableError> {
        let zstd = ZstdLevel::try_new(config.zstd_level)
            .map_err(|e| TableError::Config(format!("zstd_level: {e}")))?;
        if config.max_row_group_rows == 0 {
            return Err(TableError::Config("max_row_group_rows must be > 0".into()));
        }
        if config.checkpoint_interval == 0 {
            return Err(TableError::Config("checkpoint_interval must be > 0".into()));
        }
        check_writer_id(&config.writer_id)?;
        let location = Location::parse(&config.store, config.storage_options.clone())?;
        if refuse_legacy && let Some(root) = location.local_root() {
            // A table created over the old layout would hide its rows from every query.
            let old =
                crate::legacy::migrate::legacy_files(&root).map_err(|e| TableError::Location {
                    location: location.redacted(),
                    reason: e.to_string(),
                })?;
            if !old.is_empty() {
                return Err(TableError::Legacy {
                    location: location.redacted(),
                    files: old.len(),
                });
            }
        }
        let log_store = location.log_store()?;
        let store = log_store.object_store(None);
        let table = Self {
            inner: Arc::new(Inner {
                encoding: Encoding {
                    zstd,
                    max_row_group_rows: config.max_row_group_rows,
                    writer_id: config.writer_id.clone(),
                },
                config,
                location,
                log_store,
                store,
                ledger: OnceCell::new(),
                checkpoint: std::sync::Mutex::new(None),
            }),
        };
        table.inner.create_or_check().await?;
        Ok(table)
    }

    /// The configuration.
    pub fn config(&self) -> &TableConfig {
        &self.inner.config
    }

    /// Where the table lives.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// The Delta log store (for readers and maintenance in this process).
    pub fn log_store(&self) -> LogStoreRef {
        Arc::clone(&self.inner.log_store)
    }

    /// Batch ids in the deduplication window (0 before the first commit).
    pub async fn ledger_len(&self) -> usize {
        match self.inner.ledger.get() {
            Some(l) => l.lock().await.len(),
            None => 0,
        }
    }

    /// Waits for the background checkpoint, if one runs. Call it before the runtime
    /// shuts down: a checkpoint cut off by the runtime's end panics inside delta-rs (the
    /// checkpoint itself is optional; the log is complete without it).
    pub async fn settle(&self) {
        let running = self
            .inner
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = running {
            let _ = handle.await;
        }
    }

    /// Commits `batches`: every batch not already in the table is stored, in one log entry.
    /// When this returns `Ok`, every row of every batch is durable (newly written, or found
    /// already stored), so the deliveries may be acked.
    ///
    /// On `Err` nothing of this call is visible (files may remain for vacuum); retrying the
    /// same batches is safe.
    pub async fn commit(&self, batches: Vec<StagedBatch>) -> Result<CommitOutcome, TableError> {
        if batches.is_empty() {
            return Ok(CommitOutcome::default());
        }
        let inner = Arc::clone(&self.inner);
        // Validate and split before anything is written.
        let batches = Arc::new(batches);
        let split = {
            let batches = Arc::clone(&batches);
            tokio::task::spawn_blocking(move || split(&batches))
                .await
                .map_err(|e| TableError::Task(e.to_string()))??
        };
        let split = Arc::new(split);
        let ledger = inner.ledger().await?;

        let mut skip: HashSet<usize> = HashSet::new();
        loop {
            // Batches already stored, and repeats within this commit, are skipped.
            {
                let ledger = ledger.lock().await;
                ledger_skips(&batches, &ledger, &mut skip);
            }
            let keep: Vec<usize> = (0..batches.len()).filter(|i| !skip.contains(i)).collect();
            if keep.is_empty() {
                return Ok(outcome(&batches, &skip, None));
            }
            let files = inner.write_files(&split, &skip).await?;
            let ids: Vec<Uuid> = keep.iter().map(|&i| batches[i].batch_id).collect();

            let mut ledger = ledger.lock().await;
            let result = loop {
                if ids.iter().any(|id| ledger.find(id).is_some()) {
                    // Another writer stored some of these meanwhile: start over without them.
                    break None;
                }
                let version = ledger.next_version;
                match inner.write_entry(version, &files, &ids).await {
                    Ok(()) => {
                        let now_ms = now_ns() / 1_000_000;
                        ledger.record(
                            version,
                            ledger::EntryBatches {
                                timestamp_ms: now_ms,
                                batches: ids.clone(),
                            },
                            now_ms,
                        );
                        break Some(Ok(version));
                    }
                    Err(TableError::Delta(DeltaTableError::VersionAlreadyExists(_))) => {
                        // Lost the race: read what won (and anything after it), then retry.
                        if let Err(e) = inner.catch_up(&mut ledger).await {
                            break Some(Err(e));
                        }
                    }
                    Err(e) => break Some(Err(e)),
                }
            };
            drop(ledger);
            match result {
                Some(Ok(version)) => {
                    let files_written = files.len() as u64;
                    let mut out = outcome(&batches, &skip, Some(version));
                    count_files(&mut out, &files);
                    tracing::debug!(
                        store = %inner.location,
                        version,
                        files = files_written,
                        batches = ids.len(),
                        "readings committed"
                    );
                    inner.maybe_checkpoint(version);
                    return Ok(out);
                }
                Some(Err(e)) => {
                    inner.forget_files(&files).await;
                    return Err(e);
                }
                None => {
                    inner.forget_files(&files).await;
                }
            }
        }
    }
}

fn check_writer_id(id: &str) -> Result<(), TableError> {
    let b = id.as_bytes();
    if b.is_empty()
        || b.len() > 64
        || !b
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return Err(TableError::Config(format!(
            "writer_id {id:?}: expected [A-Za-z0-9_-]{{1,64}}"
        )));
    }
    Ok(())
}

/// The pieces of every batch by partition: `(key, batch index, rows)`.
type Split = Vec<(PartitionKey, Piece)>;

fn split(batches: &[StagedBatch]) -> Result<Split, TableError> {
    let mut out = Vec::new();
    for (index, batch) in batches.iter().enumerate() {
        TenantId::check(&batch.tenant)?;
        let rows = conform_rows(batch.batch_id, &batch.rows)?;
        for (day, rows) in encode::split_by_day(&rows)? {
            let key = PartitionKey {
                tenant: batch.tenant.clone(),
                day,
            };
            out.push((key, Piece { batch: index, rows }));
        }
    }
    Ok(out)
}

/// Adds to `skip` the batches the ledger holds and the repeats of an id within `batches`.
fn ledger_skips(batches: &[StagedBatch], ledger: &Ledger, skip: &mut HashSet<usize>) {
    let mut seen = HashSet::new();
    for (i, b) in batches.iter().enumerate() {
        if ledger.find(&b.batch_id).is_some() || !seen.insert(b.batch_id) {
            skip.insert(i);
        }
    }
}

fn outcome(batches: &[StagedBatch], skip: &HashSet<usize>, version: Option<u64>) -> CommitOutcome {
    let mut out = CommitOutcome {
        tenants: BTreeMap::new(),
        committed_ns: now_ns(),
        version,
    };
    for (i, b) in batches.iter().enumerate() {
        let rows = b.rows.num_rows() as u64;
        let (written, skipped) = if skip.contains(&i) {
            (0, rows)
        } else {
            (rows, 0)
        };
        let t = out.tenants.entry(b.tenant.clone()).or_default();
        t.rows_written += written;
        t.rows_skipped += skipped;
        t.batches.push(BatchCommit {
            batch_id: b.batch_id,
            rows_written: written,
            rows_skipped: skipped,
        });
    }
    out
}

fn count_files(out: &mut CommitOutcome, files: &[EncodedFile]) {
    for f in files {
        if let Some(Some(tenant)) = f.add.partition_values.get(TENANT)
            && let Some(t) = out.tenants.get_mut(tenant)
        {
            t.files_written += 1;
        }
    }
}

impl Inner {
    /// Creates the table if the location holds none, else checks that it is a readings table.
    async fn create_or_check(&self) -> Result<(), TableError> {
        let incompatible = |reason: String| TableError::Incompatible {
            location: self.location.redacted(),
            reason,
        };
        let unreachable = |e: DeltaTableError| TableError::Location {
            location: self.location.redacted(),
            reason: e.to_string(),
        };
        let exists = self
            .log_store
            .is_delta_table_location()
            .await
            .map_err(unreachable)?;
        if !exists {
            match self.create().await {
                Ok(()) => {
                    tracing::info!(store = %self.location, "created the readings table");
                }
                // Another process created it first: fine, check it below.
                Err(DeltaTableError::VersionAlreadyExists(_)) => {}
                Err(e) if e.to_string().contains("already exists") => {}
                Err(e) => return Err(unreachable(e)),
            }
        }
        let table =
            deltalake_core::BlindDeltaTable::try_new_with_log_store(Arc::clone(&self.log_store))
                .await
                .map_err(unreachable)?;
        let partitions = table.metadata().partition_columns().to_vec();
        if partitions != PARTITION_COLUMNS {
            return Err(incompatible(format!(
                "partitioned by {partitions:?}, expected {PARTITION_COLUMNS:?}"
            )));
        }
        let schema = table.schema();
        for field in table_columns() {
            match schema.field(field.name()) {
                Some(f) if f.data_type() == field.data_type() => {}
                Some(f) => {
                    return Err(incompatible(format!(
                        "column {} is {}, expected {}",
                        field.name(),
                        f.data_type(),
                        field.data_type()
                    )));
                }
                None => return Err(incompatible(format!("no column {}", field.name()))),
            }
        }
        Ok(())
    }

    async fn create(&self) -> Result<(), DeltaTableError> {
        deltalake_core::operations::create::CreateBuilder::new()
            .with_log_store(Arc::clone(&self.log_store))
            .with_table_name("readings")
            .with_comment("Sluice readings: one row per (tenant, device, metric, ts)")
            .with_columns(table_columns())
            .with_partition_columns(PARTITION_COLUMNS)
            .with_configuration_property(
                TableProperty::CheckpointInterval,
                Some(self.config.checkpoint_interval.to_string()),
            )
            // Time travel and the deduplication window both read old log entries; a week
            // outlives both by far while bounding the log's size.
            .with_configuration_property(
                TableProperty::LogRetentionDuration,
                Some("interval 7 days"),
            )
            .with_save_mode(SaveMode::ErrorIfExists)
            .await
            .map(|_| ())
    }

    /// The ledger, loading it from the log on first use.
    async fn ledger(&self) -> Result<&Mutex<Ledger>, TableError> {
        self.ledger
            .get_or_try_init(|| async { self.load_ledger().await.map(Mutex::new) })
            .await
    }

    /// Reads the log entries of the deduplication window, newest first.
    async fn load_ledger(&self) -> Result<Ledger, TableError> {
        let latest = self
            .log_store
            .get_latest_version(0)
            .await
            .map_err(TableError::Delta)?;
        let window_ms = self.config.dedup_window.as_millis() as i64;
        let now_ms = now_ns() / 1_000_000;
        let mut ledger = Ledger::new(latest + 1, window_ms);
        let mut next_down = Some(latest);
        let mut read = 0u64;
        // In chunks of concurrent reads, until an entry older than the window (or none).
        const CHUNK: u64 = 64;
        'outer: while let Some(top) = next_down {
            let bottom = top.saturating_sub(CHUNK - 1);
            let versions: Vec<u64> = (bottom..=top).rev().collect();
            // Owned futures (no borrow of `self` in the combinator), so that the commit
            // future stays `Send` for any caller.
            let reads = versions.into_iter().map(|v| {
                let log_store = Arc::clone(&self.log_store);
                async move {
                    log_store
                        .read_commit_entry(v)
                        .await
                        .map(|b| (v, b))
                        .map_err(TableError::Delta)
                }
            });
            let entries: Vec<(u64, Option<bytes::Bytes>)> = futures::stream::iter(reads)
                .buffered(16)
                .try_collect()
                .await?;
            for (version, bytes) in entries {
                read += 1;
                let Some(bytes) = bytes else {
                    // Cleaned up (older than the log retention): nothing further back.
                    break 'outer;
                };
                let entry =
                    parse_entry(&bytes).map_err(|reason| TableError::Log { version, reason })?;
                let old = entry.timestamp_ms < now_ms - window_ms;
                ledger.record(version, entry, now_ms);
                if old {
                    break 'outer;
                }
            }
            next_down = bottom.checked_sub(1);
        }
        tracing::info!(
            store = %self.location,
            version = latest,
            entries_read = read,
            batches = ledger.len(),
            "deduplication ledger loaded"
        );
        Ok(ledger)
    }

    async fn read_entry(&self, version: u64) -> Result<Option<bytes::Bytes>, TableError> {
        self.log_store
            .read_commit_entry(version)
            .await
            .map_err(TableError::Delta)
    }

    /// Reads every entry from `ledger.next_version` on until there is none.
    async fn catch_up(&self, ledger: &mut Ledger) -> Result<(), TableError> {
        loop {
            let version = ledger.next_version;
            let Some(bytes) = self.read_entry(version).await? else {
                return Ok(());
            };
            let entry =
                parse_entry(&bytes).map_err(|reason| TableError::Log { version, reason })?;
            ledger.record(version, entry, now_ns() / 1_000_000);
        }
    }

    /// Encodes the pieces of the batches not in `skip` and writes their files, concurrently.
    async fn write_files(
        &self,
        split: &Arc<Split>,
        skip: &HashSet<usize>,
    ) -> Result<Vec<EncodedFile>, TableError> {
        let encoding = self.encoding.clone();
        let split = Arc::clone(split);
        let skip = skip.clone();
        let files = tokio::task::spawn_blocking(move || -> Result<Vec<EncodedFile>, TableError> {
            let now_ms = now_ns() / 1_000_000;
            let mut parts: BTreeMap<&PartitionKey, Vec<&arrow::record_batch::RecordBatch>> =
                BTreeMap::new();
            for (key, piece) in split.iter() {
                if !skip.contains(&piece.batch) {
                    parts.entry(key).or_default().push(&piece.rows);
                }
            }
            parts
                .into_iter()
                .map(|(key, rows)| encode::encode_partition(key, &rows, &encoding, now_ms))
                .collect()
        })
        .await
        .map_err(|e| TableError::Task(e.to_string()))??;

        let puts: Vec<_> = files
            .iter()
            .map(|f| {
                let (store, location) = (Arc::clone(&self.store), self.location.clone());
                let (name, bytes) = (f.path.clone(), f.bytes.clone());
                async move {
                    let path = ObjectPath::from(name.as_str());
                    store
                        .put(&path, PutPayload::from(bytes))
                        .await
                        .map_err(|source| TableError::Store {
                            op: "write",
                            path: name,
                            source,
                        })?;
                    location.sync(&path).await
                }
            })
            .collect();
        let result: Result<Vec<()>, TableError> = futures::stream::iter(puts)
            .buffer_unordered(8)
            .try_collect()
            .await;
        if let Err(e) = result {
            self.forget_files(&files).await;
            return Err(e);
        }
        Ok(files)
    }

    /// Writes the log entry adding `files` at `version` (put-if-absent).
    async fn write_entry(
        &self,
        version: u64,
        files: &[EncodedFile],
        ids: &[Uuid],
    ) -> Result<(), TableError> {
        let actions = files.iter().map(|f| Action::Add(f.add.clone())).collect();
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: Some(PARTITION_COLUMNS.iter().map(|c| (*c).to_owned()).collect()),
            predicate: None,
        };
        let ids: Vec<Value> = ids.iter().map(|id| Value::String(id.to_string())).collect();
        let metadata = HashMap::from([
            (BATCHES_KEY.to_owned(), Value::Array(ids)),
            (
                WRITER_KEY.to_owned(),
                Value::String(self.config.writer_id.clone()),
            ),
            ("isBlindAppend".to_owned(), Value::Bool(true)),
        ]);
        let bytes = CommitData::new(actions, operation, metadata, Vec::new())
            .get_bytes()
            .map_err(|e| TableError::Delta(e.into()))?;
        match self
            .log_store
            .write_commit_entry(version, CommitOrBytes::LogBytes(bytes), Uuid::new_v4())
            .await
        {
            Ok(()) => {}
            Err(TransactionError::VersionAlreadyExists(v)) => {
                return Err(TableError::Delta(DeltaTableError::VersionAlreadyExists(v)));
            }
            Err(e) => return Err(TableError::Delta(e.into())),
        }
        let entry = ObjectPath::from(format!("_delta_log/{version:020}.json"));
        self.location.sync(&entry).await
    }

    /// Deletes data files no log entry names (best effort; vacuum removes what remains).
    async fn forget_files(&self, files: &[EncodedFile]) {
        for f in files {
            let _ = self.store.delete(&ObjectPath::from(f.path.as_str())).await;
        }
    }

    /// Starts a checkpoint of `version` in the background when it is due and none runs.
    fn maybe_checkpoint(self: &Arc<Self>, version: u64) {
        if version == 0 || !version.is_multiple_of(self.config.checkpoint_interval) {
            return;
        }
        let mut running = self.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
        if running.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let inner = Arc::clone(self);
        *running = Some(tokio::spawn(async move {
            match inner.checkpoint(version).await {
                Ok(()) => tracing::debug!(store = %inner.location, version, "checkpoint written"),
                Err(e) => {
                    tracing::warn!(store = %inner.location, version, error = %e, "checkpoint failed");
                }
            }
        }));
    }

    async fn checkpoint(&self, version: u64) -> Result<(), DeltaTableError> {
        let mut table = deltalake_core::DeltaTable::new(Arc::clone(&self.log_store));
        table.load_version(version).await?;
        deltalake_core::checkpoints::create_checkpoint(&table, None).await?;
        deltalake_core::checkpoints::cleanup_metadata(&table, None).await?;
        Ok(())
    }
}

/// The table's columns, data then partition columns.
fn table_columns() -> Vec<StructField> {
    use crate::columns::{DEVICE, METRIC, TS, VALUE};
    vec![
        StructField::new(DEVICE, DataType::Primitive(PrimitiveType::String), false),
        StructField::new(METRIC, DataType::Primitive(PrimitiveType::String), false),
        StructField::new(TS, DataType::Primitive(PrimitiveType::Timestamp), false),
        StructField::new(VALUE, DataType::Primitive(PrimitiveType::Double), false),
        StructField::new(TENANT, DataType::Primitive(PrimitiveType::String), false),
        StructField::new(DATE, DataType::Primitive(PrimitiveType::Date), false),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    use super::*;
    use crate::query::TenantQuery;
    use crate::test_util::{HOUR_10, series, staged};

    fn config(root: &Path, writer: &str) -> TableConfig {
        TableConfig {
            store: root.to_str().expect("utf-8").to_owned(),
            writer_id: writer.to_owned(),
            ..TableConfig::default()
        }
    }

    async fn open(root: &Path, writer: &str) -> ReadingsTable {
        ReadingsTable::open(config(root, writer))
            .await
            .expect("open")
    }

    async fn count(root: &Path, tenant: &str) -> i64 {
        let location =
            Location::parse(root.to_str().expect("utf-8"), BTreeMap::new()).expect("location");
        let q = TenantQuery::new(&location, tenant).expect("query");
        let batches = q.sql("SELECT count(*) FROM readings").await.expect("sql");
        batches[0].column(0).as_primitive::<Int64Type>().value(0)
    }

    #[tokio::test]
    async fn a_batch_is_stored_once_however_often_it_comes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = open(dir.path(), "w1").await;
        let a = staged("acme", series(100, HOUR_10));
        let b = staged("acme", series(50, HOUR_10));
        let first = table
            .commit(vec![a.clone(), b.clone(), a.clone()])
            .await
            .expect("commit");
        assert_eq!(
            first.rows_written(),
            150,
            "the repeat within a commit is skipped"
        );
        assert_eq!(first.rows_skipped(), 100);
        assert_eq!(first.version, Some(1));
        assert_eq!(first.files_written(), 1, "one file per partition");

        let again = table.commit(vec![a.clone()]).await.expect("commit");
        assert_eq!((again.rows_written(), again.rows_skipped()), (0, 100));
        assert_eq!(again.version, None, "nothing new: no log entry");

        // Another process (its own ledger, loaded from the log at its first commit).
        let other = open(dir.path(), "w2").await;
        let c = staged("acme", series(7, HOUR_10));
        let out = other.commit(vec![b.clone(), c]).await.expect("commit");
        assert_eq!((out.rows_written(), out.rows_skipped()), (7, 50));
        assert_eq!(out.tenants["acme"].batches[0].rows_skipped, 50);
        assert_eq!(count(dir.path(), "acme").await, 157);
    }

    #[tokio::test]
    async fn racing_processes_store_a_batch_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let x = open(dir.path(), "x").await;
        let y = open(dir.path(), "y").await;
        let mut expected = 0;
        for round in 0..20 {
            let shared = staged("acme", series(10, HOUR_10));
            let own_x = staged("acme", series(3, HOUR_10));
            let own_y = staged("acme", series(5, HOUR_10));
            let (ox, oy) = tokio::join!(
                x.commit(vec![shared.clone(), own_x]),
                y.commit(vec![own_y, shared.clone()])
            );
            let (ox, oy) = (ox.expect("x"), oy.expect("y"));
            assert_eq!(
                ox.rows_written() + oy.rows_written(),
                18,
                "round {round}: {ox:?} {oy:?}"
            );
            expected += 18;
        }
        assert_eq!(count(dir.path(), "acme").await, expected);
    }

    #[tokio::test]
    async fn clones_commit_concurrently_in_version_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = open(dir.path(), "w").await;
        let commits = (0..8).map(|_| {
            let t = table.clone();
            async move { t.commit(vec![staged("acme", series(10, HOUR_10))]).await }
        });
        let outcomes = futures::future::try_join_all(commits)
            .await
            .expect("commits");
        let mut versions: Vec<u64> = outcomes.iter().filter_map(|o| o.version).collect();
        versions.sort_unstable();
        assert_eq!(versions, (1..=8).collect::<Vec<_>>());
        assert_eq!(count(dir.path(), "acme").await, 80);
    }

    #[tokio::test]
    async fn files_without_a_log_entry_are_invisible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = open(dir.path(), "w").await;
        let a = staged("acme", series(10, HOUR_10));
        table.commit(vec![a.clone()]).await.expect("commit");
        // What a process killed between writing its file and its log entry leaves behind.
        let part = dir.path().join("tenant=acme/date=2026-11-21");
        let file = std::fs::read_dir(&part)
            .expect("partition")
            .next()
            .expect("a file")
            .expect("dirent")
            .path();
        std::fs::copy(&file, part.join("part-killed-0.zstd.parquet")).expect("copy");
        assert_eq!(count(dir.path(), "acme").await, 10);
        // Its batch comes again (redelivered) and is stored, once.
        let b = staged("acme", series(4, HOUR_10));
        let reopened = open(dir.path(), "w").await;
        let out = reopened.commit(vec![a, b]).await.expect("commit");
        assert_eq!((out.rows_written(), out.rows_skipped()), (4, 10));
        assert_eq!(count(dir.path(), "acme").await, 14);
    }

    #[tokio::test]
    async fn a_batch_over_two_days_is_committed_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = open(dir.path(), "w").await;
        let day = 24 * crate::test_util::NS_PER_HOUR;
        let rows =
            crate::test_util::rows(&[("d", "m", HOUR_10, 1.0), ("d", "m", HOUR_10 + day, 2.0)]);
        let out = table
            .commit(vec![staged("acme", rows)])
            .await
            .expect("commit");
        assert_eq!(out.files_written(), 2);
        assert!(dir.path().join("tenant=acme/date=2026-11-22").is_dir());
        assert_eq!(count(dir.path(), "acme").await, 2);
    }

    #[tokio::test]
    async fn checkpoints_are_written_every_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = ReadingsTable::open(TableConfig {
            checkpoint_interval: 3,
            ..config(dir.path(), "w")
        })
        .await
        .expect("open");
        for _ in 0..3 {
            table
                .commit(vec![staged("acme", series(2, HOUR_10))])
                .await
                .expect("commit");
        }
        let checkpoint = dir
            .path()
            .join("_delta_log/00000000000000000003.checkpoint.parquet");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !checkpoint.exists() {
            assert!(std::time::Instant::now() < deadline, "no checkpoint");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(count(dir.path(), "acme").await, 6);
    }

    #[tokio::test]
    async fn bad_input_and_bad_locations_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = open(dir.path(), "w").await;
        let err = table
            .commit(vec![staged("../etc", series(1, HOUR_10))])
            .await
            .expect_err("tenant");
        assert!(matches!(err, TableError::InvalidTenant(_)), "{err}");
        assert!(matches!(
            ReadingsTable::open(config(dir.path(), "bad id")).await,
            Err(TableError::Config(_))
        ));
        // A file where the directory should be.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = ReadingsTable::open(config(&file, "w"))
            .await
            .expect_err("not a directory");
        assert!(
            err.to_string().contains(file.to_str().expect("utf-8")),
            "{err}"
        );
    }
}

#[cfg(test)]
mod send_check {
    /// The commit future is `Send` for any caller (spawned tasks, the storage pool).
    #[allow(dead_code)]
    fn commit_is_send(t: super::ReadingsTable) {
        tokio::spawn(async move { t.commit(Vec::new()).await });
    }
}
