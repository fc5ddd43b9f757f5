//! Table maintenance: retention, compaction and vacuum, one pass at a time.
//!
//! A pass ([`ReadingsTable::maintain`]) reads the newest version and
//!
//! 1. **retention**: deletes, per tenant, the `(tenant, date)` partitions whose whole UTC day
//!    is older than the tenant's retention: a metadata-only commit removing their files (no
//!    file is rewritten);
//! 2. **compaction**: merges the small files of each closed partition (a UTC day before
//!    today: no more appends are due there, barring late data) into files of about
//!    [`MaintenanceConfig::target_file_size`], and those of today's partitions into files
//!    of about [`MaintenanceConfig::open_target_file_size`], with at most
//!    [`MaintenanceConfig::max_concurrent_tasks`] partitions at a time (its CPU bound), and
//!    commits the swap as one log entry that removes the small files and adds the merged
//!    ones (`dataChange = false`). A query sees the version before or after the swap, each
//!    row once either way. Today's partitions get the smaller target because they still
//!    grow: a merged file below the target is merged again with the next pass's new files,
//!    so the target bounds how often a byte is rewritten while the day is open (about
//!    target ÷ data per pass times), and queries of today open a few files rather than one
//!    per commit. Late readings for a closed day are merged at the next pass;
//! 3. **vacuum**: deletes files removed longer than [`MaintenanceConfig::vacuum_grace`] ago
//!    — the grace outlives any query still reading an older version — and files no log
//!    entry names that are older than the grace (left by a writer killed between writing
//!    its files and its log entry).
//!
//! Every store call of the pass spends [`MaintenanceConfig::io_budget`] first
//! ([`super::pace`]): the pass takes longer, and ingest sharing the machine and the store
//! keeps its pace.
//!
//! Writers never wait for maintenance and maintenance never conflicts with them: appends
//! and a compaction of files already in the log commute. Two maintenance passes at once
//! (two `sluice maintain`) may conflict; the loser fails its pass and the next one retries.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::file::properties::WriterProperties;
use chrono::{NaiveDate, Utc};
use deltalake_core::DeltaTable;
use deltalake_core::operations::vacuum::VacuumMode;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::pace::{IoBudget, IoSpent, Pace};
use super::{DATE, ReadingsTable, TENANT, TableError};

/// How long one tenant's readings are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Keep {
    /// Never deleted.
    Forever,
    /// Whole UTC days entirely older than this are deleted.
    For(#[serde(with = "sluice_binding::config::duration")] Duration),
}

/// What a maintenance pass does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceConfig {
    /// Compaction merges a closed day's files into files of about this many bytes.
    pub target_file_size: u64,
    /// Compaction merges today's files into files of about this many bytes (smaller:
    /// they are merged again as the day grows).
    pub open_target_file_size: u64,
    /// Partitions compacted at once: at most this many cores busy.
    pub max_concurrent_tasks: usize,
    /// ZSTD level of the merged files.
    pub zstd_level: i32,
    /// Removed and unreferenced files are deleted this long after (longer than any query).
    pub vacuum_grace: Duration,
    /// Retention of tenants without their own.
    pub default_retention: Keep,
    /// Tenants with their own retention.
    pub tenant_retention: BTreeMap<String, Keep>,
    /// The bytes and requests a second the pass may spend on the store.
    pub io_budget: IoBudget,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            target_file_size: 128 * 1024 * 1024,
            open_target_file_size: 16 * 1024 * 1024,
            max_concurrent_tasks: 1,
            zstd_level: 1,
            vacuum_grace: Duration::from_secs(3600),
            default_retention: Keep::Forever,
            tenant_retention: BTreeMap::new(),
            io_budget: IoBudget::default(),
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// `(tenant, date)` partitions deleted by retention.
    pub partitions_expired: Vec<(String, String)>,
    /// Files removed by retention.
    pub files_expired: u64,
    /// Small files merged away by compaction.
    pub files_compacted: u64,
    /// Merged files written by compaction.
    pub files_merged: u64,
    /// Partitions compaction touched.
    pub partitions_compacted: u64,
    /// Files deleted by vacuum.
    pub files_vacuumed: u64,
    /// Data files in the newest version after the pass.
    pub files_live: u64,
    /// The newest version after the pass.
    pub version: u64,
    /// What the pass spent on the store, and how long it waited on its budget.
    pub io: IoSpent,
}

impl ReadingsTable {
    /// Runs one maintenance pass (retention, compaction, vacuum) at `now` (UTC).
    pub async fn maintain(
        &self,
        config: &MaintenanceConfig,
    ) -> Result<MaintenanceReport, TableError> {
        self.maintain_at(config, Utc::now().date_naive()).await
    }

