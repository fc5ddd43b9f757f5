//! Row counts in the readings table, through DataFusion as tenants query it: how tests prove
//! "nothing lost, nothing duplicated" without trusting the services' own reports.

use std::collections::BTreeMap;
use std::path::Path;

use sluice_sinks::query::TenantQuery;
use sluice_sinks::table::Location;

/// The first value of the first row `sql` returns over `tenant`'s readings in the table at
/// `root` (a local directory); 0 when nothing is stored yet.
pub async fn count(root: &Path, tenant: &str, sql: &str) -> u64 {
    let location = Location::parse(root.to_str().expect("a UTF-8 path"), BTreeMap::new())
        .expect("a table location");
    count_at(&location, tenant, sql).await
}

/// [`count`] over a table at any location (a local path or an object store).
pub async fn count_at(location: &Location, tenant: &str, sql: &str) -> u64 {
    let q = TenantQuery::new(location, tenant).expect("a tenant query");
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
