//! The subscription API (HTTP, JSON), tenant-authenticated like ingest: the API key names
//! the tenant, and every route sees only that tenant's subscriptions. Another tenant's
//! subscription answers 404, exactly like one that does not exist.
//!
//! | route | does |
//! |---|---|
//! | `POST /v1/subscriptions` | create (201 + the stored subscription, `Location`) |
//! | `GET /v1/subscriptions` | list |
//! | `GET /v1/subscriptions/{id}` | one |
//! | `DELETE /v1/subscriptions/{id}` | delete (204) |
//! | `GET /v1/subscriptions/{id}/live` | the live feed of a `live` subscription (server-sent events) |
//! | `GET /livez` (also `/healthz`) | liveness: the process answers |
//! | `GET /readyz` | readiness: broker connections up, consumers subscribed, Redis answers (503 with the problems otherwise) |
//!
//! Errors are `{"error": code, "message": text}` with the status of the code.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Serialize;
use sluice_binding::TenantId;
use sluice_binding::model::now_ns;
use sluice_binding::tenancy::{AuthError, Scope, Tenants};
use sluice_binding::transport::Transport;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::internal_events::{LiveListenerClosed, LiveListenerOpened};
use crate::notify::amqp::AmqpGrants;
use crate::notify::live::LiveFeed;
use crate::notify::webhook::WebhookNotifier;
use crate::store::{Store, StoreError};
use crate::subscription::{
    MAX_SCANNED_PER_TENANT, MAX_STREAM_ENTRIES_PER_TENANT, NewSubscription, Subscription, Target,
};
use crate::sync::{self, SharedIndex};

/// Largest request body.
const MAX_BODY: usize = 64 * 1024;

/// What the API needs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiState {
    inner: Arc<ApiParts>,
}

/// The parts of the API's state.
#[derive(Debug)]
pub struct ApiParts {
    /// Authenticates requests: the API key names the tenant.
    pub tenants: Tenants,
    /// The subscriptions.
    pub store: Store,
    /// Checks webhook targets against its address rules (nothing is sent).
    pub webhook: WebhookNotifier,
    /// Checks AMQP targets against the tenants' grants.
    pub amqp: AmqpGrants,
    /// The live feeds that `GET /v1/subscriptions/{id}/live` follows.
    pub live: LiveFeed,
    /// Live feeds each tenant may hold open at once (each holds a Redis connection).
    pub live_slots: LiveSlots,
    /// The router's broker connections, for `/readyz`.
    pub transport: Transport,
    /// This instance's index: a change applies to it before the API answers.
    pub index: SharedIndex,
    /// Ends live feeds, which would otherwise hold graceful shutdown open forever.
    pub shutdown: CancellationToken,
}

impl ApiState {
    /// The API over `parts.store`; `/readyz` asks `parts.transport` and the store.
    pub fn new(parts: ApiParts) -> Self {
        Self {
            inner: Arc::new(parts),
        }
    }
}