    /// [`Self::maintain`] with `today` given (tests).
    pub async fn maintain_at(
        &self,
        config: &MaintenanceConfig,
        today: NaiveDate,
    ) -> Result<MaintenanceReport, TableError> {
        let target = NonZeroU64::new(config.target_file_size)
            .ok_or_else(|| TableError::Config("target_file_size must be > 0".into()))?;
        let zstd = ZstdLevel::try_new(config.zstd_level)
            .map_err(|e| TableError::Config(format!("zstd_level: {e}")))?;
        let mut report = MaintenanceReport::default();
        let pace = Arc::new(Pace::new(config.io_budget));
        // Unlimited too: the pass's spending is reported either way.
        let (log_store, paced) = self.location().paced_log_store(Arc::clone(&pace))?;
        // Compaction reads through DataFusion, whose session resolves `file://` to a store
        // of its own: register the paced one for the table's store URL instead.
        let session = datafusion::execution::SessionStateBuilder::new()
            .with_default_features()
            .build();
        let url = self.location().url();
        let store_url = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
        let store_url = url::Url::parse(&store_url)
            .map_err(|e| TableError::Config(format!("store URL {store_url}: {e}")))?;
        session
            .runtime_env()
            .register_object_store(&store_url, paced);
        let session: Arc<dyn datafusion::catalog::Session> = Arc::new(session);
        let mut table = DeltaTable::new(log_store);
        table.load().await?;

        // 1. Retention, tenant by tenant, by whole partitions.
        let partitions = partitions(&table).await?;
        for (tenant, dates) in &partitions {
            let keep = config
                .tenant_retention
                .get(tenant)
                .copied()
                .unwrap_or(config.default_retention);
            let Keep::For(window) = keep else { continue };
            // Day D is deleted once its end (D + 1, midnight) is older than the window, seen
            // from today's midnight (so never early): D + 1 + window <= today.
            let days = window.as_secs().div_ceil(86_400) as i64;
            let cutoff = today - chrono::Duration::days(days);
            let expired: Vec<&String> = dates
                .iter()
                .filter(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").is_ok_and(|d| d < cutoff))
                .collect();
            if expired.is_empty() {
                continue;
            }
            // Tenant ids are [a-z0-9_-]: nothing to escape.
            let predicate = format!(
                "{TENANT} = '{tenant}' AND {DATE} < '{}'",
                cutoff.format("%Y-%m-%d")
            );
            let (t, metrics) = table.delete().with_predicate(predicate).await?;
            table = t;
            report.files_expired += metrics.num_removed_files as u64;
            for d in expired {
                report.partitions_expired.push((tenant.clone(), d.clone()));
            }
            tracing::info!(
                store = %self.location(),
                tenant,
                before = %cutoff,
                files = metrics.num_removed_files,
                "retention deleted old partitions"
            );
        }

        // 2. Compaction: the closed days to the full target, today's to the small one.
        let today_str = today.format("%Y-%m-%d").to_string();
        let open_target = NonZeroU64::new(config.open_target_file_size.max(1))
            .ok_or_else(|| TableError::Config("open_target_file_size must not be 0".into()))?;
        for (op, size) in [
            (deltalake_core::FilterOp::Lt, target),
            (deltalake_core::FilterOp::Ge, open_target),
        ] {
            let filter = [(
                DATE,
                op,
                deltalake_core::FilterValue::Scalar(today_str.as_str()),
            )];
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(zstd))
                .set_dictionary_enabled(true)
                .build();
            let (t, metrics) = table
                .optimize()
                .with_filters(&filter)
                .with_target_size(size)
                .with_max_concurrent_tasks(config.max_concurrent_tasks.max(1))
                .with_writer_properties(props)
                .with_session_state(Arc::clone(&session))
                .await?;
            table = t;
            report.files_compacted += metrics.num_files_removed;
            report.files_merged += metrics.num_files_added;
            report.partitions_compacted += metrics.partitions_optimized;
        }

        // 3. Vacuum: removed files past the grace, and files no entry names.
        let grace = chrono::Duration::from_std(config.vacuum_grace)
            .map_err(|e| TableError::Config(format!("vacuum_grace: {e}")))?;
        let (t, metrics) = table
            .vacuum()
            .with_retention_period(grace)
            .with_enforce_retention_duration(false)
            .with_mode(VacuumMode::Full)
            .await?;
        table = t;
        report.files_vacuumed = metrics.files_deleted.len() as u64;
        report.version = table.version().unwrap_or(0);
        report.files_live = table
            .get_active_add_actions_by_partitions(&[])
            .try_fold(0u64, |n, _| async move { Ok(n + 1) })
            .await?;
        report.io = pace.spent();
        Ok(report)
    }
}

