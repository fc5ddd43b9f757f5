//! The HTTP front end (axum): `POST /v1/telemetry`, `GET /livez` (also `/healthz`: the
//! process answers), `GET /readyz` (the broker connections are up, no alarm, not stopping).
//!
//! A telemetry request goes through, in order:
//! 1. authentication: `Authorization: Bearer <key>` or `X-Api-Key: <key>` names the tenant
//!    (401 otherwise); the body never does;
//! 2. the cheap checks: `Content-Type` (415), query string (400);
//! 3. admission: 429 at once while a refusal of the tenant's quota holds it ([`crate::quota`]);
//!    503 at once when the broker blocked publishing or no broker is connected, when the
//!    tenant already has its share of requests in flight (`max_inflight_per_tenant`), or
//!    when `max_inflight_requests` are (no queue of waiting requests): one tenant cannot
//!    take every place; then the tenant's byte quota for a declared `Content-Length` (429);
//! 4. the body, at most `max_body_bytes` (413) and within `body_read_timeout` (408),
//!    then the byte quota if the length was not declared, parsed and validated
//!    ([`body`]): any bad reading refuses the whole request, nothing of it is published;
//!    then the tenant's reading quota (429);
//! 5. the batcher ([`crate::batcher`]); the answer is 202 `{"accepted": n}` only once every
//!    batch holding the request's readings was confirmed by the broker, else 503 with
//!    `Retry-After`.
//!
//! Every refusal is a JSON [`ApiError`] (see [`ErrorCode`] for the codes), including those
//! of the routing layer (404, 405) and a panic (500).

pub mod body;
pub mod error;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::json;
use sluice_binding::TenantId;
use sluice_binding::model::now_ns;
use sluice_binding::transport::PublishError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::catch_panic::CatchPanicLayer;

use crate::batcher::{BatchError, Batcher, BatcherConfig, Chunk};
use crate::config::IngestConfig;
use crate::internal_events::{ReadingsAccepted, RequestCompleted, RequestRejected};
pub use body::{Format, Precision};
pub use error::{ApiError, Detail, ErrorCode};
use sluice_binding::producer::{Producer, SendError};
use sluice_binding::tenancy::{AuthError, Scope, Tenants};

/// Bodies larger than this are parsed on the blocking pool rather than on an async worker,
/// so a multi-megabyte parse does not delay other requests' confirms.
const PARSE_INLINE_MAX_BYTES: usize = 256 * 1024;

/// Longest a refused request's body is read before the connection is closed on it.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the handlers share; cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: IngestConfig,
    tenants: Tenants,
    producer: Arc<Producer>,
    batcher: Batcher,
    inflight: Arc<Semaphore>,
    /// Each tenant's share of `inflight`.
    per_tenant: HashMap<TenantId, Arc<Semaphore>>,
    /// Each tenant's quota, shared with the gate (`crate::gate`).
    quotas: Arc<crate::quota::Quotas>,
}

impl AppState {
    /// Builds the state and starts the batcher task (call inside a tokio runtime). Values of
    /// `cfg` out of range are clamped (see [`IngestConfig::check`]); `producer` is normally
    /// `Producer::new(transport, cfg.producer.clone())`.
    pub fn new(cfg: IngestConfig, tenants: Tenants, producer: Producer) -> Self {
        let cfg = cfg.clamped();
        let producer = Arc::new(producer);
        let batcher = Batcher::spawn(
            producer.clone(),
            BatcherConfig {
                max_readings: cfg.batch_max_readings,
                linger: cfg.batch_linger,
                max_inflight_batches: cfg.max_inflight_batches,
                // One entry per request: the in-flight semaphore already bounds them.
                queue: cfg.max_inflight_requests,
                max_days: cfg.max_days_per_batch,
            },
        );
        let share = cfg.tenant_share(tenants.len());
        let per_tenant = tenants
            .ids()
            .iter()
            .map(|t| (t.clone(), Arc::new(Semaphore::new(share))))
            .collect();
        let quotas = Arc::new(crate::quota::Quotas::new(&tenants));
        Self {
            inner: Arc::new(Inner {
                inflight: Arc::new(Semaphore::new(cfg.max_inflight_requests)),
                per_tenant,
                quotas,
                cfg,
                tenants,
                producer,
                batcher,
            }),
        }
    }

