//! Read-only SQL over one tenant's readings in the Delta table (DataFusion).
//!
//! A [`TenantQuery`] answers each query in a fresh DataFusion session whose only table is
//! `readings`: a view of the Delta table ([`crate::table`]) at its newest version, filtered
//! to the tenant, with the columns
//!
//! | column | type |
//! |---|---|
//! | `device`, `metric` | `Utf8` |
//! | `ts` | `Timestamp(Microsecond, "UTC")` |
//! | `value` | `Float64` |
//! | `date` | `Date32`, the UTC date of `ts` (partition column) |
//!
//! Filters on `date` prune partitions from the log alone; filters on `ts` prune files by the
//! statistics in the log, then row groups by the Parquet statistics: a query of the last hour
//! opens only the files whose `ts` range meets it.
//!
//! Tenant isolation rests on three things: the only name a query can reach is the view, and
//! the view's plan filters on the tenant partition (the Delta table itself is never
//! registered, so no query names it); DataFusion's dynamic file catalog
//! (`SELECT * FROM '<path>'`) stays disabled, so no URL or path is readable as a table; and
//! only queries run — DDL (`CREATE EXTERNAL TABLE … LOCATION …`), DML, `COPY` and other
//! statements (`SET`, …) are rejected before execution.

use std::fmt;
use std::sync::Arc;

use arrow::error::ArrowError;
use arrow::json::writer::{JsonArray, WriterBuilder};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::view::ViewTable;
use datafusion::datasource::provider_as_source;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use deltalake_core::{DeltaTable, DeltaTableError};
use tokio::sync::Mutex;

use crate::columns::{DEVICE, METRIC, TS, VALUE};
use crate::table::{DATE, Location, TENANT, TableError};
use sluice_binding::model::{InvalidTenantId, TenantId};

/// The name of the one table.
pub const TABLE: &str = "readings";

