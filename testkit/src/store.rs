//! Row counts in a Parquet store, through DataFusion as tenants query it: how tests prove
//! "nothing lost, nothing duplicated" without trusting the services' own reports.

use std::path::Path;

use sluice_sinks::query::TenantQuery;

/// The first value of the first row `sql` returns over `tenant`'s readings in the store at
/// `root`; 0 when the tenant has stored nothing yet.
pub async fn count(root: &Path, tenant: &str, sql: &str) -> u64 {
    if !root.join(format!("tenant={tenant}")).exists() {
        return 0;
    }
    let q = TenantQuery::new(root, tenant).expect("a tenant store");
    let rows = q.sql_json(sql).await.expect("the count query runs");
    rows.first()
        .and_then(|r| r.values().next())
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

/// Rows stored for `tenant`.
pub async fn total(root: &Path, tenant: &str) -> u64 {
    count(root, tenant, "SELECT count(*) AS n FROM readings").await
}

/// Distinct readings (device, metric, timestamp) stored for `tenant`: equal to
/// [`total`] when nothing was stored twice.
pub async fn distinct(root: &Path, tenant: &str) -> u64 {
    count(
        root,
        tenant,
        "SELECT count(*) AS n FROM (SELECT DISTINCT device, metric, ts FROM readings)",
    )
    .await
}
