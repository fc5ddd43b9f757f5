//! The pool's admin HTTP endpoint: read and change the worker count at run time.
//!
//! - `GET /v1/workers` → [`WorkersStatus`]
//! - `PUT /v1/workers` with `{"workers": N}` pins N workers; with `{"autoscale": true}`
//!   hands the count back to the autoscaler → the new [`WorkersStatus`]
//! - `GET /livez` (also `/healthz`) → 200 while the pool runs
//! - `GET /readyz` → 200 while the pool runs, its broker connections are up, every
//!   consumer is subscribed and no sink is failing its commits ([`crate::health`]); 503
//!   with the problems otherwise
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

use sluice_binding::transport::Transport;

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

#[derive(Clone)]
struct AdminState {
    control: PoolControl,
    transport: Transport,
}

/// The admin routes over `control`, with readiness from `transport`.
pub fn router(control: PoolControl, transport: Transport) -> Router {
    Router::new()
        .route("/v1/workers", get(status).put(set))
        .route("/healthz", get(health))
        .route("/livez", get(health))
        .route("/readyz", get(ready))
        .with_state(AdminState { control, transport })
}

async fn status(State(s): State<AdminState>) -> Json<WorkersStatus> {
    Json(s.control.status())
}

fn not_running() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_running",
        "the pool is not running",
    )
}

async fn health(State(s): State<AdminState>) -> Response {
    if s.control.status().workers > 0 {
        (StatusCode::OK, "ok").into_response()
    } else {
        not_running()
    }
}

async fn ready(State(s): State<AdminState>) -> Response {
    if s.control.status().workers == 0 {
        return not_running();
    }
    let mut readiness = s.transport.readiness();
    readiness.problems.extend(s.control.sinks().problems());
    if readiness.is_ready() {
        Json(readiness).into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            readiness.problems.join("; "),
        )
    }
}

async fn set(
    State(s): State<AdminState>,
    body: Result<Json<WorkersRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "malformed_body", e.body_text()),
    };
    let c = &s.control;
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use serde_json::Value;
    use sluice_binding::Topology;
    use sluice_binding::transport::inproc::InProcessTransport;
    use tokio::sync::watch;
    use tower::ServiceExt;

    use super::*;
    use crate::autoscale::AutoscaleConfig;
    use crate::control::{Desired, Mode};

    fn transport() -> Transport {
        Transport::InProcess(InProcessTransport::new(Topology::new("t", 2), 8))
    }

    fn app(running: usize) -> Router {
        let control = PoolControl::new("storage", 2, None);
        control.running(running);
        router(control, transport())
    }

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        let r = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = r.status();
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn live_and_ready_while_the_pool_runs() {
        for path in ["/livez", "/healthz"] {
            assert_eq!(get(app(2), path).await.0, StatusCode::OK, "{path}");
        }
        let (status, body) = get(app(2), "/readyz").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("\"problems\":[]"), "{body}");
    }

    /// Sends `method path` with a JSON `body`; the status and the JSON answer.
    async fn call(app: Router, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let r = app.oneshot(req).await.unwrap();
        let status = r.status();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {bytes:?}"));
        (status, v)
    }

    /// The routes over `control` with the pool's side of it held open (a running pool).
    fn running(control: &PoolControl) -> (Router, watch::Receiver<Desired>) {
        let pool = control.subscribe();
        control.running(control.desired().workers);
        (router(control.clone(), transport()), pool)
    }

    #[tokio::test]
    async fn get_workers_shows_what_runs_and_who_decides() {
        let control = PoolControl::new("storage", 2, None);
        let (app, _pool) = running(&control);
        let (status, v) = call(app, "GET", "/v1/workers", "").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let got: WorkersStatus = serde_json::from_value(v).unwrap();
        assert_eq!(got, control.status());
        assert_eq!(
            (got.group.as_str(), got.workers, got.desired),
            ("storage", 2, 2)
        );
        assert_eq!(got.mode, Mode::Manual);
        assert!(got.autoscale.is_none());
    }

    #[tokio::test]
    async fn put_workers_pins_a_count_and_autoscale_hands_it_back() {
        let control = PoolControl::new("storage", 2, Some(AutoscaleConfig::default()));
        let (app, pool) = running(&control);
        assert_eq!(control.status().mode, Mode::Auto);

        let (status, v) = call(app.clone(), "PUT", "/v1/workers", r#"{"workers": 3}"#).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(
            (v["desired"].as_u64(), v["mode"].as_str()),
            (Some(3), Some("manual"))
        );
        // The pool is asked for it.
        assert_eq!(
            *pool.borrow(),
            Desired {
                workers: 3,
                mode: Mode::Manual
            }
        );

        let (status, v) = call(app.clone(), "PUT", "/v1/workers", r#"{"autoscale": true}"#).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["mode"], "auto");
        assert_eq!(pool.borrow().mode, Mode::Auto);

        // `false` pins the count the autoscaler had reached.
        let (status, v) = call(app, "PUT", "/v1/workers", r#"{"autoscale": false}"#).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(
            (v["desired"].as_u64(), v["mode"].as_str()),
            (Some(3), Some("manual"))
        );
    }

    #[tokio::test]
    async fn bad_requests_are_refused_with_their_code_and_change_nothing() {
        let control = PoolControl::new("storage", 2, None);
        let (app, pool) = running(&control);
        for (body, want, code) in [
            (r#"{"workers": 0}"#, StatusCode::BAD_REQUEST, "out_of_range"),
            (
                r#"{"workers": 100000}"#,
                StatusCode::BAD_REQUEST,
                "out_of_range",
            ),
            (
                r#"{"autoscale": true}"#,
                StatusCode::CONFLICT,
                "no_autoscaler",
            ),
            (r#"{}"#, StatusCode::BAD_REQUEST, "malformed_body"),
            (
                r#"{"workers": 1, "autoscale": true}"#,
                StatusCode::BAD_REQUEST,
                "malformed_body",
            ),
            (
                r#"{"wrokers": 1}"#,
                StatusCode::BAD_REQUEST,
                "malformed_body",
            ),
            ("not json", StatusCode::BAD_REQUEST, "malformed_body"),
        ] {
            let (status, v) = call(app.clone(), "PUT", "/v1/workers", body).await;
            assert_eq!(
                (status, v["error"].as_str()),
                (want, Some(code)),
                "{body} → {v}"
            );
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        }
        assert_eq!(control.status().desired, 2);
        assert_eq!(pool.borrow().workers, 2);
    }

    #[tokio::test]
    async fn a_stopped_pool_refuses_changes() {
        let control = PoolControl::new("storage", 2, None);
        let (app, pool) = running(&control);
        drop(pool);
        let (status, v) = call(app, "PUT", "/v1/workers", r#"{"workers": 3}"#).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("not_running"))
        );
    }

    #[tokio::test]
    async fn neither_live_nor_ready_once_the_pool_stopped() {
        for path in ["/livez", "/readyz"] {
            let (status, body) = get(app(0), path).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert!(body.contains("not_running"), "{path}: {body}");
        }
    }
}
