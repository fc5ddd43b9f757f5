//! `GET /v1/latest`: the newest value of each of the tenant's series.
//!
//! Query parameters, all optional:
//!
//! | parameter | meaning |
//! |---|---|
//! | `device` | devices whose name matches this glob (`*` any run, `?` one character) |
//! | `metric` | metrics whose name matches this glob |
//! | `after` | only devices whose name sorts after this one: the `next_after` of the previous page |
//! | `limit` | devices per page (default and bound in [`QueryApiConfig`](crate::QueryApiConfig)) |
//!
//! The answer, devices sorted by name, metrics by name within a device:
//!
//! ```json
//! {"devices": [{"device": "pump-1", "readings": [
//!     {"metric": "temp", "ts": "2026-11-21T10:00:00.000000001Z", "ts_ns": 1795255200000000001, "value": 21.5}]}],
//!  "next_after": "pump-1"}
//! ```
//!
//! `next_after` is `null` on the last page.

use std::time::Instant;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat};
use serde::{Deserialize, Serialize};
use sluice_binding::tenancy::Scope;
use sluice_sinks::latest::{LatestFilter, LatestPage, Pattern};

use crate::AppState;
use crate::error::{ApiError, ErrorCode};
use crate::internal_events::Answered;

/// Longest pattern or `after` value: device and metric names are bounded by the binding.
const MAX_PARAM_BYTES: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LatestParams {
    device: Option<String>,
    metric: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct Page {
    devices: Vec<Device>,
    next_after: Option<String>,
}

#[derive(Serialize)]
struct Device {
    device: String,
    readings: Vec<Reading>,
}

#[derive(Serialize)]
struct Reading {
    metric: String,
    ts: String,
    ts_ns: i64,
    value: f64,
}

pub(crate) async fn get_latest(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<LatestParams>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let tenant = match state.tenants().authenticate(&headers, Scope::Query) {
        Ok(t) => t.as_str().to_owned(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let result = answer(&state, &tenant, params).await;
    let rows = result.as_ref().map_or(0, |p| p.devices.len() as u64);
    Answered::of("latest", &tenant, &result, rows, started).emit();
    match result {
        Ok(page) => Json(render(page)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn answer(
    state: &AppState,
    tenant: &str,
    params: Result<Query<LatestParams>, QueryRejection>,
) -> Result<LatestPage, ApiError> {
    let config = state.config();
    let Query(params) = params.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidParameter,
            format!(
                "{}; the parameters are device, metric, after and limit",
                e.body_text()
            ),
        )
    })?;
    for (name, value) in [
        ("device", &params.device),
        ("metric", &params.metric),
        ("after", &params.after),
    ] {
        if let Some(v) = value
            && (v.is_empty() || v.len() > MAX_PARAM_BYTES || v.chars().any(char::is_control))
        {
            return Err(ApiError::new(
                ErrorCode::InvalidParameter,
                format!("{name} must be 1 to {MAX_PARAM_BYTES} bytes without control characters"),
            ));
        }
    }
    let limit = params.limit.unwrap_or(config.latest_default_limit);
    if limit == 0 || limit > config.latest_max_limit {
        return Err(ApiError::new(
            ErrorCode::InvalidParameter,
            format!("limit must be 1 to {}", config.latest_max_limit),
        ));
    }
    let filter = LatestFilter {
        device: params.device.as_deref().map(Pattern::new),
        metric: params.metric.as_deref().map(Pattern::new),
        after: params.after,
        limit,
    };
    match tokio::time::timeout(config.latest_timeout, state.latest().find(tenant, &filter)).await {
        Ok(Ok(page)) => Ok(page),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read latest values");
            Err(ApiError::new(
                ErrorCode::Unavailable,
                "the latest values cannot be read right now; retry shortly",
            ))
        }
        Err(_) => Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "the latest-values store did not answer within {:?}; retry shortly",
                config.latest_timeout
            ),
        )),
    }
}

fn render(page: LatestPage) -> Page {
    let next_after = if page.more {
        page.devices.last().map(|d| d.device.clone())
    } else {
        None
    };
    Page {
        devices: page
            .devices
            .into_iter()
            .map(|d| Device {
                device: d.device,
                readings: d
                    .readings
                    .into_iter()
                    .map(|r| Reading {
                        ts: DateTime::from_timestamp_nanos(r.ts_ns)
                            .to_rfc3339_opts(SecondsFormat::AutoSi, true),
                        metric: r.metric,
                        ts_ns: r.ts_ns,
                        value: r.value,
                    })
                    .collect(),
            })
            .collect(),
        next_after,
    }
}