    /// The configuration in use (after clamping).
    pub fn config(&self) -> &IngestConfig {
        &self.inner.cfg
    }

    /// The producer.
    pub fn producer(&self) -> &Arc<Producer> {
        &self.inner.producer
    }

    /// The tenants.
    pub fn tenants(&self) -> &Tenants {
        &self.inner.tenants
    }

    /// The tenants' quota buckets, which the gate spends too: a tenant's rate is shared by
    /// its HTTP requests and its direct publishers.
    pub(crate) fn quotas(&self) -> &Arc<crate::quota::Quotas> {
        &self.inner.quotas
    }

    /// Stops the batcher: open batches are sent at once, and this returns when every batch
    /// settled. Requests arriving later get 503. [`serve`] calls it after the last request;
    /// call it yourself when serving [`app`] some other way. The transport stays open.
    pub async fn shutdown(&self) {
        self.inner.batcher.shutdown().await;
    }
}

/// The router, for [`serve`] or for tests (`tower::ServiceExt::oneshot`).
pub fn app(state: AppState) -> Router {
    let max_body = state.inner.cfg.max_body_bytes;
    Router::new()
        .route("/v1/telemetry", post(post_telemetry))
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

/// Serves [`app`] on `listener` until `shutdown` resolves; then stops accepting, sends
/// open batches without waiting for their linger, lets the requests in flight finish (each
/// waits for its confirms), stops the batcher and waits for its last confirms. The transport stays open: the caller closes it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, Router::new(), shutdown).await
}

/// [`serve`], with `extra` routes beside ingest's on the same listener (the embedded mode
/// adds the read API). `extra` must not have a fallback of its own.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "ingest listening");
    }
    // Once the server stops accepting, in-flight requests must not wait for a linger.
    let batcher = state.inner.batcher.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("ingest shutting down: finishing the requests in flight");
        batcher.stop_lingering();
    };
    let limits = sluice_binding::serve::ServerLimits {
        max_connections: state.inner.cfg.max_connections,
        header_read_timeout: state.inner.cfg.header_read_timeout,
    };
    let app = app(state.clone()).merge(extra);
    let served = sluice_binding::serve::run(listener, app, limits, shutdown).await;
    tracing::info!("ingest stopped accepting; flushing the batcher");
    state.shutdown().await;
    served
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready while a broker takes publishes (no alarm; of several brokers, one suffices, the
/// others' problems listed as degraded) and ingest is not stopping.
async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = state.inner.producer.transport().readiness();
    if !readiness.is_ready() {
        return ApiError::new(ErrorCode::Unavailable, readiness.problems.join("; "))
            .retry_after(state.inner.cfg.retry_after_secs)
            .into_response();
    }
    if state.inner.batcher.is_closed() {
        return ApiError::new(ErrorCode::Unavailable, "shutting down")
            .retry_after(state.inner.cfg.retry_after_secs)
            .into_response();
    }
    if readiness.degraded.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        Json(json!({"status": "degraded", "degraded": readiness.degraded})).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; telemetry goes to POST /v1/telemetry",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    ApiError::new(ErrorCode::Internal, "internal error").into_response()
}

async fn post_telemetry(State(state): State<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let mut tenant = None;
    let response = match ingest(&state, req, &mut tenant).await {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(json!({"accepted": accepted}))).into_response(),
        Err(e) => {
            RequestRejected {
                reason: e.code.as_str(),
                status: e.status().as_u16(),
                message: &e.message,
                tenant: tenant.as_ref().map(TenantId::as_str),
            }
            .emit();
            e.into_response()
        }
    };
    RequestCompleted {
        status: response.status().as_u16(),
        elapsed: started.elapsed(),
    }
    .emit();
    response
}