/// Errors of tenant queries.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The tenant id is not a valid tenant id.
    #[error(transparent)]
    InvalidTenant(#[from] InvalidTenantId),
    /// The store cannot be read.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The statement is not a query (DDL, DML, COPY, SET, …): only queries are allowed.
    #[error("only queries are allowed: {0}")]
    NotAQuery(String),
    /// The query could not be planned: a syntax error, an unknown table, column or
    /// function, a type mismatch — the query's fault.
    #[error("{}", .0.strip_backtrace())]
    Plan(DataFusionError),
    /// Execution failed: reading the store, a value that cannot be cast, the memory
    /// limit ([`QueryError::is_resources_exhausted`]).
    #[error("{}", .0.strip_backtrace())]
    DataFusion(#[from] DataFusionError),
    /// Formatting the results failed.
    #[error("formatting results: {0}")]
    Format(#[from] ArrowError),
    /// Turning the results into JSON values failed.
    #[error("formatting results as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl QueryError {
    /// The query needed more memory than its limit.
    pub fn is_resources_exhausted(&self) -> bool {
        match self {
            Self::Plan(e) | Self::DataFusion(e) => {
                matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
            }
            _ => false,
        }
    }

    /// The store could not be read (as opposed to a fault of the query).
    pub fn is_store_failure(&self) -> bool {
        match self {
            Self::Table(_) => true,
            Self::Plan(e) | Self::DataFusion(e) => matches!(
                e.find_root(),
                DataFusionError::ObjectStore(_)
                    | DataFusionError::IoError(_)
                    | DataFusionError::ParquetError(_)
            ),
            _ => false,
        }
    }
}

/// SQL over one tenant's readings. Cheap to keep around and to clone: every query reads the
/// table's newest version (the log entries since the last query).
#[derive(Clone)]
pub struct TenantQuery {
    table: Arc<Mutex<DeltaTable>>,
    location: Location,
    tenant: String,
    options: SQLOptions,
}

impl fmt::Debug for TenantQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantQuery")
            .field("location", &self.location)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl TenantQuery {
    /// Queries of `tenant` over the table at `location`. Nothing is read here; a location
    /// without a table yet reads as an empty table.
    pub fn new(location: &Location, tenant: &str) -> Result<Self, QueryError> {
        TenantId::check(tenant)?;
        let log_store = location.log_store()?;
        Ok(Self {
            table: Arc::new(Mutex::new(DeltaTable::new(log_store))),
            location: location.clone(),
            tenant: tenant.to_owned(),
            options: SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false),
        })
    }

    /// Queries of another tenant over the same table, sharing this one's copy of the log
    /// (a service serving many tenants keeps one snapshot, not one per tenant).
    pub fn for_tenant(&self, tenant: &str) -> Result<Self, QueryError> {
        TenantId::check(tenant)?;
        Ok(Self {
            tenant: tenant.to_owned(),
            ..self.clone()
        })
    }

    /// The tenant this session reads.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// A session whose `readings` is the tenant's view of the newest version, or `None`
    /// while the location holds no table.
    async fn session(
        &self,
        memory_limit: Option<usize>,
    ) -> Result<Option<SessionContext>, QueryError> {
        let mut table = self.table.lock().await;
        let loaded = match table.version() {
            None => table.load().await,
            Some(_) => table.update_incremental(None).await,
        };
        match loaded {
            Ok(()) => {}
            Err(DeltaTableError::NotATable(_)) => return Ok(None),
            Err(e) => return Err(TableError::Delta(e).into()),
        }
        let provider = table
            .table_provider()
            .await
            .map_err(|e| TableError::Delta(DeltaTableError::Generic(e.to_string())))?;

        let runtime = runtime(memory_limit)?;
        // `SessionContext::new*` never installs the dynamic file catalog (that takes
        // `enable_url_table`), and information_schema stays off.
        let config = SessionConfig::new().with_information_schema(false);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        table
            .update_datafusion_session(&ctx.state())
            .map_err(TableError::Delta)?;
        drop(table);

        let plan = LogicalPlanBuilder::scan("delta", provider_as_source(provider), None)?
            .filter(col(TENANT).eq(lit(self.tenant.as_str())))?
            .project([col(DEVICE), col(METRIC), col(TS), col(VALUE), col(DATE)])?
            .build()?;
        ctx.register_table(TABLE, Arc::new(ViewTable::new(plan, None)))?;
        Ok(Some(ctx))
    }

    /// Runs one query and collects its results.
    pub async fn sql(&self, query: &str) -> Result<Vec<RecordBatch>, QueryError> {
        let stream = self.stream(query, None).await?;
        Ok(datafusion::physical_plan::common::collect(stream).await?)
    }

    /// Plans one query and starts it: its results as a stream of batches. The operators
    /// that buffer (sorts, aggregations, joins) share at most `memory_limit` bytes and fail
    /// with [`QueryError::is_resources_exhausted`] beyond it (nothing spills to disk);
    /// dropping the stream cancels the query.
    pub async fn stream(
        &self,
        query: &str,
        memory_limit: Option<usize>,
    ) -> Result<SendableRecordBatchStream, QueryError> {
        let ctx = match self.session(memory_limit).await? {
            Some(ctx) => ctx,
            None => empty_session(memory_limit)?,
        };
        let plan = ctx
            .state()
            .create_logical_plan(query)
            .await
            .map_err(QueryError::Plan)?;
        // Planning has no side effects; refuse anything but a query before executing.
        self.options
            .verify_plan(&plan)
            .map_err(|e| QueryError::NotAQuery(e.strip_backtrace()))?;
        let frame = ctx
            .execute_logical_plan(plan)
            .await
            .map_err(QueryError::Plan)?;
        Ok(frame.execute_stream().await?)
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

/// The runtime of one query: a memory pool of `memory_limit` bytes (unbounded without), no
/// spilling.
fn runtime(memory_limit: Option<usize>) -> Result<Arc<RuntimeEnv>, QueryError> {
    let builder = RuntimeEnvBuilder::new().with_disk_manager_builder(
        DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
    );
    let builder = match memory_limit {
        Some(bytes) => builder.with_memory_pool(Arc::new(GreedyMemoryPool::new(bytes))),
        None => builder,
    };
    Ok(builder.build_arc()?)
}

/// A session whose `readings` is an empty table of the view's schema (no table yet).
fn empty_session(memory_limit: Option<usize>) -> Result<SessionContext, QueryError> {
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::datasource::MemTable;
    let schema = Arc::new(Schema::new(vec![
        Field::new(DEVICE, DataType::Utf8, false),
        Field::new(METRIC, DataType::Utf8, false),
        Field::new(
            TS,
            DataType::Timestamp(TimeUnit::Microsecond, Some(crate::TS_TIMEZONE.into())),
            false,
        ),
        Field::new(VALUE, DataType::Float64, false),
        Field::new(DATE, DataType::Date32, false),
    ]));
    let ctx = SessionContext::new_with_config_rt(
        SessionConfig::new().with_information_schema(false),
        runtime(memory_limit)?,
    );
    ctx.register_table(TABLE, Arc::new(MemTable::try_new(schema, vec![vec![]])?))?;
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    use super::*;
    use crate::table::{ReadingsTable, TableConfig};
    use crate::test_util::{HOUR_10, NS_PER_HOUR, rows, series, staged};

    fn location(root: &Path) -> Location {
        Location::parse(root.to_str().expect("utf-8"), BTreeMap::new()).expect("location")
    }

    async fn store_with(root: &Path, batches: Vec<crate::StagedBatch>) {
        let table = ReadingsTable::open(TableConfig {
            store: root.to_str().expect("utf-8").to_owned(),
            ..TableConfig::default()
        })
        .await
        .expect("open");
        table.commit(batches).await.expect("commit");
    }

    async fn scalar(q: &TenantQuery, sql: &str) -> i64 {
        let batches = q.sql(sql).await.expect("sql");
        batches[0].column(0).as_primitive::<Int64Type>().value(0)
    }

    #[tokio::test]
    async fn tenant_sees_only_its_own_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        // "ab" shares a prefix with "a": the filter is on the whole value.
        store_with(
            dir.path(),
            vec![
                staged("a", series(10, HOUR_10)),
                staged("ab", series(20, HOUR_10)),
                staged("b", series(40, HOUR_10)),
            ],
        )
        .await;
        let q = TenantQuery::new(&location(dir.path()), "a").expect("query");
        assert_eq!(scalar(&q, "SELECT count(*) FROM readings").await, 10);
        assert_eq!(
            scalar(&q, "SELECT count(*) FROM datafusion.public.readings").await,
            10
        );
        // The view has no tenant column to widen.
        assert!(q.sql("SELECT tenant FROM readings").await.is_err());

        let b_dir = dir.path().join("tenant=b");
        let b_file = std::fs::read_dir(b_dir.join("date=2026-11-21"))
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
            "SELECT count(*) FROM delta".to_owned(),
            "SELECT count(*) FROM readings, '../tenant=b/'".to_owned(),
        ] {
            // Each fails because the thing is not there (no URL tables, no such table
            // function, no information_schema, the table is not registered) or is not a
            // query, not by accident.
            let err = q.sql(&crafted).await.expect_err(&crafted);
            assert!(
                matches!(err, QueryError::NotAQuery(_)) || err.to_string().contains("not found"),
                "{crafted}: {err}"
            );
        }
        assert_eq!(scalar(&q, "SELECT count(*) FROM readings").await, 10);

        let other = TenantQuery::new(&location(dir.path()), "b").expect("query");
        assert_eq!(scalar(&other, "SELECT count(*) FROM readings").await, 40);
        // Sharing the log's copy changes nothing of who sees what.
        let shared = q.for_tenant("b").expect("b");
        assert_eq!(scalar(&shared, "SELECT count(*) FROM readings").await, 40);
        assert_eq!(scalar(&q, "SELECT count(*) FROM readings").await, 10);
        assert!(q.for_tenant("../b").is_err());
        assert!(matches!(
            TenantQuery::new(&location(dir.path()), "../b"),
            Err(QueryError::InvalidTenant(_))
        ));
    }

    #[tokio::test]
    async fn only_queries_are_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with(dir.path(), vec![staged("a", series(10, HOUR_10))]).await;
        let q = TenantQuery::new(&location(dir.path()), "a").expect("query");
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
    async fn no_table_is_an_empty_table_and_new_commits_are_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = TenantQuery::new(&location(dir.path()), "fresh").expect("query");
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
        let q = TenantQuery::new(&location(dir.path()), "a").expect("query");
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
            n("SELECT count(*) FROM readings WHERE ts >= '2026-11-21T11:00:00Z'").await,
            60
        );
        assert_eq!(
            n("SELECT count(*) FROM readings WHERE ts < '2026-11-21T11:00:00Z'").await,
            10
        );
    }

    #[tokio::test]
    async fn pretty_and_json_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with(
            dir.path(),
            vec![staged("a", rows(&[("meter-1", "kwh", HOUR_10, 12.5)]))],
        )
        .await;
        let q = TenantQuery::new(&location(dir.path()), "a").expect("query");
        let sql = "SELECT device, metric, ts, value, date FROM readings";
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
                "value": 12.5, "date": "2026-11-21"
            })
        );
    }
}