/// The API's routes.
pub fn app(state: ApiState) -> Router {
    Router::new()
        .route("/v1/subscriptions", get(list).post(create))
        .route("/v1/subscriptions/{id}", get(get_one).delete(delete))
        .route("/v1/subscriptions/{id}/live", get(live))
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// A refused request.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such subscription")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TooMany(n) => Self::new(
                StatusCode::CONFLICT,
                "too_many_subscriptions",
                format!("the tenant already has {n} subscriptions, the most allowed"),
            ),
            other => {
                tracing::warn!(error = %other, "subscription store failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the subscription store is unavailable; retry later",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
        }
        let mut r = (
            self.status,
            Json(Body {
                error: self.code,
                message: &self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        } else if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn tenant(state: &ApiState, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    state
        .inner
        .tenants
        .authenticate(headers, Scope::Subscribe)
        .cloned()
        .map_err(|e| match e {
            AuthError::MissingScope(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            _ => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
        })
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    // A malformed id cannot name a subscription: 404, like any unknown one.
    Uuid::parse_str(id).map_err(|_| ApiError::not_found())
}

/// Ready while the broker connections are up, every consumer is subscribed and Redis
/// answers; 503 with the problems otherwise.
async fn ready(State(state): State<ApiState>) -> Response {
    let mut readiness = state.inner.transport.readiness();
    match tokio::time::timeout(Duration::from_secs(2), state.inner.store.version()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => readiness.problems.push(format!("Redis: {e}")),
        Err(_) => readiness
            .problems
            .push("Redis: no answer within 2 s".to_owned()),
    }
    if readiness.is_ready() {
        Json(readiness).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            readiness.problems.join("; "),
        )
        .into_response()
    }
}

async fn create(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&state, &headers)?;
    // The rejection is answered here, as JSON like every other error, after the key.
    let body = body.map_err(|e| {
        let (code, message) = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            (
                "body_too_large",
                format!("the subscription is larger than {} KiB", MAX_BODY / 1024),
            )
        } else {
            ("malformed_body", e.body_text())
        };
        ApiError::new(e.status(), code, message)
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the subscription as Content-Type: application/json",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let new: NewSubscription = serde_path_to_error::deserialize(de).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_body",
            format!("{}: {}", e.path(), e.inner()),
        )
    })?;
    new.validate().map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_subscription",
            e.to_string(),
        )
    })?;
    if new.criteria.is_scanned() {
        // Counted in the store, which every instance shares (two racing creates may both
        // pass: the bound is kept within one).
        let scanned = state
            .inner
            .store
            .list(tenant.as_str())
            .await?
            .iter()
            .filter(|s| s.criteria.is_scanned())
            .count();
        if scanned >= MAX_SCANNED_PER_TENANT {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "too_costly",
                format!(
                    "this tenant already has {scanned} subscriptions whose device and metric \
                     patterns both start with a wildcard (at most {MAX_SCANNED_PER_TENANT}): \
                     each is checked against every reading; give the devices or the metrics \
                     a literal prefix"
                ),
            ));
        }
    }
    if new.target.stream_entries() > 0 {
        // Redis memory is every tenant's: a tenant's streams keep a bounded number of
        // entries in all (counted as the scanned ones are).
        let held: u64 = state
            .inner
            .store
            .list(tenant.as_str())
            .await?
            .iter()
            .map(|s| s.target.stream_entries())
            .sum();
        let asked = new.target.stream_entries();
        if held + asked > MAX_STREAM_ENTRIES_PER_TENANT {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "too_costly",
                format!(
                    "this tenant's Redis streams already keep up to {held} entries; {asked} more \
                     would pass the {MAX_STREAM_ENTRIES_PER_TENANT} a tenant may keep: lower \
                     target.maxlen or delete a stream subscription"
                ),
            ));
        }
    }
    if let Target::Webhook { url } = &new.target {
        state.inner.webhook.check_target(url).await.map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "target_refused",
                format!("target.url: {}", e.reason()),
            )
        })?;
    }
    if let Target::Amqp { exchange, .. } = &new.target {
        state
            .inner
            .amqp
            .check_target(&tenant, exchange)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "target_refused",
                    format!("target.exchange: {e}"),
                )
            })?;
    }
    let sub = new.into_subscription(Uuid::now_v7(), tenant, now_ns());
    state.inner.store.create(&sub).await?;
    // Read-your-writes on this instance: readings published after the 201 match here.
    // A failed reload is not the client's problem; the sync retries it.
    let _ = sync::reload_tenant(&state.inner.store, &state.inner.index, sub.tenant.as_str()).await;
    tracing::info!(tenant = %sub.tenant, id = %sub.id, target = sub.target.kind(), "subscription created");
    let location = format!("/v1/subscriptions/{}", sub.id);
    let mut r = (StatusCode::CREATED, Json(sub)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Vec<Subscription>>, ApiError> {
    let tenant = tenant(&state, &headers)?;
    Ok(Json(state.inner.store.list(tenant.as_str()).await?))
}

async fn get_one(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Subscription>, ApiError> {
    let tenant = tenant(&state, &headers)?;
    let id = parse_id(&id)?;
    match state.inner.store.get(&tenant, id).await? {
        Some(s) if s.tenant == tenant => Ok(Json(s)),
        _ => Err(ApiError::not_found()),
    }
}

async fn delete(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant(&state, &headers)?;
    let id = parse_id(&id)?;
    if state.inner.store.delete(&tenant, id).await? {
        let _ = sync::reload_tenant(&state.inner.store, &state.inner.index, tenant.as_str()).await;
        tracing::info!(%tenant, %id, "subscription deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}

async fn live(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let tenant = tenant(&state, &headers)?;
    let id = parse_id(&id)?;
    let sub = match state.inner.store.get(&tenant, id).await? {
        Some(s) if s.tenant == tenant => s,
        _ => return Err(ApiError::not_found()),
    };
    if sub.target != Target::Live {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_live",
            "this subscription's target is not the live feed",
        ));
    }
    // Before the Redis connection is opened: a tenant at its cap costs nothing more.
    let slot = state
        .inner
        .live_slots
        .take(tenant.as_str())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_live_feeds",
                format!(
                    "this tenant already has {} live feeds open; close one first",
                    state.inner.live_slots.max
                ),
            )
        })?;
    let feed = state
        .inner
        .live
        .listen(tenant.as_str(), id)
        .await
        .map_err(StoreError::from)?;
    LiveListenerOpened.emit();
    let guard = (ListenerGuard, slot);
    let ended = state.inner.shutdown.clone().cancelled_owned();
    let stream = feed.take_until(ended).map(move |d| {
        let _held = &guard;
        let id = serde_json::from_str::<serde_json::Value>(&d)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
        let ev = SseEvent::default().event("notification").data(d);
        Ok(match id {
            Some(id) => ev.id(id),
            None => ev,
        })
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The live feeds each tenant holds open, and the cap on them.
#[derive(Clone, Debug)]
pub struct LiveSlots {
    max: usize,
    open: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

impl LiveSlots {
    /// At most `max` open feeds per tenant (at least 1).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            open: Arc::default(),
        }
    }

    /// A place for one more feed of `tenant`, given back when dropped; `None` at the cap.
    fn take(&self, tenant: &str) -> Option<LiveSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(tenant.to_owned()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(LiveSlot {
            slots: self.clone(),
            tenant: tenant.to_owned(),
        })
    }
}

/// One open feed's place among its tenant's.
struct LiveSlot {
    slots: LiveSlots,
    tenant: String,
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

/// Counts live listeners down when a feed's stream is dropped (the client went away).
struct ListenerGuard;

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        LiveListenerClosed.emit();
    }
}

#[cfg(test)]
mod tests;
