//! The pool's admin HTTP endpoint: read and change the worker count at run time.
//!
//! - `GET /v1/workers` → [`WorkersStatus`]
//! - `PUT /v1/workers` with `{"workers": N}` pins N workers; with `{"autoscale": true}`
//!   hands the count back to the autoscaler → the new [`WorkersStatus`]
//! - `GET /healthz` → 200 while the pool runs
//!
//! Errors are `{"error": code, "message": text}` with 400 (bad body or count), 409 (no
//! autoscaler) or 503 (pool stopped). It is an operator interface: bind it to a private
//! address (the default is loopback).

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::control::{ControlError, PoolControl, WorkersStatus};

/// Body of `PUT /v1/workers`: exactly one of the fields.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WorkersRequest {
    /// Run this many workers, pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// `true`: let the autoscaler decide again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<bool>,
}

#[derive(Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

fn error(status: StatusCode, code: &'static str, message: impl ToString) -> Response {
    (
        status,
        Json(ErrorBody {
            error: code,
            message: message.to_string(),
        }),
    )
        .into_response()
}

/// The admin routes over `control`.
pub fn router(control: PoolControl) -> Router {
    Router::new()
        .route("/v1/workers", get(status).put(set))
        .route("/healthz", get(health))
        .with_state(control)
}

async fn status(State(c): State<PoolControl>) -> Json<WorkersStatus> {
    Json(c.status())
}

async fn health(State(c): State<PoolControl>) -> Response {
    if c.status().workers > 0 {
        (StatusCode::OK, "ok").into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_running",
            "the pool is not running",
        )
    }
}

async fn set(
    State(c): State<PoolControl>,
    body: Result<Json<WorkersRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "malformed_body", e.body_text()),
    };
    let result = match (req.workers, req.autoscale) {
        (Some(n), None) => c.set_workers(n),
        (None, Some(true)) => c.resume_autoscale(),
        (None, Some(false)) => {
            // Pin the current count.
            let n = c.status().desired;
            c.set_workers(n)
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "malformed_body",
                r#"give exactly one of {"workers": N} or {"autoscale": true|false}"#,
            );
        }
    };
    match result {
        Ok(s) => Json(s).into_response(),
        Err(e @ ControlError::OutOfRange(_)) => error(StatusCode::BAD_REQUEST, "out_of_range", e),
        Err(e @ ControlError::NoAutoscaler) => error(StatusCode::CONFLICT, "no_autoscaler", e),
        Err(e @ ControlError::Stopped) => error(StatusCode::SERVICE_UNAVAILABLE, "not_running", e),
    }
}
