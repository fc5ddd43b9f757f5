//! The JSON error answer of every refused request:
//!
//! ```json
//! {"error": "invalid_reading", "message": "2 problems in 10 readings; ...",
//!  "details": [{"index": 3, "field": "value", "problem": "value is NaN"}], "details_total": 2}
//! ```
//!
//! `error` is a stable code (also the `reason` label of
//! `sluice_ingest_requests_rejected_total`); `message` is for humans; `details` lists at
//! most [`MAX_DETAILS`] per-reading problems and `details_total` counts all of them.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Most per-reading problems listed in one answer.
pub const MAX_DETAILS: usize = 100;

/// The stable error codes, one per kind of refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: the body is not a JSON / MessagePack document of the expected shape (syntax,
    /// wrong types, missing or unknown fields, trailing data).
    MalformedBody,
    /// 400: a bad query string (`precision`).
    InvalidQuery,
    /// 400: the body names a tenant; the tenant comes from the API key only.
    TenantInBody,
    /// 401: no API key, or an unknown one.
    Unauthorized,
    /// 403: the key is known but lacks the `ingest` scope.
    Forbidden,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists, not with this method.
    MethodNotAllowed,
    /// 408: the body did not arrive within `body_read_timeout`.
    RequestTimeout,
    /// 413: the body is larger than `max_body_bytes`.
    BodyTooLarge,
    /// 413: more readings than `max_readings_per_request`.
    TooManyReadings,
    /// 415: neither JSON nor MessagePack.
    UnsupportedMediaType,
    /// 422: the `readings` array is empty.
    NoReadings,
    /// 422: readings break the binding's rules (names, timestamps, values); see `details`.
    InvalidReading,
    /// 422: the readings fall on more UTC days than `max_days_per_batch` (a backfill sent
    /// at once); send them in requests of fewer days.
    TooManyDays,
    /// 429: the tenant is over its quota (readings or bytes a second, the tenants file's
    /// `quota`); retry after `Retry-After` seconds.
    QuotaExceeded,
    /// 503: the broker did not confirm (blocked, nacked, unroutable, timeout, connection
    /// lost) or ingest is shutting down; retry after `Retry-After` seconds.
    Unavailable,
    /// 503: `max_inflight_requests` requests are already being handled, or the tenant's
    /// share of them (`max_inflight_per_tenant`).
    Overloaded,
    /// 500: a bug; the message says what.
    Internal,
}

impl ErrorCode {
    /// The code written in the `error` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedBody => "malformed_body",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::TenantInBody => "tenant_in_body",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::TooManyReadings => "too_many_readings",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::NoReadings => "no_readings",
            ErrorCode::InvalidReading => "invalid_reading",
            ErrorCode::TooManyDays => "too_many_days",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status of the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::MalformedBody | ErrorCode::InvalidQuery | ErrorCode::TenantInBody => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::BodyTooLarge | ErrorCode::TooManyReadings => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::NoReadings | ErrorCode::InvalidReading | ErrorCode::TooManyDays => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One problem of one reading.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Detail {
    /// Position of the reading in `readings`.
    pub index: usize,
    /// `device`, `metric`, `ts`, `value` or `tenant`.
    pub field: &'static str,
    /// What is wrong, in the words of `sluice_binding::validate` where it applies.
    pub problem: String,
}

/// A refused request.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The code (and status).
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
    /// At most [`MAX_DETAILS`] per-reading problems.
    pub details: Vec<Detail>,
    /// Number of per-reading problems, listed or not.
    pub details_total: usize,
    /// `Retry-After` in seconds (503 answers).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Vec::new(),
            details_total: 0,
            retry_after: None,
        }
    }

    /// With a `Retry-After`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "<[Detail]>::is_empty")]
    details: &'a [Detail],
    #[serde(skip_serializing_if = "Option::is_none")]
    details_total: Option<usize>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: self.code.as_str(),
            message: &self.message,
            details: &self.details,
            details_total: (!self.details.is_empty()).then_some(self.details_total),
        };
        let mut response = (self.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        if self.code == ErrorCode::Unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Per-reading problems, counted in full and listed up to [`MAX_DETAILS`].
#[derive(Debug, Default)]
pub(crate) struct Problems {
    pub(crate) listed: Vec<Detail>,
    pub(crate) total: usize,
}

impl Problems {
    pub(crate) fn push(
        &mut self,
        index: usize,
        field: &'static str,
        problem: impl FnOnce() -> String,
    ) {
        self.total += 1;
        if self.listed.len() < MAX_DETAILS {
            self.listed.push(Detail {
                index,
                field,
                problem: problem(),
            });
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The 422 answer listing them.
    pub(crate) fn into_error(self, readings: usize) -> ApiError {
        let noun = if self.total == 1 {
            "problem"
        } else {
            "problems"
        };
        let shown = if self.total > self.listed.len() {
            format!(" (the first {} are listed)", self.listed.len())
        } else {
            String::new()
        };
        ApiError {
            code: ErrorCode::InvalidReading,
            message: format!(
                "{} {noun} in {readings} readings{shown}; a request is accepted whole or not at all, so none of its readings was stored",
                self.total
            ),
            details: self.listed,
            details_total: self.total,
            retry_after: None,
        }
    }
}