/// The table's partitions: tenant → dates (`YYYY-MM-DD`).
async fn partitions(table: &DeltaTable) -> Result<BTreeMap<String, BTreeSet<String>>, TableError> {
    let files: Vec<_> = table
        .get_active_add_actions_by_partitions(&[])
        .try_collect()
        .await?;
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let values = f.partition_values_map();
        if let (Some(Some(t)), Some(Some(d))) = (values.get(TENANT), values.get(DATE)) {
            out.entry(t.clone()).or_default().insert(d.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    use super::*;
    use crate::query::TenantQuery;
    use crate::table::{Location, TableConfig};
    use crate::test_util::{HOUR_10, NS_PER_HOUR, series, staged};

    /// The pass is `Send` (the maintenance service spawns it).
    #[allow(dead_code)]
    fn maintain_is_send(t: Arc<ReadingsTable>, c: MaintenanceConfig) {
        tokio::spawn(async move { t.maintain(&c).await });
    }

    async fn open(root: &Path) -> ReadingsTable {
        ReadingsTable::open(TableConfig {
            store: root.to_str().expect("utf-8").to_owned(),
            ..TableConfig::default()
        })
        .await
        .expect("open")
    }

    async fn count(root: &Path, tenant: &str) -> i64 {
        let location =
            Location::parse(root.to_str().expect("utf-8"), BTreeMap::new()).expect("location");
        let q = TenantQuery::new(&location, tenant).expect("query");
        let b = q.sql("SELECT count(*) FROM readings").await.expect("sql");
        b[0].column(0).as_primitive::<Int64Type>().value(0)
    }

    /// Bytes of the data files under `root` (the log excluded).
    fn data_bytes(root: &Path) -> u64 {
        data_file_sizes(root).iter().sum()
    }

    fn data_files(root: &Path) -> usize {
        data_file_sizes(root).len()
    }

    /// The sizes of the data files under `root` (the log excluded).
    fn data_file_sizes(root: &Path) -> Vec<u64> {
        let mut sizes = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("dir").flatten() {
                let p = e.path();
                if p.is_dir() && !p.ends_with("_delta_log") {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "parquet")
                    && !p.to_string_lossy().contains("_delta_log")
                {
                    sizes.push(e.metadata().expect("metadata").len());
                }
            }
        }
        sizes
    }

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 21).expect("date")
    }

    #[tokio::test]
    async fn compaction_merges_small_files_and_every_query_sees_each_row_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = open(dir.path()).await;
        let mut batches = Vec::new();
        for i in 0..30 {
            let b = staged("acme", series(100, HOUR_10 + i * 1_000_000_000));
            table.commit(vec![b.clone()]).await.expect("commit");
            batches.push(b);
        }
        assert_eq!(data_files(dir.path()), 30);

        // Queries run all through the pass; each sees every row exactly once.
        let root = dir.path().to_owned();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(count(&root, "acme").await, 3_000);
                    n += 1;
                }
                n
            })
        };
        let config = MaintenanceConfig {
            vacuum_grace: Duration::ZERO,
            ..MaintenanceConfig::default()
        };
        // Still the files' own day, and each file is over the open day's target: nothing
        // to merge until the day has closed.
        let config = MaintenanceConfig {
            open_target_file_size: 1,
            ..config
        };
        let report = table.maintain_at(&config, today()).await.expect("maintain");
        assert_eq!(
            (report.files_compacted, report.files_live),
            (0, 30),
            "{report:?}"
        );
        // What reading the log (and listing for vacuum) spends: the pass above.
        let log_requests = report.io.requests;
        assert!(report.io.bytes > 0, "{report:?}");
        let tomorrow = today() + chrono::Duration::days(1);
        // A tight request budget: the pass waits on it (it reads and deletes 30 files).
        let config = MaintenanceConfig {
            io_budget: IoBudget {
                bytes_per_second: 0,
                requests_per_second: 50,
            },
            ..config
        };
        let small_bytes = data_bytes(dir.path());
        let report = table
            .maintain_at(&config, tomorrow)
            .await
            .expect("maintain");
        // Beyond the log, every file merged was read through the budget (DataFusion's scan
        // included: its session has a `file://` store of its own unless given the paced one).
        // At least a get per file read and a delete per file vacuumed.
        assert!(
            report.io.requests >= log_requests + 30 + 30,
            "{report:?}: {log_requests} requests for the log"
        );
        assert!(report.io.bytes >= small_bytes, "{report:?}");
        assert!(report.io.waited > Duration::ZERO, "{report:?}");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.await.expect("reader") > 0);
        assert_eq!(report.files_compacted, 30);
        assert_eq!(report.files_merged, 1);
        assert_eq!(report.files_live, 1);
        assert_eq!(report.files_vacuumed, 30, "{report:?}");
        assert_eq!(
            data_files(dir.path()),
            1,
            "the small files are gone from disk"
        );
        assert_eq!(count(dir.path(), "acme").await, 3_000);

        // A redelivered batch is still known after the compaction.
        let out = table
            .commit(vec![batches[3].clone()])
            .await
            .expect("commit");
        assert_eq!(out.rows_written(), 0);
        let other = open(dir.path()).await;
        let out = other
            .commit(vec![batches[7].clone()])
            .await
            .expect("commit");
        assert_eq!(out.rows_written(), 0);
        assert_eq!(count(dir.path(), "acme").await, 3_000);
    }

    #[tokio::test]
    async fn todays_files_are_merged_to_the_open_target_and_again_as_the_day_grows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = open(dir.path()).await;
        let config = MaintenanceConfig {
            vacuum_grace: Duration::ZERO,
            ..MaintenanceConfig::default()
        };
        for round in 0..2 {
            for i in 0..10 {
                let at = HOUR_10 + (round * 10 + i) * 1_000_000_000;
                table
                    .commit(vec![staged("acme", series(100, at))])
                    .await
                    .expect("commit");
            }
            let report = table.maintain_at(&config, today()).await.expect("maintain");
            // The first pass merges 10 files; the second the merged one and 10 new ones.
            assert_eq!(report.files_compacted, 10 + round as u64, "{report:?}");
            assert_eq!(report.files_live, 1, "{report:?}");
            assert_eq!(count(dir.path(), "acme").await, 1_000 * (round + 1));
        }
    }

    #[tokio::test]
    async fn retention_deletes_whole_old_days_per_tenant() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = open(dir.path()).await;
        let day = 24 * NS_PER_HOUR;
        // 2026-11-11, 2026-11-18 and 2026-11-21 for two tenants.
        for tenant in ["acme", "globex"] {
            for back in [10, 3, 0] {
                table
                    .commit(vec![staged(tenant, series(10, HOUR_10 - back * day))])
                    .await
                    .expect("commit");
            }
        }
        let config = MaintenanceConfig {
            default_retention: Keep::Forever,
            tenant_retention: BTreeMap::from([(
                "acme".to_owned(),
                Keep::For(Duration::from_secs(5 * 86_400)),
            )]),
            ..MaintenanceConfig::default()
        };
        let report = table.maintain_at(&config, today()).await.expect("maintain");
        assert_eq!(
            report.partitions_expired,
            vec![("acme".to_owned(), "2026-11-11".to_owned())]
        );
        assert_eq!(count(dir.path(), "acme").await, 20);
        assert_eq!(count(dir.path(), "globex").await, 30);

        // A default retention reaches the others; a day is kept until it is entirely older.
        let config = MaintenanceConfig {
            default_retention: Keep::For(Duration::from_secs(4 * 86_400)),
            ..config
        };
        let report = table.maintain_at(&config, today()).await.expect("maintain");
        assert_eq!(
            report.partitions_expired,
            vec![("globex".to_owned(), "2026-11-11".to_owned())]
        );
        // 2026-11-18 ends on the 19th: past 4 days on the 23rd, past 5 days on the 24th.
        let later = today() + chrono::Duration::days(2);
        let report = table.maintain_at(&config, later).await.expect("maintain");
        assert_eq!(
            report.partitions_expired,
            vec![("globex".to_owned(), "2026-11-18".to_owned())]
        );
        let report = table
            .maintain_at(&config, later + chrono::Duration::days(1))
            .await
            .expect("maintain");
        assert_eq!(
            report.partitions_expired,
            vec![("acme".to_owned(), "2026-11-18".to_owned())]
        );
        assert_eq!(count(dir.path(), "acme").await, 10);
        assert_eq!(count(dir.path(), "globex").await, 10);
    }

    #[tokio::test]
    async fn vacuum_deletes_orphans_of_killed_writers_after_the_grace_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = open(dir.path()).await;
        table
            .commit(vec![staged("acme", series(10, HOUR_10))])
            .await
            .expect("commit");
        let part = dir.path().join("tenant=acme/date=2026-11-21");
        let file = std::fs::read_dir(&part)
            .expect("dir")
            .next()
            .expect("file")
            .expect("dirent")
            .path();
        let orphan = part.join("part-killed-0.zstd.parquet");
        std::fs::copy(&file, &orphan).expect("copy");
        let keep = MaintenanceConfig::default(); // 1 h grace
        table.maintain_at(&keep, today()).await.expect("maintain");
        assert!(orphan.exists(), "younger than the grace");
        let now = MaintenanceConfig {
            vacuum_grace: Duration::ZERO,
            ..keep
        };
        let report = table.maintain_at(&now, today()).await.expect("maintain");
        assert!(!orphan.exists(), "{report:?}");
        assert_eq!(count(dir.path(), "acme").await, 10);
    }
}
