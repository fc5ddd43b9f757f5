//! Converting a directory of the pre-Delta layout into the readings table, in place.
//!
//! Each old file (`tenant=<t>/date=…/hour=…/part-*.parquet`) becomes one batch of a commit
//! to the table at the same root, with a batch id derived from the file's path (UUID v5),
//! and is deleted once the commit holding it is in the log. The table's ledger is opened
//! over the whole log, so a conversion stopped anywhere (killed, full disk) and run again
//! skips the files already converted and never stores a row twice; nothing is deleted before
//! its rows are committed.

use std::path::{Path, PathBuf};

use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use arrow::compute::concat_batches;
use arrow::record_batch::RecordBatchReader;
use sluice_binding::model::TenantId;
use uuid::Uuid;

use crate::StagedBatch;
use crate::table::{ReadingsTable, TableConfig, TableError};

/// Files converted per commit: large enough for few log entries, small enough to hold in
/// memory (old files are at most one hour of one tenant each).
const FILES_PER_COMMIT: usize = 64;

/// The UUID v5 namespace of converted files' batch ids.
const MIGRATION_NAMESPACE: Uuid = Uuid::from_u128(0x6f3c_9a4e_51d2_4b87_a0c1_7e25_9d84_3b10);

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Old files found.
    pub files: u64,
    /// Rows committed to the table.
    pub rows_written: u64,
    /// Rows of files a previous, interrupted run had already committed.
    pub rows_skipped: u64,
}