/// Handles one telemetry request; `tenant` is set once the key is known (for telemetry).
async fn ingest(
    state: &AppState,
    req: Request,
    tenant_out: &mut Option<TenantId>,
) -> Result<usize, ApiError> {
    let s = &*state.inner;
    let (tenant, format, precision, _permits, bytes_spent) = match admit(s, &req, tenant_out) {
        Ok(admitted) => admitted,
        Err(e) => {
            discard_body(req, s.cfg.max_body_bytes).await;
            return Err(e);
        }
    };
    let retry_after = s.cfg.retry_after_secs;
    let timeout = s.cfg.body_read_timeout;
    let body = tokio::time::timeout(timeout, read_body(req, s.cfg.max_body_bytes))
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::RequestTimeout,
                format!("the request body did not arrive within {timeout:?}"),
            )
        })??;
    if !bytes_spent {
        s.quotas
            .spend_bytes(&tenant, body.len())
            .map_err(over_quota)?;
    }
    let opts = body::ParseOptions {
        format,
        precision,
        max_readings: s.cfg.max_readings_per_request,
        limits: s.cfg.limits(),
        now_ns: now_ns(),
    };
    let chunk = parse(body, opts).await?;
    let accepted = chunk.len();
    s.quotas
        .spend_readings(&tenant, accepted)
        .map_err(over_quota)?;

    match s.batcher.submit(tenant.clone(), chunk).await {
        Ok(()) => {
            ReadingsAccepted {
                tenant: tenant.as_str(),
                count: accepted,
            }
            .emit();
            Ok(accepted)
        }
        Err(BatchError::ShuttingDown) => {
            Err(ApiError::new(ErrorCode::Unavailable, "shutting down").retry_after(retry_after))
        }
        Err(BatchError::Send(e)) if e.is_permanent() => Err(ApiError::new(
            ErrorCode::Internal,
            format!("cannot publish the readings: {e}"),
        )),
        Err(BatchError::Send(e)) => Err(ApiError::new(
            ErrorCode::Unavailable,
            unavailable_message(&e),
        )
        .retry_after(retry_after)),
    }
}

/// The answer to a request over its tenant's quota: 429 until the bucket refills, 413 if
/// it never can.
fn over_quota(q: crate::quota::OverQuota) -> ApiError {
    match q.wait {
        Some(wait) => {
            let wait = wait.as_secs_f64();
            ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "over the tenant's quota of {} {}; retry in {wait:.3} s",
                    q.rate, q.which
                ),
            )
            .retry_after(wait.ceil().max(1.0) as u64)
        }
        None => {
            let code = if q.which == "bytes_per_sec" {
                ErrorCode::BodyTooLarge
            } else {
                ErrorCode::TooManyReadings
            };
            ApiError::new(
                code,
                format!(
                    "larger than a second of the tenant's quota ({} {}); send smaller requests",
                    q.rate, q.which
                ),
            )
        }
    }
}

/// The `message` of a 503 for a publish failure.
fn unavailable_message(e: &SendError) -> String {
    match e {
        SendError::Publish { source, .. } => match source {
            PublishError::Blocked(reason) | PublishError::Unavailable(reason) => reason.clone(),
            PublishError::Nacked => "broker nacked".to_owned(),
            PublishError::Unroutable(p) => {
                format!("unroutable: no queue is bound to partition {p} (topology not declared?)")
            }
            PublishError::Timeout(d) => format!("confirm timeout: no broker confirm within {d:?}"),
            PublishError::Connection(c) => format!("broker connection failed: {c}"),
            PublishError::Closed => "transport closed".to_owned(),
        },
        other => other.to_string(),
    }
}

fn content_type(headers: &HeaderMap) -> Result<Format, ApiError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not visible ASCII)"));
    match value {
        Some(v) => Format::from_content_type(v).ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!(
                    "unsupported Content-Type {v:?}: send application/json or application/msgpack"
                ),
            )
        }),
        None => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "missing Content-Type: send application/json or application/msgpack",
        )),
    }
}

/// A request's places in flight: in its tenant's share and in the whole; held until the
/// answer.
struct Permits {
    _own: Option<OwnedSemaphorePermit>,
    _all: OwnedSemaphorePermit,
}

