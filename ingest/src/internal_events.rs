//! Telemetry of ingest: each event is a struct whose `emit` logs and counts in one place,
//! so a metric and its log line never drift apart (vector's `internal_events`).
//!
//! Labels are bounded: `tenant` (from the tenants file), `status` (HTTP status), `reason`
//! (the error codes of [`crate::http::ErrorCode`]) and `error` (publish error kinds).
//! Device ids never become labels, and nothing here runs per reading.

use std::time::Duration;

use metrics::{counter, histogram};

/// Readings answered 202, by tenant.
pub const READINGS_ACCEPTED_TOTAL: &str = "sluice_ingest_readings_accepted_total";
/// HTTP requests answered, by status code.
pub const REQUESTS_TOTAL: &str = "sluice_ingest_requests_total";
/// HTTP requests refused, by reason (the error code of the response body).
pub const REQUESTS_REJECTED_TOTAL: &str = "sluice_ingest_requests_rejected_total";
/// Batches the broker confirmed.
pub const BATCHES_PUBLISHED_TOTAL: &str = "sluice_ingest_batches_published_total";
/// Publish attempts that failed, by error kind (retried attempts included).
pub const PUBLISH_FAILURES_TOTAL: &str = "sluice_ingest_publish_failures_total";
/// Time from publish to broker confirm of a batch (successful attempts).
pub const PUBLISH_CONFIRM_SECONDS: &str = "sluice_ingest_publish_confirm_seconds";
/// Time to answer an HTTP request.
pub const REQUEST_SECONDS: &str = "sluice_ingest_request_seconds";
/// Readings per confirmed batch.
pub const BATCH_READINGS: &str = "sluice_ingest_batch_readings";

/// An HTTP request was answered.
#[derive(Debug)]
pub(crate) struct RequestCompleted {
    pub(crate) status: u16,
    pub(crate) elapsed: Duration,
}

impl RequestCompleted {
    pub(crate) fn emit(self) {
        counter!(REQUESTS_TOTAL, "status" => status_label(self.status)).increment(1);
        histogram!(REQUEST_SECONDS).record(self.elapsed.as_secs_f64());
    }
}

/// A request was refused; client errors are logged at debug level (they are the caller's
/// problem, and a flood of them must not flood the log), server-side ones at warn.
#[derive(Debug)]
pub(crate) struct RequestRejected<'a> {
    pub(crate) reason: &'static str,
    pub(crate) status: u16,
    pub(crate) message: &'a str,
    pub(crate) tenant: Option<&'a str>,
}

impl RequestRejected<'_> {
    pub(crate) fn emit(self) {
        if self.status >= 500 {
            tracing::warn!(
                reason = self.reason,
                status = self.status,
                tenant = self.tenant,
                message = self.message,
                "request refused"
            );
        } else {
            tracing::debug!(
                reason = self.reason,
                status = self.status,
                tenant = self.tenant,
                message = self.message,
                "request refused"
            );
        }
        counter!(REQUESTS_REJECTED_TOTAL, "reason" => self.reason).increment(1);
    }
}

/// A request's readings were all confirmed by the broker.
#[derive(Debug)]
pub(crate) struct ReadingsAccepted<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) count: usize,
}

impl ReadingsAccepted<'_> {
    pub(crate) fn emit(self) {
        tracing::trace!(
            tenant = self.tenant,
            count = self.count,
            "readings accepted"
        );
        counter!(READINGS_ACCEPTED_TOTAL, "tenant" => self.tenant.to_owned())
            .increment(self.count as u64);
    }
}

/// The broker confirmed a batch.
#[derive(Debug)]
pub(crate) struct BatchPublished {
    pub(crate) readings: usize,
    pub(crate) confirm: Duration,
}

impl BatchPublished {
    pub(crate) fn emit(self) {
        tracing::trace!(readings = self.readings, confirm = ?self.confirm, "batch confirmed");
        counter!(BATCHES_PUBLISHED_TOTAL).increment(1);
        histogram!(PUBLISH_CONFIRM_SECONDS).record(self.confirm.as_secs_f64());
        histogram!(BATCH_READINGS).record(self.readings as f64);
    }
}

/// A publish attempt failed; `will_retry` says whether the producer tries again.
#[derive(Debug)]
pub(crate) struct PublishFailed<'a> {
    pub(crate) error: &'static str,
    pub(crate) detail: &'a dyn std::error::Error,
    pub(crate) attempt: u32,
    pub(crate) will_retry: bool,
}

impl PublishFailed<'_> {
    pub(crate) fn emit(self) {
        if self.will_retry {
            tracing::info!(error = self.error, detail = %self.detail, attempt = self.attempt, "publish failed, retrying the same bytes");
        } else {
            tracing::warn!(error = self.error, detail = %self.detail, attempt = self.attempt, "publish failed");
        }
        counter!(PUBLISH_FAILURES_TOTAL, "error" => self.error).increment(1);
    }
}

/// Static labels for the usual statuses, so no string is built per request.
fn status_label(status: u16) -> metrics::SharedString {
    match status {
        200 => "200".into(),
        202 => "202".into(),
        400 => "400".into(),
        401 => "401".into(),
        404 => "404".into(),
        405 => "405".into(),
        413 => "413".into(),
        415 => "415".into(),
        422 => "422".into(),
        500 => "500".into(),
        503 => "503".into(),
        other => other.to_string().into(),
    }
}
