//! Read-only SQL over one tenant's stored readings (DataFusion).
//!
//! A [`TenantQuery`] owns a DataFusion `SessionContext` whose only table is `readings`: a
//! `ListingTable` over `<root>/tenant=<tenant>/` (the layout of [`crate::parquet`]) with the
//! columns
//!
//! | column | type |
//! |---|---|
//! | `device`, `metric` | `Dictionary(Int32, Utf8)` |
//! | `ts` | `Timestamp(Nanosecond, "UTC")` |
//! | `value` | `Float64` |
//! | `date` | `Utf8`, `YYYY-MM-DD` (hive partition) |
//! | `hour` | `Utf8`, `00`–`23` (hive partition) |
//!
//! Filters on `date` and `hour` prune whole directories (compare with strings:
//! `date = '2026-11-21' AND hour = '10'`); filters on `ts` prune files and row groups by
//! their statistics.
//!
//! Tenant isolation rests on three things: the table's root is the tenant's directory (the
//! tenant id is validated, so it cannot climb out); DataFusion's dynamic file catalog
//! (`SELECT * FROM '<path>'`) stays disabled, so no URL or path is readable as a table; and
//! only queries run — DDL (`CREATE EXTERNAL TABLE … LOCATION …`), DML, `COPY` and other
//! statements (`SET`, …) are rejected before execution.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::DataType;
use arrow::error::ArrowError;
use arrow::json::writer::{JsonArray, WriterBuilder};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};

use crate::readings_schema;
use sluice_binding::model::{InvalidTenantId, TenantId};

/// The name of the one table.
pub const TABLE: &str = "readings";
/// Hive partition column: UTC date of `ts`, `YYYY-MM-DD`.
pub const DATE: &str = "date";
/// Hive partition column: UTC hour of `ts`, two digits.
pub const HOUR: &str = "hour";