/// The checks made before the body is read: the key, the content type, the precision,
/// the tenant's quota hold, the broker's state, the in-flight limits (the tenant's share,
/// then the whole), whose permits the caller holds, and the byte quota of a declared
/// length (the last: `true` when it was spent).
fn admit(
    s: &Inner,
    req: &Request,
    tenant_out: &mut Option<TenantId>,
) -> Result<(TenantId, Format, Precision, Permits, bool), ApiError> {
    let tenant = s
        .tenants
        .authenticate(req.headers(), Scope::Ingest)
        .map_err(|e| {
            let code = match e {
                AuthError::MissingScope(_) => ErrorCode::Forbidden,
                _ => ErrorCode::Unauthorized,
            };
            ApiError::new(code, e.to_string())
        })?
        .clone();
    *tenant_out = Some(tenant.clone());

    let format = content_type(req.headers())?;
    let precision = Precision::from_query(req.uri().query())?;

    // Before anything is spent on it: a tenant held by its quota costs no body.
    s.quotas.check_held(&tenant).map_err(over_quota)?;
    let retry_after = s.cfg.retry_after_secs;
    if let Some(reason) = s.producer.transport().blocked() {
        return Err(ApiError::new(ErrorCode::Unavailable, reason).retry_after(retry_after));
    }
    // The tenant's share first: a tenant at its share takes nothing from the others.
    let own = s
        .per_tenant
        .get(&tenant)
        .map(|sem| {
            sem.clone().try_acquire_owned().map_err(|_| {
                ApiError::new(
                    ErrorCode::Overloaded,
                    format!(
                        "tenant {tenant} already has {} requests in flight (its share); retry later",
                        s.cfg.tenant_share(s.per_tenant.len())
                    ),
                )
                .retry_after(retry_after)
            })
        })
        .transpose()?;
    let all = s.inflight.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            ErrorCode::Overloaded,
            format!(
                "{} requests are already in flight; retry later",
                s.cfg.max_inflight_requests
            ),
        )
        .retry_after(retry_after)
    })?;
    // A length over the body limit is refused by `read_body` with 413, spending nothing.
    let declared = declared_length(req.headers()).filter(|&n| n <= s.cfg.max_body_bytes as u64);
    if let Some(n) = declared {
        s.quotas
            .spend_bytes(&tenant, usize::try_from(n).unwrap_or(usize::MAX))
            .map_err(over_quota)?;
    }
    Ok((
        tenant,
        format,
        precision,
        Permits {
            _own: own,
            _all: all,
        },
        declared.is_some(),
    ))
}

/// Reads and drops the body of a request refused before its body was read. Closing the
/// connection with unread data makes the kernel reset it, and a client still sending the
/// body then sees a broken pipe instead of the error; hyper does no lingering close. A
/// body over `max` (declared or read) or slower than [`DISCARD_TIMEOUT`] is left unread:
/// the connection closes on it, as it would anyway.
async fn discard_body(req: Request, max: usize) {
    if declared_length(req.headers()).is_some_and(|n| n > max as u64) {
        return;
    }
    let mut frames = req.into_body().into_data_stream();
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, async {
        let mut read = 0;
        while let Some(Ok(chunk)) = frames.next().await {
            read += chunk.len();
            if read > max {
                break;
            }
        }
    })
    .await;
}

/// The body length the client declared (`Content-Length`), if any.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

async fn read_body(req: Request, max: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!(
                "the request body is larger than the {max}-byte limit; split the readings over several requests"
            ),
        )
    };
    if declared_length(req.headers()).is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    // The limit itself comes from the DefaultBodyLimit layer of `app`.
    Bytes::from_request(req, &()).await.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => too_large(),
        other => ApiError::new(
            ErrorCode::MalformedBody,
            format!("cannot read the request body: {other}"),
        ),
    })
}

async fn parse(body: Bytes, opts: body::ParseOptions) -> Result<Chunk, ApiError> {
    if body.len() <= PARSE_INLINE_MAX_BYTES {
        return body::parse(&body, &opts);
    }
    tokio::task::spawn_blocking(move || body::parse(&body, &opts))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "body parser failed");
            Err(ApiError::new(
                ErrorCode::Internal,
                "internal error while parsing the body",
            ))
        })
}

#[cfg(test)]
mod tests;
