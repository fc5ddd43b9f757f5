//! The read side of Sluice over HTTP, for tenants with an API key of scope `query`:
//!
//! - `POST /v1/query`: read-only SQL over the tenant's readings (the `readings` view of
//!   [`sluice_sinks::query`]), answered as JSON rows or as an Arrow IPC stream ([`sql`]);
//! - `GET /v1/latest`: the newest value per series from the latest-values store (Redis,
//!   or memory in embedded mode), filtered by device and metric patterns and paged by
//!   device ([`latest`]).
//!
//! Every read is bounded ([`QueryApiConfig`]): SQL size, run time, memory, result size,
//! and queries at once — per tenant, so one tenant's heavy queries answer 429 to that
//! tenant while the others keep their slots.
//!
//! This crate owns the HTTP surface only; the queries themselves and the stores are
//! `sluice-sinks`'. `sluice query-api` serves [`app`]; `sluice embedded` mounts [`routes`]
//! beside ingest's.

mod config;
mod error;
mod executor;
mod internal_events;
pub mod latest;
pub mod sql;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::{get, post};
use sluice_binding::serve::ServerLimits;
use sluice_binding::tenancy::Tenants;
use sluice_sinks::latest::LatestStore;
use sluice_sinks::query::{QueryError, TenantQuery};
use sluice_sinks::table::Location;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use config::QueryApiConfig;
pub use error::{ApiError, ErrorCode};
pub use internal_events::{DURATION_SECONDS, REQUESTS, ROWS_RETURNED, RUNNING};

/// What the handlers share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: QueryApiConfig,
    tenants: Tenants,
    latest: LatestStore,
    /// The table's log, followed incrementally and shared by every tenant's queries.
    table: TenantQuery,
    /// Where queries execute.
    executor: executor::Executor,
    /// Queries running in the process.
    slots: Arc<Semaphore>,
    /// Queries running per tenant.
    tenant_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// The slots a running query holds; released on drop.
#[derive(Debug)]
pub(crate) struct Slots {
    _tenant: OwnedSemaphorePermit,
    _process: OwnedSemaphorePermit,
    state: AppState,
}

impl Drop for Slots {
    fn drop(&mut self) {
        // Both permits are still held here: one more than the available count says.
        let free = self.state.inner.slots.available_permits() + 1;
        internal_events::running(self.state.inner.config.max_concurrent_queries - free);
    }
}

impl AppState {
    /// The read API over the readings table at `location` and the latest values in
    /// `latest`, for the tenants (and keys) of `tenants`. Starts the query runtime's
    /// threads.
    pub fn new(
        config: QueryApiConfig,
        tenants: Tenants,
        location: Location,
        latest: LatestStore,
    ) -> std::io::Result<Self> {
        let slots = Arc::new(Semaphore::new(config.max_concurrent_queries.max(1)));
        let executor = executor::Executor::new(config.query_threads)?;
        // Any valid id: each query names its tenant through `for_tenant`.
        let table = TenantQuery::new(&location, "sluice")
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                executor,
                config,
                tenants,
                latest,
                table,
                slots,
                tenant_slots: Mutex::default(),
            }),
        })
    }

    pub(crate) fn executor(&self) -> &executor::Executor {
        &self.inner.executor
    }

    pub(crate) fn config(&self) -> &QueryApiConfig {
        &self.inner.config
    }

    pub(crate) fn tenants(&self) -> &Tenants {
        &self.inner.tenants
    }

    pub(crate) fn latest(&self) -> &LatestStore {
        &self.inner.latest
    }

    /// Queries of `tenant`.
    pub(crate) fn session(&self, tenant: &str) -> Result<TenantQuery, QueryError> {
        self.inner.table.for_tenant(tenant)
    }

    /// A slot for one query of `tenant`: the tenant's own first (429 when it has none
    /// left), then the process's (503).
    pub(crate) fn take_slots(&self, tenant: &str) -> Result<Slots, ApiError> {
        let per_tenant = {
            let mut all = self
                .inner
                .tenant_slots
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            all.entry(tenant.to_owned())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(
                        self.inner.config.max_concurrent_per_tenant.max(1),
                    ))
                })
                .clone()
        };
        let tenant_permit = per_tenant.try_acquire_owned().map_err(|_| {
            ApiError::new(
                ErrorCode::TooManyQueries,
                format!(
                    "this tenant already runs {} queries, its limit; retry when one has finished",
                    self.inner.config.max_concurrent_per_tenant
                ),
            )
        })?;
        let process_permit = self.inner.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                ErrorCode::Overloaded,
                "the query service is running as many queries as it may; retry shortly",
            )
        })?;
        internal_events::running(
            self.inner.config.max_concurrent_queries - self.inner.slots.available_permits(),
        );
        Ok(Slots {
            _tenant: tenant_permit,
            _process: process_permit,
            state: self.clone(),
        })
    }
}

/// The read endpoints alone (`/v1/query`, `/v1/latest`), to mount beside other routes.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/v1/query", post(sql::post_query))
        .route("/v1/latest", get(latest::get_latest))
        .with_state(state)
}

/// The whole service: [`routes`], health endpoints and JSON answers for unknown routes.
pub fn app(state: AppState) -> Router {
    routes(state)
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

/// Serves [`app`] on `listener` within `limits` until `shutdown`, then lets the reads in
/// flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "query API listening");
    }
    sluice_binding::serve::run(listener, app(state), limits, shutdown).await
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn not_found() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; SQL goes to POST /v1/query, latest values come from GET /v1/latest",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed: POST /v1/query, GET /v1/latest",
    )
}

#[cfg(test)]
mod tests;
