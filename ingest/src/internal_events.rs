//! Telemetry of ingest: each event is a struct whose `emit` logs and counts in one place,
//! so a metric and its log line never drift apart (vector's `internal_events`).
//!
//! Labels are bounded: `tenant` (from the tenants file), `status` (HTTP status), `reason`
//! (the error codes of [`crate::http::ErrorCode`]) and `error` (dead-letter kinds). The producer's publish metrics are the
//! binding's (`sluice_binding::internal_events`).
//! Device ids never become labels, and nothing here runs per reading.

use std::time::Duration;

use metrics::{counter, histogram};

/// Readings answered 202, by tenant.
pub const READINGS_ACCEPTED_TOTAL: &str = "sluice_ingest_readings_accepted_total";
/// HTTP requests answered, by status code.
pub const REQUESTS_TOTAL: &str = "sluice_ingest_requests_total";
/// HTTP requests refused, by reason (the error code of the response body).
pub const REQUESTS_REJECTED_TOTAL: &str = "sluice_ingest_requests_rejected_total";
/// Time to answer an HTTP request.
pub const REQUEST_SECONDS: &str = "sluice_ingest_request_seconds";
/// Readings the gate forwarded from a gated tenant's ingress queue, by tenant.
pub const GATE_READINGS_FORWARDED_TOTAL: &str = "sluice_ingest_gate_readings_forwarded_total";
/// Batches the gate dead-lettered, by tenant and error kind.
pub const GATE_DEAD_LETTERS_TOTAL: &str = "sluice_ingest_gate_dead_letters_total";
/// Gate publishes (forwards, dead letters) not confirmed and retried, by tenant.
pub const GATE_FORWARD_FAILURES_TOTAL: &str = "sluice_ingest_gate_forward_failures_total";

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

/// The gate forwarded a batch of a gated tenant to the partitions (confirmed).
#[derive(Debug)]
pub(crate) struct GateForwarded<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) readings: usize,
}

impl GateForwarded<'_> {
    pub(crate) fn emit(self) {
        tracing::trace!(
            tenant = self.tenant,
            readings = self.readings,
            "gate forwarded a batch"
        );
        counter!(GATE_READINGS_FORWARDED_TOTAL, "tenant" => self.tenant.to_owned())
            .increment(self.readings as u64);
    }
}

/// The gate dead-lettered a batch from a gated tenant's ingress queue.
#[derive(Debug)]
pub(crate) struct GateDeadLettered<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) error: &'static str,
    pub(crate) reason: &'a str,
}

impl GateDeadLettered<'_> {
    pub(crate) fn emit(self) {
        tracing::debug!(
            tenant = self.tenant,
            error = self.error,
            reason = self.reason,
            "gate dead-lettered a batch"
        );
        counter!(
            GATE_DEAD_LETTERS_TOTAL,
            "tenant" => self.tenant.to_owned(),
            "error" => self.error
        )
        .increment(1);
    }
}

/// A forward or dead letter of the gate was not confirmed; it is tried again after a
/// backoff, the delivery unsettled meanwhile.
#[derive(Debug)]
pub(crate) struct GateForwardFailed<'a, E> {
    pub(crate) tenant: &'a str,
    pub(crate) error: &'a E,
}

impl<E: std::fmt::Display> GateForwardFailed<'_, E> {
    pub(crate) fn emit(self) {
        tracing::warn!(
            tenant = self.tenant,
            error = %self.error,
            "gate: a publish was not confirmed; retrying"
        );
        counter!(GATE_FORWARD_FAILURES_TOTAL, "tenant" => self.tenant.to_owned()).increment(1);
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
