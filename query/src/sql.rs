//! `POST /v1/query`: one read-only SQL query over the tenant's `readings`.
//!
//! The request body is the SQL text (`Content-Type: application/sql` or `text/plain`, or
//! none) or `{"sql": "..."}` (`application/json`). The answer is chosen by `Accept`:
//!
//! - `application/json` (the default):
//!   `{"columns": [{"name": "device", "type": "Utf8"}, ...], "rows": [{"device": "d1", ...}]}`,
//!   timestamps as RFC 3339 strings, nulls explicit;
//! - `application/vnd.apache.arrow.stream`: the results as an Arrow IPC stream (schema,
//!   then the batches), for pyarrow, Polars, DuckDB and other Arrow readers.
//!
//! Results are encoded as they arrive and counted against the row and byte limits; a query
//! over a limit is cancelled (dropping its stream stops its tasks) and answered 413, one
//! over the time limit 408. Limits are in [`QueryApiConfig`](crate::QueryApiConfig).

use std::time::Instant;

use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::StreamWriter;
use arrow::json::writer::{JsonArray, WriterBuilder};
use arrow::record_batch::RecordBatch;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use sluice_binding::tenancy::Scope;
use sluice_sinks::query::QueryError;

use crate::error::{ApiError, ErrorCode};
use crate::internal_events::Answered;
use crate::{AppState, QueryApiConfig};

/// The media type of Arrow IPC streams.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// `{"sql": "..."}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    sql: String,
}

/// How results are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Arrow,
}

pub(crate) async fn post_query(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let tenant = match state.tenants().authenticate(&headers, Scope::Query) {
        Ok(t) => t.as_str().to_owned(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let (result, rows) = match answer(&state, &tenant, &headers, body, started).await {
        Ok((response, rows)) => (Ok(response), rows),
        Err(e) => (Err(e), 0),
    };
    Answered::of("query", &tenant, &result, rows, started).emit();
    match result {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn answer(
    state: &AppState,
    tenant: &str,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<(Response, u64), ApiError> {
    let config = state.config();
    let format = accepted(headers)?;
    let sql = read_sql(headers, body, config, started).await?;
    let slots = state.take_slots(tenant)?;
    let session = state.session(tenant).map_err(|e| failure(&e))?;
    let remaining = config.timeout.saturating_sub(started.elapsed());
    // On the query runtime, so that the time limit fires even while an operator computes
    // without yielding. Aborting the task drops the stream, which cancels the query at its
    // next pause; its slots stay taken until then, so a runaway query costs its tenant's
    // capacity, not the others'.
    let run = {
        let config = config.clone();
        state.executor().spawn(async move {
            let _slots = slots;
            let stream = session
                .stream(&sql, Some(config.memory_limit))
                .await
                .map_err(|e| failure(&e))?;
            encode(stream, format, &config).await
        })
    };
    let abort = run.abort_handle();
    let (bytes, rows) = match tokio::time::timeout(remaining, run).await {
        Ok(Ok(result)) => result?,
        Ok(Err(e)) => {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("the query task failed: {e}"),
            ));
        }
        Err(_) => {
            abort.abort();
            return Err(ApiError::new(
                ErrorCode::QueryTimeout,
                format!(
                    "the query ran longer than {:?} and was cancelled; narrow it by time (`WHERE ts > now() - interval '1 hour'`) or aggregate",
                    config.timeout
                ),
            ));
        }
    };
    let content_type = match format {
        Format::Json => HeaderValue::from_static("application/json"),
        Format::Arrow => HeaderValue::from_static(ARROW_STREAM),
    };
    let mut response = Response::new(Body::from(bytes));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    Ok((response, rows))
}

/// The format `Accept` asks for: Arrow if it names the Arrow stream type, JSON if it names
/// JSON or anything (`*/*`, `application/*`) or is absent; 406 otherwise.
fn accepted(headers: &HeaderMap) -> Result<Format, ApiError> {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Ok(Format::Json);
    };
    let accept = accept
        .to_str()
        .map_err(|_| ApiError::new(ErrorCode::NotAcceptable, "the Accept header is not ASCII"))?;
    let types: Vec<&str> = accept
        .split(',')
        .map(|t| t.split(';').next().unwrap_or("").trim())
        .collect();
    if types.iter().any(|t| t.eq_ignore_ascii_case(ARROW_STREAM)) {
        return Ok(Format::Arrow);
    }
    if types.iter().any(|t| {
        t.eq_ignore_ascii_case("application/json")
            || *t == "*/*"
            || t.eq_ignore_ascii_case("application/*")
    }) {
        return Ok(Format::Json);
    }
    Err(ApiError::new(
        ErrorCode::NotAcceptable,
        format!("results come as application/json or {ARROW_STREAM}, not {accept}"),
    ))
}

/// The SQL of the request, read within the size and time limits.
async fn read_sql(
    headers: &HeaderMap,
    body: Body,
    config: &QueryApiConfig,
    started: Instant,
) -> Result<String, ApiError> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let json = match media.as_deref() {
        None | Some("application/sql" | "text/plain") => false,
        Some("application/json") => true,
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!(
                    "send the SQL as application/sql or text/plain, or as {{\"sql\": \"...\"}} in application/json, not {other}"
                ),
            ));
        }
    };
    // JSON escapes make the body longer than its SQL.
    let limit = if json {
        config.max_sql_bytes.saturating_mul(2).saturating_add(64)
    } else {
        config.max_sql_bytes
    };
    let too_large = || {
        ApiError::new(
            ErrorCode::SqlTooLarge,
            format!("the SQL is longer than {} bytes", config.max_sql_bytes),
        )
    };
    let remaining = config.timeout.saturating_sub(started.elapsed());
    let read = async {
        let mut chunks = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(
                    ErrorCode::MalformedBody,
                    format!("cannot read the request body: {e}"),
                )
            })?;
            if bytes.len() + chunk.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    let bytes = match tokio::time::timeout(remaining, read).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::QueryTimeout,
                format!(
                    "the request body did not arrive within {:?}",
                    config.timeout
                ),
            ));
        }
    };
    let sql = if json {
        serde_json::from_slice::<QueryBody>(&bytes)
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::MalformedBody,
                    format!("the body must be {{\"sql\": \"...\"}}: {e}"),
                )
            })?
            .sql
    } else {
        String::from_utf8(bytes)
            .map_err(|_| ApiError::new(ErrorCode::MalformedBody, "the SQL is not UTF-8"))?
    };
    if sql.len() > config.max_sql_bytes {
        return Err(too_large());
    }
    if sql.trim().is_empty() {
        return Err(ApiError::new(
            ErrorCode::MalformedBody,
            "the body holds no SQL",
        ));
    }
    Ok(sql)
}