/// Errors of tenant queries.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The tenant id is not a valid tenant id.
    #[error(transparent)]
    InvalidTenant(#[from] InvalidTenantId),
    /// The store root cannot be used as a table location.
    #[error("invalid store root {}: {reason}", path.display())]
    InvalidRoot {
        /// The root given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The statement is not a query (DDL, DML, COPY, SET, …): only queries are allowed.
    #[error("only queries are allowed: {0}")]
    NotAQuery(String),
    /// Planning or execution failed (syntax error, unknown column, I/O, …).
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    /// Formatting the results failed.
    #[error("formatting results: {0}")]
    Format(#[from] ArrowError),
    /// Turning the results into JSON values failed.
    #[error("formatting results as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// SQL over one tenant's readings. Cheap to keep around: every query lists the tenant's
/// directory afresh, so it sees files committed after it was built.
#[derive(Clone)]
pub struct TenantQuery {
    ctx: SessionContext,
    tenant: String,
    options: SQLOptions,
}

impl fmt::Debug for TenantQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantQuery")
            .field("tenant", &self.tenant)
            .field("session", &self.ctx.session_id())
            .finish_non_exhaustive()
    }
}

impl TenantQuery {
    /// Builds the session for `tenant` over the store at `root`. A tenant without data yet
    /// gets an empty table. Nothing is read here.
    pub fn new(root: impl AsRef<Path>, tenant: &str) -> Result<Self, QueryError> {
        TenantId::check(tenant)?;
        let root = root.as_ref();
        let invalid = |reason: String| QueryError::InvalidRoot {
            path: root.to_owned(),
            reason,
        };
        let root_abs = std::path::absolute(root).map_err(|e| invalid(e.to_string()))?;
        let dir = root_abs.join(format!("tenant={tenant}"));
        let dir = dir
            .to_str()
            .ok_or_else(|| invalid("not UTF-8".into()))?
            .to_owned();
        // `ListingTableUrl::parse` would read these as a glob and list more than the tenant.
        if dir.contains(['*', '?', '[']) {
            return Err(invalid("contains a glob character (*, ? or [)".into()));
        }
        let url = ListingTableUrl::parse(format!("{dir}/"))?;

        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![
                (DATE.to_owned(), DataType::Utf8),
                (HOUR.to_owned(), DataType::Utf8),
            ]);
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(readings_schema());
        let table = ListingTable::try_new(config)?;

        // DataFusion caches directory listings forever by default; a long-lived session must
        // see newly committed files, so listing caching is off (a listing is one readdir per
        // partition directory, cheap next to reading Parquet).
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
            .build_arc()?;
        // `SessionContext::new*` never installs the dynamic file catalog (that takes
        // `enable_url_table`), and information_schema stays off.
        let config = SessionConfig::new().with_information_schema(false);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        ctx.register_table(TABLE, Arc::new(table))?;

        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        Ok(Self {
            ctx,
            tenant: tenant.to_owned(),
            options,
        })
    }

    /// The tenant this session reads.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Runs one query and collects its results.
    pub async fn sql(&self, query: &str) -> Result<Vec<RecordBatch>, QueryError> {
        let plan = self.ctx.state().create_logical_plan(query).await?;
        // Planning has no side effects; refuse anything but a query before executing.
        self.options
            .verify_plan(&plan)
            .map_err(|e| QueryError::NotAQuery(e.strip_backtrace()))?;
        let frame = self.ctx.execute_logical_plan(plan).await?;
        Ok(frame.collect().await?)
    }

    /// Runs one query and returns its results as a text table (arrow prettyprint).
    pub async fn sql_pretty(&self, query: &str) -> Result<String, QueryError> {
        let batches = self.sql(query).await?;
        Ok(arrow::util::pretty::pretty_format_batches(&batches)?.to_string())
    }

    /// Runs one query and returns its rows as JSON objects (column name → value; timestamps
    /// as RFC 3339 strings, nulls explicit).
    pub async fn sql_json(
        &self,
        query: &str,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, QueryError> {
        let batches = self.sql(query).await?;
        let mut writer = WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, JsonArray>(Vec::new());
        writer.write_batches(&batches.iter().collect::<Vec<_>>())?;
        writer.finish()?;
        let bytes = writer.into_inner();
        if bytes.is_empty() {
            // The writer writes nothing at all for zero batches.
            return Ok(Vec::new());
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    use super::*;
    use crate::legacy::store::{ParquetStore, ParquetStoreConfig};
    use crate::test_util::{HOUR_10, NS_PER_HOUR, rows, series, staged};

    async fn store_with(root: &Path, batches: Vec<crate::StagedBatch>) {
        let store = ParquetStore::open(ParquetStoreConfig {
            root: root.to_owned(),
            ..ParquetStoreConfig::default()
        })
        .expect("open");
        store.commit(batches).await.expect("commit");
    }

    async fn scalar(q: &TenantQuery, sql: &str) -> i64 {
        let batches = q.sql(sql).await.expect("sql");
        batches[0].column(0).as_primitive::<Int64Type>().value(0)
    }

    #[tokio::test]
    async fn tenant_sees_only_its_own_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        // "ab" shares a prefix with "a": listing must not cross into it.
        store_with(
            dir.path(),
            vec![
                staged("a", series(10, HOUR_10)),
                staged("ab", series(20, HOUR_10)),
                staged("b", series(40, HOUR_10)),
            ],
        )
        .await;
        let q = TenantQuery::new(dir.path(), "a").expect("query");
        assert_eq!(scalar(&q, "SELECT count(*) FROM readings").await, 10);
        assert_eq!(
            scalar(&q, "SELECT count(*) FROM datafusion.public.readings").await,
            10
        );

        let b_dir = dir.path().join("tenant=b");
        let b_file = std::fs::read_dir(b_dir.join("date=2026-11-21/hour=10"))
            .expect("b files")
            .next()
            .expect("one file")
            .expect("dirent")
            .path();
        let b = b_dir.display();
        let f = b_file.display();
        let root = dir.path().display();
        for crafted in [
            format!("SELECT count(*) FROM '{f}'"),
            format!("SELECT count(*) FROM '{b}/'"),
            format!("SELECT count(*) FROM 'file://{f}'"),
            format!("SELECT count(*) FROM read_parquet('{f}')"),
            format!("CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{b}/'"),
            format!("CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{root}/'"),
            "SELECT count(*) FROM information_schema.tables".to_owned(),
            "SELECT count(*) FROM readings, '../tenant=b/'".to_owned(),
        ] {
            // Each fails because the thing is not there (no URL tables, no such table
            // function, no information_schema) or is not a query, not by accident.
            let err = q.sql(&crafted).await.expect_err(&crafted);
            assert!(
                matches!(err, QueryError::NotAQuery(_)) || err.to_string().contains("not found"),
                "{crafted}: {err}"
            );
        }
        // Nothing slipped in through the failed statements.
        assert_eq!(scalar(&q, "SELECT count(*) FROM readings").await, 10);

        let other = TenantQuery::new(dir.path(), "b").expect("query");
        assert_eq!(scalar(&other, "SELECT count(*) FROM readings").await, 40);
        assert!(matches!(
            TenantQuery::new(dir.path(), "../b"),
            Err(QueryError::InvalidTenant(_))
        ));
    }

    #[tokio::test]
    async fn only_queries_are_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with(dir.path(), vec![staged("a", series(10, HOUR_10))]).await;
        let q = TenantQuery::new(dir.path(), "a").expect("query");
        let out = dir.path().join("out.parquet");
        for statement in [
            format!("COPY readings TO '{}' STORED AS PARQUET", out.display()),
            format!(
                "COPY (SELECT * FROM readings) TO '{}' STORED AS PARQUET",
                out.display()
            ),
            "CREATE TABLE t AS SELECT * FROM readings".to_owned(),
            "CREATE VIEW v AS SELECT * FROM readings".to_owned(),
            "DROP TABLE readings".to_owned(),
            "INSERT INTO readings SELECT * FROM readings".to_owned(),
            "SET datafusion.execution.batch_size = 1".to_owned(),
        ] {
            let err = q.sql(&statement).await.expect_err(&statement);
            assert!(
                matches!(err, QueryError::NotAQuery(_)),
                "{statement}: {err}"
            );
        }
        assert!(!out.exists());
        assert_eq!(scalar(&q, "SELECT count(*) FROM readings").await, 10);
    }

    #[tokio::test]
    async fn empty_tenant_is_an_empty_table_and_new_files_are_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = TenantQuery::new(dir.path(), "fresh").expect("query");
        assert_eq!(scalar(&q, "SELECT count(*) FROM readings").await, 0);
        assert!(
            q.sql_json("SELECT * FROM readings")
                .await
                .expect("json")
                .is_empty()
        );

        store_with(dir.path(), vec![staged("fresh", series(5, HOUR_10))]).await;
        assert_eq!(scalar(&q, "SELECT count(*) FROM readings").await, 5);
        store_with(dir.path(), vec![staged("fresh", series(5, HOUR_10))]).await;
        assert_eq!(scalar(&q, "SELECT count(*) FROM readings").await, 10);
    }

    #[tokio::test]
    async fn partition_and_time_filters() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with(
            dir.path(),
            vec![
                staged("a", series(10, HOUR_10)),
                staged("a", series(20, HOUR_10 + NS_PER_HOUR)),
                staged("a", series(40, HOUR_10 + 24 * NS_PER_HOUR)),
            ],
        )
        .await;
        let q = TenantQuery::new(dir.path(), "a").expect("query");
        let n = |sql: &'static str| {
            let q = q.clone();
            async move { scalar(&q, sql).await }
        };
        assert_eq!(
            n("SELECT count(*) FROM readings WHERE date = '2026-11-21'").await,
            30
        );
        assert_eq!(
            n("SELECT count(*) FROM readings WHERE date >= '2026-11-22'").await,
            40
        );
        assert_eq!(
            n("SELECT count(*) FROM readings WHERE date = '2026-11-21' AND hour = '11'").await,
            20
        );
        assert_eq!(
            n("SELECT count(*) FROM readings WHERE ts >= '2026-11-21T11:00:00Z'").await,
            60
        );

        // The partition filter prunes the listing itself.
        let plan = q
            .sql_pretty("EXPLAIN SELECT value FROM readings WHERE date = '2026-11-22'")
            .await
            .expect("explain");
        assert!(plan.contains("date=2026-11-22"), "{plan}");
        assert!(!plan.contains("date=2026-11-21"), "{plan}");
    }

    #[tokio::test]
    async fn pretty_and_json_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with(
            dir.path(),
            vec![staged("a", rows(&[("meter-1", "kwh", HOUR_10, 12.5)]))],
        )
        .await;
        let q = TenantQuery::new(dir.path(), "a").expect("query");
        let sql = "SELECT device, metric, ts, value, date, hour FROM readings";
        let text = q.sql_pretty(sql).await.expect("pretty");
        assert!(text.contains("| meter-1 | kwh "), "{text}");
        assert!(text.contains("2026-11-21T10:00:00Z"), "{text}");

        let json = q.sql_json(sql).await.expect("json");
        assert_eq!(json.len(), 1);
        let row = serde_json::Value::Object(json[0].clone());
        assert_eq!(
            row,
            serde_json::json!({
                "device": "meter-1", "metric": "kwh", "ts": "2026-11-21T10:00:00Z",
                "value": 12.5, "date": "2026-11-21", "hour": "10"
            })
        );
    }
}