/// The old layout's files below `root`, in path order: `(tenant, path)`.
pub fn legacy_files(root: &Path) -> Result<Vec<(String, PathBuf)>, std::io::Error> {
    let mut out = Vec::new();
    let Ok(tenants) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for tenant_dir in tenants {
        let tenant_dir = tenant_dir?.path();
        let Some(tenant) = tenant_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("tenant="))
            .filter(|t| TenantId::check(t).is_ok())
            .map(str::to_owned)
        else {
            continue;
        };
        for date in read_dirs(&tenant_dir, "date=")? {
            for hour in read_dirs(&date, "hour=")? {
                for file in std::fs::read_dir(&hour)? {
                    let file = file?.path();
                    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if name.starts_with("part-") && name.ends_with(".parquet") {
                        out.push((tenant.clone(), file));
                    }
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_dirs(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>, std::io::Error> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        {
            out.push(p);
        }
    }
    Ok(out)
}

/// Converts the old layout below `root` into the readings table at `root`.
///
/// `config.store` must name `root`; its dedup window is widened to the whole log.
pub async fn migrate(root: &Path, config: TableConfig) -> Result<MigrationReport, TableError> {
    let files = legacy_files(root).map_err(|e| TableError::Location {
        location: root.display().to_string(),
        reason: format!("listing the old layout: {e}"),
    })?;
    let table = ReadingsTable::open_for_migration(TableConfig {
        // Every earlier conversion commit, however old, is in the ledger.
        dedup_window: std::time::Duration::from_secs(100 * 365 * 86_400),
        ..config
    })
    .await?;
    let mut report = MigrationReport {
        files: files.len() as u64,
        ..MigrationReport::default()
    };
    for chunk in files.chunks(FILES_PER_COMMIT) {
        let mut batches = Vec::with_capacity(chunk.len());
        for (tenant, path) in chunk {
            batches.push(read_file(root, tenant, path)?);
        }
        let outcome = table.commit(batches).await?;
        report.rows_written += outcome.rows_written();
        report.rows_skipped += outcome.rows_skipped();
        // Committed (now or by an earlier run): the old copies can go.
        for (_, path) in chunk {
            std::fs::remove_file(path).map_err(|e| TableError::Sync {
                path: path.display().to_string(),
                source: e,
            })?;
            remove_empty_parents(root, path);
        }
        tracing::info!(
            files = chunk.len(),
            rows = outcome.rows_written(),
            "converted old files"
        );
    }
    Ok(report)
}

fn read_file(root: &Path, tenant: &str, path: &Path) -> Result<StagedBatch, TableError> {
    let parquet_err = |source| TableError::Parquet {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|e| TableError::Sync {
        path: path.display().to_string(),
        source: e,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(parquet_err)?
        .build()
        .map_err(parquet_err)?;
    let schema = reader.schema();
    let batches: Vec<_> = reader.collect::<Result<_, _>>()?;
    let rows = concat_batches(&schema, &batches)?;
    let relative = path.strip_prefix(root).unwrap_or(path);
    Ok(StagedBatch {
        tenant: tenant.to_owned(),
        batch_id: Uuid::new_v5(&MIGRATION_NAMESPACE, relative.to_string_lossy().as_bytes()),
        maybe_duplicate: true,
        rows,
    })
}

/// Removes the `hour=` and `date=` directories `path` leaves empty (best effort).
fn remove_empty_parents(root: &Path, path: &Path) {
    let mut dir = path.parent();
    for _ in 0..2 {
        let Some(d) = dir.filter(|d| d.starts_with(root) && *d != root) else {
            return;
        };
        if std::fs::remove_dir(d).is_err() {
            return; // not empty
        }
        dir = d.parent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::TenantQuery;
    use crate::table::Location;
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    async fn count(root: &Path, tenant: &str) -> i64 {
        let location =
            Location::parse(root.to_str().expect("utf-8"), Default::default()).expect("location");
        let q = TenantQuery::new(&location, tenant).expect("query");
        let b = q.sql("SELECT count(*) FROM readings").await.expect("sql");
        b[0].column(0).as_primitive::<Int64Type>().value(0)
    }

    /// Copies the old layout as the last writer of it left it (`tests/fixtures/
    /// legacy-layout`: acme 100 rows in hour 10 and 50 in hour 11, globex 7, written by
    /// the pre-Delta store before it was removed) into a fresh directory.
    fn old_layout() -> tempfile::TempDir {
        fn copy(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).expect("dir");
            for e in std::fs::read_dir(from).expect("fixture") {
                let e = e.expect("entry").path();
                let target = to.join(e.file_name().expect("name"));
                if e.is_dir() {
                    copy(&e, &target);
                } else {
                    std::fs::copy(&e, &target).expect("copy");
                }
            }
        }
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy-layout");
        let dir = tempfile::tempdir().expect("tempdir");
        copy(&fixture, dir.path());
        dir
    }

    #[tokio::test]
    async fn the_old_layout_is_refused_then_converted_once_however_often_it_runs() {
        let dir = old_layout();
        let config = TableConfig {
            store: dir.path().to_str().expect("utf-8").to_owned(),
            ..TableConfig::default()
        };

        // Opening it as a table would hide the old rows: refused, naming the command.
        let err = ReadingsTable::open(config.clone())
            .await
            .expect_err("old layout");
        assert!(err.to_string().contains("sluice store migrate"), "{err}");

        // A conversion interrupted after its commit, before deleting: simulated by putting
        // one old file back after a first run.
        let files = legacy_files(dir.path()).expect("list");
        assert_eq!(files.len(), 3);
        let kept = std::fs::read(&files[0].1).expect("read");
        let report = migrate(dir.path(), config.clone()).await.expect("migrate");
        assert_eq!(report.files, 3);
        assert_eq!(report.rows_written, 157);
        assert!(legacy_files(dir.path()).expect("list").is_empty());
        std::fs::create_dir_all(files[0].1.parent().expect("dir")).expect("dir");
        std::fs::write(&files[0].1, kept).expect("restore");

        let again = migrate(dir.path(), config.clone()).await.expect("again");
        assert_eq!((again.files, again.rows_written), (1, 0));
        assert!(again.rows_skipped > 0);
        assert_eq!(count(dir.path(), "acme").await, 150);
        assert_eq!(count(dir.path(), "globex").await, 7);
        // Now a plain table: it opens, and nothing of the old layout is left.
        ReadingsTable::open(config).await.expect("opens");
        assert!(
            !dir.path()
                .join("tenant=acme/date=2026-11-21/hour=10")
                .exists()
        );
    }
}