/// Encodes the results as they arrive; refuses them past the row or byte limits.
async fn encode(
    mut stream: datafusion::execution::SendableRecordBatchStream,
    format: Format,
    config: &QueryApiConfig,
) -> Result<(Vec<u8>, u64), ApiError> {
    let schema = stream.schema();
    let mut out = Output::new(format, &schema)?;
    let mut rows = 0usize;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| failure(&QueryError::DataFusion(e)))?;
        rows += batch.num_rows();
        if rows > config.max_result_rows {
            return Err(ApiError::new(
                ErrorCode::ResultTooLarge,
                format!(
                    "the query returns more than {} rows; aggregate, filter, or page with LIMIT and OFFSET",
                    config.max_result_rows
                ),
            ));
        }
        out.write(&batch)?;
        if out.len() > config.max_result_bytes {
            return Err(ApiError::new(
                ErrorCode::ResultTooLarge,
                format!(
                    "the results are larger than {} bytes; select fewer columns or rows",
                    config.max_result_bytes
                ),
            ));
        }
    }
    Ok((out.finish()?, rows as u64))
}

/// The answer being written.
enum Output {
    Json {
        rows: arrow::json::Writer<Vec<u8>, JsonArray>,
        columns: String,
    },
    Arrow(StreamWriter<Vec<u8>>),
}

impl Output {
    fn new(format: Format, schema: &SchemaRef) -> Result<Self, ApiError> {
        Ok(match format {
            Format::Json => {
                let columns: Vec<serde_json::Value> = schema
                    .fields()
                    .iter()
                    .map(|f| serde_json::json!({"name": f.name(), "type": f.data_type().to_string()}))
                    .collect();
                Self::Json {
                    rows: WriterBuilder::new()
                        .with_explicit_nulls(true)
                        .build::<_, JsonArray>(Vec::new()),
                    columns: serde_json::Value::Array(columns).to_string(),
                }
            }
            Format::Arrow => {
                Self::Arrow(StreamWriter::try_new(Vec::new(), schema).map_err(internal)?)
            }
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), ApiError> {
        match self {
            Self::Json { rows, .. } => rows.write(batch).map_err(internal),
            Self::Arrow(w) => w.write(batch).map_err(internal),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Json { rows, .. } => rows.get_ref().len(),
            Self::Arrow(w) => w.get_ref().len(),
        }
    }

    fn finish(self) -> Result<Vec<u8>, ApiError> {
        match self {
            Self::Json { mut rows, columns } => {
                rows.finish().map_err(internal)?;
                let rows = rows.into_inner();
                let mut out = Vec::with_capacity(rows.len() + columns.len() + 32);
                out.extend_from_slice(b"{\"columns\":");
                out.extend_from_slice(columns.as_bytes());
                out.extend_from_slice(b",\"rows\":");
                // The writer writes nothing at all for zero rows.
                if rows.is_empty() {
                    out.extend_from_slice(b"[]");
                } else {
                    out.extend_from_slice(&rows);
                }
                out.push(b'}');
                Ok(out)
            }
            Self::Arrow(mut w) => {
                w.finish().map_err(internal)?;
                w.into_inner().map_err(internal)
            }
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("writing the results: {e}"))
}

/// The answer to a query that failed: the query's fault (400, 413) or the store's (503,
/// details in the log only: they name the store).
fn failure(e: &QueryError) -> ApiError {
    if e.is_resources_exhausted() {
        return ApiError::new(
            ErrorCode::QueryMemoryExceeded,
            format!(
                "the query needs more memory than its limit: {e}; aggregate over a shorter time range"
            ),
        );
    }
    if e.is_store_failure() {
        tracing::warn!(error = %e, "a query cannot read the readings table");
        return ApiError::new(
            ErrorCode::Unavailable,
            "the readings table cannot be read right now; retry shortly",
        );
    }
    match e {
        QueryError::NotAQuery(m) => ApiError::new(
            ErrorCode::NotAQuery,
            format!("only queries are allowed: {m}"),
        ),
        QueryError::Plan(_) | QueryError::DataFusion(_) => {
            ApiError::new(ErrorCode::InvalidSql, e.to_string())
        }
        _ => {
            tracing::error!(error = %e, "query failed");
            ApiError::new(ErrorCode::Internal, e.to_string())
        }
    }
}
