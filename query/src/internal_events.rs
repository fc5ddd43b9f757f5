//! Everything the read API logs and counts, each event in one place. Labels are bounded:
//! `endpoint` and `outcome` from fixed sets, `tenant` from the tenants file.

use std::time::Duration;

/// Reads answered, by `endpoint` (`query`, `latest`), `tenant` and `outcome` (`ok` or the
/// error code).
pub const REQUESTS: &str = "sluice_query_requests_total";
/// Time to answer a read, seconds, by `endpoint`.
pub const DURATION_SECONDS: &str = "sluice_query_duration_seconds";
/// Rows returned by SQL queries (devices by latest-value reads), by `endpoint` and
/// `tenant`.
pub const ROWS_RETURNED: &str = "sluice_query_rows_returned_total";
/// Queries running now.
pub const RUNNING: &str = "sluice_query_running";

/// One read answered (or refused once its tenant was known).
#[derive(Debug)]
pub(crate) struct Answered<'a> {
    pub(crate) endpoint: &'static str,
    pub(crate) tenant: &'a str,
    pub(crate) outcome: &'static str,
    pub(crate) rows: u64,
    pub(crate) elapsed: Duration,
    /// The error message, for refusals.
    pub(crate) message: Option<&'a str>,
}

impl<'a> Answered<'a> {
    /// The event of `result`, a read of `tenant` started at `started`.
    pub(crate) fn of<T>(
        endpoint: &'static str,
        tenant: &'a str,
        result: &'a Result<T, crate::ApiError>,
        rows: u64,
        started: std::time::Instant,
    ) -> Self {
        let (outcome, message) = match result {
            Ok(_) => ("ok", None),
            Err(e) => (e.code.as_str(), Some(e.message.as_str())),
        };
        Self {
            endpoint,
            tenant,
            outcome,
            rows: if result.is_ok() { rows } else { 0 },
            elapsed: started.elapsed(),
            message,
        }
    }

    pub(crate) fn emit(self) {
        match self.message {
            None => tracing::debug!(
                endpoint = self.endpoint,
                tenant = self.tenant,
                rows = self.rows,
                elapsed_ms = self.elapsed.as_millis() as u64,
                "read answered"
            ),
            Some(message) => tracing::info!(
                endpoint = self.endpoint,
                tenant = self.tenant,
                outcome = self.outcome,
                elapsed_ms = self.elapsed.as_millis() as u64,
                message,
                "read refused"
            ),
        }
        let labels = [
            ("endpoint", self.endpoint.to_owned()),
            ("tenant", self.tenant.to_owned()),
            ("outcome", self.outcome.to_owned()),
        ];
        metrics::counter!(REQUESTS, &labels).increment(1);
        metrics::histogram!(DURATION_SECONDS, "endpoint" => self.endpoint)
            .record(self.elapsed.as_secs_f64());
        if self.rows > 0 {
            metrics::counter!(ROWS_RETURNED, "endpoint" => self.endpoint, "tenant" => self.tenant.to_owned())
                .increment(self.rows);
        }
    }
}

/// The number of queries running changed.
pub(crate) fn running(n: usize) {
    metrics::gauge!(RUNNING).set(n as f64);
}
