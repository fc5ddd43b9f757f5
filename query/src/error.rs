//! The JSON error answer of every refused read, in ingest's shape:
//! `{"error": "<code>", "message": "<for humans>"}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sluice_binding::tenancy::AuthError;

/// The stable error codes of the read API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: the body is not SQL text or `{"sql": "..."}`.
    MalformedBody,
    /// 400: the SQL does not parse or plan (syntax, unknown column or function, types),
    /// or fails on the data (a cast).
    InvalidSql,
    /// 400: a statement that is not a query (DDL, DML, COPY, SET, ...).
    NotAQuery,
    /// 400: a bad query-string parameter.
    InvalidParameter,
    /// 401: no API key, or an unknown one.
    Unauthorized,
    /// 403: the key lacks the `query` scope.
    Forbidden,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists, not with this method.
    MethodNotAllowed,
    /// 406: the `Accept` header asks for neither JSON nor Arrow IPC.
    NotAcceptable,
    /// 408: the query ran longer than the time limit and was cancelled.
    QueryTimeout,
    /// 413: the SQL text is longer than the limit.
    SqlTooLarge,
    /// 413: the query needed more memory than its limit.
    QueryMemoryExceeded,
    /// 413: the results are larger than the limit (rows or bytes).
    ResultTooLarge,
    /// 415: a body that is neither `application/sql`, `text/plain` nor `application/json`.
    UnsupportedMediaType,
    /// 429: the tenant already runs as many queries as it may.
    TooManyQueries,
    /// 503: the process already runs as many queries as it may.
    Overloaded,
    /// 503: the table or Redis cannot be read right now.
    Unavailable,
    /// 500: a bug; the message says what.
    Internal,
}

impl ErrorCode {
    /// The code written in the `error` field (and the `outcome` label of the metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedBody => "malformed_body",
            Self::InvalidSql => "invalid_sql",
            Self::NotAQuery => "not_a_query",
            Self::InvalidParameter => "invalid_parameter",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotAcceptable => "not_acceptable",
            Self::QueryTimeout => "query_timeout",
            Self::SqlTooLarge => "sql_too_large",
            Self::QueryMemoryExceeded => "query_memory_exceeded",
            Self::ResultTooLarge => "result_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::TooManyQueries => "too_many_queries",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Self::MalformedBody | Self::InvalidSql | Self::NotAQuery | Self::InvalidParameter => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            Self::QueryTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::SqlTooLarge | Self::QueryMemoryExceeded | Self::ResultTooLarge => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooManyQueries => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A refused read.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// What kind.
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
}

impl ApiError {
    /// An error of `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = if e.status() == 403 {
            ErrorCode::Forbidden
        } else {
            ErrorCode::Unauthorized
        };
        Self::new(code, e.to_string())
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: self.code.as_str(),
            message: &self.message,
        };
        let mut response = (self.code.status(), Json(body)).into_response();
        if matches!(
            self.code,
            ErrorCode::TooManyQueries | ErrorCode::Overloaded | ErrorCode::Unavailable
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
