//! Settings of the read API: every bound a query or a latest-values read is held to.

use std::time::Duration;

/// Limits of the read API. The defaults suit a shared deployment: a tenant's query may use
/// a few hundred MB and half a minute, never the whole process.
#[derive(Clone, Debug)]
pub struct QueryApiConfig {
    /// Largest SQL text (or JSON request body) accepted; larger answers 413.
    pub max_sql_bytes: usize,
    /// Longest a query may run, planning and results included; then it is cancelled and
    /// answered 408.
    pub timeout: Duration,
    /// Memory the buffering operators of one query (sorts, aggregations, joins) may hold;
    /// beyond it the query fails with 413 (nothing spills to disk).
    pub memory_limit: usize,
    /// Most rows a query may return; more answers 413 (aggregate, filter or page with
    /// `LIMIT`/`OFFSET`).
    pub max_result_rows: usize,
    /// Most bytes of results (Arrow in memory) a query may return; more answers 413.
    pub max_result_bytes: usize,
    /// Queries running at once in this process; more answer 503 `overloaded`.
    pub max_concurrent_queries: usize,
    /// Queries running at once per tenant; more answer 429, so that one tenant cannot take
    /// every slot.
    pub max_concurrent_per_tenant: usize,
    /// Threads of the runtime queries execute on, apart from the one serving HTTP (so a
    /// query computing without pause never delays answers, health checks or timers).
    /// 0: one per core.
    pub query_threads: usize,
    /// Devices per page of `GET /v1/latest` when `limit` is not given.
    pub latest_default_limit: usize,
    /// Largest `limit` of `GET /v1/latest`.
    pub latest_max_limit: usize,
    /// Longest a latest-values read may take (Redis slow or away); then 503.
    pub latest_timeout: Duration,
}

impl Default for QueryApiConfig {
    fn default() -> Self {
        Self {
            max_sql_bytes: 64 * 1024,
            timeout: Duration::from_secs(30),
            memory_limit: 256 * 1024 * 1024,
            max_result_rows: 100_000,
            max_result_bytes: 64 * 1024 * 1024,
            max_concurrent_queries: 8,
            max_concurrent_per_tenant: 2,
            query_threads: 0,
            latest_default_limit: 1_000,
            latest_max_limit: 10_000,
            latest_timeout: Duration::from_secs(5),
        }
    }
}
